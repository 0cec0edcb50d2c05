// Shared by the test guests (included with `include!`): a manifest and the calls a guest does
// not misbehave in. Each guest defines `NAME`, `VERSION`, `AUTH` and `build_request`.

fn manifest() -> Manifest {
    Manifest {
        name: NAME.into(),
        version: VERSION.into(),
        kinds: vec!["chat".into()],
        auth: AUTH,
        models: Vec::new(),
        config_keys: Vec::new(),
    }
}

#[allow(dead_code)]
fn pass_through(response: HttpResponse) -> Result<String, PluginError> {
    if !(200..300).contains(&response.status) {
        return Err(error_from_status(&response));
    }
    String::from_utf8(response.body).map_err(|_| upstream_error("not UTF-8"))
}

#[allow(dead_code)]
fn pass_event(event: SseEvent) -> Result<StreamOutput, PluginError> {
    if is_done(&event) { Ok(done()) } else { Ok(one_chunk(event.data)) }
}
