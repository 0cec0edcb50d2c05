//! The compiler from policy files to `Compiled`: every category's keywords, co-occurrence terms
//! and exceptions, and every pattern's required literals, in one Aho-Corasick automaton; the
//! patterns; the sets resolved; then every file's own examples run. Any problem refuses the
//! whole folder, and each problem names the file and the line of the item at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use aho_corasick::{AhoCorasickBuilder, MatchKind};
use regex::{Regex, RegexSet};

use super::format::{self, CategoryFile, Examples, SCHEMA_VERSION, Seg, SetFile, SetsFile, Source};
use super::{Action, Compiled, PolicyError, literals};
use crate::moderation::normalize::normalize;
use Seg::{Index, Key};

/// The shortest one-word term that `split_words` also matches split in two.
const SPLIT_MIN: usize = 7;

/// What a term in the automaton belongs to.
#[derive(Debug, Clone)]
pub(super) enum TermUse {
    Keyword {
        rule: usize,
    },
    Group {
        rule: usize,
        group: usize,
    },
    /// A benign phrase of a category: a hit of that category overlapping it, or starting
    /// within `EXCEPTION_REACH` words after it in its clause ("debunk the claim that ..."),
    /// does not count. A negation (not of a keyword) or a self-reference covers only hits
    /// within two words after it, unless it is part of a term itself; a denouncing phrase
    /// covers hits before it in its sentence.
    Exception {
        category: usize,
        kind: ExceptionKind,
    },
}

/// Which hits an exception phrase covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExceptionKind {
    /// Exceptions: a hit overlapping it or a few words after it.
    Phrase,
    /// Negations: a pattern or co-occurrence hit starting within two words after it.
    Negation,
    /// Self-reference: a hit starting within two words after it.
    SelfReference,
    /// Denouncing phrases: a hit a few words before it.
    Denouncing,
    /// A denied subject: a pattern or co-occurrence hit starting within three words after it.
    NegatedSubject,
    /// Praise: a hit starting right after it (at most one word between).
    Praise,
}

#[derive(Debug)]
pub(super) struct Rule {
    pub id: String,
    pub category: String,
    pub action: Option<Action>,
    /// For co-occurrence rules: the window and the number of groups.
    pub window: usize,
    pub groups: usize,
}

/// Each category file's examples, with the file they come from.
type ExampleSet = Vec<(Rc<Source>, String, Examples)>;

fn has_cjk(s: &str) -> bool {
    s.chars().any(|c| {
        matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
    })
}

impl Compiled {
    /// Read every policy file in `dir` and compile; any problem refuses the whole directory.
    pub fn load(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        let folder = format::read(dir)?;
        let (compiled, examples) = Self::compile(folder.categories, folder.sets, folder.files)?;
        let failures = compiled.check_examples(examples);
        if failures.is_empty() {
            Ok(compiled)
        } else {
            Err(failures)
        }
    }

