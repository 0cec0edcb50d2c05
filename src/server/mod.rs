//! Routes, thin handlers, the body extractor, SSE framing out, and error logging.
//!
//! Handlers turn HTTP into pipeline calls and pipeline results into HTTP; they parse no provider
//! JSON and call no upstream themselves.

pub mod listen;
mod tasks;

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::app::SharedState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorLogged, RequestError};
use crate::pipeline::{
    self, FrameStream, Reply, Route, Served, chat, embeddings, images, messages, models, speech,
};
use listen::BodyPermit;

/// The request id header; ours on every request and response.
pub const REQUEST_ID: &str = "x-request-id";
/// What a billed, non-streamed response cost, in USD (streams carry it in their usage chunk).
pub const COST_HEADER: &str = "x-tollgate-cost";

/// Give every request a fresh id (replacing any the client sent: the id names ledger entries)
/// and copy it onto the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    // A v4 UUID from the thread's CSPRNG (seeded from the OS once): no system call a request.
    let id = uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned();
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID, v.clone());
        let mut resp = next.run(req).await;
        resp.headers_mut().insert(REQUEST_ID, v);
        resp
    } else {
        next.run(req).await
    }
}

pub fn public_routes() -> Router<SharedState> {
    Router::new()
        .route(chat::ROUTE, post(pipeline_handler::<chat::Chat>))
        .route(
            embeddings::ROUTE,
            post(pipeline_handler::<embeddings::Embeddings>),
        )
        .route(images::ROUTE, post(pipeline_handler::<images::Images>))
        .route(speech::ROUTE, post(pipeline_handler::<speech::Speech>))
        .route(
            messages::ROUTE,
            post(pipeline_handler::<messages::Messages>),
        )
        .route(
            pipeline::tasks::ROUTE,
            post(pipeline_handler::<pipeline::tasks::Tasks>),
        )
        .route("/v1/tasks/{id}", get(tasks::get_task))
        .route("/v1/files/{*key}", get(tasks::get_file))
        .route(models::ROUTE, get(list_models))
        .route("/v1/pricing", get(pricing))
        .route("/v1/balance", get(balance))
        .route("/v1/usage", get(usage))
        .route("/v1/models/{id}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

pub fn operator_routes() -> Router<SharedState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The raw body, read whole within `server.body_read_timeout` (408 otherwise), holding its
/// share of `server.max_inflight_body_bytes` until dropped (503 when there is no room), with a
/// too-large or unreadable body turned into our error body.
pub struct RawBody(pub Vec<u8>, pub BodyPermit);

impl FromRequest<SharedState> for RawBody {
    type Rejection = ApiError;

    /// The body read into one buffer, sized once from `Content-Length` when the client sent it
    /// (no copy of the whole body on the way in).
    async fn from_request(req: Request, st: &SharedState) -> Result<Self, Self::Rejection> {
        use http_body_util::BodyExt as _;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = st.config.server.max_body_bytes;
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(RequestError::TooLarge { limit }.into());
        }
        let permit = st.body_budget.take(declared).ok_or(RequestError::Busy)?;
        let wait = st.config.server.body_read_timeout;
        let capacity = declared
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
            .min(limit);
        let mut body = req.into_body();
        let read = async move {
            let mut buf: Vec<u8> = Vec::with_capacity(capacity);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Err(ApiError::invalid(
                        "the request body could not be read",
                        None,
                    ));
                };
                if let Ok(data) = frame.into_data() {
                    if buf.len().saturating_add(data.len()) > limit {
                        return Err(RequestError::TooLarge { limit }.into());
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(buf)
        };
        let buf = tokio::time::timeout(wait, read)
            .await
            .map_err(|_| RequestError::BodyTimeout(wait))??;
        Ok(Self(buf, permit))
    }
}

/// The request id `request_id` put on the request.
fn request_id_of(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The credential of an `Authorization: Bearer <credential>` value. The scheme is
/// case-insensitive (RFC 9110 §11.1): `Bearer`, `bearer`, `BEARER`.
pub fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, credential) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim_start())
}

