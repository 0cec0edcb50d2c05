//! API keys and the caller behind a request: `Authorization: Bearer <key>` (or `x-api-key`, as
//! Anthropic's SDKs send it) → hashed lookup (cached) → [`Caller`].
//!
//! Key format: `tg_` + 8-character lookup id + 32-character secret (base62, ~190 bits) +
//! 6-character base62 CRC32 of everything before it. The checksum lets a secret scanner (or
//! this gateway) reject a mistyped or made-up key offline, without a database lookup. Only the
//! SHA-256 of the whole key is stored, compared in constant time; the key is shown once.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::limits::Limits;
use crate::store::{Db, StoreError, now_ms};

pub const PREFIX: &str = "tg_";
const LOOKUP_LEN: usize = 8;
const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "You didn't provide an API key. Send `Authorization: Bearer <key>` (or `x-api-key: <key>`)."
    )]
    Missing,
    #[error("Incorrect API key provided: it is not a tollgate key (wrong format or checksum).")]
    Malformed,
    #[error("Incorrect API key provided.")]
    Unknown,
    #[error("This API key has been revoked.")]
    Revoked,
    #[error("This API key has expired.")]
    Expired,
    #[error("The account of this API key is suspended.")]
    AccountSuspended,
    /// The abnormal-usage guard (or an operator) suspended the key; `reason` says why.
    #[error("This API key is suspended ({reason}). Contact the operator to lift it.")]
    KeySuspended { reason: String },
    #[error("key lookup failed")]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AuthError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Sql(e))
    }
}

/// Who is calling: the key, its account, and what the key may do.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub key_name: String,
    pub account_id: String,
    pub allowed_models: Option<Vec<String>>,
    pub policy_set: String,
    /// The key's limits (tightened while the guard throttles it).
    pub limits: Arc<Limits>,
    /// The account's limits, shared by all its keys.
    pub account_limits: Arc<Limits>,
}

impl Caller {
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|list| list.iter().any(|m| m == model))
    }
}

/// A plaintext key: printed once, never logged (`Debug` shows only the lookup id).
pub struct PlainKey(String);

impl PlainKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PlainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}…*****", PREFIX, lookup_of(&self.0).unwrap_or("?"))
    }
}

fn base62(rng: &mut impl Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(BASE62[rng.gen_range(0..BASE62.len())]))
        .collect()
}

fn checksum(body: &str) -> String {
    let mut v = u64::from(crc32fast::hash(body.as_bytes()));
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(v % 62) as usize];
        v /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Generate a new key: (plaintext, lookup id, stored hash).
pub fn generate() -> (PlainKey, String, String) {
    let mut rng = rand::thread_rng();
    let lookup = base62(&mut rng, LOOKUP_LEN);
    let secret = base62(&mut rng, SECRET_LEN);
    let body = format!("{PREFIX}{lookup}{secret}");
    let key = format!("{body}{}", checksum(&body));
    let hash = hash_key(&key);
    (PlainKey(key), lookup, hash)
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Check the format and checksum offline; return the lookup id.
pub fn lookup_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    if rest.len() != LOOKUP_LEN + SECRET_LEN + CHECK_LEN
        || !rest.bytes().all(|b| BASE62.contains(&b))
    {
        return None;
    }
    let (body, check) = key.split_at(key.len() - CHECK_LEN);
    if checksum(body).as_bytes().ct_eq(check.as_bytes()).into() {
        Some(&rest[..LOOKUP_LEN])
    } else {
        None
    }
}

/// What the cache holds for a lookup id.
#[derive(Clone, Debug)]
struct KeyRow {
    id: String,
    name: String,
    account_id: String,
    secret_hash: String,
    allowed_models: Option<Vec<String>>,
    policy_set: String,
    limits: Arc<Limits>,
    account_limits: Arc<Limits>,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    account_status: String,
    /// The guard's action in force when the row was read.
    action: Option<Arc<crate::limits::guard::Action>>,
}

/// Bearer key → `Caller`. Positive and negative lookups are cached for `ttl` (1 s by default), so
/// a revocation done on any instance takes effect everywhere within that time.
#[derive(Clone)]
pub struct Authenticator {
    db: Db,
    cache: moka::future::Cache<String, Arc<Option<KeyRow>>>,
}

