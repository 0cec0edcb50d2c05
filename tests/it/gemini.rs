//! The bundled `gemini` provider end to end: the mock of Google's Gemini API in
//! `gemini_mock.rs` (strict about the documented request: path, `x-goog-api-key`, body fields)
//! and the gateway translating OpenAI chat completions to it and back: whole answers, streams,
//! every class of upstream error, charges from `usageMetadata`, the credential kept host-side,
//! and an image model ("Nano Banana Pro") asked through chat completions with Google's
//! `image_config`, answering a PNG; and `POST /v1/messages` through this provider.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::*;
use crate::gemini_mock::{
    GEMINI_KEY, GeminiMock, IMAGE_USAGE, RETRY_DELAY_SECS, STREAM_USAGE, TEXT_USAGE,
};

/// The key the `gemini-bad-key` channel holds: the mock refuses it as Google does.
const WRONG_KEY: &str = "AIzaSyWrong-key-0123456789abcdefXYZ";

/// Two channels on the mock (`gemini` with the right key, `gemini-bad-key` with a wrong one)
/// and the models of the tests below: `gemini-flash` and the image models priced by the
/// plugin's manifest, the scenario models (`mock-*`) free, `gemini-priced-broken` priced in
/// config.
async fn gateway(up: &GeminiMock) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let base = up.base_url();
    let channels = format!(
        "  - {{ name: gemini, plugin: gemini, base_url: \"{base}\", api_key_env: GEMINI_KEY }}\n  \
         - {{ name: gemini-bad-key, plugin: gemini, base_url: \"{base}\", api_key_env: GEMINI_WRONG_KEY }}\n"
    );
    let mut models = String::from(
        "  - { name: gemini-flash, channel: gemini, upstream_model: gemini-2.5-flash }\n  \
         - { name: nano-banana-pro, channel: gemini, upstream_model: gemini-3-pro-image-preview }\n  \
         - { name: nano-banana, channel: gemini, upstream_model: gemini-2.5-flash-image }\n  \
         - { name: gemini-wrong-key, channel: gemini-bad-key, upstream_model: gemini-2.5-flash }\n  \
         - { name: gemini-priced-broken, channel: gemini, upstream_model: mock-broken, \
         price: { input_per_token: 1000, output_per_token: 2000 } }\n",
    );
    for s in [
        "blocked",
        "safety",
        "ratelimit",
        "unauthenticated",
        "forbidden",
        "invalid",
        "notfound",
        "broken",
        "midstream",
        "tools",
    ] {
        models.push_str(&format!(
            "  - {{ name: mock-{s}, channel: gemini, free: true }}\n"
        ));
    }
    let yaml = config_yaml(None, &channels, &models, &plugins);
    let mut env = test_env();
    env.insert("GEMINI_WRONG_KEY".into(), WRONG_KEY.into());
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
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let data = sse_data(&text);
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .collect()
}

/// The key went in `x-goog-api-key`, and nowhere else in what the mock received: not in the
/// path, the query, the body or any other header (everything but that header is what the
/// plugin built).
fn assert_key_only_in_its_header(rec: &Recorded, key: &str) {
    assert_eq!(rec.headers["x-goog-api-key"], key);
    assert!(
        !rec.path.contains(key) && !rec.body.contains(key),
        "{rec:?}"
    );
    assert!(!rec.query.as_deref().unwrap_or("").contains(key), "{rec:?}");
    assert!(
        !rec.query.as_deref().unwrap_or("").contains("key="),
        "{rec:?}"
    );
    assert!(!rec.headers.contains_key("authorization"), "{rec:?}");
    for (name, value) in &rec.headers {
        if name != "x-goog-api-key" {
            assert!(!value.contains(key), "{name}: {value}");
        }
    }
}

