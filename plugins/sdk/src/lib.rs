//! The tollgate plugin SDK: bindings for the `tollgate:plugin@0.1.0` worlds and the helpers that
//! make a provider plugin a short file (JSON, errors from HTTP statuses, server-sent events).
//!
//! A provider plugin implements [`Provider`] and exports it (a provider of long-running jobs also
//! implements [`Tasks`]: see [`tasks`] and the helpers in [`task`]):
//!
//! ```ignore
//! use tollgate_plugin_sdk::*;
//! struct MyProvider;
//! impl Provider for MyProvider { /* describe, build_request, parse_response, ... */ }
//! tollgate_plugin_sdk::export_provider!(MyProvider);
//! ```
//!
//! Plugins run with no WASI capabilities: do not read the environment, files, clocks or
//! randomness (std's `HashMap::new` asks for randomness: use `BTreeMap`), and do not print.

/// Generated bindings of the `provider` world.
pub mod provider {
    wit_bindgen::generate!({
        world: "provider",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_provider",
        default_bindings_module: "tollgate_plugin_sdk::provider",
    });
}

/// Generated bindings of the `policy` world.
pub mod policy {
    wit_bindgen::generate!({
        world: "policy",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_policy",
        default_bindings_module: "tollgate_plugin_sdk::policy",
    });
}

/// Generated bindings of the `tasks` world (the task API of providers of long-running jobs),
/// over the same `types` as [`provider`], so every helper here serves both. A task plugin
/// implements [`Provider`] and [`Tasks`] and exports both, which makes it a component of the
/// `task-provider` world:
///
/// ```ignore
/// tollgate_plugin_sdk::export_provider!(MyProvider);
/// tollgate_plugin_sdk::export_tasks!(MyProvider);
/// ```
pub mod tasks {
    wit_bindgen::generate!({
        world: "tasks",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_tasks",
        default_bindings_module: "tollgate_plugin_sdk::tasks",
        with: {
            "tollgate:plugin/types@0.1.0": crate::provider::tollgate::plugin::types,
        },
    });
}

pub mod openai;
pub mod sse;
pub mod task;

pub use policy::export_policy;
pub use provider::export_provider;
pub use tasks::export_tasks;
pub use tasks::exports::tollgate::plugin::task_api::{
    Guest as Tasks, JobState, Submitted, TaskOutput,
};

pub use policy::exports::tollgate::plugin::policy_api;
pub use provider::exports::tollgate::plugin::provider_api::Guest as Provider;
pub use provider::tollgate::plugin::types::{
    AuthScheme, ChannelContext, ErrorClass, Header, HttpRequest, HttpResponse, Manifest, ModelInfo,
    ModelPrice, Outbound, PluginError, SseEvent, StreamOutput,
};
pub use serde_json;
pub use sse::event_json;
pub use task::{
    bad_job_id, base64_encode, data_url, is_plain_id, job_failed, job_running, job_succeeded,
    output_urls,
};

/// A JSON request for the host to send: `path` is appended to the channel's base URL.
///
/// The host refuses (as the plugin's bad output, never sent) a path that does not start with
/// `/` or that has a `.` or `..` segment, `//`, a backslash or a control character, also once
/// percent-decoded; and headers it owns: `host`, `content-length`, hop-by-hop and `proxy-*`
/// headers, and credential headers (`authorization`, `x-api-key`, `api-key`, `x-goog-api-key`,
/// `cookie`): the host adds the credential itself.
pub fn json_request(
    method: &str,
    path: &str,
    body: &serde_json::Value,
    stream: bool,
) -> HttpRequest {
    json_text_request(method, path, body.to_string().into_bytes(), stream)
}

/// [`json_request`] with the body already written as JSON text.
pub fn json_text_request(method: &str, path: &str, body: Vec<u8>, stream: bool) -> HttpRequest {
    let mut headers = vec![header("content-type", "application/json")];
    headers.push(header(
        "accept",
        if stream {
            "text/event-stream"
        } else {
            "application/json"
        },
    ));
    HttpRequest {
        method: method.into(),
        path: path.into(),
        headers,
        body,
        stream,
    }
}

