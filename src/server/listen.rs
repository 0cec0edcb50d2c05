//! Accepting connections on the public listener: a cap on open connections (one more is
//! answered 503 and closed at once), a timeout for each request's headers (also while a
//! keep-alive connection idles), and a shutdown that stops accepting, lets requests and streams
//! in flight finish for `server.shutdown_grace`, then cuts what is left.
//!
//! Body read timeouts and the bound on body bytes in flight are applied where bodies are read
//! ([`super::RawBody`]), with [`BodyBudget`].

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// The answer to a connection over `server.max_connections`.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 117\r\n\r\n{\"error\":{\"message\":\"too many open connections; retry shortly\",\"type\":\"api_error\",\"code\":\"server_busy\",\"param\":null}}";

/// Connection counters, registered once per listener.
#[derive(Clone, Default)]
struct ConnMetrics {
    open: Gauge,
    refused: Counter,
    cut: Counter,
}

impl ConnMetrics {
    fn register(metrics: &Metrics) -> Self {
        let m = Self::default();
        metrics.register_with(|reg| {
            reg.register(
                "connections_open",
                "Open connections on the public listener",
                m.open.clone(),
            );
            reg.register(
                "connections_refused",
                "Connections refused because server.max_connections were open",
                m.refused.clone(),
            );
            reg.register(
                "connections_cut",
                "Connections closed at shutdown after server.shutdown_grace",
                m.cut.clone(),
            );
        });
        m
    }
}

/// Serve `app` on `listener` until `stop`, then drain within `cfg.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let counters = ConnMetrics::register(&metrics);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, _peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let _ = tcp.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.refused.inc();
            conns.spawn(refuse(tcp));
            continue;
        };
        counters.open.inc();
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let open = counters.open.clone();
        let first_byte = cfg.header_read_timeout;
        conns.spawn(async move {
            // A connection that never sends a byte is closed like one that stalls in its headers.
            let mut probe = [0u8; 1];
            if let Ok(Ok(n)) = tokio::time::timeout(first_byte, tcp.peek(&mut probe)).await
                && n > 0
            {
                let conn = builder
                    .serve_connection(TokioIo::new(tcp), service)
                    .into_owned();
                // Errors here are the client's (reset, bad bytes, header timeout): nothing to report.
                let _ = watcher.watch(conn).await;
            }
            open.dec();
            drop(slot);
        });
    }
    drop(listener);
    let in_flight = conns.len();
    if in_flight > 0 {
        tracing::info!(connections = in_flight, grace = ?cfg.shutdown_grace, "draining connections");
    }
    let drained = tokio::time::timeout(cfg.shutdown_grace, async {
        graceful.shutdown().await;
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let left = conns.len();
        counters.cut.inc_by(left as u64);
        tracing::warn!(
            connections = left,
            "shutdown grace over: closing what is left"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

/// Answer a connection over the cap with a 503 and close it, without reading its request.
async fn refuse(mut tcp: tokio::net::TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tcp.write_all(BUSY).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// The bytes of request bodies held at once, over every request.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    max_body: usize,
}

/// A body's share of the budget, given back when dropped.
pub struct BodyPermit {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl BodyBudget {
    pub fn new(total: usize, max_body: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            max_body,
        }
    }

    /// Take room for a body of `len` bytes (the declared length, else the largest body), or
    /// `None` when the budget has no room for it now.
    pub fn take(&self, len: Option<u64>) -> Option<BodyPermit> {
        let want = len
            .map_or(self.max_body, |l| {
                usize::try_from(l).unwrap_or(usize::MAX).min(self.max_body)
            })
            .max(1);
        let n = u32::try_from(want).ok()?;
        match self.bytes.clone().try_acquire_many_owned(n) {
            Ok(p) => Some(BodyPermit { _permit: Some(p) }),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_answer_declares_its_length() {
        let text = std::str::from_utf8(BUSY).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn the_body_budget_refuses_past_its_total_and_recovers() {
        let b = BodyBudget::new(100, 60);
        let first = b.take(Some(60));
        assert!(first.is_some());
        assert!(b.take(Some(50)).is_none(), "60 + 50 > 100");
        assert!(b.take(Some(40)).is_some());
        drop(first);
        assert!(
            b.take(None).is_some(),
            "an unknown length takes the largest body"
        );
    }
}
