//! `GET /v1/models` and `GET /v1/models/{id}`: the catalog in OpenAI's list shape, each model
//! with what serves it and the price that is billed for it (the configured price, else the
//! serving plugin's manifest price).

use serde_json::{Value, json};

use crate::app::AppState;
use crate::error::ApiError;
use crate::plugins::Plugin;
use crate::routing::{Route, RoutingError};

pub const ROUTE: &str = "/v1/models";

/// Every public model.
pub fn list(st: &AppState) -> Value {
    let data: Vec<Value> = st
        .routing
        .models()
        .into_iter()
        .map(|(route, plugin)| model_json(&route, plugin.as_deref()))
        .collect();
    json!({ "object": "list", "data": data })
}

/// One public model, or 404 in OpenAI's body.
pub fn get(st: &AppState, id: &str) -> Result<Value, ApiError> {
    st.routing
        .models()
        .into_iter()
        .find(|(r, _)| r.model == id)
        .map(|(route, plugin)| model_json(&route, plugin.as_deref()))
        .ok_or_else(|| RoutingError::UnknownModel(id.to_string()).into())
}

fn model_json(route: &Route, plugin: Option<&Plugin>) -> Value {
    let info = plugin.and_then(|p| route.model_info(p));
    json!({
        "id": route.model,
        "object": "model",
        "created": 0,
        "owned_by": route.channel.plugin,
        "tollgate": {
            "channel": route.channel.name,
            "provider": plugin.map(|p| json!({
                "name": p.manifest.name,
                "version": p.manifest.version,
            })),
            "available": plugin.is_some(),
            "kinds": info.map(|m| m.kinds.clone()),
            "context_window": info.and_then(|m| m.context_window),
            "pricing": route.price_with(plugin).map(|p| json!({
                "unit": "1e-12 USD",
                "input_per_token": p.input_per_token,
                "output_per_token": p.output_per_token,
                "per_image": p.per_image,
                "per_second": p.per_second,
                "per_request": p.per_request,
            })),
        }
    })
}
