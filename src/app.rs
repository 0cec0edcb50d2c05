//! Builds `AppState`, the two listeners and the layer stack; the one place layer order is written.
//!
//! Public listener, outermost layer first (each layer sees the request before the next):
//! 1. `CatchPanicLayer`: a panicking handler becomes a 500 in OpenAI's body.
//! 2. `server::request_id`: every request gets a fresh `x-request-id` (a client-sent one is
//!    replaced: the id names ledger entries, so it must be ours), copied onto every response.
//! 3. `TraceLayer`: one span per request, named by method and matched path, with the request id;
//!    never the body.
//! 4. (the handlers authenticate the caller themselves: anonymous access depends on the model)
//! 5. `log_errors`: logs an error response once, inside the request span (`ErrorLogged`).
//! 6. `DefaultBodyLimit`: bodies over `server.max_body_bytes` are refused (413, by the extractor).
//!
//! The operator listener (`/metrics`, `/healthz`, `/readyz`) is separate and unauthenticated;
//! bind it to a private address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::serve::ListenerExt;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::billing::Billing;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::plugins::Registry;
use crate::routing::Routing;
use crate::store::Db;
use crate::upstream::Upstream;
use crate::{error, server, telemetry};

/// Everything a request needs, shared by all of them.
pub struct AppState {
    pub config: Arc<Config>,
    pub routing: Routing,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub auth: Authenticator,
    pub billing: Billing,
    pub limiter: crate::limits::Limiter,
    pub moderator: crate::moderation::Moderator,
    /// Background tasks (journal writer, sweeper, checkpoints, releases): stopped last.
    pub background: crate::background::Background,
    /// Bytes of request bodies held at once (`server.max_inflight_body_bytes`).
    pub body_budget: server::listen::BodyBudget,
    /// The async task API: stored tasks, archived outputs, workers' state.
    pub tasks: crate::tasks::Tasks,
    /// The model catalog, cached, with the upstreams' model lists.
    pub catalog: crate::pipeline::models::Catalog,
    /// Turns at the heavy steps of large requests (one per core at once).
    pub heavy_turns: crate::pipeline::HeavyTurns,
    pub ready: AtomicBool,
    /// Digest of the config file as last loaded: an unrelated change in its folder is ignored.
    config_digest: std::sync::Mutex<Option<[u8; 32]>>,
}

pub type SharedState = Arc<AppState>;

/// Failures at start-up: fatal, reported by `main`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Plugins(#[from] crate::plugins::LoadError),
    #[error("building the upstream client: {0}")]
    Upstream(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("watching: {0}")]
    Watch(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("billing at start (the charge journal, open reservations): {0}")]
    Reconcile(#[from] crate::billing::BillingError),
    #[error("tasks: {0}")]
    Tasks(String),
    #[error("limits: {0}")]
    Limits(String),
    #[error("models without a price (give each a `price`, or mark it `free: true`): {}", .0.join(", "))]
    Unpriced(Vec<String>),
    #[error("policies refused:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<crate::policy::PolicyError>),
}

