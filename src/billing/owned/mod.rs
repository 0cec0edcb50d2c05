//! Money held in memory and a charge journal, for a database that one gateway owns (SQLite).
//!
//! With SQLite there is exactly one gateway process per database file, so the open reservations
//! of an account live only in that process: reserving is a check and an addition under a mutex,
//! with no write at all, and a crash releases every reservation by construction (nothing was
//! written).
//!
//! A charge is made durable by one append to the charge journal (`<database file>-charges`, one
//! JSON line per charge) before the settle returns; one writer task then moves the journaled
//! charges into the ledger, many per transaction, with `INSERT ... ON CONFLICT DO NOTHING`.
//! The append survives a crash of the gateway (the line is in the operating system's cache when
//! `write` returns), which is the guarantee SQLite itself gives in WAL mode with
//! `synchronous = NORMAL`, as configured here: a power loss may lose the last moments in both.
//! At start, [`Owned::open`] first moves every journaled line into the ledger (a line already
//! there is skipped: the ledger holds one charge per request id), then empties the journal.
//! The journal is rewritten with only the lines still waiting once it passes [`ROTATE_BYTES`].
//!
//! What waits for the ledger is bounded: at most `billing.max_pending_charges` charges waiting
//! plus requests in flight (each may add one). Past it, [`Owned::reserve`] refuses with
//! [`BillingError::Backlog`] (a 503 with `Retry-After`) before anything is held or sent, so a
//! database that stays down costs memory and journal only up to the bound. While the database
//! fails, the writer retries with a backoff of up to [`MAX_BACKOFF`]; a flush tries at once.
//!
//! Per account, memory holds the stored balance, the charges journaled and not yet in the
//! ledger, and the open reservations (each by id, and their sum); the free balance is the first
//! minus the other two. A charge is the usage in full, so the free balance can go below zero by
//! an overrun: then nothing is reserved until credits cover it again. The
//! stored balance is read again at least once per [`REFRESH`] and before any 402 older than
//! [`RECHECK`] (on the writer task, after the waiting charges are in the ledger), so credits
//! added from the CLI (another process) are seen within a second. A request id is charged once:
//! the ids of recent charges are kept in memory, and the ledger's unique index catches any other.
//!
//! An operator's credit or debit through this gateway (the admin API) is written by the writer
//! task, which moves the balance in memory by it (so no reload can put back a balance read
//! before it); a plain debit first holds its amount like a request, so it never takes what
//! requests in flight hold or what charges not yet moved will take. One made by another process
//! (the CLI) is checked against the stored balance only and seen here at the next reload.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::store::{Db, StoreError};

use super::ledger::{self, Adjustment, Charge, LedgerEntry, Refusal, insert_charges};
use super::{BillingError, Charged, Credits, Hold, MAX_BALANCE, Reservations, Settled};

mod journal;
mod writer;

pub use journal::journal_path;
use journal::{Journal, append_to, line};
use writer::*;

/// How long a loaded balance serves before it is read again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A refusal is only given on a balance read at most this long ago.
pub const RECHECK: Duration = Duration::from_millis(100);
/// The most charges moved into the ledger in one statement (12 parameters each).
const MAX_BATCH: usize = 256;
/// Requests to the writer (reloads, flushes, posts) queued at most; a caller waits for room.
const COMMANDS: usize = 1024;
/// The journal is rewritten with only its waiting lines once it is this long.
pub const ROTATE_BYTES: u64 = 1 << 20;
/// How many request ids of recent charges are remembered (a repeat among them is refused at
/// once; an older one is refused by the ledger's unique index when it is moved there).
const RECENT: usize = 100_000;
/// The longest pause between two attempts to move charges into a failing database.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

enum Command {
    /// Read the account's stored balance and status.
    Reload(String, oneshot::Sender<Result<(), BillingError>>),
    /// Move the waiting charges, then answer (readers of the ledger see every charge), with
    /// the error if some could not be moved.
    Flush(oneshot::Sender<Result<(), BillingError>>),
    /// Post an operator's entry and move the balance in memory by it. On the writer task, so
    /// no reload can put back a balance read before the entry.
    Post(Post, oneshot::Sender<Posted>),
}

struct Post {
    account_id: String,
    adjustment: Adjustment,
    amount: Credits,
    note: String,
}

