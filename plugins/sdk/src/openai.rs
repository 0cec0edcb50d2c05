//! OpenAI chat shapes: reading a unified request and writing unified responses and chunks.
//! The unified shape is OpenAI's own, so a plugin for a different API translates to these.

use serde_json::{Value, json};

use crate::{PluginError, invalid_request};

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
}
