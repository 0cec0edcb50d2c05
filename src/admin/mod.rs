//! The admin API, on the operator listener behind `Authorization: Bearer <admin token>`:
//! accounts (and their limits), credits and debits, keys (create, list, rotate, revoke, the
//! guard's suspensions and their lift), the ledger, moderation.
//! Thin handlers: the operations themselves are `accounts`', shared with the CLI.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::accounts::{self, AccountError, keys};
use crate::app::SharedState;
use crate::billing::BillingError;

pub fn router() -> Router<SharedState> {
    Router::new()
        .route("/admin/accounts", post(create_account).get(list_accounts))
        .route("/admin/accounts/{id}", get(get_account))
        .route("/admin/accounts/{id}/credits", post(add_credits))
        .route("/admin/accounts/{id}/debits", post(add_debit))
        .route("/admin/accounts/{id}/keys", post(create_key).get(list_keys))
        .route("/admin/keys/{id}/rotate", post(rotate_key))
        .route("/admin/keys/{id}/revoke", post(revoke_key))
        .route("/admin/keys/{id}/lift", post(lift_key))
        .route("/admin/keys/{id}/suspensions", get(key_suspensions))
        .route(
            "/admin/accounts/{id}/limits",
            axum::routing::put(set_account_limits),
        )
        .route("/admin/ledger", get(ledger))
        .route("/admin/moderation", get(moderation_events))
        .route("/admin/keys/{id}/blocks", get(key_blocks))
        .route("/admin/policies/reload", post(reload_policies))
        .route("/admin/accounts/{id}/webhook-secret", get(webhook_secret))
        .route("/admin/tasks/{id}", get(get_task))
        .route("/admin/channels", get(list_channels))
        .route("/admin/channels/{name}/reset", post(reset_channel))
}

/// `GET /admin/channels`: every configured channel with its breaker's state (`closed`, `open`,
/// `half_open`, `disabled`) and its failures in a row.
async fn list_channels(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let states = st.routing.health().states();
    let data: Vec<serde_json::Value> = st
        .config
        .routes
        .channels
        .iter()
        .map(|c| {
            let (state, failures) = states
                .iter()
                .find(|(n, _, _)| *n == c.name)
                .map_or(("closed", 0), |(_, s, f)| (s.as_str(), *f));
            json!({"name": c.name, "plugin": c.plugin, "state": state, "failures": failures})
        })
        .collect();
    Ok(axum::Json(json!({ "data": data })).into_response())
}

/// `POST /admin/channels/{name}/reset`: close a channel's breaker now (its credential was
/// fixed, its upstream recovered).
async fn reset_channel(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    if !st.config.routes.channels.iter().any(|c| c.name == name) {
        return Err(AdminError::NotFound);
    }
    st.routing.health().reset(&name);
    tracing::info!(channel = %name, "channel reset by the operator");
    Ok(axum::Json(json!({"name": name, "state": "closed"})).into_response())
}

/// `GET /admin/accounts/{id}/webhook-secret`: the secret that signs the account's task callbacks
/// (made on first read), for the account's owner to verify them.
async fn webhook_secret(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    accounts::get(&st.billing, &id).await?;
    let secret = st
        .tasks
        .store
        .webhook_secret(&id)
        .await
        .map_err(|e| AdminError::Billing(BillingError::Ledger(e)))?;
    Ok(axum::Json(json!({"account_id": id, "secret": secret})).into_response())
}

/// `GET /admin/tasks/{id}`: a task as its owner sees it, with what only the operator sees: the
/// account, the upstream job id, the reservation, and every callback delivery attempt.
async fn get_task(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let store_err = |e| AdminError::Billing(BillingError::Ledger(e));
    let t = st
        .tasks
        .store
        .get(&id)
        .await
        .map_err(store_err)?
        .ok_or(AdminError::NotFound)?;
    let deliveries = st.tasks.store.deliveries(&id).await.map_err(store_err)?;
    let mut v = st.tasks.view(&t);
    v["account_id"] = json!(t.account_id);
    v["key_id"] = json!(t.key_id);
    v["job_id"] = json!(t.job_id);
    v["reserved_picodollars"] = json!(t.reserved);
    v["callback_url"] = json!(t.callback_url);
    v["callback_state"] = json!(t.callback_state);
    v["deliveries"] = deliveries
        .into_iter()
        .map(|(attempt, status, outcome)| json!({"attempt": attempt, "status": status, "outcome": outcome}))
        .collect();
    Ok(axum::Json(v).into_response())
}

