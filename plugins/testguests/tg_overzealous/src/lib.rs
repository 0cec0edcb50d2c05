//! Test guest: a policy plugin that misbehaves in the ways `tollgate plugin check` must catch:
//! its version is no semantic version, it blocks every non-empty prompt, and on an empty one it
//! answers with a category it never declared.
use tollgate_plugin_sdk::policy_api::{Action, Guest, PolicyManifest, ScreenInput, Verdict};

struct G;

impl Guest for G {
    fn describe() -> PolicyManifest {
        PolicyManifest {
            name: "tg_overzealous".into(),
            version: "latest".into(),
            categories: vec!["everything".into()],
        }
    }

    fn screen(input: ScreenInput) -> Verdict {
        let category = if input.original.is_empty() {
            "undeclared"
        } else {
            "everything"
        };
        Verdict {
            action: Action::Block,
            category: category.into(),
            rule: "all".into(),
            reason: "every prompt".into(),
        }
    }
}

tollgate_plugin_sdk::export_policy!(G);
