//! Throttling: the limits a key and its account carry, checked together at admission, and
//! the abnormal-usage guard ([`guard`]).
//!
//! A key and an account may each carry `requests_per_minute`, `tokens_per_minute`,
//! `concurrent_requests` and `spend_per_day_usd`; a request must fit both (the account's are
//! shared by all its keys). The two rates are GCRA (the generic cell rate algorithm): a scope may
//! use a minute's allowance at once, then one unit per `60 s / limit`. Tokens are counted as the
//! request's estimate (prompt + maximum output) at admission, corrected to the actual usage when
//! the request succeeds and given back when it fails. The spend of a UTC day counts the estimates
//! of requests in flight and the day's charges, read from the ledger when the scope is first
//! seen that day. A request refused here has consumed nothing, in any scope.
//!
//! The counters live in this process ([`local`], `limits.backend: local`) or in Redis
//! ([`redis`], `backend: redis`), shared by every gateway on it. Redis down: admit without
//! limits (`on_redis_error: open`, counted in `tollgate_limits_redis_errors_total` and logged
//! once per 10 s) or refuse with 503 `limits_unavailable` (`closed`).

pub mod guard;
mod local;
mod redis;

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::billing::{Billing, BillingError, Credits};
use crate::config::{FailMode, LimitsBackend, LimitsConfig};
use crate::store::{StoreError, now_ms};

/// The window of both rates.
pub const WINDOW: Duration = Duration::from_secs(60);
const DAY_MS: i64 = 86_400_000;

/// What a key is allowed; every field optional (none: no limit). The same fields are the admin
/// API's `limits` object and the CLI's `keys create` flags.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args,
)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub requests_per_minute: Option<u32>,
    /// Prompt and maximum output tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub concurrent_requests: Option<u32>,
    /// Dollars per UTC day, exactly ("5.00").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub spend_per_day_usd: Option<String>,
}

impl Limits {
    /// Check what an operator asked for; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            (
                "requests_per_minute",
                self.requests_per_minute.map(u64::from),
            ),
            ("tokens_per_minute", self.tokens_per_minute),
            (
                "concurrent_requests",
                self.concurrent_requests.map(u64::from),
            ),
        ];
        for (field, value) in positive {
            if value == Some(0) {
                return Err(format!("limits.{field} must be at least 1"));
            }
        }
        if let Some(text) = &self.spend_per_day_usd {
            match Credits::parse_usd(text) {
                Some(c) if c.0 > 0 => {}
                _ => {
                    return Err(format!(
                        "limits.spend_per_day_usd must be a positive amount of dollars like \"5.00\", not {text:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn spend_per_day(&self) -> Option<Credits> {
        self.spend_per_day_usd
            .as_deref()
            .and_then(Credits::parse_usd)
    }

    /// These limits with at most `rpm` requests per minute (the guard's throttle).
    pub fn tightened(&self, rpm: u32) -> Self {
        Self {
            requests_per_minute: Some(self.requests_per_minute.map_or(rpm, |r| r.min(rpm))),
            ..self.clone()
        }
    }
}

/// Whose limit: the key's own, or its account's (shared by all its keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Account,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Key => "key",
            Self::Account => "account",
        })
    }
}

/// One scope's limits, as a backend checks them.
pub(crate) struct Scoped<'a> {
    scope: Scope,
    account_id: &'a str,
    key_id: &'a str,
    limits: &'a Limits,
}

impl Scoped<'_> {
    /// The scope's name among the counters: `k:<key id>` or `a:<account id>`.
    fn cache_key(&self) -> String {
        match self.scope {
            Scope::Key => format!("k:{}", self.key_id),
            Scope::Account => format!("a:{}", self.account_id),
        }
    }

    async fn spent_since(&self, billing: &Billing, since_ms: i64) -> Result<Credits, BillingError> {
        match self.scope {
            Scope::Key => {
                billing
                    .spent_by_key_since(self.account_id, self.key_id, since_ms)
                    .await
            }
            Scope::Account => {
                billing
                    .spent_by_account_since(self.account_id, since_ms)
                    .await
            }
        }
    }
}

fn spend_exceeded(scope: Scope, limit: Credits, today: i64, now_ms: i64) -> Exceeded {
    let midnight = (today + 1) * DAY_MS;
    let wait = u64::try_from(midnight - now_ms).unwrap_or(0);
    Exceeded::Spend {
        scope,
        limit,
        retry_after: Duration::from_millis(wait),
    }
}

