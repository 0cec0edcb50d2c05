//! The `elevenlabs` provider: ElevenLabs text-to-speech behind OpenAI's `/v1/audio/speech`.
//!
//! Wire format (ElevenLabs API reference, text-to-speech "convert" and "stream"): `POST
//! {base}/text-to-speech/{voice_id}/stream?output_format={codec_rate[_bitrate]}` (base
//! `https://api.elevenlabs.io/v1`), the key in the `xi-api-key` header (the host adds it), a JSON
//! body `{text, model_id, voice_settings?: {speed, ...}}`, answered by the audio bytes as they
//! are made; errors are `{"detail": {"status", "message"}}` (or FastAPI's validation list on 422).
//!
//! From OpenAI's request: `input` → `text`; the model's upstream id → `model_id`; `voice` → the
//! voice id (a name listed in the channel's `voices` option, `alloy=<id>,nova=<id>`, else the
//! voice as given, or `{"id"}`); `response_format` → `output_format` (mp3 → `mp3_44100_128`, opus
//! → `opus_48000_128`, pcm → `pcm_24000` (OpenAI's pcm: 24 kHz, 16-bit), wav → `wav_44100`; aac
//! and flac have no ElevenLabs codec and are refused); `speed` → `voice_settings.speed`;
//! `instructions` has no counterpart and is dropped.

use tollgate_plugin_sdk::serde_json::{self, Map, Value, json};
use tollgate_plugin_sdk::*;

struct ElevenLabs;

fn speech_model(id: &str) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec!["speech".into()],
        context_window: None,
        max_output_tokens: None,
        // Plans differ: the operator prices each model in config (per character).
        price: None,
    }
}

/// ElevenLabs' `output_format` for an OpenAI `response_format` (mp3 when absent).
fn output_format(format: Option<&str>) -> Result<&'static str, PluginError> {
    match format.unwrap_or("mp3") {
        "mp3" => Ok("mp3_44100_128"),
        "opus" => Ok("opus_48000_128"),
        "pcm" => Ok("pcm_24000"),
        "wav" => Ok("wav_44100"),
        other => Err(invalid_request(format!(
            "ElevenLabs cannot answer in `{other}`: ask for mp3, opus, pcm or wav"
        ))),
    }
}

/// The voice id for OpenAI's `voice`: mapped by the channel's `voices` option, else as given.
fn voice_id(ctx: &ChannelContext, voice: &Value) -> Result<String, PluginError> {
    let name = match voice {
        Value::String(s) => s.as_str(),
        Value::Object(o) => o.get("id").and_then(Value::as_str).unwrap_or(""),
        _ => "",
    };
    let mapped = option(ctx, "voices").and_then(|list| {
        list.split(',')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim())
    });
    let id = mapped.unwrap_or(name);
    // The id goes into the path: a plain id only.
    if !is_plain_id(id) {
        return Err(invalid_request(
            "`voice` must be an ElevenLabs voice id (letters, digits, `-`, `_`) or a name the channel maps",
        ));
    }
    Ok(id.to_string())
}

/// An ElevenLabs error: `{"detail": {"status", "message"}}`, else the SDK's reading (FastAPI's
/// validation list, OpenAI's shape). 429 → rate-limited (with retry hints), 401/403 → auth (an
/// operator problem: a bad key or spent quota), 400/422 → invalid, 404 → not found (voice or
/// model), 5xx → upstream.
fn error_of(resp: &HttpResponse) -> PluginError {
    let mut err = error_from_status(resp);
    let parsed: Option<Value> = serde_json::from_slice(&resp.body).ok();
    if let Some(detail) = parsed
        .as_ref()
        .and_then(|v| v.get("detail"))
        .and_then(Value::as_object)
    {
        let status = detail.get("status").and_then(Value::as_str).unwrap_or("");
        if let Some(m) = detail.get("message").and_then(Value::as_str) {
            err.message = if status.is_empty() {
                m.to_string()
            } else {
                format!("{status}: {m}")
            };
        }
    }
    err
}

