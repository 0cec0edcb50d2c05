//! The async task API (`POST /v1/tasks`, `GET /v1/tasks/{id}`): long-running generations
//! (images, video, music) submitted once, driven by workers, archived, paid for, and reported by
//! polling or a signed callback.
//!
//! A task takes the request path up to the reservation (admission, screening, money: see
//! `pipeline::tasks`), is stored `queued` before its id is returned, and from then on is moved
//! one step at a time by whichever gateway holds its lease ([`worker`]):
//!
//! ```text
//! queued ──submit──▶ handling ──poll…──▶ archiving ──copy outputs──▶ success (charged)
//!    └──────────────────┴──────────────────────┴──── failure / deadline ──▶ fail (released)
//! ```
//!
//! Every step is one plugin session ([`crate::plugins::TaskSession`]) and at most one upstream
//! call, and ends with one conditional write naming the lease owner, so a gateway that died or
//! lost its lease changes nothing, and a restarted gateway picks every unfinished task up where
//! its row says it is. Money: the estimate is reserved at submission; `success` charges the
//! usage once (the ledger takes one charge per task id, whoever settles); `fail` releases.

pub mod archive;
pub mod callback;
pub mod store;
mod worker;

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::billing::{Credits, Hold, Price};
use crate::config::TasksConfig;
use crate::store::{Db, StoreError, now_ms};

pub use archive::Archive;
pub use store::{Archived, Status, Task, TaskStore};
pub use worker::start;

/// The task service of one gateway: its table, its storage, the reservations it holds for
/// tasks it drives, and the signal that wakes the workers.
pub struct Tasks {
    pub store: TaskStore,
    pub archive: Archive,
    pub config: TasksConfig,
    /// This gateway's name as a lease owner.
    owner: String,
    holds: Mutex<HashMap<String, Hold>>,
    wake: tokio::sync::Notify,
    metrics: TaskMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TaskLabels {
    model: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

type Hist = prometheus_client::metrics::histogram::Histogram;

/// Tasks entering each status by model, the time spent in each status, and callback attempts
/// by outcome. Labels: configured model names and fixed words only.
struct TaskMetrics {
    moved: prometheus_client::metrics::family::Family<
        TaskLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    time_in: prometheus_client::metrics::family::Family<StatusLabels, Hist, fn() -> Hist>,
    callbacks: prometheus_client::metrics::family::Family<
        OutcomeLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

fn status_histogram() -> Hist {
    // 10 ms .. ~3 h
    Hist::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.0, 21,
    ))
}

impl TaskMetrics {
    fn new(metrics: Option<&crate::metrics::Metrics>) -> Self {
        let m = Self {
            moved: Default::default(),
            time_in: prometheus_client::metrics::family::Family::new_with_constructor(
                status_histogram,
            ),
            callbacks: Default::default(),
        };
        if let Some(metrics) = metrics {
            metrics.register_with(|r| {
                r.register(
                    "tasks",
                    "Tasks entering each status, by model",
                    m.moved.clone(),
                );
                r.register(
                    "task_status_seconds",
                    "Time tasks spent in a status before leaving it",
                    m.time_in.clone(),
                );
                r.register(
                    "task_callbacks",
                    "Callback delivery attempts by outcome (delivered, status, refused, failed)",
                    m.callbacks.clone(),
                );
            });
        }
        m
    }

    /// `t` left its status for `to`.
    fn moved(&self, t: &Task, to: Status) {
        self.moved
            .get_or_create(&TaskLabels {
                model: t.model.clone(),
                status: to.as_str(),
            })
            .inc();
        let secs = (now_ms() - t.status_since).max(0) as f64 / 1000.0;
        self.time_in
            .get_or_create(&StatusLabels {
                status: t.status.as_str(),
            })
            .observe(secs);
    }

    /// A new task entered `queued`.
    fn created(&self, model: &str) {
        self.moved
            .get_or_create(&TaskLabels {
                model: model.to_string(),
                status: Status::Queued.as_str(),
            })
            .inc();
    }

