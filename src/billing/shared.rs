//! Reservations as rows, for a database that other processes share: PostgreSQL with several
//! gateways, and the CLI beside a running gateway.
//!
//! Each step is one transaction. Reserve: `reserved += estimate` only if
//! `balance - reserved >= estimate` (one conditional UPDATE: concurrent requests on several
//! instances can never overdraw) and an `open` reservation row. Settle: the row goes
//! `open → settled` exactly once, the charge (the usage in full) is appended to the ledger,
//! `reserved -= amount`. Release: `open → released` exactly once.
//!
//! A row is a lease until `expires_at`: the hold of a live request renews it every third of
//! the reservation's lifetime ([`Reservations::renew`]), so only the rows of requests that died
//! with their gateway expire; those are released at start and by the sweeper
//! ([`Reservations::reconcile`]). A settle that finds its row released anyway (the gateway
//! stalled past the lease, or could not renew it) still charges, once per request id, and gives
//! nothing back (the release already did): the charge counts wholly as overrun.

use std::time::Duration;

use crate::store::{Backend, Db, now_ms};

use super::ledger::{self, Adjustment, Charge, LedgerEntry, Refusal};
use super::{BillingError, Charged, Credits, Hold, MAX_BALANCE, Reservations, Settled};

pub struct Shared {
    db: Db,
    /// How long an open reservation may live before the sweeper releases it.
    hold_ttl: Duration,
}

impl Shared {
    pub fn new(db: Db, hold_ttl: Duration) -> Self {
        Self { db, hold_ttl }
    }

    /// When a lease taken or renewed now ends.
    fn expires_at(&self) -> i64 {
        let ttl = i64::try_from(self.hold_ttl.as_millis()).unwrap_or(i64::MAX);
        now_ms().saturating_add(ttl)
    }
}

impl Reservations for Shared {
    /// One conditional UPDATE and the reservation row.
    async fn reserve(&self, hold: &Hold) -> Result<(), BillingError> {
        self.insert(hold, false).await
    }

    async fn restore(&self, hold: &Hold) -> Result<(), BillingError> {
        self.insert(hold, true).await
    }

