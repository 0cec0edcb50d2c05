//! OpenAI chat request → Anthropic Messages body: system and developer messages lifted into
//! `system`, tool calls and tool results as content blocks, consecutive turns of one role merged
//! (Anthropic alternates user and assistant), `max_tokens` always set, tools and `tool_choice`
//! translated. What Anthropic cannot do (`n` above 1, JSON response formats, audio or file
//! parts) is refused as an invalid request rather than silently dropped.

use tollgate_plugin_sdk::serde_json::{self, Map, Value, json};
use tollgate_plugin_sdk::{PluginError, invalid_request};

/// The Messages body for `model` from an OpenAI chat request.
pub fn build(model: &str, req: &Value, default_max_tokens: u32) -> Result<Value, PluginError> {
    let obj = req
        .as_object()
        .ok_or_else(|| invalid_request("the request must be a JSON object"))?;
    let list = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid_request("`messages` must be an array"))?;
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_request(format!("messages[{i}]: needs a string `role`")))?;
        match role {
            "system" | "developer" => {
                let text = plain_text(m.get("content"), i)?;
                if !text.is_empty() {
                    system.push(text);
                }
            }
            "user" => push_turn(&mut turns, "user", user_blocks(m.get("content"), i)?),
            "assistant" => push_turn(&mut turns, "assistant", assistant_blocks(m, i)?),
            "tool" => push_turn(&mut turns, "user", vec![tool_result(m, i)?]),
            other => {
                return Err(invalid_request(format!(
                    "messages[{i}]: the role `{other}` is not supported by the anthropic provider"
                )));
            }
        }
    }
    if turns.is_empty() {
        return Err(invalid_request(
            "the anthropic provider needs at least one user or assistant message with content",
        ));
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, blocks)| json!({"role": role, "content": content_value(blocks)}))
        .collect();

    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    let max_tokens = match positive(obj, "max_completion_tokens")? {
        Some(n) => n,
        None => positive(obj, "max_tokens")?.unwrap_or(u64::from(default_max_tokens)),
    };
    body.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert("messages".into(), Value::Array(messages));
    for key in ["temperature", "top_p", "top_k"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(v @ Value::Number(_)) => {
                body.insert(key.into(), v.clone());
            }
            Some(_) => return Err(invalid_request(format!("`{key}` must be a number"))),
        }
    }
    let stops = stop_sequences(obj.get("stop"))?;
    if !stops.is_empty() {
        body.insert("stop_sequences".into(), json!(stops));
    }
    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        body.insert("stream".into(), Value::Bool(true));
    }
    let tools = tools(obj.get("tools"))?;
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
        let parallel = obj.get("parallel_tool_calls").and_then(Value::as_bool);
        if let Some(choice) = tool_choice(obj.get("tool_choice"), parallel)? {
            body.insert("tool_choice".into(), choice);
        }
    }
    if let Some(user) = obj.get("user").and_then(Value::as_str) {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(n) = obj.get("n").filter(|v| !v.is_null())
        && n.as_u64() != Some(1)
    {
        return Err(invalid_request(
            "the anthropic provider gives one choice per request: `n` must be 1",
        ));
    }
    if let Some(format) = obj.get("response_format").filter(|v| !v.is_null())
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(invalid_request(
            "the anthropic provider does not support `response_format` other than `text`",
        ));
    }
    Ok(Value::Object(body))
}

/// Append a turn's blocks, merged into the previous turn when it has the same role.
fn push_turn(turns: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((last, existing)) if *last == role => existing.extend(blocks),
        _ => turns.push((role, blocks)),
    }
}

/// A lone text block as a plain string (the common case); anything else as blocks.
fn content_value(blocks: Vec<Value>) -> Value {
    if let [only] = blocks.as_slice()
        && only.get("type").and_then(Value::as_str) == Some("text")
        && let Some(text) = only.get("text")
    {
        return text.clone();
    }
    Value::Array(blocks)
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// The text of a string or of an array's `text` parts (system prompts and tool results).
fn plain_text(content: Option<&Value>, i: usize) -> Result<String, PluginError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        texts.push(p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            invalid_request(format!("messages[{i}]: a text part needs `text`"))
                        })?);
                    }
                    other => {
                        return Err(invalid_request(format!(
                            "messages[{i}]: only text parts are allowed here, not `{}`",
                            other.unwrap_or("untyped")
                        )));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(invalid_request(format!(
            "messages[{i}]: `content` must be a string or an array of parts"
        ))),
    }
}

