"""Tests of the independent Python reader (tpde_reader.py).

    python3 -m unittest discover -s conformance/python -p 'test_*.py'

1. The conformance suite, case by case, through conformance/manifest.json.
2. The test vectors of spec §10.3 and the worked example of spec §15.8.
3. Small hand-made inputs for zigzag, rotation, byte planes, gaps, bitmaps, value order,
   the zstd profile and strict JSON.
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
                    os.path.join(CONFORMANCE, base) if base else None)
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


if __name__ == "__main__":
    unittest.main()