type Posted = Result<Result<LedgerEntry, Refusal>, BillingError>;

pub struct Owned {
    db: Db,
    accounts: Arc<Accounts>,
    journal: Arc<Mutex<Journal>>,
    writer: mpsc::Sender<Command>,
    queue: Arc<Queue>,
    /// `billing.max_pending_charges`.
    max_pending: usize,
}

/// What the writer and the request path share besides the journal.
#[derive(Default)]
struct Queue {
    /// Charges waiting for the ledger (journaled, or being moved) plus open request holds.
    pending: AtomicUsize,
    /// The last attempt to move charges failed.
    failing: AtomicBool,
    /// Charges are waiting: move them.
    wake: Notify,
}

impl Queue {
    fn add(&self, n: usize) {
        self.pending.fetch_add(n, Ordering::SeqCst);
    }

    fn sub(&self, n: usize) {
        // Never below zero, whatever the order of updates.
        let _ = self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                Some(p.saturating_sub(n))
            });
    }
}

/// A place under the bound taken by a reservation in progress; given back unless kept (also if
/// the reserving future is dropped midway).
struct Place<'a> {
    queue: &'a Queue,
    kept: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.queue.sub(1);
        }
    }
}

#[derive(Default)]
struct Accounts(Mutex<HashMap<String, Arc<Mutex<State>>>>);

#[derive(Default)]
struct State {
    /// As stored in the database (moved by the charges the writer has put in the ledger).
    balance: i64,
    /// Charged and journaled, not yet in the ledger.
    unmoved: i64,
    /// Open reservations: the sum of `open`.
    reserved: i64,
    /// Each open reservation by id (a request's hold, or a plain debit being posted).
    open: HashMap<String, Open>,
    active: bool,
    loaded: Option<Instant>,
}

struct Open {
    amount: i64,
    /// A request's hold (counted under the bound), not a debit being posted.
    request: bool,
}

impl State {
    /// Close an open reservation: what it held goes back to the free balance.
    fn close(&mut self, id: &str) -> Option<Open> {
        let open = self.open.remove(id)?;
        self.reserved = self.reserved.saturating_sub(open.amount).max(0);
        Some(open)
    }
}

enum Decision {
    Reserved,
    /// The free balance at the refusal.
    Refused(i64),
    Reload,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_error(what: &str, e: impl std::fmt::Display) -> BillingError {
    BillingError::Ledger(StoreError::Io(format!("{what}: {e}")))
}

impl Accounts {
    fn slot(&self, account_id: &str) -> Arc<Mutex<State>> {
        lock(&self.0)
            .entry(account_id.to_string())
            .or_default()
            .clone()
    }

    fn existing(&self, account_id: &str) -> Option<Arc<Mutex<State>>> {
        lock(&self.0).get(account_id).cloned()
    }

    fn with<R>(&self, account_id: &str, f: impl FnOnce(&mut State) -> R) -> R {
        let slot = self.slot(account_id);
        let mut s = lock(&slot);
        f(&mut s)
    }
}

impl Owned {
    /// Move what an earlier run journaled into the ledger, empty the journal, and start the
    /// writer task on the current runtime.
    pub async fn open(
        db: Db,
        background: &crate::background::Background,
        max_pending: usize,
    ) -> Result<Self, BillingError> {
        let file = match db.sqlite_file.as_deref() {
            Some(database) => {
                let path = journal_path(database);
                let moved = recover(&db, &path).await?;
                if moved > 0 {
                    tracing::warn!(
                        moved,
                        "charges journaled by an earlier run are now in the ledger"
                    );
                }
                let file =
                    append_to(&path).map_err(|e| io_error("opening the charge journal", e))?;
                Some((path, file))
            }
            None => None,
        };
        let accounts = Arc::new(Accounts::default());
        let journal = Arc::new(Mutex::new(Journal {
            file,
            written: 0,
            waiting: VecDeque::new(),
            recent: HashSet::new(),
            order: VecDeque::new(),
        }));
        let (writer, rx) = mpsc::channel(COMMANDS);
        let queue = Arc::new(Queue::default());
        background.spawn(write_loop(
            Writer {
                db: db.clone(),
                accounts: accounts.clone(),
                journal: journal.clone(),
                queue: queue.clone(),
            },
            rx,
            background.stopping(),
        ));
        Ok(Self {
            db,
            accounts,
            journal,
            writer,
            queue,
            max_pending: max_pending.max(1),
        })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, BillingError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(make(tx))
            .await
            .map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())
    }

