//! One request's sandboxed instance of a provider plugin (`Session`): every call `async`, with
//! a fresh CPU budget (yielding to tokio at every epoch tick), its output checked, a failure
//! classified (trap, CPU or memory overrun, guest error).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use wasmtime::Store;

use super::pool::{Idle, Pool};
use super::*;

impl Plugin {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// An instance for one request: an idle one if the plugin's instances are reused and one is
    /// at hand (it starts with `build_request`), else a fresh store and instance. The session owns
    /// everything it needs, so it can travel with a response stream.
    pub async fn session(&self) -> Result<Session, PluginError> {
        self.start_session(Yielding::Tokio, true).await
    }

    /// A fresh instance, never an idle one: for a call that does not start with `build_request`
    /// (a large request's answer), so no state an earlier request left can reach it.
    pub async fn fresh_session(&self) -> Result<Session, PluginError> {
        self.start_session(Yielding::Tokio, false).await
    }

    pub(super) async fn start_session(
        &self,
        yielding: Yielding,
        take_idle: bool,
    ) -> Result<Session, PluginError> {
        // A request's session (tokio yielding) goes back to the pool if the plugin keeps them.
        let pool = self.pool.as_ref().filter(|_| yielding == Yielding::Tokio);
        let session = |store, guest, uses| Session {
            host: self.host.clone(),
            name: self.manifest.name.as_str().into(),
            store: Some(store),
            guest,
            back: pool.map(|p| Back {
                pool: p.clone(),
                uses,
                retired: AtomicBool::new(false),
                mid_stream: AtomicBool::new(false),
            }),
        };
        if let Some(idle) = pool.filter(|_| take_idle).and_then(|p| p.take()) {
            return Ok(session(idle.store, idle.guest, idle.uses));
        }
        let mut store = self.host.new_store(yielding);
        let instance = self.pre.instantiate_async(&mut store).await.map_err(|e| {
            let text = format!("{e:#}");
            if text.contains("maximum concurrent") || text.contains("pooling") {
                PluginError::Busy {
                    plugin: self.name().into(),
                }
            } else {
                classify(self.name(), "instantiate", &store, e)
            }
        })?;
        Ok(session(
            store,
            instance.tollgate_plugin_provider_api().clone(),
            0,
        ))
    }
}

pub(super) fn classify(
    plugin: &str,
    call: &'static str,
    store: &Store<GuestState>,
    err: wasmtime::Error,
) -> PluginError {
    if store.data().hit_memory_limit {
        return PluginError::OutOfMemory {
            plugin: plugin.into(),
            call,
        };
    }
    if let Some(wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        return PluginError::Timeout {
            plugin: plugin.into(),
            call,
        };
    }
    PluginError::Trap {
        plugin: plugin.into(),
        call,
        detail: format!("{err:#}"),
    }
}

/// One request's instance of a plugin. Every call gets a fresh CPU budget.
pub struct Session {
    host: Arc<HostCore>,
    name: Arc<str>,
    /// The store, lent to each call; `None` once a call was cancelled (its future dropped
    /// mid-call), after which the instance is not used again.
    store: Option<Store<GuestState>>,
    guest: wit::Guest,
    /// Where the instance goes back when the session ends, if the plugin's are reused.
    back: Option<Back>,
}

/// A reused plugin's pool, and whether this instance may go back to it.
struct Back {
    pool: Arc<Pool<wit::Guest>>,
    uses: u32,
    /// The instance is dropped, not reused: a call failed in the sandbox (trap, overrun) or gave
    /// output the host refused.
    retired: AtomicBool,
    /// A stream is being translated and has not reached its end: the translator's state is
    /// mid-stream, and the instance is not reused.
    mid_stream: AtomicBool,
}

impl Drop for Session {
    fn drop(&mut self) {
        let (Some(back), Some(store)) = (self.back.take(), self.store.take()) else {
            return;
        };
        if !back.retired.load(Ordering::Relaxed) && !back.mid_stream.load(Ordering::Relaxed) {
            back.pool.put(Idle {
                store,
                guest: self.guest.clone(),
                uses: back.uses,
            });
        }
    }
}

