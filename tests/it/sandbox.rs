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
        .map(|g| {
            format!(
                "  - {{ name: m-{g}, channel: ch-{g}, upstream_model: gpt-test, free: true }}\n"
            )
        })
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

/// An upstream that counts every request, whatever its path or `Host`, and answers each with a
/// chat completion.
struct CatchAll {
    base_url: String,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CatchAll {
    async fn start() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                (
                    [("content-type", "application/json")],
                    fixture("openai/chat.json"),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base_url: format!("http://{addr}/v1"),
            hits,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_guest_cannot_leave_the_base_url_or_set_owned_headers() {
    let up = CatchAll::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(artifact("tg_escape"), plugins.join("tg_escape.wasm")).unwrap();
    let channels = format!(
        "  - {{ name: ch-escape, plugin: tg_escape, base_url: \"{}\", api_key_env: MOCK_KEY }}\n",
        up.base_url
    );
    let models =
        "  - { name: m-escape, channel: ch-escape, upstream_model: gpt-test, free: true }\n";
    let yaml = config_yaml(None, &channels, models, &plugins);
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    let variants = ["dotdot", "encoded", "backslash", "host", "authorization"];
    for variant in variants {
        let resp = gw
            .post_json(
                "/v1/chat/completions",
                serde_json::json!({"model": "m-escape", "variant": variant, "messages": [{"role": "user", "content": "x"}]}),
            )
            .await;
        let body = assert_openai_error(resp, 502, "plugin_bad_output").await;
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("tg_escape"), "{variant}: {msg}");
        assert_eq!(up.hits(), 0, "{variant} reached the upstream");
    }
    let m = gw.metrics().await;
    assert!(
        m.contains(&format!(
            "tollgate_plugin_failures_total{{plugin=\"tg_escape\",call=\"build_request\",reason=\"bad_output\"}} {}",
            variants.len()
        )),
        "{m}"
    );
    // The same guest's ordinary request goes through: only the escapes were refused.
    let resp = gw
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "m-escape", "variant": "plain", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(up.hits(), 1);
}

/// A guest that spins for its whole CPU budget holds no async worker: on a gateway whose
/// runtime has one worker thread, a cheap request sent while the spinner runs is answered
/// before the spinner's call ends (its call yields to tokio at every epoch tick), and the
/// spinner still fails on its CPU bound.
#[test]
fn a_spinning_guest_does_not_stall_other_requests() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let up = client_rt.block_on(MockUpstream::start());
    let gw = gateway_rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::copy(artifact("tg_spin"), plugins.join("tg_spin.wasm")).unwrap();
        let channels = format!(
            "  - {{ name: ch-spin, plugin: tg_spin, base_url: \"{}\", api_key_env: MOCK_KEY }}\n",
            up.base_url()
        );
        let models =
            "  - { name: m-spin, channel: ch-spin, upstream_model: gpt-test, free: true }\n";
        // Long enough that the spinner is surely still running when the cheap request ends.
        let yaml = config_yaml(None, &channels, models, &plugins)
            .replace("call_timeout: 200ms", "call_timeout: 2s");
        TestGateway::start_yaml(&yaml, dir).await
    });
    let order = std::sync::Arc::new(AtomicUsize::new(0));
    let post = |model: &'static str| {
        let client = gw.client.clone();
        let url = format!("{}/v1/chat/completions", gw.public);
        let order = order.clone();
        async move {
            let r = client
                .post(url)
                .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (order.fetch_add(1, Ordering::SeqCst), status, body)
        }
    };
    let (spinner, cheap) = client_rt.block_on(async {
        let spinner = tokio::spawn(post("m-spin"));
        // Give the spinner a head start so that its call is in progress.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let cheap = post("demo-chat").await;
        (spinner.await.unwrap(), cheap)
    });
    assert_eq!(cheap.1, 200, "the cheap request is served: {}", cheap.2);
    assert_eq!(spinner.1, 502, "the spinner fails: {}", spinner.2);
    assert_eq!(
        spinner.2["error"]["code"], "plugin_timeout",
        "{}",
        spinner.2
    );
    assert!(
        cheap.0 < spinner.0,
        "the cheap request was answered while the spinner's call still ran"
    );
    gateway_rt.block_on(async move { drop(gw) });
}
