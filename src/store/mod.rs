//! Persistence: SQLite (one file, WAL; the default) or PostgreSQL (several instances), behind one
//! `Db` handle. The schema uses only portable types (TEXT ids, BIGINT integers, millisecond
//! timestamps), so the same statements run on both; migrations run at start.

use std::str::FromStr;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, ConnectOptions as _};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database url `{0}` is neither sqlite:// nor postgres://")]
    Url(String),
    #[error("creating the data folder: {0}")]
    Io(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    /// The SQLite database file (`None` for PostgreSQL and for an in-memory database).
    pub sqlite_file: Option<std::path::PathBuf>,
    /// SQLite: stops the background checkpointer when the last handle goes.
    _checkpointer: Option<std::sync::Arc<Checkpointer>>,
}

/// How often the SQLite write-ahead log is copied back into the database file, off the
/// request path (a checkpoint syncs the file to disk; commits themselves do not wait for it).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Debug)]
struct Checkpointer {
    _stop: tokio_util::sync::DropGuard,
}

/// A migration's statements: the same on both backends, or written for each.
enum Migration {
    /// Statements separated by `;`, portable.
    Portable(&'static str),
    /// One list of whole statements per backend (bodies that contain `;`).
    PerBackend {
        sqlite: &'static [&'static str],
        postgres: &'static [&'static str],
    },
}

