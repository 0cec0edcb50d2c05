//! The bundled `anthropic` provider end to end: a mock of Anthropic's Messages API (strict about
//! the documented request: path, `x-api-key`, `anthropic-version`, body fields) serving the
//! recorded answers in `tests/fixtures/anthropic/`, and the gateway translating OpenAI chat
//! completions to it and back: whole answers, streams, tool calls, every class of upstream
//! error, and charges from the tokens the upstream reported; and `POST /v1/messages` through
//! this provider.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::common::*;

/// The key the `claude` channel holds (`MOCK_KEY` in the test environment).
const KEY: &str = "sk-test-secret";
/// The key the `claude-bad-key` channel holds: the mock refuses it.
const WRONG_KEY: &str = "sk-ant-api03-WrongKey0123456789abcdefXYZ";

// ---------------------------------------------------------------------------------------------
// Mock Anthropic
// ---------------------------------------------------------------------------------------------

/// A request the mock received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: BTreeMap<String, String>,
    body: Value,
}

#[derive(Default)]
struct Requests {
    requests: Mutex<Vec<Seen>>,
}

/// `POST /v1/messages` as Anthropic documents it. The upstream model decides the answer:
/// `claude-tools` calls a tool, `claude-invalid`, `claude-refused`, `claude-forbidden`,
/// `claude-ratelimit`, `claude-overloaded` and `claude-broken` fail with Anthropic's error body
/// and status, `claude-midstream` fails inside a stream; any other model says hello.
struct MockAnthropic {
    addr: SocketAddr,
    state: Arc<Requests>,
}

impl MockAnthropic {
    async fn start() -> Self {
        let state = Arc::new(Requests::default());
        let app = Router::new()
            .route("/v1/messages", post(messages))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn hits(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    fn last(&self) -> Seen {
        self.state
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request reached the mock")
    }
}

fn error_response(status: u16, kind: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        json!({"type": "error", "error": {"type": kind, "message": message}}).to_string(),
    )
        .into_response()
}

fn sse(text: String) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from(text))
        .unwrap()
}

fn json_response(text: String) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], text).into_response()
}

/// The body as the Messages API accepts it: known fields only, `model`, a positive
/// `max_tokens`, and non-empty `messages` alternating between user and assistant.
fn check_body(body: &Value) -> Result<(), String> {
    const FIELDS: [&str; 12] = [
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "tools",
        "tool_choice",
        "metadata",
    ];
    let obj = body.as_object().ok_or("body: not a JSON object")?;
    if let Some(extra) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("{extra}: Extra inputs are not permitted"));
    }
    if !body["model"].is_string() {
        return Err("model: Field required".into());
    }
    if body["max_tokens"].as_u64().is_none_or(|n| n == 0) {
        return Err("max_tokens: Field required".into());
    }
    let messages = body["messages"]
        .as_array()
        .ok_or("messages: Field required")?;
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    let mut previous = "";
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        if role == previous {
            return Err(format!("messages.{i}: roles must alternate"));
        }
        previous = role;
        if !m["content"].is_string() && !m["content"].is_array() {
            return Err(format!("messages.{i}.content: Field required"));
        }
    }
    if let Some(tools) = body.get("tools") {
        let ok = tools.as_array().is_some_and(|ts| {
            ts.iter()
                .all(|t| t["name"].is_string() && t["input_schema"].is_object())
        });
        if !ok {
            return Err("tools: each tool needs name and input_schema".into());
        }
    }
    Ok(())
}

