//! Screening a text against `Compiled`: one pass of the term automaton over the normalized
//! text finds keyword hits, co-occurrence terms, exceptions and the gates of the patterns; then
//! the gated patterns run, exceptions and quoted mentions cover hits, co-occurrence windows are
//! counted in words, and the set gives each hit its action and the text its `Verdict`. The text
//! screened is the prompt and whatever it hides as base64, hex or URL-encoding, decoded.

use std::collections::BTreeMap;

use super::compile::{ExceptionKind, Rule, TermUse};
use super::{Action, Compiled, Hit, Verdict};
use crate::moderation::normalize::{Normalized, decode_payloads, normalize_parts};

/// How many words after an exception phrase it still covers (within its clause).
const EXCEPTION_REACH: u32 = 6;
/// How many words after a negation it covers ("not a burden"; not "why don't we just get rid
/// of X", where the negation governs something else).
const NEGATION_REACH: u32 = 2;
/// How many words after a self-reference it covers ("we are proud X", not "we are going to
/// gas X").
const SELF_REFERENCE_REACH: u32 = 2;
/// How many words before a denouncing phrase it covers (within its sentence).
const DENOUNCING_REACH: u32 = 12;
/// How many words after a denied subject's first word it covers ("no gay person deserves
/// ...": the subject's noun phrase, then the predicate).
const NEGATED_SUBJECT_REACH: u32 = 4;
/// How many words after a word of praise it covers ("a talented little ...").
const PRAISE_REACH: u32 = 2;

/// A joined stretch of spaced letters this long is words run together: terms match inside it
/// without word boundaries.
const RUN_TOGETHER: usize = 7;

/// A character that ends a clause: an exception phrase covers nothing after one ("history
/// of: how to ..." does not cover the request after the colon).
fn ends_clause(b: u8) -> bool {
    matches!(b, b'.' | b':' | b';' | b'?' | b'!' | b'\n')
}

/// A character that ends a clause or sets a phrase apart: a denied subject ("no one", "not a
/// single ...") reaches no predicate after a comma ("no mercy, they deserve ...").
fn ends_phrase(b: u8) -> bool {
    ends_clause(b) || b == b','
}

/// A character that ends a sentence.
fn ends_sentence(b: u8) -> bool {
    matches!(b, b'.' | b'?' | b'!' | b'\n')
}

/// The prompt and the text it hides as base64, hex or URL-encoding (decoded), normalized.
fn prepare(text: &str) -> Normalized {
    match decode_payloads(text) {
        Some(decoded) => normalize_parts(&format!("{text}\n{decoded}")),
        None => normalize_parts(text),
    }
}

/// A whole-word match may end at a word boundary or with a plural or verb ending ("bombs",
/// "hacked", "killing").
fn word_end_ok(rest: &str) -> bool {
    let boundary = |r: &str| r.chars().next().is_none_or(|c| !is_word_char(c));
    boundary(rest)
        || ["s", "es", "ed", "ing", "er", "ers"]
            .iter()
            .any(|suf| rest.starts_with(suf) && boundary(&rest[suf.len()..]))
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `is_word_char` of every ASCII byte.
const WORD_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 128 {
        t[b] = (b as u8).is_ascii_alphanumeric() || b == b'_' as usize;
        b += 1;
    }
    t
};

/// Word index of every byte offset: words are runs of word characters.
fn word_index(text: &str) -> Vec<u32> {
    if text.is_ascii() {
        // One byte, one character: no decoding.
        // Filled in one pass, not zeroed first.
        let mut idx = Vec::with_capacity(text.len() + 1);
        let (mut w, mut in_word) = (0u32, false);
        idx.extend(text.bytes().map(|b| {
            let wc = WORD_BYTE[usize::from(b)];
            w += u32::from(wc && !in_word);
            in_word = wc;
            w
        }));
        idx.push(w);
        return idx;
    }
    let mut idx = vec![0u32; text.len() + 1];
    let mut w = 0u32;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        let wc = is_word_char(c);
        if wc && !in_word {
            w += 1;
        }
        in_word = wc;
        for slot in idx.iter_mut().skip(i).take(c.len_utf8()) {
            *slot = w;
        }
    }
    if let Some(last) = idx.last_mut() {
        *last = w;
    }
    idx
}

impl Compiled {
    pub fn has_set(&self, name: &str) -> bool {
        self.sets.contains_key(name)
    }

    /// Whether a policy file defines this category.
    pub fn has_category(&self, name: &str) -> bool {
        self.categories.iter().any(|c| c == name)
    }

    /// The names of every set.
    pub fn set_names(&self) -> Vec<String> {
        self.sets.keys().cloned().collect()
    }

    /// What a set says about a category (`None`: the set does not name it).
    pub fn set_action(&self, set: &str, category: &str) -> Option<Action> {
        self.sets
            .get(set)
            .or_else(|| self.sets.get(&self.default_set))
            .and_then(|m| m.get(category).copied())
    }

