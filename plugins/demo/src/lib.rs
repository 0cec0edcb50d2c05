//! The `demo` provider: offline and deterministic, so a newcomer gets an answer with no key and
//! no network. It answers every request itself (`outbound::answer`), streamed or not.

use tollgate_plugin_sdk::openai::{self, TextMessage};
use tollgate_plugin_sdk::serde_json::{self, Value, json};
use tollgate_plugin_sdk::*;

struct Demo;

const MODEL: &str = "demo-chat";
/// A fixed timestamp: the same request always gets the same bytes back.
const CREATED: u64 = 1_700_000_000;

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn reply_to(messages: &[TextMessage]) -> String {
    let last = messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.text.trim())
        .unwrap_or("");
    let said: String = last.chars().take(200).collect();
    let ellipsis = if last.chars().count() > 200 {
        "…"
    } else {
        ""
    };
    format!("Hello from tollgate's offline demo provider. You said: {said}{ellipsis}")
}

fn prompt_tokens(messages: &[TextMessage]) -> u64 {
    messages.iter().map(|m| words(&m.text) + 1).sum()
}

fn answer(body: Vec<u8>, content_type: &str) -> Outbound {
    Outbound::Answer(HttpResponse {
        status: 200,
        headers: vec![header("content-type", content_type)],
        body,
    })
}

impl Provider for Demo {
    fn describe() -> Manifest {
        Manifest {
            name: "demo".into(),
            version: "0.1.0".into(),
            kinds: vec!["chat".into()],
            auth: AuthScheme::None,
            models: vec![ModelInfo {
                id: MODEL.into(),
                kinds: vec!["chat".into()],
                context_window: Some(8192),
                max_output_tokens: Some(1024),
                price: Some(ModelPrice {
                    input_per_token: 100,
                    output_per_token: 200,
                    per_image: 0,
                    per_second: 0,
                    per_request: 0,
                }),
            }],
            config_keys: Vec::new(),
        }
    }

    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        if kind != "chat" {
            return Err(invalid_request(format!(
                "the demo provider does not do `{kind}`"
            )));
        }
        let req: Value = parse_request(&request)?;
        let messages = openai::messages(&req)?;
        let text = reply_to(&messages);
        let usage = openai::usage(prompt_tokens(&messages), words(&text));
        let model = if ctx.model.is_empty() {
            MODEL
        } else {
            ctx.model.as_str()
        };
        let id = format!("chatcmpl-demo-{:016x}", fnv1a(request.as_bytes()));
        if openai::wants_stream(&req) {
            let mut events = vec![openai::chunk(
                &id,
                CREATED,
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            )];
            let mut first = true;
            for word in text.split(' ') {
                let piece = if first {
                    word.to_string()
                } else {
                    format!(" {word}")
                };
                first = false;
                events.push(openai::chunk(
                    &id,
                    CREATED,
                    model,
                    json!({"content": piece}),
                    None,
                ));
            }
            events.push(openai::chunk(&id, CREATED, model, json!({}), Some("stop")));
            events.push(openai::usage_chunk(&id, CREATED, model, usage));
            Ok(answer(openai::sse_body(&events), "text/event-stream"))
        } else {
            let body = openai::completion(&id, CREATED, model, &text, "stop", usage);
            Ok(answer(body.to_string().into_bytes(), "application/json"))
        }
    }

    fn parse_response(
        _ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(error_from_status(&response));
        }
        String::from_utf8(response.body).map_err(|_| upstream_error("answer is not UTF-8"))
    }

    fn parse_stream_event(
        _ctx: ChannelContext,
        event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        if is_done(&event) {
            return Ok(done());
        }
        let _: Value = serde_json::from_str(&event.data)
            .map_err(|e| upstream_error(format!("bad chunk: {e}")))?;
        Ok(one_chunk(event.data))
    }

    fn build_models_request(_ctx: ChannelContext) -> Option<HttpRequest> {
        None
    }

    fn parse_models_response(
        _ctx: ChannelContext,
        _response: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        Ok(Self::describe().models)
    }
}

/// A small stable hash for deterministic ids.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

tollgate_plugin_sdk::export_provider!(Demo);
