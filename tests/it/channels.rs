//! A model served by several channels: a failing channel is failed over with no client error,
//! its breaker opens (it stops getting traffic) and comes back after a probe; a channel whose
//! credential the upstream refuses is disabled, alerted, and reset by the operator; weights
//! share the traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// Channels `a`, `b` (and `c`) on one mock; the model's upstream id on each picks the mock's
/// behaviour (`fail500`, `unauthorized`, `ok`).
async fn pooled(up: &MockUpstream, models: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let u = up.base_url();
    let channels = format!(
        "  - {{ name: a, plugin: openai, base_url: \"{u}\", api_key_env: MOCK_KEY }}\n  - {{ name: b, plugin: openai, base_url: \"{u}\", api_key_env: MOCK_KEY }}\n  - {{ name: c, plugin: openai, base_url: \"{u}\", api_key_env: MOCK_KEY }}\n"
    );
    let mut yaml = config_yaml(None, &channels, models, &dir.path().join("plugins"));
    yaml.push_str("routing: { breaker_failures: 3, breaker_cooldown: 400ms, auth_cooldown: 1h }\n");
    TestGateway::start_yaml(&yaml, dir).await
}

async fn ask(gw: &TestGateway, model: &str) -> (u16, Value) {
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.public))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn upstream_models(up: &MockUpstream) -> Vec<String> {
    up.state
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .map(|r| {
            serde_json::from_str::<Value>(&r.body).unwrap()["model"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

async fn channel_state(gw: &TestGateway, name: &str) -> String {
    let v: Value = gw
        .admin(reqwest::Method::GET, "/admin/channels")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| c["state"].as_str().unwrap().to_string())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_channel_fails_over_opens_its_breaker_and_comes_back_after_a_probe() {
    let up = MockUpstream::start().await;
    let gw = pooled(
        &up,
        "  - { name: pooled, channel: a, upstream_model: fail500, free: true, channels: [ { channel: b, upstream_model: ok, priority: 1 } ] }\n",
    )
    .await;
    // Every request succeeds: `a` fails (500), `b` answers.
    for _ in 0..6 {
        let (status, body) = ask(&gw, "pooled").await;
        assert_eq!(status, 200, "{body}");
    }
    let seen = upstream_models(&up);
    // The first three went to `a` first; then its breaker opened and `b` took them directly.
    assert_eq!(
        seen.iter().filter(|m| *m == "fail500").count(),
        3,
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|m| *m == "ok").count(), 6, "{seen:?}");
    assert_eq!(channel_state(&gw, "a").await, "open");
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_failovers_total{model=\"pooled\"} 3"),
        "{m}"
    );
    assert!(m.contains("tollgate_channel_state{channel=\"a\"} 2"), "{m}");
    // After the cooldown one request probes `a` again (it still fails: open again), and the
    // client still gets its answer from `b`.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = ask(&gw, "pooled").await;
    assert_eq!(status, 200);
    let seen = upstream_models(&up);
    assert_eq!(
        seen.iter().filter(|m| *m == "fail500").count(),
        4,
        "{seen:?}"
    );
    assert_eq!(channel_state(&gw, "a").await, "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_disables_the_channel_until_the_operator_resets_it() {
    let up = MockUpstream::start().await;
    let gw = pooled(
        &up,
        "  - { name: pooled, channel: a, upstream_model: unauthorized, free: true, channels: [ { channel: b, upstream_model: ok, priority: 1 } ] }\n",
    )
    .await;
    for _ in 0..3 {
        let (status, body) = ask(&gw, "pooled").await;
        assert_eq!(status, 200, "{body}");
    }
    // Refused once, then left out: no client ever saw the refusal.
    let seen = upstream_models(&up);
    assert_eq!(
        seen.iter().filter(|m| *m == "unauthorized").count(),
        1,
        "{seen:?}"
    );
    assert_eq!(channel_state(&gw, "a").await, "disabled");
    let m = gw.metrics().await;
    assert!(m.contains("tollgate_channel_state{channel=\"a\"} 3"), "{m}");
    assert!(
        m.contains("tollgate_upstream_auth_failures_total{channel=\"a\"} 1"),
        "{m}"
    );
    // The operator resets it: it is tried again.
    let r = gw
        .admin(reqwest::Method::POST, "/admin/channels/a/reset")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(channel_state(&gw, "a").await, "closed");
    let (status, _) = ask(&gw, "pooled").await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream_models(&up)
            .iter()
            .filter(|m| *m == "unauthorized")
            .count(),
        2
    );
    let r = gw
        .admin(reqwest::Method::POST, "/admin/channels/nope/reset")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_share_the_traffic_and_a_single_channel_model_is_never_refused_by_its_breaker() {
    let up = MockUpstream::start().await;
    let gw = pooled(
        &up,
        "  - { name: shared, channel: a, upstream_model: ok, weight: 3, free: true, channels: [ { channel: b, upstream_model: gpt-test, weight: 1 } ] }\n  - { name: lonely, channel: c, upstream_model: fail500, free: true }\n",
    )
    .await;
    for _ in 0..80 {
        assert_eq!(ask(&gw, "shared").await.0, 200);
    }
    let seen = upstream_models(&up);
    let heavy = seen.iter().filter(|m| *m == "ok").count();
    assert!(
        (45..=75).contains(&heavy),
        "weight 3 of 4 took {heavy} of 80"
    );
    // One channel failing: every request still reaches it (and gets the upstream's failure).
    for _ in 0..5 {
        assert_eq!(ask(&gw, "lonely").await.0, 502);
    }
    let failed = upstream_models(&up)
        .iter()
        .filter(|m| *m == "fail500")
        .count();
    assert_eq!(failed, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_channel_comes_back_once_a_probe_succeeds() {
    let up = MockUpstream::start().await;
    up.state
        .flaky_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let gw = pooled(
        &up,
        "  - { name: pooled, channel: a, upstream_model: flaky, free: true, channels: [ { channel: b, upstream_model: ok, priority: 1 } ] }\n",
    )
    .await;
    for _ in 0..4 {
        assert_eq!(ask(&gw, "pooled").await.0, 200);
    }
    assert_eq!(channel_state(&gw, "a").await, "open");
    // The upstream recovers; after the cooldown the probe succeeds and `a` serves again.
    up.state
        .flaky_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ask(&gw, "pooled").await.0, 200);
    assert_eq!(channel_state(&gw, "a").await, "closed");
    let before = upstream_models(&up)
        .iter()
        .filter(|m| *m == "flaky")
        .count();
    for _ in 0..3 {
        assert_eq!(ask(&gw, "pooled").await.0, 200);
    }
    let after = upstream_models(&up)
        .iter()
        .filter(|m| *m == "flaky")
        .count();
    assert_eq!(after - before, 3, "every request goes to `a` again");
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_channel_transitions_total{channel=\"a\",state=\"closed\"} 1"),
        "{m}"
    );
}
