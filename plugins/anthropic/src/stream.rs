//! Anthropic's stream events → OpenAI `chat.completion.chunk`s: the role at `message_start`,
//! text and tool-call deltas (a `tool_use` block's id and name when it starts, its
//! `input_json_delta`s as argument deltas), the finish reason at `message_delta`, and at
//! `message_stop` the usage chunk (no choices; the prompt tokens from `message_start`, the
//! completion tokens from `message_delta`) that the gateway bills from, and the end.
//!
//! The host calls the plugin once per event, but on one instance for the whole request
//! (`Session` in the gateway's `src/plugins/session.rs`), so what earlier events said (the
//! message id, the model, the input tokens, which block is which tool call) is kept here between
//! calls. An instance may serve later requests, each starting with `build_request`, which resets
//! this state.

use std::cell::RefCell;

use tollgate_plugin_sdk::openai;
use tollgate_plugin_sdk::serde_json::{self, Value, json};
use tollgate_plugin_sdk::{PluginError, SseEvent, StreamOutput, done, upstream_error};

use crate::response;

#[derive(Default)]
struct State {
    id: String,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// The content-block index of each tool call so far, in order: a tool call's OpenAI index
    /// is its position here.
    tool_blocks: Vec<u64>,
    /// The finish chunk went out.
    finished: bool,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Forget any earlier stream.
pub fn reset() {
    STATE.with(|s| *s.borrow_mut() = State::default());
}

/// One event → zero or more chunks (JSON text); `done` after `message_stop`.
pub fn translate(model: &str, event: &SseEvent) -> Result<StreamOutput, PluginError> {
    if event.data.trim() == "[DONE]" {
        return Ok(done());
    }
    let v: Value = serde_json::from_str(&event.data)
        .map_err(|e| upstream_error(format!("malformed upstream stream event: {e}")))?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .or(event.event.as_deref())
        .unwrap_or("");
    STATE.with(|cell| {
        let mut st = cell.borrow_mut();
        if st.model.is_empty() {
            st.model = model.to_string();
        }
        st.on(kind, &v)
    })
}

impl State {
    fn on(&mut self, kind: &str, v: &Value) -> Result<StreamOutput, PluginError> {
        let chunks = match kind {
            "message_start" => {
                let msg = v.get("message").unwrap_or(&Value::Null);
                if let Some(id) = msg.get("id").and_then(Value::as_str) {
                    self.id = id.to_string();
                }
                if let Some(m) = msg.get("model").and_then(Value::as_str) {
                    self.model = m.to_string();
                }
                let (prompt, completion) = response::tokens(msg.get("usage"));
                self.prompt_tokens = prompt;
                self.completion_tokens = completion;
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            "content_block_start" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let block = v.get("content_block").unwrap_or(&Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => vec![self.chunk(json!({"content": t}), None)],
                        _ => Vec::new(),
                    },
                    Some("tool_use") => {
                        let call = self.tool_blocks.len();
                        self.tool_blocks.push(index);
                        let id = block.get("id").and_then(Value::as_str).unwrap_or("");
                        let name = block.get("name").and_then(Value::as_str).unwrap_or("");
                        vec![self.chunk(
                            json!({"tool_calls": [{
                                "index": call,
                                "id": id,
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }]}),
                            None,
                        )]
                    }
                    // Thinking and server-tool blocks have no place in OpenAI's chunks.
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let delta = v.get("delta").unwrap_or(&Value::Null);
                let piece = |key: &str| {
                    delta
                        .get(key)
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                };
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => match piece("text") {
                        Some(t) => vec![self.chunk(json!({"content": t}), None)],
                        None => Vec::new(),
                    },
                    Some("input_json_delta") => {
                        let call = self.tool_blocks.iter().position(|b| *b == index);
                        match (call, piece("partial_json")) {
                            (Some(call), Some(args)) => vec![self.chunk(
                                json!({"tool_calls": [{
                                    "index": call,
                                    "function": {"arguments": args},
                                }]}),
                                None,
                            )],
                            _ => Vec::new(),
                        }
                    }
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                if let Some(u) = v.get("usage") {
                    // Counts here are cumulative: they replace what message_start said.
                    if let Some(out) = u.get("output_tokens").and_then(Value::as_u64) {
                        self.completion_tokens = out;
                    }
                    if u.get("input_tokens").and_then(Value::as_u64).is_some() {
                        self.prompt_tokens = response::tokens(Some(u)).0;
                    }
                }
                let stop = v.pointer("/delta/stop_reason").and_then(Value::as_str);
                self.finished = true;
                vec![self.chunk(json!({}), Some(response::finish_reason(stop)))]
            }
            "message_stop" => {
                let mut chunks = Vec::new();
                if !self.finished {
                    self.finished = true;
                    chunks.push(self.chunk(json!({}), Some("stop")));
                }
                let usage = response::usage(self.prompt_tokens, self.completion_tokens);
                chunks.push(openai::usage_chunk(self.id(), 0, &self.model, usage).to_string());
                return Ok(StreamOutput { chunks, done: true });
            }
            "error" => return Err(response::error_event(v)),
            // ping, content_block_stop, and event types added later.
            _ => Vec::new(),
        };
        Ok(StreamOutput {
            chunks,
            done: false,
        })
    }

