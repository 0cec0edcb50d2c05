//! The abnormal-usage guard: watches each key's requests, blocked prompts and failures, and
//! throttles or suspends a key whose usage turns abnormal, with the reason recorded.
//!
//! Signals, per key, in this process (each gateway sees its own share of a key's traffic):
//! - `rate_jump`: this minute's requests pass `rate_factor` × the key's baseline (an EWMA of
//!   its earlier minutes) and at least `rate_min_requests`; a key's first, partial minute on
//!   a gateway is not part of its baseline, and until it has one it starts from
//!   `rate_initial_baseline` (unset: it is not judged on its rate yet);
//! - `blocked_prompts`: the moderation record counts `blocked_prompts` blocks of the key in its
//!   sliding window ([`crate::moderation::Record::blocks_for_key`]);
//! - `error_storm`: `error_failures` requests that failed after they were sent to a provider
//!   (upstream or plugin failures; never the gateway's own refusals: limits, balance, blocks) in
//!   the last ten minutes, at least `error_ratio` of the key's requests.
//!
//! Signals are read at admission; an action is a row of `key_suspensions` (so it holds on
//! every gateway of the database, read with the key, cached for `auth.cache_ttl`) and resets
//! this process's counters of the key, so that only new abuse trips it again after a lift.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

use crate::config::{GuardAction, GuardConfig};
use crate::store::{Db, StoreError, now_ms};

/// An action in force on a key, as auth reads it.
#[derive(Debug, Clone)]
pub struct Action {
    /// `None`: suspended; `Some(rpm)`: throttled to `rpm` requests per minute.
    pub throttle: Option<u32>,
    pub reason: String,
    pub until: Option<i64>,
}

impl Action {
    pub fn in_force(&self, now_ms: i64) -> bool {
        self.until.is_none_or(|u| u > now_ms)
    }
}

/// A row of `key_suspensions`, as the admin API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Suspension {
    pub id: String,
    pub key_id: String,
    /// `suspend` or `throttle:<rpm>`.
    pub action: String,
    pub reason: String,
    pub detail: String,
    pub since: i64,
    pub until: Option<i64>,
    pub lifted_at: Option<i64>,
    pub lifted_by: Option<String>,
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

fn suspension(r: Row) -> Suspension {
    Suspension {
        id: r.0,
        key_id: r.1,
        action: r.2,
        reason: r.3,
        detail: r.4,
        since: r.5,
        until: r.6,
        lifted_at: r.7,
        lifted_by: r.8,
    }
}

const COLUMNS: &str = "id, key_id, action, reason, detail, since, until, lifted_at, lifted_by";

/// The latest action in force on a key (not lifted, not past its end).
pub async fn active_action(db: &Db, key_id: &str) -> Result<Option<Action>, StoreError> {
    let now = now_ms();
    let row: Option<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT action, reason, until FROM key_suspensions \
         WHERE key_id = $1 AND lifted_at IS NULL AND (until IS NULL OR until > $2) \
         ORDER BY since DESC LIMIT 1",
    )
    .bind(key_id)
    .bind(now)
    .fetch_optional(&db.pool)
    .await
    .map_err(StoreError::Sql)?;
    Ok(row.map(|(action, reason, until)| Action {
        throttle: action
            .strip_prefix("throttle:")
            .and_then(|n| n.parse().ok()),
        reason,
        until,
    }))
}

/// Every action ever taken on a key, newest first.
pub async fn history(db: &Db, key_id: &str) -> Result<Vec<Suspension>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM key_suspensions WHERE key_id = $1 ORDER BY since DESC"
    ))
    .bind(key_id)
    .fetch_all(&db.pool)
    .await
    .map_err(StoreError::Sql)?;
    Ok(rows.into_iter().map(suspension).collect())
}

