//! Test harness: the gateway in-process on 127.0.0.1:0, and a mock OpenAI upstream that speaks
//! the documented wire format (recorded fixtures in `tests/fixtures/openai/`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;

/// Where the build put every plugin component (bundled ones and test guests).
pub fn artifact(name: &str) -> PathBuf {
    Path::new(env!("TOLLGATE_PLUGIN_ARTIFACTS")).join(format!("{name}.wasm"))
}

pub fn fixture(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Mock upstream
// ---------------------------------------------------------------------------------------------

/// What the mock does for `/v1/chat/completions`, chosen per request by the `model` field.
/// Models: `ok`, `stream` (or any with `"stream": true`), `fail500`, `hang`, `malformed`,
/// `truncated`, `slow-stream` (one chunk, then waits for the client to go away), `slow-finish`
/// (the recorded stream, one event every [`SLOW_FINISH_PAUSE`]), `slow-json` (the recorded
/// answer after [`SLOW_JSON_PAUSE`]), `ratelimit`, `tool-call` (OpenAI's documented tool call
/// answer, whole and streamed).
#[derive(Default)]
pub struct MockState {
    /// Model `flaky` of `/v1/chat/completions` fails (500) while set.
    pub flaky_down: std::sync::atomic::AtomicBool,
    /// `GET /v1/models` answers 503 while set.
    pub models_fail: std::sync::atomic::AtomicBool,
    /// `GET /v1/models` requests served.
    pub model_lists: AtomicUsize,
    pub hits: AtomicUsize,
    pub cancels: AtomicUsize,
    pub requests: Mutex<Vec<Recorded>>,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub query: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
}

impl MockUpstream {
    pub async fn start() -> Self {
        let state = Arc::new(MockState::default());
        let routes = Router::new()
            .route("/v1/chat/completions", post(mock_chat))
            .route("/v1/embeddings", post(mock_embeddings))
            .route("/v1/images/generations", post(mock_images))
            .route("/v1/models", get(mock_models));
        // Also under the prefixes OpenAI-compatible providers use (`/api/v1`: OpenRouter;
        // `/openai/v1`: Groq).
        let app = Router::new()
            .merge(routes.clone())
            .nest("/api", routes.clone())
            .nest("/openai", routes)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn cancels(&self) -> usize {
        self.state.cancels.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Recorded {
        self.state
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request recorded")
    }
}

async fn mock_models(State(state): State<Arc<MockState>>) -> Response {
    state.model_lists.fetch_add(1, Ordering::SeqCst);
    if state.models_fail.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/json")],
            r#"{"error":{"message":"down","type":"server_error"}}"#,
        )
            .into_response();
    }
    (
        [("content-type", "application/json")],
        fixture("openai/models.json"),
    )
        .into_response()
}

/// Counts a cancel when the response body is dropped before it finished.
struct CancelGuard {
    state: Arc<MockState>,
    finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.cancels.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Count and record a request; its body as JSON (null if it is not JSON).
fn record(
    state: &MockState,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> serde_json::Value {
    state.hits.fetch_add(1, Ordering::SeqCst);
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

/// `POST /v1/embeddings` as OpenAI documents it: one embedding per input (`dimensions` floats,
/// 4 by default), as a float array or, with `encoding_format: base64`, the base64 of the
/// little-endian f32s; usage counts a token per 4 bytes of text (or per token id). Model
/// `fail500` fails, `malformed` answers without `data`.
async fn mock_embeddings(
    State(state): State<Arc<MockState>>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    use base64::Engine as _;
    let json = record(&state, &uri, &headers, &body);
    let model = json["model"].as_str().unwrap_or("").to_string();
    match model.as_str() {
        "fail500" => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "application/json")],
                r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
            )
                .into_response();
        }
        "malformed" => {
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                r#"{"object":"list","model":"malformed"}"#,
            )
                .into_response();
        }
        _ => {}
    }
    let inputs: Vec<serde_json::Value> = match &json["input"] {
        serde_json::Value::Array(a) if a.iter().all(serde_json::Value::is_u64) => {
            vec![json["input"].clone()]
        }
        serde_json::Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    };
    let dims = json["dimensions"].as_u64().unwrap_or(4) as usize;
    let base64 = json["encoding_format"] == "base64";
    let mut tokens = 0u64;
    let data: Vec<serde_json::Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            tokens += match input {
                serde_json::Value::String(s) => (s.len() as u64).div_ceil(4),
                serde_json::Value::Array(ids) => ids.len() as u64,
                _ => 1,
            };
            let v: Vec<f32> = (0..dims).map(|d| (i + d) as f32 * 0.25).collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                serde_json::json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(v)
            };
            serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        serde_json::json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })
        .to_string(),
    )
        .into_response()
}

