//! The integration tests as one binary (one link of wasmtime instead of one per file): each
//! module is one area of the gateway, run against real servers on 127.0.0.1.

mod anthropic;
mod billing;
mod chat;
mod cli;
mod common;
mod embeddings;
mod hardening;
mod hot_reload;
mod images;
mod limits;
mod openai_sdk;
mod policy;
mod pricing;
mod sandbox;
mod task_mocks;
mod tasks;
mod tasks_process;
mod tasks_upstream;
mod tidy;
