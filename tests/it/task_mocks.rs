//! Mock upstreams of asynchronous generation APIs, for the task tests: [`ReplicateMock`]
//! (Replicate's predictions API) and [`BflMock`] (Black Forest Labs' FLUX API), each on
//! 127.0.0.1:0, following its API's documented shapes (paths, auth header, statuses, bodies),
//! and serving the jobs' output files itself (`GET /files/...`, real PNG bytes).
//!
//! A job's scenario is the model's name if it names one (Replicate: the name after the owner,
//! `mock/never`; BFL: the endpoint, `/v1/never`), else `scenario:<name>` in the prompt, else
//! `ok`. Scenarios ([`Scenario`]): `ok` (running, then succeeded at the 2nd poll), `ok-<n>`
//! (succeeded at the n-th poll; `ok-0`: Replicate answers the submission already succeeded, BFL
//! at the first poll), `fail` (the job fails), `refused` (the job is refused for its content;
//! BFL: `Request Moderated`), `refused-output` (BFL: `Content Moderated`; Replicate: flagged as
//! sensitive), `never` (runs forever), `ratelimit` (the submission gets 429 with `Retry-After`),
//! `ratelimit-poll` (the first poll gets 429, the second finds the job running, the third
//! succeeded), `unauthorized` (the submission gets
//! the API's auth error), `broken-output` (succeeds; its file answers 404), `wrong-type` (its file
//! is `text/html`), `oversized` (its file is [`OVERSIZED_BYTES`] long).
//!
//! Every API request must carry the API's credential ([`REPLICATE_KEY`] as `Authorization:
//! Bearer`, [`BFL_KEY`] in `x-key`); without it, the API's auth error. File downloads need
//! none (they are recorded too, so a test can check that no credential went with them).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::common::Recorded;

/// The key [`ReplicateMock`] accepts (`Authorization: Bearer <key>`).
pub const REPLICATE_KEY: &str = "r8_test-replicate-secret";
/// The key [`BflMock`] accepts (`x-key: <key>`).
pub const BFL_KEY: &str = "bfl-test-secret";
/// `Retry-After` (seconds) of a rate-limited answer.
pub const RETRY_AFTER_SECS: u64 = 1;
/// Size of an `oversized` job's file (a PNG signature, then zeros).
pub const OVERSIZED_BYTES: usize = 3 * 1024 * 1024;

/// What a mocked job does; see the module doc for the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Running until the `after`-th poll, which finds it succeeded (0: done at submission).
    Succeed {
        after: u32,
    },
    Fail,
    Refused,
    RefusedOutput,
    Never,
    RateLimited,
    RateLimitedPoll,
    Unauthorized,
    BrokenOutput,
    WrongType,
    Oversized,
}

impl Scenario {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "ok" => Self::Succeed { after: 2 },
            "fail" => Self::Fail,
            "refused" => Self::Refused,
            "refused-output" => Self::RefusedOutput,
            "never" => Self::Never,
            "ratelimit" => Self::RateLimited,
            "ratelimit-poll" => Self::RateLimitedPoll,
            "unauthorized" => Self::Unauthorized,
            "broken-output" => Self::BrokenOutput,
            "wrong-type" => Self::WrongType,
            "oversized" => Self::Oversized,
            other => Self::Succeed {
                after: other.strip_prefix("ok-")?.parse().ok()?,
            },
        })
    }

    /// The model's name if it names a scenario, else `scenario:<name>` in the prompt, else `ok`.
    fn pick(model: &str, prompt: Option<&str>) -> Self {
        Self::from_name(model)
            .or_else(|| {
                let word = prompt?.split("scenario:").nth(1)?;
                let name: String = word
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                Self::from_name(&name)
            })
            .unwrap_or(Self::Succeed { after: 2 })
    }

    /// The poll at which the job finishes (succeeded or failed); `None`: never.
    fn finishes_at(self) -> Option<u32> {
        match self {
            Self::Succeed { after } => Some(after),
            Self::Never => None,
            Self::RateLimitedPoll => Some(3),
            _ => Some(1),
        }
    }
}

/// One mocked job.
#[derive(Debug, Clone)]
struct Job {
    scenario: Scenario,
    /// The model as the prediction names it (Replicate).
    model: String,
    polls: u32,
    /// How many files it produces.
    outputs: usize,
    input: Value,
}

