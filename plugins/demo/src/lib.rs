//! The `demo` provider: offline and deterministic, so a newcomer gets an answer with no key and
//! no network. It answers every request itself (`outbound::answer`), streamed or not: chat
//! (`demo-chat` says back what it was told) and embeddings (`demo-embed`: a fixed-size vector of
//! hashed words, as floats or base64 as OpenAI's `encoding_format` asks) and images
//! (`demo-image`: a small PNG whose colours come from the prompt, as `b64_json`, or as a `data:`
//! URL when `response_format` is `url`) and speech (`demo-speech`: a short sine tone whose pitch
//! comes from the input, as a WAV file whatever format is asked, or as raw 16-bit PCM for `pcm`).
//!
//! It is a task provider too (the `task-provider` world): a task for `demo-image` is answered at
//! once, offline. The submission's job id carries what the picture depends on (`demo-<n>-<hash of
//! the prompt and seed>`), since a plugin keeps nothing between calls; the job shows `running`
//! with progress 0 after the submission, and the first poll finds it succeeded with `n` PNGs as
//! `data:` URLs (the same pictures `/v1/images/generations` draws for that prompt without a seed).

use tollgate_plugin_sdk::openai::{self, TextMessage};
use tollgate_plugin_sdk::serde_json::{self, Value, json};
use tollgate_plugin_sdk::*;

struct Demo;

const MODEL: &str = "demo-chat";
const EMBED_MODEL: &str = "demo-embed";
const IMAGE_MODEL: &str = "demo-image";
const SPEECH_MODEL: &str = "demo-speech";
/// `demo-speech` audio: 24 kHz mono 16-bit (OpenAI's `pcm`), half a second.
const SAMPLE_RATE: u32 = 24_000;
const TONE_SAMPLES: u32 = SAMPLE_RATE / 2;
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
            kinds: vec![
                "chat".into(),
                "embedding".into(),
                "image".into(),
                "speech".into(),
            ],
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
                    id: SPEECH_MODEL.into(),
                    kinds: vec!["speech".into()],
                    context_window: None,
                    max_output_tokens: None,
                    // Per character of `input`.
                    price: Some(ModelPrice {
                        input_per_token: 1_000,
                        output_per_token: 0,
                        per_image: 0,
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
            "speech" => return speak(&req),
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

/// Speech for an input: half a second of a sine tone between 220 and 880 Hz picked by the
/// input's hash, as a WAV file (or the bare samples when `response_format` is `pcm`).
fn speak(req: &Value) -> Result<Outbound, PluginError> {
    let input = req
        .get("input")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_request("`input` is required"))?;
    let hz = 220.0 + (fnv1a(input.as_bytes()) % 661) as f32;
    let mut pcm = Vec::with_capacity(TONE_SAMPLES as usize * 2);
    for i in 0..TONE_SAMPLES {
        let t = i as f32 / SAMPLE_RATE as f32;
        // A short fade in and out, so the tone starts and ends without a click.
        let edge = (i.min(TONE_SAMPLES - i) as f32 / 480.0).min(1.0);
        let v = (t * hz * std::f32::consts::TAU).sin() * edge * 0.3;
        pcm.extend_from_slice(&((v * f32::from(i16::MAX)) as i16).to_le_bytes());
    }
    if req.get("response_format").and_then(Value::as_str) == Some("pcm") {
        return Ok(answer(pcm, "audio/pcm"));
    }
    Ok(answer(wav(&pcm), "audio/wav"))
}

/// A RIFF WAVE file around 16-bit mono PCM samples at [`SAMPLE_RATE`].
fn wav(pcm: &[u8]) -> Vec<u8> {
    let len = pcm.len() as u32;
    let mut out = Vec::with_capacity(44 + pcm.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    out.extend_from_slice(&(SAMPLE_RATE * 2).to_le_bytes()); // bytes a second
    out.extend_from_slice(&2u16.to_le_bytes()); // bytes a frame
    out.extend_from_slice(&16u16.to_le_bytes()); // bits a sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(pcm);
    out
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

/// A small stable hash for deterministic ids.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Most pictures one demo task draws (`input.n`).
const MAX_TASK_IMAGES: u64 = 4;

/// What a demo task's picture depends on, carried in its job id: `demo-<n>-<16 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DemoJob {
    images: u64,
    seed: u64,
}

impl DemoJob {
    /// The job for a task's input: `prompt` (required), `seed` and `n` (optional).
    fn for_input(input: &Value) -> Result<Self, PluginError> {
        let prompt = input
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_request("`input.prompt` is required"))?;
        let images = match input.get("n") {
            None | Some(Value::Null) => 1,
            Some(n) => n
                .as_u64()
                .filter(|n| (1..=MAX_TASK_IMAGES).contains(n))
                .ok_or_else(|| {
                    invalid_request(format!("`input.n` must be 1 to {MAX_TASK_IMAGES}"))
                })?,
        };
        // Without a seed, the picture `/v1/images/generations` draws for the same prompt.
        let seed = match input.get("seed") {
            None | Some(Value::Null) => fnv1a(prompt.as_bytes()),
            Some(Value::Number(n)) => fnv1a(format!("{prompt}\0{n}").as_bytes()),
            Some(_) => return Err(invalid_request("`input.seed` must be a number")),
        };
        Ok(Self { images, seed })
    }

    fn id(self) -> String {
        format!("demo-{}-{:016x}", self.images, self.seed)
    }

    fn parse(id: &str) -> Option<Self> {
        let (images, seed) = id.strip_prefix("demo-")?.split_once('-')?;
        let images = images
            .parse()
            .ok()
            .filter(|n| (1..=MAX_TASK_IMAGES).contains(n))?;
        if seed.len() != 16 {
            return None;
        }
        let seed = u64::from_str_radix(seed, 16).ok()?;
        Some(Self { images, seed })
    }
}

/// The demo's own job shape, as an upstream would answer: `{id, status: running | succeeded,
/// progress, output: [{url, content_type}]}`.
fn job_state(body: &Value) -> Result<JobState, PluginError> {
    match body.get("status").and_then(Value::as_str) {
        Some("running") => Ok(job_running(
            body.get("progress")
                .and_then(Value::as_u64)
                .map(|p| p.min(100) as u8),
        )),
        Some("succeeded") => {
            let outputs: Vec<TaskOutput> = body
                .get("output")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|o| {
                    Some(TaskOutput {
                        url: o.get("url")?.as_str()?.to_string(),
                        content_type: o
                            .get("content_type")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    })
                })
                .collect();
            if outputs.is_empty() {
                return Ok(job_failed(ErrorClass::Upstream, "no output"));
            }
            Ok(JobState::Succeeded(outputs))
        }
        other => Err(upstream_error(format!("unknown job status {other:?}"))),
    }
}

