//! The wasmtime host: loads provider and policy components, runs every call sandboxed.
//!
//! Components are compiled once and pre-instantiated (`ProviderPre`); each request gets a fresh
//! [`Session`] (one store, one instance) that lives as long as the request's plugin calls and is
//! dropped with it. Every call runs under a memory cap ([`GuestState`] as the store's resource
//! limiter) and a CPU bound (`plugins.call_timeout` of running time, counted at each epoch tick);
//! calls are `async` on a fiber and give the thread back to tokio at every tick, so a slow guest
//! never holds an async worker. Guests get no WASI capabilities at all: every import
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
mod pool;
pub mod registry;
mod session;
mod tasks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};

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

/// Per-store state: the memory cap and whether the guest ran into it, and the CPU budget of the
/// call in progress.
pub struct GuestState {
    memory_limit: usize,
    hit_memory_limit: bool,
    /// The largest size the guest's linear memory reached (an instance that grew past
    /// [`KEEP_RESIDENT`] is not reused).
    memory_peak: usize,
    cpu: CpuBudget,
}

/// How a call gives its thread back at an epoch tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Yielding {
    /// To the tokio scheduler (`tokio::task::yield_now`: woken after the scheduler polled its
    /// I/O driver and ran the other ready tasks): a request's calls.
    Tokio,
    /// A plain yield that wakes itself at once: calls driven by `futures::executor::block_on`
    /// (loading a component, outside any request), where tokio's deferred wake-up would never come.
    Plain,
}

/// The running time a call may use, counted at each epoch tick: the time since the guest last
/// started or resumed, summed over the call. Time spent yielded to other tasks does not count.
struct CpuBudget {
    budget: Duration,
    used: Duration,
    /// When the guest last started or resumed, in nanoseconds since `origin`; the yield future
    /// writes it when the guest is resumed.
    resumed: Arc<AtomicU64>,
    origin: Instant,
    yielding: Yielding,
}

impl CpuBudget {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A new call starts: nothing used yet, running from now.
    fn start(&mut self) {
        self.used = Duration::ZERO;
        self.resumed.store(self.now(), Ordering::Relaxed);
    }

    /// An epoch tick reached a running guest: count the time it ran since it last resumed; trap
    /// once the budget is spent (a `Trap::Interrupt`: the call's timeout), else yield.
    fn tick(&mut self) -> UpdateDeadline {
        let ran = self
            .now()
            .saturating_sub(self.resumed.load(Ordering::Relaxed));
        self.used += Duration::from_nanos(ran);
        if self.used >= self.budget {
            return UpdateDeadline::Interrupt;
        }
        let resumed = self.resumed.clone();
        let origin = self.origin;
        let yielding = self.yielding;
        UpdateDeadline::YieldCustom(
            1,
            Box::pin(async move {
                match yielding {
                    Yielding::Tokio => tokio::task::yield_now().await,
                    Yielding::Plain => YieldOnce(false).await,
                }
                let now = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
                resumed.store(now, Ordering::Relaxed);
            }),
        )
    }
}

/// Pending once (waking itself at once), then ready.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
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
        self.memory_peak = self.memory_peak.max(desired);
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

/// A call starts: a fresh CPU budget, and the first tick one epoch away.
fn start_call(store: &mut Store<GuestState>) {
    store.data_mut().cpu.start();
    store.set_epoch_deadline(1);
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
    /// Idle instances kept for the next requests, if this plugin's are reused.
    pool: Option<Arc<pool::Pool<wit::Guest>>>,
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
    /// The running time each call may use (`plugins.call_timeout`).
    call_budget: Duration,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    reuse: crate::config::PluginReuse,
    /// Idle instances of every plugin, at most a quarter of the engine's slots.
    idle: Arc<pool::IdleBudget>,
}

impl Drop for HostCore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl HostCore {
    pub fn new(cfg: &PluginsConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, LoadError> {
        let mut slots = PoolingAllocationConfig::default();
        slots
            .total_component_instances(cfg.max_instances)
            .total_core_instances(cfg.max_instances.saturating_mul(4))
            .total_memories(cfg.max_instances)
            .total_tables(cfg.max_instances.saturating_mul(4))
            .max_memory_size(cfg.memory_limit_bytes)
            // One fiber stack per call in progress (calls are async).
            .total_stacks(cfg.max_instances)
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
            .allocation_strategy(InstanceAllocationStrategy::Pooling(slots))
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
        Ok(Arc::new(Self {
            engine,
            memory_limit: cfg.memory_limit_bytes,
            call_budget: cfg.call_timeout,
            metrics,
            stop,
            reuse: cfg.reuse.clone(),
            idle: pool::IdleBudget::new(cfg.max_instances),
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

    /// A fresh store with the memory cap and the CPU budget of one call: at every epoch tick
    /// the guest's running time is counted and the call yields (see [`CpuBudget`]).
    fn new_store(&self, yielding: Yielding) -> Store<GuestState> {
        let mut store = Store::new(
            &self.engine,
            GuestState {
                memory_limit: self.memory_limit,
                hit_memory_limit: false,
                memory_peak: 0,
                cpu: CpuBudget {
                    budget: self.call_budget,
                    used: Duration::ZERO,
                    resumed: Arc::new(AtomicU64::new(0)),
                    origin: Instant::now(),
                    yielding,
                },
            },
        );
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        store.epoch_deadline_callback(|mut cx| Ok(cx.data_mut().cpu.tick()));
        start_call(&mut store);
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
            pool: None,
        };
        // Loading runs outside any request (at start, or a reload on the blocking pool): its
        // calls are driven here, with plain yields.
        let manifest = futures::executor::block_on(async {
            let mut session = plugin
                .start_session(Yielding::Plain, false)
                .await
                .map_err(|e| LoadError::Instantiate(label.into(), e.to_string()))?;
            session
                .manifest()
                .await
                .map_err(|e| LoadError::Manifest(label.into(), e.to_string()))
        })?;
        if manifest.name != label {
            return Err(LoadError::NameMismatch {
                file: label.into(),
                name: manifest.name,
            });
        }
        plugin.manifest = manifest;
        plugin.pool = pool::for_plugin(&self.reuse, label, &plugin.origin, &self.idle);
        Ok(plugin)
    }
}
