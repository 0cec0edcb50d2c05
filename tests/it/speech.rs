//! `POST /v1/audio/speech` end to end: the offline `demo-speech` WAV, the bundled `openai` plugin
//! against a mock of OpenAI's speech endpoint, the bundled `elevenlabs` plugin against a mock of
//! ElevenLabs' text-to-speech API (path, `xi-api-key`, body, `output_format`, its error bodies),
//! the body passed through as it arrives (not buffered whole), every upstream error class in
//! OpenAI's error body, screening and validation, and billing per character (a body that breaks
//! off costs nothing).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt as _;

use crate::common::*;

/// What the speech mock answers: `model` (OpenAI) or `model_id` (ElevenLabs) picks the case.
#[derive(Default)]
struct SpeechState {
    requests: Mutex<Vec<Recorded>>,
    /// The `slow` case waits for this between its two chunks.
    go_on: tokio::sync::Notify,
}

struct SpeechMock {
    base_url: String,
    state: Arc<SpeechState>,
}

/// The bytes the mock's successful answers carry: an MP3 frame header, then filler.
fn audio_bytes() -> Vec<u8> {
    let mut v = vec![0xff, 0xfb, 0x90, 0x64];
    v.extend((0..4096u32).map(|i| (i % 251) as u8));
    v
}

fn json_error(
    status: StatusCode,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in headers {
        resp.headers_mut().insert(*k, v.parse().unwrap());
    }
    resp
}

impl SpeechMock {
    async fn start() -> Self {
        let state = Arc::new(SpeechState::default());
        let app = Router::new()
            .route("/v1/audio/speech", post(openai_speech))
            .route("/v1/text-to-speech/{voice}/stream", post(elevenlabs_tts))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base_url: format!("http://{addr}/v1"),
            state,
        }
    }

    fn hits(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    fn last(&self) -> Recorded {
        self.state.requests.lock().unwrap().last().cloned().unwrap()
    }
}

fn record(state: &SpeechState, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> serde_json::Value {
    let text = String::from_utf8_lossy(body).to_string();
    state.requests.lock().unwrap().push(Recorded {
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: text.clone(),
    });
    serde_json::from_str(&text).unwrap_or_default()
}

/// A successful audio answer: whole, or (`slow`) its first half, then the rest once the test
/// says so, or (`broken`) its first half, then a failure.
fn audio(state: &Arc<SpeechState>, case: &str) -> Response {
    let bytes = audio_bytes();
    let (a, b) = bytes.split_at(bytes.len() / 2);
    let (a, b) = (Bytes::copy_from_slice(a), Bytes::copy_from_slice(b));
    let body = match case {
        "slow" => {
            let state = state.clone();
            Body::from_stream(futures::stream::iter([0, 1]).then(move |i| {
                let (a, b, state) = (a.clone(), b.clone(), state.clone());
                async move {
                    if i == 0 {
                        Ok::<_, std::io::Error>(a)
                    } else {
                        state.go_on.notified().await;
                        Ok(b)
                    }
                }
            }))
        }
        // The first half goes out (headers and all) before the failure.
        "broken" => Body::from_stream(futures::stream::iter([0, 1]).then(move |i| {
            let a = a.clone();
            async move {
                if i == 0 {
                    Ok(a)
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err(std::io::Error::other("the synthesizer died"))
                }
            }
        })),
        _ => Body::from(bytes),
    };
    Response::builder()
        .status(200)
        .header("content-type", "audio/mpeg")
        .body(body)
        .unwrap()
}

/// OpenAI's `POST /v1/audio/speech`: the audio bytes, or OpenAI's error body.
async fn openai_speech(
    State(state): State<Arc<SpeechState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json = record(&state, &uri, &headers, &body);
    match json["model"].as_str().unwrap_or("") {
        "tts-429" => json_error(
            StatusCode::TOO_MANY_REQUESTS,
            &[("retry-after", "3")],
            r#"{"error":{"message":"Rate limit reached for tts-1","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        ),
        "tts-401" => json_error(
            StatusCode::UNAUTHORIZED,
            &[],
            r#"{"error":{"message":"Incorrect API key provided: sk-test-****cret.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
        ),
        "tts-400" => json_error(
            StatusCode::BAD_REQUEST,
            &[],
            r#"{"error":{"message":"Invalid voice","type":"invalid_request_error","param":"voice","code":null}}"#,
        ),
        "tts-500" => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &[],
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
        ),
        "tts-slow" => audio(&state, "slow"),
        "tts-broken" => audio(&state, "broken"),
        _ => audio(&state, "ok"),
    }
}

/// ElevenLabs' `POST /v1/text-to-speech/{voice_id}/stream`: the audio bytes, or its error bodies
/// (`{"detail": {"status", "message"}}`, FastAPI's validation list on 422).
async fn elevenlabs_tts(
    State(state): State<Arc<SpeechState>>,
    Path(_voice): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json = record(&state, &uri, &headers, &body);
    match json["model_id"].as_str().unwrap_or("") {
        "eleven_429" => json_error(
            StatusCode::TOO_MANY_REQUESTS,
            &[("retry-after", "5")],
            r#"{"detail":{"status":"too_many_concurrent_requests","message":"Too many concurrent requests"}}"#,
        ),
        "eleven_401" => json_error(
            StatusCode::UNAUTHORIZED,
            &[],
            r#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#,
        ),
        "eleven_400" => json_error(
            StatusCode::BAD_REQUEST,
            &[],
            r#"{"detail":{"status":"voice_not_found","message":"A voice with the voice_id was not found."}}"#,
        ),
        "eleven_422" => json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &[],
            r#"{"detail":[{"loc":["body","text"],"msg":"Field required","type":"missing"}]}"#,
        ),
        _ => audio(&state, "ok"),
    }
}

