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

/// Verbs that attribute a quoted line to its speaker (`"...," she said`).
#[rustfmt::skip]
const SPEECH_VERBS: &[&str] = &[
    "said", "says", "asked", "asks", "replied", "replies", "answered", "answers", "shouted",
    "shouts", "yelled", "yells", "screamed", "screams", "whispered", "whispers", "muttered",
    "mutters", "snarled", "snarls", "growled", "growls", "hissed", "hisses", "cried", "cries",
    "told", "tells", "added", "continued", "snapped", "barked", "roared", "warned", "murmured",
    "sneered", "exclaimed", "declared", "spat", "laughed", "begged", "pleaded", "demanded",
];

/// Labels of forms, chats, instructions and headers: a line one of them opens is not a
/// character's line ("Note: ...", "User: ...", "Name: ...").
#[rustfmt::skip]
const NOT_SPEAKERS: &[&str] = &[
    "note", "notes", "nb", "ps", "p.s.", "step", "steps", "question", "questions", "answer",
    "answers", "q", "a", "user", "users", "human", "assistant", "ai", "system", "bot", "chatgpt",
    "gpt", "claude", "model", "dan", "aim", "stan", "dude", "developer mode", "jailbreak",
    "prompt", "input", "output", "example", "examples", "title", "subject", "re", "fw", "fwd",
    "to", "from", "cc", "bcc", "date", "time", "name", "age", "sex", "gender", "location", "type",
    "release", "license", "language", "keyword", "keywords", "tags", "tag", "task", "tasks",
    "instruction", "instructions", "rule", "rules", "context", "summary", "response", "reply",
    "request", "query", "warning", "disclaimer", "edit", "update", "source", "sources", "link",
    "links", "url", "http", "https", "www", "tl;dr", "tldr", "me", "you", "i", "we", "us", "goal",
    "objective", "target", "message", "text", "content", "story", "scene", "setting", "plot",
    "synopsis", "premise", "genre", "characters", "character", "description", "format", "tone",
    "style", "length", "topic", "theme", "mode", "role", "persona", "status",
];

/// Whether a word of a speaker tag is a name or role as scripts write them: capitalised
/// ("John", "JOHN", "Mr.", "O'Neil") or a placeholder ("<Person>").
fn speaker_word(w: &str) -> bool {
    if let Some(inner) = w.strip_prefix('<').and_then(|r| r.strip_suffix('>')) {
        return !inner.is_empty() && inner.chars().all(char::is_alphabetic);
    }
    let mut cs = w.chars();
    cs.next().is_some_and(char::is_uppercase)
        && w.chars()
            .all(|c| c.is_alphabetic() || matches!(c, '\'' | '.' | '-'))
}

/// The tag of a line that a speaker tag opens (`JOHN: ...`, `Little Bits:...`, `Anna, Ben: ...`,
/// `<Person>:...`): the tag as written, with words after the colon. Up to three speakers of
/// one to three words each; not a form or chat label (`NOT_SPEAKERS`), not a link.
fn speaker_tag(line: &str) -> Option<&str> {
    let colon = line.find(':')?;
    if colon > 48 {
        return None;
    }
    let tag = line[..colon].trim();
    let rest = line[colon + 1..].trim();
    if tag.is_empty() || rest.is_empty() || rest.starts_with("//") {
        return None;
    }
    let speakers: Vec<&str> = tag
        .split([',', '&', '/'])
        .flat_map(|p| p.split(" and "))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if speakers.is_empty() || speakers.len() > 3 {
        return None;
    }
    let ok = speakers.iter().all(|sp| {
        let words: Vec<&str> = sp.split_whitespace().collect();
        (1..=3).contains(&words.len())
            && words.iter().all(|w| speaker_word(w))
            && !NOT_SPEAKERS.contains(&sp.to_lowercase().as_str())
    });
    (ok && !NOT_SPEAKERS.contains(&tag.to_lowercase().as_str())).then_some(tag)
}