/// The header Anthropic's SDKs send the key in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The caller, if the request carries a key: `Authorization: Bearer <key>`, else `x-api-key:
/// <key>` (Anthropic's SDKs); `None` for an anonymous request.
async fn caller_of(st: &SharedState, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    let key = if let Some(value) = headers.get(header::AUTHORIZATION) {
        value.to_str().ok().and_then(bearer_credential)
    } else if let Some(value) = headers.get(API_KEY_HEADER) {
        value.to_str().ok()
    } else {
        return Ok(None);
    };
    Ok(Some(st.auth.authenticate(key).await?))
}

/// Anthropic's SDKs read the request id from `request-id`: routes in Anthropic's shape get it
/// beside `x-request-id`.
fn with_request_id<R: Route>(mut resp: Response, request_id: &str) -> Response {
    if R::ERRORS == crate::error::ErrorShape::Anthropic
        && let Ok(v) = HeaderValue::from_str(request_id)
    {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}

async fn require_caller(st: &SharedState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    caller_of(st, headers)
        .await?
        .ok_or_else(|| crate::auth::AuthError::Missing.into())
}

/// Every pipeline route: read and parse the body (the route's own validation), find the caller,
/// run the route's steps within `server.request_timeout`, count it, answer.
async fn pipeline_handler<R: Route>(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Result<RawBody, ApiError>,
) -> Response {
    let request_id = request_id_of(&headers);
    let resp = pipeline_response::<R>(&st, &headers, body, request_id.clone()).await;
    with_request_id::<R>(resp, &request_id)
}

/// [`pipeline_handler`]'s work: the response in the route's shape.
async fn pipeline_response<R: Route>(
    st: &SharedState,
    headers: &HeaderMap,
    body: Result<RawBody, ApiError>,
    request_id: String,
) -> Response {
    let route = R::PATH;
    let started = Instant::now();
    let result = async {
        // The body's share of the in-flight budget is held until the answer is made.
        let RawBody(bytes, _permit) = body?;
        let caller = caller_of(st, headers).await?;
        // A large body waits for its turn at the heavy steps before it is parsed (for at most
        // the request's timeout).
        let limit = st.config.server.request_timeout;
        let turn = tokio::time::timeout(limit, st.heavy_turns.take(bytes.len()))
            .await
            .map_err(|_| ApiError::RequestTimeout(limit))?;
        let mut body = pipeline::Body::parse(bytes)?;
        body.turn = turn;
        let call = R::parse(body, request_id)?;
        let model = call.model.clone();
        // The route's steps are one large future: boxed once here, it is not copied again by
        // every combinator it passes through (the timeout, the handler's and the layers').
        let reply = tokio::time::timeout(limit, Box::pin(R::run(st, caller, call)))
            .await
            .map_err(|_| ApiError::RequestTimeout(limit))
            .and_then(|r| r);
        Ok::<_, ApiError>((model, reply))
    }
    .await;
    st.metrics.request_duration(route, started.elapsed());
    let (model, reply) = match result {
        Ok(v) => v,
        Err(e) => {
            st.metrics.request(route, "unknown", "none", e.kind());
            return e.respond(R::ERRORS);
        }
    };
    // Only configured names become label values (a closed set); anything else is "unknown".
    let model_label = match &reply {
        Err(ApiError::Routing(crate::routing::RoutingError::UnknownModel(_))) => "unknown",
        _ => model.as_str(),
    };
    match reply {
        Ok(Served { reply, provider }) => {
            st.metrics.request(route, model_label, &provider, "ok");
            match reply {
                Reply::Json { body, cost } => {
                    let mut resp = json_response(StatusCode::OK, body);
                    if let Some(c) = cost
                        && let Ok(v) = HeaderValue::from_str(&c.to_string())
                    {
                        resp.headers_mut().insert(COST_HEADER, v);
                    }
                    resp
                }
                Reply::Stream(frames) => sse_response(frames),
                Reply::Binary {
                    content_type,
                    body,
                    cost,
                } => binary_response(&content_type, body, cost),
            }
        }
        Err(e) => {
            st.metrics.request(route, model_label, "none", e.kind());
            e.respond(R::ERRORS)
        }
    }
}

/// `GET /v1/balance`: the caller's account balance.
async fn balance(State(st): State<SharedState>, headers: HeaderMap) -> Response {
    let result = async {
        let caller = require_caller(&st, &headers).await?;
        let a = crate::accounts::get(&st.billing, &caller.account_id)
            .await
            .map_err(|e| match e {
                crate::accounts::AccountError::Store(s) => ApiError::Billing(s.into()),
                _ => ApiError::Billing(crate::billing::BillingError::NoAccount),
            })?;
        Ok::<_, ApiError>(json!({
            "object": "balance",
            "account": a.name,
            "balance": a.balance_usd,
            "balance_picodollars": a.balance,
            "reserved_picodollars": a.reserved,
            "available": crate::billing::Credits(a.balance.saturating_sub(a.reserved)).to_string(),
        }))
    }
    .await;
    match result {
        Ok(v) => json_response(StatusCode::OK, v.to_string()),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/usage?limit=N`: the caller's own ledger entries, newest first.
async fn usage(
    State(st): State<SharedState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::BTreeMap<String, String>>,
) -> Response {
    let result = async {
        let caller = require_caller(&st, &headers).await?;
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<i64>().ok())
            .unwrap_or(100)
            .clamp(1, 1000);
        let entries = st
            .billing
            .ledger(Some(&caller.account_id), None, limit)
            .await?;
        Ok::<_, ApiError>(json!({ "object": "list", "data": entries }))
    }
    .await;
    match result {
        Ok(v) => json_response(StatusCode::OK, v.to_string()),
        Err(e) => e.into_response(),
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn sse_response(frames: FrameStream) -> Response {
    let body = Body::from_stream(futures::StreamExt::map(
        frames,
        Ok::<_, std::convert::Infallible>,
    ));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// A binary body passed through as it arrives, with its media type and (billed) its cost.
fn binary_response(
    content_type: &str,
    body: pipeline::BinaryStream,
    cost: Option<crate::billing::Credits>,
) -> Response {
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Some(c) = cost
        && let Ok(v) = HeaderValue::from_str(&c.to_string())
    {
        h.insert(COST_HEADER, v);
    }
    resp
}

async fn list_models(State(st): State<SharedState>) -> Response {
    json_response(StatusCode::OK, models::list(&st).to_string())
}

async fn pricing(State(st): State<SharedState>) -> Response {
    json_response(StatusCode::OK, models::pricing(&st).to_string())
}

async fn get_model(
    State(st): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match models::get(&st, &id) {
        Ok(v) => json_response(StatusCode::OK, v.to_string()),
        Err(e) => e.into_response(),
    }
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.into())
}

async fn readyz(State(st): State<SharedState>) -> Response {
    if st.ready.load(Ordering::Acquire) {
        json_response(StatusCode::OK, r#"{"status":"ready"}"#.into())
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"starting"}"#.into(),
        )
    }
}

async fn metrics(State(st): State<SharedState>) -> Response {
    let mut resp = st.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

async fn not_found() -> Response {
    ApiError::NotFound.into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed.into_response()
}

/// Log an error response once, inside the request span, with its internal detail.
pub async fn log_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if let Some(e) = resp.extensions().get::<ErrorLogged>() {
        if resp.status().is_server_error() {
            tracing::warn!(status = resp.status().as_u16(), kind = e.kind, detail = %e.detail, "request failed");
        } else {
            tracing::info!(status = resp.status().as_u16(), kind = e.kind, detail = %e.detail, "request refused");
        }
    }
    resp
}