/// Errors of the admin API, in OpenAI's error shape.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the admin API is off: set the environment variable named by operator.admin_token_env")]
    Disabled,
    #[error("a valid admin token is required")]
    Unauthorized,
    #[error("{0}")]
    Invalid(String),
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error(transparent)]
    Accounts(#[from] AccountError),
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
}

impl AdminError {
    /// The status of each refusal; `ApiError` renders it (one renderer for every listener).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Disabled
            | Self::NotFound
            | Self::Billing(BillingError::NoAccount)
            | Self::Accounts(AccountError::NotFound)
            | Self::Keys(keys::KeyError::NotFound) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Billing(BillingError::InsufficientBalance { .. }) => StatusCode::PAYMENT_REQUIRED,
            Self::Billing(BillingError::Backlog { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Billing(BillingError::Ledger(_))
            | Self::Accounts(AccountError::Store(_))
            | Self::Keys(keys::KeyError::Store(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Invalid(_)
            | Self::Accounts(AccountError::Invalid(_) | AccountError::Refused(_))
            | Self::Keys(keys::KeyError::Invalid(_)) => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Disabled => "admin_disabled",
            Self::Unauthorized => "invalid_admin_token",
            Self::NotFound
            | Self::Billing(BillingError::NoAccount)
            | Self::Accounts(AccountError::NotFound)
            | Self::Keys(keys::KeyError::NotFound) => "not_found",
            Self::Billing(BillingError::InsufficientBalance { .. }) => "insufficient_quota",
            Self::Billing(BillingError::Backlog { .. }) => "billing_backlog",
            Self::Billing(BillingError::Ledger(_))
            | Self::Accounts(AccountError::Store(_))
            | Self::Keys(keys::KeyError::Store(_)) => "internal_error",
            Self::Invalid(_)
            | Self::Accounts(AccountError::Invalid(_))
            | Self::Keys(keys::KeyError::Invalid(_)) => "invalid_request",
            Self::Accounts(AccountError::Refused(_)) => "out_of_range",
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        crate::error::ApiError::from(self).into_response()
    }
}

/// Check the admin token in constant time.
fn check_admin(st: &SharedState, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(token) = &st.config.operator.admin_token else {
        return Err(AdminError::Disabled);
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::server::bearer_credential)
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(AdminError::Unauthorized)
    }
}

#[derive(Deserialize)]
struct NewAccount {
    name: String,
}

async fn create_account(
    State(st): State<SharedState>,
    headers: HeaderMap,
    body: Result<axum::Json<NewAccount>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let axum::Json(body) = body.map_err(|e| AdminError::Invalid(e.body_text()))?;
    let a = accounts::create(&st.billing, &body.name).await?;
    Ok((StatusCode::CREATED, axum::Json(a)).into_response())
}

async fn list_accounts(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    Ok(axum::Json(json!({"data": accounts::list(&st.billing).await?})).into_response())
}

async fn get_account(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    Ok(axum::Json(accounts::get(&st.billing, &id).await?).into_response())
}

#[derive(Deserialize)]
struct NewCredits {
    /// Dollars as a decimal string ("12.50"), exact to 1e-12, more than 0.
    amount_usd: String,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDebit {
    /// Dollars as a decimal string ("12.50"), exact to 1e-12, more than 0.
    amount_usd: String,
    #[serde(default)]
    note: Option<String>,
    /// Take it even if the balance goes below zero (or below what requests in flight hold).
    #[serde(default)]
    force: bool,
}

async fn add_credits(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<axum::Json<NewCredits>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let axum::Json(body) = body.map_err(|e| AdminError::Invalid(e.body_text()))?;
    let amount = amount_usd(&body.amount_usd)?;
    let note = body.note.as_deref().unwrap_or("admin credit");
    let entry = accounts::credit(&st.billing, &id, amount, note).await?;
    Ok((StatusCode::CREATED, axum::Json(entry)).into_response())
}

/// Take money from an account: 400 if what stays would not cover the requests in flight,
/// unless `force`.
async fn add_debit(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<axum::Json<NewDebit>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let axum::Json(body) = body.map_err(|e| AdminError::Invalid(e.body_text()))?;
    let amount = amount_usd(&body.amount_usd)?;
    let note = body.note.as_deref().unwrap_or("admin debit");
    let entry = accounts::debit(&st.billing, &id, amount, note, body.force).await?;
    Ok((StatusCode::CREATED, axum::Json(entry)).into_response())
}

/// `amount_usd` of a body, the error naming the field.
fn amount_usd(text: &str) -> Result<crate::billing::Credits, AdminError> {
    accounts::parse_amount(text).map_err(|e| match e {
        AccountError::Invalid(m) => AdminError::Invalid(format!("`amount_usd`: {m}")),
        AccountError::Refused(r) => AdminError::Invalid(format!("`amount_usd`: {r}")),
        other => other.into(),
    })
}

async fn create_key(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(account): Path<String>,
    body: Result<axum::Json<keys::NewKey>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let axum::Json(body) = body.map_err(|e| AdminError::Invalid(e.body_text()))?;
    keys::check_policy_set(&body, &st.moderator.policies.current())?;
    let (info, plain) = keys::create(&st.billing, &account, body).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"key": plain.expose(), "info": info, "warning": "the key is shown once; store it now"})),
    )
        .into_response())
}

