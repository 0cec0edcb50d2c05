//! Chat completions end to end: the offline demo provider, an OpenAI-compatible mock upstream in
//! every documented shape of success and failure, and the error bodies of bad requests.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::time::Duration;

use crate::common::*;
use futures::StreamExt;

#[tokio::test]
async fn demo_answers_without_a_key_or_network() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.chat("demo-chat", false).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Say hello"), "{text}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // Deterministic: the same question gets the same answer.
    let again: serde_json::Value = gw.chat("demo-chat", false).await.json().await.unwrap();
    assert_eq!(again["choices"], body["choices"]);
    assert_eq!(up.hits(), 0, "the demo provider never calls an upstream");
}

#[tokio::test]
async fn demo_streams_chunks_then_done() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.chat("demo-chat", true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    assert!(data.len() >= 3, "{body}");
    assert_eq!(data.last().unwrap(), "[DONE]");
    let mut text = String::new();
    for d in &data[..data.len() - 1] {
        let chunk: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
    }
    let whole: serde_json::Value = gw.chat("demo-chat", false).await.json().await.unwrap();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn openai_upstream_non_streamed() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.chat("gpt-test", false).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello! How can I assist you today?"
    );
    assert_eq!(body["usage"]["total_tokens"], 29);
    let seen = up.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.headers["authorization"], "Bearer sk-test-secret");
    let sent: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(sent["model"], "gpt-test");
    assert_eq!(sent["messages"][0]["content"], "Say hello");
}

#[tokio::test]
async fn openai_upstream_streamed_is_relayed() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.chat("gpt-test", true).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let text: String = data[..data.len() - 1]
        .iter()
        .filter_map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "Hello!");
    let usage = data
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("usage chunk relayed");
    assert_eq!(usage["usage"]["total_tokens"], 11);
    let sent: serde_json::Value = serde_json::from_str(&up.last().body).unwrap();
    assert_eq!(sent["stream"], true);
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "usage asked for billing"
    );
}

#[tokio::test]
async fn upstream_5xx_is_a_502_in_openai_body() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let body = assert_openai_error(gw.chat("fail500", false).await, 502, "upstream_error").await;
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test]
async fn upstream_rate_limit_is_a_429_with_retry_after() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.chat("ratelimit", false).await;
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_openai_error(resp, 429, "upstream_rate_limited").await;
}

#[tokio::test]
async fn upstream_that_never_answers_is_a_504() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    assert_openai_error(gw.chat("hang", false).await, 504, "upstream_timeout").await;
    // The gateway is still serving.
    assert_eq!(gw.chat("demo-chat", false).await.status(), 200);
}

#[tokio::test]
async fn malformed_upstream_json_is_a_502_naming_the_plugin() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let body = assert_openai_error(gw.chat("malformed", false).await, 502, "upstream_error").await;
    let msg = body["error"]["message"].as_str().unwrap();
    assert_eq!(
        msg, "provider `openai` sent a malformed or unusable answer",
        "the plugin is named and nothing of the upstream's bytes is echoed"
    );
}

#[tokio::test]
async fn truncated_stream_ends_with_an_error_event_not_done() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.chat("truncated", true).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    assert_ne!(data.last().unwrap(), "[DONE]", "{body}");
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_truncated", "{body}");
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_upstream() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.chat("slow-stream", true).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chat.completion.chunk"));
    drop(body);
    // The upstream's response body is dropped once the gateway notices.
    for _ in 0..100 {
        if up.cancels() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.cancels(), 1, "the upstream saw the cancel");
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_reach_no_upstream() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let raw = |body: &'static str| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.public))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_openai_error(raw("{not json").await.unwrap(), 400, "invalid_request").await;
    assert_openai_error(
        raw(r#"{"messages":[{"role":"user","content":"x"}]}"#)
            .await
            .unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert_openai_error(
        raw(r#"{"model":"gpt-test"}"#).await.unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert_openai_error(
        raw(r#"{"model":"gpt-test","messages":[]}"#).await.unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert_openai_error(
        raw(r#"{"model":"gpt-test","messages":[{"content":"x"}]}"#)
            .await
            .unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert_openai_error(
        raw(r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#)
            .await
            .unwrap(),
        400,
        "invalid_request",
    )
    .await;
    let body = assert_openai_error(
        gw.chat("no-such-model", false).await,
        404,
        "model_not_found",
    )
    .await;
    assert_eq!(body["error"]["param"], "model");
    let big = format!(
        r#"{{"model":"gpt-test","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(70_000)
    );
    let resp = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.public))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_openai_error(resp, 413, "request_too_large").await;
    assert_openai_error(gw.get("/v1/nothing-here").await, 404, "not_found").await;
    assert_eq!(up.hits(), 0, "no bad request reached the upstream");
}

#[tokio::test]
async fn models_list_names_public_models_and_providers() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    let resp = gw.get("/v1/models").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"demo-chat") && ids.contains(&"gpt-test"),
        "{ids:?}"
    );
    let demo = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "demo-chat")
        .unwrap();
    assert_eq!(demo["owned_by"], "demo");
    assert_eq!(demo["tollgate"]["provider"]["name"], "demo");
}

