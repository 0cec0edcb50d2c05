//! The policy file format: the strict, versioned YAML schema of `policies/*.yaml` (one
//! `CategoryFile` per category, plus `SetsFile`), reading a folder of them, and finding the line
//! of an item so that every refusal names the file and the line.
//!
//! These types are the boundary: they are converted to internal types by `compile` and never
//! serialized.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Action, PolicyError};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CategoryFile {
    pub version: u32,
    pub category: String,
    pub description: String,
    #[serde(default)]
    pub rules: Vec<RuleFile>,
    #[serde(default)]
    pub exceptions: Vec<String>,
    /// Negating words ("not", "never", "aren't"): a pattern or co-occurrence hit that starts
    /// within two words after one, in the same clause, is negated ("X are not vermin"), not
    /// asserted. A keyword (a slur) is still a hit, and so is a term that holds the negation
    /// itself ("not human", "never hire").
    #[serde(default)]
    pub negations: Vec<String>,
    /// The speaker naming themselves or their own group ("we are", "I'm a proud"): a hit
    /// within two words after one, in the same clause, is a reclaimed term, not an attack
    /// (unless the phrase is part of a term itself).
    #[serde(default)]
    pub self_reference: Vec<String>,
    /// Words that deny a whole subject ("nobody", "not a single", "no child"): a pattern or
    /// co-occurrence hit starting within three words after one, with no comma or clause end
    /// between, is the
    /// predicate of a denied subject ("no <group> deserves to ..."), not asserted. Keywords
    /// are still hits.
    #[serde(default)]
    pub negated_subjects: Vec<String>,
    /// Words of praise ("talented", "brilliant"): a hit right after one (at most one word
    /// between), in the same clause, is profanity used as a compliment ("a talented
    /// motherfucker"), not abuse.
    #[serde(default)]
    pub praise: Vec<String>,
    /// Phrases that denounce what came before them in the same sentence ("... has to stop",
    /// "... is a slur"): a hit up to twelve words before one is quoted or reported, not used.
    #[serde(default)]
    pub denouncing: Vec<String>,
    /// A hit inside double quotes, in a text that also says something outside them, is a
    /// mention ("saying 'X' is bigoted"), not a use.
    #[serde(default)]
    pub quoted_mentions_pass: bool,
    /// A hit in a character's line of a script or story is the character's, not the user's
    /// request: a line that a speaker tag opens (`JOHN:`, `Little Bits:`, `<Person>:` - one to
    /// three capitalised words or a placeholder, up to three speakers; not a form, chat or
    /// instruction label such as `Note:`, `User:`, `Name:` or `Step 1:`), in a text where at
    /// least three lines open so, by at least two speakers, one of whom speaks twice; or a
    /// quoted line attributed to its speaker (`"...," she said`, `he asked, "..."`; not to
    /// "I" or "we") in a text that also says something outside quotes. A one-line script or
    /// a form is still the user's own text. Not for the severe categories: a request wrapped
    /// in a script is still a request.
    #[serde(default)]
    pub dialogue_pass: bool,
    /// A negation that opens a question ("Isn't X ...?", "Don't X just ...?", "Aren't X ...")
    /// asks the reader to agree: it negates nothing. It is the first word of its sentence (after
    /// at most "but", "so", "and", "well", "honestly", "seriously" or "really"), a contracted
    /// auxiliary ("...n't"), and the sentence ends with a question mark, or the auxiliary is
    /// inverted ("isn't", "aren't", "doesn't" ...: not "don't", which also opens commands).
    /// "X aren't violent" stays negated.
    #[serde(default)]
    pub negated_questions_assert: bool,
    #[serde(default)]
    pub examples: Examples,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    pub id: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
    #[serde(default)]
    pub all_of: Option<CoOccurrence>,
    /// Also match each one-word keyword or co-occurrence term of seven letters or more split
    /// in two by a space ("ex plosive"), as people split a word to slip past a list. Each
    /// term adds a few to the automaton, so it is for the rules that name what is harmful.
    #[serde(default)]
    pub split_words: bool,
    /// Overrides the set's action for this rule (e.g. `shadow` for a new rule).
    #[serde(default)]
    pub action: Option<Action>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CoOccurrence {
    /// Words between the first and the last term, at most.
    pub window: usize,
    pub groups: Vec<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Examples {
    #[serde(default)]
    pub must_block: Vec<String>,
    #[serde(default)]
    pub must_pass: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetsFile {
    pub version: u32,
    pub default_set: String,
    pub sets: BTreeMap<String, SetFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetFile {
    #[serde(default)]
    pub description: Option<String>,
    /// Start from another set and change some categories.
    #[serde(default)]
    pub extends: Option<String>,
    #[serde(default)]
    pub categories: BTreeMap<String, Action>,
}

/// A policy file as read: its path and its text, kept to find the line of an item when a
/// problem is reported.
#[derive(Debug)]
pub(super) struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// The line of the item at `at` (see [`locate`]).
    pub fn line(&self, at: &[Seg<'_>]) -> Option<usize> {
        locate(&self.text, at)
    }

    /// A problem with the item at `at`, naming this file and the item's line.
    pub fn error(&self, at: &[Seg<'_>], message: impl Into<String>) -> PolicyError {
        PolicyError::new(&self.path, self.line(at), message)
    }
}

/// Every policy file of a folder, parsed.
#[derive(Debug)]
pub(super) struct Folder {
    pub categories: Vec<(Source, CategoryFile)>,
    pub sets: (Source, SetsFile),
    /// Every `.yaml`/`.yml` file, sorted.
    pub files: Vec<PathBuf>,
}

/// Read and parse every `.yaml`/`.yml` file in `dir` (`sets.yaml` is the sets file, every other
/// one a category). Every unreadable or malformed file is reported, with its line.
pub(super) fn read(dir: &Path) -> Result<Folder, Vec<PolicyError>> {
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
    let mut categories = Vec::new();
    let mut sets = None;
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
            serde_yaml::from_str::<SetsFile>(&text).map(|s| {
                sets = Some((
                    Source {
                        path: path.clone(),
                        text,
                    },
                    s,
                ));
            })
        } else {
            serde_yaml::from_str::<CategoryFile>(&text).map(|c| {
                categories.push((
                    Source {
                        path: path.clone(),
                        text,
                    },
                    c,
                ));
            })
        };
        if let Err(e) = parsed {
            // An error with no place (an empty file) is at the file's start.
            let line = e.location().map_or(1, |l| l.line());
            errors.push(PolicyError::new(path, Some(line), e.to_string()));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let Some(sets) = sets else {
        return Err(vec![PolicyError::new(dir, None, "sets.yaml is missing")]);
    };
    Ok(Folder {
        categories,
        sets,
        files,
    })
}

/// One step of the way to an item of a YAML document.
#[derive(Debug, Clone, Copy)]
pub(super) enum Seg<'a> {
    /// A mapping's key. As the last step: the line of the key itself.
    Key(&'a str),
    /// A sequence's item. As the last step: the line the item starts on.
    Index(usize),
}

/// What the probe's error says when it has reached the item; any other error means the item
/// is not there.
const FOUND: &str = "\u{0}tollgate: item found";

/// The one-based line of the item at `at` in a YAML text, or `None` when there is no such item.
///
/// The YAML parser knows where every node is but only says so in its errors. So the text is
/// walked again along `at`, and the walk fails on purpose at the item: the error's location is
/// the item's line, whatever the style (block or flow, quoted or plain, folded over lines).
pub(super) fn locate(text: &str, at: &[Seg<'_>]) -> Option<usize> {
    let Err(e) = Probe { at }.deserialize(serde_yaml::Deserializer::from_str(text)) else {
        return None;
    };
    if e.to_string().contains(FOUND) {
        e.location().map(|l| l.line())
    } else {
        None
    }
}

/// Walks a document along `at`; skips everything else.
struct Probe<'p, 'a> {
    at: &'p [Seg<'a>],
}

impl<'de> DeserializeSeed<'de> for Probe<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.at.is_empty() {
            d.deserialize_any(Found)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Probe<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(want), rest)) = self.at.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let last = rest.is_empty();
        while let Some(is_it) = map.next_key_seed(KeyProbe { want, last })? {
            if is_it {
                return map.next_value_seed(Probe { at: rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(want), rest)) = self.at.split_first() else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        for _ in 0..*want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Probe { at: rest })?;
        Ok(())
    }

    // A scalar where the way goes on: the item is not there.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A mapping key: `Ok(true)` when it is the one wanted; the found-error when it is also the
/// last step.
struct KeyProbe<'a> {
    want: &'a str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match (key == self.want, self.last) {
            (true, true) => Err(E::custom(FOUND)),
            (is_it, _) => Ok(is_it),
        }
    }
}

