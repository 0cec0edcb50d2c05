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
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::app::SharedState;
use crate::error::{ApiError, ErrorLogged, RequestError};
use crate::pipeline::chat::{self, ChatReply, ChatRequest};

pub fn public_routes() -> Router<SharedState> {
    Router::new()
        .route(chat::ROUTE, post(chat_completions))
        .route("/v1/models", get(list_models))
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

async fn chat_completions(
    State(st): State<SharedState>,
    body: Result<RawBody, ApiError>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let RawBody(bytes) = body.map_err(|e| match e {
            ApiError::Request(RequestError::TooLarge { .. }) => RequestError::TooLarge {
                limit: st.config.server.max_body_bytes,
            }
            .into(),
            other => other,
        })?;
        let req = ChatRequest::parse(bytes)?;
        let model = req.model.clone();
        let limit = st.config.server.request_timeout;
        let reply = tokio::time::timeout(limit, chat::chat(&st, req))
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
        Ok(_) => model.as_str(),
        Err(ApiError::Routing(crate::routing::RoutingError::UnknownModel(_))) => "unknown",
        Err(_) => model.as_str(),
    };
    match reply {
        Ok(ChatReply::Json { body, provider }) => {
            st.metrics
                .request(chat::ROUTE, model_label, &provider, "ok");
            json_response(StatusCode::OK, body)
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
