//! The stream relay: upstream server-sent events → client frames. Each event goes through the
//! plugin (one call per event), each chunk is checked to be a JSON object, and `data: [DONE]`
//! ends a stream that the plugin said was done. The request is charged once, when the stream is
//! done, with the cost put into the usage chunk; an error mid-stream becomes OpenAI's error body
//! as one event, ends the stream and charges nothing (the reservation is released). A client
//! that goes away drops the relay, its session and the upstream connection.
//!
//! What reaches the client is the [`Wire`]'s: OpenAI's chunks as the plugin wrote them
//! ([`OpenAiWire`]), or another API's events made from them (`messages::Events`, Anthropic's).

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Map, Value};

use crate::billing::{Credits, Usage};
use crate::error::ApiError;
use crate::plugins::{InboundResponse, PluginError, Session};
use crate::routing::Route;
use crate::upstream::{UpstreamError, sse};

use super::FrameStream;
use super::money::{Bill, add_cost, usage_of};

pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<sse::Event, UpstreamError>> + Send + 'static>>;

/// An offline plugin answered with an SSE body: frame it into events.
pub fn offline_events(route: &Route, resp: InboundResponse) -> EventStream {
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

/// How a relayed stream is written for the client. The relay reads, checks, bills and archives;
/// the wire only shapes frames.
pub trait Wire: Send + 'static {
    /// One chunk of the unified stream (a `chat.completion.chunk`): its text and its object.
    fn chunk(&mut self, text: &str, chunk: &Map<String, Value>, out: &mut VecDeque<Bytes>);
    /// The stream is done and settled: the usage chunk the upstream sent (held back until now,
    /// if there was one), the usage charged, and its cost (`None`: unbilled).
    fn done(
        &mut self,
        usage_chunk: Option<Map<String, Value>>,
        usage: &Usage,
        cost: Option<Credits>,
        out: &mut VecDeque<Bytes>,
    );
    /// The stream failed: its last frame.
    fn error(&mut self, err: &ApiError, out: &mut VecDeque<Bytes>);
}

/// OpenAI's stream: the chunks as they are, the usage chunk with the cost, then `data: [DONE]`;
/// an error as OpenAI's error body in one `data:` event.
pub struct OpenAiWire;

impl Wire for OpenAiWire {
    fn chunk(&mut self, text: &str, _: &Map<String, Value>, out: &mut VecDeque<Bytes>) {
        out.push_back(data_frame(text));
    }

    fn done(
        &mut self,
        usage_chunk: Option<Map<String, Value>>,
        _: &Usage,
        cost: Option<Credits>,
        out: &mut VecDeque<Bytes>,
    ) {
        if let Some(chunk) = usage_chunk {
            let mut v = Value::Object(chunk);
            if let Some(c) = cost {
                add_cost(&mut v, c);
            }
            out.push_back(data_frame(&v.to_string()));
        }
        out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    }

    fn error(&mut self, err: &ApiError, out: &mut VecDeque<Bytes>) {
        out.push_back(data_frame(&err.openai_body().to_string()));
    }
}

struct Relay<W> {
    wire: W,
    session: Session,
    route: Route,
    events: EventStream,
    queue: VecDeque<Bytes>,
    finished: bool,
    /// The bill; dropped unsettled (error, truncation, disconnect), the reservation is released.
    bill: Option<Bill>,
    /// The chunk that carried `usage`, held back until the stream is done so the cost can go in.
    usage_chunk: Option<Map<String, Value>>,
    /// The latest usage the upstream reported.
    last_usage: Option<Usage>,
    /// Where a chunk's inline images are archived (and under which request id), and how many
    /// chunks had images so far.
    media: Option<(crate::tasks::Archive, String)>,
    image_chunks: u64,
    images: u64,
    /// Bytes of content streamed, to count tokens when the upstream reports no usage.
    content_chars: u64,
}

