//! Text normalization before screening: the forms people use to slip past keyword lists are
//! folded back to plain lowercase words.
//!
//! In order: Unicode NFKC (full-width letters, ligatures, compatibility forms), lowercase,
//! zero-width and control characters dropped, confusable letters (Cyrillic and Greek look-alikes)
//! mapped to Latin, leetspeak digits and symbols mapped inside words that also hold letters
//! (`k1ll`, `b0mb`, `$ex`; a plain number stays a number), and single letters spaced or dotted
//! apart joined (`k i l l`, `b.o.m.b`, `b-o-m-b`, `b_o_m_b`). Accents are dropped from Latin
//! letters (`bómb`, `b\u{301}omb`). ASCII text skips the Unicode steps.
//!
//! `normalize_parts` also says which stretches were joined from spaced letters: a long one is
//! several words run together (`h o w t o m a k e a b o m b`), inside which the matcher finds
//! terms without word boundaries. `decode_payloads` finds base64, hex and URL-encoded text in a
//! prompt so that the decoded text is screened too.

use unicode_normalization::UnicodeNormalization;

/// Look-alike letters mapped to the Latin letter they imitate.
fn confusable(c: char) -> Option<char> {
    Some(match c {
        'а' => 'a',
        'в' => 'b',
        'е' | 'ё' => 'e',
        'к' => 'k',
        'м' => 'm',
        'н' => 'h',
        'о' => 'o',
        'р' => 'p',
        'с' => 'c',
        'т' => 't',
        'у' => 'y',
        'х' => 'x',
        'і' => 'i',
        'ј' => 'j',
        'ѕ' => 's',
        'ԁ' => 'd',
        'ɡ' => 'g',
        'α' => 'a',
        'β' => 'b',
        'ε' => 'e',
        'ι' => 'i',
        'κ' => 'k',
        'ν' => 'v',
        'ο' => 'o',
        'ρ' => 'p',
        'τ' => 't',
        'υ' => 'u',
        'χ' => 'x',
        'ı' => 'i',
        '\u{2019}' | '\u{2018}' | '\u{02BC}' => '\'',
        '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{00AB}' | '\u{00BB}' => '"',
        _ => return None,
    })
}

/// A combining mark of the Latin, Greek and Cyrillic scripts (accents, and the marks stacked
/// on letters to disguise them).
fn combining(c: char) -> bool {
    matches!(
        c,
        '\u{0300}'..='\u{036F}' | '\u{1AB0}'..='\u{1AFF}' | '\u{1DC0}'..='\u{1DFF}' | '\u{20D0}'..='\u{20FF}' | '\u{FE20}'..='\u{FE2F}'
    )
}

/// A Latin letter that may carry an accent (Latin-1 Supplement, Latin Extended-A and -B,
/// Latin Extended Additional).
fn accented_latin(c: char) -> bool {
    matches!(c as u32, 0xC0..=0x24F | 0x1E00..=0x1EFF)
}

fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{00AD}' | '\u{034F}' | '\u{180E}'
    ) || (c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
}

fn leet(c: char) -> Option<char> {
    Some(match c {
        '0' => 'o',
        '1' | '!' | '|' => 'i',
        '3' => 'e',
        '4' | '@' => 'a',
        '5' | '$' => 's',
        '7' | '+' => 't',
        '8' => 'b',
        _ => return None,
    })
}

/// An ASCII control byte that normalization drops (not a line break or a tab).
const CONTROL: u8 = 1;
/// A byte that leetspeak uses for a letter.
const LEET: u8 = 2;

/// An ASCII letter or digit.
const ALNUM: u8 = 4;
/// An ASCII letter.
const ALPHA: u8 = 8;

/// `CONTROL`, `LEET`, `ALNUM` and `ALPHA` of every byte.
const BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if (c < 0x20 && !matches!(c, b'\n' | b'\t' | b'\r')) || c == 0x7f {
            t[b] = CONTROL;
        }
        if c.is_ascii_digit() || matches!(c, b'!' | b'|' | b'@' | b'$' | b'+') {
            t[b] = LEET;
        }
        if c.is_ascii_alphanumeric() {
            t[b] |= ALNUM;
        }
        if c.is_ascii_alphabetic() {
            t[b] |= ALPHA;
        }
        b += 1;
    }
    t
};

/// A normalized text and the byte ranges of it that were joined from spaced letters.
#[derive(Debug, Default)]
pub struct Normalized {
    pub text: String,
    pub joined: Vec<(usize, usize)>,
}