async fn messages(
    State(state): State<Arc<Requests>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(Seen {
        path: uri.path().to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body.clone(),
    });
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
        return error_response(401, "authentication_error", "invalid x-api-key");
    }
    if headers.get("anthropic-version").is_none() {
        return error_response(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    if let Err(why) = check_body(&body) {
        return error_response(400, "invalid_request_error", &why);
    }
    let stream = body["stream"] == true;
    match body["model"].as_str().unwrap_or("") {
        // A 400 whose message echoes something key-like.
        "claude-invalid" => error_response(
            400,
            "invalid_request_error",
            "messages.0.content: sk-ant-api03-AbCdEf0123456789abcdef0123 looks like a secret",
        ),
        "claude-refused" => error_response(
            400,
            "invalid_request_error",
            "Output blocked by content filtering policy",
        ),
        "claude-forbidden" => error_response(
            403,
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        "claude-ratelimit" => (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("retry-after", "7")],
            json!({"type": "error", "error": {"type": "rate_limit_error",
                   "message": "Number of request tokens has exceeded your per-minute rate limit"}})
            .to_string(),
        )
            .into_response(),
        "claude-overloaded" => error_response(529, "overloaded_error", "Overloaded"),
        "claude-broken" => error_response(500, "api_error", "Internal server error"),
        "claude-midstream" => {
            let full = fixture("anthropic/message_stream.sse");
            let head: Vec<&str> = full.split("\n\n").take(4).collect();
            sse(format!(
                "{}\n\nevent: error\ndata: {}\n\n",
                head.join("\n\n"),
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            ))
        }
        "claude-tools" if stream => sse(fixture("anthropic/tool_use_stream.sse")),
        "claude-tools" => json_response(fixture("anthropic/tool_use.json")),
        _ if stream => sse(fixture("anthropic/message_stream.sse")),
        _ => json_response(fixture("anthropic/message.json")),
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// Two channels on the mock (`claude` with the right key, `claude-bad-key` with a wrong one)
/// and the models of the tests below: `claude-haiku` priced by the plugin's manifest, the
/// failing ones free, and `claude-priced-overloaded` priced in config.
async fn gateway(up: &MockAnthropic) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let base = up.base_url();
    let channels = format!(
        "  - {{ name: claude, plugin: anthropic, base_url: \"{base}\", api_key_env: MOCK_KEY }}\n  \
         - {{ name: claude-bad-key, plugin: anthropic, base_url: \"{base}\", api_key_env: WRONG_KEY }}\n"
    );
    let mut models = String::from(
        "  - { name: claude-haiku, channel: claude, upstream_model: claude-haiku-4-5 }\n  \
         - { name: claude-wrong-key, channel: claude-bad-key, upstream_model: claude-haiku-4-5 }\n  \
         - { name: claude-priced-overloaded, channel: claude, upstream_model: claude-overloaded, \
         price: { input_per_token: 1000, output_per_token: 2000 } }\n",
    );
    for m in [
        "claude-other",
        "claude-tools",
        "claude-invalid",
        "claude-refused",
        "claude-forbidden",
        "claude-ratelimit",
        "claude-overloaded",
        "claude-broken",
        "claude-midstream",
    ] {
        models.push_str(&format!(
            "  - {{ name: {m}, channel: claude, free: true }}\n"
        ));
    }
    let yaml = config_yaml(None, &channels, &models, &plugins);
    let mut env = test_env();
    env.insert("WRONG_KEY".into(), WRONG_KEY.into());
    let cfg = tollgate::config::from_yaml(&yaml, &env).expect("test config is valid");
    TestGateway::start_config(cfg, dir).await
}

async fn chat(gw: &TestGateway, key: Option<&str>, body: Value) -> reqwest::Response {
    let mut req = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.public))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

fn hello(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Say hello"}]})
}

/// The chunks of a streamed answer that ended with `data: [DONE]`.
async fn chunks(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_chat_goes_out_as_a_messages_call_and_comes_back_as_a_completion() {
    let up = MockAnthropic::start().await;
    let gw = gateway(&up).await;
    let resp = chat(
        &gw,
        None,
        json!({
            "model": "claude-haiku",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello"},
            ],
            "temperature": 0.5,
            "stop": ["END"],
        }),
    )
    .await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["id"], "msg_01HelloFromTheMock");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        "Hello! How can I help you today?"
    );
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": 11, "total_tokens": 36})
    );

    let seen = up.last();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], KEY);
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(seen.body["model"], "claude-haiku-4-5");
    assert_eq!(seen.body["system"], "You are terse.");
    assert_eq!(
        seen.body["messages"],
        json!([{"role": "user", "content": "Say hello"}])
    );
    // No max_tokens from the client: the model's most output, as the manifest says.
    assert_eq!(seen.body["max_tokens"], 64_000);
    assert_eq!(seen.body["temperature"], 0.5);
    assert_eq!(seen.body["stop_sequences"], json!(["END"]));
    assert!(seen.body.get("stream").is_none());

    // A model the manifest does not know: the client's cap, else the fallback.
    let mut req = hello("claude-other", false);
    req["max_completion_tokens"] = json!(123);
    assert_eq!(chat(&gw, None, req).await.status(), 200);
    assert_eq!(up.last().body["max_tokens"], 123);
    assert_eq!(
        chat(&gw, None, hello("claude-other", false)).await.status(),
        200
    );
    assert_eq!(up.last().body["max_tokens"], 4096);
}

