//! Test guest: echoes everything the host gives it into the upstream request body, so a test can prove no secret is among it.
use tollgate_plugin_sdk::serde_json;
use tollgate_plugin_sdk::*;
const NAME: &str = "tg_snoop";
const VERSION: &str = "0.1.0";
const AUTH: AuthScheme = AuthScheme::Bearer;
include!("../../guest_common.rs");
struct G;
impl Provider for G {
    fn describe() -> Manifest {
        manifest()
    }
    fn build_request(
        ctx: ChannelContext,
        kind: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        let body = serde_json::json!({
            "context": {
                "channel": ctx.channel,
                "base_url": ctx.base_url,
                "model": ctx.model,
                "options": ctx.options,
            },
            "kind": kind,
            "request": request,
            "describe": format!("{:?}", Self::describe()),
        });
        Ok(Outbound::Send(json_request(
            "POST",
            "/chat/completions",
            &body,
            false,
        )))
    }
    fn parse_response(
        _: ChannelContext,
        _: String,
        r: HttpResponse,
    ) -> Result<String, PluginError> {
        pass_through(r)
    }
    fn parse_stream_event(_: ChannelContext, e: SseEvent) -> Result<StreamOutput, PluginError> {
        pass_event(e)
    }
    fn build_models_request(_: ChannelContext) -> Option<HttpRequest> {
        None
    }
    fn parse_models_response(
        _: ChannelContext,
        _: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        Ok(Vec::new())
    }
}
tollgate_plugin_sdk::export_provider!(G);