/// `POST /v1/images/generations` as OpenAI documents it: `n` images (1 by default) as URLs, or
/// as `b64_json` when `response_format` says so. Model `fail500` fails.
async fn mock_images(
    State(state): State<Arc<MockState>>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json = record(&state, &uri, &headers, &body);
    if json["model"] == "fail500" {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
        )
            .into_response();
    }
    let n = json["n"].as_u64().unwrap_or(1);
    let b64 = json["response_format"] == "b64_json";
    let data: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            if b64 {
                serde_json::json!({"b64_json": "iVBORw0KGgo="})
            } else {
                serde_json::json!({"url": format!("https://images.invalid/{i}.png")})
            }
        })
        .collect();
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        serde_json::json!({"created": 1_700_000_000, "data": data}).to_string(),
    )
        .into_response()
}

async fn mock_chat(
    State(state): State<Arc<MockState>>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json = record(&state, &uri, &headers, &body);
    let mut model = json["model"].as_str().unwrap_or("ok").to_string();
    // `flaky` fails like `fail500` while `flaky_down` is set, else answers like `ok`.
    if model == "flaky" {
        model = if state.flaky_down.load(Ordering::SeqCst) {
            "fail500".into()
        } else {
            "ok".into()
        };
    }
    let stream = json["stream"].as_bool().unwrap_or(false);
    match model.as_str() {
        "fail500" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
        )
            .into_response(),
        "ratelimit" => (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("retry-after", "7")],
            r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        )
            .into_response(),
        // OpenAI's real 401 body: its message quotes a fragment of the operator's key.
        "unauthorized" => (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            r#"{"error":{"message":"Incorrect API key provided: sk-test-****cret. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
        )
            .into_response(),
        "forbidden" => (
            StatusCode::FORBIDDEN,
            [("content-type", "application/json")],
            r#"{"error":{"message":"Project `proj_Xk29fLq0Zr7TbW4nYc81` does not have access to model `forbidden` with key sk-test-****cret","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
        )
            .into_response(),
        // A 400 whose message echoes something key-like.
        "leaky400" => (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            r#"{"error":{"message":"Invalid 'user': sk-proj-AbCdEf0123456789abcdef0123456789 looks like a secret","type":"invalid_request_error","param":"user","code":null}}"#,
        )
            .into_response(),
        // A body that never ends (no content-length): only a reader that stops can answer.
        "huge" => {
            let guard = CancelGuard {
                state: state.clone(),
                finished: false,
            };
            let head = r#"{"id":"chatcmpl-huge","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""#;
            let s = futures::stream::unfold((0u64, guard), move |(n, guard)| async move {
                let chunk = if n == 0 {
                    Bytes::from(head)
                } else {
                    Bytes::from(vec![b'x'; 1024])
                };
                Some((Ok::<_, std::io::Error>(chunk), (n + 1, guard)))
            });
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from_stream(s))
                .unwrap()
        }
        // A stream with one 16 KiB event between ordinary ones.
        "huge-event" => {
            let full = fixture("openai/chat_stream.sse");
            let mut events = full.split("\n\n");
            let first = events.next().unwrap();
            let rest: Vec<&str> = events.collect();
            let big = format!(
                r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}"#,
                "y".repeat(16 * 1024)
            );
            sse(Body::from(format!("{first}\n\n{big}\n\n{}", rest.join("\n\n"))))
        }
        // The recorded answer, after a pause long enough to be in flight when a test acts.
        "slow-json" => {
            tokio::time::sleep(SLOW_JSON_PAUSE).await;
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                fixture("openai/chat.json"),
            )
                .into_response()
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        "malformed" => (
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"id": "chatcmpl-1", "choices": [ {"index": 0, "mess"#,
        )
            .into_response(),
        "truncated" => {
            let full = fixture("openai/chat_stream.sse");
            let cut: String = full.lines().take(4).map(|l| format!("{l}\n")).collect();
            sse(Body::from(cut))
        }
        "slow-stream" => {
            let guard = CancelGuard {
                state: state.clone(),
                finished: false,
            };
            let first = fixture("openai/chat_stream.sse")
                .split("\n\n")
                .next()
                .unwrap()
                .to_string()
                + "\n\n";
            let s = futures::stream::unfold((0u8, guard), move |(step, guard)| {
                let first = first.clone();
                async move {
                    if step == 0 {
                        Some((Ok::<_, std::io::Error>(Bytes::from(first)), (1, guard)))
                    } else {
                        // Never finishes: only a cancel ends this stream.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        None
                    }
                }
            });
            sse(Body::from_stream(s))
        }
        "slow-finish" => {
            let events: Vec<String> = fixture("openai/chat_stream.sse")
                .split("\n\n")
                .filter(|e| !e.trim().is_empty())
                .map(|e| format!("{e}\n\n"))
                .collect();
            let s = futures::stream::iter(events.into_iter().enumerate()).then(|(i, e)| async move {
                if i > 0 {
                    tokio::time::sleep(SLOW_FINISH_PAUSE).await;
                }
                Ok::<_, std::io::Error>(Bytes::from(e))
            });
            sse(Body::from_stream(s))
        }
        // OpenAI's documented answer that calls a tool, whole and streamed.
        "tool-call" if stream => sse(Body::from(fixture("openai/chat_tool_call_stream.sse"))),
        "tool-call" => (
            StatusCode::OK,
            [("content-type", "application/json")],
            fixture("openai/chat_tool_call.json"),
        )
            .into_response(),
        _ if stream => sse(Body::from(fixture("openai/chat_stream.sse"))),
        _ => (
            StatusCode::OK,
            [("content-type", "application/json")],
            fixture("openai/chat.json"),
        )
            .into_response(),
    }
}

