//! `tollgate plugin check`: the conformance checks an operator runs on a provider or policy
//! component before dropping it into the plugins folder.
//!
//! Every check goes through the host's own session code (the calls, the output checks and the
//! error classification a request gets), against a made-up channel (`https://upstream.invalid/v1`,
//! no credential): nothing is sent anywhere. What the host can check of an arbitrary plugin, whose
//! upstream's wire format it does not know:
//! - the manifest: a semantic version, kinds the host routes, models with kinds, a usable auth
//!   scheme;
//! - for each declared kind, a request built from a sample client body: sent or answered
//!   offline, a URL under the channel's base URL, not a stream unless the client asked for one,
//!   a JSON body when it says it is JSON, no credential anywhere (the host adds it), the
//!   channel's model named;
//! - the answer: an OpenAI-shaped 2xx body (or the author's sample, `--samples DIR`) gives an
//!   answer of the route's shape or an upstream-class error; a body that is no answer (HTML,
//!   empty) gives an upstream-class error, never an answer; 429 is rate-limited (with the retry
//!   hint), 5xx is upstream, 400, 401 and 404 are errors;
//! - a stream (chat): an offline answer's or the author's sample stream ends (`done`) with JSON
//!   object chunks; OpenAI's stream either ends at `data: [DONE]` or is refused as the
//!   upstream's fault; a garbage event is an upstream-class error or nothing, never a chunk;
//! - the model list request, and for a task provider the submission and poll requests and their
//!   error statuses.
//!
//! A trap, a CPU or memory overrun anywhere is a failure.
//!
//! A policy component ([`check_policy`]) is checked for what it describes (a semantic version,
//! categories a policy set can name) and screened with ordinary prompts (a question, an empty
//! one, non-Latin text, 64 KiB): each must come back within the call's limits, none blocked, and
//! any verdict must name a category the plugin declares.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::pipeline::dispatch::Expect;
use crate::plugins::{
    AuthScheme, ChannelContext, GuestErrorClass, InboundResponse, Manifest, Outbound,
    OutboundRequest, Plugin, PluginAction, PluginError, PolicyInput, PolicyPlugin, redact,
};
use crate::upstream::sse;

/// The made-up channel every check builds for.
pub const BASE_URL: &str = "https://upstream.invalid/v1";
/// The kinds `build-request` may declare (the host's routes).
const ROUTE_KINDS: &[&str] = &["chat", "embedding", "image", "speech"];
/// What a model may produce (routes and tasks).
const MODEL_KINDS: &[&str] = &["chat", "embedding", "image", "speech", "video", "music"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Works, but probably not as meant; does not fail the check.
    Warn,
    /// Not applicable to this plugin.
    Skip,
    Fail,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Warn => "WARN",
            Self::Skip => "SKIP",
            Self::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Finding {
    pub check: String,
    pub outcome: Outcome,
    pub reason: String,
}

/// Every check's result, in order.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, check: impl Into<String>, outcome: Outcome, reason: impl Into<String>) {
        self.findings.push(Finding {
            check: check.into(),
            outcome,
            reason: reason.into(),
        });
    }

    fn result(&mut self, check: impl Into<String>, r: Result<String, String>) {
        match r {
            Ok(why) => self.add(check, Outcome::Pass, why),
            Err(why) => self.add(check, Outcome::Fail, why),
        }
    }

    pub fn failures(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.outcome == Outcome::Fail)
            .count()
    }

    pub fn passed(&self) -> bool {
        self.failures() == 0
    }

    /// One line per check (`PASS  name: reason`), then a summary line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let _ = writeln!(out, "{}  {}: {}", f.outcome.label(), f.check, f.reason);
        }
        let count = |o| self.findings.iter().filter(|f| f.outcome == o).count();
        let _ = writeln!(
            out,
            "{} passed, {} failed, {} warnings, {} skipped",
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Warn),
            count(Outcome::Skip)
        );
        out
    }
}

