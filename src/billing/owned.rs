//! Free balances held in memory, for a database that one gateway owns (SQLite).
//!
//! With SQLite there is exactly one gateway process per database file, so the open reservations
//! of an account live only in that process: reserving is a check and an addition under a mutex,
//! with no write at all, and a crash releases every reservation by construction (nothing was
//! written). What is durable is the ledger: every charge is an `INSERT` into the ledger, whose
//! trigger moves `accounts.balance` in the same transaction.
//!
//! One writer task does every charge and every balance reload, in order. It commits the charges
//! waiting at that moment together, in one multi-row `INSERT` (group commit), and answers each
//! settle only once its charge is committed: a settle never returns before its charge is
//! durable, and under concurrency many charges share one commit. Because reloads run on the
//! same task, a reload can never interleave with a charge, so the in-memory balance is always
//! the stored one minus nothing in flight.
//!
//! The stored balance is reloaded at least once per [`REFRESH`] and before any 402 older than
//! [`RECHECK`], so credits added from the CLI (another process) are seen within a second.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::store::{Db, StoreError};

use super::{BillingError, Credits};

/// How long a loaded balance serves before it is read again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A refusal is only given on a balance read at most this long ago.
pub const RECHECK: Duration = Duration::from_millis(100);
/// The most charges committed in one statement (11 parameters each, far below SQLite's limit).
const MAX_BATCH: usize = 256;

/// One ledger charge, as the writer inserts it.
#[derive(Debug, Clone)]
pub struct Charge {
    pub id: String,
    pub account_id: String,
    pub key_id: String,
    pub request_id: String,
    pub model: String,
    pub cost: Credits,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub images: i64,
    pub seconds: i64,
    pub created_at: i64,
}

enum Command {
    /// Insert the charge; answer `true` if it was charged, `false` if the request was charged
    /// already (one charge per request id).
    Charge(Charge, oneshot::Sender<Result<bool, BillingError>>),
    /// Read the account's stored balance and status into memory.
    Reload(String, oneshot::Sender<Result<(), BillingError>>),
}

pub struct Owned {
    accounts: Arc<Accounts>,
    writer: mpsc::UnboundedSender<Command>,
}

#[derive(Default)]
struct Accounts(Mutex<HashMap<String, Arc<Mutex<State>>>>);

#[derive(Default)]
struct State {
    balance: i64,
    reserved: i64,
    active: bool,
    loaded: Option<Instant>,
}

enum Decision {
    Reserved,
    Refused,
    Reload,
}

impl Accounts {
    fn slot(&self, account_id: &str) -> Arc<Mutex<State>> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(account_id.to_string()).or_default().clone()
    }

    fn existing(&self, account_id: &str) -> Option<Arc<Mutex<State>>> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(account_id).cloned()
    }

    fn with<R>(&self, account_id: &str, f: impl FnOnce(&mut State) -> R) -> R {
        let slot = self.slot(account_id);
        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut s)
    }
}

impl Owned {
    /// Start the writer task on the current runtime. Without one (a plain thread), charges and
    /// reloads fail with a ledger error instead of hanging.
    pub fn new(db: Db) -> Self {
        let accounts = Arc::new(Accounts::default());
        let (writer, rx) = mpsc::unbounded_channel();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(write_loop(db, accounts.clone(), rx));
        }
        Self { accounts, writer }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, BillingError>>) -> Command,
    ) -> Result<T, BillingError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(make(tx)).map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())?
    }

    /// Reserve `estimate` if the free balance covers it.
    pub async fn reserve(&self, account_id: &str, estimate: Credits) -> Result<(), BillingError> {
        for attempt in 0..2 {
            let decision =
                self.accounts
                    .with(account_id, |s| match s.loaded.map(|t| t.elapsed()) {
                        Some(age) if age < REFRESH => {
                            let free = s.balance.saturating_sub(s.reserved);
                            if s.active && free >= estimate.0 {
                                s.reserved = s.reserved.saturating_add(estimate.0);
                                Decision::Reserved
                            } else if attempt == 1 || age < RECHECK {
                                Decision::Refused
                            } else {
                                Decision::Reload
                            }
                        }
                        _ => Decision::Reload,
                    });
            match decision {
                Decision::Reserved => return Ok(()),
                Decision::Refused => break,
                Decision::Reload => {
                    self.ask(|tx| Command::Reload(account_id.to_string(), tx))
                        .await?
                }
            }
        }
        Err(BillingError::InsufficientBalance { estimate })
    }

    /// Give `amount` back to the free balance (synchronous: usable from `Drop`).
    pub fn release(&self, account_id: &str, amount: Credits) {
        if let Some(slot) = self.accounts.existing(account_id) {
            let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
            s.reserved = s.reserved.saturating_sub(amount.0).max(0);
        }
    }

    /// Charge, once it is committed; `true` if charged, `false` if the request was charged
    /// already. The reservation `reserved` is released whatever happens, even if this future is
    /// dropped half-way (the writer then still commits the charge it was given).
    pub async fn charge(&self, charge: Charge, reserved: Credits) -> Result<bool, BillingError> {
        let account_id = charge.account_id.clone();
        let _release = ReleaseOnDrop {
            owned: self,
            account_id: &account_id,
            amount: reserved,
        };
        self.ask(|tx| Command::Charge(charge, tx)).await
    }

    /// The in-memory open reservations of an account (0 if it never reserved here).
    pub fn reserved(&self, account_id: &str) -> i64 {
        self.accounts.existing(account_id).map_or(0, |slot| {
            slot.lock().unwrap_or_else(PoisonError::into_inner).reserved
        })
    }
}

