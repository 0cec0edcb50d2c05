//! The only outbound HTTP client: sends what a provider plugin built, adds the credential,
//! enforces timeouts, and frames server-sent events as they arrive.
//!
//! Credentials are added here, after the plugin built the request, from the auth scheme the
//! plugin's manifest declares; nothing else in tollgate opens a connection to a provider. The
//! request goes only under the channel's base URL, without headers the host owns ([`guard`],
//! [`join`]); what comes back is read only up to its bounds (`upstream.max_body_bytes`, and
//! `upstream.max_event_bytes` per streamed event), and past them the connection is dropped.

pub mod guard;
pub mod sse;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::config::{Secret, UpstreamConfig};
use crate::plugins::{AuthScheme, InboundResponse, OutboundRequest};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream of channel `{channel}` did not answer within {after:?}")]
    Timeout { channel: String, after: Duration },
    #[error("upstream of channel `{channel}` is unreachable")]
    Connect { channel: String, detail: String },
    #[error("upstream of channel `{channel}` failed while answering")]
    Io { channel: String, detail: String },
    #[error("upstream of channel `{channel}` ended the stream before it was complete")]
    Truncated { channel: String },
    #[error("request for channel `{channel}` cannot be sent: {detail}")]
    BadRequest { channel: String, detail: String },
    /// The body (or one event of a stream) is over the configured bound; the connection was
    /// dropped without reading the rest.
    #[error("upstream of channel `{channel}` sent {what} larger than the limit of {limit} bytes")]
    TooLarge {
        channel: String,
        what: &'static str,
        limit: usize,
    },
}

/// Where a request goes and how it is authenticated.
pub struct Target<'a> {
    pub channel: &'a str,
    pub base_url: &'a str,
    pub auth: &'a AuthScheme,
    pub credential: Option<&'a Secret>,
}

#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    /// URLs already joined and checked (see [`Joined`]).
    joined: Joined,
    timeout: Duration,
    idle_timeout: Duration,
    max_body_bytes: usize,
    max_event_bytes: usize,
}

/// A response whose headers arrived; the body is still on the wire.
pub struct Pending {
    channel: String,
    response: reqwest::Response,
    deadline: Instant,
    idle_timeout: Duration,
    max_body_bytes: usize,
    max_event_bytes: usize,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            joined: Joined::default(),
            timeout: cfg.timeout,
            idle_timeout: cfg.stream_idle_timeout,
            max_body_bytes: cfg.max_body_bytes,
            max_event_bytes: cfg.max_event_bytes,
        })
    }

    /// Send the request and wait for the response headers (within the upstream timeout).
    #[tracing::instrument(name = "upstream.send", level = "debug", skip_all, fields(channel = target.channel, status = tracing::field::Empty))]
    pub async fn send(
        &self,
        target: &Target<'_>,
        req: OutboundRequest,
    ) -> Result<Pending, UpstreamError> {
        let channel = target.channel.to_string();
        let mut url = self
            .joined
            .get(target.base_url, &req.path)
            .map_err(|detail| UpstreamError::BadRequest {
                channel: channel.clone(),
                detail: detail.into(),
            })?;
        // The plugin host refuses these already; this keeps them off the wire whoever built `req`.
        if req
            .headers
            .keys()
            .any(|name| guard::check_header(name.as_str()).is_err())
        {
            return Err(UpstreamError::BadRequest {
                channel,
                detail: "the plugin set a header the host owns".into(),
            });
        }
        let mut headers = req.headers;
        if let Some(secret) = target.credential {
            let bad = |_| UpstreamError::BadRequest {
                channel: channel.clone(),
                detail: "the credential is not a valid header value".into(),
            };
            match target.auth {
                AuthScheme::None => {}
                AuthScheme::Bearer => {
                    let mut v = http::HeaderValue::from_str(&format!("Bearer {}", secret.expose()))
                        .map_err(bad)?;
                    v.set_sensitive(true);
                    headers.insert(http::header::AUTHORIZATION, v);
                }
                AuthScheme::Header(name) => {
                    let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        UpstreamError::BadRequest {
                            channel: channel.clone(),
                            detail: "the plugin declared an invalid auth header name".into(),
                        }
                    })?;
                    let mut v = http::HeaderValue::from_str(secret.expose()).map_err(bad)?;
                    v.set_sensitive(true);
                    headers.insert(name, v);
                }
                AuthScheme::Query(name) => {
                    // Only the host's value: a same-named parameter from the plugin is dropped.
                    if url.query_pairs().any(|(k, _)| k == name.as_str()) {
                        let kept: Vec<(String, String)> = url
                            .query_pairs()
                            .filter(|(k, _)| k != name.as_str())
                            .map(|(k, v)| (k.into_owned(), v.into_owned()))
                            .collect();
                        url.query_pairs_mut().clear().extend_pairs(kept);
                    }
                    url.query_pairs_mut().append_pair(name, secret.expose());
                }
            }
        }
        let deadline = Instant::now() + self.timeout;
        let fut = self
            .client
            .request(req.method, url)
            .headers(headers)
            .body(req.body)
            .send();
        let response = match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    channel,
                    after: self.timeout,
                });
            }
            Ok(Err(e)) => return Err(classify(&channel, e)),
            Ok(Ok(r)) => r,
        };
        tracing::Span::current().record("status", response.status().as_u16());
        Ok(Pending {
            channel,
            response,
            deadline,
            idle_timeout: self.idle_timeout,
            max_body_bytes: self.max_body_bytes,
            max_event_bytes: self.max_event_bytes,
        })
    }
}

