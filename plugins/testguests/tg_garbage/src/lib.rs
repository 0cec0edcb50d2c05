//! Test guest: returns output the host must refuse (a request that is not HTTP, or a response that is not JSON).
use tollgate_plugin_sdk::serde_json;
use tollgate_plugin_sdk::*;
const NAME: &str = "tg_garbage";
const VERSION: &str = "0.1.0";
const AUTH: AuthScheme = AuthScheme::None;
include!("../../guest_common.rs");
struct G;
impl Provider for G {
    fn describe() -> Manifest {
        manifest()
    }
    fn build_request(
        _: ChannelContext,
        _: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        if request.contains("bad-json") {
            return Ok(Outbound::Send(json_request(
                "POST",
                "/chat/completions",
                &serde_json::json!({"model": "gpt-test", "messages": []}),
                false,
            )));
        }
        Ok(Outbound::Send(HttpRequest {
            method: "NOT A METHOD".into(),
            path: "no-leading-slash".into(),
            headers: vec![header("bad header name", "x")],
            body: Vec::new(),
            stream: false,
        }))
    }
    fn parse_response(
        _: ChannelContext,
        _: String,
        _: HttpResponse,
    ) -> Result<String, PluginError> {
        Ok("this is { not json".into())
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
