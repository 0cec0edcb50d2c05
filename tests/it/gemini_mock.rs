//! A mock of Google's Gemini API on 127.0.0.1:0, following its reference
//! (<https://ai.google.dev/api>): `POST /v1beta/models/{model}:generateContent` answers one
//! `GenerateContentResponse`, `POST /v1beta/models/{model}:streamGenerateContent?alt=sse`
//! answers server-sent events each holding one (no event names, no end marker), the key in
//! `x-goog-api-key`, errors as `{"error": {code, message, status, details}}`.
//!
//! Every request is recorded. A request without [`GEMINI_KEY`] gets Google's answer to a wrong
//! key (400 `INVALID_ARGUMENT`, `ErrorInfo` reason `API_KEY_INVALID`); a body the API would not
//! take (unknown fields, no `contents`, a role other than `user`/`model`, a part of no known
//! kind, a stream without `alt=sse`) gets 400 `INVALID_ARGUMENT`.
//!
//! The scenario is the model's name after `mock-` if it has that form, else `scenario:<name>`
//! in the prompt, else `ok`: `ok` (text; streamed in three events), `blocked` (the prompt is
//! blocked: `promptFeedback.blockReason`), `safety` (the candidate stops for `SAFETY` before any
//! content), `ratelimit` (429 `RESOURCE_EXHAUSTED` with `RetryInfo` `retryDelay` of
//! [`RETRY_DELAY_SECS`]), `unauthenticated` (401), `forbidden` (403), `invalid` (400 whose
//! message echoes a key-like string), `notfound` (404), `broken` (500), `midstream` (a stream
//! whose second event is an error), `tools` (calls the first declared function, with a thought
//! signature, unless the conversation already holds a function response: then text). A model whose id names an image model (`-image`) answers
//! with a caption and a real PNG as `inlineData`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::Recorded;

/// The key the mock accepts (`x-goog-api-key`); `GEMINI_KEY` in the test environment.
pub const GEMINI_KEY: &str = "AIzaSyTest-gemini-secret-0123456789";
/// `retryDelay` of a rate-limited answer, in seconds.
pub const RETRY_DELAY_SECS: u64 = 7;
/// Usage of the text answer: (prompt, candidates, thoughts).
pub const TEXT_USAGE: (u64, u64, u64) = (9, 5, 2);
/// Usage of the streamed text answer (its last event): (prompt, candidates).
pub const STREAM_USAGE: (u64, u64) = (9, 6);
/// Usage of an image answer: (prompt, candidates): 1290 tokens for the image, 10 for the text.
pub const IMAGE_USAGE: (u64, u64) = (12, 1300);

#[derive(Default)]
pub struct GeminiState {
    pub requests: Mutex<Vec<Recorded>>,
}

pub struct GeminiMock {
    pub addr: SocketAddr,
    pub state: Arc<GeminiState>,
}

impl GeminiMock {
    pub async fn start() -> Self {
        let state = Arc::new(GeminiState::default());
        let app = Router::new()
            .route("/v1beta/models/{call}", post(generate))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1beta", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    pub fn last(&self) -> Recorded {
        self.state
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request reached the Gemini mock")
    }

    pub fn last_body(&self) -> Value {
        serde_json::from_str(&self.last().body).unwrap()
    }
}

/// The PNG an image model answers with.
pub fn png() -> Vec<u8> {
    crate::task_mocks::tiny_png("nano-banana")
}

fn google_error(status: u16, word: &str, message: &str, details: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json; charset=UTF-8")],
        json!({"error": {"code": status, "message": message, "status": word, "details": details}})
            .to_string(),
    )
        .into_response()
}

fn invalid(message: &str) -> Response {
    // Shown with a failing test's output.
    eprintln!("gemini mock: 400 {message}");
    google_error(400, "INVALID_ARGUMENT", message, json!([]))
}

fn json_ok(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json; charset=UTF-8")],
        v.to_string(),
    )
        .into_response()
}

