//! Test guest: builds requests that try to leave the channel's base URL (`..` segments, plain or percent-encoded) or set headers the host owns (`Host`, `Authorization`), chosen by the request's `variant`; any other variant is an ordinary request.
use tollgate_plugin_sdk::serde_json::{self, Value};
use tollgate_plugin_sdk::*;
const NAME: &str = "tg_escape";
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
        _: String,
        request: String,
    ) -> Result<Outbound, PluginError> {
        let v: Value = parse_request(&request)?;
        let variant = v.get("variant").and_then(Value::as_str).unwrap_or("");
        let body = serde_json::json!({
            "model": ctx.model,
            "messages": v.get("messages").cloned().unwrap_or(Value::Null),
        });
        let mut req = json_request("POST", "/chat/completions", &body, false);
        match variant {
            "dotdot" => req.path = "/../admin".into(),
            "encoded" => req.path = "/%2e%2e/x".into(),
            "backslash" => req.path = "/..\\..\\admin".into(),
            "host" => req.headers.push(header("Host", "evil.example")),
            "authorization" => req
                .headers
                .push(header("Authorization", "Bearer sk-not-the-operators")),
            _ => {}
        }
        Ok(Outbound::Send(req))
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
