//! An account's API keys: create (the key shown once), list, rotate (a new key with the same
//! settings; the old one revoked) and revoke.

use serde::{Deserialize, Serialize};

use super::AccountError;
use crate::auth::{self, PlainKey};
use crate::billing::Billing;
use crate::limits::Limits;
use crate::store::{StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key not found")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for KeyError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Sql(e))
    }
}

impl From<AccountError> for KeyError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::NotFound => Self::Invalid("no such account".into()),
            AccountError::Invalid(_) | AccountError::Refused(_) => Self::Invalid(e.to_string()),
            AccountError::Store(s) => Self::Store(s),
        }
    }
}

/// What an operator asks for when issuing a key.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    /// Seconds until the key expires; none: it does not expire.
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
    /// The models the key may call; none: every model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub policy_set: Option<String>,
    /// Per-key limits (requests and tokens per minute, concurrency, daily spend), enforced at
    /// admission ([`crate::limits`]).
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// A key as listed: never the secret, never its hash.
#[derive(Debug, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// The key's public prefix (`tg_` + lookup id), enough to recognise it in a list.
    pub prefix: String,
    pub models: Option<Vec<String>>,
    pub policy_set: String,
    pub limits: Limits,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

type KeyTuple = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
);

const COLUMNS: &str = "id, account_id, name, lookup, allowed_models, policy_set, limits, created_at, expires_at, revoked_at";

fn info(r: KeyTuple) -> KeyInfo {
    KeyInfo {
        id: r.0,
        account_id: r.1,
        name: r.2,
        prefix: format!("{}{}", auth::PREFIX, r.3),
        models: r.4.and_then(|m| serde_json::from_str(&m).ok()),
        policy_set: r.5,
        limits: serde_json::from_str(&r.6).unwrap_or_default(),
        created_at: r.7,
        expires_at: r.8,
        revoked_at: r.9,
    }
}

/// Refuse a key that names a policy set the policies do not define (it would otherwise be
/// screened by another set without anyone knowing).
pub fn check_policy_set(new: &NewKey, policies: &crate::policy::Compiled) -> Result<(), KeyError> {
    match &new.policy_set {
        Some(set) if !policies.has_set(set) => Err(KeyError::Invalid(format!(
            "policy set `{set}` does not exist (known: {})",
            policies.set_names().join(", ")
        ))),
        _ => Ok(()),
    }
}

/// The policy sets that keys not revoked name: a policy change may not remove them.
pub async fn policy_sets_in_use(
    billing: &Billing,
) -> Result<std::collections::BTreeSet<String>, KeyError> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT policy_set FROM api_keys WHERE revoked_at IS NULL")
            .fetch_all(&billing.db().pool)
            .await?;
    Ok(rows.into_iter().map(|(s,)| s).collect())
}

pub async fn create(
    billing: &Billing,
    account: &str,
    new: NewKey,
) -> Result<(KeyInfo, PlainKey), KeyError> {
    if new.name.trim().is_empty() {
        return Err(KeyError::Invalid("`name` must not be empty".into()));
    }
    let limits = new.limits.unwrap_or_default();
    limits.validate().map_err(KeyError::Invalid)?;
    let limits =
        serde_json::to_string(&limits).map_err(|e| KeyError::Invalid(format!("limits: {e}")))?;
    let account = super::get(billing, account).await?;
    let (plain, lookup, hash) = auth::generate();
    let id = format!("key_{}", ulid::Ulid::new());
    let now = now_ms();
    let expires_at = new
        .expires_in_seconds
        .map(|s| now.saturating_add(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)));
    let models = new.models.map(|m| serde_json::Value::from(m).to_string());
    sqlx::query(
        "INSERT INTO api_keys (id, account_id, name, lookup, secret_hash, allowed_models, policy_set, limits, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&id)
    .bind(&account.id)
    .bind(new.name.trim())
    .bind(&lookup)
    .bind(&hash)
    .bind(models)
    .bind(new.policy_set.unwrap_or_else(|| "default".into()))
    .bind(limits)
    .bind(now)
    .bind(expires_at)
    .execute(&billing.db().pool)
    .await?;
    Ok((get(billing, &id).await?, plain))
}

pub async fn get(billing: &Billing, id: &str) -> Result<KeyInfo, KeyError> {
    let row: Option<KeyTuple> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&billing.db().pool)
            .await?;
    row.map(info).ok_or(KeyError::NotFound)
}

pub async fn list(billing: &Billing, account: &str) -> Result<Vec<KeyInfo>, KeyError> {
    let account = super::get(billing, account).await?;
    let rows: Vec<KeyTuple> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE account_id = $1 ORDER BY created_at"
    ))
    .bind(&account.id)
    .fetch_all(&billing.db().pool)
    .await?;
    Ok(rows.into_iter().map(info).collect())
}

pub async fn revoke(billing: &Billing, id: &str) -> Result<KeyInfo, KeyError> {
    let n = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now_ms())
        .bind(id)
        .execute(&billing.db().pool)
        .await?
        .rows_affected();
    let key = get(billing, id).await?;
    if n == 0 && key.revoked_at.is_none() {
        return Err(KeyError::NotFound);
    }
    Ok(key)
}

/// A key's suspensions and throttles (the guard's or an operator's), newest first.
pub async fn suspensions(
    billing: &Billing,
    id: &str,
) -> Result<Vec<crate::limits::guard::Suspension>, KeyError> {
    get(billing, id).await?;
    Ok(crate::limits::guard::history(billing.db(), id).await?)
}

/// Lift the suspension or throttle in force on a key; `by` names the operator (recorded).
/// The key works again on every gateway within `auth.cache_ttl`.
pub async fn lift(
    billing: &Billing,
    id: &str,
    by: &str,
) -> Result<Vec<crate::limits::guard::Suspension>, KeyError> {
    get(billing, id).await?;
    let lifted = crate::limits::guard::lift(billing.db(), id, by).await?;
    if lifted == 0 {
        return Err(KeyError::Invalid(
            "the key has no suspension or throttle in force".into(),
        ));
    }
    suspensions(billing, id).await
}

/// A new key with the same settings; the old one is revoked.
pub async fn rotate(billing: &Billing, id: &str) -> Result<(KeyInfo, PlainKey), KeyError> {
    let old = get(billing, id).await?;
    if old.revoked_at.is_some() {
        return Err(KeyError::Invalid(
            "the key is revoked; create a new one".into(),
        ));
    }
    let remaining = old
        .expires_at
        .map(|t| u64::try_from((t - now_ms()).max(0) / 1000).unwrap_or(0));
    let new = NewKey {
        name: old.name.clone(),
        expires_in_seconds: remaining,
        models: old.models.clone(),
        policy_set: Some(old.policy_set.clone()),
        limits: Some(old.limits.clone()),
    };
    let created = create(billing, &old.account_id, new).await?;
    revoke(billing, id).await?;
    Ok(created)
}