/// What both mocks share: jobs, counters, recorded requests, and the files.
#[derive(Default)]
pub struct TaskMockState {
    pub submits: AtomicUsize,
    pub polls: AtomicUsize,
    pub downloads: AtomicUsize,
    /// Every request, API and files alike, in order.
    pub requests: Mutex<Vec<Recorded>>,
    jobs: Mutex<BTreeMap<String, Job>>,
    next_id: AtomicUsize,
    base: Mutex<String>,
}

impl TaskMockState {
    fn record(&self, uri: &Uri, headers: &HeaderMap, body: &Bytes) {
        self.requests.lock().unwrap().push(Recorded {
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: String::from_utf8_lossy(body).to_string(),
        });
    }

    /// `http://127.0.0.1:<port>` (no `/v1`): where the files are.
    fn origin(&self) -> String {
        self.base.lock().unwrap().clone()
    }

    fn add_job(&self, id: String, job: Job) {
        self.jobs.lock().unwrap().insert(id, job);
    }

    /// Count a poll of `id`: the job as it is after it.
    fn poll_job(&self, id: &str) -> Option<Job> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        let mut jobs = self.jobs.lock().unwrap();
        let job = jobs.get_mut(id)?;
        job.polls += 1;
        Some(job.clone())
    }

    fn output_urls(&self, id: &str, job: &Job) -> Vec<String> {
        let origin = self.origin();
        let dir = match job.scenario {
            Scenario::BrokenOutput => "missing",
            Scenario::WrongType => "html",
            Scenario::Oversized => "big",
            _ => "png",
        };
        (0..job.outputs)
            .map(|i| format!("{origin}/files/{dir}/{id}/{i}.png"))
            .collect()
    }
}

/// The handle both mocks return.
pub struct TaskMock {
    pub addr: SocketAddr,
    pub state: Arc<TaskMockState>,
}

impl TaskMock {
    async fn serve(router: Router<Arc<TaskMockState>>) -> Self {
        let state = Arc::new(TaskMockState::default());
        let app = router
            .route("/files/{kind}/{job}/{file}", get(serve_file))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        *state.base.lock().unwrap() = format!("http://{addr}");
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state }
    }

    /// The channel's base URL: `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn submits(&self) -> usize {
        self.state.submits.load(Ordering::SeqCst)
    }

    pub fn polls(&self) -> usize {
        self.state.polls.load(Ordering::SeqCst)
    }

    /// File requests served (found or not).
    pub fn downloads(&self) -> usize {
        self.state.downloads.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The last request whose path starts with `prefix`.
    pub fn last(&self, prefix: &str) -> Recorded {
        self.requests()
            .into_iter()
            .rev()
            .find(|r| r.path.starts_with(prefix))
            .unwrap_or_else(|| panic!("no request under {prefix}"))
    }

    /// How many polls the job `id` has had.
    pub fn polls_of(&self, id: &str) -> u32 {
        self.state
            .jobs
            .lock()
            .unwrap()
            .get(id)
            .map_or(0, |j| j.polls)
    }

    /// The ids of the jobs submitted so far.
    pub fn job_ids(&self) -> Vec<String> {
        self.state.jobs.lock().unwrap().keys().cloned().collect()
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Replicate
// ---------------------------------------------------------------------------------------------

/// Replicate's predictions API: `POST /v1/models/{owner}/{name}/predictions` (`{"input"}`),
/// `POST /v1/predictions` (`{"version", "input"}`), `GET /v1/predictions/{id}`; bearer auth.
/// A prediction's output is a list of `input.num_outputs` URLs when the input names
/// `num_outputs`, else one URL as a string (as video and music models answer).
pub struct ReplicateMock;

impl ReplicateMock {
    pub async fn start() -> TaskMock {
        TaskMock::serve(
            Router::new()
                .route(
                    "/v1/models/{owner}/{name}/predictions",
                    post(replicate_model_submit),
                )
                .route("/v1/predictions", post(replicate_version_submit))
                .route("/v1/predictions/{id}", get(replicate_poll)),
        )
        .await
    }
}

fn replicate_unauthenticated() -> Response {
    json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}),
    )
}

fn replicate_authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {REPLICATE_KEY}"))
}

fn replicate_throttled() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            ("content-type", "application/json".to_string()),
            ("retry-after", RETRY_AFTER_SECS.to_string()),
        ],
        json!({"detail": "Request was throttled. Expected available in 1 second."}).to_string(),
    )
        .into_response()
}

fn replicate_invalid(detail: &str, fields: Value) -> Response {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({"title": "Input validation failed", "detail": detail, "status": 422, "invalid_fields": fields}),
    )
}

