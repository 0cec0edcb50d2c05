//! Load benchmark: a mock OpenAI upstream and the real gateway binary on loopback, driven at
//! concurrency 1 and 64, streamed and not, first against the mock directly and then through the
//! gateway (bundled `openai` WebAssembly plugin). Prints RPS, p50 and p99 for each and the ratios.
//!
//! Run: `cargo bench --bench load` (options: `LOAD_SECONDS=5`; `TOLLGATE_BIN=path` drives
//! another build of the gateway). Figures are only comparable within one run: the machine is
//! shared.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::disallowed_methods
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

const CHAT: &str = include_str!("../fixtures/openai/chat.json");
const STREAM: &str = include_str!("../fixtures/openai/chat_stream.sse");

/// The gateway binary: this build's, or another one named by `TOLLGATE_BIN` (to compare two
/// builds against the same mock and load generator in one run).
fn gateway_binary() -> String {
    std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_string())
}

async fn mock(body: Bytes) -> Response {
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["stream"].as_bool())
        .unwrap_or(false);
    if stream {
        ([("content-type", "text/event-stream")], STREAM).into_response()
    } else {
        ([("content-type", "application/json")], CHAT).into_response()
    }
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy)]
struct Figures {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: usize,
}

async fn drive(url: String, stream: bool, concurrency: usize, secs: f64) -> Figures {
    drive_as(url, "gpt-4o-mini", "", stream, concurrency, secs).await
}

async fn drive_as(
    url: String,
    model: &str,
    auth: &str,
    stream: bool,
    concurrency: usize,
    secs: f64,
) -> Figures {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let body = serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    })
    .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let started = Instant::now();
    for _ in 0..concurrency {
        let (client, url, body, stop) = (client.clone(), url.clone(), body.clone(), stop.clone());
        let auth = auth.to_string();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let mut req = client.post(&url).header("content-type", "application/json");
                if !auth.is_empty() {
                    req = req.header("authorization", auth.as_str());
                }
                let r = req.body(body.clone()).send().await;
                match r {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(b) if !stream || b.ends_with(b"data: [DONE]\n\n") => {
                            lat.push(t.elapsed().as_secs_f64() * 1e6)
                        }
                        _ => errors += 1,
                    },
                    Ok(r) => {
                        if errors == 0 {
                            eprintln!("{} {}", r.status(), r.text().await.unwrap_or_default());
                        }
                        errors += 1
                    }
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("{e}");
                        }
                        errors += 1
                    }
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Figures {
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

fn main() {
    let secs: f64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    // The mock upstream runs on its own thread and runtime.
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let app = Router::new().route("/v1/chat/completions", post(mock));
            axum::serve(listener, app).await.unwrap();
        });
    });
    let mock_addr = rx.recv().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            r#"server: {{ listen: "127.0.0.1:0" }}
operator: {{ listen: "127.0.0.1:0" }}
plugins: {{ dir: "{plugins}", watch: false }}
database: {{ url: "sqlite://{db}" }}
moderation: {{ policies_dir: "{policies}", watch: false }}
auth: {{ anonymous_models: [gpt-4o-mini] }}
channels:
  - {{ name: mock, plugin: openai, base_url: "http://{mock_addr}/v1", api_key_env: BENCH_UPSTREAM_KEY }}
models:
  - {{ name: gpt-4o-mini, channel: mock, price: {{ input_per_token: 0, output_per_token: 0 }} }}
  - {{ name: gpt-4o-mini-billed, channel: mock, upstream_model: gpt-4o-mini, price: {{ input_per_token: 150000, output_per_token: 600000 }} }}
log: {{ filter: warn, json: true }}
"#,
            plugins = dir.path().join("plugins").display(),
            db = dir.path().join("bench.db").display(),
            policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies")
        ),
    )
    .unwrap();
    // An account with plenty of credit and a key, made with the CLI like an operator would.
    let cli = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(gateway_binary())
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("BENCH_UPSTREAM_KEY", "sk-bench")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    cli(&["accounts", "create", "bench"]);
    cli(&["credits", "add", "bench", "1000000"]);
    let key = cli(&["keys", "create", "--account", "bench", "--name", "load"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let bearer = format!("Bearer {key}");
    let mut child = Child(
        Command::new(gateway_binary())
            .args(["serve", "--config"])
            .arg(&config)
            .env("BENCH_UPSTREAM_KEY", "sk-bench")
            .env("TOLLGATE__LOG__FILTER", "info")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the gateway starts"),
    );
    let out = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let gw_addr = loop {
        let line = lines.next().expect("gateway output").unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "tollgate is serving"
        {
            break v["fields"]["public_addr"].as_str().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let direct = format!("http://{mock_addr}/v1/chat/completions");
    let through = format!("http://{gw_addr}/v1/chat/completions");
    println!(
        "load benchmark: {secs}s per cell, mock upstream and gateway on loopback, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!();
    println!(
        "| mode | conc | direct rps | gateway rps | rps ratio | direct p50 µs | gateway p50 µs | added p50 µs | direct p99 µs | gateway p99 µs | billed rps | billed/gateway rps | billed p50 µs | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    rt.block_on(async {
        // Warm both paths (connection pools, plugin instance slots, page cache).
        drive(direct.clone(), false, 4, 0.5).await;
        drive(through.clone(), false, 4, 0.5).await;
        drive_as(through.clone(), "gpt-4o-mini-billed", &bearer, false, 4, 0.5).await;
        for stream in [false, true] {
            for conc in [1usize, 64] {
                let d = drive(direct.clone(), stream, conc, secs).await;
                let g = drive(through.clone(), stream, conc, secs).await;
                let b = drive_as(through.clone(), "gpt-4o-mini-billed", &bearer, stream, conc, secs).await;
                println!(
                    "| {} | {conc} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {} |",
                    if stream { "stream" } else { "json" },
                    d.rps,
                    g.rps,
                    g.rps / d.rps,
                    d.p50_us,
                    g.p50_us,
                    g.p50_us - d.p50_us,
                    d.p99_us,
                    g.p99_us,
                    b.rps,
                    b.rps / g.rps,
                    b.p50_us,
                    d.errors + g.errors + b.errors
                );
            }
        }
    });
}
