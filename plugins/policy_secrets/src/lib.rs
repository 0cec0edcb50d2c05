//! `policy_secrets`: a policy plugin that keeps credentials out of prompts sent to providers.
//!
//! Blocks a prompt that carries what looks like a secret (cloud and API keys, tokens, private
//! key blocks) - sending it to a third-party model leaks it - and flags personal data that is
//! usually pasted by mistake (payment card numbers that pass the Luhn check, US social security
//! numbers). It reads the original text: secrets are case-sensitive.

use tollgate_plugin_sdk::policy_api::{Action, Guest, PolicyManifest, ScreenInput, Verdict};

struct Secrets;

/// A finding: rule id, whether it blocks, and what to tell the client.
struct Finding {
    rule: &'static str,
    category: &'static str,
    block: bool,
    what: &'static str,
}

fn is_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Length of the run of key characters starting at `i`.
fn run_len(b: &[u8], i: usize) -> usize {
    b[i..].iter().take_while(|c| is_key_char(**c)).count()
}

fn starts_token(b: &[u8], i: usize) -> bool {
    i == 0 || !is_key_char(b[i - 1])
}

/// Prefixed tokens: (prefix, minimum length of the rest, rule, what).
const PREFIXED: &[(&str, usize, &str, &str)] = &[
    ("sk-proj-", 20, "openai-key", "an OpenAI API key"),
    ("sk-ant-", 20, "anthropic-key", "an Anthropic API key"),
    ("sk-", 32, "openai-key", "an OpenAI-style API key"),
    ("ghp_", 36, "github-token", "a GitHub token"),
    ("github_pat_", 40, "github-token", "a GitHub token"),
    ("xoxb-", 20, "slack-token", "a Slack token"),
    ("xoxp-", 20, "slack-token", "a Slack token"),
    ("AIza", 35, "google-api-key", "a Google API key"),
    ("tg_", 46, "tollgate-key", "a tollgate API key"),
    ("glpat-", 20, "gitlab-token", "a GitLab token"),
];

fn find_secrets(text: &str) -> Option<Finding> {
    let b = text.as_bytes();
    if text.contains("-----BEGIN") && text.contains("PRIVATE KEY-----") {
        return Some(Finding {
            rule: "private-key",
            category: "secrets",
            block: true,
            what: "a private key",
        });
    }
    for i in 0..b.len() {
        if !starts_token(b, i) {
            continue;
        }
        // AWS access key ids: AKIA/ASIA + 16 upper-case letters or digits.
        if (b[i..].starts_with(b"AKIA") || b[i..].starts_with(b"ASIA")) && b.len() >= i + 20 {
            let id = &b[i + 4..i + 20];
            if id
                .iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                && b.get(i + 20).is_none_or(|c| !is_key_char(*c))
            {
                return Some(Finding {
                    rule: "aws-access-key",
                    category: "secrets",
                    block: true,
                    what: "an AWS access key",
                });
            }
        }
        for (prefix, min, rule, what) in PREFIXED {
            if b[i..].starts_with(prefix.as_bytes()) {
                let rest = run_len(b, i + prefix.len());
                if rest >= *min {
                    return Some(Finding {
                        rule,
                        category: "secrets",
                        block: true,
                        what,
                    });
                }
            }
        }
    }
    None
}

/// Digits of a card-number-like run (13-19 digits, spaces or dashes between groups).
fn luhn_ok(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if !k.is_multiple_of(2) {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn find_pii(text: &str) -> Option<Finding> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let mut digits = Vec::new();
            let mut j = i;
            while j < b.len()
                && (b[j].is_ascii_digit()
                    || ((b[j] == b' ' || b[j] == b'-')
                        && b.get(j + 1).is_some_and(u8::is_ascii_digit)))
            {
                if b[j].is_ascii_digit() {
                    digits.push(b[j] - b'0');
                }
                j += 1;
            }
            let run = &b[i..j];
            if (13..=19).contains(&digits.len()) && luhn_ok(&digits) {
                return Some(Finding {
                    rule: "payment-card",
                    category: "pii",
                    block: false,
                    what: "a payment card number",
                });
            }
            // NNN-NN-NNNN
            if run.len() == 11 && run[3] == b'-' && run[6] == b'-' && digits.len() == 9 {
                return Some(Finding {
                    rule: "us-ssn",
                    category: "pii",
                    block: false,
                    what: "a social security number",
                });
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    None
}

fn screen_text(text: &str) -> Option<Finding> {
    find_secrets(text).or_else(|| find_pii(text))
}

impl Guest for Secrets {
    fn describe() -> PolicyManifest {
        PolicyManifest {
            name: "policy_secrets".into(),
            version: "0.1.0".into(),
            categories: vec!["secrets".into(), "pii".into()],
        }
    }

    fn screen(input: ScreenInput) -> Verdict {
        match screen_text(&input.original) {
            None => Verdict {
                action: Action::Allow,
                category: String::new(),
                rule: String::new(),
                reason: String::new(),
            },
            Some(f) => Verdict {
                action: if f.block { Action::Block } else { Action::Flag },
                category: f.category.into(),
                rule: f.rule.into(),
                reason: format!("the prompt contains what looks like {}", f.what),
            },
        }
    }
}

tollgate_plugin_sdk::export_policy!(Secrets);

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Option<&'static str> {
        screen_text(text).map(|f| f.rule)
    }

    #[test]
    fn secrets_are_found() {
        assert_eq!(
            rule("my key is AKIAIOSFODNN7EXAMPLE ok"),
            Some("aws-access-key")
        );
        assert_eq!(
            rule("use sk-proj-abcdefghijklmnopqrstuvwxyz0123"),
            Some("openai-key")
        );
        assert_eq!(
            rule("token ghp_0123456789abcdefghijklmnopqrstuvwxyzAB"),
            Some("github-token")
        );
        assert_eq!(
            rule("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----"),
            Some("private-key")
        );
    }

    #[test]
    fn personal_data_is_found() {
        assert_eq!(
            rule("card 4111 1111 1111 1111 exp 12/29"),
            Some("payment-card")
        );
        assert_eq!(rule("ssn 078-05-1120"), Some("us-ssn"));
    }

    #[test]
    fn ordinary_text_passes() {
        assert_eq!(
            rule("the sk-8 park opens at 9; order 1234 5678 9012 3456 is late"),
            None
        );
        assert_eq!(rule("AKIA is a prefix; AKIAshort"), None);
        assert_eq!(rule("call 555-123-4567 tomorrow"), None);
    }
}
