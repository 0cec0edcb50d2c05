//! Gemini answers → OpenAI shapes: a `GenerateContentResponse` → a `chat.completion` (text in
//! `content`, `inlineData` images in `images` as `data:` URLs, `functionCall` parts as
//! `tool_calls`), a `finishReason` → a finish reason, `usageMetadata` → OpenAI usage, a blocked
//! prompt or a candidate stopped for safety with nothing to show → content-refused, and a
//! failed call (Google's `{"error": {code, message, status, details}}`) → a plugin error of the
//! class the gateway maps to its status, a rate limit with Google's `RetryInfo` delay.

use tollgate_plugin_sdk::serde_json::{Value, json};
use tollgate_plugin_sdk::{
    ErrorClass, HttpResponse, PluginError, error, retry_after_ms, upstream_error,
};

/// Finish reasons of a candidate stopped for its content (safety, blocklists, prohibited
/// content, personal data, recitation, and their image-output forms).
const FILTERED: [&str; 9] = [
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "LANGUAGE",
];

/// Gemini's `finishReason` → OpenAI's `finish_reason`.
pub fn finish_reason(reason: Option<&str>, has_calls: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(r) if FILTERED.contains(&r) => "content_filter",
        _ if has_calls => "tool_calls",
        // STOP, OTHER, MALFORMED_FUNCTION_CALL, NO_IMAGE, FINISH_REASON_UNSPECIFIED, ...
        _ => "stop",
    }
}

/// Whether a finish reason says the content was filtered.
pub fn filtered(reason: Option<&str>) -> bool {
    reason.is_some_and(|r| FILTERED.contains(&r))
}

/// Tokens in `usageMetadata`: (prompt, completion). The prompt counts the tool-use prompt too;
/// the completion counts the candidates and the model's thoughts, which Google bills as output.
pub fn tokens(usage: Option<&Value>) -> (u64, u64) {
    let field = |key: &str| {
        usage
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    (
        field("promptTokenCount").saturating_add(field("toolUsePromptTokenCount")),
        field("candidatesTokenCount").saturating_add(field("thoughtsTokenCount")),
    )
}

/// OpenAI's `usage` object.
pub fn usage(prompt: u64, completion: u64) -> Value {
    tollgate_plugin_sdk::openai::usage(prompt, completion)
}

/// A blocked prompt (`promptFeedback.blockReason`) as content-refused.
pub fn blocked_prompt(v: &Value) -> Option<PluginError> {
    let reason = v.pointer("/promptFeedback/blockReason")?.as_str()?;
    Some(error(
        ErrorClass::ContentRefused,
        format!("the prompt was blocked ({reason})"),
    ))
}

/// What one candidate's parts hold.
#[derive(Default)]
pub struct Parts {
    pub text: String,
    /// `data:` URLs of the images.
    pub images: Vec<String>,
    pub calls: Vec<Call>,
}

impl Parts {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.images.is_empty() && self.calls.is_empty()
    }

    pub fn images_json(&self) -> Value {
        Value::Array(
            self.images
                .iter()
                .map(|url| json!({"type": "image_url", "image_url": {"url": url}}))
                .collect(),
        )
    }
}

/// One `functionCall` part.
pub struct Call {
    pub name: String,
    /// The arguments as JSON text.
    pub args: String,
    /// The part's `thoughtSignature` (Gemini 3 wants it back with the call in the next turn).
    pub signature: Option<String>,
}

