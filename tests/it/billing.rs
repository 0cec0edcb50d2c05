//! Keys and money end to end, each on SQLite and on PostgreSQL: statuses and bodies of bad keys,
//! concurrent requests that can never overdraw (and on PostgreSQL with two gateway processes),
//! failures that cost nothing, streams charged once, usage beyond the reservation charged in
//! full (the account then refused until topped up), `kill -9` mid-stream and at random points of
//! a streamed load that loses and doubles nothing; on PostgreSQL a stream that outlives the
//! reservation lifetime (its lease renewed) and a settle after a sweep, both charged once; on
//! SQLite a charge journal left by a crash moved into the ledger once, and a ledger that cannot
//! be written refusing billed requests past `billing.max_pending_charges`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use futures::StreamExt;
use tollgate::accounts::{
    self,
    keys::{self, NewKey},
};
use tollgate::billing::{Billing, Credits};

/// One cent per request, nothing per token: the estimate equals the charge.
const PER_REQUEST: i64 = 10_000_000_000;

fn paid_models() -> &'static str {
    "  - { name: paid, channel: demo, upstream_model: demo-chat, price: { per_request: 10000000000 } }\n  - { name: paid-up, channel: mock, upstream_model: gpt-test, price: { input_per_token: 1000, output_per_token: 2000 } }\n  - { name: paid-slow, channel: mock, upstream_model: slow-stream, price: { per_request: 10000000000 } }\n"
}

/// The store a test runs on: the suite runs on both.
#[derive(Clone, Copy, Debug)]
enum Store {
    Sqlite,
    Postgres,
}

/// Run a test on SQLite and on PostgreSQL: `name::sqlite` and `name::postgres`.
macro_rules! on_both_stores {
    ($name:ident $(, $($args:tt)*)?) => {
        mod $name {
            use super::*;
            #[tokio::test$(($($args)*))?]
            async fn sqlite() {
                super::$name(Store::Sqlite).await
            }
            #[tokio::test$(($($args)*))?]
            async fn postgres() {
                super::$name(Store::Postgres).await
            }
        }
    };
}

/// A fresh schema in the machine's PostgreSQL (database `test`), as a database URL.
pub(crate) async fn postgres_url() -> String {
    let schema = format!("t_{}", ulid::Ulid::new().to_string().to_lowercase());
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test")
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (database test, trust auth); .ci/run starts it");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    // Schemas of earlier runs (named by ULID, so by time) are dropped once an hour old.
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 't\\_%'")
            .fetch_all(&admin)
            .await
            .unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for (name,) in names {
        if let Ok(id) = ulid::Ulid::from_string(&name[2..].to_uppercase())
            && id.datetime() < hour_ago
        {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(&admin)
                .await;
        }
    }
    format!("postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3D{schema}")
}

/// A database URL on `store`, for a test whose files live in `dir`.
async fn database_url(store: Store, dir: &std::path::Path, name: &str) -> String {
    match store {
        Store::Sqlite => format!("sqlite://{}", dir.join(name).display()),
        Store::Postgres => postgres_url().await,
    }
}

/// A test gateway's config on `store` (config_yaml writes a SQLite one).
async fn on_store(yaml: String, store: Store) -> String {
    let Store::Postgres = store else {
        return yaml;
    };
    let url = postgres_url().await;
    let yaml = yaml
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("url: \"sqlite:") {
                format!("  url: \"{url}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        yaml.contains("postgres://"),
        "the database line was replaced"
    );
    yaml
}

async fn billed_gateway(up: &MockUpstream, store: Store) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // `paid` and `paid-up` are not anonymous: config_yaml opens only the models it lists itself
    // and those in extra_models, so add them by hand after.
    let yaml = config_yaml(Some(&up.base_url()), "", "", &plugins)
        .replace("models:\n", &format!("models:\n{}", paid_models()));
    let yaml = on_store(yaml, store).await;
    TestGateway::start_yaml(&yaml, dir).await
}

fn billing(gw: &TestGateway) -> &Billing {
    &gw.running.as_ref().unwrap().state.billing
}

/// An account with `usd` dollars and a key for it.
async fn funded_key(b: &Billing, name: &str, usd: &str, new: NewKey) -> (String, String) {
    let a = accounts::create(b, name).await.unwrap();
    accounts::credit(b, &a.id, Credits::parse_usd(usd).unwrap(), "test")
        .await
        .unwrap();
    let (_, key) = keys::create(b, &a.id, new).await.unwrap();
    (a.id, key.expose().to_string())
}

fn key_named(name: &str) -> NewKey {
    NewKey {
        name: name.into(),
        ..NewKey::default()
    }
}