impl Session {
    /// A session over an instance made elsewhere (a task step's, which also reads the task
    /// API's exports of the same instance).
    pub(super) fn from_parts(
        host: Arc<HostCore>,
        name: &str,
        store: Store<GuestState>,
        instance: bindings::provider::Provider,
    ) -> Self {
        Self {
            host,
            name: name.into(),
            store: Some(store),
            guest: instance.tollgate_plugin_provider_api().clone(),
            back: None,
        }
    }

    pub(super) fn host(&self) -> &Arc<HostCore> {
        &self.host
    }

    pub fn plugin_name(&self) -> &str {
        &self.name
    }

    /// The provider API's exports of this instance, for a call.
    fn guest(&self) -> wit::Guest {
        self.guest.clone()
    }

    /// End the session without giving its instance back: its memory holds copies of a large
    /// body, so the slot is reset now.
    pub fn discard(self) {
        self.retire();
    }

    /// This instance must not serve another request.
    fn retire(&self) {
        if let Some(back) = &self.back {
            back.retired.store(true, Ordering::Relaxed);
        }
    }

    /// Run one call of the guest: `f` is lent the store and gives it back with the call's
    /// result (a future, so the call runs `async` on its fiber and yields at every epoch tick).
    /// The call gets a fresh CPU budget; its duration is measured and a failure is classified
    /// and counted. Every call of every world goes through here.
    pub(super) async fn run<T, Fut>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(Store<GuestState>) -> Fut,
    ) -> Result<T, PluginError>
    where
        Fut: Future<Output = (Store<GuestState>, wasmtime::Result<T>)>,
    {
        let Some(mut store) = self.store.take() else {
            return Err(PluginError::Trap {
                plugin: self.name.to_string(),
                call,
                detail: "an earlier call of this session was cancelled".into(),
            });
        };
        start_call(&mut store);
        let started = Instant::now();
        let (store, out) = f(store).await;
        let metrics = &self.host.metrics;
        metrics.plugin_call(&self.name, call, started.elapsed());
        let out = out.map_err(|e| {
            let err = classify(&self.name, call, &store, e);
            metrics.plugin_failure(&self.name, call, err.reason());
            err
        });
        if out.is_err() {
            self.retire();
        }
        self.store = Some(store);
        out
    }

    /// An upstream 401 or 403 answer is the upstream refusing the channel's credential, an
    /// error whatever the plugin made of it (the host saw the status itself).
    pub(super) fn refused_credential(
        &self,
        ctx: &ChannelContext,
        call: &'static str,
        status: u16,
    ) -> Option<PluginError> {
        matches!(status, 401 | 403).then(|| {
            let e = wtypes::PluginError {
                class: wtypes::ErrorClass::Auth,
                message: "the plugin did not report the upstream's refusal as an error".into(),
                status: Some(status),
                retry_after_ms: None,
            };
            self.guest_error(ctx, call, e, Some(status))
        })
    }

    /// A guest's error, with its message redacted (see [`guest_error`]).
    pub(super) fn guest_error(
        &self,
        ctx: &ChannelContext,
        call: &'static str,
        e: wtypes::PluginError,
        upstream_status: Option<u16>,
    ) -> PluginError {
        guest_error(&self.host, &self.name, ctx, call, e, upstream_status)
    }

    pub(super) fn bad_output(&self, call: &'static str, detail: impl Into<String>) -> PluginError {
        self.retire();
        let err = PluginError::BadOutput {
            plugin: self.name.to_string(),
            call,
            detail: detail.into(),
        };
        self.host
            .metrics
            .plugin_failure(&self.name, call, err.reason());
        err
    }

    pub async fn manifest(&mut self) -> Result<Manifest, PluginError> {
        let g = self.guest();
        let m = self
            .run("manifest", |mut s| async move {
                let r = g.call_describe(&mut s).await;
                (s, r)
            })
            .await?;
        Ok(Manifest {
            name: m.name,
            version: m.version,
            kinds: m.kinds,
            auth: match m.auth {
                wtypes::AuthScheme::None => AuthScheme::None,
                wtypes::AuthScheme::Bearer => AuthScheme::Bearer,
                wtypes::AuthScheme::CustomHeader(h) => AuthScheme::Header(h),
                wtypes::AuthScheme::QueryParam(q) => AuthScheme::Query(q),
            },
            models: m.models.into_iter().map(model_info).collect(),
            config_keys: m.config_keys,
        })
    }

    /// The request that lists the upstream's models (checked like any built request), if the
    /// plugin has one.
    pub async fn build_models_request(
        &mut self,
        ctx: &ChannelContext,
    ) -> Result<Option<Outbound>, PluginError> {
        let wctx = wit_ctx(ctx);
        let g = self.guest();
        let out = self
            .run("build_models_request", |mut s| async move {
                let r = g.call_build_models_request(&mut s, &wctx).await;
                (s, r)
            })
            .await?;
        out.map(|req| {
            checked_outbound(
                &self.host,
                &self.name,
                "build_models_request",
                wtypes::Outbound::Send(req),
            )
            .inspect_err(|_| self.retire())
        })
        .transpose()
    }

    /// The upstream's model list, from its answer.
    pub async fn parse_models_response(
        &mut self,
        ctx: &ChannelContext,
        response: InboundResponse,
    ) -> Result<Vec<ModelInfo>, PluginError> {
        let wctx = wit_ctx(ctx);
        let status = response.status;
        let wresp = wit_response(response);
        let g = self.guest();
        let out = self
            .run("parse_models_response", |mut s| async move {
                let r = g.call_parse_models_response(&mut s, &wctx, &wresp).await;
                (s, r)
            })
            .await?;
        match out {
            Err(e) => Err(self.guest_error(ctx, "parse_models_response", e, Some(status))),
            Ok(_) if !(200..300).contains(&status) => Err(self.bad_output(
                "parse_models_response",
                format!("upstream status {status} was not reported as an error"),
            )),
            Ok(models) => Ok(models.into_iter().map(model_info).collect()),
        }
    }

    pub async fn build_request(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        request: &str,
    ) -> Result<Outbound, PluginError> {
        let wctx = wit_ctx(ctx);
        let g = self.guest();
        let out = self
            .run("build_request", |mut s| async move {
                let r = g.call_build_request(&mut s, &wctx, kind, request).await;
                (s, r)
            })
            .await?;
        match out {
            Err(e) => Err(self.guest_error(ctx, "build_request", e, None)),
            Ok(out) => checked_outbound(&self.host, &self.name, "build_request", out)
                .inspect_err(|_| self.retire()),
        }
    }

    pub async fn parse_response(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        response: InboundResponse,
    ) -> Result<String, PluginError> {
        let wctx = wit_ctx(ctx);
        let status = response.status;
        let wresp = wit_response(response);
        let g = self.guest();
        let out = self
            .run("parse_response", |mut s| async move {
                let r = g.call_parse_response(&mut s, &wctx, kind, &wresp).await;
                (s, r)
            })
            .await?;
        match out {
            Err(e) => Err(self.guest_error(ctx, "parse_response", e, Some(status))),
            Ok(body) => match self.refused_credential(ctx, "parse_response", status) {
                Some(e) => Err(e),
                None => Ok(body),
            },
        }
    }

    pub async fn parse_stream_event(
        &mut self,
        ctx: &ChannelContext,
        event: Option<String>,
        data: String,
    ) -> Result<StreamOutput, PluginError> {
        if let Some(back) = &self.back {
            back.mid_stream.store(true, Ordering::Relaxed);
        }
        let wctx = wit_ctx(ctx);
        let ev = wtypes::SseEvent { event, data };
        let g = self.guest();
        let out = self
            .run("parse_stream_event", |mut s| async move {
                let r = g.call_parse_stream_event(&mut s, &wctx, &ev).await;
                (s, r)
            })
            .await?;
        match out {
            Ok(o) => {
                if let (true, Some(back)) = (o.done, &self.back) {
                    back.mid_stream.store(false, Ordering::Relaxed);
                }
                Ok(StreamOutput {
                    chunks: o.chunks,
                    done: o.done,
                })
            }
            Err(e) => Err(self.guest_error(ctx, "parse_stream_event", e, None)),
        }
    }

    /// A parse failure of the plugin's output detected by the host.
    pub fn reject_output(&self, call: &'static str, detail: impl Into<String>) -> PluginError {
        self.bad_output(call, detail)
    }
}

