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

mod limits;
mod raw;
mod tasks;
pub use limits::{FailMode, GuardAction, GuardConfig, LimitsBackend, LimitsConfig};
use raw::RawConfig;
pub use tasks::{Storage, TasksConfig};

/// The configuration that ships inside the binary: what `tollgate serve` uses with no file at all.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../../config.yaml");

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
    pub routing: RoutingConfig,
    /// How often each channel's upstream model list is refreshed (`catalog.refresh`).
    pub catalog_refresh: Duration,
    pub tasks: TasksConfig,
    pub limits: LimitsConfig,
    pub guard: GuardConfig,
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
    pub reuse: PluginReuse,
}

/// Which plugins' instances may serve more than one request (`plugins.reuse`): an instance is
/// given back after a request whose calls all returned normally, and serves the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginReuse {
    /// The bundled plugins (ours: they keep nothing between calls).
    pub bundled: bool,
    /// Plugins of the folder, by name, that the operator trusts the same way.
    pub plugins: Vec<String>,
    /// Requests one instance serves before it is dropped for a fresh one.
    pub max_uses: u32,
    /// Idle instances kept per plugin.
    pub max_idle: usize,
}

impl Default for PluginReuse {
    fn default() -> Self {
        Self {
            bundled: true,
            plugins: Vec::new(),
            max_uses: 1000,
            max_idle: 64,
        }
    }
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
    /// How the prompts of this channel's models are counted for the estimate (`tokenizer`; by
    /// default `o200k` for the `openai` plugin, `bytes` for every other).
    pub tokenizer: Tokenizer,
}

/// How a model's prompt tokens are counted for the estimate (`tokenizer:` on a channel or a
/// model). The estimate only sizes the reservation: the charge is the upstream's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokenizer {
    /// OpenAI's `o200k_base` (GPT-4o, GPT-4.1, o-series, GPT-5).
    O200k,
    /// OpenAI's `cl100k_base` (GPT-4, GPT-3.5, `text-embedding-3-*`).
    Cl100k,
    /// A conservative bound per byte for any other tokenizer (see `pipeline::tokens`).
    Bytes,
}

impl Tokenizer {
    /// The default for a channel of `plugin`: OpenAI's current encoding for the `openai` plugin
    /// (OpenAI-compatible upstreams), the byte bound for every other.
    pub fn default_for(plugin: &str) -> Self {
        if plugin == "openai" {
            Self::O200k
        } else {
            Self::Bytes
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub channel: String,
    pub upstream_model: String,
    pub price: Option<crate::billing::Price>,
    /// Marked free explicitly: billed nothing.
    pub free: bool,
    /// Async tasks of this model time out after this long (`None`: `tasks.deadline`).
    pub task_deadline: Option<Duration>,
    /// The model's own `tokenizer`, else its channel's.
    pub tokenizer: Tokenizer,
    /// The weight and priority of `channel` among the model's channels.
    pub weight: u32,
    pub priority: u32,
    /// More channels serving the model.
    pub channels: Vec<ModelChannel>,
}

/// One more channel serving a model.
#[derive(Debug, Clone)]
pub struct ModelChannel {
    pub channel: String,
    pub upstream_model: String,
    pub weight: u32,
    /// Lower first; channels of one priority share the traffic by weight.
    pub priority: u32,
}

/// `routing.*`: channel breakers and failover.
#[derive(Debug, Clone, Copy)]
pub struct RoutingConfig {
    /// Failures in a row that open a channel's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps the channel out before a probe.
    pub breaker_cooldown: Duration,
    /// How long a channel whose credential was refused stays disabled before a probe.
    pub auth_cooldown: Duration,
    /// Channels one request tries at most.
    pub max_attempts: u32,
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
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
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
    fn tokenizers_default_by_plugin_and_a_model_may_override_its_channel() {
        let yaml = r#"
server: { listen: "127.0.0.1:0" }
operator: { listen: "127.0.0.1:0" }
channels:
  - { name: oa, plugin: openai, base_url: "http://127.0.0.1:1/v1" }
  - { name: other, plugin: anthropic, base_url: "http://127.0.0.1:1/v1" }
  - { name: local, plugin: openai, base_url: "http://127.0.0.1:1/v1", tokenizer: bytes }
models:
  - { name: a, channel: oa, free: true }
  - { name: b, channel: oa, free: true, tokenizer: cl100k }
  - { name: c, channel: other, free: true }
  - { name: d, channel: local, free: true }
"#;
        let cfg = from_yaml(yaml, &BTreeMap::new()).unwrap();
        let of = |name: &str| {
            cfg.routes
                .models
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.tokenizer)
        };
        assert_eq!(of("a"), Some(Tokenizer::O200k));
        assert_eq!(of("b"), Some(Tokenizer::Cl100k));
        assert_eq!(of("c"), Some(Tokenizer::Bytes));
        assert_eq!(of("d"), Some(Tokenizer::Bytes));
        let bad = yaml.replace("tokenizer: cl100k", "tokenizer: o300k");
        let err = from_yaml(&bad, &BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("tokenizer") && err.contains("o300k"), "{err}");
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
