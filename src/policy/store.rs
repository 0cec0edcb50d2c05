//! `PolicyStore`: the compiled policies in force, swapped atomically when a change compiles and
//! passes its examples, and the watcher that reloads them when the folder changes. A refused
//! change never replaces the last good policies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{Compiled, PolicyError};

/// The compiled policies in force, swapped atomically on a good change.
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<Compiled>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl PolicyStore {
    /// Load at start: a bad policy folder is fatal here (there is no last good one yet).
    pub fn load(
        dir: &Path,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Arc<Self>, Vec<PolicyError>> {
        let compiled = Compiled::load(dir)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(compiled),
            metrics,
            last_error: std::sync::Mutex::new(None),
        }))
    }

    pub fn current(&self) -> Arc<Compiled> {
        self.current.load_full()
    }

    /// Load the folder again; a change that does not parse or fails its examples is refused and
    /// the last good policies keep serving.
    pub fn reload(&self) -> Result<(), Vec<PolicyError>> {
        self.reload_keeping(&std::collections::BTreeSet::new())
    }

    /// [`PolicyStore::reload`], also refusing a change that removes a set named in `in_use`
    /// (the sets that API keys name: a key must never fall back to another set silently).
    pub fn reload_keeping(
        &self,
        in_use: &std::collections::BTreeSet<String>,
    ) -> Result<(), Vec<PolicyError>> {
        let loaded = Compiled::load(&self.dir).and_then(|c| {
            let missing: Vec<PolicyError> = in_use
                .iter()
                .filter(|set| !c.has_set(set))
                .map(|set| PolicyError {
                    file: self.dir.join("sets.yaml").display().to_string(),
                    line: None,
                    message: format!(
                        "set `{set}` is named by API keys and cannot be removed (move those keys to another set first)"
                    ),
                })
                .collect();
            if missing.is_empty() { Ok(c) } else { Err(missing) }
        });
        match loaded {
            Ok(c) => {
                self.current.store(Arc::new(c));
                if let Some(m) = &self.metrics {
                    m.policy_reload("loaded");
                }
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                tracing::info!(dir = %self.dir.display(), "policies reloaded");
                Ok(())
            }
            Err(errs) => {
                if let Some(m) = &self.metrics {
                    m.policy_reload("refused");
                }
                let text = errs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::warn!(errors = %text, "policy change refused; the last good policies keep serving");
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(text);
                Err(errs)
            }
        }
    }

    /// The last refusal, if the newest files were refused.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Watch the folder and reload on change.
    pub fn watch(
        self: &Arc<Self>,
        bg: &crate::background::Background,
    ) -> Result<crate::watch::Watch, String> {
        self.watch_keeping(bg, std::collections::BTreeSet::new)
    }

    /// Watch the folder and reload on change, keeping every set `in_use` returns then.
    pub fn watch_keeping(
        self: &Arc<Self>,
        bg: &crate::background::Background,
        in_use: impl Fn() -> std::collections::BTreeSet<String> + Send + 'static,
    ) -> Result<crate::watch::Watch, String> {
        let me = Arc::downgrade(self);
        crate::watch::spawn(bg, vec![self.dir.clone()], move || {
            if let Some(store) = me.upgrade() {
                let _ = store.reload_keeping(&in_use());
            }
        })
    }
}
