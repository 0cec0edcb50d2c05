//! The async task API end to end: `POST /v1/tasks` → `GET /v1/tasks/{id}` through `queued`,
//! `handling`, `archiving` to `success` with downloadable, signed links (or `fail`), money
//! reserved at submission and charged once on success (released otherwise), errors in the task
//! body, and signed callbacks with retries.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::{Value, json};

use crate::common::*;

/// `demo-image` at $0.001 an image, fast polling, callbacks allowed to 127.0.0.1 over http.
pub fn task_yaml(
    dir: &std::path::Path,
    extra_channels: &str,
    extra_models: &str,
    tasks: &str,
) -> String {
    let mut y = config_yaml(
        None,
        extra_channels,
        &format!(
            "  - {{ name: demo-image, channel: demo, price: {{ per_image: 1000000000 }} }}\n{extra_models}"
        ),
        &dir.join("plugins"),
    );
    y.push_str(&format!(
        "tasks:\n  poll_initial: 30ms\n  poll_max: 200ms\n  callback_backoff: 50ms\n  storage: {{ folder: \"{}\" }}\n{tasks}",
        dir.join("outputs").display()
    ));
    y
}

pub async fn gateway(extra_channels: &str, extra_models: &str, tasks: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let yaml = task_yaml(dir.path(), extra_channels, extra_models, tasks);
    TestGateway::start_yaml(&yaml, dir).await
}

