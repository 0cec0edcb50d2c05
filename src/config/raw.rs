//! The configuration as written: the raw YAML shapes (strict, with their defaults) and their
//! validation into the typed [`super::Config`], every problem reported at once with its key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::*;

// ---------------------------------------------------------------------------------------------
// Raw shapes, exactly as written in YAML.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    server: RawServer,
    operator: RawOperator,
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    channels: Vec<RawChannel>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    billing: RawBilling,
    #[serde(default)]
    moderation: RawModeration,
    #[serde(default)]
    tasks: super::tasks::RawTasks,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    catalog: RawCatalog,
    #[serde(default)]
    limits: super::limits::RawLimits,
    #[serde(default)]
    guard: super::limits::RawGuard,
}

/// `catalog:`: how often each channel's upstream model list is refreshed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCatalog {
    #[serde(default = "default_catalog_refresh")]
    refresh: String,
}

impl Default for RawCatalog {
    fn default() -> Self {
        Self {
            refresh: default_catalog_refresh(),
        }
    }
}

fn default_catalog_refresh() -> String {
    "5m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModeration {
    #[serde(default = "default_policies_dir")]
    policies_dir: String,
    #[serde(default)]
    retain_prompts: bool,
    #[serde(default = "default_record_max_bytes")]
    record_max_bytes: usize,
    #[serde(default = "default_true")]
    watch: bool,
}

fn default_record_max_bytes() -> usize {
    16 * 1024 * 1024
}

impl Default for RawModeration {
    fn default() -> Self {
        Self {
            policies_dir: default_policies_dir(),
            retain_prompts: false,
            record_max_bytes: default_record_max_bytes(),
            watch: true,
        }
    }
}

fn default_policies_dir() -> String {
    "policies".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    #[serde(default = "default_db_url")]
    url: String,
}

impl fmt::Debug for RawDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawDatabase")
            .field("url", &masked_db_url(&self.url))
            .finish()
    }
}

impl Default for RawDatabase {
    fn default() -> Self {
        Self {
            url: default_db_url(),
        }
    }
}

fn default_db_url() -> String {
    "sqlite://data/tollgate.db".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    /// Models callable with no key at all (free, offline ones: the demo).
    #[serde(default)]
    anonymous_models: Vec<String>,
    #[serde(default)]
    cache_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    #[serde(default = "default_max_output")]
    default_max_output_tokens: u64,
    #[serde(default = "default_hold_ttl")]
    reservation_ttl: String,
    #[serde(default = "default_max_pending_charges")]
    max_pending_charges: usize,
}

impl Default for RawBilling {
    fn default() -> Self {
        Self {
            default_max_output_tokens: default_max_output(),
            reservation_ttl: default_hold_ttl(),
            max_pending_charges: default_max_pending_charges(),
        }
    }
}

fn default_max_pending_charges() -> usize {
    100_000
}

fn default_max_output() -> u64 {
    4096
}
fn default_hold_ttl() -> String {
    "15m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_request_timeout")]
    request_timeout: String,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: String,
    #[serde(default = "default_body_read_timeout")]
    body_read_timeout: String,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_inflight_body")]
    max_inflight_body_bytes: usize,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace: String,
}