/// Record an action on a key.
pub async fn record(
    db: &Db,
    key_id: &str,
    action: &str,
    reason: &str,
    detail: &str,
    duration: Option<Duration>,
) -> Result<Suspension, StoreError> {
    let id = format!("susp_{}", ulid::Ulid::new());
    let since = now_ms();
    let until =
        duration.map(|d| since.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    sqlx::query(
        "INSERT INTO key_suspensions (id, key_id, action, reason, detail, since, until) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(key_id)
    .bind(action)
    .bind(reason)
    .bind(detail)
    .bind(since)
    .bind(until)
    .execute(&db.pool)
    .await
    .map_err(StoreError::Sql)?;
    Ok(Suspension {
        id,
        key_id: key_id.to_string(),
        action: action.to_string(),
        reason: reason.to_string(),
        detail: detail.to_string(),
        since,
        until,
        lifted_at: None,
        lifted_by: None,
    })
}

/// Lift every action in force on a key; how many were lifted.
pub async fn lift(db: &Db, key_id: &str, by: &str) -> Result<u64, StoreError> {
    let now = now_ms();
    let n = sqlx::query(
        "UPDATE key_suspensions SET lifted_at = $1, lifted_by = $2 \
         WHERE key_id = $3 AND lifted_at IS NULL AND (until IS NULL OR until > $1)",
    )
    .bind(now)
    .bind(by)
    .bind(key_id)
    .execute(&db.pool)
    .await
    .map_err(StoreError::Sql)?
    .rows_affected();
    Ok(n)
}

/// Keys with a suspension (not a throttle) in force.
pub async fn suspended_keys(db: &Db) -> Result<i64, StoreError> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT CAST(COUNT(DISTINCT key_id) AS BIGINT) FROM key_suspensions \
         WHERE action = 'suspend' AND lifted_at IS NULL AND (until IS NULL OR until > $1)",
    )
    .bind(now_ms())
    .fetch_one(&db.pool)
    .await
    .map_err(StoreError::Sql)?;
    Ok(n)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
    reason: &'static str,
}

/// Buckets of the failure window (one a minute, like the moderation record's).
const BUCKETS: usize = 10;

/// Counts per minute for the last [`BUCKETS`] minutes.
#[derive(Default, Clone, Copy)]
struct Window {
    buckets: [(i64, u64); BUCKETS],
}

impl Window {
    fn add(&mut self, minute: i64) {
        let slot = &mut self.buckets[minute.rem_euclid(BUCKETS as i64) as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 += 1;
    }

    fn count(&self, minute: i64) -> u64 {
        self.buckets
            .iter()
            .filter(|(m, _)| minute - m < BUCKETS as i64 && *m <= minute)
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Default)]
struct Usage {
    /// The current minute and its requests so far.
    minute: i64,
    this_minute: u64,
    /// EWMA of requests per minute over the earlier minutes; `None` before the first full one.
    baseline: Option<f64>,
    /// The minute the key was first seen (partial: not folded into the baseline).
    first_minute: i64,
    requests: Window,
    failures: Window,
    /// Blocks the moderation record counted when the guard last acted (they do not count again).
    blocks_seen: u64,
}

fn lock(m: &Mutex<Usage>) -> MutexGuard<'_, Usage> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why the guard acts.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    pub reason: &'static str,
    pub detail: String,
}

/// The guard of this process.
#[derive(Clone)]
pub struct Guard {
    cfg: Arc<GuardConfig>,
    keys: moka::sync::Cache<String, Arc<Mutex<Usage>>>,
    actions: Family<ActionLabels, Counter>,
    suspended: Gauge,
}

