//! `POST /v1/chat/completions` as plain calls, top to bottom: pick → build → send → parse.
//!
//! The plugin session (one sandboxed instance) lives as long as the request; a streamed reply
//! carries it and the upstream connection inside the response stream, so a client that goes away
//! drops both and the upstream sees the cancel.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;

use crate::app::AppState;
use crate::auth::Caller;
use crate::billing::{Credits, Hold, Usage};
use crate::error::ApiError;
use crate::plugins::{InboundResponse, Outbound, PluginError, Session};
use crate::routing::Route;
use crate::upstream::{self, UpstreamError, sse};

pub const ROUTE: &str = "/v1/chat/completions";

/// A validated chat request: the fields the host needs, and the client's JSON text untouched
/// (the plugin translates it; the host never re-serializes the body).
#[derive(Debug)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    /// `max_completion_tokens` or `max_tokens`, if the client set one.
    pub max_output_tokens: Option<u64>,
    pub raw: String,
}

impl ChatRequest {
    /// A generous upper estimate of the prompt's tokens, from its size (about 3 bytes a token
    /// for English; the estimate only sizes the reservation, the charge uses the real count).
    pub fn prompt_token_estimate(&self) -> u64 {
        (self.raw.len() as u64).div_ceil(3) + 8
    }
}

#[derive(Deserialize)]
struct Shape<'a> {
    #[serde(borrow)]
    model: Option<&'a serde_json::value::RawValue>,
    messages: Option<Vec<Message<'a>>>,
    stream: Option<serde_json::Value>,
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Option<&'a serde_json::value::RawValue>,
}

impl ChatRequest {
    /// Validate a body: a JSON object with a string `model`, a non-empty `messages` array of
    /// objects with a string `role`, and a boolean `stream` if present.
    pub fn parse(body: Bytes) -> Result<Self, ApiError> {
        let raw = String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::invalid("the request body is not valid UTF-8", None))?;
        let shape: Shape<'_> = serde_json::from_str(&raw).map_err(|e| {
            ApiError::invalid(
                format!("the request body is not a valid JSON object: {e}"),
                None,
            )
        })?;
        let model = match shape.model {
            None => {
                return Err(ApiError::invalid(
                    "you must provide a model parameter",
                    Some("model"),
                ));
            }
            Some(v) => match serde_json::from_str::<String>(v.get()) {
                Ok(m) if !m.trim().is_empty() => m,
                _ => {
                    return Err(ApiError::invalid(
                        "`model` must be a non-empty string",
                        Some("model"),
                    ));
                }
            },
        };
        let Some(messages) = shape.messages else {
            return Err(ApiError::invalid(
                "missing required parameter: `messages`",
                Some("messages"),
            ));
        };
        if messages.is_empty() {
            return Err(ApiError::invalid(
                "`messages` must contain at least one message",
                Some("messages"),
            ));
        }
        for m in &messages {
            let ok = m
                .role
                .is_some_and(|r| serde_json::from_str::<String>(r.get()).is_ok());
            if !ok {
                return Err(ApiError::invalid(
                    "every message needs a string `role`",
                    Some("messages"),
                ));
            }
        }
        let stream = match shape.stream {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(_) => {
                return Err(ApiError::invalid(
                    "`stream` must be a boolean",
                    Some("stream"),
                ));
            }
        };
        let max_of = |v: Option<serde_json::Value>, name: &'static str| match v {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_u64().filter(|n| *n > 0).map(Some).ok_or_else(|| {
                ApiError::invalid(format!("`{name}` must be a positive integer"), Some(name))
            }),
        };
        let max_output_tokens = max_of(shape.max_completion_tokens, "max_completion_tokens")?
            .or(max_of(shape.max_tokens, "max_tokens")?);
        Ok(Self {
            model,
            stream,
            max_output_tokens,
            raw,
        })
    }
}

/// The answer: a whole JSON body, or a stream of SSE frames ready for the wire.
pub enum ChatReply {
    Json {
        body: String,
        provider: String,
        /// What the request cost (`None` for an anonymous, unbilled request).
        cost: Option<Credits>,
    },
    Stream {
        frames: FrameStream,
        provider: String,
    },
}

pub type FrameStream = Pin<Box<dyn Stream<Item = Bytes> + Send + 'static>>;

/// What the host checks of a unified response: it must be a chat completion.
#[derive(Deserialize)]
struct CompletionCheck {
    #[serde(rename = "choices")]
    _choices: Vec<serde::de::IgnoredAny>,
}

