//! Money: integer credits, prices, estimates, and reserve → settle → release on an append-only
//! ledger.
//!
//! Units: [`Credits`] are pico-dollars (1e-12 USD) in an `i64` (balances up to about 9.2 million
//! USD). A price per token in pico-dollars equals a price per million tokens in micro-dollars:
//! "$0.15 / 1M tokens" is 150_000. No float ever holds money.
//!
//! Invariants, each kept by one SQL transaction:
//! - reserve: `reserved += estimate` only if `balance - reserved >= estimate` (one conditional
//!   UPDATE: concurrent requests, on one instance or several, can never overdraw);
//! - settle: the reservation goes `open → settled` exactly once (a second settle finds no open
//!   row and charges nothing), the charge is appended to the ledger (unique per request), and
//!   `balance -= charge`, `reserved -= reservation`;
//! - release: `open → released` exactly once, `reserved -= reservation`;
//! - `accounts.balance` always equals the sum of the account's ledger entries.
//!
//! A [`Hold`] that is dropped without `settle` releases itself; reservations left open by a
//! crash are released at start ([`Billing::reconcile`]) and by the sweeper once expired.

pub mod cli;

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::store::{Backend, Db, StoreError, now_ms};

/// An amount of money in pico-dollars (1e-12 USD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Credits(pub i64);

pub const PICO_PER_USD: i64 = 1_000_000_000_000;

impl Credits {
    /// Parse a decimal dollar amount ("12.50", "0.000001") exactly; at most 12 decimals.
    pub fn parse_usd(text: &str) -> Option<Self> {
        let t = text.trim().trim_start_matches('$');
        let (neg, t) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        if whole.is_empty() && frac.is_empty() {
            return None;
        }
        if !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || frac.len() > 12
        {
            return None;
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut frac_val: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        for _ in frac.len()..12 {
            frac_val = frac_val.checked_mul(10)?;
        }
        let v = whole.checked_mul(PICO_PER_USD)?.checked_add(frac_val)?;
        Some(Self(if neg { -v } else { v }))
    }
}

impl fmt::Display for Credits {
    /// Dollars with 12 decimals, from integers only: `1.500000000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let per = PICO_PER_USD.unsigned_abs();
        write!(f, "{sign}{}.{:012}", abs / per, abs % per)
    }
}

/// Prices of a model, in pico-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_per_token: u64,
    #[serde(default)]
    pub output_per_token: u64,
    #[serde(default)]
    pub per_image: u64,
    #[serde(default)]
    pub per_second: u64,
    #[serde(default)]
    pub per_request: u64,
}

/// What a request consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub images: u64,
    pub seconds: u64,
}

impl Price {
    /// The cost of a usage, saturating (a saturated cost can never be reserved, so it is refused).
    pub fn cost(&self, u: &Usage) -> Credits {
        let parts = [
            u.prompt_tokens.saturating_mul(self.input_per_token),
            u.completion_tokens.saturating_mul(self.output_per_token),
            u.images.saturating_mul(self.per_image),
            u.seconds.saturating_mul(self.per_second),
            self.per_request,
        ];
        let total = parts.iter().fold(0u64, |a, b| a.saturating_add(*b));
        Credits(i64::try_from(total).unwrap_or(i64::MAX))
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
    #[error("ledger write failed")]
    Ledger(#[from] StoreError),
}

impl From<sqlx::Error> for BillingError {
    fn from(e: sqlx::Error) -> Self {
        Self::Ledger(StoreError::Sql(e))
    }
}

/// One ledger line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerEntry {
    pub id: String,
    pub account_id: String,
    pub key_id: Option<String>,
    pub request_id: Option<String>,
    pub model: Option<String>,
    pub kind: String,
    pub amount: i64,
    pub amount_usd: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub note: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub status: String,
    pub balance: i64,
    pub reserved: i64,
    pub balance_usd: String,
}

#[derive(Clone)]
pub struct Billing {
    db: Db,
    /// How long an open reservation may live before the sweeper releases it.
    hold_ttl: Duration,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

/// A reservation. `settle` charges; dropping it unsettled releases it.
pub struct Hold {
    billing: Billing,
    pub id: String,
    pub account_id: String,
    pub key_id: String,
    pub request_id: String,
    pub model: String,
    pub amount: Credits,
    pub price: Price,
    done: bool,
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold")
            .field("id", &self.id)
            .field("amount", &self.amount)
            .finish()
    }
}

type LedgerRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    Option<String>,
    i64,
);

