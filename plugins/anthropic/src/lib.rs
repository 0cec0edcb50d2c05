//! The `anthropic` provider: Anthropic's Messages API (Claude models), translated to and from
//! OpenAI's chat completions, so clients keep speaking OpenAI.
//!
//! Wire format (Anthropic API reference): `POST {base}/messages` (base URL
//! `https://api.anthropic.com/v1`) with `anthropic-version: 2023-06-01`; the key travels in
//! `x-api-key`, added by the host from the manifest's auth scheme, never by this plugin. The body
//! is `{model, max_tokens (required), system?, messages: [{role: user | assistant, content: string
//! | blocks}], temperature?, top_p?, top_k?, stop_sequences?, stream?, tools?: [{name, description?,
//! input_schema}], tool_choice?, metadata?}`; the answer is `{id, type: "message", role, model,
//! content: [text | tool_use blocks], stop_reason, usage: {input_tokens, output_tokens}}`; a
//! stream is named server-sent events (`message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`, `ping`,
//! `error`); an error is `{"type": "error", "error": {"type", "message"}}`. `GET {base}/models`
//! lists the models.
//!
//! `request.rs` builds the Messages body, `response.rs` reads answers and errors, `stream.rs`
//! turns events into chunks.

mod request;
mod response;
mod stream;

use tollgate_plugin_sdk::serde_json::Value;
use tollgate_plugin_sdk::*;

struct Anthropic;

/// The API version this plugin speaks (`anthropic-version`).
const API_VERSION: &str = "2023-06-01";

/// `max_tokens` for a model the manifest does not know, when the client sets none (Anthropic
/// requires one). The same as the gateway's default `billing.default_max_output_tokens`, which
/// sizes the reservation of such a request.
const FALLBACK_MAX_TOKENS: u32 = 4096;

/// Models known without asking the upstream: id, context window, most output tokens, and the
/// input and output prices in pico-dollars per token (= micro-dollars per million tokens, so
/// "$3 / MTok" is 3_000_000). Dated ids and their aliases both, as configs may name either.
#[rustfmt::skip]
const MODELS: &[(&str, u32, u32, u64, u64)] = &[
    ("claude-opus-4-6",            200_000, 128_000,  5_000_000, 25_000_000),
    ("claude-sonnet-4-6",          200_000,  64_000,  3_000_000, 15_000_000),
    ("claude-sonnet-4-5",          200_000,  64_000,  3_000_000, 15_000_000),
    ("claude-sonnet-4-5-20250929", 200_000,  64_000,  3_000_000, 15_000_000),
    ("claude-haiku-4-5",           200_000,  64_000,  1_000_000,  5_000_000),
    ("claude-haiku-4-5-20251001",  200_000,  64_000,  1_000_000,  5_000_000),
    ("claude-opus-4-1",            200_000,  32_000, 15_000_000, 75_000_000),
    ("claude-opus-4-1-20250805",   200_000,  32_000, 15_000_000, 75_000_000),
];

fn model_info(&(id, context, max_out, input, output): &(&str, u32, u32, u64, u64)) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec!["chat".into()],
        context_window: Some(context),
        max_output_tokens: Some(max_out),
        price: Some(ModelPrice {
            input_per_token: input,
            output_per_token: output,
            per_image: 0,
            per_second: 0,
            per_request: 0,
        }),
    }
}

/// The `max_tokens` sent when the client sets none: the model's most output, which is also
/// what the gateway reserves for such a request.
fn default_max_tokens(model: &str) -> u32 {
    MODELS
        .iter()
        .find(|m| m.0 == model)
        .map_or(FALLBACK_MAX_TOKENS, |m| m.2)
}

/// The headers every Anthropic request carries (besides the key, which the host adds).
fn versioned(mut req: HttpRequest, ctx: &ChannelContext) -> HttpRequest {
    req.headers.push(header("anthropic-version", API_VERSION));
    if let Some(beta) = option(ctx, "anthropic_beta") {
        req.headers.push(header("anthropic-beta", beta));
    }
    req
}

