//! Step 4, dispatch: a reserved request through its provider plugin. One sandboxed session for
//! the request's whole life: the plugin builds the upstream request (or answers offline), the
//! host sends it with the credential, and the plugin translates the answer back, which the host
//! checks against what the route expects. A failure releases the reservation; success hands the
//! [`Bill`] to the route, which settles it (or the stream relay does, once the stream is done).

use std::pin::Pin;
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;

use crate::app::AppState;
use crate::error::ApiError;
use crate::plugins::{InboundResponse, Outbound, Session};
use crate::routing::Route;
use crate::routing::health::Outcome;
use crate::upstream::{self, UpstreamError};

use super::money::{Bill, Reserved};
use super::relay::{self, EventStream};
use super::{Body, Call, is_success};

/// What a route expects of a whole answer in the unified (OpenAI) shape.
pub struct Expect {
    /// Named in the error when the plugin's output does not fit, e.g. "a chat.completion object".
    pub what: &'static str,
    pub check: fn(&Value) -> bool,
}

/// A dispatched request: the answer, and the bill to settle on success.
pub struct Dispatched {
    pub provider: String,
    pub route: Route,
    pub bill: Bill,
    pub answer: Answer,
}

pub enum Answer {
    /// A whole answer, checked: parsed once, and its text as the plugin wrote it.
    Json { value: Value, text: String },
    /// A stream for [`relay::relay`]: the session translates each event.
    Stream(Box<(Session, EventStream)>),
}

/// A binary body as it arrives, chunk by chunk.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static>>;

/// A successful binary answer (speech): passed to the client as it arrives, never given to the
/// plugin (whose `parse-response` returns text). Only a failed status goes through the plugin,
/// which maps it to an error class.
pub struct Audio {
    /// The upstream's (or the offline plugin's) `content-type`, if it sent one.
    pub content_type: Option<String>,
    pub body: ByteStream,
}

/// A dispatched binary request: the answer, and the bill to settle once the body has passed.
pub struct AudioDispatched {
    pub provider: String,
    pub bill: Bill,
    pub audio: Audio,
}

/// What the session produced: a unified answer, or a binary one.
enum Got {
    Answer(Answer),
    Audio(Audio),
}

/// A binary answer never reaches the plugin's `parse-response`: nothing it checks.
const BINARY: Expect = Expect {
    what: "a binary body",
    check: |_| false,
};

/// [`dispatch`] for a route whose success is a binary body (speech): a 2xx upstream body (or an
/// offline plugin's 2xx answer) is streamed through as [`Audio`]; any other status is read whole
/// and given to the plugin's `parse-response`, which must map it to an error.
pub async fn dispatch_audio(
    st: &AppState,
    reserved: Reserved,
) -> Result<AudioDispatched, ApiError> {
    let (provider, _route, bill, got) = run(st, reserved, &BINARY, true).await?;
    match got {
        Got::Audio(audio) => Ok(AudioDispatched {
            provider,
            bill,
            audio,
        }),
        Got::Answer(_) => {
            bill.release().await;
            Err(ApiError::Internal("a binary answer came as JSON".into()))
        }
    }
}

#[tracing::instrument(name = "pipeline.dispatch", level = "debug", skip_all, fields(model = %reserved.screened.admitted.call.model, provider = tracing::field::Empty))]
pub async fn dispatch(
    st: &AppState,
    reserved: Reserved,
    expect: &Expect,
) -> Result<Dispatched, ApiError> {
    let (provider, route, bill, got) = run(st, reserved, expect, false).await?;
    match got {
        Got::Answer(answer) => Ok(Dispatched {
            provider,
            route,
            bill,
            answer,
        }),
        Got::Audio(_) => {
            bill.release().await;
            Err(ApiError::Internal(format!(
                "{} came as binary",
                expect.what
            )))
        }
    }
}