impl Guard {
    pub fn new(cfg: GuardConfig, metrics: Option<&crate::metrics::Metrics>) -> Self {
        let actions = Family::<ActionLabels, Counter>::default();
        let suspended = Gauge::default();
        if let Some(m) = metrics {
            m.register_with(|r| {
                r.register(
                    "guard_actions",
                    "Keys throttled or suspended by the abnormal-usage guard, by action and reason",
                    actions.clone(),
                );
                r.register(
                    "suspended_keys",
                    "Keys with a suspension in force (read from the database after each action and lift)",
                    suspended.clone(),
                );
            });
        }
        Self {
            cfg: Arc::new(cfg),
            keys: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            actions,
            suspended,
        }
    }

    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// A request of `key_id` is being admitted; `blocks`: the key's blocked prompts in the
    /// moderation window. `Some`: the guard acts on the key now.
    pub fn observe(&self, key_id: &str, blocks: u64, now_ms: i64) -> Option<Trip> {
        if !self.cfg.enabled {
            return None;
        }
        let state = self.keys.get_with(key_id.to_string(), Default::default);
        let mut u = lock(&state);
        let minute = now_ms.div_euclid(60_000);
        if u.minute == 0 {
            u.first_minute = minute;
        }
        if u.minute != minute {
            if u.minute != 0 && u.minute != u.first_minute {
                // Fold the finished minute, then every idle one, into the baseline.
                let alpha = 2.0 / (f64::from(self.cfg.rate_baseline_minutes) + 1.0);
                let idle = (minute - u.minute - 1).clamp(0, 10_000);
                let mut b = match u.baseline.or(self.cfg.rate_initial_baseline) {
                    Some(b) => alpha * u.this_minute as f64 + (1.0 - alpha) * b,
                    None => u.this_minute as f64,
                };
                b *= (1.0 - alpha).powi(i32::try_from(idle).unwrap_or(i32::MAX));
                u.baseline = Some(b);
            }
            u.minute = minute;
            u.this_minute = 0;
        }
        u.this_minute += 1;
        u.requests.add(minute);
        let cfg = &self.cfg;
        let baseline = u.baseline.or(cfg.rate_initial_baseline);
        let trip = if let Some(baseline) = baseline
            && u.this_minute >= cfg.rate_min_requests.max(1)
            && u.this_minute as f64 > cfg.rate_factor * baseline
        {
            Some(Trip {
                reason: "rate_jump",
                detail: format!(
                    "{} requests this minute against a baseline of {baseline:.1} per minute",
                    u.this_minute
                ),
            })
        } else {
            let new_blocks = blocks.saturating_sub(u.blocks_seen);
            let failures = u.failures.count(minute);
            let requests = u.requests.count(minute).max(1);
            if cfg.blocked_prompts > 0 && new_blocks >= cfg.blocked_prompts {
                Some(Trip {
                    reason: "blocked_prompts",
                    detail: format!("{new_blocks} blocked prompts in 10 minutes"),
                })
            } else if cfg.error_failures > 0
                && failures >= cfg.error_failures
                && failures as f64 >= cfg.error_ratio * requests as f64
            {
                Some(Trip {
                    reason: "error_storm",
                    detail: format!("{failures} failed requests of {requests} in 10 minutes"),
                })
            } else {
                None
            }
        };
        if trip.is_some() {
            // Start again: only new abuse trips the guard after this action is lifted.
            *u = Usage {
                minute,
                first_minute: u.first_minute,
                blocks_seen: blocks,
                baseline: u.baseline,
                ..Usage::default()
            };
        }
        trip
    }

    /// A request of `key_id` ended: `failed` if it failed after it was sent to a provider.
    pub fn ended(&self, key_id: &str, failed: bool) {
        if !failed || !self.cfg.enabled {
            return;
        }
        if let Some(state) = self.keys.get(key_id) {
            lock(&state).failures.add(now_ms().div_euclid(60_000));
        }
    }

