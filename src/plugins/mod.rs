//! The wasmtime host: loads provider and policy components, runs every call sandboxed.
//!
//! Components are compiled once and pre-instantiated (`ProviderPre`); each request gets a fresh
//! [`Session`] (one store, one instance) that lives as long as the request's plugin calls and is
//! dropped with it. Every call runs under a memory cap ([`GuestState`] as the store's resource
//! limiter) and a CPU bound (epoch deadline); guests get no WASI capabilities at all: every import
//! a component declares is defined as a trap. A trap, an overrun or output that does not parse is
//! a [`PluginError`] for that request only. A built request whose path would leave the channel's
//! base URL, or that sets a header the host owns, is refused the same way (`upstream::guard`).
//!
//! A guest's error message is untrusted text, usually the upstream's own words (which can quote
//! a fragment of the operator's key): it is [`redact`]ed before it goes anywhere, and only the
//! log sees it; the client gets a message the gateway writes (`error::ApiError`).
//!
//! The set of loaded plugins lives in [`registry::Registry`], swapped atomically on reload: a
//! request holds an `Arc<Plugin>` and finishes on the version it started with.

pub mod bindings;
pub mod policy;
pub mod registry;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use crate::config::PluginsConfig;
use crate::metrics::Metrics;
use bindings::provider::exports::tollgate::plugin::provider_api as wit;
use bindings::provider::tollgate::plugin::types as wtypes;

pub use policy::{PluginAction, PluginVerdict, PolicyInput, PolicyPlugin};
pub use registry::Registry;

/// How often the epoch advances; a call's CPU bound is a whole number of ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Bytes of each instance's linear memory kept resident between requests.
const KEEP_RESIDENT: usize = 4 * 1024 * 1024;
/// Upper bound on table elements a guest may grow to.
const TABLE_LIMIT: usize = 100_000;

/// Classes of failure a provider plugin reports for its upstream (mirrors the WIT `error-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestErrorClass {
    InvalidRequest,
    RateLimited,
    Auth,
    ContentRefused,
    NotFound,
    Upstream,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin itself reported an error (usually the upstream's, translated).
    #[error("provider `{plugin}`: {message}")]
    Guest {
        plugin: String,
        class: GuestErrorClass,
        /// The guest's message, [`redact`]ed: for the log only when `from_upstream`.
        message: String,
        /// The upstream's HTTP status, when there was one.
        status: Option<u16>,
        retry_after_ms: Option<u64>,
        /// Reported after the upstream answered (`parse_*`): the message may carry the
        /// upstream's words. `build_request` errors are the plugin's own (it has seen no answer).
        from_upstream: bool,
    },
    #[error("provider plugin `{plugin}` failed (trap in {call})")]
    Trap {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("provider plugin `{plugin}` exceeded its CPU time limit in {call}")]
    Timeout { plugin: String, call: &'static str },
    #[error("provider plugin `{plugin}` exceeded its memory limit in {call}")]
    OutOfMemory { plugin: String, call: &'static str },
    #[error("provider plugin `{plugin}` returned output that does not parse ({call}: {detail})")]
    BadOutput {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("provider plugin `{plugin}` has no free instance slot; retry shortly")]
    Busy { plugin: String },
}

impl PluginError {
    /// Low-cardinality reason for the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Guest { .. } => "guest_error",
            Self::Trap { .. } => "trap",
            Self::Timeout { .. } => "cpu_limit",
            Self::OutOfMemory { .. } => "memory_limit",
            Self::BadOutput { .. } => "bad_output",
            Self::Busy { .. } => "busy",
        }
    }
}

/// Longest guest message kept, in characters.
const MESSAGE_CHARS: usize = 300;

