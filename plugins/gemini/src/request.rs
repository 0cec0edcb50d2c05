//! OpenAI chat request → Gemini `GenerateContentRequest`: system and developer messages lifted
//! into `systemInstruction`, `assistant` turns as `model` turns, images (base64 `data:` URLs) as
//! `inlineData` parts, tool calls and results as `functionCall` / `functionResponse` parts,
//! consecutive turns of one role merged, the sampling settings in `generationConfig`, and for
//! image models `responseModalities` and `imageConfig`. What Gemini cannot take (an image by
//! http URL, audio parts, a JSON schema response format) is refused as an invalid request rather
//! than silently dropped.

use tollgate_plugin_sdk::serde_json::{self, Map, Value, json};
use tollgate_plugin_sdk::{PluginError, invalid_request};

/// Aspect ratios Google documents for image output (`imageConfig.aspectRatio`).
pub const ASPECT_RATIOS: [&str; 10] = [
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
];

/// Sizes Google documents for image output (`imageConfig.imageSize`, upper-case `K`).
pub const IMAGE_SIZES: [&str; 3] = ["1K", "2K", "4K"];

/// The `GenerateContentRequest` body from an OpenAI chat request; `image_model` when the model
/// answers with images too.
pub fn build(req: &Value, image_model: bool) -> Result<Value, PluginError> {
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
            "user" => push_turn(&mut turns, "user", user_parts(m.get("content"), i)?),
            "assistant" => push_turn(&mut turns, "model", model_parts(m, i)?),
            "tool" => {
                let part = function_response(m, i, list)?;
                push_turn(&mut turns, "user", vec![part]);
            }
            other => {
                return Err(invalid_request(format!(
                    "messages[{i}]: the role `{other}` is not supported by the gemini provider"
                )));
            }
        }
    }
    if turns.is_empty() {
        return Err(invalid_request(
            "the gemini provider needs at least one user or assistant message with content",
        ));
    }
    let mut body = Map::new();
    body.insert(
        "contents".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, parts)| json!({"role": role, "parts": parts}))
                .collect(),
        ),
    );
    if !system.is_empty() {
        body.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": system.join("\n\n")}]}),
        );
    }
    let tools = tools(obj.get("tools"))?;
    if !tools.is_empty() {
        body.insert("tools".into(), json!([{"functionDeclarations": tools}]));
        if let Some(config) = tool_config(obj.get("tool_choice"))? {
            body.insert("toolConfig".into(), config);
        }
    }
    let config = generation_config(obj, image_model)?;
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    Ok(Value::Object(body))
}

/// `generationConfig` from the sampling fields, and the image settings of an image model.
fn generation_config(
    obj: &Map<String, Value>,
    image_model: bool,
) -> Result<Map<String, Value>, PluginError> {
    let mut config = Map::new();
    let max = match positive(obj, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => positive(obj, "max_tokens")?,
    };
    if let Some(n) = max {
        config.insert("maxOutputTokens".into(), json!(n));
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        match obj.get(from) {
            None | Some(Value::Null) => {}
            Some(v @ Value::Number(_)) => {
                config.insert(to.into(), v.clone());
            }
            Some(_) => return Err(invalid_request(format!("`{from}` must be a number"))),
        }
    }
    for (from, to) in [("top_k", "topK"), ("seed", "seed")] {
        match obj.get(from) {
            None | Some(Value::Null) => {}
            Some(v) if v.is_i64() || v.is_u64() => {
                config.insert(to.into(), v.clone());
            }
            Some(_) => return Err(invalid_request(format!("`{from}` must be an integer"))),
        }
    }
    let stops = stop_sequences(obj.get("stop"))?;
    if !stops.is_empty() {
        config.insert("stopSequences".into(), json!(stops));
    }
    if let Some(n) = positive(obj, "n")?
        && n > 1
    {
        config.insert("candidateCount".into(), json!(n));
    }
    match obj
        .get("response_format")
        .filter(|v| !v.is_null())
        .map(|f| f.get("type").and_then(Value::as_str))
    {
        None | Some(Some("text")) => {}
        Some(Some("json_object")) => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some(_) => {
            return Err(invalid_request(
                "the gemini provider supports `response_format` `text` and `json_object` only",
            ));
        }
    }
    let image_config = image_config(obj)?;
    if image_model {
        config.insert("responseModalities".into(), json!(["TEXT", "IMAGE"]));
        if let Some(ic) = image_config {
            config.insert("imageConfig".into(), ic);
        }
    } else if image_config.is_some() {
        return Err(invalid_request(
            "`google.image_config` applies to image models only",
        ));
    }
    Ok(config)
}

