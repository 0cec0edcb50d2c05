//! Reservations as rows, for a database that other processes share: PostgreSQL with several
//! gateways, and the CLI beside a running gateway.
//!
//! Each step is one transaction. Reserve: `reserved += estimate` only if
//! `balance - reserved >= estimate` (one conditional UPDATE: concurrent requests on several
//! instances can never overdraw) and an `open` reservation row. Settle: the row goes
//! `open → settled` exactly once, the charge is appended to the ledger, `reserved -= amount`.
//! Release: `open → released` exactly once. Rows left open by a crash are released at start and
//! by the sweeper once past their lifetime ([`Reservations::reconcile`]).

use std::time::Duration;

use crate::store::{Backend, Db, now_ms};

use super::ledger::{self, Adjustment, Charge, LedgerEntry, Refusal};
use super::{BillingError, Credits, Hold, Reservations, Settled};

pub struct Shared {
    db: Db,
    /// How long an open reservation may live before the sweeper releases it.
    hold_ttl: Duration,
}

impl Shared {
    pub fn new(db: Db, hold_ttl: Duration) -> Self {
        Self { db, hold_ttl }
    }
}

impl Reservations for Shared {
    /// One conditional UPDATE and the reservation row.
    async fn reserve(&self, hold: &Hold) -> Result<(), BillingError> {
        let mut tx = self.db.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE accounts SET reserved = reserved + $1 WHERE id = $2 AND status = 'active' AND balance - reserved >= $1",
        )
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
        let ttl = i64::try_from(self.hold_ttl.as_millis()).unwrap_or(i64::MAX);
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
        .bind(now.saturating_add(ttl))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Close the row exactly once, append the charge, give the reservation back; one
    /// transaction.
    async fn settle(&self, hold: &Hold, charge: Charge) -> Result<Settled, BillingError> {
        let mut tx = self.db.pool.begin().await?;
        let closed = sqlx::query(
            "UPDATE reservations SET state = 'settled' WHERE id = $1 AND state = 'open'",
        )
        .bind(&hold.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if closed != 1 {
            // Released already (expired and swept): nothing may be charged twice or late.
            tx.rollback().await?;
            return Ok(Settled {
                charged: false,
                closed: false,
            });
        }
        if ledger::insert_charges(&mut *tx, std::slice::from_ref(&charge))
            .await?
            .is_empty()
        {
            // Charged already under this request id: this reservation only needs releasing.
            tx.rollback().await?;
            let closed = release_row(&self.db, &hold.id).await?;
            return Ok(Settled {
                charged: false,
                closed,
            });
        }
        sqlx::query("UPDATE accounts SET reserved = reserved - $1 WHERE id = $2")
            .bind(hold.amount.0)
            .bind(&hold.account_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Settled {
            charged: true,
            closed: true,
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
    let mut tx = db.pool.begin().await?;
    let row: Option<(String, i64)> = sqlx::query_as(
        "UPDATE reservations SET state = 'released' WHERE id = $1 AND state = 'open' RETURNING account_id, amount",
    )
    .bind(id)
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

/// Release every open reservation row (`all`) or the expired ones; how many were released.
pub(super) async fn release_open_rows(db: &Db, all: bool) -> Result<u64, BillingError> {
    let ids: Vec<(String,)> = if all {
        sqlx::query_as("SELECT id FROM reservations WHERE state = 'open'")
            .fetch_all(&db.pool)
            .await?
    } else {
        sqlx::query_as("SELECT id FROM reservations WHERE state = 'open' AND expires_at < $1")
            .bind(now_ms())
            .fetch_all(&db.pool)
            .await?
    };
    let mut n = 0;
    for (id,) in ids {
        if release_row(db, &id).await? {
            n += 1;
        }
    }
    Ok(n)
}
