//! Screening a request before dispatch: extract the text from every place a prompt can hide,
//! normalize it, run the caller's policy set, and record what happened.
//!
//! A `block` verdict refuses the request (400 `content_policy_violation`, nothing charged, no
//! upstream call); `flag` and `shadow` let it through and are recorded and counted. The
//! moderation record keeps category, rule, action, key and request id, and the prompt only when
//! an operator turns retention on. No prompt text goes to logs or metric labels.

pub mod normalize;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::policy::{Action, PolicyStore, Verdict};

/// Gather every prompt-bearing string of a request body: chat messages (string content or
/// `text` parts), `system`, `prompt`, `negative_prompt`, `input` (string, list, or the task API's
/// object, recursively), `instructions`, tool and function descriptions. A `name` (a chat
/// message's author, a tool's name) is read with `_` as a space: `how_to_...` is words. Joined
/// by newlines; a body with one prompt string (a large prompt, usually) is borrowed, not copied.
pub fn extract_text<'a>(body: &'a Value) -> Cow<'a, str> {
    fn strings<'a>(v: &'a Value, push: &mut dyn FnMut(Cow<'a, str>)) {
        match v {
            Value::String(s) => push(Cow::Borrowed(s)),
            Value::Array(a) => a.iter().for_each(|x| strings(x, push)),
            Value::Object(o) => {
                for (k, x) in o {
                    // Skip fields that are never prompt text (ids, URLs of images, numbers).
                    if matches!(
                        k.as_str(),
                        "url" | "image_url" | "id" | "type" | "role" | "model" | "b64_json"
                    ) {
                        if let Value::Object(_) | Value::Array(_) = x {
                            strings(x, push);
                        }
                        continue;
                    }
                    if let ("name", Value::String(s)) = (k.as_str(), x) {
                        push(Cow::Owned(s.replace('_', " ")));
                        continue;
                    }
                    strings(x, push);
                }
            }
            _ => {}
        }
    }
    let mut pieces: Vec<Cow<'a, str>> = Vec::new();
    let mut push = |s: Cow<'a, str>| {
        if !s.trim().is_empty() {
            pieces.push(s);
        }
    };
    if let Some(obj) = body.as_object() {
        for key in [
            "messages",
            "system",
            "prompt",
            "negative_prompt",
            "input",
            "instructions",
            "tools",
            "functions",
        ] {
            if let Some(v) = obj.get(key) {
                strings(v, &mut push);
            }
        }
    }
    if pieces.len() <= 1 {
        return pieces.pop().unwrap_or(Cow::Borrowed(""));
    }
    let mut out = String::with_capacity(pieces.iter().map(|p| p.len() + 1).sum());
    for p in &pieces {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(p);
    }
    Cow::Owned(out)
}

/// One recorded verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModerationEvent {
    pub time_ms: i64,
    pub request_id: String,
    pub key_id: Option<String>,
    pub category: String,
    pub rule: String,
    pub action: &'static str,
    /// Only with `moderation.retain_prompts: true`.
    pub prompt: Option<String>,
}

/// The moderation record: the latest events in memory, bounded in number and in bytes, for the
/// admin API and tests; and per-key counts of blocked prompts over a sliding window.
pub struct Record {
    events: Mutex<Events>,
    /// Bytes of retained prompt text kept at most (`moderation.record_max_bytes`).
    max_bytes: usize,
    blocks_by_key: moka::sync::Cache<String, Arc<Mutex<Window>>>,
}

#[derive(Default)]
struct Events {
    list: VecDeque<ModerationEvent>,
    /// Bytes of retained prompt text in `list`.
    bytes: usize,
}

/// Events kept at most.
const RECORD_CAPACITY: usize = 10_000;
/// Bytes of one retained prompt (longer ones are cut at a character boundary).
pub const RETAINED_PROMPT_MAX_BYTES: usize = 16 * 1024;
/// The window over which a key's blocked prompts are counted.
pub const BLOCK_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
/// Buckets of the window (one a minute).
const BUCKETS: usize = 10;

/// Blocked prompts of one key per minute, for the last [`BUCKETS`] minutes.
#[derive(Default)]
struct Window {
    /// (minute number, count); a bucket of an older minute is stale.
    buckets: [(i64, u64); BUCKETS],
}

