//! Instances kept for reuse: a plugin the operator trusts to keep nothing between calls (the
//! bundled ones, and those named in `plugins.reuse.plugins`) serves many requests from one
//! instance instead of instantiating one per request and resetting its memory afterwards.
//!
//! Isolation is kept by what may come back: only an instance whose every call returned normally
//! (no trap, no CPU or memory overrun, no cancelled call, no output the host refused), whose
//! linear memory stayed under [`super::KEEP_RESIDENT`], and that served fewer than `max_uses`
//! requests. Anything else is dropped and its slot reset by the pooling allocator as before. A
//! reloaded plugin gets a new pool; the old one goes with the old version. Idle instances hold
//! slots of the engine's pool: together they take at most a quarter of `plugins.max_instances`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::Store;

use super::GuestState;
use crate::config::PluginReuse;

/// An instance at rest: its store, the exports a call needs, and how many requests it served.
pub(super) struct Idle<G> {
    pub store: Store<GuestState>,
    pub guest: G,
    pub uses: u32,
}

/// The idle instances of one plugin version (a plugin that is not reused has none).
pub(super) struct Pool<G> {
    idle: Mutex<Vec<Idle<G>>>,
    max_idle: usize,
    max_uses: u32,
    /// Idle instances of every plugin of the engine, against `limit`.
    total: Arc<IdleBudget>,
}

/// How many idle instances the engine holds, of how many it may.
pub(super) struct IdleBudget {
    held: AtomicUsize,
    limit: usize,
}

impl IdleBudget {
    pub fn new(max_instances: u32) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            limit: usize::try_from(max_instances / 4).unwrap_or(usize::MAX),
        })
    }

    /// Count one more idle instance, if there is room.
    fn reserve(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl<G> Pool<G> {
    pub fn new(max_idle: usize, max_uses: u32, total: Arc<IdleBudget>) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            max_uses,
            total,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle<G>>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle instance, most recently used first (its pages are the likeliest in cache).
    pub fn take(&self) -> Option<Idle<G>> {
        let got = self.lock().pop();
        if got.is_some() {
            self.total.release(1);
        }
        got
    }

    /// Give an instance back after a request whose calls all returned normally. It is kept if
    /// it may serve again and there is room; otherwise it is dropped (and its slot reset).
    pub fn put(&self, mut idle: Idle<G>) {
        idle.uses = idle.uses.saturating_add(1);
        let state = idle.store.data();
        if idle.uses >= self.max_uses
            || state.hit_memory_limit
            || state.memory_peak > super::KEEP_RESIDENT
        {
            return;
        }
        let mut list = self.lock();
        if list.len() >= self.max_idle || !self.total.reserve() {
            return;
        }
        list.push(idle);
    }
}

impl<G> Drop for Pool<G> {
    fn drop(&mut self) {
        let n = self.lock().len();
        self.total.release(n);
    }
}

/// The pool of a plugin of this name and origin, if the configuration reuses its instances.
pub(super) fn for_plugin<G>(
    cfg: &PluginReuse,
    name: &str,
    origin: &super::Origin,
    total: &Arc<IdleBudget>,
) -> Option<Arc<Pool<G>>> {
    let trusted = match origin {
        super::Origin::Bundled => cfg.bundled,
        super::Origin::File(_) => cfg.plugins.iter().any(|p| p == name),
    };
    (trusted && cfg.max_idle > 0 && cfg.max_uses > 1 && total.limit > 0)
        .then(|| Arc::new(Pool::new(cfg.max_idle, cfg.max_uses, total.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_wide_budget_bounds_idle_instances() {
        let budget = IdleBudget::new(9); // a quarter: 2
        assert!(budget.reserve());
        assert!(budget.reserve());
        assert!(!budget.reserve());
        budget.release(1);
        assert!(budget.reserve());
        assert_eq!(budget.held(), 2);
    }

    #[test]
    fn only_trusted_plugins_are_reused() {
        let cfg = PluginReuse {
            plugins: vec!["mine".into()],
            ..PluginReuse::default()
        };
        let total = IdleBudget::new(100);
        let file = super::super::Origin::File("plugins/x.wasm".into());
        let bundled = super::super::Origin::Bundled;
        assert!(for_plugin::<()>(&cfg, "openai", &bundled, &total).is_some());
        assert!(for_plugin::<()>(&cfg, "mine", &file, &total).is_some());
        assert!(for_plugin::<()>(&cfg, "theirs", &file, &total).is_none());
        let off = PluginReuse {
            bundled: false,
            ..PluginReuse::default()
        };
        assert!(for_plugin::<()>(&off, "openai", &bundled, &total).is_none());
        // An engine too small to spare a slot keeps nothing idle.
        assert!(for_plugin::<()>(&cfg, "openai", &bundled, &IdleBudget::new(3)).is_none());
    }
}