fn entry(r: LedgerRow) -> LedgerEntry {
    LedgerEntry {
        id: r.0,
        account_id: r.1,
        key_id: r.2,
        request_id: r.3,
        model: r.4,
        kind: r.5,
        amount: r.6,
        amount_usd: Credits(r.6).to_string(),
        prompt_tokens: r.7,
        completion_tokens: r.8,
        note: r.9,
        created_at: r.10,
    }
}

const LEDGER_COLUMNS: &str = "id, account_id, key_id, request_id, model, kind, amount, prompt_tokens, completion_tokens, note, created_at";

impl Billing {
    pub fn new(
        db: Db,
        hold_ttl: Duration,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Self {
        Self {
            db,
            hold_ttl,
            metrics,
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
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
        let mut tx = self.db.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE accounts SET reserved = reserved + $1 WHERE id = $2 AND status = 'active' AND balance - reserved >= $1",
        )
        .bind(estimate.0)
        .bind(account_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            tx.rollback().await?;
            if let Some(m) = &self.metrics {
                m.payment_required(model);
            }
            return Err(BillingError::InsufficientBalance { estimate });
        }
        let id = ulid::Ulid::new().to_string();
        let now = now_ms();
        let ttl = i64::try_from(self.hold_ttl.as_millis()).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO reservations (id, account_id, key_id, request_id, model, amount, state, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $8)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(key_id)
        .bind(request_id)
        .bind(model)
        .bind(estimate.0)
        .bind(now)
        .bind(now.saturating_add(ttl))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(m) = &self.metrics {
            m.open_reservations(1);
        }
        Ok(Hold {
            billing: self.clone(),
            id,
            account_id: account_id.into(),
            key_id: key_id.into(),
            request_id: request_id.into(),
            model: model.into(),
            amount: estimate,
            price,
            done: false,
        })
    }

    /// Release an open reservation (idempotent).
    async fn release(&self, id: &str) -> Result<bool, BillingError> {
        let mut tx = self.db.pool.begin().await?;
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
        if let Some(m) = &self.metrics {
            m.open_reservations(-1);
        }
        Ok(true)
    }

    /// Release every reservation left open by a crash (at start: all of them on SQLite, which
    /// has one gateway; the expired ones on PostgreSQL, shared by several) and, when called
    /// periodically, every expired one. Returns how many were released.
    pub async fn reconcile(&self, at_start: bool) -> Result<u64, BillingError> {
        let all = at_start && self.db.backend == Backend::Sqlite;
        let ids: Vec<(String,)> = if all {
            sqlx::query_as("SELECT id FROM reservations WHERE state = 'open'")
                .fetch_all(&self.db.pool)
                .await?
        } else {
            sqlx::query_as("SELECT id FROM reservations WHERE state = 'open' AND expires_at < $1")
                .bind(now_ms())
                .fetch_all(&self.db.pool)
                .await?
        };
        let mut n = 0;
        for (id,) in ids {
            if self.release(&id).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    pub async fn create_account(&self, name: &str) -> Result<Account, BillingError> {
        let id = format!("acct_{}", ulid::Ulid::new());
        sqlx::query("INSERT INTO accounts (id, name, status, balance, reserved, created_at) VALUES ($1, $2, 'active', 0, 0, $3)")
            .bind(&id)
            .bind(name)
            .bind(now_ms())
            .execute(&self.db.pool)
            .await?;
        self.account(&id).await
    }

    /// An account by id or by name.
    pub async fn account(&self, id_or_name: &str) -> Result<Account, BillingError> {
        let row: Option<(String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT id, name, status, balance, reserved FROM accounts WHERE id = $1 OR name = $1",
        )
        .bind(id_or_name)
        .fetch_optional(&self.db.pool)
        .await?;
        let (id, name, status, balance, reserved) = row.ok_or(BillingError::NoAccount)?;
        Ok(Account {
            id,
            name,
            status,
            balance,
            reserved,
            balance_usd: Credits(balance).to_string(),
        })
    }

    pub async fn accounts(&self) -> Result<Vec<Account>, BillingError> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM accounts ORDER BY created_at")
            .fetch_all(&self.db.pool)
            .await?;
        let mut out = Vec::new();
        for (id,) in rows {
            out.push(self.account(&id).await?);
        }
        Ok(out)
    }

    /// Add credits (or, negative, an adjustment) to an account: a ledger entry and the balance.
    pub async fn credit(
        &self,
        account_id: &str,
        amount: Credits,
        note: &str,
    ) -> Result<LedgerEntry, BillingError> {
        let account = self.account(account_id).await?;
        let id = ulid::Ulid::new().to_string();
        let kind = if amount.0 >= 0 {
            "credit"
        } else {
            "adjustment"
        };
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO ledger (id, account_id, kind, amount, note, created_at, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(&account.id)
        .bind(kind)
        .bind(amount.0)
        .bind(note)
        .bind(now_ms())
        .bind(format!("credit-{id}"))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
            .bind(amount.0)
            .bind(&account.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.ledger_entry(&id).await
    }

    async fn ledger_entry(&self, id: &str) -> Result<LedgerEntry, BillingError> {
        let row: LedgerRow = sqlx::query_as(&format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE id = $1"
        ))
        .bind(id)
        .fetch_one(&self.db.pool)
        .await?;
        Ok(entry(row))
    }

    /// Ledger lines of an account (newest first), or of one request.
    pub async fn ledger(
        &self,
        account: Option<&str>,
        request_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LedgerEntry>, BillingError> {
        let rows: Vec<LedgerRow> = match (account, request_id) {
            (_, Some(r)) => {
                sqlx::query_as(&format!(
                    "SELECT {LEDGER_COLUMNS} FROM ledger WHERE request_id = $1 ORDER BY id"
                ))
                .bind(r)
                .fetch_all(&self.db.pool)
                .await?
            }
            (Some(a), None) => {
                let account = self.account(a).await?;
                sqlx::query_as(&format!(
                    "SELECT {LEDGER_COLUMNS} FROM ledger WHERE account_id = $1 ORDER BY id DESC LIMIT $2"
                ))
                .bind(&account.id)
                .bind(limit)
                .fetch_all(&self.db.pool)
                .await?
            }
            (None, None) => Vec::new(),
        };
        Ok(rows.into_iter().map(entry).collect())
    }

    /// The balance equals the sum of the ledger, and `reserved` equals the open reservations.
    pub async fn verify(&self, account_id: &str) -> Result<bool, BillingError> {
        let account = self.account(account_id).await?;
        let (sum,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger WHERE account_id = $1",
        )
        .bind(&account.id)
        .fetch_one(&self.db.pool)
        .await?;
        let (open,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM reservations WHERE account_id = $1 AND state = 'open'",
        )
        .bind(&account.id)
        .fetch_one(&self.db.pool)
        .await?;
        Ok(sum == account.balance && open == account.reserved && account.balance >= 0)
    }
}

impl Hold {
    /// Charge the actual cost (capped at what was reserved, so the balance can never go below
    /// zero), close the reservation, append the ledger entry. Exactly once per request.
    pub async fn settle(mut self, usage: Usage) -> Result<Credits, BillingError> {
        self.done = true;
        let cost = self.price.cost(&usage).min(self.amount);
        let b = &self.billing;
        let mut tx = b.db.pool.begin().await?;
        let closed = sqlx::query(
            "UPDATE reservations SET state = 'settled' WHERE id = $1 AND state = 'open'",
        )
        .bind(&self.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if closed != 1 {
            // Released already (expired and swept): nothing may be charged twice or late.
            tx.rollback().await?;
            return Ok(Credits(0));
        }
        sqlx::query(
            "INSERT INTO ledger (id, account_id, key_id, request_id, model, kind, amount, prompt_tokens, completion_tokens, images, seconds, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'charge', $6, $7, $8, $9, $10, $11)",
        )
        .bind(ulid::Ulid::new().to_string())
        .bind(&self.account_id)
        .bind(&self.key_id)
        .bind(&self.request_id)
        .bind(&self.model)
        .bind(-cost.0)
        .bind(i64::try_from(usage.prompt_tokens).unwrap_or(i64::MAX))
        .bind(i64::try_from(usage.completion_tokens).unwrap_or(i64::MAX))
        .bind(i64::try_from(usage.images).unwrap_or(i64::MAX))
        .bind(i64::try_from(usage.seconds).unwrap_or(i64::MAX))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE accounts SET balance = balance - $1, reserved = reserved - $2 WHERE id = $3",
        )
        .bind(cost.0)
        .bind(self.amount.0)
        .bind(&self.account_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(m) = &b.metrics {
            m.open_reservations(-1);
            m.spend(
                &self.model,
                cost.0,
                usage.prompt_tokens,
                usage.completion_tokens,
            );
        }
        Ok(cost)
    }

    /// Release now, waiting for it (the normal failure path).
    pub async fn release(mut self) {
        self.done = true;
        if let Err(e) = self.billing.release(&self.id).await {
            tracing::error!(reservation = %self.id, error = %e, "release failed; the sweeper will release it when it expires");
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // A failure, timeout or disconnect dropped the hold: release it in the background. If the
        // process dies first, `reconcile` releases it at the next start (or once expired).
        let billing = self.billing.clone();
        let id = std::mem::take(&mut self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = billing.release(&id).await {
                    tracing::error!(reservation = %id, error = %e, "release failed; the sweeper will release it when it expires");
                }
            });
        }
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