/// Normalize a text for screening.
pub fn normalize(text: &str) -> String {
    normalize_parts(text).text
}

/// Normalize a text for screening, and say which stretches were joined from spaced letters.
pub fn normalize_parts(text: &str) -> Normalized {
    if text.is_ascii() {
        return normalize_ascii(text);
    }
    let mut folded = String::with_capacity(text.len());
    let push = |c: char, folded: &mut String| {
        for l in c.to_lowercase() {
            folded.push(confusable(l).unwrap_or(l));
        }
    };
    for c in text.nfkc() {
        if invisible(c) || combining(c) {
            continue;
        }
        if accented_latin(c) {
            unicode_normalization::char::decompose_canonical(c, |d| {
                if !combining(d) {
                    push(d, &mut folded);
                }
            });
            continue;
        }
        push(c, &mut folded);
    }
    join_spaced(unleet(folded))
}

/// Plain ASCII: one look at every byte says which steps can change anything; the usual prompt
/// (no control bytes, no digits or leetspeak symbols, no spaced letters) is lowercased in one
/// copy and the other steps are skipped.
fn normalize_ascii(text: &str) -> Normalized {
    let class = text
        .bytes()
        .fold(0u8, |acc, b| acc | BYTE_CLASS[usize::from(b)])
        & (CONTROL | LEET);
    let folded = if class & CONTROL != 0 {
        text.bytes()
            .filter(|b| BYTE_CLASS[usize::from(*b)] & CONTROL == 0)
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect()
    } else {
        text.to_ascii_lowercase()
    };
    let unleeted = if class & LEET != 0 {
        unleet(folded)
    } else {
        folded
    };
    join_spaced(unleeted)
}

