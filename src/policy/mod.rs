//! Policy files: `policies/*.yaml`, one per category, plus `policies/sets.yaml`. Reads them
//! strictly, compiles every category into one Aho-Corasick automaton and the rules' patterns,
//! runs each file's own examples, and swaps the compiled result in atomically when files change.
//!
//! The automaton also holds each pattern's required literals (see `literals`): a pattern runs
//! only on a text where one of them occurs, so a benign text runs few or no regexes. A pattern
//! whose literals cannot be worked out is matched through a `RegexSet` every time.
//!
//! A rule matches by keywords (whole words; CJK text, which has no spaces, by substring), by
//! regex, or by co-occurrence: a term of every group within a window of words ("a child" with a
//! sexual term). Exceptions are benign phrases: a match inside one does not count ("kill the
//! process", "breast cancer screening"). Compiling happens once per change, never per request.

pub mod cli;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use arc_swap::ArcSwap;
use regex::{Regex, RegexSet};
use serde::Deserialize;

use crate::moderation::normalize::normalize;

pub const SCHEMA_VERSION: u32 = 1;

/// A policy problem, naming the file and, when the parser knows it, the line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}{}: {message}", .line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct PolicyError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl PolicyError {
    fn new(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: file.display().to_string(),
            line,
            message: message.into(),
        }
    }
}

