//! Media in a chat answer: an image-output model (Gemini's image models, which resellers sell as
//! "Nano-Banana") answers with its pictures inline, as `data:` URLs in
//! `choices[].message.images[].image_url.url`. Before the answer leaves, each is archived into
//! the gateway's object storage (the same checks as task outputs: a known image format, the
//! size bound) and replaced by a signed download link, and the images are billed at the model's
//! per-image price. A stream's chunks carry them in `choices[].delta.images` and are treated the
//! same way, chunk by chunk ([`archive_chunk_images`]).

use serde_json::Value;

use crate::app::AppState;
use crate::error::ApiError;
use crate::plugins::JobOutput;
use crate::tasks::Archive;

/// Archive the inline images of a chat answer and put links in their place; how many.
pub async fn archive_chat_images(
    st: &AppState,
    request_id: &str,
    value: &mut Value,
) -> Result<u64, ApiError> {
    archive_images(&st.tasks.archive, request_id, "message", value, 0).await
}

/// The same for one chunk of a stream (`delta.images`); `seq` numbers the chunk so that every
/// image of the stream gets its own key.
pub async fn archive_chunk_images(
    archive: &Archive,
    request_id: &str,
    value: &mut Value,
    seq: u64,
) -> Result<u64, ApiError> {
    archive_images(archive, request_id, "delta", value, seq).await
}

async fn archive_images(
    archive: &Archive,
    request_id: &str,
    part: &str,
    value: &mut Value,
    seq: u64,
) -> Result<u64, ApiError> {
    let Some(choices) = value.get_mut("choices").and_then(Value::as_array_mut) else {
        return Ok(0);
    };
    let mut n = 0u64;
    for (c, choice) in choices.iter_mut().enumerate() {
        let Some(images) = choice
            .get_mut(part)
            .and_then(|m| m.get_mut("images"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for (i, image) in images.iter_mut().enumerate() {
            let Some(url) = image.pointer_mut("/image_url/url") else {
                continue;
            };
            let Some(text) = url.as_str().filter(|u| u.starts_with("data:")) else {
                continue;
            };
            let out = JobOutput {
                url: text.to_string(),
                content_type: None,
            };
            let archived = archive
                .copy(&out, &format!("chat/{request_id}/{seq}-{c}-{i}"))
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "an image of a chat answer could not be archived");
                    ApiError::Internal(format!("archiving an image of the answer: {e}"))
                })?;
            *url = Value::String(archive.signed_url(&archived.key));
            n += 1;
        }
    }
    Ok(n)
}
