//! Plugin instances kept for reuse (`plugins.reuse`): a trusted plugin's instance serves the next
//! request, and one that failed, grew its memory, held a large body or reached `max_uses` never
//! does. The `tg_tally` guest counts, in its instance's memory, the
//! requests that instance built, so each answer says which instance served it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use crate::common::*;

/// A gateway with `tg_tally` in its plugins folder; `reuse` is the `plugins.reuse` section.
async fn gateway(reuse: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(artifact("tg_tally"), plugins.join("tg_tally.wasm")).unwrap();
    let yaml = config_yaml(
        None,
        "  - { name: tally, plugin: tg_tally }\n",
        "  - { name: m-tally, channel: tally, free: true }\n",
        &plugins,
    )
    .replace("  max_body_bytes: 65536\n", "  max_body_bytes: 262144\n")
    .replace(
        "  max_instances: 200\n",
        &format!("  max_instances: 200\n  reuse: {reuse}\n"),
    );
    TestGateway::start_yaml(&yaml, dir).await
}

/// Send `said` (streamed or not) and return the text of the answer.
async fn ask(gw: &TestGateway, said: &str, stream: bool) -> String {
    let resp = gw
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({
                "model": "m-tally",
                "stream": stream,
                "messages": [{"role": "user", "content": said}],
            }),
        )
        .await;
    assert_eq!(resp.status(), 200, "{said:.40}");
    let text = resp.text().await.unwrap();
    if stream {
        sse_data(&text)
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect()
    } else {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[tokio::test]
async fn a_trusted_plugin_instance_serves_again_until_something_retires_it() {
    let gw = gateway("{ plugins: [tg_tally], max_uses: 6 }").await;
    // One request at a time: the same instance serves each.
    for n in 1..=3 {
        assert_eq!(ask(&gw, "hello", false).await, format!("served {n}"));
    }
    // A trap: that request fails and its instance is gone; the next one starts afresh.
    let panics = gw
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "m-tally", "messages": [{"role": "user", "content": "panic now"}]}),
        )
        .await;
    let body = assert_openai_error(panics, 502, "plugin_trap").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tg_tally")
    );
    assert_eq!(ask(&gw, "hello", false).await, "served 1");
    // A stream that reached its end: its instance serves again.
    assert_eq!(ask(&gw, "hello", true).await, "served 2");
    assert_eq!(ask(&gw, "hello", false).await, "served 3");
    // Memory grown past what a kept instance may hold: dropped after its request.
    assert_eq!(ask(&gw, "grow", false).await, "served 4");
    assert_eq!(ask(&gw, "hello", false).await, "served 1");
    // A large body: the instance that built the request held copies of it and is dropped; the
    // answer was read on a fresh one, which counted nothing and serves next.
    let big = "x".repeat(70_000);
    assert_eq!(ask(&gw, &big, false).await, "served 2");
    // `max_uses: 6`: that instance read the large request's answer; five more requests and it
    // has served six, its last.
    for n in 1..=5 {
        assert_eq!(ask(&gw, "hello", false).await, format!("served {n}"));
    }
    assert_eq!(ask(&gw, "hello", false).await, "served 1");
}

#[tokio::test]
async fn a_dropped_in_plugin_is_not_reused_unless_the_operator_names_it() {
    let gw = gateway("{ plugins: [] }").await;
    for _ in 0..3 {
        assert_eq!(ask(&gw, "hello", false).await, "served 1");
    }
    let gw = gateway("{ plugins: [tg_tally], max_uses: 1 }").await;
    for _ in 0..2 {
        assert_eq!(ask(&gw, "hello", false).await, "served 1");
    }
}

#[tokio::test]
async fn concurrent_requests_never_share_an_instance() {
    let gw = gateway("{ plugins: [tg_tally] }").await;
    let answers = futures::future::join_all((0..16).map(|_| ask(&gw, "hello", false))).await;
    // Each instance counts its own requests: 16 requests on k instances give each instance's
    // counts 1..=n with no number missing or repeated within an instance.
    let mut counts: Vec<u32> = answers
        .iter()
        .map(|a| a.trim_start_matches("served ").parse().unwrap())
        .collect();
    counts.sort_unstable();
    let instances = counts.iter().filter(|&&c| c == 1).count();
    assert!(instances >= 1);
    for c in 1..=*counts.last().unwrap() {
        let with_c = counts.iter().filter(|&&x| x == c).count();
        let with_next = counts.iter().filter(|&&x| x == c + 1).count();
        assert!(with_next <= with_c, "{counts:?}");
    }
    assert_eq!(counts.len(), 16);
}
