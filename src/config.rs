//! The one typed configuration: `config.yaml` plus `TOLLGATE__*` environment overrides, validated once.
//!
//! Parsing is strict (`deny_unknown_fields`), then `RawConfig::validate` turns the raw shape into
//! [`Config`], reporting every mistake at once with the key that holds it. Nothing else in tollgate
//! reads configuration files or the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Yaml};
use serde::Deserialize;

/// The configuration that ships inside the binary: what `tollgate serve` uses with no file at all.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../config.yaml");

/// A secret value: prints `*****` in `Debug` and `Display`, so it never reaches a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself. Callers: the upstream client adding credentials, and nothing that logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// Every mistake found in a configuration, each naming its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading configuration: {0}")]
    Parse(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

// ---------------------------------------------------------------------------------------------
// Raw shapes, exactly as written in YAML.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
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

// ---------------------------------------------------------------------------------------------
// Validated shapes: what the rest of tollgate uses.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub operator: OperatorConfig,
    pub plugins: PluginsConfig,
    pub upstream: UpstreamConfig,
    /// Channels and models: the part of the configuration that is reloaded while serving.
    pub routes: RoutesConfig,
    pub log: LogConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub billing: BillingConfig,
    pub moderation: ModerationConfig,
    /// Where the configuration came from (`None` for the embedded defaults).
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// A connection must send a request's headers within this (also while idle between requests).
    pub header_read_timeout: Duration,
    /// A request's body must arrive whole within this (408 otherwise).
    pub body_read_timeout: Duration,
    /// Open connections on the public listener; more are answered 503 and closed at once.
    pub max_connections: usize,
    /// Bytes of request bodies held at once, over every request; a body that would pass it
    /// gets a 503 with `Retry-After`.
    pub max_inflight_body_bytes: usize,
    /// On SIGTERM: how long requests and streams in flight may finish before they are cut.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub listen: SocketAddr,
    /// The admin API token; `None` turns the admin API off.
    pub admin_token: Option<Secret>,
}

#[derive(Clone)]
pub struct DatabaseConfig {
    /// May hold a password (`postgres://user:pass@host/db`): `Debug` masks it.
    pub url: String,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &masked_db_url(&self.url))
            .finish()
    }
}

/// A database URL fit for a log line: the password of the user part and any `password=`
/// parameter print as `*****` (`postgres://app:*****@db/tollgate`).
pub fn masked_db_url(url: &str) -> String {
    const MASK: &str = "*****";
    let (before_query, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len());
    match before_query.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            out.push_str(scheme);
            out.push_str("://");
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push(':');
                            out.push_str(MASK);
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}={MASK}"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct ModerationConfig {
    pub policies_dir: PathBuf,
    /// Keep the prompt text in the moderation record (off by default).
    pub retain_prompts: bool,
    /// Bytes of prompt text the moderation record keeps at most (oldest events go first).
    pub record_max_bytes: usize,
    pub watch: bool,
}

#[derive(Debug, Clone)]
pub struct BillingConfig {
    pub default_max_output_tokens: u64,
    pub reservation_ttl: Duration,
    /// SQLite: the most charges a gateway holds that are not in the ledger yet, counting the
    /// requests in flight that may add one; past it, billed requests get a 503.
    pub max_pending_charges: usize,
}

#[derive(Debug, Clone)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub bundled: bool,
    pub memory_limit_bytes: usize,
    pub call_timeout: Duration,
    pub max_instances: u32,
    pub watch: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Largest non-streamed upstream body read; over it, a 502 and the connection dropped.
    pub max_body_bytes: usize,
    /// Largest single server-sent event of an upstream stream; over it, the stream fails.
    pub max_event_bytes: usize,
}

/// The part of the configuration reloaded while serving: channels, models, and which models
/// anyone may call without a key.
#[derive(Debug, Clone, Default)]
pub struct RoutesConfig {
    pub channels: Vec<ChannelConfig>,
    pub models: Vec<ModelConfig>,
    pub anonymous_models: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub name: String,
    pub plugin: String,
    /// Base URL of the upstream, without a trailing slash; empty for offline plugins.
    pub base_url: String,
    pub credential: Option<Secret>,
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub channel: String,
    pub upstream_model: String,
    pub price: Option<crate::billing::Price>,
    /// Marked free explicitly: billed nothing.
    pub free: bool,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub filter: String,
    pub json: bool,
}

/// Where environment variables come from: the process, or a map in tests.
pub trait EnvSource {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    #[expect(
        clippy::disallowed_methods,
        reason = "config.rs is the one place that reads the environment"
    )]
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

