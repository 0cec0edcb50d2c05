//! Counting a request's prompt tokens for the estimate. Only the prompt's text is counted (chat
//! messages' strings, embeddings' `input`, an image's `prompt`), not the JSON around it, plus a
//! small overhead per message, with the model's [`Tokenizer`]: OpenAI's `o200k_base` or
//! `cl100k_base` (the `bpe-openai` crate's linear-time byte-pair encoder, loaded once and kept),
//! or, for any other model family, a conservative bound per byte. The count only sizes the
//! reservation: the charge is the usage the upstream reports, in full.

use serde_json::Value;

pub use crate::config::Tokenizer;

/// What a chat message costs beyond its strings: its role and the framing around it (three
/// tokens in OpenAI's chat format, one more for a name).
pub const PER_MESSAGE: u64 = 4;
/// What a chat request costs beyond its messages: the priming of the reply.
pub const PER_REQUEST: u64 = 3;
/// An image part of a message, whatever its data: the most one image costs at OpenAI's high
/// detail (a 768 × 2048 image: eight 512-pixel tiles of 170 tokens, plus 85).
pub const PER_IMAGE_PART: u64 = 85 + 8 * 170;

/// Tokens of `text` with `tokenizer`.
pub fn count(tokenizer: Tokenizer, text: &str) -> u64 {
    let n = match tokenizer {
        Tokenizer::O200k => bpe_openai::o200k_base().count(text),
        Tokenizer::Cl100k => bpe_openai::cl100k_base().count(text),
        Tokenizer::Bytes => return bytes_bound(text),
    };
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Load a tokenizer's tables now (they load once, on first use, and stay): at start and on a
/// reload, so that no request waits for them.
pub fn preload(tokenizer: Tokenizer) {
    match tokenizer {
        Tokenizer::O200k => {
            bpe_openai::o200k_base();
        }
        Tokenizer::Cl100k => {
            bpe_openai::cl100k_base();
        }
        Tokenizer::Bytes => {}
    }
}

/// A conservative bound for any tokenizer, from the bytes: ASCII at three bytes a token
/// (English runs at about four), and every other byte at two tokens for three bytes (two tokens
/// for each Chinese, Japanese or Korean character, which byte-level tokenizers split into one to
/// two; four for a four-byte emoji).
pub fn bytes_bound(text: &str) -> u64 {
    let non_ascii = text.bytes().filter(|b| !b.is_ascii()).count() as u64;
    let ascii = text.len() as u64 - non_ascii;
    ascii.div_ceil(3) + (non_ascii * 2).div_ceil(3)
}

/// A chat request: every message's strings (content, text parts, a name, tool calls'
/// arguments; an image part at [`PER_IMAGE_PART`]) plus [`PER_MESSAGE`] each, [`PER_REQUEST`],
/// and the tool, function and response-format definitions as the JSON they are.
pub fn chat(tokenizer: Tokenizer, body: &Value) -> u64 {
    let mut n = PER_REQUEST;
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            n = n
                .saturating_add(PER_MESSAGE)
                .saturating_add(text_fields(tokenizer, m));
        }
    }
    for key in ["tools", "functions", "response_format"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            n = n.saturating_add(count(tokenizer, &v.to_string()));
        }
    }
    n
}

/// An embeddings request: its `input`, a string, strings, token ids or arrays of token ids.
pub fn embeddings(tokenizer: Tokenizer, body: &Value) -> u64 {
    let item = |v: &Value| match v {
        Value::String(s) => count(tokenizer, s),
        Value::Number(_) => 1,
        Value::Array(ids) => ids.len() as u64,
        _ => 0,
    };
    match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => items.len() as u64,
        Some(Value::Array(items)) => items.iter().map(item).fold(0, u64::saturating_add),
        Some(v) => item(v),
        None => 0,
    }
}

