//! Tasks against mock providers that follow Replicate's and Black Forest Labs' documented
//! shapes (`task_mocks`): outputs copied into our storage, a failed job, one that never finishes
//! (deadline), broken, mistyped and oversized outputs, rate limits, and the credential kept on
//! the host side.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

use crate::common::*;
use crate::task_mocks::{BFL_KEY, BflMock, REPLICATE_KEY, ReplicateMock, TaskMock, tiny_png};
use crate::tasks::gateway;

/// A gateway with a Replicate channel and a BFL channel on the mocks; models priced per image.
async fn providers(rep: &TaskMock, bfl: &TaskMock, tasks: &str) -> TestGateway {
    let channels = format!(
        "  - {{ name: rep, plugin: replicate, base_url: \"{}\", api_key_env: REPLICATE_KEY }}\n  - {{ name: bfl, plugin: bfl, base_url: \"{}\", api_key_env: BFL_KEY }}\n",
        rep.base_url(),
        bfl.base_url()
    );
    let mut models = String::new();
    for s in [
        "ok",
        "ok-0",
        "fail",
        "refused",
        "never",
        "ratelimit",
        "ratelimit-poll",
        "broken-output",
        "wrong-type",
        "oversized",
        "unauthorized",
    ] {
        models.push_str(&format!(
            "  - {{ name: rep-{s}, channel: rep, upstream_model: mock/{s}, price: {{ per_image: 3000000000 }}, task_deadline: 3s }}\n"
        ));
    }
    for s in ["ok", "refused", "refused-output", "never"] {
        models.push_str(&format!(
            "  - {{ name: bfl-{s}, channel: bfl, upstream_model: {s}, price: {{ per_image: 4000000000 }}, task_deadline: 3s }}\n"
        ));
    }
    gateway(
        &channels,
        &models,
        &format!("  allow_hosts: [127.0.0.1]\n  max_output_bytes: 1048576\n{tasks}"),
    )
    .await
}

async fn start() -> (TaskMock, TaskMock, TestGateway, String) {
    let rep = ReplicateMock::start().await;
    let bfl = BflMock::start().await;
    let gw = providers(&rep, &bfl, "").await;
    let (_acct, key) = gw.admin_funded_key("studio", "1").await;
    (rep, bfl, gw, key)
}