/// Samples of the plugin's upstream wire format an author keeps beside the plugin
/// (`--samples DIR`): `<kind>.json`, a successful answer of each kind, and `chat.sse`, a whole
/// streamed answer. With them, an answer and a stream are checked strictly: they must translate.
#[derive(Debug, Clone)]
pub struct Samples {
    dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SamplesError {
    #[error("the samples folder `{0}` is not a folder")]
    NotADir(String),
    #[error("reading the sample `{0}`: {1}")]
    Read(String, String),
}

impl Samples {
    pub fn new(dir: &Path) -> Result<Self, SamplesError> {
        if !dir.is_dir() {
            return Err(SamplesError::NotADir(dir.display().to_string()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn read(&self, file: &str) -> Result<Option<Vec<u8>>, SamplesError> {
        let path = self.dir.join(file);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SamplesError::Read(
                path.display().to_string(),
                e.to_string(),
            )),
        }
    }
}

/// Run every check on a loaded provider.
pub async fn check(plugin: &Plugin, samples: Option<&Samples>) -> Result<Report, SamplesError> {
    let mut report = Report::default();
    let m = &plugin.manifest;
    manifest_checks(&mut report, m, plugin.has_tasks());
    for kind in m.kinds.iter().filter(|k| ROUTE_KINDS.contains(&k.as_str())) {
        let sample = match samples {
            Some(s) => s.read(&format!("{kind}.json"))?,
            None => None,
        };
        kind_checks(&mut report, plugin, kind, sample).await;
    }
    if m.kinds.iter().any(|k| k == "chat") {
        let sample = match samples {
            Some(s) => s.read("chat.sse")?,
            None => None,
        };
        stream_checks(&mut report, plugin, sample).await;
    }
    models_checks(&mut report, plugin).await;
    if plugin.has_tasks() {
        task_checks(&mut report, plugin).await;
    }
    Ok(report)
}

fn manifest_checks(report: &mut Report, m: &Manifest, has_tasks: bool) {
    let semver = is_semver(&m.version);
    report.result(
        "manifest: version",
        if semver {
            Ok(format!("{} {}", m.name, m.version))
        } else {
            Err(format!(
                "`{}` is not a semantic version (MAJOR.MINOR.PATCH)",
                m.version
            ))
        },
    );
    let unknown: Vec<&str> = m
        .kinds
        .iter()
        .map(String::as_str)
        .filter(|k| !ROUTE_KINDS.contains(k))
        .collect();
    report.result(
        "manifest: kinds",
        if !unknown.is_empty() {
            Err(format!(
                "the host never sends {}: `build-request` serves {}",
                unknown.join(", "),
                ROUTE_KINDS.join(", ")
            ))
        } else if m.kinds.is_empty() && !has_tasks {
            Err("no kinds and no task API: the plugin serves nothing".into())
        } else if m.kinds.is_empty() {
            Ok("none synchronously; jobs through the task API".into())
        } else {
            Ok(m.kinds.join(", "))
        },
    );
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for model in &m.models {
        if model.id.trim().is_empty() {
            problems.push("a model has an empty id".to_string());
        } else if !seen.insert(model.id.as_str()) {
            problems.push(format!("`{}` is listed twice", model.id));
        }
        if model.kinds.is_empty() {
            problems.push(format!("`{}` has no kinds", model.id));
        }
        for k in &model.kinds {
            if !MODEL_KINDS.contains(&k.as_str()) {
                problems.push(format!("`{}` has the unknown kind `{k}`", model.id));
            }
        }
    }
    report.result(
        "manifest: models",
        if problems.is_empty() {
            Ok(format!("{} known model(s)", m.models.len()))
        } else {
            Err(problems.join("; "))
        },
    );
    let auth = match &m.auth {
        AuthScheme::None => Ok("none (an offline or local upstream)".to_string()),
        AuthScheme::Bearer => Ok("bearer: the host adds `Authorization: Bearer …`".into()),
        AuthScheme::Header(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(_) => Ok(format!("the host adds the header `{h}`")),
            Err(_) => Err(format!("`{h}` is not a valid header name")),
        },
        AuthScheme::Query(q) => {
            if !q.is_empty()
                && q.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                Ok(format!("the host adds the query parameter `{q}`"))
            } else {
                Err(format!(
                    "`{q}` is not a plain query parameter name (letters, digits, `_`, `-`, `.`)"
                ))
            }
        }
    };
    report.result("manifest: auth", auth);
}

/// A sample client body for a kind, as a client sends it to the gateway.
pub fn sample_request(kind: &str, stream: bool) -> Option<Value> {
    Some(match kind {
        "chat" => {
            let mut v = json!({
                "model": "checked-model",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say hello."}
                ],
                "max_tokens": 16,
            });
            if stream {
                v["stream"] = Value::Bool(true);
            }
            v
        }
        "embedding" => json!({"model": "checked-model", "input": ["Hello", "Good day"]}),
        "image" => json!({
            "model": "checked-model", "prompt": "a lighthouse at dusk", "n": 1, "size": "1024x1024"
        }),
        "speech" => json!({
            "model": "checked-model", "input": "Hello!", "voice": "alloy", "response_format": "mp3"
        }),
        _ => return None,
    })
}

/// An OpenAI-shaped successful answer of a kind (what an OpenAI-compatible upstream sends).
fn openai_answer(kind: &str) -> Option<Value> {
    Some(match kind {
        "chat" => json!({
            "id": "chatcmpl-check", "object": "chat.completion", "created": 1_700_000_000,
            "model": "checked-upstream-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
        }),
        "embedding" => json!({
            "object": "list", "model": "checked-upstream-model",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]},
                     {"object": "embedding", "index": 1, "embedding": [0.3, 0.4]}],
            "usage": {"prompt_tokens": 4, "total_tokens": 4}
        }),
        "image" => json!({
            "created": 1_700_000_000,
            "data": [{"url": "https://upstream.invalid/files/lighthouse.png"}]
        }),
        _ => return None,
    })
}

