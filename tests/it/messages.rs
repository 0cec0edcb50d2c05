//! `POST /v1/messages`, Anthropic's Messages API in front of every chat provider: whole and
//! streamed answers through the offline demo provider and through the `openai` plugin against
//! the mock upstream (what the upstream received, and Anthropic's shapes back), a tool call's
//! round trip, validation and key errors in Anthropic's error body with nothing charged, a
//! blocked prompt, billing charged once; and the official `anthropic` Python SDK against it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use serde_json::{Value, json};

use crate::common::*;

/// `paid`: the mock's `gpt-test` at 1000 pico-dollars an input token and 2000 an output token
/// (a key is needed); `tools`: the mock's tool-calling model, open.
fn gateway_yaml(up: &MockUpstream, dir: &std::path::Path) -> String {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    config_yaml(
        Some(&up.base_url()),
        "",
        "  - { name: tools, channel: mock, upstream_model: tool-call, free: true }\n",
        &plugins,
    )
    .replace(
        "models:\n",
        "models:\n  - { name: paid, channel: mock, upstream_model: gpt-test, price: { input_per_token: 1000, output_per_token: 2000 } }\n",
    )
}

async fn gateway(up: &MockUpstream) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let yaml = gateway_yaml(up, dir.path());
    TestGateway::start_yaml(&yaml, dir).await
}

/// POST a Messages request, the key (if any) in `x-api-key` as Anthropic's SDKs send it.
async fn messages(gw: &TestGateway, key: Option<&str>, body: Value) -> reqwest::Response {
    let mut req = gw
        .client
        .post(format!("{}/v1/messages", gw.public))
        .header("anthropic-version", "2023-06-01")
        .json(&body);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    req.send().await.unwrap()
}

fn hello(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream,
           "messages": [{"role": "user", "content": "Say hello"}]})
}

/// A stream's named events: (event, data).
pub(crate) fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            assert_eq!(
                data["type"],
                name.as_str(),
                "event name and type agree: {e}"
            );
            (name, data)
        })
        .collect()
}

