//! Throttling: the limits a key carries, checked at admission in this process.
//!
//! A key may carry `requests_per_minute`, `tokens_per_minute`, `concurrent_requests` and
//! `spend_per_day_usd`. The two rates are GCRA (the generic cell rate algorithm): a key may use a
//! minute's allowance at once, then one unit per `60 s / limit`. Tokens are counted as the
//! request's estimate (prompt + maximum output) at admission, corrected to the actual usage when
//! the request succeeds and given back when it fails. The spend of a UTC day counts the estimates
//! of requests in flight and the day's charges, read from the ledger when the key is first seen
//! that day. A request refused here has consumed nothing.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::billing::{Billing, BillingError, Credits};
use crate::store::now_ms;

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
}

/// A limit that refuses this request now.
#[derive(Debug, thiserror::Error)]
pub enum Exceeded {
    #[error(
        "Rate limit reached for requests: this key allows {limit} per minute. Retry in {}.",
        reset(*retry_after)
    )]
    Requests { limit: u32, retry_after: Duration },
    #[error(
        "Rate limit reached for tokens: this key allows {limit} per minute and this request needs {requested} (prompt and maximum output). Retry in {}.",
        reset(*retry_after)
    )]
    Tokens {
        limit: u64,
        requested: u64,
        retry_after: Duration,
    },
    #[error(
        "Request too large for this key's token limit: it needs {requested} tokens (prompt and maximum output) and the key allows {limit} per minute. Lower max_tokens or shorten the prompt."
    )]
    TooManyTokens { limit: u64, requested: u64 },
    #[error(
        "Too many concurrent requests: this key allows {limit} at a time. Retry when one finishes."
    )]
    Concurrency { limit: u32 },
    #[error(
        "Daily spend limit reached: this key may spend {limit} USD per UTC day. Retry in {}.",
        reset(*retry_after)
    )]
    Spend {
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

    /// OpenAI's `x-ratelimit-*` headers for the limit that refused.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Requests { limit, retry_after } => vec![
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

#[derive(Default)]
struct KeyState {
    /// GCRA: the theoretical arrival time of the next request, and of the next token.
    requests_tat: Option<Instant>,
    tokens_tat: Option<Instant>,
    in_flight: u32,
    /// The UTC day `spent` counts (days since the epoch), if read.
    day: Option<i64>,
    spent: i64,
    /// Estimates of requests in flight.
    pending: i64,
}

fn lock(m: &Mutex<KeyState>) -> MutexGuard<'_, KeyState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The time one unit takes at `limit` per [`WINDOW`].
fn per_unit(limit: u64) -> Duration {
    WINDOW / u32::try_from(limit).unwrap_or(u32::MAX)
}

fn units(limit: u64, n: u64) -> Duration {
    per_unit(limit).saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

/// GCRA: take `cost` units at `limit` per window; the new arrival time, or how long to wait.
fn gcra(tat: Option<Instant>, now: Instant, cost: u64, limit: u64) -> Result<Instant, Duration> {
    let start = tat.map_or(now, |t| t.max(now));
    let next = start + units(limit, cost);
    let ahead = next - now;
    if ahead > WINDOW {
        Err(ahead - WINDOW)
    } else {
        Ok(next)
    }
}

/// Per-key state of this process. Keys idle for ten minutes are forgotten (their rates have
/// recovered by then; their day's spend is read again).
#[derive(Clone)]
pub struct Limiter {
    keys: moka::sync::Cache<String, Arc<Mutex<KeyState>>>,
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
    /// Prompt and maximum output.
    pub tokens: u64,
    /// The estimated cost, as reserved.
    pub estimate: Credits,
}

impl Limiter {
    pub fn new() -> Self {
        Self {
            keys: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Admit a request, or say which limit refuses it (then nothing is consumed). `None`: the
    /// key has no limits.
    pub async fn admit(
        &self,
        billing: &Billing,
        ask: Ask<'_>,
    ) -> Result<Option<Admitted>, LimitError> {
        let limits = ask.limits;
        if limits.is_empty() {
            return Ok(None);
        }
        let state = self.keys.get_with(ask.key_id.to_string(), Default::default);
        let cap = limits.spend_per_day();
        let now_ms = now_ms();
        let today = now_ms.div_euclid(DAY_MS);
        if cap.is_some() && lock(&state).day != Some(today) {
            let spent = billing
                .spent_by_key_since(ask.account_id, ask.key_id, today * DAY_MS)
                .await?;
            let mut s = lock(&state);
            if s.day != Some(today) {
                s.day = Some(today);
                s.spent = spent.0;
            }
        }
        let now = Instant::now();
        let mut s = lock(&state);
        if let Some(limit) = limits.concurrent_requests
            && s.in_flight >= limit
        {
            return Err(Exceeded::Concurrency { limit }.into());
        }
        let requests_tat = match limits.requests_per_minute {
            Some(limit) => Some(
                gcra(s.requests_tat, now, 1, u64::from(limit))
                    .map_err(|retry_after| Exceeded::Requests { limit, retry_after })?,
            ),
            None => None,
        };
        let tokens_tat = match limits.tokens_per_minute {
            Some(limit) if ask.tokens > limit => {
                return Err(Exceeded::TooManyTokens {
                    limit,
                    requested: ask.tokens,
                }
                .into());
            }
            Some(limit) => Some(gcra(s.tokens_tat, now, ask.tokens, limit).map_err(
                |retry_after| Exceeded::Tokens {
                    limit,
                    requested: ask.tokens,
                    retry_after,
                },
            )?),
            None => None,
        };
        if let Some(limit) = cap
            && s.spent
                .saturating_add(s.pending)
                .saturating_add(ask.estimate.0)
                > limit.0
        {
            let midnight = (today + 1) * DAY_MS;
            let wait = u64::try_from(midnight - now_ms).unwrap_or(0);
            return Err(Exceeded::Spend {
                limit,
                retry_after: Duration::from_millis(wait),
            }
            .into());
        }
        // Every limit agrees: take from each.
        if requests_tat.is_some() {
            s.requests_tat = requests_tat;
        }
        if tokens_tat.is_some() {
            s.tokens_tat = tokens_tat;
        }
        s.in_flight = s.in_flight.saturating_add(1);
        s.pending = s.pending.saturating_add(ask.estimate.0);
        drop(s);
        Ok(Some(Admitted {
            state,
            tokens: ask.tokens,
            tokens_limit: limits.tokens_per_minute,
            estimate: ask.estimate,
            day: today,
            used: None,
        }))
    }
}

/// An admitted request: holds its place among the concurrent ones and its estimate of the
/// day's spend until dropped. [`Admitted::finish`] records what it used.
pub struct Admitted {
    state: Arc<Mutex<KeyState>>,
    tokens: u64,
    tokens_limit: Option<u64>,
    estimate: Credits,
    day: i64,
    /// Tokens and cost, once it succeeded.
    used: Option<(u64, Credits)>,
}

impl Admitted {
    /// The request succeeded: it used `tokens` and cost `cost`.
    pub fn finish(mut self, tokens: u64, cost: Credits) {
        self.used = Some((tokens, cost));
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.pending = s.pending.saturating_sub(self.estimate.0).max(0);
        let (used, cost) = self.used.unwrap_or((0, Credits(0)));
        if s.day == Some(self.day) {
            s.spent = s.spent.saturating_add(cost.0);
        }
        // Tokens estimated and not used are given back (all of them if the request failed).
        if let (Some(limit), Some(tat)) = (self.tokens_limit, s.tokens_tat) {
            let back = units(limit, self.tokens.saturating_sub(used));
            s.tokens_tat = Some(tat.checked_sub(back).unwrap_or(tat));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_a_minute_at_once_then_one_per_interval() {
        let now = Instant::now();
        let mut tat = None;
        for _ in 0..3 {
            tat = Some(gcra(tat, now, 1, 3).unwrap_or(now));
        }
        let wait = gcra(tat, now, 1, 3).err();
        assert_eq!(wait, Some(Duration::from_secs(20)));
        assert!(gcra(tat, now + Duration::from_secs(20), 1, 3).is_ok());
    }

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
