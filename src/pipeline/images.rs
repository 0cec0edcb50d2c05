//! `POST /v1/images/generations` (OpenAI's shape): a non-empty string `prompt`, a string `model`,
//! `n` images (1 to 10), and the optional `size`, `quality`, `response_format` (`url` or
//! `b64_json`), `style`, `background`, `output_format`. Screened on `prompt`; every image is
//! reserved at the model's per-image price (and the prompt at its input price); billed on the
//! images the answer holds and any token usage it reports.

use serde_json::Value;

use crate::app::AppState;
use crate::auth::Caller;
use crate::billing::Usage;
use crate::error::ApiError;

use super::dispatch::{self, Expect};
use super::{Body, Call, Need, Served};

pub const ROUTE: &str = "/v1/images/generations";

/// OpenAI's bounds: at most 10 images a request, prompts up to 32,000 characters.
const MAX_IMAGES: u64 = 10;
const MAX_PROMPT_CHARS: usize = 32_000;

/// The answer must be a list of images.
const IMAGES: Expect = Expect {
    what: "an images response with `data`",
    check: |v| v.get("data").is_some_and(Value::is_array),
};

/// An optional string field whose value is one of `allowed`.
fn one_of(body: &Body, name: &'static str, allowed: &[&str]) -> Result<(), ApiError> {
    match body.field(name) {
        None => Ok(()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        Some(_) => Err(ApiError::invalid(
            format!("`{name}` must be one of: {}", allowed.join(", ")),
            Some(name),
        )),
    }
}

/// Validate an image generation request.
pub fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
    let model = body.model()?;
    match body.field("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => {
            if p.chars().count() > MAX_PROMPT_CHARS {
                return Err(ApiError::invalid(
                    format!("`prompt` may hold at most {MAX_PROMPT_CHARS} characters"),
                    Some("prompt"),
                ));
            }
        }
        None => {
            return Err(ApiError::invalid(
                "missing required parameter: `prompt`",
                Some("prompt"),
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "`prompt` must be a non-empty string",
                Some("prompt"),
            ));
        }
    }
    let images = body.positive("n")?.unwrap_or(1);
    if images > MAX_IMAGES {
        return Err(ApiError::invalid(
            format!("`n` must be between 1 and {MAX_IMAGES}"),
            Some("n"),
        ));
    }
    one_of(
        &body,
        "size",
        &[
            "auto",
            "256x256",
            "512x512",
            "1024x1024",
            "1536x1024",
            "1024x1536",
            "1792x1024",
            "1024x1792",
        ],
    )?;
    one_of(&body, "response_format", &["url", "b64_json"])?;
    one_of(
        &body,
        "quality",
        &["auto", "standard", "hd", "low", "medium", "high"],
    )?;
    one_of(&body, "style", &["vivid", "natural"])?;
    one_of(&body, "background", &["auto", "transparent", "opaque"])?;
    one_of(&body, "output_format", &["png", "jpeg", "webp"])?;
    if body.flag("stream")? {
        return Err(ApiError::invalid(
            "image generations are not streamed here",
            Some("stream"),
        ));
    }
    let need = Need {
        prompt_tokens: 0,
        max_output_tokens: None,
        output: false,
        outputs: 1,
        images,
    };
    Ok(Call {
        route: ROUTE,
        kind: "image",
        model,
        stream: false,
        body,
        need,
        prompt: super::tokens::images,
        request_id,
    })
}

/// What an images answer used: its images, and the tokens it reports (models priced per token
/// report `usage.input_tokens` and `usage.output_tokens`).
fn usage_of(v: &Value) -> Usage {
    let images = v
        .get("data")
        .and_then(Value::as_array)
        .map_or(0, |d| d.len() as u64);
    let tokens = |k: &str| {
        v.pointer(&format!("/usage/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Usage {
        prompt_tokens: tokens("input_tokens"),
        completion_tokens: tokens("output_tokens"),
        images,
        ..Usage::default()
    }
}

#[tracing::instrument(name = "pipeline.images", level = "debug", skip_all, fields(model = %call.model))]
pub async fn run(st: &AppState, caller: Option<Caller>, call: Call) -> Result<Served, ApiError> {
    dispatch::whole_json(st, caller, call, &IMAGES, |v, _| usage_of(v)).await
}

/// The route, for the server.
pub struct Images;

impl super::Route for Images {
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

    #[test]
    fn images_and_reported_tokens_are_the_usage() {
        let u = usage_of(&json!({"data": [{"url": "a"}, {"url": "b"}]}));
        assert_eq!((u.images, u.prompt_tokens), (2, 0));
        let u = usage_of(
            &json!({"data": [{"b64_json": "x"}], "usage": {"input_tokens": 12, "output_tokens": 4160}}),
        );
        assert_eq!(
            (u.images, u.prompt_tokens, u.completion_tokens),
            (1, 12, 4160)
        );
    }
}
