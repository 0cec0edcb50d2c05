//! The task API's read side and the download of archived outputs: `GET /v1/tasks/{id}` (the
//! caller's own tasks only; another account's id is a 404) and `GET /v1/files/{key}` (a link
//! signed by the gateway, no key needed, like a presigned URL). Errors in the task body.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde_json::json;

use crate::app::SharedState;
use crate::error::{ApiError, ErrorShape};

/// `GET /v1/tasks/{id}`.
pub async fn get_task(
    State(st): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let caller = super::require_caller(&st, &headers).await?;
        let task = st
            .tasks
            .store
            .get(&id)
            .await
            .map_err(|e| ApiError::Internal(format!("reading a task: {e}")))?
            .filter(|t| t.account_id == caller.account_id)
            .ok_or(ApiError::NotFound)?;
        Ok::<_, ApiError>(json!({
            "code": 200,
            "message": "success",
            "data": st.tasks.view(&task),
        }))
    }
    .await;
    match result {
        Ok(v) => super::json_response(StatusCode::OK, v.to_string()),
        Err(ApiError::NotFound) => {
            let mut body = ApiError::NotFound.task_body();
            body["message"] = json!(format!("no task `{id}` for this key's account"));
            (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Err(e) => e.respond(ErrorShape::Task),
    }
}

#[derive(serde::Deserialize)]
pub struct Signed {
    expires: Option<i64>,
    signature: Option<String>,
}

/// `GET /v1/files/{key}`: an archived output, if the link's signature is ours and unexpired.
pub async fn get_file(
    State(st): State<SharedState>,
    Path(key): Path<String>,
    Query(q): Query<Signed>,
) -> Response {
    let refused = |status: StatusCode, message: &str| {
        let body = json!({
            "code": status.as_u16(),
            "message": message,
            "data": null,
            "error_code": if status == StatusCode::NOT_FOUND { "NOT_FOUND" } else { "INVALID_SIGNATURE" },
        });
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    };
    let (Some(expires), Some(signature)) = (q.expires, q.signature) else {
        return refused(StatusCode::FORBIDDEN, "the link is not signed");
    };
    if !st.tasks.archive.verify(&key, expires, &signature) {
        return refused(
            StatusCode::FORBIDDEN,
            "the link's signature is not valid or it has expired; read the task again for a fresh link",
        );
    }
    match st.tasks.archive.open(&key).await {
        Ok((stream, size)) => {
            let stream = stream.map(|r| r.map_err(std::io::Error::other));
            let mut resp = Response::new(Body::from_stream(stream));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::tasks::archive::content_type_of(&key)),
            );
            if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
                h.insert(header::CONTENT_LENGTH, v);
            }
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=3600"),
            );
            h.insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            resp
        }
        Err(object_store::Error::NotFound { .. }) => refused(StatusCode::NOT_FOUND, "no such file"),
        Err(e) => {
            ApiError::Internal(format!("reading an archived output: {e}")).respond(ErrorShape::Task)
        }
    }
}
