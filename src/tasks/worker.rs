//! The workers: claim due tasks (a lease per task), run one step of each, write the result under
//! the lease; deliver due callbacks. Both loops run on the gateway's background tracker and stop
//! with it; a step in progress finishes (or its lease runs out and another gateway redoes it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;

use crate::app::{AppState, SharedState};
use crate::billing::Usage;
use crate::plugins::{
    GuestErrorClass, InboundResponse, JobOutput, JobState, Outbound, PluginError,
};
use crate::routing::Pick;
use crate::store::now_ms;
use crate::upstream;

use super::store::{Archived, Change, Status, Task};
use super::{Tasks, callback};

/// Failed attempts of a submission or an archiving before the task fails.
const MAX_ATTEMPTS: i64 = 5;
/// Failed polls in a row before the task fails (else it fails at its deadline).
const MAX_POLL_ERRORS: i64 = 30;

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Start the task workers and the callback sender on the gateway's background tracker.
pub fn start(st: &SharedState) {
    let bg = st.background.clone();
    bg.spawn(drive(st.clone()));
    bg.spawn(callbacks(st.clone()));
}

/// How often an idle worker looks for due tasks.
fn tick(t: &Tasks) -> Duration {
    t.config
        .poll_initial
        .min(Duration::from_millis(250))
        .max(Duration::from_millis(20))
}

async fn drive(st: SharedState) {
    let tasks = &st.tasks;
    let slots = Arc::new(Semaphore::new(tasks.config.workers));
    let channels: Arc<Mutex<HashMap<String, Arc<Semaphore>>>> = Arc::default();
    let stopping = st.background.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            biased;
            () = &mut stopping => break,
            () = tasks.wake.notified() => {}
            () = tokio::time::sleep(tick(tasks)) => {}
        }
        let free = slots.available_permits();
        if free == 0 {
            continue;
        }
        let claimed = match tasks
            .store
            .claim(&tasks.owner, ms(tasks.config.lease), free)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "claiming due tasks failed; retrying");
                continue;
            }
        };
        for task in claimed {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            let st2 = st.clone();
            let channels = channels.clone();
            st.background.spawn(async move {
                let _permit = permit;
                step(&st2, task, &channels).await;
            });
        }
    }
}

/// The semaphore that bounds steps at once on a channel.
fn channel_slots(
    channels: &Mutex<HashMap<String, Arc<Semaphore>>>,
    name: &str,
    per_channel: usize,
) -> Arc<Semaphore> {
    let mut m = channels
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    m.entry(name.to_string())
        .or_insert_with(|| Arc::new(Semaphore::new(per_channel)))
        .clone()
}

