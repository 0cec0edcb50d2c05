//! `policy_scorer`: a second screening stage where keyword rules are too coarse.
//!
//! A linear model per category over hashed features of the prompt (its words, pairs of
//! adjacent words and the character n-grams of each word), trained offline from the labelled
//! dev rows by `train/train.py` and embedded as `weights.bin`. It only adds a verdict: a
//! category is blocked when its score reaches the threshold the training set for it (above
//! every benign training row's out-of-fold score, with a margin for how much the inner models
//! disagree), and the file holds only the categories whose threshold still caught enough rows
//! of the category to be worth it. Otherwise it allows.
//!
//! The features must be the ones `train/features.py` computes: the first `max_chars`
//! characters of the original text, lower-cased; words are runs of alphanumeric characters;
//! features `w <word>`, `b <word> <next word>`, and `c <n-gram>` of `<word>` padded with `<`
//! and `>` (3 and 4 characters; 2 and 3 for a CJK word), hashed with 32-bit FNV-1a.

use tollgate_plugin_sdk::policy_api::{Action, Guest, PolicyManifest, ScreenInput, Verdict};

static WEIGHTS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weights.bin"));

/// One category of the model.
#[derive(Debug, Clone, PartialEq)]
struct Category {
    name: String,
    bias: f32,
    scale: f32,
    threshold: f32,
}

/// The weights file, read in place.
#[derive(Debug)]
struct Model<'a> {
    buckets_log2: u32,
    max_chars: usize,
    cats: Vec<Category>,
    /// `buckets × cats` signed bytes, a bucket's categories side by side.
    table: &'a [u8],
}

fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(pos..pos + 4)?.try_into().ok()?))
}

fn f32_at(b: &[u8], pos: usize) -> Option<f32> {
    Some(f32::from_le_bytes(b.get(pos..pos + 4)?.try_into().ok()?))
}

impl<'a> Model<'a> {
    /// Parse a weights file (`train.py`'s `write`); `None` when it is not one.
    fn parse(b: &'a [u8]) -> Option<Self> {
        if b.get(..4)? != b"TGSC" || u32_at(b, 4)? != 1 {
            return None;
        }
        let buckets_log2 = u32_at(b, 8)?;
        let max_chars = usize::try_from(u32_at(b, 12)?).ok()?;
        let n = usize::try_from(u32_at(b, 16)?).ok()?;
        if !(8..=24).contains(&buckets_log2) {
            return None;
        }
        let mut pos = 20;
        let mut cats = Vec::with_capacity(n);
        for _ in 0..n {
            let len = usize::from(*b.get(pos)?);
            let name = std::str::from_utf8(b.get(pos + 1..pos + 1 + len)?).ok()?;
            pos += 1 + len;
            cats.push(Category {
                name: name.to_string(),
                bias: f32_at(b, pos)?,
                scale: f32_at(b, pos + 4)?,
                threshold: f32_at(b, pos + 8)?,
            });
            pos += 12;
        }
        let table = b.get(pos..pos + (1usize << buckets_log2) * n)?;
        Some(Self {
            buckets_log2,
            max_chars,
            cats,
            table,
        })
    }

    /// Each category's score of a text: bias + scale × (sum of the byte weights of every
    /// feature occurrence) / √(number of occurrences).
    fn scores(&self, text: &str) -> Vec<f64> {
        let n = self.cats.len();
        let mut acc = vec![0i64; n];
        let mask = (1u32 << self.buckets_log2) - 1;
        let count = features(text, self.max_chars, |h| {
            let at = (h & mask) as usize * n;
            for (a, w) in acc.iter_mut().zip(&self.table[at..at + n]) {
                *a += i64::from(*w as i8);
            }
        });
        let norm = if count == 0 {
            0.0
        } else {
            1.0 / (count as f64).sqrt()
        };
        self.cats
            .iter()
            .zip(acc)
            .map(|(c, a)| f64::from(c.bias) + f64::from(c.scale) * a as f64 * norm)
            .collect()
    }

    /// The category with the largest margin over its threshold, if any reaches it.
    fn decide(&self, text: &str) -> Option<(&Category, f64)> {
        self.scores(text)
            .into_iter()
            .zip(&self.cats)
            .filter(|(s, c)| *s >= f64::from(c.threshold))
            .max_by(|a, b| {
                let ma = a.0 - f64::from(a.1.threshold);
                let mb = b.0 - f64::from(b.1.threshold);
                ma.total_cmp(&mb)
            })
            .map(|(s, c)| (c, s))
    }
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a state after a prefix, then fed more bytes.
fn fnv(mut h: u32, bytes: &[u8]) -> u32 {
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn is_cjk(c: char) -> bool {
    u32::from(c) >= 0x2e80
}

/// Call `emit` with the hash of every feature of `text` (see the module doc); returns how many.
fn features(text: &str, max_chars: usize, mut emit: impl FnMut(u32)) -> usize {
    let cut = text
        .char_indices()
        .nth(max_chars)
        .map_or(text, |(i, _)| &text[..i]);
    let lower = cut.to_lowercase();
    let mut count = 0usize;
    let mut prev: Option<&str> = None;
    let mut padded = String::new();
    let mut bounds: Vec<usize> = Vec::new();
    for word in lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        emit(fnv(fnv(FNV_OFFSET, b"w "), word.as_bytes()));
        if let Some(p) = prev {
            let h = fnv(fnv(fnv(FNV_OFFSET, b"b "), p.as_bytes()), b" ");
            emit(fnv(h, word.as_bytes()));
            count += 1;
        }
        count += 1;
        prev = Some(word);
        padded.clear();
        padded.push('<');
        padded.push_str(word);
        padded.push('>');
        bounds.clear();
        bounds.extend(padded.char_indices().map(|(i, _)| i));
        bounds.push(padded.len());
        let chars = bounds.len() - 1;
        let sizes: [usize; 2] = if word.chars().next().is_some_and(is_cjk) {
            [2, 3]
        } else {
            [3, 4]
        };
        let c_prefix = fnv(FNV_OFFSET, b"c ");
        for size in sizes {
            for j in 0..(chars + 1).saturating_sub(size) {
                emit(fnv(
                    c_prefix,
                    &padded.as_bytes()[bounds[j]..bounds[j + size]],
                ));
                count += 1;
            }
        }
    }
    count
}

struct Scorer;

impl Guest for Scorer {
    fn describe() -> PolicyManifest {
        PolicyManifest {
            name: "policy_scorer".into(),
            version: "0.1.0".into(),
            categories: Model::parse(WEIGHTS)
                .map(|m| m.cats.into_iter().map(|c| c.name).collect())
                .unwrap_or_default(),
        }
    }

