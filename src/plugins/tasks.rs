//! The task API of a provider plugin (a component of the `task-provider` world): one sandboxed
//! instance per task step ([`TaskSession`]), every call through the same [`Session::run`] as a
//! request's (CPU budget, memory cap, yielding, metrics), its built requests checked the same
//! way, its answers converted into host types.

use wasmtime::component::Instance;

use super::bindings::task_provider::exports::tollgate::plugin::task_api as twit;
use super::session::{checked_outbound, classify, wit_ctx, wit_response};
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
    pub async fn task_session(&self) -> Option<Result<TaskSession, PluginError>> {
        let indices = self.tasks.as_ref()?;
        let mut store = self.host.new_store(Yielding::Tokio);
        let made: wasmtime::Result<(Instance, _, _)> = async {
            let instance = self
                .pre
                .instance_pre()
                .instantiate_async(&mut store)
                .await?;
            let provider = bindings::provider::ProviderIndices::new(self.pre.instance_pre())?
                .load(&mut store, &instance)?;
            let tasks = indices.load(&mut store, &instance)?;
            Ok((instance, provider, tasks))
        }
        .await;
        Some(match made {
            Ok((_, provider, tasks)) => Ok(TaskSession {
                session: Session::from_parts(self.host.clone(), self.name(), store, provider),
                tasks,
            }),
            Err(e) => Err(classify(self.name(), "instantiate", &store, e)),
        })
    }
}

/// One task step's instance of a plugin.
pub struct TaskSession {
    session: Session,
    tasks: bindings::task_provider::TaskProvider,
}

impl TaskSession {
    fn guest(&self) -> twit::Guest {
        self.tasks.tollgate_plugin_task_api().clone()
    }

    fn name(&self) -> &str {
        self.session.plugin_name()
    }

    fn host(&self) -> &HostCore {
        self.session.host()
    }

    pub async fn build_submit(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        input: &str,
    ) -> Result<Outbound, PluginError> {
        let wctx = wit_ctx(ctx);
        let g = self.guest();
        let out = self
            .session
            .run("build_submit", |mut s| async move {
                let r = g.call_build_submit(&mut s, &wctx, kind, input).await;
                (s, r)
            })
            .await?;
        match out {
            Err(e) => Err(self.session.guest_error(ctx, "build_submit", e, None)),
            Ok(out) => checked_outbound(self.host(), self.name(), "build_submit", out),
        }
    }

    /// The job id and the state the submission's answer shows.
    pub async fn parse_submit(
        &mut self,
        ctx: &ChannelContext,
        kind: &str,
        response: InboundResponse,
    ) -> Result<(String, JobState), PluginError> {
        let wctx = wit_ctx(ctx);
        let status = response.status;
        let wresp = wit_response(response);
        let g = self.guest();
        let out = self
            .session
            .run("parse_submit", |mut s| async move {
                let r = g.call_parse_submit(&mut s, &wctx, kind, &wresp).await;
                (s, r)
            })
            .await?;
        match out {
            Err(e) => Err(self
                .session
                .guest_error(ctx, "parse_submit", e, Some(status))),
            Ok(sub) => {
                let state = self.state(ctx, "parse_submit", status, sub.state)?;
                if sub.job_id.is_empty() || sub.job_id.len() > 512 {
                    return Err(self.bad_output("parse_submit", "the job id is empty or too long"));
                }
                Ok((sub.job_id, state))
            }
        }
    }

    pub async fn build_poll(
        &mut self,
        ctx: &ChannelContext,
        job_id: &str,
    ) -> Result<Outbound, PluginError> {
        let wctx = wit_ctx(ctx);
        let g = self.guest();
        let out = self
            .session
            .run("build_poll", |mut s| async move {
                let r = g.call_build_poll(&mut s, &wctx, job_id).await;
                (s, r)
            })
            .await?;
        match out {
            Err(e) => Err(self.session.guest_error(ctx, "build_poll", e, None)),
            Ok(out) => checked_outbound(self.host(), self.name(), "build_poll", out),
        }
    }

    pub async fn parse_poll(
        &mut self,
        ctx: &ChannelContext,
        job_id: &str,
        response: InboundResponse,
    ) -> Result<JobState, PluginError> {
        let wctx = wit_ctx(ctx);
        let status = response.status;
        let wresp = wit_response(response);
        let g = self.guest();
        let out = self
            .session
            .run("parse_poll", |mut s| async move {
                let r = g.call_parse_poll(&mut s, &wctx, job_id, &wresp).await;
                (s, r)
            })
            .await?;
        match out {
            Err(e) => Err(self.session.guest_error(ctx, "parse_poll", e, Some(status))),
            Ok(state) => self.state(ctx, "parse_poll", status, state),
        }
    }

    /// A guest's job state in host types, checked: a success names 1 to 64 outputs, each an
    /// `http(s)` URL of at most 64 KiB or a `data:` URL; an upstream refusal of the credential is
    /// an error whatever the plugin made of it.
    fn state(
        &self,
        ctx: &ChannelContext,
        call: &'static str,
        status: u16,
        state: twit::JobState,
    ) -> Result<JobState, PluginError> {
        if let Some(e) = self.session.refused_credential(ctx, call, status) {
            return Err(e);
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
                JobState::Failed(self.session.guest_error(ctx, call, e, None))
            }
        })
    }

    fn bad_output(&self, call: &'static str, detail: &str) -> PluginError {
        self.session.bad_output(call, detail)
    }
}
