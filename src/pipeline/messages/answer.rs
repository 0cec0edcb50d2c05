//! The unified (OpenAI chat) answer → Anthropic's: a whole `chat.completion` as one `message`
//! object, and a relayed stream's chunks as Anthropic's server-sent events ([`Events`], a
//! [`Wire`] for the relay).
//!
//! A message: `id` (`msg_` and the request id), `type: message`, `role: assistant`, the public
//! model name, `content` (the answer's text as a `text` block, each tool call a `tool_use` block
//! with its arguments parsed as the `input` object), `stop_reason` (`stop` → `end_turn`, `length`
//! → `max_tokens`, `tool_calls` → `tool_use`, `content_filter` → `refusal`; OpenAI's finish
//! reasons do not say whether a stop sequence ended the answer, so `stop_sequence` is always
//! null) and `usage` (`input_tokens`, `output_tokens`: what was charged, with `cost` and
//! `cost_picodollars` when billed).
//!
//! A stream: `message_start` (usage not known yet: zeros), then per block `content_block_start`,
//! its deltas (`text_delta`, or `input_json_delta` with the arguments as they arrive) and
//! `content_block_stop`; once the relay has settled, `message_delta` with the stop reason and the
//! charged usage, and `message_stop`. A failure is one `error` event in Anthropic's error body.

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::billing::{Credits, Usage};
use crate::error::ApiError;
use crate::pipeline::money::add_cost;
use crate::pipeline::relay::Wire;

/// Anthropic's stop reason for an OpenAI finish reason.
pub fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// A message id from the request id (the ledger's name for the request).
pub fn message_id(request_id: &str) -> String {
    let compact: String = request_id.chars().filter(|c| *c != '-').collect();
    format!("msg_{compact}")
}

/// The `usage` object: what was charged, and its cost when billed.
fn usage_value(usage: &Usage, cost: Option<Credits>) -> Value {
    let mut v = json!({"usage": {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
    }});
    if let Some(c) = cost {
        add_cost(&mut v, c);
    }
    v["usage"].take()
}

/// A tool call's JSON arguments as an `input` object (an empty object when they are empty or
/// not an object: the Messages shape has no place for anything else).
fn input_of(arguments: Option<&str>) -> Value {
    arguments
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

/// The text of a message's `content`: a string, or the `text` of its parts.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// A whole `chat.completion` as Anthropic's `message`.
pub fn message(
    id: &str,
    model: &str,
    completion: &Value,
    usage: &Usage,
    cost: Option<Credits>,
) -> Value {
    let choice = completion.pointer("/choices/0");
    let msg = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    let text = text_of(msg.and_then(|m| m.get("content")));
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    if let Some(calls) = msg
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
    {
        for (n, call) in calls.iter().enumerate() {
            let call_id = call
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| format!("toolu_{id}_{n}"), str::to_string);
            let function = call.get("function");
            content.push(json!({
                "type": "tool_use",
                "id": call_id,
                "name": function.and_then(|f| f.get("name")).and_then(Value::as_str).unwrap_or_default(),
                "input": input_of(function.and_then(|f| f.get("arguments")).and_then(Value::as_str)),
            }));
        }
    }
    let finish = choice
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str);
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": usage_value(usage, cost),
    })
}

/// The content block open in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// A tool call, by its index among the answer's tool calls.
    Tool(u64),
}

/// Anthropic's server-sent events made from the unified stream (see the module's doc).
pub struct Events {
    id: String,
    model: String,
    started: bool,
    /// The open block and its index.
    open: Option<(Block, u64)>,
    /// The index the next block gets.
    next: u64,
    stop_reason: Option<&'static str>,
}

impl Events {
    pub fn new(id: String, model: String) -> Self {
        Self {
            id,
            model,
            started: false,
            open: None,
            next: 0,
            stop_reason: None,
        }
    }