/// The prediction object for `id` as it is now.
fn prediction(state: &TaskMockState, id: &str, job: &Job) -> Value {
    let origin = state.origin();
    let total = 20u32;
    let (status, output, error, logs) = match (job.scenario, job.scenario.finishes_at()) {
        (scenario, Some(at)) if job.polls >= at => match scenario {
            Scenario::Fail => (
                "failed",
                Value::Null,
                json!("Prediction failed: CUDA error: an illegal memory access was encountered"),
                String::new(),
            ),
            Scenario::Refused => (
                "failed",
                Value::Null,
                json!("NSFW content detected. Try running it again, or try a different prompt."),
                String::new(),
            ),
            Scenario::RefusedOutput => (
                "failed",
                Value::Null,
                json!(
                    "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
                ),
                String::new(),
            ),
            _ => {
                let urls = state.output_urls(id, job);
                let output = if job.input.get("num_outputs").is_some() {
                    json!(urls)
                } else {
                    json!(urls.first())
                };
                (
                    "succeeded",
                    output,
                    Value::Null,
                    format!("100%|██████████| {total}/{total} [00:02<00:00, 9.5it/s]\n"),
                )
            }
        },
        (_, _) if job.polls == 0 => ("starting", Value::Null, Value::Null, String::new()),
        (_, at) => {
            // Processing: a tqdm bar of the way to `at` (`never`: stuck at 10%).
            let done = at.map_or(total / 10, |at| total * job.polls / at.max(1));
            let percent = done * 100 / total;
            (
                "processing",
                Value::Null,
                Value::Null,
                format!(
                    "Using seed: 42\n{percent:3}%|{:<10}| {done}/{total} [00:01<00:01, 9.5it/s]\n",
                    "█".repeat((percent / 10) as usize)
                ),
            )
        }
    };
    let finished = matches!(status, "succeeded" | "failed");
    let mut p = json!({
        "id": id,
        "model": job.model,
        "version": "hidden",
        "input": job.input,
        "logs": logs,
        "output": output,
        "data_removed": false,
        "error": error,
        "status": status,
        "source": "api",
        "created_at": "2025-01-01T00:00:00.000Z",
        "urls": {
            "cancel": format!("{origin}/v1/predictions/{id}/cancel"),
            "get": format!("{origin}/v1/predictions/{id}"),
            "web": format!("https://replicate.com/p/{id}"),
        }
    });
    if job.polls > 0 || finished {
        p["started_at"] = json!("2025-01-01T00:00:01.000Z");
    }
    if finished {
        p["completed_at"] = json!("2025-01-01T00:00:03.000Z");
        p["metrics"] = json!({"predict_time": 2.1, "total_time": 3.0, "image_count": job.outputs});
    }
    p
}

async fn replicate_model_submit(
    State(state): State<Arc<TaskMockState>>,
    Path((owner, name)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    replicate_submit(
        &state,
        format!("{owner}/{name}"),
        &name,
        false,
        &uri,
        &headers,
        &body,
    )
}

async fn replicate_version_submit(
    State(state): State<Arc<TaskMockState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    replicate_submit(&state, String::new(), "", true, &uri, &headers, &body)
}

fn replicate_submit(
    state: &TaskMockState,
    model: String,
    name: &str,
    by_version: bool,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    state.record(uri, headers, body);
    state.submits.fetch_add(1, Ordering::SeqCst);
    if !replicate_authorized(headers) {
        return replicate_unauthenticated();
    }
    let Ok(Value::Object(payload)) = serde_json::from_slice::<Value>(body) else {
        return replicate_invalid("Request body is not a JSON object", json!([]));
    };
    let allowed = [
        "input",
        "version",
        "stream",
        "webhook",
        "webhook_events_filter",
    ];
    if let Some(extra) = payload.keys().find(|k| !allowed.contains(&k.as_str())) {
        return replicate_invalid(
            &format!("- (root): Additional property {extra} is not allowed"),
            json!([{"type": "additional_property_not_allowed", "field": "", "description": format!("Additional property {extra} is not allowed")}]),
        );
    }
    let Some(input) = payload.get("input").filter(|i| i.is_object()) else {
        return replicate_invalid(
            "- (root): input is required",
            json!([{"type": "required", "field": "", "description": "input is required"}]),
        );
    };
    let (model, name) = if by_version {
        let Some(version) = payload.get("version").and_then(Value::as_str) else {
            return replicate_invalid(
                "- (root): version is required",
                json!([{"type": "required", "field": "", "description": "version is required"}]),
            );
        };
        (format!("mock/{version}"), version.to_string())
    } else {
        (model, name.to_string())
    };
    let scenario = Scenario::pick(&name, input.get("prompt").and_then(Value::as_str));
    match scenario {
        Scenario::RateLimited => return replicate_throttled(),
        Scenario::Unauthorized => return replicate_unauthenticated(),
        _ => {}
    }
    let n = state.next_id.fetch_add(1, Ordering::SeqCst);
    let id = format!("mock{n:022}");
    let outputs = input
        .get("num_outputs")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 4) as usize;
    let job = Job {
        scenario,
        model,
        polls: 0,
        outputs,
        input: input.clone(),
    };
    let answer = prediction(state, &id, &job);
    state.add_job(id, job);
    json_response(StatusCode::CREATED, &answer)
}

