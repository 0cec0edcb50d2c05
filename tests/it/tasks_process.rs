//! Tasks across real gateway processes: `kill -9` while tasks are `handling` (every task
//! finishes after the restart, each charged once), and two gateways on one PostgreSQL (every
//! task driven by one of them at a time: each job submitted once, none lost).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};

use crate::billing::{cli, postgres_url, spawn_gateway};
use crate::task_mocks::{ReplicateMock, TaskMock};

/// Price of one image of `slow`/`fast`: $0.002.
const PRICE: i64 = 2_000_000_000;

fn config(dir: &std::path::Path, db_url: &str, rep: &TaskMock) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            r#"server: {{ listen: "127.0.0.1:0" }}
operator: {{ listen: "127.0.0.1:0" }}
plugins: {{ dir: "{plugins}" }}
database: {{ url: "{db_url}" }}
moderation: {{ policies_dir: "{policies}" }}
billing: {{ reservation_ttl: 2s }}
channels:
  - {{ name: rep, plugin: replicate, base_url: "{rep}", api_key_env: REPLICATE_KEY }}
models:
  - {{ name: slow, channel: rep, upstream_model: mock/ok-12, price: {{ per_image: {PRICE} }} }}
  - {{ name: fast, channel: rep, upstream_model: mock/ok-2, price: {{ per_image: {PRICE} }} }}
tasks:
  poll_initial: 50ms
  poll_max: 150ms
  lease: 3s
  allow_hosts: [127.0.0.1]
  storage: {{ folder: "{outputs}" }}
log: {{ filter: info, json: true }}
"#,
            plugins = dir.join("plugins").display(),
            policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
            rep = rep.base_url(),
            outputs = dir.join("outputs").display(),
        ),
    )
    .unwrap();
    path
}

fn funded_key(config: &std::path::Path, name: &str) -> String {
    cli(config, &["accounts", "create", name]);
    cli(config, &["credits", "add", name, "1"]);
    cli(
        config,
        &["keys", "create", "--account", name, "--name", "k"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn submit(client: &reqwest::Client, base: &str, key: &str, model: &str, n: usize) -> String {
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(key)
        .json(&json!({"model": model, "input": {"prompt": format!("a tile number {n}")}}))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    body["data"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

async fn status(client: &reqwest::Client, base: &str, key: &str, id: &str) -> String {
    let body: Value = client
        .get(format!("{base}/v1/tasks/{id}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["data"]["status"].as_str().unwrap_or("?").to_string()
}

/// Wait (at most 60 s) until every task is `success`.
async fn all_succeed(client: &reqwest::Client, base: &str, key: &str, ids: &[String]) {
    let start = std::time::Instant::now();
    loop {
        let mut pending = Vec::new();
        for id in ids {
            let s = status(client, base, key, id).await;
            assert_ne!(s, "fail", "task {id} failed");
            if s != "success" {
                pending.push((id.clone(), s));
            }
        }
        if pending.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still running: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every task charged exactly once, at its price; the balance is what is left; nothing held.
fn charged_once_each(config: &std::path::Path, account: &str, ids: &[String]) {
    let ledger = cli(
        config,
        &["credits", "ledger", "--account", account, "--limit", "1000"],
    );
    let entries = ledger
        .as_array()
        .or_else(|| ledger["data"].as_array())
        .unwrap()
        .clone();
    for id in ids {
        let charges: Vec<&Value> = entries
            .iter()
            .filter(|e| e["request_id"] == id.as_str() && e["kind"] == "charge")
            .collect();
        assert_eq!(charges.len(), 1, "task {id}: {charges:?}");
        assert_eq!(
            charges[0]["amount"].as_i64().unwrap(),
            -PRICE,
            "{:?}",
            charges[0]
        );
    }
    let shown = cli(config, &["credits", "show", account]);
    assert_eq!(shown["reserved"], 0, "{shown}");
    assert_eq!(
        shown["balance"].as_i64().unwrap(),
        1_000_000_000_000 - PRICE * ids.len() as i64,
        "{shown}"
    );
}

async fn kill_while_handling(db: &str, dir: &std::path::Path, rep: TaskMock) {
    let config = config(dir, db, &rep);
    let key = funded_key(&config, "survivor");
    let client = reqwest::Client::new();
    let (mut gw, base) = spawn_gateway(&config);
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(submit(&client, &base, &key, "slow", n).await);
    }
    // Every job submitted and polled at least once: the tasks are `handling`.
    let start = std::time::Instant::now();
    while rep.job_ids().len() < 6 || rep.job_ids().iter().any(|j| rep.polls_of(j) == 0) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "jobs not all polled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        assert_eq!(status(&client, &base, &key, id).await, "handling");
    }
    gw.0.kill().unwrap(); // SIGKILL
    gw.0.wait().unwrap();
    // Let the dead gateway's leases run out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_gw2, base2) = spawn_gateway(&config);
    all_succeed(&client, &base2, &key, &ids).await;
    assert_eq!(rep.submits(), 6, "no job was submitted twice");
    charged_once_each(&config, "survivor", &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_while_handling_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kill.db").display());
    kill_while_handling(&db, dir.path(), ReplicateMock::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_nine_while_handling_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let db = postgres_url().await;
    kill_while_handling(&db, dir.path(), ReplicateMock::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_postgres_drive_every_task_once() {
    let rep = ReplicateMock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = postgres_url().await;
    let config = config(dir.path(), &db, &rep);
    let key = funded_key(&config, "shared");
    let client = reqwest::Client::new();
    let (_a, base_a) = spawn_gateway(&config);
    let (_b, base_b) = spawn_gateway(&config);
    let mut ids = Vec::new();
    for n in 0..20 {
        let base = if n % 2 == 0 { &base_a } else { &base_b };
        ids.push(submit(&client, base, &key, "fast", n).await);
    }
    all_succeed(&client, &base_a, &key, &ids).await;
    // Either gateway answers for any task, with links it can serve.
    for id in &ids {
        assert_eq!(status(&client, &base_b, &key, id).await, "success");
    }
    // Each job was submitted once: no task was driven by both gateways at once.
    assert_eq!(rep.submits(), 20);
    charged_once_each(&config, "shared", &ids);
}