/// The URLs [`join`] accepted, by base URL and path: a channel's requests go to a handful of
/// paths, and parsing and checking two URLs is a good part of the host's own work for a
/// request. Only accepted joins are kept, at most [`Joined::MAX`] paths for each of at most
/// [`Joined::MAX`] base URLs (a plugin that puts ids in its paths fills its share once; later
/// paths are joined each time, as before).
#[derive(Clone, Default)]
struct Joined(Arc<RwLock<HashMap<String, HashMap<String, reqwest::Url>>>>);

impl Joined {
    const MAX: usize = 256;

    fn get(&self, base_url: &str, path: &str) -> Result<reqwest::Url, &'static str> {
        let known = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(base_url)
            .and_then(|paths| paths.get(path))
            .cloned();
        if let Some(url) = known {
            return Ok(url);
        }
        let url = join(base_url, path)?;
        let mut map = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let room = map.len() < Self::MAX || map.contains_key(base_url);
        if room {
            let paths = map.entry(base_url.to_owned()).or_default();
            if paths.len() < Self::MAX {
                paths.insert(path.to_owned(), url.clone());
            }
        }
        Ok(url)
    }
}

/// The URL of a plugin-built path under a channel's base URL. The path must pass
/// [`guard::check_path`], and the joined URL must keep the base's scheme, host and port and stay
/// under its path (the URL parser resolves what a server would, `%2e%2e` included).
pub fn join(base_url: &str, path: &str) -> Result<reqwest::Url, &'static str> {
    if base_url.is_empty() {
        return Err("the channel has no base_url");
    }
    guard::check_path(path).map_err(|r| r.0)?;
    let base_url = base_url.trim_end_matches('/');
    let base = reqwest::Url::parse(base_url).map_err(|_| "the channel's base_url is not a URL")?;
    let url = reqwest::Url::parse(&format!("{base_url}{path}"))
        .map_err(|_| "the base URL and the plugin's path do not make a URL")?;
    let prefix = base.path().trim_end_matches('/');
    let under = url
        .path()
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if url.origin() != base.origin() || !under {
        return Err("the plugin's path leaves the channel's base URL");
    }
    Ok(url)
}

fn classify(channel: &str, e: reqwest::Error) -> UpstreamError {
    // The error text can carry the URL, and the URL can carry a query credential: strip it.
    let e = e.without_url();
    if e.is_timeout() {
        UpstreamError::Timeout {
            channel: channel.into(),
            after: Duration::ZERO,
        }
    } else if e.is_connect() {
        UpstreamError::Connect {
            channel: channel.into(),
            detail: e.to_string(),
        }
    } else {
        UpstreamError::Io {
            channel: channel.into(),
            detail: e.to_string(),
        }
    }
}