#[tracing::instrument(name = "pipeline.chat", level = "debug", skip_all, fields(model = %req.model, stream = req.stream, provider = tracing::field::Empty))]
pub async fn chat(
    st: &AppState,
    caller: Option<&Caller>,
    request_id: &str,
    req: ChatRequest,
) -> Result<ChatReply, ApiError> {
    let pick = st.routing.pick(&req.model)?;
    // Admission: an anonymous caller only for the models config opens to everyone.
    match caller {
        None if !pick.route.anonymous => {
            return Err(crate::auth::AuthError::Missing.into());
        }
        Some(c) if !c.allows_model(&req.model) => {
            return Err(ApiError::ModelNotAllowed(req.model.clone()));
        }
        _ => {}
    }
    let price = pick.price();
    let max_out = req
        .max_output_tokens
        .or_else(|| {
            pick.model_info()
                .and_then(|m| m.max_output_tokens)
                .map(u64::from)
        })
        .unwrap_or(st.config.billing.default_max_output_tokens);
    let prompt_estimate = req.prompt_token_estimate();
    let estimate = price.cost(&Usage {
        prompt_tokens: prompt_estimate,
        completion_tokens: max_out,
        ..Usage::default()
    });
    // Throttling: the key's own limits; a refusal here has consumed nothing.
    let admitted = match caller {
        Some(c) => {
            st.limiter
                .admit(
                    &st.billing,
                    crate::limits::Ask {
                        account_id: &c.account_id,
                        key_id: &c.key_id,
                        limits: &c.limits,
                        tokens: prompt_estimate.saturating_add(max_out),
                        estimate,
                    },
                )
                .await?
        }
        None => None,
    };
    // Screening: a blocked prompt is refused here, before any money moves or any upstream sees it.
    let body: serde_json::Value = serde_json::from_str(&req.raw)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    let set = caller.map_or("default", |c| c.policy_set.as_str());
    st.moderator.screen(
        &body,
        &crate::moderation::ScreenRequest {
            policy_set: set,
            key_id: caller.map(|c| c.key_id.as_str()),
            request_id,
            model: &req.model,
            route: ROUTE,
        },
    )?;
    let provider = pick.plugin.name().to_string();
    tracing::Span::current().record("provider", provider.as_str());
    let hold = match caller {
        Some(c) => Some(
            st.billing
                .reserve(
                    &c.account_id,
                    &c.key_id,
                    request_id,
                    &req.model,
                    estimate,
                    price,
                )
                .await?,
        ),
        None => None,
    };
    let billing = Billed {
        hold,
        admitted,
        prompt_estimate,
    };
    dispatch(st, pick, req, provider, billing).await
}

/// What billing needs to follow a request to its end.
struct Billed {
    hold: Option<Hold>,
    /// The key's place under its limits, until the request ends.
    admitted: Option<crate::limits::Admitted>,
    prompt_estimate: u64,
}

impl Billed {
    /// Settle on success; an unbilled request costs nothing.
    async fn settle(self, usage: Usage) -> Result<Option<Credits>, ApiError> {
        let cost = match self.hold {
            Some(h) => Some(h.settle(usage).await?),
            None => None,
        };
        if let Some(a) = self.admitted {
            let tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
            a.finish(tokens, cost.unwrap_or_default());
        }
        Ok(cost)
    }

    async fn release(self) {
        if let Some(h) = self.hold {
            h.release().await;
        }
    }
}

