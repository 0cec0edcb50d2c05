//! Criterion benchmark of screening: every category loaded, a realistic 2 KB benign prompt;
//! and the second stage, the `policy_scorer` plugin (built, not bundled), on the same prompt (a fresh
//! sandboxed instance per call, as in the gateway).
//! Run: `cargo bench --bench policy`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::policy::Compiled;

fn prompt_2kb() -> String {
    let para = "Please review the following quarterly report for our logistics team. Shipments to \
        the northern warehouses grew by twelve percent, while returns fell slightly after we changed \
        the packaging supplier. Summarize the key trends, point out any numbers that look \
        inconsistent, and suggest three questions the board might ask at the next meeting. ";
    let mut s = String::new();
    while s.len() < 2048 {
        s.push_str(para);
    }
    s.truncate(2048);
    s
}

fn screening(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let compiled = Compiled::load(&dir).unwrap();
    let text = prompt_2kb();
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("screen_2kb_benign", |b| {
        b.iter(|| compiled.screen(&text, "default"))
    });
    // The first step of screening on its own, to see its share.
    g.bench_function("normalize_2kb_benign", |b| {
        b.iter(|| tollgate::moderation::normalize::normalize(&text))
    });
    g.finish();
}

fn scorer_plugin(c: &mut Criterion) {
    let cfg = tollgate::config::load(None).unwrap();
    let mut pcfg = cfg.plugins.clone();
    // The scorer is not bundled (an operator drops it in): load the built component from a
    // plugins folder of its own.
    pcfg.dir = std::env::temp_dir().join("tollgate-bench-scorer");
    std::fs::create_dir_all(&pcfg.dir).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("TOLLGATE_PLUGIN_ARTIFACTS")).join("policy_scorer.wasm"),
        pcfg.dir.join("policy_scorer.wasm"),
    )
    .unwrap();
    let metrics = std::sync::Arc::new(tollgate::metrics::Metrics::new());
    let registry = tollgate::plugins::Registry::new(&pcfg, metrics).unwrap();
    let scorer = registry
        .policies()
        .into_iter()
        .find(|p| p.name == "policy_scorer")
        .expect("policy_scorer is loaded from the folder");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = prompt_2kb();
    let input = tollgate::plugins::PolicyInput {
        normalized: &text,
        original: &text,
        model: "bench",
        route: "chat",
        policy_set: "default",
    };
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("scorer_plugin_2kb_benign", |b| {
        b.iter(|| rt.block_on(scorer.screen(&input)).unwrap())
    });
    let short = "What is a good name for a bakery that sells sourdough and coffee?";
    let input = tollgate::plugins::PolicyInput {
        original: short,
        normalized: short,
        ..input
    };
    g.bench_function("scorer_plugin_short_benign", |b| {
        b.iter(|| rt.block_on(scorer.screen(&input)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, screening, scorer_plugin);
criterion_main!(benches);
