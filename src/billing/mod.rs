//! Money: integer credits, prices, estimates, and reserve → settle → release on an append-only
//! ledger.
//!
//! Units: [`Credits`] are pico-dollars (1e-12 USD) in an `i64` (balances up to
//! [`MAX_BALANCE`], about 9.2 million USD). A price per token in pico-dollars equals a price per
//! million tokens in micro-dollars: "$0.15 / 1M tokens" is 150_000. No float ever holds money.
//!
//! The ledger is append-only (triggers refuse UPDATE and DELETE) and every insert moves
//! `accounts.balance` by its amount in the same transaction (a trigger), so the balance always
//! equals the sum of the account's ledger entries, whoever writes ([`ledger`]).
//!
//! Where open reservations live depends on who owns the database, behind one interface,
//! [`Reservations`], with two implementations:
//! - [`owned::Owned`], SQLite (one gateway per file, [`Billing::for_gateway`]): in the gateway's
//!   memory. Reserving is a check under a mutex with no write; settling is one append to the
//!   charge journal, moved into the ledger (unique per request) in batches by one writer; a
//!   crash leaves nothing to release, and the next start moves the journal into the ledger.
//!   At most [`Settings::max_pending_charges`] charges wait for the ledger, counting the
//!   requests in flight: past it a reservation is refused ([`BillingError::Backlog`], 503).
//! - [`shared::Shared`], PostgreSQL (several gateways) and the CLI beside a running gateway
//!   ([`Billing::new`]): rows in the `reservations` table, each step one transaction. A row is
//!   a lease: the sweeper releases it once its `expires_at` passed, and a live [`Hold`] renews
//!   it every third of `billing.reservation_ttl` (a small tracked task, stopped with the hold).
//!
//! The charge is the usage in full, even beyond the reservation (the estimate only sizes the
//! reservation): the balance may then go below zero by that overrun, and the reservation check
//! refuses the account (402) until it is topped up. The ledger line says how much went beyond
//! (`overrun`); no charge takes a balance below `-MAX_BALANCE`.
//!
//! [`Billing`] is the facade the request path holds: it picks the implementation once, keeps
//! the metrics, and hands out [`Hold`]s. A [`Hold`] that is dropped without `settle` releases
//! itself.

mod hold;
pub mod ledger;
pub mod owned;
pub mod shared;
mod units;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::store::{Backend, Db, StoreError, now_ms};

pub use hold::Hold;
pub use ledger::{Adjustment, Charge, LedgerEntry, Refusal};
pub use units::{Credits, MAX_BALANCE, PICO_PER_USD, Price, Usage};

/// How a gateway's billing is set up (from `billing.*` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// PostgreSQL: how long a reservation's lease lasts unless renewed; a live hold renews it
    /// every third of it.
    pub reservation_ttl: Duration,
    /// SQLite: the most charges waiting for the ledger plus requests in flight that may add one.
    pub max_pending_charges: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            reservation_ttl: Duration::from_secs(15 * 60),
            max_pending_charges: 100_000,
        }
    }
}

impl From<&crate::config::BillingConfig> for Settings {
    fn from(c: &crate::config::BillingConfig) -> Self {
        Self {
            reservation_ttl: c.reservation_ttl,
            max_pending_charges: c.max_pending_charges,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(
        "Your balance cannot cover the estimated cost of this request ({estimate} USD). Top up and retry."
    )]
    InsufficientBalance { estimate: Credits },
    #[error("account not found")]
    NoAccount,
    #[error(
        "The gateway cannot record charges right now ({pending} wait for the ledger); retry shortly."
    )]
    Backlog {
        pending: usize,
        /// When a retry may pass (the ledger writer's next attempt).
        retry_after: Duration,
    },
    #[error("ledger write failed")]
    Ledger(#[from] StoreError),
}

impl From<sqlx::Error> for BillingError {
    fn from(e: sqlx::Error) -> Self {
        Self::Ledger(StoreError::Sql(e))
    }
}

/// An account's money: the stored balance, and what open reservations hold of it (on SQLite
/// including those in this gateway's memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    pub balance: Credits,
    pub reserved: Credits,
}