async fn dispatch(
    st: &AppState,
    pick: crate::routing::Pick,
    req: ChatRequest,
    provider: String,
    billing: Billed,
) -> Result<ChatReply, ApiError> {
    let route = pick.route;
    let ctx = route.context();
    let result = async {
        let mut session = pick.plugin.session()?;
        let outbound = session.build_request(&ctx, "chat", &req.raw)?;
        match outbound {
            Outbound::Answer(resp) => {
                if req.stream && is_success(resp.status) {
                    Ok(Step::Stream(Box::new((session, Source::Offline(resp)))))
                } else {
                    let body = finish_json(&mut session, &route, resp)?;
                    Ok(Step::Json(body))
                }
            }
            Outbound::Send(out) => {
                let wants_stream = out.stream;
                let target = upstream::Target {
                    channel: &route.channel.name,
                    base_url: &route.channel.base_url,
                    auth: &pick.plugin.manifest.auth,
                    credential: route.channel.credential.as_ref(),
                };
                let started = Instant::now();
                let pending = st.upstream.send(&target, out).await;
                st.metrics.upstream_duration(&provider, started.elapsed());
                let pending = pending?;
                if wants_stream && is_success(pending.status()) {
                    Ok(Step::Stream(Box::new((session, Source::Upstream(pending)))))
                } else {
                    let resp = pending.read().await?;
                    let body = finish_json(&mut session, &route, resp)?;
                    Ok(Step::Json(body))
                }
            }
        }
    }
    .await;
    match result {
        Err(e) => {
            billing.release().await;
            Err(e)
        }
        Ok(Step::Json(body)) => {
            let mut value: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| ApiError::Internal(format!("checked body no longer parses: {e}")))?;
            let usage = usage_of(&value).unwrap_or_else(|| Usage {
                prompt_tokens: billing.prompt_estimate,
                completion_tokens: counted_completion_tokens(&value),
                ..Usage::default()
            });
            let cost = billing.settle(usage).await?;
            let body = match cost {
                Some(c) => {
                    add_cost(&mut value, c);
                    value.to_string()
                }
                None => body,
            };
            Ok(ChatReply::Json {
                body,
                provider,
                cost,
            })
        }
        Ok(Step::Stream(step)) => {
            let (session, source) = *step;
            let events: EventStream = match source {
                Source::Offline(resp) => offline_events(&route, resp),
                Source::Upstream(pending) => Box::pin(pending.events()),
            };
            let frames = relay_stream(session, route, events, billing);
            Ok(ChatReply::Stream { frames, provider })
        }
    }
}

enum Step {
    Json(String),
    Stream(Box<(Session, Source)>),
}

enum Source {
    Offline(InboundResponse),
    Upstream(upstream::Pending),
}

type EventStream = Pin<Box<dyn Stream<Item = Result<sse::Event, UpstreamError>> + Send + 'static>>;

/// The usage an upstream reported, if it did.
fn usage_of(v: &serde_json::Value) -> Option<Usage> {
    let u = v.get("usage")?.as_object()?;
    Some(Usage {
        prompt_tokens: u.get("prompt_tokens")?.as_u64()?,
        completion_tokens: u
            .get("completion_tokens")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        ..Usage::default()
    })
}

/// Tokens of a completion that came without usage: about four characters a token.
fn counted_completion_tokens(v: &serde_json::Value) -> u64 {
    let chars: usize = v
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    c.pointer("/message/content")
                        .and_then(serde_json::Value::as_str)
                })
                .map(str::len)
                .sum()
        })
        .unwrap_or(0);
    (chars as u64).div_ceil(4)
}

/// Say what the request cost, in the usage object.
fn add_cost(v: &mut serde_json::Value, cost: Credits) {
    if let Some(obj) = v.as_object_mut() {
        let usage = obj.entry("usage").or_insert_with(|| serde_json::json!({}));
        if let Some(u) = usage.as_object_mut() {
            u.insert("cost".into(), serde_json::Value::String(cost.to_string()));
            u.insert("cost_picodollars".into(), serde_json::Value::from(cost.0));
        }
    }
}

fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// Parse a whole response through the plugin and check the result is a chat completion.
fn finish_json(
    session: &mut Session,
    route: &Route,
    resp: InboundResponse,
) -> Result<String, ApiError> {
    let status = resp.status;
    let ctx = route.context();
    let body = session.parse_response(&ctx, "chat", resp)?;
    if !is_success(status) {
        // The plugin should have turned a failed upstream status into an error.
        return Err(session
            .reject_output(
                "parse_response",
                format!("upstream status {status} was not reported as an error"),
            )
            .into());
    }
    if serde_json::from_str::<CompletionCheck>(&body).is_err() {
        return Err(session
            .reject_output("parse_response", "not a chat.completion object")
            .into());
    }
    Ok(body)
}

/// An offline plugin answered with an SSE body: frame it into events.
fn offline_events(route: &Route, resp: InboundResponse) -> EventStream {
    let mut dec = sse::Decoder::default();
    let mut events: Vec<Result<sse::Event, UpstreamError>> =
        dec.push(&resp.body).into_iter().map(Ok).collect();
    match dec.finish() {
        Ok(Some(ev)) => events.push(Ok(ev)),
        Ok(None) => {}
        Err(sse::Truncated) => events.push(Err(UpstreamError::Truncated {
            channel: route.channel.name.clone(),
        })),
    }
    Box::pin(futures::stream::iter(events))
}