    fn start(&mut self, out: &mut VecDeque<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        out.push_back(event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ));
    }

    fn close(&mut self, out: &mut VecDeque<Bytes>) {
        if let Some((_, index)) = self.open.take() {
            out.push_back(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// Open `block` (closing the one before) unless it is open already; its index.
    fn open(&mut self, block: Block, first: Value, out: &mut VecDeque<Bytes>) -> u64 {
        if let Some((b, index)) = self.open
            && b == block
        {
            return index;
        }
        self.close(out);
        let index = self.next;
        self.next += 1;
        self.open = Some((block, index));
        out.push_back(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": first}),
        ));
        index
    }

    fn delta(index: u64, delta: Value, out: &mut VecDeque<Bytes>) {
        out.push_back(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }

    fn tool_call(&mut self, call: &Value, out: &mut VecDeque<Bytes>) {
        let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = call.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let call_id = call.get("id").and_then(Value::as_str);
        // A call that names itself again (an id or a name) starts a new block.
        let restart = self.open.is_some_and(|(b, _)| b == Block::Tool(n))
            && (call_id.is_some() || name.is_some());
        if restart {
            self.close(out);
        }
        let first = json!({
            "type": "tool_use",
            "id": call_id.map_or_else(|| format!("toolu_{}_{n}", self.id), str::to_string),
            "name": name.unwrap_or_default(),
            "input": {},
        });
        let index = self.open(Block::Tool(n), first, out);
        if let Some(args) = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        {
            Self::delta(
                index,
                json!({"type": "input_json_delta", "partial_json": args}),
                out,
            );
        }
    }
}

impl Wire for Events {
    fn chunk(&mut self, _: &str, chunk: &Map<String, Value>, out: &mut VecDeque<Bytes>) {
        self.start(out);
        // One choice: the Messages API has no `n`.
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return;
        };
        if let Some(delta) = choice.get("delta") {
            let text = text_of(delta.get("content"));
            if !text.is_empty() {
                let index = self.open(Block::Text, json!({"type": "text", "text": ""}), out);
                Self::delta(index, json!({"type": "text_delta", "text": text}), out);
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for call in calls {
                    self.tool_call(call, out);
                }
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop_reason = Some(stop_reason(Some(finish)));
        }
    }

    fn done(
        &mut self,
        _: Option<Map<String, Value>>,
        usage: &Usage,
        cost: Option<Credits>,
        out: &mut VecDeque<Bytes>,
    ) {
        self.start(out);
        self.close(out);
        out.push_back(event(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {
                    "stop_reason": self.stop_reason.unwrap_or("end_turn"),
                    "stop_sequence": null,
                },
                "usage": usage_value(usage, cost),
            }),
        ));
        out.push_back(event("message_stop", &json!({"type": "message_stop"})));
    }

    fn error(&mut self, err: &ApiError, out: &mut VecDeque<Bytes>) {
        out.push_back(event("error", &err.anthropic_body()));
    }
}

/// One named server-sent event.
fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(out: &VecDeque<Bytes>) -> Vec<(String, Value)> {
        out.iter()
            .map(|b| {
                let s = String::from_utf8_lossy(b).to_string();
                let mut lines = s.lines();
                let name = lines
                    .next()
                    .and_then(|l| l.strip_prefix("event: "))
                    .unwrap_or_default()
                    .to_string();
                let data = lines
                    .next()
                    .and_then(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_default();
                (name, data)
            })
            .collect()
    }

    fn chunk(delta: Value, finish: Option<&str>) -> Map<String, Value> {
        let v = json!({"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_completion_with_a_tool_call_becomes_a_message() {
        let completion = json!({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Checking.",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}]});
        let usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            ..Usage::default()
        };
        let m = message("msg_x", "claude", &completion, &usage, Some(Credits(5)));
        assert_eq!(m["type"], "message");
        assert_eq!(
            m["content"][0],
            json!({"type": "text", "text": "Checking."})
        );
        assert_eq!(
            m["content"][1],
            json!({"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}})
        );
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["usage"]["input_tokens"], 7);
        assert_eq!(m["usage"]["output_tokens"], 3);
        assert_eq!(m["usage"]["cost_picodollars"], 5);
        assert_eq!(stop_reason(Some("length")), "max_tokens");
        assert_eq!(stop_reason(Some("stop")), "end_turn");
        assert_eq!(message_id("a-b-c"), "msg_abc");
    }

    #[test]
    fn chunks_become_blocks_and_deltas() {
        let mut e = Events::new("msg_1".into(), "m".into());
        let mut out = VecDeque::new();
        for c in [
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "Hi"}), None),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "f", "arguments": ""}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
        ] {
            e.chunk("", &c, &mut out);
        }
        let usage = Usage {
            prompt_tokens: 4,
            completion_tokens: 2,
            ..Usage::default()
        };
        e.done(None, &usage, None, &mut out);
        let f = frames(&out);
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(f[0].1["message"]["id"], "msg_1");
        assert_eq!(f[2].1["delta"], json!({"type": "text_delta", "text": "Hi"}));
        assert_eq!(f[4].1["index"], 1);
        assert_eq!(f[4].1["content_block"]["id"], "call_1");
        assert_eq!(f[4].1["content_block"]["name"], "f");
        assert_eq!(f[5].1["delta"]["partial_json"], "{\"a\":");
        assert_eq!(f[8].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(f[8].1["usage"]["output_tokens"], 2);
        let mut failed = VecDeque::new();
        e.error(&ApiError::invalid("nope", None), &mut failed);
        let f = frames(&failed);
        assert_eq!(f[0].0, "error");
        assert_eq!(f[0].1["error"]["type"], "invalid_request_error");
    }
}
