//! `Hold`: one request's reservation. `settle` charges the usage once (in full: an overrun is
//! charged and counted); `release` or a drop unsettled gives it back; on PostgreSQL a live hold
//! renews its row's lease.

use super::*;

/// A reservation. `settle` charges; dropping it unsettled releases it. On PostgreSQL it keeps
/// its row's lease renewed while it lives.
pub struct Hold {
    pub(super) billing: Billing,
    pub id: String,
    pub account_id: String,
    pub key_id: String,
    pub request_id: String,
    pub model: String,
    pub amount: Credits,
    pub price: Price,
    pub(super) done: bool,
    /// Stops the lease renewal when the hold goes (settled, released or dropped).
    pub(super) _lease: Option<tokio_util::sync::DropGuard>,
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold")
            .field("id", &self.id)
            .field("amount", &self.amount)
            .finish()
    }
}

impl Hold {
    /// Charge the actual cost in full, close the reservation, append the ledger entry. Exactly
    /// once per request. A cost above the reservation is charged too (the balance may go below
    /// zero by that overrun, and the account gets a 402 until topped up) and counted; so is one
    /// whose reservation the sweeper released first (it counts wholly as overrun).
    pub async fn settle(mut self, usage: Usage) -> Result<Credits, BillingError> {
        self.done = true;
        let charge = self.charge(self.price.cost(&usage), &usage);
        let billing = &self.billing;
        let settled = billing.inner.books.settle(&self, charge).await?;
        if settled.closed {
            billing.open_reservations(-1);
        }
        let Some(charged) = settled.charged else {
            return Ok(Credits(0));
        };
        if let Some(m) = &billing.inner.metrics {
            m.spend(
                &self.model,
                charged.cost.0,
                usage.prompt_tokens,
                usage.completion_tokens,
            );
            if charged.overrun.0 > 0 {
                m.overrun(&self.model, charged.overrun.0);
            }
        }
        if charged.overrun.0 > 0 {
            tracing::info!(
                request_id = %self.request_id,
                reserved = self.amount.0,
                cost = charged.cost.0,
                "usage cost more than the reservation; charged in full"
            );
        }
        Ok(charged.cost)
    }

    /// The ledger charge of `cost`, with the part beyond the reservation.
    fn charge(&self, cost: Credits, usage: &Usage) -> Charge {
        Charge {
            id: ulid::Ulid::new().to_string(),
            account_id: self.account_id.clone(),
            key_id: self.key_id.clone(),
            request_id: self.request_id.clone(),
            model: self.model.clone(),
            cost,
            overrun: Credits(cost.0.saturating_sub(self.amount.0).max(0)),
            prompt_tokens: i64::try_from(usage.prompt_tokens).unwrap_or(i64::MAX),
            completion_tokens: i64::try_from(usage.completion_tokens).unwrap_or(i64::MAX),
            images: i64::try_from(usage.images).unwrap_or(i64::MAX),
            seconds: i64::try_from(usage.seconds).unwrap_or(i64::MAX),
            created_at: now_ms(),
        }
    }

    /// Release now, waiting for it (the normal failure path).
    pub async fn release(mut self) {
        self.done = true;
        self.billing.release(&self).await;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // A failure, timeout or disconnect dropped the hold: release it, in the background
        // unless it is in memory. If the process dies first, `reconcile` releases it at the next
        // start (or once expired).
        let billing = self.billing.clone();
        if billing.inner.books.release_now(self) {
            billing.open_reservations(-1);
            return;
        }
        let hold = Hold {
            billing: billing.clone(),
            id: std::mem::take(&mut self.id),
            account_id: std::mem::take(&mut self.account_id),
            key_id: std::mem::take(&mut self.key_id),
            request_id: std::mem::take(&mut self.request_id),
            model: std::mem::take(&mut self.model),
            amount: self.amount,
            price: self.price,
            done: true,
            _lease: None,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let background = billing.inner.background.clone();
            background.spawn_on(&rt, async move { billing.release(&hold).await });
        }
    }
}
