//! `ApiError`: the one place where errors become HTTP responses.
//!
//! Every boundary has its own error type (`plugins::PluginError`, `upstream::UpstreamError`,
//! `routing::RoutingError`, ...). `ApiError` wraps them, maps each variant to a status in one
//! exhaustive `match` (no `_ =>`), gives a stable `kind()` for `error.code` and metric labels, and
//! renders OpenAI's body (`{"error": {"message", "type", "code", "param"}}`). Internal details stay
//! in the log; the client sees a clear message and the request id. Text from an upstream never
//! reaches a body: a provider's error gets a message written here, per class, with its status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::AuthError;
use crate::billing::BillingError;
use crate::limits::LimitError;
use crate::plugins::{GuestErrorClass, PluginError};
use crate::routing::RoutingError;
use crate::upstream::UpstreamError;

/// Errors in the client's request itself.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("unsupported media type: send `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("the gateway is holding as many request bodies as it may; retry shortly")]
    Busy,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("This API key is not allowed to use the model `{0}`.")]
    ModelNotAllowed(String),
    #[error(transparent)]
    ContentPolicy(#[from] crate::moderation::Blocked),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the request did not finish within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("route not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal(String),
    /// The admin API's refusals (operator listener).
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::Request(RequestError::Invalid {
            message: message.into(),
            param,
        })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Request(RequestError::Invalid { .. }) => StatusCode::BAD_REQUEST,
            Self::Request(RequestError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Request(RequestError::UnsupportedMediaType) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Request(RequestError::BodyTimeout(_)) => StatusCode::REQUEST_TIMEOUT,
            Self::Request(RequestError::Busy) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Routing(RoutingError::UnknownModel(_)) => StatusCode::NOT_FOUND,
            Self::Auth(e) => match e {
                AuthError::Missing
                | AuthError::Malformed
                | AuthError::Unknown
                | AuthError::Revoked
                | AuthError::Expired => StatusCode::UNAUTHORIZED,
                AuthError::AccountSuspended | AuthError::KeySuspended { .. } => {
                    StatusCode::FORBIDDEN
                }
                AuthError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Billing(e) => match e {
                BillingError::InsufficientBalance { .. } => StatusCode::PAYMENT_REQUIRED,
                BillingError::NoAccount => StatusCode::FORBIDDEN,
                BillingError::Backlog { .. } => StatusCode::SERVICE_UNAVAILABLE,
                BillingError::Ledger(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Limit(LimitError::Exceeded(_)) => StatusCode::TOO_MANY_REQUESTS,
            Self::Limit(LimitError::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Limit(LimitError::Billing(_) | LimitError::Store(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::ContentPolicy(_) => StatusCode::BAD_REQUEST,
            Self::Routing(RoutingError::PluginNotLoaded { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Routing(RoutingError::Unpriced(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Plugin(e) => match e {
                PluginError::Guest { class, .. } => match class {
                    GuestErrorClass::InvalidRequest => StatusCode::BAD_REQUEST,
                    GuestErrorClass::ContentRefused => StatusCode::BAD_REQUEST,
                    GuestErrorClass::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                    GuestErrorClass::Auth => StatusCode::BAD_GATEWAY,
                    GuestErrorClass::NotFound => StatusCode::BAD_GATEWAY,
                    GuestErrorClass::Upstream => StatusCode::BAD_GATEWAY,
                },
                PluginError::Trap { .. }
                | PluginError::Timeout { .. }
                | PluginError::OutOfMemory { .. }
                | PluginError::BadOutput { .. } => StatusCode::BAD_GATEWAY,
                PluginError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                UpstreamError::Connect { .. }
                | UpstreamError::Io { .. }
                | UpstreamError::Truncated { .. }
                | UpstreamError::BadRequest { .. }
                | UpstreamError::TooLarge { .. } => StatusCode::BAD_GATEWAY,
            },
            Self::RequestTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Admin(e) => e.status(),
        }
    }

    /// A stable, low-cardinality name: OpenAI's `error.code` and the `outcome` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Request(RequestError::Invalid { .. }) => "invalid_request",
            Self::Request(RequestError::TooLarge { .. }) => "request_too_large",
            Self::Request(RequestError::UnsupportedMediaType) => "unsupported_media_type",
            Self::Request(RequestError::BodyTimeout(_)) => "body_timeout",
            Self::Request(RequestError::Busy) => "server_busy",
            Self::Routing(RoutingError::UnknownModel(_)) => "model_not_found",
            Self::Auth(e) => match e {
                AuthError::Missing => "missing_api_key",
                AuthError::Malformed | AuthError::Unknown => "invalid_api_key",
                AuthError::Revoked => "revoked_api_key",
                AuthError::Expired => "expired_api_key",
                AuthError::AccountSuspended => "account_suspended",
                AuthError::KeySuspended { .. } => "key_suspended",
                AuthError::Store(_) => "internal_error",
            },
            Self::Billing(e) => match e {
                BillingError::InsufficientBalance { .. } => "insufficient_quota",
                BillingError::NoAccount => "account_not_found",
                BillingError::Backlog { .. } => "billing_backlog",
                BillingError::Ledger(_) => "internal_error",
            },
            Self::Limit(LimitError::Exceeded(_)) => "rate_limit_exceeded",
            Self::Limit(LimitError::Unavailable) => "limits_unavailable",
            Self::Limit(LimitError::Billing(_) | LimitError::Store(_)) => "internal_error",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::ContentPolicy(_) => "content_policy_violation",
            Self::Routing(RoutingError::PluginNotLoaded { .. }) => "provider_unavailable",
            Self::Routing(RoutingError::Unpriced(_)) => "model_unpriced",
            Self::Plugin(e) => match e {
                PluginError::Guest { class, .. } => match class {
                    GuestErrorClass::InvalidRequest => "invalid_request",
                    GuestErrorClass::ContentRefused => "content_policy_violation",
                    GuestErrorClass::RateLimited => "upstream_rate_limited",
                    GuestErrorClass::Auth => "upstream_auth_failed",
                    GuestErrorClass::NotFound => "upstream_not_found",
                    GuestErrorClass::Upstream => "upstream_error",
                },
                PluginError::Trap { .. } => "plugin_trap",
                PluginError::Timeout { .. } => "plugin_timeout",
                PluginError::OutOfMemory { .. } => "plugin_memory_limit",
                PluginError::BadOutput { .. } => "plugin_bad_output",
                PluginError::Busy { .. } => "plugin_busy",
            },
            Self::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => "upstream_timeout",
                UpstreamError::Connect { .. } => "upstream_unreachable",
                UpstreamError::Io { .. } => "upstream_io",
                UpstreamError::Truncated { .. } => "upstream_truncated",
                UpstreamError::BadRequest { .. } => "plugin_bad_output",
                UpstreamError::TooLarge { .. } => "upstream_too_large",
            },
            Self::RequestTimeout(_) => "request_timeout",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal(_) => "internal_error",
            Self::Admin(e) => e.code(),
        }
    }

    /// OpenAI's `error.type`.
    fn openai_type(&self) -> &'static str {
        if let Self::Admin(_) = self {
            return "admin_error";
        }
        let status = self.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            "rate_limit_error"
        } else if status == StatusCode::UNAUTHORIZED {
            "authentication_error"
        } else if status == StatusCode::FORBIDDEN {
            "permission_error"
        } else if status == StatusCode::PAYMENT_REQUIRED {
            "insufficient_quota"
        } else if status.is_client_error() {
            "invalid_request_error"
        } else {
            "api_error"
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::Request(RequestError::Invalid { param, .. }) => *param,
            Self::Routing(RoutingError::UnknownModel(_)) => Some("model"),
            _ => None,
        }
    }

    /// The message the client sees: never internal details, never an upstream's words.
    fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => {
                "internal error; quote the x-request-id header when reporting it".into()
            }
            Self::Admin(e) if e.status().is_server_error() => {
                "internal error; quote the x-request-id header when reporting it".into()
            }
            Self::Plugin(PluginError::Guest {
                plugin,
                class,
                status,
                from_upstream,
                ..
            }) => guest_message(plugin, *class, *status, *from_upstream)
                .unwrap_or_else(|| self.to_string()),
            other => other.to_string(),
        }
    }

    /// The body in OpenAI's error shape.
    pub fn openai_body(&self) -> serde_json::Value {
        let mut body = json!({
            "error": {
                "message": self.public_message(),
                "type": self.openai_type(),
                "code": self.kind(),
                "param": self.param(),
            }
        });
        if let Self::ContentPolicy(b) = self {
            body["error"]["category"] = json!(b.category);
        }
        body
    }

    /// Retry hint for 429s and 503s: from the upstream, from our own limits, or when the
    /// gateway expects to have room again.
    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Plugin(PluginError::Guest {
                retry_after_ms: Some(ms),
                ..
            }) => Some(ms.div_ceil(1000).max(1)),
            Self::Limit(LimitError::Exceeded(e)) => e
                .retry_after()
                .map(|d| d.as_millis().div_ceil(1000).max(1) as u64),
            Self::Request(RequestError::Busy) | Self::Limit(LimitError::Unavailable) => Some(1),
            Self::Billing(BillingError::Backlog { retry_after, .. }) => {
                Some(retry_after.as_secs().max(1))
            }
            _ => None,
        }
    }
}

