//! Criterion benchmark of screening: every category loaded, a realistic 2 KB benign prompt.
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

criterion_group!(benches, screening);
criterion_main!(benches);