/// An OpenAI-shaped stream: a role chunk, two content chunks, the finish, usage, `[DONE]`.
fn openai_stream() -> String {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-check", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": "checked-upstream-model",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let events = [
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hel"}), Value::Null),
        chunk(json!({"content": "lo."}), Value::Null),
        chunk(json!({}), json!("stop")),
        json!({"id": "chatcmpl-check", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": "checked-upstream-model", "choices": [],
               "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}),
    ];
    let mut out = String::new();
    for e in events {
        let _ = write!(out, "data: {e}\n\n");
    }
    out.push_str("data: [DONE]\n\n");
    out
}

fn expect_of(kind: &str) -> Option<&'static Expect> {
    match kind {
        "chat" => Some(&crate::pipeline::chat::COMPLETION),
        "embedding" => Some(&crate::pipeline::embeddings::EMBEDDINGS),
        "image" => Some(&crate::pipeline::images::IMAGES),
        _ => None,
    }
}

/// The channel every check builds for: the manifest's first model of the kind as the
/// upstream's model id (else a made-up one), no options, and never a credential.
fn context(m: &Manifest, kind: &str) -> ChannelContext {
    let model = m
        .models
        .iter()
        .find(|mi| mi.kinds.iter().any(|k| k == kind))
        .map_or_else(|| "checked-upstream-model".to_string(), |mi| mi.id.clone());
    ChannelContext {
        channel: "check".into(),
        base_url: BASE_URL.into(),
        model,
        options: Vec::new(),
    }
}

fn response(status: u16, content_type: &str, body: &[u8]) -> InboundResponse {
    InboundResponse {
        status,
        headers: vec![
            ("content-type".into(), content_type.into()),
            ("date".into(), "Tue, 14 Nov 2023 22:13:20 GMT".into()),
        ],
        body: body.to_vec(),
    }
}

/// A failed call in a line: the class of a guest error, or what the host made of the failure.
fn describe(e: &PluginError) -> String {
    match e {
        PluginError::Guest { class, message, .. } => {
            let name = class_name(*class);
            let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!("{article} {name} error ({})", redact(message))
        }
        PluginError::Trap { call, detail, .. } => {
            let cause = root_cause(detail);
            if cause.contains("unknown import") && cause.contains("wasi:") {
                format!(
                    "a trap in {call}: it called WASI ({cause}), which the sandbox does not have (a panic, `std::env`, files, clocks and `HashMap::new` all do)"
                )
            } else {
                format!("a trap in {call} ({cause})")
            }
        }
        PluginError::Timeout { call, .. } => format!("ran out of CPU time in {call}"),
        PluginError::OutOfMemory { call, .. } => format!("ran out of memory in {call}"),
        PluginError::BadOutput { call, detail, .. } => {
            format!("output the host refuses from {call} ({detail})")
        }
        PluginError::Busy { .. } => "no free instance slot".into(),
    }
}

/// The innermost cause of a wasmtime error chain (`{:#}` or `{:?}` text): what trapped, not where.
fn root_cause(text: &str) -> &str {
    let cause = text.rsplit("Caused by:").next().unwrap_or(text);
    cause
        .lines()
        .map(|l| {
            l.trim()
                .trim_start_matches(|c: char| c.is_ascii_digit() || c == ':')
                .trim()
        })
        .rfind(|l| !l.is_empty() && !l.contains("backtrace"))
        // `0x1ec5 - <unknown>!<wasm function 37>: what happened`
        .map(|l| l.split_once(">: ").map_or(l, |(_, what)| what))
        .unwrap_or("no detail")
}

fn class_name(c: GuestErrorClass) -> &'static str {
    match c {
        GuestErrorClass::InvalidRequest => "invalid-request",
        GuestErrorClass::RateLimited => "rate-limited",
        GuestErrorClass::Auth => "auth",
        GuestErrorClass::ContentRefused => "content-refused",
        GuestErrorClass::NotFound => "not-found",
        GuestErrorClass::Upstream => "upstream",
    }
}

fn class_of(e: &PluginError) -> Option<GuestErrorClass> {
    match e {
        PluginError::Guest { class, .. } => Some(*class),
        _ => None,
    }
}

/// A built request, checked as an operator would want it: under the base URL, no credential,
/// a JSON body when it says so. Returns the line that describes it.
fn vet_request(m: &Manifest, req: &OutboundRequest) -> Result<String, String> {
    let url = crate::upstream::join(BASE_URL, &req.path).map_err(|why| why.to_string())?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(format!("the URL `{url}` is not http(s)"));
    }
    let secret = |text: &str| redact(text).contains("[redacted]");
    for (name, value) in &req.headers {
        if let AuthScheme::Header(h) = &m.auth
            && name.as_str().eq_ignore_ascii_case(h)
        {
            return Err(format!(
                "the request sets `{h}`, the header the host puts the credential in"
            ));
        }
        if secret(value.to_str().unwrap_or_default()) {
            return Err(format!(
                "the header `{name}` carries what looks like a credential: the host adds the credential"
            ));
        }
    }
    for (k, v) in url.query_pairs() {
        if let AuthScheme::Query(q) = &m.auth
            && k == q.as_str()
        {
            return Err(format!(
                "the query sets `{q}`, the parameter the host puts the credential in"
            ));
        }
        if secret(v.as_ref()) {
            return Err(format!(
                "the query parameter `{k}` carries what looks like a credential: the host adds the credential"
            ));
        }
    }
    let json_type = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    if json_type && serde_json::from_slice::<Value>(&req.body).is_err() {
        return Err("the body says it is JSON and does not parse as JSON".into());
    }
    Ok(format!(
        "{} {} ({} byte body)",
        req.method,
        url,
        req.body.len()
    ))
}

