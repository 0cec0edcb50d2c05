//! Test guest: an offline chat provider that counts, in its instance's memory, the requests the
//! instance has built, and answers "served N": what the instance reuse tests read. The last
//! message's text steers it: `panic` (a trap after counting), `grow` (its memory grows past
//! what a reused instance may keep), anything else a plain answer; `stream: true` streams.
use std::cell::Cell;

use tollgate_plugin_sdk::openai;
use tollgate_plugin_sdk::serde_json::{Value, json};
use tollgate_plugin_sdk::*;

const NAME: &str = "tg_tally";
const VERSION: &str = "0.1.0";
const AUTH: AuthScheme = AuthScheme::None;
include!("../../guest_common.rs");

thread_local! {
    static SERVED: Cell<u32> = const { Cell::new(0) };
}

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
        let req: Value = parse_request(&request)?;
        let served = SERVED.with(|s| {
            s.set(s.get() + 1);
            s.get()
        });
        let said = req["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default();
        if said.contains("panic") {
            panic!("tg_tally panics on request");
        }
        if said.contains("grow") {
            // 6 MiB touched, then freed: the memory stays grown.
            let big = vec![1u8; 6 * 1024 * 1024];
            std::hint::black_box(&big);
        }
        let text = format!("served {served}");
        let usage = openai::usage(1, 2);
        let body = if openai::wants_stream(&req) {
            openai::sse_body(&[
                openai::chunk(
                    "t",
                    0,
                    &ctx.model,
                    json!({"role": "assistant", "content": text}),
                    None,
                ),
                openai::chunk("t", 0, &ctx.model, json!({}), Some("stop")),
                openai::usage_chunk("t", 0, &ctx.model, usage),
            ])
        } else {
            openai::completion("t", 0, &ctx.model, &text, "stop", usage)
                .to_string()
                .into_bytes()
        };
        Ok(Outbound::Answer(HttpResponse {
            status: 200,
            headers: Vec::new(),
            body,
        }))
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
