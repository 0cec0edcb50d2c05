//! Step 3, money: the estimate of a request's most expensive outcome, the reservation of it on
//! the caller's account (402 when the free balance cannot cover it), and at the end either the
//! settle of the real usage (success only) or the release of the reservation. An anonymous
//! request (a free, open model) reserves and pays nothing.

use serde_json::Value;

use crate::app::AppState;
use crate::billing::{Credits, Hold, Price, Usage};
use crate::error::ApiError;

use super::Need;
use super::screen::Screened;

/// The most a request may use and what that would cost at the model's price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub usage: Usage,
    pub cost: Credits,
}

impl Estimate {
    /// Tokens counted against a tokens-per-minute limit: the prompt and the most output.
    pub fn tokens(&self) -> u64 {
        self.usage
            .prompt_tokens
            .saturating_add(self.usage.completion_tokens)
    }
}

/// Price the most a request may use: the prompt, and every output (`n`) at the output cap.
pub fn estimate(price: &Price, need: &Need, output_cap: u64) -> Estimate {
    let usage = Usage {
        prompt_tokens: need.prompt_tokens,
        completion_tokens: output_cap.saturating_mul(need.outputs.max(1)),
        images: need.images,
        seconds: need.seconds,
    };
    Estimate {
        usage,
        cost: price.cost(&usage),
    }
}

/// A screened request with its money reserved: only [`reserve`] makes one, and only dispatch
/// takes it.
pub struct Reserved {
    pub(super) screened: Screened,
    pub(super) hold: Option<Hold>,
}

/// Reserve the estimate on the caller's account; nothing for an anonymous caller.
pub async fn reserve(st: &AppState, screened: Screened) -> Result<Reserved, ApiError> {
    let a = &screened.admitted;
    let hold = match &a.caller {
        Some(c) => Some(
            st.billing
                .reserve(
                    &c.account_id,
                    &c.key_id,
                    &a.call.request_id,
                    &a.call.model,
                    a.estimate.cost,
                    a.price,
                )
                .await?,
        ),
        None => None,
    };
    Ok(Reserved { screened, hold })
}

/// What follows a dispatched request to its end: the reservation and the key's place under its
/// limits. Settle on success; dropped or released, nothing is charged and the place is given back.
pub struct Bill {
    pub(super) hold: Option<Hold>,
    pub(super) place: Option<crate::limits::Admitted>,
    /// The estimate, for a usage the upstream did not report.
    pub estimate: Estimate,
}

impl Bill {
    /// Charge the usage (once, on success); `None` for an unbilled request.
    pub async fn settle(self, usage: Usage) -> Result<Option<Credits>, ApiError> {
        let cost = match self.hold {
            Some(h) => Some(h.settle(usage).await?),
            None => None,
        };
        if let Some(place) = self.place {
            let tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
            place.finish(tokens, cost.unwrap_or_default());
        }
        Ok(cost)
    }

    /// The request failed: release the reservation now (dropping it would release it too, later).
    pub async fn release(self) {
        if let Some(h) = self.hold {
            h.release().await;
        }
    }

    /// Settle a whole JSON answer and say what it cost in its `usage` object (an unbilled
    /// answer goes out as the plugin wrote it).
    pub async fn settle_json(
        self,
        mut value: Value,
        text: String,
        usage: Usage,
    ) -> Result<super::Reply, ApiError> {
        let cost = self.settle(usage).await?;
        let body = match cost {
            Some(c) => with_cost(&text, c).unwrap_or_else(|| {
                add_cost(&mut value, c);
                value.to_string()
            }),
            None => text,
        };
        Ok(super::Reply::Json { body, cost })
    }
}

/// The token usage an upstream reported in an answer's (or chunk's) `usage` object, if it did.
pub fn usage_of(v: &serde_json::Map<String, Value>) -> Option<Usage> {
    let u = v.get("usage")?.as_object()?;
    Some(Usage {
        prompt_tokens: u.get("prompt_tokens")?.as_u64()?,
        completion_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        ..Usage::default()
    })
}