    /// Close the row exactly once, give the reservation back, append the charge; one
    /// transaction. A row released first (swept) gives nothing back, and the charge is still
    /// appended (once per request id).
    async fn settle(&self, hold: &Hold, mut charge: Charge) -> Result<Settled, BillingError> {
        let mut tx = self.db.pool.begin().await?;
        let closed = sqlx::query(
            "UPDATE reservations SET state = 'settled' WHERE id = $1 AND state = 'open'",
        )
        .bind(&hold.id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let give_back = if closed {
            hold.amount.0
        } else {
            // Released already (expired and swept): the reservation went back then, so nothing
            // held this charge.
            charge.overrun = charge.cost;
            0
        };
        // Locks the account row, so the balance read here is the one the charge moves.
        let balance: Option<(i64,)> = sqlx::query_as(
            "UPDATE accounts SET reserved = reserved - $1 WHERE id = $2 RETURNING balance",
        )
        .bind(give_back)
        .bind(&hold.account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((balance,)) = balance else {
            tx.rollback().await?;
            return Err(BillingError::NoAccount);
        };
        charge.cap(balance.saturating_add(MAX_BALANCE.0));
        if ledger::insert_charges(&mut *tx, std::slice::from_ref(&charge))
            .await?
            .is_empty()
        {
            // Charged already under this request id: this reservation only needs releasing.
            tx.rollback().await?;
            let closed = closed && release_row(&self.db, &hold.id).await?;
            return Ok(Settled {
                charged: None,
                closed,
            });
        }
        tx.commit().await?;
        Ok(Settled {
            charged: Some(Charged {
                cost: charge.cost,
                overrun: charge.overrun,
            }),
            closed,
        })
    }

    fn release_now(&self, _hold: &Hold) -> bool {
        false
    }

    async fn release(&self, hold: &Hold) -> Result<bool, BillingError> {
        release_row(&self.db, &hold.id).await
    }

    async fn flush(&self) -> Result<(), BillingError> {
        Ok(())
    }

    /// At start on SQLite (the CLI's own file: no gateway shares it) every open row; otherwise
    /// the expired ones (several gateways share PostgreSQL).
    async fn reconcile(&self, at_start: bool) -> Result<u64, BillingError> {
        let all = at_start && self.db.backend == Backend::Sqlite;
        release_open_rows(&self.db, all).await
    }

    fn reserved_in_memory(&self, _account_id: &str) -> Credits {
        Credits(0)
    }

    /// A third of the lifetime: two renewals may fail before a live row expires.
    fn lease(&self) -> Option<Duration> {
        Some((self.hold_ttl / 3).max(Duration::from_millis(1)))
    }

    async fn renew(&self, hold_id: &str) -> Result<bool, BillingError> {
        let renewed =
            sqlx::query("UPDATE reservations SET expires_at = $1 WHERE id = $2 AND state = 'open'")
                .bind(self.expires_at())
                .bind(hold_id)
                .execute(&self.db.pool)
                .await?
                .rows_affected();
        Ok(renewed == 1)
    }

    /// Nothing in memory: the rows are checked by `ledger::verify`.
    fn verify_memory(&self, _account_id: &str) -> bool {
        true
    }

    async fn post(
        &self,
        account_id: &str,
        adjustment: Adjustment,
        amount: Credits,
        note: &str,
    ) -> Result<Result<LedgerEntry, Refusal>, BillingError> {
        ledger::post(&self.db, account_id, adjustment, amount, note).await
    }
}

/// Release an open reservation row (idempotent); `true` if this call closed it.
pub(super) async fn release_row(db: &Db, id: &str) -> Result<bool, BillingError> {
    release_row_expired_by(db, id, i64::MAX).await
}

/// Release an open reservation row whose lease ended by `now` (`i64::MAX`: any open row);
/// `true` if this call closed it. The expiry is checked in the same statement, so a lease
/// renewed since the sweeper listed the row keeps it.
async fn release_row_expired_by(db: &Db, id: &str, now: i64) -> Result<bool, BillingError> {
    let mut tx = db.pool.begin().await?;
    let row: Option<(String, i64)> = sqlx::query_as(
        "UPDATE reservations SET state = 'released' WHERE id = $1 AND state = 'open' AND expires_at <= $2 RETURNING account_id, amount",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((account, amount)) = row else {
        tx.rollback().await?;
        return Ok(false);
    };
    sqlx::query("UPDATE accounts SET reserved = reserved - $1 WHERE id = $2")
        .bind(amount)
        .bind(&account)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Release every open reservation row (`all`) or those whose lease ended; how many were
/// released.
pub(super) async fn release_open_rows(db: &Db, all: bool) -> Result<u64, BillingError> {
    let now = if all { i64::MAX } else { now_ms() };
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM reservations WHERE state = 'open' AND expires_at <= $1")
            .bind(now)
            .fetch_all(&db.pool)
            .await?;
    let mut n = 0;
    for (id,) in ids {
        if release_row_expired_by(db, &id, now).await? {
            n += 1;
        }
    }
    Ok(n)
}

impl Shared {
    /// The reservation: `reserved` moved and its row inserted, in one transaction; unless
    /// `force`d, only if the account is active and its free balance covers it.
    async fn insert(&self, hold: &Hold, force: bool) -> Result<(), BillingError> {
        let mut tx = self.db.pool.begin().await?;
        let updated = sqlx::query(if force {
            "UPDATE accounts SET reserved = reserved + $1 WHERE id = $2"
        } else {
            "UPDATE accounts SET reserved = reserved + $1 WHERE id = $2 AND status = 'active' AND balance - reserved >= $1"
        })
        .bind(hold.amount.0)
        .bind(&hold.account_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            tx.rollback().await?;
            return Err(BillingError::InsufficientBalance {
                estimate: hold.amount,
            });
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO reservations (id, account_id, key_id, request_id, model, amount, state, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $8)",
        )
        .bind(&hold.id)
        .bind(&hold.account_id)
        .bind(&hold.key_id)
        .bind(&hold.request_id)
        .bind(&hold.model)
        .bind(hold.amount.0)
        .bind(now)
        .bind(self.expires_at())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