/// Relay a dispatched stream to the client in OpenAI's shape (see the module's doc).
pub fn relay(
    session: Session,
    route: Route,
    events: EventStream,
    bill: Bill,
    media: Option<(crate::tasks::Archive, String)>,
) -> FrameStream {
    relay_as(session, route, events, bill, media, OpenAiWire)
}

/// Relay a dispatched stream to the client in the shape `wire` writes.
pub fn relay_as<W: Wire>(
    session: Session,
    route: Route,
    events: EventStream,
    bill: Bill,
    media: Option<(crate::tasks::Archive, String)>,
    wire: W,
) -> FrameStream {
    let relay = Relay {
        wire,
        media,
        image_chunks: 0,
        images: 0,
        session,
        route,
        events,
        queue: VecDeque::new(),
        finished: false,
        bill: Some(bill),
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
                Some(Ok(ev)) => r.event(ev).await,
            }
        }
    }))
}

impl<W: Wire> Relay<W> {
    /// One upstream event through the plugin: its chunks queued, the usage chunk held back.
    async fn event(&mut self, ev: sse::Event) {
        let ctx = self.route.context();
        let out = match self
            .session
            .parse_stream_event(&ctx, ev.event, ev.data)
            .await
        {
            Ok(out) => out,
            Err(e) => return self.fail(&ApiError::from(e)),
        };
        for chunk in out.chunks {
            let Ok(obj) = serde_json::from_str::<Map<String, Value>>(&chunk) else {
                let e: PluginError = self
                    .session
                    .reject_output("parse_stream_event", "chunk is not a JSON object");
                return self.fail(&ApiError::from(e));
            };
            if obj.get("usage").is_some_and(Value::is_object) {
                self.last_usage = usage_of(&obj);
                let no_choices = obj
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
                if no_choices {
                    self.usage_chunk = Some(obj);
                    continue;
                }
            }
            self.content_chars += streamed_chars(&obj);
            let has_images = chunk.contains("\"images\"") && chunk.contains("data:");
            match (&self.media, has_images) {
                (Some((archive, request_id)), true) => {
                    let mut v = Value::Object(obj);
                    let seq = self.image_chunks;
                    match super::media::archive_chunk_images(archive, request_id, &mut v, seq).await
                    {
                        Ok(n) => {
                            self.image_chunks += 1;
                            self.images += n;
                            if let Value::Object(obj) = &v {
                                self.wire.chunk(&v.to_string(), obj, &mut self.queue);
                            }
                        }
                        Err(e) => return self.fail(&e),
                    }
                }
                _ => self.wire.chunk(&chunk, &obj, &mut self.queue),
            }
        }
        if out.done && !self.finished {
            self.complete().await;
        }
    }

    fn fail(&mut self, err: &ApiError) {
        tracing::warn!(kind = err.kind(), error = %err, "stream failed");
        self.wire.error(err, &mut self.queue);
        self.finished = true;
        // Dropping the bill releases the reservation.
        self.bill = None;
    }

    /// The stream is done: charge once, put the cost in the usage chunk, then `[DONE]`.
    async fn complete(&mut self) {
        self.finished = true;
        let Some(bill) = self.bill.take() else {
            return;
        };
        let mut usage = self.last_usage.unwrap_or(Usage {
            prompt_tokens: bill.estimate.usage.prompt_tokens,
            completion_tokens: self.content_chars.div_ceil(4),
            ..Usage::default()
        });
        usage.images = self.images;
        match bill.settle(usage).await {
            Ok(cost) => {
                let chunk = self.usage_chunk.take();
                self.wire.done(chunk, &usage, cost, &mut self.queue);
            }
            Err(e) => {
                tracing::warn!(kind = e.kind(), error = %e, "stream failed");
                self.wire.error(&e, &mut self.queue);
            }
        }
    }
}

/// Bytes of `delta.content` in a chunk's choices.
fn streamed_chars(chunk: &Map<String, Value>) -> u64 {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.pointer("/delta/content").and_then(Value::as_str))
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