/// How a settle ended for the reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// The charge as it is in the ledger (or the journal); `None`: the request was charged
    /// already.
    pub charged: Option<Charged>,
    /// This call closed the reservation (otherwise whoever released it did: the sweeper).
    pub closed: bool,
}

/// What a settle charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charged {
    pub cost: Credits,
    /// The part of `cost` beyond the reservation (all of it if the reservation was swept first).
    pub overrun: Credits,
}

/// Where open reservations live and how a settled charge reaches the ledger: the one interface
/// with an implementation per way of owning the database ([`owned::Owned`], [`shared::Shared`]).
/// Every method keeps the money invariants of ARCHITECTURE.md on its own; [`Billing`] adds only
/// metrics.
pub trait Reservations: Send + Sync {
    /// Hold `hold.amount` on `hold.account_id`, atomically; `InsufficientBalance` if the free
    /// balance cannot cover it or the account is not active, `Backlog` if too many charges wait
    /// for the ledger.
    fn reserve(&self, hold: &Hold) -> impl Future<Output = Result<(), BillingError>> + Send;
    /// Hold `hold.amount` again for work accepted before (an async task resumed by another
    /// process or after a restart): no balance check, no backlog refusal.
    fn restore(&self, hold: &Hold) -> impl Future<Output = Result<(), BillingError>> + Send;
    /// Charge `charge` (the usage in full, even beyond the reservation, capped only so that the
    /// balance stays at or above `-MAX_BALANCE`) and close the reservation, at most once per
    /// request, also when the reservation was swept first; durable when this returns.
    fn settle(
        &self,
        hold: &Hold,
        charge: Charge,
    ) -> impl Future<Output = Result<Settled, BillingError>> + Send;
    /// Release at once without waiting, if the reservation is in memory; `false`: use
    /// [`Reservations::release`].
    fn release_now(&self, hold: &Hold) -> bool;
    /// Release (idempotent); `true` if this call closed the reservation.
    fn release(&self, hold: &Hold) -> impl Future<Output = Result<bool, BillingError>> + Send;
    /// Wait until every charge settled so far is in the ledger.
    fn flush(&self) -> impl Future<Output = Result<(), BillingError>> + Send;
    /// Release reservations left open by a crash (`at_start`) or past their lifetime; how many.
    fn reconcile(&self, at_start: bool) -> impl Future<Output = Result<u64, BillingError>> + Send;
    /// What this process holds for the account beyond the stored `reserved` column.
    fn reserved_in_memory(&self, account_id: &str) -> Credits;
    /// How often a live hold renews its lease (`None`: a reservation never expires).
    fn lease(&self) -> Option<Duration>;
    /// Extend the lease of an open reservation; `false` once it is closed.
    fn renew(&self, hold_id: &str) -> impl Future<Output = Result<bool, BillingError>> + Send;
    /// At rest, after a flush: what this process keeps in memory for the account agrees with
    /// itself (what is held equals the open holds; nothing of it waits for the ledger).
    fn verify_memory(&self, account_id: &str) -> bool;
    /// Post an operator's credit or debit of `amount` (> 0), refused (the balance unchanged) if
    /// it would leave the balance out of range or, for a plain debit, below what is held.
    fn post(
        &self,
        account_id: &str,
        adjustment: Adjustment,
        amount: Credits,
        note: &str,
    ) -> impl Future<Output = Result<Result<LedgerEntry, Refusal>, BillingError>> + Send;
}

/// The implementation a [`Billing`] uses, picked once (a `match`, no boxed futures on the money
/// path).
enum Books {
    Owned(owned::Owned),
    Shared(shared::Shared),
}

impl Reservations for Books {
    async fn reserve(&self, hold: &Hold) -> Result<(), BillingError> {
        match self {
            Self::Owned(b) => b.reserve(hold).await,
            Self::Shared(b) => b.reserve(hold).await,
        }
    }

    async fn restore(&self, hold: &Hold) -> Result<(), BillingError> {
        match self {
            Self::Owned(b) => b.restore(hold).await,
            Self::Shared(b) => b.restore(hold).await,
        }
    }

