//! `examples/grafana-dashboard.json` charts only metric families the gateway registers (every
//! family is registered under the `tollgate` prefix, in `src/`), so a renamed metric cannot
//! leave a chart silently empty.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

/// Every family name registered in the sources: the string literal that follows `register(`.
fn registered() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, _) in text.match_indices("register(") {
                    let rest = &text[i..];
                    let Some(open) = rest.find('"') else { continue };
                    let name: String = rest[open + 1..].chars().take_while(|c| *c != '"').collect();
                    out.insert(format!("tollgate_{name}"));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

#[test]
fn the_grafana_dashboard_charts_only_registered_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let families = registered();
    assert!(families.contains("tollgate_requests"), "{families:?}");
    let mut charted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("tollgate_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = name.trim_end_matches("_bucket").trim_end_matches("_total");
                assert!(
                    families.contains(family),
                    "the dashboard charts `{name}`, which no `register(` in src/ defines"
                );
                charted += 1;
            }
        }
    }
    assert!(charted >= 20, "{charted}");
}