impl AppState {
    pub async fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let background = crate::background::Background::new();
        let db = Db::connect_with(&config.database.url, Some(&background)).await?;
        let auth = Authenticator::new(db.clone(), config.auth.cache_ttl);
        let billing = Billing::for_gateway(
            db,
            crate::billing::Settings::from(&config.billing),
            Some(metrics.clone()),
            &background,
        )
        .await?;
        let policies = crate::policy::PolicyStore::load(
            &config.moderation.policies_dir,
            Some(metrics.clone()),
        )
        .map_err(StartError::Policies)?;
        let released = billing.reconcile(true).await?;
        if released > 0 {
            tracing::warn!(
                released,
                "released reservations left open by an earlier run"
            );
        }
        let plugins = Registry::new(&config.plugins, metrics.clone())?;
        let moderator = crate::moderation::Moderator::new(
            policies,
            Some(plugins.clone()),
            Some(metrics.clone()),
            &config.moderation,
        );
        let health = crate::routing::health::Health::new(
            crate::routing::health::Settings {
                failures: config.routing.breaker_failures,
                cooldown: config.routing.breaker_cooldown,
                auth_cooldown: config.routing.auth_cooldown,
            },
            Some(metrics.clone()),
        );
        let routing = Routing::with_health(&config.routes, plugins, health);
        let unpriced = routing.unpriced(&config.routes);
        if !unpriced.is_empty() {
            return Err(StartError::Unpriced(unpriced));
        }
        preload_tokenizers(&config.routes);
        let upstream = Upstream::new(&config.upstream).map_err(StartError::Upstream)?;
        let digest = config.source.as_deref().and_then(file_digest);
        let tasks =
            crate::tasks::Tasks::open(billing.db().clone(), config.tasks.clone(), Some(&metrics))
                .await
                .map_err(StartError::Tasks)?;
        let restored = tasks.restore_holds(&billing).await;
        if restored > 0 {
            tracing::info!(
                tasks = restored,
                "holding the reservations of unfinished tasks again"
            );
        }
        let limiter = crate::limits::Limiter::from_config(
            &config.limits,
            &config.guard,
            Some(&metrics),
            &background,
        )
        .await
        .map_err(StartError::Limits)?;
        limiter.guard.refresh_gauge(billing.db()).await;
        let body_budget = server::listen::BodyBudget::new(
            config.server.max_inflight_body_bytes,
            config.server.max_body_bytes,
        );
        let catalog = crate::pipeline::models::Catalog::new(config.catalog_refresh, &metrics);
        Ok(Arc::new(Self {
            config: Arc::new(config),
            routing,
            upstream,
            metrics,
            auth,
            billing,
            limiter,
            moderator,
            body_budget,
            tasks,
            catalog,
            heavy_turns: crate::pipeline::HeavyTurns::per_core(),
            background,
            ready: AtomicBool::new(false),
            config_digest: std::sync::Mutex::new(digest),
        }))
    }

    /// Re-read channels and models from the config file; a bad file keeps the old ones.
    pub fn reload_routes(&self) {
        let Some(path) = &self.config.source else {
            return;
        };
        let digest = file_digest(path);
        {
            let mut last = self
                .config_digest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if digest.is_none() {
                self.metrics.config_reload("refused");
                tracing::warn!(file = %path.display(), "config file cannot be read; the previous channels and models keep serving");
                return;
            }
            if *last == digest {
                return;
            }
            *last = digest;
        }
        let loaded = crate::config::reload_routes(path).and_then(|routes| {
            let unpriced = self.routing.unpriced(&routes);
            if unpriced.is_empty() {
                Ok(routes)
            } else {
                Err(crate::config::ConfigError::Invalid(
                    unpriced
                        .into_iter()
                        .map(|m| {
                            format!(
                                "models: `{m}` has no price (give it one, or mark it `free: true`)"
                            )
                        })
                        .collect(),
                ))
            }
        });
        match loaded {
            Ok(routes) => {
                preload_tokenizers(&routes);
                self.routing.replace(&routes);
                self.catalog.invalidate();
                self.metrics.config_reload("loaded");
                tracing::info!(file = %path.display(), "channels and models reloaded");
            }
            Err(e) => {
                self.metrics.config_reload("refused");
                tracing::warn!(file = %path.display(), error = %e, "config change refused; the previous channels and models keep serving");
            }
        }
    }
}

/// Load the tokenizers the models count their prompts with, once, before any request needs them.
fn preload_tokenizers(routes: &crate::config::RoutesConfig) {
    for m in &routes.models {
        crate::pipeline::tokens::preload(m.tokenizer);
    }
}

fn file_digest(path: &std::path::Path) -> Option<[u8; 32]> {
    use sha2::Digest;
    std::fs::read(path)
        .ok()
        .map(|bytes| sha2::Sha256::digest(&bytes).into())
}

/// The public API router with its layer stack.
pub fn public_router(state: SharedState) -> Router {
    let max_body = state.config.server.max_body_bytes;
    let layers = ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(error::panic_response))
        .layer(axum::middleware::from_fn(server::request_id))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(telemetry::request_span)
                .on_failure(()),
        )
        .layer(axum::middleware::from_fn(server::log_errors))
        .layer(DefaultBodyLimit::max(max_body));
    server::public_routes().with_state(state).layer(layers)
}

/// The operator router: metrics and health.
pub fn operator_router(state: SharedState) -> Router {
    server::operator_routes()
        .merge(crate::admin::router())
        .with_state(state)
        .layer(axum::middleware::from_fn(server::log_errors))
        .layer(axum::middleware::from_fn(server::request_id))
}

/// A running gateway: its bound addresses, and what keeps it alive.
pub struct Running {
    pub public_addr: SocketAddr,
    pub operator_addr: SocketAddr,
    pub state: SharedState,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    _watches: Vec<crate::watch::Watch>,
}

