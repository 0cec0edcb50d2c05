//! Accounts, their credits and debits, and their keys: the operator's domain, called by the admin
//! API (`admin`) and by the CLI (`cli.rs`), never by the request path.
//!
//! An account is an id, a unique name and a status; its money is `billing`'s (the balance is
//! the sum of its ledger). Operators move money only by ledger entries: a credit (refused if
//! the balance would pass [`MAX_BALANCE`]) or a debit (refused if it would take what requests in
//! flight hold, unless forced). Amounts are exact decimal dollars, more than 0.

pub mod cli;
pub mod keys;

use serde::Serialize;

use crate::billing::{
    Adjustment, Billing, BillingError, Credits, LedgerEntry, MAX_BALANCE, Refusal,
};
use crate::store::{StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account not found")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    /// A credit or debit that would leave the balance out of range (the balance is unchanged).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AccountError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Sql(e))
    }
}

impl From<BillingError> for AccountError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::NoAccount => Self::NotFound,
            BillingError::InsufficientBalance { .. } => Self::Invalid(e.to_string()),
            BillingError::Backlog { .. } => Self::Store(StoreError::Io(e.to_string())),
            BillingError::Ledger(s) => Self::Store(s),
        }
    }
}

/// An account as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub status: String,
    pub balance: i64,
    pub reserved: i64,
    pub balance_usd: String,
    /// Limits shared by all the account's keys (checked together with each key's own).
    pub limits: crate::limits::Limits,
}

/// A dollar amount an operator typed ("12.50"): exact, more than 0, at most [`MAX_BALANCE`].
pub fn parse_amount(text: &str) -> Result<Credits, AccountError> {
    match Credits::parse_usd(text) {
        Some(c) if c.0 > 0 => Ok(c),
        Some(_) => Err(Refusal::NotPositive.into()),
        None if looks_like_dollars(text) => Err(AccountError::Invalid(format!(
            "`{}` is more than the maximum balance of {MAX_BALANCE} USD",
            text.trim()
        ))),
        None => Err(AccountError::Invalid(format!(
            "`{}` is not a dollar amount with at most 12 decimals",
            text.trim()
        ))),
    }
}

/// Digits with at most one point and 12 decimals: a dollar amount too large to hold.
fn looks_like_dollars(text: &str) -> bool {
    let t = text.trim().trim_start_matches('$').trim_start_matches('-');
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    !(whole.is_empty() && frac.is_empty())
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= 12
}

pub async fn create(billing: &Billing, name: &str) -> Result<Account, AccountError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(AccountError::Invalid("`name` must not be empty".into()));
    }
    let id = format!("acct_{}", ulid::Ulid::new());
    sqlx::query("INSERT INTO accounts (id, name, status, balance, reserved, created_at) VALUES ($1, $2, 'active', 0, 0, $3)")
        .bind(&id)
        .bind(name)
        .bind(now_ms())
        .execute(&billing.db().pool)
        .await?;
    get(billing, &id).await
}

/// An account by id or by name, with its balance once every charge so far is in the ledger.
pub async fn get(billing: &Billing, id_or_name: &str) -> Result<Account, AccountError> {
    let row: Option<(String, String, String, String)> =
        sqlx::query_as("SELECT id, name, status, limits FROM accounts WHERE id = $1 OR name = $1")
            .bind(id_or_name)
            .fetch_optional(&billing.db().pool)
            .await?;
    let (id, name, status, limits) = row.ok_or(AccountError::NotFound)?;
    let money = billing.balance(&id).await?;
    Ok(Account {
        id,
        name,
        status,
        balance: money.balance.0,
        reserved: money.reserved.0,
        balance_usd: money.balance.to_string(),
        limits: serde_json::from_str(&limits).unwrap_or_default(),
    })
}

/// Replace an account's limits (all fields; an empty object removes them). Gateways apply them
/// within `auth.cache_ttl`.
pub async fn set_limits(
    billing: &Billing,
    account: &str,
    limits: &crate::limits::Limits,
) -> Result<Account, AccountError> {
    limits.validate().map_err(AccountError::Invalid)?;
    let text = serde_json::to_string(limits).map_err(|e| AccountError::Invalid(e.to_string()))?;
    let account = get(billing, account).await?;
    sqlx::query("UPDATE accounts SET limits = $1 WHERE id = $2")
        .bind(text)
        .bind(&account.id)
        .execute(&billing.db().pool)
        .await?;
    get(billing, &account.id).await
}

pub async fn list(billing: &Billing) -> Result<Vec<Account>, AccountError> {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM accounts ORDER BY created_at")
        .fetch_all(&billing.db().pool)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (id,) in rows {
        out.push(get(billing, &id).await?);
    }
    Ok(out)
}

/// Add `amount` (> 0) to an account; refused if the balance would pass [`MAX_BALANCE`].
pub async fn credit(
    billing: &Billing,
    account: &str,
    amount: Credits,
    note: &str,
) -> Result<LedgerEntry, AccountError> {
    post(billing, account, Adjustment::Credit, amount, note).await
}

/// Take `amount` (> 0) from an account; refused if what stays would not cover the reservations
/// of requests in flight, unless `force` (then the balance may go below zero).
pub async fn debit(
    billing: &Billing,
    account: &str,
    amount: Credits,
    note: &str,
    force: bool,
) -> Result<LedgerEntry, AccountError> {
    let adjustment = if force {
        Adjustment::ForcedDebit
    } else {
        Adjustment::Debit
    };
    post(billing, account, adjustment, amount, note).await
}

async fn post(
    billing: &Billing,
    account: &str,
    adjustment: Adjustment,
    amount: Credits,
    note: &str,
) -> Result<LedgerEntry, AccountError> {
    let account = get(billing, account).await?;
    Ok(billing
        .post(&account.id, adjustment, amount, note)
        .await??)
}
