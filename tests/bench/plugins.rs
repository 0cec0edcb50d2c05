//! Criterion benchmark of the plugin boundary: a fresh sandboxed instance per request, then the
//! bundled `openai` plugin building an upstream request and parsing a response. Calls are
//! `async` (a fiber per call); each iteration drives its future with `block_on`.
//! Run: `cargo bench --bench plugins`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use futures::executor::block_on;
use tollgate::plugins::{ChannelContext, InboundResponse, Registry};

const REQUEST: &str = r#"{"model":"gpt-4o-mini","stream":false,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}"#;
const RESPONSE: &str = include_str!("../fixtures/openai/chat.json");

fn plugin_calls(c: &mut Criterion) {
    let cfg = tollgate::config::load(None).unwrap();
    let metrics = std::sync::Arc::new(tollgate::metrics::Metrics::new());
    let mut pcfg = cfg.plugins.clone();
    pcfg.dir = std::env::temp_dir().join("tollgate-bench-no-plugins");
    let registry = Registry::new(&pcfg, metrics).unwrap();
    let plugin = registry.get("openai").unwrap();
    let ctx = ChannelContext {
        channel: "bench".into(),
        base_url: "http://127.0.0.1:1/v1".into(),
        model: "gpt-4o-mini".into(),
        options: Vec::new(),
    };
    c.bench_function("plugin/instantiate", |b| {
        b.iter(|| block_on(plugin.session()).unwrap())
    });
    let mut session = block_on(plugin.session()).unwrap();
    c.bench_function("plugin/build_request", |b| {
        b.iter(|| block_on(session.build_request(&ctx, "chat", REQUEST)).unwrap())
    });
    c.bench_function("plugin/parse_response", |b| {
        b.iter(|| {
            let resp = InboundResponse {
                status: 200,
                headers: Vec::new(),
                body: RESPONSE.as_bytes().to_vec(),
            };
            block_on(session.parse_response(&ctx, "chat", resp)).unwrap()
        })
    });
    c.bench_function("plugin/whole_request", |b| {
        b.iter(|| {
            let mut s = block_on(plugin.session()).unwrap();
            block_on(s.build_request(&ctx, "chat", REQUEST)).unwrap();
            let resp = InboundResponse {
                status: 200,
                headers: Vec::new(),
                body: RESPONSE.as_bytes().to_vec(),
            };
            block_on(s.parse_response(&ctx, "chat", resp)).unwrap()
        })
    });
}

criterion_group!(benches, plugin_calls);
criterion_main!(benches);
