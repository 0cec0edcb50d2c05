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
    pub raw: String,
}

#[derive(Deserialize)]
struct Shape<'a> {
    #[serde(borrow)]
    model: Option<&'a serde_json::value::RawValue>,
    messages: Option<Vec<Message<'a>>>,
    stream: Option<serde_json::Value>,
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
        Ok(Self { model, stream, raw })
    }
}

/// The answer: a whole JSON body, or a stream of SSE frames ready for the wire.
pub enum ChatReply {
    Json {
        body: String,
        provider: String,
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
pub async fn chat(st: &AppState, req: ChatRequest) -> Result<ChatReply, ApiError> {
    let pick = st.routing.pick(&req.model)?;
    let provider = pick.plugin.name().to_string();
    tracing::Span::current().record("provider", provider.as_str());
    let route = pick.route;
    let ctx = route.context();
    let mut session = pick.plugin.session()?;
    let outbound = session.build_request(&ctx, "chat", &req.raw)?;
    match outbound {
        Outbound::Answer(resp) => {
            if req.stream && is_success(resp.status) {
                let frames = offline_stream(session, route, resp);
                Ok(ChatReply::Stream { frames, provider })
            } else {
                let body = finish_json(&mut session, &route, resp)?;
                Ok(ChatReply::Json { body, provider })
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
                let events = pending.events();
                let frames = relay_stream(session, route, events);
                Ok(ChatReply::Stream { frames, provider })
            } else {
                let resp = pending.read().await?;
                let body = finish_json(&mut session, &route, resp)?;
                Ok(ChatReply::Json { body, provider })
            }
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

/// An offline plugin answered with an SSE body: frame it and run it through the plugin.
fn offline_stream(session: Session, route: Route, resp: InboundResponse) -> FrameStream {
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
    relay_stream(session, route, futures::stream::iter(events))
}

struct Relay<S> {
    session: Session,
    route: Route,
    events: Pin<Box<S>>,
    queue: VecDeque<Bytes>,
    finished: bool,
}

/// Turn upstream events into client frames: each event through the plugin, each chunk checked,
/// `data: [DONE]` at the end; an error mid-stream becomes an error event and ends the stream.
fn relay_stream<S>(session: Session, route: Route, events: S) -> FrameStream
where
    S: Stream<Item = Result<sse::Event, UpstreamError>> + Send + 'static,
{
    let relay = Relay {
        session,
        route,
        events: Box::pin(events),
        queue: VecDeque::new(),
        finished: false,
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
                    r.queue.push_back(error_frame(&err));
                    r.finished = true;
                }
                Some(Err(e)) => {
                    r.queue.push_back(error_frame(&ApiError::from(e)));
                    r.finished = true;
                }
                Some(Ok(ev)) => {
                    let ctx = r.route.context();
                    match r.session.parse_stream_event(&ctx, ev.event, ev.data) {
                        Err(e) => {
                            r.queue.push_back(error_frame(&ApiError::from(e)));
                            r.finished = true;
                        }
                        Ok(out) => {
                            for chunk in out.chunks {
                                if !is_json_object(&chunk) {
                                    let e: PluginError = r.session.reject_output(
                                        "parse_stream_event",
                                        "chunk is not a JSON object",
                                    );
                                    r.queue.push_back(error_frame(&ApiError::from(e)));
                                    r.finished = true;
                                    break;
                                }
                                r.queue.push_back(data_frame(&chunk));
                            }
                            if out.done && !r.finished {
                                r.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                                r.finished = true;
                            }
                        }
                    }
                }
            }
        }
    }))
}

fn is_json_object(text: &str) -> bool {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).is_ok()
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