impl Provider for ElevenLabs {
    fn describe() -> Manifest {
        Manifest {
            name: "elevenlabs".into(),
            version: "0.1.0".into(),
            kinds: vec!["speech".into()],
            auth: AuthScheme::CustomHeader("xi-api-key".into()),
            models: vec![
                speech_model("eleven_multilingual_v2"),
                speech_model("eleven_flash_v2_5"),
                speech_model("eleven_turbo_v2_5"),
            ],
            config_keys: vec!["voices".into()],
        }
    }

    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        if kind != "speech" {
            return Err(invalid_request(format!(
                "the elevenlabs plugin does only `speech`, not `{kind}`"
            )));
        }
        let req: Map<String, Value> = parse_request(&request)?;
        let text = req
            .get("input")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_request("`input` is required"))?;
        let voice = voice_id(&ctx, req.get("voice").unwrap_or(&Value::Null))?;
        let format = output_format(req.get("response_format").and_then(Value::as_str))?;
        let mut body = json!({"text": text, "model_id": ctx.model});
        if let Some(speed) = req.get("speed").and_then(Value::as_f64) {
            body["voice_settings"] = json!({"speed": speed});
        }
        let mut out = json_request(
            "POST",
            &format!("/text-to-speech/{voice}/stream?output_format={format}"),
            &body,
            false,
        );
        out.headers
            .retain(|h| !h.name.eq_ignore_ascii_case("accept"));
        out.headers
            .push(header("accept", "audio/*, application/json"));
        Ok(Outbound::Send(out))
    }

    fn parse_response(
        _ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(error_of(&response));
        }
        Err(upstream_error(
            "a speech answer is binary: the host passes it through",
        ))
    }

    fn parse_stream_event(
        _ctx: ChannelContext,
        _event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        Err(upstream_error(
            "ElevenLabs speech is not a server-sent event stream",
        ))
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

tollgate_plugin_sdk::export_provider!(ElevenLabs);

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ChannelContext {
        ChannelContext {
            channel: "el".into(),
            base_url: "https://api.elevenlabs.io/v1".into(),
            model: "eleven_multilingual_v2".into(),
            options: vec![("voices".into(), "alloy=JBFqnCBsd6RMkjVDRZzb".into())],
        }
    }

    fn built(req: Value) -> Result<HttpRequest, PluginError> {
        match ElevenLabs::build_request(ctx(), "speech".into(), req.to_string())? {
            Outbound::Send(r) => Ok(r),
            Outbound::Answer(_) => panic!("never answers itself"),
        }
    }

    #[test]
    fn openai_speech_becomes_elevenlabs_tts() {
        let r = built(json!({"model": "x", "input": "Hello", "voice": "alloy", "response_format": "pcm", "speed": 1.1})).unwrap();
        assert_eq!(
            r.path,
            "/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream?output_format=pcm_24000"
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["text"], "Hello");
        assert_eq!(body["model_id"], "eleven_multilingual_v2");
        assert_eq!(body["voice_settings"]["speed"], 1.1);
        let r = built(json!({"input": "Hi", "voice": {"id": "abc123"}})).unwrap();
        assert_eq!(
            r.path,
            "/text-to-speech/abc123/stream?output_format=mp3_44100_128"
        );
        for bad in [
            json!({"input": "Hi", "voice": "../x"}),
            json!({"input": "Hi", "voice": "alloy", "response_format": "flac"}),
            json!({"voice": "alloy"}),
        ] {
            assert_eq!(built(bad).unwrap_err().class, ErrorClass::InvalidRequest);
        }
    }

    #[test]
    fn errors_map_to_classes_with_their_message() {
        let resp = |status: u16, body: &str| HttpResponse {
            status,
            headers: vec![header("retry-after", "2")],
            body: body.as_bytes().to_vec(),
        };
        let e = error_of(&resp(
            429,
            r#"{"detail":{"status":"too_many_concurrent_requests","message":"slow down"}}"#,
        ));
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(e.retry_after_ms, Some(2000));
        assert_eq!(e.message, "too_many_concurrent_requests: slow down");
        let e = error_of(&resp(
            401,
            r#"{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}"#,
        ));
        assert_eq!(e.class, ErrorClass::Auth);
        let e = error_of(&resp(
            422,
            r#"{"detail":[{"loc":["body","text"],"msg":"Field required","type":"missing"}]}"#,
        ));
        assert_eq!(e.class, ErrorClass::InvalidRequest);
        assert_eq!(e.message, "body.text: Field required");
        assert_eq!(error_of(&resp(400, "{}")).class, ErrorClass::InvalidRequest);
        assert_eq!(error_of(&resp(500, "oops")).class, ErrorClass::Upstream);
    }
}