    async fn settle(&self, hold: &Hold, charge: Charge) -> Result<Settled, BillingError> {
        match self {
            Self::Owned(b) => b.settle(hold, charge).await,
            Self::Shared(b) => b.settle(hold, charge).await,
        }
    }

    fn release_now(&self, hold: &Hold) -> bool {
        match self {
            Self::Owned(b) => b.release_now(hold),
            Self::Shared(b) => b.release_now(hold),
        }
    }

    async fn release(&self, hold: &Hold) -> Result<bool, BillingError> {
        match self {
            Self::Owned(b) => b.release(hold).await,
            Self::Shared(b) => b.release(hold).await,
        }
    }

    async fn flush(&self) -> Result<(), BillingError> {
        match self {
            Self::Owned(b) => b.flush().await,
            Self::Shared(b) => b.flush().await,
        }
    }

    async fn reconcile(&self, at_start: bool) -> Result<u64, BillingError> {
        match self {
            Self::Owned(b) => b.reconcile(at_start).await,
            Self::Shared(b) => b.reconcile(at_start).await,
        }
    }

    fn reserved_in_memory(&self, account_id: &str) -> Credits {
        match self {
            Self::Owned(b) => b.reserved_in_memory(account_id),
            Self::Shared(b) => b.reserved_in_memory(account_id),
        }
    }

    fn lease(&self) -> Option<Duration> {
        match self {
            Self::Owned(b) => b.lease(),
            Self::Shared(b) => b.lease(),
        }
    }

    async fn renew(&self, hold_id: &str) -> Result<bool, BillingError> {
        match self {
            Self::Owned(b) => b.renew(hold_id).await,
            Self::Shared(b) => b.renew(hold_id).await,
        }
    }

    fn verify_memory(&self, account_id: &str) -> bool {
        match self {
            Self::Owned(b) => b.verify_memory(account_id),
            Self::Shared(b) => b.verify_memory(account_id),
        }
    }

    async fn post(
        &self,
        account_id: &str,
        adjustment: Adjustment,
        amount: Credits,
        note: &str,
    ) -> Result<Result<LedgerEntry, Refusal>, BillingError> {
        match self {
            Self::Owned(b) => b.post(account_id, adjustment, amount, note).await,
            Self::Shared(b) => b.post(account_id, adjustment, amount, note).await,
        }
    }
}

/// The money handle of a gateway or of the CLI; cloning it is one reference count.
#[derive(Clone)]
pub struct Billing {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    books: Books,
    metrics: Option<Arc<Metrics>>,
    /// Where a dropped hold's release and lease renewals run (tracked, so a shutdown waits for
    /// them).
    background: crate::background::Background,
}