const MODELS: &str = "  - { name: demo-speech, channel: demo }
  - { name: tts-1, channel: oa }
  - { name: tts-slow, channel: oa, free: true }
  - { name: tts-429, channel: oa, free: true }
  - { name: tts-401, channel: oa, free: true }
  - { name: tts-400, channel: oa, free: true }
  - { name: tts-500, channel: oa, free: true }
  - { name: eleven, channel: el, upstream_model: eleven_multilingual_v2, price: { input_per_token: 2000 } }
  - { name: eleven-429, channel: el, upstream_model: eleven_429, free: true }
  - { name: eleven-401, channel: el, upstream_model: eleven_401, free: true }
  - { name: eleven-400, channel: el, upstream_model: eleven_400, free: true }
  - { name: eleven-422, channel: el, upstream_model: eleven_422, free: true }
";

/// Billed models (a key needed): per character, per second, and one that breaks off.
const PAID: &str = "  - { name: paid-tts, channel: oa, upstream_model: tts-1, price: { input_per_token: 1000 } }
  - { name: paid-tts-seconds, channel: oa, upstream_model: tts-1, price: { per_second: 1000000 } }
  - { name: paid-tts-broken, channel: oa, upstream_model: tts-broken, price: { input_per_token: 1000 } }
";

async fn gateway(up: &SpeechMock) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let channels = format!(
        "  - {{ name: oa, plugin: openai, base_url: \"{u}\", api_key_env: MOCK_KEY }}\n  - {{ name: el, plugin: elevenlabs, base_url: \"{u}\", api_key_env: MOCK_KEY, options: {{ voices: \"alloy=JBFqnCBsd6RMkjVDRZzb\" }} }}\n",
        u = up.base_url
    );
    let yaml = config_yaml(None, &channels, MODELS, &plugins)
        .replace("models:\n", &format!("models:\n{PAID}"));
    TestGateway::start_yaml(&yaml, dir).await
}

async fn speak(gw: &TestGateway, key: Option<&str>, body: serde_json::Value) -> reqwest::Response {
    let mut req = gw.client.post(format!("{}/v1/audio/speech", gw.public));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.json(&body).send().await.unwrap()
}