/// The session, the upstream call and the answer: unified (`binary` false), or a 2xx binary
/// body passed through (`binary` true).
async fn run(
    st: &AppState,
    reserved: Reserved,
    expect: &Expect,
    binary: bool,
) -> Result<(String, Route, Bill, Got), ApiError> {
    let hold = reserved.hold;
    let a = reserved.screened.admitted;
    let bill = Bill {
        hold,
        place: a.place.map(crate::limits::Admitted::dispatched),
        estimate: a.estimate,
    };
    let Call {
        kind,
        stream,
        model,
        body: Body { raw, json, turn },
        ..
    } = a.call;
    // Screening was the parsed body's last reader: free it before the plugin's copies exist.
    drop(json);
    let crate::routing::Pick {
        route,
        plugin,
        alternates,
    } = a.pick;
    // The model's channels in order: a failing one (unreachable, 5xx, rate-limited, refused
    // credential) is recorded by its breaker and the next one is tried, as long as nothing of
    // the answer has reached the client.
    let max = usize::try_from(st.config.routing.max_attempts)
        .unwrap_or(1)
        .max(1);
    let candidates: Vec<_> = std::iter::once((route, plugin))
        .chain(alternates)
        .take(max)
        .collect();
    let n = candidates.len();
    let mut raw = Some(raw);
    let mut turn = Some(turn);
    let mut failed = None;
    for (i, (route, plugin)) in candidates.into_iter().enumerate() {
        let last = i + 1 == n;
        let provider = plugin.name().to_string();
        tracing::Span::current().record("provider", provider.as_str());
        let attempt = Attempt {
            route: &route,
            plugin: &plugin,
            kind,
            stream,
            binary,
            expect,
            last,
        };
        // Boxed: the attempt's future (plugin calls, the upstream exchange) is large, and
        // moving it into this one's state would copy it.
        match Box::pin(attempt.run(st, &mut raw, &mut turn)).await {
            Ok(got) => {
                if n > 1 {
                    st.routing
                        .health()
                        .record(&route.channel.name, Outcome::Success);
                }
                return Ok((provider, route, bill, got));
            }
            Err(e) => {
                let outcome = breaker_outcome(&e);
                if let Some(o) = outcome {
                    st.routing.health().record(&route.channel.name, o);
                }
                if last || outcome.is_none() {
                    bill.release().await;
                    return Err(e);
                }
                st.metrics.failover(&model);
                tracing::warn!(channel = %route.channel.name, error = %e, "a channel failed; trying the model's next channel");
                failed = Some(e);
                tokio::time::sleep(std::time::Duration::from_millis(20 * (i as u64 + 1))).await;
            }
        }
    }
    bill.release().await;
    Err(failed.unwrap_or_else(|| ApiError::Internal("no channel to try".into())))
}

/// How a failed attempt counts for its channel's breaker; `None`: not the channel's fault (the
/// request itself, a plugin's bug), and no other channel is tried.
fn breaker_outcome(e: &ApiError) -> Option<Outcome> {
    use crate::plugins::{GuestErrorClass, PluginError};
    match e {
        ApiError::Upstream(
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Io { .. }
            | UpstreamError::Truncated { .. },
        ) => Some(Outcome::Failure),
        ApiError::Plugin(PluginError::Guest { class, .. }) => match class {
            GuestErrorClass::Auth => Some(Outcome::AuthRefused),
            GuestErrorClass::Upstream | GuestErrorClass::RateLimited => Some(Outcome::Failure),
            _ => None,
        },
        _ => None,
    }
}

/// One try of a request on one channel.
struct Attempt<'a> {
    route: &'a Route,
    plugin: &'a std::sync::Arc<crate::plugins::Plugin>,
    kind: &'static str,
    stream: bool,
    /// A 2xx body is passed through as [`Audio`] (speech).
    binary: bool,
    expect: &'a Expect,
    /// The last channel to try: the client's text is freed as soon as the plugin built the
    /// request (earlier attempts keep it for the next channel).
    last: bool,
}

