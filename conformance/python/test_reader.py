"""Tests of the independent Python reader (tpde_reader.py).

    python3 -m unittest discover -s conformance/python -p 'test_*.py'

1. The conformance suite, case by case, through conformance/manifest.json.
2. The test vectors of spec §10.3 and the worked example of spec §15.8.
3. Small hand-made inputs for zigzag, rotation, byte planes, gaps, bitmaps, value order,
   the zstd profile and strict JSON.
4. The lane rANS codec (§8.7): a reference encoder written from §15.10, round trips,
   every header and decoding check, and whole files whose streams are recoded with
   codec 2 (feature bit 1, O6, O20, the contexts allowed in each place, D3's order).
5. Packed lane rANS (§8.9): packed tables and context maps written from Table 8.8,
   every check of the packed parsers, round trips in both table forms, and whole files
   recoded with codec 4 (feature bit 4, O20).
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import xxhash
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tpde_reader as r  # noqa: E402

CONFORMANCE = os.path.dirname(HERE)
SPEC = os.path.join(os.path.dirname(CONFORMANCE), "spec")
READER = os.path.join(HERE, "tpde_reader.py")

# Cases where this reader, following the current text of spec/FORMAT.md, gives another
# result than the golden manifest.  Each maps the case id to (the result this reader
# gives, why).  The test checks that the reader still gives exactly that result, and
# reports the case as skipped; once the golden file is regenerated the entry is stale
# and the test says so.
KNOWN_DISAGREEMENTS = {}


def load_manifest():
    with open(os.path.join(CONFORMANCE, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)["cases"]


class ConformanceSuite(unittest.TestCase):
    def test_manifest_cases(self):
        cases = load_manifest()
        self.assertGreater(len(cases), 0)
        for case in cases:
            with self.subTest(case=case["id"]):
                base = case.get("base")
                status, out = r.run_decode(
                    os.path.join(CONFORMANCE, case["path"]),
                    os.path.join(CONFORMANCE, base) if base else None,
                    [os.path.join(CONFORMANCE, ref) for ref in case.get("references", [])])
                if case["expect"] == "accept":
                    with open(os.path.join(CONFORMANCE, case["expected"]), "rb") as f:
                        want = f.read().decode("utf-8")
                    ok = status == 0 and out == want
                else:
                    want = '{"error":"%s"}\n' % case["error"]
                    ok = status == 1 and out == want
                known = KNOWN_DISAGREEMENTS.get(case["id"])
                if known and not ok:
                    self.assertEqual(status, 0 if known[0] == "accept" else 1, out)
                    if known[0] != "accept":
                        self.assertEqual(out, '{"error":"%s"}\n' % known[0])
                    continue  # documented disagreement (see KNOWN_DISAGREEMENTS)
                self.assertFalse(known, f"{case['id']} now agrees: drop it from KNOWN_DISAGREEMENTS")
                self.assertEqual((status, out), (0 if case["expect"] == "accept" else 1, want))

    def test_cli_contract(self):
        mixed = os.path.join(CONFORMANCE, "valid", "mixed")
        p = subprocess.run([sys.executable, READER, "decode", os.path.join(mixed, "delta.tpde"),
                            "--base", os.path.join(mixed, "base.safetensors")],
                           capture_output=True, check=False)
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(os.path.join(mixed, "expected.json"), "rb") as f:
            self.assertEqual(p.stdout, f.read())
        p = subprocess.run([sys.executable, READER, "decode", os.path.join(mixed, "delta.tpde")],
                           capture_output=True, check=False)
        self.assertEqual((p.returncode, p.stdout), (1, b'{"error":"E_BASE_REQUIRED"}\n'))
        p = subprocess.run([sys.executable, READER, "frobnicate"], capture_output=True, check=False)
        self.assertEqual(p.returncode, 2)

    def test_out_of_memory_is_a_code(self):
        """§9.1: an allocation failure is E_OUT_OF_MEMORY, never a crash."""
        import contextlib
        import io
        from unittest import mock

        def exhausted(*_):
            raise MemoryError
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        with mock.patch.object(r, "cmd_decode", exhausted), contextlib.redirect_stderr(io.StringIO()), \
                mock.patch.object(sys, "stdout", out):
            status = r.main(["decode", "any.tpde"])
        out.flush()
        self.assertEqual((status, out.buffer.getvalue()), (1, b'{"error":"E_OUT_OF_MEMORY"}\n'))


class SpecVectors(unittest.TestCase):
    """§10.3."""

    def test_xxh3(self):
        self.assertEqual(r.xxh64(b""), 0x2D06800538D394C2)
        self.assertEqual(struct.pack("<Q", r.xxh64(b"")).hex(" "), "c2 94 d3 38 05 80 06 2d")
        self.assertEqual(r.xxh64(b"abc"), 0x78AF5F94892F3950)
        self.assertEqual(r.xxh64(b""), r.EMPTY_XXH3_64)
        self.assertEqual(r.xxh128(b"").hex(), "99aa06d3014798d86001c324468d497f")
        self.assertEqual(r.xxh128(b"abc").hex(), "06b05ab6733a618578af5f94892f3950")
        self.assertEqual(r.xxh128(b"def").hex(), "09ae900c0bc0d4059be4e73e699ef188")

    def test_tree_digests(self):
        def tree(data, cw):
            return r.tree_digest(data, 0, len(data), cw)
        self.assertEqual(tree(b"abcdef", 3), "a39378eb4fd2fac46eb7d95ad5738a7f")
        self.assertEqual(tree(b"abcdefg", 3), "b3eb99519926e923ce6787fe8de14fc5")
        self.assertEqual(tree(b"abc", 3), "f758394eebabb2bb51ee911f78f31836")
        self.assertEqual(tree(b"", 3), "99aa06d3014798d86001c324468d497f")
        self.assertNotEqual(tree(b"abc", 3), r.xxh128(b"abc").hex())  # K = 1 is a tree too

    def test_worked_example(self):
        """§15.8: decode and rebuild spec/examples/tiny byte for byte."""
        tiny = os.path.join(SPEC, "examples", "tiny")
        delta, base = os.path.join(tiny, "delta.tpde"), os.path.join(tiny, "base.safetensors")
        status, _out = r.run_decode(delta, base)
        self.assertEqual(status, 0)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "t.safetensors")
            r.cmd_rebuild(delta, base, out, False)
            with open(out, "rb") as a, open(os.path.join(tiny, "target.safetensors"), "rb") as b:
                self.assertEqual(a.read(), b.read())
            with self.assertRaises(r.TpdeError) as e:
                r.cmd_rebuild(delta, base, out, False)
            self.assertEqual(e.exception.code, "E_OUTPUT_EXISTS")

    def test_sharded_rebuild(self):
        case = os.path.join(CONFORMANCE, "valid", "sharded")
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "out")
            r.cmd_rebuild(os.path.join(case, "delta.tpde"), os.path.join(case, "base"), out, False)
            names = sorted(os.listdir(out))
            self.assertIn(r.INDEX_NAME, names)
            # every rebuilt shard is a safetensors file that parses as a base
            tensors = r.read_base(out)
            self.assertGreater(len(tensors), 0)


class Outputs(unittest.TestCase):
    """§11.3 and §14: what rebuilding does around its output."""

    def setUp(self):
        self.case = os.path.join(CONFORMANCE, "valid", "sharded")
        self.delta = os.path.join(self.case, "delta.tpde")
        self.base = os.path.join(self.case, "base")

    def test_force_replaces_only_a_directory_of_checkpoint_files(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "out")
            os.mkdir(out)
            with open(os.path.join(out, "notes.txt"), "wb") as f:
                f.write(b"mine")
            self.assertEqual(codes(r.cmd_rebuild, self.delta, self.base, out, True), "E_OUTPUT_EXISTS")
            self.assertEqual(os.listdir(out), ["notes.txt"])
            os.unlink(os.path.join(out, "notes.txt"))
            with open(os.path.join(out, "old.safetensors"), "wb") as f:
                f.write(b"old")
            # A shard that no index names is not part of a checkpoint.
            self.assertEqual(codes(r.cmd_rebuild, self.delta, self.base, out, True), "E_OUTPUT_EXISTS")
            with open(os.path.join(out, r.INDEX_NAME), "w") as f:
                json.dump({"weight_map": {"w": "old.safetensors"}}, f)
            r.cmd_rebuild(self.delta, self.base, out, True)
            self.assertNotIn("old.safetensors", os.listdir(out))
            self.assertIn(r.INDEX_NAME, os.listdir(out))
            self.assertEqual(os.listdir(d), ["out"], "nothing left beside it")

    def test_an_output_that_holds_an_input_is_refused(self):
        with tempfile.TemporaryDirectory() as d:
            models = os.path.join(d, "models")
            import shutil
            shutil.copytree(self.case, models)
            base, delta = os.path.join(models, "base"), os.path.join(models, "delta.tpde")
            before = sorted(os.listdir(models))
            for out in (models, base, os.path.join(base, "new")):
                self.assertEqual(codes(r.cmd_rebuild, delta, base, out, True), "E_INVALID_ARGUMENT", out)
            self.assertEqual(sorted(os.listdir(models)), before)

    def test_what_appears_meanwhile_is_not_replaced(self):
        with tempfile.TemporaryDirectory() as d:
            tmpdir = os.path.join(d, "new")
            os.mkdir(tmpdir)
            out = os.path.join(d, "out")
            os.mkdir(out)
            with open(os.path.join(out, "theirs"), "wb") as f:
                f.write(b"theirs")
            self.assertEqual(codes(r._place_dir, tmpdir, out), "E_OUTPUT_EXISTS")
            self.assertEqual(os.listdir(out), ["theirs"])

    def test_names_are_escaped_for_the_terminal(self):
        self.assertEqual(r.escape_for_terminal("plain ünï"), "plain ünï")
        self.assertEqual(r.escape_for_terminal("a\x1b[2J\x07\t\u009b\u202e"), "a\\u{1b}[2J\\u{7}\\t\\u{9b}\\u{202e}")


def codes(fn, *args):
    try:
        fn(*args)
    except r.TpdeError as e:
        return e.code
    return None


class ValueOps(unittest.TestCase):
    """§8.2 zigzag and sub/xor; §8.4 rotation and byte planes."""

    def test_zigzag_examples(self):
        u16 = lambda *v: np.array(v, dtype=np.uint16)  # noqa: E731
        b = u16(0x3F80, 0x3F80)
        t = u16(0x3F81, 0x3F7F)
        v = r.zigzag(t - b, 16)
        self.assertEqual(v.tolist(), [2, 1])
        self.assertEqual((t ^ b).tolist(), [0x0001, 0x00FF])
        self.assertEqual(r.combine(b, v, r.OP_SUB).tolist(), t.tolist())
        self.assertEqual(r.combine(b, t ^ b, r.OP_XOR).tolist(), t.tolist())
        # zigzag(d): 2d for d >= 0 and -2d - 1 for d < 0
        d = u16(0, 1, 0xFFFF, 2, 0xFFFE, 0x7FFF, 0x8000)
        self.assertEqual(r.zigzag(d, 16).tolist(), [0, 2, 1, 4, 3, 0xFFFE, 0xFFFF])

    def test_zigzag_roundtrip_all_widths(self):
        rng = np.random.default_rng(0)
        for wb, dt in r.WORD_DTYPE.items():
            w = 8 * wb
            x = rng.integers(0, 2**w, size=4096, dtype=np.uint64).astype(dt)
            if wb <= 2:
                x = np.arange(2**w, dtype=dt)
            self.assertTrue(np.array_equal(r.unzigzag(r.zigzag(x, w)), x))
            b = rng.integers(0, 2**w, size=x.size, dtype=np.uint64).astype(dt)
            self.assertTrue(np.array_equal(r.combine(b, r.zigzag(x - b, w), r.OP_SUB), x))

    def test_rotation(self):
        v = np.array([0x80000001], dtype=np.uint32)
        rot = r.rotl1(v, 32)
        self.assertEqual(int(rot[0]), 0x00000003)
        self.assertEqual(rot.view(np.uint8).tolist(), [0x03, 0, 0, 0])
        self.assertEqual(r.rotr1(rot, 32).tolist(), v.tolist())
        planes = [bytes([0x03]), b"\x00", b"\x00", b"\x00"]
        self.assertEqual(r.read_values(planes, r.LAYOUT_ROTATED, 1, 4).tolist(), [0x80000001])
        self.assertEqual(r.read_values(planes, r.LAYOUT_PLANES, 1, 4).tolist(), [3])
        for wb, dt in r.WORD_DTYPE.items():
            x = np.arange(0, 256, dtype=dt) * dt.type(0x01010101 & ((1 << (8 * wb)) - 1) or 1)
            self.assertTrue(np.array_equal(r.rotr1(r.rotl1(x, 8 * wb), 8 * wb), x))

    def test_worked_example_planes(self):
        # §15.8 chunk 1: rotated planes 00 01 / 00 00 / 00 00 / 7f 80 -> 3f800000, c0000000
        planes = [b"\x00\x01", b"\x00\x00", b"\x00\x00", b"\x7f\x80"]
        got = r.read_values(planes, r.LAYOUT_ROTATED, 2, 4).tolist()
        self.assertEqual(got, [0x3F800000, 0xC0000000])
        # words layout: little-endian words
        self.assertEqual(r.read_values([b"\x01\x02\x03\x04"], r.LAYOUT_WORDS, 2, 2).tolist(),
                         [0x0201, 0x0403])


class Positions(unittest.TestCase):
    """§8.3."""

    def test_gaps(self):
        self.assertEqual(r.gap_positions([b"\x01\x05"], 2, 8).tolist(), [1, 6])  # §15.8
        self.assertEqual(r.gap_positions([b"\x00\x01\x01"], 3, 3).tolist(), [0, 1, 2])
        # width 2: gap = plane0 + 256 * plane1
        self.assertEqual(r.gap_positions([b"\x05\x00", b"\x00\x01"], 2, 300).tolist(), [5, 261])
        self.assertEqual(r.gap_positions([b"\x00", b"\x00", b"\x00", b"\x01"], 1, 2**24 + 1).tolist(),
                         [2**24])

    def test_gap_errors(self):
        self.assertEqual(codes(r.gap_positions, [b"\x01\x00"], 2, 8), "E_POSITIONS_NOT_INCREASING")
        self.assertEqual(codes(r.gap_positions, [b"\x08"], 1, 8), "E_POSITIONS_OUT_OF_BOUNDS")
        self.assertEqual(codes(r.gap_positions, [b"\x04\x04"], 2, 8), "E_POSITIONS_OUT_OF_BOUNDS")
        # at one index the zero-gap check comes first; across indices the first index wins
        self.assertEqual(codes(r.gap_positions, [b"\x09\x00"], 2, 8), "E_POSITIONS_OUT_OF_BOUNDS")
        self.assertEqual(codes(r.gap_positions, [b"\x01\x00\xff"], 3, 8),
                         "E_POSITIONS_NOT_INCREASING")
        # huge gaps never wrap
        self.assertEqual(codes(r.gap_positions, [b"\xff"] * 4, 1, 2**24), "E_POSITIONS_OUT_OF_BOUNDS")

    def test_bitmap(self):
        self.assertEqual(r.bitmap_positions(b"\x42", 2, 8).tolist(), [1, 6])
        self.assertEqual(r.bitmap_positions(b"\x01\x04", 2, 11).tolist(), [0, 10])
        self.assertEqual(codes(r.bitmap_positions, b"\x01\x08", 2, 11), "E_POSITIONS_OUT_OF_BOUNDS")
        self.assertEqual(codes(r.bitmap_positions, b"\x43", 2, 8), "E_CHANGED_COUNT")


class ValueOrder(unittest.TestCase):
    """§8.6."""

    def test_key(self):
        bf16 = np.array([0x3F80, 0xBF80, 0x0000, 0x8000, 0x4000], dtype=np.uint16)
        # rotl1 then the top byte: the 8 exponent bits of a bfloat16
        self.assertEqual(r.base_key(bf16, 16).tolist(), [0x7F, 0x7F, 0x00, 0x00, 0x80])
        u8 = np.array([0x80, 0x01, 0x7F], dtype=np.uint8)
        self.assertEqual(r.base_key(u8, 8).tolist(), [0x01, 0x02, 0xFE])
        f64 = np.array([0x3FF0000000000000], dtype=np.uint64)
        self.assertEqual(r.base_key(f64, 64).tolist(), [0x7F])

    def test_grouped_to_positional(self):
        # keys per position: 5, 1, 5, 0, 1 -> stable order of positions: 3, 1, 4, 0, 2
        base = np.array([5, 1, 5, 0, 1], dtype=np.uint8)
        keys = r.base_key(base, 8)
        order = sorted(range(5), key=lambda i: int(keys[i]))
        positional = np.array([10, 11, 12, 13, 14], dtype=np.uint8)
        grouped = positional[order]
        self.assertTrue(np.array_equal(r.to_positional(grouped, base, 8), positional))
        # the cursor formulation of §8.6
        count = np.bincount(keys, minlength=256)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        cursor, idx = start.copy(), []
        for k in keys:
            idx.append(int(cursor[k]))
            cursor[k] += 1
        self.assertTrue(np.array_equal(grouped[idx], positional))


def zframe(data, **kw):
    return zstandard.ZstdCompressor(**kw).compress(data)


class ZstdProfile(unittest.TestCase):
    """§8.5."""

    data = bytes(range(256)) * 64

    def dec(self, stream, n=None):
        return codes(r.zstd_decode, stream, len(self.data) if n is None else n)

    def test_good(self):
        f = zframe(self.data)
        self.assertEqual(r.zstd_decode(f, len(self.data)), self.data)
        f = zframe(self.data, write_checksum=True)
        self.assertEqual(r.zstd_decode(f, len(self.data)), self.data)

    def test_profile(self):
        f = zframe(self.data)
        self.assertEqual(self.dec(f + f), "E_ZSTD_PROFILE")  # two frames
        self.assertEqual(self.dec(f + b"\x00"), "E_ZSTD_PROFILE")  # trailing byte
        self.assertEqual(self.dec(f[:-1]), "E_ZSTD_PROFILE")  # truncated
        self.assertEqual(self.dec(f[:4]), "E_ZSTD_PROFILE")  # fewer than 5 bytes
        skippable = struct.pack("<II", 0x184D2A50, 0) + f
        self.assertEqual(self.dec(skippable), "E_ZSTD_PROFILE")
        self.assertEqual(self.dec(zframe(self.data, write_content_size=False)), "E_ZSTD_PROFILE")
        self.assertEqual(self.dec(f, len(self.data) + 1), "E_STREAM_LENGTH")
        # reserved FHD bit, and the unused bit 4 (Z5: else a second byte form)
        for bit in (0x08, 0x10):
            bad = bytearray(f)
            bad[4] |= bit
            self.assertEqual(self.dec(bytes(bad)), "E_ZSTD_PROFILE", hex(bit))
        # a Dictionary_ID field (FHD Dictionary_ID_Flag 1), whatever its value (Z4)
        block = struct.pack("<I", (4 << 3) | 1)[:3] + b"\x01" * 4
        for dictionary_id in (b"\x07", b"\x00"):
            with_dict = b"\x28\xb5\x2f\xfd\x21" + dictionary_id + b"\x04" + block
            self.assertEqual(codes(r.zstd_decode, with_dict, 4), "E_ZSTD_PROFILE")

    def test_window(self):
        # hand-made frame: FHD FCS_Flag 2 (4 bytes), not single segment; one raw block
        def frame(wd, n=4):
            return (b"\x28\xb5\x2f\xfd" + bytes([0x80, wd]) + struct.pack("<I", n)
                    + struct.pack("<I", (n << 3) | 1)[:3] + b"\x01" * n)
        self.assertEqual(r.zstd_decode(frame(0x00), 4), b"\x01" * 4)
        self.assertIsNone(codes(r.zstd_decode, frame(17 << 3), 4))  # 2^27: allowed
        self.assertEqual(codes(r.zstd_decode, frame((17 << 3) | 1), 4), "E_ZSTD_PROFILE")
        self.assertEqual(codes(r.zstd_decode, frame(18 << 3), 4), "E_ZSTD_PROFILE")
        # reserved block type 3
        bad = bytearray(frame(0))
        bad[10] |= 0x06
        self.assertEqual(codes(r.zstd_decode, bytes(bad), 4), "E_ZSTD_PROFILE")
        # single segment: the window is the content size (FCS 1 byte)
        single = b"\x28\xb5\x2f\xfd\x20\x04" + struct.pack("<I", (4 << 3) | 1)[:3] + b"\x02" * 4
        self.assertEqual(r.zstd_decode(single, 4), b"\x02" * 4)
        # blocks shorter or longer than the content size: a decode error (step 4)
        def raw(block, fcs=4):
            return (b"\x28\xb5\x2f\xfd\x20" + bytes([fcs])
                    + struct.pack("<I", (len(block) << 3) | 1)[:3] + block)
        self.assertEqual(codes(r.zstd_decode, raw(b"\x02" * 3), 4), "E_ZSTD_DECODE")
        self.assertEqual(codes(r.zstd_decode, raw(b"\x02" * 5), 4), "E_ZSTD_DECODE")
        # corrupt compressed block -> decode error
        f = bytearray(zframe(bytes(range(256)) * 64))
        f[-5] ^= 0xFF
        self.assertIn(codes(r.zstd_decode, bytes(f), 256 * 64), ("E_ZSTD_DECODE", "E_ZSTD_PROFILE"))


class StrictJson(unittest.TestCase):
    """§5.1."""

    def code(self, text):
        return codes(r.parse_header_json, text.encode("utf-8") if isinstance(text, str) else text)

    def test_rules(self):
        self.assertIsNone(self.code('{"a":[1,{"b":null}]}'))
        self.assertEqual(self.code('{"a":1,"a":2}'), "E_DUPLICATE_KEY")
        self.assertEqual(self.code('{"a":1,"\\u0061":2}'), "E_DUPLICATE_KEY")
        self.assertEqual(self.code('{"x":[{"a":1,"a":1}]}'), "E_DUPLICATE_KEY")
        for bad in ('{"a":NaN}', '{"a":Infinity}', '{"a":1,}', "{'a':1}", '{"a":"\\ud800"}',
                    '{"\\udc00":1}', '{"a":"x\ny"}', '{"a":1} x', '/*c*/{}', "\ufeff{}", '{"a":01}'):
            self.assertEqual(self.code(bad), "E_HEADER_INVALID", bad)
        self.assertEqual(self.code(b'{"a":"\xff"}'), "E_HEADER_INVALID")
        self.assertIsNone(self.code('{"a":"\\ud83d\\ude00"}'))  # a valid pair
        self.assertIsNone(self.code(" \t\r\n{} \n"))

    def test_depth(self):
        self.assertIsNone(self.code("[" * 127 + "]" * 127))
        self.assertEqual(self.code("[" * 128 + "]" * 128), "E_HEADER_INVALID")
        self.assertEqual(self.code("[" * 100000), "E_HEADER_INVALID")
        self.assertIsNone(self.code('["' + "[" * 500 + '"]'))  # brackets inside a string
        # scalars add no depth: a number or an empty object string inside depth 127
        self.assertIsNone(self.code("[" * 127 + "1" + "]" * 127))
        self.assertIsNone(self.code("[" * 126 + '{"k":"v"}' + "]" * 126))
        self.assertEqual(self.code("[" * 126 + '{"k":[]}' + "]" * 126), "E_HEADER_INVALID")

    def test_number_range(self):
        # §5.1 rule 5, in every document: a finite double, underflow to zero allowed
        self.assertEqual(self.code('{"a":1e999}'), "E_HEADER_INVALID")
        self.assertEqual(self.code('{"a":' + "9" * 400 + "}"), "E_HEADER_INVALID")
        self.assertIsNone(self.code('{"a":1e-999}'))

    def test_integers(self):
        self.assertTrue(r.is_hdr_int(r.strict_json(b"9007199254740991")))
        for bad in (b"9007199254740992", b"-0", b"-1", b"1.0", b"1e3", b"true"):
            self.assertFalse(r.is_hdr_int(r.strict_json(bad)), bad)

    def test_byte_len(self):
        self.assertIsNone(r.byte_len("U8", [2**40, 2**40, 0]))
        self.assertEqual(r.byte_len("U8", [0, 2**40, 2**40]), 0)
        self.assertEqual(r.byte_len("BF16", []), 2)
        self.assertIsNone(r.byte_len("F4", [3]))
        self.assertEqual(r.byte_len("F4", [4]), 2)
        self.assertIsNone(r.byte_len("F6_E2M3", [2]))
        self.assertEqual(r.byte_len("F6_E3M2", [4]), 3)
        # elements * bits must fit in 64 bits, so a U8 tensor has at most 2^61 - 1 bytes
        self.assertEqual(r.byte_len("U8", [2**61 - 1]), 2**61 - 1)
        self.assertIsNone(r.byte_len("U8", [2**61]))
        self.assertIsNone(r.byte_len("U8", [2**32, 2**32]))

    def test_file_names(self):
        for ok in ("model.safetensors", "a b.safetensors", ".safetensors"):
            self.assertTrue(r.valid_file_name(ok), ok)
        for bad in ("", "model.bin", "a/b.safetensors", "a\\b.safetensors", "a\x00.safetensors"):
            self.assertFalse(r.valid_file_name(bad), bad)


# ---------------------------------------------------------------------------
# A reference encoder of the lane rANS codec (§8.7), from the writer's description
# in §15.10: every tile is encoded in reverse (steps from last to first, lanes from
# 31 down to 0), each symbol emits-then-encodes, and the words are stored in the
# reverse of the order in which they were emitted.
# ---------------------------------------------------------------------------

RANS_L = 1 << 16


def quantize(counts, k):
    """Frequencies that sum to 2^k for the symbols with a nonzero count, each >= 1:
    proportional, rounded down, with the remainder put on (or taken from) the most
    frequent symbols."""
    symbols = [x for x in range(256) if counts[x]]
    total = sum(counts[x] for x in symbols)
    freqs = {x: max(1, counts[x] * (1 << k) // total) for x in symbols}
    rest = (1 << k) - sum(freqs.values())
    for x in sorted(symbols, key=lambda x: -freqs[x]):
        change = rest if rest > 0 else -min(-rest, freqs[x] - 1)
        freqs[x] += change
        rest -= change
        if rest == 0:
            break
    assert rest == 0, "more symbols than slots"
    return freqs


def table_bytes(freqs):
    """Table 8.7: s - 1, the symbol list (s < 32) or bitmap, then the frequencies."""
    symbols = sorted(freqs)
    out = bytearray([len(symbols) - 1])
    if len(symbols) < 32:
        out += bytes(symbols)
    else:
        bitmap = bytearray(32)
        for x in symbols:
            bitmap[x // 8] |= 1 << (x % 8)
        out += bitmap
    for x in symbols:
        f = freqs[x]
        out += bytes([f]) if f < 128 else bytes([0x80 | (f >> 8), f & 0xFF])
    return bytes(out)


def encode_tile(symbols, tables, k):
    """One tile's payload: `symbols` and, per symbol, its table (freq dict, cum dict)."""
    n = len(symbols)
    lanes = min(32, n)
    x = [RANS_L] * lanes
    emitted = []
    for step in reversed(range(-(-n // 32))):
        for lane in reversed(range(lanes)):
            j = 32 * step + lane
            if j >= n:
                continue
            freq, cum = tables[j]
            s = symbols[j]
            f = freq[s]
            while x[lane] >= f << (32 - k):  # emit, then encode
                emitted.append(x[lane] & 0xFFFF)
                x[lane] >>= 16
            x[lane] = (x[lane] // f << k) + x[lane] % f + cum[s]
    emitted.reverse()
    return struct.pack(f"<{lanes}I", *x) + struct.pack(f"<{len(emitted)}H", *emitted)


def zigzag(d):
    """§8.9: 2d for d >= 0, -2d - 1 for d < 0."""
    return 2 * d if d >= 0 else -2 * d - 1


def pack_bits(bits):
    """A bit string (§8.9): bit j in bit j mod 8 of byte j // 8, zero padding."""
    bits = list(bits) + [0] * (-len(bits) % 8)
    return bytes(sum(b << j for j, b in enumerate(bits[i:i + 8])) for i in range(0, len(bits), 8))


def code_bits(values, order):
    """Exp-Golomb codes of order g of the code values (§8.9), before padding: with
    w = v + 2^g and n = floor(log2 w) - g, every prefix (n ones, then a zero), then
    every suffix (the low n + g bits of w, least significant first)."""
    prefixes, suffixes = [], []
    for v in values:
        w = v + (1 << order)
        n = w.bit_length() - 1 - order
        prefixes += [1] * n + [0]
        suffixes += [(w >> b) & 1 for b in range(n + order)]
    return prefixes + suffixes


def frequency_code_bits(freqs, order):
    """Table 8.8's bit string before padding: the codes of v_i = zigzag(f_i - f_(i-1))."""
    return code_bits([zigzag(f - prev) for prev, f in zip([0] + freqs[:-1], freqs)], order)


def best_order(freqs):
    """The order with the shortest bit string, the smallest of equals."""
    return min(range(12), key=lambda order: (len(frequency_code_bits(freqs, order)), order))


def packed_table_bytes(freqs, order=None):
    """Table 8.8: s - 1, the symbol list (s < 32), bitmap (s < 256) or nothing, the
    order (by default best_order), then the frequency codes."""
    symbols = sorted(freqs)
    out = bytearray([len(symbols) - 1])
    if len(symbols) < 32:
        out += bytes(symbols)
    elif len(symbols) < 256:
        bitmap = bytearray(32)
        for x in symbols:
            bitmap[x // 8] |= 1 << (x % 8)
        out += bitmap
    fs = [freqs[x] for x in symbols]
    order = best_order(fs) if order is None else order
    out.append(order)
    return bytes(out + pack_bits(frequency_code_bits(fs, order)))


def packed_map_bytes(context_map, T):
    """§8.9: 256 entries of ceil(log2 T) bits, least significant bit first."""
    w = (T - 1).bit_length()
    return pack_bits([(e >> b) & 1 for e in context_map for b in range(w)])


class RansStream:
    """The parts of a codec-2 stream (Table 8.6), or of a codec-4 stream (§8.9) when
    packed, to assemble or to spoil one by one."""

    def __init__(self, k, context, tile_log2, context_map, tables, payloads, packed=False):
        self.head = [k, context, len(tables), tile_log2]
        # 256 bytes (32 * ceil(log2 T) packed), or b"" for one table
        self.context_map = packed_map_bytes(context_map, len(tables)) if packed and context_map else context_map
        self.tables = [(packed_table_bytes if packed else table_bytes)(t) for t in tables]
        self.payloads = payloads
        self.lengths = [len(p) for p in payloads]

    def bytes(self):
        return (bytes(self.head) + bytes(self.context_map) + b"".join(self.tables)
                + struct.pack(f"<{len(self.lengths)}I", *self.lengths) + b"".join(self.payloads))


def rans_encode(data, k=11, tile_log2=8, context=0, ctx=None, context_map=None, tables=None, packed=False):
    """A codec-2 stream of the bytes `data` (codec 4 if packed).  For contexts 1 and 2,
    ctx holds each symbol's context byte and context_map (256 entries) its table.
    tables: the frequency dicts (symbol -> frequency) of the tables; by default
    quantized counts."""
    data = bytes(data)
    if context == 0:
        ctx, context_map = bytes(len(data)), [0] * 256
    ctx = bytes(ctx)
    T = max(context_map) + 1
    if tables is None:
        counts = [[0] * 256 for _ in range(T)]
        for s, c in zip(data, ctx):
            counts[context_map[c]][s] += 1
        tables = [quantize(c, k) if any(c) else {0: 1 << k} for c in counts]
    cum = []
    for freqs in tables:
        at, cum_t = 0, {}
        for x in sorted(freqs):
            cum_t[x] = at
            at += freqs[x]
        cum.append(cum_t)
    size = 1 << tile_log2
    payloads = []
    for start in range(0, len(data), size):
        which = [context_map[c] for c in ctx[start:start + size]]
        payloads.append(encode_tile(data[start:start + size],
                                    [(tables[t], cum[t]) for t in which], k))
    return RansStream(k, context, tile_log2, bytes(context_map) if T > 1 else b"", tables, payloads, packed)


# ---------------------------------------------------------------------------
# §8.7 the lane rANS codec
# ---------------------------------------------------------------------------

def scalar_decode(data, N, ctx=None, packed=False):
    """§8.7's decoding pseudocode, line by line, one tile and one lane at a time (the
    header from r.rans_header).  Returns the decoded bytes or "E_RANS_DECODE"."""
    h = r.rans_header(data, N, packed=packed)
    k, L = h.prob_bits, RANS_L
    S = 1 << h.tile_log2
    slots = []  # per table: slot -> (symbol, freq, cum)
    for symbols, freqs in h.tables:
        table, cum = [], 0
        for s, f in zip(symbols.tolist(), freqs.tolist()):
            table += [(s, f, cum)] * f
            cum += f
        slots.append(table)
    out = bytearray(N)
    at = h.payload_offset
    for t, len_t in enumerate(h.tile_lengths.tolist()):
        payload = bytes(data[at:at + len_t])
        at += len_t
        n_t = min(S, N - t * S)
        lanes = min(32, n_t)
        x = list(struct.unpack_from(f"<{lanes}I", payload, 0))
        if min(x) < L:
            return "E_RANS_DECODE"
        pos = 4 * lanes
        for step in range(-(-n_t // 32)):
            for lane in range(lanes):
                j = 32 * step + lane
                if j >= n_t:
                    break
                i = t * S + j
                table = slots[h.context_map[ctx[i]] if ctx is not None else 0]
                r_slot = x[lane] & ((1 << k) - 1)
                sym, f, cum = table[r_slot]
                out[i] = sym
                x[lane] = f * (x[lane] >> k) + r_slot - cum
                if x[lane] < L:
                    if pos >= len_t:
                        return "E_RANS_DECODE"
                    x[lane] = (x[lane] << 16) | struct.unpack_from("<H", payload, pos)[0]
                    pos += 2
        if pos != len_t or any(v != L for v in x):
            return "E_RANS_DECODE"
    return bytes(out)


def skewed(rng, n, p=0.2, alphabet=256):
    """n bytes with a geometric distribution over `alphabet` symbols."""
    return ((rng.geometric(p, n) - 1) % alphabet).astype(np.uint8).tobytes()


def rans_code(data, N, ctx=None, allowed=r.RANS_ALL_CONTEXTS, packed=False):
    try:
        return r.rans_decode(data, N, ctx, allowed, packed).tobytes()
    except r.TpdeError as e:
        return e.code


def rans_error(data, N, ctx=None, allowed=r.RANS_ALL_CONTEXTS, packed=False):
    """(code, message) of a stream that fails."""
    try:
        r.rans_decode(data, N, ctx, allowed, packed)
    except r.TpdeError as e:
        return e.code, str(e)
    return None, None


class RansRoundTrip(unittest.TestCase):
    """§8.7: streams of the reference encoder decode to their bytes, with tables and
    context maps in both forms (codecs 2 and 4, §8.9)."""

    def check(self, data, **kw):
        ctx = kw.get("ctx")
        ctx_array = None if ctx is None else np.frombuffer(bytes(ctx), np.uint8)
        for packed in (True, False):
            stream = rans_encode(data, packed=packed, **kw).bytes()
            got = r.rans_decode(stream, len(data), ctx_array, packed=packed)
            self.assertEqual(got.dtype, np.uint8)
            self.assertEqual(got.tobytes(), bytes(data))
            self.assertEqual(scalar_decode(stream, len(data), ctx, packed), bytes(data))
        return stream

    def test_known_answer(self):
        """A stream worked out by hand from §8.7: k = 3, one table {A: 3, B: 5}, one tile
        of 3 symbols "ABB" in 3 lanes of one step.  A lane that starts in the state
        (L / f) * 2^k + L mod f + cum(x) (the encoder's step from L) decodes x and
        ends at L without reading a word: A (f 3, cum 0): 21845 * 8 + 1 = 174761;
        B (f 5, cum 3): 13107 * 8 + 1 + 3 = 104860."""
        stream = (bytes([3, 0, 1, 8]) + bytes([1, 0x41, 0x42, 3, 5])
                  + struct.pack("<I", 12) + struct.pack("<3I", 174761, 104860, 104860))
        h = r.rans_header(stream, 3)
        self.assertEqual((h.prob_bits, h.context, h.table_count, h.tile_log2), (3, 0, 1, 8))
        self.assertEqual([(s.tolist(), f.tolist()) for s, f in h.tables], [([0x41, 0x42], [3, 5])])
        self.assertEqual((h.tile_lengths.tolist(), h.payload_offset), ([12], 13))
        self.assertEqual(h.context_map.tolist(), [0] * 256)
        self.assertEqual(r.rans_decode(stream, 3).tobytes(), b"ABB")
        self.assertEqual(rans_encode(b"ABB", k=3, tables=[{0x41: 3, 0x42: 5}]).bytes(), stream)
        # the same states in another order decode the other symbols
        swapped = stream[:13] + struct.pack("<3I", 104860, 174761, 104860)
        self.assertEqual(r.rans_decode(swapped, 3).tobytes(), b"BAB")

    def test_symbol_counts_and_tiles(self):
        rng = np.random.default_rng(1)
        # around one step (32 lanes) and one tile (2^8 symbols); several tiles, the
        # last one full, partial, a single step or a single symbol
        for n in (1, 2, 31, 32, 33, 63, 64, 65, 255, 256, 257, 511, 512, 513, 3 * 256 + 31,
                  4 * 256 + 1, 5 * 256 + 32, 2000):
            with self.subTest(n=n):
                stream = self.check(skewed(rng, n), tile_log2=8)
                h = r.rans_header(stream, n)
                self.assertEqual(h.tile_lengths.size, -(-n // 256))

    def test_prob_bits_and_tile_sizes(self):
        rng = np.random.default_rng(2)
        for k, alphabet in ((1, 2), (2, 3), (5, 20), (8, 200), (11, 256)):
            for tile_log2 in (8, 9, 12):
                with self.subTest(k=k, tile_log2=tile_log2):
                    self.check(skewed(rng, 3000, 0.3, alphabet), k=k, tile_log2=tile_log2)
        self.check(skewed(rng, 3000), tile_log2=24)  # one tile

    def test_one_symbol_table(self):
        # frequency 2^k: a certain symbol costs nothing, so a tile is its states, all L
        for k, freq_bytes in ((11, b"\x88\x00"), (7, b"\x80\x80"), (6, b"\x40"), (1, b"\x02")):
            with self.subTest(k=k):
                data = b"\x07" * 700
                stream = self.check(data, k=k, tile_log2=8)
                h = r.rans_header(stream, 700)
                self.assertEqual(rans_encode(data, k=k).tables[0], b"\x00\x07" + freq_bytes)
                self.assertEqual(h.tile_lengths.tolist(), [4 * 32] * 3)
                states = stream[h.payload_offset:]
                self.assertEqual(states, struct.pack("<I", RANS_L) * (len(states) // 4))

    def test_symbol_list_and_bitmap(self):
        rng = np.random.default_rng(3)
        for s in (1, 2, 31, 32, 33, 255, 256):
            with self.subTest(symbols=s):
                # every one of s symbols, spread over 0..255, in random order
                alphabet = np.linspace(0, 255, s).astype(np.uint8) if s > 1 else np.array([255], np.uint8)
                data = rng.permutation(np.concatenate([alphabet, rng.choice(alphabet, 1500)])).tobytes()
                stream = self.check(data, tile_log2=9)
                h = r.rans_header(stream, len(data))
                self.assertEqual(h.tables[0][0].tolist(), sorted(set(alphabet.tolist())))
                form = 1 + (s if s < 32 else 32)
                self.assertEqual(stream[4], s - 1)
                self.assertEqual(len(rans_encode(data).tables[0]) - form,
                                 sum(1 if f < 128 else 2 for f in h.tables[0][1].tolist()))

    def test_contexts(self):
        rng = np.random.default_rng(4)
        n = 3000
        ctx = rng.integers(0, 256, n, dtype=np.uint8)
        # symbols that depend on the context byte, so the tables differ
        data = ((ctx.astype(np.int64) * 37 + rng.geometric(0.3, n)) % 256).astype(np.uint8).tobytes()
        for context in (1, 2):
            for T in (2, 5, 8):
                with self.subTest(context=context, tables=T):
                    cmap = [c % T for c in range(256)]
                    stream = self.check(data, context=context, ctx=ctx, context_map=cmap, tile_log2=8)
                    h = r.rans_header(stream, n)
                    self.assertEqual((h.context, h.table_count), (context, T))
                    self.assertEqual(h.context_map.tolist(), cmap)
                    # the same stream with other context bytes decodes to other bytes or fails
                    other = rans_code(stream, n, (ctx + 1).astype(np.uint8))
                    self.assertNotEqual(other, data)
        # a table that no context byte selects is still a valid table
        cmap = [0] * 255 + [2]
        self.check(data, context=2, ctx=np.zeros(n, np.uint8), context_map=cmap)

    def test_large_stream_is_fast(self):
        rng = np.random.default_rng(5)
        n = 1 << 16
        data = skewed(rng, n, 0.05)
        # 2^20 symbols: sixteen tiles of 2^16 (tiles are independent, so one payload
        # serves them all), and one tile of 2^20 (2^15 steps of 32 lanes)
        stream = rans_encode(data, tile_log2=16)
        stream.payloads *= 16
        stream.lengths *= 16
        import time
        t0 = time.perf_counter()
        got = r.rans_decode(stream.bytes(), 16 * n)
        self.assertEqual(got.tobytes(), data * 16)
        self.assertLess(time.perf_counter() - t0, 2.0)
        data = skewed(rng, 1 << 20, 0.05)
        stream = rans_encode(data, tile_log2=20).bytes()
        t0 = time.perf_counter()
        self.assertEqual(r.rans_decode(stream, 1 << 20).tobytes(), data)
        self.assertLess(time.perf_counter() - t0, 8.0)


class RansContexts(unittest.TestCase):
    """§8.7 Contexts: where each context is allowed."""

    def allowed(self, enc, layout=1, order=0, pc=0, g=0, wb=2):
        count = (g if pc == 1 else 1 if pc == 2 else 0) + (1 if layout == 0 else wb)
        return [sorted(r.rans_allowed_contexts(q, enc, layout, order, pc, g, wb)) for q in range(count)]

    def test_places(self):
        # sparse, 4 gap planes, 2 value planes: gap planes 0-2 and value plane 0 have a
        # plane above; the value planes of a positional chunk read the base key
        self.assertEqual(self.allowed(r.ENC_SPARSE, pc=1, g=4),
                         [[0, 2], [0, 2], [0, 2], [0], [0, 1, 2], [0, 1]])
        self.assertEqual(self.allowed(r.ENC_SPARSE, layout=2, pc=1, g=1, wb=1), [[0], [0, 1]])
        self.assertEqual(self.allowed(r.ENC_SPARSE, pc=2, wb=4), [[0], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1]])
        self.assertEqual(self.allowed(r.ENC_SPARSE, layout=0, pc=2, wb=4), [[0], [0]])
        # grouped value order: no base key
        self.assertEqual(self.allowed(r.ENC_SPARSE, order=1, pc=1, g=2), [[0, 2], [0], [0, 2], [0]])
        self.assertEqual(self.allowed(r.ENC_DENSE, order=1, wb=4), [[0, 2], [0, 2], [0, 2], [0]])
        self.assertEqual(self.allowed(r.ENC_DENSE, wb=8), [[0, 1, 2]] * 7 + [[0, 1]])
        self.assertEqual(self.allowed(r.ENC_DENSE, layout=0, wb=8), [[0]])
        # raw: planes above, never the base key
        self.assertEqual(self.allowed(r.ENC_RAW, layout=2, wb=4), [[0, 2], [0, 2], [0, 2], [0]])
        self.assertEqual(self.allowed(r.ENC_RAW, layout=0, wb=4), [[0]])


class RansHeaderChecks(unittest.TestCase):
    """§8.7 Header checks: each failure is E_RANS_HEADER."""

    def setUp(self):
        rng = np.random.default_rng(6)
        self.n = 700
        self.data = skewed(rng, self.n)
        self.ctx = rng.integers(0, 256, self.n, dtype=np.uint8)

    def stream(self, **kw):
        return rans_encode(self.data, tile_log2=8, **kw)

    def assertHeader(self, stream, why, ctx=None, allowed=r.RANS_ALL_CONTEXTS):
        data = stream.bytes() if isinstance(stream, RansStream) else stream
        code, msg = rans_error(data, self.n, ctx, allowed)
        self.assertEqual(code, "E_RANS_HEADER", why)
        return msg

    def test_valid_to_start_with(self):
        self.assertEqual(rans_code(self.stream().bytes(), self.n), self.data)

    def test_fixed_fields(self):
        for k in (0, 12, 255):
            s = self.stream()
            s.head[0] = k
            self.assertIn("prob_bits", self.assertHeader(s, k))
        for context in (3, 255):
            s = self.stream()
            s.head[1] = context
            self.assertIn("undefined", self.assertHeader(s, context))
        for tile_log2 in (0, 7, 25):
            s = self.stream()
            s.head[3] = tile_log2
            self.assertIn("tile_log2", self.assertHeader(s, tile_log2))
        # prob_bits 11 and tile_log2 8 and 24 are in range (the round trips use them)

    def test_context_not_allowed(self):
        cmap = [c % 2 for c in range(256)]
        for context in (1, 2):
            s = self.stream(context=context, ctx=self.ctx, context_map=cmap)
            for allowed in ({0}, {0, 3 - context}):
                msg = self.assertHeader(s, (context, allowed), self.ctx, frozenset(allowed))
                self.assertIn("not allowed", msg)
            self.assertEqual(rans_code(s.bytes(), self.n, self.ctx, frozenset({0, context})), self.data)

    def test_table_count(self):
        cmap = [c % 2 for c in range(256)]
        # context 0 takes exactly one table: two tables (with a map) are out of range
        s = self.stream(context=1, ctx=self.ctx, context_map=cmap)
        s.head[1] = 0
        self.assertIn("table_count", self.assertHeader(s, "context 0, T = 2"))
        # contexts 1 and 2 take 2 to 8 tables
        for context in (1, 2):
            s = self.stream()
            s.head[1] = context
            self.assertIn("table_count", self.assertHeader(s, "T = 1", self.ctx))
            s = self.stream(context=context, ctx=self.ctx, context_map=[c % 9 for c in range(256)])
            self.assertEqual(s.head[2], 9)
            self.assertIn("table_count", self.assertHeader(s, "T = 9", self.ctx))
            s.head[2] = 0
            self.assertHeader(s, "T = 0", self.ctx)

    def test_context_map(self):
        s = self.stream(context=2, ctx=self.ctx, context_map=[c % 3 for c in range(256)])
        s.context_map = bytearray(s.context_map)
        s.context_map[200] = 3
        self.assertIn("context map", self.assertHeader(s, "map entry = T", self.ctx))
        s.context_map[200] = 255
        self.assertHeader(s, "map entry 255", self.ctx)

    def test_symbol_list_not_increasing(self):
        freqs = {1: 1000, 5: 1000, 9: 48}
        data = bytes([1, 5, 9] * 100)
        s = rans_encode(data, tables=[freqs])
        self.assertEqual(s.tables[0][:4], b"\x02\x01\x05\x09")
        for symbols in (b"\x01\x09\x05", b"\x01\x05\x05", b"\x09\x05\x01", b"\x05\x05\x09"):
            with self.subTest(symbols=symbols):
                s.tables[0] = s.tables[0][:1] + symbols + s.tables[0][4:]
                code, msg = rans_error(s.bytes(), len(data))
                self.assertEqual(code, "E_RANS_HEADER")
                self.assertIn("strictly increasing", msg)

    def test_bitmap_popcount(self):
        data = bytes(range(40)) * 10
        s = rans_encode(data)
        table = bytearray(s.tables[0])
        self.assertEqual(table[0], 39)
        for count, bit in ((41, 40), (39, None)):  # a bit too many, or one too few
            t = bytearray(table)
            if bit is None:
                t[1] &= 0xFE  # symbol 0 dropped
            else:
                t[1 + bit // 8] |= 1 << (bit % 8)
            s.tables[0] = bytes(t)
            code, msg = rans_error(s.bytes(), len(data))
            self.assertEqual(code, "E_RANS_HEADER", count)
            self.assertIn(f"{count} bits set", msg)
        # s = 32: the bitmap form starts there; a list of 32 symbols is read as a bitmap
        data = bytes(range(32)) * 10
        s = rans_encode(data)
        self.assertEqual(len(s.tables[0]), 1 + 32 + 32)
        self.assertEqual(rans_code(s.bytes(), len(data)), data)

    def test_frequencies(self):
        freqs = {0: 2043, 1: 5}
        data = bytes([0] * 50 + [1] * 5)
        s = rans_encode(data, tables=[freqs])
        self.assertEqual(s.tables[0], b"\x01\x00\x01\x87\xfb\x05")
        self.assertEqual(rans_code(s.bytes(), len(data)), data)
        cases = {
            "a frequency of 0": b"\x01\x00\x01\x88\x00\x00",
            "below 128": b"\x01\x00\x01\x87\xfb\x80\x05",  # 5 in the two-byte form
            "sum": b"\x01\x00\x01\x87\xfb\x06",  # 2049
            "sum ": b"\x01\x00\x01\x87\xfa\x05",  # 2047
        }
        for why, table in cases.items():
            with self.subTest(why=why):
                s.tables[0] = table
                code, msg = rans_error(s.bytes(), len(data))
                self.assertEqual(code, "E_RANS_HEADER")
                self.assertIn(why.strip(), msg)
        # the two-byte form of 0 is below 128 too; a one-symbol table of 2^k + 1
        s.tables[0] = b"\x01\x00\x01\x80\x00\x05"
        self.assertEqual(rans_error(s.bytes(), len(data))[0], "E_RANS_HEADER")
        s.tables[0] = b"\x00\x00\x88\x01"
        self.assertEqual(rans_error(s.bytes(), len(data))[0], "E_RANS_HEADER")
        # 128 <= f: two bytes; 127: one byte
        t = table_bytes({0: 1920, 1: 128})
        self.assertEqual(t, b"\x01\x00\x01\x87\x80\x80\x80")
        self.assertEqual(table_bytes({0: 1921, 1: 127}), b"\x01\x00\x01\x87\x81\x7f")
        # a frequency above 2^k never sums to 2^k (k = 4: 2^k = 16)
        s = rans_encode(b"\x00\x01" * 8, k=4, tables=[{0: 15, 1: 1}])
        s.tables[0] = b"\x00\x00\x80\x80"
        self.assertEqual(rans_error(s.bytes(), 16)[0], "E_RANS_HEADER")

    def test_tile_lengths(self):
        # 700 symbols: tiles of 256, 256 and 188 symbols, 32 lanes each
        s = self.stream()
        good = list(s.lengths)
        for why, change in (("below the states", lambda L: [4 * 32 - 2, L[1] + L[0] - 126, L[2]]),
                            ("odd", lambda L: [L[0] + 1, L[1] - 1, L[2]]),
                            ("odd last", lambda L: [L[0], L[1] + 1, L[2] - 1])):
            with self.subTest(why=why):
                s.lengths = change(good)
                self.assertEqual(sum(s.lengths), sum(good))
                self.assertIn("wrong form", self.assertHeader(s, why))
        # the last tile holds 3 symbols: 3 lanes, 12 bytes of states at least
        data = self.data[:515]
        s = rans_encode(data)
        self.assertEqual(s.lengths[2], 12)
        self.assertEqual(rans_code(s.bytes(), 515), data)
        s.lengths[1] += 2
        s.lengths[2] -= 2
        code, msg = rans_error(s.bytes(), 515)
        self.assertEqual(code, "E_RANS_HEADER")
        self.assertIn("wrong form", msg)

    def test_tile_lengths_sum(self):
        s = self.stream()
        b = s.bytes()
        for why, stream in (("a byte more", b + b"\x00"), ("two bytes more", b + b"\x00\x00"),
                            ("a word less", b[:-2])):
            code, msg = rans_error(stream, self.n)
            self.assertEqual(code, "E_RANS_HEADER", why)
            self.assertIn("sum to the rest", msg)
        # the tile count follows decoded_len: another N gives another number of lengths
        self.assertEqual(rans_error(b, self.n + 256)[0], "E_RANS_HEADER")
        self.assertEqual(rans_error(b, self.n - 256)[0], "E_RANS_HEADER")

    def test_every_prefix_is_too_short(self):
        # a cut inside a field, or in a payload (the lengths no longer sum to the rest)
        cmap = [c % 3 for c in range(256)]
        for kw in ({}, {"context": 1, "ctx": self.ctx, "context_map": cmap}):
            b = self.stream(**kw).bytes()
            for cut in range(len(b)):
                self.assertEqual(rans_error(b[:cut], self.n, self.ctx)[0], "E_RANS_HEADER", cut)

    def test_header_before_decoding(self):
        # a stream with a header fault and a payload fault is E_RANS_HEADER
        s = self.stream()
        s.payloads[0] = struct.pack("<I", 5) + s.payloads[0][4:]
        self.assertEqual(rans_error(s.bytes(), self.n)[0], "E_RANS_DECODE")
        s.head[0] = 12
        self.assertEqual(rans_error(s.bytes(), self.n)[0], "E_RANS_HEADER")


class PackedRansChecks(unittest.TestCase):
    """§8.9: the packed table and context map parsers; each failure is E_RANS_HEADER."""

    def table(self, data, k, pos=0):
        symbols, freqs, end = r.packed_table(data, pos, k, 0)
        return symbols.tolist(), freqs.tolist(), end

    def assertTable(self, data, k, why):
        """The packed table `data` fails with E_RANS_HEADER; returns the message."""
        with self.assertRaises(r.TpdeError, msg=why) as caught:
            r.packed_table(data, 0, k, 0)
        self.assertEqual(caught.exception.code, "E_RANS_HEADER", why)
        return str(caught.exception)

    def test_known_answer(self):
        """k = 3, {A: 3, B: 5}: differences 3, 2, code values 6, 4.  With g = 3,
        w = 14 and 12, both n = 0: prefixes 0 0, suffixes 110 and 100 of 3 bits each,
        least significant first: bits 0 0 0 1 1 0 0 1 from bit 0, the byte 0x98."""
        table = b"\x01\x41\x42\x03\x98"
        self.assertEqual(best_order([3, 5]), 3)
        self.assertEqual(packed_table_bytes({0x41: 3, 0x42: 5}), table)
        self.assertEqual(self.table(table + b"\xff", 3), ([0x41, 0x42], [3, 5], 5))
        # g = 0: w = 7 and 5, n = 2: prefixes 110 110, suffixes 11 and 01, 10 bits
        self.assertEqual(packed_table_bytes({0x41: 3, 0x42: 5}, order=0), b"\x01\x41\x42\x00\xdb\x01")
        self.assertEqual(self.table(b"\x01\x41\x42\x00\xdb\x01", 3), ([0x41, 0x42], [3, 5], 6))
        # one symbol of frequency 2^11: v = 2^12; g = 11 gives w = 6144, n = 1: prefix
        # 10, then 12 suffix bits of which only the last is set
        self.assertEqual(best_order([2048]), 11)
        self.assertEqual(packed_table_bytes({7: 2048}), b"\x00\x07\x0b\x01\x20")
        self.assertEqual(self.table(b"\x00\x07\x0b\x01\x20", 11), ([7], [2048], 5))

    def test_symbol_sets_and_orders(self):
        rng = np.random.default_rng(9)
        for s in (1, 2, 31, 32, 33, 255, 256):
            for k in (8, 11):
                if s > 1 << k:
                    continue
                symbols = sorted(rng.choice(256, s, replace=False).tolist())
                counts = [0] * 256
                for x in symbols:
                    counts[x] = 1 + int(rng.geometric(0.05))
                freqs = quantize(counts, k)
                for order in range(12):
                    with self.subTest(s=s, k=k, order=order):
                        table = packed_table_bytes(freqs, order)
                        form = s if s < 32 else 32 if s < 256 else 0
                        self.assertEqual(table[1 + form], order)
                        got = self.table(b"\x00\x00" + table + b"\x55", k, pos=2)
                        self.assertEqual(got, (symbols, [freqs[x] for x in symbols], 2 + len(table)))

    def test_best_order_is_zero_or_large(self):
        # equal frequencies: one code value of 2f, then zeros; large values alike: g = 11
        self.assertEqual(best_order([8] * 256), 0)
        self.assertEqual(self.table(packed_table_bytes(dict.fromkeys(range(256), 8)), 11)[1], [8] * 256)
        self.assertEqual(best_order([1000, 24, 1000, 24]), 11)

    def test_order_above_11(self):
        table = bytearray(packed_table_bytes({1: 1024, 2: 1024}, order=11))
        self.assertEqual(self.table(bytes(table), 11)[1], [1024, 1024])
        table[3] = 12
        self.assertIn("order 12", self.assertTable(bytes(table) + bytes(8), 11, "g = 12"))
        table[3] = 255
        self.assertTable(bytes(table) + bytes(8), 11, "g = 255")

    def test_prefix_too_long(self):
        # n + g = 13: with g = 0, thirteen ones; with g = 11, two.  A reader stops there,
        # whatever follows.
        for order, ones in ((0, 13), (11, 2), (5, 8)):
            prefix = [1] * ones + [0]
            for rest in ([], [0] * 40, [1] * 40):
                table = b"\x00\x07" + bytes([order]) + pack_bits(prefix + rest)
                self.assertIn("prefix 0", self.assertTable(table, 11, (order, ones)))
        # the longest allowed prefix is no fault in itself: here v = 2^12 - 1, so f_0 = -2^11
        self.assertIn("outside", self.assertTable(b"\x00\x07\x00" + pack_bits([1] * 12 + [0] + [0] * 12), 11,
                                                  "n = 12"))
        # a later prefix, and ones that run on to the end of the window
        table = b"\x01\x07\x08\x00" + pack_bits([0] + [1] * 13 + [0])
        self.assertIn("prefix 1", self.assertTable(table, 11, "the second"))
        self.assertIn("prefix 0", self.assertTable(b"\x00\x07\x00" + b"\xff" * 2000, 11, "ones"))

    def test_frequency_out_of_range(self):
        # k = 4: frequencies in [1, 16].  Tables of symbols 0, 1, ... with these
        # differences f_i - f_(i-1), at g = 0.
        def table(differences):
            bits = code_bits([zigzag(d) for d in differences], 0)
            return bytes([len(differences) - 1]) + bytes(range(len(differences))) + b"\x00" + pack_bits(bits)
        self.assertEqual(self.table(table([8, 0]), 4)[1], [8, 8])
        self.assertIn("frequency 0 of symbol 1", self.assertTable(table([16, -16]), 4, "f_1 = 0"))
        self.assertIn("frequency 0 of symbol 0", self.assertTable(table([0, 16]), 4, "f_0 = 0"))
        self.assertIn("frequency -1 of symbol 1", self.assertTable(table([1, -2, 16]), 4, "f_1 = -1"))
        self.assertIn("frequency 17 of symbol 0", self.assertTable(table([17, -16]), 4, "f_0 = 2^k + 1"))
        # back in range after it, with the right sum: each f_i is checked, not only the sum
        self.assertIn("frequency 17 of symbol 1", self.assertTable(table([1, 16, -16, -1]), 4, "f_1 = 17"))
        self.assertIn("frequency -1 of symbol 1", self.assertTable(table([9, -10, 10, 7]), 4, "f_1 = -1"))

    def test_frequencies_do_not_sum_to_2_k(self):
        for freqs in ([8, 9], [8, 7], [1], [15]):
            table = packed_table_bytes(dict(enumerate(freqs)))
            self.assertIn("sum", self.assertTable(table, 4, freqs))
        self.assertEqual(self.table(packed_table_bytes({0: 8, 1: 8}), 4)[1], [8, 8])

    def test_nonzero_padding(self):
        table = packed_table_bytes({0x41: 3, 0x42: 5}, order=0)  # 10 bits, 6 of padding
        for bit in range(2, 8):
            spoilt = table[:-1] + bytes([table[-1] | 1 << bit])
            self.assertIn("padding", self.assertTable(spoilt, 3, bit))
        # a set bit in the next byte is the next field's, not padding
        self.assertEqual(self.table(table + b"\xff", 3)[2], len(table))

    def test_bit_string_past_the_end(self):
        for table, k in ((packed_table_bytes({0x41: 3, 0x42: 5}, order=0), 3),
                         (packed_table_bytes(dict.fromkeys(range(256), 8), order=4), 11),  # long suffixes
                         (packed_table_bytes({7: 2048}), 11)):
            self.assertEqual(self.table(table, k)[2], len(table))
            for cut in range(len(table)):
                self.assertIn("fewer bytes", self.assertTable(table[:cut], k, cut))

    def test_symbol_set(self):
        # as Table 8.7: an increasing list, a bitmap of exactly s bits; s = 256 has none
        self.assertIn("strictly increasing", self.assertTable(b"\x01\x42\x41\x03\x98", 3, "order"))
        table = bytearray(packed_table_bytes(dict.fromkeys(range(32), 2)))
        self.assertEqual(self.table(bytes(table), 6)[1], [2] * 32)
        table[5] |= 0x01  # symbol 32
        self.assertIn("33 bits set", self.assertTable(bytes(table), 6, "33 bits"))
        # 256 symbols: no set; at g = 0 one code of 9 bits (v = 16), 255 of 1 bit
        self.assertEqual(len(packed_table_bytes(dict.fromkeys(range(256), 8))), 1 + 1 + 33)

    def test_packed_context_map(self):
        rng = np.random.default_rng(10)
        n = 600
        ctx = rng.integers(0, 256, n, dtype=np.uint8)
        data = skewed(rng, n)
        for T, w in ((2, 1), (3, 2), (4, 2), (5, 3), (8, 3)):
            with self.subTest(T=T):
                cmap = [c % T for c in range(256)]
                s = rans_encode(data, context=2, ctx=ctx, context_map=cmap, packed=True)
                self.assertEqual(len(s.context_map), 32 * w)
                h = r.rans_header(s.bytes(), n, packed=True)
                self.assertEqual(h.context_map.tolist(), cmap)
                self.assertEqual(rans_code(s.bytes(), n, ctx, packed=True), data)
                # each entry >= T that w bits can hold
                for bad in range(T, 1 << w):
                    spoilt = bytearray(s.context_map)
                    x = 201  # context byte 201's bits [w * 201, w * 201 + w)
                    for b in range(w):
                        at = w * x + b
                        spoilt[at // 8] = spoilt[at // 8] & ~(1 << at % 8) | ((bad >> b) & 1) << at % 8
                    s2 = rans_encode(data, context=2, ctx=ctx, context_map=cmap, packed=True)
                    s2.context_map = bytes(spoilt)
                    code, msg = rans_error(s2.bytes(), n, ctx, packed=True)
                    self.assertEqual(code, "E_RANS_HEADER", bad)
                    self.assertIn("packed context map", msg)

    def test_every_prefix_is_too_short(self):
        rng = np.random.default_rng(11)
        n = 500
        ctx = rng.integers(0, 256, n, dtype=np.uint8)
        data = skewed(rng, n)
        for kw in ({}, {"context": 1, "ctx": ctx, "context_map": [c % 3 for c in range(256)]}):
            b = rans_encode(data, packed=True, **kw).bytes()
            for cut in range(len(b)):
                self.assertEqual(rans_error(b[:cut], n, ctx, packed=True)[0], "E_RANS_HEADER", cut)

    def test_the_forms_are_not_interchangeable(self):
        # a codec-2 stream read as codec 4, and the reverse, fail their header checks
        rng = np.random.default_rng(12)
        data = skewed(rng, 400)
        for packed in (True, False):
            b = rans_encode(data, packed=packed).bytes()
            self.assertEqual(rans_code(b, 400, packed=packed), data)
            self.assertEqual(rans_error(b, 400, packed=not packed)[0], "E_RANS_HEADER")


class RansDecodeChecks(unittest.TestCase):
    """§8.7 Decoding: each failure is E_RANS_DECODE."""

    def setUp(self):
        rng = np.random.default_rng(7)
        self.n = 3 * 256 + 40  # the last tile: 40 symbols, so a partial step
        self.data = skewed(rng, self.n, 0.05)

    def decode_error(self, s):
        data = s.bytes() if isinstance(s, RansStream) else s
        self.assertEqual(scalar_decode(data, self.n), "E_RANS_DECODE")
        code, msg = rans_error(data, self.n)
        self.assertEqual(code, "E_RANS_DECODE")
        return msg

    def test_initial_state_below_L(self):
        for tile in range(4):
            for lane, state in ((0, 0), (31, 0xFFFF), (7, 1)):
                s = rans_encode(self.data)
                p = bytearray(s.payloads[tile])
                p[4 * lane:4 * lane + 4] = struct.pack("<I", state)
                s.payloads[tile] = bytes(p)
                self.assertIn(f"tile {tile}: an initial state", self.decode_error(s))

    def test_truncated_tile(self):
        # without its last word, a tile reads past its end at the last word it needs
        words = [(len(p) - 4 * 32) // 2 for p in rans_encode(self.data).payloads]
        self.assertEqual([w > 0 for w in words], [True, True, True, False])  # 1 or 2 symbols a lane: no word
        for tile in range(3):
            s = rans_encode(self.data)
            s.payloads[tile] = s.payloads[tile][:-2]
            s.lengths[tile] -= 2
            self.assertIn(f"tile {tile}: runs out of words", self.decode_error(s))
        # the words of the next tile are not the tile's own
        s = rans_encode(self.data)
        s.lengths[0] -= 2
        s.lengths[1] += 2
        self.decode_error(s)

    def test_leftover_words(self):
        for tile in range(4):
            s = rans_encode(self.data)
            s.payloads[tile] += b"\x00\x00"
            s.lengths[tile] += 2
            self.assertIn(f"tile {tile}: words left over", self.decode_error(s))

    def test_final_state(self):
        # one-symbol table: states never change, so an initial state above L stays there
        data = b"\x03" * self.n
        for tile in range(4):
            s = rans_encode(data)
            p = bytearray(s.payloads[tile])
            p[8:12] = struct.pack("<I", RANS_L + 1)
            s.payloads[tile] = bytes(p)
            self.assertIn(f"tile {tile}: a final state", self.decode_error(s))
        s = rans_encode(data)
        s.payloads[0] = struct.pack("<I", 0xFFFFFFFF) + s.payloads[0][4:]
        self.assertIn("final state", self.decode_error(s))

    def test_a_lane_past_the_last_symbol(self):
        # the last tile has 40 symbols: lanes 8 to 31 decode one symbol, lanes 0 to 7 two
        s = rans_encode(self.data)
        self.assertEqual(r.rans_decode(s.bytes(), self.n).tobytes(), self.data)
        # a corrupt state in a lane of the partial step still ends in E_RANS_DECODE
        p = bytearray(s.payloads[3])
        p[4 * 7:4 * 8] = struct.pack("<I", 0x12345678)
        s.payloads[3] = bytes(p)
        self.decode_error(s)

    def test_agrees_with_the_pseudocode_on_corrupt_payloads(self):
        rng = np.random.default_rng(8)
        n = 1500
        ctx = rng.integers(0, 256, n, dtype=np.uint8)
        data = ((ctx.astype(np.int64) + rng.geometric(0.4, n)) % 256).astype(np.uint8).tobytes()
        small = bytes(x % 12 for x in data)
        streams = [rans_encode(data, tile_log2=8).bytes(), rans_encode(small, k=4, tile_log2=9).bytes(),
                   rans_encode(data, context=2, ctx=ctx, context_map=[c % 4 for c in range(256)]).bytes()]
        outcomes = set()
        for b in streams:
            start = r.rans_header(b, n).payload_offset
            for trial in range(60):
                spoilt = bytearray(b)
                for _ in range(1 + trial % 3):
                    at = int(rng.integers(start, len(b)))
                    spoilt[at] ^= int(rng.integers(1, 256))
                want = scalar_decode(bytes(spoilt), n, ctx)
                self.assertEqual(rans_code(bytes(spoilt), n, ctx), want, trial)
                outcomes.add(want if isinstance(want, str) else "decoded")
            # tile lengths moved between tiles, so the lengths still sum to the rest
            h = r.rans_header(b, n)
            for t in range(h.tile_lengths.size - 1):
                for move in (2, -2, 4, 64):
                    L = h.tile_lengths.copy()
                    L[t] -= move
                    L[t + 1] += move
                    spoilt = bytearray(b)
                    at = h.payload_offset - 4 * L.size
                    spoilt[at:h.payload_offset] = L.astype("<u4").tobytes()
                    try:
                        want = scalar_decode(bytes(spoilt), n, ctx)
                    except r.TpdeError as e:
                        want = e.code
                    self.assertEqual(rans_code(bytes(spoilt), n, ctx), want)
        self.assertIn("E_RANS_DECODE", outcomes)


# ---------------------------------------------------------------------------
# Whole files with codec 2: golden files of format 1.0 with their streams recoded.
# The recoder reads the golden file and its base with the reader, then works out what
# a writer knows (positions, base keys, the plane above) itself, not with the code
# under test.
# ---------------------------------------------------------------------------


def base_key_of(b, w):
    """§8.6: the most significant byte of rotl(b, 1)."""
    return (((b << 1) | (b >> (w - 1))) >> (w - 8)) & 0xFF


class Place:
    """A stream's place in its chunk (§8.5 stream order) and what its context reads."""

    def __init__(self, kind, plane, planes, chunk):
        self.kind, self.plane, self.planes, self.chunk = kind, plane, planes, chunk

    def allows(self, context):
        """§8.7 Contexts, as a writer reads them."""
        c = self.chunk
        if context == 1:
            return (self.kind == "value plane" and c["encoding"] in (1, 2)
                    and c["value_order"] == 0)
        if context == 2:
            return self.kind in ("gap plane", "value plane") and self.plane + 1 < self.planes
        return context == 0


class Recoded:
    """A delta file taken apart: its preamble, header and chunk records, and each
    chunk's streams as [codec, decoded bytes, stored bytes]; bytes() lays it out again."""

    def __init__(self, path, base_path=None):
        d = r.Delta(path)
        with open(path, "rb") as f:
            self.file = f.read()
        self.preamble = bytearray(self.file[:128])
        data_len, header_len, chunk_count, _ = struct.unpack_from("<4Q", self.file, 32)
        header_offset = -(-(128 + data_len) // 64) * 64
        self.header = self.file[header_offset:header_offset + header_len]
        table = -(-(header_offset + header_len) // 64) * 64
        self.records = [bytearray(self.file[table + 64 * c:table + 64 * c + 64]) for c in range(chunk_count)]
        bases = r.resolve_base(d, base_path) if base_path else {}
        self.chunks = []  # per chunk: dict of its fields, streams, places, contexts
        for t in d.tensors:
            base = bases.get(t.index)
            B = [] if base is None else np.frombuffer(base.buf, r.WORD_DTYPE[t.wb], base.nbytes // t.wb,
                                                      base.start).tolist()
            for k in range(t.chunk_count):
                g = t.first_chunk + k
                rec = self.records[g]
                c = dict(zip(("encoding", "value_op", "value_layout", "position_coding", "gap_width",
                              "stream_count", "value_order"), rec[20:27]))
                c["m"] = struct.unpack_from("<I", rec, 12)[0]
                first = struct.unpack_from("<I", rec, 16)[0]
                n = min(t.cw, t.words - k * t.cw)
                at = struct.unpack_from("<Q", rec, 0)[0]
                streams = []
                for s in range(first, first + c["stream_count"]):
                    S = d.streams[s]
                    stored = self.file[at:at + int(S["stored_len"])]
                    at += len(stored)
                    codec = int(S["codec"])
                    plain = stored if codec == 0 else r.zstd_decode(stored, int(S["decoded_len"]))
                    streams.append([codec, bytes(plain), stored])
                c["streams"] = streams
                # places and the writer's positions
                g_w = c["gap_width"] if c["position_coding"] == 1 else 0
                n_pos = g_w if c["position_coding"] == 1 else 1 if c["position_coding"] == 2 else 0
                places = [Place("gap plane", q, g_w, c) for q in range(g_w)]
                if c["position_coding"] == 2:
                    places.append(Place("bitmap", None, 0, c))
                words = c["value_layout"] == 0
                n_val = len(streams) - n_pos
                places += [Place("words" if words else "value plane", None if words else q, n_val, c)
                           for q in range(n_val)]
                c["places"] = places
                if c["encoding"] == 1 and g_w:
                    planes = [s[1] for s in streams[:g_w]]
                    gaps = [sum(p[i] << (8 * j) for j, p in enumerate(planes)) for i in range(c["m"])]
                    words_at = list(np.cumsum(gaps, dtype=np.int64).tolist())
                elif c["encoding"] == 1:
                    bitmap = streams[0][1]
                    words_at = [j for j in range(n) if bitmap[j // 8] >> (j % 8) & 1]
                else:
                    words_at = list(range(n))
                s_k = k * t.cw
                c["keys"] = bytes(base_key_of(B[s_k + j] if s_k + j < len(B) else 0, 8 * t.wb)
                                  for j in words_at)
                c["name"] = f"{t.name} chunk {k}"
                self.chunks.append(c)

    def recode(self, chunk, q, context, ctx=None, spoil=None, packed=False):
        """Stream q of a chunk as lane rANS of `context` (codec 4 if packed), its context
        bytes as a writer computes them (or `ctx`); spoil(RansStream) may change it
        first."""
        c = self.chunks[chunk]
        plain = c["streams"][q][1]
        if ctx is None:
            ctx = {0: None, 1: c["keys"], 2: c["streams"][q + 1][1] if q + 1 < len(c["streams"]) else None}[context]
        if context and ctx is None:
            ctx = bytes(len(plain))
        cmap = [x % 4 for x in range(256)] if context else None
        stream = rans_encode(plain, context=context, ctx=ctx, context_map=cmap, packed=packed)
        if spoil:
            spoil(stream)
        c["streams"][q] = [r.CODEC_RANS_PACKED if packed else r.CODEC_RANS, plain, stream.bytes()]

    def recode_all(self, choose, packed=False):
        """choose(place) -> a context, or None to keep the stream as it is."""
        for ci, c in enumerate(self.chunks):
            for q, place in enumerate(c["places"]):
                context = choose(place)
                if context is not None:
                    self.recode(ci, q, context, packed=packed)

    def bytes(self, required=None, optional=None, minor=None):
        """The file laid out again; by default with the feature bits and minor version
        that its codecs need (§12 item 8)."""
        codecs = {s[0] for c in self.chunks for s in c["streams"]}
        pre = bytearray(self.preamble)
        if required is None:
            required = struct.unpack_from("<Q", pre, 16)[0]
            required |= (r.FEATURE_RANS_LANES if r.CODEC_RANS in codecs else 0)
            required |= (r.FEATURE_PACKED_RANS if r.CODEC_RANS_PACKED in codecs else 0)
        if minor is None:
            minor = max([struct.unpack_from("<H", pre, 10)[0]]
                        + [m for codec, m in ((r.CODEC_RANS, 1), (r.CODEC_RANS_PACKED, 4)) if codec in codecs])
        struct.pack_into("<H", pre, 10, minor)
        struct.pack_into("<Q", pre, 16, required)
        if optional is not None:
            struct.pack_into("<Q", pre, 24, optional)
        data, records, stream_records = bytearray(), [], bytearray()
        for c, rec in zip(self.chunks, self.records):
            rec = bytearray(rec)
            stored = b"".join(s[2] for s in c["streams"])
            struct.pack_into("<QI", rec, 0, 128 + len(data), len(stored))
            struct.pack_into("<Q", rec, 32, r.xxh64(stored))
            data += stored
            records.append(bytes(rec))
            for codec, plain, s in c["streams"]:
                stream_records += struct.pack("<IIB7x", len(s), len(plain), codec)
        tables = b"".join(records) + bytes(stream_records)
        struct.pack_into("<QQ", pre, 32, len(data), len(self.header))
        struct.pack_into("<Q", pre, 56, len(stream_records) // 16)
        struct.pack_into("<Q", pre, 72, r.xxh64(tables))
        struct.pack_into("<Q", pre, 120, r.xxh64(bytes(pre[:120])))
        out = bytearray(pre) + data
        out += bytes(-len(out) % 64) + self.header
        out += bytes(-len(out) % 64) + tables
        return bytes(out + struct.pack("<Q", len(out) + 16) + b"\x89TPDEEND")


def by_base_key(place):
    """Every stream as lane rANS: context 1 where allowed, else 2, else 0."""
    return next(ctx for ctx in (1, 2, 0) if place.allows(ctx))


def by_plane_above(place):
    """Every stream as lane rANS: context 2 where allowed, else 1, else 0."""
    return next(ctx for ctx in (2, 1, 0) if place.allows(ctx))


def lower_planes(place):
    """Only the planes under the top one, as lane rANS of context 2: the top plane keeps
    its codec, stored or zstd."""
    return 2 if place.allows(2) else None


def decode_bytes(blob, base):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "delta.tpde")
        with open(path, "wb") as f:
            f.write(blob)
        return r.run_decode(path, base)


class RansFiles(unittest.TestCase):
    """§3 feature bit 1, O6, O20 and D3 on whole files."""

    def case(self, case_id):
        case = next(c for c in load_manifest() if c["id"] == case_id)
        base = case.get("base")
        base = os.path.join(CONFORMANCE, base) if base else None
        expected = None
        if "expected" in case:
            with open(os.path.join(CONFORMANCE, case["expected"]), "rb") as f:
                expected = f.read().decode("utf-8")
        return Recoded(os.path.join(CONFORMANCE, case["path"]), base), base, expected

    @staticmethod
    def uses_rans(path):
        """Whether a golden file sets required feature bit 1, 3 or 4 (spec §3): lane
        rANS, constant or packed lane rANS streams, which the recoder here does not
        take apart."""
        with open(os.path.join(CONFORMANCE, path), "rb") as f:
            preamble = f.read(24)
        bits = r.FEATURE_RANS_LANES | r.FEATURE_CONSTANT_STREAMS | r.FEATURE_PACKED_RANS
        return bool(struct.unpack_from("<Q", preamble, 16)[0] & bits)

    def test_recoded_valid_cases(self):
        """Every valid golden file decodes to the same tensors with its streams coded
        as lane rANS: each context where it is allowed, over planes of every codec,
        in both table forms."""
        for case in load_manifest():
            # Files of formats 1.1, 1.3 and 1.4 already hold lane rANS, constant or
            # packed lane rANS streams; their cases test them.
            # Files of format 1.2 need their reference deltas, which a recoded file
            # no longer matches (its pin names the original bytes).
            if case["expect"] != "accept" or self.uses_rans(case["path"]) or case.get("references"):
                continue
            for policy, packed in ((by_base_key, False), (by_plane_above, False), (lower_planes, False),
                                   (by_plane_above, True)):
                with self.subTest(case=case["id"], policy=policy.__name__, packed=packed):
                    rec, base, expected = self.case(case["id"])
                    rec.recode_all(policy, packed)
                    self.assertEqual(decode_bytes(rec.bytes(), base), (0, expected))

    def test_contexts_used(self):
        """The recoded files hold every context in every place that allows it."""
        seen = set()
        for case_id in ("value-ops-layouts", "encoding-sparse-gaps-w4", "encoding-raw",
                        "encoding-sparse-bitmap", "reshape-leading-dim-grew"):
            rec, _, _ = self.case(case_id)
            for c in rec.chunks:
                for place in c["places"]:
                    for policy in (by_base_key, by_plane_above):
                        seen.add((place.kind, policy(place), c["encoding"]))
        for want in (("value plane", 1, 1), ("value plane", 1, 2), ("value plane", 2, 1),
                     ("value plane", 2, 2), ("value plane", 2, 3), ("gap plane", 2, 1),
                     ("gap plane", 0, 1), ("bitmap", 0, 1), ("words", 0, 1), ("words", 0, 2),
                     ("words", 0, 3)):
            self.assertIn(want, seen)

    def test_feature_bits(self):
        rec, base, expected = self.case("mixed")
        plain = rec.bytes()  # a 1.0 file: no codec 2
        self.assertEqual(struct.unpack_from("<HHIQ", plain, 8)[1:4:2], (0, 0))
        self.assertEqual(decode_bytes(plain, base), (0, expected))
        # O6: bits 1 to 4 are known (bits 1, 3 and 4 with or without codecs 2, 3 and
        # 4, in any minor version); any other required bit, bit 0 included, is not
        for bits in (2, 8, 10, 16, 18, 26):
            self.assertEqual(decode_bytes(rec.bytes(required=bits), base), (0, expected), bits)
        for bits in (1, 3, 32, 34, 1 << 63):
            self.assertEqual(decode_bytes(rec.bytes(required=bits), base),
                             (1, '{"error":"E_UNKNOWN_REQUIRED_FEATURE"}\n'), bits)
        # H7: bit 2 without `position_reference` in the header
        for bits in (4, 6):
            self.assertEqual(decode_bytes(rec.bytes(required=bits), base),
                             (1, '{"error":"E_HEADER_INVALID"}\n'), bits)
        rec.recode_all(by_base_key)
        self.assertEqual(struct.unpack_from("<HHIQ", rec.bytes(), 8)[1:4:2], (1, 2))
        for minor in (0, 1, 7):
            self.assertEqual(decode_bytes(rec.bytes(minor=minor), base), (0, expected), minor)
        # O20: codec 2 without required bit 1 (an optional bit 1 is no substitute)
        for required, optional in ((0, 0), (0, 2), (0, 0xFF)):
            self.assertEqual(decode_bytes(rec.bytes(required=required, optional=optional), base),
                             (1, '{"error":"E_UNKNOWN_CODEC"}\n'))
        next(c for c in rec.chunks if c["streams"])["streams"][0][0] = 3
        self.assertEqual(decode_bytes(rec.bytes(), base), (1, '{"error":"E_UNKNOWN_CODEC"}\n'))

    def test_packed_feature_bit(self):
        """§3 bit 4 and O20: codec 4 needs required bit 4, and bit 1 only for codec 2."""
        rec, base, expected = self.case("mixed")
        rec.recode_all(by_base_key, packed=True)
        self.assertEqual(struct.unpack_from("<HHIQ", rec.bytes(), 8)[1:4:2], (4, 16))
        self.assertEqual(decode_bytes(rec.bytes(), base), (0, expected))
        for minor in (0, 1, 3):
            self.assertEqual(decode_bytes(rec.bytes(minor=minor), base), (0, expected), minor)
        # codec 4 without required bit 4, whatever else the file sets
        for required, optional in ((0, 0), (2, 0), (0xA, 0), (0, 16), (2, 0xFF)):
            self.assertEqual(decode_bytes(rec.bytes(required=required, optional=optional), base),
                             (1, '{"error":"E_UNKNOWN_CODEC"}\n'), (required, optional))
        # codecs 2 and 4 side by side: bits 1 and 4
        ci = next(i for i, c in enumerate(rec.chunks) if c["streams"])
        rec.recode(ci, 0, 0)
        self.assertEqual(struct.unpack_from("<HHIQ", rec.bytes(), 8)[1:4:2], (4, 18))
        self.assertEqual(decode_bytes(rec.bytes(), base), (0, expected))
        self.assertEqual(decode_bytes(rec.bytes(required=16), base), (1, '{"error":"E_UNKNOWN_CODEC"}\n'))
        # id 5 is not defined
        rec.chunks[ci]["streams"][0][0] = 5
        self.assertEqual(decode_bytes(rec.bytes(), base), (1, '{"error":"E_UNKNOWN_CODEC"}\n'))

    def test_context_not_allowed_in_its_place(self):
        """§8.7: each context outside the places that allow it is E_RANS_HEADER."""
        checks = 0
        for case_id in ("value-ops-layouts", "encoding-sparse-gaps-w4", "encoding-raw",
                        "value-order-grouped", "encoding-sparse-bitmap"):
            rec, base, _ = self.case(case_id)
            for ci, c in enumerate(rec.chunks):
                for q, place in enumerate(c["places"]):
                    for context in (1, 2):
                        if place.allows(context):
                            continue
                        with self.subTest(case=case_id, chunk=c["name"], stream=q, context=context):
                            kept = c["streams"][q]
                            rec.recode(ci, q, context, ctx=bytes(len(kept[1])))
                            self.assertEqual(decode_bytes(rec.bytes(), base),
                                             (1, '{"error":"E_RANS_HEADER"}\n'))
                            c["streams"][q] = kept
                            checks += 1
        self.assertGreater(checks, 50)

    def test_dependency_order(self):
        """D3: a context-1 stream after the positions, a context-2 plane after the plane
        above it: with one fault, the fault's own code."""
        rec, base, expected = self.case("value-ops-layouts")
        sparse = next(i for i, c in enumerate(rec.chunks)
                      if c["encoding"] == 1 and c["value_layout"] == 1 and len(c["places"]) >= 5
                      and c["m"] >= 2)
        c = rec.chunks[sparse]
        for q in range(1, len(c["places"])):  # the value planes: base key on top, then plane above
            rec.recode(sparse, q, by_plane_above(c["places"][q]))
        self.assertEqual([s[2][1] for s in c["streams"][1:]], [2] * (len(c["places"]) - 2) + [1])
        self.assertEqual(decode_bytes(rec.bytes(), base), (0, expected))
        # the gaps, one gap made zero: the positions fail before the values that need them
        gaps = bytearray(c["streams"][0][1])
        gaps[1] = 0
        c["streams"][0] = [0, bytes(gaps), bytes(gaps)]
        self.assertEqual(decode_bytes(rec.bytes(), base), (1, '{"error":"E_POSITIONS_NOT_INCREASING"}\n'))
        # the top plane spoilt: its own code, not one of the planes under it
        rec, base, expected = self.case("value-ops-layouts")
        dense = next(i for i, c in enumerate(rec.chunks)
                     if c["encoding"] == 2 and c["value_layout"] == 2 and len(c["places"]) == 8)
        rec.recode_all(by_plane_above)
        c = rec.chunks[dense]
        self.assertEqual(decode_bytes(rec.bytes(), base), (0, expected))
        top = bytearray(c["streams"][7][2])
        top[0] = 12  # prob_bits
        c["streams"][7][2] = bytes(top)
        self.assertEqual(decode_bytes(rec.bytes(), base), (1, '{"error":"E_RANS_HEADER"}\n'))

        def word_left_over(stream):
            stream.payloads[-1] += b"\x00\x00"
            stream.lengths[-1] += 2
        rec.recode(dense, 7, 1, spoil=word_left_over)
        self.assertEqual(decode_bytes(rec.bytes(), base), (1, '{"error":"E_RANS_DECODE"}\n'))
        # a plane under it spoilt instead (the top plane sound): that plane's code
        rec.recode(dense, 7, 1)
        self.assertEqual(decode_bytes(rec.bytes(), base), (0, expected))
        rec.recode(dense, 3, 2, spoil=word_left_over)
        self.assertEqual(decode_bytes(rec.bytes(), base), (1, '{"error":"E_RANS_DECODE"}\n'))


if __name__ == "__main__":
    unittest.main()
