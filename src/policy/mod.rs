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
//!
//! By job: `format` (the file schema, reading a folder, the line of an item), `compile` (files
//! to `Compiled`, examples run), `literals` (a pattern's required literals), `matcher` (a text
//! against `Compiled`), `store` (`PolicyStore` and the watcher), `cli` (`tollgate policy ...`).
//! This file holds the public types.

pub mod cli;
mod compile;
mod format;
mod literals;
mod matcher;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aho_corasick::AhoCorasick;
use regex::{Regex, RegexSet};
use serde::Deserialize;

pub use format::SCHEMA_VERSION;
pub use store::PolicyStore;

use compile::{Rule, TermUse};

/// A policy problem, naming the file and the line of the item at fault (no line: a problem
/// with the folder as a whole, or a file that cannot be read).
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
    quoted_pass: BTreeSet<String>,
    /// Categories whose hits in a character's line pass (`dialogue_pass`).
    dialogue_pass: BTreeSet<String>,
    /// By category index: whether a negation that opens a question negates nothing
    /// (`negated_questions_assert`).
    negated_questions: Vec<bool>,
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