/// The gateway's words for a provider's error. The guest's own message (redacted) is kept only
/// for a `build_request` error that is not about credentials (`None`): the plugin wrote it
/// before any upstream answered, about the client's request.
fn guest_message(
    plugin: &str,
    class: GuestErrorClass,
    status: Option<u16>,
    from_upstream: bool,
) -> Option<String> {
    let upstream_status = status.map_or(String::new(), |s| format!(" (upstream status {s})"));
    let text = match class {
        GuestErrorClass::Auth => {
            return Some(
                "the provider refused the gateway's credentials; this is not about your API key \
                 and has been logged for the operator"
                    .into(),
            );
        }
        _ if !from_upstream => return None,
        GuestErrorClass::InvalidRequest => {
            format!("provider `{plugin}` refused the request as invalid{upstream_status}")
        }
        GuestErrorClass::RateLimited => format!(
            "provider `{plugin}` is rate-limiting the gateway{upstream_status}; retry later"
        ),
        GuestErrorClass::ContentRefused => {
            format!("provider `{plugin}` refused the content of the request{upstream_status}")
        }
        GuestErrorClass::NotFound => format!(
            "provider `{plugin}` does not know the requested model or route{upstream_status}"
        ),
        GuestErrorClass::Upstream => match status {
            Some(s) => format!("provider `{plugin}` failed (upstream status {s})"),
            None => format!("provider `{plugin}` sent a malformed or unusable answer"),
        },
    };
    Some(text)
}

