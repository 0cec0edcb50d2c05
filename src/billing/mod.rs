//! Money: integer credits, prices, estimates, and reserve → settle → release on an append-only
//! ledger.
//!
//! Units: [`Credits`] are pico-dollars (1e-12 USD) in an `i64` (balances up to about 9.2 million
//! USD). A price per token in pico-dollars equals a price per million tokens in micro-dollars:
//! "$0.15 / 1M tokens" is 150_000. No float ever holds money.
//!
//! The ledger is append-only (triggers refuse UPDATE and DELETE) and every insert moves
//! `accounts.balance` by its amount in the same transaction (a trigger), so the balance always
//! equals the sum of the account's ledger entries, whoever writes.
//!
//! Where open reservations live depends on who owns the database:
//! - SQLite (one gateway per file, [`Billing::for_gateway`]): in the gateway's memory
//!   ([`owned`]). Reserving is a check under a mutex with no write; settling is one append to
//!   the charge journal, moved into the ledger (unique per request) in batches by one writer;
//!   a crash leaves nothing to release, and the next start moves the journal into the ledger.
//! - PostgreSQL (several gateways): in the `reservations` table, each step one transaction.
//!   Reserve: `reserved += estimate` only if `balance - reserved >= estimate` (one conditional
//!   UPDATE: concurrent requests on several instances can never overdraw). Settle: the
//!   reservation goes `open → settled` exactly once, the charge is appended to the ledger,
//!   `reserved -= reservation`. Release: `open → released` exactly once. Reservations left open
//!   by a crash are released at start and by the sweeper once expired ([`Billing::reconcile`]).
//!
//! A [`Hold`] that is dropped without `settle` releases itself.

pub mod cli;
pub mod owned;

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::store::{Backend, Db, StoreError, now_ms};

