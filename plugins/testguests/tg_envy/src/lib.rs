//! Test guest: reaches for the environment and the file system (under the host, both trap: no WASI).
use tollgate_plugin_sdk::serde_json;
use tollgate_plugin_sdk::*;
const NAME: &str = "tg_envy";
const VERSION: &str = "0.1.0";
const AUTH: AuthScheme = AuthScheme::None;
include!("../../guest_common.rs");
struct G;
impl Provider for G {
    fn describe() -> Manifest {
        manifest()
    }
    fn build_request(_: ChannelContext, _: String, _: String) -> Result<Outbound, PluginError> {
        #[allow(
            clippy::disallowed_methods,
            reason = "this guest exists to prove the environment is out of reach"
        )]
        let home = std::env::var("HOME").unwrap_or_default();
        let passwd = std::fs::read("/etc/passwd").unwrap_or_default();
        let body = serde_json::json!({"home": home, "passwd": String::from_utf8_lossy(&passwd)});
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
