//! Graceful shutdown of a real `tollgate serve` process under load: SIGTERM while slow answers
//! and slow streams are in flight and clients keep sending. The gateway stops accepting, every
//! request it had read is answered in full, every answer is charged once, nothing stays
//! reserved, and the process exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::json;

use crate::billing::{cli, spawn_gateway};
use crate::common::MockUpstream;

/// $0.01 a request, whatever the usage.
const PRICE: i64 = 10_000_000_000;

fn config(dir: &std::path::Path, upstream: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            r#"server: {{ listen: "127.0.0.1:0", shutdown_grace: 30s }}
operator: {{ listen: "127.0.0.1:0" }}
plugins: {{ dir: "{plugins}" }}
upstream: {{ stream_idle_timeout: 30s }}
database: {{ url: "sqlite://{db}" }}
moderation: {{ policies_dir: "{policies}" }}
channels:
  - {{ name: mock, plugin: openai, base_url: "{upstream}", api_key_env: MOCK_KEY }}
models:
  - {{ name: fast, channel: mock, upstream_model: gpt-test, price: {{ per_request: {PRICE} }} }}
  - {{ name: slow, channel: mock, upstream_model: slow-json, price: {{ per_request: {PRICE} }} }}
  - {{ name: slow-stream, channel: mock, upstream_model: slow-finish, price: {{ per_request: {PRICE} }} }}
log: {{ filter: info, json: true }}
"#,
            plugins = dir.join("plugins").display(),
            db = dir.join("tollgate.db").display(),
            policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    path
}

/// How one request ended, from the client's side.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// 200 and the whole body (a stream up to `[DONE]`).
    Served,
    /// The connection failed before any response: the gateway never read the request (it had
    /// stopped accepting); a load balancer sends it elsewhere.
    NotAccepted,
    /// Anything else: an error status, or a body cut short. Must never happen.
    Failed(String),
}

async fn request(client: &reqwest::Client, base: &str, key: &str, model: &str) -> Outcome {
    let stream = model == "slow-stream";
    let sent = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_connect() || e.is_request() => return Outcome::NotAccepted,
        Err(e) => return Outcome::Failed(format!("{model}: {e}")),
    };
    let status = resp.status();
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(c) => body.extend_from_slice(&c),
            Err(e) => return Outcome::Failed(format!("{model}: body cut: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&body);
    if status != 200 {
        return Outcome::Failed(format!("{model}: {status} {text}"));
    }
    let complete = if stream {
        text.ends_with("data: [DONE]\n\n")
    } else {
        serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["usage"].is_object())
    };
    if complete {
        Outcome::Served
    } else {
        Outcome::Failed(format!("{model}: incomplete body {text}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_request_and_settles_every_charge() {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &up.base_url());
    let (mut gateway, base) = spawn_gateway(&config);
    cli(&config, &["accounts", "create", "busy"]);
    cli(&config, &["credits", "add", "busy", "100"]);
    let key = cli(
        &config,
        &["keys", "create", "--account", "busy", "--name", "k"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();

    // Steady load: eight clients sending fast requests back to back until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut steady = Vec::new();
    for _ in 0..8 {
        let (client, base, key, stop) = (client.clone(), base.clone(), key.clone(), stop.clone());
        steady.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                outcomes.push(request(&client, &base, &key, "fast").await);
            }
            outcomes
        }));
    }
    // Slow work in flight: answers that take SLOW_JSON_PAUSE and streams of six events with
    // SLOW_FINISH_PAUSE between them.
    let mut slow = Vec::new();
    for i in 0..16 {
        let (client, base, key) = (client.clone(), base.clone(), key.clone());
        let model = if i % 2 == 0 { "slow" } else { "slow-stream" };
        slow.push(tokio::spawn(async move {
            request(&client, &base, &key, model).await
        }));
    }
    // Every slow request has reached the upstream: the gateway holds all sixteen.
    crate::common::wait_for("the slow requests at the upstream", async || {
        let reqs = up.state.requests.lock().unwrap();
        reqs.iter().filter(|r| r.body.contains("\"slow-")).count() == 16
    })
    .await;

    let pid = gateway.0.id().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());

    // It stops accepting at once, while the slow work is still running.
    let addr = base.trim_start_matches("http://").to_string();
    crate::common::wait_for("the listener closed", async || {
        tokio::net::TcpStream::connect(&addr).await.is_err()
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    // The streams (an event every SLOW_FINISH_PAUSE) were still running when it stopped
    // accepting: the shutdown had work in flight to drain.
    assert!(
        slow.iter().any(|h| !h.is_finished()),
        "the slow work ended before the listener closed"
    );

    // Every slow request ends served: none was cut by the shutdown.
    for h in slow {
        assert_eq!(h.await.unwrap(), Outcome::Served);
    }
    let mut served = 16;
    let mut not_accepted = 0;
    for h in steady {
        for outcome in h.await.unwrap() {
            match outcome {
                Outcome::Served => served += 1,
                Outcome::NotAccepted => not_accepted += 1,
                Outcome::Failed(why) => panic!("a request failed in the shutdown: {why}"),
            }
        }
    }
    assert!(
        served > 16,
        "the steady clients were served before the signal"
    );

    // The process ends by itself, successfully, well within its grace.
    let exited = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = gateway.0.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let status = exited.expect("the gateway exited after draining");
    assert!(status.success(), "exit status {status}");

    // Money: one charge per served request, nothing reserved, the ledger sums to the balance.
    let account = cli(&config, &["credits", "show", "busy"]);
    assert_eq!(account["reserved"], 0, "a reservation stayed open");
    let ledger = cli(
        &config,
        &[
            "credits",
            "ledger",
            "--account",
            "busy",
            "--limit",
            "100000",
        ],
    );
    let entries = ledger.as_array().unwrap();
    let charges = entries.iter().filter(|e| e["kind"] == "charge").count();
    assert_eq!(
        charges, served,
        "one charge per served request ({not_accepted} not accepted)"
    );
    let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(account["balance"].as_i64().unwrap(), sum);
    assert_eq!(sum, 100 * 1_000_000_000_000 - served as i64 * PRICE);
}
