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
//! Speech: `POST {base}/audio/speech` with `{model, input, voice, response_format?, speed?,
//! instructions?}`, answered by the audio bytes (the host passes them through; errors in the
//! usual error body).
//!
//! The translation itself lives in the SDK (`tollgate_plugin_sdk::openai`), shared with the
//! `azure` plugin.

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

/// A speech model: priced per character of `input` (`input_per_token`).
fn speech_model(id: &str, per_char: u64) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec!["speech".into()],
        context_window: None,
        max_output_tokens: None,
        price: price(per_char, 0),
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
            kinds: vec![
                "chat".into(),
                "embedding".into(),
                "image".into(),
                "speech".into(),
            ],
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
                // $15 and $30 per million characters.
                speech_model("tts-1", 15_000_000),
                speech_model("tts-1-hd", 30_000_000),
            ],
            config_keys: vec!["organization".into(), "project".into()],
        }
    }

    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        let Some(path) = openai::path_of(&kind) else {
            return Err(invalid_request(format!(
                "the openai plugin does not do `{kind}` yet"
            )));
        };
        let mut req = openai::request(&ctx, &kind, &request, path)?;
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
        openai::response(&kind, response)
    }

    fn parse_stream_event(
        _ctx: ChannelContext,
        event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        openai::stream_event(&event)
    }

    fn build_models_request(_ctx: ChannelContext) -> Option<HttpRequest> {
        Some(get_request("/models"))
    }

    fn parse_models_response(
        _ctx: ChannelContext,
        response: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        openai::models(response, &Self::describe().models)
    }
}

tollgate_plugin_sdk::export_provider!(OpenAi);
