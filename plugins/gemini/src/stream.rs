//! Gemini's stream (`streamGenerateContent?alt=sse`: each event a whole
//! `GenerateContentResponse` holding the next piece, no event names, no end marker) → OpenAI
//! `chat.completion.chunk`s: the role when a candidate starts, text, image and function-call
//! deltas, the finish reason when a candidate says one, and, once every candidate has finished,
//! the usage chunk (no choices; the last `usageMetadata` seen) that the gateway bills from, and
//! the end. Gemini closes the connection after its last event, so the end is the plugin's call:
//! the event where the last candidate finishes.
//!
//! As in the `anthropic` plugin, the host calls the plugin once per event on one instance for
//! the whole request, so what earlier events said (the response id, the model, each candidate's
//! progress, the latest usage) is kept here between calls; `build_request` starts it afresh.

use std::cell::RefCell;
use std::collections::BTreeMap;

use tollgate_plugin_sdk::openai;
use tollgate_plugin_sdk::serde_json::{self, Value, json};
use tollgate_plugin_sdk::{PluginError, SseEvent, StreamOutput, done, upstream_error};

use crate::response;

#[derive(Default)]
struct Candidate {
    /// Something (text, image, call) went out for it.
    streamed: bool,
    /// Function calls so far: the next call's index.
    calls: usize,
    finished: bool,
}

