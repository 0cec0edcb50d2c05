//! Media in a chat answer: an image-output model (Gemini's image models, which resellers sell as
//! "Nano-Banana") answers with its pictures inline, as `data:` URLs in
//! `choices[].message.images[].image_url.url`. Before the answer leaves, each is archived into
//! the gateway's object storage (the same checks as task outputs: a known image format, the
//! size bound) and replaced by a signed download link, and the images are billed at the model's
//! per-image price.

use serde_json::Value;

use crate::app::AppState;
use crate::error::ApiError;
use crate::plugins::JobOutput;

/// Archive the inline images of a chat answer and put links in their place; how many.
pub async fn archive_chat_images(
    st: &AppState,
    request_id: &str,
    value: &mut Value,
) -> Result<u64, ApiError> {
    let Some(choices) = value.get_mut("choices").and_then(Value::as_array_mut) else {
        return Ok(0);
    };
    let mut n = 0u64;
    for (c, choice) in choices.iter_mut().enumerate() {
        let Some(images) = choice
            .pointer_mut("/message/images")
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
            let archived = st
                .tasks
                .archive
                .copy(&out, &format!("chat/{request_id}/{c}-{i}"))
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "an image of a chat answer could not be archived");
                    ApiError::Internal(format!("archiving an image of the answer: {e}"))
                })?;
            *url = Value::String(st.tasks.archive.signed_url(&archived.key));
            n += 1;
        }
    }
    Ok(n)
}