struct Relay {
    session: Session,
    route: Route,
    events: EventStream,
    queue: VecDeque<Bytes>,
    finished: bool,
    /// The reservation; dropped unsettled (error, truncation, disconnect), it is released.
    billing: Option<Billed>,
    /// The chunk that carried `usage`, held back until the stream is done so the cost can go in.
    usage_chunk: Option<serde_json::Map<String, serde_json::Value>>,
    /// The latest usage the upstream reported.
    last_usage: Option<Usage>,
    /// Characters of content streamed, to count tokens when the upstream reports no usage.
    content_chars: u64,
}

/// Turn upstream events into client frames: each event through the plugin, each chunk checked,
/// `data: [DONE]` at the end. The request is charged once, when the stream is done; an error
/// mid-stream becomes an error event, ends the stream, and charges nothing.
fn relay_stream(
    session: Session,
    route: Route,
    events: EventStream,
    billing: Billed,
) -> FrameStream {
    let relay = Relay {
        session,
        route,
        events,
        queue: VecDeque::new(),
        finished: false,
        billing: Some(billing),
        usage_chunk: None,
        last_usage: None,
        content_chars: 0,
    };
    Box::pin(futures::stream::unfold(relay, |mut r| async move {
        loop {
            if let Some(frame) = r.queue.pop_front() {
                return Some((frame, r));
            }
            if r.finished {
                return None;
            }
            match r.events.next().await {
                None => {
                    // The upstream ended without saying it was done.
                    let err = ApiError::from(UpstreamError::Truncated {
                        channel: r.route.channel.name.clone(),
                    });
                    r.fail(&err);
                }
                Some(Err(e)) => r.fail(&ApiError::from(e)),
                Some(Ok(ev)) => {
                    let ctx = r.route.context();
                    match r.session.parse_stream_event(&ctx, ev.event, ev.data) {
                        Err(e) => r.fail(&ApiError::from(e)),
                        Ok(out) => {
                            for chunk in out.chunks {
                                let Ok(obj) = serde_json::from_str::<
                                    serde_json::Map<String, serde_json::Value>,
                                >(&chunk) else {
                                    let e: PluginError = r.session.reject_output(
                                        "parse_stream_event",
                                        "chunk is not a JSON object",
                                    );
                                    r.fail(&ApiError::from(e));
                                    break;
                                };
                                if obj.get("usage").is_some_and(serde_json::Value::is_object) {
                                    r.last_usage =
                                        usage_of(&serde_json::Value::Object(obj.clone()));
                                    let no_choices = obj
                                        .get("choices")
                                        .and_then(serde_json::Value::as_array)
                                        .is_none_or(Vec::is_empty);
                                    if no_choices {
                                        r.usage_chunk = Some(obj);
                                        continue;
                                    }
                                }
                                r.content_chars += streamed_chars(&obj);
                                r.queue.push_back(data_frame(&chunk));
                            }
                            if out.done && !r.finished {
                                r.complete().await;
                            }
                        }
                    }
                }
            }
        }
    }))
}

impl Relay {
    fn fail(&mut self, err: &ApiError) {
        self.queue.push_back(error_frame(err));
        self.finished = true;
        // Dropping the hold releases the reservation.
        self.billing = None;
    }

    /// The stream is done: charge once, put the cost in the usage chunk, then `[DONE]`.
    async fn complete(&mut self) {
        self.finished = true;
        let Some(billing) = self.billing.take() else {
            return;
        };
        let prompt_estimate = billing.prompt_estimate;
        let usage = self.last_usage.unwrap_or(Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: self.content_chars.div_ceil(4),
            ..Usage::default()
        });
        match billing.settle(usage).await {
            Ok(cost) => {
                if let Some(mut chunk) = self.usage_chunk.take() {
                    let mut v = serde_json::Value::Object(std::mem::take(&mut chunk));
                    if let Some(c) = cost {
                        add_cost(&mut v, c);
                    }
                    self.queue.push_back(data_frame(&v.to_string()));
                }
                self.queue
                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            Err(e) => {
                self.queue.push_back(error_frame(&e));
            }
        }
    }
}

fn streamed_chars(chunk: &serde_json::Map<String, serde_json::Value>) -> u64 {
    chunk
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    c.pointer("/delta/content")
                        .and_then(serde_json::Value::as_str)
                })
                .map(|t| t.len() as u64)
                .sum()
        })
        .unwrap_or(0)
}

fn data_frame(json: &str) -> Bytes {
    let mut s = String::with_capacity(json.len() + 8);
    s.push_str("data: ");
    s.push_str(json);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// An error after the stream started: OpenAI's error body as one event, then the stream ends.
fn error_frame(err: &ApiError) -> Bytes {
    tracing::warn!(kind = err.kind(), error = %err, "stream failed");
    data_frame(&err.openai_body().to_string())
}
