//! OpenAI shapes: reading a unified request and writing unified responses and chunks (the
//! unified shape is OpenAI's own, so a plugin for a different API translates to these); and the
//! whole translation for an upstream that speaks OpenAI's API ([`request`], [`response`],
//! [`stream_event`], [`models`]), shared by the `openai` and `azure` plugins, which differ only
//! in the URL and the credential.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::{
    ChannelContext, HttpRequest, HttpResponse, ModelInfo, PluginError, SseEvent, StreamOutput,
    error_from_status, header, invalid_request, json_text_request, parse_request, parse_upstream,
    upstream_error,
};

/// The path of each kind under an OpenAI-compatible base URL: chat, embedding, image, speech.
pub fn path_of(kind: &str) -> Option<&'static str> {
    match kind {
        "chat" => Some("/chat/completions"),
        "embedding" => Some("/embeddings"),
        "image" => Some("/images/generations"),
        "speech" => Some("/audio/speech"),
        _ => None,
    }
}

/// The upstream request for a unified request of `kind` at `path` (under the base URL): the
/// client's body with the channel's model; a stream asks for the usage chunk (billing counts
/// the tokens of streams too); only chat streams. Speech answers with audio bytes, which the
/// host passes to the client as they arrive.
pub fn request(
    ctx: &ChannelContext,
    kind: &str,
    request: &str,
    path: &str,
) -> Result<HttpRequest, PluginError> {
    // Only the top level is read: every value is kept as the client wrote it (nothing parsed
    // into a tree and written again), and the keys come out in order, as a parsed map would.
    let mut body: BTreeMap<String, Box<RawValue>> = parse_request(request)?;
    body.insert("model".into(), raw_json(&Value::String(ctx.model.clone())));
    if kind != "chat" {
        body.remove("stream");
    }
    let stream = body.get("stream").is_some_and(|v| v.get() == "true");
    if stream {
        // `stream_options` gains `include_usage` (an object is made if there is none; any other
        // value is left to the upstream to refuse).
        let opts: Option<Value> = match body.get("stream_options") {
            None => Some(json!({"include_usage": true})),
            Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
                Ok(Value::Object(mut o)) => {
                    o.insert("include_usage".into(), Value::Bool(true));
                    Some(Value::Object(o))
                }
                _ => None,
            },
        };
        if let Some(opts) = opts {
            body.insert("stream_options".into(), raw_json(&opts));
        }
    }
    let text =
        serde_json::to_vec(&body).map_err(|e| invalid_request(format!("invalid request: {e}")))?;
    let mut req = json_text_request("POST", path, text, stream);
    if kind == "speech" {
        req.headers
            .retain(|h| !h.name.eq_ignore_ascii_case("accept"));
        req.headers
            .push(header("accept", "audio/*, application/json"));
    }
    Ok(req)
}

/// A value as raw JSON text (writing a `Value` cannot fail).
fn raw_json(v: &Value) -> Box<RawValue> {
    RawValue::from_string(v.to_string()).unwrap_or_default()
}

/// What a whole answer must carry: `choices` (chat) or `data` (the other kinds), an array.
/// Read without building a tree of the answer.
#[derive(serde::Deserialize)]
struct AnswerShape {
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    data: Option<Vec<IgnoredAny>>,
}

/// A whole upstream answer: a failed status mapped to its class; else the body, checked to
/// carry `choices` (chat) or `data` (the other kinds). Speech succeeds with audio, which the
/// host never gives to a plugin: here it only ever sees speech's errors.
pub fn response(kind: &str, response: HttpResponse) -> Result<String, PluginError> {
    if !(200..300).contains(&response.status) {
        return Err(error_from_status(&response));
    }
    if kind == "speech" {
        return Err(upstream_error(
            "a speech answer is binary: the host passes it through",
        ));
    }
    let field = if kind == "chat" { "choices" } else { "data" };
    // A field of another type is a malformed answer, as a missing one is.
    let shape: Option<AnswerShape> = serde_json::from_slice(&response.body).ok();
    let has = shape.is_some_and(|s| {
        if kind == "chat" {
            s.choices.is_some()
        } else {
            s.data.is_some()
        }
    });
    if !has {
        // Garbage, or no such array: say which.
        let _: Value = parse_upstream(&response.body)?;
        return Err(upstream_error(format!(
            "malformed upstream response: no `{field}`"
        )));
    }
    String::from_utf8(response.body)
        .map_err(|_| upstream_error("malformed upstream response: not UTF-8"))
}