/// The answer's text with what the request cost added to its top-level `usage` object, the
/// rest of the text as the plugin wrote it (no second serialization of the whole answer).
/// `None` when that is not plain to do (no `usage` object, one that already has a cost key, a
/// duplicate key): the caller then goes through the parsed value ([`add_cost`]).
pub fn with_cost(text: &str, cost: Credits) -> Option<String> {
    use serde::de::IgnoredAny;
    use serde_json::value::RawValue;
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(borrow, default)]
        usage: Option<&'a RawValue>,
    }
    let top: Top<'_> = serde_json::from_str(text).ok()?;
    let raw = top.usage?.get();
    if !raw.starts_with('{') || !raw.ends_with('}') {
        return None;
    }
    // The usage's keys (a key written with escapes is left to the parsed value's way).
    let keys: std::collections::HashMap<&str, IgnoredAny> = serde_json::from_str(raw).ok()?;
    if keys.contains_key("cost") || keys.contains_key("cost_picodollars") {
        return None;
    }
    // `raw` borrows from `text`: where it ends there is the usage object's closing brace.
    let start = (raw.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    let close = start + raw.len() - 1;
    if text.get(close..=close) != Some("}") {
        return None;
    }
    let empty = raw[1..raw.len() - 1].trim().is_empty();
    let mut out = String::with_capacity(text.len() + 64);
    out.push_str(&text[..close]);
    if !empty {
        out.push(',');
    }
    out.push_str("\"cost\":\"");
    out.push_str(&cost.to_string());
    out.push_str("\",\"cost_picodollars\":");
    out.push_str(&cost.0.to_string());
    out.push_str(&text[close..]);
    Some(out)
}

/// Say what the request cost, in the usage object.
pub fn add_cost(v: &mut Value, cost: Credits) {
    if let Some(obj) = v.as_object_mut() {
        let usage = obj.entry("usage").or_insert_with(|| serde_json::json!({}));
        if let Some(u) = usage.as_object_mut() {
            u.insert("cost".into(), Value::String(cost.to_string()));
            u.insert("cost_picodollars".into(), Value::from(cost.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_is_priced_at_the_cap() {
        let price = Price {
            input_per_token: 2,
            output_per_token: 10,
            ..Price::default()
        };
        let need = Need {
            prompt_tokens: 100,
            max_output_tokens: Some(50),
            output: true,
            outputs: 128,
            images: 0,
            seconds: 0,
        };
        let e = estimate(&price, &need, 50);
        assert_eq!(e.usage.completion_tokens, 6_400);
        assert_eq!(e.cost, Credits(100 * 2 + 6_400 * 10));
        assert_eq!(e.tokens(), 6_500);
    }

    #[test]
    fn cost_goes_into_the_text_as_into_the_value() {
        let cost = Credits(1_500_000_000_000);
        for text in [
            r#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":2},"choices":[]}"#,
            "{\n  \"usage\": { \"prompt_tokens\": 3 },\n  \"model\": \"m\"\n}\n",
            r#"{"usage":{},"choices":[{"message":{"content":"a \"usage\": {}"}}]}"#,
            r#"{"choices":[{"usage":{"x":1}}],"usage":{"prompt_tokens":1}}"#,
        ] {
            let spliced = with_cost(text, cost).expect("spliced");
            let mut v: Value = serde_json::from_str(text).unwrap();
            add_cost(&mut v, cost);
            assert_eq!(
                serde_json::from_str::<Value>(&spliced).unwrap(),
                v,
                "{text}"
            );
        }
        // Left to the parsed value: no usage, a usage that is not an object, a cost already
        // there, a duplicate key, not an object.
        for text in [
            r#"{"id":"x"}"#,
            r#"{"usage":null}"#,
            r#"{"usage":[1]}"#,
            r#"{"usage":{"cost":"1"}}"#,
            r#"{"usage":{"cost":null}}"#,
            r#"{"usage":{"cost_picodollars":5}}"#,
            r#"{"usage":{"a":1},"usage":{"b":2}}"#,
            r#"[1]"#,
        ] {
            assert_eq!(with_cost(text, cost), None, "{text}");
        }
    }

    #[test]
    fn cost_goes_into_the_usage_object() {
        let mut v = serde_json::json!({"usage": {"prompt_tokens": 3}});
        add_cost(&mut v, Credits(1_500_000_000_000));
        assert_eq!(v["usage"]["cost"], "1.500000000000");
        assert_eq!(v["usage"]["cost_picodollars"], 1_500_000_000_000_i64);
        assert_eq!(v["usage"]["prompt_tokens"], 3);
    }
}
