//! `POST /v1/tasks` (the task API's shape): `{"model", "input": {...}, "callback": {"url"}}`.
//! The same steps as every route up to the reservation: admission (a key is required: a task
//! belongs to an account), screening of every text field of `input`, the estimate reserved (402
//! when it cannot be covered); then the task is stored `queued` with its reservation and its id
//! returned at once (`{code, message, data: {taskId}}`). The workers drive it from there
//! (`crate::tasks`). Errors use the task body (`{code, message, data: null, error_code}`).
//!
//! The estimate: the model's per-request price, the per-image price times the images `input`
//! asks for (`n`, `num_outputs`, `num_images` or `batch_size`; 1 to 10, default 1), the
//! per-second price times the seconds it asks for (`duration`, `seconds` or
//! `duration_seconds`; at most an hour), and the prompt at the input price.

use serde_json::{Value, json};

use crate::app::AppState;
use crate::auth::{AuthError, Caller};
use crate::error::{ApiError, ErrorShape};
use crate::store::now_ms;

use super::admission::Admitted;
use super::{Body, Call, Need, Reply, Served, money};

pub const ROUTE: &str = "/v1/tasks";

const MAX_OUTPUTS: u64 = 10;
const MAX_SECONDS: u64 = 3600;
/// The task kinds a model may run, in the order a model's kinds are read.
const KINDS: [&str; 4] = ["image", "video", "music", "speech"];

/// The first of `names` that `input` has, as a count within `1..=max`.
fn count(input: &Value, names: &[&'static str], max: u64) -> Result<Option<u64>, ApiError> {
    for name in names {
        if let Some(v) = input.get(name).filter(|v| !v.is_null()) {
            let n = v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("`input.{name}` must be a whole number from 1 to {max}"),
                        Some("input"),
                    )
                })?;
            return Ok(Some(n));
        }
    }
    Ok(None)
}

/// Validate a task submission.
pub fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
    let model = body.model()?;
    let input = match body.field("input") {
        Some(Value::Object(o)) if !o.is_empty() => Value::Object(o.clone()),
        None => {
            return Err(ApiError::invalid(
                "missing required parameter: `input`",
                Some("input"),
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "`input` must be a non-empty object of the model's parameters",
                Some("input"),
            ));
        }
    };
    if let Some(cb) = body.field("callback") {
        match cb.get("url") {
            Some(Value::String(u)) if !u.is_empty() => {}
            _ => {
                return Err(ApiError::invalid(
                    "`callback` must be an object with a string `url`",
                    Some("callback"),
                ));
            }
        }
    }
    let images = count(
        &input,
        &["n", "num_outputs", "num_images", "batch_size"],
        MAX_OUTPUTS,
    )?
    .unwrap_or(1);
    let seconds = count(
        &input,
        &["duration", "seconds", "duration_seconds"],
        MAX_SECONDS,
    )?
    .unwrap_or(0);
    let need = Need {
        prompt_tokens: 0,
        max_output_tokens: None,
        output: false,
        outputs: 1,
        images,
        seconds,
    };
    Ok(Call {
        route: ROUTE,
        kind: "task",
        model,
        stream: false,
        body,
        need,
        prompt: |tokenizer, body| {
            super::tokens::text_fields(tokenizer, body.get("input").unwrap_or(&Value::Null))
        },
        request_id,
    })
}

#[tracing::instrument(name = "pipeline.tasks", level = "debug", skip_all, fields(model = %call.model))]
pub async fn run(st: &AppState, caller: Option<Caller>, call: Call) -> Result<Served, ApiError> {
    let admitted = super::admission::admit(st, caller, call).await?;
    let kind = task_kind(&admitted)?;
    let callback_url = admitted
        .call
        .body
        .field("callback")
        .and_then(|c| c.get("url"))
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(url) = &callback_url {
        crate::tasks::callback::check_url(
            url,
            &st.tasks.archive.guard,
            st.tasks.config.allow_http_callbacks,
        )
        .map_err(|why| ApiError::invalid(why, Some("callback")))?;
    }
    let input = admitted
        .call
        .body
        .field("input")
        .map(Value::to_string)
        .unwrap_or_default();
    let (id, provider) = enqueue(st, admitted, kind, input, callback_url).await?;
    Ok(Served {
        reply: Reply::Json {
            body: json!({"code": 200, "message": "success", "data": {"taskId": id}}).to_string(),
            cost: None,
        },
        provider,
    })
}