async fn replicate_poll(
    State(state): State<Arc<TaskMockState>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    state.record(&uri, &headers, &Bytes::new());
    if !replicate_authorized(&headers) {
        state.polls.fetch_add(1, Ordering::SeqCst);
        return replicate_unauthenticated();
    }
    let Some(job) = state.poll_job(&id) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"title": "Not found", "detail": "Not found.", "status": 404}),
        );
    };
    if job.scenario == Scenario::RateLimitedPoll && job.polls == 1 {
        return replicate_throttled();
    }
    json_response(StatusCode::OK, &prediction(&state, &id, &job))
}

// ---------------------------------------------------------------------------------------------
// Black Forest Labs
// ---------------------------------------------------------------------------------------------

/// Black Forest Labs' FLUX API: `POST /v1/{model}` (the inputs as the body) answers `{id,
/// polling_url, cost, input_mp, output_mp}`; `GET /v1/get_result?id=` answers `{id, status,
/// result, progress}` with `Pending` (progress as a fraction), `Ready` (`result.sample`),
/// `Request Moderated`, `Content Moderated`, `Error`, `Task not found`; the key in `x-key`.
pub struct BflMock;

impl BflMock {
    pub async fn start() -> TaskMock {
        TaskMock::serve(
            Router::new()
                .route("/v1/get_result", get(bfl_poll))
                .route("/v1/{model}", post(bfl_submit)),
        )
        .await
    }
}

fn bfl_authorized(headers: &HeaderMap) -> bool {
    headers
        .get("x-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == BFL_KEY)
}

fn bfl_forbidden() -> Response {
    json_response(
        StatusCode::FORBIDDEN,
        &json!({"detail": "Not authenticated - Invalid Authentication"}),
    )
}

fn bfl_throttled() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            ("content-type", "application/json".to_string()),
            ("retry-after", RETRY_AFTER_SECS.to_string()),
        ],
        json!({"detail": "You have exceeded the number of active tasks. Please wait for some tasks to finish."}).to_string(),
    )
        .into_response()
}

async fn bfl_submit(
    State(state): State<Arc<TaskMockState>>,
    Path(model): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.record(&uri, &headers, &body);
    state.submits.fetch_add(1, Ordering::SeqCst);
    if !bfl_authorized(&headers) {
        return bfl_forbidden();
    }
    let input = match serde_json::from_slice::<Value>(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"detail": [{"loc": ["body"], "msg": "Input should be a valid dictionary or object to extract fields from", "type": "model_attributes_type"}]}),
            );
        }
    };
    if let Some(w) = input.get("width").and_then(Value::as_u64)
        && (w % 32 != 0 || !(256..=1440).contains(&w))
    {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"detail": [{"loc": ["body", "width"], "msg": "Input should be a multiple of 32 between 256 and 1440", "type": "value_error"}]}),
        );
    }
    let scenario = Scenario::pick(&model, input.get("prompt").and_then(Value::as_str));
    match scenario {
        Scenario::RateLimited => return bfl_throttled(),
        Scenario::Unauthorized => return bfl_forbidden(),
        _ => {}
    }
    let n = state.next_id.fetch_add(1, Ordering::SeqCst);
    let id = format!("00000000-0000-4000-8000-{n:012x}");
    state.add_job(
        id.clone(),
        Job {
            scenario,
            model,
            polls: 0,
            outputs: 1,
            input,
        },
    );
    json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "polling_url": format!("{}/v1/get_result?id={id}", state.origin()),
            "cost": 4.0,
            "input_mp": 0.0,
            "output_mp": 1.05,
        }),
    )
}