/// An amount of money in pico-dollars (1e-12 USD).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
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
    /// Open reservations in memory, when this gateway owns the database (SQLite).
    owned: Option<std::sync::Arc<owned::Owned>>,
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
    /// Billing on a database that other processes share: reservations are rows (PostgreSQL
    /// with several gateways, and the CLI beside a running gateway).
    pub fn new(
        db: Db,
        hold_ttl: Duration,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Self {
        Self {
            db,
            owned: None,
            hold_ttl,
            metrics,
        }
    }

    /// Billing for the gateway: on SQLite it owns the database ([`owned`]: reservations in
    /// memory, charges journaled, an earlier run's journal moved into the ledger first); on
    /// PostgreSQL as [`Billing::new`]. Call from within the runtime that serves.
    pub async fn for_gateway(
        db: Db,
        hold_ttl: Duration,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, BillingError> {
        let owned = match db.backend {
            Backend::Sqlite => Some(std::sync::Arc::new(owned::Owned::open(db.clone()).await?)),
            Backend::Postgres => None,
        };
        Ok(Self {
            db,
            owned,
            hold_ttl,
            metrics,
        })
    }

    /// Wait until every charge made so far by this gateway is in the ledger (at once unless it
    /// owns the database).
    pub async fn flush(&self) -> Result<(), BillingError> {
        match &self.owned {
            Some(owned) => owned.flush().await,
            None => Ok(()),
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
        let id = ulid::Ulid::new().to_string();
        if let Some(owned) = &self.owned {
            if let Err(e) = owned.reserve(account_id, estimate).await {
                if let (BillingError::InsufficientBalance { .. }, Some(m)) = (&e, &self.metrics) {
                    m.payment_required(model);
                }
                return Err(e);
            }
        } else {
            self.reserve_row(&id, account_id, key_id, request_id, model, estimate)
                .await?;
        }
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

    /// The shared-database reservation: one conditional UPDATE and the reservation row.
    async fn reserve_row(
        &self,
        id: &str,
        account_id: &str,
        key_id: &str,
        request_id: &str,
        model: &str,
        estimate: Credits,
    ) -> Result<(), BillingError> {
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
        let now = now_ms();
        let ttl = i64::try_from(self.hold_ttl.as_millis()).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO reservations (id, account_id, key_id, request_id, model, amount, state, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $8)",
        )
        .bind(id)
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
        Ok(())
    }

    /// Release a hold kept in this gateway's memory, at once; `false` if holds are rows here.
    fn release_in_memory(&self, account_id: &str, amount: Credits) -> bool {
        let Some(owned) = &self.owned else {
            return false;
        };
        owned.release(account_id, amount);
        if let Some(m) = &self.metrics {
            m.open_reservations(-1);
        }
        true
    }

    /// Release a hold: in memory at once, or its row (idempotent).
    async fn release(&self, hold_id: &str, account_id: &str, amount: Credits) {
        if self.release_in_memory(account_id, amount) {
            return;
        }
        if let Err(e) = self.release_row(hold_id).await {
            tracing::error!(reservation = %hold_id, error = %e, "release failed; the sweeper will release it when it expires");
        }
    }

    /// Release an open reservation row (idempotent).
    async fn release_row(&self, id: &str) -> Result<bool, BillingError> {
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
            if self.release_row(&id).await? {
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
        self.flush().await?;
        let row: Option<(String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT id, name, status, balance, reserved FROM accounts WHERE id = $1 OR name = $1",
        )
        .bind(id_or_name)
        .fetch_optional(&self.db.pool)
        .await?;
        let (id, name, status, balance, mut reserved) = row.ok_or(BillingError::NoAccount)?;
        if let Some(owned) = &self.owned {
            reserved = reserved.saturating_add(owned.reserved(&id));
        }
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
        // One statement: the ledger trigger moves the balance in the same transaction.
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
        .execute(&self.db.pool)
        .await?;
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
        self.flush().await?;
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

    /// What a key was charged since `since_ms` (for its daily spend limit).
    pub async fn spent_by_key_since(
        &self,
        account_id: &str,
        key_id: &str,
        since_ms: i64,
    ) -> Result<Credits, BillingError> {
        self.flush().await?;
        let (spent,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(-amount), 0) AS BIGINT) FROM ledger \
             WHERE account_id = $1 AND created_at >= $2 AND key_id = $3 AND kind = 'charge'",
        )
        .bind(account_id)
        .bind(since_ms)
        .bind(key_id)
        .fetch_one(&self.db.pool)
        .await?;
        Ok(Credits(spent))
    }

    /// The balance equals the sum of the ledger, and `reserved` equals the open reservations.
    pub async fn verify(&self, account_id: &str) -> Result<bool, BillingError> {
        let mut account = self.account(account_id).await?;
        if let Some(owned) = &self.owned {
            // Compare the table with the stored column, not with this process's memory.
            account.reserved = account.reserved.saturating_sub(owned.reserved(&account.id));
        }
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
        let charged = match &b.owned {
            Some(owned) => owned.charge(self.charge(cost, &usage), self.amount)?,
            None => self.settle_row(cost, &usage).await?,
        };
        if let Some(m) = &b.metrics {
            // A row that was not closed here was closed (and counted) by whoever released it.
            if charged || b.owned.is_some() {
                m.open_reservations(-1);
            }
            if charged {
                m.spend(
                    &self.model,
                    cost.0,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                );
            }
        }
        Ok(if charged { cost } else { Credits(0) })
    }

    /// The shared-database settle: close the reservation row exactly once, append the charge,
    /// give the reservation back; one transaction.
    async fn settle_row(&self, cost: Credits, usage: &Usage) -> Result<bool, BillingError> {
        let mut tx = self.billing.db.pool.begin().await?;
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
            return Ok(false);
        }
        let charge = self.charge(cost, usage);
        if owned::insert_charges(&mut *tx, std::slice::from_ref(&charge))
            .await?
            .is_empty()
        {
            // Charged already under this request id: this reservation only needs releasing.
            tx.rollback().await?;
            self.billing.release_row(&self.id).await?;
            return Ok(false);
        }
        sqlx::query("UPDATE accounts SET reserved = reserved - $1 WHERE id = $2")
            .bind(self.amount.0)
            .bind(&self.account_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    fn charge(&self, cost: Credits, usage: &Usage) -> owned::Charge {
        owned::Charge {
            id: ulid::Ulid::new().to_string(),
            account_id: self.account_id.clone(),
            key_id: self.key_id.clone(),
            request_id: self.request_id.clone(),
            model: self.model.clone(),
            cost,
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
        self.billing
            .release(&self.id, &self.account_id, self.amount)
            .await;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // A failure, timeout or disconnect dropped the hold: release it in the background. If the
        // process dies first, `reconcile` releases it at the next start (or once expired).
        if self
            .billing
            .release_in_memory(&self.account_id, self.amount)
        {
            return;
        }
        let billing = self.billing.clone();
        let id = std::mem::take(&mut self.id);
        let account = std::mem::take(&mut self.account_id);
        let amount = self.amount;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { billing.release(&id, &account, amount).await });
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
