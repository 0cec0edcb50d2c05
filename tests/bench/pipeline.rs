//! Instruction-count benchmark of whole requests through the gateway, in one process, for
//! `valgrind --tool=callgrind` (`tests/bench/callgrind.sh` runs it and breaks the count down by
//! step): the real listener, router, admission, screening, reservation, the bundled `openai`
//! plugin building the upstream request, the upstream call to a mock on loopback (a plain thread
//! of this process answering the recorded fixture), the plugin parsing the answer, the settle
//! and the response, read whole by a plain HTTP/1.1 client on another thread.
//!
//! The gateway runs on a current-thread runtime, so a request's work is on one thread and counts
//! the same every run. `bench_mark` is called before and after the measured requests:
//! `--dump-before='*bench_mark*'` makes callgrind dump there, so the middle dump holds exactly
//! the measured requests (every thread). Alone (without valgrind) it prints the time per request.
//!
//! `PIPELINE_REQUESTS` (default 200), `PIPELINE_KEY=1` (a funded key with limits, a priced model;
//! default anonymous on a free model), `PIPELINE_STREAM=1`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::disallowed_methods
)]

/// The gateway binary's allocator (`src/main.rs`), so the count is the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Instant;

const CHAT: &str = include_str!("../fixtures/openai/chat.json");
const STREAM: &str = include_str!("../fixtures/openai/chat_stream.sse");

/// Where callgrind dumps its counters (`--dump-before`): a call that is never inlined.
#[inline(never)]
fn bench_mark(label: &str) {
    std::hint::black_box(label);
}

/// One HTTP/1.1 message read whole from `conn`: the head, and the body (content-length or
/// chunked, which is returned still chunked).
fn read_message(conn: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    loop {
        let body = &buf[head_end..];
        let done = match length {
            Some(n) => body.len() >= n,
            None if head.contains("transfer-encoding: chunked") => body.ends_with(b"0\r\n\r\n"),
            None => true,
        };
        if done {
            break;
        }
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
    (head, buf[head_end..].to_vec())
}

/// The mock upstream: one thread per connection, the fixture for every request.
#[inline(never)]
fn mock_connection(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = Vec::new();
    let json = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    let sse = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{STREAM}",
        STREAM.len()
    );
    loop {
        let mut probe = [0u8; 1];
        match conn.peek(&mut probe) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (_, body) = read_message(&mut conn, &mut buf);
        let streamed = body.windows(13).any(|w| w == b"\"stream\":true");
        let reply = if streamed { &sse } else { &json };
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request through the gateway, answered whole.
#[inline(never)]
fn client_request(conn: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> usize {
    conn.write_all(request).unwrap();
    let (head, body) = read_message(conn, buf);
    assert!(
        head.starts_with("http/1.1 200"),
        "{head}{}",
        String::from_utf8_lossy(&body)
    );
    body.len()
}

fn main() {
    let n: usize = std::env::var("PIPELINE_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let keyed = std::env::var("PIPELINE_KEY").is_ok_and(|v| v == "1");
    let stream = std::env::var("PIPELINE_STREAM").is_ok_and(|v| v == "1");

    let mock = TcpListener::bind("127.0.0.1:0").unwrap();
    let mock_addr = mock.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in mock.incoming() {
            let conn = conn.unwrap();
            std::thread::spawn(move || mock_connection(conn));
        }
    });

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let config = dir.path().join("config.yaml");
    // Few instance slots: valgrind cannot map the address space of the default pool (8: two
    // of them may hold idle instances, one of each plugin a request uses).
    std::fs::write(
        &config,
        format!(
            r#"server: {{ listen: "127.0.0.1:0" }}
operator: {{ listen: "127.0.0.1:0" }}
plugins: {{ dir: "{plugins}", watch: false, max_instances: 8 }}
database: {{ url: "sqlite://{db}" }}
moderation: {{ policies_dir: "{policies}", watch: false }}
auth: {{ anonymous_models: [bench] }}
channels:
  - {{ name: mock, plugin: openai, base_url: "http://{mock_addr}/v1", api_key_env: BENCH_UPSTREAM_KEY }}
models:
  - {{ name: bench, channel: mock, upstream_model: gpt-4o-mini, free: true }}
  - {{ name: bench-billed, channel: mock, upstream_model: gpt-4o-mini, price: {{ input_per_token: 150000, output_per_token: 600000 }} }}
log: {{ filter: info, json: true }}
"#,
            plugins = dir.path().join("plugins").display(),
            db = dir.path().join("bench.db").display(),
            policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies")
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
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
    let mut auth = String::new();
    if keyed {
        cli(&["accounts", "create", "bench"]);
        cli(&["credits", "add", "bench", "1000000"]);
        let key = cli(&[
            "keys",
            "create",
            "--account",
            "bench",
            "--name",
            "bench",
            "--policy-set",
            "default",
            "--requests-per-minute",
            "10000000",
            "--tokens-per-minute",
            "10000000000",
            "--concurrent-requests",
            "1000",
            "--spend-per-day-usd",
            "1000000",
        ])["key"]
            .as_str()
            .unwrap()
            .to_string();
        auth = format!("authorization: Bearer {key}\r\n");
    }

    let env: std::collections::BTreeMap<String, String> =
        [("BENCH_UPSTREAM_KEY".to_string(), "sk-bench".to_string())].into();
    let yaml = std::fs::read_to_string(&config).unwrap();
    let cfg = tollgate::config::from_yaml(&yaml, &env).unwrap();
    tollgate::telemetry::init(&cfg.log);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let running = tollgate::app::start(cfg).await.unwrap();
            addr_tx.send(running.public_addr).unwrap();
            let _ = stop_rx.await;
            running.shutdown().await;
        });
    });
    let addr = addr_rx.recv().unwrap();

    let model = if keyed { "bench-billed" } else { "bench" };
    let body = format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Say hello in one short sentence."}}]}}"#
    );
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    // Warm: connections, instance slots, caches (the key's), first-use allocations.
    for _ in 0..20 {
        client_request(&mut conn, request.as_bytes(), &mut buf);
    }
    bench_mark("start");
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..n {
        bytes += client_request(&mut conn, request.as_bytes(), &mut buf);
    }
    let elapsed = started.elapsed();
    bench_mark("end");
    drop(conn);
    println!(
        "{n} requests ({} key, {}): {:.1} µs per request (wall, one at a time), {} bytes each",
        if keyed { "with a" } else { "no" },
        if stream { "stream" } else { "json" },
        elapsed.as_secs_f64() * 1e6 / n as f64,
        bytes / n
    );
    let _ = stop_tx.send(());
    gateway.join().unwrap();
}