/// Whether a built request names the channel's model (`ctx.model`) in its path or body.
fn names_model(req: &OutboundRequest, model: &str) -> bool {
    req.path.contains(model)
        || std::str::from_utf8(&req.body).is_ok_and(|b| b.contains(model))
        || urlencode_contains(&req.path, model)
}

fn urlencode_contains(path: &str, model: &str) -> bool {
    let encoded: String = model
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    path.contains(&encoded)
}

async fn kind_checks(report: &mut Report, plugin: &Plugin, kind: &str, sample: Option<Vec<u8>>) {
    let m = &plugin.manifest;
    let ctx = context(m, kind);
    let Some(body) = sample_request(kind, false) else {
        return;
    };
    let name = format!("{kind}: build_request");
    let mut session = match plugin.session().await {
        Ok(s) => s,
        Err(e) => return report.add(name, Outcome::Fail, describe(&e)),
    };
    let built = session.build_request(&ctx, kind, &body.to_string()).await;
    // A failed build still leaves the answer's checks to run: they do not depend on it.
    let offline = match built {
        Err(e) => {
            report.add(
                name,
                Outcome::Fail,
                format!("a plain {kind} request was refused: {}", describe(&e)),
            );
            None
        }
        Ok(Outbound::Send(req)) => {
            let vetted = vet_request(m, &req).and_then(|line| {
                if req.stream {
                    Err(format!(
                        "{line}: asks the upstream for a stream the client did not request"
                    ))
                } else {
                    Ok(line)
                }
            });
            let ok = vetted.is_ok();
            report.result(name, vetted);
            if ok && !names_model(&req, &ctx.model) {
                report.add(
                    format!("{kind}: model"),
                    Outcome::Warn,
                    format!(
                        "the request does not name the channel's model `{}` (a model's `upstream_model` in config would be ignored)",
                        ctx.model
                    ),
                );
            }
            None
        }
        Ok(Outbound::Answer(resp)) => {
            report.add(
                name,
                Outcome::Pass,
                format!("answers offline (status {})", resp.status),
            );
            Some(resp)
        }
    };
    if let Some(resp) = offline {
        return offline_answer(report, &mut session, &ctx, kind, resp).await;
    }
    drop(session);
    if let Some(expect) = expect_of(kind) {
        answer_check(report, plugin, &ctx, kind, expect, sample).await;
        garbage_check(report, plugin, &ctx, kind, expect).await;
    } else {
        report.add(
            format!("{kind}: answer"),
            Outcome::Skip,
            "a successful speech answer is audio, passed to the client without the plugin",
        );
    }
    error_checks(report, plugin, &ctx, kind).await;
}

/// An offline plugin's own answer, read back the way the pipeline reads it.
async fn offline_answer(
    report: &mut Report,
    session: &mut crate::plugins::Session,
    ctx: &ChannelContext,
    kind: &str,
    resp: InboundResponse,
) {
    let name = format!("{kind}: offline answer");
    if !(200..300).contains(&resp.status) {
        return report.add(
            name,
            Outcome::Fail,
            format!(
                "the plugin answers a plain request with status {}",
                resp.status
            ),
        );
    }
    let Some(expect) = expect_of(kind) else {
        let ct = resp
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        return if ct.starts_with("audio/") && !resp.body.is_empty() {
            report.add(
                name,
                Outcome::Pass,
                format!("{} bytes of {ct}", resp.body.len()),
            )
        } else {
            report.add(
                name,
                Outcome::Fail,
                format!("speech must answer with audio/* bytes, not `{ct}`"),
            )
        };
    };
    let r = match session.parse_response(ctx, kind, resp).await {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(v) if (expect.check)(&v) => Ok(format!("{} as the route expects", expect.what)),
            _ => Err(format!("parse_response does not give {}", expect.what)),
        },
        Err(e) => Err(format!("its own answer fails to parse: {}", describe(&e))),
    };
    report.result(name, r);
}

/// A successful answer: the author's sample must translate; OpenAI's shape must translate or be
/// refused as the upstream's fault.
async fn answer_check(
    report: &mut Report,
    plugin: &Plugin,
    ctx: &ChannelContext,
    kind: &str,
    expect: &Expect,
    sample: Option<Vec<u8>>,
) {
    let strict = sample.is_some();
    let name = if strict {
        format!("{kind}: sample answer ({kind}.json)")
    } else {
        format!("{kind}: OpenAI-shaped answer")
    };
    let body = match sample {
        Some(b) => b,
        None => match openai_answer(kind) {
            Some(v) => v.to_string().into_bytes(),
            None => return,
        },
    };
    let got = parse_once(plugin, ctx, kind, response(200, "application/json", &body)).await;
    let r = match got {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(v) if (expect.check)(&v) => Ok(format!("translates to {}", expect.what)),
            _ => Err(format!(
                "parse_response gives something that is not {}",
                expect.what
            )),
        },
        Err(e) if !strict && class_of(&e) == Some(GuestErrorClass::Upstream) => Ok(format!(
            "refused as the upstream's fault ({}); the upstream speaks another format: `--samples DIR` with {kind}.json checks a real answer",
            describe(&e)
        )),
        Err(e) => Err(describe(&e)),
    };
    report.result(name, r);
}

