#!/usr/bin/env python3
"""Train the policy scorer's weights from a labelled JSONL file (`{"text", "labels", "source"}`).

One logistic regression per category over hashed word, word-pair and character n-gram features
(see features.py; the plugin computes the same ones), trained with AdaGrad and a little L2.
Weights are stored as one signed byte per bucket and category, with a scale per category.

Each category gets a threshold from out-of-fold scores of the rows it was trained on (an inner
cross-validation by the md5 of the text): above every benign row's score, with a margin for how
much the inner models disagree. A category whose threshold would catch fewer than MIN_GAIN rows
of that category is left out: the scorer only speaks for categories it is confident in.

    python3 train.py DATA.jsonl --out ../weights.bin                     # shipped: every row
    python3 train.py DATA.jsonl --out fold0.bin --folds 5 --except-fold 0  # fold 0 held out

Pure Python, no dependencies; a run on the dev sample takes a few minutes.
"""

import argparse
import collections
import hashlib
import math
import random
import struct
import sys

import features as F

# Categories the scorer may speak for (each needs enough labelled rows to be learned).
CATEGORIES = [
    "self_harm",
    "malware_cyber",
    "terrorism_extremism",
    "human_trafficking",
    "csam_grooming",
    "hate_speech",
    "threats_incitement",
    "sexual_explicit",
]
# Sources whose labels describe something other than the text (I2P: the generated images).
SKIP_SOURCES = {"i2p_hard"}
EPOCHS = 3
L2 = 1e-6
RATE = 0.1
BIAS_RATE = 0.05
INNER_FOLDS = 4
MIN_GAIN = 5
MAGIC = b"TGSC"
VERSION = 1


def fold_of(text: str, k: int) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % k


def vectorize(text: str) -> list[tuple[int, float]]:
    """Bucket counts scaled by 1/sqrt(number of features): what the plugin sums."""
    b = F.buckets(text)
    if not b:
        return []
    s = 1.0 / math.sqrt(len(b))
    return [(h, n * s) for h, n in collections.Counter(b).items()]


class Row:
    __slots__ = ("text", "labels", "benign", "x")

    def __init__(self, text, labels):
        self.text = text
        self.labels = set(labels)
        self.benign = self.labels == {"benign"}
        self.x = vectorize(text)


def train(rows: list[Row], cats: list[str], seed: int = 7):
    """Logistic regression per category; returns (weights per category, biases)."""
    d = F.BUCKETS
    weights = [[0.0] * d for _ in cats]
    grads = [[1e-8] * d for _ in cats]
    bias = [0.0] * len(cats)
    order = list(range(len(rows)))
    rnd = random.Random(seed)
    for _ in range(EPOCHS):
        rnd.shuffle(order)
        for i in order:
            r = rows[i]
            for c, cat in enumerate(cats):
                w = weights[c]
                z = bias[c]
                for h, v in r.x:
                    z += w[h] * v
                p = 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))
                g = p - (1.0 if cat in r.labels else 0.0)
                if abs(g) < 1e-3:
                    continue
                acc = grads[c]
                for h, v in r.x:
                    step = g * v + L2 * w[h]
                    acc[h] += step * step
                    w[h] -= RATE * step / math.sqrt(acc[h])
                bias[c] -= BIAS_RATE * g
    return weights, bias


def quantize(weights):
    """One signed byte per weight and a scale per category."""
    out = []
    for w in weights:
        top = max((abs(x) for x in w), default=0.0)
        scale = top / 127.0 if top > 0 else 1.0
        out.append(([max(-127, min(127, round(x / scale))) for x in w], scale))
    return out


def score(q, bias, row: Row) -> list[float]:
    """What the plugin computes: bias + scale * sum of byte weights / sqrt(n)."""
    return [b + scale * sum(qw[h] * v for h, v in row.x) for (qw, scale), b in zip(q, bias)]


def thresholds(rows: list[Row], cats: list[str], k: int) -> dict[str, float]:
    """Per category, from out-of-fold scores (inner folds by md5): the highest benign score of
    any inner fold, plus how far the inner folds' highest benign scores lie apart (the model
    trained on every row scores differently from each inner one; the spread is a measure of
    by how much). A category is kept only when that threshold still catches MIN_GAIN rows of
    it out of fold."""
    scored = []  # (inner fold, row, scores)
    for i in range(k):
        tr = [r for r in rows if fold_of(r.text, k) != i]
        te = [r for r in rows if fold_of(r.text, k) == i]
        w, b = train(tr, cats)
        q = quantize(w)
        scored.extend((i, r, score(q, b, r)) for r in te)
        print(f"  inner fold {i + 1}/{k} done", file=sys.stderr)
    out = {}
    for c, cat in enumerate(cats):
        tops = [max((s[c] for j, r, s in scored if j == i and r.benign), default=0.0) for i in range(k)]
        thr = max(tops) + (max(tops) - min(tops)) + 1e-3
        gain = sum(1 for _, r, s in scored if cat in r.labels and s[c] >= thr)
        others = sum(1 for _, r, s in scored if not r.benign and cat not in r.labels and s[c] >= thr)
        print(f"  {cat}: threshold {thr:.3f}, out-of-fold {gain} of the category, {others} other harmful", file=sys.stderr)
        if gain >= MIN_GAIN:
            out[cat] = thr
    return out


def write(path: str, cats: list[str], q, bias, thr: dict[str, float]):
    keep = [c for c, cat in enumerate(cats) if cat in thr]
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<IIII", VERSION, F.BUCKETS_LOG2, F.MAX_CHARS, len(keep)))
        for c in keep:
            name = cats[c].encode()
            f.write(struct.pack("<B", len(name)) + name)
            f.write(struct.pack("<fff", bias[c], q[c][1], thr[cats[c]]))
        table = bytearray(F.BUCKETS * len(keep))
        for h in range(F.BUCKETS):
            for j, c in enumerate(keep):
                table[h * len(keep) + j] = q[c][0][h] & 0xFF
        f.write(table)


def read(path: str):
    """The categories of a weights file: [(name, bias, scale, threshold)] and the byte table."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != MAGIC:
        raise ValueError("not a scorer weights file")
    version, log2, max_chars, n = struct.unpack_from("<IIII", data, 4)
    pos = 20
    cats = []
    for _ in range(n):
        ln = data[pos]
        name = data[pos + 1 : pos + 1 + ln].decode()
        pos += 1 + ln
        b, s, t = struct.unpack_from("<fff", data, pos)
        pos += 12
        cats.append((name, b, s, t))
    table = struct.unpack_from(f"<{(1 << log2) * n}b", data, pos)
    return (version, log2, max_chars), cats, table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--out", required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--except-fold", type=int, help="leave this fold (md5 of the text mod --folds) out")
    a = ap.parse_args()
    import json

    rows = []
    with open(a.data, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            o = json.loads(line)
            if o.get("source") in SKIP_SOURCES:
                continue
            if a.except_fold is not None and fold_of(o["text"], a.folds) == a.except_fold:
                continue
            rows.append(Row(o["text"], o["labels"]))
    print(f"{len(rows)} rows", file=sys.stderr)
    thr = thresholds(rows, CATEGORIES, INNER_FOLDS)
    w, b = train(rows, CATEGORIES)
    q = quantize(w)
    write(a.out, CATEGORIES, q, b, thr)
    print(f"wrote {a.out}: {', '.join(f'{c} >= {t:.3f}' for c, t in thr.items())}", file=sys.stderr)


if __name__ == "__main__":
    main()
