//! Hot reload under load: add a provider (a `.wasm` in the folder plus a channel in the config
//! file), replace it with a new version, refuse a broken file while the old one keeps serving,
//! and remove it, all while concurrent requests run, with zero failures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::common::*;

/// Put a file in place atomically (write beside it, then rename), as operators should.
fn drop_in(src: &std::path::Path, dest: &std::path::Path) {
    let tmp = dest.with_extension("tmp");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

async fn provider_version(gw: &TestGateway, model: &str) -> Option<String> {
    let body: serde_json::Value = gw.get("/v1/models").await.json().await.ok()?;
    body["data"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == model)
        .and_then(|m| {
            m["tollgate"]["provider"]["version"]
                .as_str()
                .map(str::to_string)
        })
}

/// A streamed request to `model`, its first bytes read: in flight until [`finish_stream`].
async fn open_stream(gw: &TestGateway, model: &str) -> (reqwest::Response, String) {
    let mut resp = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.public))
        .json(&serde_json::json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "ping"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    (resp, String::from_utf8_lossy(&first).to_string())
}

/// The rest of a stream opened with [`open_stream`], whole.
async fn finish_stream((resp, first): (reqwest::Response, String)) -> String {
    first + &resp.text().await.unwrap()
}

/// Stop a load and return its failures (the caller decides which are acceptable).
async fn stop_load(load: Load) -> Vec<String> {
    load.stop.store(true, Ordering::Relaxed);
    for h in load.handles {
        h.await.unwrap();
    }
    load.failed.lock().unwrap().clone()
}

struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

fn start_load(gw: &TestGateway, model: &'static str, workers: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handles = (0..workers)
        .map(|i| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let client = gw.client.clone();
            let url = format!("{}/v1/chat/completions", gw.public);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let stream = i % 2 == 1;
                    let r = client
                        .post(&url)
                        .json(&serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "ping"}]}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            let text = r.text().await.unwrap_or_default();
                            if stream && !text.contains("[DONE]") {
                                failed.lock().unwrap().push(format!("{model}: stream without [DONE]: {text}"));
                            } else {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(r) => {
                            let s = r.status();
                            let text = r.text().await.unwrap_or_default();
                            failed.lock().unwrap().push(format!("{model}: {s} {text}"));
                        }
                        Err(e) => failed.lock().unwrap().push(format!("{model}: {e}")),
                    }
                }
            })
        })
        .collect();
    Load {
        stop,
        ok,
        failed,
        handles,
    }
}

impl Load {
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        assert!(
            failed.is_empty(),
            "{} failed requests: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        self.ok.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_replace_refuse_and_remove_a_plugin_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let base = config_yaml(None, "", "", &plugins);
    let with_reload = config_yaml(
        None,
        "  - { name: reloadable, plugin: reload }\n",
        "  - { name: reload-chat, channel: reloadable, free: true }\n",
        &plugins,
    );
    let gw = TestGateway::start_file(&base, dir).await;
    let config_path = gw.dir.path().join("config.yaml");
    let background = start_load(&gw, "demo-chat", 4);

    // Add: the component, then the channel and model in the config.
    drop_in(&artifact("tg_reload_v1"), &plugins.join("reload.wasm"));
    std::fs::write(&config_path, &with_reload).unwrap();
    wait_for("reload v1 to serve", async || {
        provider_version(&gw, "reload-chat").await.as_deref() == Some("1.0.0")
    })
    .await;
    let reload_load = start_load(&gw, "reload-chat", 4);
    let r: serde_json::Value = gw.chat("reload-chat", false).await.json().await.unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], "reload v1");

    // Replace with a new version while a stream is in flight on the old one.
    let in_flight = open_stream(&gw, "reload-chat").await;
    drop_in(&artifact("tg_reload_v2"), &plugins.join("reload.wasm"));
    wait_for("reload v2 to serve", async || {
        provider_version(&gw, "reload-chat").await.as_deref() == Some("2.0.0")
    })
    .await;
    let old = finish_stream(in_flight).await;
    assert!(
        old.contains("reload v1") && !old.contains("reload v2") && old.contains("[DONE]"),
        "the stream begun on v1 finished on v1: {old}"
    );
    let r: serde_json::Value = gw.chat("reload-chat", false).await.json().await.unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], "reload v2");

    // A broken file is refused; v2 keeps serving.
    let broken = gw.dir.path().join("broken.bin");
    std::fs::write(&broken, b"\0asm this is not a component").unwrap();
    drop_in(&broken, &plugins.join("reload.wasm"));
    wait_for("the refusal to be counted", async || {
        gw.metrics()
            .await
            .contains("tollgate_plugin_loads_total{plugin=\"reload\",outcome=\"refused\"} 1")
    })
    .await;
    assert_eq!(
        provider_version(&gw, "reload-chat").await.as_deref(),
        Some("2.0.0")
    );
    let r: serde_json::Value = gw.chat("reload-chat", false).await.json().await.unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], "reload v2");

    // Remove the file while its model still takes traffic: a stream in flight finishes on the
    // old version, and new requests get a clean 503 (the plugin is not loaded), nothing else.
    let in_flight = open_stream(&gw, "reload-chat").await;
    std::fs::remove_file(plugins.join("reload.wasm")).unwrap();
    wait_for("the removal to be counted", async || {
        gw.metrics()
            .await
            .contains("tollgate_plugin_loads_total{plugin=\"reload\",outcome=\"removed\"} 1")
    })
    .await;
    let old = finish_stream(in_flight).await;
    assert!(
        old.contains("reload v2") && old.contains("[DONE]"),
        "the stream in flight finished: {old}"
    );
    assert_openai_error(
        gw.chat("reload-chat", false).await,
        503,
        "provider_unavailable",
    )
    .await;
    let unexpected: Vec<String> = stop_load(reload_load)
        .await
        .into_iter()
        .filter(|f| {
            !(f.starts_with("reload-chat: 503 Service Unavailable")
                && f.contains("\"code\":\"provider_unavailable\""))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "after the removal only a 503 provider_unavailable is acceptable: {unexpected:?}"
    );

    // Then the model leaves the config: a 404, and the catalog no longer lists it.
    std::fs::write(&config_path, &base).unwrap();
    wait_for("reload-chat to leave the catalog", async || {
        !gw.get("/v1/models")
            .await
            .text()
            .await
            .unwrap()
            .contains("reload-chat")
    })
    .await;
    assert_openai_error(gw.chat("reload-chat", false).await, 404, "model_not_found").await;

    let served = background.finish().await;
    assert!(served > 20, "the background load ran ({served} requests)");
}

#[tokio::test]
async fn a_broken_config_change_keeps_the_last_good_routes() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let base = config_yaml(None, "", "", &plugins);
    let gw = TestGateway::start_file(&base, dir).await;
    let config_path = gw.dir.path().join("config.yaml");
    std::fs::write(&config_path, base.replace("models:", "models: [[[")).unwrap();
    wait_for("the refusal to be counted", async || {
        gw.metrics()
            .await
            .contains("tollgate_config_reloads_total{outcome=\"refused\"}")
    })
    .await;
    assert_eq!(gw.chat("demo-chat", false).await.status(), 200);
}