    fn id(&self) -> &str {
        if self.id.is_empty() { "msg" } else { &self.id }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> String {
        openai::chunk(self.id(), 0, &self.model, delta, finish_reason).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::ErrorClass;

    fn ev(name: &str, data: Value) -> SseEvent {
        SseEvent {
            event: Some(name.into()),
            data: data.to_string(),
        }
    }

    /// Run events through a fresh state; every chunk parsed, and whether it ended.
    fn run(events: &[SseEvent]) -> (Vec<Value>, bool) {
        reset();
        let mut chunks = Vec::new();
        let mut ended = false;
        for e in events {
            let out = translate("claude-x", e).unwrap();
            assert!(!ended, "nothing after done");
            ended = out.done;
            chunks.extend(
                out.chunks
                    .iter()
                    .map(|c| serde_json::from_str::<Value>(c).unwrap()),
            );
        }
        (chunks, ended)
    }

    fn start(input: u64) -> SseEvent {
        ev(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_s", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                "content": [], "stop_reason": null, "usage": {"input_tokens": input, "output_tokens": 1}
            }}),
        )
    }

    fn stop() -> SseEvent {
        ev("message_stop", json!({"type": "message_stop"}))
    }

    #[test]
    fn a_text_stream_becomes_chunks_and_a_usage_chunk() {
        let (chunks, ended) = run(&[
            start(12),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            ev("ping", json!({"type": "ping"})),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": " world"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
                "usage": {"output_tokens": 5}}),
            ),
            stop(),
        ]);
        assert!(ended);
        assert_eq!(chunks.len(), 5);
        assert!(
            chunks
                .iter()
                .all(|c| c["id"] == "msg_s" && c["model"] == "claude-haiku-4-5")
        );
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hello");
        assert_eq!(chunks[2]["choices"][0]["delta"]["content"], " world");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(
            chunks[4]["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17})
        );
    }

    #[test]
    fn tool_use_blocks_become_tool_call_deltas() {
        let (chunks, _) = run(&[
            start(3),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Checking."}}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}}),
            ),
            stop(),
        ]);
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(
            deltas[2]["tool_calls"][0],
            json!({"index": 0, "id": "toolu_9", "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}})
        );
        let args: String = deltas[3..5]
            .iter()
            .map(|d| {
                d["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(args, r#"{"city": "Paris"}"#);
        assert_eq!(deltas[3]["tool_calls"][0]["index"], 0);
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[6]["usage"]["completion_tokens"], 20);
    }

    #[test]
    fn an_error_event_is_a_plugin_error() {
        reset();
        translate("claude-x", &start(1)).unwrap();
        let e = translate(
            "claude-x",
            &ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        )
        .unwrap_err();
        assert_eq!((e.class, e.status), (ErrorClass::Upstream, Some(529)));
        assert!(
            translate(
                "claude-x",
                &SseEvent {
                    event: None,
                    data: "{nope".into()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn a_stream_without_message_delta_still_finishes() {
        let (chunks, ended) = run(&[start(2), stop()]);
        assert!(ended);
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[2]["usage"]["prompt_tokens"], 2);
    }
}