    /// Act on a tripped key: record the action (the key is refused or throttled on every
    /// gateway within `auth.cache_ttl`), count it, log it.
    pub async fn act(&self, db: &Db, key_id: &str, trip: &Trip) -> Result<Suspension, StoreError> {
        let (action, label) = match self.cfg.action {
            GuardAction::Suspend => ("suspend".to_string(), "suspend"),
            GuardAction::Throttle => (
                format!("throttle:{}", self.cfg.throttle_requests_per_minute),
                "throttle",
            ),
        };
        let s = record(
            db,
            key_id,
            &action,
            trip.reason,
            &trip.detail,
            self.cfg.duration,
        )
        .await?;
        self.actions
            .get_or_create(&ActionLabels {
                action: label,
                reason: trip.reason,
            })
            .inc();
        tracing::warn!(key_id, action = %action, reason = trip.reason, detail = %trip.detail, "abnormal usage: the guard acted on a key");
        self.refresh_gauge(db).await;
        Ok(s)
    }

    /// Read the number of suspended keys into the gauge.
    pub async fn refresh_gauge(&self, db: &Db) {
        match suspended_keys(db).await {
            Ok(n) => {
                self.suspended.set(n);
            }
            Err(e) => tracing::warn!(error = %e, "counting suspended keys"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GuardConfig {
        GuardConfig {
            enabled: true,
            action: GuardAction::Suspend,
            duration: None,
            throttle_requests_per_minute: 6,
            rate_factor: 5.0,
            rate_min_requests: 20,
            rate_baseline_minutes: 5,
            rate_initial_baseline: None,
            blocked_prompts: 3,
            error_failures: 5,
            error_ratio: 0.5,
        }
    }

    #[test]
    fn a_rate_jump_over_the_baseline_trips_and_a_steady_rate_does_not() {
        let g = Guard::new(cfg(), None);
        let t0 = 1_000 * 60_000;
        // Ten minutes at 10 a minute: steady.
        for m in 0..10 {
            for _ in 0..10 {
                assert_eq!(g.observe("k", 0, t0 + m * 60_000), None);
            }
        }
        // Then 60 in one minute: 6 × the baseline.
        let mut tripped = None;
        for _ in 0..60 {
            if let Some(t) = g.observe("k", 0, t0 + 10 * 60_000) {
                tripped = Some(t);
                break;
            }
        }
        assert_eq!(tripped.map(|t| t.reason), Some("rate_jump"));
    }

    #[test]
    fn a_new_key_is_judged_on_its_rate_only_once_it_has_a_baseline() {
        let g = Guard::new(cfg(), None);
        let t0 = 2_000 * 60_000 + 59_000;
        // A partial first minute, then a full one at a high rate: no baseline to jump from.
        for _ in 0..5 {
            assert_eq!(g.observe("k", 0, t0), None);
        }
        for _ in 0..500 {
            assert_eq!(g.observe("k", 0, t0 + 1_000), None);
        }
        for _ in 0..500 {
            assert_eq!(g.observe("k", 0, t0 + 61_000), None);
        }
        let with_initial = Guard::new(
            GuardConfig {
                rate_initial_baseline: Some(1.0),
                ..cfg()
            },
            None,
        );
        let trips = (0..20)
            .filter_map(|_| with_initial.observe("k", 0, t0))
            .count();
        assert_eq!(trips, 1);
    }

    #[test]
    fn blocked_prompts_trip_once_and_count_again_only_when_new() {
        let g = Guard::new(cfg(), None);
        let now = 5_000 * 60_000;
        assert_eq!(g.observe("k", 2, now), None);
        assert_eq!(
            g.observe("k", 3, now).map(|t| t.reason),
            Some("blocked_prompts")
        );
        assert_eq!(g.observe("k", 3, now), None);
        assert_eq!(g.observe("k", 5, now), None);
        assert_eq!(
            g.observe("k", 6, now).map(|t| t.reason),
            Some("blocked_prompts")
        );
    }

    #[test]
    fn failures_make_an_error_storm() {
        let g = Guard::new(cfg(), None);
        let now = now_ms();
        for _ in 0..4 {
            assert_eq!(g.observe("k", 0, now), None);
            g.ended("k", true);
        }
        assert_eq!(g.observe("k", 0, now), None);
        g.ended("k", true);
        assert_eq!(
            g.observe("k", 0, now).map(|t| t.reason),
            Some("error_storm")
        );
    }
}