/// A guest's error, with its message redacted. `upstream_status` is the status the host
/// itself saw (for `parse_response`). A 401 or 403 is the upstream refusing the channel's
/// credential whatever class the plugin chose: counted per channel and logged for the operator.
pub(super) fn guest_error(
    host: &HostCore,
    name: &str,
    ctx: &ChannelContext,
    call: &'static str,
    e: wtypes::PluginError,
    upstream_status: Option<u16>,
) -> PluginError {
    let mut class = match e.class {
        wtypes::ErrorClass::InvalidRequest => GuestErrorClass::InvalidRequest,
        wtypes::ErrorClass::RateLimited => GuestErrorClass::RateLimited,
        wtypes::ErrorClass::Auth => GuestErrorClass::Auth,
        wtypes::ErrorClass::ContentRefused => GuestErrorClass::ContentRefused,
        wtypes::ErrorClass::NotFound => GuestErrorClass::NotFound,
        wtypes::ErrorClass::Upstream => GuestErrorClass::Upstream,
    };
    let from_upstream = !call.starts_with("build_");
    let status = upstream_status
        .filter(|s| !(200..300).contains(s))
        .or(e.status)
        .filter(|s| (100..=599).contains(s));
    if from_upstream && matches!(status, Some(401 | 403)) {
        class = GuestErrorClass::Auth;
    }
    let message = redact(&e.message);
    if class == GuestErrorClass::Auth {
        host.metrics.upstream_auth_failure(&ctx.channel);
        tracing::error!(
            channel = %ctx.channel,
            plugin = %name,
            call,
            upstream_status = status,
            detail = %message,
            "the provider refused the channel's credential: check or rotate the key in the \
             environment variable the channel names"
        );
    }
    PluginError::Guest {
        plugin: name.to_string(),
        class,
        message,
        status,
        retry_after_ms: e.retry_after_ms,
        from_upstream,
    }
}

