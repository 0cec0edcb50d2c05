//! Routes, thin handlers, the body extractor, SSE framing out, and error logging.
//!
//! Handlers turn HTTP into pipeline calls and pipeline results into HTTP; they parse no provider
//! JSON and call no upstream themselves.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::app::SharedState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorLogged, RequestError};
use crate::pipeline::chat::{self, ChatReply, ChatRequest};

/// The request id header; ours on every request and response.
pub const REQUEST_ID: &str = "x-request-id";
/// What a billed, non-streamed response cost, in USD (streams carry it in their usage chunk).
pub const COST_HEADER: &str = "x-tollgate-cost";

/// Give every request a fresh id (replacing any the client sent: the id names ledger entries)
/// and copy it onto the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
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
        .route(chat::ROUTE, post(chat_completions))
        .route("/v1/models", get(list_models))
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

/// The raw body, with a too-large or unreadable body turned into our error body.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Self(b)),
            Err(BytesRejection::FailedToBufferBody(e)) => {
                let too_large = e.body_text().to_ascii_lowercase().contains("length limit")
                    || e.status() == StatusCode::PAYLOAD_TOO_LARGE;
                if too_large {
                    Err(RequestError::TooLarge { limit: 0 }.into())
                } else {
                    Err(ApiError::invalid(
                        "the request body could not be read",
                        None,
                    ))
                }
            }
            Err(_) => Err(ApiError::invalid(
                "the request body could not be read",
                None,
            )),
        }
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

/// The caller, if the request carries `Authorization`; `None` for an anonymous request.
async fn caller_of(st: &SharedState, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bearer = value.to_str().ok().and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    });
    Ok(Some(st.auth.authenticate(bearer).await?))
}

async fn require_caller(st: &SharedState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    caller_of(st, headers)
        .await?
        .ok_or_else(|| crate::auth::AuthError::Missing.into())
}

async fn chat_completions(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Result<RawBody, ApiError>,
) -> Response {
    let started = Instant::now();
    let request_id = request_id_of(&headers);
    let result = async {
        let RawBody(bytes) = body.map_err(|e| match e {
            ApiError::Request(RequestError::TooLarge { .. }) => RequestError::TooLarge {
                limit: st.config.server.max_body_bytes,
            }
            .into(),
            other => other,
        })?;
        let caller = caller_of(&st, &headers).await?;
        let req = ChatRequest::parse(bytes)?;
        let model = req.model.clone();
        let limit = st.config.server.request_timeout;
        let reply = tokio::time::timeout(limit, chat::chat(&st, caller.as_ref(), &request_id, req))
            .await
            .map_err(|_| ApiError::RequestTimeout(limit))
            .and_then(|r| r);
        Ok::<_, ApiError>((model, reply))
    }
    .await;
    st.metrics.request_duration(chat::ROUTE, started.elapsed());
    let (model, reply) = match result {
        Ok(v) => v,
        Err(e) => {
            st.metrics.request(chat::ROUTE, "unknown", "none", e.kind());
            return e.into_response();
        }
    };
    // Only configured names become label values (a closed set); anything else is "unknown".
    let model_label = match &reply {
        Err(ApiError::Routing(crate::routing::RoutingError::UnknownModel(_))) => "unknown",
        _ => model.as_str(),
    };
    match reply {
        Ok(ChatReply::Json {
            body,
            provider,
            cost,
        }) => {
            st.metrics
                .request(chat::ROUTE, model_label, &provider, "ok");
            let mut resp = json_response(StatusCode::OK, body);
            if let Some(c) = cost
                && let Ok(v) = HeaderValue::from_str(&c.to_string())
            {
                resp.headers_mut().insert(COST_HEADER, v);
            }
            resp
        }
        Ok(ChatReply::Stream { frames, provider }) => {
            st.metrics
                .request(chat::ROUTE, model_label, &provider, "ok");
            sse_response(frames)
        }
        Err(e) => {
            st.metrics
                .request(chat::ROUTE, model_label, "none", e.kind());
            e.into_response()
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
            "available": crate::billing::Credits(a.balance - a.reserved).to_string(),
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

fn sse_response(frames: chat::FrameStream) -> Response {
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

async fn list_models(State(st): State<SharedState>) -> Response {
    let data: Vec<serde_json::Value> = st
        .routing
        .models()
        .into_iter()
        .map(|(route, plugin)| model_json(&route, plugin.as_deref()))
        .collect();
    json_response(
        StatusCode::OK,
        json!({ "object": "list", "data": data }).to_string(),
    )
}

async fn get_model(
    State(st): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match st.routing.models().into_iter().find(|(r, _)| r.model == id) {
        Some((route, plugin)) => json_response(
            StatusCode::OK,
            model_json(&route, plugin.as_deref()).to_string(),
        ),
        None => ApiError::from(crate::routing::RoutingError::UnknownModel(id)).into_response(),
    }
}

fn model_json(
    route: &crate::routing::Route,
    plugin: Option<&crate::plugins::Plugin>,
) -> serde_json::Value {
    let info = plugin.and_then(|p| {
        p.manifest
            .models
            .iter()
            .find(|m| m.id == route.upstream_model)
    });
    json!({
        "id": route.model,
        "object": "model",
        "created": 0,
        "owned_by": route.channel.plugin,
        "tollgate": {
            "channel": route.channel.name,
            "provider": plugin.map(|p| json!({
                "name": p.manifest.name,
                "version": p.manifest.version,
            })),
            "available": plugin.is_some(),
            "kinds": info.map(|m| m.kinds.clone()),
            "context_window": info.and_then(|m| m.context_window),
            "pricing": info.and_then(|m| m.price.as_ref()).map(|p| json!({
                "unit": "1e-12 USD",
                "input_per_token": p.input_per_token,
                "output_per_token": p.output_per_token,
                "per_image": p.per_image,
                "per_second": p.per_second,
                "per_request": p.per_request,
            })),
        }
    })
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
