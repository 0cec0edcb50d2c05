//! `GET /v1/models` and `GET /v1/models/{id}`: the catalog in OpenAI's list shape, each model
//! with what serves it and the price that is billed for it (the configured price, else the
//! serving plugin's manifest price); `GET /v1/pricing`, the public price list.
//!
//! [`Catalog`]: the listing is assembled from config (the public models), the plugins' manifests
//! and each channel's upstream model list (`build-models-request`), and cached (moka): the
//! rendered list for at most ten seconds, keyed by the plugin set's generation and dropped on a
//! config reload (so either shows at once), the upstream lists until the next good refresh. A
//! background task refreshes every channel's list each `catalog.refresh`; a failed refresh keeps
//! the last good list (and is counted: `tollgate_catalog_refreshes_total{outcome}`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::app::AppState;
use crate::error::ApiError;
use crate::plugins::{ModelInfo, Outbound, Plugin};
use crate::routing::{Route, RoutingError};

pub const ROUTE: &str = "/v1/models";

/// The cached catalog of a gateway.
pub struct Catalog {
    /// Each channel's upstream model list, as last fetched successfully.
    upstream: moka::sync::Cache<String, Arc<Vec<ModelInfo>>>,
    /// The rendered `/v1/models` list, for one refresh period.
    /// Keyed by the plugin set's generation: a plugin added, replaced or removed shows at once.
    rendered: moka::sync::Cache<u64, Arc<Value>>,
    refresh: Duration,
    outcomes: prometheus_client::metrics::family::Family<
        crate::metrics::OutcomeLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Catalog {
    pub fn new(refresh: Duration, metrics: &crate::metrics::Metrics) -> Self {
        let outcomes = prometheus_client::metrics::family::Family::default();
        metrics.register_with(|r| {
            r.register(
                "catalog_refreshes",
                "Upstream model list refreshes by outcome (ok, failed: the last good list is kept)",
                outcomes.clone(),
            );
        });
        Self {
            upstream: moka::sync::Cache::builder().max_capacity(10_000).build(),
            rendered: moka::sync::Cache::builder()
                .max_capacity(2)
                .time_to_live(refresh.min(Duration::from_secs(10)))
                .build(),
            refresh,
            outcomes,
        }
    }

    /// Drop the rendered list (config, plugins or upstream lists changed).
    pub fn invalidate(&self) {
        self.rendered.invalidate_all();
    }

    fn upstream_lists(&self, channel: &str) -> Option<Arc<Vec<ModelInfo>>> {
        self.upstream.get(channel)
    }

    /// Fetch every channel's upstream model list once; failures keep the last good list.
    pub async fn refresh_once(&self, st: &AppState) {
        let mut seen = std::collections::BTreeSet::new();
        for (route, plugin) in st.routing.models() {
            let Some(plugin) = plugin else { continue };
            if !seen.insert(route.channel.name.clone()) {
                continue;
            }
            let outcome = match fetch(st, &route, &plugin).await {
                Ok(Some(models)) => {
                    self.upstream
                        .insert(route.channel.name.clone(), Arc::new(models));
                    "ok"
                }
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(channel = %route.channel.name, error = %e, "refreshing the upstream model list failed; keeping the last good one");
                    "failed"
                }
            };
            self.outcomes
                .get_or_create(&crate::metrics::OutcomeLabels { outcome })
                .inc();
        }
        self.invalidate();
    }

    /// Refresh every `catalog.refresh` until the gateway stops.
    pub fn start(st: &crate::app::SharedState) {
        let st2 = st.clone();
        let stopping = st.background.stopping();
        st.background.spawn(async move {
            tokio::pin!(stopping);
            loop {
                st2.catalog.refresh_once(&st2).await;
                tokio::select! {
                    biased;
                    () = &mut stopping => break,
                    () = tokio::time::sleep(st2.catalog.refresh) => {}
                }
            }
        });
    }
}

/// One channel's upstream model list (`None`: the plugin has no listing).
async fn fetch(
    st: &AppState,
    route: &Route,
    plugin: &Plugin,
) -> Result<Option<Vec<ModelInfo>>, ApiError> {
    let ctx = route.context();
    let mut session = plugin.session().await?;
    let Some(out) = session.build_models_request(&ctx).await? else {
        return Ok(None);
    };
    let resp = match out {
        Outbound::Answer(r) => r,
        Outbound::Send(req) => {
            let target = crate::upstream::Target {
                channel: &route.channel.name,
                base_url: &route.channel.base_url,
                auth: &plugin.manifest.auth,
                credential: route.channel.credential.as_ref(),
            };
            st.upstream.send(&target, req).await?.read().await?
        }
    };
    Ok(Some(session.parse_models_response(&ctx, resp).await?))
}

/// Every public model (cached for `catalog.refresh`).
pub fn list(st: &AppState) -> Value {
    let generation = st.routing.plugins().generation();
    let v = st.catalog.rendered.get_with(generation, || {
        let data: Vec<Value> = st
            .routing
            .models()
            .into_iter()
            .map(|(route, plugin)| model_json(st, &route, plugin.as_deref()))
            .collect();
        Arc::new(json!({ "object": "list", "data": data }))
    });
    (*v).clone()
}

/// One public model, or 404 in OpenAI's body.
pub fn get(st: &AppState, id: &str) -> Result<Value, ApiError> {
    list(st)["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == id).cloned())
        .ok_or_else(|| RoutingError::UnknownModel(id.to_string()).into())
}

/// `GET /v1/pricing`: every public model's billed price, in USD (per million tokens, per image,
/// per second, per request), as a public price list.
pub fn pricing(st: &AppState) -> Value {
    let usd = |pico: u64, per: u64| -> String {
        crate::billing::Credits(i64::try_from(pico.saturating_mul(per)).unwrap_or(i64::MAX))
            .to_string()
    };
    let data: Vec<Value> = st
        .routing
        .models()
        .into_iter()
        .filter_map(|(route, plugin)| {
            let p = route.price_with(plugin.as_deref())?;
            Some(json!({
                "model": route.model,
                "free": route.free,
                "usd": {
                    "input_per_million_tokens": usd(p.input_per_token, 1_000_000),
                    "output_per_million_tokens": usd(p.output_per_token, 1_000_000),
                    "per_image": usd(p.per_image, 1),
                    "per_second": usd(p.per_second, 1),
                    "per_request": usd(p.per_request, 1),
                },
            }))
        })
        .collect();
    json!({ "object": "list", "data": data })
}

fn model_json(st: &AppState, route: &Route, plugin: Option<&Plugin>) -> Value {
    let info = plugin.and_then(|p| route.model_info(p));
    let listed = st.catalog.upstream_lists(&route.channel.name);
    let upstream = listed
        .as_ref()
        .and_then(|l| l.iter().find(|m| m.id == route.upstream_model));
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
            // Whether the upstream's own model list names it (`null`: not known yet).
            "upstream_listed": listed.as_ref().map(|_| upstream.is_some()),
            "kinds": info.map(|m| m.kinds.clone()),
            "context_window": info
                .and_then(|m| m.context_window)
                .or_else(|| upstream.and_then(|m| m.context_window)),
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