/// A GET request with no body.
pub fn get_request(path: &str) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        path: path.into(),
        headers: vec![header("accept", "application/json")],
        body: Vec::new(),
        stream: false,
    }
}

pub fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: value.into(),
    }
}

/// The value of a header, matched case-insensitively.
pub fn header_value<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// A channel option from config, if set.
pub fn option<'a>(ctx: &'a ChannelContext, key: &str) -> Option<&'a str> {
    ctx.options
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub fn error(class: ErrorClass, message: impl Into<String>) -> PluginError {
    PluginError {
        class,
        message: message.into(),
        status: None,
        retry_after_ms: None,
    }
}

/// The client's request cannot be translated.
pub fn invalid_request(message: impl Into<String>) -> PluginError {
    error(ErrorClass::InvalidRequest, message)
}

/// The upstream answered something unusable.
pub fn upstream_error(message: impl Into<String>) -> PluginError {
    error(ErrorClass::Upstream, message)
}

/// Parse JSON text the plugin received from the host (the client's request).
pub fn parse_request<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, PluginError> {
    serde_json::from_str(text).map_err(|e| invalid_request(format!("invalid request: {e}")))
}

/// Parse an upstream body; garbage is an upstream-class error.
pub fn parse_upstream<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PluginError> {
    serde_json::from_slice(body)
        .map_err(|e| upstream_error(format!("malformed upstream response: {e}")))
}

/// Map a failed upstream response to an error class, with the upstream's own message when it
/// uses OpenAI's `{"error": {"message"}}` shape (or a top-level `message`, or a `detail` as
/// problem-details and FastAPI bodies carry: see [`detail_message`]). The host keeps that
/// message for its log only (redacted); the client gets the gateway's words for the class.
pub fn error_from_status(resp: &HttpResponse) -> PluginError {
    let status = resp.status;
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&resp.body).ok();
    let field = |key: &str| {
        parsed.as_ref().and_then(|v| {
            v.get("error")
                .and_then(|e| e.get(key))
                .or_else(|| v.get(key))
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
    };
    let message = field("message")
        .or_else(|| parsed.as_ref().and_then(detail_message))
        .unwrap_or_else(|| format!("upstream answered HTTP {status}"));
    let code = field("code").unwrap_or_default();
    let class = match status {
        429 => ErrorClass::RateLimited,
        401 | 403 => ErrorClass::Auth,
        404 => ErrorClass::NotFound,
        400 | 422 if code.contains("content_filter") || code.contains("content_policy") => {
            ErrorClass::ContentRefused
        }
        400..=499 => ErrorClass::InvalidRequest,
        _ => ErrorClass::Upstream,
    };
    PluginError {
        class,
        message,
        status: Some(status),
        retry_after_ms: retry_after_ms(&resp.headers),
    }
}

/// The `detail` of an error body: a string (RFC 9457 problem details, as Replicate answers, or
/// FastAPI's `HTTPException`), or FastAPI's validation list `[{loc, msg, type}]` (its messages,
/// joined); else the problem's `title`.
pub fn detail_message(body: &serde_json::Value) -> Option<String> {
    match body.get("detail") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(items)) => {
            let msgs: Vec<String> = items
                .iter()
                .filter_map(|i| {
                    let msg = i.get("msg")?.as_str()?;
                    let at = i
                        .get("loc")
                        .and_then(|l| l.as_array())
                        .map(|l| {
                            l.iter()
                                .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
                                .collect::<Vec<_>>()
                                .join(".")
                        })
                        .unwrap_or_default();
                    Some(if at.is_empty() {
                        msg.to_string()
                    } else {
                        format!("{at}: {msg}")
                    })
                })
                .collect();
            (!msgs.is_empty()).then(|| msgs.join("; "))
        }
        _ => body
            .get("title")
            .and_then(|t| t.as_str())
            .map(str::to_string),
    }
}

