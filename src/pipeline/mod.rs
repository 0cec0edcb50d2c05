//! The request path as typed steps that every route composes, always in this order:
//!
//! 1. the route parses its body once into a [`Call`] (`Body`: the client's JSON text for the
//!    plugin, and the parsed value every later step reads), with what it may use ([`Need`]);
//! 2. [`admission::admit`]: the model's route and plugin, who may call it (anonymous models, the
//!    key's allow-list), the prompt's tokens ([`tokens`], the model's tokenizer), the estimate at
//!    the model's price, the key's limits → [`admission::Admitted`];
//! 3. [`screen::screen`]: the caller's policy set over the route's prompt fields → [`screen::Screened`];
//! 4. [`money::reserve`]: the estimate reserved on the account → [`money::Reserved`];
//! 5. [`dispatch::dispatch`]: the plugin session, the upstream call, the answer checked →
//!    [`dispatch::Dispatched`], which the route settles ([`money::Bill`]) or relays as a stream
//!    ([`relay`]).
//!
//! Each step accepts only the type the step before it returns, and only that step can make it:
//! a request cannot be dispatched unscreened or unreserved. Why this order: admission is the
//! cheapest refusal and judges no prompt text; screening refuses before any money moves; the
//! reservation comes last before the upstream so a refused request never holds credits.

pub mod admission;
pub mod chat;
pub mod dispatch;
pub mod embeddings;
pub mod images;
pub mod media;
pub mod messages;
pub mod models;
pub mod money;
pub mod relay;
pub mod screen;
pub mod speech;
pub mod tasks;
pub mod tokens;

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;

use crate::billing::Credits;
use crate::error::ApiError;

/// A request body parsed once: the client's JSON text untouched (the plugin translates it; the
/// host never re-serializes it) and its parsed value (validation, screening).
#[derive(Debug)]
pub struct Body {
    pub raw: String,
    pub json: Value,
    /// A large body's turn at the heavy steps, held until the plugin has built the upstream
    /// request (see [`HeavyTurns`]).
    pub turn: Option<HeavyTurn>,
}

/// Turns at the heavy steps of a large request (a body of [`HEAVY_BYTES`] or more): parsing,
/// counting, screening and the plugin's translation each hold a copy of the body for a while.
/// Only one large request per core takes those steps at once; the others wait for a turn
/// holding their body alone, so many large requests in flight cost about their size each, not
/// a copy per step each (and the cores are not shared among more large requests than there are).
pub struct HeavyTurns(std::sync::Arc<tokio::sync::Semaphore>);

/// One large request's turn (see [`HeavyTurns`]); dropping it gives the turn to the next.
#[derive(Debug)]
pub struct HeavyTurn {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl HeavyTurns {
    /// As many turns as the machine has cores.
    pub fn per_core() -> Self {
        let n = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Self(std::sync::Arc::new(tokio::sync::Semaphore::new(n)))
    }

    /// Wait for a turn if a body of `bytes` is large; `None` for a small one (no wait).
    pub async fn take(&self, bytes: usize) -> Option<HeavyTurn> {
        if bytes < HEAVY_BYTES {
            return None;
        }
        let permit = self.0.clone().acquire_owned().await.ok()?;
        Some(HeavyTurn { _permit: permit })
    }
}

impl Body {
    /// A UTF-8 JSON object, or a 400 saying what is wrong. The bytes become the text in place.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, ApiError> {
        let raw = String::from_utf8(bytes)
            .map_err(|_| ApiError::invalid("the request body is not valid UTF-8", None))?;
        let json: Value = serde_json::from_str(&raw).map_err(|e| {
            ApiError::invalid(
                format!("the request body is not a valid JSON object: {e}"),
                None,
            )
        })?;
        if !json.is_object() {
            return Err(ApiError::invalid(
                "the request body is not a valid JSON object",
                None,
            ));
        }
        Ok(Self {
            raw,
            json,
            turn: None,
        })
    }

    pub fn field(&self, name: &str) -> Option<&Value> {
        self.json.get(name).filter(|v| !v.is_null())
    }

