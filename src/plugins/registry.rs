//! The set of loaded provider plugins: bundled ones plus every `*.wasm` in the plugins folder.
//!
//! The set is an immutable map behind an `ArcSwap`: a reload builds a new map and swaps it in,
//! so a request that already holds an `Arc<Plugin>` finishes on the version it started with.
//! A file that fails to compile, instantiate or describe itself is refused, counted and logged;
//! whatever served that name before keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{HostCore, LoadError, Origin, Plugin, PolicyPlugin};
use crate::config::PluginsConfig;
use crate::metrics::Metrics;

mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled_plugins.rs"));
}

/// What one rescan of the folder did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub loaded: Vec<String>,
    pub removed: Vec<String>,
    pub refused: Vec<String>,
}

pub struct Registry {
    core: Arc<HostCore>,
    dir: PathBuf,
    metrics: Arc<Metrics>,
    bundled: BTreeMap<String, Arc<Plugin>>,
    current: ArcSwap<BTreeMap<String, Arc<Plugin>>>,
    /// Bumped every time the set of providers is replaced (caches of what they serve key on it).
    generation: std::sync::atomic::AtomicU64,
    bundled_policies: BTreeMap<String, Arc<PolicyPlugin>>,
    policies: ArcSwap<BTreeMap<String, Arc<PolicyPlugin>>>,
    /// Serializes rescans (the watcher and an admin-triggered reload may race), and remembers
    /// the digest of each refused file so that it is reported once, not at every rescan.
    rescan_lock: Mutex<BTreeMap<PathBuf, [u8; 32]>>,
}

impl Registry {
    /// Compile the bundled plugins and load the folder once. A bad file in the folder is reported,
    /// not fatal; a bundled plugin that fails to load is a build defect and fails the start.
    pub fn new(cfg: &PluginsConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, LoadError> {
        let core = HostCore::new(cfg, metrics.clone())?;
        let mut bundled_map = BTreeMap::new();
        let mut bundled_policies = BTreeMap::new();
        if cfg.bundled {
            for (name, bytes) in bundled::BUNDLED {
                match core.load_any(name, bytes, Origin::Bundled)? {
                    Loaded::Provider(p) => {
                        bundled_map.insert((*name).to_string(), Arc::from(p));
                    }
                    Loaded::Policy(p) => {
                        bundled_policies.insert((*name).to_string(), Arc::new(p));
                    }
                }
                metrics.plugin_load(name, "loaded");
            }
        }
        let registry = Arc::new(Self {
            core,
            dir: cfg.dir.clone(),
            metrics,
            current: ArcSwap::from_pointee(bundled_map.clone()),
            generation: std::sync::atomic::AtomicU64::new(0),
            bundled: bundled_map,
            policies: ArcSwap::from_pointee(bundled_policies.clone()),
            bundled_policies,
            rescan_lock: Mutex::new(BTreeMap::new()),
        });
        registry.rescan();
        Ok(registry)
    }

    /// How many times the set of providers was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.current.load().get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Plugin>> {
        self.current.load().values().cloned().collect()
    }

