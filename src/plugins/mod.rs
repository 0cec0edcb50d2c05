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
mod error;
pub mod policy;
pub mod registry;
mod session;
mod tasks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use crate::config::PluginsConfig;
use crate::metrics::Metrics;
use bindings::provider::exports::tollgate::plugin::provider_api as wit;
use bindings::provider::tollgate::plugin::types as wtypes;

pub use error::{GuestErrorClass, LoadError, PluginError, redact};
pub use policy::{PluginAction, PluginVerdict, PolicyInput, PolicyPlugin};
pub use registry::Registry;
pub use session::Session;
use session::classify;
pub use tasks::{JobOutput, JobState, TaskSession};

/// How often the epoch advances; a call's CPU bound is a whole number of ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Bytes of each instance's linear memory kept resident between requests.
const KEEP_RESIDENT: usize = 4 * 1024 * 1024;
/// Upper bound on table elements a guest may grow to.
const TABLE_LIMIT: usize = 100_000;

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
    /// Where the task API's exports are, if the component has them (`task-provider` world).
    tasks: Option<bindings::task_provider::TaskProviderIndices>,
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
        let tasks = bindings::task_provider::TaskProviderIndices::new(&instance_pre).ok();
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
            tasks,
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