/// A 2xx body that is no answer at all must be the upstream's fault (502), never an answer.
async fn garbage_check(
    report: &mut Report,
    plugin: &Plugin,
    ctx: &ChannelContext,
    kind: &str,
    expect: &Expect,
) {
    let mut problems = Vec::new();
    for (ct, body) in [
        (
            "text/html",
            &b"<html><body>502 Bad Gateway</body></html>"[..],
        ),
        ("application/json", &b""[..]),
        ("application/json", &b"{\"unexpected\": true}"[..]),
    ] {
        let shown = String::from_utf8_lossy(body);
        match parse_once(plugin, ctx, kind, response(200, ct, body)).await {
            Ok(text) => {
                if serde_json::from_str::<Value>(&text).is_ok_and(|v| (expect.check)(&v)) {
                    problems.push(format!("`{shown}` became {}", expect.what));
                }
                // Otherwise the host refuses the output: a 502, as it should be.
            }
            Err(e) => match class_of(&e) {
                Some(GuestErrorClass::Upstream) => {}
                Some(c) => problems.push(format!(
                    "`{shown}` is a {} error; an unusable answer is the upstream's fault (class upstream, 502)",
                    class_name(c)
                )),
                None => problems.push(format!("`{shown}`: {}", describe(&e))),
            },
        }
    }
    report.result(
        format!("{kind}: unusable answers"),
        if problems.is_empty() {
            Ok("HTML, an empty body and an unexpected object are the upstream's fault".into())
        } else {
            Err(problems.join("; "))
        },
    );
}

/// Failed statuses map to error classes; the retry hint of a 429 is passed on.
async fn error_checks(report: &mut Report, plugin: &Plugin, ctx: &ChannelContext, kind: &str) {
    let openai_error = |msg: &str, ty: &str| {
        json!({"error": {"message": msg, "type": ty, "code": ty}})
            .to_string()
            .into_bytes()
    };
    let mut problems = Vec::new();
    let mut retry_hint = None;
    let cases: [(u16, &str, Vec<u8>, Option<GuestErrorClass>); 6] = [
        (
            429,
            "application/json",
            openai_error("Rate limit reached", "rate_limit_exceeded"),
            Some(GuestErrorClass::RateLimited),
        ),
        (
            500,
            "application/json",
            openai_error("The server had an error", "server_error"),
            Some(GuestErrorClass::Upstream),
        ),
        (
            503,
            "text/html",
            b"<html>Service Unavailable</html>".to_vec(),
            Some(GuestErrorClass::Upstream),
        ),
        (
            400,
            "application/json",
            openai_error("Invalid value for 'max_tokens'", "invalid_request_error"),
            None,
        ),
        (
            401,
            "application/json",
            openai_error("Incorrect API key provided", "invalid_api_key"),
            None,
        ),
        (
            404,
            "application/json",
            openai_error("The model does not exist", "model_not_found"),
            None,
        ),
    ];
    for (status, ct, body, want) in cases {
        let mut resp = response(status, ct, &body);
        if status == 429 {
            resp.headers.push(("retry-after".into(), "7".into()));
        }
        match parse_once(plugin, ctx, kind, resp).await {
            Ok(_) => problems.push(format!("{status} was not reported as an error")),
            Err(e) => match (&e, want) {
                (PluginError::Guest { class, .. }, Some(w)) if *class != w => {
                    problems.push(format!(
                        "{status} is {}, should be {}",
                        class_name(*class),
                        class_name(w)
                    ));
                }
                (PluginError::Guest { retry_after_ms, .. }, _) => {
                    if status == 429 {
                        retry_hint = Some(*retry_after_ms);
                    }
                }
                // The host's own refusal of a status the plugin answered (401: refused credential).
                (PluginError::BadOutput { .. }, None) => {}
                _ => problems.push(format!("{status}: {}", describe(&e))),
            },
        }
    }
    report.result(
        format!("{kind}: upstream errors"),
        if problems.is_empty() {
            Ok("429 rate-limited; 500, 503 upstream; 400, 401, 404 errors".into())
        } else {
            Err(problems.join("; "))
        },
    );
    if let Some(hint) = retry_hint {
        if hint == Some(7000) {
            report.add(
                format!("{kind}: retry hint"),
                Outcome::Pass,
                "`Retry-After: 7` passed on as 7000 ms",
            );
        } else {
            report.add(
                format!("{kind}: retry hint"),
                Outcome::Warn,
                match hint {
                    Some(ms) => format!(
                        "`Retry-After: 7` became {ms} ms: clients are told to retry at the wrong time"
                    ),
                    None => "`Retry-After: 7` was dropped: clients are not told when to retry (`error_from_status` reads it)".into(),
                },
            );
        }
    }
}

