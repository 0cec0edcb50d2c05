//! The integration tests as one binary (one link of wasmtime instead of one per file): each
//! module is one area of the gateway, run against real servers on 127.0.0.1.

mod anthropic;
mod billing;
mod catalog;
mod channels;
mod chat;
mod cli;
mod common;
mod credentials;
mod dashboard;
mod embeddings;
mod families;
mod gemini;
mod gemini_mock;
mod hardening;
mod hot_reload;
mod images;
mod limits;
mod messages;
mod openai_sdk;
mod plugin_kit;
mod policy;
mod pricing;
mod reuse;
mod sandbox;
mod shutdown;
mod speech;
mod task_mocks;
mod tasks;
mod tasks_process;
mod tasks_upstream;
mod tidy;