/// A request a plugin built (`build_*`), checked: a valid method, a path that stays under the
/// channel's base URL, and no header the host owns. Anything else is the plugin's bad output.
pub(super) fn checked_outbound(
    host: &HostCore,
    name: &str,
    call: &'static str,
    out: wtypes::Outbound,
) -> Result<Outbound, PluginError> {
    let bad = |detail: &str| {
        let err = PluginError::BadOutput {
            plugin: name.to_string(),
            call,
            detail: detail.into(),
        };
        host.metrics.plugin_failure(name, call, err.reason());
        err
    };
    match out {
        wtypes::Outbound::Send(req) => {
            let method = http::Method::from_bytes(req.method.as_bytes())
                .map_err(|_| bad("invalid HTTP method"))?;
            crate::upstream::guard::check_path(&req.path).map_err(|why| bad(why.0))?;
            let mut headers = http::HeaderMap::new();
            for h in req.headers {
                let name = http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| bad("invalid header name"))?;
                crate::upstream::guard::check_header(name.as_str()).map_err(|why| bad(why.0))?;
                let value = http::HeaderValue::from_str(&h.value)
                    .map_err(|_| bad("invalid header value"))?;
                headers.append(name, value);
            }
            Ok(Outbound::Send(OutboundRequest {
                method,
                path: req.path,
                headers,
                body: req.body,
                stream: req.stream,
            }))
        }
        wtypes::Outbound::Answer(resp) => Ok(Outbound::Answer(InboundResponse {
            status: resp.status,
            headers: resp
                .headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
            body: resp.body,
        })),
    }
}

/// A response in the WIT's shape, for a `parse-*` call.
pub(super) fn wit_response(response: InboundResponse) -> wtypes::HttpResponse {
    wtypes::HttpResponse {
        status: response.status,
        headers: response
            .headers
            .into_iter()
            .map(|(name, value)| wtypes::Header { name, value })
            .collect(),
        body: response.body,
    }
}

pub(super) fn wit_ctx(ctx: &ChannelContext) -> wtypes::ChannelContext {
    wtypes::ChannelContext {
        channel: ctx.channel.clone(),
        base_url: ctx.base_url.clone(),
        model: ctx.model.clone(),
        options: ctx.options.clone(),
    }
}

pub(super) fn model_info(m: wtypes::ModelInfo) -> ModelInfo {
    ModelInfo {
        id: m.id,
        kinds: m.kinds,
        context_window: m.context_window,
        max_output_tokens: m.max_output_tokens,
        price: m.price.map(|p| crate::billing::Price {
            input_per_token: p.input_per_token,
            output_per_token: p.output_per_token,
            per_image: p.per_image,
            per_second: p.per_second,
            per_request: p.per_request,
        }),
    }
}