    /// Hold `amount` under `id` if the free balance covers it (and, for a request, the account
    /// is active); otherwise the free balance, read at most [`RECHECK`] ago.
    async fn hold(
        &self,
        account_id: &str,
        id: &str,
        amount: Credits,
        request: bool,
        force: bool,
    ) -> Result<Result<(), Credits>, BillingError> {
        let need_active = request && !force;
        for attempt in 0..2 {
            let decision =
                self.accounts
                    .with(account_id, |s| match s.loaded.map(|t| t.elapsed()) {
                        Some(age) if age < REFRESH => {
                            let free = s
                                .balance
                                .saturating_sub(s.unmoved)
                                .saturating_sub(s.reserved);
                            if force || ((s.active || !need_active) && free >= amount.0) {
                                s.reserved = s.reserved.saturating_add(amount.0);
                                s.open.insert(
                                    id.to_string(),
                                    Open {
                                        amount: amount.0,
                                        request,
                                    },
                                );
                                Decision::Reserved
                            } else if attempt == 1 || age < RECHECK {
                                Decision::Refused(free)
                            } else {
                                Decision::Reload
                            }
                        }
                        _ => Decision::Reload,
                    });
            match decision {
                Decision::Reserved => return Ok(Ok(())),
                Decision::Refused(free) => return Ok(Err(Credits(free))),
                Decision::Reload => {
                    self.ask(|tx| Command::Reload(account_id.to_string(), tx))
                        .await??
                }
            }
        }
        // Reloaded and still not decided: refuse on what memory holds now.
        let free = self.accounts.with(account_id, |s| {
            s.balance
                .saturating_sub(s.unmoved)
                .saturating_sub(s.reserved)
        });
        Ok(Err(Credits(free)))
    }

    /// Close the open reservation `id`: what it held goes back to the free balance; a request's
    /// hold gives its place under the bound back. Idempotent.
    fn give_back(&self, account_id: &str, id: &str) {
        let closed = self
            .accounts
            .existing(account_id)
            .and_then(|slot| lock(&slot).close(id));
        if closed.is_some_and(|o| o.request) {
            self.queue.sub(1);
        }
    }

    /// Charge: journal the charge (in full, capped only so that the balance stays at or above
    /// `-MAX_BALANCE`) and take it from the free balance in place of the hold `hold_id` (closed
    /// whatever happens). `None` if the request was charged already. Returns once the charge
    /// is durable; the writer moves it into the ledger soon after.
    fn charge(&self, mut charge: Charge, hold_id: &str) -> Result<Option<Charged>, BillingError> {
        let mut text = Vec::with_capacity(320);
        let mut serialized = line(&mut text, &charge);
        let mut j = lock(&self.journal);
        let slot = self.accounts.slot(&charge.account_id);
        let mut s = lock(&slot);
        let held = s.close(hold_id).is_some_and(|o| o.request);
        let outcome = if j.recent.contains(&charge.request_id) {
            Ok(None)
        } else {
            // What the balance will be once the waiting charges are moved, down to -MAX.
            let cost = charge.cost;
            charge.cap(
                s.balance
                    .saturating_sub(s.unmoved)
                    .saturating_add(MAX_BALANCE.0),
            );
            if charge.cost != cost {
                text.clear();
                serialized = line(&mut text, &charge);
            }
            serialized
                .and_then(|()| j.append(&text))
                .map(|()| {
                    Some(Charged {
                        cost: charge.cost,
                        overrun: charge.overrun,
                    })
                })
                .map_err(|e| io_error("writing the charge journal", e))
        };
        let charged = matches!(outcome, Ok(Some(_)));
        if charged {
            s.unmoved = s.unmoved.saturating_add(charge.cost.0);
        }
        drop(s);
        if charged {
            j.remember(&charge.request_id);
            j.waiting.push_back(charge);
            // The hold's place under the bound is now the waiting charge's.
            if !held {
                self.queue.add(1);
            }
            drop(j);
            // A writer that has stopped leaves the charge journaled: the next start moves it.
            self.queue.wake.notify_one();
        } else if held {
            self.queue.sub(1);
        }
        outcome
    }
}