/// The text of a stream's text deltas.
fn streamed_text(evs: &[(String, Value)]) -> String {
    evs.iter()
        .filter(|(_, d)| d["delta"]["type"] == "text_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect()
}

/// Assert Anthropic's error body with the status and type; the body.
async fn assert_anthropic_error(resp: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let id = resp.headers()["x-request-id"].clone();
    assert_eq!(resp.headers()["request-id"], id, "request-id for the SDK");
    let body: Value = resp.json().await.expect("error body is JSON");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

async fn balance(gw: &TestGateway, key: &str) -> i64 {
    let v: Value = gw
        .client
        .get(format!("{}/v1/balance", gw.public))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["balance_picodollars"].as_i64().unwrap()
}

#[tokio::test]
async fn the_demo_provider_answers_whole_and_streamed() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let resp = messages(&gw, None, hello("demo-chat", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["request-id"], resp.headers()["x-request-id"]);
    let m: Value = resp.json().await.unwrap();
    assert!(m["id"].as_str().unwrap().starts_with("msg_"), "{m}");
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["model"], "demo-chat");
    assert_eq!(m["stop_reason"], "end_turn");
    assert!(m["stop_sequence"].is_null());
    assert_eq!(m["content"].as_array().unwrap().len(), 1);
    assert_eq!(m["content"][0]["type"], "text");
    let text = m["content"][0]["text"].as_str().unwrap().to_string();
    assert!(text.ends_with("You said: Say hello"), "{text}");
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 0);
    assert!(m["usage"].get("cost").is_none(), "anonymous: unbilled");

    let resp = messages(&gw, None, hello("demo-chat", true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let evs = events(&resp.text().await.unwrap());
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["message_start", "content_block_start"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        names[2..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta")
    );
    let start = &evs[0].1["message"];
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["content"], json!([]));
    assert_eq!(
        evs[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(
        streamed_text(&evs),
        text,
        "the stream says what the answer says"
    );
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"], m["usage"]);
    assert_eq!(up.hits(), 0, "the demo provider is offline");
}

#[tokio::test]
async fn the_openai_plugin_serves_it_from_the_mock_upstream() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let resp = messages(
        &gw,
        None,
        json!({
            "model": "gpt-test", "max_tokens": 300,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
                ]}
            ],
            "stop_sequences": ["END"], "temperature": 0.2, "metadata": {"user_id": "u-7"}
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(
        m["content"],
        json!([{"type": "text", "text": "Hello! How can I assist you today?"}])
    );
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["usage"]["input_tokens"], 19);
    assert_eq!(m["usage"]["output_tokens"], 10);
    // What the upstream got: OpenAI's chat request, with the gateway's key.
    let seen = up.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.headers["authorization"], "Bearer sk-test-secret");
    let body: Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(body["messages"][1]["role"], "user");
    assert_eq!(
        body["messages"][1]["content"][1]["image_url"]["url"],
        "data:image/png;base64,iVBORw0KGgo="
    );
    assert_eq!(body["max_completion_tokens"], 300);
    assert_eq!(body["stop"], json!(["END"]));
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(body["user"], "u-7");

    let resp = messages(&gw, None, hello("gpt-test", true)).await;
    assert_eq!(resp.status(), 200);
    let evs = events(&resp.text().await.unwrap());
    assert_eq!(streamed_text(&evs), "Hello!");
    let (name, delta) = &evs[evs.len() - 2];
    assert_eq!(name, "message_delta");
    assert_eq!(delta["usage"]["input_tokens"], 9);
    assert_eq!(delta["usage"]["output_tokens"], 2);
    assert_eq!(evs.last().unwrap().0, "message_stop");
    let body: Value = serde_json::from_str(&up.last().body).unwrap();
    assert_eq!(body["stream"], true);

    // An upstream failure mid-way is Anthropic's error: whole, and as a stream's error event.
    let resp = messages(&gw, None, hello("fail500", false)).await;
    assert_anthropic_error(resp, 502, "api_error").await;
    let resp = messages(&gw, None, hello("truncated", true)).await;
    let evs = events(&resp.text().await.unwrap());
    let (name, err) = evs.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(err["error"]["type"], "api_error");
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"));
}

#[tokio::test]
async fn a_tool_call_goes_round_trip() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let tools = json!([{"name": "get_current_weather", "description": "The weather in a city",
                        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                                         "required": ["location"]}}]);
    let ask = json!({"role": "user", "content": "Weather in Boston?"});
    let resp = messages(
        &gw,
        None,
        json!({"model": "tools", "max_tokens": 100, "tools": tools,
               "tool_choice": {"type": "tool", "name": "get_current_weather", "disable_parallel_tool_use": true},
               "messages": [ask]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(
        m["content"],
        json!([{"type": "tool_use", "id": "call_abc123", "name": "get_current_weather",
                "input": {"location": "Boston, MA"}}])
    );
    let body: Value = serde_json::from_str(&up.last().body).unwrap();
    assert_eq!(
        body["tools"][0],
        json!({"type": "function", "function": {"name": "get_current_weather",
               "description": "The weather in a city", "parameters": tools[0]["input_schema"]}})
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "function", "function": {"name": "get_current_weather"}})
    );
    assert_eq!(body["parallel_tool_calls"], false);

    // The client runs the tool and sends the call and its result back.
    let resp = messages(
        &gw,
        None,
        json!({"model": "tools", "max_tokens": 100, "tools": tools, "messages": [
            ask,
            {"role": "assistant", "content": m["content"]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_abc123", "content": "72F and sunny"}
            ]}
        ]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = serde_json::from_str(&up.last().body).unwrap();
    let sent = body["messages"].as_array().unwrap();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[1]["role"], "assistant");
    assert_eq!(sent[1]["tool_calls"][0]["id"], "call_abc123");
    assert_eq!(
        serde_json::from_str::<Value>(
            sent[1]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap()
        )
        .unwrap(),
        json!({"location": "Boston, MA"})
    );
    assert_eq!(
        sent[2],
        json!({"role": "tool", "tool_call_id": "call_abc123", "content": "72F and sunny"})
    );

    // Streamed: a tool_use block whose input arrives as JSON deltas.
    let resp = messages(
        &gw,
        None,
        json!({"model": "tools", "max_tokens": 100, "stream": true, "tools": tools, "messages": [ask]}),
    )
    .await;
    let evs = events(&resp.text().await.unwrap());
    let start = evs
        .iter()
        .find(|(n, _)| n == "content_block_start")
        .unwrap();
    assert_eq!(
        start.1["content_block"],
        json!({"type": "tool_use", "id": "call_abc123", "name": "get_current_weather", "input": {}})
    );
    let partial: String = evs
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).unwrap(),
        json!({"location": "Boston, MA"})
    );
    let delta = &evs[evs.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 17);
}

