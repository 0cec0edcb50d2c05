//! The `demo` provider: offline and deterministic, so a newcomer gets an answer with no key and
//! no network. It answers every request itself (`outbound::answer`), streamed or not: chat
//! (`demo-chat` says back what it was told) and embeddings (`demo-embed`: a fixed-size vector of
//! hashed words, as floats or base64 as OpenAI's `encoding_format` asks) and images
//! (`demo-image`: a small PNG whose colours come from the prompt, as `b64_json`, or as a `data:`
//! URL when `response_format` is `url`).

use tollgate_plugin_sdk::openai::{self, TextMessage};
use tollgate_plugin_sdk::serde_json::{self, Value, json};
use tollgate_plugin_sdk::*;

struct Demo;

const MODEL: &str = "demo-chat";
const EMBED_MODEL: &str = "demo-embed";
const IMAGE_MODEL: &str = "demo-image";
/// Side of a `demo-image` picture, in pixels.
const IMAGE_SIDE: usize = 16;
/// Floats in a `demo-embed` vector (unless the request asks for fewer `dimensions`).
const EMBED_DIMS: usize = 16;
/// A fixed timestamp: the same request always gets the same bytes back.
const CREATED: u64 = 1_700_000_000;

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn reply_to(messages: &[TextMessage]) -> String {
    let last = messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.text.trim())
        .unwrap_or("");
    let said: String = last.chars().take(200).collect();
    let ellipsis = if last.chars().count() > 200 {
        "…"
    } else {
        ""
    };
    format!("Hello from tollgate's offline demo provider. You said: {said}{ellipsis}")
}

fn prompt_tokens(messages: &[TextMessage]) -> u64 {
    messages.iter().map(|m| words(&m.text) + 1).sum()
}

fn answer(body: Vec<u8>, content_type: &str) -> Outbound {
    Outbound::Answer(HttpResponse {
        status: 200,
        headers: vec![header("content-type", content_type)],
        body,
    })
}

impl Provider for Demo {
    fn describe() -> Manifest {
        Manifest {
            name: "demo".into(),
            version: "0.1.0".into(),
            kinds: vec!["chat".into(), "embedding".into(), "image".into()],
            auth: AuthScheme::None,
            models: vec![
                ModelInfo {
                    id: MODEL.into(),
                    kinds: vec!["chat".into()],
                    context_window: Some(8192),
                    max_output_tokens: Some(1024),
                    price: Some(ModelPrice {
                        input_per_token: 100,
                        output_per_token: 200,
                        per_image: 0,
                        per_second: 0,
                        per_request: 0,
                    }),
                },
                ModelInfo {
                    id: IMAGE_MODEL.into(),
                    kinds: vec!["image".into()],
                    context_window: None,
                    max_output_tokens: None,
                    price: Some(ModelPrice {
                        input_per_token: 0,
                        output_per_token: 0,
                        per_image: 1_000_000_000,
                        per_second: 0,
                        per_request: 0,
                    }),
                },
                ModelInfo {
                    id: EMBED_MODEL.into(),
                    kinds: vec!["embedding".into()],
                    context_window: Some(8192),
                    max_output_tokens: None,
                    price: Some(ModelPrice {
                        input_per_token: 10,
                        output_per_token: 0,
                        per_image: 0,
                        per_second: 0,
                        per_request: 0,
                    }),
                },
            ],
            config_keys: Vec::new(),
        }
    }

    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        let req: Value = parse_request(&request)?;
        match kind.as_str() {
            "chat" => {}
            "embedding" => return embed(&ctx, &req),
            "image" => return imagine(&req),
            _ => {
                return Err(invalid_request(format!(
                    "the demo provider does not do `{kind}`"
                )));
            }
        }
        let messages = openai::messages(&req)?;
        let text = reply_to(&messages);
        let usage = openai::usage(prompt_tokens(&messages), words(&text));
        let model = if ctx.model.is_empty() {
            MODEL
        } else {
            ctx.model.as_str()
        };
        let id = format!("chatcmpl-demo-{:016x}", fnv1a(request.as_bytes()));
        if openai::wants_stream(&req) {
            let mut events = vec![openai::chunk(
                &id,
                CREATED,
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            )];
            let mut first = true;
            for word in text.split(' ') {
                let piece = if first {
                    word.to_string()
                } else {
                    format!(" {word}")
                };
                first = false;
                events.push(openai::chunk(
                    &id,
                    CREATED,
                    model,
                    json!({"content": piece}),
                    None,
                ));
            }
            events.push(openai::chunk(&id, CREATED, model, json!({}), Some("stop")));
            events.push(openai::usage_chunk(&id, CREATED, model, usage));
            Ok(answer(openai::sse_body(&events), "text/event-stream"))
        } else {
            let body = openai::completion(&id, CREATED, model, &text, "stop", usage);
            Ok(answer(body.to_string().into_bytes(), "application/json"))
        }
    }

    fn parse_response(
        _ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(error_from_status(&response));
        }
        String::from_utf8(response.body).map_err(|_| upstream_error("answer is not UTF-8"))
    }

    fn parse_stream_event(
        _ctx: ChannelContext,
        event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        if is_done(&event) {
            return Ok(done());
        }
        let _: Value = serde_json::from_str(&event.data)
            .map_err(|e| upstream_error(format!("bad chunk: {e}")))?;
        Ok(one_chunk(event.data))
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

/// Embeddings of every input: each word hashed into one of the vector's slots, then scaled to
/// unit length, so equal texts get equal vectors and texts sharing words point the same way.
fn embed(ctx: &ChannelContext, req: &Value) -> Result<Outbound, PluginError> {
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
            vec![
                items
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => return Err(invalid_request("`input` is required")),
    };
    let dims = req
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(EMBED_DIMS, |d| (d as usize).clamp(1, EMBED_DIMS));
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let mut tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            tokens += words(text).max(1);
            let mut v = vec![0f32; dims];
            for w in text.split_whitespace() {
                let h = fnv1a(w.to_lowercase().as_bytes());
                let slot = (h % dims as u64) as usize;
                v[slot] += if h & (1 << 63) == 0 { 1.0 } else { -1.0 };
            }
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let model = if ctx.model.is_empty() {
        EMBED_MODEL
    } else {
        ctx.model.as_str()
    };
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(answer(body.to_string().into_bytes(), "application/json"))
}

/// Images for a prompt: `n` small PNGs, a gradient between two colours taken from the prompt's
/// hash (image `i` shifted by `i`), so the same prompt always draws the same pictures.
fn imagine(req: &Value) -> Result<Outbound, PluginError> {
    let prompt = req
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_request("`prompt` is required"))?;
    let n = req
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let as_url = req.get("response_format").and_then(Value::as_str) == Some("url");
    let h = fnv1a(prompt.as_bytes());
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let png = gradient_png(h.rotate_left(i as u32 * 8));
            let b64 = base64_encode(&png);
            if as_url {
                json!({"url": format!("data:image/png;base64,{b64}"), "revised_prompt": prompt})
            } else {
                json!({"b64_json": b64, "revised_prompt": prompt})
            }
        })
        .collect();
    let body = json!({"created": CREATED, "data": data});
    Ok(answer(body.to_string().into_bytes(), "application/json"))
}

