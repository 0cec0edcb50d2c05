//! `POST /v1/messages`: Anthropic's Messages API in front of every chat provider, for clients
//! built on Anthropic's SDK.
//!
//! The route validates Anthropic's request and translates it once, at parse, into the unified
//! (OpenAI chat) request ([`request`]): that text is what the plugin receives and what every
//! later step reads, so admission counts, screening judges (the system prompt, every message's
//! text, tool results and calls, tool definitions) and billing reserves exactly as on
//! `/v1/chat/completions`, and any provider that serves chat (demo, openai, azure, anthropic,
//! gemini) serves this route. The answer is translated back ([`answer`]): a whole completion into
//! Anthropic's `message`, a stream into Anthropic's events through the relay's [`Events`] wire
//! (charged once, after the stream ends, as on chat). Errors use Anthropic's error body
//! (`ErrorShape::Anthropic`), a stream's failure its `error` event.
//!
//! Inline images in a chat answer (an image model's output) have no place in a message: they
//! are neither archived nor billed per image here, and are left out.

mod answer;
mod request;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorShape};

use super::dispatch::Answer;
use super::{Body, Call, Need, Reply, Served, admission, dispatch, money, relay, screen};

pub use answer::Events;

pub const ROUTE: &str = "/v1/messages";

/// Validate a Messages request and make it the unified chat request.
pub fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
    let unified = request::translate(&body.json)?;
    let model = body.model()?;
    let raw = unified.body.to_string();
    let body = Body {
        raw,
        json: unified.body,
        turn: body.turn,
    };
    let need = Need {
        prompt_tokens: 0,
        max_output_tokens: Some(unified.max_tokens),
        output: true,
        outputs: 1,
        images: 0,
        seconds: 0,
    };
    Ok(Call {
        route: ROUTE,
        kind: "chat",
        model,
        stream: unified.stream,
        body,
        need,
        prompt: super::tokens::chat,
        request_id,
    })
}

#[tracing::instrument(name = "pipeline.messages", level = "debug", skip_all, fields(model = %call.model, stream = call.stream))]
pub async fn run(st: &AppState, caller: Option<Caller>, call: Call) -> Result<Served, ApiError> {
    let id = answer::message_id(&call.request_id);
    let model = call.model.clone();
    let admitted = admission::admit(st, caller, call).await?;
    let screened = screen::screen(st, admitted).await?;
    let reserved = money::reserve(st, screened).await?;
    let d = dispatch::dispatch(st, reserved, &super::chat::COMPLETION).await?;
    let reply = match d.answer {
        Answer::Json { value, .. } => {
            let usage = super::chat::answer_usage(&value, &d.bill);
            let cost = d.bill.settle(usage).await?;
            let message = answer::message(&id, &model, &value, &usage, cost);
            Reply::Json {
                body: message.to_string(),
                cost,
            }
        }
        Answer::Stream(s) => {
            let (session, events) = *s;
            Reply::Stream(relay::relay_as(
                session,
                d.route,
                events,
                d.bill,
                None,
                Events::new(id, model),
            ))
        }
    };
    Ok(Served {
        reply,
        provider: d.provider,
    })
}

/// The route, for the server.
pub struct Messages;

impl super::Route for Messages {
    const PATH: &'static str = ROUTE;
    const ERRORS: ErrorShape = ErrorShape::Anthropic;

    fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
        parse(body, request_id)
    }

    fn run(
        st: &AppState,
        caller: Option<Caller>,
        call: Call,
    ) -> impl std::future::Future<Output = Result<Served, ApiError>> + Send {
        run(st, caller, call)
    }
}