/// A limit that refuses this request now.
#[derive(Debug, thiserror::Error)]
pub enum Exceeded {
    #[error(
        "Rate limit reached for requests: this {scope} allows {limit} per minute. Retry in {}.",
        reset(*retry_after)
    )]
    Requests {
        scope: Scope,
        limit: u32,
        retry_after: Duration,
    },
    #[error(
        "Rate limit reached for tokens: this {scope} allows {limit} per minute and this request needs {requested} (prompt and maximum output). Retry in {}.",
        reset(*retry_after)
    )]
    Tokens {
        scope: Scope,
        limit: u64,
        requested: u64,
        retry_after: Duration,
    },
    #[error(
        "Request too large for this {scope}'s token limit: it needs {requested} tokens (prompt and maximum output) and the {scope} allows {limit} per minute. Lower max_tokens or shorten the prompt."
    )]
    TooManyTokens {
        scope: Scope,
        limit: u64,
        requested: u64,
    },
    #[error(
        "Too many concurrent requests: this {scope} allows {limit} at a time. Retry when one finishes."
    )]
    Concurrency { scope: Scope, limit: u32 },
    #[error(
        "Daily spend limit reached: this {scope} may spend {limit} USD per UTC day. Retry in {}.",
        reset(*retry_after)
    )]
    Spend {
        scope: Scope,
        limit: Credits,
        retry_after: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(transparent)]
    Exceeded(#[from] Exceeded),
    /// The day's spend could not be read.
    #[error(transparent)]
    Billing(#[from] BillingError),
    /// Redis is down and `limits.on_redis_error` is `closed`.
    #[error("Rate limits cannot be checked right now; retry shortly.")]
    Unavailable,
    /// The guard could not record its action.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Exceeded {
    /// When a retry can succeed (none: it cannot without a change to the request).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Requests { retry_after, .. }
            | Self::Tokens { retry_after, .. }
            | Self::Spend { retry_after, .. } => Some(*retry_after),
            Self::Concurrency { .. } => Some(Duration::from_secs(1)),
            Self::TooManyTokens { .. } => None,
        }
    }

    pub fn scope(&self) -> Scope {
        match self {
            Self::Requests { scope, .. }
            | Self::Tokens { scope, .. }
            | Self::TooManyTokens { scope, .. }
            | Self::Concurrency { scope, .. }
            | Self::Spend { scope, .. } => *scope,
        }
    }

    /// OpenAI's `x-ratelimit-*` headers for the limit that refused.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Requests {
                limit, retry_after, ..
            } => vec![
                ("x-ratelimit-limit-requests", limit.to_string()),
                ("x-ratelimit-remaining-requests", "0".into()),
                ("x-ratelimit-reset-requests", reset(*retry_after)),
            ],
            Self::Tokens {
                limit, retry_after, ..
            } => vec![
                ("x-ratelimit-limit-tokens", limit.to_string()),
                ("x-ratelimit-remaining-tokens", "0".into()),
                ("x-ratelimit-reset-tokens", reset(*retry_after)),
            ],
            Self::TooManyTokens { limit, .. } => {
                vec![("x-ratelimit-limit-tokens", limit.to_string())]
            }
            Self::Concurrency { .. } | Self::Spend { .. } => Vec::new(),
        }
    }

    fn limit_label(&self) -> &'static str {
        match self {
            Self::Requests { .. } => "requests",
            Self::Tokens { .. } | Self::TooManyTokens { .. } => "tokens",
            Self::Concurrency { .. } => "concurrency",
            Self::Spend { .. } => "spend",
        }
    }
}

