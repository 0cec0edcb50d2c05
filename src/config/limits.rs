//! `limits:` (where the per-key and per-account counters live: this process or Redis, and what
//! happens when Redis is down) and `guard:` (the abnormal-usage guard's signals and action).

use std::time::Duration;

use serde::Deserialize;

use super::parse_duration;

/// The typed `limits` section.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub backend: LimitsBackend,
    /// Redis is down or slow: admit (`Open`) or answer 503 (`Closed`).
    pub on_redis_error: FailMode,
    /// Every Redis key starts with this (several gateways on one Redis share it; tests use
    /// a prefix each).
    pub key_prefix: String,
    /// The longest a Redis command may take before it counts as Redis being down.
    pub redis_timeout: Duration,
    /// A request counted in flight on Redis is forgotten after this even if its gateway died
    /// before giving its place back.
    pub in_flight_lease: Duration,
}

#[derive(Clone)]
pub enum LimitsBackend {
    /// Counters in this process (one gateway, or limits per gateway).
    Local,
    /// Counters in Redis, shared by every gateway on it.
    Redis { url: String },
}

impl std::fmt::Debug for LimitsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("Local"),
            Self::Redis { url } => f
                .debug_struct("Redis")
                .field("url", &super::masked_db_url(url))
                .finish(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardAction {
    /// 403 `key_suspended` until lifted (or until `duration`).
    Suspend,
    /// A tighter requests-per-minute limit until lifted (or until `duration`).
    Throttle,
}

/// The typed `guard` section: when a key's usage is abnormal, and what is done then.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub enabled: bool,
    pub action: GuardAction,
    /// How long an action lasts; `None`: until an operator lifts it.
    pub duration: Option<Duration>,
    /// Requests per minute of a throttled key.
    pub throttle_requests_per_minute: u32,
    /// A minute's requests above `rate_factor` × the key's baseline (an EWMA of its earlier
    /// minutes) are a rate jump, once they are at least `rate_min_requests`.
    pub rate_factor: f64,
    pub rate_min_requests: u64,
    /// Minutes the baseline remembers (EWMA weight 2/(n+1) per minute).
    pub rate_baseline_minutes: u32,
    /// The baseline of a key before its first full minute on this gateway; `None`: such a key
    /// is not judged on its rate until it has one (a load test's first minutes are no jump).
    pub rate_initial_baseline: Option<f64>,
    /// Blocked prompts of a key within the moderation window (10 min) that trigger the guard; 0: off.
    pub blocked_prompts: u64,
    /// Requests of a key that failed at their provider (upstream or plugin) within 10 minutes
    /// that are an error storm, once they are at least `error_ratio` of its requests; 0: off.
    pub error_failures: u64,
    pub error_ratio: f64,
}

impl GuardConfig {
    /// The guard off (tests, tools): its defaults, not enabled.
    pub fn disabled() -> Self {
        let mut problems = Vec::new();
        let mut g = RawGuard::default().validate(&mut problems);
        g.enabled = false;
        g
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default = "default_backend")]
    backend: String,
    #[serde(default = "default_redis_url")]
    redis_url: String,
    #[serde(default = "default_fail")]
    on_redis_error: FailMode,
    #[serde(default = "default_prefix")]
    key_prefix: String,
    #[serde(default = "default_redis_timeout")]
    redis_timeout: String,
    #[serde(default = "default_lease")]
    in_flight_lease: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            redis_url: default_redis_url(),
            on_redis_error: default_fail(),
            key_prefix: default_prefix(),
            redis_timeout: default_redis_timeout(),
            in_flight_lease: default_lease(),
        }
    }
}

fn default_backend() -> String {
    "local".into()
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}
fn default_fail() -> FailMode {
    FailMode::Open
}
fn default_prefix() -> String {
    "tollgate:".into()
}
fn default_redis_timeout() -> String {
    "250ms".into()
}
fn default_lease() -> String {
    "15m".into()
}

fn positive(key: &str, v: &str, problems: &mut Vec<String>) -> Duration {
    match parse_duration(v) {
        Some(d) if !d.is_zero() => d,
        _ => {
            problems.push(format!(
                "{key}: `{v}` is not a positive duration like 250ms, 5s or 2m"
            ));
            Duration::from_secs(1)
        }
    }
}