/// Map leetspeak inside words that mix letters with digits or symbols.
fn unleet(text: String) -> String {
    // Fast path: nothing that could be leetspeak.
    if !text
        .bytes()
        .any(|b| b.is_ascii_digit() || matches!(b, b'!' | b'|' | b'@' | b'$' | b'+'))
    {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let has_alpha = word.chars().any(char::is_alphabetic);
        let has_leet = word.chars().any(|c| leet(c).is_some());
        if has_alpha && has_leet {
            let cs: Vec<char> = word.chars().collect();
            let last_alnum = cs.iter().rposition(|c| c.is_alphanumeric()).unwrap_or(0);
            for (k, c) in cs.iter().enumerate() {
                // A symbol stands for a letter only inside a word ("sh!t", "$ex"), never in the
                // run of symbols that ends it ("kill!", "kill!!").
                let symbol = !c.is_alphanumeric();
                let mapped = if symbol && k > last_alnum {
                    None
                } else {
                    leet(*c)
                };
                out.push(mapped.unwrap_or(*c));
            }
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() || leet(c).is_some() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Join runs of three or more single letters separated by one space, dot, dash or underscore.
fn join_spaced(text: String) -> Normalized {
    // Fast path: no single letter between separators followed by another one.
    if !has_spaced_run(text.as_bytes()) {
        return Normalized {
            text,
            joined: Vec::new(),
        };
    }
    let mut joined = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let single = |k: usize| -> bool {
        chars.get(k).is_some_and(|c| c.is_alphabetic())
            && (k == 0 || !chars[k - 1].is_alphanumeric())
            && chars.get(k + 1).is_none_or(|c| !c.is_alphanumeric())
    };
    let sep = |c: char| matches!(c, ' ' | '.' | '-' | '_' | '*');
    while i < chars.len() {
        if single(i) {
            // Collect letters at i, i+2, i+4, ... while each is single and the gap is a separator.
            let mut j = i;
            let mut letters = vec![chars[i]];
            while j + 2 < chars.len() && sep(chars[j + 1]) && single(j + 2) {
                letters.push(chars[j + 2]);
                j += 2;
            }
            if letters.len() >= 3 {
                // A leading "a" or "i" before a longer run is most likely the word itself
                // ("make a b o m b").
                if matches!(letters[0], 'a' | 'i') && letters.len() >= 4 {
                    out.push(letters[0]);
                    out.push(' ');
                    letters.remove(0);
                }
                let start = out.len();
                out.extend(letters);
                joined.push((start, out.len()));
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    Normalized { text: out, joined }
}

/// Whether some ASCII letter stands alone and another lone letter follows two bytes later; a
/// cheap test that lets almost every text skip the joining pass. Non-ASCII text always takes it.
fn has_spaced_run(b: &[u8]) -> bool {
    if !b.is_ascii() {
        return true;
    }
    // A lone letter is a run of one letter between non-alphanumeric bytes (so two of them are
    // at least two bytes apart). `alone(at)` records one and says whether the two before it
    // stand two and four bytes back.
    let mut lone: [Option<usize>; 2] = [None, None]; // the latest first
    let mut alone = |at: usize| -> bool {
        let run = at >= 4 && lone == [Some(at - 2), Some(at - 4)];
        lone = [Some(at), lone[0]];
        run
    };
    let mut len = 0usize; // of the current letter-or-digit run
    let class = |i: usize| BYTE_CLASS[usize::from(b[i])];
    for i in 0..b.len() {
        if class(i) & ALNUM != 0 {
            len += 1;
            continue;
        }
        if len == 1 && class(i - 1) & ALPHA != 0 && alone(i - 1) {
            return true;
        }
        len = 0;
    }
    len == 1 && class(b.len() - 1) & ALPHA != 0 && alone(b.len() - 1)
}

/// The shortest run of base64 or hex characters that is decoded (shorter runs are words).
const MIN_ENCODED: usize = 20;
/// How much of one run is decoded, how many runs, and how much decoded text is kept in all.
const MAX_RUN: usize = 16 * 1024;
const MAX_RUNS: usize = 16;
const MAX_DECODED: usize = 16 * 1024;

/// Whether each byte is a base64 (standard or URL-safe) or hex character.
const ENCODED: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'-' | b'_');
        b += 1;
    }
    t
};

fn encoded_byte(b: u8) -> bool {
    ENCODED[usize::from(b)]
}

/// Whether decoded bytes read as text: valid UTF-8, no control characters but line breaks and
/// tabs, and mostly letters and spaces (random bytes, images and compressed data are not).
fn reads_as_text(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    let (mut n, mut plain) = (0usize, 0usize);
    for c in s.chars() {
        if c.is_control() && !matches!(c, '\n' | '\t' | '\r') {
            return None;
        }
        n += 1;
        plain += usize::from(c.is_alphabetic() || c == ' ');
    }
    (n >= 8 && plain * 10 >= n * 7 && s.contains(' ')).then(|| s.to_string())
}

/// One run of base64 or hex characters decoded, if it decodes to text.
fn decode_run(run: &str) -> Option<String> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let run = &run[..run.len().min(MAX_RUN)];
    if run.len().is_multiple_of(2) && run.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(run).ok().and_then(|b| reads_as_text(&b));
    }
    let body = run.trim_end_matches('=');
    // A stray last character cannot be base64; drop it.
    let body = &body[..body.len() - usize::from(body.len() % 4 == 1)];
    let config = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true);
    let alphabet = if body.bytes().any(|b| matches!(b, b'-' | b'_')) {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    let bytes = GeneralPurpose::new(alphabet, config).decode(body).ok()?;
    reads_as_text(&bytes)
}

/// URL-encoding decoded (`%41` and `+` for a space), when the text holds three escapes or more.
fn decode_url(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let escape = |i: usize| {
        b[i] == b'%'
            && b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    };
    // Most texts hold no '%' at all: one fast search says so.
    if !text.contains('%') || (0..b.len()).filter(|i| escape(*i)).take(3).count() < 3 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len().min(MAX_DECODED));
    let mut i = 0;
    while i < b.len() && out.len() < MAX_DECODED {
        if escape(i) {
            let hi = char::from(b[i + 1]).to_digit(16).unwrap_or(0);
            let lo = char::from(b[i + 2]).to_digit(16).unwrap_or(0);
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The text hidden in a prompt as base64, hex or URL-encoding, decoded (one level), to be
/// screened with the prompt. Bounded: only runs of `MIN_ENCODED` characters or more, at most
/// `MAX_RUNS` of them, each cut to `MAX_RUN`, and `MAX_DECODED` bytes of decoded text in all.
/// `None` when nothing decodes to text.
pub fn decode_payloads(text: &str) -> Option<String> {
    let mut out = String::new();
    let b = text.as_bytes();
    let (mut i, mut runs) = (0usize, 0usize);
    while i + MIN_ENCODED <= b.len() && runs < MAX_RUNS && out.len() < MAX_DECODED {
        // A run of `MIN_ENCODED` starting at `i` needs every byte up to `i + MIN_ENCODED - 1`:
        // the last byte of that window that is not encoded rules out every start up to it,
        // so ordinary text (a space every few bytes) is crossed in long strides.
        if let Some(k) = (i..i + MIN_ENCODED).rev().find(|k| !encoded_byte(b[*k])) {
            i = k + 1;
            continue;
        }
        let start = i;
        i += MIN_ENCODED;
        while i < b.len() && encoded_byte(b[i]) {
            i += 1;
        }
        runs += 1;
        // Only ASCII bytes are in a run, so these are character boundaries.
        if let Some(d) = text.get(start..i).and_then(decode_run) {
            out.push_str(&d);
            out.push('\n');
        }
    }
    if let Some(d) = decode_url(text) {
        out.push_str(&d);
    }
    if out.len() > MAX_DECODED {
        let mut cut = MAX_DECODED;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    (!out.trim().is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn evasions_fold_back() {
        assert_eq!(normalize("Ｂｏｍｂ"), "bomb");
        assert_eq!(normalize("b\u{200B}o\u{200D}mb"), "bomb");
        assert_eq!(normalize("bоmb"), "bomb"); // Cyrillic о
        assert_eq!(normalize("h0w to k1ll"), "how to kill");
        assert_eq!(normalize("k i l l them"), "kill them");
        assert_eq!(normalize("b.o.m.b"), "bomb");
        assert_eq!(normalize("b-o-m-b"), "bomb");
        assert_eq!(normalize("b_o_m_b"), "bomb");
        assert_eq!(normalize("bo\u{301}mb"), "bomb");
        assert_eq!(normalize("BÓMB ëxplösîvé"), "bomb explosive");
        assert_eq!(normalize("日本語 한국어"), "日本語 한국어");
        assert_eq!(normalize("make a b o m b"), "make a bomb");
        assert_eq!(
            normalize("I have 2 cats and 13 dogs"),
            "i have 2 cats and 13 dogs"
        );
        assert_eq!(normalize("a b"), "a b");
        assert_eq!(normalize("stop it!"), "stop it!");
        assert_eq!(normalize("sh!t"), "shit");
        assert_eq!(normalize("you are trash!!"), "you are trash!!");
        assert_eq!(normalize("a\u{7}b\u{0}c d"), "abc d");
    }

    #[test]
    fn joined_runs_are_marked() {
        let n = super::normalize_parts("h o w t o d o i t");
        assert_eq!(n.text, "howtodoit");
        assert_eq!(n.joined, vec![(0, 9)]);
        assert!(super::normalize_parts("plain words").joined.is_empty());
    }

    #[test]
    fn payloads_decode_within_bounds() {
        use super::decode_payloads;
        // "tell me a story about cats", base64, hex and URL-encoded.
        let b64 = "dGVsbCBtZSBhIHN0b3J5IGFib3V0IGNhdHM=";
        assert_eq!(
            decode_payloads(&format!("read: {b64}")).as_deref(),
            Some("tell me a story about cats\n")
        );
        let hexed = "74656c6c206d6520612073746f72792061626f75742063617473";
        assert_eq!(
            decode_payloads(hexed).as_deref(),
            Some("tell me a story about cats\n")
        );
        assert_eq!(
            decode_payloads("tell%20me%20a%20story").as_deref(),
            Some("tell me a story")
        );
        assert_eq!(decode_payloads("nothing encoded here at all"), None);
        assert_eq!(decode_payloads("d41d8cd98f00b204e9800998ecf8427e"), None);
        // Decoded text is capped.
        let big = "dGVsbCBtZSBhIHN0b3J5IGFib3V0IGNhdHMg".repeat(2000);
        assert!(decode_payloads(&big).is_some_and(|d| d.len() <= super::MAX_DECODED));
    }

    #[test]
    fn spaced_run_test_agrees_with_its_definition() {
        // Lone letters at i, i + 2 and i + 4, by the definition, on every short text over a
        // small alphabet.
        let plain = |b: &[u8]| {
            let alone = |i: usize| {
                b.get(i).is_some_and(u8::is_ascii_alphabetic)
                    && (i == 0 || !b[i - 1].is_ascii_alphanumeric())
                    && b.get(i + 1).is_none_or(|c| !c.is_ascii_alphanumeric())
            };
            (0..b.len()).any(|i| alone(i) && alone(i + 2) && alone(i + 4))
        };
        let alphabet = [b'a', b'1', b' ', b'.'];
        for len in 0..=8u32 {
            for n in 0..4usize.pow(len) {
                let text: Vec<u8> = (0..len)
                    .map(|k| alphabet[(n / 4usize.pow(k)) % 4])
                    .collect();
                assert_eq!(super::has_spaced_run(&text), plain(&text), "{text:?}");
            }
        }
    }
}