impl Reservations for Owned {
    /// A place under the bound, then a check and an addition under the account's mutex; no
    /// write.
    async fn reserve(&self, hold: &Hold) -> Result<(), BillingError> {
        let before = self.queue.pending.fetch_add(1, Ordering::SeqCst);
        let mut place = Place {
            queue: &self.queue,
            kept: false,
        };
        if before >= self.max_pending {
            let retry_after = if self.queue.failing.load(Ordering::SeqCst) {
                MAX_BACKOFF
            } else {
                Duration::from_secs(1)
            };
            return Err(BillingError::Backlog {
                pending: before,
                retry_after,
            });
        }
        match self
            .hold(&hold.account_id, &hold.id, hold.amount, true, false)
            .await?
        {
            Ok(()) => {
                place.kept = true;
                Ok(())
            }
            Err(_) => Err(BillingError::InsufficientBalance {
                estimate: hold.amount,
            }),
        }
    }

    /// Like `reserve`, with no balance check and no backlog refusal: the work was accepted
    /// before (an async task resumed after a restart).
    async fn restore(&self, hold: &Hold) -> Result<(), BillingError> {
        self.queue.pending.fetch_add(1, Ordering::SeqCst);
        let mut place = Place {
            queue: &self.queue,
            kept: false,
        };
        // Forced: only a missing account refuses it.
        if self
            .hold(&hold.account_id, &hold.id, hold.amount, true, true)
            .await?
            .is_ok()
        {
            place.kept = true;
        }
        Ok(())
    }

    /// One append to the charge journal; the reservation is released whatever happens.
    async fn settle(&self, hold: &Hold, charge: Charge) -> Result<Settled, BillingError> {
        let charged = self.charge(charge, &hold.id)?;
        Ok(Settled {
            charged,
            closed: true,
        })
    }

    fn release_now(&self, hold: &Hold) -> bool {
        self.give_back(&hold.account_id, &hold.id);
        true
    }

    async fn release(&self, hold: &Hold) -> Result<bool, BillingError> {
        Ok(self.release_now(hold))
    }

    /// Wait until every charge made so far is in the ledger.
    async fn flush(&self) -> Result<(), BillingError> {
        self.ask(Command::Flush).await?
    }

    /// Nothing this gateway holds can be left open by a crash (it was only in memory); at
    /// start, rows an earlier version left open in the reservations table are released.
    async fn reconcile(&self, at_start: bool) -> Result<u64, BillingError> {
        if at_start {
            super::shared::release_open_rows(&self.db, true).await
        } else {
            Ok(0)
        }
    }

    /// The in-memory open reservations of an account (0 if it never reserved here).
    fn reserved_in_memory(&self, account_id: &str) -> Credits {
        Credits(
            self.accounts
                .existing(account_id)
                .map_or(0, |slot| lock(&slot).reserved),
        )
    }

    /// Reservations in memory never expire: a crash releases them all.
    fn lease(&self) -> Option<Duration> {
        None
    }

    async fn renew(&self, _hold_id: &str) -> Result<bool, BillingError> {
        Ok(false)
    }

    /// At rest, after a flush: none of the account's charges waits for the ledger, what memory
    /// holds for it is the sum of its open holds (never below zero), and the count under the
    /// bound is exactly the waiting charges plus the open request holds.
    fn verify_memory(&self, account_id: &str) -> bool {
        let j = lock(&self.journal);
        let mut ok = j.waiting.iter().all(|c| c.account_id != account_id);
        let mut holds = 0;
        let slots: Vec<(String, Arc<Mutex<State>>)> = lock(&self.accounts.0)
            .iter()
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect();
        for (id, slot) in slots {
            let s = lock(&slot);
            holds += s.open.values().filter(|o| o.request).count();
            if id == account_id {
                let open: i64 = s.open.values().map(|o| o.amount).sum();
                ok &= s.unmoved == 0 && s.reserved >= 0 && s.reserved == open;
            }
        }
        ok && self.queue.pending.load(Ordering::SeqCst) == j.waiting.len() + holds
    }