async fn list_keys(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(account): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    Ok(axum::Json(json!({"data": keys::list(&st.billing, &account).await?})).into_response())
}

async fn rotate_key(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let (info, plain) = keys::rotate(&st.billing, &id).await?;
    st.auth.invalidate_all().await;
    Ok(axum::Json(json!({"key": plain.expose(), "info": info, "warning": "the key is shown once; store it now"})).into_response())
}

async fn revoke_key(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let info = keys::revoke(&st.billing, &id).await?;
    st.auth.invalidate_all().await;
    Ok(axum::Json(info).into_response())
}

/// `POST /admin/keys/{id}/lift` (body optional: `{"by": "<operator>"}`): lift the guard's
/// suspension or throttle; the key's history of actions is returned.
async fn lift_key(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Lift {
        by: Option<String>,
    }
    let lift: Lift = if body.iter().all(u8::is_ascii_whitespace) {
        Lift::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(format!("body: {e}")))?
    };
    let by = lift.by.unwrap_or_else(|| "admin".into());
    let history = keys::lift(&st.billing, &id, &by).await?;
    st.auth.invalidate_all().await;
    st.limiter.guard.refresh_gauge(st.billing.db()).await;
    Ok(axum::Json(json!({"key_id": id, "suspensions": history})).into_response())
}

/// `GET /admin/keys/{id}/suspensions`: the key's suspensions and throttles, newest first.
async fn key_suspensions(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let history = keys::suspensions(&st.billing, &id).await?;
    let active = crate::limits::guard::active_action(st.billing.db(), &id)
        .await
        .map_err(|e| AdminError::Billing(BillingError::Ledger(e)))?;
    Ok(axum::Json(json!({
        "key_id": id,
        "suspended": active.as_ref().is_some_and(|a| a.throttle.is_none()),
        "throttled_to_requests_per_minute": active.as_ref().and_then(|a| a.throttle),
        "suspensions": history,
    }))
    .into_response())
}

/// `PUT /admin/accounts/{id}/limits`: the account's limits (the same object as a key's
/// `limits`; `{}` removes them).
async fn set_account_limits(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let limits: crate::limits::Limits =
        serde_json::from_slice(&body).map_err(|e| AdminError::Invalid(format!("body: {e}")))?;
    let account = accounts::set_limits(&st.billing, &id, &limits).await?;
    st.auth.invalidate_all().await;
    Ok(axum::Json(account).into_response())
}

async fn ledger(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let account = q.get("account").map(String::as_str);
    let request = q.get("request_id").map(String::as_str);
    if account.is_none() && request.is_none() {
        return Err(AdminError::Invalid("give `account` or `request_id`".into()));
    }
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .clamp(1, 10_000);
    let entries = st.billing.ledger(account, request, limit).await?;
    Ok(axum::Json(json!({"data": entries})).into_response())
}

/// The moderation record, newest first (prompt text only if retention is on).
async fn moderation_events(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .clamp(1, 10_000);
    Ok(axum::Json(json!({"data": st.moderator.record.recent(limit)})).into_response())
}

/// How many of a key's requests were blocked (the abnormal-usage guard reads the same count).
async fn key_blocks(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    Ok(axum::Json(
        json!({"key_id": id, "blocked_requests": st.moderator.record.blocks_for_key(&id)}),
    )
    .into_response())
}

/// Reload the policy folder now; a refused change answers 400 with every problem.
async fn reload_policies(
    State(st): State<SharedState>,
    headers: HeaderMap,
) -> Result<Response, AdminError> {
    check_admin(&st, &headers)?;
    let in_use = keys::policy_sets_in_use(&st.billing).await?;
    match st.moderator.policies.reload_keeping(&in_use) {
        Ok(()) => Ok(axum::Json(json!({"status": "loaded"})).into_response()),
        Err(errs) => Err(AdminError::Invalid(
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}