impl TestGateway {
    pub async fn submit(&self, key: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/tasks", self.public))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn task(&self, key: &str, id: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}/v1/tasks/{id}", self.public))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Poll until the task is final; every status seen on the way, and the last body's `data`.
    pub async fn finish(&self, key: &str, id: &str) -> (Vec<String>, Value) {
        let mut seen: Vec<String> = Vec::new();
        let start = std::time::Instant::now();
        loop {
            let (status, body) = self.task(key, id).await;
            assert_eq!(status, 200, "{body}");
            let s = body["data"]["status"].as_str().unwrap().to_string();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            if s == "success" || s == "fail" {
                return (seen, body["data"].clone());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "task {id} still {s} after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn balance_pico(&self, key: &str) -> (i64, i64) {
        let b: Value = self
            .client
            .get(format!("{}/v1/balance", self.public))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            b["balance_picodollars"].as_i64().unwrap(),
            b["reserved_picodollars"].as_i64().unwrap(),
        )
    }

    /// Ledger charges whose request id is `id`.
    pub async fn charges_for(&self, id: &str) -> Vec<Value> {
        let l: Value = self
            .admin(
                reqwest::Method::GET,
                &format!("/admin/ledger?request_id={id}"),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        l["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["request_id"] == id && e["kind"] == "charge")
            .cloned()
            .collect()
    }
}

/// The task error body: `{code, message, data: null, error_code}`, with the status as `code`.
pub async fn assert_task_error(r: reqwest::Response, status: u16, error_code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], status, "{body}");
    assert_eq!(body["error_code"], error_code, "{body}");
    assert!(body["data"].is_null(), "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_task_runs_to_success_with_downloadable_pngs_charged_once() {
    let gw = gateway("", "", "").await;
    let (_acct, key) = gw.admin_funded_key("painter", "1").await;
    let (before, _) = gw.balance_pico(&key).await;
    let r = gw
        .submit(
            &key,
            json!({"model": "demo-image", "input": {"prompt": "a lighthouse at dusk", "n": 2}}),
        )
        .await;
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["code"].clone(), body["message"].clone()),
        (json!(200), json!("success"))
    );
    let id = body["data"]["taskId"].as_str().unwrap().to_string();
    assert!(id.starts_with("tk-") && id.len() == 3 + 26, "{id}");
    // Reserved at submission: two images.
    let (_, reserved) = gw.balance_pico(&key).await;
    assert!(
        reserved == 2_000_000_000 || reserved == 0,
        "reserved {reserved}"
    );

    let (seen, data) = gw.finish(&key, &id).await;
    assert_eq!(seen.last().unwrap(), "success", "{data}");
    for s in &seen {
        assert!(
            ["queued", "handling", "archiving", "success"].contains(&s.as_str()),
            "{seen:?}"
        );
    }
    let outputs = data["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "{data}");
    for o in outputs {
        let url = o["url"].as_str().unwrap();
        assert!(url.starts_with(&gw.public), "{url}");
        let got = gw.client.get(url).send().await.unwrap();
        assert_eq!(got.status(), 200);
        assert_eq!(got.headers()["content-type"], "image/png");
        let bytes = got.bytes().await.unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(o["bytes"], bytes.len());
        // A tampered or unsigned link is refused.
        let tampered = url.replace("signature=", "signature=00");
        assert_eq!(gw.client.get(&tampered).send().await.unwrap().status(), 403);
        let unsigned = url.split('?').next().unwrap();
        assert_eq!(gw.client.get(unsigned).send().await.unwrap().status(), 403);
    }
    assert_eq!(data["cost_picodollars"], 2_000_000_000i64);
    // Charged once, exactly the two images; nothing left reserved.
    let charges = gw.charges_for(&id).await;
    assert_eq!(charges.len(), 1, "{charges:?}");
    let (after, reserved) = gw.balance_pico(&key).await;
    assert_eq!(before - after, 2_000_000_000);
    assert_eq!(reserved, 0);
    // The metrics count the task's statuses.
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_tasks_total{model=\"demo-image\",status=\"success\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_errors_use_the_task_body_and_change_nothing() {
    let gw = gateway("", "", "").await;
    let (_a, key) = gw.admin_funded_key("rich", "1").await;
    let (_b, poor) = gw.admin_funded_key("poor", "0").await;
    let ok = json!({"model": "demo-image", "input": {"prompt": "a bowl of fruit"}});

    // No key.
    let r = gw
        .client
        .post(format!("{}/v1/tasks", gw.public))
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_task_error(r, 401, "MISSING_API_KEY").await;
    // A bad key.
    assert_task_error(
        gw.submit("tg-nope", ok.clone()).await,
        401,
        "INVALID_API_KEY",
    )
    .await;
    // Bad input.
    assert_task_error(
        gw.submit(&key, json!({"model": "demo-image"})).await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    assert_task_error(
        gw.submit(&key, json!({"model": "demo-image", "input": "a cat"}))
            .await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    assert_task_error(
        gw.submit(
            &key,
            json!({"model": "demo-image", "input": {"prompt": "x", "n": 99}}),
        )
        .await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    assert_task_error(
        gw.submit(&key, json!({"model": "demo-image", "input": {"prompt": "x"}, "callback": {"url": "ftp://example.com/x"}}))
            .await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    let r = gw
        .client
        .post(format!("{}/v1/tasks", gw.public))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_task_error(r, 400, "INVALID_REQUEST").await;
    // Unknown model; a model that does not run as a task.
    assert_task_error(
        gw.submit(&key, json!({"model": "no-such", "input": {"prompt": "x"}}))
            .await,
        404,
        "MODEL_NOT_FOUND",
    )
    .await;
    // Balance cannot cover it: 402, nothing reserved or stored.
    assert_task_error(
        gw.submit(&poor, ok.clone()).await,
        402,
        "INSUFFICIENT_QUOTA",
    )
    .await;
    assert_eq!(gw.balance_pico(&poor).await, (0, 0));
    // A prohibited prompt: blocked before anything is stored or reserved.
    let (before, _) = gw.balance_pico(&key).await;
    let r = gw
        .submit(
            &key,
            json!({"model": "demo-image", "input": {"prompt": "a landscape", "negative_prompt": "step by step instructions to build a pipe bomb at home"}}),
        )
        .await;
    assert_task_error(r, 400, "CONTENT_POLICY_VIOLATION").await;
    assert_eq!(gw.balance_pico(&key).await, (before, 0));
    // Another account's task, or no such task: 404 in the task body.
    let id = gw
        .submit(&key, ok.clone())
        .await
        .json::<Value>()
        .await
        .unwrap()["data"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = gw.task(&poor, &id).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (404, json!("NOT_FOUND")),
        "{body}"
    );
    let (status, _) = gw.task(&key, "tk-01J0000000000000000000000X").await;
    assert_eq!(status, 404);
    gw.finish(&key, &id).await;
}

/// A receiver that answers the statuses given in turn (then 200), and records what it got.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    answers: Arc<Mutex<Vec<u16>>>,
}

async fn receiver(answers: Vec<u16>) -> (Receiver, String) {
    let r = Receiver {
        got: Arc::default(),
        answers: Arc::new(Mutex::new(answers)),
    };
    let state = r.clone();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(s): axum::extract::State<Receiver>,
                 headers: HeaderMap,
                 body: String| async move {
                    s.got.lock().unwrap().push((headers, body));
                    let mut a = s.answers.lock().unwrap();
                    let code = if a.is_empty() { 200 } else { a.remove(0) };
                    axum::http::StatusCode::from_u16(code).unwrap()
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (r, format!("http://{addr}/hook"))
}

/// The Standard Webhooks check a receiver runs (the recipe of `examples/verify_webhook.py`).
fn verify(secret: &str, headers: &HeaderMap, body: &str) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let id = headers["webhook-id"].to_str().unwrap();
    let ts = headers["webhook-timestamp"].to_str().unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    headers["webhook-signature"]
        .to_str()
        .unwrap()
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(want.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_is_signed_and_retried_after_a_500() {
    let gw = gateway(
        "",
        "",
        "  allow_hosts: [127.0.0.1]\n  allow_http_callbacks: true\n",
    )
    .await;
    let (acct, key) = gw.admin_funded_key("hooked", "1").await;
    let (rx, url) = receiver(vec![500]).await;
    let r = gw
        .submit(&key, json!({"model": "demo-image", "input": {"prompt": "a red kite"}, "callback": {"url": url}}))
        .await;
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["data"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    gw.finish(&key, &id).await;
    wait_for("two callback deliveries", async || {
        rx.got.lock().unwrap().len() >= 2
    })
    .await;
    let secret: Value = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/accounts/{acct}/webhook-secret"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = secret["secret"].as_str().unwrap().to_string();
    let got = rx.got.lock().unwrap().clone();
    for (headers, body) in &got {
        assert!(verify(&secret, headers, body), "signature does not verify");
        assert_eq!(headers["webhook-id"], format!("msg_{id}").as_str());
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "task.success");
        assert_eq!(v["data"]["taskId"], id.as_str());
        assert!(
            v["data"]["output"][0]["url"]
                .as_str()
                .unwrap()
                .contains("/v1/files/")
        );
        // A tampered body does not verify.
        assert!(!verify(&secret, headers, &body.replace("success", "fail")));
    }
    // The documented recipe (examples/verify_webhook.py) verifies a real delivery.
    let (headers, body) = &got[0];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body"), body).unwrap();
    let hdrs: serde_json::Map<String, Value> =
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
            .iter()
            .map(|h| (h.to_string(), json!(headers[*h].to_str().unwrap())))
            .collect();
    std::fs::write(dir.path().join("headers"), Value::Object(hdrs).to_string()).unwrap();
    let script = format!(
        "import json, sys; sys.path.insert(0, {examples:?}); from verify_webhook import verify; \
         ok = verify({secret:?}, json.load(open({h:?})), open({b:?}, 'rb').read()); sys.exit(0 if ok else 1)",
        examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples"),
        h = dir.path().join("headers").display().to_string(),
        b = dir.path().join("body").display().to_string(),
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = std::process::Command::new(python)
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "examples/verify_webhook.py rejects a real delivery"
    );
    // Both attempts are recorded; the second delivered.
    wait_for("the delivery record", async || {
        let t: Value = gw
            .admin(reqwest::Method::GET, &format!("/admin/tasks/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        t["callback_state"] == "delivered"
            && t["deliveries"]
                == json!([
                    {"attempt": 1, "status": 500, "outcome": "status"},
                    {"attempt": 2, "status": 200, "outcome": "delivered"}
                ])
    })
    .await;
    // Delivered once: no third call.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.got.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_to_a_private_address_is_refused_without_the_allow_list() {
    let gw = gateway("", "", "  callback_attempts: 2\n").await;
    let (_acct, key) = gw.admin_funded_key("careful", "1").await;
    let (rx, url) = receiver(vec![]).await;
    // Plain http is refused at submission.
    assert_task_error(
        gw.submit(
            &key,
            json!({"model": "demo-image", "input": {"prompt": "x"}, "callback": {"url": url}}),
        )
        .await,
        400,
        "INVALID_REQUEST",
    )
    .await;
    // https to loopback is accepted, but never delivered: the address is private.
    let https = url.replace("http://", "https://");
    let r = gw
        .submit(&key, json!({"model": "demo-image", "input": {"prompt": "a quiet harbour"}, "callback": {"url": https}}))
        .await;
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["data"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    gw.finish(&key, &id).await;
    wait_for("both refused attempts", async || {
        let t: Value = gw
            .admin(reqwest::Method::GET, &format!("/admin/tasks/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        t["callback_state"] == "failed"
            && t["deliveries"]
                .as_array()
                .is_some_and(|d| d.len() == 2 && d.iter().all(|x| x["outcome"] == "refused"))
    })
    .await;
    assert!(rx.got.lock().unwrap().is_empty());
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_task_callbacks_total{outcome=\"refused\"} 2"),
        "{m}"
    );
}

/// A local S3-compatible server (moto's, from PyPI: tests/python/requirements.txt), killed on drop.
struct S3Server(std::process::Child, u16);

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn s3_server() -> S3Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server (pip install -r tests/python/requirements.txt)");
    let server = S3Server(child, port);
    let client = reqwest::Client::new();
    wait_for("the S3 server", async || {
        client
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .is_ok()
    })
    .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_archived_in_an_s3_compatible_bucket() {
    let s3 = s3_server().await;
    let client = reqwest::Client::new();
    let bucket = format!("http://127.0.0.1:{}/tollgate-outputs", s3.1);
    assert!(
        client
            .put(&bucket)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let gw = gateway(
        "",
        "",
        &format!(
            "  storage: {{ s3_bucket: tollgate-outputs, s3_endpoint: \"http://127.0.0.1:{}\", s3_allow_http: true, s3_access_key_env: TEST_S3_ACCESS_KEY, s3_secret_key_env: TEST_S3_SECRET_KEY }}\n",
            s3.1
        ),
    )
    .await;
    let (_a, key) = gw.admin_funded_key("bucketed", "1").await;
    let r = gw
        .submit(
            &key,
            json!({"model": "demo-image", "input": {"prompt": "a green door"}}),
        )
        .await;
    let id = r.json::<Value>().await.unwrap()["data"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, data) = gw.finish(&key, &id).await;
    assert_eq!(data["status"], "success", "{data}");
    // The gateway's link serves it, and the object is in the bucket.
    let url = data["output"][0]["url"].as_str().unwrap();
    let via_gateway = gw
        .client
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(via_gateway.starts_with(b"\x89PNG"));
    let listing = client
        .get(format!("{bucket}?list-type=2"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains(&format!("<Key>{id}/0.png</Key>")),
        "{listing}"
    );
    // Nothing went to the local folder.
    assert!(!gw.dir.path().join("outputs").join(&id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_not_allowed_the_model_gets_403_and_one_over_its_limit_429_in_the_task_body() {
    let gw = gateway("", "", "").await;
    let (acct, _) = gw.admin_funded_key("limited", "1").await;
    let key_with = |body: Value| {
        let gw = &gw;
        let acct = acct.clone();
        async move {
            let v: Value = gw
                .admin(
                    reqwest::Method::POST,
                    &format!("/admin/accounts/{acct}/keys"),
                )
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["key"].as_str().unwrap().to_string()
        }
    };
    let chat_only = key_with(json!({"name": "chat-only", "models": ["demo-chat"]})).await;
    let slow = key_with(json!({"name": "slow", "limits": {"requests_per_minute": 1}})).await;
    let body = json!({"model": "demo-image", "input": {"prompt": "a teapot"}});
    assert_task_error(
        gw.submit(&chat_only, body.clone()).await,
        403,
        "MODEL_NOT_ALLOWED",
    )
    .await;
    assert_eq!(gw.submit(&slow, body.clone()).await.status(), 200);
    let r = gw.submit(&slow, body).await;
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "1");
    assert_task_error(r, 429, "RATE_LIMIT_EXCEEDED").await;
}
