//! `POST /v1/images/generations` (OpenAI's shape): a non-empty string `prompt`, a string `model`,
//! `n` images (1 to 10), and the optional `size`, `quality`, `response_format` (`url` or
//! `b64_json`), `style`, `background`, `output_format`. Screened on `prompt`; every image is
//! reserved at the model's per-image price (and the prompt at its input price); billed on the
//! images the answer holds and any token usage it reports.

use serde_json::{Value, json};

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
pub const IMAGES: Expect = Expect {
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
        seconds: 0,
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
    let admitted = super::admission::admit(st, caller, call).await?;
    let plugin = &admitted.pick.plugin;
    // A provider that translates image requests answers at once; one that only runs jobs (the
    // task API) is driven to the end inside this call.
    if plugin.manifest.kinds.iter().any(|k| k == "image") || !plugin.has_tasks() {
        return dispatch::whole_json_admitted(st, admitted, &IMAGES, |v, _| usage_of(v)).await;
    }
    via_task(st, admitted).await
}

/// OpenAI sizes as the aspect ratios job APIs take.
fn aspect_ratio(size: &str) -> Option<&'static str> {
    Some(match size {
        "256x256" | "512x512" | "1024x1024" => "1:1",
        "1536x1024" => "3:2",
        "1024x1536" => "2:3",
        "1792x1024" => "16:9",
        "1024x1792" => "9:16",
        _ => return None,
    })
}

/// An image request as a task: its input from the OpenAI fields (prompt, `n` as
/// `num_outputs`, `size` as `aspect_ratio`), submitted, waited for within the request's time
/// (then cancelled: nothing is charged), answered in OpenAI's shape with links to the archived
/// images (or their bytes, for `response_format: b64_json`) and what it cost.
async fn via_task(st: &AppState, admitted: super::admission::Admitted) -> Result<Served, ApiError> {
    let body = &admitted.call.body;
    let mut input = serde_json::Map::new();
    if let Some(p) = body.field("prompt") {
        input.insert("prompt".into(), p.clone());
    }
    let n = admitted.call.need.images;
    if n > 1 {
        input.insert("num_outputs".into(), Value::from(n));
    }
    if let Some(r) = body
        .field("size")
        .and_then(Value::as_str)
        .and_then(aspect_ratio)
    {
        input.insert("aspect_ratio".into(), Value::from(r));
    }
    let b64 = body.field("response_format").and_then(Value::as_str) == Some("b64_json");
    let model = admitted.call.model.clone();
    let kind = super::tasks::task_kind(&admitted)?;
    let input = Value::Object(input).to_string();
    let (id, provider) = super::tasks::enqueue(st, admitted, kind, input, None).await?;
    let limit = st
        .config
        .server
        .request_timeout
        .saturating_sub(std::time::Duration::from_secs(1))
        .max(std::time::Duration::from_secs(1));
    let task = st
        .tasks
        .wait_final(&id, limit)
        .await
        .map_err(|e| ApiError::Internal(format!("reading a task: {e}")))?
        .ok_or_else(|| ApiError::Internal(format!("task {id} vanished")))?;
    match task.status {
        crate::tasks::Status::Success => {}
        crate::tasks::Status::Fail => return Err(task_failure(&provider, &task)),
        _ => {
            if let Err(e) = st.tasks.store.cancel(&id).await {
                tracing::warn!(task = %id, error = %e, "cancelling a task past its call's time failed");
            }
            return Err(ApiError::RequestTimeout(limit));
        }
    }
    let outputs: Vec<crate::tasks::Archived> = task
        .outputs
        .as_deref()
        .and_then(|o| serde_json::from_str(o).ok())
        .unwrap_or_default();
    let mut data = Vec::with_capacity(outputs.len());
    for a in &outputs {
        if b64 {
            use base64::Engine as _;
            use futures::TryStreamExt as _;
            let (stream, _) = st
                .tasks
                .archive
                .open(&a.key)
                .await
                .map_err(|e| ApiError::Internal(format!("reading an archived image: {e}")))?;
            let bytes: Vec<bytes::Bytes> = stream
                .try_collect()
                .await
                .map_err(|e| ApiError::Internal(format!("reading an archived image: {e}")))?;
            let joined: Vec<u8> = bytes.concat();
            data.push(
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(joined)}),
            );
        } else {
            data.push(json!({"url": st.tasks.archive.signed_url(&a.key)}));
        }
    }
    let cost = task.cost.map(crate::billing::Credits);
    let mut value = json!({
        "created": task.finished_at.unwrap_or(task.created_at) / 1000,
        "data": data,
    });
    if let Some(c) = cost {
        super::money::add_cost(&mut value, c);
    }
    tracing::debug!(task = %id, model = %model, "image request served by a task");
    Ok(Served {
        reply: super::Reply::Json {
            body: value.to_string(),
            cost,
        },
        provider,
    })
}

/// A failed task as the error of a synchronous image request.
fn task_failure(provider: &str, task: &crate::tasks::Task) -> ApiError {
    use crate::plugins::{GuestErrorClass, PluginError};
    let code = task.error_code.as_deref().unwrap_or("provider_error");
    let class = match code {
        "content_policy_violation" => GuestErrorClass::ContentRefused,
        "invalid_input" => GuestErrorClass::InvalidRequest,
        _ => GuestErrorClass::Upstream,
    };
    ApiError::Plugin(PluginError::Guest {
        plugin: provider.to_string(),
        class,
        message: task.error_message.clone().unwrap_or_default(),
        status: None,
        retry_after_ms: None,
        from_upstream: true,
    })
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
