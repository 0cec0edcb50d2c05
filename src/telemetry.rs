//! Tracing setup and the request span. Spans carry ids, routes and outcomes, never prompt text
//! or secrets.

use axum::http::Request;
use tracing::Span;

use crate::config::LogConfig;

/// Install the global subscriber (once; later calls are ignored, which suits tests).
pub fn init(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if cfg.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The span of one request: method, matched route and request id; never the body.
pub fn request_span<B>(req: &Request<B>) -> Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %req.method(), route = %route, request_id = %id)
}

/// Resolve on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
