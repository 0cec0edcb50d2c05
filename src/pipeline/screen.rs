//! Step 2, screening: the caller's policy set (the key's, else `default`) over every prompt field
//! of the body, parsed once by the route. A blocked prompt is refused here (400
//! `content_policy_violation`), before any money moves or any upstream sees it.

use crate::app::AppState;
use crate::error::ApiError;
use crate::moderation::ScreenRequest;

use super::admission::Admitted;

/// A screened request: only [`screen`] makes one, and only the money step takes it further.
pub struct Screened {
    pub(super) admitted: Admitted,
}

pub async fn screen(st: &AppState, admitted: Admitted) -> Result<Screened, ApiError> {
    let call = &admitted.call;
    let caller = admitted.caller.as_ref();
    let req = ScreenRequest {
        policy_set: caller.map_or("default", |c| c.policy_set.as_str()),
        key_id: caller.map(|c| c.key_id.as_str()),
        request_id: &call.request_id,
        model: &call.model,
        route: call.route,
    };
    // A large prompt's normalization and matching leave the worker; the policy plugins' calls
    // are async (they yield to tokio at every epoch tick).
    let ruled = super::heavy(call.body.raw.len(), || {
        st.moderator.rules(&call.body.json, &req)
    });
    st.moderator.decide(ruled, &req).await?;
    Ok(Screened { admitted })
}
