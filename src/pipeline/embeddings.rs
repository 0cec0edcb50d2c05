//! `POST /v1/embeddings` (OpenAI's shape): a string `model` and an `input` that is a non-empty
//! string, or a non-empty array of strings, of token ids, or of token-id arrays; optional
//! `encoding_format` (`float` or `base64`) and `dimensions`. Screened on `input`, billed on the
//! input tokens the upstream reports (no output tokens).

use serde_json::Value;

use crate::app::AppState;
use crate::auth::Caller;
use crate::billing::Usage;
use crate::error::ApiError;

use super::dispatch::{self, Expect};
use super::{Body, Call, Need, Served, money};

pub const ROUTE: &str = "/v1/embeddings";

/// OpenAI's upper bound on the number of inputs in one request.
const MAX_INPUTS: usize = 2048;

/// The answer must be a list of embeddings.
pub const EMBEDDINGS: Expect = Expect {
    what: "a list of embeddings",
    check: |v| v.get("data").is_some_and(Value::is_array),
};

fn invalid(message: &str) -> ApiError {
    ApiError::invalid(message, Some("input"))
}

/// Check `input`: a non-empty string; or a non-empty array (at most [`MAX_INPUTS`]) whose items
/// are all non-empty strings, all token ids, or all non-empty arrays of token ids.
fn check_input(input: Option<&Value>) -> Result<(), ApiError> {
    let is_tokens = |v: &Value| {
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_u64))
    };
    match input {
        None => Err(invalid("missing required parameter: `input`")),
        Some(Value::String(s)) if s.is_empty() => Err(invalid("`input` cannot be an empty string")),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(invalid("`input` cannot be an empty array"));
            }
            if items.len() > MAX_INPUTS {
                return Err(invalid("`input` may hold at most 2048 items"));
            }
            let strings = items
                .iter()
                .all(|i| i.as_str().is_some_and(|s| !s.is_empty()));
            let ids = items.iter().all(Value::is_u64);
            let arrays = items.iter().all(is_tokens);
            if strings || ids || arrays {
                Ok(())
            } else {
                Err(invalid(
                    "`input` must be a string, an array of non-empty strings, an array of token ids, or an array of token-id arrays",
                ))
            }
        }
        Some(_) => Err(invalid(
            "`input` must be a string or an array of strings or token ids",
        )),
    }
}

/// Validate an embeddings request.
pub fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
    let model = body.model()?;
    check_input(body.field("input"))?;
    match body.field("encoding_format") {
        None => {}
        Some(Value::String(f)) if f == "float" || f == "base64" => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "`encoding_format` must be `float` or `base64`",
                Some("encoding_format"),
            ));
        }
    }
    body.positive("dimensions")?;
    if body.flag("stream")? {
        return Err(ApiError::invalid(
            "embeddings cannot be streamed",
            Some("stream"),
        ));
    }
    let need = Need {
        prompt_tokens: 0,
        max_output_tokens: None,
        output: false,
        outputs: 1,
        images: 0,
        seconds: 0,
    };
    Ok(Call {
        route: ROUTE,
        kind: "embedding",
        model,
        stream: false,
        body,
        need,
        prompt: super::tokens::embeddings,
        request_id,
    })
}

/// The input tokens the upstream reported, else the estimate's; never output tokens.
fn usage_of(v: &Value, estimate: &money::Estimate) -> Usage {
    let prompt_tokens = v
        .as_object()
        .and_then(money::usage_of)
        .map_or(estimate.usage.prompt_tokens, |u| u.prompt_tokens);
    Usage {
        prompt_tokens,
        ..Usage::default()
    }
}

#[tracing::instrument(name = "pipeline.embeddings", level = "debug", skip_all, fields(model = %call.model))]
pub async fn run(st: &AppState, caller: Option<Caller>, call: Call) -> Result<Served, ApiError> {
    dispatch::whole_json(st, caller, call, &EMBEDDINGS, usage_of).await
}

/// The route, for the server.
pub struct Embeddings;

impl super::Route for Embeddings {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_of_every_documented_shape_pass_and_others_fail() {
        for ok in [
            json!("hello"),
            json!(["a", "b"]),
            json!([1, 2, 3]),
            json!([[1, 2], [3]]),
        ] {
            assert!(check_input(Some(&ok)).is_ok(), "{ok}");
        }
        for bad in [
            json!(""),
            json!([]),
            json!(["a", 1]),
            json!([""]),
            json!([[]]),
            json!({"text": "x"}),
            json!(3),
        ] {
            assert!(check_input(Some(&bad)).is_err(), "{bad}");
        }
        assert!(check_input(None).is_err());
    }
}
