//! What a plugin-built request may carry: a path that stays under the channel's base URL, and
//! no header the host owns (framing, routing, credentials).
//!
//! The plugin host applies these checks to every `build_request` output (a refusal is the
//! plugin's bad output, counted like its other failures); `Upstream::send` applies them again
//! before anything leaves the process.

/// Headers a plugin may not set. Hop-by-hop and framing headers belong to the HTTP client; `host`
/// would route the request to another site on the same address; credentials are added by the
/// host alone, from the channel's secret. Every `proxy-*` header is refused as well.
const REFUSED_HEADERS: &[&str] = &[
    // hop-by-hop and framing
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    // routing
    "host",
    // credentials
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "cookie",
];

/// Why a path or a header was refused. The text is the host's own (never the plugin's), so it
/// may reach the client in the plugin's bad-output error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub &'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// How many rounds of percent-decoding are checked: a server that decodes twice sees `%252e` as
/// `.`; a path still changing after this many rounds is refused.
const DECODE_ROUNDS: usize = 3;

/// Check a plugin-built path (with its query, if any) before it is appended to the base URL.
///
/// The path part must start with `/`; it may hold no `.` or `..` segment and no empty segment
/// (`//`), also after percent-decoding (`%2e%2e`, `%2f`, double encoding); no backslash, space,
/// `#` or control character anywhere. Colons stay allowed (`/models/gemini-pro:generateContent`).
pub fn check_path(path: &str) -> Result<(), Refused> {
    if path
        .bytes()
        .any(|b| b.is_ascii_control() || matches!(b, b' ' | b'#' | b'\\'))
    {
        return Err(Refused(
            "the path has a control character, space, `#` or backslash",
        ));
    }
    let path_part = path.split_once('?').map_or(path, |(p, _)| p);
    if !path_part.starts_with('/') {
        return Err(Refused("the path must start with `/`"));
    }
    let mut text = path_part.as_bytes().to_vec();
    for _ in 0..=DECODE_ROUNDS {
        check_segments(&text)?;
        let decoded = percent_decode(&text);
        if decoded == text {
            return Ok(());
        }
        text = decoded;
    }
    Err(Refused("the path is percent-encoded too many times over"))
}

fn check_segments(path: &[u8]) -> Result<(), Refused> {
    if path.iter().any(|b| b.is_ascii_control() || *b == b'\\') {
        return Err(Refused(
            "the path decodes to a control character or a backslash",
        ));
    }
    if !path.starts_with(b"/") {
        return Err(Refused("the path must start with `/`"));
    }
    let segments: Vec<&[u8]> = path[1..].split(|b| *b == b'/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            b"." | b".." => return Err(Refused("the path has a `.` or `..` segment")),
            // A trailing slash is fine; an empty segment anywhere else is `//`.
            b"" if i != last => return Err(Refused("the path has an empty segment (`//`)")),
            _ => {}
        }
    }
    Ok(())
}

/// One round of percent-decoding; an invalid escape is kept as it is.
fn percent_decode(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                text.get(i + 1).copied().and_then(hex),
                text.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi * 16 + lo);
            i += 3;
            continue;
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

/// Check a header name a plugin set (any case).
pub fn check_header(name: &str) -> Result<(), Refused> {
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("proxy-") {
        return Err(Refused("plugins may not set `proxy-*` headers"));
    }
    match REFUSED_HEADERS.iter().find(|h| **h == lower) {
        Some(_) => Err(Refused(
            "plugins may not set hop-by-hop, `host`, `content-length` or credential headers",
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_pass() {
        for p in [
            "/chat/completions",
            "/models",
            "/models/",
            "/v1beta/models/gemini-1.5-pro:streamGenerateContent?alt=sse",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01",
            "/files/file-abc%20def",
            "/a.b/c..d/.e/f.",
            "/x?next=/a/../b",
            "/%zz",
        ] {
            assert_eq!(check_path(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn escaping_paths_are_refused() {
        for p in [
            "",
            "chat/completions",
            "?x=1",
            "/..",
            "/../admin",
            "/v1/../../admin",
            "/a/./b",
            "/a/.",
            "/a/..",
            "/%2e%2e/x",
            "/%2E%2e/x",
            "/.%2e/x",
            "/%252e%252e/x",
            "/%25252e%25252e/x",
            "/a%2f..%2fb",
            "/a%2f%2fb",
            "//evil.example/x",
            "/a//b",
            "/a\\..\\b",
            "/a%5c..%5cb",
            "/\\evil.example",
            "/a\r\nHost: evil.example",
            "/a%0d%0aHost:%20evil",
            "/a%00b",
            "/a#fragment",
            "/a b",
            "/a\tb",
            "/x?q=\n",
        ] {
            assert!(check_path(p).is_err(), "{p:?} passed");
        }
    }

    #[test]
    fn owned_headers_are_refused() {
        for h in [
            "Host",
            "host",
            "Authorization",
            "proxy-authorization",
            "Proxy-Connection",
            "x-api-key",
            "API-Key",
            "x-goog-api-key",
            "cookie",
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
        ] {
            assert!(check_header(h).is_err(), "{h} passed");
        }
        for h in [
            "content-type",
            "accept",
            "openai-organization",
            "anthropic-version",
            "x-request-id",
        ] {
            assert_eq!(check_header(h), Ok(()), "{h}");
        }
    }
}
