//! Channel health: a circuit breaker per channel, and the order in which a model's channels are
//! tried.
//!
//! A channel is `closed` (healthy) until `routing.breaker_failures` failures in a row (upstream
//! 5xx, timeouts, connection failures, rate limits) open it for `routing.breaker_cooldown`; then
//! one request is let through as a probe (`half_open`): its success closes the breaker, its
//! failure opens it again. An upstream that refuses the channel's credential (401/403) disables
//! the channel for `routing.auth_cooldown` and is logged as an error for the operator (who can
//! reset it at once: `POST /admin/channels/{name}/reset`); after the cooldown it is probed like
//! an open one. A channel that is not available is tried only when every other channel of the
//! model is unavailable too, last: a model with one channel is never refused by its breaker.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// What the breaker knows of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// Failing: not tried (unless nothing else is) until the instant, then probed.
    Open,
    /// One probe is in flight.
    HalfOpen,
    /// The upstream refused the credential.
    Disabled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::Disabled => "disabled",
        }
    }

    /// The gauge's value: 0 closed, 1 half-open, 2 open, 3 disabled.
    fn level(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
            Self::Disabled => 3,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Breaker {
    state: State,
    failures: u32,
    until: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: State::Closed,
            failures: 0,
            until: None,
        }
    }
}

/// How a channel's attempt ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The upstream failed or was unreachable: counts towards opening.
    Failure,
    /// The upstream refused the channel's credential.
    AuthRefused,
}

/// Settings of the breakers (`routing.*`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub failures: u32,
    pub cooldown: Duration,
    pub auth_cooldown: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            failures: 5,
            cooldown: Duration::from_secs(30),
            auth_cooldown: Duration::from_secs(300),
        }
    }
}

/// The breakers of every channel, shared by all requests (and kept across config reloads).
pub struct Health {
    settings: Settings,
    breakers: Mutex<HashMap<String, Breaker>>,
    metrics: Option<std::sync::Arc<Metrics>>,
}

impl Health {
    pub fn new(settings: Settings, metrics: Option<std::sync::Arc<Metrics>>) -> Self {
        Self {
            settings,
            breakers: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Breaker>> {
        self.breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a request may go to the channel now; a breaker whose cooldown is over lets this
    /// one request through as its probe.
    pub fn available(&self, channel: &str) -> bool {
        let mut m = self.lock();
        let Some(b) = m.get_mut(channel) else {
            return true;
        };
        match b.state {
            State::Closed => true,
            State::HalfOpen => false,
            State::Open | State::Disabled => {
                if b.until.is_some_and(|u| Instant::now() >= u) {
                    b.state = State::HalfOpen;
                    let level = b.state;
                    drop(m);
                    self.gauge(channel, level);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Record how an attempt on the channel ended.
    pub fn record(&self, channel: &str, outcome: Outcome) {
        let s = self.settings;
        let mut m = self.lock();
        let b = m.entry(channel.to_string()).or_default();
        let before = b.state;
        match outcome {
            Outcome::Success => *b = Breaker::default(),
            Outcome::Failure => {
                b.failures = b.failures.saturating_add(1);
                if b.state == State::HalfOpen || b.failures >= s.failures {
                    b.state = State::Open;
                    b.until = Some(Instant::now() + s.cooldown);
                }
            }
            Outcome::AuthRefused => {
                b.state = State::Disabled;
                b.until = Some(Instant::now() + s.auth_cooldown);
            }
        }
        let after = b.state;
        drop(m);
        if before != after {
            self.gauge(channel, after);
            match after {
                State::Open => tracing::warn!(
                    channel,
                    "channel breaker opened: its upstream keeps failing; other channels serve its models"
                ),
                State::Disabled => tracing::error!(
                    channel,
                    "channel disabled: the upstream refused its credential; fix the key, then POST /admin/channels/{{name}}/reset"
                ),
                State::Closed => tracing::info!(channel, "channel healthy again"),
                State::HalfOpen => {}
            }
            if let Some(m) = &self.metrics {
                m.channel_transition(channel, after.as_str());
            }
        }
    }

    /// Close a channel's breaker (the operator fixed it).
    pub fn reset(&self, channel: &str) {
        self.lock().remove(channel);
        self.gauge(channel, State::Closed);
    }

    /// Every channel the breakers know, with its state.
    pub fn states(&self) -> Vec<(String, State, u32)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, b)| (k.clone(), b.state, b.failures))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn gauge(&self, channel: &str, state: State) {
        if let Some(m) = &self.metrics {
            m.channel_state(channel, state.level());
        }
    }
}

/// A model's channels in the order to try them: by priority (lower first); within a priority,
/// the available ones before the others, each group shuffled by weight.
pub fn order<T>(members: Vec<(T, u32, u32, bool)>, mut rand: impl FnMut(u64) -> u64) -> Vec<T> {
    let mut groups: std::collections::BTreeMap<(u32, bool), Vec<(T, u32)>> = Default::default();
    for (item, weight, priority, available) in members {
        groups
            .entry((priority, !available))
            .or_default()
            .push((item, weight.max(1)));
    }
    // Available channels of every priority first, then the unavailable ones as a last resort.
    let mut keys: Vec<(u32, bool)> = groups.keys().copied().collect();
    keys.sort_by_key(|(p, unavailable)| (*unavailable, *p));
    let mut out = Vec::new();
    for k in keys {
        let Some(mut g) = groups.remove(&k) else {
            continue;
        };
        // Weighted order without replacement.
        while !g.is_empty() {
            let total: u64 = g.iter().map(|(_, w)| u64::from(*w)).sum();
            let mut r = rand(total.max(1));
            let mut idx = 0;
            for (i, (_, w)) in g.iter().enumerate() {
                if r < u64::from(*w) {
                    idx = i;
                    break;
                }
                r -= u64::from(*w);
            }
            out.push(g.remove(idx).0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_open_the_breaker_and_a_probe_closes_it() {
        let h = Health::new(
            Settings {
                failures: 2,
                cooldown: Duration::from_millis(0),
                auth_cooldown: Duration::from_secs(60),
            },
            None,
        );
        assert!(h.available("a"));
        h.record("a", Outcome::Failure);
        assert!(h.available("a"));
        h.record("a", Outcome::Failure);
        // Open, cooldown over at once: one probe goes through, the next waits for it.
        assert!(h.available("a"));
        assert!(!h.available("a"));
        h.record("a", Outcome::Success);
        assert!(h.available("a"));
        h.record("a", Outcome::AuthRefused);
        assert!(!h.available("a"));
        h.reset("a");
        assert!(h.available("a"));
    }

    #[test]
    fn order_puts_priority_and_availability_first_and_follows_weights() {
        let mut n = 0u64;
        let rand = |total: u64| {
            n += 1;
            n % total
        };
        let o = order(
            vec![("b", 1, 1, true), ("down", 5, 0, false), ("a", 1, 0, true)],
            rand,
        );
        assert_eq!(o, vec!["a", "b", "down"]);
        // Weights: over many draws the heavier channel comes first about 3 times in 4.
        let mut first_heavy = 0;
        let mut seed = 7u64;
        for _ in 0..4000 {
            let rand = |total: u64| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) % total
            };
            if order(vec![("heavy", 3, 0, true), ("light", 1, 0, true)], rand)[0] == "heavy" {
                first_heavy += 1;
            }
        }
        assert!((2700..3300).contains(&first_heavy), "{first_heavy}");
    }
}
