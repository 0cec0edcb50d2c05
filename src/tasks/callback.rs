//! Callbacks: when a task reaches `success` or `fail` and the client gave `callback.url`, the
//! gateway POSTs the task to it, signed the Standard Webhooks way, until the receiver answers
//! 2xx or `tasks.callback_attempts` are spent (waits doubling from `tasks.callback_backoff`).
//!
//! Signature: `webhook-id` (the same on every retry: `msg_<task id>`), `webhook-timestamp` (Unix
//! seconds), and `webhook-signature: v1,<base64 HMAC-SHA256>` over `"{id}.{timestamp}.{body}"`
//! with the account's secret (`whsec_<base64 key>`; the key is the decoded part). The receiver
//! recomputes it and compares (`examples/verify_webhook.py`).
//!
//! Safety: only `https` URLs (plain `http` only to hosts the operator allows), the resolved
//! address must be public unless the host is in `tasks.allow_hosts` (checked at every attempt
//! and pinned for the connection), no redirect is followed, each attempt has
//! `tasks.callback_timeout`. Every attempt is recorded (`task_deliveries`).

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::archive::{AddressGuard, pinned_client, without_url};

/// Why a callback URL is refused at submission.
pub fn check_url(url: &str, guard: &AddressGuard, allow_http: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "callback.url is not a valid URL")?;
    if url.len() > 2048 {
        return Err("callback.url is longer than 2048 characters".into());
    }
    let host = parsed.host_str().ok_or("callback.url has no host")?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("callback.url must not carry credentials".into());
    }
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allow_http && guard.allows_host(host) => Ok(()),
        "http" => Err("callback.url must use https".into()),
        _ => Err("callback.url must be an https URL".into()),
    }
}

/// The Standard Webhooks signature header value for `body`.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// How one attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Delivered(u16),
    /// The receiver answered, not 2xx.
    Status(u16),
    /// Refused before sending (address not allowed).
    Refused(String),
    /// No answer (connect, timeout).
    Failed(String),
}

impl Outcome {
    /// For the delivery record and the metric label (a closed set).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered(_) => "delivered",
            Self::Status(_) => "status",
            Self::Refused(_) => "refused",
            Self::Failed(_) => "failed",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Delivered(s) | Self::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// One delivery attempt of `body` to `url`.
pub async fn deliver(
    url: &str,
    guard: &AddressGuard,
    timeout: Duration,
    secret: &str,
    msg_id: &str,
    body: Vec<u8>,
) -> Outcome {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Outcome::Refused("not a valid URL".into());
    };
    let addrs = match guard.resolve(&parsed).await {
        Ok(a) => a,
        Err(why) => return Outcome::Refused(why),
    };
    let client = match pinned_client(&parsed, &addrs, timeout) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e),
    };
    let timestamp = crate::store::now_ms() / 1000;
    let Some(signature) = sign(secret, msg_id, timestamp, &body) else {
        return Outcome::Failed("the account's webhook secret is not valid base64".into());
    };
    let sent = client
        .post(parsed)
        .header("content-type", "application/json")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            if (200..300).contains(&status) {
                Outcome::Delivered(status)
            } else {
                Outcome::Status(status)
            }
        }
        Err(e) => Outcome::Failed(without_url(&e)),
    }
}

/// The wait before attempt `attempt + 1`: `base` doubled per attempt, at most ten minutes.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16).saturating_sub(1))
        .min(Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's published test vector.
    #[test]
    fn signature_matches_the_specification_example() {
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn only_https_unless_the_host_is_allowed() {
        let none = AddressGuard::new(&[]);
        let local = AddressGuard::new(&["127.0.0.1".into()]);
        assert!(check_url("https://example.com/hook", &none, false).is_ok());
        assert!(check_url("http://example.com/hook", &none, true).is_err());
        assert!(check_url("http://127.0.0.1:9/hook", &local, true).is_ok());
        assert!(check_url("http://127.0.0.1:9/hook", &local, false).is_err());
        assert!(check_url("ftp://example.com/x", &none, true).is_err());
        assert!(check_url("https://u:p@example.com/x", &none, true).is_err());
    }

    #[test]
    fn waits_double_up_to_ten_minutes() {
        let b = Duration::from_secs(2);
        assert_eq!(backoff(b, 1), Duration::from_secs(2));
        assert_eq!(backoff(b, 2), Duration::from_secs(4));
        assert_eq!(backoff(b, 30), Duration::from_secs(600));
    }
}
