//! Policy plugins: components of the `policy` world, run after the compiled rules with the
//! normalized text and request metadata; each call sandboxed like a provider's (fresh instance,
//! memory cap, CPU bound yielding to tokio at every tick, no WASI).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::Store;

use super::bindings::policy::exports::tollgate::plugin::policy_api as wit;
use super::pool::{Idle, Pool};
use super::{GuestState, HostCore, LoadError, Origin, PluginError, Yielding, classify};

/// What a policy plugin decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginVerdict {
    pub action: PluginAction,
    pub category: String,
    pub rule: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginAction {
    Allow,
    Flag,
    Block,
}

/// What a policy plugin is given: never a secret, never the raw request body.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    pub normalized: &'a str,
    pub original: &'a str,
    pub model: &'a str,
    pub route: &'a str,
    pub policy_set: &'a str,
}

pub struct PolicyPlugin {
    pub name: String,
    pub version: String,
    pub categories: Vec<String>,
    pub origin: Origin,
    pub digest: [u8; 32],
    pre: super::bindings::policy::PolicyPre<GuestState>,
    host: Arc<HostCore>,
    /// Idle instances kept for the next requests, if this plugin's are reused.
    pool: Option<Arc<Pool<wit::Guest>>>,
}

impl std::fmt::Debug for PolicyPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyPlugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

impl HostCore {
    /// Compile a policy component and read its manifest.
    pub fn load_policy(
        self: &Arc<Self>,
        label: &str,
        bytes: &[u8],
        origin: Origin,
    ) -> Result<PolicyPlugin, LoadError> {
        let (instance_pre, digest) = self.instance_pre(label, bytes)?;
        let pre = super::bindings::policy::PolicyPre::new(instance_pre)
            .map_err(|e| LoadError::World(label.into(), format!("{e:#}")))?;
        let mut plugin = PolicyPlugin {
            name: label.into(),
            version: String::new(),
            categories: Vec::new(),
            origin,
            digest,
            pre,
            host: self.clone(),
            pool: None,
        };
        // Loading runs outside any request: its call is driven here, with plain yields.
        let m = futures::executor::block_on(plugin.call(
            "describe",
            Yielding::Plain,
            |g, mut s| async move {
                let r = g.call_describe(&mut s).await;
                (s, r)
            },
        ))
        .map_err(|e| LoadError::Manifest(label.into(), e.to_string()))?;
        if m.name != label {
            return Err(LoadError::NameMismatch {
                file: label.into(),
                name: m.name,
            });
        }
        plugin.version = m.version;
        plugin.categories = m.categories;
        plugin.pool = super::pool::for_plugin(&self.reuse, label, &plugin.origin, &self.idle);
        Ok(plugin)
    }
}

impl PolicyPlugin {
    /// One call, on an idle instance if the plugin's are reused and one is at hand, else on a
    /// fresh one: `f` is lent the guest's exports and the store and gives the store back with
    /// the result. An instance whose call returned normally goes back to the pool.
    async fn call<T, Fut>(
        &self,
        call: &'static str,
        yielding: Yielding,
        f: impl FnOnce(wit::Guest, Store<GuestState>) -> Fut,
    ) -> Result<T, PluginError>
    where
        Fut: Future<Output = (Store<GuestState>, wasmtime::Result<T>)>,
    {
        let started = Instant::now();
        let pool = self.pool.as_ref().filter(|_| yielding == Yielding::Tokio);
        let (mut store, guest, uses) = match pool.and_then(|p| p.take()) {
            Some(idle) => (idle.store, idle.guest, idle.uses),
            None => {
                let mut store = self.host.new_store(yielding);
                match self.pre.instantiate_async(&mut store).await {
                    Ok(inst) => (store, inst.tollgate_plugin_policy_api().clone(), 0),
                    Err(e) => return Err(self.failed(call, started, &store, e)),
                }
            }
        };
        super::start_call(&mut store);
        let (store, result) = f(guest.clone(), store).await;
        match result {
            Ok(r) => {
                self.host
                    .metrics
                    .plugin_call(&self.name, call, started.elapsed());
                if let Some(pool) = pool {
                    pool.put(Idle { store, guest, uses });
                }
                Ok(r)
            }
            Err(e) => Err(self.failed(call, started, &store, e)),
        }
    }

    /// A call that failed in the sandbox (or could not start): timed, classified and counted.
    fn failed(
        &self,
        call: &'static str,
        started: Instant,
        store: &Store<GuestState>,
        e: wasmtime::Error,
    ) -> PluginError {
        let metrics = &self.host.metrics;
        metrics.plugin_call(&self.name, call, started.elapsed());
        let err = classify(&self.name, call, store, e);
        metrics.plugin_failure(&self.name, call, err.reason());
        err
    }

    /// Screen one request's text.
    pub async fn screen(&self, input: &PolicyInput<'_>) -> Result<PluginVerdict, PluginError> {
        let wi = wit::ScreenInput {
            normalized: input.normalized.to_string(),
            original: input.original.to_string(),
            model: input.model.to_string(),
            route: input.route.to_string(),
            policy_set: input.policy_set.to_string(),
        };
        let v = self
            .call("screen", Yielding::Tokio, |g, mut s| async move {
                let r = g.call_screen(&mut s, &wi).await;
                (s, r)
            })
            .await?;
        Ok(PluginVerdict {
            action: match v.action {
                wit::Action::Allow => PluginAction::Allow,
                wit::Action::Flag => PluginAction::Flag,
                wit::Action::Block => PluginAction::Block,
            },
            category: v.category,
            rule: v.rule,
            reason: v.reason,
        })
    }
}