#[tokio::test]
async fn a_stream_is_relayed_as_openai_chunks_with_usage() {
    let up = MockAnthropic::start().await;
    let gw = gateway(&up).await;
    let chunks = chunks(chat(&gw, None, hello("claude-haiku", true)).await).await;
    assert_eq!(up.last().body["stream"], true);
    assert_eq!(up.last().headers["accept"], "text/event-stream");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "msg_01StreamFromTheMock")
    );
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello! How can I help?");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("stop")]);
    // The usage chunk comes last: no choices, the prompt tokens from message_start and the
    // completion tokens from message_delta.
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": 9, "total_tokens": 34})
    );
}

#[tokio::test]
async fn tool_calls_are_translated_both_ways() {
    let up = MockAnthropic::start().await;
    let gw = gateway(&up).await;
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]},
    }}]);
    let request = |stream: bool| {
        json!({
            "model": "claude-tools",
            "stream": stream,
            "messages": [
                {"role": "user", "content": "Weather in Lyon?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_01Lyon",
                    "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]},
                {"role": "tool", "tool_call_id": "toolu_01Lyon", "content": "21 C, sunny"},
                {"role": "user", "content": "And in Paris?"},
            ],
            "tools": tools,
            "tool_choice": "required",
        })
    };
    let resp = chat(&gw, None, request(false)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();

    let sent = up.last().body;
    assert_eq!(
        sent["tools"],
        json!([{"name": "get_weather", "description": "The current weather in a city",
                "input_schema": tools[0]["function"]["parameters"]}])
    );
    assert_eq!(sent["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": "Weather in Lyon?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01Lyon",
                "name": "get_weather", "input": {"city": "Lyon"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01Lyon", "content": "21 C, sunny"},
                {"type": "text", "text": "And in Paris?"},
            ]},
        ])
    );

    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Let me check the weather.");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "toolu_01WeatherInParis");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(body["usage"]["prompt_tokens"], 310);

    // Streamed: the call's id and name first, then its arguments in pieces.
    let chunks = chunks(chat(&gw, None, request(true)).await).await;
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert!(calls.len() >= 3, "{calls:?}");
    assert!(calls.iter().all(|c| c["index"] == 0));
    assert_eq!(calls[0]["id"], "toolu_01WeatherInParis");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let streamed: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&streamed).unwrap(),
        json!({"city": "Paris", "unit": "celsius"})
    );
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(finish, "tool_calls");
    assert_eq!(
        chunks.last().unwrap()["usage"],
        json!({"prompt_tokens": 310, "completion_tokens": 54, "total_tokens": 364})
    );
}

#[tokio::test]
async fn each_upstream_error_class_gets_the_gateways_status_and_words() {
    let up = MockAnthropic::start().await;
    let gw = gateway(&up).await;
    let cases = [
        ("claude-invalid", 400, "invalid_request"),
        ("claude-refused", 400, "content_policy_violation"),
        ("claude-forbidden", 502, "upstream_auth_failed"),
        ("claude-ratelimit", 429, "upstream_rate_limited"),
        ("claude-overloaded", 502, "upstream_error"),
        ("claude-broken", 502, "upstream_error"),
    ];
    for (model, status, code) in cases {
        let resp = chat(&gw, None, hello(model, false)).await;
        let retry_after = resp.headers().get("retry-after").cloned();
        let body = assert_openai_error(resp, status, code).await;
        let text = body.to_string();
        // Anthropic's words stay in the log.
        for upstream_words in [
            "sk-ant",
            "looks like a secret",
            "content filtering",
            "permission to use",
            "per-minute rate limit",
            "Overloaded",
            "Internal server error",
        ] {
            assert!(!text.contains(upstream_words), "{model}: {text}");
        }
        if model == "claude-ratelimit" {
            assert_eq!(retry_after.unwrap(), "7");
        }
        if model == "claude-overloaded" {
            assert!(text.contains("upstream status 529"), "{text}");
        }
        if model == "claude-broken" {
            assert!(text.contains("upstream status 500"), "{text}");
        }
    }
    assert_eq!(up.hits(), cases.len());

    // An error inside a stream ends it with an error event and no [DONE].
    let resp = chat(&gw, None, hello("claude-midstream", true)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("[DONE]"), "{text}");
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{text}");
    assert!(!text.contains("Overloaded"), "{text}");
}

#[tokio::test]
async fn a_refused_key_is_a_generic_502_that_never_shows_the_key() {
    let up = MockAnthropic::start().await;
    let gw = gateway(&up).await;
    let resp = chat(&gw, None, hello("claude-wrong-key", false)).await;
    let body = assert_openai_error(resp, 502, "upstream_auth_failed").await;
    let text = body.to_string();
    assert!(!text.contains(WRONG_KEY) && !text.contains("sk-"), "{text}");
    assert!(!text.contains("invalid x-api-key"), "{text}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the provider refused the gateway's credentials"),
        "{text}"
    );
    // The host put the channel's own key in `x-api-key`.
    assert_eq!(up.last().headers["x-api-key"], WRONG_KEY);
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_upstream_auth_failures_total{channel=\"claude-bad-key\"} 1"),
        "{m}"
    );
    assert!(!m.contains(WRONG_KEY));
}