#[tokio::test]
async fn metrics_and_health_live_on_the_operator_listener() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::with_upstream(&up).await;
    gw.chat("demo-chat", false).await;
    gw.chat("fail500", false).await;
    let text = gw.metrics().await;
    for needle in [
        "tollgate_requests_total{route=\"/v1/chat/completions\",model=\"demo-chat\",provider=\"demo\",outcome=\"ok\"} 1",
        "outcome=\"upstream_error\"",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_upstream_duration_seconds_bucket",
        "tollgate_plugin_call_duration_seconds_bucket",
        "tollgate_plugin_loads_total{plugin=\"demo\",outcome=\"loaded\"}",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("sk-test-secret"));
    let resp = gw
        .client
        .get(format!("{}/metrics", gw.public))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "metrics are not on the public listener");
    for path in ["/healthz", "/readyz"] {
        let r = gw
            .client
            .get(format!("{}{path}", gw.operator))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// The mock upstream with the models of the tests below; with `bounds`, small upstream bounds.
async fn gateway_with(up: &MockUpstream, bounds: bool) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let models: String = [
        "unauthorized",
        "forbidden",
        "leaky400",
        "huge",
        "huge-event",
    ]
    .iter()
    .map(|m| format!("  - {{ name: {m}, channel: mock, free: true }}\n"))
    .collect();
    let mut yaml = config_yaml(Some(&up.base_url()), "", &models, &plugins);
    if bounds {
        yaml = yaml.replace(
            "  stream_idle_timeout: 2s\n",
            "  stream_idle_timeout: 2s\n  max_body_bytes: 8192\n  max_event_bytes: 4096\n",
        );
        assert!(yaml.contains("max_event_bytes"));
    }
    TestGateway::start_yaml(&yaml, dir).await
}

#[tokio::test]
async fn a_refused_credential_is_a_generic_502_and_counted_for_the_operator() {
    let up = MockUpstream::start().await;
    let gw = gateway_with(&up, false).await;
    for model in ["unauthorized", "forbidden"] {
        let resp = gw.chat(model, false).await;
        let body = assert_openai_error(resp, 502, "upstream_auth_failed").await;
        let text = body.to_string();
        assert!(!text.contains("sk-"), "{text}");
        for upstream_words in ["Incorrect API key", "platform.openai.com", "proj_", "cret"] {
            assert!(!text.contains(upstream_words), "{text}");
        }
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("the provider refused the gateway's credentials"),
            "{text}"
        );
        assert_eq!(body["error"]["type"], "api_error");
    }
    assert_eq!(up.hits(), 2);
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_upstream_auth_failures_total{channel=\"mock\"} 2"),
        "{m}"
    );
    assert!(!m.contains("sk-test"), "{m}");
}

#[tokio::test]
async fn upstream_error_text_is_not_echoed() {
    let up = MockUpstream::start().await;
    let gw = gateway_with(&up, false).await;
    let body = assert_openai_error(gw.chat("leaky400", false).await, 400, "invalid_request").await;
    let text = body.to_string();
    assert!(
        !text.contains("sk-") && !text.contains("looks like a secret"),
        "{text}"
    );
    assert!(text.contains("upstream status 400"), "{text}");
    // A 5xx's message is the gateway's too.
    let body = assert_openai_error(gw.chat("fail500", false).await, 502, "upstream_error").await;
    let text = body.to_string();
    assert!(!text.contains("The server had an error"), "{text}");
    assert!(text.contains("upstream status 500"), "{text}");
    // And a rate limit's.
    let body = assert_openai_error(
        gw.chat("ratelimit", false).await,
        429,
        "upstream_rate_limited",
    )
    .await;
    assert!(!body.to_string().contains("Rate limit reached"), "{body}");
}

#[tokio::test]
async fn a_body_over_the_bound_is_a_502_and_the_connection_is_dropped() {
    let up = MockUpstream::start().await;
    let gw = gateway_with(&up, true).await;
    let body = assert_openai_error(gw.chat("huge", false).await, 502, "upstream_too_large").await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("8192"),
        "{body}"
    );
    // The endless body was dropped, not read to the end.
    for _ in 0..100 {
        if up.cancels() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.cancels(), 1, "the upstream saw the connection go");
    // Bodies under the bound are fine.
    assert_eq!(gw.chat("ok", false).await.status(), 200);
}

#[tokio::test]
async fn a_stream_event_over_the_bound_ends_the_stream_with_an_error_event() {
    let up = MockUpstream::start().await;
    let gw = gateway_with(&up, true).await;
    let resp = gw.chat("huge-event", true).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    assert!(data.len() >= 2, "{body}");
    let first: serde_json::Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk", "{body}");
    assert_ne!(data.last().unwrap(), "[DONE]", "{body}");
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_too_large", "{body}");
    assert!(
        !body.contains("yyyy"),
        "nothing of the large event is relayed"
    );
    // Ordinary streams pass under the same bound.
    let ok = gw.chat("gpt-test", true).await.text().await.unwrap();
    assert_eq!(sse_data(&ok).last().unwrap(), "[DONE]");
}
