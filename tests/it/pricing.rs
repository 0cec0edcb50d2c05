//! Prices: a model is billed at its configured price, else its plugin's manifest price, else it
//! must be marked `free: true`; a config that would bill a model as free by accident is refused
//! (at start and on reload), and `/v1/models` shows the price that is billed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use crate::common::*;

fn yaml_with(up: &MockUpstream, dir: &tempfile::TempDir, models: &str) -> String {
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    config_yaml(Some(&up.base_url()), "", models, &plugins)
}

#[tokio::test]
async fn a_model_with_no_price_anywhere_is_refused_by_name() {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml_with(
        &up,
        &dir,
        "  - { name: mystery, channel: mock, upstream_model: some-new-model }\n",
    );
    let cfg = tollgate::config::from_yaml(&yaml, &test_env()).unwrap();
    let err = tollgate::app::start(cfg)
        .await
        .err()
        .expect("an unpriced model is refused");
    let text = err.to_string();
    assert!(text.contains("mystery"), "{text}");
    assert!(text.contains("free: true"), "{text}");
    // A price and `free` at once is refused too.
    let yaml = yaml_with(
        &up,
        &dir,
        "  - { name: both, channel: mock, free: true, price: { per_request: 1 } }\n",
    );
    let err = tollgate::config::from_yaml(&yaml, &test_env()).unwrap_err();
    assert!(err.to_string().contains("both"), "{err}");
}

#[tokio::test]
async fn a_reload_that_adds_an_unpriced_model_is_refused() {
    // Only the demo channel: a config file read from disk takes credentials from the process
    // environment, which names no upstream key here.
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let base = config_yaml(None, "", "", &plugins);
    let gw = TestGateway::start_file(&base, dir).await;
    let path = gw.dir.path().join("config.yaml");
    let unpriced = base.replace(
        "models:\n",
        "models:\n  - { name: mystery, channel: demo, upstream_model: some-new-model }\n",
    );
    std::fs::write(&path, unpriced).unwrap();
    wait_for("the refusal", async || {
        gw.metrics()
            .await
            .contains("tollgate_config_reloads_total{outcome=\"refused\"} 1")
    })
    .await;
    assert_eq!(gw.get("/v1/models/mystery").await.status(), 404);
    // Marked free, the same model is accepted.
    let free = base.replace(
        "models:\n",
        "models:\n  - { name: mystery, channel: demo, upstream_model: some-new-model, free: true }\n",
    );
    std::fs::write(&path, free).unwrap();
    wait_for("the model to serve", async || {
        gw.get("/v1/models/mystery").await.status() == 200
    })
    .await;
}

#[tokio::test]
async fn the_catalog_shows_the_price_that_is_billed() {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let models = "  - { name: own-price, channel: mock, upstream_model: gpt-4o-mini, price: { input_per_token: 7, output_per_token: 9 } }\n  - { name: manifest-price, channel: mock, upstream_model: gpt-4o-mini }\n";
    let gw = TestGateway::start_yaml(&yaml_with(&up, &dir, models), dir).await;
    let pricing = async |id: &str| -> serde_json::Value {
        let m: serde_json::Value = gw
            .get(&format!("/v1/models/{id}"))
            .await
            .json()
            .await
            .unwrap();
        m["tollgate"]["pricing"].clone()
    };
    let own = pricing("own-price").await;
    assert_eq!(own["input_per_token"], 7, "{own}");
    assert_eq!(own["output_per_token"], 9, "{own}");
    let manifest = pricing("manifest-price").await;
    assert_eq!(manifest["input_per_token"], 150_000, "{manifest}");
    let free = pricing("ok").await;
    assert_eq!(free["input_per_token"], 0, "{free}");
    assert_eq!(free["output_per_token"], 0, "{free}");
}

/// Every choice of `n` may use the output cap, so all of them are reserved: a balance that covers
/// one choice does not cover 128.
#[tokio::test]
async fn every_choice_of_n_is_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // One micro-dollar per output token; the input is free.
    let yaml = config_yaml(None, "", "", &plugins).replace(
        "models:\n",
        "models:\n  - { name: n-priced, channel: demo, upstream_model: demo-chat, price: { output_per_token: 1000000 } }\n",
    );
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    // A thousandth of a dollar: 1,000 output tokens.
    let (_, key) = gw.admin_funded_key("chooser", "0.001").await;
    let ask = async |n: u64| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.public))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "n-priced", "n": n, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    };
    assert_openai_error(ask(128).await, 402, "insufficient_quota").await;
    assert_eq!(ask(1).await.status(), 200);
    let resp = ask(129).await;
    let body = assert_openai_error(resp, 400, "invalid_request").await;
    assert_eq!(body["error"]["param"], "n");
}
