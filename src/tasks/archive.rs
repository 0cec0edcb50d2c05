//! Archiving: a finished job's outputs are copied from the provider into our object storage (a
//! local folder, or an S3-compatible bucket) and served from `/v1/files/<key>` with links signed
//! for a limited time, so they stay downloadable after the provider's own links expire.
//!
//! What is copied is checked: fetched only from an address the [`AddressGuard`] allows (no
//! loopback, private, link-local or metadata address unless the operator allows the host), no
//! redirect followed, at most `tasks.max_output_bytes`, and its bytes must be a known image,
//! video or audio format whose media type `tasks.output_types` allows.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use hmac::{Hmac, Mac};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use sha2::Sha256;

use crate::config::{Storage, TasksConfig};
use crate::plugins::JobOutput;

/// Why an output could not be archived (the task fails with `archive_failed`).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the output URL is not valid")]
    BadUrl,
    #[error("the output's host is not allowed ({0})")]
    Refused(String),
    #[error("fetching the output failed: {0}")]
    Fetch(String),
    #[error("the provider answered HTTP {0} for the output")]
    Status(u16),
    #[error("the output is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the output is not an allowed media type ({0})")]
    Type(String),
    #[error("storing the output failed: {0}")]
    Store(String),
}

impl ArchiveError {
    /// Worth another try later (the network or the store), as opposed to an output that will
    /// never be acceptable.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Fetch(_) | Self::Store(_))
            || matches!(self, Self::Status(s) if *s >= 500 || *s == 429)
    }
}

/// Which hosts outbound fetches and callbacks may reach: public addresses, plus the hosts the
/// operator allows by name or address (`tasks.allow_hosts`).
#[derive(Debug, Clone)]
pub struct AddressGuard {
    allow: Vec<String>,
}

impl AddressGuard {
    pub fn new(allow: &[String]) -> Self {
        Self {
            allow: allow.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    pub fn allows_host(&self, host: &str) -> bool {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        self.allow.iter().any(|a| a.eq_ignore_ascii_case(h))
    }

    /// Resolve `url`'s host and check every address; the addresses to connect to (pinned, so a
    /// second lookup cannot answer differently).
    pub async fn resolve(&self, url: &reqwest::Url) -> Result<Vec<SocketAddr>, String> {
        let host = url.host_str().ok_or("no host")?.to_string();
        let port = url.port_or_known_default().ok_or("no port")?;
        let allowed = self.allows_host(&host);
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{host} has no address"));
        }
        if !allowed && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(format!(
                "{host} resolves to {} (loopback, private, link-local or reserved)",
                bad.ip()
            ));
        }
        Ok(addrs)
    }
}

/// A globally routable unicast address: not loopback, private, link-local (which includes the
/// cloud metadata address 169.254.169.254), shared (CGNAT), unspecified, broadcast, multicast,
/// documentation or unique-local.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

/// A client for one fetch or delivery: connections only to `addrs` (checked), no redirects,
/// the given timeout.
pub fn pinned_client(
    url: &reqwest::Url,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let host = url.host_str().unwrap_or_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout)
        .resolve_to_addrs(host, addrs)
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// The media type of known image, video and audio formats, from their first bytes.
pub fn sniff(b: &[u8]) -> Option<&'static str> {
    let starts = |p: &[u8]| b.starts_with(p);
    if starts(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if starts(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        Some("image/gif")
    } else if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("image/webp")
    } else if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WAVE" {
        Some("audio/wav")
    } else if b.len() >= 12 && &b[4..8] == b"ftyp" {
        let brand = &b[8..12];
        if brand == b"M4A " {
            Some("audio/mp4")
        } else if brand == b"qt  " {
            Some("video/quicktime")
        } else {
            Some("video/mp4")
        }
    } else if starts(b"\x1a\x45\xdf\xa3") {
        Some("video/webm")
    } else if starts(b"ID3") || (b.len() >= 2 && b[0] == 0xff && (b[1] & 0xe0) == 0xe0) {
        Some("audio/mpeg")
    } else if starts(b"OggS") {
        Some("audio/ogg")
    } else if starts(b"fLaC") {
        Some("audio/flac")
    } else {
        None
    }
}

/// The file extension stored for a media type, and back.
pub fn extension(content_type: &str) -> &'static str {
    match content_type {
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        "audio/wav" => "wav",
        "audio/mp4" => "m4a",
        "video/quicktime" => "mov",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        "audio/mpeg" => "mp3",
        "audio/ogg" => "ogg",
        "audio/flac" => "flac",
        _ => "bin",
    }
}

pub fn content_type_of(key: &str) -> &'static str {
    match key.rsplit('.').next().unwrap_or_default() {
        "png" => "image/png",
        "jpg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "wav" => "audio/wav",
        "m4a" => "audio/mp4",
        "mov" => "video/quicktime",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "flac" => "audio/flac",
        _ => "application/octet-stream",
    }
}

/// Object storage with signed links.
#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    signing_key: Arc<[u8]>,
    /// The base of download links: configured, or the public listener's address once bound.
    public_url: Arc<arc_swap::ArcSwap<String>>,
    url_ttl: Duration,
    max_bytes: u64,
    types: Vec<String>,
    pub guard: AddressGuard,
    fetch_timeout: Duration,
}