/// The kind of task an admitted call's model runs ("image", "video", "music", "speech"), or a
/// 400 if its provider has no task API.
pub(super) fn task_kind(admitted: &Admitted) -> Result<&'static str, ApiError> {
    let pick = &admitted.pick;
    if !pick.plugin.has_tasks() {
        return Err(ApiError::invalid(
            format!(
                "the model `{}` does not run as a task; use its synchronous route",
                admitted.call.model
            ),
            Some("model"),
        ));
    }
    Ok(pick
        .model_info()
        .and_then(|m| KINDS.iter().find(|k| m.kinds.iter().any(|mk| mk == *k)))
        .copied()
        .unwrap_or("image"))
}

/// Screen, reserve and store a task for an admitted call (a key is required: a task belongs to
/// an account); its id and the provider that will run it.
pub(super) async fn enqueue(
    st: &AppState,
    mut admitted: Admitted,
    kind: &str,
    input: String,
    callback_url: Option<String>,
) -> Result<(String, String), ApiError> {
    if admitted.caller.is_none() {
        return Err(AuthError::Missing.into());
    }
    // The task id names everything from here on: the moderation record, the reservation, and
    // the one charge the ledger takes for it (whichever gateway settles, however often).
    admitted.call.request_id = st.tasks.new_id();
    let deadline_at = st.tasks.deadline_for(admitted.pick.route.task_deadline);
    let screened = super::screen::screen(st, admitted).await?;
    let reserved = money::reserve(st, screened).await?;
    let a = reserved.screened.admitted;
    let Some(caller) = a.caller else {
        return Err(AuthError::Missing.into());
    };
    let provider = a.pick.plugin.name().to_string();
    let now = now_ms();
    let task = crate::tasks::Task {
        id: a.call.request_id.clone(),
        account_id: caller.account_id.clone(),
        key_id: caller.key_id.clone(),
        model: a.call.model.clone(),
        kind: kind.to_string(),
        input,
        callback_url,
        status: crate::tasks::Status::Queued,
        progress: None,
        job_id: None,
        upstream_outputs: None,
        outputs: None,
        error_code: None,
        error_message: None,
        reserved: reserved.hold.as_ref().map_or(0, |h| h.amount.0),
        price: serde_json::to_string(&a.price).unwrap_or_default(),
        hold_id: reserved.hold.as_ref().map(|h| h.id.clone()),
        cost: None,
        images: i64::try_from(a.call.need.images).unwrap_or(0),
        seconds: i64::try_from(a.call.need.seconds).unwrap_or(0),
        attempts: 0,
        polls: 0,
        next_at: now,
        deadline_at,
        status_since: now,
        created_at: now,
        updated_at: now,
        finished_at: None,
        callback_state: "none".into(),
        callback_attempts: 0,
    };
    let id = task.id.clone();
    st.tasks
        .create(task, reserved.hold)
        .await
        .map_err(|e| ApiError::Internal(format!("storing a task: {e}")))?;
    Ok((id, provider))
}

/// The route, for the server.
pub struct Tasks;

impl super::Route for Tasks {
    const PATH: &'static str = ROUTE;
    const ERRORS: ErrorShape = ErrorShape::Task;

    fn parse(body: Body, request_id: String) -> Result<Call, ApiError> {
        parse(body, request_id)
    }

    fn run(
        st: &AppState,
        caller: Option<Caller>,
        call: Call,
    ) -> impl std::future::Future<Output = Result<Served, ApiError>> + Send {
        run(st, caller, call)
    }
}