/// The pause between two events of the mock's `slow-finish` stream (below the test gateways'
/// `upstream.stream_idle_timeout` of 2 s).
pub const SLOW_FINISH_PAUSE: Duration = Duration::from_millis(800);

/// How long the mock's `slow-json` model takes to answer.
pub const SLOW_JSON_PAUSE: Duration = Duration::from_millis(1500);

fn sse(body: Body) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The gateway under test
// ---------------------------------------------------------------------------------------------

pub struct TestGateway {
    pub running: Option<tollgate::app::Running>,
    pub public: String,
    pub operator: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
}

/// A config with the demo channel, an `openai` channel on `upstream` (key `sk-test-secret`), and
/// extra YAML for channels and models appended by the test.
pub fn config_yaml(
    upstream: Option<&str>,
    extra_channels: &str,
    extra_models: &str,
    plugin_dir: &Path,
) -> String {
    let openai_channel = upstream
        .map(|u| {
            format!(
                "  - {{ name: mock, plugin: openai, base_url: \"{u}\", api_key_env: MOCK_KEY }}\n"
            )
        })
        .unwrap_or_default();
    let openai_models = if upstream.is_some() {
        [
            "gpt-test",
            "ok",
            "fail500",
            "ratelimit",
            "hang",
            "malformed",
            "truncated",
            "slow-stream",
        ]
        .iter()
        .map(|m| format!("  - {{ name: {m}, channel: mock, free: true }}\n"))
        .collect::<String>()
    } else {
        String::new()
    };
    let mut anonymous: Vec<&str> = if upstream.is_some() {
        vec![
            "demo-chat",
            "gpt-test",
            "ok",
            "fail500",
            "ratelimit",
            "hang",
            "malformed",
            "truncated",
            "slow-stream",
        ]
    } else {
        vec!["demo-chat"]
    };
    // Every extra model is open too (the name after `name: ` on each line).
    anonymous.extend(extra_models.lines().filter_map(|l| {
        let rest = l.split("name: ").nth(1)?;
        rest.split([',', ' ', '}']).next()
    }));
    let db = plugin_dir
        .parent()
        .unwrap_or(plugin_dir)
        .join("tollgate.db");
    format!(
        r#"server:
  listen: 127.0.0.1:0
  max_body_bytes: 65536
  request_timeout: 30s
operator:
  listen: 127.0.0.1:0
plugins:
  dir: {dir}
  call_timeout: 200ms
  memory_limit_bytes: 33554432
  max_instances: 200
upstream:
  connect_timeout: 2s
  timeout: 1500ms
  stream_idle_timeout: 2s
channels:
  - {{ name: demo, plugin: demo }}
{openai_channel}{extra_channels}
models:
  - {{ name: demo-chat, channel: demo }}
{openai_models}{extra_models}
log:
  filter: warn
database:
  url: "sqlite://{db}"
moderation:
  policies_dir: "{policies}"
  watch: false
auth:
  # The wire-format tests call without keys; tests/billing.rs covers keys and money.
  anonymous_models: [{anonymous}]
"#,
        dir = plugin_dir.display(),
        db = db.display(),
        policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
        anonymous = anonymous.join(", ")
    )
}