impl Billing {
    fn with(
        db: Db,
        books: Books,
        metrics: Option<Arc<Metrics>>,
        background: crate::background::Background,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                books,
                metrics,
                background,
            }),
        }
    }

    /// Billing on a database that other processes share: reservations are rows (PostgreSQL
    /// with several gateways, and the CLI beside a running gateway).
    pub fn new(db: Db, hold_ttl: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        let books = Books::Shared(shared::Shared::new(db.clone(), hold_ttl));
        Self::with(db, books, metrics, crate::background::Background::new())
    }

    /// Billing for the gateway: on SQLite it owns the database ([`owned`]: reservations in
    /// memory, charges journaled, an earlier run's journal moved into the ledger first); on
    /// PostgreSQL as [`Billing::new`]. Call from within the runtime that serves; the journal
    /// writer, lease renewals and the release of dropped holds run on `background` (stopped
    /// last at shutdown, after every journaled charge is in the ledger).
    pub async fn for_gateway(
        db: Db,
        settings: Settings,
        metrics: Option<Arc<Metrics>>,
        background: &crate::background::Background,
    ) -> Result<Self, BillingError> {
        let books = match db.backend {
            Backend::Sqlite => Books::Owned(
                owned::Owned::open(db.clone(), background, settings.max_pending_charges).await?,
            ),
            Backend::Postgres => {
                Books::Shared(shared::Shared::new(db.clone(), settings.reservation_ttl))
            }
        };
        Ok(Self::with(db, books, metrics, background.clone()))
    }

    /// Wait until every charge made so far by this gateway is in the ledger (at once unless it
    /// owns the database).
    pub async fn flush(&self) -> Result<(), BillingError> {
        self.inner.books.flush().await
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    fn open_reservations(&self, delta: i64) {
        if let Some(m) = &self.inner.metrics {
            m.open_reservations(delta);
        }
    }

    /// Reserve `estimate` on the account, atomically; 402 if the free balance cannot cover it.
    pub async fn reserve(
        &self,
        account_id: &str,
        key_id: &str,
        request_id: &str,
        model: &str,
        estimate: Credits,
        price: Price,
    ) -> Result<Hold, BillingError> {
        let mut hold = Hold {
            billing: self.clone(),
            id: ulid::Ulid::new().to_string(),
            account_id: account_id.into(),
            key_id: key_id.into(),
            request_id: request_id.into(),
            model: model.into(),
            amount: estimate,
            price,
            // Nothing to release until the reservation is made.
            done: true,
            _lease: None,
        };
        if let Err(e) = self.inner.books.reserve(&hold).await {
            if let Some(m) = &self.inner.metrics {
                match &e {
                    BillingError::InsufficientBalance { .. } => m.payment_required(model),
                    BillingError::Backlog { .. } => m.backlog_refusal(model),
                    BillingError::NoAccount | BillingError::Ledger(_) => {}
                }
            }
            return Err(e);
        }
        hold.done = false;
        if let Some(every) = self.inner.books.lease() {
            hold._lease = Some(self.keep_leased(hold.id.clone(), every));
        }
        self.open_reservations(1);
        Ok(hold)
    }

    /// Take over the reservation `hold_id` of work accepted earlier (an async task): if it is
    /// still open (same process, or its lease on PostgreSQL has not run out) it is adopted;
    /// otherwise the amount is held again, with no balance check. The request id keeps the
    /// charge to one per task whoever settles.
    #[allow(clippy::too_many_arguments)]
    pub async fn adopt(
        &self,
        hold_id: Option<&str>,
        account_id: &str,
        key_id: &str,
        request_id: &str,
        model: &str,
        amount: Credits,
        price: Price,
    ) -> Result<Hold, BillingError> {
        let adopted = match hold_id {
            Some(id) => self.inner.books.renew(id).await?,
            None => false,
        };
        let mut hold = Hold {
            billing: self.clone(),
            id: match (adopted, hold_id) {
                (true, Some(id)) => id.to_string(),
                _ => ulid::Ulid::new().to_string(),
            },
            account_id: account_id.into(),
            key_id: key_id.into(),
            request_id: request_id.into(),
            model: model.into(),
            amount,
            price,
            done: true,
            _lease: None,
        };
        if !adopted {
            self.inner.books.restore(&hold).await?;
            self.open_reservations(1);
        }
        hold.done = false;
        if let Some(every) = self.inner.books.lease() {
            hold._lease = Some(self.keep_leased(hold.id.clone(), every));
        }
        Ok(hold)
    }

    /// Renew a reservation's lease every `every` until the returned guard is dropped (the hold
    /// settles, is released or dropped), the reservation is closed, or the gateway stops.
    fn keep_leased(&self, hold_id: String, every: Duration) -> tokio_util::sync::DropGuard {
        let stop = tokio_util::sync::CancellationToken::new();
        let guard = stop.clone().drop_guard();
        let billing = self.clone();
        let stopping = self.inner.background.stopping();
        self.inner.background.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(stopping);
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = &mut stopping => break,
                    _ = tick.tick() => {}
                }
                match billing.inner.books.renew(&hold_id).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(reservation = %hold_id, error = %e, "renewing a reservation's lease failed; retrying");
                    }
                }
            }
        });
        guard
    }

    /// Release a hold: in memory at once, or its row (idempotent).
    async fn release(&self, hold: &Hold) {
        match self.inner.books.release(hold).await {
            Ok(true) => self.open_reservations(-1),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(reservation = %hold.id, error = %e, "release failed; the sweeper will release it when it expires");
            }
        }
    }

    /// Release every reservation left open by a crash (at start: all of them on SQLite, which
    /// has one gateway; the expired ones on PostgreSQL, shared by several) and, when called
    /// periodically, every expired one. Returns how many were released.
    pub async fn reconcile(&self, at_start: bool) -> Result<u64, BillingError> {
        let n = self.inner.books.reconcile(at_start).await?;
        self.open_reservations(-i64::try_from(n).unwrap_or(i64::MAX));
        Ok(n)
    }

    /// An account's balance and what is reserved of it, once every charge so far is in the
    /// ledger.
    pub async fn balance(&self, account_id: &str) -> Result<Balance, BillingError> {
        self.flush().await?;
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
                .bind(account_id)
                .fetch_optional(&self.inner.db.pool)
                .await?;
        let (balance, reserved) = row.ok_or(BillingError::NoAccount)?;
        let in_memory = self.inner.books.reserved_in_memory(account_id);
        Ok(Balance {
            balance: Credits(balance),
            reserved: Credits(reserved.saturating_add(in_memory.0)),
        })
    }

    /// Post an operator's credit or debit (see [`Adjustment`]) of `amount` on an account (by
    /// id): the entry, or why it was refused.
    pub async fn post(
        &self,
        account_id: &str,
        adjustment: Adjustment,
        amount: Credits,
        note: &str,
    ) -> Result<Result<LedgerEntry, Refusal>, BillingError> {
        if amount.0 <= 0 {
            return Ok(Err(Refusal::NotPositive));
        }
        self.inner
            .books
            .post(account_id, adjustment, amount, note)
            .await
    }

    /// Ledger lines of an account (by id or name; newest first), or of one request.
    pub async fn ledger(
        &self,
        account: Option<&str>,
        request_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LedgerEntry>, BillingError> {
        self.flush().await?;
        ledger::entries(&self.inner.db, account, request_id, limit).await
    }

    /// What a key was charged since `since_ms` (for its daily spend limit).
    pub async fn spent_by_key_since(
        &self,
        account_id: &str,
        key_id: &str,
        since_ms: i64,
    ) -> Result<Credits, BillingError> {
        self.flush().await?;
        ledger::spent_by_key_since(&self.inner.db, account_id, key_id, since_ms).await
    }

    /// What an account was charged since `since_ms` (for its daily spend limit).
    pub async fn spent_by_account_since(
        &self,
        account_id: &str,
        since_ms: i64,
    ) -> Result<Credits, BillingError> {
        self.flush().await?;
        ledger::spent_by_account_since(&self.inner.db, account_id, since_ms).await
    }

    /// At rest: the balance equals the sum of the ledger, the stored `reserved` equals the open
    /// reservation rows, the balance is below zero only after a forced debit or by at most what
    /// charges took beyond their reservations; on SQLite also what memory holds for the account
    /// equals its open holds and none of its charges still waits for the ledger.
    pub async fn verify(&self, account: &str) -> Result<bool, BillingError> {
        self.flush().await?;
        let id = ledger::account_id(&self.inner.db, account).await?;
        Ok(ledger::verify(&self.inner.db, &id).await? && self.inner.books.verify_memory(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_and_print_exactly() {
        assert_eq!(
            Credits::parse_usd("12.50"),
            Some(Credits(12_500_000_000_000))
        );
        assert_eq!(Credits::parse_usd("0.000000000001"), Some(Credits(1)));
        assert_eq!(Credits::parse_usd("$3"), Some(Credits(3 * PICO_PER_USD)));
        assert_eq!(Credits::parse_usd("1.0000000000001"), None);
        assert_eq!(Credits::parse_usd("abc"), None);
        assert_eq!(Credits(1_500_000_000_000).to_string(), "1.500000000000");
        assert_eq!(Credits(-1).to_string(), "-0.000000000001");
    }

    #[test]
    fn cost_is_integer_and_saturates() {
        let p = Price {
            input_per_token: 150_000,
            output_per_token: 600_000,
            per_request: 7,
            ..Price::default()
        };
        let u = Usage {
            prompt_tokens: 10,
            completion_tokens: 2,
            ..Usage::default()
        };
        assert_eq!(p.cost(&u), Credits(1_500_000 + 1_200_000 + 7));
        let huge = Usage {
            prompt_tokens: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(p.cost(&huge), Credits(i64::MAX));
    }
}
