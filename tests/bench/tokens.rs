//! Criterion benchmark of the estimate's token count: a 2 KB prompt through OpenAI's tokenizers
//! (`bpe-openai`), the per-byte bound, and a whole chat body's count.
//! Run: `cargo bench --bench tokens`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::pipeline::tokens::{self, Tokenizer};

/// `para` repeated to 2 KB, cut at a character boundary.
fn two_kb(para: &str) -> String {
    let mut s = String::new();
    while s.len() < 2048 {
        s.push_str(para);
    }
    let mut end = 2048;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn counting(c: &mut Criterion) {
    let english = two_kb(
        "Please review the following quarterly report for our logistics team. Shipments to \
         the northern warehouses grew by twelve percent, while returns fell slightly after we \
         changed the packaging supplier. Summarize the key trends and suggest three questions. ",
    );
    let chinese =
        two_kb("请审阅我们物流团队的季度报告。北方仓库的发货量增长了百分之十二，而退货略有下降。");
    for t in [Tokenizer::O200k, Tokenizer::Cl100k] {
        tokens::preload(t);
    }
    let mut g = c.benchmark_group("tokens");
    g.throughput(Throughput::Bytes(2048));
    g.bench_function("o200k_2kb_english", |b| {
        b.iter(|| tokens::count(Tokenizer::O200k, &english))
    });
    g.bench_function("cl100k_2kb_english", |b| {
        b.iter(|| tokens::count(Tokenizer::Cl100k, &english))
    });
    g.bench_function("o200k_2kb_chinese", |b| {
        b.iter(|| tokens::count(Tokenizer::O200k, &chinese))
    });
    g.bench_function("bytes_2kb_english", |b| {
        b.iter(|| tokens::count(Tokenizer::Bytes, &english))
    });
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a careful analyst."},
            {"role": "user", "content": english},
        ],
    });
    g.bench_function("chat_estimate_2kb_o200k", |b| {
        b.iter(|| tokens::chat(Tokenizer::O200k, &body))
    });
    g.finish();
}

criterion_group!(benches, counting);
criterion_main!(benches);
