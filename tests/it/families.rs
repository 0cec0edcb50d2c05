//! OpenAI-compatible families by configuration only: one bundled `openai` plugin serves
//! DeepSeek-, Mistral-, Groq-, Together-, OpenRouter-, vLLM- and Ollama-style channels that
//! differ in base URL (path prefixes `/v1`, `/api/v1`, `/openai/v1`), model names and key (none
//! for a local server). And Azure OpenAI's URL and header shape through the `azure` plugin.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};

use crate::common::*;

/// (channel, path prefix, upstream model id, whether it takes a key), after each provider's
/// documented base URL: `api.deepseek.com/v1`, `api.mistral.ai/v1`, `api.groq.com/openai/v1`,
/// `api.together.xyz/v1`, `openrouter.ai/api/v1`, a vLLM server's `/v1`, Ollama's `/v1`.
const FAMILIES: &[(&str, &str, &str, bool)] = &[
    ("deepseek", "/v1", "deepseek-chat", true),
    ("mistral", "/v1", "mistral-large-latest", true),
    ("groq", "/openai/v1", "llama-3.3-70b-versatile", true),
    (
        "together",
        "/v1",
        "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        true,
    ),
    ("openrouter", "/api/v1", "anthropic/claude-3.5-sonnet", true),
    ("vllm", "/v1", "Qwen/Qwen2.5-7B-Instruct", true),
    ("ollama", "/v1", "llama3.2", false),
];

#[tokio::test]
async fn one_openai_plugin_serves_every_compatible_family_by_configuration() {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let channels: String = FAMILIES
        .iter()
        .map(|(name, prefix, _, keyed)| {
            let key = if *keyed {
                ", api_key_env: MOCK_KEY"
            } else {
                ""
            };
            format!(
                "  - {{ name: {name}, plugin: openai, base_url: \"http://{}{prefix}\"{key} }}\n",
                up.addr
            )
        })
        .collect();
    let models: String = FAMILIES
        .iter()
        .map(|(name, _, model, _)| {
            format!("  - {{ name: {name}-model, channel: {name}, upstream_model: \"{model}\", free: true }}\n")
        })
        .collect();
    let yaml = config_yaml(None, &channels, &models, &plugins);
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    for (name, prefix, model, keyed) in FAMILIES {
        let public = format!("{name}-model");
        let resp = gw.chat(&public, false).await;
        assert_eq!(resp.status(), 200, "{name}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["choices"].is_array(), "{name}: {body}");
        let seen = up.last();
        assert_eq!(seen.path, format!("{prefix}/chat/completions"), "{name}");
        let sent: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
        assert_eq!(sent["model"], *model, "{name}");
        if *keyed {
            assert_eq!(
                seen.headers["authorization"], "Bearer sk-test-secret",
                "{name}"
            );
        } else {
            assert!(!seen.headers.contains_key("authorization"), "{name}");
        }
        // Streamed too, with the usage chunk asked for.
        let resp = gw.chat(&public, true).await;
        assert_eq!(resp.status(), 200, "{name}");
        let text = resp.text().await.unwrap();
        assert_eq!(sse_data(&text).last().unwrap(), "[DONE]", "{name}");
        let sent: serde_json::Value = serde_json::from_str(&up.last().body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true, "{name}");
    }
}

/// An upstream that records every request and answers each with a chat completion.
#[derive(Clone, Default)]
struct Recorder {
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    async fn start() -> (Self, String) {
        let rec = Self::default();
        let seen = rec.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                seen.requests.lock().unwrap().push(Recorded {
                    path: uri.path().to_string(),
                    query: uri.query().map(str::to_string),
                    headers: headers
                        .iter()
                        .map(|(k, v)| {
                            (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                        })
                        .collect(),
                    body: String::from_utf8_lossy(&body).to_string(),
                });
                (
                    [("content-type", "application/json")],
                    fixture("openai/chat.json"),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (rec, format!("http://{addr}"))
    }

    fn last(&self) -> Recorded {
        self.requests.lock().unwrap().last().cloned().unwrap()
    }
}

#[tokio::test]
async fn azure_openai_gets_its_deployment_url_api_version_and_api_key_header() {
    let (up, base) = Recorder::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // One channel names its deployment and version; the other takes each model's upstream id as
    // its deployment, at the default version.
    let channels = format!(
        "  - {{ name: az, plugin: azure, base_url: \"{base}\", api_key_env: MOCK_KEY, options: {{ deployment: prod-gpt4o, api_version: 2025-01-01-preview }} }}\n  - {{ name: az2, plugin: azure, base_url: \"{base}\", api_key_env: MOCK_KEY }}\n"
    );
    let models = "  - { name: azure-gpt, channel: az, upstream_model: gpt-4o, free: true }\n  - { name: azure-mini, channel: az2, upstream_model: my-mini, free: true }\n";
    let yaml = config_yaml(None, &channels, models, &plugins);
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    let resp = gw.chat("azure-gpt", false).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let seen = up.last();
    assert_eq!(seen.path, "/openai/deployments/prod-gpt4o/chat/completions");
    assert_eq!(
        seen.query.as_deref(),
        Some("api-version=2025-01-01-preview")
    );
    assert_eq!(seen.headers["api-key"], "sk-test-secret");
    assert!(!seen.headers.contains_key("authorization"));
    assert!(!seen.body.contains("sk-test-secret"));
    let resp = gw.chat("azure-mini", false).await;
    assert_eq!(resp.status(), 200);
    let seen = up.last();
    assert_eq!(seen.path, "/openai/deployments/my-mini/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
}