/// A user message's content: text and images (empty text is dropped: Anthropic refuses it).
fn user_blocks(content: Option<&Value>, i: usize) -> Result<Vec<Value>, PluginError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![text_block(s)]),
        Some(Value::Array(parts)) => {
            let mut blocks = Vec::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            invalid_request(format!("messages[{i}]: a text part needs `text`"))
                        })?;
                        if !text.is_empty() {
                            blocks.push(text_block(text));
                        }
                    }
                    Some("image_url") => blocks.push(image_block(p, i)?),
                    other => {
                        return Err(invalid_request(format!(
                            "messages[{i}]: content parts of type `{}` are not supported by the \
                             anthropic provider",
                            other.unwrap_or("untyped")
                        )));
                    }
                }
            }
            Ok(blocks)
        }
        Some(_) => Err(invalid_request(format!(
            "messages[{i}]: `content` must be a string or an array of parts"
        ))),
    }
}

/// An `image_url` part: a `data:` URL becomes a base64 image source, an http(s) URL a URL source.
fn image_block(part: &Value, i: usize) -> Result<Value, PluginError> {
    let url = part
        .get("image_url")
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_request(format!("messages[{i}]: an image part needs a `url`")))?;
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest.split_once(";base64,").ok_or_else(|| {
            invalid_request(format!("messages[{i}]: an image data URL must be base64"))
        })?;
        return Ok(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(invalid_request(format!(
        "messages[{i}]: an image URL must be http(s) or a base64 data URL"
    )))
}

/// An assistant message: its text, then its tool calls as `tool_use` blocks.
fn assistant_blocks(m: &Value, i: usize) -> Result<Vec<Value>, PluginError> {
    let mut blocks = Vec::new();
    match m.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if !s.is_empty() {
                blocks.push(text_block(s));
            }
        }
        Some(Value::Array(parts)) => {
            for p in parts {
                // A `refusal` part is the model's own words, not something to send back.
                if p.get("type").and_then(Value::as_str) == Some("text")
                    && let Some(text) = p.get("text").and_then(Value::as_str)
                    && !text.is_empty()
                {
                    blocks.push(text_block(text));
                }
            }
        }
        Some(_) => {
            return Err(invalid_request(format!(
                "messages[{i}]: `content` must be a string or an array of parts"
            )));
        }
    }
    let calls = match m.get("tool_calls") {
        None | Some(Value::Null) => return Ok(blocks),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(invalid_request(format!(
                "messages[{i}]: `tool_calls` must be an array"
            )));
        }
    };
    for call in calls {
        let bad = |what: &str| invalid_request(format!("messages[{i}]: a tool call {what}"));
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("needs a string `id`"))?;
        if call
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function")
            != "function"
        {
            return Err(bad("must be of type `function`"));
        }
        let function = call
            .get("function")
            .ok_or_else(|| bad("needs `function`"))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("needs `function.name`"))?;
        let arguments = function
            .get("arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        let input: Value = if arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(arguments)
                .map_err(|_| bad("needs `function.arguments` holding a JSON object"))?
        };
        if !input.is_object() {
            return Err(bad("needs `function.arguments` holding a JSON object"));
        }
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(blocks)
}

/// A `tool` message: a `tool_result` block for the call it answers.
fn tool_result(m: &Value, i: usize) -> Result<Value, PluginError> {
    let id = m
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid_request(format!(
                "messages[{i}]: a tool message needs `tool_call_id`"
            ))
        })?;
    let text = plain_text(m.get("content"), i)?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    if !text.is_empty() {
        block["content"] = json!(text);
    }
    Ok(block)
}

/// A positive integer field, if set.
fn positive(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, PluginError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid_request(format!(
                "`{key}` must be a positive integer"
            ))),
        },
    }
}

/// `stop`: a string or strings.
fn stop_sequences(stop: Option<&Value>) -> Result<Vec<String>, PluginError> {
    let bad = || invalid_request("`stop` must be a string or an array of strings");
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// OpenAI function tools → Anthropic tools (`parameters` → `input_schema`).
fn tools(tools: Option<&Value>) -> Result<Vec<Value>, PluginError> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(invalid_request("`tools` must be an array")),
    };
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid_request(format!(
                    "tools[{i}]: only `function` tools are supported by the anthropic provider"
                )));
            }
            let f = t
                .get("function")
                .ok_or_else(|| invalid_request(format!("tools[{i}]: needs `function`")))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid_request(format!("tools[{i}]: needs `function.name`")))?;
            let schema = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p) => p.clone(),
            };
            let mut tool = json!({"name": name, "input_schema": schema});
            if let Some(d) = f.get("description").and_then(Value::as_str) {
                tool["description"] = json!(d);
            }
            Ok(tool)
        })
        .collect()
}