/// What a set does with a category's matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Not screened at all.
    Allow,
    /// Evaluated on live traffic and recorded; the request goes through. For rolling out a rule.
    Shadow,
    /// Let through, recorded and counted.
    Flag,
    /// Refused with 400 `content_policy_violation`.
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Shadow => "shadow",
            Self::Flag => "flag",
            Self::Block => "block",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file format (strict, versioned). Converted to internal types below; never serialized.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryFile {
    version: u32,
    category: String,
    description: String,
    #[serde(default)]
    rules: Vec<RuleFile>,
    #[serde(default)]
    exceptions: Vec<String>,
    /// A hit inside double quotes, in a text that also says something outside them, is a
    /// mention ("saying 'X' is bigoted"), not a use.
    #[serde(default)]
    quoted_mentions_pass: bool,
    #[serde(default)]
    examples: Examples,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    patterns: Vec<String>,
    #[serde(default)]
    all_of: Option<CoOccurrence>,
    /// Overrides the set's action for this rule (e.g. `shadow` for a new rule).
    #[serde(default)]
    action: Option<Action>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoOccurrence {
    /// Words between the first and the last term, at most.
    window: usize,
    groups: Vec<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Examples {
    #[serde(default)]
    must_block: Vec<String>,
    #[serde(default)]
    must_pass: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetsFile {
    version: u32,
    default_set: String,
    sets: BTreeMap<String, SetFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetFile {
    #[serde(default)]
    description: Option<String>,
    /// Start from another set and change some categories.
    #[serde(default)]
    extends: Option<String>,
    #[serde(default)]
    categories: BTreeMap<String, Action>,
}

// ---------------------------------------------------------------------------------------------
// Compiled form.
// ---------------------------------------------------------------------------------------------

/// What a term in the automaton belongs to.
#[derive(Debug, Clone)]
enum TermUse {
    Keyword {
        rule: usize,
    },
    Group {
        rule: usize,
        group: usize,
    },
    /// A benign phrase of a category: a hit of that category inside it, or starting within
    /// `EXCEPTION_REACH` words after it ("debunk the claim that ..."), does not count.
    Exception {
        category: usize,
    },
}

/// How many words after an exception phrase it still covers.
const EXCEPTION_REACH: u32 = 6;

#[derive(Debug)]
struct Rule {
    id: String,
    category: String,
    action: Option<Action>,
    /// For co-occurrence rules: the window and the number of groups.
    window: usize,
    groups: usize,
}

/// One hit of a rule, in the normalized text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub category: String,
    pub rule: String,
    pub action: Action,
    /// Byte range in the normalized text.
    pub start: usize,
    pub end: usize,
    pub matched: String,
}

/// The outcome of screening a text with one set.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub action: Action,
    /// The hit that decided the action (the first blocking one, else the first recorded one).
    pub decisive: Option<Hit>,
    pub hits: Vec<Hit>,
    pub normalized: String,
}

/// Every category compiled, with the sets.
pub struct Compiled {
    rules: Vec<Rule>,
    terms: AhoCorasick,
    term_uses: Vec<Vec<TermUse>>,
    /// Terms with CJK characters match without word boundaries.
    term_cjk: Vec<bool>,
    /// For each term: the patterns (indexes into `regex_list`) it is a required literal of.
    term_gates: Vec<Vec<usize>>,
    /// The patterns no literal gates, as one set, with their indexes into `regex_list`.
    ungated: Option<(RegexSet, Vec<usize>)>,
    regex_list: Vec<(Regex, usize)>,
    sets: BTreeMap<String, BTreeMap<String, Action>>,
    /// Categories whose quoted mentions pass.
    quoted_pass: std::collections::BTreeSet<String>,
    pub default_set: String,
    pub categories: Vec<String>,
    pub files: Vec<PathBuf>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("rules", &self.rules.len())
            .field("categories", &self.categories)
            .finish()
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

type ExampleSet = Vec<(PathBuf, String, Examples)>;

fn has_cjk(s: &str) -> bool {
    s.chars().any(|c| {
        matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
    })
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
    /// Read every policy file in `dir` and compile; any problem refuses the whole directory.
    pub fn load(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect(),
            Err(e) => {
                return Err(vec![PolicyError::new(
                    dir,
                    None,
                    format!("cannot read the folder: {e}"),
                )]);
            }
        };
        files.sort();
        let mut cats = Vec::new();
        let mut sets_file = None;
        for path in &files {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(PolicyError::new(path, None, e.to_string()));
                    continue;
                }
            };
            let is_sets = path.file_stem().is_some_and(|s| s == "sets");
            let parsed = if is_sets {
                serde_yaml::from_str::<SetsFile>(&text).map(|s| sets_file = Some((path.clone(), s)))
            } else {
                serde_yaml::from_str::<CategoryFile>(&text).map(|c| cats.push((path.clone(), c)))
            };
            if let Err(e) = parsed {
                errors.push(PolicyError::new(
                    path,
                    e.location().map(|l| l.line()),
                    e.to_string(),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let Some((sets_path, sets)) = sets_file else {
            return Err(vec![PolicyError::new(dir, None, "sets.yaml is missing")]);
        };
        let (compiled, examples) = Self::compile(cats, &sets_path, sets, files)?;
        let failures = compiled.check_examples(examples);
        if failures.is_empty() {
            Ok(compiled)
        } else {
            Err(failures)
        }
    }

    fn compile(
        cats: Vec<(PathBuf, CategoryFile)>,
        sets_path: &Path,
        sets: SetsFile,
        files: Vec<PathBuf>,
    ) -> Result<(Self, ExampleSet), Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut term_map: BTreeMap<String, usize> = BTreeMap::new();
        let mut term_list: Vec<String> = Vec::new();
        let mut term_uses: Vec<Vec<TermUse>> = Vec::new();
        let mut regex_list = Vec::new();
        let mut gates: Vec<(String, usize)> = Vec::new();
        let mut ungated_sources = Vec::new();
        let mut ungated_ids = Vec::new();
        let mut categories = Vec::new();
        let mut examples = Vec::new();
        let mut add_term = |raw: &str,
                            use_: TermUse,
                            term_list: &mut Vec<String>,
                            term_uses: &mut Vec<Vec<TermUse>>| {
            let t = normalize(raw.trim());
            if t.is_empty() {
                return;
            }
            let i = *term_map.entry(t.clone()).or_insert_with(|| {
                term_list.push(t);
                term_uses.push(Vec::new());
                term_list.len() - 1
            });
            term_uses[i].push(use_);
        };
        let mut ids = std::collections::BTreeSet::new();
        let mut quoted_pass = std::collections::BTreeSet::new();
        for (path, file) in cats {
            if file.quoted_mentions_pass {
                quoted_pass.insert(file.category.clone());
            }
            if file.version != SCHEMA_VERSION {
                errors.push(PolicyError::new(
                    &path,
                    None,
                    format!(
                        "version {} is not supported (expected {SCHEMA_VERSION})",
                        file.version
                    ),
                ));
                continue;
            }
            if file.description.trim().is_empty() {
                errors.push(PolicyError::new(
                    &path,
                    None,
                    "description must say what the category covers",
                ));
            }
            categories.push(file.category.clone());
            for r in file.rules {
                if !ids.insert(r.id.clone()) {
                    errors.push(PolicyError::new(
                        &path,
                        None,
                        format!("rule id `{}` is used twice", r.id),
                    ));
                }
                let idx = rules.len();
                let mut groups = 0;
                let mut window = 0;
                let kinds = usize::from(!r.keywords.is_empty())
                    + usize::from(!r.patterns.is_empty())
                    + usize::from(r.all_of.is_some());
                if kinds != 1 {
                    errors.push(PolicyError::new(
                        &path,
                        None,
                        format!(
                            "rule `{}` needs exactly one of keywords, patterns, all_of",
                            r.id
                        ),
                    ));
                }
                for k in &r.keywords {
                    add_term(
                        k,
                        TermUse::Keyword { rule: idx },
                        &mut term_list,
                        &mut term_uses,
                    );
                }
                for p in &r.patterns {
                    // ASCII word boundaries keep the regex engine on its fast DFA path; the
                    // text is normalized (lowercase, folded) before matching anyway.
                    let ascii = p.replace("\\b", "(?-u:\\b)");
                    match Regex::new(&ascii) {
                        Ok(re) => {
                            // A pattern with required literals runs only when one occurs.
                            match literals::required(p) {
                                Some(lits) => {
                                    gates.extend(lits.into_iter().map(|l| (l, regex_list.len())))
                                }
                                None => {
                                    ungated_ids.push(regex_list.len());
                                    ungated_sources.push(ascii);
                                }
                            }
                            regex_list.push((re, idx));
                        }
                        Err(e) => errors.push(PolicyError::new(
                            &path,
                            None,
                            format!("rule `{}`: pattern does not compile: {e}", r.id),
                        )),
                    }
                }
                if let Some(co) = &r.all_of {
                    if co.groups.len() < 2 || co.groups.iter().any(Vec::is_empty) {
                        errors.push(PolicyError::new(
                            &path,
                            None,
                            format!("rule `{}`: all_of needs two or more non-empty groups", r.id),
                        ));
                    }
                    groups = co.groups.len();
                    window = co.window.max(1);
                    for (g, terms) in co.groups.iter().enumerate() {
                        for t in terms {
                            add_term(
                                t,
                                TermUse::Group {
                                    rule: idx,
                                    group: g,
                                },
                                &mut term_list,
                                &mut term_uses,
                            );
                        }
                    }
                }
                let _ = r.description;
                rules.push(Rule {
                    id: r.id,
                    category: file.category.clone(),
                    action: r.action,
                    window,
                    groups,
                });
            }
            let cat_idx = categories.len() - 1;
            for e in &file.exceptions {
                add_term(
                    e,
                    TermUse::Exception { category: cat_idx },
                    &mut term_list,
                    &mut term_uses,
                );
            }
            examples.push((path, file.category, file.examples));
        }
        // Gate literals join the automaton as they are (not normalized: they match the
        // normalized text exactly, as the pattern does).
        let mut term_gates = vec![Vec::new(); term_list.len()];
        for (lit, re_idx) in gates {
            let i = *term_map.entry(lit.clone()).or_insert_with(|| {
                term_list.push(lit);
                term_uses.push(Vec::new());
                term_gates.push(Vec::new());
                term_list.len() - 1
            });
            term_gates[i].push(re_idx);
        }
        let terms = AhoCorasickBuilder::new()
            .match_kind(MatchKind::Standard)
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            // Thousands of terms start with every letter: a start-byte prefilter only adds a
            // call at every word.
            .prefilter(false)
            .build(&term_list)
            .map_err(|e| {
                vec![PolicyError::new(
                    sets_path,
                    None,
                    format!("building the automaton: {e}"),
                )]
            })?;
        let ungated = if ungated_sources.is_empty() {
            None
        } else {
            let set = RegexSet::new(&ungated_sources).map_err(|e| {
                vec![PolicyError::new(
                    sets_path,
                    None,
                    format!("building the regex set: {e}"),
                )]
            })?;
            Some((set, ungated_ids))
        };
        // Sets.
        let mut resolved: BTreeMap<String, BTreeMap<String, Action>> = BTreeMap::new();
        if sets.version != SCHEMA_VERSION {
            errors.push(PolicyError::new(
                sets_path,
                None,
                format!("version {} is not supported", sets.version),
            ));
        }
        let mut pending: Vec<(&String, &SetFile)> = sets.sets.iter().collect();
        let mut guard = 0;
        while !pending.is_empty() && guard < 32 {
            guard += 1;
            pending.retain(|(name, set)| {
                let base = match &set.extends {
                    None => Some(BTreeMap::new()),
                    Some(parent) => resolved.get(parent).cloned(),
                };
                let Some(mut map) = base else { return true };
                for (cat, action) in &set.categories {
                    map.insert(cat.clone(), *action);
                }
                let _ = &set.description;
                resolved.insert((*name).clone(), map);
                false
            });
        }
        for (name, _) in pending {
            errors.push(PolicyError::new(
                sets_path,
                None,
                format!("set `{name}` extends an unknown set or a cycle"),
            ));
        }
        for (name, map) in &resolved {
            for cat in map.keys() {
                if !categories.contains(cat) {
                    errors.push(PolicyError::new(
                        sets_path,
                        None,
                        format!("set `{name}` names unknown category `{cat}`"),
                    ));
                }
            }
        }
        if !resolved.contains_key(&sets.default_set) {
            errors.push(PolicyError::new(
                sets_path,
                None,
                format!("default_set `{}` is not defined", sets.default_set),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let term_cjk = term_list.iter().map(|t| has_cjk(t)).collect();
        let compiled = Self {
            rules,
            terms,
            term_uses,
            term_cjk,
            term_gates,
            ungated,
            regex_list,
            sets: resolved,
            quoted_pass,
            default_set: sets.default_set,
            categories,
            files,
        };
        Ok((compiled, examples))
    }

    /// Every file's examples, each checked against its own category with every rule on `block`
    /// (shadow rules included: an example documents what the rule is for).
    fn check_examples(&self, examples: ExampleSet) -> Vec<PolicyError> {
        let mut failures = Vec::new();
        for (path, category, ex) in examples {
            for text in &ex.must_block {
                let hits = self.hits(text, None);
                if !hits.iter().any(|h| h.category == category) {
                    failures.push(PolicyError::new(
                        &path,
                        None,
                        format!("must_block example passes: {text:?}"),
                    ));
                }
            }
            for text in &ex.must_pass {
                let hits = self.hits(text, None);
                if let Some(h) = hits.iter().find(|h| h.category == category) {
                    failures.push(PolicyError::new(
                        &path,
                        None,
                        format!(
                            "must_pass example is caught by rule `{}` on {:?}: {text:?}",
                            h.rule, h.matched
                        ),
                    ));
                }
            }
        }
        failures
    }

    pub fn has_set(&self, name: &str) -> bool {
        self.sets.contains_key(name)
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
        let normalized = normalize(text);
        let mut hits = self.hits_normalized(&normalized, set_map);
        hits.sort_by(|a, b| b.action.cmp(&a.action).then(a.start.cmp(&b.start)));
        let decisive = hits.first().cloned();
        Verdict {
            action: decisive.as_ref().map_or(Action::Allow, |h| h.action),
            decisive,
            hits,
            normalized,
        }
    }

    fn hits(&self, text: &str, set: Option<&BTreeMap<String, Action>>) -> Vec<Hit> {
        self.hits_normalized(&normalize(text), set)
    }

    /// Every rule hit in a normalized text. With a set, each hit carries the set's action (or the
    /// rule's override); categories the set allows are skipped. Without a set: `Block`.
    fn hits_normalized(&self, text: &str, set: Option<&BTreeMap<String, Action>>) -> Vec<Hit> {
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
        let mut exceptions: Vec<(usize, usize, usize)> = Vec::new(); // (category, start, end)
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
                if !starts_word || !ends_word {
                    continue;
                }
            }
            for u in &self.term_uses[id] {
                match u {
                    TermUse::Exception { category } => exceptions.push((*category, s, e)),
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
        let excepted = |rule: usize, s: usize, e: usize| {
            let cat = &self.rules[rule].category;
            if outside_words >= 3
                && self.quoted_pass.contains(cat)
                && quoted.iter().any(|(a, b)| *a < s && e <= *b)
            {
                return true;
            }
            exceptions.iter().any(|(c, xs, xe)| {
                self.categories.get(*c) == Some(cat)
                    && ((*xs <= s && e <= *xe)
                        || (s <= *xs && *xe <= e)
                        || (*xe <= s && {
                            let words = words();
                            words[s].saturating_sub(words[*xe]) <= EXCEPTION_REACH
                        }))
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
            if !excepted(rule, s, e) {
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
                .find(|m| !excepted(*rule, m.start(), m.end()))
            {
                push(*rule, m.start(), m.end(), &mut hits);
            }
        }
        if !groups.is_empty() {
            let mut by_rule: BTreeMap<usize, Vec<(usize, usize, usize)>> = BTreeMap::new();
            for (rule, g, s, e) in groups {
                if !excepted(rule, s, e) {
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

/// The compiled policies in force, swapped atomically on a good change.
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<Compiled>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl PolicyStore {
    /// Load at start: a bad policy folder is fatal here (there is no last good one yet).
    pub fn load(
        dir: &Path,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Arc<Self>, Vec<PolicyError>> {
        let compiled = Compiled::load(dir)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(compiled),
            metrics,
            last_error: std::sync::Mutex::new(None),
        }))
    }

    pub fn current(&self) -> Arc<Compiled> {
        self.current.load_full()
    }

    /// Load the folder again; a change that does not parse or fails its examples is refused and
    /// the last good policies keep serving.
    pub fn reload(&self) -> Result<(), Vec<PolicyError>> {
        match Compiled::load(&self.dir) {
            Ok(c) => {
                self.current.store(Arc::new(c));
                if let Some(m) = &self.metrics {
                    m.policy_reload("loaded");
                }
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                tracing::info!(dir = %self.dir.display(), "policies reloaded");
                Ok(())
            }
            Err(errs) => {
                if let Some(m) = &self.metrics {
                    m.policy_reload("refused");
                }
                let text = errs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                tracing::warn!(errors = %text, "policy change refused; the last good policies keep serving");
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(text);
                Err(errs)
            }
        }
    }

    /// The last refusal, if the newest files were refused.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Watch the folder and reload on change.
    pub fn watch(self: &Arc<Self>) -> Result<crate::watch::Watch, String> {
        let me = Arc::downgrade(self);
        crate::watch::spawn(vec![self.dir.clone()], move || {
            if let Some(store) = me.upgrade() {
                let _ = store.reload();
            }
        })
    }
}

mod literals {
    //! Required literals of a pattern: strings one of which every match must contain, so that a
    //! text holding none of them can skip the pattern (the gate runs in the term automaton's one
    //! pass).
    //!
    //! A small parser for the regex syntax the policy files use (literals, `(?:…)` and `(…)`
    //! groups, alternation, `?` `*` `+` `{m,n}` repetitions, short classes, `\b` `^` `$`) and
    //! the classic prefix-literal extraction over it. Anything else (flags, `.`, `\d`, a long
    //! class) gives up: such a pattern is simply never gated, so a parser gap costs speed, never
    //! a verdict.

    /// Most literals kept for one pattern.
    const MAX_LITERALS: usize = 256;
    /// Literals are cut to this many bytes (a prefix of a required literal is required too).
    const MAX_LEN: usize = 10;
    /// A class with more members than this matches "anything" here.
    const MAX_CLASS: usize = 8;
    /// A gate with a literal shorter than this would fire on almost every text.
    const MIN_LEN: usize = 3;

    enum Node {
        Char(char),
        Class(Vec<char>),
        /// Something that may start with any character (`.`, a long or negated class).
        Any,
        /// A zero-width assertion.
        Look,
        /// Alternation of concatenations.
        Alt(Vec<Vec<Node>>),
        Repeat(Box<Node>, u32, Option<u32>),
    }

    struct Parser<'a> {
        chars: std::iter::Peekable<std::str::Chars<'a>>,
    }

    impl Parser<'_> {
        fn alternation(&mut self) -> Option<Vec<Vec<Node>>> {
            let mut branches = vec![self.concat()?];
            while self.chars.peek() == Some(&'|') {
                self.chars.next();
                branches.push(self.concat()?);
            }
            Some(branches)
        }

        fn concat(&mut self) -> Option<Vec<Node>> {
            let mut items = Vec::new();
            while let Some(&c) = self.chars.peek() {
                match c {
                    '|' | ')' => break,
                    '?' | '*' | '+' | '{' => {
                        let (min, max) = self.quantifier()?;
                        let last = items.pop()?;
                        items.push(Node::Repeat(Box::new(last), min, max));
                    }
                    _ => items.push(self.atom()?),
                }
            }
            Some(items)
        }

        fn quantifier(&mut self) -> Option<(u32, Option<u32>)> {
            let q = match self.chars.next()? {
                '?' => (0, Some(1)),
                '*' => (0, None),
                '+' => (1, None),
                _ => {
                    let mut body = String::new();
                    loop {
                        match self.chars.next()? {
                            '}' => break,
                            c => body.push(c),
                        }
                    }
                    match body.split_once(',') {
                        None => {
                            let n = body.parse().ok()?;
                            (n, Some(n))
                        }
                        Some((a, "")) => (a.parse().ok()?, None),
                        Some((a, b)) => (a.parse().ok()?, Some(b.parse().ok()?)),
                    }
                }
            };
            // A lazy quantifier matches the same strings.
            if self.chars.peek() == Some(&'?') {
                self.chars.next();
            }
            Some(q)
        }

        fn atom(&mut self) -> Option<Node> {
            Some(match self.chars.next()? {
                '(' => {
                    if self.chars.peek() == Some(&'?') {
                        self.chars.next();
                        if self.chars.next()? != ':' {
                            return None;
                        }
                    }
                    let alt = self.alternation()?;
                    if self.chars.next()? != ')' {
                        return None;
                    }
                    Node::Alt(alt)
                }
                '[' => self.class()?,
                '\\' => match self.chars.next()? {
                    'b' | 'B' | 'A' | 'z' if self.chars.peek() != Some(&'{') => Node::Look,
                    c if c.is_ascii_punctuation() => Node::Char(c),
                    _ => return None,
                },
                '^' | '$' => Node::Look,
                '.' => Node::Any,
                ']' | '}' => return None,
                c => Node::Char(c),
            })
        }

        fn class(&mut self) -> Option<Node> {
            if self.chars.peek() == Some(&'^') {
                return None;
            }
            let mut members = Vec::new();
            loop {
                let c = match self.chars.next()? {
                    ']' if !members.is_empty() => break,
                    '[' | ']' | '&' | '~' => return None,
                    '\\' => match self.chars.next()? {
                        c if c.is_ascii_punctuation() => c,
                        _ => return None,
                    },
                    c => c,
                };
                if self.chars.peek() == Some(&'-') {
                    self.chars.next();
                    match self.chars.peek() {
                        Some(']') => members.extend([c, '-']),
                        _ => {
                            let hi = self.chars.next()?;
                            if !c.is_ascii_alphanumeric() || !hi.is_ascii_alphanumeric() {
                                return None;
                            }
                            members.extend(c..=hi);
                        }
                    }
                } else {
                    members.push(c);
                }
                if members.len() > MAX_CLASS {
                    // Read to the end of the class; it matches "anything" for our purpose.
                    for c in self.chars.by_ref() {
                        match c {
                            ']' => return Some(Node::Any),
                            '[' | '\\' => return None,
                            _ => {}
                        }
                    }
                    return None;
                }
            }
            Some(Node::Class(members))
        }
    }

    /// A literal that a match starts with; `exact` when it is the whole match of its node.
    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
    struct Lit {
        text: String,
        exact: bool,
    }

    /// `None`: the node may start with anything.
    type Seq = Option<Vec<Lit>>;

    fn inexact(lits: Vec<Lit>) -> Vec<Lit> {
        lits.into_iter()
            .map(|l| Lit {
                text: l.text,
                exact: false,
            })
            .collect()
    }

    /// Cut every literal to `MAX_LEN` bytes and drop duplicates.
    fn trim(lits: &mut Vec<Lit>) {
        for l in lits.iter_mut() {
            if l.text.len() > MAX_LEN {
                let mut cut = MAX_LEN;
                while !l.text.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.text.truncate(cut);
                l.exact = false;
            }
        }
        lits.sort();
        lits.dedup();
    }

    fn concat(items: &[Node]) -> Seq {
        concat_seqs(items.iter().map(seq))
    }

    /// The literals of a sequence, from those of its items (taken only while a literal is
    /// still exact).
    fn concat_seqs(items: impl Iterator<Item = Seq>) -> Seq {
        let mut acc = vec![Lit {
            text: String::new(),
            exact: true,
        }];
        for item in items {
            if !acc.iter().any(|l| l.exact) {
                break;
            }
            acc = match item {
                None => inexact(acc),
                Some(next) => {
                    let mut out = Vec::new();
                    for a in &acc {
                        if !a.exact {
                            out.push(a.clone());
                            continue;
                        }
                        for b in &next {
                            out.push(Lit {
                                text: format!("{}{}", a.text, b.text),
                                exact: b.exact,
                            });
                        }
                    }
                    trim(&mut out);
                    if out.len() > MAX_LITERALS {
                        inexact(acc)
                    } else {
                        out
                    }
                }
            };
        }
        Some(acc)
    }

    fn seq(node: &Node) -> Seq {
        let single = |c: char| Lit {
            text: c.to_string(),
            exact: true,
        };
        match node {
            Node::Char(c) => Some(vec![single(*c)]),
            Node::Class(cs) => Some(cs.iter().map(|c| single(*c)).collect()),
            Node::Any => None,
            Node::Look => Some(vec![Lit {
                text: String::new(),
                exact: true,
            }]),
            Node::Alt(branches) => {
                let mut out = Vec::new();
                for b in branches {
                    out.extend(concat(b)?);
                }
                trim(&mut out);
                (out.len() <= MAX_LITERALS).then_some(out)
            }
            Node::Repeat(inner, min, max) => {
                let mut s = seq(inner)?;
                match (*min, *max) {
                    (0, _) => s.push(Lit {
                        text: String::new(),
                        exact: true,
                    }),
                    (1, Some(1)) => {}
                    _ => s = inexact(s),
                }
                Some(s)
            }
        }
    }

    /// Literals one of which occurs in every match of `pattern`, or `None` when the pattern
    /// cannot be gated. Tries the prefixes of each tail of the top-level concatenation (every
    /// match holds a match of every tail) and keeps the most selective set.
    pub(super) fn required(pattern: &str) -> Option<Vec<String>> {
        let mut p = Parser {
            chars: pattern.chars().peekable(),
        };
        let mut top = p.alternation()?;
        if p.chars.next().is_some() {
            return None;
        }
        // One branch at the top: its items are the concatenation; else the whole alternation.
        let items = if top.len() == 1 {
            top.pop()?
        } else {
            vec![Node::Alt(top)]
        };
        // Each item's literals once, for every tail.
        let seqs: Vec<Seq> = items.iter().map(seq).collect();
        let mut best: Option<(usize, usize, Vec<String>)> = None;
        for k in 0..seqs.len() {
            let Some(lits) = concat_seqs(seqs[k..].iter().cloned()) else {
                continue;
            };
            let mut texts: Vec<String> = lits.into_iter().map(|l| l.text).collect();
            texts.sort();
            texts.dedup();
            // A literal that has a shorter one as its prefix adds nothing to the gate.
            let mut kept: Vec<String> = Vec::new();
            for t in texts {
                if !kept.iter().any(|k| t.starts_with(k.as_str())) {
                    kept.push(t);
                }
            }
            let shortest = kept.iter().map(String::len).min().unwrap_or(0);
            if shortest < MIN_LEN {
                continue;
            }
            let better = best.as_ref().is_none_or(|(len, n, _)| {
                shortest.min(MAX_LEN) > *len || (shortest.min(MAX_LEN) == *len && kept.len() < *n)
            });
            if better {
                best = Some((shortest.min(MAX_LEN), kept.len(), kept));
            }
        }
        best.map(|(_, _, lits)| lits)
    }

    #[cfg(test)]
    mod tests {
        use super::required;

        #[test]
        fn literals_every_match_holds() {
            assert_eq!(
                required(r"\b(?:kill|shoot) (?:you|him)\b"),
                Some(vec![
                    "kill him".to_string(),
                    "kill you".into(),
                    "shoot him".into(),
                    "shoot you".into()
                ])
            );
            // An optional part yields both ways; repetition ends the literal.
            assert_eq!(
                required(r"\bcrack(?:ing)? (?:a )?pass"),
                Some(vec![
                    "crack a pa".to_string(),
                    "crack pass".into(),
                    "cracking a".into(),
                    "cracking p".into()
                ])
            );
            // A leading long class: the literal after it is required.
            assert_eq!(
                required(r"\b[a-z0-9]+ mode (?:on|off)\b"),
                Some(vec![" mode off".to_string(), " mode on".into()])
            );
            assert_eq!(required(r"\bab+"), None); // too short to be worth a gate
            assert_eq!(required(r"(?i)kill"), None); // flags: not understood, never gated
            assert_eq!(required(r"\d+ bombs"), None);
            assert_eq!(required(r"kill.*"), Some(vec!["kill".to_string()]));
        }
    }
}