impl Running {
    /// Stop reloading and accepting; let requests and streams in flight finish (for at most
    /// `server.shutdown_grace`, then cut); move every journaled charge into the ledger; then
    /// stop the background tasks and wait for each to finish its last step.
    pub async fn shutdown(self) {
        drop(self._watches);
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Err(e) = self.state.billing.flush().await {
            tracing::error!(error = %e, "charges stay in the journal; the next start moves them into the ledger");
        }
        self.state.background.stop().await;
        tracing::info!("shut down");
    }

    /// Wait until the process is asked to stop (SIGINT/SIGTERM), then shut down.
    pub async fn run_until_signal(self) {
        telemetry::wait_for_signal().await;
        tracing::info!("shutting down: finishing requests in flight");
        self.shutdown().await;
    }
}

/// Bind both listeners, start watching plugins and config, and serve.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let public_listen = config.server.listen;
    let operator_listen = config.operator.listen;
    let watch_plugins = config.plugins.watch;
    let state = AppState::new(config).await?;
    let mut watches = Vec::new();
    if watch_plugins {
        watches.push(
            state
                .routing
                .plugins()
                .watch(&state.background)
                .map_err(|e| StartError::Watch(e.to_string()))?,
        );
    }
    if state.config.moderation.watch {
        // A change may not remove a set that keys name: the watcher asks the database which
        // sets are in use (from its own thread, on the serving runtime).
        let weak = Arc::downgrade(&state);
        let rt = tokio::runtime::Handle::current();
        let in_use = move || {
            let Some(st) = weak.upgrade() else {
                return std::collections::BTreeSet::new();
            };
            rt.block_on(crate::accounts::keys::policy_sets_in_use(&st.billing))
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "reading the policy sets keys use failed; keeping every set that exists now");
                    st.moderator.policies.current().set_names().into_iter().collect()
                })
        };
        watches.push(
            state
                .moderator
                .policies
                .watch_keeping(&state.background, in_use)
                .map_err(StartError::Watch)?,
        );
    }
    if let Some(path) = state.config.source.clone() {
        let weak = Arc::downgrade(&state);
        let file = std::fs::canonicalize(&path).unwrap_or(path);
        watches.push(
            crate::watch::spawn_file(&state.background, file, move || {
                if let Some(st) = weak.upgrade() {
                    st.reload_routes();
                }
            })
            .map_err(StartError::Watch)?,
        );
    }
    let public = tokio::net::TcpListener::bind(public_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: public_listen,
            source,
        })?;
    let operator = tokio::net::TcpListener::bind(operator_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: operator_listen,
            source,
        })?;
    let public_addr = public.local_addr().map_err(|source| StartError::Bind {
        addr: public_listen,
        source,
    })?;
    let operator_addr = operator.local_addr().map_err(|source| StartError::Bind {
        addr: operator_listen,
        source,
    })?;
    if state.config.tasks.public_url.is_none() {
        state
            .tasks
            .archive
            .set_public_url(format!("http://{public_addr}"));
    }
    crate::tasks::start(&state);
    crate::pipeline::models::Catalog::start(&state);
    // Small responses and SSE frames must leave at once: no Nagle delay on accepted sockets
    // (the public listener sets it on each connection it accepts).
    let operator = operator.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let app = public_router(state.clone());
    let op = operator_router(state.clone());
    tasks.spawn(server::listen::serve(
        public,
        app,
        state.config.server.clone(),
        state.metrics.clone(),
        shutdown.clone(),
    ));
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let r = axum::serve(operator, op)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "operator listener failed");
        }
    });
    // The sweeper: reservations whose request died with another instance stop being renewed,
    // expire and are released; it runs at least twice per reservation lifetime.
    let sweeper = Arc::downgrade(&state);
    let stopping = state.background.stopping();
    let every = sweep_period(state.config.billing.reservation_ttl);
    state.background.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                () = &mut stopping => break,
                _ = tick.tick() => {}
            }
            let Some(st) = sweeper.upgrade() else { break };
            if let Err(e) = st.billing.reconcile(false).await {
                tracing::warn!(error = %e, "sweeping expired reservations failed");
            }
        }
    });
    state.ready.store(true, Ordering::Release);
    tracing::info!(%public_addr, %operator_addr, "tollgate is serving");
    Ok(Running {
        public_addr,
        operator_addr,
        state,
        shutdown,
        tasks,
        _watches: watches,
    })
}

/// How often the sweeper runs: every 30 s, or twice per reservation lifetime if that is shorter.
fn sweep_period(reservation_ttl: std::time::Duration) -> std::time::Duration {
    (reservation_ttl / 2).clamp(
        std::time::Duration::from_millis(1),
        std::time::Duration::from_secs(30),
    )
}