impl Pending {
    pub fn status(&self) -> u16 {
        self.response.status().as_u16()
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.response
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                v.to_str()
                    .ok()
                    .map(|v| (k.as_str().to_string(), v.to_string()))
            })
            .collect()
    }

    /// Read the whole body, within what is left of the upstream timeout and under
    /// `upstream.max_body_bytes`. Over the bound, reading stops and the connection is dropped.
    pub async fn read(self) -> Result<InboundResponse, UpstreamError> {
        let status = self.status();
        let headers = self.headers();
        let left = self.deadline.saturating_duration_since(Instant::now());
        let Self {
            channel,
            mut response,
            max_body_bytes: limit,
            ..
        } = self;
        let too_large = |channel: String| UpstreamError::TooLarge {
            channel,
            what: "a response body",
            limit,
        };
        let announced = response.content_length().unwrap_or(0);
        if announced > u64::try_from(limit).unwrap_or(u64::MAX) {
            return Err(too_large(channel));
        }
        let collect = async {
            let mut body = Vec::with_capacity(usize::try_from(announced).unwrap_or(0));
            while let Some(chunk) = response.chunk().await? {
                if body.len().saturating_add(chunk.len()) > limit {
                    return Ok(None);
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>(Some(body))
        };
        match tokio::time::timeout(left, collect).await {
            Err(_) => Err(UpstreamError::Timeout {
                channel,
                after: left,
            }),
            Ok(Err(e)) => Err(classify(&channel, e)),
            // Returning drops the response mid-body: the connection closes, nothing more is read.
            Ok(Ok(None)) => Err(too_large(channel)),
            Ok(Ok(Some(body))) => Ok(InboundResponse {
                status,
                headers,
                body,
            }),
        }
    }

    /// The value of a response header, if it is text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The body as it arrives, chunk by chunk, for a binary answer passed straight to the client
    /// (speech): nothing is held beyond one chunk. Each chunk must arrive within the idle timeout;
    /// after an error the stream ends and the connection is dropped; dropping the stream drops it.
    pub fn body_stream(self) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let idle = self.idle_timeout;
        let channel = self.channel;
        let body = Box::pin(self.response.bytes_stream());
        futures::stream::unfold(Some(body), move |body| {
            let channel = channel.clone();
            async move {
                let mut body = body?;
                match tokio::time::timeout(idle, body.next()).await {
                    Err(_) => Some((
                        Err(UpstreamError::Timeout {
                            channel,
                            after: idle,
                        }),
                        None,
                    )),
                    Ok(None) => None,
                    Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(body))),
                    Ok(Some(Err(e))) => Some((Err(classify(&channel, e)), None)),
                }
            }
        })
    }

    /// The body as server-sent events, framed as they arrive. Each event must arrive within the
    /// idle timeout and fit in `upstream.max_event_bytes`; a body that ends in the middle of an
    /// event is reported as truncated. After an error the stream ends and the connection is
    /// dropped at once; dropping the stream drops it too, which is how the upstream learns of a
    /// cancel.
    pub fn events(self) -> impl Stream<Item = Result<sse::Event, UpstreamError>> + Send + 'static {
        let limits = EventLimits {
            idle: self.idle_timeout,
            max_event_bytes: self.max_event_bytes,
        };
        events_from(self.response.bytes_stream(), self.channel, limits)
    }
}

#[derive(Clone, Copy)]
struct EventLimits {
    idle: Duration,
    max_event_bytes: usize,
}

type Body<S> = Pin<Box<S>>;

struct EventState<S> {
    /// `None` once the body ended or failed: the connection is gone.
    body: Option<Body<S>>,
    dec: sse::Decoder,
    queue: VecDeque<Result<sse::Event, UpstreamError>>,
}

