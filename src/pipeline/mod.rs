//! The request path as plain calls, one file per API. Handlers in `server` call these.

pub mod chat;
