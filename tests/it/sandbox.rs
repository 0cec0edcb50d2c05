//! The plugin sandbox: guests that loop forever, allocate without bound, panic, return garbage or
//! reach for the environment each fail only their own request (502 naming the plugin), are
//! counted, and the gateway keeps serving. And no plugin ever receives a secret.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use crate::common::*;

const GUESTS: &[&str] = &[
    "tg_spin",
    "tg_hog",
    "tg_panicky",
    "tg_garbage",
    "tg_envy",
    "tg_snoop",
];

async fn gateway_with_guests(up: &MockUpstream) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for g in GUESTS {
        std::fs::copy(artifact(g), plugins.join(format!("{g}.wasm"))).unwrap();
    }
    let channels: String = GUESTS
        .iter()
        .map(|g| {
            format!(
                "  - {{ name: ch-{g}, plugin: {g}, base_url: \"{}\", api_key_env: MOCK_KEY }}\n",
                up.base_url()
            )
        })
        .collect();
    let models: String = GUESTS
        .iter()
        .map(|g| format!("  - {{ name: m-{g}, channel: ch-{g}, upstream_model: gpt-test }}\n"))
        .collect();
    let yaml = config_yaml(None, &channels, &models, &plugins);
    TestGateway::start_yaml(&yaml, dir).await
}

async fn expect_plugin_failure(gw: &TestGateway, model: &str, code: &str, plugin: &str) {
    let body = assert_openai_error(gw.chat(model, false).await, 502, code).await;
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(plugin), "message names the plugin: {msg}");
    // Only that request failed: the gateway serves the next one.
    assert_eq!(gw.chat("demo-chat", false).await.status(), 200);
}

#[tokio::test]
async fn a_guest_that_loops_forever_hits_the_cpu_bound() {
    let up = MockUpstream::start().await;
    let gw = gateway_with_guests(&up).await;
    expect_plugin_failure(&gw, "m-tg_spin", "plugin_timeout", "tg_spin").await;
    let m = gw.metrics().await;
    assert!(m.contains("tollgate_plugin_failures_total{plugin=\"tg_spin\",call=\"build_request\",reason=\"cpu_limit\"} 1"), "{m}");
}

#[tokio::test]
async fn a_guest_that_allocates_without_bound_hits_the_memory_cap() {
    let up = MockUpstream::start().await;
    let gw = gateway_with_guests(&up).await;
    expect_plugin_failure(&gw, "m-tg_hog", "plugin_memory_limit", "tg_hog").await;
    let m = gw.metrics().await;
    assert!(m.contains("reason=\"memory_limit\"} 1"), "{m}");
}

#[tokio::test]
async fn a_guest_that_panics_fails_its_request_only() {
    let up = MockUpstream::start().await;
    let gw = gateway_with_guests(&up).await;
    expect_plugin_failure(&gw, "m-tg_panicky", "plugin_trap", "tg_panicky").await;
    // Many times over, concurrently with good requests: nothing leaks, nothing else fails.
    let mut handles = Vec::new();
    for i in 0..40 {
        let client = gw.client.clone();
        let url = format!("{}/v1/chat/completions", gw.public);
        let model = if i % 2 == 0 {
            "m-tg_panicky"
        } else {
            "demo-chat"
        };
        handles.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            (model, r.status().as_u16())
        }));
    }
    for h in handles {
        let (model, status) = h.await.unwrap();
        assert_eq!(status, if model == "demo-chat" { 200 } else { 502 });
    }
}

#[tokio::test]
async fn a_guest_that_returns_garbage_is_refused() {
    let up = MockUpstream::start().await;
    let gw = gateway_with_guests(&up).await;
    // An invalid method and path from build-request.
    expect_plugin_failure(&gw, "m-tg_garbage", "plugin_bad_output", "tg_garbage").await;
    // A parse-response that is not JSON.
    let resp = gw
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "m-tg_garbage", "variant": "bad-json", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    let body = assert_openai_error(resp, 502, "plugin_bad_output").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tg_garbage")
    );
}

#[tokio::test]
async fn a_guest_has_no_wasi_capabilities() {
    let up = MockUpstream::start().await;
    let gw = gateway_with_guests(&up).await;
    // Reading the environment or a file traps: there is no WASI for guests.
    expect_plugin_failure(&gw, "m-tg_envy", "plugin_trap", "tg_envy").await;
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn no_plugin_ever_receives_a_secret() {
    let up = MockUpstream::start().await;
    let gw = gateway_with_guests(&up).await;
    let resp = gw.chat("m-tg_snoop", false).await;
    assert_eq!(resp.status(), 200);
    let seen = up.last();
    // The snoop plugin echoed everything it was given into the body...
    let echoed: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(echoed["context"]["model"], "gpt-test", "{echoed}");
    assert!(echoed["request"].as_str().unwrap().contains("Say hello"));
    // ...and the secret is not in it: only the host added it, as a header.
    assert!(!seen.body.contains("sk-test-secret"), "{}", seen.body);
    assert_eq!(seen.headers["authorization"], "Bearer sk-test-secret");
}