/// Read a candidate's `content.parts`: text (not the model's thoughts), images, function calls.
pub fn parts(candidate: &Value) -> Parts {
    let mut out = Parts::default();
    let list = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for p in list {
        if p.get("thought").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        if let Some(t) = p.get("text").and_then(Value::as_str) {
            out.text.push_str(t);
        } else if let Some(d) = p.get("inlineData") {
            let mime = d.get("mimeType").and_then(Value::as_str).unwrap_or("");
            let data = d.get("data").and_then(Value::as_str).unwrap_or("");
            if !mime.is_empty() && !data.is_empty() {
                out.images.push(format!("data:{mime};base64,{data}"));
            }
        } else if let Some(f) = p.get("functionCall") {
            let name = f.get("name").and_then(Value::as_str).unwrap_or("");
            let args = f.get("args").cloned().unwrap_or_else(|| json!({}));
            out.calls.push(Call {
                name: name.to_string(),
                args: args.to_string(),
                signature: p
                    .get("thoughtSignature")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
    }
    out
}

/// The tool calls of a message (ids made from the choice and the call's position: Gemini gives
/// none). A call's thought signature rides in `extra_content.google.thought_signature`, where
/// Google's own OpenAI-compatible endpoint puts it, so a client that sends the assistant message
/// back sends it back too.
pub fn tool_calls(choice: u64, calls: &[Call]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut call = json!({
                "id": format!("call_{choice}_{i}"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.args},
            });
            if let Some(sig) = &c.signature {
                call["extra_content"] = json!({"google": {"thought_signature": sig}});
            }
            call
        })
        .collect()
}

/// A whole answer → a `chat.completion`.
pub fn completion(v: &Value, model: &str, created: u64) -> Result<Value, PluginError> {
    let candidates = v
        .get("candidates")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if candidates.is_empty() {
        return Err(blocked_prompt(v).unwrap_or_else(|| {
            upstream_error("malformed upstream response: no candidates and no block reason")
        }));
    }
    let mut choices = Vec::new();
    let mut refusal = None;
    for (pos, c) in candidates.iter().enumerate() {
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
        let reason = c.get("finishReason").and_then(Value::as_str);
        let p = parts(c);
        if p.is_empty() && filtered(reason) {
            refusal = Some(reason.unwrap_or("SAFETY").to_string());
            continue;
        }
        let mut message = json!({
            "role": "assistant",
            "content": if p.text.is_empty() && !p.calls.is_empty() { Value::Null } else { json!(p.text) },
            "refusal": null,
        });
        if !p.images.is_empty() {
            message["images"] = p.images_json();
        }
        if !p.calls.is_empty() {
            message["tool_calls"] = Value::Array(tool_calls(index, &p.calls));
        }
        choices.push(json!({
            "index": index,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(reason, !p.calls.is_empty()),
        }));
    }
    if choices.is_empty() {
        // Every candidate was stopped for its content before it said anything.
        return Err(error(
            ErrorClass::ContentRefused,
            format!(
                "the answer was blocked ({})",
                refusal.as_deref().unwrap_or("SAFETY")
            ),
        ));
    }
    let (prompt, completion) = tokens(v.get("usageMetadata"));
    Ok(json!({
        "id": v.get("responseId").and_then(Value::as_str).unwrap_or("gemini"),
        "object": "chat.completion",
        "created": created,
        "model": v.get("modelVersion").and_then(Value::as_str).unwrap_or(model),
        "choices": choices,
        "usage": usage(prompt, completion),
    }))
}

/// A failed call: the class from the HTTP status (else Google's `status` word), the message
/// from the body, and for a rate limit the wait Google asks for.
pub fn http_error(resp: &HttpResponse) -> PluginError {
    let body: Option<Value> = tollgate_plugin_sdk::serde_json::from_slice(&resp.body).ok();
    // Google answers some errors as a one-element array of the error object.
    let err = body.as_ref().and_then(|b| match b {
        Value::Array(items) => items.first().and_then(|e| e.get("error")),
        other => other.get("error"),
    });
    let mut e = error_body(err, Some(resp.status));
    if e.class == ErrorClass::RateLimited && e.retry_after_ms.is_none() {
        e.retry_after_ms = retry_after_ms(&resp.headers);
    }
    e
}

/// Google's error object (`{code, message, status, details}`) → a plugin error; `status` is
/// the HTTP status when there is one (mid-stream errors have only the body).
pub fn error_body(err: Option<&Value>, status: Option<u16>) -> PluginError {
    let word = err
        .and_then(|e| e.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let code = status.or_else(|| {
        err.and_then(|e| e.get("code"))
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
    });
    let class = match (code, word) {
        // An invalid key is an INVALID_ARGUMENT (400) whose ErrorInfo says API_KEY_INVALID: the
        // operator's credential, not the client's request.
        _ if err.is_some_and(key_refused) => ErrorClass::Auth,
        (Some(429), _) | (_, "RESOURCE_EXHAUSTED") => ErrorClass::RateLimited,
        (Some(401 | 403), _) | (_, "UNAUTHENTICATED" | "PERMISSION_DENIED") => ErrorClass::Auth,
        (Some(404), _) | (_, "NOT_FOUND") => ErrorClass::NotFound,
        (Some(400..=499), _) | (_, "INVALID_ARGUMENT" | "FAILED_PRECONDITION") => {
            ErrorClass::InvalidRequest
        }
        _ => ErrorClass::Upstream,
    };
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| match code {
            Some(c) => format!("upstream answered HTTP {c}"),
            None => "the upstream reported an error".to_string(),
        });
    PluginError {
        class,
        message,
        status: code,
        retry_after_ms: err.and_then(retry_delay_ms),
    }
}

/// Whether an error's details say the API key was refused (`google.rpc.ErrorInfo` with reason
/// `API_KEY_INVALID`, or another `API_KEY_*` reason).
fn key_refused(err: &Value) -> bool {
    err.get("details")
        .and_then(Value::as_array)
        .is_some_and(|details| {
            details.iter().any(|d| {
                d.get("reason")
                    .and_then(Value::as_str)
                    .is_some_and(|r| r.starts_with("API_KEY_"))
            })
        })
}

/// The `retryDelay` of a `google.rpc.RetryInfo` detail (a protobuf duration: `"33s"`,
/// `"1.5s"`), in milliseconds.
pub fn retry_delay_ms(err: &Value) -> Option<u64> {
    let details = err.get("details")?.as_array()?;
    let delay = details
        .iter()
        .find(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("google.rpc.RetryInfo"))
        })?
        .get("retryDelay")?
        .as_str()?;
    let secs = delay.trim().strip_suffix('s')?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, ""));
    let whole: u64 = whole.parse().ok()?;
    let mut ms = whole.checked_mul(1000)?;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let millis: String = frac.chars().chain("000".chars()).take(3).collect();
        let millis: u64 = millis.parse().ok()?;
        // Round any remainder up: waiting a little longer is always safe.
        let rest = frac.len() > 3 && frac[3..].bytes().any(|b| b != b'0');
        ms = ms.checked_add(millis + u64::from(rest))?;
    }
    Some(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::header;

    fn resp(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    fn google_error(code: u16, status: &str, message: &str) -> String {
        json!({"error": {"code": code, "message": message, "status": status}}).to_string()
    }

    #[test]
    fn a_whole_answer_becomes_a_completion() {
        let v = json!({
            "candidates": [{
                "content": {"role": "model", "parts": [
                    {"text": "thinking...", "thought": true},
                    {"text": "Hello"}, {"text": " there"}]},
                "finishReason": "STOP",
                "index": 0,
                "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
            }],
            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 3,
                              "thoughtsTokenCount": 2, "totalTokenCount": 13},
            "modelVersion": "gemini-2.5-flash",
            "responseId": "resp-1"
        });
        let c = completion(&v, "x", 1_700_000_000).unwrap();
        assert_eq!(c["id"], "resp-1");
        assert_eq!(c["object"], "chat.completion");
        assert_eq!(c["created"], 1_700_000_000);
        assert_eq!(c["model"], "gemini-2.5-flash");
        assert_eq!(c["choices"][0]["message"]["content"], "Hello there");
        assert!(c["choices"][0]["message"].get("images").is_none());
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            c["usage"],
            json!({"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13})
        );
    }

    #[test]
    fn images_calls_and_several_candidates() {
        let v = json!({"candidates": [
            {"content": {"parts": [
                {"text": "Here it is."},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
             "finishReason": "STOP", "index": 0},
            {"content": {"parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                 "thoughtSignature": "c2lnbmF0dXJl"}]},
             "finishReason": "STOP", "index": 1},
            {"content": {"parts": [{"text": "Trunc"}]}, "finishReason": "MAX_TOKENS", "index": 2},
        ]});
        let c = completion(&v, "gemini-x", 0).unwrap();
        assert_eq!(c["model"], "gemini-x");
        let m = &c["choices"][0]["message"];
        assert_eq!(m["content"], "Here it is.");
        assert_eq!(
            m["images"],
            json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}])
        );
        let m = &c["choices"][1]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(
            m["tool_calls"],
            json!([{"id": "call_1_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                    "extra_content": {"google": {"thought_signature": "c2lnbmF0dXJl"}}}])
        );
        assert_eq!(c["choices"][1]["finish_reason"], "tool_calls");
        assert_eq!(c["choices"][2]["finish_reason"], "length");
        assert_eq!(c["usage"]["total_tokens"], 0);
    }

    #[test]
    fn blocked_prompts_and_empty_safety_stops_are_refusals() {
        let v = json!({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
                       "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}});
        let e = completion(&v, "x", 0).unwrap_err();
        assert_eq!(e.class, ErrorClass::ContentRefused);
        assert!(e.message.contains("SAFETY"));
        let v = json!({"candidates": [{"finishReason": "SAFETY", "index": 0,
            "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true}]}]});
        assert_eq!(
            completion(&v, "x", 0).unwrap_err().class,
            ErrorClass::ContentRefused
        );
        // Something said before the stop stands, as a content_filter finish.
        let v = json!({"candidates": [{"content": {"parts": [{"text": "Partial"}]},
                                       "finishReason": "PROHIBITED_CONTENT"}]});
        let c = completion(&v, "x", 0).unwrap();
        assert_eq!(c["choices"][0]["finish_reason"], "content_filter");
        // No candidates and no reason: the upstream's fault.
        assert_eq!(
            completion(&json!({}), "x", 0).unwrap_err().class,
            ErrorClass::Upstream
        );
    }

    #[test]
    fn errors_map_to_classes_with_googles_retry_delay() {
        let body = json!({"error": {"code": 429, "message": "Resource has been exhausted",
            "status": "RESOURCE_EXHAUSTED", "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "33s"}]}});
        let e = http_error(&resp(429, &body.to_string()));
        assert_eq!(
            (e.class, e.status, e.retry_after_ms),
            (ErrorClass::RateLimited, Some(429), Some(33_000))
        );
        assert_eq!(e.message, "Resource has been exhausted");
        // Without RetryInfo, a Retry-After header still counts.
        let mut r = resp(429, &google_error(429, "RESOURCE_EXHAUSTED", "slow"));
        r.headers.push(header("retry-after", "4"));
        assert_eq!(http_error(&r).retry_after_ms, Some(4000));
        for (status, word, class) in [
            (400, "INVALID_ARGUMENT", ErrorClass::InvalidRequest),
            (400, "FAILED_PRECONDITION", ErrorClass::InvalidRequest),
            (401, "UNAUTHENTICATED", ErrorClass::Auth),
            (403, "PERMISSION_DENIED", ErrorClass::Auth),
            (404, "NOT_FOUND", ErrorClass::NotFound),
            (500, "INTERNAL", ErrorClass::Upstream),
            (503, "UNAVAILABLE", ErrorClass::Upstream),
        ] {
            let e = http_error(&resp(status, &google_error(status, word, "m")));
            assert_eq!(
                (e.class, e.status),
                (class, Some(status)),
                "{status} {word}"
            );
        }
        // Google's answer to a wrong key: a 400 whose ErrorInfo says API_KEY_INVALID.
        let bad_key = json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}});
        assert_eq!(
            http_error(&resp(400, &bad_key.to_string())).class,
            ErrorClass::Auth
        );
        let e = http_error(&resp(502, "<html>bad gateway</html>"));
        assert_eq!(e.class, ErrorClass::Upstream);
        assert_eq!(e.message, "upstream answered HTTP 502");
        // The array form.
        let e = http_error(&resp(
            429,
            &format!("[{}]", google_error(429, "RESOURCE_EXHAUSTED", "x")),
        ));
        assert_eq!(e.message, "x");
        // Mid-stream, no HTTP status: the code and status word decide.
        let e = error_body(
            Some(&json!({"code": 503, "message": "overloaded", "status": "UNAVAILABLE"})),
            None,
        );
        assert_eq!((e.class, e.status), (ErrorClass::Upstream, Some(503)));
    }

    #[test]
    fn retry_delays_are_protobuf_durations() {
        let d = |s: &str| {
            retry_delay_ms(&json!({"details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": s}]}))
        };
        assert_eq!(d("33s"), Some(33_000));
        assert_eq!(d("1.5s"), Some(1_500));
        assert_eq!(d("45.837906927s"), Some(45_838));
        assert_eq!(d("0.25s"), Some(250));
        assert_eq!(d("soon"), None);
        assert_eq!(d("1.xs"), None);
        assert_eq!(retry_delay_ms(&json!({"details": []})), None);
    }
}