fn default_header_read_timeout() -> String {
    "10s".into()
}
fn default_body_read_timeout() -> String {
    "30s".into()
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_inflight_body() -> usize {
    256 * 1024 * 1024
}
fn default_shutdown_grace() -> String {
    "30s".into()
}

fn default_max_body() -> usize {
    4 * 1024 * 1024
}
fn default_request_timeout() -> String {
    "300s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    listen: String,
    /// Name of the environment variable holding the admin API token; unset: admin API off.
    #[serde(default = "default_admin_env")]
    admin_token_env: String,
}

fn default_admin_env() -> String {
    "TOLLGATE_ADMIN_TOKEN".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    #[serde(default = "default_plugin_dir")]
    dir: String,
    #[serde(default = "default_true")]
    bundled: bool,
    #[serde(default = "default_plugin_memory")]
    memory_limit_bytes: usize,
    #[serde(default = "default_plugin_timeout")]
    call_timeout: String,
    #[serde(default = "default_plugin_instances")]
    max_instances: u32,
    #[serde(default = "default_watch")]
    watch: bool,
    #[serde(default)]
    reuse: RawReuse,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReuse {
    bundled: bool,
    plugins: Vec<String>,
    max_uses: u32,
    max_idle: usize,
}

impl Default for RawReuse {
    fn default() -> Self {
        let d = PluginReuse::default();
        Self {
            bundled: d.bundled,
            plugins: d.plugins,
            max_uses: d.max_uses,
            max_idle: d.max_idle,
        }
    }
}

impl Default for RawPlugins {
    fn default() -> Self {
        Self {
            dir: default_plugin_dir(),
            bundled: true,
            memory_limit_bytes: default_plugin_memory(),
            call_timeout: default_plugin_timeout(),
            max_instances: default_plugin_instances(),
            watch: true,
            reuse: RawReuse::default(),
        }
    }
}

fn default_plugin_dir() -> String {
    "plugins".into()
}
fn default_true() -> bool {
    true
}
fn default_watch() -> bool {
    true
}
fn default_plugin_memory() -> usize {
    64 * 1024 * 1024
}
fn default_plugin_timeout() -> String {
    "100ms".into()
}
fn default_plugin_instances() -> u32 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
    #[serde(default = "default_request_timeout")]
    timeout: String,
    #[serde(default = "default_idle_timeout")]
    stream_idle_timeout: String,
    #[serde(default = "default_pool")]
    pool_max_idle_per_host: usize,
    #[serde(default = "default_upstream_body")]
    max_body_bytes: usize,
    #[serde(default = "default_upstream_event")]
    max_event_bytes: usize,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            timeout: default_request_timeout(),
            stream_idle_timeout: default_idle_timeout(),
            pool_max_idle_per_host: default_pool(),
            max_body_bytes: default_upstream_body(),
            max_event_bytes: default_upstream_event(),
        }
    }
}

fn default_upstream_body() -> usize {
    16 * 1024 * 1024
}
fn default_upstream_event() -> usize {
    1024 * 1024
}

fn default_connect_timeout() -> String {
    "5s".into()
}
fn default_idle_timeout() -> String {
    "60s".into()
}
fn default_pool() -> usize {
    256
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    name: String,
    plugin: String,
    #[serde(default)]
    base_url: Option<String>,
    /// Name of the environment variable that holds the upstream credential.
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    /// How prompts are counted for the estimate; by default per plugin.
    #[serde(default)]
    tokenizer: Option<super::Tokenizer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    /// The public name clients send as `model`.
    name: String,
    channel: String,
    /// The upstream's model id; defaults to `name`.
    #[serde(default)]
    upstream_model: Option<String>,
    /// Prices in pico-dollars (1e-12 USD); without them, the plugin manifest's prices apply.
    #[serde(default)]
    price: Option<crate::billing::Price>,
    /// Billed nothing, on purpose. A model with no price of its own or from its plugin's
    /// manifest must say so; otherwise the config is refused.
    #[serde(default)]
    free: bool,
    /// Async tasks of this model fail as timed out after this long (else `tasks.deadline`).
    #[serde(default)]
    task_deadline: Option<String>,
    /// How this model's prompts are counted for the estimate; by default its channel's.
    #[serde(default)]
    tokenizer: Option<super::Tokenizer>,
    /// The weight and priority of `channel` among the model's channels.
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    priority: u32,
    /// More channels serving this model (a pool of keys, or other providers), tried by priority
    /// and weight, failed over to when one fails.
    #[serde(default)]
    channels: Vec<RawMember>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    channel: String,
    /// The upstream's model id on this channel; defaults to the model's.
    #[serde(default)]
    upstream_model: Option<String>,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    priority: u32,
}

