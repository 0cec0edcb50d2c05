//! tollgate: one OpenAI-compatible API and one key for every model provider.
//!
//! The modules follow the request path (see ARCHITECTURE.md): `server` → `pipeline` →
//! `routing` → `plugins` → `upstream`, with `config`, `error`, `metrics` and `telemetry` around
//! them.

pub mod accounts;
pub mod admin;
pub mod app;
pub mod auth;
pub mod background;
pub mod billing;
pub mod config;
pub mod error;
pub mod kit;
pub mod limits;
pub mod metrics;
pub mod moderation;
pub mod pipeline;
pub mod plugins;
pub mod policy;
pub mod routing;
pub mod server;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod upstream;
pub mod watch;
