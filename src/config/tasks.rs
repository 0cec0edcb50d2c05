//! `tasks:`: the async task API (`/v1/tasks`): workers, polling, deadlines, where outputs are
//! archived and how their links are signed, and what callbacks may reach.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{EnvSource, Secret, parse_duration};

/// The typed `tasks` section.
#[derive(Debug, Clone)]
pub struct TasksConfig {
    /// Task ids are this prefix and a ULID (`tk-01J…`).
    pub id_prefix: String,
    /// Task steps (a submission, a poll, an archiving) a gateway runs at once.
    pub workers: usize,
    /// Steps at once per channel: a provider never sees more from one gateway.
    pub per_channel: usize,
    /// The first wait between two polls of a job; each wait is half as long again, up to
    /// `poll_max`.
    pub poll_initial: Duration,
    pub poll_max: Duration,
    /// How long a task may take from submission until it is failed as timed out (per model:
    /// `models[].task_deadline`).
    pub deadline: Duration,
    /// How long a gateway owns a task while it runs one step; past it another gateway may take
    /// the task (its owner died).
    pub lease: Duration,
    /// Where outputs are archived.
    pub storage: Storage,
    /// The base of the download links (`<public_url>/v1/files/...`); `None`: the public
    /// listener's own address, as bound.
    pub public_url: Option<String>,
    /// How long a download link stays valid (links are signed again on every read).
    pub url_ttl: Duration,
    /// The largest output archived; a bigger one fails the task.
    pub max_output_bytes: u64,
    /// Media types an output may have (a prefix such as `image/` allows the family).
    pub output_types: Vec<String>,
    /// Hosts (names or addresses) that outputs and callbacks may be fetched from or sent to
    /// even though they resolve to loopback, private, link-local or metadata addresses.
    pub allow_hosts: Vec<String>,
    /// Plain `http` for callbacks to the hosts in `allow_hosts` (else `https` only).
    pub allow_http_callbacks: bool,
    pub callback_attempts: u32,
    /// The first wait before a callback is tried again; doubled each attempt, at most 10 min.
    pub callback_backoff: Duration,
    pub callback_timeout: Duration,
}

/// Where archived outputs live.
#[derive(Debug, Clone)]
pub enum Storage {
    /// A local folder (the default: `data/outputs`).
    Folder(PathBuf),
    /// An S3-compatible bucket.
    S3 {
        bucket: String,
        /// The endpoint of an S3-compatible service (MinIO, R2, ...); AWS when absent.
        endpoint: Option<String>,
        region: String,
        access_key: Option<Secret>,
        secret_key: Option<Secret>,
        allow_http: bool,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTasks {
    #[serde(default = "default_prefix")]
    id_prefix: String,
    #[serde(default = "default_workers")]
    workers: usize,
    #[serde(default = "default_per_channel")]
    per_channel: usize,
    #[serde(default = "default_poll_initial")]
    poll_initial: String,
    #[serde(default = "default_poll_max")]
    poll_max: String,
    #[serde(default = "default_deadline")]
    deadline: String,
    #[serde(default = "default_lease")]
    lease: String,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    public_url: Option<String>,
    #[serde(default = "default_url_ttl")]
    url_ttl: String,
    #[serde(default = "default_max_output")]
    max_output_bytes: u64,
    #[serde(default = "default_output_types")]
    output_types: Vec<String>,
    #[serde(default)]
    allow_hosts: Vec<String>,
    #[serde(default)]
    allow_http_callbacks: bool,
    #[serde(default = "default_callback_attempts")]
    callback_attempts: u32,
    #[serde(default = "default_callback_backoff")]
    callback_backoff: String,
    #[serde(default = "default_callback_timeout")]
    callback_timeout: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    #[serde(default = "default_folder")]
    folder: String,
    #[serde(default)]
    s3_bucket: Option<String>,
    #[serde(default)]
    s3_endpoint: Option<String>,
    #[serde(default = "default_region")]
    s3_region: String,
    #[serde(default)]
    s3_access_key_env: Option<String>,
    #[serde(default)]
    s3_secret_key_env: Option<String>,
    #[serde(default)]
    s3_allow_http: bool,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            folder: default_folder(),
            s3_bucket: None,
            s3_endpoint: None,
            s3_region: default_region(),
            s3_access_key_env: None,
            s3_secret_key_env: None,
            s3_allow_http: false,
        }
    }
}

