//! Errors at the plugin boundary: the classes a plugin reports, what the host makes of a
//! failed call, and `redact`, which strips anything like a secret from text a plugin or an
//! upstream wrote before it reaches a log.

/// Classes of failure a provider plugin reports for its upstream (mirrors the WIT `error-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestErrorClass {
    InvalidRequest,
    RateLimited,
    Auth,
    ContentRefused,
    NotFound,
    Upstream,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin itself reported an error (usually the upstream's, translated).
    #[error("provider `{plugin}`: {message}")]
    Guest {
        plugin: String,
        class: GuestErrorClass,
        /// The guest's message, [`redact`]ed: for the log only when `from_upstream`.
        message: String,
        /// The upstream's HTTP status, when there was one.
        status: Option<u16>,
        retry_after_ms: Option<u64>,
        /// Reported after the upstream answered (`parse_*`): the message may carry the
        /// upstream's words. `build_request` errors are the plugin's own (it has seen no answer).
        from_upstream: bool,
    },
    #[error("provider plugin `{plugin}` failed (trap in {call})")]
    Trap {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("provider plugin `{plugin}` exceeded its CPU time limit in {call}")]
    Timeout { plugin: String, call: &'static str },
    #[error("provider plugin `{plugin}` exceeded its memory limit in {call}")]
    OutOfMemory { plugin: String, call: &'static str },
    #[error("provider plugin `{plugin}` returned output that does not parse ({call}: {detail})")]
    BadOutput {
        plugin: String,
        call: &'static str,
        detail: String,
    },
    #[error("provider plugin `{plugin}` has no free instance slot; retry shortly")]
    Busy { plugin: String },
}

impl PluginError {
    /// Low-cardinality reason for the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Guest { .. } => "guest_error",
            Self::Trap { .. } => "trap",
            Self::Timeout { .. } => "cpu_limit",
            Self::OutOfMemory { .. } => "memory_limit",
            Self::BadOutput { .. } => "bad_output",
            Self::Busy { .. } => "busy",
        }
    }
}

/// Longest guest message kept, in characters.
const MESSAGE_CHARS: usize = 300;

/// Untrusted text (a guest's message, usually the upstream's words) made fit for a log line:
/// anything that looks like a credential (`sk-…`, masked keys like `sk-****abcd`, tokens, long
/// runs of base64 or hex) becomes `[redacted]`, control characters become spaces, and the
/// length is capped.
pub fn redact(text: &str) -> String {
    /// Writes a finished word, redacted if it looks like a secret or follows `Bearer`/`Basic`.
    fn flush(word: &mut String, after_scheme: &mut bool, out: &mut String) {
        if word.is_empty() {
            return;
        }
        if *after_scheme || looks_secret(word) {
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        *after_scheme = word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
        word.clear();
    }
    let mut out = String::with_capacity(text.len().min(MESSAGE_CHARS * 4));
    let mut word = String::new();
    let mut after_scheme = false;
    for c in text.chars() {
        if c.is_alphanumeric() || matches!(c, '-' | '_' | '+' | '/' | '=' | '*' | '.' | '~') {
            word.push(c);
        } else {
            flush(&mut word, &mut after_scheme, &mut out);
            out.push(if c.is_control() { ' ' } else { c });
        }
    }
    flush(&mut word, &mut after_scheme, &mut out);
    match out.char_indices().nth(MESSAGE_CHARS) {
        Some((cut, _)) => {
            out.truncate(cut);
            out.push('…');
            out
        }
        None => out,
    }
}

fn looks_secret(word: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "sk-",
        "sk_",
        "pk-",
        "pk_",
        "rk-",
        "rk_",
        "tg_",
        "ghp_",
        "gho_",
        "ghs_",
        "ghu_",
        "github_pat_",
        "glpat-",
        "xoxa-",
        "xoxb-",
        "xoxp-",
        "AIza",
        "eyJ",
        "sess-",
    ];
    if PREFIXES
        .iter()
        .any(|p| word.len() > p.len() && word.starts_with(p))
    {
        return true;
    }
    if word.contains("**") {
        return true;
    }
    // A long unbroken run of letters and digits (hex, base64, a raw token); separated pieces
    // (`gpt-4o-mini-2024-07-18`, a URL path) are words, not keys.
    word.split(['-', '_', '.', '/', '~']).any(|piece| {
        let digits = piece.chars().filter(char::is_ascii_digit).count();
        let letters = piece.chars().filter(char::is_ascii_alphabetic).count();
        (piece.len() >= 20 && digits >= 1 && letters >= 1) || piece.len() >= 40
    })
}

/// Failure to load a component: reported, never fatal to a running gateway.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`{0}` does not compile as a WebAssembly component: {1}")]
    Compile(String, String),
    #[error("`{0}` cannot be instantiated: {1}")]
    Instantiate(String, String),
    #[error(
        "`{0}` is neither a tollgate provider nor a policy plugin (tollgate:plugin@0.1.0): {1}"
    )]
    World(String, String),
    #[error("`{0}`: manifest call failed: {1}")]
    Manifest(String, String),
    #[error("`{file}` declares the name `{name}`; rename the file to `{name}.wasm`")]
    NameMismatch { file: String, name: String },
    #[error("reading `{0}`: {1}")]
    Io(String, String),
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn upstream_text_loses_anything_like_a_key() {
        let openai = "Incorrect API key provided: sk-test-****cret. You can find your API key at https://platform.openai.com/account/api-keys.";
        let r = redact(openai);
        assert!(!r.contains("sk-") && !r.contains("cret"), "{r}");
        assert!(
            r.starts_with("Incorrect API key provided: [redacted]"),
            "{r}"
        );
        assert!(r.contains("platform.openai.com"), "{r}");
        for secret in [
            "sk-proj-AbCdEf0123456789abcdef0123456789",
            "tg_3xk9Qm2pLr8vNw4tYb6zHc1dFg7jKs5a",
            "AKIAIOSFODNN7EXAMPLE",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
            "AIzaSyD-1234567890abcdefghijklmnopqrstu",
            "0123456789abcdef0123456789abcdef",
            "dGhpcyBpcyBhIGxvbmcgYmFzZTY0IHRva2VuIDEyMw==",
            "abcd****wxyz",
        ] {
            let r = redact(&format!("value {secret} refused"));
            assert_eq!(r, "value [redacted] refused", "{secret}");
        }
        assert_eq!(
            redact("header was Bearer abc.def.ghi"),
            "header was Bearer [redacted]"
        );
        assert_eq!(
            redact("model gpt-4o-2024-08-06 not found"),
            "model gpt-4o-2024-08-06 not found"
        );
        assert_eq!(redact("two\nlines\r"), "two lines ");
        let long = redact(&"word ".repeat(1000));
        assert_eq!(long.chars().count(), super::MESSAGE_CHARS + 1);
        assert!(long.ends_with('…'));
    }
}