/// The item reached: fails, whatever it is, so that the parser says where it is.
struct Found;

impl<'de> Visitor<'de> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
}

#[cfg(test)]
mod tests {
    use super::{Seg, locate};

    const DOC: &str = "\
version: 1
rules:
  - id: a
    keywords: [x, y]
  - id: \"b\"
    patterns:
      - 'one'
      - \"two\\\\b\"
    all_of:
      window: 3
      groups: [[p], [q]]
examples:
  must_block:
    - >-
      folded
      text
    - plain
";

    #[test]
    fn items_are_found_on_their_lines() {
        use Seg::{Index, Key};
        assert_eq!(locate(DOC, &[Key("version")]), Some(1));
        assert_eq!(locate(DOC, &[Key("rules"), Index(0)]), Some(3));
        assert_eq!(locate(DOC, &[Key("rules"), Index(1), Key("id")]), Some(5));
        assert_eq!(
            locate(DOC, &[Key("rules"), Index(0), Key("keywords"), Index(1)]),
            Some(4)
        );
        assert_eq!(
            locate(DOC, &[Key("rules"), Index(1), Key("patterns"), Index(1)]),
            Some(8)
        );
        assert_eq!(
            locate(DOC, &[Key("rules"), Index(1), Key("all_of")]),
            Some(9)
        );
        assert_eq!(
            locate(DOC, &[Key("examples"), Key("must_block"), Index(0)]),
            Some(14)
        );
        assert_eq!(
            locate(DOC, &[Key("examples"), Key("must_block"), Index(1)]),
            Some(17)
        );
    }

    #[test]
    fn a_missing_item_has_no_line() {
        use Seg::{Index, Key};
        assert_eq!(locate(DOC, &[Key("nope")]), None);
        assert_eq!(locate(DOC, &[Key("rules"), Index(9), Key("id")]), None);
        assert_eq!(locate(DOC, &[Key("version"), Key("id")]), None);
    }
}
