//! The public listener under hostile or unlucky clients: stalled headers and bodies, too many
//! connections, too many body bytes at once, a shutdown that must end, the auth scheme's case,
//! and a config change noticed while a neighbour file in its folder never stops changing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// A gateway whose `server:` section has `extra` appended.
async fn gateway_with(extra: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let yaml = config_yaml(None, "", "", &plugins).replace(
        "  request_timeout: 30s\n",
        &format!("  request_timeout: 30s\n{extra}"),
    );
    TestGateway::start_yaml(&yaml, dir).await
}

fn addr(gw: &TestGateway) -> String {
    gw.public.trim_start_matches("http://").to_string()
}

/// Read until the server closes the connection (or 10 s pass); what it sent.
async fn read_to_close(tcp: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    read.ok().map(|_| String::from_utf8_lossy(&out).to_string())
}

#[tokio::test]
async fn a_client_that_stalls_in_its_headers_is_closed() {
    let gw = gateway_with("  header_read_timeout: 300ms\n").await;
    let mut tcp = TcpStream::connect(addr(&gw)).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut tcp).await;
    assert!(got.is_some(), "the connection is closed, not held");
    // A connection that sends nothing is closed too, and so is an idle keep-alive one.
    let mut idle = TcpStream::connect(addr(&gw)).await.unwrap();
    assert!(read_to_close(&mut idle).await.is_some());
    let mut kept = TcpStream::connect(addr(&gw)).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut kept).await.expect("closed after idling");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_client_that_stalls_in_its_body_gets_a_408() {
    let gw = gateway_with("  body_read_timeout: 300ms\n").await;
    let mut tcp = TcpStream::connect(addr(&gw)).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let got = read_to_close(&mut tcp).await.expect("answered and closed");
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("\"code\":\"body_timeout\""), "{got}");
}

#[tokio::test]
async fn connections_over_the_cap_get_a_503_at_once() {
    let gw = gateway_with("  max_connections: 2\n").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(addr(&gw)).await.unwrap();
        // A complete request keeps each connection open (keep-alive) and proves it was served.
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(tcp);
    }
    let mut third = TcpStream::connect(addr(&gw)).await.unwrap();
    let got = read_to_close(&mut third).await.expect("refused and closed");
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("retry-after: 1"), "{got}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_connections_refused_total 1"),
        "{metrics}"
    );
    // A slot frees when a connection closes.
    drop(held.pop());
    wait_for("a slot to free", async || {
        let mut tcp = TcpStream::connect(addr(&gw)).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        read_to_close(&mut tcp)
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
}

#[tokio::test]
async fn bodies_past_the_in_flight_budget_get_a_503_with_retry_after() {
    let gw = gateway_with("  max_inflight_body_bytes: 65536\n").await;
    // One client declares a body of the whole budget and stalls in it.
    let mut staller = TcpStream::connect(addr(&gw)).await.unwrap();
    staller
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 65536\r\n\r\n{",
        )
        .await
        .unwrap();
    let resp = wait_for_status(&gw, 503).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "server_busy");
    // The stalled body's share comes back when its connection goes.
    drop(staller);
    wait_for_status(&gw, 200).await;
}

