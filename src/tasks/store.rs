//! The `tasks` table: a task is written before its id is returned, then moved step by step by
//! whichever gateway holds its lease. Every write after the claim names the lease owner, so a
//! gateway whose lease ran out (another took the task) writes nothing.

use serde::{Deserialize, Serialize};
use sqlx::Row as _;

use crate::store::{Backend, Db, StoreError, now_ms};

/// Where a task is in its life. `Queued`, `Handling` and `Archiving` are driven by a worker;
/// `Success` and `Fail` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Handling,
    Archiving,
    Success,
    Fail,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Handling,
        Status::Archiving,
        Status::Success,
        Status::Fail,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Handling => "handling",
            Self::Archiving => "archiving",
            Self::Success => "success",
            Self::Fail => "fail",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "queued" => Self::Queued,
            "handling" => Self::Handling,
            "archiving" => Self::Archiving,
            "success" => Self::Success,
            _ => Self::Fail,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Fail)
    }
}

/// An output archived in our storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archived {
    /// The object's key in the store (`<task id>/<index>.<ext>`).
    pub key: String,
    pub content_type: String,
    pub bytes: u64,
}

/// One task as stored.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub account_id: String,
    pub key_id: String,
    pub model: String,
    pub kind: String,
    /// The client's `input` object, as JSON text.
    pub input: String,
    pub callback_url: Option<String>,
    pub status: Status,
    pub progress: Option<i64>,
    pub job_id: Option<String>,
    /// The upstream's outputs (JSON list of `plugins::JobOutput`), kept until archived.
    pub upstream_outputs: Option<String>,
    /// Archived outputs (JSON list of [`Archived`]).
    pub outputs: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The reservation taken at submission, in pico-dollars.
    pub reserved: i64,
    /// The price the task is billed at (JSON of `billing::Price`), fixed at submission.
    pub price: String,
    pub hold_id: Option<String>,
    pub cost: Option<i64>,
    /// What the estimate counted: images and seconds of media.
    pub images: i64,
    pub seconds: i64,
    /// Failed attempts of the current step.
    pub attempts: i64,
    pub polls: i64,
    pub next_at: i64,
    pub deadline_at: i64,
    pub status_since: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub callback_state: String,
    pub callback_attempts: i64,
}

const COLUMNS: &str = "id, account_id, key_id, model, kind, input, callback_url, status, progress, \
    job_id, upstream_outputs, outputs, error_code, error_message, reserved, price, hold_id, cost, \
    images, seconds, attempts, polls, next_at, deadline_at, status_since, created_at, updated_at, \
    finished_at, callback_state, callback_attempts";

fn task_of(row: &sqlx::any::AnyRow) -> Result<Task, sqlx::Error> {
    let status: String = row.try_get("status")?;
    Ok(Task {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        key_id: row.try_get("key_id")?,
        model: row.try_get("model")?,
        kind: row.try_get("kind")?,
        input: row.try_get("input")?,
        callback_url: row.try_get("callback_url")?,
        status: Status::parse(&status),
        progress: row.try_get("progress")?,
        job_id: row.try_get("job_id")?,
        upstream_outputs: row.try_get("upstream_outputs")?,
        outputs: row.try_get("outputs")?,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        reserved: row.try_get("reserved")?,
        price: row.try_get("price")?,
        hold_id: row.try_get("hold_id")?,
        cost: row.try_get("cost")?,
        images: row.try_get("images")?,
        seconds: row.try_get("seconds")?,
        attempts: row.try_get("attempts")?,
        polls: row.try_get("polls")?,
        next_at: row.try_get("next_at")?,
        deadline_at: row.try_get("deadline_at")?,
        status_since: row.try_get("status_since")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        callback_state: row.try_get("callback_state")?,
        callback_attempts: row.try_get("callback_attempts")?,
    })
}

/// The tasks table of one database.
#[derive(Clone)]
pub struct TaskStore {
    db: Db,
}

/// What a step changes in a task it holds.
#[derive(Debug, Default)]
pub struct Change {
    pub status: Option<Status>,
    pub progress: Option<i64>,
    pub job_id: Option<String>,
    pub upstream_outputs: Option<String>,
    pub outputs: Option<String>,
    pub error: Option<(String, String)>,
    pub hold_id: Option<String>,
    pub cost: Option<i64>,
    pub attempts: Option<i64>,
    pub polls: Option<i64>,
    /// When a worker should look at the task next.
    pub next_at: Option<i64>,
    /// Final: the callback (if any) becomes due.
    pub finished: bool,
}