/// `imageConfig` from `extra_body.google.image_config` (as curl users send it) or
/// `google.image_config` (as the OpenAI Python SDK sends it, having merged `extra_body` into the
/// body), with `aspect_ratio` and `image_size` checked against what Google documents.
fn image_config(obj: &Map<String, Value>) -> Result<Option<Value>, PluginError> {
    let found = obj
        .get("extra_body")
        .and_then(|e| e.get("google"))
        .and_then(|g| g.get("image_config"))
        .or_else(|| obj.get("google").and_then(|g| g.get("image_config")))
        .filter(|v| !v.is_null());
    let Some(ic) = found else {
        return Ok(None);
    };
    let ic = ic
        .as_object()
        .ok_or_else(|| invalid_request("`google.image_config` must be an object"))?;
    let mut out = Map::new();
    match ic.get("aspect_ratio") {
        None | Some(Value::Null) => {}
        Some(Value::String(r)) if ASPECT_RATIOS.contains(&r.as_str()) => {
            out.insert("aspectRatio".into(), json!(r));
        }
        Some(_) => {
            return Err(invalid_request(format!(
                "`google.image_config.aspect_ratio` must be one of {}",
                ASPECT_RATIOS.join(", ")
            )));
        }
    }
    match ic.get("image_size") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if IMAGE_SIZES.contains(&s.to_ascii_uppercase().as_str()) => {
            out.insert("imageSize".into(), json!(s.to_ascii_uppercase()));
        }
        Some(_) => {
            return Err(invalid_request(format!(
                "`google.image_config.image_size` must be one of {}",
                IMAGE_SIZES.join(", ")
            )));
        }
    }
    Ok((!out.is_empty()).then_some(Value::Object(out)))
}

/// Append a turn's parts, merged into the previous turn when it has the same role.
fn push_turn(turns: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((last, existing)) if *last == role => existing.extend(parts),
        _ => turns.push((role, parts)),
    }
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

/// A user message's parts: text and images (empty text is dropped).
fn user_parts(content: Option<&Value>, i: usize) -> Result<Vec<Value>, PluginError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![json!({"text": s})]),
        Some(Value::Array(items)) => {
            let mut parts = Vec::new();
            for p in items {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            invalid_request(format!("messages[{i}]: a text part needs `text`"))
                        })?;
                        if !text.is_empty() {
                            parts.push(json!({"text": text}));
                        }
                    }
                    Some("image_url") => parts.push(inline_image(p, i)?),
                    other => {
                        return Err(invalid_request(format!(
                            "messages[{i}]: content parts of type `{}` are not supported by the \
                             gemini provider",
                            other.unwrap_or("untyped")
                        )));
                    }
                }
            }
            Ok(parts)
        }
        Some(_) => Err(invalid_request(format!(
            "messages[{i}]: `content` must be a string or an array of parts"
        ))),
    }
}

/// An `image_url` part with a base64 `data:` URL → an `inlineData` part. Gemini fetches no
/// arbitrary http URL (`fileData` takes its own File API's URIs), so such a URL is refused.
fn inline_image(part: &Value, i: usize) -> Result<Value, PluginError> {
    let url = part
        .get("image_url")
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_request(format!("messages[{i}]: an image part needs a `url`")))?;
    let (mime, data) = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .ok_or_else(|| {
            invalid_request(format!(
                "messages[{i}]: the gemini provider takes images as base64 `data:` URLs"
            ))
        })?;
    if mime.is_empty() || data.is_empty() {
        return Err(invalid_request(format!(
            "messages[{i}]: an image data URL needs a media type and data"
        )));
    }
    Ok(json!({"inlineData": {"mimeType": mime, "data": data}}))
}