fn events_from<S>(
    body: S,
    channel: String,
    limits: EventLimits,
) -> impl Stream<Item = Result<sse::Event, UpstreamError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
{
    let state = EventState {
        body: Some(Box::pin(body)),
        dec: sse::Decoder::bounded(limits.max_event_bytes),
        queue: VecDeque::new(),
    };
    futures::stream::unfold(state, move |mut st| {
        let channel = channel.clone();
        async move {
            loop {
                if let Some(item) = st.queue.pop_front() {
                    return Some((item, st));
                }
                let body = st.body.as_mut()?;
                match tokio::time::timeout(limits.idle, body.next()).await {
                    Err(_) => {
                        st.body = None;
                        st.queue.push_back(Err(UpstreamError::Timeout {
                            channel: channel.clone(),
                            after: limits.idle,
                        }));
                    }
                    Ok(Some(Ok(bytes))) => {
                        let mut events = Vec::new();
                        let pushed = st.dec.try_push(&bytes, &mut events);
                        st.queue.extend(events.into_iter().map(Ok));
                        if let Err(sse::EventTooLarge { limit }) = pushed {
                            // Stop reading: the rest of the body is never downloaded.
                            st.body = None;
                            st.queue.push_back(Err(UpstreamError::TooLarge {
                                channel: channel.clone(),
                                what: "a stream event",
                                limit,
                            }));
                        }
                    }
                    Ok(Some(Err(e))) => {
                        st.body = None;
                        st.queue.push_back(Err(classify(&channel, e)));
                    }
                    Ok(None) => {
                        st.body = None;
                        match st.dec.finish() {
                            Ok(Some(ev)) => st.queue.push_back(Ok(ev)),
                            Ok(None) => {}
                            Err(sse::Truncated) => {
                                st.queue.push_back(Err(UpstreamError::Truncated {
                                    channel: channel.clone(),
                                }));
                            }
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joined_urls_stay_under_the_base() {
        let ok = join("http://127.0.0.1:9/v1", "/chat/completions").unwrap();
        assert_eq!(ok.as_str(), "http://127.0.0.1:9/v1/chat/completions");
        let ok = join("http://h/v1/", "/models?x=1").unwrap();
        assert_eq!(ok.as_str(), "http://h/v1/models?x=1");
        assert!(join("http://h", "/anything").is_ok());
        for path in [
            "/../admin",
            "/%2e%2e/admin",
            "/%2E%2E/admin",
            "//evil.example/x",
            "@evil.example/x",
            ".evil.example/x",
            ":8080/x",
            r"/a\..\..\b",
        ] {
            assert!(join("http://h/v1", path).is_err(), "{path} was joined");
        }
        assert!(join("", "/x").is_err());
    }

    #[test]
    fn joined_urls_are_remembered_only_once_accepted() {
        let j = Joined::default();
        let a = j.get("http://h/v1", "/chat/completions").unwrap();
        assert_eq!(a.as_str(), "http://h/v1/chat/completions");
        assert_eq!(j.get("http://h/v1", "/chat/completions").unwrap(), a);
        for _ in 0..2 {
            assert!(j.get("http://h/v1", "/../admin").is_err());
        }
        let b = j.get("http://other:8080/v1", "/chat/completions").unwrap();
        assert_eq!(b.as_str(), "http://other:8080/v1/chat/completions");
    }

    fn chunks(
        parts: Vec<Vec<u8>>,
    ) -> impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static {
        futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p))))
    }

    fn limits(max_event_bytes: usize) -> EventLimits {
        EventLimits {
            idle: Duration::from_secs(5),
            max_event_bytes,
        }
    }

    #[tokio::test]
    async fn an_event_over_the_bound_ends_the_stream() {
        let big = format!("data: {}\n\n", "x".repeat(300));
        let parts = vec![
            b"data: first\n\n".to_vec(),
            big.as_bytes()[..100].to_vec(),
            big.as_bytes()[100..].to_vec(),
            b"data: never read\n\n".to_vec(),
        ];
        let out: Vec<_> = events_from(chunks(parts), "ch".into(), limits(256))
            .collect()
            .await;
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].as_ref().unwrap().data, "first");
        assert!(
            matches!(out[1], Err(UpstreamError::TooLarge { limit: 256, .. })),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn events_under_the_bound_pass() {
        let parts = vec![
            b"data: a\n\ndata: b\n".to_vec(),
            b"\ndata: [DONE]\n\n".to_vec(),
        ];
        let out: Vec<_> = events_from(chunks(parts), "ch".into(), limits(64))
            .collect()
            .await;
        let data: Vec<_> = out.into_iter().map(|e| e.unwrap().data).collect();
        assert_eq!(data, ["a", "b", "[DONE]"]);
    }
}
