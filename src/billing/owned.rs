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
//! Per account, memory holds the stored balance, the charges journaled and not yet in the
//! ledger, and the open reservations; the free balance is the first minus the other two. The
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
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::store::{Db, StoreError};

use super::ledger::{self, Adjustment, Charge, LedgerEntry, Refusal, insert_charges};
use super::{BillingError, Credits, Hold, Reservations, Settled};

/// How long a loaded balance serves before it is read again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A refusal is only given on a balance read at most this long ago.
pub const RECHECK: Duration = Duration::from_millis(100);
/// The most charges moved into the ledger in one statement (11 parameters each).
const MAX_BATCH: usize = 256;
/// The journal is rewritten with only its waiting lines once it is this long.
pub const ROTATE_BYTES: u64 = 1 << 20;
/// How many request ids of recent charges are remembered (a repeat among them is refused at
/// once; an older one is refused by the ledger's unique index when it is moved there).
const RECENT: usize = 100_000;
/// The longest pause between two attempts to move charges into a failing database.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

enum Command {
    /// Move the waiting charges into the ledger.
    Move,
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
    writer: mpsc::UnboundedSender<Command>,
}

/// The charges made durable and not yet in the ledger, and where they are written.
struct Journal {
    /// `None` for an in-memory database: nothing outlives the process anyway.
    file: Option<(PathBuf, std::fs::File)>,
    /// Bytes in the file.
    written: u64,
    /// Journaled, in order, not yet in the ledger.
    waiting: VecDeque<Charge>,
    /// Request ids of recent charges, and their order for forgetting the oldest.
    recent: HashSet<String>,
    order: VecDeque<String>,
}

#[derive(Default)]
struct Accounts(Mutex<HashMap<String, Arc<Mutex<State>>>>);

#[derive(Default)]
struct State {
    /// As stored in the database (moved by the charges the writer has put in the ledger).
    balance: i64,
    /// Charged and journaled, not yet in the ledger.
    unmoved: i64,
    /// Open reservations.
    reserved: i64,
    active: bool,
    loaded: Option<Instant>,
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

impl Journal {
    /// One `write` of a whole line.
    fn append(&mut self, text: &[u8]) -> std::io::Result<()> {
        if let Some((_, file)) = &mut self.file {
            file.write_all(text)?;
        }
        self.written += text.len() as u64;
        Ok(())
    }

    fn remember(&mut self, request_id: &str) {
        if self.order.len() >= RECENT
            && let Some(old) = self.order.pop_front()
        {
            self.recent.remove(&old);
        }
        self.recent.insert(request_id.to_string());
        self.order.push_back(request_id.to_string());
    }

    /// Once the file is long, write the waiting lines to a new file and put it in place (a
    /// rename: a crash leaves either the old file or the new one, never neither).
    fn rotate(&mut self) -> std::io::Result<()> {
        let Some((path, _)) = &self.file else {
            return Ok(());
        };
        if self.written < ROTATE_BYTES {
            return Ok(());
        }
        let path = path.clone();
        let fresh = sibling(&path, ".rotating");
        let mut text = Vec::new();
        for c in &self.waiting {
            line(&mut text, c)?;
        }
        std::fs::write(&fresh, &text)?;
        std::fs::rename(&fresh, &path)?;
        let file = append_to(&path)?;
        self.written = text.len() as u64;
        self.file = Some((path, file));
        Ok(())
    }
}

fn line(out: &mut Vec<u8>, c: &Charge) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, c)?;
    out.push(b'\n');
    Ok(())
}