    fn callback(&self, outcome: &'static str) {
        self.callbacks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

impl Tasks {
    /// Open the service on the gateway's database; the key that signs download links is shared
    /// by every gateway on it (made by the first).
    pub async fn open(
        db: Db,
        config: TasksConfig,
        metrics: Option<&crate::metrics::Metrics>,
    ) -> Result<Self, String> {
        use rand::RngCore as _;
        let store = TaskStore::new(db);
        let mut fresh = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut fresh);
        let key = store
            .setting("file_signing_key", &hex::encode(fresh))
            .await
            .map_err(|e| e.to_string())?;
        let key = hex::decode(key).map_err(|_| "file_signing_key is not hex".to_string())?;
        let archive = Archive::new(&config, key)?;
        Ok(Self {
            store,
            archive,
            config,
            owner: format!("gw-{}", ulid::Ulid::new()),
            holds: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            metrics: TaskMetrics::new(metrics),
        })
    }

    /// A new task id: the configured prefix and a ULID.
    pub fn new_id(&self) -> String {
        format!("{}{}", self.config.id_prefix, ulid::Ulid::new())
    }

    /// Store a task submitted with its reservation; the workers are woken. If the write fails
    /// the reservation is released and nothing was stored.
    pub async fn create(&self, task: Task, hold: Option<Hold>) -> Result<(), StoreError> {
        match self.store.insert(&task).await {
            Ok(()) => {
                if let Some(h) = hold {
                    self.keep_hold(&task.id, h);
                }
                self.metrics.created(&task.model);
                self.wake.notify_one();
                Ok(())
            }
            Err(e) => {
                if let Some(h) = hold {
                    h.release().await;
                }
                Err(e)
            }
        }
    }

    fn keep_hold(&self, task_id: &str, hold: Hold) {
        if let Ok(mut m) = self.holds.lock() {
            m.insert(task_id.to_string(), hold);
        }
    }

    fn take_hold(&self, task_id: &str) -> Option<Hold> {
        self.holds.lock().ok().and_then(|mut m| m.remove(task_id))
    }

    /// The task's reservation: the one this gateway holds, else taken over (still open) or held
    /// again (after a restart, or from a gateway that died).
    async fn hold_for(
        &self,
        billing: &crate::billing::Billing,
        t: &Task,
    ) -> Result<Hold, crate::billing::BillingError> {
        if let Some(h) = self.take_hold(&t.id) {
            return Ok(h);
        }
        billing
            .adopt(
                t.hold_id.as_deref(),
                &t.account_id,
                &t.key_id,
                &t.id,
                &t.model,
                Credits(t.reserved),
                price_of(t),
            )
            .await
    }

    /// Hold again what unfinished tasks reserved (at start: a restart released every
    /// reservation on SQLite). Returns how many.
    pub async fn restore_holds(&self, billing: &crate::billing::Billing) -> usize {
        let tasks = match self.store.unfinished().await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "reading unfinished tasks at start failed");
                return 0;
            }
        };
        let mut n = 0;
        for t in tasks {
            if t.reserved <= 0 {
                continue;
            }
            match self.hold_for(billing, &t).await {
                Ok(h) => {
                    self.keep_hold(&t.id, h);
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(task = %t.id, error = %e, "holding an unfinished task's reservation again failed")
                }
            }
        }
        n
    }

    /// The task as the client sees it (`data` of `GET /v1/tasks/{id}` and of callbacks): download
    /// links are signed afresh on every read.
    pub fn view(&self, t: &Task) -> Value {
        let mut v = json!({
            "taskId": t.id,
            "model": t.model,
            "status": t.status.as_str(),
            "createdAt": t.created_at,
            "updatedAt": t.updated_at,
        });
        let progress = match t.status {
            Status::Success => Some(100),
            Status::Queued => Some(0),
            _ => t.progress,
        };
        if let Some(p) = progress {
            v["progress"] = json!(p);
        }
        if t.status == Status::Success {
            let outputs: Vec<Archived> = t
                .outputs
                .as_deref()
                .and_then(|o| serde_json::from_str(o).ok())
                .unwrap_or_default();
            v["output"] = Value::Array(
                outputs
                    .iter()
                    .map(|a| {
                        json!({
                            "url": self.archive.signed_url(&a.key),
                            "content_type": a.content_type,
                            "bytes": a.bytes,
                        })
                    })
                    .collect(),
            );
            if let Some(c) = t.cost {
                v["cost"] = json!(Credits(c).to_string());
                v["cost_picodollars"] = json!(c);
            }
        }
        if t.status == Status::Fail {
            v["error"] = json!({
                "code": t.error_code.as_deref().unwrap_or("failed"),
                "message": t.error_message.as_deref().unwrap_or("the task failed"),
            });
        }
        if let Some(f) = t.finished_at {
            v["finishedAt"] = json!(f);
        }
        v
    }

    /// Wait until task `id` is final, at most `limit`; the task as it is then (`None`: gone).
    pub async fn wait_final(
        &self,
        id: &str,
        limit: std::time::Duration,
    ) -> Result<Option<Task>, StoreError> {
        let until = tokio::time::Instant::now() + limit;
        let mut wait = std::time::Duration::from_millis(20);
        loop {
            let t = self.store.get(id).await?;
            match &t {
                Some(task) if !task.status.is_final() => {}
                _ => return Ok(t),
            }
            if tokio::time::Instant::now() + wait > until {
                return Ok(t);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 3 / 2).min(std::time::Duration::from_millis(250));
        }
    }

    /// When a task submitted now times out.
    pub fn deadline_for(&self, model_deadline: Option<std::time::Duration>) -> i64 {
        let d = model_deadline.unwrap_or(self.config.deadline);
        now_ms().saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
    }
}

fn price_of(t: &Task) -> Price {
    serde_json::from_str(&t.price).unwrap_or_default()
}