/// Untrusted text (a guest's message, usually the upstream's words) made fit for a log line:
/// anything that looks like a credential (`sk-…`, masked keys like `sk-****abcd`, tokens, long
/// runs of base64 or hex) becomes `[redacted]`, control characters become spaces, and the
/// length is capped.
pub fn redact(text: &str) -> String {
    /// Writes a finished word, redacted if it looks like a secret or follows `Bearer`/`Basic`.
    fn flush(word: &mut String, after_scheme: &mut bool, out: &mut String) {
        if word.is_empty() {
            return;
        }
        if *after_scheme || looks_secret(word) {
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        *after_scheme = word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
        word.clear();
    }
    let mut out = String::with_capacity(text.len().min(MESSAGE_CHARS * 4));
    let mut word = String::new();
    let mut after_scheme = false;
    for c in text.chars() {
        if c.is_alphanumeric() || matches!(c, '-' | '_' | '+' | '/' | '=' | '*' | '.' | '~') {
            word.push(c);
        } else {
            flush(&mut word, &mut after_scheme, &mut out);
            out.push(if c.is_control() { ' ' } else { c });
        }
    }
    flush(&mut word, &mut after_scheme, &mut out);
    match out.char_indices().nth(MESSAGE_CHARS) {
        Some((cut, _)) => {
            out.truncate(cut);
            out.push('…');
            out
        }
        None => out,
    }
}

fn looks_secret(word: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "sk-",
        "sk_",
        "pk-",
        "pk_",
        "rk-",
        "rk_",
        "tg_",
        "ghp_",
        "gho_",
        "ghs_",
        "ghu_",
        "github_pat_",
        "glpat-",
        "xoxa-",
        "xoxb-",
        "xoxp-",
        "AIza",
        "eyJ",
        "sess-",
    ];
    if PREFIXES
        .iter()
        .any(|p| word.len() > p.len() && word.starts_with(p))
    {
        return true;
    }
    if word.contains("**") {
        return true;
    }
    // A long unbroken run of letters and digits (hex, base64, a raw token); separated pieces
    // (`gpt-4o-mini-2024-07-18`, a URL path) are words, not keys.
    word.split(['-', '_', '.', '/', '~']).any(|piece| {
        let digits = piece.chars().filter(char::is_ascii_digit).count();
        let letters = piece.chars().filter(char::is_ascii_alphabetic).count();
        (piece.len() >= 20 && digits >= 1 && letters >= 1) || piece.len() >= 40
    })
}

/// Failure to load a component: reported, never fatal to a running gateway.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`{0}` does not compile as a WebAssembly component: {1}")]
    Compile(String, String),
    #[error("`{0}` cannot be instantiated: {1}")]
    Instantiate(String, String),
    #[error(
        "`{0}` is neither a tollgate provider nor a policy plugin (tollgate:plugin@0.1.0): {1}"
    )]
    World(String, String),
    #[error("`{0}`: manifest call failed: {1}")]
    Manifest(String, String),
    #[error("`{file}` declares the name `{name}`; rename the file to `{name}.wasm`")]
    NameMismatch { file: String, name: String },
    #[error("reading `{0}`: {1}")]
    Io(String, String),
}

/// Per-store state: the memory cap, and whether the guest ran into it.
pub struct GuestState {
    memory_limit: usize,
    hit_memory_limit: bool,
}

impl wasmtime::ResourceLimiter for GuestState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.hit_memory_limit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_LIMIT)
    }
}

/// Where a loaded plugin came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Bundled,
    File(std::path::PathBuf),
}

/// A provider's manifest, converted from the WIT record.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kinds: Vec<String>,
    pub auth: AuthScheme,
    pub models: Vec<ModelInfo>,
    pub config_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    None,
    Bearer,
    Header(String),
    Query(String),
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub kinds: Vec<String>,
    pub context_window: Option<u32>,
    pub max_output_tokens: Option<u32>,
    pub price: Option<crate::billing::Price>,
}

/// A compiled, pre-instantiated provider component and its manifest.
pub struct Plugin {
    pub manifest: Manifest,
    pub origin: Origin,
    /// SHA-256 of the component bytes: a replaced file with the same bytes is not reloaded.
    pub digest: [u8; 32],
    pre: bindings::provider::ProviderPre<GuestState>,
    host: Arc<HostCore>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version)
            .field("origin", &self.origin)
            .finish()
    }
}

