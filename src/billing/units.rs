//! Money's units: `Credits` (pico-dollars in an `i64`, exact decimal dollars in and out),
//! `Price` (pico-dollars per token, image, second, request) and `Usage`.

use std::fmt;

use serde::Deserialize;

/// An amount of money in pico-dollars (1e-12 USD).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Credits(pub i64);

pub const PICO_PER_USD: i64 = 1_000_000_000_000;

/// The largest balance an account can hold (and, negated, the lowest a forced debit can leave):
/// `i64::MAX` pico-dollars, 9223372.036854775807 USD. Credits that would pass it are refused.
pub const MAX_BALANCE: Credits = Credits(i64::MAX);

impl Credits {
    /// Parse a decimal dollar amount ("12.50", "0.000001") exactly; at most 12 decimals.
    pub fn parse_usd(text: &str) -> Option<Self> {
        let t = text.trim().trim_start_matches('$');
        let (neg, t) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        if whole.is_empty() && frac.is_empty() {
            return None;
        }
        if !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || frac.len() > 12
        {
            return None;
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut frac_val: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        for _ in frac.len()..12 {
            frac_val = frac_val.checked_mul(10)?;
        }
        let v = whole.checked_mul(PICO_PER_USD)?.checked_add(frac_val)?;
        Some(Self(if neg { -v } else { v }))
    }
}

impl fmt::Display for Credits {
    /// Dollars with 12 decimals, from integers only: `1.500000000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let per = PICO_PER_USD.unsigned_abs();
        write!(f, "{sign}{}.{:012}", abs / per, abs % per)
    }
}

/// Prices of a model, in pico-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_per_token: u64,
    #[serde(default)]
    pub output_per_token: u64,
    #[serde(default)]
    pub per_image: u64,
    #[serde(default)]
    pub per_second: u64,
    #[serde(default)]
    pub per_request: u64,
}

/// What a request consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub images: u64,
    pub seconds: u64,
}

impl Price {
    /// The cost of a usage, saturating (a saturated cost can never be reserved, so it is refused).
    pub fn cost(&self, u: &Usage) -> Credits {
        let parts = [
            u.prompt_tokens.saturating_mul(self.input_per_token),
            u.completion_tokens.saturating_mul(self.output_per_token),
            u.images.saturating_mul(self.per_image),
            u.seconds.saturating_mul(self.per_second),
            self.per_request,
        ];
        let total = parts.iter().fold(0u64, |a, b| a.saturating_add(*b));
        Credits(i64::try_from(total).unwrap_or(i64::MAX))
    }
}