impl Attempt<'_> {
    async fn run(
        &self,
        st: &AppState,
        raw: &mut Option<String>,
        turn: &mut Option<Option<super::HeavyTurn>>,
    ) -> Result<Got, ApiError> {
        let (route, plugin, kind, stream, binary, expect) = (
            self.route,
            self.plugin,
            self.kind,
            self.stream,
            self.binary,
            self.expect,
        );
        let ctx = route.context();
        let mut session = plugin.session().await?;
        let text = raw.as_deref().unwrap_or_default();
        let heavy = text.len() >= super::HEAVY_BYTES;
        let outbound = session.build_request(&ctx, kind, text).await?;
        // A large body left copies of itself in the instance's memory (the text, what the
        // plugin parsed and what it built): give that memory back now (the instance is not
        // reused) and read the answer on a fresh instance (the contract keeps no state from
        // build-request).
        if heavy {
            session.discard();
            session = plugin.fresh_session().await?;
        }
        if self.last {
            // The plugin built the upstream's body: the client's text is no longer needed, and
            // the next large request may take its turn.
            *raw = None;
            *turn = None;
        }
        match outbound {
            Outbound::Answer(resp) => {
                if binary && is_success(resp.status) {
                    let content_type = header_of(&resp.headers, "content-type");
                    let body: ByteStream =
                        Box::pin(futures::stream::iter([Ok(Bytes::from(resp.body))]));
                    Ok(Got::Audio(Audio { content_type, body }))
                } else if stream && is_success(resp.status) {
                    let events = relay::offline_events(route, resp);
                    Ok(Got::Answer(Answer::Stream(Box::new((session, events)))))
                } else {
                    finish_json(&mut session, route, kind, resp, expect)
                        .await
                        .map(Got::Answer)
                }
            }
            Outbound::Send(out) => {
                let wants_stream = out.stream;
                let target = upstream::Target {
                    channel: &route.channel.name,
                    base_url: &route.channel.base_url,
                    auth: &plugin.manifest.auth,
                    credential: route.channel.credential.as_ref(),
                };
                let started = Instant::now();
                let pending = st.upstream.send(&target, out).await;
                st.metrics
                    .upstream_duration(plugin.name(), started.elapsed());
                let pending = pending?;
                if binary && is_success(pending.status()) {
                    let content_type = pending.header("content-type");
                    let body: ByteStream = Box::pin(pending.body_stream());
                    Ok(Got::Audio(Audio { content_type, body }))
                } else if wants_stream && is_success(pending.status()) {
                    let events: EventStream = Box::pin(pending.events());
                    Ok(Got::Answer(Answer::Stream(Box::new((session, events)))))
                } else {
                    let resp = pending.read().await?;
                    finish_json(&mut session, route, kind, resp, expect)
                        .await
                        .map(Got::Answer)
                }
            }
        }
    }
}

/// A route whose answer is one JSON body (embeddings, images): every step, then the bill
/// settled on the usage `usage_of` reads from the answer (given the estimate, for an answer that
/// reports none).
pub async fn whole_json(
    st: &AppState,
    caller: Option<crate::auth::Caller>,
    call: Call,
    expect: &Expect,
    usage_of: fn(&Value, &super::money::Estimate) -> crate::billing::Usage,
) -> Result<super::Served, ApiError> {
    let admitted = super::admission::admit(st, caller, call).await?;
    whole_json_admitted(st, admitted, expect, usage_of).await
}

/// [`whole_json`] for a request already admitted (a route that looked at the pick first).
pub async fn whole_json_admitted(
    st: &AppState,
    admitted: super::admission::Admitted,
    expect: &Expect,
    usage_of: fn(&Value, &super::money::Estimate) -> crate::billing::Usage,
) -> Result<super::Served, ApiError> {
    let screened = super::screen::screen(st, admitted).await?;
    let reserved = super::money::reserve(st, screened).await?;
    let d = dispatch(st, reserved, expect).await?;
    let Answer::Json { value, text } = d.answer else {
        return Err(ApiError::Internal(format!(
            "{} came as a stream",
            expect.what
        )));
    };
    let usage = usage_of(&value, &d.bill.estimate);
    Ok(super::Served {
        reply: d.bill.settle_json(value, text, usage).await?,
        provider: d.provider,
    })
}

/// A header's value, matched case-insensitively.
fn header_of(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// Parse a whole response through the plugin and check it is what the route expects.
async fn finish_json(
    session: &mut Session,
    route: &Route,
    kind: &str,
    resp: InboundResponse,
    expect: &Expect,
) -> Result<Answer, ApiError> {
    let status = resp.status;
    let ctx = route.context();
    let body = session.parse_response(&ctx, kind, resp).await?;
    if !is_success(status) {
        // The plugin should have turned a failed upstream status into an error.
        return Err(session
            .reject_output(
                "parse_response",
                format!("upstream status {status} was not reported as an error"),
            )
            .into());
    }
    match serde_json::from_str::<Value>(&body) {
        Ok(value) if (expect.check)(&value) => Ok(Answer::Json { value, text: body }),
        _ => Err(session
            .reject_output("parse_response", format!("not {}", expect.what))
            .into()),
    }
}