async fn wait_for_status(gw: &TestGateway, status: u16) -> reqwest::Response {
    for _ in 0..200 {
        let resp = gw.chat("demo-chat", false).await;
        if resp.status().as_u16() == status {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never got a {status}");
}

#[tokio::test]
async fn shutdown_ends_within_its_grace_even_with_stalled_clients() {
    let mut gw = gateway_with("  shutdown_grace: 300ms\n  body_read_timeout: 3600s\n").await;
    let mut staller = TcpStream::connect(addr(&gw)).await.unwrap();
    staller
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    // The request is in flight (its body being read) before the shutdown starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running = gw.running.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), running.shutdown())
        .await
        .expect("shutdown finished");
    assert!(
        read_to_close(&mut staller).await.is_some(),
        "the stalled client was cut"
    );
}

#[tokio::test]
async fn the_auth_scheme_is_case_insensitive() {
    let gw = gateway_with("").await;
    let (_, key) = gw.admin_funded_key("cases", "0").await;
    let key = key.as_str();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = gw
            .client
            .get(format!("{}/v1/balance", gw.public))
            .header("authorization", format!("{scheme} {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
    }
    let resp = gw
        .client
        .get(format!("{}/v1/balance", gw.public))
        .header("authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn a_config_change_is_seen_while_a_neighbour_file_keeps_changing() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let base = config_yaml(None, "", "", &plugins);
    let gw = TestGateway::start_file(&base, dir).await;
    let folder = gw.dir.path().to_path_buf();
    // A neighbour (as a busy SQLite file would) written every 10 ms for the whole test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise = {
        let (stop, folder) = (stop.clone(), folder.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                std::fs::write(folder.join("busy.db-wal"), i.to_le_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let config_path = folder.join("config.yaml");
    std::fs::write(&config_path, base.replace("models:", "models: [[[")).unwrap();
    wait_for("the refusal to be counted", async || {
        gw.metrics()
            .await
            .contains("tollgate_config_reloads_total{outcome=\"refused\"} 1")
    })
    .await;
    std::fs::write(
        &config_path,
        base.replace(
            "models:\n",
            "models:\n  - { name: demo-two, channel: demo, upstream_model: demo-chat }\n",
        ),
    )
    .unwrap();
    wait_for("the new model to serve", async || {
        gw.get("/v1/models/demo-two").await.status() == 200
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    noise.join().unwrap();
}

/// On the multi-threaded runtime that `serve` uses, a large request's plugin call leaves the
/// worker: with one worker, another request is answered while a plugin spins on a large body.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_slow_plugin_call_on_a_large_body_does_not_stall_other_requests() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(artifact("tg_spin"), plugins.join("tg_spin.wasm")).unwrap();
    let yaml = config_yaml(
        None,
        "  - { name: ch-spin, plugin: tg_spin, base_url: \"http://127.0.0.1:9\" }\n",
        "  - { name: m-spin, channel: ch-spin, free: true }\n",
        &plugins,
    )
    .replace("  max_body_bytes: 65536\n", "  max_body_bytes: 1048576\n")
    .replace("  call_timeout: 200ms\n", "  call_timeout: 3s\n");
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    let big = "word ".repeat(30_000);
    let slow = {
        let (client, url) = (
            gw.client.clone(),
            format!("{}/v1/chat/completions", gw.public),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .json(&serde_json::json!({"model": "m-spin", "messages": [{"role": "user", "content": big}]}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    // The spinning call has started (it runs for its whole 3 s bound).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.get("/healthz").await.status(), 200);
    assert!(!slow.is_finished(), "answered while the plugin still spins");
    assert_eq!(slow.await.unwrap(), 502);
}

/// A graceful shutdown ends with every charge in the ledger and every background task done.
#[tokio::test]
async fn shutdown_moves_every_charge_into_the_ledger_and_ends_background_work() {
    let mut gw = gateway_with("").await;
    let (_, key) = gw.admin_funded_key("last-orders", "1.00").await;
    for stream in [false, true] {
        let resp = gw
            .client
            .post(format!("{}/v1/chat/completions", gw.public))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "demo-chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    let running = gw.running.take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), running.shutdown())
        .await
        .expect("shutdown finished, background tasks included");
    let db = gw.dir.path().join("tollgate.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let (charges,): (i64,) = sqlx::query_as("SELECT count(*) FROM ledger WHERE kind = 'charge'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(charges, 2, "both charges are in the ledger");
}

/// The gateway's memory high-water mark (`VmHWM`) and current size (`VmRSS`), in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A request's body costs about its size once, not a copy per step: forty concurrent chat
/// requests of 3.9 MB, all held in flight at once (the upstream answers none until all forty
/// have arrived), raise the `tollgate serve` process's peak memory by less than six bodies a
/// request. Measured: about 3.4 (the body, the upstream body the plugin built, and the
/// allocator's and the instance pool's slack); 9.0 when every step kept its own copy
/// (BENCHMARKS.md).
#[test]
fn forty_large_bodies_in_flight_cost_about_their_size_each() {
    use std::io::BufRead as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const REQUESTS: usize = 40;
    const BODY: usize = 3_900_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The upstream holds every large request until all have arrived, then answers each.
    let arrived = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let upstream = {
        let (arrived, all) = (arrived.clone(), all.clone());
        let app = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let (arrived, all) = (arrived.clone(), all.clone());
                    async move {
                        let large = body.len() > 1_000_000;
                        drop(body);
                        let everyone = all.notified();
                        if !large {
                            // A small request (the warm-up) is answered at once.
                        } else if arrived.fetch_add(1, Ordering::SeqCst) + 1 >= REQUESTS {
                            all.notify_waiters();
                        } else {
                            let _ = tokio::time::timeout(Duration::from_secs(120), everyone).await;
                        }
                        (
                            [("content-type", "application/json")],
                            fixture("openai/chat.json"),
                        )
                    }
                }),
            )
            .layer(axum::extract::DefaultBodyLimit::disable());
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            format!("http://{addr}/v1")
        })
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"server:
  listen: "127.0.0.1:0"
  max_body_bytes: 4194304
  max_inflight_body_bytes: 268435456
  request_timeout: 300s
  body_read_timeout: 120s
operator: {{ listen: "127.0.0.1:0" }}
plugins: {{ dir: "{plugins}", watch: false, call_timeout: 10s }}
upstream: {{ timeout: 300s }}
database: {{ url: "sqlite://{db}" }}
moderation: {{ policies_dir: "{policies}", watch: false }}
channels:
  - {{ name: mock, plugin: openai, base_url: "{upstream}", api_key_env: MOCK_KEY }}
models:
  - {{ name: big, channel: mock, upstream_model: gpt-test, free: true }}
auth: {{ anonymous_models: [big] }}
log: {{ filter: info, json: true }}
"#,
            plugins = dir.path().join("plugins").display(),
            db = dir.path().join("tollgate.db").display(),
            policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("MOCK_KEY", "sk-test-secret")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let child = Kill(child);
    let public = loop {
        let line = lines.next().expect("gateway output").unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "tollgate is serving"
        {
            break format!("http://{}", v["fields"]["public_addr"].as_str().unwrap());
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = child.0.id();
    // A benign English prompt of 3.9 MB.
    let sentence = "The weather is mild today and the river runs slowly past the old mill. ";
    let text = sentence.repeat(BODY / sentence.len());
    let body = bytes::Bytes::from(
        serde_json::json!({"model": "big", "messages": [{"role": "user", "content": text}]})
            .to_string(),
    );
    drop(text);
    let client = reqwest::Client::new();
    let url = format!("{public}/v1/chat/completions");
    // One small request first: the plugin, the policies and the tokenizer are all warm.
    let warm = rt
        .block_on(
            client
                .post(&url)
                .json(&serde_json::json!({"model": "big", "messages": [{"role": "user", "content": "hi"}]}))
                .send(),
        )
        .unwrap();
    assert_eq!(warm.status(), 200);
    let (_, before) = memory_of(pid);
    let statuses = rt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..REQUESTS {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            handles.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }));
        }
        let mut statuses = Vec::new();
        for h in handles {
            statuses.push(h.await.unwrap());
        }
        statuses
    });
    assert!(statuses.iter().all(|(s, _)| *s == 200), "{statuses:?}");
    assert_eq!(arrived.load(Ordering::SeqCst), REQUESTS);
    let (peak, after) = memory_of(pid);
    let per_request = peak.saturating_sub(before) / REQUESTS as u64;
    eprintln!(
        "body {} bytes; before {} MB, peak {} MB, after {} MB; {} MB per request in flight ({:.1} bodies)",
        body.len(),
        before >> 20,
        peak >> 20,
        after >> 20,
        per_request >> 20,
        per_request as f64 / body.len() as f64
    );
    assert!(
        per_request < 6 * body.len() as u64,
        "{per_request} bytes a request in flight for a body of {}",
        body.len()
    );
}