async fn chat_with(gw: &TestGateway, key: &str, model: &str, stream: bool) -> reqwest::Response {
    gw.client
        .post(format!("{}/v1/chat/completions", gw.public))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

/// GET `url` with `key` and read the JSON body.
async fn get_json(client: &reqwest::Client, url: &str, key: &str) -> serde_json::Value {
    client
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn settle_down(b: &Billing, account: &str) {
    // Releases after a dropped stream run in the background: wait until nothing is held.
    for _ in 0..100 {
        if accounts::get(b, account).await.unwrap().reserved == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        accounts::get(b, account).await.unwrap().reserved,
        0,
        "a reservation stayed open"
    );
    assert!(
        b.verify(account).await.unwrap(),
        "balance equals the sum of the ledger"
    );
}

on_both_stores!(bad_keys_get_their_status_and_body);
async fn bad_keys_get_their_status_and_body(store: Store) {
    let up = MockUpstream::start().await;
    let gw = billed_gateway(&up, store).await;
    let b = billing(&gw);
    let (account, key) = funded_key(b, "keys", "1", key_named("k")).await;

    // Missing, for a model that is not anonymous.
    assert_openai_error(gw.chat("paid", false).await, 401, "missing_api_key").await;
    // Wrong checksum: refused offline.
    let mut bad = key.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'x' { 'y' } else { 'x' });
    assert_openai_error(
        chat_with(&gw, &bad, "paid", false).await,
        401,
        "invalid_api_key",
    )
    .await;
    assert_openai_error(
        chat_with(&gw, "sk-not-a-tollgate-key", "paid", false).await,
        401,
        "invalid_api_key",
    )
    .await;
    // Well-formed but unknown.
    let (unknown, _, _) = tollgate::auth::generate();
    assert_openai_error(
        chat_with(&gw, unknown.expose(), "paid", false).await,
        401,
        "invalid_api_key",
    )
    .await;
    // Works, then revoked.
    assert_eq!(chat_with(&gw, &key, "paid", false).await.status(), 200);
    let listed = keys::list(b, &account).await.unwrap();
    keys::revoke(b, &listed[0].id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // the cache TTL
    assert_openai_error(
        chat_with(&gw, &key, "paid", false).await,
        401,
        "revoked_api_key",
    )
    .await;
    // Expired.
    let (_, expired) = keys::create(
        b,
        &account,
        NewKey {
            expires_in_seconds: Some(0),
            ..key_named("old")
        },
    )
    .await
    .unwrap();
    assert_openai_error(
        chat_with(&gw, expired.expose(), "paid", false).await,
        401,
        "expired_api_key",
    )
    .await;
    // Not allowed this model.
    let (_, scoped) = keys::create(
        b,
        &account,
        NewKey {
            models: Some(vec!["demo-chat".into()]),
            ..key_named("scoped")
        },
    )
    .await
    .unwrap();
    assert_openai_error(
        chat_with(&gw, scoped.expose(), "paid", false).await,
        403,
        "model_not_allowed",
    )
    .await;
    assert_eq!(
        chat_with(&gw, scoped.expose(), "demo-chat", false)
            .await
            .status(),
        200
    );
    // Rotation: the old key stops, the new one works.
    let (_, fresh) = keys::create(b, &account, key_named("rotating"))
        .await
        .unwrap();
    let id = keys::list(b, &account)
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.name == "rotating")
        .unwrap()
        .id;
    let (_, rotated) = keys::rotate(b, &id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_openai_error(
        chat_with(&gw, fresh.expose(), "paid", false).await,
        401,
        "revoked_api_key",
    )
    .await;
    assert_eq!(
        chat_with(&gw, rotated.expose(), "paid", false)
            .await
            .status(),
        200
    );
    // The stored form is not the key.
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT lookup, secret_hash FROM api_keys")
        .fetch_all(&b.db().pool)
        .await
        .unwrap();
    for (lookup, hash) in rows {
        assert!(!hash.contains(&key[11..]) && hash != key && hash.len() == 64);
        assert_eq!(lookup.len(), 8);
    }
    settle_down(b, &account).await;
}

on_both_stores!(
    two_hundred_concurrent_requests_on_fifty_requests_of_balance,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn two_hundred_concurrent_requests_on_fifty_requests_of_balance(store: Store) {
    let up = MockUpstream::start().await;
    let gw = billed_gateway(&up, store).await;
    let b = billing(&gw);
    let (account, key) = funded_key(b, "crowd", "0.50", key_named("k")).await;
    assert_eq!(
        accounts::get(b, &account).await.unwrap().balance,
        50 * PER_REQUEST
    );
    let mut handles = Vec::new();
    for _ in 0..200 {
        let client = gw.client.clone();
        let url = format!("{}/v1/chat/completions", gw.public);
        let key = key.clone();
        handles.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&serde_json::json!({"model": "paid", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        let (status, body) = h.await.unwrap();
        match status {
            200 => ok += 1,
            402 => {
                assert_eq!(body["error"]["code"], "insufficient_quota");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((ok, refused), (50, 150));
    let a = accounts::get(b, &account).await.unwrap();
    assert_eq!(a.balance, 0);
    settle_down(b, &account).await;
    let charges = b
        .ledger(Some(&account), None, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "charge")
        .count();
    assert_eq!(charges, 50);
}

on_both_stores!(failures_cost_nothing_and_a_stream_is_charged_once_after_it_ends);
async fn failures_cost_nothing_and_a_stream_is_charged_once_after_it_ends(store: Store) {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let priced: String = ["fail500", "hang", "slow-stream", "truncated"]
        .iter()
        .map(|m| format!("  - {{ name: paid-{m}, channel: mock, upstream_model: {m}, price: {{ input_per_token: 1000, output_per_token: 2000 }} }}\n"))
        .collect();
    let yaml = config_yaml(Some(&up.base_url()), "", "", &plugins)
        .replace("models:\n", &format!("models:\n{}{priced}", paid_models()));
    let gw = TestGateway::start_yaml(&on_store(yaml, store).await, dir).await;
    let b = billing(&gw);
    let (account, key) = funded_key(b, "careful", "1", key_named("k")).await;
    let before = accounts::get(b, &account).await.unwrap().balance;

    assert_eq!(
        chat_with(&gw, &key, "paid-fail500", false).await.status(),
        502
    );
    assert_eq!(chat_with(&gw, &key, "paid-hang", false).await.status(), 504);
    let r = chat_with(&gw, &key, "paid-truncated", true).await;
    assert!(!r.text().await.unwrap().contains("[DONE]"));
    // A client that goes away mid-stream.
    let r = chat_with(&gw, &key, "paid-slow-stream", true).await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    settle_down(b, &account).await;
    assert_eq!(
        accounts::get(b, &account).await.unwrap().balance,
        before,
        "failures cost nothing"
    );
    assert!(
        b.ledger(Some(&account), None, 100)
            .await
            .unwrap()
            .iter()
            .all(|e| e.kind != "charge")
    );

    // A stream that ends: one charge, after the end, from the upstream's usage (9 in, 2 out).
    let r = chat_with(&gw, &key, "paid-up", true).await;
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let usage_chunk: serde_json::Value = sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .unwrap();
    let expected = 9 * 1000 + 2 * 2000;
    assert_eq!(usage_chunk["usage"]["cost_picodollars"], expected);
    let lines = b.ledger(None, Some(&request_id), 10).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].amount, -expected);
    assert_eq!(lines[0].prompt_tokens, 9);

    // Non-streamed: the header and the usage object say what it cost (19 in, 10 out).
    let r = chat_with(&gw, &key, "paid-up", false).await;
    let cost = r.headers()["x-tollgate-cost"].to_str().unwrap().to_string();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["cost"], cost);
    assert_eq!(body["usage"]["cost_picodollars"], 19 * 1000 + 10 * 2000);
    settle_down(b, &account).await;
    // The client sees its balance and its own usage.
    let bal = get_json(&gw.client, &format!("{}/v1/balance", gw.public), &key).await;
    assert_eq!(
        bal["balance_picodollars"],
        before - expected - (19 * 1000 + 10 * 2000)
    );
    let usage = get_json(&gw.client, &format!("{}/v1/usage", gw.public), &key).await;
    assert_eq!(
        usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "charge")
            .count(),
        2
    );
}

// ---------------------------------------------------------------------------------------------
// Real processes: PostgreSQL shared by two gateways, and kill -9.
// ---------------------------------------------------------------------------------------------

pub(crate) struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn_gateway(config: &std::path::Path) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("TOLLGATE__LOG__JSON", "true")
        .env("TOLLGATE__LOG__FILTER", "info")
        .env("MOCK_KEY", "sk-test-secret")
        .env("REPLICATE_KEY", crate::task_mocks::REPLICATE_KEY)
        .env("BFL_KEY", crate::task_mocks::BFL_KEY)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let addr = loop {
        let line = lines.next().expect("gateway output").unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "tollgate is serving"
        {
            break v["fields"]["public_addr"].as_str().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), format!("http://{addr}"))
}

pub(crate) fn cli(config: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("MOCK_KEY", "sk-test-secret")
        .env("REPLICATE_KEY", crate::task_mocks::REPLICATE_KEY)
        .env("BFL_KEY", crate::task_mocks::BFL_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn process_config(dir: &std::path::Path, db_url: &str, upstream: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            r#"server: {{ listen: "127.0.0.1:0" }}
operator: {{ listen: "127.0.0.1:0" }}
plugins: {{ dir: "{plugins}" }}
upstream: {{ stream_idle_timeout: 30s }}
database: {{ url: "{db_url}" }}
moderation: {{ policies_dir: "{policies}" }}
channels:
  - {{ name: demo, plugin: demo }}
  - {{ name: mock, plugin: openai, base_url: "{upstream}", api_key_env: MOCK_KEY }}
models:
  - {{ name: paid, channel: demo, upstream_model: demo-chat, price: {{ per_request: 10000000000 }} }}
  - {{ name: paid-up, channel: mock, upstream_model: gpt-test, price: {{ input_per_token: 1000, output_per_token: 2000 }} }}
  - {{ name: paid-slow, channel: mock, upstream_model: slow-stream, price: {{ input_per_token: 1000, output_per_token: 2000 }} }}
log: {{ filter: info, json: true }}
"#,
            plugins = dir.join("plugins").display(),
            policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies")
        ),
    )
    .unwrap();
    path
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    model: &str,
    stream: bool,
) -> reqwest::Response {
    client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_gateways_never_overdraw() {
    let up = MockUpstream::start().await;
    let url = postgres_url().await;
    let dir = tempfile::tempdir().unwrap();
    let config = process_config(dir.path(), &url, &up.base_url());
    let (_a, base_a) = spawn_gateway(&config);
    let (_b, base_b) = spawn_gateway(&config);
    cli(&config, &["accounts", "create", "shared"]);
    cli(&config, &["credits", "add", "shared", "0.50"]);
    let key = cli(
        &config,
        &["keys", "create", "--account", "shared", "--name", "k"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();
    let mut handles = Vec::new();
    for i in 0..200 {
        let (client, key) = (client.clone(), key.clone());
        let base = if i % 2 == 0 {
            base_a.clone()
        } else {
            base_b.clone()
        };
        handles.push(tokio::spawn(async move {
            post(&client, &base, &key, "paid", false)
                .await
                .status()
                .as_u16()
        }));
    }
    let mut counts = std::collections::BTreeMap::new();
    for h in handles {
        *counts.entry(h.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        std::collections::BTreeMap::from([(200, 50), (402, 150)])
    );
    let account = cli(&config, &["credits", "show", "shared"]);
    assert_eq!(account["balance"], 0);
    assert_eq!(account["reserved"], 0);
    let ledger = cli(
        &config,
        &[
            "credits",
            "ledger",
            "--account",
            "shared",
            "--limit",
            "1000",
        ],
    );
    let sum: i64 = ledger
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(sum, 0, "the ledger sums to the balance");
}

on_both_stores!(
    kill_minus_nine_mid_stream_loses_and_doubles_nothing,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn kill_minus_nine_mid_stream_loses_and_doubles_nothing(store: Store) {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = database_url(store, dir.path(), "kill.db").await;
    let config = process_config(dir.path(), &url, &up.base_url());
    // PostgreSQL is shared: a starting gateway releases only reservations past their lifetime,
    // so the lifetime is short here and the restart waits it out.
    let ttl = Duration::from_secs(2);
    if let Store::Postgres = store {
        let mut yaml = std::fs::read_to_string(&config).unwrap();
        yaml.push_str("billing: { reservation_ttl: 2s }\n");
        std::fs::write(&config, yaml).unwrap();
    }
    cli(&config, &["accounts", "create", "victim"]);
    cli(&config, &["credits", "add", "victim", "1"]);
    let key = cli(
        &config,
        &["keys", "create", "--account", "victim", "--name", "k"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut gw, base) = spawn_gateway(&config);
    let client = reqwest::Client::new();
    // Completed requests: charged, each under its request id.
    let mut completed = Vec::new();
    for _ in 0..5 {
        let r = post(&client, &base, &key, "paid-up", false).await;
        assert_eq!(r.status(), 200);
        completed.push(request_id(&r));
    }
    let r = post(&client, &base, &key, "paid-up", true).await;
    completed.push(request_id(&r));
    assert!(r.text().await.unwrap().contains("[DONE]"));
    // Streams in the middle: reserved, not charged.
    let mut open = Vec::new();
    let mut interrupted = Vec::new();
    for _ in 0..4 {
        let r = post(&client, &base, &key, "paid-slow", true).await;
        interrupted.push(request_id(&r));
        let mut s = r.bytes_stream();
        s.next().await.unwrap().unwrap();
        open.push(s);
    }
    // The running gateway reports them (on SQLite they are only in its memory).
    let held = get_json(&client, &format!("{base}/v1/balance"), &key).await;
    assert!(
        held["reserved_picodollars"].as_i64().unwrap() > 0,
        "the open streams hold reservations: {held}"
    );
    gw.0.kill().unwrap(); // SIGKILL
    gw.0.wait().unwrap();
    drop(open);
    if let Store::Postgres = store {
        tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    }
    let (_gw2, base2) = spawn_gateway(&config);
    // What the new gateway reports: nothing held (on SQLite its memory, on PostgreSQL the rows),
    // and a balance that is the sum of the ledger.
    let after = get_json(&client, &format!("{base2}/v1/balance"), &key).await;
    assert_eq!(
        after["reserved_picodollars"], 0,
        "no reservation stays open after a restart: {after}"
    );
    let account = cli(&config, &["credits", "show", "victim"]);
    assert_eq!(account["reserved"], 0, "no reservation row stays open");
    let ledger = cli(
        &config,
        &[
            "credits",
            "ledger",
            "--account",
            "victim",
            "--limit",
            "1000",
        ],
    );
    let entries = ledger.as_array().unwrap();
    let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(sum, account["balance"].as_i64().unwrap());
    assert_eq!(after["balance_picodollars"], sum, "{after}");
    let charges = charges_by_request(entries);
    for id in &completed {
        assert_eq!(
            charges.get(id.as_str()).map(Vec::len),
            Some(1),
            "a completed request is charged once: {id}"
        );
    }
    for id in &interrupted {
        assert!(
            !charges.contains_key(id.as_str()),
            "an interrupted stream is not charged: {id}"
        );
    }
    assert_eq!(charges.len(), completed.len(), "nothing else is charged");
}

/// The gateway's request id of a response.
fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-request-id"].to_str().unwrap().to_string()
}

/// The charges of a ledger listing (JSON entries), by request id.
fn charges_by_request(entries: &[serde_json::Value]) -> std::collections::HashMap<&str, Vec<i64>> {
    let mut charges: std::collections::HashMap<&str, Vec<i64>> = std::collections::HashMap::new();
    for e in entries.iter().filter(|e| e["kind"] == "charge") {
        charges
            .entry(e["request_id"].as_str().unwrap())
            .or_default()
            .push(e["amount"].as_i64().unwrap());
    }
    charges
}

on_both_stores!(
    kill_minus_nine_at_random_points_of_a_billed_stream_load_loses_and_doubles_nothing,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn kill_minus_nine_at_random_points_of_a_billed_stream_load_loses_and_doubles_nothing(
    store: Store,
) {
    use rand::Rng as _;
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const ROUNDS: usize = 5;
    const CLIENTS: usize = 8;
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = database_url(store, dir.path(), "chaos.db").await;
    let config = process_config(dir.path(), &url, &up.base_url());
    let ttl = Duration::from_secs(2);
    if let Store::Postgres = store {
        let mut yaml = std::fs::read_to_string(&config).unwrap();
        yaml.push_str("billing: { reservation_ttl: 2s }\n");
        std::fs::write(&config, yaml).unwrap();
    }
    cli(&config, &["accounts", "create", "chaos"]);
    cli(&config, &["credits", "add", "chaos", "100"]);
    let key = cli(
        &config,
        &["keys", "create", "--account", "chaos", "--name", "k"],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();
    // Over every run: the request ids clients got headers for (answered or in flight), how many
    // requests were in flight without them (a kill before the headers reached the client; the
    // gateway may have charged one: its id is unknown here), and the cost each stream that
    // reached `[DONE]` reported.
    let mut seen: HashSet<String> = HashSet::new();
    let mut unnamed = 0;
    let mut completed: HashMap<String, i64> = HashMap::new();
    let mut delays = Vec::new();
    // The checks after a restart: every charge once, only of requests that were sent, every
    // completed stream charged what it reported, the balance the sum of the ledger.
    let check = |seen: &HashSet<String>,
                 unnamed: usize,
                 completed: &HashMap<String, i64>,
                 delays: &[u64]| {
        let account = cli(&config, &["credits", "show", "chaos"]);
        let ledger = cli(
            &config,
            &[
                "credits",
                "ledger",
                "--account",
                "chaos",
                "--limit",
                "1000000",
            ],
        );
        let entries = ledger.as_array().unwrap();
        let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
        assert_eq!(
            sum,
            account["balance"].as_i64().unwrap(),
            "the balance is the sum of the ledger (kills after {delays:?} ms)"
        );
        let charges = charges_by_request(entries);
        for (id, amounts) in &charges {
            assert_eq!(
                amounts.len(),
                1,
                "{id} charged twice (kills after {delays:?} ms)"
            );
        }
        let unknown = charges.keys().filter(|id| !seen.contains(**id)).count();
        assert!(
            unknown <= unnamed,
            "{unknown} charges of requests never sent ({unnamed} were in flight unnamed; kills after {delays:?} ms)"
        );
        for (id, cost) in completed {
            assert_eq!(
                charges.get(id.as_str()),
                Some(&vec![-cost]),
                "{id} reached [DONE] with its cost and must be charged that once (kills after {delays:?} ms)"
            );
        }
        charges.len()
    };
    for round in 0..ROUNDS {
        let (mut gw, base) = spawn_gateway(&config);
        if round > 0 {
            // A restart after a kill: nothing lost, nothing doubled.
            check(&seen, unnamed, &completed, &delays);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..CLIENTS {
            let (client, base, key, stop) =
                (client.clone(), base.clone(), key.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let (mut sent, mut done, mut unnamed) = (Vec::new(), Vec::new(), 0);
                while !stop.load(Ordering::SeqCst) {
                    let Ok(r) = client
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&serde_json::json!({"model": "paid-up", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
                        .send()
                        .await
                    else {
                        unnamed = 1;
                        break;
                    };
                    assert_eq!(r.status(), 200);
                    let id = request_id(&r);
                    sent.push(id.clone());
                    let Ok(text) = r.text().await else { break };
                    if !text.ends_with("data: [DONE]\n\n") {
                        break;
                    }
                    let cost = sse_data(&text)
                        .iter()
                        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                        .find_map(|v| v["usage"]["cost_picodollars"].as_i64())
                        .unwrap();
                    done.push((id, cost));
                }
                (sent, done, unnamed)
            }));
        }
        let delay = rand::thread_rng().gen_range(20..400);
        delays.push(delay);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        gw.0.kill().unwrap(); // SIGKILL, wherever the load is
        gw.0.wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            let (sent, done, lost) = w.await.unwrap();
            seen.extend(sent);
            unnamed += lost;
            completed.extend(done);
        }
    }
    if let Store::Postgres = store {
        // The killed gateway renews no lease: its rows expire and the next start releases them.
        tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    }
    let (_gw, base) = spawn_gateway(&config);
    let charged = check(&seen, unnamed, &completed, &delays);
    assert!(
        !completed.is_empty() && charged >= completed.len(),
        "the load completed streams ({} of {} sent; kills after {delays:?} ms)",
        completed.len(),
        seen.len()
    );
    let after = get_json(&client, &format!("{base}/v1/balance"), &key).await;
    assert_eq!(after["reserved_picodollars"], 0, "{after}");
    let account = cli(&config, &["credits", "show", "chaos"]);
    assert_eq!(account["reserved"], 0);
}

on_both_stores!(the_admin_api_manages_accounts_credits_keys_and_reads_the_ledger);
async fn the_admin_api_manages_accounts_credits_keys_and_reads_the_ledger(store: Store) {
    let up = MockUpstream::start().await;
    let gw = billed_gateway(&up, store).await;
    let admin = |method: reqwest::Method, path: &str| {
        gw.client
            .request(method, format!("{}{path}", gw.operator))
            .bearer_auth(ADMIN_TOKEN)
    };
    // No token, a wrong token: refused.
    let r = gw
        .client
        .get(format!("{}/admin/accounts", gw.operator))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = gw
        .client
        .get(format!("{}/admin/accounts", gw.operator))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The admin API is not on the public listener.
    assert_eq!(gw.get("/admin/accounts").await.status(), 404);

    let acct: serde_json::Value = admin(reqwest::Method::POST, "/admin/accounts")
        .json(&serde_json::json!({"name": "via-admin"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = acct["id"].as_str().unwrap().to_string();
    let r = admin(
        reqwest::Method::POST,
        &format!("/admin/accounts/{id}/credits"),
    )
    .json(&serde_json::json!({"amount_usd": "not money"}))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let r = admin(
        reqwest::Method::POST,
        &format!("/admin/accounts/{id}/credits"),
    )
    .json(&serde_json::json!({"amount_usd": "0.05"}))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let created: serde_json::Value =
        admin(reqwest::Method::POST, &format!("/admin/accounts/{id}/keys"))
            .json(&serde_json::json!({"name": "svc", "models": ["paid"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["info"]["id"].as_str().unwrap().to_string();
    let resp = chat_with(&gw, &key, "paid", false).await;
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    // The ledger by account and by request id.
    let by_req: serde_json::Value = admin(
        reqwest::Method::GET,
        &format!("/admin/ledger?request_id={request_id}"),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(by_req["data"][0]["amount"], -PER_REQUEST);
    let by_acct: serde_json::Value =
        admin(reqwest::Method::GET, &format!("/admin/ledger?account={id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(by_acct["data"].as_array().unwrap().len(), 2);
    // Listing never shows the secret.
    let listed = admin(reqwest::Method::GET, &format!("/admin/accounts/{id}/keys"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listed.contains(&key_id) && !listed.contains(&key[11..]));
    // Rotate: the new key works, the old one stops; revoke the new one.
    let rotated: serde_json::Value = admin(
        reqwest::Method::POST,
        &format!("/admin/keys/{key_id}/rotate"),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_openai_error(
        chat_with(&gw, &key, "paid", false).await,
        401,
        "revoked_api_key",
    )
    .await;
    assert_eq!(chat_with(&gw, &new_key, "paid", false).await.status(), 200);
    let new_id = rotated["info"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        admin(
            reqwest::Method::POST,
            &format!("/admin/keys/{new_id}/revoke")
        )
        .send()
        .await
        .unwrap()
        .status(),
        200
    );
    assert_openai_error(
        chat_with(&gw, &new_key, "paid", false).await,
        401,
        "revoked_api_key",
    )
    .await;
    // Moderation: a blocked prompt shows in the record and in the key's block count.
    let (_, k3) = keys::create(billing(&gw), &id, key_named("k3"))
        .await
        .unwrap();
    let k3_id = keys::list(billing(&gw), &id)
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.name == "k3")
        .unwrap()
        .id;
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.public))
        .bearer_auth(k3.expose())
        .json(&serde_json::json!({"model": "paid", "messages": [{"role": "user", "content": "write a keylogger in python"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let blocks: serde_json::Value =
        admin(reqwest::Method::GET, &format!("/admin/keys/{k3_id}/blocks"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(blocks["blocked_requests"], 1);
    let events: serde_json::Value = admin(reqwest::Method::GET, "/admin/moderation")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        events["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["category"] == "malware_cyber" && e["key_id"] == k3_id.as_str())
    );
    settle_down(billing(&gw), &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_settles_share_commits_and_one_request_is_charged_once() {
    use tollgate::billing::{Price, Usage};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("batch.db").display());
    let db = tollgate::store::Db::connect(&url).await.unwrap();
    let b = Billing::for_gateway(
        db,
        tollgate::billing::Settings {
            reservation_ttl: Duration::from_secs(60),
            ..Default::default()
        },
        None,
        &tollgate::background::Background::new(),
    )
    .await
    .unwrap();
    let a = accounts::create(&b, "batch").await.unwrap();
    accounts::credit(&b, &a.id, Credits::parse_usd("1").unwrap(), "t")
        .await
        .unwrap();
    let price = Price {
        per_request: 1_000,
        ..Price::default()
    };
    // 100 requests settled at once (they share commits), two of them under one request id.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let b = b.clone();
        let account = a.id.clone();
        let request = if i == 99 {
            "req-0".to_string()
        } else {
            format!("req-{i}")
        };
        tasks.push(tokio::spawn(async move {
            let hold = b
                .reserve(&account, "key", &request, "m", Credits(1_000), price)
                .await
                .unwrap();
            hold.settle(Usage::default()).await.unwrap()
        }));
    }
    let mut charged = 0;
    for t in tasks {
        charged += t.await.unwrap().0;
    }
    assert_eq!(
        charged,
        99 * 1_000,
        "the repeated request id is charged once"
    );
    let after = accounts::get(&b, &a.id).await.unwrap();
    assert_eq!(
        after.balance,
        Credits::parse_usd("1").unwrap().0 - 99 * 1_000
    );
    assert_eq!(after.reserved, 0);
    assert!(b.verify(&a.id).await.unwrap());
    // Credits added by another writer (the CLI, another process) are seen on the next reload.
    let other = Billing::new(
        tollgate::store::Db::connect(&url).await.unwrap(),
        Duration::from_secs(60),
        None,
    );
    let big = Credits::parse_usd("5").unwrap();
    assert!(
        b.reserve(&a.id, "key", "req-big", "m", big, price)
            .await
            .is_err()
    );
    accounts::credit(&other, &a.id, big, "top-up")
        .await
        .unwrap();
    tokio::time::sleep(tollgate::billing::owned::RECHECK).await;
    let hold = b
        .reserve(&a.id, "key", "req-big", "m", big, price)
        .await
        .expect("the top-up is seen before refusing again");
    hold.release().await;
}

#[tokio::test]
async fn a_journal_left_by_a_crash_is_moved_into_the_ledger_once() {
    use tollgate::billing::{Charge, owned::journal_path};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("journal.db");
    let url = format!("sqlite://{}", file.display());
    let setup = Billing::new(
        tollgate::store::Db::connect(&url).await.unwrap(),
        Duration::from_secs(60),
        None,
    );
    let a = accounts::create(&setup, "crashed").await.unwrap();
    let start = Credits::parse_usd("1").unwrap();
    accounts::credit(&setup, &a.id, start, "t").await.unwrap();
    // What a gateway killed after answering three settles, before moving them, leaves behind
    // (its last line torn by a machine crash mid-write).
    let charge = |i: i64| Charge {
        id: ulid::Ulid::new().to_string(),
        account_id: a.id.clone(),
        key_id: "key".into(),
        request_id: format!("req-{i}"),
        model: "m".into(),
        cost: Credits(1_000 * i),
        overrun: Credits(0),
        prompt_tokens: i,
        completion_tokens: 2 * i,
        images: 0,
        seconds: 0,
        created_at: 1,
    };
    let mut text = String::new();
    for i in 1..=3 {
        text.push_str(&serde_json::to_string(&charge(i)).unwrap());
        text.push('\n');
    }
    let whole = text.clone();
    text.push_str(r#"{"id":"01J","account_id":"#);
    let journal = journal_path(&file);
    std::fs::write(&journal, &text).unwrap();

    let db = tollgate::store::Db::connect(&url).await.unwrap();
    let b = Billing::for_gateway(
        db,
        tollgate::billing::Settings {
            reservation_ttl: Duration::from_secs(60),
            ..Default::default()
        },
        None,
        &tollgate::background::Background::new(),
    )
    .await
    .unwrap();
    let charged = 1_000 + 2_000 + 3_000;
    let account = accounts::get(&b, &a.id).await.unwrap();
    assert_eq!(account.balance, start.0 - charged);
    assert!(b.verify(&a.id).await.unwrap());
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        b"",
        "the journal is emptied"
    );
    let lines = b.ledger(None, Some("req-2"), 10).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].amount, lines[0].completion_tokens), (-2_000, 4));
    drop(b);

    // A crash after moving and before emptying leaves lines already in the ledger: skipped.
    std::fs::write(&journal, &whole).unwrap();
    let db = tollgate::store::Db::connect(&url).await.unwrap();
    let b = Billing::for_gateway(
        db,
        tollgate::billing::Settings {
            reservation_ttl: Duration::from_secs(60),
            ..Default::default()
        },
        None,
        &tollgate::background::Background::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        accounts::get(&b, &a.id).await.unwrap().balance,
        start.0 - charged
    );
    assert!(b.verify(&a.id).await.unwrap());
    let charges = b.ledger(Some(&a.id), None, 100).await.unwrap();
    assert_eq!(charges.iter().filter(|e| e.kind == "charge").count(), 3);
}

fn limited(limits: tollgate::limits::Limits) -> NewKey {
    NewKey {
        name: "limited".into(),
        limits: Some(limits),
        ..NewKey::default()
    }
}

/// The refusal of a key's own limit: a 429 in OpenAI's body with a retry hint.
async fn assert_throttled(r: reqwest::Response) -> reqwest::header::HeaderMap {
    assert_eq!(r.status(), 429);
    let headers = r.headers().clone();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    headers
}

on_both_stores!(a_key_over_its_limits_gets_429_with_openai_headers_and_pays_nothing);
async fn a_key_over_its_limits_gets_429_with_openai_headers_and_pays_nothing(store: Store) {
    use tollgate::limits::Limits;
    let up = MockUpstream::start().await;
    let gw = billed_gateway(&up, store).await;
    let b = billing(&gw);

    // Requests per minute: a minute's allowance at once, then refused with a retry hint.
    let (account, key) = funded_key(
        b,
        "per-minute",
        "1",
        limited(Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        }),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(chat_with(&gw, &key, "paid-up", false).await.status(), 200);
    }
    settle_down(b, &account).await;
    let (balance, hits) = (accounts::get(b, &account).await.unwrap().balance, up.hits());
    let h = assert_throttled(chat_with(&gw, &key, "paid-up", false).await).await;
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (1..=20).contains(&retry),
        "one request comes back within 20 s: {retry}"
    );
    assert_eq!(h["x-ratelimit-limit-requests"], "3");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert!(
        h["x-ratelimit-reset-requests"]
            .to_str()
            .unwrap()
            .ends_with('s')
    );
    assert!(h.contains_key("x-request-id"));
    assert_eq!(up.hits(), hits, "a throttled request reaches no upstream");
    settle_down(b, &account).await;
    assert_eq!(
        accounts::get(b, &account).await.unwrap().balance,
        balance,
        "and costs nothing"
    );

    // Concurrency: one at a time; the place is given back when the stream ends.
    let (_, key) = funded_key(
        b,
        "one-at-a-time",
        "1",
        limited(Limits {
            concurrent_requests: Some(1),
            ..Limits::default()
        }),
    )
    .await;
    let open = chat_with(&gw, &key, "paid-slow", true).await;
    assert_eq!(open.status(), 200);
    let mut open = open.bytes_stream();
    open.next().await.unwrap().unwrap();
    let h = assert_throttled(chat_with(&gw, &key, "paid", false).await).await;
    assert_eq!(h["retry-after"], "1");
    drop(open);
    let mut passed = false;
    for _ in 0..100 {
        if chat_with(&gw, &key, "paid", false).await.status() == 200 {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(passed, "the place is free once the stream is gone");

    // Tokens per minute: counted as prompt + maximum output; too large for the limit at all is
    // refused without a retry hint, a smaller max_tokens passes.
    let (_, key) = funded_key(
        b,
        "tokens",
        "1",
        limited(Limits {
            tokens_per_minute: Some(1_000),
            ..Limits::default()
        }),
    )
    .await;
    let ask = |max_tokens: u64| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.public))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "paid-up", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let h = assert_throttled(ask(5_000).await.unwrap()).await;
    assert!(!h.contains_key("retry-after"), "waiting cannot help");
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(ask(100).await.unwrap().status(), 200);

    // Spend per day: the day's charges and the requests in flight count against it.
    let (_, key) = funded_key(
        b,
        "daily",
        "1",
        limited(Limits {
            spend_per_day_usd: Some("0.02".into()),
            ..Limits::default()
        }),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(chat_with(&gw, &key, "paid", false).await.status(), 200);
    }
    let r = chat_with(&gw, &key, "paid", false).await;
    let h = assert_throttled(r).await;
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry <= 86_400, "until the next UTC day: {retry}");
}

on_both_stores!(limits_are_checked_when_a_key_is_made);
async fn limits_are_checked_when_a_key_is_made(store: Store) {
    let up = MockUpstream::start().await;
    let gw = billed_gateway(&up, store).await;
    let admin = |path: &str| {
        gw.client
            .post(format!("{}{path}", gw.operator))
            .bearer_auth(ADMIN_TOKEN)
    };
    admin("/admin/accounts")
        .json(&serde_json::json!({"name": "checked"}))
        .send()
        .await
        .unwrap();
    for (limits, field) in [
        (
            serde_json::json!({"requests_per_minute": 0}),
            "requests_per_minute",
        ),
        (
            serde_json::json!({"spend_per_day_usd": "lots"}),
            "spend_per_day_usd",
        ),
        (
            serde_json::json!({"requests_per_hour": 5}),
            "requests_per_hour",
        ),
    ] {
        let r = admin("/admin/accounts/checked/keys")
            .json(&serde_json::json!({"name": "k", "limits": limits}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{limits}");
        let body = r.text().await.unwrap();
        assert!(body.contains(field), "the error names {field}: {body}");
    }
    let r = admin("/admin/accounts/checked/keys")
        .json(&serde_json::json!({"name": "k", "limits": {"requests_per_minute": 60, "spend_per_day_usd": "5.00"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["info"]["limits"]["requests_per_minute"], 60);
    assert_eq!(body["info"]["limits"]["spend_per_day_usd"], "5.00");
}

#[test]
fn the_cli_issues_keys_with_limits_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cli.db").display());
    let config = process_config(dir.path(), &url, "http://127.0.0.1:9");
    cli(&config, &["accounts", "create", "limited"]);
    let made = cli(
        &config,
        &[
            "keys",
            "create",
            "--account",
            "limited",
            "--name",
            "k",
            "--requests-per-minute",
            "60",
            "--concurrent-requests",
            "4",
            "--spend-per-day-usd",
            "2.50",
        ],
    );
    let limits = &made["info"]["limits"];
    assert_eq!(limits["requests_per_minute"], 60);
    assert_eq!(limits["concurrent_requests"], 4);
    assert_eq!(limits["spend_per_day_usd"], "2.50");
    assert!(limits.get("tokens_per_minute").is_none());
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "create", "--account", "limited", "--name", "bad"])
        .args(["--tokens-per-minute", "0", "--config"])
        .arg(&config)
        .env("MOCK_KEY", "sk-test-secret")
        .env("REPLICATE_KEY", crate::task_mocks::REPLICATE_KEY)
        .env("BFL_KEY", crate::task_mocks::BFL_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokens_per_minute"), "{err}");
}

/// `tollgate ARGS --config CONFIG`, expected to fail: its error output.
fn cli_refused(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("MOCK_KEY", "sk-test-secret")
        .env("REPLICATE_KEY", crate::task_mocks::REPLICATE_KEY)
        .env("BFL_KEY", crate::task_mocks::BFL_KEY)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The largest balance, as the errors name it.
const MAX_USD: &str = "9223372.036854775807";

on_both_stores!(credits_stay_in_range_and_debits_never_take_what_is_held_unless_forced);
async fn credits_stay_in_range_and_debits_never_take_what_is_held_unless_forced(store: Store) {
    let up = MockUpstream::start().await;
    let gw = billed_gateway(&up, store).await;
    let b = billing(&gw);
    let admin = |method: reqwest::Method, path: &str| {
        gw.client
            .request(method, format!("{}{path}", gw.operator))
            .bearer_auth(ADMIN_TOKEN)
    };
    let post =
        |path: &str, body: serde_json::Value| admin(reqwest::Method::POST, path).json(&body).send();
    let acct: serde_json::Value = post("/admin/accounts", serde_json::json!({"name": "ranged"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = acct["id"].as_str().unwrap().to_string();
    let credits = format!("/admin/accounts/{id}/credits");
    let debits = format!("/admin/accounts/{id}/debits");
    // A 400 in the admin error body whose message contains `needle`.
    let refused = |r: reqwest::Response, needle: &'static str| async move {
        assert_eq!(r.status(), 400);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "admin_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    };
    let balance = || async { accounts::get(b, &id).await.unwrap().balance };

    // Nothing that is not more than zero is a credit (no hidden negative "adjustment").
    for amount in ["-1.00", "-0.000000000001", "0", "0.00"] {
        refused(
            post(&credits, serde_json::json!({"amount_usd": amount}))
                .await
                .unwrap(),
            "more than 0",
        )
        .await;
    }
    assert_eq!(balance().await, 0);

    // Credits up to the maximum balance; past it they are refused, naming the maximum, and the
    // balance is unchanged (before, SQLite stored a REAL and listing accounts failed for good).
    let r = post(&credits, serde_json::json!({"amount_usd": "9000000"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for amount in ["300000", "99999999999", "99999999999999999999"] {
        refused(
            post(&credits, serde_json::json!({"amount_usd": amount}))
                .await
                .unwrap(),
            MAX_USD,
        )
        .await;
    }
    let r = admin(reqwest::Method::GET, "/admin/accounts")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "listing accounts still works");
    let listed: serde_json::Value = r.json().await.unwrap();
    let listed = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["balance"], 9_000_000 * 1_000_000_000_000_i64);
    // Exactly to the maximum is fine; one pico-dollar more is not.
    let r = post(
        &credits,
        serde_json::json!({"amount_usd": "223372.036854775807"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(balance().await, i64::MAX);
    refused(
        post(
            &credits,
            serde_json::json!({"amount_usd": "0.000000000001"}),
        )
        .await
        .unwrap(),
        MAX_USD,
    )
    .await;
    assert!(
        b.verify(&id).await.unwrap(),
        "balance equals the sum of the ledger"
    );

    // A debit: explicit, in the ledger as `debit`.
    let r = post(
        &debits,
        serde_json::json!({"amount_usd": "9223371.036854775807", "note": "refund"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let entry: serde_json::Value = r.json().await.unwrap();
    assert_eq!(entry["kind"], "debit");
    assert_eq!(entry["note"], "refund");
    assert_eq!(entry["amount"], -(i64::MAX - 1_000_000_000_000));
    assert_eq!(balance().await, 1_000_000_000_000);
    // Not more than zero, unknown fields, an unknown account: refused.
    refused(
        post(&debits, serde_json::json!({"amount_usd": "-5"}))
            .await
            .unwrap(),
        "more than 0",
    )
    .await;
    refused(
        post(
            &debits,
            serde_json::json!({"amount_usd": "0.5", "forse": true}),
        )
        .await
        .unwrap(),
        "forse",
    )
    .await;
    let r = post(
        "/admin/accounts/nobody/debits",
        serde_json::json!({"amount_usd": "1"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);

    // A request in flight holds its estimate (one cent): a debit cannot take it.
    let (_, key) = keys::create(b, &id, key_named("k")).await.unwrap();
    let open = chat_with(&gw, key.expose(), "paid-slow", true).await;
    assert_eq!(open.status(), 200);
    let mut open = open.bytes_stream();
    open.next().await.unwrap().unwrap();
    refused(
        post(&debits, serde_json::json!({"amount_usd": "1"}))
            .await
            .unwrap(),
        "0.990000000000",
    )
    .await;
    assert_eq!(
        balance().await,
        1_000_000_000_000,
        "a refused debit takes nothing"
    );
    let r = post(&debits, serde_json::json!({"amount_usd": "0.99"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    refused(
        post(&debits, serde_json::json!({"amount_usd": "0.000000000001"}))
            .await
            .unwrap(),
        "force",
    )
    .await;
    // Forced: taken even below zero, and marked as forced in the ledger.
    let r = post(
        &debits,
        serde_json::json!({"amount_usd": "5", "note": "chargeback", "force": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let entry: serde_json::Value = r.json().await.unwrap();
    assert_eq!(entry["kind"], "forced_debit");
    drop(open);
    settle_down(b, &id).await;
    let after = balance().await;
    assert_eq!(after, 10_000_000_000 - 5_000_000_000_000);
    // Below zero, nothing more can be reserved.
    assert_openai_error(
        chat_with(&gw, key.expose(), "paid", false).await,
        402,
        "insufficient_quota",
    )
    .await;
    let ledger = b.ledger(Some(&id), None, 1000).await.unwrap();
    // Summed wide: in the order listed (newest first), the debits alone pass i64::MIN.
    let sum: i128 = ledger.iter().map(|e| i128::from(e.amount)).sum();
    assert_eq!(sum, i128::from(after));
    assert!(b.verify(&id).await.unwrap());
    let r = admin(reqwest::Method::GET, "/admin/accounts")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

on_both_stores!(the_cli_debits_and_refuses_credits_past_the_maximum);
async fn the_cli_debits_and_refuses_credits_past_the_maximum(store: Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = database_url(store, dir.path(), "cli-money.db").await;
    let config = process_config(dir.path(), &url, "http://127.0.0.1:9");
    cli(&config, &["accounts", "create", "acme"]);
    cli(&config, &["credits", "add", "acme", "10"]);
    for amount in ["9223372", "99999999999"] {
        let err = cli_refused(&config, &["credits", "add", "acme", amount]);
        assert!(err.contains(MAX_USD), "the limit is named: {err}");
    }
    let err = cli_refused(&config, &["credits", "add", "acme", "0"]);
    assert!(err.contains("more than 0"), "{err}");
    let entry = cli(
        &config,
        &["credits", "debit", "acme", "4", "--note", "refund"],
    );
    assert_eq!(entry["kind"], "debit");
    assert_eq!(entry["amount"], -4_000_000_000_000_i64);
    let err = cli_refused(&config, &["credits", "debit", "acme", "7"]);
    assert!(err.contains("force"), "{err}");
    let entry = cli(&config, &["credits", "debit", "acme", "7", "--force"]);
    assert_eq!(entry["kind"], "forced_debit");
    let account = cli(&config, &["credits", "show", "acme"]);
    assert_eq!(account["balance"], -1_000_000_000_000_i64);
    let ledger = cli(&config, &["credits", "ledger", "--account", "acme"]);
    let sum: i64 = ledger
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(
        sum, -1_000_000_000_000_i64,
        "the ledger sums to the balance"
    );
    let listed = cli(&config, &["accounts", "list"]);
    assert_eq!(listed[0]["balance_usd"], "-1.000000000000");
}

// ---------------------------------------------------------------------------------------------
// Usage beyond the reservation, leases that outlive the reservation lifetime, and the bound on
// charges waiting for the ledger.
// ---------------------------------------------------------------------------------------------

on_both_stores!(
    usage_beyond_the_reservation_is_charged_in_full_and_the_account_refused_until_topped_up
);
async fn usage_beyond_the_reservation_is_charged_in_full_and_the_account_refused_until_topped_up(
    store: Store,
) {
    let up = MockUpstream::start().await;
    let gw = billed_gateway(&up, store).await;
    let b = billing(&gw);
    // `max_tokens: 1`: the reservation covers the prompt bound and one output token; the
    // upstream reports 19 tokens in and 10 out (tests/fixtures/openai/chat.json).
    let body = r#"{"model":"paid-up","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
    let bound = tollgate::pipeline::tokens::chat(
        tollgate::pipeline::tokens::Tokenizer::O200k,
        &serde_json::from_str(body).unwrap(),
    );
    let estimate = i64::try_from(bound).unwrap() * 1000 + 2000;
    let cost = 19 * 1000 + 10 * 2000;
    assert!(
        estimate < cost,
        "the reservation ({estimate}) is below the usage ({cost})"
    );
    // The balance covers the estimate and nothing more.
    let (account, key) =
        funded_key(b, "overrun", &Credits(estimate).to_string(), key_named("k")).await;
    let send = || {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.public))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["usage"]["cost_picodollars"], cost, "{answer}");
    // The ledger has the usage in full, and says how much went beyond the reservation.
    let lines = b.ledger(None, Some(&id), 10).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].amount, -cost);
    assert_eq!(lines[0].overrun, cost - estimate);
    let a = accounts::get(b, &account).await.unwrap();
    assert_eq!(a.balance, estimate - cost, "below zero by the overrun");
    assert_eq!(a.reserved, 0);
    assert!(
        b.verify(&account).await.unwrap(),
        "a balance below zero by an overrun is consistent"
    );
    // Counted for the operator.
    let metrics = gw.metrics().await;
    let over = format!(
        "tollgate_billing_overrun_picodollars_total{{model=\"paid-up\"}} {}",
        cost - estimate
    );
    assert!(metrics.contains(&over), "{over} in:\n{metrics}");
    assert!(metrics.contains("tollgate_billing_overruns_total{model=\"paid-up\"} 1"));
    // The account is refused until it is topped up.
    let hits = up.hits();
    assert_openai_error(send().await.unwrap(), 402, "insufficient_quota").await;
    assert_eq!(up.hits(), hits, "a refused request reaches no upstream");
    accounts::credit(b, &account, Credits::parse_usd("1").unwrap(), "top-up")
        .await
        .unwrap();
    assert_eq!(send().await.unwrap().status(), 200);
    settle_down(b, &account).await;
    assert_eq!(
        accounts::get(b, &account).await.unwrap().balance,
        estimate + Credits::parse_usd("1").unwrap().0 - 2 * cost
    );
}

/// A gateway on `store` with `extra` appended to its config (top-level YAML).
async fn billed_gateway_with(up: &MockUpstream, store: Store, extra: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let models = format!(
        "{}  - {{ name: paid-finish, channel: mock, upstream_model: slow-finish, price: {{ input_per_token: 1000, output_per_token: 2000 }} }}\n",
        paid_models()
    );
    let yaml = config_yaml(Some(&up.base_url()), "", "", &plugins)
        .replace("models:\n", &format!("models:\n{models}"))
        + extra;
    let yaml = on_store(yaml, store).await;
    TestGateway::start_yaml(&yaml, dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_stream_that_outlives_the_reservation_ttl_keeps_its_lease_and_is_charged_once() {
    let up = MockUpstream::start().await;
    let ttl = Duration::from_secs(2);
    let gw = billed_gateway_with(&up, Store::Postgres, "billing:\n  reservation_ttl: 2s\n").await;
    let b = billing(&gw);
    let (account, key) = funded_key(b, "long", "1", key_named("k")).await;
    // Four seconds of events: twice the reservation's lifetime.
    let r = chat_with(&gw, &key, "paid-finish", true).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let reading = tokio::spawn(async move { r.text().await.unwrap() });
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    // Past the first lifetime: the gateway's sweeper (every second here) and this sweep find
    // nothing to release, since the live request renewed its lease.
    assert_eq!(
        b.reconcile(false).await.unwrap(),
        0,
        "a live request is not swept"
    );
    let (open,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM reservations WHERE account_id = $1 AND state = 'open'",
    )
    .bind(&account)
    .fetch_one(&b.db().pool)
    .await
    .unwrap();
    assert_eq!(open, 1, "the reservation is still open");
    let text = reading.await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let reported = sse_data(&text)
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| v["usage"]["cost_picodollars"].as_i64())
        .unwrap();
    assert_eq!(reported, 9 * 1000 + 2 * 2000);
    let lines = b.ledger(None, Some(&id), 10).await.unwrap();
    assert_eq!(lines.len(), 1, "charged exactly once");
    assert_eq!(lines[0].amount, -reported);
    assert_eq!(lines[0].overrun, 0, "its reservation was held to the end");
    settle_down(b, &account).await;
}

#[tokio::test]
async fn postgres_a_settle_after_its_reservation_was_swept_still_charges_once() {
    use tollgate::billing::{Price, Usage};
    let db = tollgate::store::Db::connect(&postgres_url().await)
        .await
        .unwrap();
    let b = Billing::new(db, Duration::from_secs(60), None);
    let a = accounts::create(&b, "swept").await.unwrap();
    let start = Credits::parse_usd("1").unwrap();
    accounts::credit(&b, &a.id, start, "t").await.unwrap();
    let price = Price {
        output_per_token: 1_000,
        ..Price::default()
    };
    let hold = b
        .reserve(&a.id, "key", "req-swept", "m", Credits(5_000), price)
        .await
        .unwrap();
    // A second hold under the same request id: the request is still charged once.
    let twin = b
        .reserve(&a.id, "key", "req-swept", "m", Credits(5_000), price)
        .await
        .unwrap();
    // The first lease runs out (its gateway stalled past it) and the sweeper releases it.
    sqlx::query("UPDATE reservations SET expires_at = 0 WHERE id = $1")
        .bind(&hold.id)
        .execute(&b.db().pool)
        .await
        .unwrap();
    assert_eq!(b.reconcile(false).await.unwrap(), 1);
    assert_eq!(accounts::get(&b, &a.id).await.unwrap().reserved, 5_000);
    // The request ends: its usage is charged all the same, and nothing is given back twice.
    let usage = Usage {
        completion_tokens: 7,
        ..Usage::default()
    };
    assert_eq!(hold.settle(usage).await.unwrap(), Credits(7_000));
    assert_eq!(twin.settle(usage).await.unwrap(), Credits(0));
    let lines = b.ledger(None, Some("req-swept"), 10).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].amount, -7_000);
    assert_eq!(lines[0].overrun, 7_000, "nothing held it any more");
    let after = accounts::get(&b, &a.id).await.unwrap();
    assert_eq!((after.balance, after.reserved), (start.0 - 7_000, 0));
    assert!(b.verify(&a.id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_ledger_that_cannot_be_written_refuses_past_the_bound_then_charges_each_once() {
    let up = MockUpstream::start().await;
    let gw = billed_gateway_with(&up, Store::Sqlite, "billing:\n  max_pending_charges: 3\n").await;
    let b = billing(&gw);
    let (account, key) = funded_key(b, "backlog", "1", key_named("k")).await;
    let cost = 19 * 1000 + 10 * 2000;
    assert_eq!(chat_with(&gw, &key, "paid-up", false).await.status(), 200);
    b.flush().await.unwrap();
    // The ledger cannot be written (as when the database is down): charges wait in the journal.
    sqlx::query("ALTER TABLE ledger RENAME TO ledger_unwritable")
        .execute(&b.db().pool)
        .await
        .unwrap();
    let mut served = Vec::new();
    let refused = loop {
        let r = chat_with(&gw, &key, "paid-up", false).await;
        if r.status() != 200 {
            break r;
        }
        served.push(request_id(&r));
        assert!(
            served.len() <= 3,
            "past the bound, billed requests are refused"
        );
    };
    assert_eq!(served.len(), 3, "up to the bound, requests are served");
    let hits = up.hits();
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "Retry-After: {retry}");
    let refused_id = request_id(&refused);
    assert_openai_error(refused, 503, "billing_backlog").await;
    assert_eq!(
        chat_with(&gw, &key, "paid-up", false).await.status(),
        503,
        "and stay refused while the ledger is down"
    );
    assert_eq!(up.hits(), hits, "a refused request reaches no upstream");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_billing_backlog_refusals_total{model=\"paid-up\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_open_reservations 0"),
        "nothing is held"
    );
    // Every served charge is durable in the journal meanwhile.
    let journal = std::fs::read_to_string(tollgate::billing::owned::journal_path(
        &gw.dir.path().join("tollgate.db"),
    ))
    .unwrap();
    for id in &served {
        assert_eq!(
            journal.matches(id.as_str()).count(),
            1,
            "{id} journaled once"
        );
    }
    // The ledger comes back: everything is charged once, the refused requests not at all.
    sqlx::query("ALTER TABLE ledger_unwritable RENAME TO ledger")
        .execute(&b.db().pool)
        .await
        .unwrap();
    b.flush().await.unwrap();
    for id in &served {
        let lines = b.ledger(None, Some(id), 10).await.unwrap();
        assert_eq!(lines.len(), 1, "{id} charged once");
        assert_eq!(lines[0].amount, -cost);
    }
    assert!(
        b.ledger(None, Some(&refused_id), 10)
            .await
            .unwrap()
            .is_empty()
    );
    settle_down(b, &account).await;
    assert_eq!(
        accounts::get(b, &account).await.unwrap().balance,
        Credits::parse_usd("1").unwrap().0 - 4 * cost
    );
    assert_eq!(chat_with(&gw, &key, "paid-up", false).await.status(), 200);
}