/// Marks a response as an error so the logging layer can record it once, inside the request span.
#[derive(Clone, Debug)]
pub struct ErrorLogged {
    pub kind: &'static str,
    pub detail: String,
}

/// The shape of a route's error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// OpenAI's `{"error": {"message", "type", "code", "param"}}`.
    OpenAi,
    /// The task API's `{"code", "message", "data": null, "error_code"}`.
    Task,
    /// Anthropic's `{"type": "error", "error": {"type", "message"}}` (`POST /v1/messages`).
    Anthropic,
}

impl ApiError {
    /// The body in the task API's shape: the HTTP status as `code`, and the error's kind in
    /// capitals as `error_code` (`INVALID_REQUEST`, `INSUFFICIENT_QUOTA`, ...).
    pub fn task_body(&self) -> serde_json::Value {
        let mut body = json!({
            "code": self.status().as_u16(),
            "message": self.public_message(),
            "data": null,
            "error_code": self.kind().to_ascii_uppercase(),
        });
        if let Self::ContentPolicy(b) = self {
            body["category"] = json!(b.category);
        }
        body
    }

    /// Anthropic's `error.type` for the status: the documented types (`invalid_request_error`
    /// for any other 4xx, `api_error` for any other 5xx).
    fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            504 => "timeout_error",
            s if (400..500).contains(&s) => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The body in Anthropic's error shape (also a stream's `error` event), the same message as
    /// in OpenAI's body.
    pub fn anthropic_body(&self) -> serde_json::Value {
        json!({
            "type": "error",
            "error": {
                "type": self.anthropic_type(),
                "message": self.public_message(),
            }
        })
    }

    /// The response in the given shape, with `Retry-After` and rate-limit headers.
    pub fn respond(self, shape: ErrorShape) -> Response {
        let body = match shape {
            ErrorShape::OpenAi => self.openai_body(),
            ErrorShape::Task => self.task_body(),
            ErrorShape::Anthropic => self.anthropic_body(),
        };
        self.response_with(body.to_string())
    }

    fn response_with(self, body: String) -> Response {
        let status = self.status();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after_secs()
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let Self::Limit(LimitError::Exceeded(e)) = &self {
            for (name, value) in e.headers() {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    resp.headers_mut().insert(name, v);
                }
            }
        }
        let detail = match &self {
            Self::Internal(d) => d.clone(),
            other => match std::error::Error::source(other) {
                Some(src) => format!("{other}: {src}"),
                None => other.to_string(),
            },
        };
        resp.extensions_mut().insert(ErrorLogged {
            kind: self.kind(),
            detail,
        });
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond(ErrorShape::OpenAi)
    }
}

/// The response for a handler that panicked (`CatchPanicLayer`): a 500 in OpenAI's body.
pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("handler panicked".into()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(class: GuestErrorClass, status: Option<u16>, from_upstream: bool) -> ApiError {
        ApiError::Plugin(PluginError::Guest {
            plugin: "openai".into(),
            class,
            message: "upstream says sk-test-****cret is wrong".into(),
            status,
            retry_after_ms: None,
            from_upstream,
        })
    }

    #[test]
    fn upstream_words_never_reach_the_body() {
        use GuestErrorClass::*;
        for class in [
            InvalidRequest,
            RateLimited,
            Auth,
            ContentRefused,
            NotFound,
            Upstream,
        ] {
            for status in [None, Some(400), Some(500)] {
                let body = guest(class, status, true).openai_body().to_string();
                assert!(!body.contains("sk-") && !body.contains("wrong"), "{body}");
            }
        }
        let auth = guest(Auth, Some(401), true);
        assert_eq!(auth.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(auth.kind(), "upstream_auth_failed");
        let body = auth.openai_body();
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("the provider refused the gateway's credentials"),
            "{msg}"
        );
        // Even from build_request, a credential problem is the operator's, in our words.
        assert!(
            !guest(Auth, None, false)
                .openai_body()
                .to_string()
                .contains("wrong")
        );
        // A build_request error is the plugin's own words about the client's request.
        let own = guest(InvalidRequest, None, false).openai_body().to_string();
        assert!(own.contains("wrong"), "{own}");
        let with_status = guest(Upstream, Some(503), true).openai_body().to_string();
        assert!(with_status.contains("upstream status 503"), "{with_status}");
    }
}
