//! The in-process backend: GCRA state, requests in flight and the day's spend, per key and per
//! account, in a moka cache. Scopes idle for ten minutes are forgotten (their rates have
//! recovered by then; their day's spend is read again).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{DAY_MS, Exceeded, LimitError, Scope, Scoped, WINDOW};
use crate::billing::{Billing, Credits};

#[derive(Default)]
pub(super) struct State {
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

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
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
pub(super) fn gcra(
    tat: Option<Instant>,
    now: Instant,
    cost: u64,
    limit: u64,
) -> Result<Instant, Duration> {
    let start = tat.map_or(now, |t| t.max(now));
    let next = start + units(limit, cost);
    let ahead = next - now;
    if ahead > WINDOW {
        Err(ahead - WINDOW)
    } else {
        Ok(next)
    }
}

#[derive(Clone)]
pub(super) struct Local {
    scopes: moka::sync::Cache<String, Arc<Mutex<State>>>,
}

/// One scope's place, given back on drop.
pub(super) struct Held {
    state: Arc<Mutex<State>>,
    tokens_limit: Option<u64>,
}

/// What one scope would take, once every scope agrees.
struct Plan {
    requests_tat: Option<Instant>,
    tokens_tat: Option<Instant>,
}

impl Local {
    pub(super) fn new() -> Self {
        Self {
            scopes: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    pub(super) async fn admit(
        &self,
        billing: &Billing,
        scopes: &[Scoped<'_>],
        tokens: u64,
        estimate: Credits,
        now_ms: i64,
    ) -> Result<Vec<Held>, LimitError> {
        let today = now_ms.div_euclid(DAY_MS);
        let mut states = Vec::with_capacity(scopes.len());
        for sc in scopes {
            let state = self.scopes.get_with(sc.cache_key(), Default::default);
            if sc.limits.spend_per_day().is_some() && lock(&state).day != Some(today) {
                let spent = sc.spent_since(billing, today * DAY_MS).await?;
                let mut s = lock(&state);
                if s.day != Some(today) {
                    s.day = Some(today);
                    s.spent = spent.0;
                }
            }
            states.push(state);
        }
        let now = Instant::now();
        // Locked in scope order (key, then account) by every request: no deadlock.
        let mut guards: Vec<MutexGuard<'_, State>> = states.iter().map(|s| lock(s)).collect();
        let mut plans = Vec::with_capacity(scopes.len());
        for (sc, s) in scopes.iter().zip(guards.iter()) {
            plans.push(check(sc, s, now, tokens, estimate, now_ms, today)?);
        }
        // Every limit of every scope agrees: take from each.
        for (s, plan) in guards.iter_mut().zip(plans) {
            if plan.requests_tat.is_some() {
                s.requests_tat = plan.requests_tat;
            }
            if plan.tokens_tat.is_some() {
                s.tokens_tat = plan.tokens_tat;
            }
            s.in_flight = s.in_flight.saturating_add(1);
            s.pending = s.pending.saturating_add(estimate.0);
        }
        drop(guards);
        Ok(states
            .into_iter()
            .zip(scopes)
            .map(|(state, sc)| Held {
                state,
                tokens_limit: sc.limits.tokens_per_minute,
            })
            .collect())
    }
}

fn check(
    sc: &Scoped<'_>,
    s: &State,
    now: Instant,
    tokens: u64,
    estimate: Credits,
    now_ms: i64,
    today: i64,
) -> Result<Plan, Exceeded> {
    let scope: Scope = sc.scope;
    let limits = sc.limits;
    if let Some(limit) = limits.concurrent_requests
        && s.in_flight >= limit
    {
        return Err(Exceeded::Concurrency { scope, limit });
    }
    let requests_tat = match limits.requests_per_minute {
        Some(limit) => Some(gcra(s.requests_tat, now, 1, u64::from(limit)).map_err(
            |retry_after| Exceeded::Requests {
                scope,
                limit,
                retry_after,
            },
        )?),
        None => None,
    };
    let tokens_tat = match limits.tokens_per_minute {
        Some(limit) => Some(
            gcra(s.tokens_tat, now, tokens, limit).map_err(|retry_after| Exceeded::Tokens {
                scope,
                limit,
                requested: tokens,
                retry_after,
            })?,
        ),
        None => None,
    };
    if let Some(limit) = limits.spend_per_day()
        && s.spent.saturating_add(s.pending).saturating_add(estimate.0) > limit.0
    {
        return Err(super::spend_exceeded(scope, limit, today, now_ms));
    }
    Ok(Plan {
        requests_tat,
        tokens_tat,
    })
}

/// Give the places back: one request fewer in flight, its estimate out of the day's pending
/// spend and its cost in, the tokens it did not use back.
pub(super) fn release(
    held: &[Held],
    day: i64,
    tokens: u64,
    used: Option<(u64, Credits)>,
    estimate: Credits,
) {
    let (used_tokens, cost) = used.unwrap_or((0, Credits(0)));
    for h in held {
        let mut s = lock(&h.state);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.pending = s.pending.saturating_sub(estimate.0).max(0);
        if s.day == Some(day) {
            s.spent = s.spent.saturating_add(cost.0);
        }
        if let (Some(limit), Some(tat)) = (h.tokens_limit, s.tokens_tat) {
            let back = units(limit, tokens.saturating_sub(used_tokens));
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
}