    /// The policy plugins in force, in name order.
    pub fn policies(&self) -> Vec<Arc<PolicyPlugin>> {
        self.policies.load().values().cloned().collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Compile a component that is not (yet) in the folder, a provider or a policy plugin: for
    /// `tollgate plugin check`.
    pub fn load_detached(&self, path: &Path) -> Result<Loaded, LoadError> {
        let bytes = std::fs::read(path)
            .map_err(|e| LoadError::Io(path.display().to_string(), e.to_string()))?;
        let name = stem(path).unwrap_or_default();
        self.core
            .load_any(&name, &bytes, Origin::File(path.to_path_buf()))
    }

    /// Look at the folder again: load new and changed files, drop removed ones.
    pub fn rescan(&self) -> ReloadReport {
        let mut refused = self
            .rescan_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut report = ReloadReport::default();
        let old = self.current.load_full();
        let old_policies = self.policies.load_full();
        let mut next: BTreeMap<String, Arc<Plugin>> = BTreeMap::new();
        let mut next_policies: BTreeMap<String, Arc<PolicyPlugin>> = BTreeMap::new();
        let files = list_wasm(&self.dir);
        for path in &files {
            let Some(name) = stem(path) else { continue };
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    // Vanished between listing and reading: treat as removed below.
                    tracing::debug!(file = %path.display(), error = %e, "plugin file unreadable");
                    continue;
                }
            };
            use sha2::Digest;
            let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            if let Some(prev) = old.get(&name)
                && prev.digest == digest
                && prev.origin == Origin::File(path.clone())
            {
                next.insert(name, prev.clone());
                continue;
            }
            if let Some(prev) = old_policies.get(&name)
                && prev.digest == digest
                && prev.origin == Origin::File(path.clone())
            {
                next_policies.insert(name, prev.clone());
                continue;
            }
            if refused.get(path) == Some(&digest) {
                if let Some(prev) = old.get(&name) {
                    next.insert(name.clone(), prev.clone());
                }
                if let Some(prev) = old_policies.get(&name) {
                    next_policies.insert(name, prev.clone());
                }
                continue;
            }
            match self
                .core
                .load_any(&name, &bytes, Origin::File(path.clone()))
            {
                Ok(Loaded::Policy(plugin)) => {
                    tracing::info!(plugin = %name, version = %plugin.version, file = %path.display(), "policy plugin loaded");
                    self.metrics.plugin_load(&name, "loaded");
                    report.loaded.push(name.clone());
                    refused.remove(path);
                    next_policies.insert(name, Arc::new(plugin));
                }
                Ok(Loaded::Provider(plugin)) => {
                    tracing::info!(plugin = %name, version = %plugin.manifest.version, file = %path.display(), "plugin loaded");
                    self.metrics.plugin_load(&name, "loaded");
                    report.loaded.push(name.clone());
                    refused.remove(path);
                    next.insert(name, Arc::from(plugin));
                }
                Err(e) => {
                    tracing::warn!(plugin = %name, file = %path.display(), error = %e, "plugin refused; the previous version keeps serving");
                    // A file name becomes a label only if it names a plugin that served here (a
                    // closed set); any other refused file is counted as `unrecognized`.
                    let known = old.contains_key(&name)
                        || old_policies.contains_key(&name)
                        || self.bundled.contains_key(&name)
                        || self.bundled_policies.contains_key(&name);
                    let label = if known { name.as_str() } else { "unrecognized" };
                    self.metrics.plugin_load(label, "refused");
                    report.refused.push(format!("{e}"));
                    refused.insert(path.clone(), digest);
                    if let Some(prev) = old.get(&name) {
                        next.insert(name.clone(), prev.clone());
                    }
                    if let Some(prev) = old_policies.get(&name) {
                        next_policies.insert(name, prev.clone());
                    }
                }
            }
        }
        // Bundled plugins serve every name no file overrides.
        for (name, plugin) in &self.bundled {
            next.entry(name.clone()).or_insert_with(|| plugin.clone());
        }
        for (name, prev) in old.iter() {
            let gone = !next.contains_key(name)
                || (matches!(prev.origin, Origin::File(_))
                    && next.get(name).is_some_and(|p| p.origin == Origin::Bundled));
            if gone {
                tracing::info!(plugin = %name, "plugin file removed");
                self.metrics.plugin_load(name, "removed");
                report.removed.push(name.clone());
            }
        }
        for (name, plugin) in &self.bundled_policies {
            next_policies
                .entry(name.clone())
                .or_insert_with(|| plugin.clone());
        }
        for name in old_policies.keys() {
            if !next_policies.contains_key(name) {
                self.metrics.plugin_load(name, "removed");
                report.removed.push(name.clone());
            }
        }
        self.current.store(Arc::new(next));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.policies.store(Arc::new(next_policies));
        report
    }

    /// Watch the folder and rescan on every change (debounced). Returns the watcher, which must be
    /// kept alive; dropping it stops watching.
    pub fn watch(
        self: &Arc<Self>,
        bg: &crate::background::Background,
    ) -> Result<crate::watch::Watch, LoadError> {
        let me = Arc::downgrade(self);
        crate::watch::spawn(bg, vec![self.dir.clone()], move || {
            if let Some(reg) = me.upgrade() {
                let report = reg.rescan();
                if !report.loaded.is_empty()
                    || !report.removed.is_empty()
                    || !report.refused.is_empty()
                {
                    tracing::debug!(?report, "plugins folder rescanned");
                }
            }
        })
        .map_err(|e| LoadError::Io(self.dir.display().to_string(), e))
    }
}

/// A component of either world.
pub enum Loaded {
    Provider(Box<Plugin>),
    Policy(PolicyPlugin),
}

impl HostCore {
    /// Load a component as a provider, or, if it is not one, as a policy plugin.
    pub fn load_any(
        self: &Arc<Self>,
        name: &str,
        bytes: &[u8],
        origin: Origin,
    ) -> Result<Loaded, LoadError> {
        match self.load(name, bytes, origin.clone()) {
            Ok(p) => Ok(Loaded::Provider(Box::new(p))),
            Err(LoadError::World(_, provider_err)) => match self.load_policy(name, bytes, origin) {
                Ok(p) => Ok(Loaded::Policy(p)),
                Err(LoadError::World(n, policy_err)) => {
                    Err(LoadError::World(n, format!("{provider_err}; {policy_err}")))
                }
                Err(other) => Err(other),
            },
            Err(other) => Err(other),
        }
    }
}

fn stem(path: &Path) -> Option<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

fn list_wasm(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    files.sort();
    files
}
