//! Step 1, admission: who may call what, and how much of it. Resolves the model's route and
//! plugin, refuses an anonymous caller on a model that needs a key and a key on a model outside
//! its allow-list, counts the prompt's tokens with the model's tokenizer, prices the request's
//! [`Need`], and takes the key's place under its limits. Nothing here judges prompt text (it is
//! only counted); a refusal here has consumed nothing.

use crate::app::AppState;
use crate::auth::{AuthError, Caller};
use crate::billing::Price;
use crate::error::ApiError;
use crate::routing::Pick;

use super::money::{self, Estimate};
use super::{Call, Need};

/// An admitted request: only [`admit`] makes one, and only screening takes it further.
pub struct Admitted {
    pub(super) call: Call,
    pub(super) caller: Option<Caller>,
    pub(super) pick: Pick,
    pub(super) price: Price,
    pub(super) estimate: Estimate,
    /// The key's place under its and its account's limits, until the request ends (`None`: no
    /// limits and no guard, or anonymous).
    pub(super) place: Option<crate::limits::Admitted>,
}

/// Who may call the model: an anonymous caller only for the models config opens to everyone; a
/// key only for the models it allows.
pub fn authorize(caller: Option<&Caller>, pick: &Pick, model: &str) -> Result<(), ApiError> {
    match caller {
        None if !pick.route.anonymous => Err(AuthError::Missing.into()),
        Some(c) if !c.allows_model(model) => Err(ApiError::ModelNotAllowed(model.to_string())),
        _ => Ok(()),
    }
}

/// The output cap of a request: the client's, else the model's, else the configured default.
pub fn output_cap(st: &AppState, pick: &Pick, need: &Need) -> u64 {
    if !need.output {
        return 0;
    }
    need.max_output_tokens
        .or_else(|| {
            pick.model_info()
                .and_then(|m| m.max_output_tokens)
                .map(u64::from)
        })
        .unwrap_or(st.config.billing.default_max_output_tokens)
}

/// Admit a request: route, caller, estimate, limits, in that order.
pub async fn admit(
    st: &AppState,
    caller: Option<Caller>,
    mut call: Call,
) -> Result<Admitted, ApiError> {
    let pick = st.routing.pick(&call.model)?;
    authorize(caller.as_ref(), &pick, &call.model)?;
    // The prompt counted with the model's tokenizer (off the worker for a large body); an
    // anonymous call is neither billed nor limited, so its prompt is not counted.
    if caller.is_some() {
        let tokenizer = pick.route.tokenizer;
        call.need.prompt_tokens = super::heavy(call.body.raw.len(), || {
            (call.prompt)(tokenizer, &call.body.json)
        });
    }
    // A keyed call is billed: its model must have a price (or be marked free). An anonymous
    // call to an open model is never billed.
    let price = match &caller {
        Some(_) => pick.price()?,
        None => pick.price().unwrap_or_default(),
    };
    let estimate = money::estimate(&price, &call.need, output_cap(st, &pick, &call.need));
    let place = match &caller {
        Some(c) => {
            let blocks = st.moderator.record.blocks_for_key(&c.key_id);
            st.limiter
                .guard(st.billing.db(), &st.auth, &c.key_id, blocks)
                .await?;
            st.limiter
                .admit(
                    &st.billing,
                    crate::limits::Ask {
                        account_id: &c.account_id,
                        key_id: &c.key_id,
                        limits: &c.limits,
                        account_limits: &c.account_limits,
                        tokens: estimate.tokens(),
                        estimate: estimate.cost,
                    },
                )
                .await?
        }
        None => None,
    };
    Ok(Admitted {
        call,
        caller,
        pick,
        price,
        estimate,
        place,
    })
}
