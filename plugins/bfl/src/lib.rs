//! The `bfl` provider: Black Forest Labs' FLUX API, as a task provider (images). Every
//! generation is asynchronous: a submission answers with a task id, then the result is polled.
//!
//! Wire format (BFL's API reference; the key travels in the `x-key` header, added by the host
//! from the manifest's auth scheme, never by this plugin):
//! - `POST {base}/{model}` (e.g. `/flux-pro-1.1`, `/flux-kontext-pro`) with the model's inputs
//!   as the JSON body: `prompt`, `width`/`height` or `aspect_ratio`, `seed`, `output_format`,
//!   `safety_tolerance`, `input_image`, ... The task's `input` object is that body, as the client
//!   sent it, less `webhook_url` and `webhook_secret` (the gateway polls; callbacks are its own).
//! - The answer: `{id, polling_url, cost?, input_mp?, output_mp?}`.
//! - `GET {base}/get_result?id={id}` answers `{id, status, result, progress, details?}` with
//!   `status` one of `Pending`, `Ready` (`result.sample` is a signed URL of the image, valid
//!   for 10 minutes), `Request Moderated` (the input was flagged), `Content Moderated` (the
//!   output was), `Error` (also `Failed`), `Task not found` (unknown or expired id).
//! - Errors: 400 and 422 (invalid body, FastAPI's `{"detail": ...}`), 402 (the account's credits),
//!   403 (the key), 429 (too many active tasks), 500, 503.
//!
//! Base URL: BFL asks clients of its global (`api.bfl.ai`) and multi-cluster regional endpoints
//! to poll the `polling_url` the submission returns, which may name another host (a cluster);
//! the host sends a channel's requests to its base URL's host only, so this plugin polls
//! `get_result` under the base URL. Configure a channel with a single-cluster endpoint
//! (`https://api.us1.bfl.ai/v1` or `https://api.eu1.bfl.ai/v1`), where the task is polled on the
//! host that took it.

use tollgate_plugin_sdk::serde_json::Value;
use tollgate_plugin_sdk::*;

struct Bfl;

/// Models known without asking the upstream, and their price per image in pico-dollars
/// (`$1 = 1_000_000_000_000`; 1 BFL credit is $0.01).
#[rustfmt::skip]
const MODELS: &[(&str, u64)] = &[
    // "$0.04 per image" (docs.bfl.ai, FLUX1.1 [pro]).
    ("flux-pro-1.1",       40_000_000_000),
    // BFL's own model table (its API skill's "Model Endpoints & Pricing"); to be checked
    // against bfl.ai/pricing.
    ("flux-pro-1.1-ultra", 60_000_000_000),
    ("flux-kontext-pro",   40_000_000_000),
    ("flux-kontext-max",   80_000_000_000),
];

/// Keys of the input the gateway keeps to itself: BFL would call the client's webhook.
const WITHHELD: &[&str] = &["webhook_url", "webhook_secret"];

fn model_info(&(id, per_image): &(&str, u64)) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec!["image".into()],
        context_window: None,
        max_output_tokens: None,
        price: Some(ModelPrice {
            input_per_token: 0,
            output_per_token: 0,
            per_image,
            per_second: 0,
            per_request: 0,
        }),
    }
}

/// A non-2xx answer: the SDK's classes with FastAPI's `detail`; 402 (the account's credits) is
/// the operator's problem, and a refusal of the content at submission is content-refused.
fn http_error(resp: &HttpResponse) -> PluginError {
    let mut e = error_from_status(resp);
    match resp.status {
        402 => e.class = ErrorClass::Auth,
        400 | 422 if e.message.to_ascii_lowercase().contains("moderat") => {
            e.class = ErrorClass::ContentRefused;
        }
        _ => {}
    }
    e
}

/// `progress` as BFL reports it (a number, or null) in percent: a fraction of 1 when at most 1,
/// else percent already.
fn percent(progress: &Value) -> Option<u8> {
    let p = progress.as_f64()?;
    let p = if p <= 1.0 { p * 100.0 } else { p };
    Some(p.clamp(0.0, 100.0).round() as u8)
}

/// Why a finished task has no image, for the log: its status and BFL's `details`, if any.
fn reason(status: &str, body: &Value) -> String {
    match body.get("details").filter(|d| !d.is_null()) {
        Some(details) => {
            let details: String = details.to_string().chars().take(300).collect();
            format!("{status}: {details}")
        }
        None => status.to_string(),
    }
}