/// `retry-after-ms`, or `retry-after` in seconds.
pub fn retry_after_ms(headers: &[Header]) -> Option<u64> {
    if let Some(ms) =
        header_value(headers, "retry-after-ms").and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(ms);
    }
    header_value(headers, "retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s.saturating_mul(1000))
}

/// The seconds since the Unix epoch that a response's `Date` header names (RFC 9110's
/// IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`), for a `created` field; 0 without one. Plugins
/// have no clock: the upstream's date is the only time they know.
pub fn date_header_secs(headers: &[Header]) -> u64 {
    header_value(headers, "date")
        .and_then(http_date)
        .unwrap_or(0)
}

fn http_date(text: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut parts = text.split_whitespace().skip(1);
    let day: i64 = parts.next()?.parse().ok()?;
    let month_name = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)? as i64 + 1;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), with years starting in March.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + s).ok()
}

/// True for the `[DONE]` sentinel that ends OpenAI-style streams.
pub fn is_done(event: &SseEvent) -> bool {
    event.data.trim() == "[DONE]"
}

/// A stream step that emits one chunk.
pub fn one_chunk(chunk: String) -> StreamOutput {
    StreamOutput {
        chunks: vec![chunk],
        done: false,
    }
}

/// The stream step that ends the stream.
pub fn done() -> StreamOutput {
    StreamOutput {
        chunks: Vec::new(),
        done: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: Vec<Header>, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn statuses_map_to_classes() {
        let e = error_from_status(&resp(
            429,
            vec![header("Retry-After", "3")],
            r#"{"error":{"message":"slow down"}}"#,
        ));
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(e.retry_after_ms, Some(3000));
        assert_eq!(e.message, "slow down");
        assert_eq!(
            error_from_status(&resp(401, vec![], "")).class,
            ErrorClass::Auth
        );
        assert_eq!(
            error_from_status(&resp(404, vec![], "")).class,
            ErrorClass::NotFound
        );
        assert_eq!(
            error_from_status(&resp(503, vec![], "oops")).class,
            ErrorClass::Upstream
        );
        let refused = error_from_status(&resp(
            400,
            vec![],
            r#"{"error":{"message":"no","code":"content_policy_violation"}}"#,
        ));
        assert_eq!(refused.class, ErrorClass::ContentRefused);
        assert_eq!(
            error_from_status(&resp(400, vec![], "{}")).class,
            ErrorClass::InvalidRequest
        );
    }

    #[test]
    fn detail_bodies_give_their_message() {
        let e = error_from_status(&resp(
            401,
            vec![],
            r#"{"title":"Unauthenticated","detail":"You did not pass a valid authentication token","status":401}"#,
        ));
        assert_eq!(e.message, "You did not pass a valid authentication token");
        let e = error_from_status(&resp(
            422,
            vec![],
            r#"{"detail":[{"loc":["body","width"],"msg":"Input should be a multiple of 32","type":"value_error"}]}"#,
        ));
        assert_eq!(e.class, ErrorClass::InvalidRequest);
        assert_eq!(e.message, "body.width: Input should be a multiple of 32");
        let e = error_from_status(&resp(403, vec![], r#"{"title":"Forbidden"}"#));
        assert_eq!(e.message, "Forbidden");
    }

    #[test]
    fn dates_give_created() {
        let h = vec![header("Date", "Sun, 06 Nov 1994 08:49:37 GMT")];
        assert_eq!(date_header_secs(&h), 784_111_777);
        let h = vec![header("date", "Thu, 29 Feb 2024 00:00:00 GMT")];
        assert_eq!(date_header_secs(&h), 1_709_164_800);
        assert_eq!(date_header_secs(&[header("date", "yesterday")]), 0);
        assert_eq!(date_header_secs(&[]), 0);
    }

    #[test]
    fn retry_after_ms_wins() {
        let h = vec![header("retry-after-ms", "250"), header("retry-after", "9")];
        assert_eq!(retry_after_ms(&h), Some(250));
    }

    #[test]
    fn garbage_is_an_upstream_error() {
        let e = parse_upstream::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(e.class, ErrorClass::Upstream);
        assert!(e.message.contains("malformed"));
    }
}