fn json_answer(status: u16, body: &Value) -> Outbound {
    Outbound::Answer(HttpResponse {
        status,
        headers: vec![header("content-type", "application/json")],
        body: body.to_string().into_bytes(),
    })
}

impl Tasks for Demo {
    fn build_submit(
        _ctx: ChannelContext,
        kind: String,
        input: String,
    ) -> Result<Outbound, PluginError> {
        if kind != "image" {
            return Err(invalid_request(format!(
                "the demo provider has no `{kind}` tasks"
            )));
        }
        let input: Value = parse_request(&input)?;
        if !input.is_object() {
            return Err(invalid_request("`input` must be an object"));
        }
        let job = DemoJob::for_input(&input)?;
        Ok(json_answer(
            200,
            &json!({"id": job.id(), "status": "running", "progress": 0}),
        ))
    }

    fn parse_submit(
        _ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<Submitted, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(error_from_status(&response));
        }
        let body: Value = parse_upstream(&response.body)?;
        let job_id = body
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| upstream_error("the submission's answer has no `id`"))?
            .to_string();
        Ok(Submitted {
            job_id,
            state: job_state(&body)?,
        })
    }

    fn build_poll(_ctx: ChannelContext, job_id: String) -> Result<Outbound, PluginError> {
        let Some(job) = DemoJob::parse(&job_id) else {
            return Ok(json_answer(
                404,
                &json!({"error": {"message": "no such demo job", "code": "not_found"}}),
            ));
        };
        let output: Vec<Value> = (0..job.images)
            .map(|i| {
                let png = gradient_png(job.seed.rotate_left(i as u32 * 8));
                json!({"url": data_url("image/png", &png), "content_type": "image/png"})
            })
            .collect();
        Ok(json_answer(
            200,
            &json!({"id": job_id, "status": "succeeded", "progress": 100, "output": output}),
        ))
    }

    fn parse_poll(
        _ctx: ChannelContext,
        _job_id: String,
        response: HttpResponse,
    ) -> Result<JobState, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(error_from_status(&response));
        }
        job_state(&parse_upstream(&response.body)?)
    }
}

