//! Screening a request before dispatch: extract the text from every place a prompt can hide,
//! normalize it, run the caller's policy set, and record what happened.
//!
//! A `block` verdict refuses the request (400 `content_policy_violation`, nothing charged, no
//! upstream call); `flag` and `shadow` let it through and are recorded and counted. The
//! moderation record keeps category, rule, action, key and request id, and the prompt only when
//! an operator turns retention on. No prompt text goes to logs or metric labels.

pub mod normalize;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::policy::{Action, PolicyStore, Verdict};

/// Gather every prompt-bearing string of a request body: chat messages (string content or
/// `text` parts), `system`, `prompt`, `negative_prompt`, `input` (string, list, or the task API's
/// object, recursively), `instructions`, tool and function descriptions.
pub fn extract_text(body: &Value) -> String {
    let mut out = String::new();
    let mut push = |s: &str| {
        if !s.trim().is_empty() {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(s);
        }
    };
    fn strings(v: &Value, push: &mut dyn FnMut(&str)) {
        match v {
            Value::String(s) => push(s),
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
                    strings(x, push);
                }
            }
            _ => {}
        }
    }
    let Some(obj) = body.as_object() else {
        return out;
    };
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
    out
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

/// The moderation record: the latest events in memory (bounded), for the admin API and tests.
pub struct Record {
    events: Mutex<VecDeque<ModerationEvent>>,
    blocks_by_key: moka::sync::Cache<String, Arc<std::sync::atomic::AtomicU64>>,
}

const RECORD_CAPACITY: usize = 10_000;

impl Record {
    fn count_block(&self, key_id: &str) {
        self.blocks_by_key
            .get_with(key_id.to_string(), || {
                Arc::new(std::sync::atomic::AtomicU64::new(0))
            })
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn push(&self, e: ModerationEvent) {
        let mut ev = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ev.len() == RECORD_CAPACITY {
            ev.pop_front();
        }
        ev.push_back(e);
    }

    pub fn recent(&self, limit: usize) -> Vec<ModerationEvent> {
        let ev = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ev.iter().rev().take(limit).cloned().collect()
    }

    /// Blocked prompts of a key (for the abnormal-usage guard).
    pub fn blocks_for_key(&self, key_id: &str) -> u64 {
        self.blocks_by_key
            .get(key_id)
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
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
        retain_prompts: bool,
    ) -> Self {
        Self {
            policies,
            plugins,
            record: Record {
                events: Mutex::new(VecDeque::new()),
                blocks_by_key: moka::sync::Cache::builder().max_capacity(100_000).build(),
            },
            metrics,
            retain_prompts,
        }
    }

    /// Screen a request body with a set; record every hit; `Err` when the verdict is `block`.
    /// Screen a request body with a set: the compiled rules, then the policy plugins; record
    /// every hit; `Err` when the verdict is `block`. A plugin that fails is counted and skipped
    /// (fail-open: the compiled rules already ran).
    pub fn screen(&self, body: &Value, req: &ScreenRequest<'_>) -> Result<Verdict, Blocked> {
        let (set, key_id, request_id) = (req.policy_set, req.key_id, req.request_id);
        let started = std::time::Instant::now();
        let text = extract_text(body);
        let compiled = self.policies.current();
        let mut verdict = compiled.screen(&text, set);
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
                let pv = match plugin.screen(&input) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(plugin = %plugin.name, error = %e, "policy plugin failed; skipped");
                        continue;
                    }
                };
                let action = match pv.action {
                    crate::plugins::PluginAction::Allow => continue,
                    crate::plugins::PluginAction::Flag => Action::Flag,
                    crate::plugins::PluginAction::Block => Action::Block,
                };
                // The set has the last word on a category it names (an adult set may allow it).
                let action = match compiled.set_action(set, &pv.category) {
                    Some(Action::Allow) => continue,
                    Some(Action::Shadow) => Action::Shadow,
                    _ => action,
                };
                let hit = crate::policy::Hit {
                    category: pv.category,
                    rule: format!("{}:{}", plugin.name, pv.rule),
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
                if action == Action::Block {
                    break;
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.moderation_duration(started.elapsed());
        }
        for hit in &verdict.hits {
            if let Some(m) = &self.metrics {
                m.moderation_verdict(&hit.category, hit.action.as_str());
            }
            self.record.push(ModerationEvent {
                time_ms: crate::store::now_ms(),
                request_id: request_id.to_string(),
                key_id: key_id.map(str::to_string),
                category: hit.category.clone(),
                rule: hit.rule.clone(),
                action: hit.action.as_str(),
                prompt: self.retain_prompts.then(|| text.clone()),
            });
        }
        match (&verdict.action, &verdict.decisive) {
            (Action::Block, Some(hit)) => Err({
                if let Some(k) = key_id {
                    self.record.count_block(k);
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