/// One `parse_response` on a fresh instance (as a large request's answer is read).
async fn parse_once(
    plugin: &Plugin,
    ctx: &ChannelContext,
    kind: &str,
    resp: InboundResponse,
) -> Result<String, PluginError> {
    let mut session = plugin.session().await?;
    session.parse_response(ctx, kind, resp).await
}

/// What a stream gave: its chunks (checked to be JSON objects), whether it ended, an error.
#[derive(Default)]
struct Streamed {
    chunks: usize,
    usage: bool,
    done: bool,
    error: Option<PluginError>,
    not_objects: usize,
}

/// Feed a whole event-stream body, framed by the host's decoder, through one instance, as the
/// relay does; stop at `done` or at the first error.
async fn run_stream(plugin: &Plugin, ctx: &ChannelContext, body: &[u8]) -> Streamed {
    let mut got = Streamed::default();
    let mut dec = sse::Decoder::default();
    let mut events = dec.push(body);
    if let Ok(Some(last)) = dec.finish() {
        events.push(last);
    }
    let mut session = match plugin.session().await {
        Ok(s) => s,
        Err(e) => {
            got.error = Some(e);
            return got;
        }
    };
    for ev in events {
        match session.parse_stream_event(ctx, ev.event, ev.data).await {
            Err(e) => {
                got.error = Some(e);
                return got;
            }
            Ok(out) => {
                for c in &out.chunks {
                    match serde_json::from_str::<serde_json::Map<String, Value>>(c) {
                        Ok(obj) => {
                            got.chunks += 1;
                            got.usage |= obj.get("usage").is_some_and(Value::is_object);
                        }
                        Err(_) => got.not_objects += 1,
                    }
                }
                if out.done {
                    got.done = true;
                    return got;
                }
            }
        }
    }
    got
}

async fn stream_checks(report: &mut Report, plugin: &Plugin, sample: Option<Vec<u8>>) {
    let m = &plugin.manifest;
    let ctx = context(m, "chat");
    let name = "chat: streamed build_request";
    let Some(body) = sample_request("chat", true) else {
        return;
    };
    let built = match plugin.session().await {
        Ok(mut s) => s.build_request(&ctx, "chat", &body.to_string()).await,
        Err(e) => Err(e),
    };
    match built {
        Err(e) => {
            return report.add(
                name,
                Outcome::Fail,
                format!("a streamed chat request was refused: {}", describe(&e)),
            );
        }
        Ok(Outbound::Answer(resp)) => {
            report.add(name, Outcome::Pass, "answers offline with an event stream");
            let got = run_stream(plugin, &ctx, &resp.body).await;
            return report.result("chat: offline stream", strict_stream(&got));
        }
        Ok(Outbound::Send(req)) => {
            let r = vet_request(m, &req).and_then(|line| {
                if req.stream {
                    Ok(line)
                } else {
                    Err(format!(
                        "{line}: the client asked for a stream, the request asks for a whole answer (the client would get JSON where it expects events)"
                    ))
                }
            });
            report.result(name, r);
        }
    }
    match sample {
        Some(body) => {
            let got = run_stream(plugin, &ctx, &body).await;
            report.result("chat: sample stream (chat.sse)", strict_stream(&got));
            if got.done && !got.usage {
                report.add(
                    "chat: stream usage",
                    Outcome::Warn,
                    "no chunk carries `usage`: a stream is billed on tokens counted from its text",
                );
            }
        }
        None => {
            let got = run_stream(plugin, &ctx, openai_stream().as_bytes()).await;
            let r = match (&got.error, got.chunks, got.done) {
                (Some(e), _, _) if class_of(e) == Some(GuestErrorClass::Upstream) => Ok(format!(
                    "refused as the upstream's fault ({}); the upstream speaks another format: `--samples DIR` with chat.sse checks a real stream",
                    describe(e)
                )),
                (Some(e), _, _) => Err(describe(e)),
                _ if got.not_objects > 0 => Err(format!(
                    "{} chunk(s) are not JSON objects",
                    got.not_objects
                )),
                (None, 0, true) => Ok(
                    "ended at `[DONE]` without a chunk (its upstream speaks another format): `--samples DIR` with chat.sse checks a real stream".into(),
                ),
                (None, _, true) => Ok(format!("{} chunk(s), ended at `[DONE]`", got.chunks)),
                (None, 0, false) => Ok(
                    "reads nothing of it (its upstream speaks another format): `--samples DIR` with chat.sse checks a real stream".into(),
                ),
                (None, n, false) => Err(format!(
                    "{n} chunk(s), but `data: [DONE]` did not end the stream (the relay would call it truncated)"
                )),
            };
            report.result("chat: OpenAI-shaped stream", r);
        }
    }
    let garbage = [
        (None, "<html>502 Bad Gateway</html>"),
        (Some("error"), "{not json"),
    ];
    let mut problems = Vec::new();
    for (event, data) in garbage {
        let mut session = match plugin.session().await {
            Ok(s) => s,
            Err(e) => return report.add("chat: unusable events", Outcome::Fail, describe(&e)),
        };
        match session
            .parse_stream_event(&ctx, event.map(str::to_string), data.to_string())
            .await
        {
            Ok(out) => {
                let objects = out
                    .chunks
                    .iter()
                    .filter(|c| serde_json::from_str::<serde_json::Map<String, Value>>(c).is_ok())
                    .count();
                if objects > 0 {
                    problems.push(format!("`{data}` became {objects} chunk(s)"));
                }
            }
            Err(e) => match class_of(&e) {
                Some(GuestErrorClass::Upstream) => {}
                Some(c) => problems.push(format!(
                    "`{data}` is a {} error; should be upstream",
                    class_name(c)
                )),
                None => problems.push(format!("`{data}`: {}", describe(&e))),
            },
        }
    }
    report.result(
        "chat: unusable events",
        if problems.is_empty() {
            Ok("an HTML line and broken JSON give no chunk".into())
        } else {
            Err(problems.join("; "))
        },
    );
}