/// A duration as OpenAI writes its resets: `250ms`, `1.5s`, `6m0s`.
fn reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{}ms", ms.max(1))
    } else if ms < 60_000 {
        let tenths = ms.div_ceil(100);
        if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        }
    } else {
        let s = ms.div_ceil(1000);
        if s < 3600 {
            format!("{}m{}s", s / 60, s % 60)
        } else {
            format!("{}h{}m{}s", s / 3600, (s % 3600) / 60, s % 60)
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    scope: &'static str,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedisErrorLabels {
    /// `admitted` (fail open) or `refused` (fail closed).
    outcome: &'static str,
}

#[derive(Clone)]
enum Backend {
    Local(local::Local),
    Redis(redis::RedisLimits),
}

/// The limits of every key and account, in this process or in Redis.
#[derive(Clone)]
pub struct Limiter {
    backend: Backend,
    fail: FailMode,
    /// The abnormal-usage guard, told of every keyed request's admission and end.
    pub guard: guard::Guard,
    background: crate::background::Background,
    refusals: Family<RefusalLabels, Counter>,
    redis_errors: Family<RedisErrorLabels, Counter>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// What a key asks at admission.
pub struct Ask<'a> {
    pub account_id: &'a str,
    pub key_id: &'a str,
    pub limits: &'a Limits,
    pub account_limits: &'a Limits,
    /// Prompt and maximum output.
    pub tokens: u64,
    /// The estimated cost, as reserved.
    pub estimate: Credits,
}

impl Limiter {
    /// In-process limits, no metrics (tests, the CLI).
    pub fn new() -> Self {
        Self {
            backend: Backend::Local(local::Local::new()),
            fail: FailMode::Open,
            guard: guard::Guard::new(crate::config::GuardConfig::disabled(), None),
            background: crate::background::Background::new(),
            refusals: Family::default(),
            redis_errors: Family::default(),
        }
    }

    /// The gateway's limiter, as configured; with Redis, connecting starts in the background.
    pub async fn from_config(
        cfg: &LimitsConfig,
        guard_cfg: &crate::config::GuardConfig,
        metrics: Option<&crate::metrics::Metrics>,
        background: &crate::background::Background,
    ) -> Result<Self, String> {
        let backend = match &cfg.backend {
            LimitsBackend::Local => Backend::Local(local::Local::new()),
            LimitsBackend::Redis { url } => {
                Backend::Redis(redis::RedisLimits::new(url, cfg, background).await?)
            }
        };
        let refusals = Family::<RefusalLabels, Counter>::default();
        let redis_errors = Family::<RedisErrorLabels, Counter>::default();
        if let Some(m) = metrics {
            m.register_with(|r| {
                r.register(
                    "rate_limited",
                    "Requests refused with 429 by a limit, by scope (key, account) and limit",
                    refusals.clone(),
                );
                r.register(
                    "limits_redis_errors",
                    "Admissions Redis could not check, by outcome (admitted: fail open; refused: fail closed)",
                    redis_errors.clone(),
                );
            });
        }
        Ok(Self {
            backend,
            fail: cfg.on_redis_error,
            guard: guard::Guard::new(guard_cfg.clone(), metrics),
            background: background.clone(),
            refusals,
            redis_errors,
        })
    }

    /// Before admission: tell the guard of the request; if the key's usage is abnormal, act
    /// (recorded in the database, this gateway's key cache dropped) and refuse a suspended key.
    /// `blocks`: the key's blocked prompts in the moderation window.
    pub async fn guard(
        &self,
        db: &crate::store::Db,
        auth: &crate::auth::Authenticator,
        key_id: &str,
        blocks: u64,
    ) -> Result<(), crate::auth::AuthError> {
        let Some(trip) = self.guard.observe(key_id, blocks, now_ms()) else {
            return Ok(());
        };
        let s = self.guard.act(db, key_id, &trip).await?;
        auth.invalidate_all().await;
        if s.action == "suspend" {
            return Err(crate::auth::AuthError::KeySuspended { reason: s.reason });
        }
        Ok(())
    }

    /// Admit a request, or say which limit refuses it (then nothing is consumed in any scope).
    /// `None`: neither the key nor its account has limits (and the guard is off).
    pub async fn admit(
        &self,
        billing: &Billing,
        ask: Ask<'_>,
    ) -> Result<Option<Admitted>, LimitError> {
        let result = self.admit_inner(billing, &ask).await;
        if let Err(LimitError::Exceeded(e)) = &result {
            self.refusals
                .get_or_create(&RefusalLabels {
                    scope: match e.scope() {
                        Scope::Key => "key",
                        Scope::Account => "account",
                    },
                    limit: e.limit_label(),
                })
                .inc();
        }
        result
    }

    async fn admit_inner(
        &self,
        billing: &Billing,
        ask: &Ask<'_>,
    ) -> Result<Option<Admitted>, LimitError> {
        let scopes: Vec<Scoped<'_>> = [
            (Scope::Key, ask.limits),
            (Scope::Account, ask.account_limits),
        ]
        .into_iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(scope, limits)| Scoped {
            scope,
            account_id: ask.account_id,
            key_id: ask.key_id,
            limits,
        })
        .collect();
        let watched = self
            .guard
            .config()
            .enabled
            .then(|| (self.guard.clone(), ask.key_id.to_string()));
        let admitted = |held| Admitted {
            held,
            guard: watched.clone(),
            background: self.background.clone(),
            tokens: ask.tokens,
            estimate: ask.estimate,
            day: now_ms().div_euclid(DAY_MS),
            used: None,
            dispatched: false,
        };
        if scopes.is_empty() {
            return Ok(watched.is_some().then(|| admitted(None)));
        }
        for sc in &scopes {
            if let Some(limit) = sc.limits.tokens_per_minute
                && ask.tokens > limit
            {
                return Err(Exceeded::TooManyTokens {
                    scope: sc.scope,
                    limit,
                    requested: ask.tokens,
                }
                .into());
            }
        }
        let now_ms = now_ms();
        let day = now_ms.div_euclid(DAY_MS);
        let held = match &self.backend {
            Backend::Local(l) => Held::Local(
                l.admit(billing, &scopes, ask.tokens, ask.estimate, now_ms)
                    .await?,
            ),
            Backend::Redis(r) => {
                let id = ulid::Ulid::new().to_string();
                match r
                    .admit(billing, &scopes, &id, ask.tokens, ask.estimate, now_ms)
                    .await
                {
                    Ok(admitted) => Held::Redis {
                        redis: r.clone(),
                        held: admitted?,
                        id,
                    },
                    Err(down) => {
                        let open = self.fail == FailMode::Open;
                        r.log_down(&down, open);
                        self.redis_errors
                            .get_or_create(&RedisErrorLabels {
                                outcome: if open { "admitted" } else { "refused" },
                            })
                            .inc();
                        return if open {
                            Ok(Some(admitted(None)))
                        } else {
                            Err(LimitError::Unavailable)
                        };
                    }
                }
            }
        };
        let mut a = admitted(Some(held));
        a.day = day;
        Ok(Some(a))
    }
}

