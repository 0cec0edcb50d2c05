//! Anthropic's Messages request → the unified (OpenAI chat) request every provider plugin reads.
//!
//! Validated the way the Messages API documents it: `model`, a positive `max_tokens` and a
//! non-empty `messages` list are required; a message's `role` is `user` or `assistant` and its
//! `content` a string or content blocks (`text`, `image` from base64 or a URL, `tool_use` in
//! assistant turns, `tool_result` in user turns); `system` is a string or text blocks; `tools`
//! are custom tools with an `input_schema`; `tool_choice` is `auto`, `any`, `tool` (with a
//! `name`) or `none`. A field this route cannot honour (extended thinking, server tools,
//! document blocks, any field the API does not define) is refused, never silently dropped.
//!
//! Translation: `system` becomes a system message; a user turn's `tool_result` blocks become
//! `tool` messages (before the turn's own text and images, which stay a user message; images of
//! a tool result join them, since OpenAI's tool messages hold text only); an assistant turn's
//! `tool_use` blocks become `tool_calls` with their `input` as the JSON `arguments`;
//! `max_tokens` → `max_completion_tokens`, `stop_sequences` → `stop`, `metadata.user_id` →
//! `user`, `tool_choice` `any` → `required`, `disable_parallel_tool_use` →
//! `parallel_tool_calls: false`; `temperature`, `top_p`, `top_k` and `stream` as they are.

use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// The top-level fields the Messages API defines that this route reads.
const FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "messages",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "service_tier",
    "thinking",
];

fn invalid(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// The validated request: the unified chat body, and the output cap the client set.
#[derive(Debug)]
pub struct Unified {
    pub body: Value,
    pub max_tokens: u64,
    pub stream: bool,
}

/// Validate an Anthropic Messages request and translate it (see the module's doc).
pub fn translate(req: &Value) -> Result<Unified, ApiError> {
    let obj = req
        .as_object()
        .ok_or_else(|| ApiError::invalid("the request body must be a JSON object", None))?;
    if let Some(extra) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            format!("{extra}: Extra inputs are not permitted"),
            None,
        ));
    }
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    let model = match field("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        None => return Err(invalid("model: Field required", "model")),
        Some(_) => return Err(invalid("model: must be a non-empty string", "model")),
    };
    let max_tokens = match field("max_tokens") {
        None => return Err(invalid("max_tokens: Field required", "max_tokens")),
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid("max_tokens: must be a positive integer", "max_tokens"))?,
    };
    let stream = match field("stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream: must be a boolean", "stream")),
    };
    if let Some(thinking) = field("thinking")
        && thinking.get("type").and_then(Value::as_str) != Some("disabled")
    {
        return Err(invalid(
            "thinking: extended thinking is not available through this gateway",
            "thinking",
        ));
    }
    if field("service_tier").is_some_and(|t| !t.is_string()) {
        return Err(invalid("service_tier: must be a string", "service_tier"));
    }

    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = field("system") {
        let text = system_text(system)?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let list = match field("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => {
            return Err(invalid(
                "messages: at least one message is required",
                "messages",
            ));
        }
        None => return Err(invalid("messages: Field required", "messages")),
        Some(_) => return Err(invalid("messages: must be an array", "messages")),
    };
    for (i, m) in list.iter().enumerate() {
        turn(m, i, &mut messages)?;
    }

    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(messages));
    body.insert("max_completion_tokens".into(), json!(max_tokens));
    if stream {
        body.insert("stream".into(), Value::Bool(true));
    }
    for (name, low, high) in [("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)] {
        if let Some(v) = field(name) {
            let ok = v.as_f64().is_some_and(|x| (low..=high).contains(&x));
            if !ok {
                return Err(invalid(
                    format!("{name}: must be a number from {low} to {high}"),
                    name,
                ));
            }
            body.insert(name.into(), v.clone());
        }
    }
    if let Some(v) = field("top_k") {
        let k = v
            .as_u64()
            .ok_or_else(|| invalid("top_k: must be a non-negative integer", "top_k"))?;
        body.insert("top_k".into(), json!(k));
    }
    if let Some(v) = field("stop_sequences") {
        let stops = v
            .as_array()
            .filter(|a| a.iter().all(Value::is_string))
            .ok_or_else(|| {
                invalid(
                    "stop_sequences: must be an array of strings",
                    "stop_sequences",
                )
            })?;
        if !stops.is_empty() {
            body.insert("stop".into(), Value::Array(stops.clone()));
        }
    }
    if let Some(v) = field("metadata") {
        let meta = v
            .as_object()
            .ok_or_else(|| invalid("metadata: must be an object", "metadata"))?;
        match meta.get("user_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(user)) => {
                body.insert("user".into(), json!(user));
            }
            Some(_) => {
                return Err(invalid("metadata.user_id: must be a string", "metadata"));
            }
        }
    }
    let tools = match field("tools") {
        None => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, t)| tool(t, i))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("tools: must be an array", "tools")),
    };
    let choice = field("tool_choice").map(tool_choice).transpose()?;
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
        if let Some((choice, parallel)) = choice {
            body.insert("tool_choice".into(), choice);
            if !parallel {
                body.insert("parallel_tool_calls".into(), Value::Bool(false));
            }
        }
    } else if let Some((choice, _)) = choice
        && choice != json!("none")
        && choice != json!("auto")
    {
        return Err(invalid(
            "tool_choice: a tool must be used but no `tools` are given",
            "tool_choice",
        ));
    }
    Ok(Unified {
        body: Value::Object(body),
        max_tokens,
        stream,
    })
}