fn sse(events: &[Value]) -> Response {
    let text: String = events
        .iter()
        .map(|e| format!("data: {e}\r\n\r\n"))
        .collect();
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from(text))
        .unwrap()
}

/// The body as the API takes it (see the module doc); the error message if not.
fn check_body(body: &Value) -> Result<(), String> {
    const FIELDS: [&str; 7] = [
        "contents",
        "systemInstruction",
        "tools",
        "toolConfig",
        "generationConfig",
        "safetySettings",
        "cachedContent",
    ];
    const CONFIG: [&str; 13] = [
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "stopSequences",
        "candidateCount",
        "responseMimeType",
        "responseModalities",
        "imageConfig",
        "presencePenalty",
        "frequencyPenalty",
        "seed",
        "thinkingConfig",
    ];
    let obj = body.as_object().ok_or("Invalid JSON payload received.")?;
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "Invalid JSON payload received. Unknown name \"{k}\": Cannot find field."
        ));
    }
    if let Some(config) = obj.get("generationConfig") {
        let config = config
            .as_object()
            .ok_or("generationConfig: not an object")?;
        if let Some(k) = config.keys().find(|k| !CONFIG.contains(&k.as_str())) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{k}\" at 'generation_config'"
            ));
        }
    }
    let contents = obj
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("* GenerateContentRequest.contents: contents is not specified")?;
    for (i, c) in contents.iter().enumerate() {
        let role = c["role"].as_str().unwrap_or("");
        if role != "user" && role != "model" {
            return Err(format!(
                "contents[{i}].role: Please use a valid role: user, model."
            ));
        }
        let parts = c["parts"]
            .as_array()
            .filter(|p| !p.is_empty())
            .ok_or(format!("contents[{i}].parts: must not be empty"))?;
        for p in parts {
            let known = [
                "text",
                "inlineData",
                "functionCall",
                "functionResponse",
                "fileData",
            ];
            let Some(o) = p.as_object() else {
                return Err(format!("contents[{i}].parts: a part is an object"));
            };
            // One kind of data, and a thought signature beside it at most.
            let data = o.keys().filter(|k| known.contains(&k.as_str())).count();
            let other = o
                .keys()
                .any(|k| !known.contains(&k.as_str()) && k != "thoughtSignature");
            if data != 1 || other {
                return Err(format!(
                    "contents[{i}].parts: a part needs one kind of data: {p}"
                ));
            }
        }
    }
    Ok(())
}

