//! `examples/grafana-dashboard.json` charts only metrics a running gateway exports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common::*;

#[tokio::test]
async fn the_grafana_dashboard_charts_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let yaml = config_yaml(None, "", "", &dir.path().join("plugins"));
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    let exported = gw.metrics().await;
    let mut charted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("tollgate_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_total")
                    .to_string();
                assert!(
                    exported.contains(&format!("# TYPE {family} ")),
                    "the dashboard charts `{name}`, which the gateway does not export"
                );
                charted += 1;
            }
        }
    }
    assert!(charted >= 20, "{charted}");
}