impl Archive {
    pub fn new(cfg: &TasksConfig, signing_key: Vec<u8>) -> Result<Self, String> {
        let store: Arc<dyn ObjectStore> = match &cfg.storage {
            Storage::Folder(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(dir)
                        .map_err(|e| e.to_string())?,
                )
            }
            Storage::S3 {
                bucket,
                endpoint,
                region,
                access_key,
                secret_key,
                allow_http,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_allow_http(*allow_http);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(k) = access_key {
                    b = b.with_access_key_id(k.expose());
                }
                if let Some(k) = secret_key {
                    b = b.with_secret_access_key(k.expose());
                }
                Arc::new(b.build().map_err(|e| e.to_string())?)
            }
        };
        Ok(Self {
            store,
            signing_key: signing_key.into(),
            public_url: Arc::new(arc_swap::ArcSwap::from_pointee(
                cfg.public_url
                    .clone()
                    .unwrap_or_else(|| "http://127.0.0.1:8080".into()),
            )),
            url_ttl: cfg.url_ttl,
            max_bytes: cfg.max_output_bytes,
            types: cfg.output_types.clone(),
            guard: AddressGuard::new(&cfg.allow_hosts),
            fetch_timeout: Duration::from_secs(120),
        })
    }

    fn allowed_type(&self, t: &str) -> bool {
        self.types.iter().any(|a| {
            if a.ends_with('/') {
                t.starts_with(a.as_str())
            } else {
                t == a
            }
        })
    }

    /// Fetch one output and store it as `key_stem.<ext>`; the stored key, type and size.
    pub async fn copy(
        &self,
        output: &JobOutput,
        key_stem: &str,
    ) -> Result<super::store::Archived, ArchiveError> {
        let bytes = if let Some(rest) = output.url.strip_prefix("data:") {
            decode_data_url(rest, self.max_bytes)?
        } else {
            self.fetch(&output.url).await?
        };
        let content_type = sniff(&bytes).ok_or_else(|| {
            ArchiveError::Type(
                output
                    .content_type
                    .clone()
                    .unwrap_or_else(|| "unknown bytes".into()),
            )
        })?;
        if !self.allowed_type(content_type) {
            return Err(ArchiveError::Type(content_type.into()));
        }
        let key = format!("{key_stem}.{}", extension(content_type));
        let size = bytes.len() as u64;
        self.store
            .put(&ObjectPath::from(key.as_str()), bytes.into())
            .await
            .map_err(|e| ArchiveError::Store(e.to_string()))?;
        Ok(super::store::Archived {
            key,
            content_type: content_type.into(),
            bytes: size,
        })
    }

    async fn fetch(&self, url: &str) -> Result<Bytes, ArchiveError> {
        let url = reqwest::Url::parse(url).map_err(|_| ArchiveError::BadUrl)?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(ArchiveError::BadUrl);
        }
        let addrs = self
            .guard
            .resolve(&url)
            .await
            .map_err(ArchiveError::Refused)?;
        let client =
            pinned_client(&url, &addrs, self.fetch_timeout).map_err(ArchiveError::Fetch)?;
        let resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| ArchiveError::Fetch(without_url(&e)))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(ArchiveError::Status(status));
        }
        if resp.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(ArchiveError::TooLarge(self.max_bytes));
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ArchiveError::Fetch(without_url(&e)))?;
            if (body.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(ArchiveError::TooLarge(self.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.into())
    }

    /// Use the public listener's bound address as the base of download links (when
    /// `tasks.public_url` is not configured).
    pub fn set_public_url(&self, url: String) {
        self.public_url.store(Arc::new(url));
    }

    /// A download link for `key`, valid for `tasks.url_ttl` from now.
    pub fn signed_url(&self, key: &str) -> String {
        let expires = crate::store::now_ms() / 1000
            + i64::try_from(self.url_ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let sig = self.signature(key, expires);
        format!(
            "{}/v1/files/{key}?expires={expires}&signature={sig}",
            self.public_url.load()
        )
    }

    fn signature(&self, key: &str, expires: i64) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.signing_key).unwrap_or_else(|_| unreachable_mac());
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether a link's signature is ours and it has not expired.
    pub fn verify(&self, key: &str, expires: i64, signature: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        if expires < crate::store::now_ms() / 1000 {
            return false;
        }
        let want = self.signature(key, expires);
        want.as_bytes().ct_eq(signature.as_bytes()).into()
    }

    /// An archived object's bytes as a stream, and its size.
    pub async fn open(
        &self,
        key: &str,
    ) -> Result<
        (
            futures::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
            u64,
        ),
        object_store::Error,
    > {
        let got = self.store.get(&ObjectPath::from(key)).await?;
        let size = got.meta.size;
        Ok((got.into_stream(), size))
    }
}

/// HMAC takes a key of any length; this is never reached.
fn unreachable_mac() -> Hmac<Sha256> {
    #[allow(clippy::expect_used)]
    Hmac::<Sha256>::new_from_slice(b"k").expect("HMAC accepts any key length")
}

/// A reqwest error's kind, without its text (which names the URL: a provider's signed link
/// carries its own token).
pub fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else if e.is_body() || e.is_decode() {
        "the body broke off".into()
    } else {
        "request failed".into()
    }
}

/// `data:[<type>][;base64],<data>`: base64 payloads only (outputs are binary).
fn decode_data_url(rest: &str, max: u64) -> Result<Bytes, ArchiveError> {
    use base64::Engine as _;
    let (meta, data) = rest.split_once(',').ok_or(ArchiveError::BadUrl)?;
    if !meta.ends_with(";base64") {
        return Err(ArchiveError::BadUrl);
    }
    if (data.len() as u64 / 4).saturating_mul(3) > max {
        return Err(ArchiveError::TooLarge(max));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map(Bytes::from)
        .map_err(|_| ArchiveError::BadUrl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_reserved_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn media_is_recognised_by_its_bytes() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(sniff(b"<html><body>"), None);
        assert_eq!(sniff(b"\0\0\0\x18ftypisom"), Some("video/mp4"));
        assert_eq!(content_type_of("tk-1/0.png"), "image/png");
    }
}
