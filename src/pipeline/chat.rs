//! `POST /v1/chat/completions`: the route's own logic only. It validates the body (a string
//! `model`, a non-empty `messages` array of objects with a string `role`, a boolean `stream`,
//! positive `max_completion_tokens`/`max_tokens` and `n`), says what the request may use, runs
//! the shared steps, and settles a whole answer or relays a stream.

use serde_json::Value;

use crate::app::AppState;
use crate::auth::Caller;
use crate::billing::Usage;
use crate::error::ApiError;

use super::dispatch::{Answer, Expect};
use super::money::usage_of;
use super::{Body, Call, Need, Reply, Served, admission, dispatch, money, relay, screen};

pub const ROUTE: &str = "/v1/chat/completions";

/// OpenAI's upper bound on `n`.
const MAX_CHOICES: u64 = 128;

/// The answer must be a chat completion.
pub const COMPLETION: Expect = Expect {
    what: "a chat.completion object",
    check: |v| v.get("choices").is_some_and(Value::is_array),
};

/// Validate a chat request.
pub fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
    let model = body.model()?;
    let messages = match body.json.get("messages") {
        Some(Value::Array(m)) => m,
        None => {
            return Err(ApiError::invalid(
                "missing required parameter: `messages`",
                Some("messages"),
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "`messages` must be an array of messages",
                Some("messages"),
            ));
        }
    };
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message",
            Some("messages"),
        ));
    }
    if !messages
        .iter()
        .all(|m| m.get("role").is_some_and(Value::is_string))
    {
        return Err(ApiError::invalid(
            "every message needs a string `role`",
            Some("messages"),
        ));
    }
    let stream = body.flag("stream")?;
    let max_output_tokens = body
        .positive("max_completion_tokens")?
        .or(body.positive("max_tokens")?);
    let outputs = body.positive("n")?.unwrap_or(1);
    if outputs > MAX_CHOICES {
        return Err(ApiError::invalid(
            format!("`n` must be at most {MAX_CHOICES}"),
            Some("n"),
        ));
    }
    let need = Need {
        prompt_tokens: 0,
        max_output_tokens,
        output: true,
        outputs,
        images: 0,
        seconds: 0,
    };
    Ok(Call {
        route: ROUTE,
        kind: "chat",
        model,
        stream,
        body,
        need,
        prompt: super::tokens::chat,
        request_id,
    })
}

#[tracing::instrument(name = "pipeline.chat", level = "debug", skip_all, fields(model = %call.model, stream = call.stream))]
pub async fn run(st: &AppState, caller: Option<Caller>, call: Call) -> Result<Served, ApiError> {
    let request_id = call.request_id.clone();
    let admitted = admission::admit(st, caller, call).await?;
    let screened = screen::screen(st, admitted).await?;
    let reserved = money::reserve(st, screened).await?;
    let d = dispatch::dispatch(st, reserved, &COMPLETION).await?;
    let reply = match d.answer {
        Answer::Json { mut value, text } => {
            // Inline images become links to our storage (and are billed per image).
            let images = match super::media::archive_chat_images(st, &request_id, &mut value).await
            {
                Ok(n) => n,
                Err(e) => {
                    d.bill.release().await;
                    return Err(e);
                }
            };
            let text = if images > 0 { value.to_string() } else { text };
            let mut usage = answer_usage(&value, &d.bill);
            usage.images = images;
            d.bill.settle_json(value, text, usage).await?
        }
        Answer::Stream(s) => {
            let (session, events) = *s;
            let media = Some((st.tasks.archive.clone(), request_id));
            Reply::Stream(relay::relay(session, d.route, events, d.bill, media))
        }
    };
    Ok(Served {
        reply,
        provider: d.provider,
    })
}

/// Tokens of a completion that came without usage: about four bytes a token.
/// What a whole chat answer used: the usage it reports, or (an upstream that reports none) the
/// estimate's prompt tokens and the answer's counted completion.
pub(super) fn answer_usage(value: &Value, bill: &super::money::Bill) -> Usage {
    value
        .as_object()
        .and_then(usage_of)
        .unwrap_or_else(|| Usage {
            prompt_tokens: bill.estimate.usage.prompt_tokens,
            completion_tokens: counted_completion_tokens(value),
            ..Usage::default()
        })
}

fn counted_completion_tokens(v: &Value) -> u64 {
    let chars: usize = v
        .get("choices")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.pointer("/message/content").and_then(Value::as_str))
                .map(str::len)
                .sum()
        })
        .unwrap_or(0);
    (chars as u64).div_ceil(4)
}
/// The route, for the server.
pub struct Chat;

impl super::Route for Chat {
    const PATH: &'static str = ROUTE;

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
