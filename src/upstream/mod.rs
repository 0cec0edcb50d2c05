//! The only outbound HTTP client: sends what a provider plugin built, adds the credential,
//! enforces timeouts, and frames server-sent events as they arrive.
//!
//! Credentials are added here, after the plugin built the request, from the auth scheme the
//! plugin's manifest declares; nothing else in tollgate opens a connection to a provider.

pub mod sse;

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
    timeout: Duration,
    idle_timeout: Duration,
}

/// A response whose headers arrived; the body is still on the wire.
pub struct Pending {
    channel: String,
    response: reqwest::Response,
    deadline: Instant,
    idle_timeout: Duration,
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
            timeout: cfg.timeout,
            idle_timeout: cfg.stream_idle_timeout,
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
        if target.base_url.is_empty() {
            return Err(UpstreamError::BadRequest {
                channel,
                detail: "the channel has no base_url".into(),
            });
        }
        let mut url =
            reqwest::Url::parse(&format!("{}{}", target.base_url, req.path)).map_err(|e| {
                UpstreamError::BadRequest {
                    channel: channel.clone(),
                    detail: format!("invalid URL: {e}"),
                }
            })?;
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
        })
    }
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

    /// Read the whole body, within what is left of the upstream timeout.
    pub async fn read(self) -> Result<InboundResponse, UpstreamError> {
        let status = self.status();
        let headers = self.headers();
        let left = self.deadline.saturating_duration_since(Instant::now());
        let channel = self.channel;
        match tokio::time::timeout(left, self.response.bytes()).await {
            Err(_) => Err(UpstreamError::Timeout {
                channel,
                after: left,
            }),
            Ok(Err(e)) => Err(classify(&channel, e)),
            Ok(Ok(body)) => Ok(InboundResponse {
                status,
                headers,
                body: body.to_vec(),
            }),
        }
    }

    /// The body as server-sent events, framed as they arrive. Each event must arrive within the
    /// idle timeout; a body that ends in the middle of an event is reported as truncated.
    /// Dropping the stream drops the connection, which is how the upstream learns of a cancel.
    pub fn events(self) -> impl Stream<Item = Result<sse::Event, UpstreamError>> + Send + 'static {
        let channel = self.channel;
        let idle = self.idle_timeout;
        let body = self.response.bytes_stream();
        events_from(body, channel, idle)
    }
}

fn events_from(
    body: impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
    channel: String,
    idle: Duration,
) -> impl Stream<Item = Result<sse::Event, UpstreamError>> + Send + 'static {
    let state = (
        Box::pin(body),
        sse::Decoder::default(),
        std::collections::VecDeque::new(),
        false,
    );
    futures::stream::unfold(state, move |(mut body, mut dec, mut queue, mut ended)| {
        let channel = channel.clone();
        async move {
            loop {
                if let Some(ev) = queue.pop_front() {
                    return Some((Ok(ev), (body, dec, queue, ended)));
                }
                if ended {
                    return None;
                }
                match tokio::time::timeout(idle, body.next()).await {
                    Err(_) => {
                        ended = true;
                        return Some((
                            Err(UpstreamError::Timeout {
                                channel: channel.clone(),
                                after: idle,
                            }),
                            (body, dec, queue, ended),
                        ));
                    }
                    Ok(Some(Ok(bytes))) => queue.extend(dec.push(&bytes)),
                    Ok(Some(Err(e))) => {
                        ended = true;
                        return Some((Err(classify(&channel, e)), (body, dec, queue, ended)));
                    }
                    Ok(None) => {
                        ended = true;
                        match dec.finish() {
                            Ok(Some(ev)) => queue.push_back(ev),
                            Ok(None) => {}
                            Err(sse::Truncated) => {
                                return Some((
                                    Err(UpstreamError::Truncated {
                                        channel: channel.clone(),
                                    }),
                                    (body, dec, queue, ended),
                                ));
                            }
                        }
                    }
                }
            }
        }
    })
}