/// Ordered migrations; each runs once, in a transaction, recorded in `tollgate_migrations`.
const MIGRATIONS: &[(i64, Migration)] = &[
    (
        1,
        Migration::Portable(
            r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'active',
    balance BIGINT NOT NULL DEFAULT 0,
    reserved BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    lookup TEXT NOT NULL UNIQUE,
    secret_hash TEXT NOT NULL,
    allowed_models TEXT,
    policy_set TEXT NOT NULL DEFAULT 'default',
    limits TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_account ON api_keys(account_id);
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    amount BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX reservations_open ON reservations(state, expires_at);
CREATE TABLE ledger (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    key_id TEXT,
    request_id TEXT,
    model TEXT,
    kind TEXT NOT NULL,
    amount BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    images BIGINT NOT NULL DEFAULT 0,
    seconds BIGINT NOT NULL DEFAULT 0,
    note TEXT,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX ledger_one_charge_per_request ON ledger(request_id, kind);
CREATE INDEX ledger_account ON ledger(account_id, created_at);
"#,
        ),
    ),
    // The ledger is append-only and is the balance: every insert moves `accounts.balance` in
    // its own transaction, so `balance = SUM(ledger.amount)` holds whoever writes.
    (
        2,
        Migration::PerBackend {
            sqlite: &[
                "CREATE TRIGGER ledger_moves_balance AFTER INSERT ON ledger BEGIN \
                 UPDATE accounts SET balance = balance + NEW.amount WHERE id = NEW.account_id; END",
                "CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN \
                 SELECT RAISE(ABORT, 'the ledger is append-only'); END",
                "CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN \
                 SELECT RAISE(ABORT, 'the ledger is append-only'); END",
            ],
            postgres: &[
                "CREATE FUNCTION tollgate_ledger_moves_balance() RETURNS trigger LANGUAGE plpgsql AS $body$ \
                 BEGIN UPDATE accounts SET balance = balance + NEW.amount WHERE id = NEW.account_id; RETURN NEW; END $body$",
                "CREATE TRIGGER ledger_moves_balance AFTER INSERT ON ledger FOR EACH ROW \
                 EXECUTE FUNCTION tollgate_ledger_moves_balance()",
                "CREATE FUNCTION tollgate_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $body$ \
                 BEGIN RAISE EXCEPTION 'the ledger is append-only'; END $body$",
                "CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger FOR EACH ROW \
                 EXECUTE FUNCTION tollgate_ledger_append_only()",
            ],
        },
    ),
    // What a charge took beyond its reservation (usage is charged in full): the part of a
    // balance below zero that no forced debit explains.
    (
        3,
        Migration::Portable("ALTER TABLE ledger ADD COLUMN overrun BIGINT NOT NULL DEFAULT 0"),
    ),
    // The async task API: tasks (stored before the client learns the id, driven step by step
    // under a lease), their callback deliveries, per-account webhook secrets, and the gateway's
    // own settings shared by every instance (the key that signs download links).
    (
        4,
        Migration::Portable(
            r#"
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    input TEXT NOT NULL,
    callback_url TEXT,
    status TEXT NOT NULL,
    progress BIGINT,
    job_id TEXT,
    upstream_outputs TEXT,
    outputs TEXT,
    error_code TEXT,
    error_message TEXT,
    reserved BIGINT NOT NULL,
    price TEXT NOT NULL,
    hold_id TEXT,
    cost BIGINT,
    images BIGINT NOT NULL DEFAULT 0,
    seconds BIGINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    polls BIGINT NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    deadline_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    status_since BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT,
    callback_state TEXT NOT NULL DEFAULT 'none',
    callback_attempts BIGINT NOT NULL DEFAULT 0,
    callback_next_at BIGINT NOT NULL DEFAULT 0,
    callback_lease_until BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX tasks_due ON tasks(status, next_at);
CREATE INDEX tasks_callbacks_due ON tasks(callback_state, callback_next_at);
CREATE INDEX tasks_account ON tasks(account_id, created_at);
CREATE TABLE task_deliveries (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    attempt BIGINT NOT NULL,
    status BIGINT,
    outcome TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX task_deliveries_task ON task_deliveries(task_id, attempt);
CREATE TABLE webhook_secrets (
    account_id TEXT PRIMARY KEY REFERENCES accounts(id),
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE gateway_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"#,
        ),
    ),
    // Limits per account (the same JSON object as a key's), and the abnormal-usage guard's
    // actions on keys: a suspension or a throttle, why, until when, and who lifted it.
    (
        5,
        Migration::Portable(
            r#"
ALTER TABLE accounts ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
CREATE TABLE key_suspensions (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES api_keys(id),
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    since BIGINT NOT NULL,
    until BIGINT,
    lifted_at BIGINT,
    lifted_by TEXT
);
CREATE INDEX key_suspensions_key ON key_suspensions(key_id, lifted_at)
"#,
        ),
    ),
];

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Db {
    /// Connect (creating the SQLite file and its folder if needed) and run migrations.
    /// Open a database with no background work (the CLI, tests): on SQLite, no periodic WAL
    /// checkpoints.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, None).await
    }

    /// Open a database; on SQLite with `background`, a connection of its own checkpoints the
    /// WAL every [`CHECKPOINT_EVERY`] until the background stops or the `Db` is dropped.
    pub async fn connect_with(
        url: &str,
        background: Option<&crate::background::Background>,
    ) -> Result<Self, StoreError> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Url(crate::config::masked_db_url(url)));
        };
        let mut sqlite_file = None;
        let pool = match backend {
            Backend::Sqlite => {
                let path = url
                    .trim_start_matches("sqlite:")
                    .trim_start_matches("//")
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if let Some(dir) = std::path::Path::new(&path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(e.to_string()))?;
                }
                if !path.is_empty() && !path.contains(":memory:") && !url.contains("mode=memory") {
                    sqlite_file = Some(std::path::PathBuf::from(&path));
                }
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                let opts =
                    sqlx::any::AnyConnectOptions::from_str(&url)?.disable_statement_logging();
                // One connection: SQLite has one writer at a time anyway, and queueing in the pool
                // is far cheaper than SQLITE_BUSY back-off sleeps under concurrency.
                AnyPoolOptions::new()
                    .max_connections(1)
                    // The one connection is ours alone; a ping before every use costs a round trip.
                    .test_before_acquire(false)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            use sqlx::Executor;
                            // Checkpoints run in the background (`checkpointer`); the
                            // automatic one only bounds the log if that stops.
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 20000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts)
                    .await?
            }
            Backend::Postgres => {
                let opts = sqlx::any::AnyConnectOptions::from_str(url)?.disable_statement_logging();
                AnyPoolOptions::new()
                    .max_connections(16)
                    .connect_with(opts)
                    .await?
            }
        };
        let checkpointer = match (backend, background) {
            (Backend::Sqlite, Some(bg)) => Some(std::sync::Arc::new(checkpointer(url, bg).await?)),
            _ => None,
        };
        let db = Self {
            pool,
            backend,
            sqlite_file,
            _checkpointer: checkpointer,
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            // Several instances may start at once: one migrates, the others wait.
            sqlx::query("SELECT pg_advisory_lock(7020611)")
                .execute(&mut *conn)
                .await?;
        }
        let result = self.migrate_on(&mut conn).await;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_unlock(7020611)")
                .execute(&mut *conn)
                .await?;
        }
        result
    }

    async fn migrate_on(&self, conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
        use sqlx::Connection;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS tollgate_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *conn)
        .await?;
        for (version, sql) in MIGRATIONS {
            let mut tx = conn.begin().await?;
            let done: Option<(i64,)> =
                sqlx::query_as("SELECT version FROM tollgate_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_some() {
                continue;
            }
            let statements: Vec<&str> = match sql {
                Migration::Portable(text) => text
                    .split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect(),
                Migration::PerBackend { sqlite, postgres } => match self.backend {
                    Backend::Sqlite => sqlite.to_vec(),
                    Backend::Postgres => postgres.to_vec(),
                },
            };
            for stmt in statements {
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO tollgate_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(*version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

/// A connection of its own that checkpoints the write-ahead log every [`CHECKPOINT_EVERY`]
/// (PASSIVE: it never blocks the writer), until the guard is dropped or the background stops.
async fn checkpointer(
    url: &str,
    bg: &crate::background::Background,
) -> Result<Checkpointer, StoreError> {
    use sqlx::Connection as _;
    let opts = sqlx::any::AnyConnectOptions::from_str(url)?.disable_statement_logging();
    let mut conn = sqlx::AnyConnection::connect_with(&opts).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let stopping = bg.stopping();
    bg.spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = &mut stopping => {
                    // A last checkpoint, so the database file is whole when the gateway exits.
                    let _ = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await;
                    break;
                }
                _ = tick.tick() => {
                    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await {
                        tracing::warn!(error = %e, "background WAL checkpoint failed");
                    }
                }
            }
        }
        let _ = conn.close().await;
    });
    Ok(Checkpointer {
        _stop: stop.drop_guard(),
    })
}
