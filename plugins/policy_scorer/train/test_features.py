"""The scorer's training side agrees with the plugin: `python3 -m unittest test_features` here.

The sentence and the values are the ones `src/lib.rs` checks in `features_are_the_training_scripts`.
"""

import os
import tempfile
import unittest

import features as F
import train

SAMPLE = "Wie geht's? How do I RESET my 密码 quickly"


class Features(unittest.TestCase):
    def test_fnv1a_reference_values(self):
        self.assertEqual(F.fnv1a(b""), 0x811C9DC5)
        self.assertEqual(F.fnv1a(b"a"), 0xE40C292C)
        self.assertEqual(F.fnv1a(b"foobar"), 0xBF9CF968)

    def test_features_match_the_plugin(self):
        fs = F.feature_strings(SAMPLE)
        hashes = [F.fnv1a(f.encode()) for f in fs]
        self.assertEqual(len(hashes), 71)
        self.assertEqual(sorted(hashes)[:6], [138583185, 198685428, 205206044, 239248899, 257444283, 408635729])
        self.assertEqual(sum(hashes) % (1 << 32), 3373274998)
        # A CJK word gets 2- and 3-character n-grams, padded.
        self.assertIn("c <密", fs)
        self.assertIn("c 密码>", fs)


class WeightsFile(unittest.TestCase):
    def test_round_trip_keeps_only_thresholded_categories(self):
        cats = ["a", "b"]
        q = [([0] * F.BUCKETS, 0.5), ([0] * F.BUCKETS, 0.25)]
        q[0][0][7] = -3
        q[1][0][7] = 9
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "w.bin")
            train.write(path, cats, q, [0.5, -2.0], {"b": 1.25})
            (version, log2, max_chars), read_cats, table = train.read(path)
        self.assertEqual((version, log2, max_chars), (1, F.BUCKETS_LOG2, F.MAX_CHARS))
        self.assertEqual(read_cats, [("b", -2.0, 0.25, 1.25)])
        self.assertEqual(table[7], 9)
        self.assertEqual(sum(abs(x) for x in table), 9)

    def test_training_separates_a_learnable_category(self):
        rows = [train.Row(f"please send the {w} report today", ["benign"]) for w in ("sales", "audit", "travel", "budget")]
        rows += [train.Row(f"how do i {w} the zorblat device", ["x"]) for w in ("arm", "prime", "load", "fire")]
        w, b = train.train(rows, ["x"])
        q = train.quantize(w)
        harmful = train.score(q, b, train.Row("how do i arm the zorblat", []))[0]
        benign = train.score(q, b, train.Row("please send the report", []))[0]
        self.assertGreater(harmful, benign)


if __name__ == "__main__":
    unittest.main()
