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
