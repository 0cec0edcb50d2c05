//! The `replicate` provider: Replicate's predictions API, as a task provider (images, video,
//! music). Replicate runs a model as a *prediction* that is created, then polled.
//!
//! Wire format (Replicate's HTTP API reference; base URL `https://api.replicate.com/v1`; the key
//! travels as `Authorization: Bearer`, added by the host, never by this plugin):
//! - An official model `owner/name` runs with `POST {base}/models/{owner}/{name}/predictions`
//!   and the body `{"input": {...}}`; a model version runs with `POST {base}/predictions` and
//!   `{"version": "<id>", "input": {...}}` (the channel's model id `owner/name:<version id>`,
//!   or the bare version id). The task's `input` object is the model's input, as the client
//!   sent it.
//! - The answer (201) and `GET {base}/predictions/{id}` are a prediction: `{id, model, version,
//!   input, status, output, error, logs, metrics, urls: {get, cancel, ...}, created_at, ...}`
//!   with `status` one of `starting`, `processing`, `succeeded`, `failed`, `canceled`, and
//!   `aborted` (a deadline passed before it started). Files in `output` are URLs: a string, a
//!   list, or inside an object, depending on the model.
//! - Progress: Replicate reports none; its clients read the last progress bar (`NN%|...| a/b`)
//!   in `logs`, and so does this plugin.
//! - Errors are problem details, `{"title", "detail", "status"}`: 401 (no or bad token), 402
//!   (the account's credit), 404, 422 (invalid input), 429 (`{"detail": "Request was throttled.
//!   Expected available in 1 second."}`); a failed prediction's `error` says why, e.g. that
//!   NSFW content was detected or that the output was flagged as sensitive.

use tollgate_plugin_sdk::serde_json::{Value, json};
use tollgate_plugin_sdk::*;

struct Replicate;

/// Kinds of task this plugin submits (every model's output is files).
const KINDS: &[&str] = &["image", "video", "music"];

/// Models known without asking the upstream: id, kind, and prices in pico-dollars
/// (`$1 = 1_000_000_000_000`): per image, per request.
#[rustfmt::skip]
const MODELS: &[(&str, &str, u64, u64)] = &[
    // "$3 per thousand output images" (replicate.com/black-forest-labs/flux-schnell, pricing).
    ("black-forest-labs/flux-schnell", "image",  3_000_000_000, 0),
    // "$0.055 per image" (replicate.com/black-forest-labs/flux-pro).
    ("black-forest-labs/flux-pro",     "image", 55_000_000_000, 0),
    // $0.04 per image: from third-party listings of Replicate's prices; to be checked.
    ("black-forest-labs/flux-1.1-pro", "image", 40_000_000_000, 0),
    // EXAMPLE prices per request, from third-party listings, to be checked against the model's
    // pricing section before use: $0.50 a video, $0.03 a song.
    ("minimax/video-01",               "video", 0, 500_000_000_000),
    ("minimax/music-1.5",              "music", 0,  30_000_000_000),
];

fn model_info(&(id, kind, per_image, per_request): &(&str, &str, u64, u64)) -> ModelInfo {
    ModelInfo {
        id: id.into(),
        kinds: vec![kind.into()],
        context_window: None,
        max_output_tokens: None,
        price: Some(ModelPrice {
            input_per_token: 0,
            output_per_token: 0,
            per_image,
            per_second: 0,
            per_request,
        }),
    }
}

/// What the channel's model id names: an official model, or a version of one.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Model { owner: &'a str, name: &'a str },
    Version(&'a str),
}

fn target(model: &str) -> Result<Target<'_>, PluginError> {
    let unusable = || {
        upstream_error(format!(
            "the channel's model id `{model}` is not `owner/name`, `owner/name:version` or a version id"
        ))
    };
    if let Some((_, version)) = model.split_once(':') {
        return if is_version(version) {
            Ok(Target::Version(version))
        } else {
            Err(unusable())
        };
    }
    match model.split_once('/') {
        Some((owner, name)) if is_plain_id(owner) && is_plain_id(name) => {
            Ok(Target::Model { owner, name })
        }
        None if is_version(model) => Ok(Target::Version(model)),
        _ => Err(unusable()),
    }
}