impl Window {
    fn minute(now_ms: i64) -> i64 {
        now_ms.div_euclid(60_000)
    }

    fn add(&mut self, now_ms: i64) {
        let m = Self::minute(now_ms);
        let slot = &mut self.buckets[m.rem_euclid(BUCKETS as i64) as usize];
        if slot.0 != m {
            *slot = (m, 0);
        }
        slot.1 += 1;
    }

    fn count(&self, now_ms: i64) -> u64 {
        let m = Self::minute(now_ms);
        self.buckets
            .iter()
            .filter(|(minute, _)| m - minute < BUCKETS as i64 && *minute <= m)
            .map(|(_, n)| n)
            .sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A prompt cut to at most `max` bytes, at a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

impl Record {
    fn new(max_bytes: usize) -> Self {
        Self {
            events: Mutex::new(Events::default()),
            max_bytes,
            blocks_by_key: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(BLOCK_WINDOW)
                .build(),
        }
    }

    fn count_block(&self, key_id: &str, now_ms: i64) {
        let w = self
            .blocks_by_key
            .get_with(key_id.to_string(), Default::default);
        lock(&w).add(now_ms);
    }

    fn push(&self, e: ModerationEvent) {
        let mut ev = lock(&self.events);
        ev.bytes += e.prompt.as_ref().map_or(0, String::len);
        ev.list.push_back(e);
        while ev.list.len() > RECORD_CAPACITY || ev.bytes > self.max_bytes {
            let Some(old) = ev.list.pop_front() else {
                break;
            };
            ev.bytes -= old.prompt.as_ref().map_or(0, String::len);
        }
    }

    pub fn recent(&self, limit: usize) -> Vec<ModerationEvent> {
        lock(&self.events)
            .list
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }

    /// Bytes of prompt text the record holds now.
    pub fn retained_bytes(&self) -> usize {
        lock(&self.events).bytes
    }

    /// Blocked prompts of a key within the last [`BLOCK_WINDOW`] (for the abnormal-usage guard).
    pub fn blocks_for_key(&self, key_id: &str) -> u64 {
        self.blocks_by_key
            .get(key_id)
            .map_or(0, |w| lock(&w).count(crate::store::now_ms()))
    }
}

/// A category as a metric label: the compiled policies' categories and those a policy plugin
/// declared in its manifest are a closed set; anything else a plugin returns is `other`.
fn category_label<'a>(
    category: &'a str,
    compiled: &crate::policy::Compiled,
    declared: &[String],
) -> &'a str {
    if compiled.has_category(category) || declared.iter().any(|d| d == category) {
        category
    } else {
        "other"
    }
}

/// Add a policy plugin's verdict to the rules' verdict, as the gateway and `policy eval` do:
/// the set has the last word on a category it names (an adult set may allow it; a shadowed
/// category is only recorded). Returns the action the plugin's verdict took (`Allow`: nothing
/// added).
pub fn add_plugin_verdict(
    verdict: &mut Verdict,
    compiled: &crate::policy::Compiled,
    set: &str,
    plugin: &str,
    pv: crate::plugins::PluginVerdict,
) -> Action {
    let action = match pv.action {
        crate::plugins::PluginAction::Allow => return Action::Allow,
        crate::plugins::PluginAction::Flag => Action::Flag,
        crate::plugins::PluginAction::Block => Action::Block,
    };
    let action = match compiled.set_action(set, &pv.category) {
        Some(Action::Allow) => return Action::Allow,
        Some(Action::Shadow) => Action::Shadow,
        _ => action,
    };
    let hit = crate::policy::Hit {
        category: pv.category,
        rule: format!("{plugin}:{}", pv.rule),
        action,
        start: 0,
        end: 0,
        matched: String::new(),
    };
    if action > verdict.action {
        verdict.action = action;
        verdict.decisive = Some(hit.clone());
    }
    verdict.hits.push(hit);
    action
}

/// Who and what is being screened.
#[derive(Debug, Clone, Copy)]
pub struct ScreenRequest<'a> {
    pub policy_set: &'a str,
    pub key_id: Option<&'a str>,
    pub request_id: &'a str,
    pub model: &'a str,
    pub route: &'a str,
}

pub struct Moderator {
    pub policies: Arc<PolicyStore>,
    /// Policy plugins (the `policy` world), run after the compiled rules.
    plugins: Option<Arc<crate::plugins::Registry>>,
    pub record: Record,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    retain_prompts: bool,
}