/// A `get_result` answer's state.
fn state(body: &Value) -> Result<JobState, PluginError> {
    let status = body
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| upstream_error("the result has no `status`"))?;
    Ok(match status {
        "Pending" => job_running(body.get("progress").and_then(percent)),
        "Ready" => job_succeeded(output_urls(
            body.get("result")
                .and_then(|r| r.get("sample"))
                .unwrap_or(&Value::Null),
        )),
        "Request Moderated" | "Content Moderated" => {
            job_failed(ErrorClass::ContentRefused, reason(status, body))
        }
        "Error" | "Failed" => job_failed(ErrorClass::Upstream, reason(status, body)),
        "Task not found" => job_failed(
            ErrorClass::NotFound,
            "the task does not exist or has expired",
        ),
        other => {
            let shown: String = other.chars().take(40).collect();
            return Err(upstream_error(format!("unknown task status `{shown}`")));
        }
    })
}

impl Provider for Bfl {
    fn describe() -> Manifest {
        Manifest {
            name: "bfl".into(),
            version: "0.1.0".into(),
            // Nothing is translated synchronously: images run as tasks.
            kinds: Vec::new(),
            auth: AuthScheme::CustomHeader("x-key".into()),
            models: MODELS.iter().map(model_info).collect(),
            config_keys: Vec::new(),
        }
    }

    fn build_request(
        _ctx: ChannelContext,
        kind: String,
        _request: String,
    ) -> Result<Outbound, PluginError> {
        Err(invalid_request(format!(
            "the bfl provider runs `{kind}` requests as tasks only"
        )))
    }

    fn parse_response(
        _ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<String, PluginError> {
        Err(http_error(&response))
    }

    fn parse_stream_event(
        _ctx: ChannelContext,
        _event: SseEvent,
    ) -> Result<StreamOutput, PluginError> {
        Err(upstream_error("the bfl provider does not stream"))
    }

    fn build_models_request(_ctx: ChannelContext) -> Option<HttpRequest> {
        None
    }

    fn parse_models_response(
        _ctx: ChannelContext,
        _response: HttpResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        Ok(Self::describe().models)
    }
}

impl Tasks for Bfl {
    fn build_submit(
        ctx: ChannelContext,
        kind: String,
        input: String,
    ) -> Result<Outbound, PluginError> {
        if kind != "image" {
            return Err(invalid_request(format!(
                "the bfl provider has no `{kind}` tasks"
            )));
        }
        if !is_plain_id(&ctx.model) {
            return Err(upstream_error(format!(
                "the channel's model id `{}` is not a FLUX endpoint name",
                ctx.model
            )));
        }
        let mut input: Value = parse_request(&input)?;
        let Some(fields) = input.as_object_mut() else {
            return Err(invalid_request("`input` must be an object"));
        };
        for key in WITHHELD {
            fields.remove(*key);
        }
        Ok(Outbound::Send(json_request(
            "POST",
            &format!("/{}", ctx.model),
            &input,
            false,
        )))
    }

    fn parse_submit(
        _ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<Submitted, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(http_error(&response));
        }
        let body: Value = parse_upstream(&response.body)?;
        let job_id = body
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| upstream_error("the submission's answer has no `id`"))?;
        if !is_plain_id(job_id) {
            return Err(bad_job_id(job_id));
        }
        Ok(Submitted {
            job_id: job_id.to_string(),
            state: job_running(None),
        })
    }

    fn build_poll(_ctx: ChannelContext, job_id: String) -> Result<Outbound, PluginError> {
        if !is_plain_id(&job_id) {
            return Err(bad_job_id(&job_id));
        }
        Ok(Outbound::Send(get_request(&format!(
            "/get_result?id={job_id}"
        ))))
    }

    fn parse_poll(
        _ctx: ChannelContext,
        _job_id: String,
        response: HttpResponse,
    ) -> Result<JobState, PluginError> {
        let body: Option<Value> = serde_json::from_slice(&response.body).ok();
        if !(200..300).contains(&response.status) {
            // An unknown task may come as a 404 carrying the status: the task is gone for good.
            let gone = body
                .as_ref()
                .and_then(|b| b.get("status"))
                .is_some_and(|s| s == "Task not found");
            if response.status == 404 && gone {
                return Ok(job_failed(
                    ErrorClass::NotFound,
                    "the task does not exist or has expired",
                ));
            }
            return Err(http_error(&response));
        }
        state(&body.ok_or_else(|| upstream_error("malformed upstream response"))?)
    }
}