/// Load the configuration: the file at `path` (or the embedded defaults), then `TOLLGATE__*`
/// environment overrides (`TOLLGATE__SERVER__LISTEN=127.0.0.1:0`), then validation.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let figment = match path {
        Some(p) => Figment::new().merge(Yaml::file_exact(p)),
        None => Figment::new().merge(Yaml::string(EMBEDDED_DEFAULTS)),
    }
    .merge(Env::prefixed("TOLLGATE__").split("__"));
    let raw: RawConfig = figment
        .extract()
        .map_err(|e| ConfigError::Parse(describe_figment(e)))?;
    raw.validate(&ProcessEnv, path.map(Path::to_path_buf))
}

/// Load only the hot part (channels and models) again, for a running gateway.
pub fn reload_routes(path: &Path) -> Result<RoutesConfig, ConfigError> {
    load(Some(path)).map(|c| c.routes)
}

/// Parse a YAML text with an explicit environment: for tests.
pub fn from_yaml(text: &str, env: &dyn EnvSource) -> Result<Config, ConfigError> {
    let raw: RawConfig = Figment::new()
        .merge(Yaml::string(text))
        .extract()
        .map_err(|e| ConfigError::Parse(describe_figment(e)))?;
    raw.validate(env, None)
}

fn describe_figment(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::from("(top level)")
            } else {
                e.path.join(".")
            };
            format!("{key}: {}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parse durations like `250ms`, `5s`, `2m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        _ => None,
    }
}

impl RawConfig {
    fn validate(self, env: &dyn EnvSource, source: Option<PathBuf>) -> Result<Config, ConfigError> {
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
        out.channels.push(ChannelConfig {
            name: ch.name,
            plugin: ch.plugin,
            base_url,
            credential,
            options: ch.options,
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
        out.models.push(ModelConfig {
            price: m.price,
            free: m.free,
            upstream_model: m.upstream_model.unwrap_or_else(|| m.name.clone()),
            name: m.name,
            channel: m.channel,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid() {
        let cfg = from_yaml(EMBEDDED_DEFAULTS, &BTreeMap::new()).unwrap();
        assert!(cfg.routes.models.iter().any(|m| m.name == "demo-chat"));
    }

    #[test]
    fn every_bad_key_is_named() {
        let yaml = r#"
server: { listen: "nowhere", request_timeout: "soon" }
operator: { listen: "127.0.0.1:0" }
channels:
  - { name: a, plugin: openai, base_url: "not a url", api_key_env: MISSING_KEY }
models:
  - { name: m, channel: b }
"#;
        let err = from_yaml(yaml, &BTreeMap::new()).unwrap_err().to_string();
        for key in [
            "server.listen",
            "server.request_timeout",
            "channels[0].base_url",
            "channels[0].api_key_env",
            "models[0].channel",
        ] {
            assert!(err.contains(key), "{key} missing from: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let yaml = "server: { listen: \"127.0.0.1:0\", lisen: 1 }\noperator: { listen: \"127.0.0.1:0\" }\n";
        let err = from_yaml(yaml, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s:?} {s}"), "***** *****");
    }

    #[test]
    fn the_database_password_does_not_print() {
        let yaml = "server: { listen: \"127.0.0.1:0\" }\noperator: { listen: \"127.0.0.1:0\" }\ndatabase: { url: \"postgres://app:hunter2@db.internal:5432/tollgate?sslmode=require&password=hunter3\" }\n";
        let cfg = from_yaml(yaml, &BTreeMap::new()).unwrap();
        assert!(
            cfg.database.url.contains("hunter2"),
            "the value itself is kept"
        );
        let printed = format!("{cfg:?} {:?}", cfg.database);
        assert!(!printed.contains("hunter"), "{printed}");
        assert!(
            printed.contains(
                "postgres://app:*****@db.internal:5432/tollgate?sslmode=require&password=*****"
            ),
            "{printed}"
        );
        // A refused URL is named without its password too.
        let yaml = yaml.replace("postgres:", "mysql:");
        let err = from_yaml(&yaml, &BTreeMap::new()).unwrap_err().to_string();
        assert!(
            err.contains("database.url") && !err.contains("hunter"),
            "{err}"
        );
        for (url, shown) in [
            ("sqlite://data/tollgate.db", "sqlite://data/tollgate.db"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("postgres://app@db/tg", "postgres://app@db/tg"),
            ("postgresql://a:p@ss@db/tg", "postgresql://a:*****@db/tg"),
            ("postgres://:secret@db", "postgres://:*****@db"),
            (
                "postgres://db/tg?PASSWORD=x&user=a",
                "postgres://db/tg?PASSWORD=*****&user=a",
            ),
        ] {
            assert_eq!(masked_db_url(url), shown, "{url}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("fast"), None);
    }
}
