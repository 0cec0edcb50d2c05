//! The one place WIT bindings are generated (from `plugins/wit`), one module per world. Every
//! export is called `async` (on a fiber, so a call can yield to tokio at each epoch tick).

/// The `provider` world: what a provider plugin exports.
pub mod provider {
    wasmtime::component::bindgen!({
        world: "provider",
        path: "plugins/wit",
        exports: { default: async },
    });
}

/// The `policy` world: what a policy plugin exports.
pub mod policy {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "plugins/wit",
        exports: { default: async },
    });
}

/// The `task-provider` world: a provider of long-running jobs exports the provider API and the
/// task API. Only its task API is read from here (`TaskProviderIndices`); the shared records are
/// the `provider` world's.
pub mod task_provider {
    wasmtime::component::bindgen!({
        world: "task-provider",
        path: "plugins/wit",
        exports: { default: async },
        with: {
            "tollgate:plugin/types": super::provider::tollgate::plugin::types,
        },
    });
}