#[tokio::test]
async fn a_chat_goes_out_as_generate_content_and_comes_back_as_a_completion() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    let resp = chat(
        &gw,
        None,
        json!({
            "model": "gemini-flash",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Again"},
            ],
            "temperature": 0.5,
            "top_p": 0.8,
            "max_tokens": 100,
            "stop": ["END"],
        }),
    )
    .await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["id"], "mock-gemini-response-1");
    assert_eq!(body["model"], "gemini-2.5-flash");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello from Gemini!");
    assert_eq!(choice["finish_reason"], "stop");
    let (p, c, t) = TEXT_USAGE;
    assert_eq!(body["usage"]["prompt_tokens"], p);
    assert_eq!(
        body["usage"]["completion_tokens"],
        c + t,
        "thoughts are output"
    );
    assert_eq!(body["usage"]["total_tokens"], p + c + t);

    let seen = up.last();
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(seen.query, None);
    assert_key_only_in_its_header(&seen, GEMINI_KEY);
    let sent = up.last_body();
    assert_eq!(
        sent["systemInstruction"],
        json!({"parts": [{"text": "You are terse."}]})
    );
    assert_eq!(
        sent["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Say hello"}]},
            {"role": "model", "parts": [{"text": "Hi."}]},
            {"role": "user", "parts": [{"text": "Again"}]},
        ])
    );
    assert_eq!(
        sent["generationConfig"],
        json!({"temperature": 0.5, "topP": 0.8, "maxOutputTokens": 100, "stopSequences": ["END"]})
    );
}

#[tokio::test]
async fn a_stream_is_relayed_as_openai_chunks_with_usage() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    let chunks = chunks(chat(&gw, None, hello("gemini-flash", true)).await).await;
    let seen = up.last();
    assert_eq!(
        seen.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert_eq!(seen.query.as_deref(), Some("alt=sse"));
    assert_eq!(seen.headers["accept"], "text/event-stream");
    assert_key_only_in_its_header(&seen, GEMINI_KEY);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "mock-gemini-response-1")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello from Gemini!");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("stop")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    let (p, c) = STREAM_USAGE;
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    );
}

#[tokio::test]
async fn tools_and_calls_round_trip_with_the_thought_signature() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    }}]);
    let mut messages = vec![json!({"role": "user", "content": "Weather in Paris?"})];
    let resp = chat(
        &gw,
        None,
        json!({"model": "mock-tools", "messages": messages, "tools": tools,
               "tool_choice": "required"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let sent = up.last_body();
    assert_eq!(
        sent["tools"],
        json!([{"functionDeclarations": [{"name": "get_weather",
            "description": "The current weather in a city",
            "parameters": tools[0]["function"]["parameters"]}]}])
    );
    assert_eq!(
        sent["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY"}})
    );
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));

    // The client sends the assistant message back as it got it, then the result.
    messages.push(choice["message"].clone());
    messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "18 C"}));
    let resp = chat(
        &gw,
        None,
        json!({"model": "mock-tools", "messages": messages, "tools": tools}),
    )
    .await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from Gemini!"
    );
    assert_eq!(
        up.last_body()["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                "args": {"city": "Paris"}}, "thoughtSignature": "bW9jay1zaWduYXR1cmU="}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                "response": {"content": "18 C"}}}]},
        ])
    );
}

#[tokio::test]
async fn each_upstream_error_class_gets_the_gateways_status_and_words() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    let cases = [
        ("mock-invalid", 400, "invalid_request"),
        ("mock-blocked", 400, "content_policy_violation"),
        ("mock-safety", 400, "content_policy_violation"),
        ("mock-unauthenticated", 502, "upstream_auth_failed"),
        ("mock-forbidden", 502, "upstream_auth_failed"),
        ("mock-ratelimit", 429, "upstream_rate_limited"),
        ("mock-notfound", 502, "upstream_not_found"),
        ("mock-broken", 502, "upstream_error"),
    ];
    for (model, status, code) in cases {
        let resp = chat(&gw, None, hello(model, false)).await;
        let retry_after = resp.headers().get("retry-after").cloned();
        let body = assert_openai_error(resp, status, code).await;
        let text = body.to_string();
        // Google's words stay in the log.
        for upstream_words in [
            "AIza",
            "looks like a key",
            "authentication credentials",
            "project 123456789",
            "exceeded your current quota",
            "is not found for API version",
            "internal error has occurred",
        ] {
            assert!(!text.contains(upstream_words), "{model}: {text}");
        }
        if model == "mock-ratelimit" {
            assert_eq!(
                retry_after.unwrap().to_str().unwrap(),
                RETRY_DELAY_SECS.to_string(),
                "Google's RetryInfo becomes Retry-After"
            );
        }
        if model == "mock-broken" {
            assert!(text.contains("upstream status 500"), "{text}");
        }
    }
    assert_eq!(up.hits(), cases.len());

    // A prompt blocked at the start of a stream: an error event, no [DONE].
    for model in ["mock-blocked", "mock-midstream"] {
        let resp = chat(&gw, None, hello(model, true)).await;
        let text = resp.text().await.unwrap();
        assert!(!text.contains("[DONE]"), "{text}");
        let data = sse_data(&text);
        let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        let want = if model == "mock-blocked" {
            "content_policy_violation"
        } else {
            "upstream_error"
        };
        assert_eq!(last["error"]["code"], want, "{text}");
        assert!(!text.contains("overloaded"), "{text}");
    }
}