/// `routing:`: the channel breakers and failover.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    #[serde(default = "default_breaker_failures")]
    breaker_failures: u32,
    #[serde(default = "default_breaker_cooldown")]
    breaker_cooldown: String,
    #[serde(default = "default_auth_cooldown")]
    auth_cooldown: String,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
}

impl Default for RawRouting {
    fn default() -> Self {
        Self {
            breaker_failures: default_breaker_failures(),
            breaker_cooldown: default_breaker_cooldown(),
            auth_cooldown: default_auth_cooldown(),
            max_attempts: default_max_attempts(),
        }
    }
}

fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> String {
    "30s".into()
}
fn default_auth_cooldown() -> String {
    "5m".into()
}
fn default_max_attempts() -> u32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "default_log_filter")]
    filter: String,
    #[serde(default)]
    json: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            filter: default_log_filter(),
            json: false,
        }
    }
}

fn default_log_filter() -> String {
    "info".into()
}

impl RawConfig {
    pub(super) fn validate(
        self,
        env: &dyn EnvSource,
        source: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut addr = |key: &str, v: &str| -> SocketAddr {
            v.parse().unwrap_or_else(|_| {
                problems.push(format!(
                    "{key}: `{v}` is not an address like 127.0.0.1:8080"
                ));
                SocketAddr::from(([127, 0, 0, 1], 0))
            })
        };
        let listen = addr("server.listen", &self.server.listen);
        let op_listen = addr("operator.listen", &self.operator.listen);
        let mut dur = |key: &str, v: &str| -> Duration {
            match parse_duration(v) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    problems.push(format!(
                        "{key}: `{v}` is not a positive duration like 250ms, 5s or 2m"
                    ));
                    Duration::from_secs(1)
                }
            }
        };
        let request_timeout = dur("server.request_timeout", &self.server.request_timeout);
        let header_read_timeout = dur(
            "server.header_read_timeout",
            &self.server.header_read_timeout,
        );
        let body_read_timeout = dur("server.body_read_timeout", &self.server.body_read_timeout);
        let shutdown_grace = dur("server.shutdown_grace", &self.server.shutdown_grace);
        let call_timeout = dur("plugins.call_timeout", &self.plugins.call_timeout);
        let connect_timeout = dur("upstream.connect_timeout", &self.upstream.connect_timeout);
        let up_timeout = dur("upstream.timeout", &self.upstream.timeout);
        let idle = dur(
            "upstream.stream_idle_timeout",
            &self.upstream.stream_idle_timeout,
        );
        let cache_ttl = match &self.auth.cache_ttl {
            Some(v) => dur("auth.cache_ttl", v),
            None => Duration::from_secs(1),
        };
        let reservation_ttl = dur("billing.reservation_ttl", &self.billing.reservation_ttl);
        let catalog_refresh = dur("catalog.refresh", &self.catalog.refresh);
        let routing = RoutingConfig {
            breaker_failures: self.routing.breaker_failures.max(1),
            breaker_cooldown: dur("routing.breaker_cooldown", &self.routing.breaker_cooldown),
            auth_cooldown: dur("routing.auth_cooldown", &self.routing.auth_cooldown),
            max_attempts: self.routing.max_attempts.clamp(1, 10),
        };

        if self.server.max_body_bytes == 0 {
            problems.push("server.max_body_bytes: must be above 0".into());
        }
        if self.server.max_connections == 0 {
            problems.push("server.max_connections: must be above 0".into());
        }
        if self.server.max_inflight_body_bytes < self.server.max_body_bytes {
            problems.push(format!(
                "server.max_inflight_body_bytes: must be at least server.max_body_bytes ({})",
                self.server.max_body_bytes
            ));
        }
        if self.plugins.memory_limit_bytes < 1024 * 1024 {
            problems.push("plugins.memory_limit_bytes: must be at least 1048576 (1 MiB)".into());
        }
        if self.plugins.reuse.max_uses == 0 {
            problems.push("plugins.reuse.max_uses: must be above 0 (1 turns reuse off)".into());
        }
        if self.plugins.max_instances == 0 {
            problems.push("plugins.max_instances: must be above 0".into());
        }
        if self.upstream.max_body_bytes == 0 {
            problems.push("upstream.max_body_bytes: must be above 0".into());
        }
        if self.upstream.max_event_bytes == 0 {
            problems.push("upstream.max_event_bytes: must be above 0".into());
        }
        if self.billing.max_pending_charges == 0 {
            problems.push("billing.max_pending_charges: must be above 0".into());
        }
        let db_url = self.database.url.clone();
        if !(db_url.starts_with("sqlite:")
            || db_url.starts_with("postgres:")
            || db_url.starts_with("postgresql:"))
        {
            problems.push(format!(
                "database.url: `{}` must start with sqlite: or postgres:",
                masked_db_url(&db_url)
            ));
        }
        let admin_token = env.get(&self.operator.admin_token_env).map(Secret::new);
        let tasks = self.tasks.validate(env, &mut problems);
        let limits = self.limits.validate(&mut problems);
        let guard = self.guard.validate(&mut problems);
        let mut routes = validate_routes(self.channels, self.models, env, &mut problems);
        for (i, m) in self.auth.anonymous_models.iter().enumerate() {
            if !routes.models.iter().any(|r| &r.name == m) {
                problems.push(format!("auth.anonymous_models[{i}]: no model named `{m}`"));
            }
        }
        routes.anonymous_models = self.auth.anonymous_models;
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Config {
            server: ServerConfig {
                listen,
                max_body_bytes: self.server.max_body_bytes,
                request_timeout,
                header_read_timeout,
                body_read_timeout,
                max_connections: self.server.max_connections,
                max_inflight_body_bytes: self.server.max_inflight_body_bytes,
                shutdown_grace,
            },
            operator: OperatorConfig {
                listen: op_listen,
                admin_token,
            },
            database: DatabaseConfig { url: db_url },
            auth: AuthConfig { cache_ttl },
            billing: BillingConfig {
                default_max_output_tokens: self.billing.default_max_output_tokens,
                reservation_ttl,
                max_pending_charges: self.billing.max_pending_charges,
            },
            moderation: ModerationConfig {
                policies_dir: PathBuf::from(self.moderation.policies_dir),
                retain_prompts: self.moderation.retain_prompts,
                record_max_bytes: self.moderation.record_max_bytes,
                watch: self.moderation.watch,
            },
            plugins: PluginsConfig {
                dir: PathBuf::from(self.plugins.dir),
                bundled: self.plugins.bundled,
                memory_limit_bytes: self.plugins.memory_limit_bytes,
                call_timeout,
                max_instances: self.plugins.max_instances,
                watch: self.plugins.watch,
                reuse: PluginReuse {
                    bundled: self.plugins.reuse.bundled,
                    plugins: self.plugins.reuse.plugins,
                    max_uses: self.plugins.reuse.max_uses,
                    max_idle: self.plugins.reuse.max_idle,
                },
            },
            upstream: UpstreamConfig {
                connect_timeout,
                timeout: up_timeout,
                stream_idle_timeout: idle,
                pool_max_idle_per_host: self.upstream.pool_max_idle_per_host,
                max_body_bytes: self.upstream.max_body_bytes,
                max_event_bytes: self.upstream.max_event_bytes,
            },
            routes,
            routing,
            catalog_refresh,
            tasks,
            limits,
            guard,
            log: LogConfig {
                filter: self.log.filter,
                json: self.log.json,
            },
            source,
        })
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
}