/// `tool_choice` (and `parallel_tool_calls: false`) → Anthropic's `tool_choice`.
fn tool_choice(
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Value>, PluginError> {
    let mut out = match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => json!({"type": "none"}),
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            other => {
                return Err(invalid_request(format!(
                    "`tool_choice` `{other}` is not known"
                )));
            }
        }),
        Some(obj) => {
            let name = obj
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|_| obj.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    invalid_request(
                        "`tool_choice` must be none, auto, required or a function by name",
                    )
                })?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if parallel == Some(false) {
        let c = out.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = Value::Bool(true);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(req: Value) -> Value {
        build("claude-x", &req, 1000).unwrap()
    }

    fn refused(req: Value) -> String {
        build("claude-x", &req, 1000).unwrap_err().message
    }

    #[test]
    fn system_prompts_are_lifted_and_roles_alternate() {
        let b = body(json!({
            "model": "public",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "Are you there?"}]},
                {"role": "assistant", "content": "Oui."},
            ],
            "max_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "stop": "END",
            "stream": true,
            "user": "u-1",
        }));
        assert_eq!(b["model"], "claude-x");
        assert_eq!(b["system"], "Be brief.\n\nAnswer in French.");
        assert_eq!(
            b["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "text", "text": "Hello"},
                    {"type": "text", "text": "Are you there?"}
                ]},
                {"role": "assistant", "content": "Oui."},
            ])
        );
        assert_eq!(b["max_tokens"], 50);
        assert_eq!(b["temperature"], 0.2);
        assert_eq!(b["top_p"], 0.9);
        assert_eq!(b["top_k"], 40);
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(b["stream"], true);
        assert_eq!(b["metadata"], json!({"user_id": "u-1"}));
    }

    #[test]
    fn max_tokens_is_always_set() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(body(json!({"messages": msgs}))["max_tokens"], 1000);
        assert_eq!(
            body(json!({"messages": msgs, "max_completion_tokens": 7, "max_tokens": 9}))["max_tokens"],
            7
        );
        assert!(refused(json!({"messages": msgs, "max_tokens": 0})).contains("max_tokens"));
        assert!(body(json!({"messages": msgs})).get("stream").is_none());
    }

    #[test]
    fn tool_calls_and_results_become_blocks() {
        let b = body(json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "toolu_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
                {"role": "user", "content": "Thanks"},
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_weather", "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
            }}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false,
        }));
        assert_eq!(
            b["messages"][1],
            json!({"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ]})
        );
        assert_eq!(
            b["messages"][2],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                {"type": "text", "text": "Thanks"}
            ]})
        );
        assert_eq!(
            b["tools"],
            json!([{"name": "get_weather", "description": "Current weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
        );
        assert_eq!(
            b["tool_choice"],
            json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn tool_choice_words_map() {
        assert_eq!(
            tool_choice(Some(&json!("required")), None).unwrap(),
            Some(json!({"type": "any"}))
        );
        assert_eq!(
            tool_choice(Some(&json!("none")), Some(false)).unwrap(),
            Some(json!({"type": "none"}))
        );
        assert_eq!(tool_choice(None, None).unwrap(), None);
        assert!(tool_choice(Some(&json!("sometimes")), None).is_err());
        // No tools, no tool_choice: Anthropic wants tools for it.
        let b =
            body(json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}));
        assert!(b.get("tool_choice").is_none());
    }

    #[test]
    fn images_become_image_blocks() {
        let b = body(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ]}]}));
        let content = &b["messages"][0]["content"];
        assert_eq!(
            content[1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="})
        );
        assert_eq!(
            content[2]["source"],
            json!({"type": "url", "url": "https://example.com/cat.jpg"})
        );
    }

    #[test]
    fn what_anthropic_cannot_do_is_refused() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        assert!(refused(json!({"messages": msgs, "n": 2})).contains("`n`"));
        assert!(
            refused(json!({"messages": msgs, "response_format": {"type": "json_object"}}))
                .contains("response_format")
        );
        assert!(
            refused(json!({"messages": [{"role": "function", "content": "x"}]}))
                .contains("function")
        );
        assert!(
            refused(json!({"messages": [{"role": "system", "content": "only"}]})).contains("user")
        );
        assert!(
            refused(json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}))
                .contains("input_audio")
        );
        assert!(
            refused(json!({"messages": msgs, "tools": [{"type": "web_search"}]}))
                .contains("function")
        );
        let bad_args = json!({"messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "[1]"}}]}
        ]});
        assert!(refused(bad_args).contains("JSON object"));
        // `n: 1` and a text response format are fine.
        body(json!({"messages": msgs, "n": 1, "response_format": {"type": "text"}}));
    }
}
