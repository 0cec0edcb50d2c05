//! Limits per key and per account (in process and on Redis shared by two gateways), Redis down
//! (fail open, fail closed), and the abnormal-usage guard: a burst of blocked prompts or a rate
//! jump suspends or throttles a key, visible to the operator, counted, and lifted by the admin
//! API and the CLI. Redis on 127.0.0.1:6379 (`.ci/run` starts it); each test has its own prefix.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reqwest::Method;
use serde_json::{Value, json};

use crate::billing::{cli, postgres_url};
use crate::common::*;

/// A gateway on the mock upstream with `extra` top-level YAML (`limits:`, `guard:`), on
/// `database` if given (else SQLite in its folder), its config written to `config.yaml`.
async fn gateway(up: &MockUpstream, extra: &str, database: Option<&str>) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let mut yaml = config_yaml(Some(&up.base_url()), "", "", &plugins);
    if let Some(url) = database {
        yaml = yaml
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
    }
    yaml.push('\n');
    yaml.push_str(extra);
    std::fs::write(dir.path().join("config.yaml"), &yaml).unwrap();
    TestGateway::start_yaml(&yaml, dir).await
}

fn prefix() -> String {
    format!("tgtest:{}:", ulid::Ulid::new())
}

async fn chat(gw: &TestGateway, key: &str, content: &str) -> reqwest::Response {
    gw.client
        .post(format!("{}/v1/chat/completions", gw.public))
        .bearer_auth(key)
        .json(&json!({"model": "ok", "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap()
}

/// A key on `account` with `limits`.
async fn key_with(gw: &TestGateway, account: &str, limits: Value) -> (String, String) {
    let made: Value = gw
        .admin(Method::POST, &format!("/admin/accounts/{account}/keys"))
        .json(&json!({"name": "k", "limits": limits}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        made["info"]["id"].as_str().unwrap().to_string(),
        made["key"].as_str().unwrap().to_string(),
    )
}

async fn account(gw: &TestGateway, name: &str) -> String {
    let a: Value = gw
        .admin(Method::POST, "/admin/accounts")
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    a["id"].as_str().unwrap().to_string()
}

/// A 429 of a limit: OpenAI's body, `Retry-After` within the window, the headers of `limit`.
async fn assert_limited(r: reqwest::Response, limit: &str, scope: &str) {
    assert_eq!(r.status(), 429);
    let h = r.headers().clone();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(h["x-ratelimit-limit-requests"], limit);
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    let reset = h["x-ratelimit-reset-requests"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(reset.ends_with('s'), "{reset}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("this {scope} allows")),
        "{message}"
    );
}

#[tokio::test]
async fn a_key_and_its_account_over_their_limits_get_429_with_openai_headers() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up, "", None).await;
    // The account allows 2 a minute over all its keys; each key allows 5.
    let acct = account(&gw, "shared").await;
    let r = gw
        .admin(Method::PUT, &format!("/admin/accounts/{acct}/limits"))
        .json(&json!({"requests_per_minute": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let shown: Value = r.json().await.unwrap();
    assert_eq!(shown["limits"]["requests_per_minute"], 2);
    let (_, a) = key_with(&gw, &acct, json!({"requests_per_minute": 5})).await;
    let (_, b) = key_with(&gw, &acct, json!({"requests_per_minute": 5})).await;
    assert_eq!(chat(&gw, &a, "hi").await.status(), 200);
    assert_eq!(chat(&gw, &b, "hi").await.status(), 200);
    let hits = up.hits();
    assert_limited(chat(&gw, &a, "hi").await, "2", "account").await;
    assert_limited(chat(&gw, &b, "hi").await, "2", "account").await;
    assert_eq!(up.hits(), hits, "a refused request reaches no upstream");

    // A key's own limit, below its account's.
    let other = account(&gw, "roomy").await;
    let (_, c) = key_with(&gw, &other, json!({"requests_per_minute": 1})).await;
    assert_eq!(chat(&gw, &c, "hi").await.status(), 200);
    assert_limited(chat(&gw, &c, "hi").await, "1", "key").await;

    // Bad account limits are refused, naming the field.
    let r = gw
        .admin(Method::PUT, &format!("/admin/accounts/{other}/limits"))
        .json(&json!({"concurrent_requests": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("concurrent_requests"));
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"tollgate_rate_limited_total{scope="account",limit="requests"} 2"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_limit_holds_across_two_gateways_sharing_redis() {
    let up = MockUpstream::start().await;
    let db = postgres_url().await;
    let extra = format!(
        "limits:\n  backend: redis\n  redis_url: redis://127.0.0.1:6379\n  on_redis_error: closed\n  key_prefix: \"{}\"\n",
        prefix()
    );
    let one = gateway(&up, &extra, Some(&db)).await;
    let two = gateway(&up, &extra, Some(&db)).await;
    let acct = account(&one, "both").await;
    let (_, key) = key_with(&one, &acct, json!({"requests_per_minute": 4})).await;
    // Four a minute in all, whichever gateway they reach.
    for gw in [&one, &two, &one, &two] {
        assert_eq!(chat(gw, &key, "hi").await.status(), 200);
    }
    assert_limited(chat(&one, &key, "hi").await, "4", "key").await;
    assert_limited(chat(&two, &key, "hi").await, "4", "key").await;

    // The account's limit too, over two keys on two gateways.
    let r = one
        .admin(Method::PUT, &format!("/admin/accounts/{acct}/limits"))
        .json(&json!({"concurrent_requests": 50, "requests_per_minute": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let other = account(&two, "pair").await;
    two.admin(Method::PUT, &format!("/admin/accounts/{other}/limits"))
        .json(&json!({"requests_per_minute": 3}))
        .send()
        .await
        .unwrap();
    let (_, x) = key_with(&two, &other, json!({})).await;
    let (_, y) = key_with(&one, &other, json!({})).await;
    assert_eq!(chat(&one, &x, "hi").await.status(), 200);
    assert_eq!(chat(&two, &y, "hi").await.status(), 200);
    assert_eq!(chat(&two, &x, "hi").await.status(), 200);
    assert_limited(chat(&one, &y, "hi").await, "3", "account").await;

    // Nothing is left in Redis without a TTL.
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pfx = extra.split('"').nth(1).unwrap().to_string();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{pfx}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 || ttl == -2, "{k} has no TTL ({ttl})");
    }
}

#[tokio::test]
async fn redis_down_admits_when_open_and_answers_503_when_closed() {
    let up = MockUpstream::start().await;
    // A port nothing listens on.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for mode in ["open", "closed"] {
        let extra = format!(
            "limits:\n  backend: redis\n  redis_url: redis://127.0.0.1:{closed_port}\n  on_redis_error: {mode}\n  redis_timeout: 100ms\n  key_prefix: \"{}\"\n",
            prefix()
        );
        let gw = gateway(&up, &extra, None).await;
        let acct = account(&gw, mode).await;
        let (_, key) = key_with(&gw, &acct, json!({"requests_per_minute": 1})).await;
        if mode == "open" {
            for _ in 0..3 {
                assert_eq!(chat(&gw, &key, "hi").await.status(), 200);
            }
            let m = gw.metrics().await;
            assert!(
                m.contains(r#"tollgate_limits_redis_errors_total{outcome="admitted"} 3"#),
                "{m}"
            );
        } else {
            let r = chat(&gw, &key, "hi").await;
            assert_eq!(r.status(), 503);
            assert_eq!(r.headers()["retry-after"], "1");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "limits_unavailable", "{body}");
            // The task API answers in its own body.
            let r = gw
                .client
                .post(format!("{}/v1/tasks", gw.public))
                .bearer_auth(&key)
                .json(&json!({"model": "ok", "input": {"prompt": "x"}}))
                .send()
                .await
                .unwrap();
            if r.status() == 503 {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error_code"], "LIMITS_UNAVAILABLE", "{body}");
            }
            let m = gw.metrics().await;
            assert!(
                m.contains(r#"tollgate_limits_redis_errors_total{outcome="refused"}"#),
                "{m}"
            );
        }
    }
}

/// The key's suspensions as the admin API shows them.
async fn suspensions(gw: &TestGateway, key_id: &str) -> Value {
    gw.admin(Method::GET, &format!("/admin/keys/{key_id}/suspensions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

const BLOCKED: &str = "how do I launder money through a small business";

#[tokio::test]
async fn a_burst_of_blocked_prompts_suspends_the_key_until_the_operator_lifts_it() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up, "guard:\n  blocked_prompts: 3\n", None).await;
    let acct = account(&gw, "abuser").await;
    let (key_id, key) = key_with(&gw, &acct, json!({})).await;
    assert_eq!(chat(&gw, &key, "hello").await.status(), 200);
    for _ in 0..3 {
        assert_eq!(chat(&gw, &key, BLOCKED).await.status(), 400);
    }
    // The next request finds the burst: the key is suspended, with the reason.
    let r = chat(&gw, &key, "hello").await;
    let body = assert_openai_error(r, 403, "key_suspended").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("blocked_prompts"),
        "{body}"
    );
    assert_openai_error(chat(&gw, &key, "hello").await, 403, "key_suspended").await;
    // The task API refuses it in its own body.
    let r = gw
        .client
        .post(format!("{}/v1/tasks", gw.public))
        .bearer_auth(&key)
        .json(&json!({"model": "ok", "input": {"prompt": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_code"], "KEY_SUSPENDED", "{body}");

    let s = suspensions(&gw, &key_id).await;
    assert_eq!(s["suspended"], true, "{s}");
    assert_eq!(s["suspensions"][0]["reason"], "blocked_prompts");
    assert_eq!(s["suspensions"][0]["action"], "suspend");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"tollgate_guard_actions_total{action="suspend",reason="blocked_prompts"} 1"#),
        "{m}"
    );
    assert!(m.contains("tollgate_suspended_keys 1"), "{m}");

    // Lifted by the admin API: the key works again, at once on this gateway.
    let r = gw
        .admin(Method::POST, &format!("/admin/keys/{key_id}/lift"))
        .json(&json!({"by": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lifted: Value = r.json().await.unwrap();
    assert_eq!(lifted["suspensions"][0]["lifted_by"], "alice");
    assert_eq!(chat(&gw, &key, "hello").await.status(), 200);
    assert!(gw.metrics().await.contains("tollgate_suspended_keys 0"));
    // Lifting again: nothing in force.
    let r = gw
        .admin(Method::POST, &format!("/admin/keys/{key_id}/lift"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A new burst suspends it again; the CLI lifts it (the gateway sees it within the cache TTL).
    for _ in 0..3 {
        assert_eq!(chat(&gw, &key, BLOCKED).await.status(), 400);
    }
    assert_openai_error(chat(&gw, &key, "hello").await, 403, "key_suspended").await;
    let config = gw.dir.path().join("config.yaml");
    let out = cli(&config, &["keys", "lift", &key_id, "--by", "bob"]);
    assert_eq!(out[0]["lifted_by"], "bob", "{out}");
    assert_eq!(out[1]["lifted_by"], "alice", "{out}");
    wait_for("the lifted key to work again", async || {
        chat(&gw, &key, "hello").await.status() == 200
    })
    .await;
    let listed = cli(&config, &["keys", "suspensions", &key_id]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_rate_jump_throttles_the_key_to_the_configured_rate() {
    let up = MockUpstream::start().await;
    let gw = gateway(
        &up,
        "guard:\n  action: throttle\n  throttle_requests_per_minute: 1\n  rate_factor: 2\n  rate_min_requests: 5\n  rate_initial_baseline: 1\n",
        None,
    )
    .await;
    let acct = account(&gw, "bursty").await;
    let (key_id, key) = key_with(&gw, &acct, json!({})).await;
    // A new key starts from a baseline of 1 a minute: 5 requests in a minute are a jump (a
    // minute boundary on the way only raises the count needed), then the key gets 1 a minute.
    let mut throttled = None;
    for _ in 0..40 {
        let r = chat(&gw, &key, "hi").await;
        if r.status() == 429 {
            throttled = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let r = throttled.expect("the guard throttles the key");
    assert_limited(r, "1", "key").await;
    let s = suspensions(&gw, &key_id).await;
    assert_eq!(s["suspended"], false, "{s}");
    assert_eq!(s["throttled_to_requests_per_minute"], 1, "{s}");
    assert_eq!(s["suspensions"][0]["reason"], "rate_jump");
    assert!(
        gw.metrics()
            .await
            .contains(r#"tollgate_guard_actions_total{action="throttle",reason="rate_jump"} 1"#)
    );
    let r = gw
        .admin(Method::POST, &format!("/admin/keys/{key_id}/lift"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(chat(&gw, &key, "hi").await.status(), 200);
}

#[tokio::test]
async fn an_error_storm_at_the_provider_suspends_the_key_and_the_gateways_refusals_do_not() {
    let up = MockUpstream::start().await;
    let gw = gateway(
        &up,
        "guard:\n  error_failures: 3\n  error_ratio: 0.3\n",
        None,
    )
    .await;
    let acct = account(&gw, "stormy").await;
    let (key_id, key) = key_with(&gw, &acct, json!({"requests_per_minute": 1000})).await;
    // Refusals of the gateway's own (blocked prompts) are no error storm; 3 provider
    // failures of 8 requests are (3 ≥ error_failures, 3/8 ≥ error_ratio).
    for _ in 0..4 {
        assert_eq!(chat(&gw, &key, BLOCKED).await.status(), 400);
    }
    let fail = |model: &'static str| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.public))
            .bearer_auth(&key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(fail("fail500").await.unwrap().status(), 502);
    }
    let body = assert_openai_error(chat(&gw, &key, "hello").await, 403, "key_suspended").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("error_storm"),
        "{body}"
    );
    let s = suspensions(&gw, &key_id).await;
    assert_eq!(s["suspensions"][0]["reason"], "error_storm", "{s}");
    assert!(
        gw.metrics()
            .await
            .contains(r#"tollgate_guard_actions_total{action="suspend",reason="error_storm"} 1"#)
    );
}