fn validate_routes(
    channels: Vec<RawChannel>,
    models: Vec<RawModel>,
    env: &dyn EnvSource,
    problems: &mut Vec<String>,
) -> RoutesConfig {
    let mut out = RoutesConfig::default();
    let mut seen = std::collections::BTreeSet::new();
    for (i, ch) in channels.into_iter().enumerate() {
        let key = format!("channels[{i}]");
        if !is_name(&ch.name) {
            problems.push(format!(
                "{key}.name: `{}` must be 1-64 letters, digits, - _ . : /",
                ch.name
            ));
        }
        if !seen.insert(ch.name.clone()) {
            problems.push(format!(
                "{key}.name: channel `{}` is defined twice",
                ch.name
            ));
        }
        if !is_name(&ch.plugin) {
            problems.push(format!(
                "{key}.plugin: `{}` is not a plugin name",
                ch.plugin
            ));
        }
        let base_url = ch.base_url.unwrap_or_default();
        let base_url = base_url.trim_end_matches('/').to_string();
        if !base_url.is_empty() && reqwest::Url::parse(&base_url).is_err() {
            problems.push(format!("{key}.base_url: `{base_url}` is not a URL"));
        }
        let credential = match ch.api_key_env {
            Some(var) => match env.get(&var) {
                Some(v) => Some(Secret::new(v)),
                None => {
                    problems.push(format!(
                        "{key}.api_key_env: environment variable `{var}` is not set"
                    ));
                    None
                }
            },
            None => None,
        };
        let tokenizer = ch
            .tokenizer
            .unwrap_or_else(|| super::Tokenizer::default_for(&ch.plugin));
        out.channels.push(ChannelConfig {
            name: ch.name,
            plugin: ch.plugin,
            base_url,
            credential,
            options: ch.options,
            tokenizer,
        });
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, m) in models.into_iter().enumerate() {
        let key = format!("models[{i}]");
        if !is_name(&m.name) {
            problems.push(format!("{key}.name: `{}` is not a model name", m.name));
        }
        if !names.insert(m.name.clone()) {
            problems.push(format!("{key}.name: model `{}` is defined twice", m.name));
        }
        if !seen.contains(&m.channel) {
            problems.push(format!(
                "{key}.channel: no channel named `{}` (known: {})",
                m.channel,
                seen.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        if m.free && m.price.is_some() {
            problems.push(format!(
                "{key}: model `{}` has a price and `free: true`; keep one",
                m.name
            ));
        }
        let task_deadline = m.task_deadline.as_deref().and_then(|v| {
            let d = parse_duration(v).filter(|d| !d.is_zero());
            if d.is_none() {
                problems.push(format!(
                    "{key}.task_deadline: `{v}` is not a positive duration like 30s or 10m"
                ));
            }
            d
        });
        let channel_tokenizer = out
            .channels
            .iter()
            .find(|c| c.name == m.channel)
            .map_or(super::Tokenizer::Bytes, |c| c.tokenizer);
        let mut members = Vec::with_capacity(m.channels.len());
        for (j, c) in m.channels.into_iter().enumerate() {
            if !seen.contains(&c.channel) {
                problems.push(format!(
                    "{key}.channels[{j}].channel: no channel named `{}`",
                    c.channel
                ));
            }
            members.push(ModelChannel {
                channel: c.channel,
                upstream_model: c
                    .upstream_model
                    .unwrap_or_else(|| m.upstream_model.clone().unwrap_or_else(|| m.name.clone())),
                weight: c.weight,
                priority: c.priority,
            });
        }
        out.models.push(ModelConfig {
            weight: m.weight,
            priority: m.priority,
            channels: members,
            tokenizer: m.tokenizer.unwrap_or(channel_tokenizer),
            price: m.price,
            free: m.free,
            task_deadline,
            upstream_model: m.upstream_model.unwrap_or_else(|| m.name.clone()),
            name: m.name,
            channel: m.channel,
        });
    }
    out
}
