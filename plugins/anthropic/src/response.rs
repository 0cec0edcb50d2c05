//! Anthropic answers → OpenAI shapes: a message → a `chat.completion`, a stop reason → a finish
//! reason, usage → OpenAI usage, and an error (an HTTP status with Anthropic's error body, or an
//! `error` event mid-stream) → a plugin error of the class the gateway maps to its status.

use tollgate_plugin_sdk::serde_json::{Value, json};
use tollgate_plugin_sdk::{
    ErrorClass, Header, HttpResponse, PluginError, header_value, retry_after_ms, upstream_error,
};

/// Anthropic's `stop_reason` → OpenAI's `finish_reason`. A `refusal` (the model's safety
/// classifiers stopped the answer) is OpenAI's `content_filter`: the answer so far stands and
/// the upstream charged for it.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, or none said.
        _ => "stop",
    }
}

/// Tokens in an Anthropic `usage` object: (prompt, completion). The prompt is every input
/// token, those written to and read from the prompt cache included.
pub fn tokens(usage: Option<&Value>) -> (u64, u64) {
    let field = |key: &str| {
        usage
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let prompt = field("input_tokens")
        .saturating_add(field("cache_creation_input_tokens"))
        .saturating_add(field("cache_read_input_tokens"));
    (prompt, field("output_tokens"))
}

/// OpenAI's `usage` object.
pub fn usage(prompt: u64, completion: u64) -> Value {
    tollgate_plugin_sdk::openai::usage(prompt, completion)
}

/// A whole message → a `chat.completion` with one choice.
pub fn completion(msg: &Value, model: &str, created: u64) -> Result<Value, PluginError> {
    let blocks = msg
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| upstream_error("malformed upstream response: no `content` array"))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").and_then(Value::as_str).unwrap_or(""),
                "type": "function",
                "function": {
                    "name": b.get("name").and_then(Value::as_str).unwrap_or(""),
                    "arguments": b.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            // Thinking and server-tool blocks have no place in OpenAI's message.
            _ => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let (prompt, completion) = tokens(msg.get("usage"));
    Ok(json!({
        "id": msg.get("id").and_then(Value::as_str).unwrap_or("msg"),
        "object": "chat.completion",
        "created": created,
        "model": msg.get("model").and_then(Value::as_str).unwrap_or(model),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(msg.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": usage(prompt, completion),
    }))
}

/// The class of an Anthropic failure, from the HTTP status when there is one, the error's
/// `type` and, for a content refusal, its message (Anthropic refuses with an
/// `invalid_request_error` saying "Output blocked by content filtering policy", as an HTTP 400 or
/// as an `error` event mid-stream). A 429 is a rate limit whatever its type; an overload (529)
/// is the upstream failing, not the client's fault, and so is a billing problem of the
/// operator's Anthropic account.
fn class(status: Option<u16>, kind: Option<&str>, message: Option<&str>) -> ErrorClass {
    let refused = message.is_some_and(|m| m.to_ascii_lowercase().contains("content filtering"));
    match (status, kind) {
        (Some(401 | 403), _) | (_, Some("authentication_error" | "permission_error")) => {
            ErrorClass::Auth
        }
        (Some(429), _) | (_, Some("rate_limit_error")) => ErrorClass::RateLimited,
        (Some(404), _) | (_, Some("not_found_error")) => ErrorClass::NotFound,
        (Some(500..), _) => ErrorClass::Upstream,
        (_, Some("overloaded_error" | "api_error" | "timeout_error" | "billing_error")) => {
            ErrorClass::Upstream
        }
        (_, Some("invalid_request_error")) if refused => ErrorClass::ContentRefused,
        (_, Some("invalid_request_error" | "request_too_large")) => ErrorClass::InvalidRequest,
        (Some(400..=499), _) => ErrorClass::InvalidRequest,
        _ => ErrorClass::Upstream,
    }
}

/// The status Anthropic documents for an error type, for an error that came without one (an
/// `error` event inside a stream that began with 200).
fn documented_status(kind: Option<&str>) -> Option<u16> {
    Some(match kind? {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => return None,
    })
}

/// `{"type": "error", "error": {"type", "message"}}` → (type, message).
fn error_fields(v: Option<&Value>) -> (Option<&str>, Option<&str>) {
    let err = v.and_then(|v| v.get("error"));
    let field = |key: &str| err.and_then(|e| e.get(key)).and_then(Value::as_str);
    (field("type"), field("message"))
}

/// A failed HTTP answer. The upstream's message goes to the gateway's log only (redacted).
pub fn http_error(resp: &HttpResponse) -> PluginError {
    let parsed: Option<Value> = tollgate_plugin_sdk::serde_json::from_slice(&resp.body).ok();
    let (kind, message) = error_fields(parsed.as_ref());
    let status = resp.status;
    PluginError {
        class: class(Some(status), kind, message),
        message: describe(kind, message)
            .unwrap_or_else(|| format!("upstream answered HTTP {status}")),
        status: Some(status),
        retry_after_ms: retry_after_ms(&resp.headers),
    }
}

/// An `error` event (or an error body that came with a success status).
pub fn error_event(v: &Value) -> PluginError {
    let (kind, message) = error_fields(Some(v));
    PluginError {
        class: class(None, kind, message),
        message: describe(kind, message)
            .unwrap_or_else(|| "the upstream reported an error mid-stream".into()),
        status: documented_status(kind),
        retry_after_ms: None,
    }
}

fn describe(kind: Option<&str>, message: Option<&str>) -> Option<String> {
    match (kind, message) {
        (Some(k), Some(m)) => Some(format!("{k}: {m}")),
        (Some(k), None) => Some(k.to_string()),
        (None, Some(m)) => Some(m.to_string()),
        (None, None) => None,
    }
}

/// Seconds since the Unix epoch from the answer's HTTP `Date` header (`Sun, 06 Nov 1994
/// 08:49:37 GMT`), for `created`: plugins have no clock. 0 when absent or unreadable.
pub fn created(headers: &[Header]) -> u64 {
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
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::header;

    fn resp(status: u16, headers: Vec<Header>, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    fn err_body(kind: &str) -> String {
        json!({"type": "error", "error": {"type": kind, "message": "words"}}).to_string()
    }

    #[test]
    fn a_message_becomes_a_completion() {
        let msg = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 5},
        });
        let c = completion(&msg, "fallback", 42).unwrap();
        assert_eq!(c["id"], "msg_01");
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["created"], 42);
        assert_eq!(c["model"], "claude-haiku-4-5");
        assert_eq!(c["choices"][0]["message"]["content"], "Hello there");
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        assert!(c["choices"][0]["message"].get("tool_calls").is_none());
        assert_eq!(
            c["usage"],
            json!({"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18})
        );
        assert!(completion(&json!({"id": "x"}), "m", 0).is_err());
    }

    #[test]
    fn tool_use_becomes_tool_calls() {
        let msg = json!({
            "id": "msg_02", "content": [
                {"type": "thinking", "thinking": "hmm"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ],
            "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 2},
        });
        let c = completion(&msg, "claude-x", 0).unwrap();
        let m = &c["choices"][0]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(
            m["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(c["model"], "claude-x");
    }

    #[test]
    fn stop_reasons_map() {
        assert_eq!(finish_reason(Some("end_turn")), "stop");
        assert_eq!(finish_reason(Some("stop_sequence")), "stop");
        assert_eq!(finish_reason(Some("max_tokens")), "length");
        assert_eq!(finish_reason(Some("tool_use")), "tool_calls");
        assert_eq!(finish_reason(Some("refusal")), "content_filter");
        assert_eq!(finish_reason(None), "stop");
    }

    #[test]
    fn statuses_and_types_map_to_classes() {
        let cases = [
            (400, "invalid_request_error", ErrorClass::InvalidRequest),
            (401, "authentication_error", ErrorClass::Auth),
            (403, "permission_error", ErrorClass::Auth),
            (404, "not_found_error", ErrorClass::NotFound),
            (413, "request_too_large", ErrorClass::InvalidRequest),
            (402, "billing_error", ErrorClass::Upstream),
            (429, "rate_limit_error", ErrorClass::RateLimited),
            (429, "overloaded_error", ErrorClass::RateLimited),
            (500, "api_error", ErrorClass::Upstream),
            (529, "overloaded_error", ErrorClass::Upstream),
        ];
        for (status, kind, want) in cases {
            let e = http_error(&resp(status, vec![], &err_body(kind)));
            assert_eq!(e.class, want, "{status} {kind}");
            assert_eq!(e.status, Some(status));
            assert_eq!(e.message, format!("{kind}: words"));
        }
        let e = http_error(&resp(
            429,
            vec![header("retry-after", "7")],
            &err_body("rate_limit_error"),
        ));
        assert_eq!(e.retry_after_ms, Some(7000));
        let refusal = json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": "Output blocked by content filtering policy"}});
        let e = http_error(&resp(400, vec![], &refusal.to_string()));
        assert_eq!(e.class, ErrorClass::ContentRefused);
        assert_eq!(error_event(&refusal).class, ErrorClass::ContentRefused);
        let e = http_error(&resp(503, vec![], "<html>busy</html>"));
        assert_eq!(
            (e.class, e.message.as_str()),
            (ErrorClass::Upstream, "upstream answered HTTP 503")
        );
    }

    #[test]
    fn an_error_event_gets_its_documented_status() {
        let e = error_event(
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        );
        assert_eq!((e.class, e.status), (ErrorClass::Upstream, Some(529)));
        let e = error_event(&json!({"type": "error", "error": {"type": "rate_limit_error"}}));
        assert_eq!((e.class, e.status), (ErrorClass::RateLimited, Some(429)));
        let e = error_event(&json!({"type": "error"}));
        assert_eq!((e.class, e.status), (ErrorClass::Upstream, None));
    }

    #[test]
    fn created_comes_from_the_date_header() {
        let h = vec![header("Date", "Sun, 06 Nov 1994 08:49:37 GMT")];
        assert_eq!(created(&h), 784_111_777);
        let h = vec![header("date", "Thu, 29 Feb 2024 00:00:00 GMT")];
        assert_eq!(created(&h), 1_709_164_800);
        assert_eq!(created(&[header("date", "yesterday")]), 0);
        assert_eq!(created(&[]), 0);
    }
}
