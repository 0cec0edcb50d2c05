//! Free balances held in memory, for a database that one gateway owns (SQLite).
//!
//! With SQLite there is exactly one gateway process per database file, so the open reservations
//! of an account live only in that process: reserving is a check and an addition under a mutex,
//! with no write at all, and a crash releases every reservation by construction (nothing was
//! written). What is durable is the ledger: a settle is one `INSERT` into the ledger, whose
//! trigger moves `accounts.balance` in the same implicit transaction, committed before the
//! request reports its cost.
//!
//! The balance each account holds here is the database's, reloaded at least once per
//! [`REFRESH`] and before any 402 that is older than [`RECHECK`], so that credits added from
//! the CLI (another process) are seen within a second. Only credits (and operator adjustments)
//! change a balance outside this process; charges all pass through here, under the account's
//! writer lock, so a reload can never interleave with a charge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::store::Db;

use super::{BillingError, Credits};

/// How long a loaded balance serves before it is read again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A refusal is only given on a balance read at most this long ago.
pub const RECHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct Owned {
    accounts: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    /// Serializes the database writes and reloads of one account.
    writer: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

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

impl Owned {
    fn slot(&self, account_id: &str) -> Arc<Slot> {
        let mut map = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(account_id.to_string()).or_default().clone()
    }

    fn existing(&self, account_id: &str) -> Option<Arc<Slot>> {
        let map = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(account_id).cloned()
    }

    /// Reserve `estimate` if the free balance covers it.
    pub async fn reserve(
        &self,
        db: &Db,
        account_id: &str,
        estimate: Credits,
    ) -> Result<(), BillingError> {
        let slot = self.slot(account_id);
        for attempt in 0..2 {
            let decision = {
                let mut s = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
                match s.loaded.map(|t| t.elapsed()) {
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
                }
            };
            match decision {
                Decision::Reserved => return Ok(()),
                Decision::Refused => break,
                Decision::Reload => reload(db, account_id, &slot).await?,
            }
        }
        Err(BillingError::InsufficientBalance { estimate })
    }

    /// Give `amount` back to the free balance (synchronous: usable from `Drop`).
    pub fn release(&self, account_id: &str, amount: Credits) {
        if let Some(slot) = self.existing(account_id) {
            let mut s = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.reserved = s.reserved.saturating_sub(amount.0).max(0);
        }
    }

    /// Run `write` (the ledger insert, `true` if it charged) under the account's writer lock;
    /// when it commits, the charge leaves the in-memory balance. The reservation is released
    /// whatever happens, even if this future is dropped half-way (a reload then corrects the
    /// balance).
    pub async fn charge<F>(
        &self,
        account_id: &str,
        reserved: Credits,
        cost: Credits,
        write: F,
    ) -> Result<bool, BillingError>
    where
        F: std::future::Future<Output = Result<bool, BillingError>>,
    {
        let slot = self.slot(account_id);
        let _release = ReleaseOnDrop {
            slot: &slot,
            amount: reserved,
        };
        let _writer = slot.writer.lock().await;
        let charged = write.await?;
        if charged {
            let mut s = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.balance = s.balance.saturating_sub(cost.0);
        }
        Ok(charged)
    }

    /// The in-memory open reservations of an account (0 if it never reserved here).
    pub fn reserved(&self, account_id: &str) -> i64 {
        self.existing(account_id).map_or(0, |slot| {
            slot.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .reserved
        })
    }
}

struct ReleaseOnDrop<'a> {
    slot: &'a Slot,
    amount: Credits,
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        let mut s = self
            .slot
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        s.reserved = s.reserved.saturating_sub(self.amount.0).max(0);
    }
}

async fn reload(db: &Db, account_id: &str, slot: &Slot) -> Result<(), BillingError> {
    let _writer = slot.writer.lock().await;
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT balance, status FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_optional(&db.pool)
            .await?;
    let (balance, status) = row.ok_or(BillingError::NoAccount)?;
    let mut s = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
    s.balance = balance;
    s.active = status == "active";
    s.loaded = Some(Instant::now());
    Ok(())
}