/// An assistant message: its text, then its tool calls as `functionCall` parts.
fn model_parts(m: &Value, i: usize) -> Result<Vec<Value>, PluginError> {
    let mut parts = Vec::new();
    match m.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if !s.is_empty() {
                parts.push(json!({"text": s}));
            }
        }
        Some(Value::Array(items)) => {
            for p in items {
                if p.get("type").and_then(Value::as_str) == Some("text")
                    && let Some(text) = p.get("text").and_then(Value::as_str)
                    && !text.is_empty()
                {
                    parts.push(json!({"text": text}));
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
        None | Some(Value::Null) => return Ok(parts),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(invalid_request(format!(
                "messages[{i}]: `tool_calls` must be an array"
            )));
        }
    };
    for call in calls {
        let bad = |what: &str| invalid_request(format!("messages[{i}]: a tool call {what}"));
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
        let args: Value = if arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(arguments)
                .map_err(|_| bad("needs `function.arguments` holding a JSON object"))?
        };
        if !args.is_object() {
            return Err(bad("needs `function.arguments` holding a JSON object"));
        }
        let mut part = json!({"functionCall": {"name": name, "args": args}});
        // The signature Gemini gave the call (see `response::tool_calls`), sent back with it.
        if let Some(sig) = call
            .pointer("/extra_content/google/thought_signature")
            .and_then(Value::as_str)
        {
            part["thoughtSignature"] = json!(sig);
        }
        parts.push(part);
    }
    Ok(parts)
}

/// A `tool` message → a `functionResponse` part. Gemini names the function, OpenAI the call:
/// the name comes from the assistant's call with that id earlier in the conversation.
fn function_response(m: &Value, i: usize, all: &[Value]) -> Result<Value, PluginError> {
    let id = m
        .get("tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid_request(format!(
                "messages[{i}]: a tool message needs `tool_call_id`"
            ))
        })?;
    let name = all
        .iter()
        .filter_map(|msg| msg.get("tool_calls").and_then(Value::as_array))
        .flatten()
        .find(|c| c.get("id").and_then(Value::as_str) == Some(id))
        .and_then(|c| c.pointer("/function/name"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid_request(format!(
                "messages[{i}]: no earlier assistant tool call has the id `{id}`"
            ))
        })?;
    let text = plain_text(m.get("content"), i)?;
    // A result that is a JSON object goes as it is; anything else under `content`.
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"content": text}),
    };
    Ok(json!({"functionResponse": {"name": name, "response": response}}))
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

/// OpenAI function tools → Gemini `functionDeclarations` (`parameters` as they are).
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
                    "tools[{i}]: only `function` tools are supported by the gemini provider"
                )));
            }
            let f = t
                .get("function")
                .ok_or_else(|| invalid_request(format!("tools[{i}]: needs `function`")))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid_request(format!("tools[{i}]: needs `function.name`")))?;
            let mut decl = json!({"name": name});
            if let Some(d) = f.get("description").and_then(Value::as_str) {
                decl["description"] = json!(d);
            }
            if let Some(p) = f.get("parameters").filter(|p| !p.is_null()) {
                decl["parameters"] = p.clone();
            }
            Ok(decl)
        })
        .collect()
}

