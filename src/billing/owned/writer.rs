//! The one writer task: moves journaled charges into the ledger in batches (retrying with a
//! backoff while the database fails), posts operator credits and debits, reloads balances, and
//! at start moves an earlier run's journal into the ledger.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// How long the writer lets charges gather after the first one wakes it (see [`write_loop`]).
const GATHER: Duration = Duration::from_millis(2);

pub(super) fn writer_gone() -> BillingError {
    io_error("the ledger writer", "stopped")
}

/// What the writer task owns a share of.
pub(super) struct Writer {
    pub(super) db: Db,
    pub(super) accounts: Arc<Accounts>,
    pub(super) journal: Arc<Mutex<Journal>>,
    pub(super) queue: Arc<Queue>,
}

/// Why moving failed last, and when to try again.
pub(super) struct Failing {
    pub(super) error: String,
    pub(super) pause: Duration,
    pub(super) until: tokio::time::Instant,
}

/// The one writer: move the waiting charges into the ledger when woken, then answer reloads,
/// flushes and posts in order. A reload needs no move first: the stored balance counts exactly
/// the charges moved, and `unmoved` the others. While the database fails, the charges stay
/// waiting (and journaled), moving is retried with a backoff of up to [`MAX_BACKOFF`] (new
/// charges do not hasten it; a flush does), and flushes are answered with the error.
pub(super) async fn write_loop(
    w: Writer,
    mut rx: mpsc::Receiver<Command>,
    stopping: tokio_util::sync::WaitForCancellationFutureOwned,
) {
    let mut commands = Vec::with_capacity(MAX_BATCH);
    let mut failing: Option<Failing> = None;
    tokio::pin!(stopping);
    loop {
        let retry_at = failing.as_ref().map(|f| f.until);
        let mut charged = false;
        let stop = tokio::select! {
            biased;
            () = &mut stopping => true,
            n = rx.recv_many(&mut commands, MAX_BATCH) => n == 0,
            () = w.queue.wake.notified(), if retry_at.is_none() => {
                charged = true;
                false
            }
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => false,
        };
        if charged {
            // Woken by a charge: let the charges of the next moment join it, so one ledger
            // transaction carries many of them (a group commit). The charge is already safe in
            // the journal; only the ledger's copy waits, and readers flush first.
            tokio::time::sleep(GATHER).await;
        }
        if stop {
            // Shutdown: move what is journaled (tries until it lands or the database stays
            // down; what is left stays in the journal for the next start), then end.
            let mut pause = Duration::from_millis(50);
            for _ in 0..5 {
                if w.move_waiting().await.is_ok() {
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
            break;
        }
        let flush = commands.iter().any(|c| matches!(c, Command::Flush(_)));
        let due = failing
            .as_ref()
            .is_none_or(|f| flush || tokio::time::Instant::now() >= f.until);
        if due {
            match w.move_waiting().await {
                Ok(()) => failing = None,
                Err(e) => {
                    let pause = failing.as_ref().map_or(Duration::from_millis(50), |f| {
                        (f.pause * 2).min(MAX_BACKOFF)
                    });
                    failing = Some(Failing {
                        error: e.to_string(),
                        pause,
                        until: tokio::time::Instant::now() + pause,
                    });
                }
            }
            w.queue.failing.store(failing.is_some(), Ordering::SeqCst);
        }
        for command in commands.drain(..) {
            match command {
                Command::Reload(account_id, reply) => {
                    let _ = reply.send(reload(&w.db, &w.accounts, &account_id).await);
                }
                Command::Flush(reply) => {
                    let _ = reply.send(match &failing {
                        None => Ok(()),
                        Some(f) => Err(io_error("moving charges into the ledger", &f.error)),
                    });
                }
                Command::Post(post, reply) => {
                    let _ = reply.send(post_entry(&w.db, &w.accounts, post).await);
                }
            }
        }
    }
    if let Err(e) = w.move_waiting().await {
        tracing::error!(error = %e, "charges stay in the journal for the next start");
    }
}

/// A failure of this row alone (it breaks a constraint), not of the database.
pub(super) fn row_failed(e: &sqlx::Error) -> bool {
    use sqlx::error::ErrorKind;
    match e {
        sqlx::Error::Database(d) => matches!(
            d.kind(),
            ErrorKind::ForeignKeyViolation
                | ErrorKind::NotNullViolation
                | ErrorKind::CheckViolation
        ),
        _ => false,
    }
}

impl Writer {
    /// Move every waiting charge into the ledger, [`MAX_BATCH`] per statement. A failed
    /// statement is retried charge by charge (so one bad row cannot hold back the others), until
    /// a charge fails for a reason that is not its own (the database is down: the rest is not
    /// tried); what was not moved goes back to the front of the queue, in order, and the error
    /// is returned.
    pub(super) async fn move_waiting(&self) -> Result<(), sqlx::Error> {
        loop {
            let batch: Vec<Charge> = {
                let mut j = lock(&self.journal);
                let n = j.waiting.len().min(MAX_BATCH);
                j.waiting.drain(..n).collect()
            };
            if batch.is_empty() {
                return Ok(());
            }
            match insert_charges(&self.db.pool, &batch).await {
                Ok(inserted) => self.moved(&batch, &inserted),
                Err(error) => {
                    tracing::error!(%error, charges = batch.len(), "moving charges into the ledger failed; they stay journaled");
                    let mut failed = Vec::new();
                    let mut last = None;
                    let mut rest = batch.into_iter();
                    for c in rest.by_ref() {
                        match insert_charges(&self.db.pool, std::slice::from_ref(&c)).await {
                            Ok(inserted) => self.moved(std::slice::from_ref(&c), &inserted),
                            Err(e) => {
                                let own = row_failed(&e);
                                last = Some(e);
                                failed.push(c);
                                if !own {
                                    break;
                                }
                            }
                        }
                    }
                    failed.extend(rest);
                    if let Some(e) = last {
                        let mut j = lock(&self.journal);
                        for c in failed.into_iter().rev() {
                            j.waiting.push_front(c);
                        }
                        return Err(e);
                    }
                }
            }
            if let Err(e) = lock(&self.journal).rotate() {
                tracing::error!(error = %e, "rotating the charge journal failed; it keeps growing");
            }
        }
    }

    /// Account for charges now in the ledger (`inserted` names the request ids that were new);
    /// their places under the bound are free again.
    pub(super) fn moved(&self, batch: &[Charge], inserted: &HashSet<String>) {
        for c in batch {
            let new = inserted.contains(c.request_id.as_str());
            self.accounts.with(&c.account_id, |s| {
                s.unmoved = s.unmoved.saturating_sub(c.cost.0);
                if new {
                    s.balance = s.balance.saturating_sub(c.cost.0);
                }
            });
            if !new {
                tracing::warn!(request_id = %c.request_id, "request charged already; the ledger keeps its first charge");
            }
        }
        self.queue.sub(batch.len());
    }
}

/// Move the lines of an earlier run's journal into the ledger and empty it; how many were
/// new to the ledger.
pub(super) async fn recover(db: &Db, path: &Path) -> Result<u64, BillingError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error("reading the charge journal", e)),
    };
    let mut charges = Vec::new();
    for (n, raw) in text.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Charge>(raw) {
            Ok(c) => charges.push(c),
            // Only a crash of the machine mid-write can tear a line: keep it visible.
            Err(e) => tracing::error!(
                line = n + 1,
                error = %e,
                text = %String::from_utf8_lossy(raw),
                "a charge journal line does not parse; it is not applied"
            ),
        }
    }
    let mut moved = 0;
    for chunk in charges.chunks(MAX_BATCH) {
        moved += insert_charges(&db.pool, chunk).await?.len() as u64;
    }
    std::fs::write(path, b"").map_err(|e| io_error("emptying the charge journal", e))?;
    Ok(moved)
}

/// Post an operator's entry (on the writer task) and move the account's balance in memory by it,
/// as the trigger moved the stored one.
pub(super) async fn post_entry(db: &Db, accounts: &Accounts, post: Post) -> Posted {
    let posted = ledger::post(
        db,
        &post.account_id,
        post.adjustment,
        post.amount,
        &post.note,
    )
    .await;
    if let Ok(Ok(entry)) = &posted
        && let Some(slot) = accounts.existing(&post.account_id)
    {
        let mut s = lock(&slot);
        s.balance = s.balance.saturating_add(entry.amount);
    }
    posted
}

pub(super) async fn reload(
    db: &Db,
    accounts: &Accounts,
    account_id: &str,
) -> Result<(), BillingError> {
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT balance, status FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(&db.pool)
            .await?;
    let (balance, status) = row.ok_or(BillingError::NoAccount)?;
    accounts.with(account_id, |s| {
        s.balance = balance;
        s.active = status == "active";
        s.loaded = Some(Instant::now());
    });
    Ok(())
}
