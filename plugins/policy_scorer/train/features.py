"""The scorer's features, exactly as `plugins/policy_scorer/src/lib.rs` computes them.

A text is cut to its first MAX_CHARS characters and lower-cased; its words are the runs of
alphanumeric characters. Features: every word, every pair of adjacent words, and the character
n-grams of each word padded with '<' and '>' (3 and 4 letters; 2 and 3 for a word of CJK script,
which has no spaces). Each feature is a string, hashed with 32-bit FNV-1a over its UTF-8 bytes
into BUCKETS buckets. A feature that occurs twice counts twice.
"""

MAX_CHARS = 1500
BUCKETS_LOG2 = 17
BUCKETS = 1 << BUCKETS_LOG2

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193


def fnv1a(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & 0xFFFFFFFF
    return h


def is_word_char(ch: str) -> bool:
    # Rust's char::is_alphanumeric for the scripts that matter here.
    return ch.isalnum()


def words(text: str) -> list[str]:
    t = text[:MAX_CHARS].lower()
    out, cur = [], []
    for ch in t:
        if is_word_char(ch):
            cur.append(ch)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def is_cjk(word: str) -> bool:
    return ord(word[0]) >= 0x2E80


def feature_strings(text: str) -> list[str]:
    ws = words(text)
    feats = []
    for i, w in enumerate(ws):
        feats.append("w " + w)
        if i + 1 < len(ws):
            feats.append("b " + w + " " + ws[i + 1])
        p = "<" + w + ">"
        sizes = (2, 3) if is_cjk(w) else (3, 4)
        for n in sizes:
            for j in range(0, len(p) - n + 1):
                feats.append("c " + p[j : j + n])
    return feats


def buckets(text: str) -> list[int]:
    return [fnv1a(f.encode("utf-8")) & (BUCKETS - 1) for f in feature_strings(text)]
