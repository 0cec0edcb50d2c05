//! The `openai` provider: any upstream that speaks OpenAI's chat completions API (OpenAI itself,
//! DeepSeek, Mistral, Groq, Together, OpenRouter, vLLM, Ollama, ...), configured by base URL.
//!
//! Wire format (OpenAI API reference): `POST {base}/chat/completions` with a JSON body; streamed
//! answers are server-sent events of `chat.completion.chunk` objects ending with `data: [DONE]`;
//! `stream_options.include_usage` adds a last chunk with `usage`; errors are
//! `{"error": {"message", "type", "param", "code"}}`; `GET {base}/models` lists models.
//! Images: `POST {base}/images/generations` with `{model, prompt, n?, size?, quality?,
//! response_format?, ...}`, answered by `{"created", "data": [{"url"} or {"b64_json"}], "usage"?}`.
//! Embeddings: `POST {base}/embeddings` with `{model, input, encoding_format?, dimensions?}`,
//! answered by `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
//! "model", "usage": {"prompt_tokens", "total_tokens"}}`.

use tollgate_plugin_sdk::serde_json::{self, Map, Value, json};
use tollgate_plugin_sdk::*;

struct OpenAi;

fn price(input: u64, output: u64) -> Option<ModelPrice> {
    Some(ModelPrice {
        input_per_token: input,
        output_per_token: output,
        per_image: 0,
        per_second: 0,
        per_request: 0,
    })
}

fn embedding_model(id: &str, input: u64) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec!["embedding".into()],
        context_window: Some(8_192),
        max_output_tokens: None,
        price: price(input, 0),
    }
}

fn image_model(id: &str, per_image: u64, input: u64, output: u64) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec!["image".into()],
        context_window: None,
        max_output_tokens: None,
        price: Some(ModelPrice {
            input_per_token: input,
            output_per_token: output,
            per_image,
            per_second: 0,
            per_request: 0,
        }),
    }
}

fn model(id: &str, context: u32, max_out: u32, input: u64, output: u64) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec!["chat".into()],
        context_window: Some(context),
        max_output_tokens: Some(max_out),
        // Pico-dollars per token = micro-dollars per million tokens.
        price: price(input, output),
    }
}

impl Provider for OpenAi {
    fn describe() -> Manifest {
        Manifest {
            name: "openai".into(),
            version: "0.1.0".into(),
            kinds: vec!["chat".into(), "embedding".into(), "image".into()],
            auth: AuthScheme::Bearer,
            models: vec![
                model("gpt-4o-mini", 128_000, 16_384, 150_000, 600_000),
                model("gpt-4o", 128_000, 16_384, 2_500_000, 10_000_000),
                model("gpt-4.1", 1_047_576, 32_768, 2_000_000, 8_000_000),
                model("gpt-4.1-mini", 1_047_576, 32_768, 400_000, 1_600_000),
                embedding_model("text-embedding-3-small", 20_000),
                embedding_model("text-embedding-3-large", 130_000),
                // Standard 1024x1024 list prices per image; gpt-image-1 by tokens.
                image_model("dall-e-3", 40_000_000_000, 0, 0),
                image_model("dall-e-2", 20_000_000_000, 0, 0),
                image_model("gpt-image-1", 0, 5_000_000, 40_000_000),
            ],
            config_keys: vec!["organization".into(), "project".into()],
        }
    }

    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        let path = match kind.as_str() {
            "chat" => "/chat/completions",
            "embedding" => "/embeddings",
            "image" => "/images/generations",
            _ => {
                return Err(invalid_request(format!(
                    "the openai plugin does not do `{kind}` yet"
                )));
            }
        };
        let mut body: Map<String, Value> = parse_request(&request)?;
        body.insert("model".into(), Value::String(ctx.model.clone()));
        if kind != "chat" {
            body.remove("stream");
        }
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        if stream {
            // Ask for the usage chunk: billing counts the tokens of streams too.
            let opts = body.entry("stream_options").or_insert_with(|| json!({}));
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        }
        let mut req = json_request("POST", path, &Value::Object(body), stream);
        if let Some(org) = option(&ctx, "organization") {
            req.headers.push(header("openai-organization", org));
        }
        if let Some(project) = option(&ctx, "project") {
            req.headers.push(header("openai-project", project));
        }
        Ok(Outbound::Send(req))
    }

    fn parse_response(
        _ctx: ChannelContext,
        kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(error_from_status(&response));
        }
        let v: Value = parse_upstream(&response.body)?;
        let field = if kind == "chat" { "choices" } else { "data" };
        if !v.get(field).is_some_and(Value::is_array) {
            return Err(upstream_error(format!(
                "malformed upstream response: no `{field}`"
            )));
        }
        String::from_utf8(response.body)
            .map_err(|_| upstream_error("malformed upstream response: not UTF-8"))
    }

    fn parse_stream_event(
        _ctx: ChannelContext,
        event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        if is_done(&event) {
            return Ok(done());
        }
        let v: Value = serde_json::from_str(&event.data)
            .map_err(|e| upstream_error(format!("malformed upstream stream event: {e}")))?;
        if let Some(err) = v.get("error") {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the upstream reported an error mid-stream");
            return Err(upstream_error(message));
        }
        Ok(one_chunk(event.data))
    }

    fn build_models_request(_ctx: ChannelContext) -> Option<HttpRequest> {
        Some(get_request("/models"))
    }

    fn parse_models_response(
        _ctx: ChannelContext,
        response: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(error_from_status(&response));
        }
        let v: Value = parse_upstream(&response.body)?;
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| upstream_error("malformed model list: no `data`"))?;
        let known = Self::describe().models;
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
}

tollgate_plugin_sdk::export_provider!(OpenAi);