async fn run(
    gw: &TestGateway,
    key: &str,
    model: &str,
    input: Value,
) -> (String, Vec<String>, Value) {
    let r = gw
        .submit(key, json!({"model": model, "input": input}))
        .await;
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["taskId"].as_str().unwrap().to_string();
    let (seen, data) = gw.finish(key, &id).await;
    (id, seen, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_job_is_polled_archived_and_charged_with_the_credential_kept_host_side() {
    let (rep, _bfl, gw, key) = start().await;
    let (before, _) = gw.balance_pico(&key).await;
    let (id, seen, data) = run(
        &gw,
        &key,
        "rep-ok",
        json!({"prompt": "a fox in snow", "num_outputs": 2}),
    )
    .await;
    assert_eq!(data["status"], "success", "{data}");
    assert!(seen.contains(&"handling".to_string()), "{seen:?}");
    assert!(rep.polls() >= 2, "polled {} times", rep.polls());
    // The outputs are ours now: the same bytes, from our storage, while the provider's links
    // are no longer needed.
    let outputs = data["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    let downloads = rep.downloads();
    for o in outputs {
        let url = o["url"].as_str().unwrap();
        assert!(url.starts_with(&gw.public));
        let bytes = gw
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"));
    }
    assert_eq!(
        rep.downloads(),
        downloads,
        "served from our storage, not the provider"
    );
    // The credential reached the API, never the file host; the plugin never saw it (it is not
    // in any body the plugin built).
    let submit = rep.last("/v1/models/");
    assert_eq!(
        submit.headers["authorization"],
        format!("Bearer {REPLICATE_KEY}")
    );
    assert!(!submit.body.contains(REPLICATE_KEY));
    let file = rep.last("/files/");
    assert!(!file.headers.contains_key("authorization"));
    assert_eq!(
        serde_json::from_str::<Value>(&submit.body).unwrap()["input"]["prompt"],
        "a fox in snow"
    );
    // Charged once: two images at $0.003.
    assert_eq!(gw.charges_for(&id).await.len(), 1);
    assert_eq!(gw.balance_pico(&key).await, (before - 6_000_000_000, 0));
    let _ = tiny_png("unused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bfl_job_succeeds_and_its_moderation_is_a_content_refusal() {
    let (_rep, bfl, gw, key) = start().await;
    let (before, _) = gw.balance_pico(&key).await;
    let (_, _, data) = run(
        &gw,
        &key,
        "bfl-ok",
        json!({"prompt": "a paper boat", "aspect_ratio": "1:1"}),
    )
    .await;
    assert_eq!(data["status"], "success", "{data}");
    assert_eq!(bfl.last("/v1/ok").headers["x-key"], BFL_KEY);
    for model in ["bfl-refused", "bfl-refused-output"] {
        let (id, _, data) = run(&gw, &key, model, json!({"prompt": "a paper boat"})).await;
        assert_eq!(data["status"], "fail", "{data}");
        assert_eq!(data["error"]["code"], "content_policy_violation", "{data}");
        assert!(gw.charges_for(&id).await.is_empty());
    }
    assert_eq!(gw.balance_pico(&key).await, (before - 4_000_000_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_timed_out_and_unarchivable_jobs_fail_and_cost_nothing() {
    let (_rep, _bfl, gw, key) = start().await;
    let (before, _) = gw.balance_pico(&key).await;
    for (model, code) in [
        ("rep-fail", "provider_error"),
        ("rep-never", "timeout"),
        ("bfl-never", "timeout"),
        ("rep-broken-output", "archive_failed"),
        ("rep-wrong-type", "archive_failed"),
        ("rep-oversized", "archive_failed"),
    ] {
        let (id, _, data) = run(&gw, &key, model, json!({"prompt": "a lamp"})).await;
        assert_eq!(data["status"], "fail", "{model}: {data}");
        assert_eq!(data["error"]["code"], code, "{model}: {data}");
        assert!(data.get("output").is_none(), "{data}");
        assert!(gw.charges_for(&id).await.is_empty(), "{model} was charged");
    }
    // Nothing charged, nothing left reserved.
    assert_eq!(gw.balance_pico(&key).await, (before, 0));
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_tasks_total{model=\"rep-never\",status=\"fail\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_poll_is_retried_and_a_refused_credential_fails_without_charge() {
    let (_rep, _bfl, gw, key) = start().await;
    let (_, _, data) = run(&gw, &key, "rep-ratelimit-poll", json!({"prompt": "a bell"})).await;
    assert_eq!(data["status"], "success", "{data}");
    let (before, _) = gw.balance_pico(&key).await;
    let (id, _, data) = run(&gw, &key, "rep-unauthorized", json!({"prompt": "a bell"})).await;
    assert_eq!(data["status"], "fail", "{data}");
    assert!(gw.charges_for(&id).await.is_empty());
    assert_eq!(gw.balance_pico(&key).await, (before, 0));
    // The operator sees the refused credential.
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_upstream_auth_failures_total{channel=\"rep\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_images_route_drives_an_async_provider_to_the_end() {
    let (rep, _bfl, gw, key) = start().await;
    let (before, _) = gw.balance_pico(&key).await;
    let post = |body: Value| {
        gw.client
            .post(format!("{}/v1/images/generations", gw.public))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    // Links to the archived images, in OpenAI's shape, with the cost.
    let r =
        post(json!({"model": "rep-ok", "prompt": "a glass of water", "n": 2, "size": "1792x1024"}))
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-tollgate-cost"));
    let v: Value = r.json().await.unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{v}");
    for d in data {
        let url = d["url"].as_str().unwrap();
        assert!(url.starts_with(&gw.public), "{url}");
        let png = gw
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
    }
    assert_eq!(v["usage"]["cost_picodollars"], 6_000_000_000i64, "{v}");
    // The job got the OpenAI fields as the provider's input.
    let submit: Value = serde_json::from_str(&rep.last("/v1/models/").body).unwrap();
    assert_eq!(submit["input"]["num_outputs"], 2);
    assert_eq!(submit["input"]["aspect_ratio"], "16:9");
    // Or their bytes.
    let v: Value = post(
        json!({"model": "rep-ok", "prompt": "a glass of water", "response_format": "b64_json"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    assert_eq!(gw.balance_pico(&key).await, (before - 9_000_000_000, 0));
    // A job that fails is a provider error in OpenAI's body; a content refusal is a 400; nothing
    // is charged for either.
    let r = post(json!({"model": "rep-fail", "prompt": "a glass of water"}))
        .await
        .unwrap();
    assert_openai_error(r, 502, "upstream_error").await;
    let r = post(json!({"model": "bfl-refused", "prompt": "a glass of water"}))
        .await
        .unwrap();
    assert_openai_error(r, 400, "content_policy_violation").await;
    assert_eq!(gw.balance_pico(&key).await, (before - 9_000_000_000, 0));
}