/// A stream the plugin must understand: chunks that are JSON objects, and an end.
fn strict_stream(got: &Streamed) -> Result<String, String> {
    if let Some(e) = &got.error {
        return Err(describe(e));
    }
    if got.not_objects > 0 {
        return Err(format!("{} chunk(s) are not JSON objects", got.not_objects));
    }
    if got.chunks == 0 {
        return Err("no chunk came out of it".into());
    }
    if !got.done {
        return Err(format!(
            "{} chunk(s), but the stream never ended (`done`): the relay would call it truncated",
            got.chunks
        ));
    }
    Ok(format!("{} chunk(s), then done", got.chunks))
}

async fn models_checks(report: &mut Report, plugin: &Plugin) {
    let m = &plugin.manifest;
    let ctx = context(m, "chat");
    let name = "models: build_models_request";
    let mut session = match plugin.session().await {
        Ok(s) => s,
        Err(e) => return report.add(name, Outcome::Fail, describe(&e)),
    };
    match session.build_models_request(&ctx).await {
        Err(e) => report.add(name, Outcome::Fail, describe(&e)),
        Ok(None) => report.add(
            name,
            Outcome::Skip,
            "no model list endpoint: the catalog uses the manifest's models",
        ),
        Ok(Some(Outbound::Answer(_))) => report.add(
            name,
            Outcome::Fail,
            "a model list request cannot be an answer",
        ),
        Ok(Some(Outbound::Send(req))) => {
            report.result(name, vet_request(m, &req));
            let mut s = match plugin.session().await {
                Ok(s) => s,
                Err(e) => return report.add("models: upstream error", Outcome::Fail, describe(&e)),
            };
            let r = match s
                .parse_models_response(&ctx, response(500, "text/html", b"<html>oops</html>"))
                .await
            {
                Ok(_) => Err("a 500 gave a model list".to_string()),
                Err(PluginError::Guest { .. } | PluginError::BadOutput { .. }) => {
                    Ok("a 500 is an error".to_string())
                }
                Err(e) => Err(describe(&e)),
            };
            report.result("models: upstream error", r);
        }
    }
}

