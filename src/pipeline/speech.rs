//! `POST /v1/audio/speech` (OpenAI's shape): a string `model`, the `input` text (1 to 4,096
//! characters), a `voice` (a name, or `{"id": ...}`), and the optional `response_format`
//! (`mp3`, `opus`, `aac`, `flac`, `wav`, `pcm`), `speed` (0.25 to 4.0), `instructions` and
//! `stream_format` (`audio` only). Screened on `input` and `instructions`.
//!
//! The answer is binary, so it does not fit the plugin's `parse-response` (which returns text):
//! the plugin builds the upstream request (or answers offline), and a 2xx body is passed to the
//! client as it arrives ([`dispatch::dispatch_audio`]), with the upstream's `audio/*` content
//! type or else the one of the asked format. Only a failed status goes through the plugin, which
//! maps it to an error class (OpenAI's error body, as on every route).
//!
//! Money: the usage is known from the request, so the reservation is the charge. Characters of
//! `input` count as prompt tokens (a model's `input_per_token` is its price per character), and
//! the audio's length is estimated from the text for `per_second` prices ([`CHARS_PER_SECOND`]
//! at speed 1.0, divided by `speed`, rounded up). The charge is settled once the whole body has
//! passed; a body that breaks off is not charged.

use std::io;

use futures::StreamExt;
use serde_json::Value;

use crate::app::AppState;
use crate::auth::Caller;
use crate::billing::Usage;
use crate::error::ApiError;

use super::dispatch::{self, ByteStream};
use super::money::Bill;
use super::{BinaryStream, Body, Call, Need, Reply, Served};

pub const ROUTE: &str = "/v1/audio/speech";

/// OpenAI's bound on `input` (and on `instructions`), in characters.
const MAX_INPUT_CHARS: usize = 4096;
/// Speech at speed 1.0 runs at about 15 characters a second (150 words a minute).
pub const CHARS_PER_SECOND: u64 = 15;
/// The formats OpenAI's speech endpoint answers in, and their media types.
const FORMATS: &[(&str, &str)] = &[
    ("mp3", "audio/mpeg"),
    ("opus", "audio/opus"),
    ("aac", "audio/aac"),
    ("flac", "audio/flac"),
    ("wav", "audio/wav"),
    ("pcm", "audio/pcm"),
];

fn invalid(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// A non-empty string of at most [`MAX_INPUT_CHARS`] characters, if present.
fn text(body: &Body, name: &'static str, required: bool) -> Result<Option<u64>, ApiError> {
    match body.field(name) {
        None if required => Err(invalid(
            format!("missing required parameter: `{name}`"),
            name,
        )),
        None => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() || !required => {
            let chars = s.chars().count();
            if chars > MAX_INPUT_CHARS {
                return Err(invalid(
                    format!("`{name}` may hold at most {MAX_INPUT_CHARS} characters"),
                    name,
                ));
            }
            Ok(Some(chars as u64))
        }
        Some(_) => Err(invalid(
            format!("`{name}` must be a non-empty string"),
            name,
        )),
    }
}

/// `speed` in hundredths (25 to 400); 100 when absent.
fn speed_centis(body: &Body) -> Result<u64, ApiError> {
    match body.field("speed") {
        None => Ok(100),
        Some(v) => v
            .as_f64()
            .filter(|s| (0.25..=4.0).contains(s))
            .map(|s| (s * 100.0).round() as u64)
            .ok_or_else(|| invalid("`speed` must be a number from 0.25 to 4.0", "speed")),
    }
}

/// The estimated length of the audio for `chars` characters at `speed` (in hundredths), in whole
/// seconds, at least one.
pub fn seconds_for(chars: u64, speed_centis: u64) -> u64 {
    let per_second = CHARS_PER_SECOND.saturating_mul(speed_centis.max(1));
    chars.saturating_mul(100).div_ceil(per_second).max(1)
}

/// The media type of a `response_format` (mp3 when absent).
fn media_type(format: Option<&str>) -> &'static str {
    let f = format.unwrap_or("mp3");
    FORMATS
        .iter()
        .find(|(name, _)| *name == f)
        .map_or("application/octet-stream", |(_, t)| t)
}

/// Validate a speech request.
pub fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
    let model = body.model()?;
    let chars = text(&body, "input", true)?.unwrap_or(0);
    match body.field("voice") {
        Some(Value::String(v)) if !v.trim().is_empty() => {}
        Some(Value::Object(o))
            if o.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| !id.is_empty()) => {}
        None => return Err(invalid("missing required parameter: `voice`", "voice")),
        Some(_) => {
            return Err(invalid(
                "`voice` must be a voice name or an object with a string `id`",
                "voice",
            ));
        }
    }
    match body.field("response_format") {
        None => {}
        Some(Value::String(f)) if FORMATS.iter().any(|(name, _)| name == f) => {}
        Some(_) => {
            return Err(invalid(
                "`response_format` must be one of: mp3, opus, aac, flac, wav, pcm",
                "response_format",
            ));
        }
    }
    match body.field("stream_format") {
        None => {}
        Some(Value::String(f)) if f == "audio" => {}
        Some(_) => {
            return Err(invalid(
                "`stream_format` must be `audio` here (the audio is streamed as it is made)",
                "stream_format",
            ));
        }
    }
    text(&body, "instructions", false)?;
    let speed = speed_centis(&body)?;
    let need = Need {
        prompt_tokens: chars,
        max_output_tokens: None,
        output: false,
        outputs: 1,
        images: 0,
        seconds: seconds_for(chars, speed),
    };
    Ok(Call {
        route: ROUTE,
        kind: "speech",
        model,
        stream: false,
        body,
        need,
        // Speech is priced per character of `input` (the input price), not per token.
        prompt: |_, body| {
            body.get("input")
                .and_then(Value::as_str)
                .map_or(0, |s| s.chars().count() as u64)
        },
        request_id,
    })
}

