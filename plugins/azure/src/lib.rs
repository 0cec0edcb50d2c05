//! The `azure` provider: Azure OpenAI, which speaks OpenAI's API under its own URL and header
//! shape. The translation is the `openai` plugin's (`tollgate_plugin_sdk::openai`); only these
//! differ:
//!
//! - the URL: `POST {base}/openai/deployments/{deployment}/chat/completions?api-version={v}` (and
//!   `/embeddings`, `/images/generations`, `/audio/speech`), where the channel's `base_url` is the
//!   resource's endpoint (`https://{resource}.openai.azure.com`);
//! - the credential: the `api-key` header (the manifest's auth scheme; the host adds it).
//!
//! Channel options: `deployment` (default: the model's upstream id, so each model may name its
//! deployment as `upstream_model`) and `api_version` (default [`DEFAULT_API_VERSION`]).

use tollgate_plugin_sdk::*;

struct Azure;

/// A generally available data-plane API version of Azure OpenAI.
const DEFAULT_API_VERSION: &str = "2024-10-21";

/// An API version as Azure writes them (`2024-10-21`, `2025-01-01-preview`).
fn is_api_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
}

/// The path under the resource's endpoint for a kind.
fn path(ctx: &ChannelContext, kind: &str) -> Result<String, PluginError> {
    let Some(tail) = openai::path_of(kind) else {
        return Err(invalid_request(format!(
            "the azure plugin does not do `{kind}`"
        )));
    };
    let deployment = option(ctx, "deployment").unwrap_or(&ctx.model);
    // The deployment goes into the path: a plain name only.
    if !is_plain_id(deployment) {
        return Err(invalid_request(
            "the channel's Azure deployment name must be letters, digits, `-`, `_` or `.`",
        ));
    }
    let version = option(ctx, "api_version").unwrap_or(DEFAULT_API_VERSION);
    if !is_api_version(version) {
        return Err(invalid_request(
            "the channel's `api_version` must be letters, digits, `-` or `.`",
        ));
    }
    Ok(format!(
        "/openai/deployments/{deployment}{tail}?api-version={version}"
    ))
}

impl Provider for Azure {
    fn describe() -> Manifest {
        Manifest {
            name: "azure".into(),
            version: "0.1.0".into(),
            kinds: vec![
                "chat".into(),
                "embedding".into(),
                "image".into(),
                "speech".into(),
            ],
            auth: AuthScheme::CustomHeader("api-key".into()),
            // Deployments are the operator's: prices come from config.
            models: Vec::new(),
            config_keys: vec!["deployment".into(), "api_version".into()],
        }
    }

    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        let path = path(&ctx, &kind)?;
        Ok(Outbound::Send(openai::request(
            &ctx, &kind, &request, &path,
        )?))
    }

    fn parse_response(
        _ctx: ChannelContext,
        kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        openai::response(&kind, response)
    }

    fn parse_stream_event(
        _ctx: ChannelContext,
        event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        openai::stream_event(&event)
    }

    fn build_models_request(_ctx: ChannelContext) -> Option<HttpRequest> {
        None
    }

    fn parse_models_response(
        _ctx: ChannelContext,
        _response: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        Ok(Vec::new())
    }
}

tollgate_plugin_sdk::export_provider!(Azure);

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(options: &[(&str, &str)]) -> ChannelContext {
        ChannelContext {
            channel: "az".into(),
            base_url: "https://r.openai.azure.com".into(),
            model: "gpt-4o-prod".into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_deployment_and_version_make_the_path() {
        assert_eq!(
            path(&ctx(&[]), "chat").unwrap(),
            "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            path(
                &ctx(&[("deployment", "tts"), ("api_version", "2025-03-01-preview")]),
                "speech"
            )
            .unwrap(),
            "/openai/deployments/tts/audio/speech?api-version=2025-03-01-preview"
        );
        assert!(path(&ctx(&[("deployment", "../x")]), "chat").is_err());
        assert!(path(&ctx(&[("api_version", "1&key=x")]), "chat").is_err());
        assert!(path(&ctx(&[]), "video").is_err());
    }
}