/// What a step ended with.
enum Next {
    /// Write this change (not final).
    Continue(Change),
    /// Success: archived outputs and the usage to charge.
    Done(Vec<Archived>, Usage),
    /// Final failure: a stable code and the client's message.
    Fail(&'static str, String),
    /// Try the same step again later (a transient failure).
    Retry(String, Option<u64>),
}

#[tracing::instrument(name = "tasks.step", level = "debug", skip_all, fields(task = %t.id, status = t.status.as_str()))]
async fn step(st: &AppState, t: Task, channels: &Mutex<HashMap<String, Arc<Semaphore>>>) {
    let tasks = &st.tasks;
    let now = now_ms();
    let next = if t.deadline_at == 0 {
        Next::Fail("cancelled", "the task was cancelled".into())
    } else if matches!(t.status, Status::Queued | Status::Handling) && now >= t.deadline_at {
        Next::Fail(
            "timeout",
            "the provider did not finish the task before its deadline".into(),
        )
    } else {
        match st.routing.pick(&t.model) {
            Err(_) => Next::Fail(
                "model_unavailable",
                format!("the model `{}` is no longer served", t.model),
            ),
            Ok(pick) => {
                let slots =
                    channel_slots(channels, &pick.route.channel.name, tasks.config.per_channel);
                let _slot = slots.acquire_owned().await;
                match t.status {
                    Status::Queued => submit(st, &pick, &t).await,
                    Status::Handling => poll(st, &pick, &t).await,
                    Status::Archiving => archive(st, &t).await,
                    Status::Success | Status::Fail => return,
                }
            }
        }
    };
    finish_step(st, t, next).await;
}

/// Send a built request (or take the plugin's offline answer) and read the whole answer.
async fn exchange(
    st: &AppState,
    pick: &Pick,
    out: Outbound,
) -> Result<InboundResponse, crate::upstream::UpstreamError> {
    match out {
        Outbound::Answer(resp) => Ok(resp),
        Outbound::Send(req) => {
            let target = upstream::Target {
                channel: &pick.route.channel.name,
                base_url: &pick.route.channel.base_url,
                auth: &pick.plugin.manifest.auth,
                credential: pick.route.channel.credential.as_ref(),
            };
            let started = std::time::Instant::now();
            let pending = st.upstream.send(&target, req).await;
            st.metrics
                .upstream_duration(pick.plugin.name(), started.elapsed());
            pending?.read().await
        }
    }
}

/// A plugin error as the next step: transient classes are retried, the rest fail the task.
fn after_plugin_error(e: PluginError) -> Next {
    match &e {
        PluginError::Guest {
            class,
            retry_after_ms,
            ..
        } => match class {
            GuestErrorClass::RateLimited | GuestErrorClass::Upstream | GuestErrorClass::Auth => {
                Next::Retry(e.to_string(), *retry_after_ms)
            }
            GuestErrorClass::InvalidRequest => Next::Fail(
                "invalid_input",
                "the provider refused the task's input".into(),
            ),
            GuestErrorClass::ContentRefused => Next::Fail(
                "content_policy_violation",
                "the provider refused the content of the task".into(),
            ),
            GuestErrorClass::NotFound => Next::Fail(
                "provider_error",
                "the provider does not know this model or job".into(),
            ),
        },
        PluginError::Busy { .. } => Next::Retry(e.to_string(), None),
        _ => Next::Fail(
            "provider_error",
            "the provider's plugin failed on this task".into(),
        ),
    }
}

/// A model whose plugin has no task API (replaced while the task ran).
fn no_tasks() -> Next {
    Next::Fail(
        "model_unavailable",
        "the model's provider does not run tasks".into(),
    )
}

async fn submit(st: &AppState, pick: &Pick, t: &Task) -> Next {
    let ctx = pick.route.context();
    let mut s = match pick.plugin.task_session().await {
        None => return no_tasks(),
        Some(Err(e)) => return after_plugin_error(e),
        Some(Ok(s)) => s,
    };
    let out = match s.build_submit(&ctx, &t.kind, &t.input).await {
        Ok(o) => o,
        Err(e) => return after_plugin_error(e),
    };
    let resp = match exchange(st, pick, out).await {
        Ok(r) => r,
        Err(e) => return Next::Retry(e.to_string(), None),
    };
    match s.parse_submit(&ctx, &t.kind, resp).await {
        Err(e) => after_plugin_error(e),
        Ok((job_id, state)) => {
            let mut next = after_state(st, t, state);
            if let Next::Continue(c) = &mut next {
                c.job_id = Some(job_id);
                c.polls = Some(0);
                if c.status.is_none() {
                    c.status = Some(Status::Handling);
                }
            }
            next
        }
    }
}

async fn poll(st: &AppState, pick: &Pick, t: &Task) -> Next {
    let Some(job_id) = t.job_id.as_deref() else {
        return Next::Fail("provider_error", "the task has no job id to poll".into());
    };
    let ctx = pick.route.context();
    let mut s = match pick.plugin.task_session().await {
        None => return no_tasks(),
        Some(Err(e)) => return after_plugin_error(e),
        Some(Ok(s)) => s,
    };
    let out = match s.build_poll(&ctx, job_id).await {
        Ok(o) => o,
        Err(e) => return after_plugin_error(e),
    };
    let resp = match exchange(st, pick, out).await {
        Ok(r) => r,
        Err(e) => return Next::Retry(e.to_string(), None),
    };
    match s.parse_poll(&ctx, job_id, resp).await {
        Err(e) => after_plugin_error(e),
        Ok(state) => after_state(st, t, state),
    }
}

/// The next step after the upstream reported a job's state.
fn after_state(st: &AppState, t: &Task, state: JobState) -> Next {
    let tasks = &st.tasks;
    match state {
        JobState::Running(progress) => {
            let wait = poll_wait(tasks, t.polls);
            Next::Continue(Change {
                progress: progress.map(i64::from),
                polls: Some(t.polls + 1),
                attempts: Some(0),
                next_at: Some(now_ms() + ms(wait)),
                ..Change::default()
            })
        }
        JobState::Succeeded(outputs) => Next::Continue(Change {
            status: Some(Status::Archiving),
            upstream_outputs: Some(serde_json::to_string(&outputs).unwrap_or_default()),
            progress: Some(100),
            attempts: Some(0),
            next_at: Some(now_ms()),
            ..Change::default()
        }),
        JobState::Failed(e) => match after_plugin_error(e) {
            // A job the upstream failed is final, whatever the class.
            Next::Retry(..) => Next::Fail("provider_error", "the provider failed the task".into()),
            n => n,
        },
    }
}

/// The wait before poll number `polls + 1`: half as long again each time, capped.
fn poll_wait(tasks: &Tasks, polls: i64) -> Duration {
    let base = tasks.config.poll_initial.as_secs_f64();
    let wait = base * 1.5f64.powi(i32::try_from(polls.min(40)).unwrap_or(40));
    Duration::from_secs_f64(wait.min(tasks.config.poll_max.as_secs_f64()))
}

async fn archive(st: &AppState, t: &Task) -> Next {
    let outputs: Vec<JobOutput> = match t
        .upstream_outputs
        .as_deref()
        .and_then(|o| serde_json::from_str(o).ok())
    {
        Some(o) => o,
        None => {
            return Next::Fail(
                "provider_error",
                "the task has no outputs to archive".into(),
            );
        }
    };
    let mut archived = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.iter().enumerate() {
        match st.tasks.archive.copy(out, &format!("{}/{i}", t.id)).await {
            Ok(a) => archived.push(a),
            Err(e) if e.retryable() => return Next::Retry(e.to_string(), None),
            Err(e) => {
                tracing::warn!(task = %t.id, error = %e, "an output could not be archived");
                return Next::Fail(
                    "archive_failed",
                    format!("an output of the provider could not be archived: {e}"),
                );
            }
        }
    }
    let images = if t.kind == "image" {
        archived.len() as u64
    } else {
        0
    };
    let usage = Usage {
        images,
        seconds: u64::try_from(t.seconds).unwrap_or(0),
        ..Usage::default()
    };
    Next::Done(archived, usage)
}

/// Write what a step produced, and move the money when the task ends.
async fn finish_step(st: &AppState, t: Task, next: Next) {
    let tasks = &st.tasks;
    let change = match next {
        Next::Continue(c) => c,
        Next::Retry(why, retry_after_ms) => {
            let attempts = t.attempts + 1;
            let limit = if t.status == Status::Handling {
                MAX_POLL_ERRORS
            } else {
                MAX_ATTEMPTS
            };
            if attempts >= limit {
                tracing::warn!(task = %t.id, error = %why, "a task step kept failing; the task fails");
                return fail(
                    st,
                    t,
                    "provider_error",
                    "the provider kept failing on this task".into(),
                )
                .await;
            }
            tracing::info!(task = %t.id, attempt = attempts, error = %why, "a task step failed; retrying");
            let wait = retry_after_ms
                .map(Duration::from_millis)
                .unwrap_or_else(|| poll_wait(tasks, attempts))
                .min(tasks.config.poll_max);
            Change {
                attempts: Some(attempts),
                next_at: Some(now_ms() + ms(wait)),
                ..Change::default()
            }
        }
        Next::Fail(code, message) => return fail(st, t, code, message).await,
        Next::Done(archived, usage) => return succeed(st, t, archived, usage).await,
    };
    let moved = change.status;
    match tasks.store.update(&t.id, &tasks.owner, change).await {
        Ok(true) => {
            if let Some(s) = moved {
                tasks.metrics.moved(&t, s);
            }
        }
        Ok(false) => {
            tracing::warn!(task = %t.id, "lost the task's lease; another gateway drives it")
        }
        Err(e) => {
            tracing::warn!(task = %t.id, error = %e, "saving a task step failed; it will be redone")
        }
    }
    if moved.is_some() {
        tasks.wake.notify_one();
    }
}

async fn succeed(st: &AppState, t: Task, archived: Vec<Archived>, usage: Usage) {
    let tasks = &st.tasks;
    // Cancelled while its outputs were being archived (the client was told it failed): no charge.
    if let Ok(Some(now)) = tasks.store.get(&t.id).await
        && now.deadline_at == 0
    {
        return fail(st, t, "cancelled", "the task was cancelled".into()).await;
    }
    // Charge once: a restart between the charge and the task's `success` finds it in the ledger.
    let cost = match tasks.store.charged(&t.id).await {
        Ok(Some(c)) => Ok(c),
        Ok(None) if t.reserved <= 0 && super::price_of(&t) == crate::billing::Price::default() => {
            Ok(0)
        }
        Ok(None) => match tasks.hold_for(&st.billing, &t).await {
            Ok(hold) => hold.settle(usage).await.map(|c| c.0),
            Err(e) => Err(e),
        },
        Err(e) => Err(crate::billing::BillingError::Ledger(e)),
    };
    let cost = match cost {
        Ok(c) => c,
        Err(e) => {
            // Nothing is final until the charge is: archive again (idempotent) and retry.
            tracing::error!(task = %t.id, error = %e, "charging a finished task failed; retrying");
            let c = Change {
                attempts: Some(t.attempts + 1),
                next_at: Some(now_ms() + 1000),
                ..Change::default()
            };
            let _ = tasks.store.update(&t.id, &tasks.owner, c).await;
            return;
        }
    };
    let change = Change {
        status: Some(Status::Success),
        outputs: Some(serde_json::to_string(&archived).unwrap_or_default()),
        cost: Some(cost),
        progress: Some(100),
        finished: true,
        ..Change::default()
    };
    save_final(st, &t, change, Status::Success).await;
}

async fn fail(st: &AppState, t: Task, code: &'static str, message: String) {
    let tasks = &st.tasks;
    if t.reserved > 0 {
        match tasks.hold_for(&st.billing, &t).await {
            Ok(h) => h.release().await,
            Err(e) => {
                tracing::warn!(task = %t.id, error = %e, "releasing a failed task's reservation failed; the sweeper releases it")
            }
        }
    }
    let change = Change {
        status: Some(Status::Fail),
        error: Some((code.to_string(), message)),
        finished: true,
        ..Change::default()
    };
    save_final(st, &t, change, Status::Fail).await;
}

async fn save_final(st: &AppState, t: &Task, change: Change, status: Status) {
    let tasks = &st.tasks;
    match tasks.store.update(&t.id, &tasks.owner, change).await {
        Ok(true) => {
            tasks.metrics.moved(t, status);
            tracing::info!(task = %t.id, status = status.as_str(), "task finished");
        }
        Ok(false) => {
            tracing::warn!(task = %t.id, "lost the task's lease before finishing it; another gateway drives it")
        }
        Err(e) => {
            tracing::error!(task = %t.id, error = %e, "saving a finished task failed; it will be redone")
        }
    }
}

async fn callbacks(st: SharedState) {
    let tasks = &st.tasks;
    let stopping = st.background.stopping();
    tokio::pin!(stopping);
    let lease = ms(tasks.config.callback_timeout) * 2 + 5_000;
    loop {
        tokio::select! {
            biased;
            () = &mut stopping => break,
            () = tokio::time::sleep(tick(tasks)) => {}
        }
        let due = match tasks.store.claim_callbacks(lease, 16).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "claiming due callbacks failed; retrying");
                continue;
            }
        };
        for t in due {
            let st2 = st.clone();
            st.background
                .spawn(async move { send_callback(&st2, t).await });
        }
    }
}