/// `system`: a string, or text blocks joined by blank lines.
fn system_text(system: &Value) -> Result<String, ApiError> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for b in blocks {
                match (block_type(b), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    _ => {
                        return Err(invalid(
                            "system: must be a string or an array of text blocks",
                            "system",
                        ));
                    }
                }
            }
            Ok(texts.join("\n\n"))
        }
        _ => Err(invalid(
            "system: must be a string or an array of text blocks",
            "system",
        )),
    }
}

fn block_type(b: &Value) -> Option<&str> {
    b.get("type").and_then(Value::as_str)
}

fn bad(i: usize, what: &str) -> ApiError {
    ApiError::invalid(format!("messages.{i}: {what}"), Some("messages"))
}

/// One message of the conversation, appended as unified messages.
fn turn(m: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let role = match m.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        Some(other) => {
            return Err(bad(
                i,
                &format!(
                    "role `{other}` is not one of `user`, `assistant` (put instructions in the top-level `system`)"
                ),
            ));
        }
        None => return Err(bad(i, "`role` is required: `user` or `assistant`")),
    };
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(blocks)) if !blocks.is_empty() => blocks,
        Some(Value::Array(_)) => return Err(bad(i, "`content` must not be empty")),
        _ => {
            return Err(bad(
                i,
                "`content` must be a string or an array of content blocks",
            ));
        }
    };
    if role == "assistant" {
        out.push(assistant(blocks, i)?);
        return Ok(());
    }
    // A user turn: tool results first (each a tool message), then its text and images.
    let mut parts: Vec<Value> = Vec::new();
    for b in blocks {
        match block_type(b) {
            Some("text") => parts.push(text_part(b, i)?),
            Some("image") => parts.push(image_part(b, i)?),
            Some("tool_result") => {
                let (message, images) = tool_result(b, i)?;
                out.push(message);
                parts.extend(images);
            }
            Some("tool_use") => {
                return Err(bad(i, "`tool_use` blocks belong to assistant messages"));
            }
            Some(other) => {
                return Err(bad(
                    i,
                    &format!("content blocks of type `{other}` are not supported here"),
                ));
            }
            None => return Err(bad(i, "every content block needs a string `type`")),
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn text_part(b: &Value, i: usize) -> Result<Value, ApiError> {
    match b.get("text") {
        Some(Value::String(t)) => Ok(json!({"type": "text", "text": t})),
        _ => Err(bad(i, "a `text` block needs a string `text`")),
    }
}

/// An `image` block → an `image_url` part (base64 data as a `data:` URL).
fn image_part(b: &Value, i: usize) -> Result<Value, ApiError> {
    let source = b
        .get("source")
        .ok_or_else(|| bad(i, "an `image` block needs a `source`"))?;
    let url = match block_type(source) {
        Some("base64") => {
            let media = source.get("media_type").and_then(Value::as_str);
            let data = source.get("data").and_then(Value::as_str);
            match (media, data) {
                (Some(m @ ("image/jpeg" | "image/png" | "image/gif" | "image/webp")), Some(d)) => {
                    format!("data:{m};base64,{d}")
                }
                _ => {
                    return Err(bad(
                        i,
                        "a base64 image needs `data` and a `media_type` of image/jpeg, image/png, image/gif or image/webp",
                    ));
                }
            }
        }
        Some("url") => match source.get("url").and_then(Value::as_str) {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => u.to_string(),
            _ => return Err(bad(i, "a URL image source needs an http(s) `url`")),
        },
        _ => {
            return Err(bad(
                i,
                "an image `source` must be of type `base64` or `url`",
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A `tool_result` block → a tool message, and the images it held (for a user message).
fn tool_result(b: &Value, i: usize) -> Result<(Value, Vec<Value>), ApiError> {
    let id = b
        .get("tool_use_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(i, "a `tool_result` block needs a string `tool_use_id`"))?;
    let mut texts: Vec<&str> = Vec::new();
    let mut images = Vec::new();
    match b.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => texts.push(s),
        Some(Value::Array(blocks)) => {
            for c in blocks {
                match (block_type(c), c.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t),
                    (Some("image"), _) => images.push(image_part(c, i)?),
                    _ => {
                        return Err(bad(
                            i,
                            "a `tool_result`'s content holds text and image blocks only",
                        ));
                    }
                }
            }
        }
        Some(_) => {
            return Err(bad(
                i,
                "a `tool_result`'s content must be a string or content blocks",
            ));
        }
    }
    let is_error = match b.get("is_error") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(e)) => *e,
        Some(_) => return Err(bad(i, "`is_error` must be a boolean")),
    };
    let mut content = texts.join("\n");
    if is_error {
        content.insert_str(0, "Error: ");
    }
    Ok((
        json!({"role": "tool", "tool_call_id": id, "content": content}),
        images,
    ))
}

/// An assistant turn: its text blocks as the content, its `tool_use` blocks as tool calls.
fn assistant(blocks: &[Value], i: usize) -> Result<Value, ApiError> {
    let mut text: Vec<&str> = Vec::new();
    let mut calls: Vec<Value> = Vec::new();
    for b in blocks {
        match block_type(b) {
            Some("text") => match b.get("text") {
                Some(Value::String(t)) => text.push(t),
                _ => return Err(bad(i, "a `text` block needs a string `text`")),
            },
            Some("tool_use") => {
                let id = b
                    .get("id")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty());
                let name = b
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty());
                let input = b.get("input").filter(|v| v.is_object());
                let (Some(id), Some(name), Some(input)) = (id, name, input) else {
                    return Err(bad(
                        i,
                        "a `tool_use` block needs a string `id`, a string `name` and an object `input`",
                    ));
                };
                calls.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": input.to_string()},
                }));
            }
            Some("tool_result") => {
                return Err(bad(i, "`tool_result` blocks belong to user messages"));
            }
            Some(other) => {
                return Err(bad(
                    i,
                    &format!(
                        "content blocks of type `{other}` are not supported in assistant messages"
                    ),
                ));
            }
            None => return Err(bad(i, "every content block needs a string `type`")),
        }
    }
    let mut message = json!({"role": "assistant", "content": text.join("\n")});
    if !calls.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = Value::Array(calls);
    }
    Ok(message)
}