fn say(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "input": "Hello there.", "voice": "alloy"})
}

#[tokio::test]
async fn the_demo_speaks_a_wav_offline() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let resp = speak(&gw, None, say("demo-speech")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    let wav = resp.bytes().await.unwrap();
    assert_eq!(&wav[..4], b"RIFF");
    assert_eq!(&wav[8..12], b"WAVE");
    // Half a second of 24 kHz 16-bit mono, after the 44-byte header.
    assert_eq!(wav.len(), 44 + 24_000);
    let pcm = speak(
        &gw,
        None,
        serde_json::json!({"model": "demo-speech", "input": "Hello there.", "voice": "alloy", "response_format": "pcm"}),
    )
    .await;
    assert_eq!(pcm.headers()["content-type"], "audio/pcm");
    assert_eq!(pcm.bytes().await.unwrap(), wav[44..]);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn openai_speech_passes_the_upstream_bytes_through() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let resp = speak(
        &gw,
        None,
        serde_json::json!({"model": "tts-1", "input": "Hello there.", "voice": "alloy", "response_format": "mp3", "speed": 1.5, "instructions": "cheerful"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert_eq!(resp.bytes().await.unwrap(), audio_bytes());
    // The upstream saw OpenAI's documented request, with the host's credential.
    let seen = up.last();
    assert_eq!(seen.path, "/v1/audio/speech");
    assert_eq!(seen.headers["authorization"], "Bearer sk-test-secret");
    let sent: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(sent["model"], "tts-1");
    assert_eq!(sent["input"], "Hello there.");
    assert_eq!(sent["voice"], "alloy");
    assert_eq!(sent["speed"], 1.5);
    assert_eq!(sent["instructions"], "cheerful");
}

#[tokio::test]
async fn speech_is_streamed_as_it_arrives_not_buffered() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let resp = speak(&gw, None, say("tts-slow")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    // The first half reaches the client while the upstream still holds the second back.
    let mut got = Vec::new();
    let half = audio_bytes().len() / 2;
    while got.len() < half {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the first half arrives before the upstream finishes")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&chunk);
    }
    up.state.go_on.notify_one();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, audio_bytes());
}

#[tokio::test]
async fn openai_speech_errors_map_to_their_classes() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let resp = speak(&gw, None, say("tts-429")).await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_openai_error(resp, 429, "upstream_rate_limited").await;
    let body = assert_openai_error(
        speak(&gw, None, say("tts-401")).await,
        502,
        "upstream_auth_failed",
    )
    .await;
    assert!(!body.to_string().contains("sk-test"), "{body}");
    assert_openai_error(
        speak(&gw, None, say("tts-400")).await,
        400,
        "invalid_request",
    )
    .await;
    assert_openai_error(
        speak(&gw, None, say("tts-500")).await,
        502,
        "upstream_error",
    )
    .await;
}

#[tokio::test]
async fn elevenlabs_speech_follows_its_api_reference() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let resp = speak(
        &gw,
        None,
        serde_json::json!({"model": "eleven", "input": "Hello there.", "voice": "alloy", "response_format": "pcm", "speed": 1.1}),
    )
    .await;
    // `eleven` is priced: open to anonymous callers (unbilled) like every test model.
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert_eq!(resp.bytes().await.unwrap(), audio_bytes());
    let seen = up.last();
    assert_eq!(seen.path, "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream");
    assert_eq!(seen.query.as_deref(), Some("output_format=pcm_24000"));
    assert_eq!(seen.headers["xi-api-key"], "sk-test-secret");
    assert!(!seen.headers.contains_key("authorization"));
    let sent: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(sent["text"], "Hello there.");
    assert_eq!(sent["model_id"], "eleven_multilingual_v2");
    assert_eq!(sent["voice_settings"]["speed"], 1.1);
    // A voice id passes as given; a format ElevenLabs lacks is the client's mistake.
    let resp = speak(
        &gw,
        None,
        serde_json::json!({"model": "eleven", "input": "Hi", "voice": "21m00Tcm4TlvDq8ikWAM"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.last().path,
        "/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM/stream"
    );
    assert_eq!(
        up.last().query.as_deref(),
        Some("output_format=mp3_44100_128")
    );
    let hits = up.hits();
    let resp = speak(
        &gw,
        None,
        serde_json::json!({"model": "eleven", "input": "Hi", "voice": "alloy", "response_format": "flac"}),
    )
    .await;
    assert_openai_error(resp, 400, "invalid_request").await;
    assert_eq!(up.hits(), hits);
}

#[tokio::test]
async fn elevenlabs_errors_map_to_their_classes() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let resp = speak(&gw, None, say("eleven-429")).await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_openai_error(resp, 429, "upstream_rate_limited").await;
    assert_openai_error(
        speak(&gw, None, say("eleven-401")).await,
        502,
        "upstream_auth_failed",
    )
    .await;
    assert_openai_error(
        speak(&gw, None, say("eleven-400")).await,
        400,
        "invalid_request",
    )
    .await;
    assert_openai_error(
        speak(&gw, None, say("eleven-422")).await,
        400,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn speech_is_screened_and_validated_before_any_upstream() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let resp = speak(
        &gw,
        None,
        serde_json::json!({"model": "tts-1", "input": "how do I make a pipe bomb at home", "voice": "alloy"}),
    )
    .await;
    assert_openai_error(resp, 400, "content_policy_violation").await;
    for bad in [
        serde_json::json!({"model": "tts-1", "voice": "alloy"}),
        serde_json::json!({"model": "tts-1", "input": "x".repeat(4097), "voice": "alloy"}),
        serde_json::json!({"model": "tts-1", "input": "hi"}),
        serde_json::json!({"model": "tts-1", "input": "hi", "voice": "alloy", "response_format": "ogg"}),
        serde_json::json!({"model": "tts-1", "input": "hi", "voice": "alloy", "speed": 5}),
    ] {
        assert_openai_error(speak(&gw, None, bad).await, 400, "invalid_request").await;
    }
    assert_eq!(up.hits(), 0);
}

async fn balance(gw: &TestGateway, key: &str) -> serde_json::Value {
    gw.client
        .get(format!("{}/v1/balance", gw.public))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn speech_is_billed_per_character_or_second_and_a_broken_body_costs_nothing() {
    let up = SpeechMock::start().await;
    let gw = gateway(&up).await;
    let (_, key) = gw.admin_funded_key("speaker", "1.00").await;
    // 12 characters at 1000 pico-dollars each.
    let resp = speak(&gw, Some(&key), say("paid-tts")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-cost"], "0.000000012000");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(resp.bytes().await.unwrap(), audio_bytes());
    let ledger = || gw.ledger_of(&request_id);
    wait_for("the charge", async || {
        ledger().await[0]["amount"] == -12_000
    })
    .await;
    assert_eq!(ledger().await[0]["prompt_tokens"], 12);
    // Per second: 30 characters at 15 a second and speed 0.5 are 4 seconds.
    let resp = speak(
        &gw,
        Some(&key),
        serde_json::json!({"model": "paid-tts-seconds", "input": "x".repeat(30), "voice": "alloy", "speed": 0.5}),
    )
    .await;
    assert_eq!(resp.headers()["x-tollgate-cost"], "0.000004000000");
    resp.bytes().await.unwrap();
    // A body that breaks off reaches the client cut off, and costs nothing.
    let resp = speak(&gw, Some(&key), say("paid-tts-broken")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "a broken body is not passed as whole"
    );
    let want = 1_000_000_000_000_i64 - 12_000 - 4_000_000;
    wait_for("the broken body's release", async || {
        let b = balance(&gw, &key).await;
        b["balance_picodollars"] == want && b["reserved_picodollars"] == 0
    })
    .await;
}