/// `tool_choice` → `toolConfig.functionCallingConfig` (`mode` AUTO, ANY or NONE; a named
/// function is ANY limited to that name).
fn tool_config(choice: Option<&Value>) -> Result<Option<Value>, PluginError> {
    let bad =
        || invalid_request("`tool_choice` must be none, auto, required or a function by name");
    let config = match choice {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => json!({"mode": "AUTO"}),
            "required" => json!({"mode": "ANY"}),
            "none" => json!({"mode": "NONE"}),
            _ => return Err(bad()),
        },
        Some(v) => {
            let name = v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(bad)?;
            json!({"mode": "ANY", "allowedFunctionNames": [name]})
        }
    };
    Ok(Some(json!({"functionCallingConfig": config})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(req: Value) -> Value {
        build(&req, false).unwrap()
    }

    fn refused(req: Value, image_model: bool) -> String {
        build(&req, image_model).unwrap_err().message
    }

    #[test]
    fn roles_system_and_sampling_translate() {
        let b = body(json!({
            "model": "public",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "Are you there?"}]},
                {"role": "assistant", "content": "Oui."},
                {"role": "user", "content": "Bien."},
            ],
            "max_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "stop": "END",
            "n": 2,
            "stream": true,
            "stream_options": {"include_usage": true},
        }));
        assert_eq!(
            b["systemInstruction"],
            json!({"parts": [{"text": "Be brief.\n\nAnswer in French."}]})
        );
        assert_eq!(
            b["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Hello"}, {"text": "Are you there?"}]},
                {"role": "model", "parts": [{"text": "Oui."}]},
                {"role": "user", "parts": [{"text": "Bien."}]},
            ])
        );
        assert_eq!(
            b["generationConfig"],
            json!({"maxOutputTokens": 50, "temperature": 0.2, "topP": 0.9, "topK": 40,
                   "stopSequences": ["END"], "candidateCount": 2})
        );
        // Nothing OpenAI-only leaks into the body; the model goes in the path.
        for key in ["model", "stream", "stream_options", "messages", "n"] {
            assert!(b.get(key).is_none(), "{key}");
        }
        let b = body(json!({"messages": [{"role": "user", "content": "x"}],
                            "max_completion_tokens": 7, "max_tokens": 9, "n": 1}));
        assert_eq!(b["generationConfig"], json!({"maxOutputTokens": 7}));
        let b = body(json!({"messages": [{"role": "user", "content": "x"}]}));
        assert!(b.get("generationConfig").is_none());
    }

    #[test]
    fn images_go_inline() {
        let b = body(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]}]}));
        assert_eq!(
            b["contents"][0]["parts"][1],
            json!({"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}})
        );
        let why = refused(
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]}),
            false,
        );
        assert!(why.contains("data:"), "{why}");
    }

    #[test]
    fn image_models_ask_for_images_with_the_clients_image_config() {
        let msgs = json!([{"role": "user", "content": "A banana"}]);
        // As curl sends it.
        let b = build(
            &json!({"messages": msgs, "extra_body": {"google": {"image_config":
                {"aspect_ratio": "16:9", "image_size": "4K"}}}}),
            true,
        )
        .unwrap();
        assert_eq!(
            b["generationConfig"],
            json!({"responseModalities": ["TEXT", "IMAGE"],
                   "imageConfig": {"aspectRatio": "16:9", "imageSize": "4K"}})
        );
        // As the OpenAI Python SDK sends it (extra_body merged into the body); `2k` is `2K`.
        let b = build(
            &json!({"messages": msgs, "google": {"image_config": {"image_size": "2k"}}}),
            true,
        )
        .unwrap();
        assert_eq!(
            b["generationConfig"]["imageConfig"],
            json!({"imageSize": "2K"})
        );
        // No image config: image output still asked for.
        let b = build(&json!({"messages": msgs}), true).unwrap();
        assert_eq!(
            b["generationConfig"],
            json!({"responseModalities": ["TEXT", "IMAGE"]})
        );
        let ic = |v: Value| json!({"messages": msgs, "google": {"image_config": v}});
        assert!(refused(ic(json!({"aspect_ratio": "7:3"})), true).contains("aspect_ratio"));
        assert!(refused(ic(json!({"image_size": "8K"})), true).contains("image_size"));
        assert!(refused(ic(json!("16:9")), true).contains("object"));
        assert!(refused(ic(json!({"aspect_ratio": "1:1"})), false).contains("image models"));
    }

    #[test]
    fn tools_calls_and_results_translate() {
        let b = body(json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                     "extra_content": {"google": {"thought_signature": "c2ln"}}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18}"},
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_weather", "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
            }}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }));
        assert_eq!(
            b["contents"][1],
            json!({"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                 "thoughtSignature": "c2ln"}]})
        );
        assert_eq!(
            b["contents"][2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"content": "18 C"}}},
                {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
            ]})
        );
        assert_eq!(
            b["tools"],
            json!([{"functionDeclarations": [{"name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}])
        );
        assert_eq!(
            b["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
        );
        assert_eq!(
            tool_config(Some(&json!("required"))).unwrap(),
            Some(json!({"functionCallingConfig": {"mode": "ANY"}}))
        );
        assert!(tool_config(Some(&json!("sometimes"))).is_err());
    }

    #[test]
    fn what_gemini_cannot_take_is_refused() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        assert!(
            refused(
                json!({"messages": msgs, "response_format": {"type": "json_schema"}}),
                false
            )
            .contains("response_format")
        );
        assert_eq!(
            body(json!({"messages": msgs, "response_format": {"type": "json_object"}}))["generationConfig"]
                ["responseMimeType"],
            "application/json"
        );
        assert!(
            refused(
                json!({"messages": [{"role": "system", "content": "only"}]}),
                false
            )
            .contains("user")
        );
        assert!(
            refused(
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                false
            )
            .contains("input_audio")
        );
        assert!(
            refused(
                json!({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}),
                false
            )
            .contains("`x`")
        );
        assert!(refused(json!({"messages": msgs, "max_tokens": 0}), false).contains("max_tokens"));
        assert!(refused(json!({"messages": msgs, "top_k": 0.5}), false).contains("top_k"));
    }
}
