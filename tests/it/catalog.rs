//! The catalog: `/v1/models` assembled from config, the plugins' manifests and each channel's
//! upstream model list, refreshed in the background; a failed refresh keeps the last good list;
//! `/v1/pricing` shows the billed prices in USD.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_lists_are_refreshed_and_the_last_good_one_is_kept() {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let mut yaml = config_yaml(
        Some(&up.base_url()),
        "",
        "  - { name: mini, channel: mock, upstream_model: gpt-4o-mini, price: { input_per_token: 150000, output_per_token: 600000 } }\n",
        &dir.path().join("plugins"),
    );
    yaml.push_str("catalog: { refresh: 100ms }\n");
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    let listed = async |gw: &TestGateway, id: &str| -> Value {
        let v: Value = gw.get("/v1/models").await.json().await.unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap()
    };
    wait_for("the upstream list", async || {
        listed(&gw, "mini").await["tollgate"]["upstream_listed"] == true
    })
    .await;
    // `gpt-test` is not in the upstream's list.
    assert_eq!(
        listed(&gw, "gpt-test").await["tollgate"]["upstream_listed"],
        false
    );
    // The upstream's list fails from now on: refreshes keep failing, the last good list stays.
    up.state.models_fail.store(true, Ordering::SeqCst);
    let before = up.state.model_lists.load(Ordering::SeqCst);
    wait_for("failed refreshes", async || {
        up.state.model_lists.load(Ordering::SeqCst) >= before + 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        listed(&gw, "mini").await["tollgate"]["upstream_listed"],
        true
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_catalog_refreshes_total{outcome=\"failed\"}"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_catalog_refreshes_total{outcome=\"ok\"}"),
        "{m}"
    );
    // The public price list, in dollars.
    let p: Value = gw.get("/v1/pricing").await.json().await.unwrap();
    let mini = p["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "mini")
        .unwrap()
        .clone();
    assert_eq!(mini["usd"]["input_per_million_tokens"], "0.150000000000");
    assert_eq!(mini["usd"]["output_per_million_tokens"], "0.600000000000");
}
