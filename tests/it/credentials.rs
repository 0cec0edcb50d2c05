//! Credentials stay host-side for every auth scheme a plugin may declare: bearer, `x-api-key`
//! (Anthropic, ElevenLabs' `xi-api-key` alike), `x-goog-api-key` (Gemini), Azure's `api-key` and
//! a query parameter. For each, a snoop guest declaring that scheme echoes everything the host
//! gave it into the upstream body: the upstream received the secret where the scheme says, and
//! the secret is in nothing the plugin built (body, path, its headers).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

use crate::common::*;

const SECRET: &str = "sk-test-secret";

/// (guest, where the upstream must find the secret: a header name, or `?key` for the query).
const SCHEMES: &[(&str, &str)] = &[
    ("tg_snoop", "authorization"),
    ("tg_snoop_xkey", "x-api-key"),
    ("tg_snoop_goog", "x-goog-api-key"),
    ("tg_snoop_azure", "api-key"),
    ("tg_snoop_query", "?key"),
];

#[tokio::test]
async fn every_auth_scheme_reaches_the_upstream_and_never_the_plugin() {
    let up = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for (g, _) in SCHEMES {
        std::fs::copy(artifact(g), plugins.join(format!("{g}.wasm"))).unwrap();
    }
    let channels: String = SCHEMES
        .iter()
        .map(|(g, _)| {
            format!(
                "  - {{ name: ch-{g}, plugin: {g}, base_url: \"{}\", api_key_env: MOCK_KEY, options: {{ region: eu }} }}\n",
                up.base_url()
            )
        })
        .collect();
    let models: String = SCHEMES
        .iter()
        .map(|(g, _)| {
            format!(
                "  - {{ name: m-{g}, channel: ch-{g}, upstream_model: gpt-test, free: true }}\n"
            )
        })
        .collect();
    let yaml = config_yaml(None, &channels, &models, &plugins);
    let gw = TestGateway::start_yaml(&yaml, dir).await;
    for (g, place) in SCHEMES {
        let resp = gw.chat(&format!("m-{g}"), false).await;
        assert_eq!(resp.status(), 200, "{g}");
        let seen = up.last();
        // The plugin echoed everything it was given: context, request, its own manifest...
        let echoed: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
        assert_eq!(echoed["context"]["model"], "gpt-test", "{g}: {echoed}");
        assert_eq!(echoed["context"]["options"][0][1], "eu", "{g}: {echoed}");
        assert!(
            echoed["request"].as_str().unwrap().contains("Say hello"),
            "{g}"
        );
        // ...and the secret is in none of it.
        assert!(!seen.body.contains(SECRET), "{g}: {}", seen.body);
        assert!(!seen.path.contains(SECRET), "{g}");
        // The upstream got it where the scheme says, and nowhere else.
        let in_headers: Vec<&String> = seen
            .headers
            .iter()
            .filter(|(_, v)| v.contains(SECRET))
            .map(|(k, _)| k)
            .collect();
        if let Some(param) = place.strip_prefix('?') {
            assert_eq!(
                seen.query.as_deref(),
                Some(format!("{param}={SECRET}").as_str()),
                "{g}"
            );
            assert!(in_headers.is_empty(), "{g}: {in_headers:?}");
        } else {
            assert_eq!(in_headers, [place], "{g}");
            let want = if *place == "authorization" {
                format!("Bearer {SECRET}")
            } else {
                SECRET.to_string()
            };
            assert_eq!(seen.headers[*place], want, "{g}");
            assert!(seen.query.is_none(), "{g}");
        }
    }
}