/// What a streamed event is checked for: an `error` (not null), read without building a tree.
#[derive(serde::Deserialize)]
struct EventShape {
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

/// One streamed event: `[DONE]` ends the stream, an `error` object fails it, any other JSON
/// object is a chunk in the unified shape already.
pub fn stream_event(event: &SseEvent) -> Result<StreamOutput, PluginError> {
    if crate::is_done(event) {
        return Ok(crate::done());
    }
    let v: EventShape = serde_json::from_str(&event.data)
        .map_err(|e| upstream_error(format!("malformed upstream stream event: {e}")))?;
    if let Some(err) = v.error {
        let err: Value = serde_json::from_str(err.get()).unwrap_or_default();
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the upstream reported an error mid-stream");
        return Err(upstream_error(message));
    }
    Ok(crate::one_chunk(event.data.clone()))
}

/// The upstream's model list (`{"data": [{"id"}]}`), each model as `known` describes it, else
/// as a chat model without a price.
pub fn models(response: HttpResponse, known: &[ModelInfo]) -> Result<Vec<ModelInfo>, PluginError> {
    if !(200..300).contains(&response.status) {
        return Err(error_from_status(&response));
    }
    let v: Value = parse_upstream(&response.body)?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| upstream_error("malformed model list: no `data`"))?;
    Ok(data
        .iter()
        .filter_map(|m| m.get("id").and_then(Value::as_str))
        .map(|id| {
            known
                .iter()
                .find(|k| k.id == id)
                .cloned()
                .unwrap_or(ModelInfo {
                    id: id.into(),
                    kinds: vec!["chat".into()],
                    context_window: None,
                    max_output_tokens: None,
                    price: None,
                })
        })
        .collect())
}

/// One message's role and its text (string content, or the `text` parts of an array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextMessage {
    pub role: String,
    pub text: String,
}

/// The messages of a chat request, with their text.
pub fn messages(request: &Value) -> Result<Vec<TextMessage>, PluginError> {
    let list = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid_request("`messages` must be an array"))?;
    if list.is_empty() {
        return Err(invalid_request("`messages` must not be empty"));
    }
    list.iter()
        .map(|m| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid_request("every message needs a string `role`"))?;
            let text = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
                Some(_) => {
                    return Err(invalid_request(
                        "message `content` must be a string or an array of parts",
                    ));
                }
            };
            Ok(TextMessage {
                role: role.to_string(),
                text,
            })
        })
        .collect()
}

/// Whether the request asks for a stream.
pub fn wants_stream(request: &Value) -> bool {
    request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

pub fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A whole `chat.completion` with one assistant message.
pub fn completion(
    id: &str,
    created: u64,
    model: &str,
    content: &str,
    finish_reason: &str,
    usage: Value,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": usage,
    })
}

/// One `chat.completion.chunk` carrying a delta (and optionally a finish reason).
pub fn chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish_reason: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
    })
}

/// The last chunk of a stream that asked for usage: no choices, only `usage`.
pub fn usage_chunk(id: &str, created: u64, model: &str, usage: Value) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    })
}