    /// The required, non-empty string `model`.
    pub fn model(&self) -> Result<String, ApiError> {
        match self.json.get("model") {
            None => Err(ApiError::invalid(
                "you must provide a model parameter",
                Some("model"),
            )),
            Some(Value::String(m)) if !m.trim().is_empty() => Ok(m.clone()),
            Some(_) => Err(ApiError::invalid(
                "`model` must be a non-empty string",
                Some("model"),
            )),
        }
    }

    /// An optional positive integer field.
    pub fn positive(&self, name: &'static str) -> Result<Option<u64>, ApiError> {
        match self.field(name) {
            None => Ok(None),
            Some(v) => v.as_u64().filter(|n| *n > 0).map(Some).ok_or_else(|| {
                ApiError::invalid(format!("`{name}` must be a positive integer"), Some(name))
            }),
        }
    }

    /// An optional boolean field (absent or null: false).
    pub fn flag(&self, name: &'static str) -> Result<bool, ApiError> {
        match self.field(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::invalid(
                format!("`{name}` must be a boolean"),
                Some(name),
            )),
        }
    }
}

/// The most a request may use, as the route reads it from the body (before the price is known).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// An upper estimate of the prompt's tokens: counted at admission, once the model's
    /// tokenizer is known (the route's [`Call::prompt`]).
    pub prompt_tokens: u64,
    /// The client's output cap, if it set one (else the model's, else the configured default).
    pub max_output_tokens: Option<u64>,
    /// Whether the route produces output tokens at all (embeddings do not).
    pub output: bool,
    /// How many outputs one request asks for (`n`): each may use the output cap.
    pub outputs: u64,
    /// Images the request asks for (each at the model's per-image price).
    pub images: u64,
    /// Seconds of media the request asks for (video, music, speech: the per-second price).
    pub seconds: u64,
}

/// One request of a route, validated: what every step reads.
#[derive(Debug)]
pub struct Call {
    /// The public path (metrics, moderation record).
    pub route: &'static str,
    /// The plugin's kind of request: "chat", "embedding".
    pub kind: &'static str,
    pub model: String,
    pub stream: bool,
    pub body: Body,
    pub need: Need,
    /// How the route counts its prompt's tokens (`tokens::chat`, `tokens::embeddings`, ...).
    pub prompt: fn(tokens::Tokenizer, &Value) -> u64,
    pub request_id: String,
}

/// A route through the steps: its public path, its own validation, and its run (the steps it
/// composes). The server serves every `Route` with one handler.
pub trait Route {
    const PATH: &'static str;
    /// The shape of this route's error bodies.
    const ERRORS: crate::error::ErrorShape = crate::error::ErrorShape::OpenAi;
    fn parse(body: Body, request_id: String) -> Result<Call, ApiError>;
    fn run(
        st: &crate::app::AppState,
        caller: Option<crate::auth::Caller>,
        call: Call,
    ) -> impl std::future::Future<Output = Result<Served, ApiError>> + Send;
}

/// What a route answers: a whole JSON body, or a stream of SSE frames ready for the wire.
pub enum Reply {
    Json {
        body: String,
        /// What the request cost (`None` for an anonymous, unbilled request).
        cost: Option<Credits>,
    },
    Stream(FrameStream),
    /// A binary body passed through as it arrives (speech), with its media type and what it
    /// costs once it has passed whole (settled then; nothing if it breaks off).
    Binary {
        content_type: String,
        body: BinaryStream,
        cost: Option<Credits>,
    },
}

/// A binary body for the wire; an `Err` item aborts the response (the client sees it cut off).
pub type BinaryStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static>>;

/// A route's answer and the provider that served it (a metric label).
pub struct Served {
    pub reply: Reply,
    pub provider: String,
}

pub type FrameStream = Pin<Box<dyn Stream<Item = Bytes> + Send + 'static>>;

/// Inputs from this size up are screened off the async worker (see [`heavy`]).
pub const HEAVY_BYTES: usize = 64 * 1024;

/// Run synchronous CPU work over `bytes` of input (screening's rules): inline when small; from
/// [`HEAVY_BYTES`] up, on a multi-threaded runtime, inside `block_in_place`, so the worker's
/// other tasks move to another thread instead of waiting for it. (A current-thread runtime,
/// as in tests, runs it inline.)
pub fn heavy<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if bytes >= HEAVY_BYTES && multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

pub fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}
