//! Helpers for task plugins (the `task-api`): job states, output URLs found in an upstream's
//! JSON, `data:` URLs for offline providers, and ids safe to put in a path or query.

use serde_json::Value;

use crate::{ErrorClass, JobState, TaskOutput, error, upstream_error};

/// A job that is not finished; `progress` in percent, capped at 100.
pub fn job_running(progress: Option<u8>) -> JobState {
    JobState::Running(progress.map(|p| p.min(100)))
}

/// A job that finished with these URLs (the upstream reports no media type). A job that
/// "succeeded" without any URL has nothing to deliver: that is a failure of the upstream.
pub fn job_succeeded(urls: impl IntoIterator<Item = String>) -> JobState {
    let outputs: Vec<TaskOutput> = urls
        .into_iter()
        .map(|url| TaskOutput {
            url,
            content_type: None,
        })
        .collect();
    if outputs.is_empty() {
        return job_failed(
            ErrorClass::Upstream,
            "the job succeeded without any output file",
        );
    }
    JobState::Succeeded(outputs)
}

/// A job that finished without output, for the reason `class` names.
pub fn job_failed(class: ErrorClass, message: impl Into<String>) -> JobState {
    JobState::Failed(error(class, message))
}

/// The URLs in an upstream's output value, in order: a string, a list of strings, or an object
/// whose values hold them (nested lists and objects too, a few levels deep). Only `https://`,
/// `http://` and `data:` strings count, so a model whose output mixes text and files gives its
/// files. Objects are read in key order (serde_json's map is sorted).
pub fn output_urls(value: &Value) -> Vec<String> {
    fn walk(value: &Value, depth: u8, out: &mut Vec<String>) {
        match value {
            Value::String(s) if is_url(s) => out.push(s.clone()),
            Value::Array(items) if depth > 0 => {
                items.iter().for_each(|v| walk(v, depth - 1, out));
            }
            Value::Object(map) if depth > 0 => {
                map.values().for_each(|v| walk(v, depth - 1, out));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, 4, &mut out);
    out
}

fn is_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://") || lower.starts_with("data:")
}

/// A `data:` URL carrying `bytes` (base64), for providers that make their files themselves.
pub fn data_url(content_type: &str, bytes: &[u8]) -> String {
    format!("data:{content_type};base64,{}", base64_encode(bytes))
}

/// Standard base64 with padding (RFC 4648).
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// True for an id that can go into a request path or query as it is: ASCII letters, digits,
/// `-`, `_` and `.`, not empty, not `.` or `..`, at most 256 bytes. Job ids come back from the
/// upstream, so a plugin checks them before building a poll request with one.
pub fn is_plain_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The error for a job id that [`is_plain_id`] refuses.
pub fn bad_job_id(id: &str) -> crate::PluginError {
    let shown: String = id.chars().take(40).collect();
    upstream_error(format!("unusable job id `{shown}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_come_from_a_string_a_list_or_an_object() {
        assert_eq!(
            output_urls(&json!("https://x.test/a.png")),
            ["https://x.test/a.png"]
        );
        assert_eq!(
            output_urls(&json!(["https://x.test/0.webp", "https://x.test/1.webp"])),
            ["https://x.test/0.webp", "https://x.test/1.webp"]
        );
        assert_eq!(
            output_urls(&json!({"video": "https://x.test/v.mp4", "seed": 3, "note": "hi"})),
            ["https://x.test/v.mp4"]
        );
        assert!(output_urls(&json!(["hello", " world"])).is_empty());
        assert!(output_urls(&Value::Null).is_empty());
        assert_eq!(output_urls(&json!("HTTPS://X.TEST/A")).len(), 1);
    }

    #[test]
    fn a_success_without_urls_is_a_failure() {
        assert!(matches!(
            job_succeeded(Vec::new()),
            JobState::Failed(e) if e.class == ErrorClass::Upstream
        ));
        let JobState::Succeeded(outs) = job_succeeded(vec!["https://x.test/a".into()]) else {
            panic!("expected success");
        };
        assert_eq!(outs[0].url, "https://x.test/a");
        assert_eq!(outs[0].content_type, None);
        assert!(matches!(
            job_running(Some(250)),
            JobState::Running(Some(100))
        ));
    }

    #[test]
    fn base64_and_data_urls() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(data_url("image/png", b"fo"), "data:image/png;base64,Zm8=");
    }

    #[test]
    fn plain_ids() {
        assert!(is_plain_id("gm3qorzdhgbfurvjtvhg6dckhu"));
        assert!(is_plain_id("2fa25140-591f-4839-b377-9945a7a3881a"));
        for bad in ["", ".", "..", "a/b", "a?b", "a b", "a%2F", "é"] {
            assert!(!is_plain_id(bad), "{bad:?}");
        }
        assert!(!is_plain_id(&"a".repeat(257)));
    }
}