async fn send_callback(st: &AppState, t: Task) {
    let tasks = &st.tasks;
    let Some(url) = t.callback_url.clone() else {
        return;
    };
    let attempt = t.callback_attempts + 1;
    let secret = match tasks.store.webhook_secret(&t.account_id).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(task = %t.id, error = %e, "reading the webhook secret failed");
            return;
        }
    };
    let body = json!({
        "type": format!("task.{}", t.status.as_str()),
        "data": tasks.view(&t),
    });
    let outcome = callback::deliver(
        &url,
        &tasks.archive.guard,
        tasks.config.callback_timeout,
        &secret,
        &format!("msg_{}", t.id),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
    .await;
    tasks.metrics.callback(outcome.label());
    let attempts_left = attempt < i64::from(tasks.config.callback_attempts);
    let (state, next_at) = match &outcome {
        callback::Outcome::Delivered(_) => ("delivered", 0),
        _ if attempts_left => {
            let wait = callback::backoff(
                tasks.config.callback_backoff,
                u32::try_from(attempt).unwrap_or(u32::MAX),
            );
            ("pending", now_ms() + ms(wait))
        }
        _ => ("failed", 0),
    };
    if let callback::Outcome::Refused(why) | callback::Outcome::Failed(why) = &outcome {
        tracing::info!(task = %t.id, attempt, reason = %why, "a callback was not delivered");
    }
    if let Err(e) = tasks
        .store
        .record_delivery(
            &t.id,
            attempt,
            outcome.status(),
            outcome.label(),
            state,
            next_at,
        )
        .await
    {
        tracing::warn!(task = %t.id, error = %e, "recording a callback attempt failed");
    }
}
