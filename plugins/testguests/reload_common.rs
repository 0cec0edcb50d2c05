// Shared by tg_reload_v1 and tg_reload_v2 (included with `include!`): an offline chat provider
// named `reload` whose answer says which version answered.
use tollgate_plugin_sdk::openai;
use tollgate_plugin_sdk::serde_json::{Value, json};
use tollgate_plugin_sdk::*;

const NAME: &str = "reload";
const AUTH: AuthScheme = AuthScheme::None;
include!("guest_common.rs");

struct G;
impl Provider for G {
    fn describe() -> Manifest {
        manifest()
    }
    fn build_request(ctx: ChannelContext, _: String, request: String) -> Result<Outbound, PluginError> {
        let req: Value = parse_request(&request)?;
        let text = format!("reload v{}", &VERSION[..1]);
        let usage = openai::usage(1, 2);
        let body = if openai::wants_stream(&req) {
            openai::sse_body(&[
                openai::chunk("r", 0, &ctx.model, json!({"role": "assistant", "content": text}), None),
                openai::chunk("r", 0, &ctx.model, json!({}), Some("stop")),
                openai::usage_chunk("r", 0, &ctx.model, usage),
            ])
        } else {
            openai::completion("r", 0, &ctx.model, &text, "stop", usage).to_string().into_bytes()
        };
        Ok(Outbound::Answer(HttpResponse { status: 200, headers: Vec::new(), body }))
    }
    fn parse_response(_: ChannelContext, _: String, r: HttpResponse) -> Result<String, PluginError> {
        pass_through(r)
    }
    fn parse_stream_event(_: ChannelContext, e: SseEvent) -> Result<StreamOutput, PluginError> {
        pass_event(e)
    }
    fn build_models_request(_: ChannelContext) -> Option<HttpRequest> {
        None
    }
    fn parse_models_response(_: ChannelContext, _: HttpResponse) -> Result<Vec<ModelInfo>, PluginError> {
        Ok(Vec::new())
    }
}
tollgate_plugin_sdk::export_provider!(G);