#[tokio::test]
async fn a_keyed_call_is_charged_the_tokens_the_upstream_reported() {
    let up = MockAnthropic::start().await;
    let gw = gateway(&up).await;
    let (_, key) = gw.admin_funded_key("claude-payer", "1.00").await;
    // claude-haiku-4-5 at the manifest's price: $1 / MTok in, $5 / MTok out.
    let (input, output) = (1_000_000_i64, 5_000_000_i64);

    // Whole: 25 tokens in, 11 out, as the upstream said.
    let resp = chat(&gw, Some(&key), hello("claude-haiku", false)).await;
    assert_eq!(resp.status(), 200);
    let cost = resp.headers()["x-tollgate-cost"]
        .to_str()
        .unwrap()
        .to_string();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    let whole = 25 * input + 11 * output;
    assert_eq!(body["usage"]["cost_picodollars"], whole);
    assert_eq!(body["usage"]["cost"], cost);
    assert_eq!(cost, "0.000080000000");
    let ledger = gw.ledger_of(&request_id).await;
    assert_eq!(ledger[0]["amount"], -whole);
    assert_eq!(ledger[0]["prompt_tokens"], 25);

    // Streamed: 25 in (message_start), 9 out (message_delta), charged once at the end.
    let chunks = chunks(chat(&gw, Some(&key), hello("claude-haiku", true)).await).await;
    let streamed = 25 * input + 9 * output;
    assert_eq!(
        chunks.last().unwrap()["usage"]["cost_picodollars"],
        streamed
    );

    // A failure costs nothing.
    let resp = chat(&gw, Some(&key), hello("claude-priced-overloaded", false)).await;
    assert_openai_error(resp, 502, "upstream_error").await;

    let balance: Value = gw
        .client
        .get(format!("{}/v1/balance", gw.public))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        balance["balance_picodollars"],
        1_000_000_000_000_i64 - whole - streamed,
        "{balance}"
    );
    assert_eq!(balance["reserved_picodollars"], 0, "{balance}");
}

/// `POST /v1/messages` through the anthropic provider: Anthropic's request, translated into the
/// unified chat request and by the plugin into a Messages call again, and the answer back, whole
/// and streamed, tool use included.
#[tokio::test]
async fn the_messages_route_round_trips_through_the_anthropic_provider() {
    let up = MockAnthropic::start().await;
    let gw = gateway(&up).await;
    let tools = json!([{"name": "get_weather", "description": "Weather in a city",
                        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let body = json!({"model": "claude-tools", "max_tokens": 100, "system": "Be brief.", "top_k": 5,
                      "tools": tools, "tool_choice": {"type": "auto"},
                      "messages": [{"role": "user", "content": "Weather in Paris?"}]});
    let resp = gw
        .client
        .post(format!("{}/v1/messages", gw.public))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(
        m["content"],
        json!([{"type": "text", "text": "Let me check the weather."},
               {"type": "tool_use", "id": "toolu_01WeatherInParis", "name": "get_weather",
                "input": {"city": "Paris", "unit": "celsius"}}])
    );
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["usage"]["input_tokens"], 310);
    assert_eq!(m["usage"]["output_tokens"], 54);
    let seen = up.last();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.body["system"], "Be brief.");
    assert_eq!(seen.body["max_tokens"], 100);
    assert_eq!(seen.body["top_k"], 5);
    assert_eq!(
        seen.body["tools"][0]["input_schema"],
        tools[0]["input_schema"]
    );
    assert_eq!(seen.body["tool_choice"]["type"], "auto");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = gw
        .client
        .post(format!("{}/v1/messages", gw.public))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let evs = crate::messages::events(&resp.text().await.unwrap());
    let starts: Vec<&Value> = evs
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| &d["content_block"])
        .collect();
    assert_eq!(starts[0]["type"], "text");
    assert_eq!(starts[1]["type"], "tool_use");
    assert_eq!(starts[1]["id"], "toolu_01WeatherInParis");
    let partial: String = evs
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).unwrap(),
        json!({"city": "Paris", "unit": "celsius"})
    );
    let (_, delta) = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["input_tokens"], 310);
    assert_eq!(delta["usage"]["output_tokens"], 54);
    assert_eq!(evs.last().unwrap().0, "message_stop");
}