/// A square RGB PNG (RFC 2083): a diagonal gradient between two colours from `seed`, stored
/// uncompressed (zlib "stored" blocks), with its CRC-32 and Adler-32 checksums.
fn gradient_png(seed: u64) -> Vec<u8> {
    let [a0, a1, a2, b0, b1, b2, ..] = seed.to_le_bytes();
    let mix = |a: u8, b: u8, t: usize| {
        let t = t as u32;
        let span = (2 * (IMAGE_SIDE - 1)) as u32;
        ((u32::from(a) * (span - t) + u32::from(b) * t) / span) as u8
    };
    let mut raw = Vec::with_capacity(IMAGE_SIDE * (1 + 3 * IMAGE_SIDE));
    for y in 0..IMAGE_SIDE {
        raw.push(0); // filter: none
        for x in 0..IMAGE_SIDE {
            raw.extend_from_slice(&[mix(a0, b0, x + y), mix(a1, b1, x + y), mix(a2, b2, x + y)]);
        }
    }
    // zlib: header, one final stored block (the picture is far below 65,535 bytes), Adler-32.
    let len = raw.len() as u16;
    let mut z = vec![0x78, 0x01, 0x01];
    z.extend_from_slice(&len.to_le_bytes());
    z.extend_from_slice(&(!len).to_le_bytes());
    z.extend_from_slice(&raw);
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let side = (IMAGE_SIDE as u32).to_be_bytes();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side);
    ihdr.extend_from_slice(&side);
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter method, no interlace
    let mut png = vec![0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    for (kind, body) in [(b"IHDR", ihdr), (b"IDAT", z), (b"IEND", Vec::new())] {
        png.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(&body);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for x in bytes {
        a = (a + u32::from(*x)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

/// Standard base64 with padding (RFC 4648), as OpenAI encodes `encoding_format: base64`.
fn base64_encode(bytes: &[u8]) -> String {
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

/// A small stable hash for deterministic ids.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

tollgate_plugin_sdk::export_provider!(Demo);