/// A version id: 64 hexadecimal digits.
fn is_version(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Words of a failed prediction's `error` that say the content was refused (safety checkers,
/// moderation): "NSFW content detected", "flagged as sensitive", ...
fn refused(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    [
        "nsfw",
        "sensitive",
        "flagged",
        "safety",
        "content policy",
        "moderat",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// A non-2xx answer: the SDK's classes, with Replicate's `detail`; 402 (the account's credit) is
/// the operator's problem, and a 429 without `Retry-After` gets the wait its `detail` names.
fn http_error(resp: &HttpResponse) -> PluginError {
    let mut e = error_from_status(resp);
    match resp.status {
        402 => e.class = ErrorClass::Auth,
        400 | 422 if refused(&e.message) => e.class = ErrorClass::ContentRefused,
        429 if e.retry_after_ms.is_none() => e.retry_after_ms = retry_hint_ms(&e.message),
        _ => {}
    }
    e
}

/// The wait a throttling `detail` names: "... available in 1 second.", "... resets in ~30s.".
fn retry_hint_ms(detail: &str) -> Option<u64> {
    detail.match_indices(" in ").find_map(|(at, _)| {
        let rest = detail[at + 4..].trim_start_matches('~');
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: u64 = rest[..digits].parse().ok()?;
        let unit = rest[digits..].trim_start();
        if unit.starts_with("ms") {
            Some(n)
        } else if unit.starts_with('s') {
            Some(n.saturating_mul(1000))
        } else if unit.starts_with("min") {
            Some(n.saturating_mul(60_000))
        } else {
            None
        }
    })
}

/// Progress from the last progress bar in the logs, as Replicate's clients read it: a line
/// `NN%|<bar>| current/total ...` (tqdm's format).
fn progress(logs: &str) -> Option<u8> {
    logs.split(['\n', '\r']).rev().find_map(progress_bar)
}

fn progress_bar(line: &str) -> Option<u8> {
    let line = line.trim();
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    let percent: u16 = line.get(..digits).filter(|d| d.len() <= 3)?.parse().ok()?;
    let rest = line[digits..].strip_prefix('%')?.trim_start();
    let (bar, rest) = rest.strip_prefix('|')?.split_once('|')?;
    if bar.is_empty() {
        return None;
    }
    let (current, total) = rest.trim_start().split_once('/')?;
    let total_digits = total.bytes().take_while(u8::is_ascii_digit).count();
    if current.is_empty() || !current.bytes().all(|b| b.is_ascii_digit()) || total_digits == 0 {
        return None;
    }
    Some(percent.min(100) as u8)
}

/// A prediction's state.
fn state(prediction: &Value) -> Result<JobState, PluginError> {
    let status = prediction.get("status").and_then(Value::as_str);
    Ok(match status {
        Some("starting") => job_running(None),
        Some("processing") => job_running(
            prediction
                .get("logs")
                .and_then(Value::as_str)
                .and_then(progress),
        ),
        Some("succeeded") => job_succeeded(output_urls(
            prediction.get("output").unwrap_or(&Value::Null),
        )),
        Some("failed") => {
            let message = match prediction.get("error") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                None | Some(Value::Null) => "the prediction failed".to_string(),
                Some(other) => other.to_string(),
            };
            let class = if refused(&message) {
                ErrorClass::ContentRefused
            } else {
                ErrorClass::Upstream
            };
            job_failed(class, message)
        }
        Some("canceled") => job_failed(ErrorClass::Upstream, "the prediction was canceled"),
        Some("aborted") => job_failed(
            ErrorClass::Upstream,
            "the prediction was aborted: its deadline passed before it started",
        ),
        other => {
            return Err(upstream_error(format!(
                "unknown prediction status {other:?}"
            )));
        }
    })
}

impl Provider for Replicate {
    fn describe() -> Manifest {
        Manifest {
            name: "replicate".into(),
            version: "0.1.0".into(),
            // Nothing is translated synchronously: every kind runs as a task (the models say
            // what they produce).
            kinds: Vec::new(),
            auth: AuthScheme::Bearer,
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
            "the replicate provider runs `{kind}` requests as tasks only"
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
        Err(upstream_error("the replicate provider does not stream"))
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

impl Tasks for Replicate {
    fn build_submit(
        ctx: ChannelContext,
        kind: String,
        input: String,
    ) -> Result<Outbound, PluginError> {
        if !KINDS.contains(&kind.as_str()) {
            return Err(invalid_request(format!(
                "the replicate provider has no `{kind}` tasks"
            )));
        }
        let input: Value = parse_request(&input)?;
        if !input.is_object() {
            return Err(invalid_request("`input` must be an object"));
        }
        let req = match target(&ctx.model)? {
            Target::Model { owner, name } => json_request(
                "POST",
                &format!("/models/{owner}/{name}/predictions"),
                &json!({"input": input}),
                false,
            ),
            Target::Version(version) => json_request(
                "POST",
                "/predictions",
                &json!({"version": version, "input": input}),
                false,
            ),
        };
        Ok(Outbound::Send(req))
    }

    fn parse_submit(
        _ctx: ChannelContext,
        _kind: String,
        response: HttpResponse,
    ) -> Result<Submitted, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(http_error(&response));
        }
        let prediction: Value = parse_upstream(&response.body)?;
        let job_id = prediction
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| upstream_error("the prediction has no `id`"))?;
        if !is_plain_id(job_id) {
            return Err(bad_job_id(job_id));
        }
        Ok(Submitted {
            job_id: job_id.to_string(),
            state: state(&prediction)?,
        })
    }

    fn build_poll(_ctx: ChannelContext, job_id: String) -> Result<Outbound, PluginError> {
        if !is_plain_id(&job_id) {
            return Err(bad_job_id(&job_id));
        }
        Ok(Outbound::Send(get_request(&format!(
            "/predictions/{job_id}"
        ))))
    }

    fn parse_poll(
        _ctx: ChannelContext,
        _job_id: String,
        response: HttpResponse,
    ) -> Result<JobState, PluginError> {
        if !(200..300).contains(&response.status) {
            return Err(http_error(&response));
        }
        state(&parse_upstream(&response.body)?)
    }
}

tollgate_plugin_sdk::export_provider!(Replicate);
tollgate_plugin_sdk::export_tasks!(Replicate);

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(model: &str) -> ChannelContext {
        ChannelContext {
            channel: "replicate".into(),
            base_url: "https://api.replicate.com/v1".into(),
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

    fn prediction(status: &str, extra: Value) -> Value {
        let mut p = json!({
            "id": "gm3qorzdhgbfurvjtvhg6dckhu",
            "model": "black-forest-labs/flux-schnell",
            "version": "hidden",
            "input": {"prompt": "a cat"},
            "logs": "",
            "output": null,
            "error": null,
            "status": status,
            "created_at": "2025-01-01T00:00:00.000Z",
            "urls": {
                "get": "https://api.replicate.com/v1/predictions/gm3qorzdhgbfurvjtvhg6dckhu",
                "cancel": "https://api.replicate.com/v1/predictions/gm3qorzdhgbfurvjtvhg6dckhu/cancel"
            }
        });
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            p.extend(extra.clone());
        }
        p
    }

    fn poll(body: Value) -> Result<JobState, PluginError> {
        Replicate::parse_poll(
            ctx("black-forest-labs/flux-schnell"),
            "gm3qorzdhgbfurvjtvhg6dckhu".into(),
            resp(200, vec![], body),
        )
    }

    fn failed_class(state: JobState) -> ErrorClass {
        match state {
            JobState::Failed(e) => e.class,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn the_manifest_declares_bearer_auth_and_priced_models() {
        let m = Replicate::describe();
        assert_eq!(m.name, "replicate");
        assert!(m.kinds.is_empty(), "tasks only");
        assert!(matches!(m.auth, AuthScheme::Bearer));
        let schnell = m
            .models
            .iter()
            .find(|m| m.id == "black-forest-labs/flux-schnell")
            .unwrap();
        assert_eq!(schnell.price.unwrap().per_image, 3_000_000_000, "$0.003");
        assert!(m.models.iter().all(|m| m.price.is_some()));
        for kind in KINDS {
            assert!(m.models.iter().any(|m| m.kinds.iter().any(|k| k == kind)));
        }
    }

    #[test]
    fn an_official_model_is_submitted_to_its_predictions_with_the_input() {
        let input = json!({"prompt": "a cat", "num_outputs": 2});
        let req = sent(
            Replicate::build_submit(
                ctx("black-forest-labs/flux-schnell"),
                "image".into(),
                input.to_string(),
            )
            .unwrap(),
        );
        assert_eq!(req.method, "POST");
        assert_eq!(
            req.path,
            "/models/black-forest-labs/flux-schnell/predictions"
        );
        assert_eq!(
            header_value(&req.headers, "content-type"),
            Some("application/json")
        );
        assert!(header_value(&req.headers, "authorization").is_none());
        assert!(
            header_value(&req.headers, "prefer").is_none(),
            "async, not `Prefer: wait`"
        );
        assert!(!req.stream);
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body, json!({"input": input}));
    }

    #[test]
    fn a_version_is_submitted_to_predictions_with_its_id() {
        let v = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa";
        for model in [format!("replicate/hello-world:{v}"), v.to_string()] {
            let req = sent(
                Replicate::build_submit(ctx(&model), "image".into(), r#"{"text":"Alice"}"#.into())
                    .unwrap(),
            );
            assert_eq!(req.path, "/predictions", "{model}");
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            assert_eq!(body, json!({"version": v, "input": {"text": "Alice"}}));
        }
    }

    #[test]
    fn unusable_models_kinds_and_inputs_are_refused() {
        for model in ["", "flux", "a/b/c", "../x", "a/..", "a/b:notahex", "a b/c"] {
            let Err(e) = Replicate::build_submit(ctx(model), "image".into(), "{}".into()) else {
                panic!("{model:?} was accepted");
            };
            assert_eq!(
                e.class,
                ErrorClass::Upstream,
                "{model:?}: the operator's config"
            );
        }
        let m = ctx("black-forest-labs/flux-schnell");
        let e = Replicate::build_submit(m.clone(), "chat".into(), "{}".into()).unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidRequest);
        for input in ["[1]", "\"x\"", "{nope"] {
            let e = Replicate::build_submit(m.clone(), "image".into(), input.into()).unwrap_err();
            assert_eq!(e.class, ErrorClass::InvalidRequest, "{input}");
        }
        let e = Replicate::build_request(m, "image".into(), "{}".into()).unwrap_err();
        assert_eq!(e.class, ErrorClass::InvalidRequest);
    }

    #[test]
    fn the_submission_gives_the_prediction_id_and_its_state() {
        let sub = Replicate::parse_submit(
            ctx("black-forest-labs/flux-schnell"),
            "image".into(),
            resp(201, vec![], prediction("starting", json!({}))),
        )
        .unwrap();
        assert_eq!(sub.job_id, "gm3qorzdhgbfurvjtvhg6dckhu");
        assert!(matches!(sub.state, JobState::Running(None)));
        // An answer that is already final (a fast model).
        let done = prediction(
            "succeeded",
            json!({"output": ["https://replicate.delivery/xezq/abc/out-0.webp"]}),
        );
        let sub =
            Replicate::parse_submit(ctx("a/b"), "image".into(), resp(201, vec![], done)).unwrap();
        assert!(matches!(sub.state, JobState::Succeeded(ref o) if o.len() == 1));
        // No id, or an id that cannot be polled.
        for body in [
            json!({"status": "starting"}),
            prediction("starting", json!({"id": "../x"})),
        ] {
            let e = Replicate::parse_submit(ctx("a/b"), "image".into(), resp(201, vec![], body))
                .unwrap_err();
            assert_eq!(e.class, ErrorClass::Upstream);
        }
    }

    #[test]
    fn the_poll_gets_the_prediction() {
        let req =
            sent(Replicate::build_poll(ctx("a/b"), "gm3qorzdhgbfurvjtvhg6dckhu".into()).unwrap());
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("GET", "/predictions/gm3qorzdhgbfurvjtvhg6dckhu")
        );
        assert!(req.body.is_empty());
        let e = Replicate::build_poll(ctx("a/b"), "x/../../y".into()).unwrap_err();
        assert_eq!(e.class, ErrorClass::Upstream);
    }

    #[test]
    fn running_states_and_progress_from_the_logs() {
        assert!(matches!(
            poll(prediction("starting", json!({}))).unwrap(),
            JobState::Running(None)
        ));
        let logs = "Using seed: 42\n  0%|          | 0/28 [00:00<?, ?it/s]\n 39%|███▉      | 11/28 [00:01<00:02,  7.9it/s]\n";
        assert!(matches!(
            poll(prediction("processing", json!({"logs": logs}))).unwrap(),
            JobState::Running(Some(39))
        ));
        assert!(matches!(
            poll(prediction("processing", json!({"logs": "generating\n"}))).unwrap(),
            JobState::Running(None)
        ));
        assert_eq!(
            progress("100%|██████████| 4/4 [00:00<00:00, 9.1it/s]"),
            Some(100)
        );
        assert_eq!(progress("50%|| 1/2"), None, "an empty bar is no bar");
        assert_eq!(progress("7% done"), None);
    }

    #[test]
    fn success_gives_the_output_urls_as_a_string_or_a_list() {
        let JobState::Succeeded(outs) = poll(prediction(
            "succeeded",
            json!({"output": "https://replicate.delivery/pbxt/abc/out.mp4"}),
        ))
        .unwrap() else {
            panic!("expected success");
        };
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].url, "https://replicate.delivery/pbxt/abc/out.mp4");
        let JobState::Succeeded(outs) = poll(prediction(
            "succeeded",
            json!({"output": ["https://replicate.delivery/a/0.webp", "https://replicate.delivery/a/1.webp"]}),
        ))
        .unwrap() else {
            panic!("expected success");
        };
        assert_eq!(outs.len(), 2);
        // Succeeded with nothing to deliver.
        assert_eq!(
            failed_class(poll(prediction("succeeded", json!({"output": "hello Alice"}))).unwrap()),
            ErrorClass::Upstream
        );
    }

    #[test]
    fn failures_say_whether_the_content_was_refused() {
        for error in [
            "NSFW content detected. Try running it again, or try a different prompt.",
            "All generated images contained NSFW content. Try running it again with a different prompt.",
            "The input or output was flagged as sensitive. Please try again with different inputs. (E005)",
        ] {
            assert_eq!(
                failed_class(poll(prediction("failed", json!({"error": error}))).unwrap()),
                ErrorClass::ContentRefused,
                "{error}"
            );
        }
        let JobState::Failed(e) =
            poll(prediction("failed", json!({"error": "CUDA out of memory"}))).unwrap()
        else {
            panic!("expected a failure");
        };
        assert_eq!(
            (e.class, e.message.as_str()),
            (ErrorClass::Upstream, "CUDA out of memory")
        );
        for status in ["canceled", "aborted"] {
            assert_eq!(
                failed_class(poll(prediction(status, json!({}))).unwrap()),
                ErrorClass::Upstream
            );
        }
        assert_eq!(
            failed_class(poll(prediction("failed", json!({}))).unwrap()),
            ErrorClass::Upstream
        );
        assert_eq!(
            poll(prediction("dreaming", json!({}))).unwrap_err().class,
            ErrorClass::Upstream
        );
        assert_eq!(
            poll(json!({"no": "status"})).unwrap_err().class,
            ErrorClass::Upstream
        );
    }

    #[test]
    fn http_errors_map_to_classes() {
        let submit_error = |status: u16, headers: Vec<Header>, body: Value| {
            Replicate::parse_submit(ctx("a/b"), "image".into(), resp(status, headers, body))
                .unwrap_err()
        };
        let e = submit_error(
            401,
            vec![],
            json!({"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}),
        );
        assert_eq!(e.class, ErrorClass::Auth);
        assert_eq!(e.message, "You did not pass a valid authentication token");
        assert_eq!(e.status, Some(401));
        assert_eq!(
            submit_error(403, vec![], json!({"detail": "Forbidden"})).class,
            ErrorClass::Auth
        );
        assert_eq!(
            submit_error(402, vec![], json!({"title": "Insufficient credit", "detail": "You have insufficient credit to run this model.", "status": 402})).class,
            ErrorClass::Auth,
            "the account's credit is the operator's problem"
        );
        let e = submit_error(
            429,
            vec![],
            json!({"detail": "Request was throttled. Expected available in 1 second."}),
        );
        assert_eq!(
            (e.class, e.retry_after_ms),
            (ErrorClass::RateLimited, Some(1000))
        );
        let e = submit_error(
            429,
            vec![header("Retry-After", "7")],
            json!({"detail": "Request was throttled. Your rate limit resets in ~30s."}),
        );
        assert_eq!(e.retry_after_ms, Some(7000), "the header wins");
        assert_eq!(
            retry_hint_ms("Request was throttled. Your rate limit resets in ~30s."),
            Some(30_000)
        );
        let e = submit_error(
            422,
            vec![],
            json!({"title": "Input validation failed", "detail": "- input: prompt is required", "status": 422}),
        );
        assert_eq!(e.class, ErrorClass::InvalidRequest);
        assert_eq!(
            submit_error(404, vec![], json!({"detail": "Not found."})).class,
            ErrorClass::NotFound
        );
        assert_eq!(
            submit_error(500, vec![], json!({})).class,
            ErrorClass::Upstream
        );
        assert_eq!(
            submit_error(
                400,
                vec![],
                json!({"detail": "The prompt was flagged as sensitive"})
            )
            .class,
            ErrorClass::ContentRefused
        );
        let e = Replicate::parse_poll(ctx("a/b"), "x".into(), resp(503, vec![], json!({})))
            .unwrap_err();
        assert_eq!((e.class, e.status), (ErrorClass::Upstream, Some(503)));
    }
}