#[tokio::test]
async fn a_refused_key_is_a_generic_502_that_never_shows_the_key() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    let resp = chat(&gw, None, hello("gemini-wrong-key", false)).await;
    let body = assert_openai_error(resp, 502, "upstream_auth_failed").await;
    let text = body.to_string();
    assert!(
        !text.contains(WRONG_KEY) && !text.contains("AIza"),
        "{text}"
    );
    assert!(!text.contains("API key not valid"), "{text}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the provider refused the gateway's credentials"),
        "{text}"
    );
    // The host put the channel's own key in `x-goog-api-key`, and only there.
    assert_key_only_in_its_header(&up.last(), WRONG_KEY);
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_upstream_auth_failures_total{channel=\"gemini-bad-key\"} 1"),
        "{m}"
    );
    assert!(!m.contains(WRONG_KEY));
}

#[tokio::test]
async fn a_keyed_call_is_charged_the_tokens_the_upstream_reported() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    let (_, key) = gw.admin_funded_key("gemini-payer", "1.00").await;
    // gemini-2.5-flash at the manifest's price: $0.30 / 1M in, $2.50 / 1M out.
    let (input, output) = (300_000_i64, 2_500_000_i64);

    let resp = chat(&gw, Some(&key), hello("gemini-flash", false)).await;
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    let (p, c, t) = TEXT_USAGE;
    let whole = p as i64 * input + (c + t) as i64 * output;
    assert_eq!(body["usage"]["cost_picodollars"], whole);
    let ledger = gw.ledger_of(&request_id).await;
    assert_eq!(ledger[0]["amount"], -whole);
    assert_eq!(ledger[0]["prompt_tokens"], p);

    // Streamed: the last event's usageMetadata, charged once at the end.
    let chunks = chunks(chat(&gw, Some(&key), hello("gemini-flash", true)).await).await;
    let (p, c) = STREAM_USAGE;
    let streamed = p as i64 * input + c as i64 * output;
    assert_eq!(
        chunks.last().unwrap()["usage"]["cost_picodollars"],
        streamed
    );

    // A failure costs nothing.
    let resp = chat(&gw, Some(&key), hello("gemini-priced-broken", false)).await;
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

/// The bytes behind an image URL the gateway answered: a link to the gateway's own copy (the
/// host archives the provider's inline images, in whole answers and in stream chunks alike).
async fn image_bytes(gw: &TestGateway, url: &str) -> Vec<u8> {
    assert!(
        url.starts_with(&format!("{}/v1/files/chat/", gw.public)),
        "an image URL must be a link to the gateway's archived copy: {url}"
    );
    let resp = gw.client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    assert_eq!(resp.headers()["content-type"], "image/png");
    resp.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn nano_banana_pro_answers_a_png_through_chat_completions() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    // As curl users send it: `extra_body` literally.
    let resp = chat(
        &gw,
        None,
        json!({
            "model": "nano-banana-pro",
            "messages": [{"role": "user", "content": "A banana on a skateboard"}],
            "extra_body": {"google": {"image_config": {"aspect_ratio": "16:9", "image_size": "2K"}}},
        }),
    )
    .await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let seen = up.last();
    assert_eq!(
        seen.path,
        "/v1beta/models/gemini-3-pro-image-preview:generateContent"
    );
    assert_key_only_in_its_header(&seen, GEMINI_KEY);
    let sent = up.last_body();
    assert_eq!(
        sent["generationConfig"],
        json!({"responseModalities": ["TEXT", "IMAGE"],
               "imageConfig": {"aspectRatio": "16:9", "imageSize": "2K"}})
    );
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], "Here is your banana.");
    assert_eq!(message["images"][0]["type"], "image_url");
    let url = message["images"][0]["image_url"]["url"].as_str().unwrap();
    let png = image_bytes(&gw, url).await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert_eq!(png, crate::gemini_mock::png());
    let (p, c) = IMAGE_USAGE;
    assert_eq!(body["usage"]["prompt_tokens"], p);
    assert_eq!(body["usage"]["completion_tokens"], c);

    // As the OpenAI Python SDK sends it (extra_body merged into the body), on Nano Banana.
    let resp = chat(
        &gw,
        None,
        json!({
            "model": "nano-banana",
            "messages": [{"role": "user", "content": "A banana"}],
            "google": {"image_config": {"aspect_ratio": "1:1"}},
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.last_body()["generationConfig"]["imageConfig"],
        json!({"aspectRatio": "1:1"})
    );

    // Streamed: the image arrives as a delta.
    let chunks = chunks(
        chat(
            &gw,
            None,
            json!({"model": "nano-banana-pro", "stream": true,
                   "messages": [{"role": "user", "content": "A banana"}]}),
        )
        .await,
    )
    .await;
    let url = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["images"][0]["image_url"]["url"].as_str())
        .expect("an image delta");
    assert!(image_bytes(&gw, url).await.starts_with(b"\x89PNG"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], c);

    // A ratio or size Google does not document never reaches it.
    let hits = up.hits();
    for config in [json!({"aspect_ratio": "7:5"}), json!({"image_size": "8K"})] {
        let resp = chat(
            &gw,
            None,
            json!({"model": "nano-banana-pro",
                   "messages": [{"role": "user", "content": "A banana"}],
                   "extra_body": {"google": {"image_config": config}}}),
        )
        .await;
        assert_openai_error(resp, 400, "invalid_request").await;
    }
    assert_eq!(up.hits(), hits);
}