    fn screen(input: ScreenInput) -> Verdict {
        let allow = Verdict {
            action: Action::Allow,
            category: String::new(),
            rule: String::new(),
            reason: String::new(),
        };
        let Some(model) = Model::parse(WEIGHTS) else {
            return allow;
        };
        match model.decide(&input.original) {
            None => allow,
            Some((c, s)) => Verdict {
                action: Action::Block,
                category: c.name.clone(),
                rule: format!("scorer.{}", c.name),
                reason: format!(
                    "the scorer rates the prompt {s:.2} for {} (threshold {:.2})",
                    c.name, c.threshold
                ),
            },
        }
    }
}

tollgate_plugin_sdk::export_policy!(Scorer);

#[cfg(test)]
#[allow(clippy::expect_used, reason = "a test fails loudly")]
mod tests {
    use super::*;

    /// The sentence `train/test_features.py` checks too: both sides must hash alike.
    const SAMPLE: &str = "Wie geht's? How do I RESET my 密码 quickly";

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv(FNV_OFFSET, b""), 0x811c_9dc5);
        assert_eq!(fnv(FNV_OFFSET, b"a"), 0xe40c_292c);
        assert_eq!(fnv(FNV_OFFSET, b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn features_are_the_training_scripts() {
        let mut hashes = Vec::new();
        let n = features(SAMPLE, 1500, |h| hashes.push(h));
        assert_eq!(n, 71);
        assert_eq!(hashes.len(), 71);
        // Same features as the script, in another order (the sum does not care).
        hashes.sort_unstable();
        assert_eq!(
            hashes[..6],
            [
                138583185, 198685428, 205206044, 239248899, 257444283, 408635729
            ]
        );
        let sum = hashes.iter().fold(0u32, |a, h| a.wrapping_add(*h));
        assert_eq!(sum, 3373274998);
        // Cut after max_chars characters: "wie" alone gives its word and 3 + 2 n-grams.
        assert_eq!(features(SAMPLE, 3, |_| {}), 6);
        assert_eq!(features("", 1500, |_| {}), 0);
    }

    /// A weights file with 2^8 buckets and two categories, `a` and `b`, where the word `x`
    /// weighs +100 for `a` and nothing else weighs anything.
    fn tiny_model() -> Vec<u8> {
        let mut f = b"TGSC".to_vec();
        for v in [1u32, 8, 1500, 2] {
            f.extend(v.to_le_bytes());
        }
        for (name, bias, scale, thr) in [("a", -1.0f32, 0.05f32, 1.0f32), ("b", 0.0, 1.0, 5.0)] {
            f.push(name.len() as u8);
            f.extend(name.as_bytes());
            for v in [bias, scale, thr] {
                f.extend(v.to_le_bytes());
            }
        }
        let mut table = vec![0u8; 256 * 2];
        let h = (fnv(fnv(FNV_OFFSET, b"w "), b"x") & 255) as usize;
        table[h * 2] = 100u8;
        f.extend(table);
        f
    }

    #[test]
    fn a_category_is_blocked_only_at_its_threshold() {
        let bytes = tiny_model();
        let m = Model::parse(&bytes).expect("the tiny model parses");
        assert_eq!(m.cats.len(), 2);
        // "x": the word and one 3-gram ("<x>") = 2 features; a = -1 + 0.05 * 100 / √2.
        let s = m.scores("x");
        assert!((s[0] - (-1.0 + 5.0 / 2f64.sqrt())).abs() < 1e-6, "{s:?}");
        assert_eq!(m.decide("x").map(|(c, _)| c.name.as_str()), Some("a"));
        // More words dilute the evidence: under the threshold of 1.0 past 6 features.
        assert_eq!(m.decide("x and several other words here"), None);
        assert_eq!(m.decide("nothing weighs here"), None);
    }

    #[test]
    fn a_file_that_is_not_a_model_is_refused() {
        let mut bytes = tiny_model();
        assert!(Model::parse(&bytes[..bytes.len() - 1]).is_none());
        bytes[0] = b'X';
        assert!(Model::parse(&bytes).is_none());
    }

    #[test]
    fn the_embedded_weights_parse_and_pass_an_ordinary_request() {
        let m = Model::parse(WEIGHTS).expect("weights.bin is a scorer weights file");
        assert!(!m.cats.is_empty());
        assert!(m.cats.iter().all(|c| c.threshold.is_finite()));
        assert_eq!(
            m.decide(
                "Please summarize this quarterly report in three bullet points for the board."
            ),
            None
        );
    }
}