fn append_to(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// `path` with `suffix` added to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where the journal of a database file lives.
pub fn journal_path(database_file: &Path) -> PathBuf {
    sibling(database_file, "-charges")
}

impl Owned {
    /// Move what an earlier run journaled into the ledger, empty the journal, and start the
    /// writer task on the current runtime.
    pub async fn open(db: Db, background: &crate::tasks::Background) -> Result<Self, BillingError> {
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
        let (writer, rx) = mpsc::unbounded_channel();
        background.spawn(write_loop(
            db.clone(),
            accounts.clone(),
            journal.clone(),
            rx,
            background.stopping(),
        ));
        Ok(Self {
            db,
            accounts,
            journal,
            writer,
        })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, BillingError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(make(tx)).map_err(|_| writer_gone())?;
        rx.await.map_err(|_| writer_gone())
    }

    /// Hold `amount` if the free balance covers it (and, for a request, the account is
    /// active); otherwise the free balance, read at most [`RECHECK`] ago.
    async fn hold(
        &self,
        account_id: &str,
        amount: Credits,
        need_active: bool,
    ) -> Result<Result<(), Credits>, BillingError> {
        for attempt in 0..2 {
            let decision =
                self.accounts
                    .with(account_id, |s| match s.loaded.map(|t| t.elapsed()) {
                        Some(age) if age < REFRESH => {
                            let free = s
                                .balance
                                .saturating_sub(s.unmoved)
                                .saturating_sub(s.reserved);
                            if (s.active || !need_active) && free >= amount.0 {
                                s.reserved = s.reserved.saturating_add(amount.0);
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

    /// Give `amount` back to the free balance.
    fn give_back(&self, account_id: &str, amount: Credits) {
        if let Some(slot) = self.accounts.existing(account_id) {
            let mut s = lock(&slot);
            s.reserved = s.reserved.saturating_sub(amount.0).max(0);
        }
    }

    /// Charge: journal the charge and take it from the free balance in place of the
    /// reservation `reserved` (released whatever happens). `true` if charged, `false` if the
    /// request was charged already. Returns once the charge is durable; the writer moves it
    /// into the ledger soon after.
    fn charge(&self, charge: Charge, reserved: Credits) -> Result<bool, BillingError> {
        let mut text = Vec::with_capacity(320);
        let serialized = line(&mut text, &charge);
        let mut j = lock(&self.journal);
        let outcome = if j.recent.contains(&charge.request_id) {
            Ok(false)
        } else {
            serialized
                .and_then(|()| j.append(&text))
                .map(|()| true)
                .map_err(|e| io_error("writing the charge journal", e))
        };
        let charged = matches!(outcome, Ok(true));
        self.accounts.with(&charge.account_id, |s| {
            s.reserved = s.reserved.saturating_sub(reserved.0).max(0);
            if charged {
                s.unmoved = s.unmoved.saturating_add(charge.cost.0);
            }
        });
        if charged {
            j.remember(&charge.request_id);
            j.waiting.push_back(charge);
            drop(j);
            // A writer that has stopped leaves the charge journaled: the next start moves it.
            let _ = self.writer.send(Command::Move);
        }
        outcome
    }
}

impl Reservations for Owned {
    /// A check and an addition under the account's mutex; no write.
    async fn reserve(&self, hold: &Hold) -> Result<(), BillingError> {
        match self.hold(&hold.account_id, hold.amount, true).await? {
            Ok(()) => Ok(()),
            Err(_) => Err(BillingError::InsufficientBalance {
                estimate: hold.amount,
            }),
        }
    }

    /// One append to the charge journal; the reservation is released whatever happens.
    async fn settle(&self, hold: &Hold, charge: Charge) -> Result<Settled, BillingError> {
        let charged = self.charge(charge, hold.amount)?;
        Ok(Settled {
            charged,
            closed: true,
        })
    }

    fn release_now(&self, hold: &Hold) -> bool {
        self.give_back(&hold.account_id, hold.amount);
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
        if held && let Err(free) = self.hold(account_id, amount, false).await? {
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
            self.give_back(account_id, amount);
        }
        posted
    }
}

fn writer_gone() -> BillingError {
    io_error("the ledger writer", "stopped")
}

/// The one writer: move the waiting charges into the ledger, then answer reloads and flushes
/// in order. A reload needs no move first: the stored balance counts exactly the charges
/// moved, and `unmoved` the others. While the database fails, the charges stay waiting (and
/// journaled), flushes are answered with the error, and moving is retried with backoff.
async fn write_loop(
    db: Db,
    accounts: Arc<Accounts>,
    journal: Arc<Mutex<Journal>>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    stopping: tokio_util::sync::WaitForCancellationFutureOwned,
) {
    let mut commands = Vec::with_capacity(MAX_BATCH);
    let mut retry: Option<Duration> = None;
    tokio::pin!(stopping);
    loop {
        let next = async {
            match retry {
                None => rx.recv_many(&mut commands, MAX_BATCH).await,
                Some(pause) => {
                    match tokio::time::timeout(pause, rx.recv_many(&mut commands, MAX_BATCH)).await
                    {
                        Ok(n) => n,
                        // Nothing arrived during the pause: try moving again.
                        Err(_) => usize::MAX,
                    }
                }
            }
        };
        let received = tokio::select! {
            biased;
            n = next => n,
            () = &mut stopping => {
                // Shutdown: move what is journaled (tries until it lands or the database
                // stays down; what is left stays in the journal for the next start), then end.
                let mut pause = Duration::from_millis(50);
                for _ in 0..5 {
                    if move_waiting(&db, &accounts, &journal).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
                break;
            }
        };
        if received == 0 {
            break;
        }
        let moved = move_waiting(&db, &accounts, &journal).await;
        retry = match &moved {
            Ok(()) => None,
            Err(_) => Some(retry.map_or(Duration::from_millis(50), |p| (p * 2).min(MAX_BACKOFF))),
        };
        for command in commands.drain(..) {
            match command {
                Command::Move => {}
                Command::Reload(account_id, reply) => {
                    let _ = reply.send(reload(&db, &accounts, &account_id).await);
                }
                Command::Flush(reply) => {
                    let _ = reply.send(match &moved {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io_error("moving charges into the ledger", e)),
                    });
                }
                Command::Post(post, reply) => {
                    let _ = reply.send(post_entry(&db, &accounts, post).await);
                }
            }
        }
    }
    if let Err(e) = move_waiting(&db, &accounts, &journal).await {
        tracing::error!(error = %e, "charges stay in the journal for the next start");
    }
}

/// Move every waiting charge into the ledger, [`MAX_BATCH`] per statement. A failed statement
/// is retried charge by charge (so one bad row cannot hold back the others); what still fails
/// goes back to the front of the queue, in order, and the error is returned.
async fn move_waiting(
    db: &Db,
    accounts: &Accounts,
    journal: &Mutex<Journal>,
) -> Result<(), sqlx::Error> {
    loop {
        let batch: Vec<Charge> = {
            let mut j = lock(journal);
            let n = j.waiting.len().min(MAX_BATCH);
            j.waiting.drain(..n).collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        match insert_charges(&db.pool, &batch).await {
            Ok(inserted) => moved(accounts, &batch, &inserted),
            Err(error) => {
                tracing::error!(%error, charges = batch.len(), "moving charges into the ledger failed; they stay journaled");
                let mut failed = Vec::new();
                let mut last = error;
                for c in batch {
                    match insert_charges(&db.pool, std::slice::from_ref(&c)).await {
                        Ok(inserted) => moved(accounts, std::slice::from_ref(&c), &inserted),
                        Err(e) => {
                            last = e;
                            failed.push(c);
                        }
                    }
                }
                if !failed.is_empty() {
                    let mut j = lock(journal);
                    for c in failed.into_iter().rev() {
                        j.waiting.push_front(c);
                    }
                    return Err(last);
                }
            }
        }
        if let Err(e) = lock(journal).rotate() {
            tracing::error!(error = %e, "rotating the charge journal failed; it keeps growing");
        }
    }
}

/// Account for charges now in the ledger (`inserted` names the request ids that were new).
fn moved(accounts: &Accounts, batch: &[Charge], inserted: &HashSet<String>) {
    for c in batch {
        let new = inserted.contains(c.request_id.as_str());
        accounts.with(&c.account_id, |s| {
            s.unmoved = s.unmoved.saturating_sub(c.cost.0);
            if new {
                s.balance = s.balance.saturating_sub(c.cost.0);
            }
        });
        if !new {
            tracing::warn!(request_id = %c.request_id, "request charged already; the ledger keeps its first charge");
        }
    }
}

/// Move the lines of an earlier run's journal into the ledger and empty it; how many were
/// new to the ledger.
async fn recover(db: &Db, path: &Path) -> Result<u64, BillingError> {
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
async fn post_entry(db: &Db, accounts: &Accounts, post: Post) -> Posted {
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
