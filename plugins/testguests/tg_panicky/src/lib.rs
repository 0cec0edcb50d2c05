//! Test guest: `build-request` panics (a trap for the host).
use tollgate_plugin_sdk::*;
const NAME: &str = "tg_panicky";
const VERSION: &str = "0.1.0";
const AUTH: AuthScheme = AuthScheme::None;
include!("../../guest_common.rs");
struct G;
impl Provider for G {
    fn describe() -> Manifest {
        manifest()
    }
    fn build_request(_: ChannelContext, _: String, _: String) -> Result<Outbound, PluginError> {
        panic!("tg_panicky panics on purpose")
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