#[tracing::instrument(name = "pipeline.speech", level = "debug", skip_all, fields(model = %call.model))]
pub async fn run(st: &AppState, caller: Option<Caller>, call: Call) -> Result<Served, ApiError> {
    let asked = media_type(call.body.field("response_format").and_then(Value::as_str));
    let admitted = super::admission::admit(st, caller, call).await?;
    let screened = super::screen::screen(st, admitted).await?;
    let reserved = super::money::reserve(st, screened).await?;
    let d = dispatch::dispatch_audio(st, reserved).await?;
    let content_type = d
        .audio
        .content_type
        .filter(|t| t.starts_with("audio/"))
        .unwrap_or_else(|| asked.to_string());
    // The usage is the estimate's (characters and seconds from the request): so is the cost.
    let cost = d.bill.hold.as_ref().map(|_| d.bill.estimate.cost);
    Ok(Served {
        reply: Reply::Binary {
            content_type,
            body: pass(d.audio.body, d.bill),
            cost,
        },
        provider: d.provider,
    })
}

/// What the body pass-through holds between chunks.
struct Passing {
    body: ByteStream,
    /// Settled when the body ended whole; released (or dropped: released) otherwise.
    bill: Option<Bill>,
    bytes: u64,
    done: bool,
}

/// Pass the body through as it arrives; settle when it ended whole (and was not empty), release
/// and cut the response off when the upstream failed mid-body.
fn pass(body: ByteStream, bill: Bill) -> BinaryStream {
    let state = Passing {
        body,
        bill: Some(bill),
        bytes: 0,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        match st.body.next().await {
            Some(Ok(chunk)) => {
                st.bytes += chunk.len() as u64;
                Some((Ok(chunk), st))
            }
            Some(Err(e)) => {
                st.done = true;
                tracing::warn!(error = %e, "speech body broke off; nothing charged");
                if let Some(bill) = st.bill.take() {
                    bill.release().await;
                }
                Some((Err(io::Error::other("upstream failed mid-body")), st))
            }
            None => {
                if let Some(bill) = st.bill.take() {
                    if st.bytes == 0 {
                        tracing::warn!("speech body was empty; nothing charged");
                        bill.release().await;
                    } else {
                        let usage: Usage = bill.estimate.usage;
                        if let Err(e) = bill.settle(usage).await {
                            tracing::error!(error = %e, "settling a speech answer failed");
                        }
                    }
                }
                None
            }
        }
    }))
}

/// The route, for the server.
pub struct Speech;

impl super::Route for Speech {
    const PATH: &'static str = ROUTE;

    fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
        parse(body, request_id)
    }

    fn run(
        st: &AppState,
        caller: Option<Caller>,
        call: Call,
    ) -> impl std::future::Future<Output = Result<Served, ApiError>> + Send {
        run(st, caller, call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(v: Value) -> Result<Call, ApiError> {
        parse(Body::parse(v.to_string().into()).unwrap(), "r".into())
    }

    #[test]
    fn documented_requests_pass_and_others_fail() {
        let ok = call(json!({"model": "tts-1", "input": "héllo", "voice": "alloy"})).unwrap();
        assert_eq!(ok.kind, "speech");
        assert_eq!(ok.need.prompt_tokens, 5, "characters, not bytes");
        assert_eq!(ok.need.seconds, 1);
        assert!(
            call(json!({"model": "m", "input": "x", "voice": {"id": "v1"}, "response_format": "wav", "speed": 0.25, "instructions": "calm"}))
                .is_ok()
        );
        for bad in [
            json!({"model": "m", "voice": "alloy"}),
            json!({"model": "m", "input": "", "voice": "alloy"}),
            json!({"model": "m", "input": "x".repeat(4097), "voice": "alloy"}),
            json!({"model": "m", "input": "x"}),
            json!({"model": "m", "input": "x", "voice": 3}),
            json!({"model": "m", "input": "x", "voice": "a", "response_format": "ogg"}),
            json!({"model": "m", "input": "x", "voice": "a", "speed": 4.5}),
            json!({"model": "m", "input": "x", "voice": "a", "speed": "fast"}),
            json!({"model": "m", "input": "x", "voice": "a", "stream_format": "sse"}),
        ] {
            assert!(call(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds_follow_length_and_speed() {
        assert_eq!(seconds_for(150, 100), 10);
        assert_eq!(seconds_for(150, 200), 5);
        assert_eq!(seconds_for(150, 25), 40);
        assert_eq!(seconds_for(1, 400), 1);
        assert_eq!(media_type(None), "audio/mpeg");
        assert_eq!(media_type(Some("pcm")), "audio/pcm");
    }
}