impl Provider for Anthropic {
    fn describe() -> Manifest {
        Manifest {
            name: "anthropic".into(),
            version: "0.1.0".into(),
            kinds: vec!["chat".into()],
            auth: AuthScheme::CustomHeader("x-api-key".into()),
            models: MODELS.iter().map(model_info).collect(),
            config_keys: vec!["anthropic_beta".into()],
        }
    }

    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        if kind != "chat" {
            return Err(invalid_request(format!(
                "the anthropic provider does not do `{kind}`"
            )));
        }
        let req: Value = parse_request(&request)?;
        let body = request::build(&ctx.model, &req, default_max_tokens(&ctx.model))?;
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        stream::reset();
        let out = json_request("POST", "/messages", &body, stream);
        Ok(Outbound::Send(versioned(out, &ctx)))
    }

    fn parse_response(
        ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(response::http_error(&response));
        }
        let msg: Value = parse_upstream(&response.body)?;
        if msg.get("type").and_then(Value::as_str) == Some("error") {
            return Err(response::error_event(&msg));
        }
        let created = response::created(&response.headers);
        Ok(response::completion(&msg, &ctx.model, created)?.to_string())
    }

    fn parse_stream_event(
        ctx: ChannelContext,
        event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        stream::translate(&ctx.model, &event)
    }

    fn build_models_request(ctx: ChannelContext) -> Option<HttpRequest> {
        Some(versioned(get_request("/models?limit=1000"), &ctx))
    }

    fn parse_models_response(
        _ctx: ChannelContext,
        response: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(response::http_error(&response));
        }
        let v: Value = parse_upstream(&response.body)?;
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| upstream_error("malformed model list: no `data`"))?;
        Ok(data
            .iter()
            .filter_map(|m| {
                let id = m.get("id").and_then(Value::as_str)?;
                let known = MODELS.iter().find(|k| k.0 == id).map(model_info);
                let limit = |key: &str| {
                    m.get(key)
                        .and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                };
                Some(known.unwrap_or(ModelInfo {
                    id: id.into(),
                    kinds: vec!["chat".into()],
                    context_window: limit("max_input_tokens"),
                    max_output_tokens: limit("max_tokens"),
                    price: None,
                }))
            })
            .collect())
    }
}

tollgate_plugin_sdk::export_provider!(Anthropic);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::serde_json::json;

    fn ctx(model: &str) -> ChannelContext {
        ChannelContext {
            channel: "claude".into(),
            base_url: "https://api.anthropic.com/v1".into(),
            model: model.into(),
            options: vec![("anthropic_beta".into(), "feature-2025-01-01".into())],
        }
    }

    #[test]
    fn the_manifest_declares_the_key_header_and_priced_models() {
        let m = Anthropic::describe();
        assert_eq!(m.name, "anthropic");
        assert_eq!(m.kinds, ["chat"]);
        assert!(matches!(&m.auth, AuthScheme::CustomHeader(h) if h == "x-api-key"));
        let sonnet = m
            .models
            .iter()
            .find(|m| m.id == "claude-sonnet-4-5")
            .unwrap();
        let price = sonnet.price.unwrap();
        assert_eq!(
            (price.input_per_token, price.output_per_token),
            (3_000_000, 15_000_000)
        );
        assert!(
            m.models
                .iter()
                .all(|m| m.price.is_some() && m.max_output_tokens.is_some())
        );
    }

    #[test]
    fn a_request_goes_to_messages_with_the_version_and_no_key() {
        let req = json!({"model": "public-name", "messages": [{"role": "user", "content": "hi"}]});
        let Outbound::Send(out) =
            Anthropic::build_request(ctx("claude-haiku-4-5"), "chat".into(), req.to_string())
                .unwrap()
        else {
            panic!("expected a request to send");
        };
        assert_eq!(
            (out.method.as_str(), out.path.as_str()),
            ("POST", "/messages")
        );
        assert_eq!(
            header_value(&out.headers, "anthropic-version"),
            Some(API_VERSION)
        );
        assert_eq!(
            header_value(&out.headers, "anthropic-beta"),
            Some("feature-2025-01-01")
        );
        assert!(header_value(&out.headers, "x-api-key").is_none());
        assert!(!out.stream);
        let body: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(body["model"], "claude-haiku-4-5");
        assert_eq!(body["max_tokens"], 64_000, "the model's most output");
        let Err(e) = Anthropic::build_request(ctx("x"), "embedding".into(), req.to_string()) else {
            panic!("embeddings are not translated");
        };
        assert_eq!(e.class, ErrorClass::InvalidRequest);
    }

    #[test]
    fn an_unknown_model_gets_the_fallback_max_tokens() {
        assert_eq!(default_max_tokens("claude-future-9"), FALLBACK_MAX_TOKENS);
    }

    #[test]
    fn the_model_list_prefers_what_the_manifest_knows() {
        let body = json!({"data": [
            {"type": "model", "id": "claude-haiku-4-5", "display_name": "Claude Haiku 4.5"},
            {"type": "model", "id": "claude-new", "max_input_tokens": 500_000, "max_tokens": 8_000}
        ], "has_more": false});
        let resp = HttpResponse {
            status: 200,
            headers: vec![],
            body: body.to_string().into_bytes(),
        };
        let models = Anthropic::parse_models_response(ctx("x"), resp).unwrap();
        assert!(models[0].price.is_some());
        assert_eq!(models[1].context_window, Some(500_000));
        assert_eq!(models[1].max_output_tokens, Some(8_000));
        assert!(models[1].price.is_none());
        let req = Anthropic::build_models_request(ctx("x")).unwrap();
        assert_eq!(req.path, "/models?limit=1000");
        assert_eq!(
            header_value(&req.headers, "anthropic-version"),
            Some(API_VERSION)
        );
    }
}