/// The text of every part of every content, for `scenario:` words.
fn prompt_text(body: &Value) -> String {
    body["contents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["parts"].as_array().into_iter().flatten())
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn prompt_has_function_response(body: &Value) -> bool {
    body["contents"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["parts"].as_array().into_iter().flatten())
        .any(|p| p.get("functionResponse").is_some())
}

fn scenario(model: &str, body: &Value) -> String {
    if let Some(s) = model.strip_prefix("mock-") {
        return s.to_string();
    }
    let prompt = prompt_text(body);
    prompt
        .split("scenario:")
        .nth(1)
        .map(|w| {
            w.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .unwrap_or_else(|| "ok".into())
}

fn usage(prompt: u64, candidates: u64, thoughts: u64) -> Value {
    let mut u = json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    });
    if thoughts > 0 {
        u["thoughtsTokenCount"] = json!(thoughts);
    }
    u
}

fn ratings() -> Value {
    json!([
        {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
        {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"}
    ])
}

fn answer(model: &str, parts: Value, finish: Option<&str>, usage: Value) -> Value {
    let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
    if let Some(f) = finish {
        candidate["finishReason"] = json!(f);
        candidate["safetyRatings"] = ratings();
    }
    json!({
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": "mock-gemini-response-1",
    })
}

async fn generate(
    State(state): State<Arc<GeminiState>>,
    Path(call): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&raw).to_string();
    state.requests.lock().unwrap().push(Recorded {
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: text.clone(),
    });
    if headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) != Some(GEMINI_KEY) {
        return google_error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID", "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"}}]),
        );
    }
    let Some((model, method)) = call.split_once(':') else {
        return google_error(404, "NOT_FOUND", "Method not found.", json!([]));
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return google_error(404, "NOT_FOUND", "Method not found.", json!([])),
    };
    if stream && uri.query() != Some("alt=sse") {
        return invalid("the mock streams server-sent events only: add ?alt=sse");
    }
    let body: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => return invalid("Invalid JSON payload received."),
    };
    if let Err(why) = check_body(&body) {
        return invalid(&why);
    }
    let image_model = model.contains("-image");
    match scenario(model, &body).as_str() {
        "blocked" => {
            let v = json!({
                "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": ratings()},
                "usageMetadata": usage(9, 0, 0),
                "modelVersion": model,
            });
            if stream { sse(&[v]) } else { json_ok(&v) }
        }
        "safety" => {
            let v = json!({
                "candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true}]}],
                "usageMetadata": usage(9, 0, 0),
                "modelVersion": model,
            });
            if stream { sse(&[v]) } else { json_ok(&v) }
        }
        "ratelimit" => google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            json!([
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                     "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [
                    {"description": "Learn more about Gemini API quotas",
                     "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                 "retryDelay": format!("{RETRY_DELAY_SECS}s")}
            ]),
        ),
        "unauthenticated" => google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            json!([]),
        ),
        "forbidden" => google_error(
            403,
            "PERMISSION_DENIED",
            "Generative Language API has not been used in project 123456789 before or it is disabled.",
            json!([]),
        ),
        "invalid" => invalid(
            "* GenerateContentRequest.contents[0].parts[0].text: AIzaSyLeaked0123456789abcdefGHIJ looks like a key",
        ),
        "notfound" => google_error(
            404,
            "NOT_FOUND",
            "models/mock-notfound is not found for API version v1beta, or is not supported for generateContent.",
            json!([]),
        ),
        "broken" => google_error(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
            json!([]),
        ),
        "midstream" => sse(&[
            answer(model, json!([{"text": "Hel"}]), None, usage(9, 1, 0)),
            json!({"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                             "status": "UNAVAILABLE"}}),
        ]),
        "tools" if !prompt_has_function_response(&body) => {
            let name = body
                .pointer("/tools/0/functionDeclarations/0/name")
                .and_then(Value::as_str)
                .unwrap_or("missing_tool");
            json_ok(&answer(
                model,
                json!([{"functionCall": {"name": name, "args": {"city": "Paris"}},
                        "thoughtSignature": "bW9jay1zaWduYXR1cmU="}]),
                Some("STOP"),
                usage(20, 8, 0),
            ))
        }
        _ if image_model => {
            let data = base64::engine::general_purpose::STANDARD.encode(png());
            let (p, c) = IMAGE_USAGE;
            let parts = json!([
                {"text": "Here is your banana."},
                {"inlineData": {"mimeType": "image/png", "data": data}}
            ]);
            if stream {
                sse(&[
                    answer(
                        model,
                        json!([{"text": "Here is your banana."}]),
                        None,
                        usage(p, 10, 0),
                    ),
                    answer(
                        model,
                        json!([{"inlineData": {"mimeType": "image/png", "data": data}}]),
                        Some("STOP"),
                        usage(p, c, 0),
                    ),
                ])
            } else {
                json_ok(&answer(model, parts, Some("STOP"), usage(p, c, 0)))
            }
        }
        _ if stream => {
            let (p, c) = STREAM_USAGE;
            sse(&[
                answer(model, json!([{"text": "Hello"}]), None, usage(p, 1, 0)),
                answer(model, json!([{"text": " from"}]), None, usage(p, 3, 0)),
                answer(
                    model,
                    json!([{"text": " Gemini!"}]),
                    Some("STOP"),
                    usage(p, c, 0),
                ),
            ])
        }
        _ => {
            let (p, c, t) = TEXT_USAGE;
            json_ok(&answer(
                model,
                json!([{"text": "Hello from Gemini!"}]),
                Some("STOP"),
                usage(p, c, t),
            ))
        }
    }
}