/// A task provider: the submission and poll requests, and what error statuses become.
async fn task_checks(report: &mut Report, plugin: &Plugin) {
    let m = &plugin.manifest;
    let kinds: std::collections::BTreeSet<&str> = m
        .models
        .iter()
        .flat_map(|mi| mi.kinds.iter().map(String::as_str))
        .filter(|k| !m.kinds.iter().any(|d| d == k))
        .collect();
    let Some(kind) = kinds.into_iter().next() else {
        return report.add(
            "tasks",
            Outcome::Skip,
            "no model produces a kind the plugin serves only as a job",
        );
    };
    let ctx = context(m, kind);
    let input = json!({"prompt": "a lighthouse at dusk"}).to_string();
    let name = format!("tasks ({kind}): build_submit");
    let mut ts = match plugin.task_session().await {
        Some(Ok(s)) => s,
        Some(Err(e)) => return report.add(name, Outcome::Fail, describe(&e)),
        None => return,
    };
    match ts.build_submit(&ctx, kind, &input).await {
        Err(e) => report.add(
            name,
            Outcome::Fail,
            format!("a plain {kind} job was refused: {}", describe(&e)),
        ),
        Ok(Outbound::Answer(_)) => report.add(name, Outcome::Pass, "answers offline"),
        Ok(Outbound::Send(req)) => {
            report.result(name, vet_request(m, &req));
            let mut problems = Vec::new();
            for (status, want) in [
                (429, GuestErrorClass::RateLimited),
                (500, GuestErrorClass::Upstream),
            ] {
                let mut s = match plugin.task_session().await {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        problems.push(describe(&e));
                        continue;
                    }
                    None => return,
                };
                let body = json!({"detail": "failed"}).to_string().into_bytes();
                match s
                    .parse_submit(&ctx, kind, response(status, "application/json", &body))
                    .await
                {
                    Ok(_) => problems.push(format!("{status} gave a job")),
                    Err(e) if class_of(&e) == Some(want) => {}
                    Err(e) => problems.push(format!(
                        "{status}: {}, should be a {} error",
                        describe(&e),
                        class_name(want)
                    )),
                }
            }
            report.result(
                format!("tasks ({kind}): submission errors"),
                if problems.is_empty() {
                    Ok("429 rate-limited, 500 upstream".into())
                } else {
                    Err(problems.join("; "))
                },
            );
        }
    }
    let name = format!("tasks ({kind}): build_poll");
    let mut ts = match plugin.task_session().await {
        Some(Ok(s)) => s,
        Some(Err(e)) => return report.add(name, Outcome::Fail, describe(&e)),
        None => return,
    };
    match ts.build_poll(&ctx, "job123").await {
        // A plugin that checks its own job ids may refuse a made-up one, as long as it says so.
        Err(e) if class_of(&e).is_some() => report.add(
            name,
            Outcome::Skip,
            format!("refuses the made-up job id `job123` ({})", describe(&e)),
        ),
        Err(e) => report.add(name, Outcome::Fail, describe(&e)),
        Ok(Outbound::Answer(_)) => report.add(name, Outcome::Pass, "answers offline"),
        Ok(Outbound::Send(req)) => {
            report.result(name, vet_request(m, &req));
            let mut s = match plugin.task_session().await {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    return report.add(
                        format!("tasks ({kind}): unusable poll answer"),
                        Outcome::Fail,
                        describe(&e),
                    );
                }
                None => return,
            };
            let r = match s
                .parse_poll(
                    &ctx,
                    "job123",
                    response(200, "text/html", b"<html>oops</html>"),
                )
                .await
            {
                Ok(crate::plugins::JobState::Succeeded(_)) => {
                    Err("an HTML page became a finished job".to_string())
                }
                Ok(_) | Err(PluginError::Guest { .. } | PluginError::BadOutput { .. }) => {
                    Ok("an HTML page is no finished job".to_string())
                }
                Err(e) => Err(describe(&e)),
            };
            report.result(format!("tasks ({kind}): unusable poll answer"), r);
        }
    }
}

/// The prompts a policy plugin is screened with: (check name, text). Each must come back without
/// a trap, an overrun or a refused output, and none of them may be blocked.
fn policy_prompts() -> Vec<(&'static str, String)> {
    vec![
        (
            "screen: a plain question",
            "What is the capital of France?".into(),
        ),
        ("screen: an empty prompt", String::new()),
        (
            "screen: non-Latin text",
            "Пожалуйста, переведи: 今日はいい天気ですね。 مرحبا بالعالم 👋".into(),
        ),
        (
            "screen: a 64 KiB prompt",
            "Summarize the minutes of the garden club's spring meeting. ".repeat(1100),
        ),
    ]
}

/// The conformance checks of a policy component (the `policy` world): what it describes, and
/// its verdicts on ordinary prompts, through the host's own call (the gateway's limits).
pub async fn check_policy(plugin: &PolicyPlugin) -> Report {
    let mut report = Report::default();
    let semver = is_semver(&plugin.version);
    report.result(
        "describe: version",
        if semver {
            Ok(format!("{} {}", plugin.name, plugin.version))
        } else {
            Err(format!(
                "`{}` is not a semantic version (MAJOR.MINOR.PATCH)",
                plugin.version
            ))
        },
    );
    let bad: Vec<&str> = plugin
        .categories
        .iter()
        .map(String::as_str)
        .filter(|c| {
            c.is_empty()
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect();
    report.result(
        "describe: categories",
        if plugin.categories.is_empty() {
            Err("declares no category: a policy set cannot decide on its verdicts".into())
        } else if !bad.is_empty() {
            Err(format!(
                "categories must be lowercase words with `_` (as in policy files): {}",
                bad.join(", ")
            ))
        } else {
            Ok(plugin.categories.join(", "))
        },
    );
    for (check, text) in policy_prompts() {
        let input = PolicyInput {
            normalized: &text,
            original: &text,
            model: "check-model",
            route: "chat",
            policy_set: "default",
        };
        let outcome = match plugin.screen(&input).await {
            Err(e) => Err(describe(&e)),
            Ok(v) if v.action == PluginAction::Allow => Ok("allowed".to_string()),
            Ok(v) if !plugin.categories.contains(&v.category) => Err(format!(
                "a verdict of category `{}`, which it does not declare",
                v.category
            )),
            Ok(v) if v.action == PluginAction::Block => Err(format!(
                "blocked an ordinary prompt ({}: {})",
                v.category, v.rule
            )),
            Ok(v) => Ok(format!("flagged ({}: {})", v.category, v.rule)),
        };
        report.result(check, outcome);
    }
    report
}

fn is_semver(version: &str) -> bool {
    version.split(['-', '+']).next().is_some_and(|core| {
        let parts: Vec<&str> = core.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}