#[tokio::test]
async fn the_openai_python_sdk_gets_nano_banana_pro_images() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    // The SDK always sends a key. Nano Banana Pro reserves its most output (32768 tokens at
    // $120 / 1M) before the call: about $3.93.
    let (_, key) = gw.admin_funded_key("gemini-sdk", "10.00").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/test_gemini_sdk.py"
    );
    let status = tokio::process::Command::new(&python)
        .arg(script)
        .env("TOLLGATE_BASE_URL", format!("{}/v1", gw.public))
        .env("TOLLGATE_API_KEY", &key)
        .env(
            "TOLLGATE_EXPECT_PNG_B64",
            base64::engine::general_purpose::STANDARD.encode(crate::gemini_mock::png()),
        )
        .status()
        .await
        .expect("python runs (the `openai` package is required: .ci/run installs it)");
    assert!(status.success(), "the openai SDK checks failed");
    // The SDK merged `extra_body` into the body: the plugin found `google.image_config` there.
    assert_eq!(
        up.last_body()["generationConfig"]["imageConfig"],
        json!({"aspectRatio": "3:4", "imageSize": "4K"})
    );
}

/// `POST /v1/messages` through the gemini provider: Anthropic's request becomes a
/// `generateContent` call (through the unified chat request), the answer comes back as
/// Anthropic's message or events, a tool call included.
#[tokio::test]
async fn the_messages_route_is_served_by_the_gemini_provider() {
    let up = GeminiMock::start().await;
    let gw = gateway(&up).await;
    let post = |body: Value| {
        gw.client
            .post(format!("{}/v1/messages", gw.public))
            .json(&body)
            .send()
    };
    let ask = json!({"model": "gemini-flash", "max_tokens": 50, "top_k": 7,
                     "system": "Be brief.", "messages": [{"role": "user", "content": "Hello"}]});
    let resp = post(ask.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    assert_eq!(
        m["content"],
        json!([{"type": "text", "text": "Hello from Gemini!"}])
    );
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["usage"]["input_tokens"], TEXT_USAGE.0);
    let sent = up.last_body();
    assert_eq!(sent["generationConfig"]["topK"], 7);
    assert_eq!(sent["generationConfig"]["maxOutputTokens"], 50);

    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let resp = post(streamed).await.unwrap();
    assert_eq!(resp.status(), 200);
    let evs = crate::messages::events(&resp.text().await.unwrap());
    let text: String = evs
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "text_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "Hello from Gemini!");
    assert_eq!(evs.last().unwrap().0, "message_stop");

    let resp = post(json!({"model": "mock-tools", "max_tokens": 50,
        "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}]}))
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let m: Value = resp.json().await.unwrap();
    let tool = m["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .cloned()
        .unwrap_or_else(|| panic!("a tool_use block: {m}"));
    assert_eq!(tool["name"], "get_weather");
    assert_eq!(tool["input"], json!({"city": "Paris"}));
    assert_eq!(m["stop_reason"], "tool_use");
}
