//! The `gemini` provider: Google's Gemini API (`generateContent`, `streamGenerateContent`),
//! translated to and from OpenAI's chat completions, image output included (the "Nano Banana"
//! models), so clients keep speaking OpenAI.
//!
//! Wire format (Gemini API reference, <https://ai.google.dev/api>): base URL
//! `https://generativelanguage.googleapis.com/v1beta`; `POST {base}/models/{model}:generateContent`
//! answers one `GenerateContentResponse`, `POST {base}/models/{model}:streamGenerateContent?alt=sse`
//! answers server-sent events each holding one (no event names, no end marker: the connection
//! closes after the last). The key travels in `x-goog-api-key`, added by the host from the
//! manifest's auth scheme, never by this plugin. The body is `{contents: [{role: user | model,
//! parts: [{text} | {inlineData: {mimeType, data}} | {functionCall} | {functionResponse}]}],
//! systemInstruction?, tools?: [{functionDeclarations}], toolConfig?, generationConfig?:
//! {maxOutputTokens, temperature, topP, topK, stopSequences, candidateCount, responseMimeType,
//! responseModalities, imageConfig: {aspectRatio, imageSize}}}`; the answer is `{candidates:
//! [{content: {parts}, finishReason, safetyRatings, index}], promptFeedback?: {blockReason},
//! usageMetadata: {promptTokenCount, candidatesTokenCount, thoughtsTokenCount?,
//! totalTokenCount}, modelVersion, responseId}`; an error is `{"error": {code, message, status,
//! details}}` (`RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo` detail, `UNAUTHENTICATED`,
//! `PERMISSION_DENIED`, `INVALID_ARGUMENT`, `NOT_FOUND`, `INTERNAL`, `UNAVAILABLE`).
//!
//! `request.rs` builds the body, `response.rs` reads answers and errors, `stream.rs` turns
//! events into chunks.

mod request;
mod response;
mod stream;

use tollgate_plugin_sdk::serde_json::Value;
use tollgate_plugin_sdk::*;

struct Gemini;

/// Models known without asking the upstream: id, whether it answers with images, context
/// window, most output tokens, input and output prices in pico-dollars per token (=
/// micro-dollars per million tokens, so "$0.30 / 1M tokens" is 300_000), and the price of one
/// output image.
///
/// Prices: Google's "Gemini Developer API pricing" page, paid tier, standard (not batch) rates,
/// <https://ai.google.dev/gemini-api/docs/pricing>; the Pro models' rates for prompts up to 200k
/// tokens (longer prompts cost more upstream). Limits: the models page,
/// <https://ai.google.dev/gemini-api/docs/models>.
///
/// Image models: Google bills image output by tokens ($30 / 1M for gemini-2.5-flash-image, 1290
/// tokens an image up to 1024x1024, "$0.039 per image"; $120 / 1M for
/// gemini-3-pro-image-preview, "$0.134 per 1K/2K image", $0.24 per 4K image). The gateway
/// charges the tokens `usageMetadata` reports, at the image-output rate for all output (text
/// output is cheaper upstream: $2.50 and $12 / 1M). The per-image price is 0: the gateway
/// charges a chat answer's images at the per-image price, and here the image tokens already
/// pay for them.
#[rustfmt::skip]
const MODELS: &[(&str, bool, u32, u32, u64, u64, u64)] = &[
    ("gemini-2.5-pro",             false, 1_048_576, 65_536, 1_250_000,  10_000_000,               0),
    ("gemini-2.5-flash",           false, 1_048_576, 65_536,   300_000,   2_500_000,               0),
    ("gemini-2.5-flash-lite",      false, 1_048_576, 65_536,   100_000,     400_000,               0),
    ("gemini-3-pro-preview",       false, 1_048_576, 65_536, 2_000_000,  12_000_000,               0),
    ("gemini-2.5-flash-image",     true,     32_768, 32_768,   300_000,  30_000_000,               0),
    ("gemini-3-pro-image-preview", true,     65_536, 32_768, 2_000_000, 120_000_000,               0),
];