pub const ADMIN_TOKEN: &str = "admin-test-token";

pub fn test_env() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("MOCK_KEY".to_string(), "sk-test-secret".to_string()),
        ("TOLLGATE_ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string()),
        (
            "REPLICATE_KEY".to_string(),
            crate::task_mocks::REPLICATE_KEY.to_string(),
        ),
        (
            "BFL_KEY".to_string(),
            crate::task_mocks::BFL_KEY.to_string(),
        ),
        ("TEST_S3_ACCESS_KEY".to_string(), "test-access".to_string()),
        ("TEST_S3_SECRET_KEY".to_string(), "test-secret".to_string()),
        (
            "GEMINI_KEY".to_string(),
            crate::gemini_mock::GEMINI_KEY.to_string(),
        ),
    ])
}

impl TestGateway {
    /// Start with a config text (no file: no config reload).
    pub async fn start_yaml(yaml: &str, dir: tempfile::TempDir) -> Self {
        let cfg = tollgate::config::from_yaml(yaml, &test_env()).expect("test config is valid");
        Self::start_config(cfg, dir).await
    }

    /// Start from a config file written into `dir` (so that editing it reloads routes).
    pub async fn start_file(yaml: &str, dir: tempfile::TempDir) -> Self {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let cfg = tollgate::config::load(Some(&path)).expect("test config is valid");
        Self::start_config(cfg, dir).await
    }

    pub async fn start_config(cfg: tollgate::config::Config, dir: tempfile::TempDir) -> Self {
        let running = tollgate::app::start(cfg).await.expect("gateway starts");
        let public = format!("http://{}", running.public_addr);
        let operator = format!("http://{}", running.operator_addr);
        Self {
            running: Some(running),
            public,
            operator,
            client: reqwest::Client::new(),
            dir,
        }
    }

    /// Demo channel plus the mock upstream.
    pub async fn with_upstream(upstream: &MockUpstream) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let yaml = config_yaml(Some(&upstream.base_url()), "", "", &plugins);
        Self::start_yaml(&yaml, dir).await
    }

    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    pub async fn chat(&self, model: &str, stream: bool) -> reqwest::Response {
        self.post_json(
            "/v1/chat/completions",
            serde_json::json!({
                "model": model,
                "stream": stream,
                "messages": [{"role": "user", "content": "Say hello"}],
            }),
        )
        .await
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.public))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.public))
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.operator))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Split an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Assert an OpenAI error body with the given status and code.
pub async fn assert_openai_error(
    resp: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert!(
        resp.headers().contains_key("x-request-id"),
        "x-request-id missing"
    );
    let body: serde_json::Value = resp.json().await.expect("error body is JSON");
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "body: {body}"
    );
    assert!(body["error"]["type"].is_string(), "body: {body}");
    body
}

/// Poll `check` every 50 ms until it holds; fail after 10 s.
pub async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

impl TestGateway {
    /// A request to the admin API, with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.operator))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// Through the admin API: the ledger lines of one request (`data` of `/admin/ledger`).
    pub async fn ledger_of(&self, request_id: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = self
            .admin(
                reqwest::Method::GET,
                &format!("/admin/ledger?request_id={request_id}"),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"].as_array().unwrap().clone()
    }

    /// Through the admin API: an account named `name` with `usd` dollars (none if `"0"`) and a
    /// key for it; (account id, key).
    pub async fn admin_funded_key(&self, name: &str, usd: &str) -> (String, String) {
        let acct: serde_json::Value = self
            .admin(reqwest::Method::POST, "/admin/accounts")
            .json(&serde_json::json!({"name": name}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = acct["id"].as_str().unwrap().to_string();
        if usd != "0" {
            let r = self
                .admin(
                    reqwest::Method::POST,
                    &format!("/admin/accounts/{id}/credits"),
                )
                .json(&serde_json::json!({"amount_usd": usd}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
        let created: serde_json::Value = self
            .admin(reqwest::Method::POST, &format!("/admin/accounts/{id}/keys"))
            .json(&serde_json::json!({"name": name}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (id, created["key"].as_str().unwrap().to_string())
    }
}