/// The character lines of a script: each line (by index) that a speaker tag opens, with the
/// tag lowercased, when at least three lines open so, by at least two speakers, one of whom
/// speaks twice. Otherwise none (a one-line script, a form of distinct labels).
fn script_lines(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<(usize, String)> = text
        .split('\n')
        .enumerate()
        .filter_map(|(i, l)| speaker_tag(l).map(|t| (i, t.to_lowercase())))
        .collect();
    if lines.len() < 3 {
        return Vec::new();
    }
    let mut speakers: Vec<&str> = lines.iter().map(|(_, t)| t.as_str()).collect();
    speakers.sort_unstable();
    let n = speakers.len();
    speakers.dedup();
    if speakers.len() >= 2 && speakers.len() < n {
        lines
    } else {
        Vec::new()
    }
}

/// Whether the words name "I" or "we" (a quote attributed to the user is the user's).
fn first_person(words: &[&str]) -> bool {
    words.iter().any(|w| matches!(*w, "i" | "we"))
}

/// The words of `s` (lowercase text), without the punctuation around them.
fn bare_words(s: &str) -> impl DoubleEndedIterator<Item = &str> {
    s.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !(c.is_alphanumeric() || matches!(c, '<' | '>' | '\''))))
        .filter(|w| !w.is_empty())
}

/// Whether the quote `a..=b` (the offsets of its quote marks) is attributed to a speaker other
/// than the user: a speech verb among the three words after the closing mark (`"...," she
/// said`, `"...!" screamed the guard`), or among the three words before the opening mark, which
/// a comma or colon sets apart (`he said, "..."`); within the sentence.
fn attributed(text: &str, a: usize, b: usize) -> bool {
    let after = &text[b + 1..];
    let after = &after[..after
        .find(['.', '!', '?', '\n', '"'])
        .unwrap_or(after.len())];
    let words: Vec<&str> = bare_words(after).take(3).collect();
    if let Some(v) = words.iter().position(|w| SPEECH_VERBS.contains(w))
        && !first_person(&words[..=v])
        && !first_person(&words[v + 1..])
    {
        return true;
    }
    let before = text[..a].trim_end();
    let Some(before) = before
        .strip_suffix(',')
        .or_else(|| before.strip_suffix(':'))
    else {
        return false;
    };
    let start = before
        .rfind(['.', '!', '?', '\n', '"'])
        .map_or(0, |i| i + 1);
    let words: Vec<&str> = bare_words(&before[start..]).rev().take(3).collect();
    words.iter().any(|w| SPEECH_VERBS.contains(w)) && !first_person(&words)
}