    fn compile(
        cats: Vec<(Source, CategoryFile)>,
        (sets_src, sets): (Source, SetsFile),
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
                            split: bool,
                            term_list: &mut Vec<String>,
                            term_uses: &mut Vec<Vec<TermUse>>| {
            let t = normalize(raw.trim());
            if t.is_empty() {
                return;
            }
            let mut forms = vec![t.clone()];
            if split && t.len() >= SPLIT_MIN && t.bytes().all(|b| b.is_ascii_lowercase()) {
                // "explosive" → "ex plosive", "exp losive", ... (each piece two letters or more).
                forms.extend((2..=t.len() - 2).map(|k| format!("{} {}", &t[..k], &t[k..])));
            }
            for f in forms {
                let i = *term_map.entry(f.clone()).or_insert_with(|| {
                    term_list.push(f);
                    term_uses.push(Vec::new());
                    term_list.len() - 1
                });
                term_uses[i].push(use_.clone());
            }
        };
        // Each rule id, with the file and the index of the rule that took it first.
        let mut ids: BTreeMap<String, (Rc<Source>, usize)> = BTreeMap::new();
        let mut quoted_pass = BTreeSet::new();
        let mut dialogue_pass = BTreeSet::new();
        let mut negated_questions = Vec::new();
        for (src, file) in cats {
            let src = Rc::new(src);
            if file.quoted_mentions_pass {
                quoted_pass.insert(file.category.clone());
            }
            if file.dialogue_pass {
                dialogue_pass.insert(file.category.clone());
            }
            if file.version != SCHEMA_VERSION {
                errors.push(src.error(
                    &[Key("version")],
                    format!(
                        "version {} is not supported (expected {SCHEMA_VERSION})",
                        file.version
                    ),
                ));
                continue;
            }
            if file.description.trim().is_empty() {
                errors.push(src.error(
                    &[Key("description")],
                    "description must say what the category covers",
                ));
            }
            categories.push(file.category.clone());
            negated_questions.push(file.negated_questions_assert);
            for (ri, r) in file.rules.into_iter().enumerate() {
                let at_rule = [Key("rules"), Index(ri)];
                let at_id = [Key("rules"), Index(ri), Key("id")];
                if let Some((first_src, first_ri)) = ids.get(&r.id) {
                    let first_line = first_src
                        .line(&[Key("rules"), Index(*first_ri), Key("id")])
                        .map(|l| format!(":{l}"))
                        .unwrap_or_default();
                    errors.push(src.error(
                        &at_id,
                        format!(
                            "duplicate rule id {:?} (first used at {}{first_line})",
                            r.id,
                            first_src.path.display(),
                        ),
                    ));
                } else {
                    ids.insert(r.id.clone(), (Rc::clone(&src), ri));
                }
                let idx = rules.len();
                let mut groups = 0;
                let mut window = 0;
                let kinds = usize::from(!r.keywords.is_empty())
                    + usize::from(!r.patterns.is_empty())
                    + usize::from(r.all_of.is_some());
                if kinds != 1 {
                    errors.push(src.error(
                        &at_rule,
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
                        r.split_words,
                        &mut term_list,
                        &mut term_uses,
                    );
                }
                for (pi, p) in r.patterns.iter().enumerate() {
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
                        Err(e) => errors.push(src.error(
                            &[Key("rules"), Index(ri), Key("patterns"), Index(pi)],
                            format!("rule `{}`: pattern does not compile: {e}", r.id),
                        )),
                    }
                }
                if let Some(co) = &r.all_of {
                    if co.groups.len() < 2 || co.groups.iter().any(Vec::is_empty) {
                        errors.push(src.error(
                            &[Key("rules"), Index(ri), Key("all_of")],
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
                                r.split_words,
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
            let kinds = [
                (&file.exceptions, ExceptionKind::Phrase),
                (&file.negations, ExceptionKind::Negation),
                (&file.self_reference, ExceptionKind::SelfReference),
                (&file.denouncing, ExceptionKind::Denouncing),
                (&file.negated_subjects, ExceptionKind::NegatedSubject),
                (&file.praise, ExceptionKind::Praise),
            ];
            for (list, kind) in kinds {
                for e in list {
                    add_term(
                        e,
                        TermUse::Exception {
                            category: cat_idx,
                            kind,
                        },
                        false,
                        &mut term_list,
                        &mut term_uses,
                    );
                }
            }
            examples.push((src, file.category, file.examples));
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
                    &sets_src.path,
                    None,
                    format!("building the automaton: {e}"),
                )]
            })?;
        let ungated = if ungated_sources.is_empty() {
            None
        } else {
            let set = RegexSet::new(&ungated_sources).map_err(|e| {
                vec![PolicyError::new(
                    &sets_src.path,
                    None,
                    format!("building the regex set: {e}"),
                )]
            })?;
            Some((set, ungated_ids))
        };
        let resolved = resolve_sets(&sets_src, &sets, &categories, &mut errors);
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
            dialogue_pass,
            negated_questions,
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
        for (src, category, ex) in examples {
            for (i, text) in ex.must_block.iter().enumerate() {
                let hits = self.hits(text, None);
                if !hits.iter().any(|h| h.category == category) {
                    failures.push(src.error(
                        &[Key("examples"), Key("must_block"), Index(i)],
                        format!("must_block example passes: {text:?}"),
                    ));
                }
            }
            for (i, text) in ex.must_pass.iter().enumerate() {
                let hits = self.hits(text, None);
                if let Some(h) = hits.iter().find(|h| h.category == category) {
                    failures.push(src.error(
                        &[Key("examples"), Key("must_pass"), Index(i)],
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
}

/// Each set's categories, its parent's first (`extends`). Problems go to `errors`, each at the
/// line of the set, the category or the key at fault.
fn resolve_sets(
    src: &Source,
    sets: &SetsFile,
    categories: &[String],
    errors: &mut Vec<PolicyError>,
) -> BTreeMap<String, BTreeMap<String, Action>> {
    let mut resolved: BTreeMap<String, BTreeMap<String, Action>> = BTreeMap::new();
    if sets.version != SCHEMA_VERSION {
        errors.push(src.error(
            &[Key("version")],
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
        errors.push(src.error(
            &[Key("sets"), Key(name), Key("extends")],
            format!("set `{name}` extends an unknown set or a cycle"),
        ));
    }
    // An unknown category is reported where a set names it (a set that inherits it from its
    // parent is refused with the parent).
    for (name, set) in &sets.sets {
        for cat in set.categories.keys() {
            if !categories.contains(cat) {
                errors.push(src.error(
                    &[Key("sets"), Key(name), Key("categories"), Key(cat)],
                    format!("set `{name}` names unknown category `{cat}`"),
                ));
            }
        }
    }
    if !resolved.contains_key(&sets.default_set) {
        errors.push(src.error(
            &[Key("default_set")],
            format!("default_set `{}` is not defined", sets.default_set),
        ));
    }
    resolved
}