impl RawLimits {
    pub(super) fn validate(self, problems: &mut Vec<String>) -> LimitsConfig {
        let backend = match self.backend.as_str() {
            "local" => LimitsBackend::Local,
            "redis" => {
                if !(self.redis_url.starts_with("redis://")
                    || self.redis_url.starts_with("rediss://"))
                {
                    problems.push(format!(
                        "limits.redis_url: `{}` must start with redis:// or rediss://",
                        super::masked_db_url(&self.redis_url)
                    ));
                }
                LimitsBackend::Redis {
                    url: self.redis_url,
                }
            }
            other => {
                problems.push(format!("limits.backend: `{other}` is not local or redis"));
                LimitsBackend::Local
            }
        };
        LimitsConfig {
            backend,
            on_redis_error: self.on_redis_error,
            key_prefix: self.key_prefix,
            redis_timeout: positive("limits.redis_timeout", &self.redis_timeout, problems),
            in_flight_lease: positive("limits.in_flight_lease", &self.in_flight_lease, problems),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGuard {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_action")]
    action: GuardAction,
    /// `until_lifted` or a duration.
    #[serde(default = "default_duration")]
    duration: String,
    #[serde(default = "default_throttle")]
    throttle_requests_per_minute: u32,
    #[serde(default = "default_factor")]
    rate_factor: f64,
    #[serde(default = "default_rate_min")]
    rate_min_requests: u64,
    #[serde(default = "default_baseline")]
    rate_baseline_minutes: u32,
    #[serde(default)]
    rate_initial_baseline: Option<f64>,
    #[serde(default = "default_blocked")]
    blocked_prompts: u64,
    #[serde(default = "default_failures")]
    error_failures: u64,
    #[serde(default = "default_ratio")]
    error_ratio: f64,
}

impl Default for RawGuard {
    fn default() -> Self {
        Self {
            enabled: default_true(),
            action: default_action(),
            duration: default_duration(),
            throttle_requests_per_minute: default_throttle(),
            rate_factor: default_factor(),
            rate_min_requests: default_rate_min(),
            rate_baseline_minutes: default_baseline(),
            rate_initial_baseline: None,
            blocked_prompts: default_blocked(),
            error_failures: default_failures(),
            error_ratio: default_ratio(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_action() -> GuardAction {
    GuardAction::Suspend
}
fn default_duration() -> String {
    "until_lifted".into()
}
fn default_throttle() -> u32 {
    6
}
fn default_factor() -> f64 {
    10.0
}
fn default_rate_min() -> u64 {
    300
}
fn default_baseline() -> u32 {
    30
}
fn default_blocked() -> u64 {
    20
}
fn default_failures() -> u64 {
    100
}
fn default_ratio() -> f64 {
    0.5
}

impl RawGuard {
    pub(super) fn validate(self, problems: &mut Vec<String>) -> GuardConfig {
        let duration = match self.duration.trim() {
            "until_lifted" => None,
            d => Some(positive("guard.duration", d, problems)),
        };
        if !(self.rate_factor > 1.0 && self.rate_factor.is_finite()) {
            problems.push("guard.rate_factor: must be a number above 1".into());
        }
        if !(0.0..=1.0).contains(&self.error_ratio) {
            problems.push("guard.error_ratio: must be between 0 and 1".into());
        }
        if self.throttle_requests_per_minute == 0 {
            problems.push("guard.throttle_requests_per_minute: must be at least 1".into());
        }
        if self
            .rate_initial_baseline
            .is_some_and(|b| !(b >= 0.0 && b.is_finite()))
        {
            problems.push("guard.rate_initial_baseline: must be a number of at least 0".into());
        }
        if self.rate_baseline_minutes == 0 {
            problems.push("guard.rate_baseline_minutes: must be at least 1".into());
        }
        GuardConfig {
            enabled: self.enabled,
            action: self.action,
            duration,
            throttle_requests_per_minute: self.throttle_requests_per_minute.max(1),
            rate_factor: self.rate_factor,
            rate_min_requests: self.rate_min_requests,
            rate_baseline_minutes: self.rate_baseline_minutes.max(1),
            rate_initial_baseline: self.rate_initial_baseline,
            blocked_prompts: self.blocked_prompts,
            error_failures: self.error_failures,
            error_ratio: self.error_ratio,
        }
    }
}