/// Frame JSON values as a server-sent event body ending in `data: [DONE]`.
pub fn sse_body(events: &[Value]) -> Vec<u8> {
    let mut out = String::new();
    for e in events {
        out.push_str("data: ");
        out.push_str(&e.to_string());
        out.push_str("\n\n");
    }
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_of_string_and_parts() {
        let req = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ]});
        let m = messages(&req).unwrap();
        assert_eq!(m[1].text, "hi");
        assert!(messages(&json!({"messages": []})).is_err());
        assert!(messages(&json!({"messages": [{"role": "user", "content": 3}]})).is_err());
    }

    fn ctx() -> ChannelContext {
        ChannelContext {
            channel: "c".into(),
            base_url: "http://u/v1".into(),
            model: "up-model".into(),
            options: Vec::new(),
        }
    }

    #[test]
    fn the_request_keeps_the_clients_values_and_sets_the_model() {
        let text = r#"{"model":"mine","messages":[{"role": "user", "content": "hi \u00e9"}],"temperature":0.10}"#;
        let req = request(&ctx(), "chat", text, "/chat/completions").unwrap();
        let body = String::from_utf8(req.body).unwrap();
        // Values as written (spacing, escapes, number spelling); keys in order; the model replaced.
        assert_eq!(
            body,
            r#"{"messages":[{"role": "user", "content": "hi \u00e9"}],"model":"up-model","temperature":0.10}"#
        );
        assert!(!req.stream);
    }

    #[test]
    fn a_stream_asks_for_usage_and_only_chat_streams() {
        let body = |kind: &str, text: &str| {
            let req = request(&ctx(), kind, text, "/x").unwrap();
            (
                serde_json::from_slice::<Value>(&req.body).unwrap(),
                req.stream,
            )
        };
        let (v, stream) = body("chat", r#"{"stream":true}"#);
        assert!(stream);
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        let (v, _) = body(
            "chat",
            r#"{"stream":true,"stream_options":{"x":1,"include_usage":false}}"#,
        );
        assert_eq!(v["stream_options"], json!({"x": 1, "include_usage": true}));
        let (v, _) = body("chat", r#"{"stream":true,"stream_options":"odd"}"#);
        assert_eq!(v["stream_options"], "odd");
        let (v, stream) = body("chat", r#"{"stream":false}"#);
        assert!(!stream && v.get("stream_options").is_none());
        let (v, stream) = body("embedding", r#"{"stream":true,"input":"a"}"#);
        assert!(!stream && v.get("stream").is_none() && v.get("stream_options").is_none());
        assert!(request(&ctx(), "chat", "not json", "/x").is_err());
        assert!(request(&ctx(), "chat", "[1]", "/x").is_err());
    }

    fn answer(status: u16, body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn an_answer_must_carry_its_array() {
        let ok = r#"{"id":"x","choices":[{"index":0}],"usage":{}}"#;
        assert_eq!(response("chat", answer(200, ok)).unwrap(), ok);
        assert!(response("embedding", answer(200, r#"{"data":[]}"#)).is_ok());
        for (kind, body, says) in [
            ("chat", r#"{"id":"x"}"#, "no `choices`"),
            ("chat", r#"{"choices":{}}"#, "no `choices`"),
            ("chat", r#"{"choices":null}"#, "no `choices`"),
            ("embedding", r#"{"choices":[]}"#, "no `data`"),
            ("chat", "<html>", "malformed upstream response"),
        ] {
            let e = response(kind, answer(200, body)).unwrap_err();
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
        assert!(response("chat", answer(500, ok)).is_err());
    }

    #[test]
    fn a_stream_event_is_a_chunk_an_error_or_the_end() {
        let ev = |data: &str| SseEvent {
            event: None,
            data: data.into(),
        };
        let out = stream_event(&ev(r#"{"choices":[],"error":null}"#)).unwrap();
        assert_eq!(out.chunks.len(), 1);
        assert!(!out.done);
        let e = stream_event(&ev(r#"{"error":{"message":"overloaded"}}"#)).unwrap_err();
        assert_eq!(e.message, "overloaded");
        let e = stream_event(&ev(r#"{"error":"x"}"#)).unwrap_err();
        assert!(e.message.contains("mid-stream"), "{}", e.message);
        assert!(stream_event(&ev("{oops")).is_err());
        assert!(stream_event(&ev("[DONE]")).unwrap().done);
    }
}