tollgate_plugin_sdk::export_provider!(Demo);
tollgate_plugin_sdk::export_tasks!(Demo);

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ChannelContext {
        ChannelContext {
            channel: "demo".into(),
            base_url: String::new(),
            model: IMAGE_MODEL.into(),
            options: Vec::new(),
        }
    }

    fn answered(out: Outbound) -> HttpResponse {
        match out {
            Outbound::Answer(resp) => resp,
            Outbound::Send(_) => panic!("the demo never sends"),
        }
    }

    fn submit(input: Value) -> Submitted {
        let resp = answered(Demo::build_submit(ctx(), "image".into(), input.to_string()).unwrap());
        Demo::parse_submit(ctx(), "image".into(), resp).unwrap()
    }

    fn poll(job_id: &str) -> Result<JobState, PluginError> {
        let resp = answered(Demo::build_poll(ctx(), job_id.into()).unwrap());
        Demo::parse_poll(ctx(), job_id.into(), resp)
    }

    fn decode_base64(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let mut out = Vec::new();
        for chunk in text.trim_end_matches('=').as_bytes().chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, c)| n | (u32::from(value(*c)) << (18 - 6 * i)));
            out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
        }
        out
    }

    #[test]
    fn a_task_is_running_after_submission_and_done_at_the_first_poll() {
        let sub = submit(json!({"prompt": "a red fox", "n": 2}));
        assert!(sub.job_id.starts_with("demo-2-"), "{}", sub.job_id);
        assert!(matches!(sub.state, JobState::Running(Some(0))));
        let JobState::Succeeded(outputs) = poll(&sub.job_id).unwrap() else {
            panic!("expected success");
        };
        assert_eq!(outputs.len(), 2);
        assert_ne!(outputs[0].url, outputs[1].url);
        for out in &outputs {
            assert_eq!(out.content_type.as_deref(), Some("image/png"));
            let b64 = out.url.strip_prefix("data:image/png;base64,").unwrap();
            let png = decode_base64(b64);
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            assert!(
                png.ends_with(&[0xae, 0x42, 0x60, 0x82]),
                "IEND's CRC ends the file"
            );
        }
    }

    #[test]
    fn the_job_id_depends_on_the_prompt_and_the_seed_only() {
        let a = submit(json!({"prompt": "a red fox"})).job_id;
        assert_eq!(
            a,
            submit(json!({"prompt": "a red fox", "size": "1024x1024"})).job_id
        );
        assert_ne!(a, submit(json!({"prompt": "a red fox", "seed": 7})).job_id);
        assert_eq!(
            submit(json!({"prompt": "a red fox", "seed": 7})).job_id,
            submit(json!({"prompt": "a red fox", "seed": 7})).job_id
        );
        // Without a seed, the picture the images route draws for the prompt.
        let JobState::Succeeded(outputs) = poll(&a).unwrap() else {
            panic!("expected success");
        };
        let sync = answered(
            Demo::build_request(
                ctx(),
                "image".into(),
                json!({"prompt": "a red fox", "response_format": "url"}).to_string(),
            )
            .unwrap(),
        );
        let sync: Value = serde_json::from_slice(&sync.body).unwrap();
        assert_eq!(sync["data"][0]["url"], outputs[0].url);
    }

    #[test]
    fn bad_inputs_and_kinds_are_the_clients_mistake() {
        for input in [
            json!({}),
            json!({"prompt": 3}),
            json!({"prompt": "x", "n": 0}),
            json!({"prompt": "x", "n": 5}),
            json!({"prompt": "x", "seed": "7"}),
            json!(["prompt"]),
        ] {
            let Err(e) = Demo::build_submit(ctx(), "image".into(), input.to_string()) else {
                panic!("{input} was accepted");
            };
            assert_eq!(e.class, ErrorClass::InvalidRequest, "{input}");
        }
        let Err(e) = Demo::build_submit(ctx(), "video".into(), r#"{"prompt":"x"}"#.into()) else {
            panic!("video was accepted");
        };
        assert_eq!(e.class, ErrorClass::InvalidRequest);
    }

    #[test]
    fn an_unknown_job_is_not_found() {
        for id in ["nope", "demo-9-0000000000000000", "demo-1-xyz", "demo-1-00"] {
            let e = poll(id).unwrap_err();
            assert_eq!(e.class, ErrorClass::NotFound, "{id}");
            assert_eq!(e.status, Some(404));
        }
    }

    #[test]
    fn speech_is_a_wav_tone_or_bare_pcm() {
        let out = Demo::build_request(
            ctx(),
            "speech".into(),
            json!({"model": "demo-speech", "input": "hello", "voice": "alloy"}).to_string(),
        )
        .unwrap();
        let wav = answered(out);
        assert_eq!(wav.headers[0].value, "audio/wav");
        assert_eq!(&wav.body[..4], b"RIFF");
        assert_eq!(&wav.body[8..16], b"WAVEfmt ");
        assert_eq!(wav.body.len(), 44 + TONE_SAMPLES as usize * 2);
        let pcm = answered(
            Demo::build_request(
                ctx(),
                "speech".into(),
                json!({"input": "hello", "voice": "a", "response_format": "pcm"}).to_string(),
            )
            .unwrap(),
        );
        assert_eq!(pcm.body, wav.body[44..]);
    }

    #[test]
    fn the_manifest_still_lists_the_sync_models() {
        let m = Demo::describe();
        let ids: Vec<&str> = m.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, [MODEL, IMAGE_MODEL, SPEECH_MODEL, EMBED_MODEL]);
        assert!(m.kinds.iter().any(|k| k == "image"));
    }
}