type Known = (&'static str, bool, u32, u32, u64, u64, u64);

fn model_info(&(id, image, context, max_out, input, output, per_image): &Known) -> ModelInfo {
    let mut kinds = vec!["chat".to_string()];
    if image {
        kinds.push("image".into());
    }
    ModelInfo {
        id: id.into(),
        kinds,
        context_window: Some(context),
        max_output_tokens: Some(max_out),
        price: Some(ModelPrice {
            input_per_token: input,
            output_per_token: output,
            per_image,
            per_second: 0,
            per_request: 0,
        }),
    }
}

/// The model id as it goes into the path (a `models/` prefix, as Google's own ids carry in
/// listings, dropped).
fn model_id(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

/// Whether the model answers with images: the manifest says so (its kinds include "image"),
/// or, for a model the manifest does not know, its id names an image model the way Google
/// names them (`gemini-2.5-flash-image`, `gemini-3-pro-image-preview`).
fn is_image_model(model: &str) -> bool {
    let id = model_id(model);
    match MODELS.iter().find(|m| m.0 == id) {
        Some(m) => m.1,
        None => id.starts_with("gemini-") && (id.ends_with("-image") || id.contains("-image-")),
    }
}

/// A model id safe in the path: letters, digits, `.`, `-`, `_`.
fn checked_model(model: &str) -> Result<&str, PluginError> {
    let id = model_id(model);
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(invalid_request(format!(
            "`{id}` is not a Gemini model id this provider can call"
        )));
    }
    Ok(id)
}

impl Provider for Gemini {
    fn describe() -> Manifest {
        Manifest {
            name: "gemini".into(),
            version: "0.1.0".into(),
            kinds: vec!["chat".into()],
            auth: AuthScheme::CustomHeader("x-goog-api-key".into()),
            models: MODELS.iter().map(model_info).collect(),
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
                "the gemini provider does not do `{kind}`; ask image models through chat completions"
            )));
        }
        let model = checked_model(&ctx.model)?;
        let req: Value = parse_request(&request)?;
        let body = request::build(&req, is_image_model(model))?;
        let stream = openai::wants_stream(&req);
        stream::reset();
        let path = if stream {
            format!("/models/{model}:streamGenerateContent?alt=sse")
        } else {
            format!("/models/{model}:generateContent")
        };
        Ok(Outbound::Send(json_request("POST", &path, &body, stream)))
    }

    fn parse_response(
        ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(response::http_error(&response));
        }
        let v: Value = parse_upstream(&response.body)?;
        if let Some(err) = v.get("error") {
            return Err(response::error_body(Some(err), None));
        }
        let created = date_header_secs(&response.headers);
        Ok(response::completion(&v, model_id(&ctx.model), created)?.to_string())
    }

    fn parse_stream_event(
        ctx: ChannelContext,
        event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        stream::translate(model_id(&ctx.model), &event)
    }

    fn build_models_request(_ctx: ChannelContext) -> Option<HttpRequest> {
        Some(get_request("/models?pageSize=1000"))
    }

    fn parse_models_response(
        _ctx: ChannelContext,
        response: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(response::http_error(&response));
        }
        let v: Value = parse_upstream(&response.body)?;
        let list = v
            .get("models")
            .and_then(Value::as_array)
            .ok_or_else(|| upstream_error("malformed model list: no `models`"))?;
        Ok(list
            .iter()
            .filter(|m| {
                m.get("supportedGenerationMethods")
                    .and_then(Value::as_array)
                    .is_some_and(|ms| ms.iter().any(|x| x == "generateContent"))
            })
            .filter_map(|m| {
                let id = model_id(m.get("name").and_then(Value::as_str)?);
                if let Some(known) = MODELS.iter().find(|k| k.0 == id) {
                    return Some(model_info(known));
                }
                let limit = |key: &str| {
                    m.get(key)
                        .and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                };
                let mut kinds = vec!["chat".to_string()];
                if is_image_model(id) {
                    kinds.push("image".into());
                }
                Some(ModelInfo {
                    id: id.into(),
                    kinds,
                    context_window: limit("inputTokenLimit"),
                    max_output_tokens: limit("outputTokenLimit"),
                    price: None,
                })
            })
            .collect())
    }
}