    /// A plain debit first holds its amount in memory like a request (so it is checked against
    /// the charges not yet moved and the requests in flight); the entry itself is written by the
    /// writer task, which moves the balance in memory by it.
    async fn post(
        &self,
        account_id: &str,
        adjustment: Adjustment,
        amount: Credits,
        note: &str,
    ) -> Result<Result<LedgerEntry, Refusal>, BillingError> {
        if amount.0 <= 0 {
            return Ok(Err(Refusal::NotPositive));
        }
        let held = adjustment == Adjustment::Debit;
        let id = format!("debit-{}", ulid::Ulid::new());
        if held && let Err(free) = self.hold(account_id, &id, amount, false, false).await? {
            return Ok(Err(Refusal::Overdraw { free }));
        }
        let post = Post {
            account_id: account_id.to_string(),
            adjustment,
            amount,
            note: note.to_string(),
        };
        let posted = match self.ask(|tx| Command::Post(post, tx)).await {
            Ok(posted) => posted,
            Err(e) => Err(e),
        };
        if held {
            self.give_back(account_id, &id);
        }
        posted
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Billing, Books, Price, Settings, Usage};
    use super::*;

    /// `verify` on SQLite checks what SQLite keeps: memory, not reservation rows.
    #[tokio::test]
    async fn verify_catches_memory_that_drifts_from_the_open_holds() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        let background = crate::background::Background::new();
        let b = Billing::for_gateway(db, Settings::default(), None, &background)
            .await
            .unwrap();
        let a = crate::accounts::create(&b, "drift").await.unwrap();
        crate::accounts::credit(&b, &a.id, Credits(1_000_000), "t")
            .await
            .unwrap();
        let hold = b
            .reserve(&a.id, "k", "r1", "m", Credits(1_000), Price::default())
            .await
            .unwrap();
        assert!(
            b.verify(&a.id).await.unwrap(),
            "an open hold is accounted for"
        );
        let Books::Owned(owned) = &b.inner.books else {
            panic!("SQLite is owned by the gateway");
        };
        // What memory holds for the account is not the sum of its open holds.
        owned.accounts.with(&a.id, |s| s.reserved += 1);
        assert!(!b.verify(&a.id).await.unwrap());
        owned.accounts.with(&a.id, |s| s.reserved -= 1);
        // A place under the bound that neither a hold nor a waiting charge takes.
        owned.queue.add(1);
        assert!(!b.verify(&a.id).await.unwrap());
        owned.queue.sub(1);
        // A charge the balance in memory counts but the ledger never got.
        owned.accounts.with(&a.id, |s| s.unmoved += 5);
        assert!(!b.verify(&a.id).await.unwrap());
        owned.accounts.with(&a.id, |s| s.unmoved -= 5);
        assert!(b.verify(&a.id).await.unwrap());
        assert_eq!(hold.settle(Usage::default()).await.unwrap(), Credits(0));
        assert!(b.verify(&a.id).await.unwrap());
        assert_eq!(owned.queue.pending.load(Ordering::SeqCst), 0);
    }

    /// Past `max_pending_charges` (waiting charges plus open holds), a reservation is refused
    /// before anything is held; a released hold gives its place back.
    #[tokio::test]
    async fn the_bound_counts_waiting_charges_and_open_holds() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        let background = crate::background::Background::new();
        let settings = Settings {
            max_pending_charges: 2,
            ..Settings::default()
        };
        let b = Billing::for_gateway(db, settings, None, &background)
            .await
            .unwrap();
        let a = crate::accounts::create(&b, "bound").await.unwrap();
        crate::accounts::credit(&b, &a.id, Credits(1_000_000), "t")
            .await
            .unwrap();
        let reserve =
            |r: &'static str| b.reserve(&a.id, "k", r, "m", Credits(10), Price::default());
        let one = reserve("r1").await.unwrap();
        let two = reserve("r2").await.unwrap();
        assert!(matches!(
            reserve("r3").await,
            Err(BillingError::Backlog { pending: 2, .. })
        ));
        two.release().await;
        let three = reserve("r3").await.unwrap();
        drop(three);
        one.settle(Usage::default()).await.unwrap();
        b.flush().await.unwrap();
        assert!(b.verify(&a.id).await.unwrap());
        assert_eq!(b.balance(&a.id).await.unwrap().reserved, Credits(0));
    }
}