fn writer_gone() -> BillingError {
    BillingError::Ledger(StoreError::Io("the ledger writer has stopped".into()))
}

struct ReleaseOnDrop<'a> {
    owned: &'a Owned,
    account_id: &'a str,
    amount: Credits,
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.owned.release(self.account_id, self.amount);
    }
}

/// The one writer: take everything waiting, run the reloads and commit the charges together,
/// then apply the committed charges to memory and answer.
async fn write_loop(db: Db, accounts: Arc<Accounts>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut waiting, MAX_BATCH).await > 0 {
        let mut charges = Vec::new();
        for command in waiting.drain(..) {
            match command {
                Command::Charge(c, reply) => charges.push((c, reply)),
                Command::Reload(account_id, reply) => {
                    // Charges received before this reload are committed first, in order.
                    commit(&db, &accounts, std::mem::take(&mut charges)).await;
                    let _ = reply.send(reload(&db, &accounts, &account_id).await);
                }
            }
        }
        commit(&db, &accounts, charges).await;
    }
}

async fn commit(
    db: &Db,
    accounts: &Accounts,
    charges: Vec<(Charge, oneshot::Sender<Result<bool, BillingError>>)>,
) {
    if charges.is_empty() {
        return;
    }
    let batch: Vec<&Charge> = charges.iter().map(|(c, _)| c).collect();
    match insert(db, &batch).await {
        Ok(()) => {
            for (c, reply) in charges {
                let _ = reply.send(one_outcome(accounts, &c, Ok(())));
            }
        }
        Err(_) if charges.len() > 1 => {
            // One bad row (a request charged already) must not fail the others: one at a time.
            for (c, reply) in charges {
                let outcome = insert(db, &[&c]).await;
                let _ = reply.send(one_outcome(accounts, &c, outcome));
            }
        }
        Err(e) => {
            if let Some((c, reply)) = charges.into_iter().next() {
                let _ = reply.send(one_outcome(accounts, &c, Err(e)));
            }
        }
    }
}

fn one_outcome(
    accounts: &Accounts,
    c: &Charge,
    outcome: Result<(), sqlx::Error>,
) -> Result<bool, BillingError> {
    match outcome {
        Ok(()) => {
            accounts.with(&c.account_id, |s| {
                s.balance = s.balance.saturating_sub(c.cost.0);
            });
            Ok(true)
        }
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One statement for the whole batch: SQLite runs it as one transaction, the ledger trigger
/// moving each account's balance row by row.
async fn insert(db: &Db, batch: &[&Charge]) -> Result<(), sqlx::Error> {
    const COLUMNS: usize = 11;
    let mut sql = String::from(
        "INSERT INTO ledger (id, account_id, key_id, request_id, model, kind, amount, prompt_tokens, completion_tokens, images, seconds, created_at) VALUES ",
    );
    for i in 0..batch.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        let p = i * COLUMNS;
        // Writing into the one buffer: no string per row.
        let _ = write!(
            sql,
            "(${}, ${}, ${}, ${}, ${}, 'charge', ${}, ${}, ${}, ${}, ${}, ${})",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6,
            p + 7,
            p + 8,
            p + 9,
            p + 10,
            p + 11
        );
    }
    let mut q = sqlx::query(&sql);
    for c in batch {
        q = q
            .bind(c.id.as_str())
            .bind(c.account_id.as_str())
            .bind(c.key_id.as_str())
            .bind(c.request_id.as_str())
            .bind(c.model.as_str())
            .bind(-c.cost.0)
            .bind(c.prompt_tokens)
            .bind(c.completion_tokens)
            .bind(c.images)
            .bind(c.seconds)
            .bind(c.created_at);
    }
    q.execute(&db.pool).await.map(|_| ())
}

async fn reload(db: &Db, accounts: &Accounts, account_id: &str) -> Result<(), BillingError> {
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
