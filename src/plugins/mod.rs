//! The wasmtime host: loads provider and policy components, runs every call sandboxed.
//!
//! Components are compiled once and pre-instantiated (`ProviderPre`); each request gets a fresh
//! [`Session`] (one store, one instance) that lives as long as the request's plugin calls and is
//! dropped with it. Every call runs under a memory cap ([`GuestState`] as the store's resource
//! limiter) and a CPU bound (epoch deadline); guests get no WASI capabilities at all: every import
//! a component declares is defined as a trap. A trap, an overrun or output that does not parse is
//! a [`PluginError`] for that request only.
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
        message: String,
        status: Option<u16>,
        retry_after_ms: Option<u64>,
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

    fn guest_error(&self, call: &'static str, e: wtypes::PluginError) -> PluginError {
        let class = match e.class {
            wtypes::ErrorClass::InvalidRequest => GuestErrorClass::InvalidRequest,
            wtypes::ErrorClass::RateLimited => GuestErrorClass::RateLimited,
            wtypes::ErrorClass::Auth => GuestErrorClass::Auth,
            wtypes::ErrorClass::ContentRefused => GuestErrorClass::ContentRefused,
            wtypes::ErrorClass::NotFound => GuestErrorClass::NotFound,
            wtypes::ErrorClass::Upstream => GuestErrorClass::Upstream,
        };
        let _ = call;
        PluginError::Guest {
            plugin: self.name.to_string(),
            class,
            message: e.message,
            status: e.status,
            retry_after_ms: e.retry_after_ms,
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
            Err(e) => Err(self.guest_error("build_request", e)),
            Ok(wtypes::Outbound::Send(req)) => {
                let method = http::Method::from_bytes(req.method.as_bytes())
                    .map_err(|_| self.bad_output("build_request", "invalid HTTP method"))?;
                if !req.path.starts_with('/') {
                    return Err(self.bad_output("build_request", "path must start with `/`"));
                }
                if req.path.contains(['\r', '\n', ' ', '#']) {
                    return Err(self.bad_output("build_request", "path has invalid characters"));
                }
                let mut headers = http::HeaderMap::new();
                for h in req.headers {
                    let name = http::HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| self.bad_output("build_request", "invalid header name"))?;
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
        let wresp = wtypes::HttpResponse {
            status: response.status,
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
        out.map_err(|e| self.guest_error("parse_response", e))
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
            Err(e) => Err(self.guest_error("parse_stream_event", e)),
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
