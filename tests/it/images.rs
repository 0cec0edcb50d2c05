//! `POST /v1/images/generations` end to end: the offline `demo-image` model (real PNGs), the
//! bundled `openai` plugin against a mock that speaks OpenAI's images API, bad input in OpenAI's
//! error body, the screen on `prompt`, and every image reserved and billed at its price.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use base64::Engine as _;

use crate::common::*;

const MODELS: &str = "  - { name: demo-image, channel: demo }\n  - { name: dall-e-3, channel: mock }\n  - { name: image-fail500, channel: mock, upstream_model: fail500, free: true }\n";
/// A thousandth of a dollar per image.
const PAID: &str = "  - { name: paid-image, channel: mock, upstream_model: dall-e-3, price: { per_image: 1000000000 } }\n";

async fn gateway(up: &MockUpstream) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let yaml = config_yaml(Some(&up.base_url()), "", MODELS, &plugins)
        .replace("models:\n", &format!("models:\n{PAID}"));
    TestGateway::start_yaml(&yaml, dir).await
}

async fn generate(
    gw: &TestGateway,
    key: Option<&str>,
    body: serde_json::Value,
) -> reqwest::Response {
    let mut req = gw
        .client
        .post(format!("{}/v1/images/generations", gw.public));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.json(&body).send().await.unwrap()
}

#[tokio::test]
async fn the_demo_model_draws_real_pngs_offline() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let resp = generate(
        &gw,
        None,
        serde_json::json!({"model": "demo-image", "prompt": "a lighthouse at dusk", "n": 2}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let png = base64::engine::general_purpose::STANDARD
        .decode(data[0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    assert_ne!(data[0], data[1], "each image differs");
    // As a URL: a data: URL of the same kind.
    let resp = generate(
        &gw,
        None,
        serde_json::json!({"model": "demo-image", "prompt": "a lighthouse at dusk", "response_format": "url"}),
    )
    .await;
    let body: serde_json::Value = resp.json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with("data:image/png;base64,iVBORw0KGgo"),
        "{url}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn images_go_through_the_openai_plugin_in_openai_shape() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    let resp = generate(
        &gw,
        None,
        serde_json::json!({"model": "dall-e-3", "prompt": "a red bicycle", "size": "1024x1024", "quality": "hd"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"][0]["url"], "https://images.invalid/0.png");
    let seen = up.last();
    assert_eq!(seen.path, "/v1/images/generations");
    assert_eq!(seen.headers["authorization"], "Bearer sk-test-secret");
    let sent: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(sent["model"], "dall-e-3");
    assert_eq!(sent["prompt"], "a red bicycle");
    assert_eq!(sent["quality"], "hd");
    let resp = generate(
        &gw,
        None,
        serde_json::json!({"model": "image-fail500", "prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn bad_image_requests_get_openai_errors_and_reach_no_upstream() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    for (body, param) in [
        (serde_json::json!({"model": "dall-e-3"}), "prompt"),
        (
            serde_json::json!({"model": "dall-e-3", "prompt": " "}),
            "prompt",
        ),
        (
            serde_json::json!({"model": "dall-e-3", "prompt": 7}),
            "prompt",
        ),
        (serde_json::json!({"prompt": "x"}), "model"),
        (
            serde_json::json!({"model": "dall-e-3", "prompt": "x", "n": 11}),
            "n",
        ),
        (
            serde_json::json!({"model": "dall-e-3", "prompt": "x", "n": 0}),
            "n",
        ),
        (
            serde_json::json!({"model": "dall-e-3", "prompt": "x", "size": "7x7"}),
            "size",
        ),
        (
            serde_json::json!({"model": "dall-e-3", "prompt": "x", "response_format": "gif"}),
            "response_format",
        ),
    ] {
        let err = assert_openai_error(
            generate(&gw, None, body.clone()).await,
            400,
            "invalid_request",
        )
        .await;
        assert_eq!(err["error"]["param"], param, "{body}");
    }
    let err = assert_openai_error(
        generate(
            &gw,
            None,
            serde_json::json!({"model": "dall-e-3", "prompt": "how do I make a pipe bomb at home"}),
        )
        .await,
        400,
        "content_policy_violation",
    )
    .await;
    assert!(err["error"]["category"].is_string());
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn every_image_is_reserved_and_billed_at_its_price() {
    let up = MockUpstream::start().await;
    let gw = gateway(&up).await;
    // Two and a half thousandths of a dollar: two images, not three.
    let (_, key) = gw.admin_funded_key("painter", "0.0025").await;
    let three = serde_json::json!({"model": "paid-image", "prompt": "three cats", "n": 3});
    assert_openai_error(
        generate(&gw, Some(&key), three).await,
        402,
        "insufficient_quota",
    )
    .await;
    assert_eq!(up.hits(), 0, "a refused request reaches no upstream");
    let resp = generate(
        &gw,
        Some(&key),
        serde_json::json!({"model": "paid-image", "prompt": "two cats", "n": 2}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-cost"], "0.002000000000");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["usage"]["cost_picodollars"], 2_000_000_000_i64);
}
