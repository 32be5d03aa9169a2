"""The series reader against the series conformance cases (spec/SERIES.md): every
manifest case gets its verdict, and the golden run rebuilds every step to the
checkpoint digests its manifest pins."""

import json
import os
import shutil
import tempfile
import unittest

import tpde_reader as r
import tpde_series as s

HERE = os.path.dirname(os.path.abspath(__file__))
SERIES = os.path.join(HERE, "..", "series")


class Manifests(unittest.TestCase):
    def test_every_case_gets_its_verdict(self):
        with open(os.path.join(SERIES, "cases.json"), "rb") as f:
            cases = json.load(f)["cases"]
        self.assertGreater(len(cases), 20)
        for case in cases:
            with self.subTest(case=case["file"]):
                with open(os.path.join(SERIES, case["file"]), "rb") as f:
                    data = f.read()
                try:
                    s.parse_manifest(data)
                    verdict = None
                except r.TpdeError as e:
                    verdict = e.code
                self.assertEqual(verdict, case["error"], case["rule"])


class GoldenRun(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.run_dir = os.path.join(self.tmp, "run")
        shutil.copytree(os.path.join(SERIES, "run"), self.run_dir)

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def test_every_step_rebuilds_to_its_pinned_digests(self):
        m = s.read_manifest(self.run_dir)
        kinds = {e["kind"] for e in m["steps"]}
        self.assertEqual(kinds, {"keyframe", "delta", "same"})
        self.assertEqual(max(len(s.chain(m, e["step"])) for e in m["steps"]), 3)
        for e in m["steps"]:
            out = os.path.join(self.tmp, f"step-{e['step']}.safetensors")
            s.get(self.run_dir, e["step"], out)  # raises unless the digests match
            digest, n = s.sha256_file(out)
            self.assertEqual((n, digest), (e["checkpoint"]["files"][0]["bytes"], e["checkpoint"]["files"][0]["sha256"]))
        with self.assertRaises(r.TpdeError) as missing:
            s.get(self.run_dir, 5, os.path.join(self.tmp, "x.safetensors"))
        self.assertEqual(missing.exception.code, "E_SERIES_STEP")

    def test_a_changed_step_file_is_refused_before_decoding(self):
        m = s.read_manifest(self.run_dir)
        delta = next(e for e in m["steps"] if e["kind"] == "delta")
        path = os.path.join(self.run_dir, delta["file"])
        with open(path, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))
        out = os.path.join(self.tmp, "out.safetensors")
        with self.assertRaises(r.TpdeError) as changed:
            s.get(self.run_dir, delta["step"], out)
        self.assertEqual(changed.exception.code, "E_SERIES_DIGEST")
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
