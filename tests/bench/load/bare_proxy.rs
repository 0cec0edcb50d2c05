//! The floor of the load benchmark's layout (`tests/bench/load/run.sh`): a bare hyper reverse
//! proxy with no checks. It reads the request body whole, sends it to `BARE_UPSTREAM` with a
//! pooled client, reads the answer whole and returns it. Same runtime as the gateway (tokio
//! multi-thread, one worker per core it may use).
//!
//! `BARE_LISTEN=127.0.0.1:18184 BARE_UPSTREAM=127.0.0.1:18180 bare_proxy`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Full<Bytes>>;

async fn proxy(
    client: Upstream,
    upstream: &'static str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let uri = format!("http://{upstream}{}", parts.uri.path());
    let mut out = Request::builder().method(parts.method).uri(uri);
    if let Some(ct) = parts.headers.get(hyper::header::CONTENT_TYPE) {
        out = out.header(hyper::header::CONTENT_TYPE, ct);
    }
    let answer = match client.request(out.body(Full::new(body)).unwrap()).await {
        Ok(r) => r,
        Err(_) => {
            return Ok(Response::builder()
                .status(502)
                .body(Full::default())
                .unwrap());
        }
    };
    let (parts, body) = answer.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(Response::from_parts(parts, Full::new(body)))
}

fn main() {
    let listen = std::env::var("BARE_LISTEN").unwrap_or_else(|_| "127.0.0.1:18184".into());
    let upstream: &'static str = std::env::var("BARE_UPSTREAM")
        .unwrap_or_else(|_| "127.0.0.1:18180".into())
        .leak();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(connector);
        let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let client = client.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req| proxy(client.clone(), upstream, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
}
