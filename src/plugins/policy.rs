//! Policy plugins: components of the `policy` world, run after the compiled rules with the
//! normalized text and request metadata; each call sandboxed like a provider's (fresh instance,
//! memory cap, CPU bound, no WASI).

use std::sync::Arc;
use std::time::Instant;

use wasmtime::Store;

use super::bindings::policy::exports::tollgate::plugin::policy_api as wit;
use super::{GuestState, HostCore, LoadError, Origin, PluginError, classify};

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
        };
        let m = plugin
            .call("describe", |g, s| g.call_describe(s))
            .map_err(|e| LoadError::Manifest(label.into(), e.to_string()))?;
        if m.name != label {
            return Err(LoadError::NameMismatch {
                file: label.into(),
                name: m.name,
            });
        }
        plugin.version = m.version;
        plugin.categories = m.categories;
        Ok(plugin)
    }
}

impl PolicyPlugin {
    fn call<T>(
        &self,
        call: &'static str,
        f: impl FnOnce(&wit::Guest, &mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let mut store = self.host.new_store();
        let started = Instant::now();
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|inst| f(inst.tollgate_plugin_policy_api(), &mut store));
        self.host
            .metrics
            .plugin_call(&self.name, call, started.elapsed());
        result.map_err(|e| {
            let err = classify(&self.name, call, &store, e);
            self.host
                .metrics
                .plugin_failure(&self.name, call, err.reason());
            err
        })
    }

    /// Screen one request's text.
    pub fn screen(&self, input: &PolicyInput<'_>) -> Result<PluginVerdict, PluginError> {
        let wi = wit::ScreenInput {
            normalized: input.normalized.to_string(),
            original: input.original.to_string(),
            model: input.model.to_string(),
            route: input.route.to_string(),
            policy_set: input.policy_set.to_string(),
        };
        let v = self.call("screen", |g, s| g.call_screen(s, &wi))?;
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
