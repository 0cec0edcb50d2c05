//! The task API of a provider plugin (a component of the `task-provider` world): one sandboxed
//! instance per task step ([`TaskSession`]), the same limits as a request's [`Session`], its
//! built requests checked the same way, its answers converted into host types.
//!
//! [`Session`]: super::Session

use std::sync::Arc;
use std::time::Instant;

use wasmtime::Store;

use super::bindings::task_provider::exports::tollgate::plugin::task_api as twit;
use super::session::{checked_outbound, classify, guest_error, wit_ctx};
use super::*;

/// One file a finished job produced, where the upstream keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobOutput {
    pub url: String,
    pub content_type: Option<String>,
}

/// A job's state as the plugin read it from the upstream.
#[derive(Debug)]
pub enum JobState {
    Running(Option<u8>),
    Succeeded(Vec<JobOutput>),
    Failed(PluginError),
}

impl Plugin {
    /// Whether the plugin exports the task API (it drives long-running jobs).
    pub fn has_tasks(&self) -> bool {
        self.tasks.is_some()
    }

    /// A fresh instance for one task step; `None` if the plugin has no task API.
    pub fn task_session(&self) -> Option<Result<TaskSession, PluginError>> {
        let indices = self.tasks.as_ref()?;
        let mut store = self.host.new_store();
        let made = self
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .and_then(|instance| indices.load(&mut store, &instance));
        Some(match made {
            Ok(instance) => Ok(TaskSession {
                host: self.host.clone(),
                name: self.manifest.name.as_str().into(),
                store,
                instance,
            }),
            Err(e) => Err(classify(self.name(), "instantiate", &store, e)),
        })
    }
}

/// One task step's instance of a plugin. Every call gets a fresh CPU deadline.
pub struct TaskSession {
    host: Arc<HostCore>,
    name: Arc<str>,
    store: Store<GuestState>,
    instance: bindings::task_provider::TaskProvider,
}

impl TaskSession {
    fn run<T>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&twit::Guest, &mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        self.store.set_epoch_deadline(self.host.deadline_ticks);
        let started = Instant::now();
        let guest = self.instance.tollgate_plugin_task_api();
        let out = f(guest, &mut self.store);
        let metrics = &self.host.metrics;
        metrics.plugin_call(&self.name, call, started.elapsed());
        out.map_err(|e| {
            let err = classify(&self.name, call, &self.store, e);
            metrics.plugin_failure(&self.name, call, err.reason());
            err
        })
    }

    pub fn build_submit(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        input: &str,
    ) -> Result<Outbound, PluginError> {
        let wctx = wit_ctx(ctx);
        match self.run("build_submit", |g, s| {
            g.call_build_submit(s, &wctx, kind, input)
        })? {
            Err(e) => Err(guest_error(
                &self.host,
                &self.name,
                ctx,
                "build_submit",
                e,
                None,
            )),
            Ok(out) => checked_outbound(&self.host, &self.name, "build_submit", out),
        }
    }

    /// The job id and the state the submission's answer shows.
    pub fn parse_submit(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        response: InboundResponse,
    ) -> Result<(String, JobState), PluginError> {
        let wctx = wit_ctx(ctx);
        let status = response.status;
        let wresp = wit_response(response);
        match self.run("parse_submit", |g, s| {
            g.call_parse_submit(s, &wctx, kind, &wresp)
        })? {
            Err(e) => Err(guest_error(
                &self.host,
                &self.name,
                ctx,
                "parse_submit",
                e,
                Some(status),
            )),
            Ok(sub) => {
                let state = self.state(ctx, "parse_submit", status, sub.state)?;
                if sub.job_id.is_empty() || sub.job_id.len() > 512 {
                    return Err(self.bad_output("parse_submit", "the job id is empty or too long"));
                }
                Ok((sub.job_id, state))
            }
        }
    }

    pub fn build_poll(
        &mut self,
        ctx: &ChannelContext,
        job_id: &str,
    ) -> Result<Outbound, PluginError> {
        let wctx = wit_ctx(ctx);
        match self.run("build_poll", |g, s| g.call_build_poll(s, &wctx, job_id))? {
            Err(e) => Err(guest_error(
                &self.host,
                &self.name,
                ctx,
                "build_poll",
                e,
                None,
            )),
            Ok(out) => checked_outbound(&self.host, &self.name, "build_poll", out),
        }
    }

    pub fn parse_poll(
        &mut self,
        ctx: &ChannelContext,
        job_id: &str,
        response: InboundResponse,
    ) -> Result<JobState, PluginError> {
        let wctx = wit_ctx(ctx);
        let status = response.status;
        let wresp = wit_response(response);
        match self.run("parse_poll", |g, s| {
            g.call_parse_poll(s, &wctx, job_id, &wresp)
        })? {
            Err(e) => Err(guest_error(
                &self.host,
                &self.name,
                ctx,
                "parse_poll",
                e,
                Some(status),
            )),
            Ok(state) => self.state(ctx, "parse_poll", status, state),
        }
    }

    /// A guest's job state in host types, checked: a success names at least one output, at
    /// most 64, each with a URL of at most 64 KiB (a `data:` URL may be larger: up to the
    /// plugin's memory); an upstream refusal of the credential is an error whatever the
    /// plugin made of it.
    fn state(
        &self,
        ctx: &ChannelContext,
        call: &'static str,
        status: u16,
        state: twit::JobState,
    ) -> Result<JobState, PluginError> {
        if matches!(status, 401 | 403) {
            let e = wtypes::PluginError {
                class: wtypes::ErrorClass::Auth,
                message: "the plugin did not report the upstream's refusal as an error".into(),
                status: Some(status),
                retry_after_ms: None,
            };
            return Err(guest_error(
                &self.host,
                &self.name,
                ctx,
                call,
                e,
                Some(status),
            ));
        }
        Ok(match state {
            twit::JobState::Running(p) => JobState::Running(p.map(|p| p.min(100))),
            twit::JobState::Succeeded(outputs) => {
                if outputs.is_empty() || outputs.len() > 64 {
                    return Err(self.bad_output(call, "a finished job must name 1 to 64 outputs"));
                }
                let mut out = Vec::with_capacity(outputs.len());
                for o in outputs {
                    let data = o.url.starts_with("data:");
                    let web = o.url.starts_with("https://") || o.url.starts_with("http://");
                    if !(data || (web && o.url.len() <= 64 * 1024)) {
                        return Err(self.bad_output(call, "an output URL is not http(s) or data:"));
                    }
                    out.push(JobOutput {
                        url: o.url,
                        content_type: o.content_type,
                    });
                }
                JobState::Succeeded(out)
            }
            twit::JobState::Failed(e) => {
                JobState::Failed(guest_error(&self.host, &self.name, ctx, call, e, None))
            }
        })
    }

    fn bad_output(&self, call: &'static str, detail: &str) -> PluginError {
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
}

fn wit_response(response: InboundResponse) -> wtypes::HttpResponse {
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