impl TaskStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Store a new task (status `queued`, due at once).
    pub async fn insert(&self, t: &Task) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tasks (id, account_id, key_id, model, kind, input, callback_url, status, \
             reserved, price, hold_id, images, seconds, next_at, deadline_at, status_since, \
             created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind(&t.id)
        .bind(&t.account_id)
        .bind(&t.key_id)
        .bind(&t.model)
        .bind(&t.kind)
        .bind(&t.input)
        .bind(&t.callback_url)
        .bind(t.status.as_str())
        .bind(t.reserved)
        .bind(&t.price)
        .bind(&t.hold_id)
        .bind(t.images)
        .bind(t.seconds)
        .bind(t.next_at)
        .bind(t.deadline_at)
        .bind(t.status_since)
        .bind(t.created_at)
        .bind(t.updated_at)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tasks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.as_ref().map(task_of).transpose()?)
    }

    /// Take the lease of up to `limit` tasks that are due (unfinished, `next_at` passed, no live
    /// lease). On PostgreSQL rows another gateway is claiming are skipped, not waited for.
    pub async fn claim(
        &self,
        owner: &str,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Task>, StoreError> {
        let now = now_ms();
        let lock = match self.db.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE tasks SET lease_owner = $1, lease_until = $2 \
             WHERE lease_until <= $3 AND id IN (SELECT id FROM tasks \
               WHERE status IN ('queued', 'handling', 'archiving') AND next_at <= $3 \
               AND lease_until <= $3 ORDER BY next_at LIMIT $4{lock}) \
             RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(now.saturating_add(lease_ms))
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.db.pool)
            .await?;
        Ok(rows.iter().map(task_of).collect::<Result<_, _>>()?)
    }

    /// Apply a step's change to a task this gateway holds and give the lease up; `false` if the
    /// lease was lost (another gateway took the task: this step's result is dropped).
    pub async fn update(&self, id: &str, owner: &str, c: Change) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut sets = vec![
            "updated_at = $3".to_string(),
            "lease_owner = NULL".into(),
            "lease_until = 0".into(),
        ];
        let mut binds: Vec<Bind> = vec![Bind::Int(now)];
        let mut push = |col: &str, b: Bind, sets: &mut Vec<String>| {
            binds.push(b);
            sets.push(format!("{col} = ${}", binds.len() + 2));
        };
        if let Some(s) = c.status {
            push("status", Bind::Text(s.as_str().into()), &mut sets);
            push("status_since", Bind::Int(now), &mut sets);
        }
        if let Some(p) = c.progress {
            push("progress", Bind::Int(p), &mut sets);
        }
        if let Some(j) = c.job_id {
            push("job_id", Bind::Text(j), &mut sets);
        }
        if let Some(o) = c.upstream_outputs {
            push("upstream_outputs", Bind::Text(o), &mut sets);
        }
        if let Some(o) = c.outputs {
            push("outputs", Bind::Text(o), &mut sets);
        }
        if let Some((code, message)) = c.error {
            push("error_code", Bind::Text(code), &mut sets);
            push("error_message", Bind::Text(message), &mut sets);
        }
        if let Some(h) = c.hold_id {
            push("hold_id", Bind::Text(h), &mut sets);
        }
        if let Some(v) = c.cost {
            push("cost", Bind::Int(v), &mut sets);
        }
        if let Some(v) = c.attempts {
            push("attempts", Bind::Int(v), &mut sets);
        }
        if let Some(v) = c.polls {
            push("polls", Bind::Int(v), &mut sets);
        }
        if let Some(v) = c.next_at {
            push("next_at", Bind::Int(v), &mut sets);
        }
        if c.finished {
            push("finished_at", Bind::Int(now), &mut sets);
            sets.push(
                "callback_state = CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END"
                    .into(),
            );
            push("callback_next_at", Bind::Int(now), &mut sets);
        }
        let sql = format!(
            "UPDATE tasks SET {} WHERE id = $1 AND lease_owner = $2",
            sets.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(id).bind(owner);
        for b in binds {
            q = match b {
                Bind::Int(v) => q.bind(v),
                Bind::Text(v) => q.bind(v),
            };
        }
        Ok(q.execute(&self.db.pool).await?.rows_affected() == 1)
    }

    /// Give up on a task that is not final: its next step fails it (`deadline_at` 0 means
    /// cancelled, whatever its status) and releases its reservation.
    pub async fn cancel(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE tasks SET deadline_at = 0, next_at = 0 \
             WHERE id = $1 AND status IN ('queued', 'handling', 'archiving')",
        )
        .bind(id)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Unfinished tasks and the reservations they hold (to hold again at start).
    pub async fn unfinished(&self) -> Result<Vec<Task>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM tasks WHERE status IN ('queued', 'handling', 'archiving')"
        ))
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.iter().map(task_of).collect::<Result<_, _>>()?)
    }

    /// Whether the ledger holds the task's charge already (a restart between the charge and the
    /// task's own `success`).
    pub async fn charged(&self, id: &str) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT -amount FROM ledger WHERE request_id = $1 AND kind = 'charge'")
                .bind(id)
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(row.map(|r| r.0))
    }

    /// Take the callback lease of up to `limit` finished tasks whose callback is due.
    pub async fn claim_callbacks(
        &self,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Task>, StoreError> {
        let now = now_ms();
        let lock = match self.db.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE tasks SET callback_lease_until = $1 \
             WHERE callback_lease_until <= $2 AND id IN (SELECT id FROM tasks \
               WHERE callback_state = 'pending' AND callback_next_at <= $2 \
               AND callback_lease_until <= $2 ORDER BY callback_next_at LIMIT $3{lock}) \
             RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now.saturating_add(lease_ms))
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.db.pool)
            .await?;
        Ok(rows.iter().map(task_of).collect::<Result<_, _>>()?)
    }

    /// Record one delivery attempt and what comes next: `delivered`, `failed` (attempts spent)
    /// or another try at `next_at`.
    pub async fn record_delivery(
        &self,
        task_id: &str,
        attempt: i64,
        status: Option<u16>,
        outcome: &str,
        state: &str,
        next_at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO task_deliveries (id, task_id, attempt, status, outcome, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(ulid::Ulid::new().to_string())
        .bind(task_id)
        .bind(attempt)
        .bind(status.map(i64::from))
        .bind(outcome)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE tasks SET callback_state = $2, callback_attempts = $3, callback_next_at = $4, \
             callback_lease_until = 0 WHERE id = $1",
        )
        .bind(task_id)
        .bind(state)
        .bind(attempt)
        .bind(next_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The delivery attempts of a task, oldest first: (attempt, HTTP status, outcome).
    pub async fn deliveries(
        &self,
        task_id: &str,
    ) -> Result<Vec<(i64, Option<i64>, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT attempt, status, outcome FROM task_deliveries WHERE task_id = $1 ORDER BY attempt",
        )
        .bind(task_id)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// An account's webhook signing secret, made on first use (`whsec_` and 32 random bytes in
    /// base64, the Standard Webhooks form).
    pub async fn webhook_secret(&self, account_id: &str) -> Result<String, StoreError> {
        use base64::Engine as _;
        use rand::RngCore as _;
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let fresh = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        );
        sqlx::query(
            "INSERT INTO webhook_secrets (account_id, secret, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (account_id) DO NOTHING",
        )
        .bind(account_id)
        .bind(&fresh)
        .bind(now_ms())
        .execute(&self.db.pool)
        .await?;
        let (secret,): (String,) =
            sqlx::query_as("SELECT secret FROM webhook_secrets WHERE account_id = $1")
                .bind(account_id)
                .fetch_one(&self.db.pool)
                .await?;
        Ok(secret)
    }

    /// A gateway-wide setting shared by every instance, made once: the first writer wins.
    pub async fn setting(&self, name: &str, fresh: &str) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO gateway_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(fresh)
        .execute(&self.db.pool)
        .await?;
        let (value,): (String,) =
            sqlx::query_as("SELECT value FROM gateway_settings WHERE name = $1")
                .bind(name)
                .fetch_one(&self.db.pool)
                .await?;
        Ok(value)
    }

    /// How many tasks are in each status (the metrics' gauge, read on scrape).
    pub async fn counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT model, status, COUNT(*) FROM tasks GROUP BY model, status")
                .fetch_all(&self.db.pool)
                .await?,
        )
    }
}

enum Bind {
    Int(i64),
    Text(String),
}