tollgate_plugin_sdk::export_provider!(Bfl);
tollgate_plugin_sdk::export_tasks!(Bfl);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_plugin_sdk::serde_json::json;

    const ID: &str = "2fa25140-591f-4839-b377-9945a7a3881a";

    /// A submission's answer, as BFL documents it.
    fn submitted_answer(id: &str, base: &str) -> Value {
        json!({"id": id, "polling_url": format!("{base}/get_result?id={id}"),
               "cost": 4.0, "input_mp": 0.0, "output_mp": 1.05})
    }

    fn ctx(model: &str) -> ChannelContext {
        ChannelContext {
            channel: "bfl".into(),
            base_url: "https://api.us1.bfl.ai/v1".into(),
            model: model.into(),
            options: Vec::new(),
        }
    }

    fn sent(out: Outbound) -> HttpRequest {
        match out {
            Outbound::Send(req) => req,
            Outbound::Answer(_) => panic!("expected a request to send"),
        }
    }

    fn resp(status: u16, headers: Vec<Header>, body: Value) -> HttpResponse {
        HttpResponse {
            status,
            headers,
            body: body.to_string().into_bytes(),
        }
    }

    fn poll(body: Value) -> Result<JobState, PluginError> {
        Bfl::parse_poll(ctx("flux-pro-1.1"), ID.into(), resp(200, vec![], body))
    }

    fn failure(state: JobState) -> PluginError {
        match state {
            JobState::Failed(e) => e,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn the_manifest_declares_the_key_header_and_priced_models() {
        let m = Bfl::describe();
        assert_eq!(m.name, "bfl");
        assert!(m.kinds.is_empty(), "tasks only");
        assert!(matches!(&m.auth, AuthScheme::CustomHeader(h) if h == "x-key"));
        let pro = m.models.iter().find(|m| m.id == "flux-pro-1.1").unwrap();
        assert_eq!(pro.price.unwrap().per_image, 40_000_000_000, "$0.04");
        assert!(
            m.models
                .iter()
                .all(|m| m.price.is_some() && m.kinds == ["image"])
        );
    }

    #[test]
    fn a_submission_posts_the_input_to_the_model_endpoint() {
        let input = json!({
            "prompt": "a lighthouse at dusk", "width": 1024, "height": 768, "seed": 42,
            "webhook_url": "https://client.example/hook", "webhook_secret": "s"
        });
        let req = sent(
            Bfl::build_submit(ctx("flux-pro-1.1"), "image".into(), input.to_string()).unwrap(),
        );
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/flux-pro-1.1")
        );
        assert_eq!(
            header_value(&req.headers, "content-type"),
            Some("application/json")
        );
        assert_eq!(
            header_value(&req.headers, "accept"),
            Some("application/json")
        );
        assert!(header_value(&req.headers, "x-key").is_none());
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            body,
            json!({"prompt": "a lighthouse at dusk", "width": 1024, "height": 768, "seed": 42}),
            "the webhook is withheld"
        );
        let req = sent(
            Bfl::build_submit(
                ctx("flux-kontext-pro"),
                "image".into(),
                r#"{"prompt":"x","aspect_ratio":"16:9"}"#.into(),
            )
            .unwrap(),
        );
        assert_eq!(req.path, "/flux-kontext-pro");
    }

    #[test]
    fn unusable_models_kinds_and_inputs_are_refused() {
        for model in ["", "..", "v1/flux", "flux pro", "flux?x=1"] {
            let e = Bfl::build_submit(ctx(model), "image".into(), "{}".into()).unwrap_err();
            assert_eq!(
                e.class,
                ErrorClass::Upstream,
                "{model:?}: the operator's config"
            );
        }
        let e = Bfl::build_submit(ctx("flux-pro-1.1"), "video".into(), "{}".into()).unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidRequest);
        for input in ["[]", "3", "{"] {
            let e =
                Bfl::build_submit(ctx("flux-pro-1.1"), "image".into(), input.into()).unwrap_err();
            assert_eq!(e.class, ErrorClass::InvalidRequest, "{input}");
        }
    }

    #[test]
    fn the_submission_gives_the_task_id() {
        let sub = Bfl::parse_submit(
            ctx("flux-pro-1.1"),
            "image".into(),
            resp(
                200,
                vec![],
                submitted_answer(ID, "https://api.us1.bfl.ai/v1"),
            ),
        )
        .unwrap();
        assert_eq!(sub.job_id, ID);
        assert!(matches!(sub.state, JobState::Running(None)));
        for body in [json!({"polling_url": "x"}), json!({"id": "a/../b"})] {
            let e = Bfl::parse_submit(ctx("flux-pro-1.1"), "image".into(), resp(200, vec![], body))
                .unwrap_err();
            assert_eq!(e.class, ErrorClass::Upstream);
        }
    }

    #[test]
    fn the_poll_gets_the_result_by_id() {
        let req = sent(Bfl::build_poll(ctx("flux-pro-1.1"), ID.into()).unwrap());
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, format!("/get_result?id={ID}"));
        let e = Bfl::build_poll(ctx("flux-pro-1.1"), "x&id=y".into()).unwrap_err();
        assert_eq!(e.class, ErrorClass::Upstream);
    }

    #[test]
    fn pending_reports_progress() {
        let pending = |progress: Value| {
            poll(json!({"id": ID, "status": "Pending", "result": null, "progress": progress}))
                .unwrap()
        };
        assert!(matches!(pending(Value::Null), JobState::Running(None)));
        assert!(matches!(pending(json!(0.42)), JobState::Running(Some(42))));
        assert!(matches!(pending(json!(1.0)), JobState::Running(Some(100))));
        assert!(matches!(pending(json!(63)), JobState::Running(Some(63))));
        assert!(matches!(pending(json!(250)), JobState::Running(Some(100))));
    }

    #[test]
    fn ready_gives_the_sample() {
        let body = json!({
            "id": ID, "status": "Ready", "progress": null,
            "result": {"sample": "https://delivery-us1.bfl.ai/results/ab/cd/sample.jpeg?se=x&sig=y",
                       "prompt": "a lighthouse at dusk", "seed": 42,
                       "start_time": 1_741_760_930.183, "end_time": 1_741_760_934.112, "duration": 3.929}
        });
        let JobState::Succeeded(outs) = poll(body).unwrap() else {
            panic!("expected success");
        };
        assert_eq!(outs.len(), 1);
        assert!(
            outs[0]
                .url
                .starts_with("https://delivery-us1.bfl.ai/results/")
        );
        let e = failure(poll(json!({"id": ID, "status": "Ready", "result": {}})).unwrap());
        assert_eq!(e.class, ErrorClass::Upstream, "ready without a sample");
    }

    #[test]
    fn moderated_errors_and_lost_tasks_are_failures() {
        for status in ["Request Moderated", "Content Moderated"] {
            let e = failure(
                poll(json!({"id": ID, "status": status, "result": null,
                            "details": {"Moderation Reasons": ["Derivative Works Filter"]}}))
                .unwrap(),
            );
            assert_eq!(e.class, ErrorClass::ContentRefused, "{status}");
            assert!(e.message.contains("Derivative Works Filter"));
        }
        for status in ["Error", "Failed"] {
            let e = failure(poll(json!({"id": ID, "status": status, "result": null})).unwrap());
            assert_eq!(e.class, ErrorClass::Upstream, "{status}");
        }
        let lost = json!({"id": ID, "status": "Task not found", "result": null});
        assert_eq!(
            failure(poll(lost.clone()).unwrap()).class,
            ErrorClass::NotFound
        );
        let e = failure(
            Bfl::parse_poll(ctx("flux-pro-1.1"), ID.into(), resp(404, vec![], lost)).unwrap(),
        );
        assert_eq!(e.class, ErrorClass::NotFound, "also as a 404");
        assert_eq!(
            poll(json!({"id": ID, "status": "Dreaming"}))
                .unwrap_err()
                .class,
            ErrorClass::Upstream
        );
        assert_eq!(
            poll(json!({"id": ID})).unwrap_err().class,
            ErrorClass::Upstream
        );
    }

    #[test]
    fn http_errors_map_to_classes() {
        let submit_error = |status: u16, headers: Vec<Header>, body: Value| {
            Bfl::parse_submit(
                ctx("flux-pro-1.1"),
                "image".into(),
                resp(status, headers, body),
            )
            .unwrap_err()
        };
        assert_eq!(
            submit_error(
                403,
                vec![],
                json!({"detail": "Not authenticated - Invalid Authentication"})
            )
            .class,
            ErrorClass::Auth
        );
        assert_eq!(
            submit_error(401, vec![], json!({"detail": "Not authenticated"})).class,
            ErrorClass::Auth
        );
        assert_eq!(
            submit_error(402, vec![], json!({"detail": "Insufficient credits"})).class,
            ErrorClass::Auth,
            "the account's credits are the operator's problem"
        );
        let e = submit_error(
            429,
            vec![header("Retry-After", "5")],
            json!({"detail": "You have exceeded the number of active tasks"}),
        );
        assert_eq!(
            (e.class, e.retry_after_ms),
            (ErrorClass::RateLimited, Some(5000))
        );
        let e = submit_error(
            422,
            vec![],
            json!({"detail": [{"loc": ["body", "width"], "msg": "Input should be less than or equal to 1440", "type": "less_than_equal"}]}),
        );
        assert_eq!(e.class, ErrorClass::InvalidRequest);
        assert_eq!(
            e.message,
            "body.width: Input should be less than or equal to 1440"
        );
        assert_eq!(
            submit_error(400, vec![], json!({"detail": "Request Moderated"})).class,
            ErrorClass::ContentRefused
        );
        for status in [500, 503] {
            assert_eq!(
                submit_error(status, vec![], json!({})).class,
                ErrorClass::Upstream
            );
        }
        let e = Bfl::parse_poll(ctx("flux-pro-1.1"), ID.into(), resp(503, vec![], json!({})))
            .unwrap_err();
        assert_eq!((e.class, e.status), (ErrorClass::Upstream, Some(503)));
    }
}