    /// Screen a text with a set (unknown set: the default set).
    pub fn screen(&self, text: &str, set: &str) -> Verdict {
        let set_map = self
            .sets
            .get(set)
            .or_else(|| self.sets.get(&self.default_set));
        let Normalized {
            text: normalized,
            joined,
        } = prepare(text);
        let mut hits = self.hits_normalized(&normalized, &joined, set_map);
        hits.sort_by(|a, b| b.action.cmp(&a.action).then(a.start.cmp(&b.start)));
        let decisive = hits.first().cloned();
        Verdict {
            action: decisive.as_ref().map_or(Action::Allow, |h| h.action),
            decisive,
            hits,
            normalized,
        }
    }

    /// Every rule hit in a text (normalized first); see `hits_normalized`.
    pub(super) fn hits(&self, text: &str, set: Option<&BTreeMap<String, Action>>) -> Vec<Hit> {
        let n = prepare(text);
        self.hits_normalized(&n.text, &n.joined, set)
    }

    /// Every rule hit in a normalized text (`joined`: the stretches joined from spaced letters).
    /// With a set, each hit carries the set's action (or the rule's override); categories the
    /// set allows are skipped. Without a set: `Block`.
    fn hits_normalized(
        &self,
        text: &str,
        joined: &[(usize, usize)],
        set: Option<&BTreeMap<String, Action>>,
    ) -> Vec<Hit> {
        let action_of = |rule: &Rule| -> Action {
            let base = match set {
                None => Action::Block,
                Some(map) => map.get(&rule.category).copied().unwrap_or(Action::Allow),
            };
            if base == Action::Allow {
                return Action::Allow;
            }
            match (set, rule.action) {
                (Some(_), Some(a)) => a,
                _ => base,
            }
        };
        // (category, kind, start, end)
        let mut exceptions: Vec<(usize, ExceptionKind, usize, usize)> = Vec::new();
        let mut kw: Vec<(usize, usize, usize)> = Vec::new(); // (rule, start, end)
        let mut groups: Vec<(usize, usize, usize, usize)> = Vec::new(); // (rule, group, start, end)
        // The patterns to run: those a required literal of occurs in, and the ungated ones
        // that match. Every other pattern cannot match.
        let mut run = vec![false; self.regex_list.len()];
        for m in self.terms.find_overlapping_iter(text) {
            let (s, e) = (m.start(), m.end());
            let id = m.pattern().as_usize();
            for re_idx in &self.term_gates[id] {
                run[*re_idx] = true;
            }
            if self.term_uses[id].is_empty() {
                continue;
            }
            if !self.term_cjk[id] {
                let before = text[..s].chars().next_back();
                let starts_word = before.is_none_or(|c| !is_word_char(c));
                let ends_word = word_end_ok(&text[e..]);
                let run_together = || {
                    joined
                        .iter()
                        .any(|(a, b)| b - a >= RUN_TOGETHER && *a <= s && e <= *b)
                };
                if (!starts_word || !ends_word) && !run_together() {
                    continue;
                }
            }
            for u in &self.term_uses[id] {
                match u {
                    TermUse::Exception { category, kind } => {
                        exceptions.push((*category, *kind, s, e))
                    }
                    TermUse::Keyword { rule } => kw.push((*rule, s, e)),
                    TermUse::Group { rule, group } => groups.push((*rule, *group, s, e)),
                }
            }
        }
        // Word counts are needed only for quotes, exception reach and co-occurrence windows;
        // most texts need none of them.
        let word_cell = std::cell::OnceCell::new();
        let words = || -> &[u32] { word_cell.get_or_init(|| word_index(text)) };
        // Quoted stretches, when the text also has words outside quotes.
        let quotes: Vec<usize> = text.match_indices('"').map(|(i, _)| i).collect();
        let quoted: Vec<(usize, usize)> = quotes.chunks_exact(2).map(|q| (q[0], q[1])).collect();
        let outside_words = if quoted.is_empty() {
            0 // unused: nothing is quoted
        } else {
            let words = words();
            let mut inside = 0u32;
            for (a, b) in &quoted {
                inside += words[*b].saturating_sub(words[*a]);
            }
            words[text.len()].saturating_sub(inside)
        };
        // A negation or self-reference that is part of a term of its category ("never hire",
        // "not human", "i'm a fag") belongs to that term: it negates nothing. A denied subject
        // keeps its force over a group term inside it ("no gay person ...").
        if exceptions.iter().any(|x| x.1 != ExceptionKind::Phrase) {
            let terms: Vec<(usize, usize, usize)> = kw
                .iter()
                .copied()
                .chain(groups.iter().map(|(r, _, s, e)| (*r, *s, *e)))
                .collect();
            exceptions.retain(|(c, kind, xs, xe)| {
                matches!(
                    kind,
                    ExceptionKind::Phrase
                        | ExceptionKind::Denouncing
                        | ExceptionKind::NegatedSubject
                ) || !terms.iter().any(|(r, s, e)| {
                    self.categories.get(*c) == Some(&self.rules[*r].category) && s < xe && xs < e
                })
            });
        }
        // `keyword`: the hit is a keyword (a slur stays a slur after a negation).
        let excepted = |rule: usize, s: usize, e: usize, keyword: bool| {
            let cat = &self.rules[rule].category;
            if outside_words >= 3
                && self.quoted_pass.contains(cat)
                && quoted.iter().any(|(a, b)| *a < s && e <= *b)
            {
                return true;
            }
            let bytes = text.as_bytes();
            // Whether `a..b` (a <= b) is within `reach` words and crosses no `stop` character.
            let near = |a: usize, b: usize, reach: u32, stop: fn(u8) -> bool| {
                !bytes[a..b].iter().any(|c| stop(*c)) && {
                    let words = words();
                    words[b].saturating_sub(words[a]) <= reach
                }
            };
            exceptions.iter().any(|(c, kind, xs, xe)| {
                self.categories.get(*c) == Some(cat)
                    && match kind {
                        ExceptionKind::Phrase => {
                            (*xs < e && s < *xe)
                                || (*xe <= s && near(*xe, s, EXCEPTION_REACH, ends_clause))
                        }
                        ExceptionKind::Negation => {
                            !keyword && *xe <= s && near(*xe, s, NEGATION_REACH, ends_clause)
                        }
                        ExceptionKind::SelfReference => {
                            *xe <= s && near(*xe, s, SELF_REFERENCE_REACH, ends_clause)
                        }
                        ExceptionKind::Denouncing => {
                            e <= *xs && near(e, *xs, DENOUNCING_REACH, ends_sentence)
                        }
                        ExceptionKind::NegatedSubject => {
                            !keyword && *xe <= s && near(*xe, s, NEGATED_SUBJECT_REACH, ends_phrase)
                        }
                        ExceptionKind::Praise => {
                            *xe <= s && near(*xe, s, PRAISE_REACH, ends_clause)
                        }
                    }
            })
        };
        let mut hits = Vec::new();
        let push = |rule_idx: usize, s: usize, e: usize, hits: &mut Vec<Hit>| {
            let rule = &self.rules[rule_idx];
            let action = action_of(rule);
            if action == Action::Allow || hits.iter().any(|h: &Hit| h.rule == rule.id) {
                return;
            }
            hits.push(Hit {
                category: rule.category.clone(),
                rule: rule.id.clone(),
                action,
                start: s,
                end: e,
                matched: text.get(s..e).unwrap_or_default().to_string(),
            });
        };
        for (rule, s, e) in kw {
            if !excepted(rule, s, e, true) {
                push(rule, s, e, &mut hits);
            }
        }
        if let Some((set, ids)) = &self.ungated {
            for i in set.matches(text).iter() {
                run[ids[i]] = true;
            }
        }
        for (re_idx, _) in run.iter().enumerate().filter(|(_, r)| **r) {
            let (re, rule) = &self.regex_list[re_idx];
            if let Some(m) = re
                .find_iter(text)
                .find(|m| !excepted(*rule, m.start(), m.end(), false))
            {
                push(*rule, m.start(), m.end(), &mut hits);
            }
        }
        if !groups.is_empty() {
            let mut by_rule: BTreeMap<usize, Vec<(usize, usize, usize)>> = BTreeMap::new();
            for (rule, g, s, e) in groups {
                if !excepted(rule, s, e, false) {
                    by_rule.entry(rule).or_default().push((g, s, e));
                }
            }
            for (rule_idx, mut found) in by_rule {
                let rule = &self.rules[rule_idx];
                found.sort_by_key(|f| f.1);
                // Sliding window over matches in text order: all groups within `window` words.
                // A rule some group of which has no term in the text cannot match.
                let mut seen = vec![false; rule.groups];
                for f in &found {
                    seen[f.0] = true;
                }
                if !seen.iter().all(|x| *x) {
                    continue;
                }
                let words = words();
                for (i, first) in found.iter().enumerate() {
                    let w0 = words[first.1];
                    seen.clear();
                    seen.resize(rule.groups, false);
                    let mut end = first.2;
                    for f in &found[i..] {
                        if (words[f.1] as usize).saturating_sub(w0 as usize) > rule.window {
                            break;
                        }
                        seen[f.0] = true;
                        end = end.max(f.2);
                        if seen.iter().all(|x| *x) {
                            break;
                        }
                    }
                    if seen.iter().all(|x| *x) {
                        push(rule_idx, first.1, end, &mut hits);
                        break;
                    }
                }
            }
        }
        hits
    }
}
