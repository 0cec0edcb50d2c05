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