/// An image request: its `prompt` (and a `negative_prompt`).
pub fn images(tokenizer: Tokenizer, body: &Value) -> u64 {
    ["prompt", "negative_prompt"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(|v| text_fields(tokenizer, v))
        .fold(0, u64::saturating_add)
}

/// Every string in `v` (object keys `role` and `type` are framing, not text), an image part at
/// [`PER_IMAGE_PART`].
pub fn text_fields(tokenizer: Tokenizer, v: &Value) -> u64 {
    match v {
        Value::String(s) => count(tokenizer, s),
        Value::Array(items) => items
            .iter()
            .map(|x| text_fields(tokenizer, x))
            .fold(0, u64::saturating_add),
        Value::Object(fields) => fields
            .iter()
            .map(|(k, x)| match k.as_str() {
                "role" | "type" => 0,
                "image_url" | "input_image" => PER_IMAGE_PART,
                _ => text_fields(tokenizer, x),
            })
            .fold(0, u64::saturating_add),
        Value::Number(_) | Value::Bool(_) | Value::Null => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_tokenizers_are_openais() {
        // Published examples of OpenAI's encodings.
        assert_eq!(count(Tokenizer::Cl100k, "tiktoken is great!"), 6);
        assert_eq!(count(Tokenizer::Cl100k, "hello world"), 2);
        assert_eq!(count(Tokenizer::O200k, "hello world"), 2);
    }

    #[test]
    fn the_byte_bound_covers_every_script() {
        // English: three bytes a token, against about four in real tokenizers.
        assert_eq!(bytes_bound(&"abc".repeat(100)), 100);
        // Chinese: two tokens a character.
        assert_eq!(bytes_bound(&"你好世界".repeat(25)), 200);
        // Russian (two bytes a character): four tokens for three characters.
        assert_eq!(bytes_bound(&"привет".repeat(10)), 80);
    }

    /// The estimate of a chat request against the real count of its text (OpenAI's tokenizer),
    /// for English and for Chinese: never below it, and within a sane factor above it.
    #[test]
    fn chat_estimates_are_close_above_the_real_count() {
        let english = "The quick brown fox jumps over the lazy dog, and then it writes a short \
                       report about the weather in three paragraphs. "
            .repeat(20);
        let chinese = "我们今天讨论一下天气预报和交通情况，请用三段话写一份简短的报告。".repeat(20);
        for (text, tok) in [
            (&english, Tokenizer::O200k),
            (&chinese, Tokenizer::O200k),
            (&english, Tokenizer::Cl100k),
            (&chinese, Tokenizer::Cl100k),
        ] {
            let real = count(tok, text);
            let body = json!({"model": "m", "messages": [{"role": "user", "content": text}]});
            let estimate = chat(tok, &body);
            assert!(estimate >= real, "{tok:?}: {estimate} < {real}");
            assert!(
                estimate <= real + PER_MESSAGE + PER_REQUEST,
                "{tok:?}: {estimate} against {real}"
            );
            // The per-byte bound stays above the real count too, by a bounded factor.
            let bound = bytes_bound(text);
            assert!(bound >= real, "{tok:?}: bound {bound} < {real}");
            assert!(bound <= 4 * real, "{tok:?}: bound {bound} against {real}");
        }
        // Chinese costs more tokens per byte than English: the counts follow the script.
        let zh = count(Tokenizer::O200k, &chinese) as f64 / chinese.len() as f64;
        let en = count(Tokenizer::O200k, &english) as f64 / english.len() as f64;
        assert!(zh > en, "{zh} vs {en}");
    }

    #[test]
    fn only_the_prompt_text_is_counted() {
        let tok = Tokenizer::O200k;
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(100_000))}}
                ]}
            ]
        });
        let text = count(tok, "Be brief.") + count(tok, "ann") + count(tok, "What is this?");
        assert_eq!(
            chat(tok, &body),
            PER_REQUEST + 2 * PER_MESSAGE + text + PER_IMAGE_PART
        );
        assert_eq!(
            embeddings(tok, &json!({"input": ["hello world", "hello"]})),
            3
        );
        assert_eq!(embeddings(tok, &json!({"input": [1, 2, 3]})), 3);
        assert_eq!(embeddings(tok, &json!({"input": [[1, 2], [3]]})), 3);
        assert_eq!(images(tok, &json!({"prompt": "hello world"})), 2);
    }
}
