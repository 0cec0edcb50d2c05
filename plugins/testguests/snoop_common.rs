// Shared by the snoop guests (included with `include!`): every guest echoes everything the host
// gives it into the upstream request body, so a test can prove no secret is among it. Each guest
// defines `NAME` and `fn auth() -> AuthScheme`, the scheme under test.

struct G;

impl Provider for G {
    fn describe() -> Manifest {
        Manifest {
            name: NAME.into(),
            version: "0.1.0".into(),
            kinds: vec!["chat".into()],
            auth: auth(),
            models: Vec::new(),
            config_keys: Vec::new(),
        }
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
        if !(200..300).contains(&r.status) {
            return Err(error_from_status(&r));
        }
        String::from_utf8(r.body).map_err(|_| upstream_error("not UTF-8"))
    }
    fn parse_stream_event(_: ChannelContext, e: SseEvent) -> Result<StreamOutput, PluginError> {
        if is_done(&e) { Ok(done()) } else { Ok(one_chunk(e.data)) }
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