/// What the host passes to a plugin about a channel. Never a credential.
#[derive(Debug, Clone)]
pub struct ChannelContext {
    pub channel: String,
    pub base_url: String,
    pub model: String,
    pub options: Vec<(String, String)>,
}

/// A request the plugin built, validated by the host.
#[derive(Debug)]
pub struct OutboundRequest {
    pub method: http::Method,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub stream: bool,
}

/// A response from the upstream (or the plugin's own offline answer).
#[derive(Debug)]
pub struct InboundResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub enum Outbound {
    Send(OutboundRequest),
    Answer(InboundResponse),
}

#[derive(Debug, Default)]
pub struct StreamOutput {
    pub chunks: Vec<String>,
    pub done: bool,
}

/// Engine-wide state shared by every plugin: the engine and its epoch ticker, limits, metrics.
pub struct HostCore {
    engine: Engine,
    memory_limit: usize,
    deadline_ticks: u64,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

impl Drop for HostCore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl HostCore {
    pub fn new(cfg: &PluginsConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, LoadError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(cfg.max_instances)
            .total_core_instances(cfg.max_instances.saturating_mul(4))
            .total_memories(cfg.max_instances)
            .total_tables(cfg.max_instances.saturating_mul(4))
            .max_memory_size(cfg.memory_limit_bytes)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .table_elements(TABLE_LIMIT)
            // Reset a used instance by rewriting only its dirty pages (Linux PAGEMAP_SCAN, 6.7+),
            // keeping them resident: no madvise, no page faults and no TLB-shootdown IPIs on the
            // request path. Older kernels fall back to madvise.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(64 * 1024)
            .decommit_batch_size(32);
        let mut wcfg = wasmtime::Config::new();
        wcfg.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            .wasm_component_model(true);
        let engine = Engine::new(&wcfg)
            .map_err(|e| LoadError::Instantiate("engine".into(), e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("tollgate-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| LoadError::Instantiate("epoch thread".into(), e.to_string()))?;
        }
        let ticks = cfg.call_timeout.as_micros() / EPOCH_TICK.as_micros();
        Ok(Arc::new(Self {
            engine,
            memory_limit: cfg.memory_limit_bytes,
            deadline_ticks: u64::try_from(ticks).unwrap_or(u64::MAX).max(1),
            metrics,
            stop,
        }))
    }

    /// Compile a component with every import defined as a trap (no WASI at all), pre-instantiate
    /// it, and hash its bytes. Shared by both worlds.
    fn instance_pre(
        &self,
        label: &str,
        bytes: &[u8],
    ) -> Result<(wasmtime::component::InstancePre<GuestState>, [u8; 32]), LoadError> {
        let component = Component::from_binary(&self.engine, bytes)
            .map_err(|e| LoadError::Compile(label.into(), format!("{e:#}")))?;
        let mut linker: Linker<GuestState> = Linker::new(&self.engine);
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| LoadError::Instantiate(label.into(), format!("{e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Instantiate(label.into(), format!("{e:#}")))?;
        use sha2::Digest;
        Ok((instance_pre, sha2::Sha256::digest(bytes).into()))
    }

    /// A fresh store with the memory cap and the CPU deadline of one call.
    fn new_store(&self) -> Store<GuestState> {
        let mut store = Store::new(
            &self.engine,
            GuestState {
                memory_limit: self.memory_limit,
                hit_memory_limit: false,
            },
        );
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
        store
    }

    /// Compile and pre-instantiate a provider component, and read its manifest.
    pub fn load(
        self: &Arc<Self>,
        label: &str,
        bytes: &[u8],
        origin: Origin,
    ) -> Result<Plugin, LoadError> {
        let (instance_pre, digest) = self.instance_pre(label, bytes)?;
        let pre = bindings::provider::ProviderPre::new(instance_pre)
            .map_err(|e| LoadError::World(label.into(), format!("{e:#}")))?;
        let mut plugin = Plugin {
            manifest: Manifest {
                name: label.into(),
                version: String::new(),
                kinds: Vec::new(),
                auth: AuthScheme::None,
                models: Vec::new(),
                config_keys: Vec::new(),
            },
            origin,
            digest,
            pre,
            host: self.clone(),
        };
        let manifest = {
            let mut session = plugin
                .session()
                .map_err(|e| LoadError::Instantiate(label.into(), e.to_string()))?;
            session
                .manifest()
                .map_err(|e| LoadError::Manifest(label.into(), e.to_string()))?
        };
        if manifest.name != label {
            return Err(LoadError::NameMismatch {
                file: label.into(),
                name: manifest.name,
            });
        }
        plugin.manifest = manifest;
        Ok(plugin)
    }
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// A fresh store and instance for one request. The session owns everything it needs, so it
    /// can travel with a response stream.
    pub fn session(&self) -> Result<Session, PluginError> {
        let mut store = self.host.new_store();
        let instance = self.pre.instantiate(&mut store).map_err(|e| {
            let text = format!("{e:#}");
            if text.contains("maximum concurrent") || text.contains("pooling") {
                PluginError::Busy {
                    plugin: self.name().into(),
                }
            } else {
                classify(self.name(), "instantiate", &store, e)
            }
        })?;
        Ok(Session {
            host: self.host.clone(),
            name: self.manifest.name.as_str().into(),
            store,
            instance,
        })
    }
}

fn classify(
    plugin: &str,
    call: &'static str,
    store: &Store<GuestState>,
    err: wasmtime::Error,
) -> PluginError {
    if store.data().hit_memory_limit {
        return PluginError::OutOfMemory {
            plugin: plugin.into(),
            call,
        };
    }
    if let Some(wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        return PluginError::Timeout {
            plugin: plugin.into(),
            call,
        };
    }
    PluginError::Trap {
        plugin: plugin.into(),
        call,
        detail: format!("{err:#}"),
    }
}

/// One request's instance of a plugin. Every call gets a fresh CPU deadline.
pub struct Session {
    host: Arc<HostCore>,
    name: Arc<str>,
    store: Store<GuestState>,
    instance: bindings::provider::Provider,
}

impl Session {
    pub fn plugin_name(&self) -> &str {
        &self.name
    }

    fn run<T>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&wit::Guest, &mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        self.store.set_epoch_deadline(self.host.deadline_ticks);
        let started = Instant::now();
        let guest = self.instance.tollgate_plugin_provider_api();
        let out = f(guest, &mut self.store);
        let metrics = &self.host.metrics;
        metrics.plugin_call(&self.name, call, started.elapsed());
        out.map_err(|e| {
            let err = classify(&self.name, call, &self.store, e);
            metrics.plugin_failure(&self.name, call, err.reason());
            err
        })
    }

    /// A guest's error, with its message redacted. `upstream_status` is the status the host
    /// itself saw (for `parse_response`). A 401 or 403 is the upstream refusing the channel's
    /// credential whatever class the plugin chose: counted per channel and logged for the operator.
    fn guest_error(
        &self,
        ctx: &ChannelContext,
        call: &'static str,
        e: wtypes::PluginError,
        upstream_status: Option<u16>,
    ) -> PluginError {
        let mut class = match e.class {
            wtypes::ErrorClass::InvalidRequest => GuestErrorClass::InvalidRequest,
            wtypes::ErrorClass::RateLimited => GuestErrorClass::RateLimited,
            wtypes::ErrorClass::Auth => GuestErrorClass::Auth,
            wtypes::ErrorClass::ContentRefused => GuestErrorClass::ContentRefused,
            wtypes::ErrorClass::NotFound => GuestErrorClass::NotFound,
            wtypes::ErrorClass::Upstream => GuestErrorClass::Upstream,
        };
        let from_upstream = call != "build_request";
        let status = upstream_status
            .filter(|s| !(200..300).contains(s))
            .or(e.status)
            .filter(|s| (100..=599).contains(s));
        if from_upstream && matches!(status, Some(401 | 403)) {
            class = GuestErrorClass::Auth;
        }
        let message = redact(&e.message);
        if class == GuestErrorClass::Auth {
            self.host.metrics.upstream_auth_failure(&ctx.channel);
            tracing::error!(
                channel = %ctx.channel,
                plugin = %self.name,
                call,
                upstream_status = status,
                detail = %message,
                "the provider refused the channel's credential: check or rotate the key in the \
                 environment variable the channel names"
            );
        }
        PluginError::Guest {
            plugin: self.name.to_string(),
            class,
            message,
            status,
            retry_after_ms: e.retry_after_ms,
            from_upstream,
        }
    }

    fn bad_output(&self, call: &'static str, detail: impl Into<String>) -> PluginError {
        let err = PluginError::BadOutput {
            plugin: self.name.to_string(),
            call,
            detail: detail.into(),
        };
        self.host
            .metrics
            .plugin_failure(&self.name, call, err.reason());
        err
    }

    pub fn manifest(&mut self) -> Result<Manifest, PluginError> {
        let m = self.run("manifest", |g, s| g.call_describe(s))?;
        Ok(Manifest {
            name: m.name,
            version: m.version,
            kinds: m.kinds,
            auth: match m.auth {
                wtypes::AuthScheme::None => AuthScheme::None,
                wtypes::AuthScheme::Bearer => AuthScheme::Bearer,
                wtypes::AuthScheme::CustomHeader(h) => AuthScheme::Header(h),
                wtypes::AuthScheme::QueryParam(q) => AuthScheme::Query(q),
            },
            models: m.models.into_iter().map(model_info).collect(),
            config_keys: m.config_keys,
        })
    }

    pub fn build_request(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        request: &str,
    ) -> Result<Outbound, PluginError> {
        let wctx = wit_ctx(ctx);
        let out = self.run("build_request", |g, s| {
            g.call_build_request(s, &wctx, kind, request)
        })?;
        match out {
            Err(e) => Err(self.guest_error(ctx, "build_request", e, None)),
            Ok(wtypes::Outbound::Send(req)) => {
                let method = http::Method::from_bytes(req.method.as_bytes())
                    .map_err(|_| self.bad_output("build_request", "invalid HTTP method"))?;
                crate::upstream::guard::check_path(&req.path)
                    .map_err(|why| self.bad_output("build_request", why.0))?;
                let mut headers = http::HeaderMap::new();
                for h in req.headers {
                    let name = http::HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| self.bad_output("build_request", "invalid header name"))?;
                    crate::upstream::guard::check_header(name.as_str())
                        .map_err(|why| self.bad_output("build_request", why.0))?;
                    let value = http::HeaderValue::from_str(&h.value)
                        .map_err(|_| self.bad_output("build_request", "invalid header value"))?;
                    headers.append(name, value);
                }
                Ok(Outbound::Send(OutboundRequest {
                    method,
                    path: req.path,
                    headers,
                    body: req.body,
                    stream: req.stream,
                }))
            }
            Ok(wtypes::Outbound::Answer(resp)) => Ok(Outbound::Answer(InboundResponse {
                status: resp.status,
                headers: resp
                    .headers
                    .into_iter()
                    .map(|h| (h.name, h.value))
                    .collect(),
                body: resp.body,
            })),
        }
    }

    pub fn parse_response(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        response: InboundResponse,
    ) -> Result<String, PluginError> {
        let wctx = wit_ctx(ctx);
        let status = response.status;
        let wresp = wtypes::HttpResponse {
            status,
            headers: response
                .headers
                .into_iter()
                .map(|(name, value)| wtypes::Header { name, value })
                .collect(),
            body: response.body,
        };
        let out = self.run("parse_response", |g, s| {
            g.call_parse_response(s, &wctx, kind, &wresp)
        })?;
        match out {
            Err(e) => Err(self.guest_error(ctx, "parse_response", e, Some(status))),
            // The host saw the refusal itself, whatever the plugin made of it.
            Ok(_) if matches!(status, 401 | 403) => {
                let e = wtypes::PluginError {
                    class: wtypes::ErrorClass::Auth,
                    message: "the plugin did not report the upstream's refusal as an error".into(),
                    status: Some(status),
                    retry_after_ms: None,
                };
                Err(self.guest_error(ctx, "parse_response", e, Some(status)))
            }
            Ok(body) => Ok(body),
        }
    }

    pub fn parse_stream_event(
        &mut self,
        ctx: &ChannelContext,
        event: Option<String>,
        data: String,
    ) -> Result<StreamOutput, PluginError> {
        let wctx = wit_ctx(ctx);
        let ev = wtypes::SseEvent { event, data };
        let out = self.run("parse_stream_event", |g, s| {
            g.call_parse_stream_event(s, &wctx, &ev)
        })?;
        match out {
            Ok(o) => Ok(StreamOutput {
                chunks: o.chunks,
                done: o.done,
            }),
            Err(e) => Err(self.guest_error(ctx, "parse_stream_event", e, None)),
        }
    }

    /// A parse failure of the plugin's output detected by the host.
    pub fn reject_output(&self, call: &'static str, detail: impl Into<String>) -> PluginError {
        self.bad_output(call, detail)
    }
}

fn wit_ctx(ctx: &ChannelContext) -> wtypes::ChannelContext {
    wtypes::ChannelContext {
        channel: ctx.channel.clone(),
        base_url: ctx.base_url.clone(),
        model: ctx.model.clone(),
        options: ctx.options.clone(),
    }
}

fn model_info(m: wtypes::ModelInfo) -> ModelInfo {
    ModelInfo {
        id: m.id,
        kinds: m.kinds,
        context_window: m.context_window,
        max_output_tokens: m.max_output_tokens,
        price: m.price.map(|p| crate::billing::Price {
            input_per_token: p.input_per_token,
            output_per_token: p.output_per_token,
            per_image: p.per_image,
            per_second: p.per_second,
            per_request: p.per_request,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn upstream_text_loses_anything_like_a_key() {
        let openai = "Incorrect API key provided: sk-test-****cret. You can find your API key at https://platform.openai.com/account/api-keys.";
        let r = redact(openai);
        assert!(!r.contains("sk-") && !r.contains("cret"), "{r}");
        assert!(
            r.starts_with("Incorrect API key provided: [redacted]"),
            "{r}"
        );
        assert!(r.contains("platform.openai.com"), "{r}");
        for secret in [
            "sk-proj-AbCdEf0123456789abcdef0123456789",
            "tg_3xk9Qm2pLr8vNw4tYb6zHc1dFg7jKs5a",
            "AKIAIOSFODNN7EXAMPLE",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
            "AIzaSyD-1234567890abcdefghijklmnopqrstu",
            "0123456789abcdef0123456789abcdef",
            "dGhpcyBpcyBhIGxvbmcgYmFzZTY0IHRva2VuIDEyMw==",
            "abcd****wxyz",
        ] {
            let r = redact(&format!("value {secret} refused"));
            assert_eq!(r, "value [redacted] refused", "{secret}");
        }
        assert_eq!(
            redact("header was Bearer abc.def.ghi"),
            "header was Bearer [redacted]"
        );
        assert_eq!(
            redact("model gpt-4o-2024-08-06 not found"),
            "model gpt-4o-2024-08-06 not found"
        );
        assert_eq!(redact("two\nlines\r"), "two lines ");
        let long = redact(&"word ".repeat(1000));
        assert_eq!(long.chars().count(), super::MESSAGE_CHARS + 1);
        assert!(long.ends_with('…'));
    }
}