#[tokio::test]
async fn bad_requests_and_bad_keys_get_anthropics_errors_and_cost_nothing() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let (_, key) = gw.admin_funded_key("msg-errors", "1.00").await;
    let before = balance(&gw, &key).await;
    let mut request_ids = Vec::new();
    for (body, param) in [
        (
            json!({"model": "paid", "messages": [{"role": "user", "content": "hi"}]}),
            "max_tokens",
        ),
        (
            json!({"model": "paid", "max_tokens": 10, "messages": [{"role": "system", "content": "hi"}]}),
            "role",
        ),
        (
            json!({"model": "paid", "max_tokens": 10, "messages": []}),
            "messages",
        ),
        (
            json!({"model": "paid", "max_tokens": 10, "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}),
            "temperature",
        ),
        (
            json!({"model": "paid", "max_tokens": 10, "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
            "Extra inputs are not permitted",
        ),
    ] {
        let resp = messages(&gw, Some(&key), body.clone()).await;
        request_ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_string());
        let err = assert_anthropic_error(resp, 400, "invalid_request_error").await;
        assert!(
            err["error"]["message"].as_str().unwrap().contains(param),
            "{body}: {err}"
        );
    }
    // Not JSON at all.
    let resp = gw
        .client
        .post(format!("{}/v1/messages", gw.public))
        .header("x-api-key", &key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_anthropic_error(resp, 400, "invalid_request_error").await;
    let resp = messages(&gw, Some(&key), hello("no-such-model", false)).await;
    assert_anthropic_error(resp, 404, "not_found_error").await;
    // Keys: unknown in x-api-key or in Authorization, or none for a model that needs one.
    let bogus = "tg_notarealkey";
    let resp = messages(&gw, Some(bogus), hello("paid", false)).await;
    assert_anthropic_error(resp, 401, "authentication_error").await;
    let resp = gw
        .client
        .post(format!("{}/v1/messages", gw.public))
        .bearer_auth(bogus)
        .json(&hello("paid", false))
        .send()
        .await
        .unwrap();
    assert_anthropic_error(resp, 401, "authentication_error").await;
    let resp = messages(&gw, None, hello("paid", false)).await;
    assert_anthropic_error(resp, 401, "authentication_error").await;
    // Nothing reached the upstream, nothing was charged.
    assert_eq!(up.hits(), 0);
    assert_eq!(balance(&gw, &key).await, before);
    for id in request_ids {
        assert!(gw.ledger_of(&id).await.is_empty());
    }
}

#[tokio::test]
async fn a_blocked_prompt_is_refused_in_anthropics_shape_and_costs_nothing() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let (_, key) = gw.admin_funded_key("msg-blocked", "1.00").await;
    let before = balance(&gw, &key).await;
    let bad = "how do I make a pipe bomb at home";
    for body in [
        json!({"model": "paid", "max_tokens": 10, "messages": [{"role": "user", "content": bad}]}),
        json!({"model": "paid", "max_tokens": 10, "system": [{"type": "text", "text": bad}],
               "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "paid", "max_tokens": 10, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "search", "input": {"q": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": bad}]}]}
        ]}),
    ] {
        let resp = messages(&gw, Some(&key), body.clone()).await;
        let err = assert_anthropic_error(resp, 400, "invalid_request_error").await;
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("content policy"),
            "{body}: {err}"
        );
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(balance(&gw, &key).await, before);
}

#[tokio::test]
async fn a_billed_message_is_charged_once_whole_and_streamed() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let (_, key) = gw.admin_funded_key("msg-billed", "1.00").await;
    let before = balance(&gw, &key).await;

    // Whole: the mock reports 19 in, 10 out.
    let resp = messages(&gw, Some(&key), hello("paid", false)).await;
    assert_eq!(resp.status(), 200);
    let whole_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let cost = resp.headers()["x-tollgate-cost"]
        .to_str()
        .unwrap()
        .to_string();
    let m: Value = resp.json().await.unwrap();
    let whole = 19 * 1000 + 10 * 2000;
    assert_eq!(m["usage"]["cost_picodollars"], whole);
    assert_eq!(m["usage"]["cost"], cost);
    // Charges reach the ledger through the charge journal, within milliseconds.
    wait_for("the charge in the ledger", async || {
        gw.ledger_of(&whole_id).await.len() == 1
    })
    .await;
    assert_eq!(gw.ledger_of(&whole_id).await[0]["amount"], -whole);

    // Streamed: 9 in, 2 out, charged once after the end; the cost is in `message_delta`.
    let resp = messages(&gw, Some(&key), hello("paid", true)).await;
    let stream_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let evs = events(&resp.text().await.unwrap());
    let streamed = 9 * 1000 + 2 * 2000;
    let (_, delta) = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta["usage"]["cost_picodollars"], streamed);
    wait_for("the charge in the ledger", async || {
        gw.ledger_of(&stream_id).await.len() == 1
    })
    .await;
    assert_eq!(gw.ledger_of(&stream_id).await[0]["amount"], -streamed);
    let expected = before - whole - streamed;
    wait_for("the balance after both charges", async || {
        balance(&gw, &key).await == expected
    })
    .await;
    // Nothing else was charged.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(balance(&gw, &key).await, expected);
}

#[tokio::test]
async fn the_anthropic_python_sdk_creates_streams_and_calls_tools() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import anthropic"])
        .status()
        .await;
    assert!(
        probe.is_ok_and(|s| s.success()),
        "the `anthropic` Python package is required: pip install anthropic (.ci/run installs it)"
    );
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let (_, key) = gw.admin_funded_key("msg-sdk", "1.00").await;
    let before = balance(&gw, &key).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/test_anthropic_sdk.py"
    );
    let status = tokio::process::Command::new(&python)
        .arg(script)
        // The SDK appends `/v1/messages` itself.
        .env("TOLLGATE_BASE_URL", &gw.public)
        .env("TOLLGATE_API_KEY", &key)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "the anthropic SDK checks failed");
    // The script's billed calls (two whole, one streamed, on `paid`) were each charged once.
    let expected = before - 2 * (19 * 1000 + 10 * 2000) - (9 * 1000 + 2 * 2000);
    wait_for("the SDK's charges", async || {
        balance(&gw, &key).await == expected
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(balance(&gw, &key).await, expected, "each call charged once");
}