/// Whether the negation at `xs..xe` opens a question ("Isn't ...?", "Don't they just ...?"):
/// a contracted auxiliary that is the first word of its sentence (after at most one linking
/// word), where the sentence ends with a question mark or the auxiliary is inverted (any but
/// "don't", which also opens commands: "Don't call them that.").
fn opens_question(text: &str, xs: usize, xe: usize) -> bool {
    let word = &text[xs..xe];
    if !word.ends_with("n't") || word.contains(' ') {
        return false;
    }
    let mut before = text[..xs]
        .trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '"' | '(' | '*' | '-' | '\''));
    for linker in [
        "but",
        "so",
        "and",
        "well",
        "honestly",
        "seriously",
        "really",
        "like",
    ] {
        let cut = before.trim_end_matches(',').trim_end();
        if let Some(rest) = cut.strip_suffix(linker)
            && rest.chars().next_back().is_none_or(|c| !is_word_char(c))
        {
            before = rest.trim_end_matches(|c: char| c.is_whitespace() || c == '"');
            break;
        }
    }
    let starts = before
        .bytes()
        .next_back()
        .is_none_or(|b| ends_sentence(b) || b == b':');
    if !starts {
        return false;
    }
    let asks = text[xe..].bytes().find(|b| ends_sentence(*b)) == Some(b'?');
    asks || word != "don't"
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
        let mut hits = self.hits_normalized(text, &normalized, &joined, set_map);
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
        self.hits_normalized(text, &n.text, &n.joined, set)
    }

    /// Every rule hit in a normalized text (`joined`: the stretches joined from spaced letters;
    /// `original`: the text as written, whose capitals tell a script's speaker tags).
    /// With a set, each hit carries the set's action (or the rule's override); categories the
    /// set allows are skipped. Without a set: `Block`.
    fn hits_normalized(
        &self,
        original: &str,
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
        // A script's character lines (found in the text as written, once, and only when a
        // category that lets them pass has a hit).
        let script_cell = std::cell::OnceCell::new();
        // Whether `s..e` lies in a character's line: the line of the script with the same
        // index, after its speaker tag (the normalized line must open with the same tag).
        let in_script_line = |s: usize, e: usize| {
            let script: &Vec<(usize, String)> = script_cell.get_or_init(|| script_lines(original));
            if script.is_empty() {
                return false;
            }
            let line_start = text[..s].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[s..].find('\n').map_or(text.len(), |i| s + i);
            if e > line_end {
                return false;
            }
            let index = text.as_bytes()[..line_start]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            let Ok(found) = script.binary_search_by_key(&index, |(i, _)| *i) else {
                return false;
            };
            let line = &text[line_start..line_end];
            let tag = &script[found].1;
            line.trim_start()
                .strip_prefix(tag.as_str())
                .and_then(|r| r.trim_start().strip_prefix(':'))
                .is_some_and(|r| line_start + line.len() - r.len() <= s)
        };
        // `keyword`: the hit is a keyword (a slur stays a slur after a negation).
        let excepted = |rule: usize, s: usize, e: usize, keyword: bool| {
            let cat = &self.rules[rule].category;
            if outside_words >= 3
                && self.quoted_pass.contains(cat)
                && quoted.iter().any(|(a, b)| *a < s && e <= *b)
            {
                return true;
            }
            if self.dialogue_pass.contains(cat)
                && (in_script_line(s, e)
                    || (outside_words >= 3
                        && quoted
                            .iter()
                            .any(|(a, b)| *a < s && e <= *b && attributed(text, *a, *b))))
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
                            !keyword
                                && *xe <= s
                                && near(*xe, s, NEGATION_REACH, ends_clause)
                                && !(self.negated_questions.get(*c) == Some(&true)
                                    && opens_question(text, *xs, *xe))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const SETS: &str = "version: 1
default_set: default
sets:
  default:
    categories:
      abuse: block
      severe: block
";

    /// A category of threats and a co-occurrence about a group, with `flags` added.
    fn abuse(flags: &str) -> String {
        format!(
            r#"version: 1
category: abuse
description: Threats and claims about goblins, for the tests.
{flags}
negations: [not, "isn't", "aren't", "don't"]
rules:
  - id: abuse.threat
    patterns: ["\\b(?:kill|hurt) (?:you|her|him)\\b"]
  - id: abuse.group
    all_of:
      window: 3
      groups: [[goblins], [violent, dangerous]]
"#
        )
    }

    const SEVERE: &str = r#"version: 1
category: severe
description: Bomb making, for the tests.
rules:
  - id: severe.bomb
    patterns: ["\\bbuild a bomb\\b"]
"#;

    fn load(flags: &str) -> Compiled {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("abuse.yaml", abuse(flags)),
            ("severe.yaml", SEVERE.to_string()),
            ("sets.yaml", SETS.to_string()),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Compiled::load(dir.path()).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[track_caller]
    fn assert_blocks(c: &Compiled, text: &str) {
        let v = c.screen(text, "default");
        assert_eq!(v.action, Action::Block, "should block {text:?}");
    }

    #[track_caller]
    fn assert_passes(c: &Compiled, text: &str) {
        let v = c.screen(text, "default");
        assert_eq!(v.action, Action::Allow, "{text:?}: {:?}", v.hits);
    }

    #[test]
    fn speaker_tags_are_names_or_roles_not_labels() {
        for line in [
            "JOHN: hello there",
            "John: hello there",
            "Little Bits:And me?",
            "<Person>:Everyone stay here.",
            "Anna, Ben: Run!",
            "OLD MAN: Get off my lawn.",
            "Mr. Smith: Sit down.",
        ] {
            assert!(speaker_tag(line).is_some(), "{line:?}");
        }
        for line in [
            "Note: this is a test",
            "User: write me a story",
            "ASSISTANT: sure",
            "Step 1: mix the two",
            "john: lowercase is not a script's tag",
            "Name: Bob",
            "https://example.com",
            "JOHN:",
            "The man who came to dinner on a Tuesday night: what he said",
            "Last updated on: 2015",
        ] {
            assert!(speaker_tag(line).is_none(), "{line:?}");
        }
    }

    #[test]
    fn a_characters_line_in_a_script_passes_for_categories_that_opt_in() {
        let script = "The Quarrel\n\nANNA: You never listen.\nBEN: Touch my car again and I'll kill you.\nANNA: Try it.\n\nThey laugh and go inside.";
        let placeholders = "<Person>:It's late.\n<Person>:Everyone stay here, I'll hurt her.\nGirl:Why?\n<Person>:She knows.";
        let off = load("");
        assert_blocks(&off, script);
        assert_blocks(&off, placeholders);
        let on = load("dialogue_pass: true");
        assert_passes(&on, script);
        assert_passes(&on, placeholders);
    }

    #[test]
    fn a_request_dressed_as_a_script_is_still_caught() {
        let c = load("dialogue_pass: true");
        for text in [
            // One line, or two: not a script.
            "JOHN: I will kill you",
            "JOHN: hi\nMARY: I will kill you",
            // Nobody speaks twice: a list of labels, not a conversation.
            "Tom: hi\nAnn: hey\nBob: I will kill you",
            // A form, a chat, instructions.
            "Name: Bob\nAge: 30\nName: Ann\nMessage: I will kill you",
            "User: hi\nAssistant: hello\nUser: I will kill you",
            // Tags that are not written as names.
            "anna: hi\nben: I will kill you\nanna: ok",
            // Tags inside one line.
            "ANNA: hi BEN: I will kill you ANNA: ok BEN: ok",
            // The request after the script is the user's.
            "ANNA: hi\nBEN: hey\nANNA: bye\nNow tell me how I can kill her",
            // A line with a speaker tag in a text with no other: a one-line script.
            "Write a scene.\nBEN: I will kill you",
        ] {
            assert_blocks(&c, text);
        }
        // The severe categories do not opt in: a character asking is still asking.
        assert_blocks(
            &c,
            "ANNA: hi\nBEN: tell me how to build a bomb\nANNA: ok\nBEN: now",
        );
    }

    #[test]
    fn a_quote_attributed_to_a_character_passes_and_the_users_own_does_not() {
        let off = load("");
        let on = load("dialogue_pass: true");
        for text in [
            "\"Touch her and I'll kill you,\" she snarled, and slammed the door.",
            "The guard turned. He said, \"Move and I'll hurt you.\" Then he left.",
            "\"I'll kill you!\" screamed the old man from the porch.",
        ] {
            assert_blocks(&off, text);
            assert_passes(&on, text);
        }
        for text in [
            "\"I'll kill you,\" I said to him, and I meant it.",
            "\"I'll kill you\"",
            "\"I will kill you,\" and I mean it, believe me.",
            "I told him: \"I will kill you\" and that is a promise.",
        ] {
            assert_blocks(&on, text);
        }
    }

    #[test]
    fn a_negation_that_opens_a_question_negates_nothing_when_asked_to() {
        let off = load("");
        let on = load("negated_questions_assert: true");
        for text in [
            "Aren't goblins violent?",
            "Don't goblins just get violent?",
            "But aren't goblins dangerous?",
            "Honestly, aren't goblins violent",
            "I have a question. Aren't goblins dangerous?",
        ] {
            assert_passes(&off, text);
            assert_blocks(&on, text);
        }
        for text in [
            "Goblins aren't violent.",
            "Goblins are not dangerous, whatever you read.",
            "Don't call goblins violent.",
            "Why do people say goblins aren't violent?",
        ] {
            assert_passes(&on, text);
        }
        assert!(opens_question("isn't it? aren't they", 10, 16));
        assert!(!opens_question("they aren't", 5, 11));
        assert!(!opens_question("don't go there.", 0, 5));
    }
}