/// A custom tool → a function tool.
fn tool(t: &Value, i: usize) -> Result<Value, ApiError> {
    let bad = |what: &str| ApiError::invalid(format!("tools.{i}: {what}"), Some("tools"));
    match block_type(t) {
        None | Some("custom") => {}
        Some(other) => {
            return Err(bad(&format!(
                "server tools (`{other}`) are not available through this gateway"
            )));
        }
    }
    let name = t
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("needs a string `name`"))?;
    let schema = t
        .get("input_schema")
        .filter(|v| v.is_object())
        .ok_or_else(|| bad("needs an object `input_schema`"))?;
    let mut function = json!({"name": name, "parameters": schema});
    match t.get("description") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) => function["description"] = json!(d),
        Some(_) => return Err(bad("`description` must be a string")),
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice` → OpenAI's `tool_choice`, and whether parallel tool calls stay allowed.
fn tool_choice(choice: &Value) -> Result<(Value, bool), ApiError> {
    let bad = || {
        invalid(
            "tool_choice: must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", \"name\": ...}",
            "tool_choice",
        )
    };
    let parallel = match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(disable)) => !disable,
        Some(_) => return Err(bad()),
    };
    let openai = match block_type(choice) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice
                .get("name")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(bad)?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => return Err(bad()),
    };
    Ok((openai, parallel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_with_tools_becomes_a_chat_request() {
        let req = json!({
            "model": "claude", "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather in Paris?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "Thanks"}
                ]},
                {"role": "assistant", "content": "It is 18C."}
            ],
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "metadata": {"user_id": "u-1"}, "stream": true
        });
        let u = translate(&req).unwrap();
        assert_eq!(u.max_tokens, 100);
        assert!(u.stream);
        let b = u.body;
        assert_eq!(
            b["messages"][0],
            json!({"role": "system", "content": "Be brief.\n\nBe kind."})
        );
        assert_eq!(
            b["messages"][1]["content"][1]["image_url"]["url"],
            "data:image/png;base64,iVBO"
        );
        assert_eq!(
            b["messages"][1]["content"][2]["image_url"]["url"],
            "https://example.com/a.jpg"
        );
        assert_eq!(b["messages"][2]["content"], "Checking.");
        assert_eq!(
            b["messages"][2]["tool_calls"][0],
            json!({"id": "toolu_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})
        );
        assert_eq!(
            b["messages"][3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"})
        );
        assert_eq!(b["messages"][4]["content"][0]["text"], "Thanks");
        assert_eq!(b["messages"][5]["content"], "It is 18C.");
        assert_eq!(b["max_completion_tokens"], 100);
        assert_eq!(b["tool_choice"], "required");
        assert_eq!(b["parallel_tool_calls"], false);
        assert_eq!(
            b["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(b["stop"], json!(["END"]));
        assert_eq!(b["user"], "u-1");
        assert_eq!(b["top_k"], 5);
        assert_eq!(b["stream"], true);
    }

    #[test]
    fn what_the_api_refuses_is_refused() {
        let ok = |extra: Value| {
            let mut r = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
            if let (Some(o), Some(e)) = (r.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            translate(&r)
        };
        assert!(ok(json!({})).is_ok());
        assert!(ok(json!({"thinking": {"type": "disabled"}})).is_ok());
        for bad in [
            json!({"max_tokens": null}),
            json!({"max_tokens": 0}),
            json!({"model": ""}),
            json!({"messages": []}),
            json!({"messages": [{"role": "system", "content": "x"}]}),
            json!({"messages": [{"role": "user", "content": 3}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "x"}}]}]}),
            json!({"temperature": 1.5}),
            json!({"top_k": -1}),
            json!({"stop_sequences": "END"}),
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            json!({"tools": [{"name": "t"}]}),
            json!({"tools": [{"name": "t", "input_schema": {}}], "tool_choice": {"type": "sometimes"}}),
            json!({"tool_choice": {"type": "any"}}),
            json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}),
            json!({"unknown_field": 1}),
        ] {
            assert!(ok(bad.clone()).is_err(), "{bad}");
        }
    }
}