#[derive(Default)]
struct State {
    id: String,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    candidates: BTreeMap<u64, Candidate>,
    ended: bool,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Forget any earlier stream.
pub fn reset() {
    STATE.with(|s| *s.borrow_mut() = State::default());
}

/// One event → zero or more chunks (JSON text); `done` once every candidate finished.
pub fn translate(model: &str, event: &SseEvent) -> Result<StreamOutput, PluginError> {
    let data = event.data.trim();
    if data.is_empty() {
        return Ok(StreamOutput {
            chunks: Vec::new(),
            done: false,
        });
    }
    if data == "[DONE]" {
        return Ok(done());
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| upstream_error(format!("malformed upstream stream event: {e}")))?;
    STATE.with(|cell| {
        let mut st = cell.borrow_mut();
        if st.model.is_empty() {
            st.model = model.to_string();
        }
        st.on(&v)
    })
}

impl State {
    fn on(&mut self, v: &Value) -> Result<StreamOutput, PluginError> {
        if let Some(err) = v.get("error") {
            return Err(response::error_body(Some(err), None));
        }
        if let Some(refused) = response::blocked_prompt(v) {
            return Err(refused);
        }
        if self.id.is_empty()
            && let Some(id) = v.get("responseId").and_then(Value::as_str)
        {
            self.id = id.to_string();
        }
        if let Some(m) = v.get("modelVersion").and_then(Value::as_str) {
            self.model = m.to_string();
        }
        if let Some(u) = v.get("usageMetadata") {
            // Counts are cumulative: each replaces the last.
            (self.prompt_tokens, self.completion_tokens) = response::tokens(Some(u));
        }
        let mut chunks = Vec::new();
        let list = v
            .get("candidates")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (pos, c) in list.iter().enumerate() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            let reason = c.get("finishReason").and_then(Value::as_str);
            let parts = response::parts(c);
            let anything_streamed = self.candidates.values().any(|c| c.streamed);
            let cand = self.candidates.entry(index).or_default();
            if cand.finished {
                continue;
            }
            if parts.is_empty()
                && !cand.streamed
                && !anything_streamed
                && response::filtered(reason)
            {
                // Stopped for its content before it said anything.
                return Err(tollgate_plugin_sdk::error(
                    tollgate_plugin_sdk::ErrorClass::ContentRefused,
                    format!("the answer was blocked ({})", reason.unwrap_or("SAFETY")),
                ));
            }
            let first = !cand.streamed;
            let mut deltas = Vec::new();
            if !parts.text.is_empty() || first {
                let mut d = json!({"content": parts.text});
                if first {
                    d["role"] = json!("assistant");
                }
                deltas.push(d);
            }
            if !parts.images.is_empty() {
                deltas.push(json!({"images": parts.images_json()}));
            }
            if !parts.calls.is_empty() {
                let calls: Vec<Value> = response::tool_calls(index, &parts.calls)
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut call)| {
                        let n = cand.calls + i;
                        call["index"] = json!(n);
                        call["id"] = json!(format!("call_{index}_{n}"));
                        call
                    })
                    .collect();
                cand.calls += calls.len();
                deltas.push(json!({"tool_calls": calls}));
            }
            cand.streamed = true;
            for d in deltas {
                chunks.push(self.chunk(index, d, None));
            }
            if let Some(r) = reason {
                let cand = self.candidates.entry(index).or_default();
                cand.finished = true;
                let has_calls = cand.calls > 0;
                chunks.push(self.chunk(
                    index,
                    json!({}),
                    Some(response::finish_reason(Some(r), has_calls)),
                ));
            }
        }
        let all_finished =
            !self.candidates.is_empty() && self.candidates.values().all(|c| c.finished);
        if all_finished && !self.ended {
            self.ended = true;
            let usage = response::usage(self.prompt_tokens, self.completion_tokens);
            chunks.push(openai::usage_chunk(self.id(), 0, &self.model, usage).to_string());
            return Ok(StreamOutput { chunks, done: true });
        }
        Ok(StreamOutput {
            chunks,
            done: false,
        })
    }

    fn id(&self) -> &str {
        if self.id.is_empty() {
            "gemini"
        } else {
            &self.id
        }
    }

    fn chunk(&self, index: u64, delta: Value, finish_reason: Option<&str>) -> String {
        json!({
            "id": self.id(),
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": null,
                         "finish_reason": finish_reason}],
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::ErrorClass;

    fn ev(data: Value) -> SseEvent {
        SseEvent {
            event: None,
            data: data.to_string(),
        }
    }

    /// Run events through a fresh state; every chunk parsed, and whether it ended.
    fn run(events: &[SseEvent]) -> (Vec<Value>, bool) {
        reset();
        let mut chunks = Vec::new();
        let mut ended = false;
        for e in events {
            let out = translate("gemini-x", e).unwrap();
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

    fn text(t: &str, finish: Option<&str>, usage: Value) -> SseEvent {
        let mut c = json!({"content": {"role": "model", "parts": [{"text": t}]}, "index": 0});
        if let Some(f) = finish {
            c["finishReason"] = json!(f);
        }
        ev(json!({"candidates": [c], "usageMetadata": usage,
                  "modelVersion": "gemini-2.5-flash", "responseId": "r-1"}))
    }

    #[test]
    fn a_text_stream_becomes_chunks_and_a_usage_chunk() {
        let (chunks, ended) = run(&[
            text(
                "Hel",
                None,
                json!({"promptTokenCount": 7, "totalTokenCount": 7}),
            ),
            text("lo", None, json!({"promptTokenCount": 7})),
            text(
                "!",
                Some("STOP"),
                json!({"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10}),
            ),
        ]);
        assert!(ended);
        assert!(chunks.iter().all(|c| c["id"] == "r-1"
            && c["model"] == "gemini-2.5-flash"
            && c["object"] == "chat.completion.chunk"));
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "Hel"})
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello!");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
        );
    }

    #[test]
    fn images_and_calls_stream_as_deltas() {
        let (chunks, ended) = run(&[
            ev(json!({"candidates": [{"content": {"parts": [
                {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}, "index": 0}]})),
            ev(json!({"candidates": [{"content": {"parts": [
                {"functionCall": {"name": "f", "args": {"a": 1}}}]},
                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 1290}})),
        ]);
        assert!(ended);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            chunks[1]["choices"][0]["delta"]["images"][0]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );
        let call = &chunks[2]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(call["index"], 0);
        assert_eq!(call["function"]["name"], "f");
        assert_eq!(call["function"]["arguments"], "{\"a\":1}");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[4]["usage"]["completion_tokens"], 1290);
    }

    #[test]
    fn refusals_and_errors_end_the_stream_with_an_error() {
        reset();
        let e = translate(
            "m",
            &ev(json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})),
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::ContentRefused);
        reset();
        let e = translate(
            "m",
            &ev(json!({"candidates": [{"finishReason": "SAFETY", "index": 0}]})),
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::ContentRefused);
        // After some text, a safety stop is a content_filter finish.
        let (chunks, ended) = run(&[
            text("Once upon", None, json!({})),
            ev(json!({"candidates": [{"finishReason": "SAFETY", "index": 0}]})),
        ]);
        assert!(ended);
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "content_filter");
        reset();
        let e = translate(
            "m",
            &ev(json!({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})),
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Upstream);
        assert!(
            translate(
                "m",
                &SseEvent {
                    event: None,
                    data: "{nope".into()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn several_candidates_end_when_all_finished() {
        let cand = |i: u64, t: &str, f: Option<&str>| {
            let mut c = json!({"content": {"parts": [{"text": t}]}, "index": i});
            if let Some(f) = f {
                c["finishReason"] = json!(f);
            }
            c
        };
        let (chunks, ended) = run(&[
            ev(json!({"candidates": [cand(0, "a", None), cand(1, "b", None)]})),
            ev(json!({"candidates": [cand(0, "c", Some("STOP")), cand(1, "d", None)]})),
        ]);
        assert!(!ended);
        assert_eq!(chunks[1]["choices"][0]["index"], 1);
        let (_, ended) = run(&[ev(
            json!({"candidates": [cand(0, "a", Some("STOP")), cand(1, "b", Some("MAX_TOKENS"))]}),
        )]);
        assert!(ended);
    }
}