impl Authenticator {
    pub fn new(db: Db, ttl: Duration) -> Self {
        Self {
            db,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, AuthError> {
        let key = bearer
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Missing)?;
        let lookup = lookup_of(key).ok_or(AuthError::Malformed)?;
        let db = self.db.clone();
        let lookup_owned = lookup.to_string();
        let row = self
            .cache
            .try_get_with(lookup_owned.clone(), async move {
                load_row(&db, &lookup_owned).await.map(Arc::new)
            })
            .await
            .map_err(|e: Arc<AuthError>| AuthError::Store(StoreError::Io(e.to_string())))?;
        let row = row.as_ref().as_ref().ok_or(AuthError::Unknown)?;
        let presented = hash_key(key);
        if !bool::from(presented.as_bytes().ct_eq(row.secret_hash.as_bytes())) {
            return Err(AuthError::Unknown);
        }
        if row.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if row.expires_at.is_some_and(|t| t <= now_ms()) {
            return Err(AuthError::Expired);
        }
        if row.account_status != "active" {
            return Err(AuthError::AccountSuspended);
        }
        let mut limits = row.limits.clone();
        if let Some(action) = row.action.as_deref().filter(|a| a.in_force(now_ms())) {
            match action.throttle {
                None => {
                    return Err(AuthError::KeySuspended {
                        reason: action.reason.clone(),
                    });
                }
                Some(rpm) => limits = Arc::new(limits.tightened(rpm)),
            }
        }
        Ok(Caller {
            key_id: row.id.clone(),
            key_name: row.name.clone(),
            account_id: row.account_id.clone(),
            allowed_models: row.allowed_models.clone(),
            policy_set: row.policy_set.clone(),
            limits,
            account_limits: row.account_limits.clone(),
        })
    }

    /// Forget a cached key now (this instance); other instances forget it within the TTL.
    pub async fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}

type KeyTuple = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    Option<i64>,
    Option<i64>,
    String,
    String,
);

/// Stored limits; a row edited by hand into something unreadable must not lock its key out:
/// it runs without them, logged at every load.
fn parse_limits(text: &str) -> Arc<Limits> {
    Arc::new(serde_json::from_str(text).unwrap_or_else(|e| {
        tracing::error!(error = %e, "stored limits do not parse; they are not enforced");
        Limits::default()
    }))
}

async fn load_row(db: &Db, lookup: &str) -> Result<Option<KeyRow>, AuthError> {
    let row: Option<KeyTuple> = sqlx::query_as(
        "SELECT k.id, k.name, k.account_id, k.secret_hash, k.allowed_models, k.policy_set, k.limits, k.expires_at, k.revoked_at, a.status, a.limits \
         FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.lookup = $1",
    )
    .bind(lookup)
    .fetch_optional(&db.pool)
    .await?;
    let Some((
        id,
        name,
        account_id,
        secret_hash,
        allowed,
        policy_set,
        limits,
        expires_at,
        revoked_at,
        account_status,
        account_limits,
    )) = row
    else {
        return Ok(None);
    };
    let action = crate::limits::guard::active_action(db, &id)
        .await
        .map_err(AuthError::Store)?
        .map(Arc::new);
    Ok(Some(KeyRow {
        id,
        name,
        account_id,
        secret_hash,
        allowed_models: allowed.and_then(|s| serde_json::from_str(&s).ok()),
        policy_set,
        limits: parse_limits(&limits),
        account_limits: parse_limits(&account_limits),
        expires_at,
        revoked_at,
        account_status,
        action,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_pass_their_checksum_and_tampered_ones_do_not() {
        let (key, lookup, hash) = generate();
        assert_eq!(lookup_of(key.expose()), Some(lookup.as_str()));
        assert_ne!(hash, key.expose());
        assert_eq!(key.expose().len(), 3 + 8 + 32 + 6);
        let mut bad = key.expose().to_string();
        let last = bad.pop().unwrap();
        bad.push(if last == 'a' { 'b' } else { 'a' });
        assert_eq!(lookup_of(&bad), None);
        assert_eq!(lookup_of("sk-not-ours"), None);
        assert!(!format!("{key:?}").contains(&key.expose()[11..]));
    }
}
