//! The one place WIT bindings are generated (from `plugins/wit`), one module per world.

/// The `provider` world: what a provider plugin exports.
pub mod provider {
    wasmtime::component::bindgen!({
        world: "provider",
        path: "plugins/wit",
    });
}

/// The `policy` world: what a policy plugin exports.
pub mod policy {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "plugins/wit",
    });
}