async fn bfl_poll(
    State(state): State<Arc<TaskMockState>>,
    Query(query): Query<BTreeMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    state.record(&uri, &headers, &Bytes::new());
    if !bfl_authorized(&headers) {
        state.polls.fetch_add(1, Ordering::SeqCst);
        return bfl_forbidden();
    }
    let Some(id) = query.get("id") else {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"detail": [{"loc": ["query", "id"], "msg": "Field required", "type": "missing"}]}),
        );
    };
    let Some(job) = state.poll_job(id) else {
        return json_response(
            StatusCode::OK,
            &json!({"id": id, "status": "Task not found", "result": null, "progress": null}),
        );
    };
    if job.scenario == Scenario::RateLimitedPoll && job.polls == 1 {
        return bfl_throttled();
    }
    let finished = job
        .scenario
        .finishes_at()
        .filter(|at| job.polls >= (*at).max(1));
    let body = match (job.scenario, finished) {
        (Scenario::Fail, Some(_)) => {
            json!({"id": id, "status": "Error", "result": null, "progress": null, "details": {"error": "Internal generation error"}})
        }
        (Scenario::Refused, Some(_)) => {
            json!({"id": id, "status": "Request Moderated", "result": null, "progress": null, "details": {"Moderation Reasons": ["Content Policy"]}})
        }
        (Scenario::RefusedOutput, Some(_)) => {
            json!({"id": id, "status": "Content Moderated", "result": null, "progress": null, "details": {"Moderation Reasons": ["Derivative Works Filter"]}})
        }
        (_, Some(_)) => {
            let sample = state.output_urls(id, &job).remove(0);
            json!({
                "id": id,
                "status": "Ready",
                "result": {
                    "sample": sample,
                    "prompt": job.input.get("prompt").cloned().unwrap_or(Value::Null),
                    "seed": job.input.get("seed").cloned().unwrap_or(json!(42)),
                    "start_time": 1_741_760_930.183,
                    "end_time": 1_741_760_934.112,
                    "duration": 3.929,
                },
                "progress": null,
            })
        }
        (scenario, None) => {
            // Pending: progress as a fraction of the way (`never`: stuck at 0.1).
            let progress = match scenario.finishes_at() {
                Some(at) => f64::from(job.polls) / f64::from(at.max(1)),
                None => 0.1,
            };
            json!({"id": id, "status": "Pending", "result": null, "progress": progress})
        }
    };
    json_response(StatusCode::OK, &body)
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// `GET /files/{kind}/{job}/{file}`: `png` a small PNG (its colour from the job and file), `html`
/// an HTML page, `big` [`OVERSIZED_BYTES`] of PNG-typed bytes, anything else 404.
async fn serve_file(
    State(state): State<Arc<TaskMockState>>,
    Path((kind, job, file)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    state.record(&uri, &headers, &Bytes::new());
    state.downloads.fetch_add(1, Ordering::SeqCst);
    match kind.as_str() {
        "png" => (
            StatusCode::OK,
            [("content-type", "image/png")],
            tiny_png(&format!("{job}/{file}")),
        )
            .into_response(),
        "html" => (
            StatusCode::OK,
            [("content-type", "text/html; charset=utf-8")],
            "<!doctype html><html><body><h1>Sign in to continue</h1></body></html>",
        )
            .into_response(),
        "big" => {
            let mut body = vec![0u8; OVERSIZED_BYTES];
            body[..8].copy_from_slice(b"\x89PNG\r\n\x1a\n");
            (StatusCode::OK, [("content-type", "image/png")], body).into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            [("content-type", "application/xml")],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>",
        )
            .into_response(),
    }
}

/// A valid 2x2 RGB PNG whose colour comes from `seed` (stored zlib block, CRC-32, Adler-32).
pub fn tiny_png(seed: &str) -> Vec<u8> {
    let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let [r, g, b, ..] = h.to_le_bytes();
    // Two rows, each a filter byte (none) and two pixels.
    let row = [0, r, g, b, r, g, b];
    let raw = [row, row].concat();
    let len = raw.len() as u16;
    let mut z = vec![0x78, 0x01, 0x01];
    z.extend_from_slice(&len.to_le_bytes());
    z.extend_from_slice(&(!len).to_le_bytes());
    z.extend_from_slice(&raw);
    let (mut a, mut s) = (1u32, 0u32);
    for x in &raw {
        a = (a + u32::from(*x)) % 65_521;
        s = (s + a) % 65_521;
    }
    z.extend_from_slice(&((s << 16) | a).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&2u32.to_be_bytes());
    ihdr.extend_from_slice(&2u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, body) in [
        (&b"IHDR"[..], ihdr),
        (&b"IDAT"[..], z),
        (&b"IEND"[..], Vec::new()),
    ] {
        png.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(&body);
        let crc = crc32fast::hash(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}