/// What the compiled rules made of a request, for [`Moderator::decide`].
pub struct Ruled<'a> {
    text: Cow<'a, str>,
    compiled: Arc<crate::policy::Compiled>,
    verdict: Verdict,
    started: std::time::Instant,
}

/// A refused prompt: what the client is told (no prompt text).
#[derive(Debug, Clone, thiserror::Error)]
#[error("Your request was rejected by the content policy (category: {category}).")]
pub struct Blocked {
    pub category: String,
    pub rule: String,
}

impl Moderator {
    pub fn new(
        policies: Arc<PolicyStore>,
        plugins: Option<Arc<crate::plugins::Registry>>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
        cfg: &crate::config::ModerationConfig,
    ) -> Self {
        Self {
            policies,
            plugins,
            record: Record::new(cfg.record_max_bytes),
            metrics,
            retain_prompts: cfg.retain_prompts,
        }
    }

    /// Screen a request body with a set: the compiled rules ([`Self::rules`]), then the policy
    /// plugins and the record ([`Self::decide`]); `Err` when the verdict is `block`.
    pub async fn screen(&self, body: &Value, req: &ScreenRequest<'_>) -> Result<Verdict, Blocked> {
        let ruled = self.rules(body, req);
        self.decide(ruled, req).await
    }

    /// The synchronous, CPU-bound half of screening: the prompt text extracted, normalized and
    /// matched by the compiled rules of the set (the caller runs it off the async worker when
    /// the body is large).
    pub fn rules<'a>(&self, body: &'a Value, req: &ScreenRequest<'_>) -> Ruled<'a> {
        let started = std::time::Instant::now();
        let text = extract_text(body);
        let compiled = self.policies.current();
        let verdict = compiled.screen(&text, req.policy_set);
        Ruled {
            text,
            compiled,
            verdict,
            started,
        }
    }

