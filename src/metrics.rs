//! Every Prometheus metric tollgate exports, defined once. Labels come from closed sets only
//! (configured model names, loaded plugin names, fixed outcome names), never from request text.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub model: String,
    pub provider: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    pub channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginCallLabels {
    pub plugin: String,
    pub call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginFailureLabels {
    pub plugin: String,
    pub call: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLoadLabels {
    pub plugin: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub category: String,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~100 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

/// The metrics of the request path. Other modules register their own families into the same
/// registry (`Metrics::registry_mut` at start-up).
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    upstream_duration: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    upstream_auth_failures: Family<ChannelLabels, Counter>,
    plugin_calls: Family<PluginCallLabels, Histogram, fn() -> Histogram>,
    plugin_failures: Family<PluginFailureLabels, Counter>,
    plugin_loads: Family<PluginLoadLabels, Counter>,
    config_reloads: Family<OutcomeLabels, Counter>,
    spend: Family<ModelLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    payment_required: Family<ModelLabels, Counter>,
    overrun: Family<ModelLabels, Counter>,
    overruns: Family<ModelLabels, Counter>,
    backlog_refusals: Family<ModelLabels, Counter>,
    open_reservations: prometheus_client::metrics::gauge::Gauge,
    verdicts: Family<VerdictLabels, Counter>,
    policy_reloads: Family<OutcomeLabels, Counter>,
    moderation_duration: Histogram,
    channel_states: Family<ChannelLabels, prometheus_client::metrics::gauge::Gauge>,
    channel_transitions: Family<ChannelStateLabels, Counter>,
    failovers: Family<ModelLabels, Counter>,
    registry: std::sync::RwLock<Registry>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelStateLabels {
    pub channel: String,
    pub state: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, model, provider and outcome",
            requests.clone(),
        );
        let request_duration: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers (streams: to the first byte)",
            request_duration.clone(),
        );
        let upstream_duration: Family<ProviderLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_duration_seconds",
            "Time from sending to the upstream until its response headers",
            upstream_duration.clone(),
        );
        let upstream_auth_failures = Family::<ChannelLabels, Counter>::default();
        registry.register(
            "upstream_auth_failures",
            "Upstream answers refusing the channel's credential (401, 403 or the plugin's `auth` class)",
            upstream_auth_failures.clone(),
        );
        let plugin_calls: Family<PluginCallLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "plugin_call_duration_seconds",
            "Duration of each plugin call",
            plugin_calls.clone(),
        );
        let plugin_failures = Family::<PluginFailureLabels, Counter>::default();
        registry.register(
            "plugin_failures",
            "Plugin calls that trapped, overran a limit or returned unusable output",
            plugin_failures.clone(),
        );
        let plugin_loads = Family::<PluginLoadLabels, Counter>::default();
        registry.register(
            "plugin_loads",
            "Plugin (re)loads by outcome: loaded, refused, removed",
            plugin_loads.clone(),
        );
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Reloads of channels and models from the config file, by outcome",
            config_reloads.clone(),
        );
        let spend = Family::<ModelLabels, Counter>::default();
        registry.register(
            "spend_picodollars",
            "Money charged, in pico-dollars (1e-12 USD), by model",
            spend.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "billed_tokens",
            "Tokens charged, by model and direction",
            tokens.clone(),
        );
        let payment_required = Family::<ModelLabels, Counter>::default();
        registry.register(
            "payment_required",
            "Requests refused with 402 because the balance could not cover the estimate",
            payment_required.clone(),
        );
        let overrun = Family::<ModelLabels, Counter>::default();
        registry.register(
            "billing_overrun_picodollars",
            "Money charged beyond what a request had reserved (its usage is charged in full), in pico-dollars, by model",
            overrun.clone(),
        );
        let overruns = Family::<ModelLabels, Counter>::default();
        registry.register(
            "billing_overruns",
            "Charges whose usage cost more than their reservation, by model",
            overruns.clone(),
        );
        let backlog_refusals = Family::<ModelLabels, Counter>::default();
        registry.register(
            "billing_backlog_refusals",
            "Requests refused with 503 because billing.max_pending_charges charges wait for the ledger",
            backlog_refusals.clone(),
        );
        let open_reservations = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "open_reservations",
            "Reservations held by requests in flight on this instance",
            open_reservations.clone(),
        );
        let verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "moderation_verdicts",
            "Policy hits by category and action (block, flag, shadow)",
            verdicts.clone(),
        );
        let policy_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Reloads of the policy folder by outcome: loaded, refused",
            policy_reloads.clone(),
        );
        let moderation_duration = Histogram::new(exponential_buckets(0.000_001, 2.0, 20));
        registry.register(
            "moderation_duration_seconds",
            "Time to extract, normalize and screen a request",
            moderation_duration.clone(),
        );
        let channel_states =
            Family::<ChannelLabels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "channel_state",
            "Each channel's breaker: 0 closed, 1 half-open (probing), 2 open, 3 disabled (credential refused)",
            channel_states.clone(),
        );
        let channel_transitions = Family::<ChannelStateLabels, Counter>::default();
        registry.register(
            "channel_transitions",
            "Channel breakers entering a state",
            channel_transitions.clone(),
        );
        let failovers = Family::<ModelLabels, Counter>::default();
        registry.register(
            "failovers",
            "Requests moved to another channel after a channel failed, by model",
            failovers.clone(),
        );
        Self {
            channel_states,
            channel_transitions,
            failovers,
            verdicts,
            policy_reloads,
            moderation_duration,
            spend,
            tokens,
            payment_required,
            overrun,
            overruns,
            backlog_refusals,
            open_reservations,
            requests,
            request_duration,
            upstream_duration,
            upstream_auth_failures,
            plugin_calls,
            plugin_failures,
            plugin_loads,
            config_reloads,
            registry: std::sync::RwLock::new(registry),
        }
    }

    /// Let another module register its own metric families.
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        let mut reg = self
            .registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut reg);
    }

    pub fn request(&self, route: &'static str, model: &str, provider: &str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                model: model.to_string(),
                provider: provider.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn request_duration(&self, route: &'static str, d: Duration) {
        self.request_duration
            .get_or_create(&RouteLabels { route })
            .observe(d.as_secs_f64());
    }

    pub fn upstream_duration(&self, provider: &str, d: Duration) {
        self.upstream_duration
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .observe(d.as_secs_f64());
    }

    /// The upstream refused a channel's credential: an operator problem (rotate or fix the key).
    pub fn upstream_auth_failure(&self, channel: &str) {
        self.upstream_auth_failures
            .get_or_create(&ChannelLabels {
                channel: channel.to_string(),
            })
            .inc();
    }

    pub fn plugin_call(&self, plugin: &str, call: &'static str, d: Duration) {
        self.plugin_calls
            .get_or_create(&PluginCallLabels {
                plugin: plugin.to_string(),
                call,
            })
            .observe(d.as_secs_f64());
    }

    pub fn plugin_failure(&self, plugin: &str, call: &'static str, reason: &'static str) {
        self.plugin_failures
            .get_or_create(&PluginFailureLabels {
                plugin: plugin.to_string(),
                call,
                reason,
            })
            .inc();
    }

    pub fn plugin_load(&self, plugin: &str, outcome: &'static str) {
        self.plugin_loads
            .get_or_create(&PluginLoadLabels {
                plugin: plugin.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn config_reload(&self, outcome: &'static str) {
        self.config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn spend(&self, model: &str, picodollars: i64, prompt_tokens: u64, completion_tokens: u64) {
        let model = model.to_string();
        self.spend
            .get_or_create(&ModelLabels {
                model: model.clone(),
            })
            .inc_by(u64::try_from(picodollars).unwrap_or(0));
        self.tokens
            .get_or_create(&TokenLabels {
                model: model.clone(),
                direction: "input",
            })
            .inc_by(prompt_tokens);
        self.tokens
            .get_or_create(&TokenLabels {
                model,
                direction: "output",
            })
            .inc_by(completion_tokens);
    }

    pub fn payment_required(&self, model: &str) {
        self.payment_required
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .inc();
    }

    /// A charge went `picodollars` beyond its reservation.
    pub fn overrun(&self, model: &str, picodollars: i64) {
        let labels = ModelLabels {
            model: model.to_string(),
        };
        self.overrun
            .get_or_create(&labels)
            .inc_by(u64::try_from(picodollars).unwrap_or(0));
        self.overruns.get_or_create(&labels).inc();
    }

    pub fn backlog_refusal(&self, model: &str) {
        self.backlog_refusals
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .inc();
    }

    pub fn channel_state(&self, channel: &str, level: i64) {
        self.channel_states
            .get_or_create(&ChannelLabels {
                channel: channel.to_string(),
            })
            .set(level);
    }

    pub fn channel_transition(&self, channel: &str, state: &'static str) {
        self.channel_transitions
            .get_or_create(&ChannelStateLabels {
                channel: channel.to_string(),
                state,
            })
            .inc();
    }

    pub fn failover(&self, model: &str) {
        self.failovers
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .inc();
    }

    pub fn open_reservations(&self, delta: i64) {
        self.open_reservations.inc_by(delta);
    }

    pub fn moderation_verdict(&self, category: &str, action: &'static str) {
        self.verdicts
            .get_or_create(&VerdictLabels {
                category: category.to_string(),
                action,
            })
            .inc();
    }

    pub fn policy_reload(&self, outcome: &'static str) {
        self.policy_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn moderation_duration(&self, d: Duration) {
        self.moderation_duration.observe(d.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let reg = self
            .registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}