tollgate_plugin_sdk::export_provider!(Gemini);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::serde_json::{self, json};

    fn ctx(model: &str) -> ChannelContext {
        ChannelContext {
            channel: "gemini".into(),
            base_url: "https://generativelanguage.googleapis.com/v1beta".into(),
            model: model.into(),
            options: vec![],
        }
    }

    fn built(model: &str, req: Value) -> HttpRequest {
        match Gemini::build_request(ctx(model), "chat".into(), req.to_string()).unwrap() {
            Outbound::Send(out) => out,
            Outbound::Answer(_) => panic!("expected a request to send"),
        }
    }

    #[test]
    fn the_manifest_declares_the_key_header_and_priced_models() {
        let m = Gemini::describe();
        assert_eq!(m.name, "gemini");
        assert_eq!(m.kinds, ["chat"]);
        assert!(matches!(&m.auth, AuthScheme::CustomHeader(h) if h == "x-goog-api-key"));
        assert!(m.models.iter().all(|m| m.price.is_some()));
        let flash = m
            .models
            .iter()
            .find(|m| m.id == "gemini-2.5-flash")
            .unwrap();
        assert_eq!(flash.kinds, ["chat"]);
        let p = flash.price.unwrap();
        assert_eq!(
            (p.input_per_token, p.output_per_token),
            (300_000, 2_500_000)
        );
        let pro_image = m
            .models
            .iter()
            .find(|m| m.id == "gemini-3-pro-image-preview")
            .unwrap();
        assert_eq!(pro_image.kinds, ["chat", "image"]);
        assert_eq!(
            pro_image.price.unwrap().per_image,
            0,
            "image tokens pay for images"
        );
    }

    #[test]
    fn requests_go_to_the_models_path_without_the_key() {
        let req = json!({"model": "public", "messages": [{"role": "user", "content": "hi"}]});
        let out = built("gemini-2.5-flash", req.clone());
        assert_eq!(
            (out.method.as_str(), out.path.as_str(), out.stream),
            ("POST", "/models/gemini-2.5-flash:generateContent", false)
        );
        assert!(header_value(&out.headers, "x-goog-api-key").is_none());
        let body: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(
            body,
            json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        );
        let mut streamed = req.clone();
        streamed["stream"] = json!(true);
        let out = built("models/gemini-2.5-pro", streamed);
        assert_eq!(
            out.path,
            "/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
        );
        assert!(out.stream);
        assert_eq!(
            header_value(&out.headers, "accept"),
            Some("text/event-stream")
        );
        for bad in ["../secrets", "gemini pro", "a/b", ""] {
            let Err(e) = Gemini::build_request(ctx(bad), "chat".into(), req.to_string()) else {
                panic!("`{bad}` went into a path");
            };
            assert_eq!(e.class, ErrorClass::InvalidRequest);
        }
        let Err(e) =
            Gemini::build_request(ctx("gemini-2.5-flash"), "image".into(), req.to_string())
        else {
            panic!("only chat is translated");
        };
        assert_eq!(e.class, ErrorClass::InvalidRequest);
    }

    #[test]
    fn image_models_are_known_by_manifest_or_name() {
        assert!(is_image_model("gemini-2.5-flash-image"));
        assert!(is_image_model("models/gemini-3-pro-image-preview"));
        assert!(is_image_model("gemini-3.1-flash-image-preview"));
        assert!(!is_image_model("gemini-2.5-flash"));
        let out = built(
            "gemini-3-pro-image-preview",
            json!({"messages": [{"role": "user", "content": "A banana"}],
                   "extra_body": {"google": {"image_config": {"aspect_ratio": "9:16", "image_size": "2K"}}}}),
        );
        let body: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"responseModalities": ["TEXT", "IMAGE"],
                   "imageConfig": {"aspectRatio": "9:16", "imageSize": "2K"}})
        );
    }

    #[test]
    fn a_whole_answer_and_a_failure_parse() {
        let ok = HttpResponse {
            status: 200,
            headers: vec![header("date", "Thu, 29 Feb 2024 00:00:00 GMT")],
            body: json!({"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"},
                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1, "totalTokenCount": 5}})
            .to_string()
            .into_bytes(),
        };
        let text = Gemini::parse_response(ctx("gemini-2.5-flash"), "chat".into(), ok).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["created"], 1_709_164_800);
        assert_eq!(v["model"], "gemini-2.5-flash");
        assert_eq!(v["usage"]["total_tokens"], 5);
        let failed = HttpResponse {
            status: 403,
            headers: vec![],
            body: br#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers","status":"PERMISSION_DENIED"}}"#.to_vec(),
        };
        let e = Gemini::parse_response(ctx("m"), "chat".into(), failed).unwrap_err();
        assert_eq!(e.class, ErrorClass::Auth);
    }

    #[test]
    fn the_model_list_keeps_generate_content_models() {
        let body = json!({"models": [
            {"name": "models/gemini-2.5-flash", "supportedGenerationMethods": ["generateContent", "countTokens"]},
            {"name": "models/gemini-9-image", "inputTokenLimit": 1000, "outputTokenLimit": 100,
             "supportedGenerationMethods": ["generateContent"]},
            {"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]},
        ]});
        let resp = HttpResponse {
            status: 200,
            headers: vec![],
            body: body.to_string().into_bytes(),
        };
        let models = Gemini::parse_models_response(ctx("x"), resp).unwrap();
        assert_eq!(models.len(), 2);
        assert!(models[0].price.is_some());
        assert_eq!(models[1].id, "gemini-9-image");
        assert_eq!(models[1].kinds, ["chat", "image"]);
        assert_eq!(models[1].context_window, Some(1000));
        assert_eq!(
            Gemini::build_models_request(ctx("x")).unwrap().path,
            "/models?pageSize=1000"
        );
    }
}