impl Default for RawTasks {
    fn default() -> Self {
        Self {
            id_prefix: default_prefix(),
            workers: default_workers(),
            per_channel: default_per_channel(),
            poll_initial: default_poll_initial(),
            poll_max: default_poll_max(),
            deadline: default_deadline(),
            lease: default_lease(),
            storage: RawStorage::default(),
            public_url: None,
            url_ttl: default_url_ttl(),
            max_output_bytes: default_max_output(),
            output_types: default_output_types(),
            allow_hosts: Vec::new(),
            allow_http_callbacks: false,
            callback_attempts: default_callback_attempts(),
            callback_backoff: default_callback_backoff(),
            callback_timeout: default_callback_timeout(),
        }
    }
}

fn default_prefix() -> String {
    "tk-".into()
}
fn default_workers() -> usize {
    32
}
fn default_per_channel() -> usize {
    8
}
fn default_poll_initial() -> String {
    "1s".into()
}
fn default_poll_max() -> String {
    "15s".into()
}
fn default_deadline() -> String {
    "15m".into()
}
fn default_lease() -> String {
    "2m".into()
}
fn default_folder() -> String {
    "data/outputs".into()
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_url_ttl() -> String {
    "24h".into()
}
fn default_max_output() -> u64 {
    100 * 1024 * 1024
}
fn default_output_types() -> Vec<String> {
    vec!["image/".into(), "video/".into(), "audio/".into()]
}
fn default_callback_attempts() -> u32 {
    8
}
fn default_callback_backoff() -> String {
    "2s".into()
}
fn default_callback_timeout() -> String {
    "10s".into()
}

impl RawTasks {
    pub(super) fn validate(self, env: &dyn EnvSource, problems: &mut Vec<String>) -> TasksConfig {
        let mut dur = |key: &str, v: &str| -> Duration {
            match parse_duration(v) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    problems.push(format!(
                        "tasks.{key}: `{v}` is not a positive duration like 250ms, 5s or 2m"
                    ));
                    Duration::from_secs(1)
                }
            }
        };
        let poll_initial = dur("poll_initial", &self.poll_initial);
        let poll_max = dur("poll_max", &self.poll_max);
        let deadline = dur("deadline", &self.deadline);
        let lease = dur("lease", &self.lease);
        let url_ttl = dur("url_ttl", &self.url_ttl);
        let callback_backoff = dur("callback_backoff", &self.callback_backoff);
        let callback_timeout = dur("callback_timeout", &self.callback_timeout);
        if poll_max < poll_initial {
            problems.push("tasks.poll_max: must be at least tasks.poll_initial".into());
        }
        let id_ok = !self.id_prefix.is_empty()
            && self.id_prefix.len() <= 32
            && self
                .id_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            problems.push(format!(
                "tasks.id_prefix: `{}` must be 1-32 letters, digits, - or _",
                self.id_prefix
            ));
        }
        for (key, n) in [("workers", self.workers), ("per_channel", self.per_channel)] {
            if n == 0 {
                problems.push(format!("tasks.{key}: must be above 0"));
            }
        }
        if self.callback_attempts == 0 {
            problems.push("tasks.callback_attempts: must be above 0".into());
        }
        if self.max_output_bytes == 0 {
            problems.push("tasks.max_output_bytes: must be above 0".into());
        }
        if self.output_types.is_empty() {
            problems.push("tasks.output_types: must name at least one media type".into());
        }
        let public_url = self.public_url.map(|u| u.trim_end_matches('/').to_string());
        if let Some(u) = &public_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            problems.push(format!(
                "tasks.public_url: `{u}` must start with http:// or https://"
            ));
        }
        let s = self.storage;
        let storage = match s.s3_bucket {
            Some(bucket) => {
                let secret = |key: &str, name: &Option<String>, problems: &mut Vec<String>| {
                    name.as_ref().and_then(|n| {
                        let v = env.get(n).map(Secret::new);
                        if v.is_none() {
                            problems.push(format!(
                                "tasks.storage.{key}: the environment variable `{n}` is not set"
                            ));
                        }
                        v
                    })
                };
                let access_key = secret("s3_access_key_env", &s.s3_access_key_env, problems);
                let secret_key = secret("s3_secret_key_env", &s.s3_secret_key_env, problems);
                Storage::S3 {
                    bucket,
                    endpoint: s.s3_endpoint,
                    region: s.s3_region,
                    access_key,
                    secret_key,
                    allow_http: s.s3_allow_http,
                }
            }
            None => Storage::Folder(PathBuf::from(s.folder)),
        };
        TasksConfig {
            id_prefix: self.id_prefix,
            workers: self.workers,
            per_channel: self.per_channel,
            poll_initial,
            poll_max,
            deadline,
            lease,
            storage,
            public_url,
            url_ttl,
            max_output_bytes: self.max_output_bytes,
            output_types: self.output_types,
            allow_hosts: self.allow_hosts,
            allow_http_callbacks: self.allow_http_callbacks,
            callback_attempts: self.callback_attempts,
            callback_backoff,
            callback_timeout,
        }
    }
}