    /// The second half of screening: the policy plugins (each call `async`, yielding to tokio),
    /// unless the rules already blocked; every hit recorded; `Err` when the verdict is `block`.
    /// A plugin that fails is counted and skipped (fail-open: the compiled rules already ran).
    pub async fn decide(
        &self,
        ruled: Ruled<'_>,
        req: &ScreenRequest<'_>,
    ) -> Result<Verdict, Blocked> {
        let (set, key_id, request_id) = (req.policy_set, req.key_id, req.request_id);
        let Ruled {
            text,
            compiled,
            mut verdict,
            started,
        } = ruled;
        // Categories the policy plugins that ran declared: with the files', the label set.
        let mut declared: Vec<String> = Vec::new();
        if verdict.action != Action::Block
            && let Some(registry) = &self.plugins
        {
            for plugin in registry.policies() {
                let input = crate::plugins::PolicyInput {
                    normalized: &verdict.normalized,
                    original: &text,
                    model: req.model,
                    route: req.route,
                    policy_set: set,
                };
                declared.extend(plugin.categories.iter().cloned());
                let pv = match plugin.screen(&input).await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(plugin = %plugin.name, error = %e, "policy plugin failed; skipped");
                        continue;
                    }
                };
                if add_plugin_verdict(&mut verdict, &compiled, set, &plugin.name, pv)
                    == Action::Block
                {
                    break;
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.moderation_duration(started.elapsed());
        }
        let now = crate::store::now_ms();
        for hit in &verdict.hits {
            if let Some(m) = &self.metrics {
                m.moderation_verdict(
                    category_label(&hit.category, &compiled, &declared),
                    hit.action.as_str(),
                );
            }
            self.record.push(ModerationEvent {
                time_ms: now,
                request_id: request_id.to_string(),
                key_id: key_id.map(str::to_string),
                category: hit.category.clone(),
                rule: hit.rule.clone(),
                action: hit.action.as_str(),
                prompt: self
                    .retain_prompts
                    .then(|| cut(&text, RETAINED_PROMPT_MAX_BYTES)),
            });
        }
        match (&verdict.action, &verdict.decisive) {
            (Action::Block, Some(hit)) => Err({
                if let Some(k) = key_id {
                    self.record.count_block(k, now);
                }
                Blocked {
                    category: hit.category.clone(),
                    rule: hit.rule.clone(),
                }
            }),
            _ => Ok(verdict),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin's verdict counts as the set says: allowed categories add nothing, shadowed ones
    /// are recorded only, others block and name the plugin and its rule.
    #[test]
    fn a_plugin_verdict_is_added_as_the_set_says() {
        use crate::plugins::{PluginAction, PluginVerdict};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let compiled = crate::policy::Compiled::load(&dir).expect("the bundled policies load");
        let pv = |action, category: &str| PluginVerdict {
            action,
            category: category.into(),
            rule: "scorer.x".into(),
            reason: String::new(),
        };
        let add = |set: &str, v: PluginVerdict| {
            let mut verdict = compiled.screen("an ordinary question about tides", set);
            let added = add_plugin_verdict(&mut verdict, &compiled, set, "p", v);
            (added, verdict)
        };
        let (added, v) = add("default", pv(PluginAction::Allow, "self_harm"));
        assert_eq!(
            (added, v.action, v.hits.len()),
            (Action::Allow, Action::Allow, 0)
        );
        let (added, v) = add("adult", pv(PluginAction::Block, "sexual_explicit"));
        assert_eq!(
            (added, v.action, v.hits.len()),
            (Action::Allow, Action::Allow, 0)
        );
        let (added, v) = add("observe", pv(PluginAction::Block, "self_harm"));
        assert_eq!((added, v.action), (Action::Shadow, Action::Shadow));
        let (added, v) = add("default", pv(PluginAction::Block, "sexual_explicit"));
        assert_eq!((added, v.action), (Action::Block, Action::Block));
        let d = v.decisive.expect("the plugin's hit decides");
        assert_eq!(
            (d.category.as_str(), d.rule.as_str()),
            ("sexual_explicit", "p:scorer.x")
        );
        // A category no set names keeps the plugin's own action.
        let (added, v) = add("default", pv(PluginAction::Flag, "secrets"));
        assert_eq!((added, v.action), (Action::Flag, Action::Flag));
    }

    fn event(prompt: Option<String>) -> ModerationEvent {
        ModerationEvent {
            time_ms: 0,
            request_id: "r".into(),
            key_id: None,
            category: "c".into(),
            rule: "x".into(),
            action: "block",
            prompt,
        }
    }

    #[test]
    fn the_record_is_bounded_in_bytes_and_keeps_the_newest() {
        let r = Record::new(10 * RETAINED_PROMPT_MAX_BYTES);
        let big = "x".repeat(RETAINED_PROMPT_MAX_BYTES);
        for _ in 0..60 {
            r.push(event(Some(big.clone())));
        }
        assert!(r.retained_bytes() <= 10 * RETAINED_PROMPT_MAX_BYTES);
        assert_eq!(r.recent(usize::MAX).len(), 10);
        r.push(event(None));
        assert!(r.recent(1)[0].prompt.is_none(), "the newest is kept");
        assert_eq!(cut("héllo", 2), "h", "cut at a character boundary");
    }

    #[test]
    fn block_counts_slide_out_of_their_window() {
        let r = Record::new(0);
        let t0 = 1_000 * 60_000;
        for i in 0..5 {
            r.count_block("k", t0 + i * 60_000);
        }
        let w = r
            .blocks_by_key
            .get("k")
            .map(|w| lock(&w).count(t0 + 4 * 60_000));
        assert_eq!(w, Some(5));
        // Nine minutes after the first block, all five are still inside the window.
        let count_at = |t: i64| r.blocks_by_key.get("k").map_or(0, |w| lock(&w).count(t));
        assert_eq!(count_at(t0 + 9 * 60_000), 5);
        // Ten minutes after the first, the first has left; fourteen after, every one has.
        assert_eq!(count_at(t0 + 10 * 60_000), 4);
        assert_eq!(count_at(t0 + 14 * 60_000), 0);
    }

    #[test]
    fn text_is_found_wherever_a_prompt_hides() {
        let body = serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "part"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
            ],
            "input": {"prompt": "p", "negative_prompt": "n", "nested": {"more": ["deep"]}},
        });
        let t = extract_text(&body);
        for w in ["sys", "part", "p", "n", "deep"] {
            assert!(t.split('\n').any(|l| l == w), "{w} missing from {t:?}");
        }
        assert!(!t.contains("http://"));
    }
}
