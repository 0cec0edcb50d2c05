//! Step 4, dispatch: a reserved request through its provider plugin. One sandboxed session for
//! the request's whole life: the plugin builds the upstream request (or answers offline), the
//! host sends it with the credential, and the plugin translates the answer back, which the host
//! checks against what the route expects. A failure releases the reservation; success hands the
//! [`Bill`] to the route, which settles it (or the stream relay does, once the stream is done).

use std::time::Instant;

use serde_json::Value;

use crate::app::AppState;
use crate::error::ApiError;
use crate::plugins::{InboundResponse, Outbound, Session};
use crate::routing::Route;
use crate::upstream;

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

#[tracing::instrument(name = "pipeline.dispatch", level = "debug", skip_all, fields(model = %reserved.screened.admitted.call.model, provider = tracing::field::Empty))]
pub async fn dispatch(
    st: &AppState,
    reserved: Reserved,
    expect: &Expect,
) -> Result<Dispatched, ApiError> {
    let hold = reserved.hold;
    let a = reserved.screened.admitted;
    let bill = Bill {
        hold,
        place: a.place.map(crate::limits::Admitted::dispatched),
        estimate: a.estimate,
    };
    let pick = a.pick;
    let Call {
        kind,
        stream,
        body: Body { raw, json },
        ..
    } = a.call;
    // Screening was the parsed body's last reader: free it before the plugin's copies exist.
    drop(json);
    let provider = pick.plugin.name().to_string();
    tracing::Span::current().record("provider", provider.as_str());
    let route = pick.route;
    let result = async {
        let ctx = route.context();
        let mut session = pick.plugin.session()?;
        let outbound = super::heavy(raw.len(), || session.build_request(&ctx, kind, &raw))?;
        // The plugin built the upstream's body: the client's text is no longer needed.
        drop(raw);
        match outbound {
            Outbound::Answer(resp) => {
                if stream && is_success(resp.status) {
                    let events = relay::offline_events(&route, resp);
                    Ok(Answer::Stream(Box::new((session, events))))
                } else {
                    finish_json(&mut session, &route, kind, resp, expect)
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
                    let events: EventStream = Box::pin(pending.events());
                    Ok(Answer::Stream(Box::new((session, events))))
                } else {
                    let resp = pending.read().await?;
                    finish_json(&mut session, &route, kind, resp, expect)
                }
            }
        }
    }
    .await;
    match result {
        Ok(answer) => Ok(Dispatched {
            provider,
            route,
            bill,
            answer,
        }),
        Err(e) => {
            bill.release().await;
            Err(e)
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
    let screened = super::screen::screen(st, admitted)?;
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

/// Parse a whole response through the plugin and check it is what the route expects.
fn finish_json(
    session: &mut Session,
    route: &Route,
    kind: &str,
    resp: InboundResponse,
    expect: &Expect,
) -> Result<Answer, ApiError> {
    let status = resp.status;
    let ctx = route.context();
    let body = super::heavy(resp.body.len(), || session.parse_response(&ctx, kind, resp))?;
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