enum Held {
    Local(Vec<local::Held>),
    Redis {
        redis: redis::RedisLimits,
        held: Vec<redis::Held>,
        id: String,
    },
}

/// An admitted request: holds its place among the concurrent ones and its estimate of the
/// day's spend, in each scope, until dropped. [`Admitted::finish`] records what it used.
pub struct Admitted {
    held: Option<Held>,
    /// The guard and the key, told how the request ended.
    guard: Option<(guard::Guard, String)>,
    background: crate::background::Background,
    tokens: u64,
    estimate: Credits,
    day: i64,
    /// Tokens and cost, once it succeeded.
    used: Option<(u64, Credits)>,
    /// Sent to a provider: a failure from here on is the provider's or a plugin's (the guard's
    /// error storm), not a refusal of the gateway's own.
    dispatched: bool,
}

impl Admitted {
    /// The request goes to its provider now.
    pub fn dispatched(mut self) -> Self {
        self.dispatched = true;
        self
    }

    /// The request succeeded: it used `tokens` and cost `cost`.
    pub fn finish(mut self, tokens: u64, cost: Credits) {
        self.used = Some((tokens, cost));
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((guard, key_id)) = &self.guard {
            guard.ended(key_id, self.dispatched && self.used.is_none());
        }
        match self.held.take() {
            Some(Held::Local(held)) => {
                local::release(&held, self.day, self.tokens, self.used, self.estimate);
            }
            Some(Held::Redis { redis, held, id }) => {
                let (used, cost) = self.used.unwrap_or((0, Credits(0)));
                let unused = self.tokens.saturating_sub(used);
                let delta = cost.0.saturating_sub(self.estimate.0);
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    self.background
                        .spawn_on(&handle, redis.release(held, id, unused, delta));
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_the_bad_field() {
        let zero = Limits {
            requests_per_minute: Some(0),
            ..Limits::default()
        };
        assert!(zero.validate().unwrap_err().contains("requests_per_minute"));
        let money = Limits {
            spend_per_day_usd: Some("five".into()),
            ..Limits::default()
        };
        assert!(money.validate().unwrap_err().contains("spend_per_day_usd"));
        assert!(Limits::default().validate().is_ok());
    }

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(reset(Duration::from_millis(250)), "250ms");
        assert_eq!(reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset(Duration::from_secs(20)), "20s");
        assert_eq!(reset(Duration::from_secs(360)), "6m0s");
    }
}
