#!/usr/bin/env python3
"""An independent reader of the tpde delta format 1.4, written from spec/FORMAT.md alone.

Usage:
    tpde_reader.py decode DELTA [--base BASE] [--reference REF]...
    tpde_reader.py rebuild DELTA [--base BASE] -o OUT [--force]

`decode` prints the canonical decode of spec §11.4 / conformance/README.md;
`rebuild` writes the target safetensors file(s) of spec §11.3.  On a format or base
error both print {"error":"E_..."} on stdout and exit 1; a usage error exits 2.

It reads every file of format 1.4: the preamble and trailer (§3, §4), the strict
JSON header (§5), the binary chunk map (§6), all encodings, value ops, value layouts,
position codings and value orders (§8.1-§8.6), the codecs stored, zstd under its
profile (§8.5), lane rANS with its three contexts (§8.7, feature bit 1 of §3),
constant (§8.8, feature bit 3) and packed lane rANS (§8.9, feature bit 4),
checksums and digests (§10), base checkpoints (§11.2) and the rebuilt safetensors
files (§11.3), and position coding 3 against a chain of reference deltas (§8.3,
feature bit 2, §11.2 R0).  A 1.0 file is a 1.4 file without codecs 2, 3 and 4.

Dependencies: the standard library, numpy, zstandard, xxhash.  The code follows the
spec's section order; comments name the rule each check implements.
"""

import argparse
import hashlib
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
import tempfile

import numpy as np
import xxhash
import zstandard

# ---------------------------------------------------------------------------
# §13 errors
# ---------------------------------------------------------------------------


class TpdeError(Exception):
    """A failure with one of the stable error codes of spec §13."""

    def __init__(self, code, msg=""):
        super().__init__(f"{code}: {msg}" if msg else code)
        self.code = code


def fail(code, msg=""):
    raise TpdeError(code, msg)


# ---------------------------------------------------------------------------
# §1 conventions, §3 preamble, §4 trailer constants
# ---------------------------------------------------------------------------

U64_MAX = 2**64 - 1
MAGIC = b"\x89TPDE\r\n\x1a"
END_MAGIC = b"\x89TPDEEND"
PREAMBLE_LEN = 128
TRAILER_LEN = 16
CHUNK_REC = 64
STREAM_REC = 16

MAX_HEADER_LEN = 2**28  # §9
MAX_CHUNK_COUNT = 2**28
MAX_STREAMS_PER_CHUNK = 12
MAX_JSON_DEPTH = 127
MAX_JSON_INT = 2**53 - 1
MAX_FILES = 2**16
MAX_TENSORS = 2**20
MAX_RANK = 32
MAX_CHUNK_WORDS = 2**24
MAX_BYTE_LEN = 2**63 - 1
MAX_ZSTD_WINDOW = 2**27

# §3 Table 3.2: 1.1 defines bit 1 (`rans-lanes`, codec 2).  Bit 0 is never assigned
# and stays unknown, like every other bit.
FEATURE_RANS_LANES = 1 << 1
# 1.2 defines bit 2 (`temporal-positions`, position coding 3).
FEATURE_TEMPORAL_POSITIONS = 1 << 2
# 1.3 defines bit 3 (`constant-streams`, codec 3).
FEATURE_CONSTANT_STREAMS = 1 << 3
# 1.4 defines bit 4 (`packed-rans`, codec 4).
FEATURE_PACKED_RANS = 1 << 4
KNOWN_REQUIRED_FEATURES = (FEATURE_RANS_LANES | FEATURE_TEMPORAL_POSITIONS | FEATURE_CONSTANT_STREAMS
                           | FEATURE_PACKED_RANS)

# §7 Table 7.1: dtype -> (bits per element, word bytes)
DTYPES = {
    "BOOL": (8, 1), "F4": (4, 1), "F6_E2M3": (6, 1), "F6_E3M2": (6, 1),
    "U8": (8, 1), "I8": (8, 1), "F8_E5M2": (8, 1), "F8_E4M3": (8, 1),
    "F8_E8M0": (8, 1),
    "I16": (16, 2), "U16": (16, 2), "F16": (16, 2), "BF16": (16, 2),
    "I32": (32, 4), "U32": (32, 4), "F32": (32, 4), "C64": (64, 4),
    "F64": (64, 8), "I64": (64, 8), "U64": (64, 8),
}
WORD_DTYPE = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

# §8 ids
ENC_UNCHANGED, ENC_SPARSE, ENC_DENSE, ENC_RAW = 0, 1, 2, 3
OP_XOR, OP_SUB = 0, 1
LAYOUT_WORDS, LAYOUT_PLANES, LAYOUT_ROTATED = 0, 1, 2
POS_NONE, POS_GAPS, POS_BITMAP, POS_SPLIT = 0, 1, 2, 3
ORDER_POSITIONAL, ORDER_GROUPED = 0, 1
CODEC_STORED, CODEC_ZSTD, CODEC_RANS, CODEC_CONSTANT, CODEC_RANS_PACKED = 0, 1, 2, 3, 4
N_ENCODINGS, N_VALUE_OPS, N_LAYOUTS, N_POSITION_CODINGS, N_VALUE_ORDERS, N_CODECS = 4, 2, 3, 4, 2, 5

EMPTY_XXH3_64 = 0x2D06800538D394C2


def xxh64(data):
    return xxhash.xxh3_64_intdigest(data)


def xxh128(data):
    return xxhash.xxh3_128_digest(data)  # canonical big-endian bytes (§10.2)


def align64(x):
    return -(-x // 64) * 64


def ceil_div(a, b):
    return -(-a // b)


def u64(buf, off):
    return struct.unpack_from("<Q", buf, off)[0]


# ---------------------------------------------------------------------------
# §5.1 strict JSON
# ---------------------------------------------------------------------------


class _Neg:
    """A JSON integer written with a minus sign (never a valid header integer)."""


class _Float:
    """A JSON number with a fraction or an exponent (never an integer)."""


class _DupKey(Exception):
    pass


class _BadJson(Exception):
    pass


_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_BRACKETS = np.zeros(256, dtype=np.int8)
_BRACKETS[ord("[")] = _BRACKETS[ord("{")] = 1
_BRACKETS[ord("]")] = _BRACKETS[ord("}")] = -1


def _in_double_range(text):
    # §5.1: every JSON number is within the range of an IEEE 754 double.
    if math.isinf(float(text)):
        raise _BadJson("number out of range")


def _parse_int(text):
    # The literal text of an integer: grammar -?(0|[1-9][0-9]*).  Negative integers
    # (-0 included) are never valid in a core object or a safetensors header.
    _in_double_range(text)
    if text.startswith("-"):
        return _Neg()
    if len(text) > 40:  # far above any u64; avoid int() digit limits
        return _Float()
    return int(text)


def _parse_float(text):
    _in_double_range(text)
    return _Float()


def _parse_constant(_text):
    raise _BadJson("NaN/Infinity")


def _pairs(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DupKey(k)
        d[k] = v
    return d


def _check_strings(v):
    """§5.1 rule 2: no string (key or value) may hold a lone surrogate."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE_RE.search(x):
                return False
        elif isinstance(x, dict):
            for k, y in x.items():
                if _SURROGATE_RE.search(k):
                    return False
                stack.append(y)
        elif isinstance(x, list):
            stack.extend(x)
    return True


def strict_json(data):
    """Parse bytes under §5.1.  Raises _BadJson (rules 1, 2, 4) or _DupKey (rule 3)."""
    data = bytes(data)
    try:  # rule 1: UTF-8, no BOM (json.loads rejects a leading U+FEFF)
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise _BadJson("not UTF-8") from e
    # rule 4: nesting depth, counted on the text with string literals removed
    # (before parsing, so that deep nesting cannot exhaust the parser's stack).
    skeleton = np.frombuffer(_STRING_RE.sub(b"", data), dtype=np.uint8)
    if skeleton.size and int(np.cumsum(_BRACKETS[skeleton], dtype=np.int64).max()) > MAX_JSON_DEPTH:
        raise _BadJson("nesting too deep")
    try:  # rule 2 (RFC 8259) and rule 3 (duplicate keys, via object_pairs_hook)
        value = json.loads(
            text, object_pairs_hook=_pairs, parse_int=_parse_int,
            parse_float=_parse_float, parse_constant=_parse_constant, strict=True)
    except (ValueError, RecursionError) as e:
        raise _BadJson(str(e)) from e
    if not _check_strings(value):
        raise _BadJson("lone surrogate")
    return value


def parse_header_json(data):
    """§5.1 for the delta header and embedded safetensors headers: codes of O14/O15."""
    try:
        return strict_json(data)
    except _DupKey as e:
        fail("E_DUPLICATE_KEY", f"duplicate key {e}")
    except _BadJson as e:
        fail("E_HEADER_INVALID", str(e))


# ---------------------------------------------------------------------------
# §5.2 - §5.6 header structure (O16)
# ---------------------------------------------------------------------------


def is_hdr_int(v):
    # §5.1: grammar 0|[1-9][0-9]*, at most 2^53 - 1 (bool is not an integer)
    return type(v) is int and 0 <= v <= MAX_JSON_INT


def is_int_array(v):
    return type(v) is list and all(is_hdr_int(x) for x in v)


def check_members(obj, spec):
    """spec: member -> (required, type predicate).  null reads as absent when optional,
    except for `extensions`, which must be an object when present (§5.1)."""
    if type(obj) is not dict:
        fail("E_HEADER_INVALID", "not an object")
    for k in obj:
        if k not in spec:
            fail("E_HEADER_INVALID", f"unknown member {k!r}")
    out = {}
    for k, (required, pred) in spec.items():
        v = obj.get(k)
        if v is None and not required and not (k == "extensions" and k in obj):
            out[k] = None
            continue
        if k not in obj:
            fail("E_HEADER_INVALID", f"missing member {k!r}")
        if not pred(v):
            fail("E_HEADER_INVALID", f"member {k!r} has the wrong type")
        out[k] = v
    return out


def _is_str(v):
    return type(v) is str


def _is_obj(v):
    return type(v) is dict


def _is_list(v):
    return type(v) is list


HEADER_SPEC = {"writer": (True, _is_str), "target": (True, _is_obj),
               "tensors": (True, _is_list), "position_reference": (False, _is_obj),
               "extensions": (False, _is_obj)}
PIN_SPEC = {"sha256": (True, _is_str), "file_len": (True, is_hdr_int)}
TARGET_SPEC = {"kind": (True, lambda v: v in ("file", "sharded") and type(v) is str),
               "files": (True, _is_list), "index_json": (False, _is_str)}
FILE_SPEC = {"name": (True, _is_str), "safetensors_header": (True, _is_str)}
TENSOR_SPEC = {"name": (True, _is_str), "dtype": (True, _is_str), "shape": (True, is_int_array),
               "file": (True, is_hdr_int), "chunk_words": (True, is_hdr_int),
               "first_chunk": (True, is_hdr_int), "chunk_count": (True, is_hdr_int),
               "digest": (True, _is_str), "base": (False, _is_obj)}
BASE_SPEC = {"shape": (True, is_int_array), "digest": (True, _is_str)}


def check_structure(doc):
    """O16: members, JSON types, kind values, integer forms of §5.2-§5.6."""
    hdr = check_members(doc, HEADER_SPEC)
    tgt = check_members(hdr["target"], TARGET_SPEC)
    files = [check_members(f, FILE_SPEC) for f in tgt["files"]]
    tensors = []
    for t in hdr["tensors"]:
        e = check_members(t, TENSOR_SPEC)
        if e["base"] is not None:
            e["base"] = check_members(e["base"], BASE_SPEC)
        tensors.append(e)
    pin = hdr["position_reference"]
    if pin is not None:
        pin = check_members(pin, PIN_SPEC)
    return {"writer": hdr["writer"], "kind": tgt["kind"], "files": files,
            "index_json": tgt["index_json"], "tensors": tensors, "position_reference": pin}


# ---------------------------------------------------------------------------
# §7 byte length
# ---------------------------------------------------------------------------


def byte_len(dtype, shape):
    """§7: the byte length, or None where it is undefined."""
    bits, _wb = DTYPES[dtype]
    elements = 1
    for d in shape:  # left to right; each partial product must fit in u64
        elements *= d
        if elements > U64_MAX:
            return None
    eb = elements * bits
    if eb > U64_MAX or eb % 8:
        return None
    n = eb // 8
    return None if n > MAX_BYTE_LEN else n


HEX32 = re.compile(r"[0-9a-f]{32}\Z")


def valid_file_name(name):
    """§5.3 file names."""
    return (name != "" and name.endswith(".safetensors") and "/" not in name
            and "\\" not in name and "\x00" not in name and name not in (".", ".."))


# ---------------------------------------------------------------------------
# §6 chunk map records
# ---------------------------------------------------------------------------

CHUNK_DT = np.dtype([
    ("data_offset", "<u8"), ("stored_len", "<u4"), ("changed_count", "<u4"),
    ("first_stream", "<u4"), ("encoding", "u1"), ("value_op", "u1"),
    ("value_layout", "u1"), ("position_coding", "u1"), ("gap_width", "u1"),
    ("stream_count", "u1"), ("value_order", "u1"), ("res0", "V5"), ("checksum", "<u8"), ("digest", "V16"),
    ("res1", "V8")])
STREAM_DT = np.dtype([("stored_len", "<u4"), ("decoded_len", "<u4"), ("codec", "u1"),
                      ("res", "V7")])
assert CHUNK_DT.itemsize == CHUNK_REC and STREAM_DT.itemsize == STREAM_REC


def first_true(mask):
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


# ---------------------------------------------------------------------------
# §11.1 open-time validation
# ---------------------------------------------------------------------------


def map_file(path):
    """Memory-maps a file read-only; returns (buffer, length).  Empty files give b""."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return b"", 0
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        fail("E_IO", str(e))


class Tensor:
    __slots__ = ("index", "name", "dtype", "shape", "file", "cw", "first_chunk",
                 "chunk_count", "digest", "base", "wb", "nbytes", "words")


class Delta:
    """An open delta file: everything of O1-O22 checked."""

    def __init__(self, path):
        self.buf, L = map_file(path)
        buf = self.buf
        # -- preamble and trailer --------------------------------------------
        if L < 8 or bytes(buf[0:8]) != MAGIC:  # O1
            fail("E_BAD_MAGIC")
        if L < 10:  # O2
            fail("E_TRUNCATED", "ends inside the version field")
        major = struct.unpack_from("<H", buf, 8)[0]
        if major != 1:  # O3
            fail("E_UNSUPPORTED_VERSION", f"major version {major}")
        if L < PREAMBLE_LEN:  # O3 (then the rest of the preamble)
            fail("E_TRUNCATED", "shorter than the preamble")
        pre = bytes(buf[0:PREAMBLE_LEN])
        minor = struct.unpack_from("<H", pre, 10)[0]
        if xxh64(pre[0:120]) != u64(pre, 120):  # O4
            fail("E_PREAMBLE_CHECKSUM")
        if any(pre[12:16]) or any(pre[80:120]):  # O5
            fail("E_RESERVED_NONZERO", "preamble")
        required, _optional = u64(pre, 16), u64(pre, 24)
        if required & ~KNOWN_REQUIRED_FEATURES:  # O6: in 1.1, any bit but bit 1
            fail("E_UNKNOWN_REQUIRED_FEATURE", hex(required))
        self.required_features = required
        if L < PREAMBLE_LEN + TRAILER_LEN or bytes(buf[L - 8:L]) != END_MAGIC \
                or u64(buf, L - 16) != L:  # O7
            fail("E_BAD_TRAILER")
        data_len, header_len, chunk_count, stream_count = struct.unpack_from("<4Q", pre, 32)
        header_checksum, table_checksum = struct.unpack_from("<2Q", pre, 64)
        if header_len > MAX_HEADER_LEN:  # O8
            fail("E_LIMIT_EXCEEDED", "header_len")
        if chunk_count > MAX_CHUNK_COUNT or stream_count > MAX_STREAMS_PER_CHUNK * chunk_count:  # O9
            fail("E_LIMIT_EXCEEDED", "chunk_count/stream_count")
        # O10: the layout of §2; every intermediate value must fit in 64 bits.
        data_end = 128 + data_len
        header_offset = align64(data_end)
        header_end = header_offset + header_len
        table_offset = align64(header_end)
        stream_table = table_offset + CHUNK_REC * chunk_count
        trailer_offset = stream_table + STREAM_REC * stream_count
        file_len = trailer_offset + TRAILER_LEN
        if max(data_end, header_offset, header_end, table_offset, stream_table,
               trailer_offset, file_len) > U64_MAX:
            fail("E_LIMIT_EXCEEDED", "layout overflows 64 bits")
        if file_len > L:  # O11
            fail("E_TRUNCATED", "declared structures past the end")
        if file_len < L:
            fail("E_UNACCOUNTED_BYTES", "bytes before the trailer")
        if any(buf[data_end:header_offset]) or any(buf[header_end:table_offset]):  # O12
            fail("E_UNACCOUNTED_BYTES", "nonzero padding")
        self.data_end = data_end
        self.minor = minor
        # -- header ------------------------------------------------------------
        header_bytes = buf[header_offset:header_end]
        if xxh64(header_bytes) != header_checksum:  # O13
            fail("E_HEADER_CHECKSUM")
        doc = parse_header_json(header_bytes)  # O14, O15
        hdr = check_structure(doc)  # O16
        self.kind, self.files, self.index_json = hdr["kind"], hdr["files"], hdr["index_json"]
        self._check_header_rules(hdr, chunk_count)  # O17
        # -- chunk map ---------------------------------------------------------
        if xxh64(memoryview(buf)[table_offset:trailer_offset]) != table_checksum:  # O18
            fail("E_TABLE_CHECKSUM")
        raw_chunks = np.frombuffer(buf, dtype=np.uint8, count=CHUNK_REC * chunk_count,
                                   offset=table_offset).reshape(chunk_count, CHUNK_REC)
        raw_streams = np.frombuffer(buf, dtype=np.uint8, count=STREAM_REC * stream_count,
                                    offset=stream_table).reshape(stream_count, STREAM_REC)
        self.chunks = raw_chunks.view(CHUNK_DT).reshape(chunk_count)
        self.streams = raw_streams.view(STREAM_DT).reshape(stream_count)
        self.chunk_digests = raw_chunks[:, 40:56]
        self._check_records(raw_chunks, raw_streams)  # O19, O20
        self._walk_chunks(chunk_count, stream_count)  # O21
        self.file_tensors = [[] for _ in self.files]
        for t in self.tensors:
            self.file_tensors[t.file].append(t)
        for fobj, entries in zip(self.files, self.file_tensors):  # O22
            self._check_embedded_header(fobj, entries)
        if self.kind == "sharded":  # O23
            self._check_index()

    # O23 -------------------------------------------------------------------
    def _check_index(self):
        """The index written beside the shards maps exactly the delta's tensors,
        each to the name of the file that holds it."""
        doc = parse_header_json(self.index_json.encode("utf-8"))
        wm = doc.get("weight_map") if type(doc) is dict else None
        if type(wm) is not dict or any(type(v) is not str for v in wm.values()):
            fail("E_HEADER_INVALID", "index_json has no weight_map of strings")
        if len(wm) != len(self.tensors):
            fail("E_HEADER_INVALID", "index_json maps another number of tensors")
        for t in self.tensors:
            if wm.get(t.name) != self.files[t.file]["name"]:
                fail("E_HEADER_INVALID", f"index_json does not map {t.name!r} to its file")

    # §8.3 positions of a sparse chunk, D4 ----------------------------------
    def positions(self, pc, streams, m, n, t, k):
        if pc == POS_GAPS:
            return gap_positions(streams, m, n)
        if pc == POS_BITMAP:
            return bitmap_positions(streams[0], m, n)
        if self.reference is None:
            fail("E_REFERENCE_REQUIRED", f"{t.name} chunk {k}")
        ref = self.reference.reference_set(t.name, t.cw, k, n)
        return split_positions(streams[0], streams[1:], m, n, ref)

    def reference_set(self, name, cw, k, n):
        """§8.3: R for chunk k of `name` (chunk_words cw, n words), from this file."""
        t = self.by_name.get(name)
        if t is None or t.cw != cw or k >= t.chunk_count:
            return np.empty(0, dtype=np.intp)
        g = t.first_chunk + k
        R = self.chunks[g]
        n_f = min(t.cw, t.words - k * t.cw)
        enc = int(R["encoding"])
        if enc == ENC_UNCHANGED:
            pos = np.empty(0, dtype=np.intp)
        elif enc in (ENC_DENSE, ENC_RAW):
            pos = np.arange(n_f, dtype=np.intp)
        else:
            start, stored_len = int(R["data_offset"]), int(R["stored_len"])
            stored = memoryview(self.buf)[start:start + stored_len]
            if xxh64(stored) != int(R["checksum"]):  # D1 of the reference chunk
                fail("E_CHUNK_CHECKSUM", f"reference chunk {g}")
            pc, g_w = int(R["position_coding"]), int(R["gap_width"])
            layout, order = int(R["value_layout"]), int(R["value_order"])
            n_pos = n_position_streams(pc, g_w)
            fs, o, out, pending = int(R["first_stream"]), 0, [], {}
            for q in range(n_pos):  # D3, position streams only
                S = self.streams[fs + q]
                sl, dl, codec = int(S["stored_len"]), int(S["decoded_len"]), int(S["codec"])
                raw = stored[o:o + sl]
                o += sl
                if codec == CODEC_STORED:
                    out.append(raw)
                elif codec == CODEC_CONSTANT:
                    out.append(constant_decode(raw, dl))
                elif codec == CODEC_ZSTD:
                    out.append(zstd_decode(raw, dl))
                else:  # codecs 2 and 4
                    h = rans_header(raw, dl, rans_allowed_contexts(q, enc, layout, order, pc, g_w, t.wb),
                                    packed=codec == CODEC_RANS_PACKED)
                    out.append(rans_decode_payload(h, raw, None) if h.context == CTX_NONE else None)
                    if h.context != CTX_NONE:
                        pending[q] = (h, raw)
            for q in reversed(range(n_pos)):
                if q in pending:
                    h, raw = pending[q]
                    out[q] = rans_decode_payload(h, raw, np.frombuffer(out[q + 1], dtype=np.uint8))
            pos = self.positions(pc, out, int(R["changed_count"]), n_f, t, k)
        return pos[pos < n]

    # O17 -------------------------------------------------------------------
    def _check_header_rules(self, hdr, preamble_chunk_count):
        files = hdr["files"]
        if len(files) == 0 or len(files) > MAX_FILES:  # H1
            fail("E_HEADER_INVALID", "number of files")
        if hdr["kind"] == "file":  # H2
            if len(files) != 1 or hdr["index_json"] is not None:
                fail("E_HEADER_INVALID", "kind file")
        elif hdr["index_json"] is None:
            fail("E_HEADER_INVALID", "sharded without index_json")
        seen = set()
        for f in files:  # H3
            if not valid_file_name(f["name"]) or f["name"] in seen:
                fail("E_HEADER_INVALID", f"file name {f['name']!r}")
            seen.add(f["name"])
        if len(hdr["tensors"]) > MAX_TENSORS:  # H4
            fail("E_LIMIT_EXCEEDED", "too many tensors")
        nxt, prev_file, names = 0, 0, set()
        self.tensors = []
        for i, e in enumerate(hdr["tensors"]):  # H5
            if len(e["shape"]) > MAX_RANK:  # a
                fail("E_LIMIT_EXCEEDED", "rank")
            if e["dtype"] not in DTYPES:  # b
                fail("E_UNKNOWN_DTYPE", e["dtype"])
            bits, wb = DTYPES[e["dtype"]]
            nbytes = byte_len(e["dtype"], e["shape"])
            if nbytes is None:  # c
                fail("E_HEADER_INVALID", "byte length undefined")
            if nbytes % wb:  # d
                fail("E_HEADER_INVALID", "byte length not whole words")
            if e["file"] >= len(files) or e["file"] < prev_file:  # e
                fail("E_HEADER_INVALID", "file index")
            prev_file = e["file"]
            cw = e["chunk_words"]
            if cw == 0 or cw > MAX_CHUNK_WORDS:  # f
                fail("E_LIMIT_EXCEEDED", "chunk_words")
            words = nbytes // wb
            if e["chunk_count"] != ceil_div(words, cw) or e["first_chunk"] != nxt:  # g
                fail("E_CHUNK_MAP_INVALID", "chunk_count/first_chunk")
            nxt += e["chunk_count"]
            if not HEX32.match(e["digest"]):  # h
                fail("E_HEADER_INVALID", "digest")
            base = e["base"]
            if base is not None:  # i
                if len(base["shape"]) > MAX_RANK:
                    fail("E_LIMIT_EXCEEDED", "base rank")
                if byte_len(e["dtype"], base["shape"]) is None:
                    fail("E_HEADER_INVALID", "base byte length undefined")
                if not HEX32.match(base["digest"]):
                    fail("E_HEADER_INVALID", "base digest")
            if e["name"] in names:  # j
                fail("E_HEADER_INVALID", "tensor name repeated")
            names.add(e["name"])
            t = Tensor()
            t.index, t.name, t.dtype, t.shape = i, e["name"], e["dtype"], list(e["shape"])
            t.file, t.cw, t.first_chunk, t.chunk_count = e["file"], cw, e["first_chunk"], e["chunk_count"]
            t.digest, t.wb, t.nbytes, t.words = e["digest"], wb, nbytes, words
            t.base = None if base is None else (list(base["shape"]), base["digest"])
            self.tensors.append(t)
        if nxt != preamble_chunk_count:  # H6
            fail("E_CHUNK_MAP_INVALID", "chunk records not all claimed")
        pin = hdr["position_reference"]  # H7
        if pin is not None and not re.fullmatch(r"[0-9a-f]{64}", pin["sha256"]):
            fail("E_HEADER_INVALID", "position_reference.sha256")
        if (pin is not None) != bool(self.required_features & FEATURE_TEMPORAL_POSITIONS):
            fail("E_HEADER_INVALID", "position_reference without feature bit 2, or the bit without it")
        self.pin = pin
        self.reference = None
        self.by_name = {t.name: t for t in self.tensors}

    # O19, O20 ---------------------------------------------------------------
    def _check_records(self, raw_chunks, raw_streams):
        c = self.chunks
        # reserved: bytes [27, 32) (byte 26 is value_order, Table 6.1) and [56, 64)
        res = raw_chunks[:, 27:32].any(axis=1) | raw_chunks[:, 56:64].any(axis=1)
        codec = ((c["encoding"] >= N_ENCODINGS) | (c["value_op"] >= N_VALUE_OPS)
                 | (c["value_layout"] >= N_LAYOUTS) | (c["position_coding"] >= N_POSITION_CODINGS)
                 | (c["value_order"] >= N_VALUE_ORDERS))
        i = first_true(res | codec)
        if i is not None:
            fail("E_RESERVED_NONZERO" if res[i] else "E_UNKNOWN_CODEC", f"chunk record {i}")
        s = self.streams
        res = raw_streams[:, 9:16].any(axis=1)
        # an undefined codec id, or codec 2 (3, 4) in a file without required feature
        # bit 1 (3, 4)
        codec = s["codec"] >= N_CODECS
        if not self.required_features & FEATURE_RANS_LANES:
            codec |= s["codec"] == CODEC_RANS
        if not self.required_features & FEATURE_CONSTANT_STREAMS:
            codec |= s["codec"] == CODEC_CONSTANT
        if not self.required_features & FEATURE_PACKED_RANS:
            codec |= s["codec"] == CODEC_RANS_PACKED
        i = first_true(res | codec)
        if i is not None:
            fail("E_RESERVED_NONZERO" if res[i] else "E_UNKNOWN_CODEC", f"stream record {i}")

    # O21 -------------------------------------------------------------------
    def _walk_chunks(self, chunk_count, stream_count):
        c = self.chunks
        data_offset = c["data_offset"].tolist()
        stored_len = c["stored_len"].tolist()
        changed = c["changed_count"].tolist()
        first_stream = c["first_stream"].tolist()
        enc, op, lay = c["encoding"].tolist(), c["value_op"].tolist(), c["value_layout"].tolist()
        pc, gw, sc = c["position_coding"].tolist(), c["gap_width"].tolist(), c["stream_count"].tolist()
        vo = c["value_order"].tolist()
        s_stored = self.streams["stored_len"].tolist()
        s_decoded = self.streams["decoded_len"].tolist()
        s_codec = self.streams["codec"].tolist()
        offset, next_stream = PREAMBLE_LEN, 0
        for t in self.tensors:
            for k in range(t.chunk_count):
                g = t.first_chunk + k
                n = min(t.cw, t.words - k * t.cw)
                if data_offset[g] < offset:  # C1
                    fail("E_RANGE_OVERLAP", f"chunk {g}")
                if data_offset[g] > offset:
                    fail("E_UNACCOUNTED_BYTES", f"gap before chunk {g}")
                if first_stream[g] != next_stream:  # C2
                    fail("E_CHUNK_MAP_INVALID", f"chunk {g} first_stream")
                if next_stream + sc[g] > stream_count:  # C3
                    fail("E_CHUNK_MAP_INVALID", f"chunk {g} streams past the table")
                m, e = changed[g], enc[g]
                # C4: the fields fit the encoding
                if e == ENC_UNCHANGED:
                    if m or vo[g] or op[g] or lay[g] or pc[g] or gw[g] or stored_len[g]:
                        fail("E_CHUNK_MAP_INVALID", f"unchanged chunk {g}")
                elif e == ENC_SPARSE:
                    if m == 0 or m > n:
                        fail("E_CHUNK_MAP_INVALID", f"sparse chunk {g} changed_count")
                    if pc[g] == POS_SPLIT and not self.required_features & FEATURE_TEMPORAL_POSITIONS:
                        fail("E_CHUNK_MAP_INVALID", f"sparse chunk {g}: coding 3 without feature bit 2")
                    if not ((pc[g] in (POS_GAPS, POS_SPLIT) and gw[g] in (1, 2, 4))
                            or (pc[g] == POS_BITMAP and gw[g] == 0)):
                        fail("E_CHUNK_MAP_INVALID", f"sparse chunk {g} position coding")
                else:
                    if pc[g] != POS_NONE or gw[g] != 0:
                        fail("E_CHUNK_MAP_INVALID", f"chunk {g} has positions")
                    if m > n or (e == ENC_RAW and (m != n or op[g] != OP_XOR or vo[g] != 0)):
                        fail("E_CHUNK_MAP_INVALID", f"chunk {g} changed_count/value_op")
                want = stream_lengths(e, pc[g], gw[g], lay[g], m, n, t.wb)  # Table 8.4
                if sc[g] != len(want):
                    fail("E_CHUNK_MAP_INVALID", f"chunk {g} stream_count")
                total = 0
                # coding 3: its position streams' lengths are bounds; exact at D4
                bounded = 1 + gw[g] if e == ENC_SPARSE and pc[g] == POS_SPLIT else 0
                for q, dl in enumerate(want):
                    s = next_stream + q
                    if q < bounded:
                        fits = s_decoded[s] <= dl and (q < 2 or s_decoded[s] == s_decoded[next_stream + 1])
                    else:
                        fits = s_decoded[s] == dl
                    if (not fits or (s_codec[s] == CODEC_STORED and s_stored[s] != s_decoded[s])
                            or (s_codec[s] == CODEC_CONSTANT and s_stored[s] != 1)):
                        fail("E_STREAM_LENGTH", f"stream {s}")
                    total += s_stored[s]
                if total != stored_len[g]:
                    fail("E_CHUNK_MAP_INVALID", f"chunk {g} stored_len")
                offset += stored_len[g]  # C5
                next_stream += sc[g]
            # T1: the tensor digest is the tree over the chunk records' digests
            leaves = self.chunk_digests[t.first_chunk:t.first_chunk + t.chunk_count]
            if xxh128(np.ascontiguousarray(leaves).tobytes()).hex() != t.digest:
                fail("E_TENSOR_DIGEST", t.name)
        if offset != self.data_end:  # E1
            fail("E_UNACCOUNTED_BYTES", "chunks do not end at the end of the data section")
        if next_stream != stream_count:  # E2
            fail("E_CHUNK_MAP_INVALID", "stream records left over")

    # O22 -------------------------------------------------------------------
    @staticmethod
    def _check_embedded_header(fobj, entries):
        text = fobj["safetensors_header"]
        doc = parse_header_json(text.encode("utf-8"))  # S1
        if type(doc) is not dict:
            fail("E_HEADER_INVALID", "embedded header is not an object")
        members = {}
        for k, v in doc.items():  # S2
            if k == "__metadata__":
                if v is not None and not (type(v) is dict and all(type(x) is str for x in v.values())):
                    fail("E_HEADER_INVALID", "__metadata__")
                continue
            if not (type(v) is dict and type(v.get("dtype")) is str and v["dtype"] in DTYPES
                    and _is_st_int_list(v.get("shape"))
                    and _is_st_int_list(v.get("data_offsets")) and len(v["data_offsets"]) == 2):
                fail("E_HEADER_INVALID", f"embedded tensor {k!r}")
            members[k] = v
        if len(members) != len(entries):  # S3
            fail("E_HEADER_INVALID", "embedded header has another number of tensors")
        o = 0
        for t in entries:  # S4
            v = members.get(t.name)
            if (v is None or v["dtype"] != t.dtype or v["shape"] != t.shape
                    or v["data_offsets"] != [o, o + t.nbytes]):
                fail("E_HEADER_INVALID", f"embedded header disagrees on {t.name!r}")
            o += t.nbytes


def _is_st_int_list(v):
    # safetensors header integers: non-negative JSON integers of any size (S2)
    return type(v) is list and all(type(x) is int for x in v)


def stream_lengths(enc, pc, gw, layout, m, n, wb):
    """§8.5 Table 8.4: the decoded_len of each stream, in stream order."""
    if enc == ENC_UNCHANGED:
        return []
    c = m if enc == ENC_SPARSE else n
    values = [c * wb] if layout == LAYOUT_WORDS else [c] * wb
    if enc == ENC_SPARSE:
        if pc == POS_SPLIT:  # upper bounds (§8.5 Table 8.4)
            pos = [ceil_div(n, 8)] + [m] * gw
        else:
            pos = [m] * gw if pc == POS_GAPS else [ceil_div(n, 8)]
        return pos + values
    return values


# ---------------------------------------------------------------------------
# §8.5 the zstd profile
# ---------------------------------------------------------------------------


def zstd_decode(data, decoded_len):
    """Checks one zstd stream in the order of §8.5 and returns its decoded bytes."""
    L = len(data)
    # 1. frame header (RFC 8878 §3.1.1.1)
    if L < 5 or bytes(data[0:4]) != b"\x28\xb5\x2f\xfd":
        fail("E_ZSTD_PROFILE", "not a zstd frame")
    fhd = data[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    unused, reserved = (fhd >> 4) & 1, (fhd >> 3) & 1
    has_checksum, did_flag = (fhd >> 2) & 1, fhd & 3
    if unused or reserved:
        fail("E_ZSTD_PROFILE", "unused or reserved bit of the frame header descriptor")
    did_size = (0, 1, 2, 4)[did_flag]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    hdr_len = 5 + (0 if single else 1) + did_size + fcs_size
    if L < hdr_len:
        fail("E_ZSTD_PROFILE", "frame header truncated")
    pos = 5
    window = None
    if not single:
        wd = data[pos]
        pos += 1
        wlog = 10 + (wd >> 3)
        window = (1 << wlog) + ((1 << wlog) // 8) * (wd & 7)
    did = int.from_bytes(bytes(data[pos:pos + did_size]), "little")
    pos += did_size
    if fcs_size == 0:
        fail("E_ZSTD_PROFILE", "no Frame_Content_Size")
    fcs = int.from_bytes(bytes(data[pos:pos + fcs_size]), "little") + (256 if fcs_size == 2 else 0)
    pos += fcs_size
    # A Single_Segment frame's window is its content size, which step 2 bounds.
    if window is not None and window > MAX_ZSTD_WINDOW:
        fail("E_ZSTD_PROFILE", "window above 2^27")
    if did_flag != 0:
        fail("E_ZSTD_PROFILE", "a Dictionary_ID field")
    # 2. the content size
    if fcs != decoded_len:
        fail("E_STREAM_LENGTH", "Frame_Content_Size differs from decoded_len")
    # 3. walk the blocks: the frame must end exactly at the end of the stream
    while True:
        if L - pos < 3:
            fail("E_ZSTD_PROFILE", "block header truncated")
        bh = data[pos] | (data[pos + 1] << 8) | (data[pos + 2] << 16)
        pos += 3
        btype, bsize = (bh >> 1) & 3, bh >> 3
        if btype == 3:
            fail("E_ZSTD_PROFILE", "reserved block type")
        pos += 1 if btype == 1 else bsize
        if pos > L:
            fail("E_ZSTD_PROFILE", "block past the end of the stream")
        if bh & 1:
            break
    if has_checksum:
        pos += 4
        if pos > L:
            fail("E_ZSTD_PROFILE", "content checksum past the end of the stream")
    if pos != L:
        fail("E_ZSTD_PROFILE", "bytes after the frame")
    # 4. decode (the window was checked above; the library limit is a second guard)
    try:
        dobj = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).decompressobj()
        out = dobj.decompress(bytes(data))
    except zstandard.ZstdError as e:
        fail("E_ZSTD_DECODE", str(e))
    if not dobj.eof or dobj.unused_data:
        # cannot happen after step 3; a library that disagrees fails to decode
        fail("E_ZSTD_DECODE", "decoder did not end at the end of the frame")
    # 4. blocks that decode to another length than Frame_Content_Size (equal to
    # decoded_len since step 2) are a corrupt frame
    if len(out) != decoded_len:
        fail("E_ZSTD_DECODE", "blocks decode to another length than the content size")
    return out


# ---------------------------------------------------------------------------
# §8.2 value ops, §8.4 layouts (vectorised)
# ---------------------------------------------------------------------------


def join_planes(planes, c, width):
    """Byte planes (least significant first) -> c unsigned LE integers of `width` bytes."""
    buf = np.zeros((c, width), dtype=np.uint8)
    for k, p in enumerate(planes):
        buf[:, k] = np.frombuffer(p, dtype=np.uint8, count=c)
    return buf.view(WORD_DTYPE[width]).reshape(c)


def rotr1(u, w):
    t = u.dtype.type
    return (u >> t(1)) | ((u & t(1)) << t(w - 1))


def rotl1(v, w):
    t = v.dtype.type
    return (v << t(1)) | (v >> t(w - 1))


def zigzag(d, w):
    """w-bit pattern d (as unsigned) -> zigzag(d) (the writer's side, for tests)."""
    t = d.dtype.type
    sign = (d >> t(w - 1)) * t((1 << w) - 1)  # arithmetic shift of the sign bit
    return (d << t(1)) ^ sign


def unzigzag(v):
    t = v.dtype.type
    ones = t(np.iinfo(v.dtype).max)
    return (v >> t(1)) ^ ((v & t(1)) * ones)


def read_values(streams, layout, c, wb):
    """§8.4 Table 8.3: the c values of a chunk from its value streams."""
    if layout == LAYOUT_WORDS:
        return np.frombuffer(streams[0], dtype=WORD_DTYPE[wb], count=c)
    u = join_planes(streams, c, wb)
    return rotr1(u, 8 * wb) if layout == LAYOUT_ROTATED else u


def base_key(b, w):
    """§8.6: the most significant byte of rotl(b, 1)."""
    t = b.dtype.type
    return ((rotl1(b, w) >> t(w - 8)) & t(0xFF)).astype(np.uint8)


def to_positional(values, base_words, w):
    """§8.6 grouped order -> positional order.  base_words[i] is the base word of the
    i-th position.  The stored list is the positional list stably sorted by key, so
    list index l holds the value of position order[l]."""
    order = np.argsort(base_key(base_words, w), kind="stable")
    out = np.empty_like(values)
    out[order] = values
    return out


def combine(b, v, op):
    """§8.2 Table 8.2: combine(b, v), modulo 2^w (numpy unsigned arithmetic wraps)."""
    return b ^ v if op == OP_XOR else b + unzigzag(v)


# §8.3 positions ----------------------------------------------------------------


def gap_positions(planes, m, n):
    gaps = join_planes(planes, m, 4)
    zero = first_true(gaps[1:] == 0)
    pos = np.cumsum(gaps, dtype=np.uint64)  # < 2^24 * 2^32: no overflow
    oob = first_true(pos >= n)
    i_zero = None if zero is None else zero + 1
    if i_zero is not None and (oob is None or i_zero <= oob):  # check 1 before 2 at each i
        fail("E_POSITIONS_NOT_INCREASING", f"gap {i_zero} is zero")
    if oob is not None:
        fail("E_POSITIONS_OUT_OF_BOUNDS", f"position {oob}")
    return pos.astype(np.intp)


def n_position_streams(pc, gw):
    """§8.5 Table 8.4: the number of position streams."""
    return gw if pc == POS_GAPS else 1 if pc == POS_BITMAP else 1 + gw if pc == POS_SPLIT else 0


def split_positions(bitmap, planes, m, n, ref):
    """§8.3 coding 3: the checks of D4 in their order; ref is the reference set R."""
    r = len(ref)
    if len(bitmap) != ceil_div(r, 8):  # 1
        fail("E_STREAM_LENGTH", "reference bitmap length")
    bm = np.frombuffer(bitmap, dtype=np.uint8)
    if r % 8 and int(bm[-1]) >> (r % 8):  # 2
        fail("E_POSITIONS_OUT_OF_BOUNDS", "reference bitmap padding bit set")
    marked = ref[np.unpackbits(bm, bitorder="little", count=r).astype(bool)]
    if marked.size > m:  # 3
        fail("E_CHANGED_COUNT", "the reference bitmap marks more than changed_count")
    rest = m - marked.size
    if any(len(p) != rest for p in planes):  # 4
        fail("E_STREAM_LENGTH", "gap plane length")
    ranks = gap_positions(planes, rest, n - r)  # 5: ranks in the complement
    complement = np.setdiff1d(np.arange(n, dtype=np.intp), ref)
    return np.union1d(marked, complement[ranks]).astype(np.intp)


def bitmap_positions(bitmap, m, n):
    bm = np.frombuffer(bitmap, dtype=np.uint8)
    if n % 8 and int(bm[-1]) >> (n % 8):
        fail("E_POSITIONS_OUT_OF_BOUNDS", "bitmap padding bit set")
    bits = np.unpackbits(bm, bitorder="little", count=n)
    pos = np.flatnonzero(bits)
    if pos.size != m:
        fail("E_CHANGED_COUNT", "bitmap bits differ from changed_count")
    return pos


# ---------------------------------------------------------------------------
# §8.8 the constant codec
def constant_decode(raw, decoded_len):
    """§8.8: `decoded_len` copies of the one stored byte (C4 checked the length)."""
    return bytes(raw) * decoded_len


# §8.7 the lane rANS codec
# ---------------------------------------------------------------------------

RANS_L = 1 << 16  # L: the least state, and every lane's final state
RANS_LANES = 32
RANS_MAX_PROB_BITS = 11
RANS_MIN_TILE_LOG2, RANS_MAX_TILE_LOG2 = 8, 24
RANS_MAX_TABLES = 8
CTX_NONE, CTX_BASE_KEY, CTX_HIGHER_PLANE = 0, 1, 2
RANS_ALL_CONTEXTS = frozenset((CTX_NONE, CTX_BASE_KEY, CTX_HIGHER_PLANE))


class RansHeader:
    """A lane rANS stream's fields of Table 8.6 and its tables (Table 8.7, or Table 8.8
    for codec 4), all checked.  tables[t] is (symbols, frequencies), both in increasing
    symbol order."""
    __slots__ = ("decoded_len", "prob_bits", "context", "table_count", "tile_log2",
                 "context_map", "tables", "tile_lengths", "payload_offset")


def rans_need(data, pos, nbytes, field):
    """§8.7, §8.9: fewer bytes than a field needs is E_RANS_HEADER."""
    if len(data) - pos < nbytes:
        fail("E_RANS_HEADER", f"fewer bytes than {field} needs")


def rans_symbol_set(data, pos, s, t, packed):
    """The symbol set of table t with s symbols at data[pos:] (Tables 8.7 and 8.8):
    a strictly increasing list for s < 32, else a 32-byte bitmap with exactly s bits
    set, except that a packed table of 256 symbols has none.  Returns (symbols, the
    offset after the set)."""
    if s < 32:
        rans_need(data, pos, s, f"table {t}'s symbol list")
        symbols = np.frombuffer(data, dtype=np.uint8, count=s, offset=pos)
        if s > 1 and not (np.diff(symbols.astype(np.int16)) > 0).all():
            fail("E_RANS_HEADER", f"table {t}: symbols not strictly increasing")
        return symbols, pos + s
    if s == 256 and packed:  # every byte
        return np.arange(256, dtype=np.uint8), pos
    rans_need(data, pos, 32, f"table {t}'s symbol bitmap")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=32, offset=pos), bitorder="little")
    symbols = np.flatnonzero(bits).astype(np.uint8)
    if symbols.size != s:
        fail("E_RANS_HEADER", f"table {t}: bitmap has {symbols.size} bits set, not {s}")
    return symbols, pos + 32


def rans_table(data, pos, k, t):
    """§8.7 Table 8.7 at data[pos:]: table t of a codec-2 stream with prob_bits k.
    Returns (symbols, frequencies, the offset after the table)."""
    rans_need(data, pos, 1, f"table {t}'s symbol count")
    s = data[pos] + 1
    symbols, pos = rans_symbol_set(data, pos + 1, s, t, packed=False)
    freqs = np.empty(s, dtype=np.int64)
    for x in range(s):  # one frequency per symbol: f < 128 in one byte, else two
        rans_need(data, pos, 1, f"table {t}'s frequencies")
        b0 = data[pos]
        if b0 < 0x80:
            f = b0
            pos += 1
            if f == 0:
                fail("E_RANS_HEADER", f"table {t}: a frequency of 0")
        else:
            rans_need(data, pos, 2, f"table {t}'s two-byte frequency")
            f = ((b0 & 0x7F) << 8) | data[pos + 1]
            pos += 2
            if f < 128:
                fail("E_RANS_HEADER", f"table {t}: two-byte frequency {f} below 128")
        freqs[x] = f
    if int(freqs.sum()) != 1 << k:
        fail("E_RANS_HEADER", f"table {t}: frequencies do not sum to 2^{k}")
    return symbols, freqs, pos


# §8.9 packed lane rANS: codec 2 with a packed context map and packed tables; every
# other step is §8.7's.
RANS_MAX_ORDER = 11  # the Exp-Golomb order g of a packed table
RANS_MAX_CODE_BITS = 12  # n_i + g: a code value is at most 2^12, so w_i < 2^13
# A code takes n + 1 prefix bits and n + g suffix bits, at most 25 once every n + g is
# checked, so a table's frequency codes fit 256 * 25 bits: no more is unpacked.
RANS_MAX_PACKED_CODES = ceil_div(256 * (2 * RANS_MAX_CODE_BITS + 1), 8)


def packed_context_map(data, pos, T):
    """§8.9 packed context map: 256 entries of w = ceil(log2 T) bits, least significant
    bit first, in the 32 * w bytes at data[pos:].  Returns the 256 entries, unchecked."""
    w = (T - 1).bit_length()
    rans_need(data, pos, 32 * w, "the packed context map")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=32 * w, offset=pos), bitorder="little")
    return (bits.reshape(256, w).astype(np.int64) << np.arange(w, dtype=np.int64)).sum(axis=1)


def packed_table(data, pos, k, t):
    """§8.9 Table 8.8 at data[pos:]: table t of a codec-4 stream with prob_bits k.
    Returns (symbols, frequencies, the offset after the table)."""
    rans_need(data, pos, 1, f"table {t}'s symbol count")
    s = data[pos] + 1
    symbols, pos = rans_symbol_set(data, pos + 1, s, t, packed=True)
    rans_need(data, pos, 1, f"table {t}'s order")
    g = data[pos]
    pos += 1
    if g > RANS_MAX_ORDER:
        fail("E_RANS_HEADER", f"table {t}: order {g} above {RANS_MAX_ORDER}")
    # The bit string: the s prefixes (n_i ones, then a zero), then the s suffixes of
    # n_i + g bits each, least significant bit first.
    window = min(len(data) - pos, RANS_MAX_PACKED_CODES)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=window, offset=pos), bitorder="little")
    ends = np.flatnonzero(bits == 0)[:s]  # the zero bit that ends each prefix
    n = np.diff(ends, prepend=-1) - 1
    unfinished = bits.size - (int(ends[-1]) + 1 if ends.size else 0)  # ones after the last zero
    long = first_true(n + g > RANS_MAX_CODE_BITS)
    if long is not None or (ends.size < s and unfinished + g > RANS_MAX_CODE_BITS):
        # a reader stops at n_i + g = 13: the code value would be out of range
        fail("E_RANS_HEADER", f"table {t}: prefix {ends.size if long is None else long} makes n + g "
                              f"above {RANS_MAX_CODE_BITS}")
    suffix_bits = n + g
    prefix_end = int(ends[-1]) + 1 if ends.size == s else bits.size + 1
    code_end = prefix_end + int(suffix_bits.sum())
    if code_end > bits.size:
        fail("E_RANS_HEADER", f"fewer bytes than table {t}'s frequency codes need")
    # suffix i: bits [start_i, start_i + n_i + g) as an integer, least significant first
    start = prefix_end + np.cumsum(suffix_bits) - suffix_bits
    place = np.arange(RANS_MAX_CODE_BITS)
    inside = place < suffix_bits[:, None]
    at = np.where(inside, start[:, None] + place, 0)
    x = (bits[at].astype(np.int64) * inside << place).sum(axis=1)
    v = (np.int64(1) << suffix_bits) + x - (1 << g)
    # v = zigzag(f_i - f_(i-1)) with f_(-1) = 0: even v adds v / 2, odd v takes (v + 1) / 2
    freqs = np.cumsum(np.where((v & 1) == 0, v >> 1, -((v + 1) >> 1)))
    bad = first_true((freqs < 1) | (freqs > 1 << k))
    if bad is not None:
        fail("E_RANS_HEADER", f"table {t}: frequency {int(freqs[bad])} of symbol {bad} outside [1, 2^{k}]")
    nbytes = ceil_div(code_end, 8)
    if bits[code_end:8 * nbytes].any():
        fail("E_RANS_HEADER", f"table {t}: nonzero padding")
    if int(freqs.sum()) != 1 << k:
        fail("E_RANS_HEADER", f"table {t}: frequencies do not sum to 2^{k}")
    return symbols, freqs, pos + nbytes


def rans_header(data, decoded_len, allowed=RANS_ALL_CONTEXTS, packed=False):
    """§8.7 header checks, in layout order, each failure E_RANS_HEADER.  `allowed` is
    the set of contexts that the stream's place allows (rans_allowed_contexts).
    packed: a codec-4 stream, whose context map and tables are packed (§8.9)."""
    size = len(data)
    pos = 0

    def need(nbytes, field):
        rans_need(data, pos, nbytes, field)

    h = RansHeader()
    h.decoded_len = N = decoded_len
    need(4, "the fixed fields")
    k, context, T, tile_log2 = data[0], data[1], data[2], data[3]
    if not 1 <= k <= RANS_MAX_PROB_BITS:  # prob_bits: 1 to 11
        fail("E_RANS_HEADER", f"prob_bits {k}")
    if context not in RANS_ALL_CONTEXTS:  # context: 0, 1 or 2 ...
        fail("E_RANS_HEADER", f"context {context} undefined")
    if context not in allowed:  # ... and allowed in the stream's place
        fail("E_RANS_HEADER", f"context {context} not allowed in this stream")
    if (T != 1) if context == CTX_NONE else not 2 <= T <= RANS_MAX_TABLES:  # table_count
        fail("E_RANS_HEADER", f"table_count {T} with context {context}")
    if not RANS_MIN_TILE_LOG2 <= tile_log2 <= RANS_MAX_TILE_LOG2:  # tile_log2: 8 to 24
        fail("E_RANS_HEADER", f"tile_log2 {tile_log2}")
    pos = 4
    if T > 1 and packed:  # §8.9: 256 entries of ceil(log2 T) bits, each < T
        cmap = packed_context_map(data, pos, T)
        if int(cmap.max()) >= T:
            fail("E_RANS_HEADER", "a packed context map entry >= table_count")
        cmap = cmap.astype(np.uint8)
        pos += 32 * (T - 1).bit_length()
    elif T > 1:  # context_map: 256 bytes, each < T
        need(256, "the context map")
        cmap = np.frombuffer(data, dtype=np.uint8, count=256, offset=pos)
        if int(cmap.max()) >= T:
            fail("E_RANS_HEADER", "a context map entry >= table_count")
        pos += 256
    else:  # T = 1: every context byte selects table 0
        cmap = np.zeros(256, dtype=np.uint8)
    tables = []
    read_table = packed_table if packed else rans_table
    for t in range(T):  # Table 8.7 (8.8 if packed), table 0 first
        symbols, freqs, pos = read_table(data, pos, k, t)
        tables.append((symbols, freqs))
    # tile lengths: ceil(N / 2^tile_log2) u32, bounded by the stream's bytes before use
    tiles = ceil_div(N, 1 << tile_log2)
    need(4 * tiles, "the tile lengths")
    lengths = np.frombuffer(data, dtype="<u4", count=tiles, offset=pos).astype(np.int64)
    pos += 4 * tiles
    lanes = np.minimum(RANS_LANES, rans_tile_symbols(N, tile_log2))
    bad = first_true((lengths < 4 * lanes) | ((lengths - 4 * lanes) % 2 != 0))
    if bad is not None:  # at least 4 * lanes_t bytes, and a whole number of words
        fail("E_RANS_HEADER", f"tile {bad}: length {int(lengths[bad])} of the wrong form")
    if int(lengths.sum()) != size - pos:
        fail("E_RANS_HEADER", "tile lengths do not sum to the rest of the stream")
    h.prob_bits, h.context, h.table_count, h.tile_log2 = k, context, T, tile_log2
    h.context_map, h.tables, h.tile_lengths, h.payload_offset = cmap, tables, lengths, pos
    return h


def rans_tile_symbols(N, tile_log2):
    """n_t for every tile t: the symbols [t * 2^tile_log2, min((t + 1) * 2^tile_log2, N))."""
    S = 1 << tile_log2
    return np.minimum(S, N - S * np.arange(ceil_div(N, S), dtype=np.int64))


def rans_allowed_contexts(q, enc, layout, order, position_coding, gap_width, wb):
    """§8.7 Contexts: the contexts allowed in stream q of a chunk (streams in the order
    of §8.5: gap planes 0 to g - 1 or the bitmap, then the value streams)."""
    n_pos = n_position_streams(position_coding, gap_width)
    allowed = {CTX_NONE}  # none: every stream
    if q < n_pos:
        if position_coding == POS_GAPS and q + 1 < gap_width:
            allowed.add(CTX_HIGHER_PLANE)  # gap planes 0 to g - 2
        if position_coding == POS_SPLIT and 1 <= q and q + 1 < n_pos:
            allowed.add(CTX_HIGHER_PLANE)  # coding 3: gap planes 0 to g - 2, after the bitmap
    elif layout in (LAYOUT_PLANES, LAYOUT_ROTATED):
        if enc in (ENC_SPARSE, ENC_DENSE) and order == ORDER_POSITIONAL:
            allowed.add(CTX_BASE_KEY)  # value planes of positional sparse and dense chunks
        if q - n_pos + 1 < wb:
            allowed.add(CTX_HIGHER_PLANE)  # value planes 0 to wb - 2
    return frozenset(allowed)


def _rans_slots(h):
    """Slot r of table t, at index t * 2^k + r: its symbol, freq(sym), r - cum(sym)."""
    size = 1 << h.prob_bits
    sym = np.empty(h.table_count * size, dtype=np.uint8)
    freq = np.empty(h.table_count * size, dtype=np.uint64)
    bias = np.empty(h.table_count * size, dtype=np.uint64)
    for t, (symbols, freqs) in enumerate(h.tables):
        cum = np.cumsum(freqs) - freqs
        at = slice(t * size, (t + 1) * size)
        sym[at] = np.repeat(symbols, freqs)
        freq[at] = np.repeat(freqs, freqs)
        bias[at] = np.arange(size) - np.repeat(cum, freqs)
    return sym, freq, bias


def rans_decode_payload(h, data, ctx):
    """§8.7 Decoding of the tiles of a stream whose header h has been checked.  ctx: the
    N context bytes (None for context 0).  Returns the N decoded bytes; a fault is
    E_RANS_DECODE.

    All tiles step together: lane l of tile t is row t, column l of (tiles, 32) arrays.
    At step `step` it decodes symbol t * 2^tile_log2 + 32 * step + l.  Every tile but
    the last holds 2^tile_log2 symbols, a multiple of 32, so only the last tile can
    end early or have a partial step, and a lane decodes at a step iff its symbol
    index is below N.  A lane whose state drops below L takes the next word of its
    tile; the words of a step go to the lanes in increasing lane order, so a lane's
    word is its tile's cursor plus its rank (a cumulative sum along the row) minus 1.
    States are kept in uint64: freq * (x >> k) < 2^42 and x << 16 < 2^48."""
    N, k = h.decoded_len, h.prob_bits
    tiles = h.tile_lengths.size
    if tiles == 0:
        return np.zeros(0, dtype=np.uint8)
    n_t = rans_tile_symbols(N, h.tile_log2)
    lanes_t = np.minimum(RANS_LANES, n_t)
    # Every tile payload has an even length, so its words are u16 at even offsets from
    # the first payload byte: one u16 array holds the payloads of all tiles.
    words = np.frombuffer(bytes(data[h.payload_offset:]), dtype="<u2")
    start = (np.cumsum(h.tile_lengths) - h.tile_lengths) // 2  # tile payloads, in words
    first_word = start + 2 * lanes_t  # after the lanes_t u32 initial states
    tile_words = h.tile_lengths // 2 - 2 * lanes_t
    word_count = tile_words
    lane = np.arange(RANS_LANES)
    exists = lane[None, :] < lanes_t[:, None]  # only the last tile can have fewer lanes
    at = start[:, None] + 2 * np.where(exists, lane[None, :], 0)
    x = words[at].astype(np.uint64) | (words[at + 1].astype(np.uint64) << np.uint64(16))
    x[~exists] = RANS_L  # lanes that do not exist: never decode, and end at L
    low = first_true((x < RANS_L).any(axis=1))
    if low is not None:
        fail("E_RANS_DECODE", f"tile {low}: an initial state below 2^16")
    # the table of each symbol, as an offset t * 2^k < 2^14 into the slots; entry N is
    # for lanes without a symbol at the last tile's partial step
    if h.table_count > 1:
        ctx = np.asarray(ctx, dtype=np.uint8)
        if ctx.shape != (N,):
            raise ValueError(f"{N} context bytes needed, got {ctx.shape}")
        table_of = np.zeros(N + 1, dtype=np.uint16)
        table_of[:N] = h.context_map.astype(np.uint16)[ctx] << np.uint16(k)
    else:
        table_of = None
    sym_of, freq_of, bias_of = _rans_slots(h)
    out = np.empty(N + 1, dtype=np.uint8)  # out[N] takes what lanes without a symbol decode
    mask, shift, L = np.uint64((1 << k) - 1), np.uint64(k), np.uint64(RANS_L)
    i = (np.arange(tiles, dtype=np.int64) << h.tile_log2)[:, None] + lane[None, :]
    cursor = np.zeros(tiles, dtype=np.int64)  # words read: r = 4 * lanes_t + 2 * cursor
    ended_x = ended_cursor = None  # the last tile's row, when it ends before the others
    last_steps = ceil_div(int(n_t[-1]), RANS_LANES)  # the steps of the last tile
    partial = int(n_t[-1]) % RANS_LANES != 0  # its last step has lanes without a symbol
    for step in range(ceil_div(int(n_t[0]), RANS_LANES)):
        if step == last_steps:  # the last tile has ended; the full tiles go on
            ended_x, ended_cursor = x[-1:], cursor[-1:]
            x, cursor, i = x[:-1], cursor[:-1], i[:-1]
            first_word, word_count = first_word[:-1], word_count[:-1]
        active = (i < N) if partial and step == last_steps - 1 else None
        idx = i if active is None else np.minimum(i, N)
        x_before = x
        slot = x & mask
        e = slot if table_of is None else table_of[idx] + slot
        out[idx] = sym_of[e]
        x = freq_of[e] * (x >> shift) + bias_of[e]  # freq(sym) * (x >> k) + r_slot - cum(sym)
        takes = x < L
        if active is not None:
            takes &= active
        rank = np.cumsum(takes, axis=1)
        taken = rank[:, -1]
        over = first_true(cursor + taken > word_count)
        if over is not None:  # a word at or past len_t: a truncated tile
            fail("E_RANS_DECODE", f"tile {over}: runs out of words")
        w = words[(first_word + cursor)[:, None] + rank - 1]
        x = np.where(takes, (x << np.uint64(16)) | w, x)
        if active is not None:  # a lane without a symbol keeps its state
            x = np.where(active, x, x_before)
        cursor = cursor + taken
        i = i + RANS_LANES
    if ended_x is not None:
        x, cursor = np.vstack([x, ended_x]), np.concatenate([cursor, ended_cursor])
    # at the end: r = len_t (every word read) and x = L in every lane
    left = first_true(cursor != tile_words)
    if left is not None:
        fail("E_RANS_DECODE", f"tile {left}: words left over")
    bad = first_true((x != L).any(axis=1))
    if bad is not None:
        fail("E_RANS_DECODE", f"tile {bad}: a final state other than 2^16")
    return out[:N]


def rans_decode(data, decoded_len, ctx=None, allowed=RANS_ALL_CONTEXTS, packed=False):
    """§8.7: checks and decodes one codec-2 stream (codec 4, §8.9, when packed) of
    decoded_len bytes.  ctx: the context byte of each symbol (an array of decoded_len
    bytes), needed when the stream's context is 1 or 2; `allowed`: the contexts its
    place allows."""
    h = rans_header(data, decoded_len, allowed, packed)
    if h.context != CTX_NONE and ctx is None:
        raise ValueError(f"context {h.context} needs the context bytes")
    return rans_decode_payload(h, data, ctx)


# ---------------------------------------------------------------------------
# §11.2 base resolution
# ---------------------------------------------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"


class BaseTensor:
    __slots__ = ("dtype", "shape", "buf", "start", "nbytes")


MAX_U64 = (1 << 64) - 1


def _is_base_int_list(v):
    # §11.2 B0: shape and offset numbers are JSON integers (no sign, fraction or
    # exponent; `-0` included) at most 2^64 - 1.
    return type(v) is list and all(type(x) is int and 0 <= x <= MAX_U64 for x in v)


def _require_regular_file(path):
    # An input that is not a regular file (a FIFO blocks on open) is refused unopened.
    try:
        st = os.stat(path)
    except OSError as e:
        fail("E_IO", f"{path}: {e}")
    if not stat.S_ISREG(st.st_mode):
        fail("E_IO", f"{path}: not a regular file")


def read_safetensors(path):
    """§11.2 B0, one file: returns {name: BaseTensor}.  Checks in the order of B0."""
    _require_regular_file(path)
    buf, size = map_file(path)
    if size < 8:
        fail("E_INVALID_CHECKPOINT", f"{path}: too short")
    n = u64(buf, 0)
    if n > size - 8:
        fail("E_INVALID_CHECKPOINT", f"{path}: header length past the end")
    try:
        doc = strict_json(buf[8:8 + n])
    except (_BadJson, _DupKey) as e:
        fail("E_INVALID_CHECKPOINT", f"{path}: header: {e}")
    if type(doc) is not dict:
        fail("E_INVALID_CHECKPOINT", f"{path}: header is not an object")
    # B0: an unknown dtype is reported before any other rule of the file.
    for name, v in doc.items():
        if (name != "__metadata__" and type(v) is dict and type(v.get("dtype")) is str
                and v["dtype"] not in DTYPES):
            fail("E_UNKNOWN_DTYPE", f"{path}: {v['dtype']}")
    data_start, data_len = 8 + n, size - 8 - n
    out, spans = {}, []
    for name, v in doc.items():
        if name == "__metadata__":
            if v is not None and not (type(v) is dict and all(type(x) is str for x in v.values())):
                fail("E_INVALID_CHECKPOINT", f"{path}: __metadata__")
            continue
        # Members beyond dtype, shape and data_offsets are ignored, as in §5.3 S2.
        if not (type(v) is dict and type(v.get("dtype")) is str and _is_base_int_list(v.get("shape"))
                and _is_base_int_list(v.get("data_offsets")) and len(v["data_offsets"]) == 2):
            fail("E_INVALID_CHECKPOINT", f"{path}: tensor {name!r}")
        begin, end = v["data_offsets"]
        nbytes = byte_len(v["dtype"], v["shape"])
        if nbytes is None or begin > end or end - begin != nbytes:
            fail("E_INVALID_CHECKPOINT", f"{path}: tensor {name!r} offsets")
        spans.append((begin, end))
        t = BaseTensor()
        t.dtype, t.shape, t.buf, t.start, t.nbytes = v["dtype"], v["shape"], buf, data_start + begin, nbytes
        out[name] = t
    # B0: the data offsets, sorted (data order, not header order), tile the data
    # region with no hole, overlap or trailing byte.
    at = 0
    for begin, end in sorted(spans):
        if begin != at:
            fail("E_INVALID_CHECKPOINT", f"{path}: a hole or an overlap at byte {at}")
        at = end
    if at != data_len:
        fail("E_INVALID_CHECKPOINT", f"{path}: bytes after the last tensor")
    return out


def read_base(path):
    """§11.2 B0: a safetensors file, or a directory with model.safetensors.index.json."""
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_NAME)
        if not os.path.exists(index):
            fail("E_INVALID_CHECKPOINT", f"{path}: no {INDEX_NAME}")
        _require_regular_file(index)
        try:
            with open(index, "rb") as f:
                doc = strict_json(f.read())
        except OSError as e:
            fail("E_IO", str(e))
        except (_BadJson, _DupKey) as e:
            fail("E_INVALID_CHECKPOINT", f"{index}: {e}")
        wm = doc.get("weight_map") if type(doc) is dict else None
        if type(wm) is not dict or not all(type(x) is str for x in wm.values()):
            fail("E_INVALID_CHECKPOINT", f"{index}: weight_map")
        # Byte-wise order of the UTF-8 names, which is code point order.
        shards = sorted(set(wm.values()))
        for s in shards:
            if s in ("", ".", "..") or "/" in s or "\\" in s or "\x00" in s:
                fail("E_INVALID_CHECKPOINT", f"shard name {s!r}")
            if s.endswith(PICKLE_SUFFIXES):
                fail("E_PICKLE_INPUT", s)
        for s in shards:
            if not os.path.exists(os.path.join(path, s)):
                fail("E_MISSING_SHARD", s)
        held = {s: read_safetensors(os.path.join(path, s)) for s in shards}
        tensors = {}
        for s in shards:
            for name, t in held[s].items():
                if name in tensors:
                    fail("E_INVALID_CHECKPOINT", f"tensor {name!r} in two shards")
                tensors[name] = t
        # The weight_map lists every tensor of every shard, with the shard holding it.
        for name, s in wm.items():
            if name not in held[s]:
                fail("E_INVALID_CHECKPOINT", f"{index}: {s} lacks {name!r}")
        if len(tensors) != len(wm):
            fail("E_INVALID_CHECKPOINT", f"{index}: the shards hold tensors it does not list")
        return tensors
    if path.endswith(PICKLE_SUFFIXES):
        fail("E_PICKLE_INPUT", path)
    return read_safetensors(path)


def tree_digest(buf, start, nbytes, slice_len):
    """§10.2: XXH3-128 over the XXH3-128 leaves of consecutive slices."""
    h = xxhash.xxh3_128()
    mv = memoryview(buf)
    for o in range(0, nbytes, slice_len):
        h.update(xxh128(mv[start + o:start + min(o + slice_len, nbytes)]))
    return h.hexdigest()


def attach_reference(delta, reference):
    """§11.2 R0: the reference delta must match the pin; a file without one ignores it."""
    if delta.pin is None:
        return
    if hashlib.sha256(reference.buf).hexdigest() != delta.pin["sha256"] \
            or len(reference.buf) != delta.pin["file_len"]:
        fail("E_REFERENCE_MISMATCH")
    delta.reference = reference


def open_chain(delta_path, reference_paths):
    """The delta and its reference deltas, nearest first (§11.4 `--reference`)."""
    delta = Delta(delta_path)
    chain = [delta] + [Delta(p) for p in reference_paths]
    for nearer, farther in zip(chain, chain[1:]):
        attach_reference(nearer, farther)
    return delta


def resolve_base(delta, base_path):
    """§11.2 B0-B3.  Returns tensor index -> BaseTensor for entries with `base`."""
    base = read_base(base_path) if base_path is not None else None  # B0
    needing = [t for t in delta.tensors if t.base is not None]
    if needing and base is None:  # B1
        fail("E_BASE_REQUIRED")
    found = {}
    for t in needing:  # B2
        b = base.get(t.name)
        if b is None:
            fail("E_BASE_MISSING_TENSOR", t.name)
        if b.dtype != t.dtype or b.shape != t.base[0]:
            fail("E_BASE_MISMATCH", t.name)
        found[t.index] = b
    for t in needing:  # B3
        b = found[t.index]
        if tree_digest(b.buf, b.start, b.nbytes, t.cw * t.wb) != t.base[1]:
            fail("E_BASE_DIGEST", t.name)
    return found


# ---------------------------------------------------------------------------
# §11.2 chunk decoding
# ---------------------------------------------------------------------------


def decode_tensor(delta, t, base):
    """Yields the rebuilt words of each chunk of tensor t, in chunk order (D1-D7)."""
    wdt = WORD_DTYPE[t.wb]
    if base is not None and base.nbytes:
        WB = base.nbytes // t.wb
        B = np.frombuffer(base.buf, dtype=wdt, count=WB, offset=base.start)
    else:
        WB, B = 0, None
    buf = delta.buf
    mv = memoryview(buf)
    for k in range(t.chunk_count):
        g = t.first_chunk + k
        R = delta.chunks[g]
        s_k = k * t.cw
        n = min(t.cw, t.words - s_k)
        start, stored_len = int(R["data_offset"]), int(R["stored_len"])
        enc, m = int(R["encoding"]), int(R["changed_count"])
        stored = mv[start:start + stored_len]
        if xxh64(stored) != int(R["checksum"]):  # D1
            fail("E_CHUNK_CHECKSUM", f"chunk {g}")
        # D2: start from the base words (zero past the base's end); raw starts at zero
        t_words = np.zeros(n, dtype=wdt)
        if enc != ENC_RAW and s_k < WB:
            avail = min(n, WB - s_k)
            t_words[:avail] = B[s_k:s_k + avail]
        if enc != ENC_UNCHANGED:
            layout, op, order = int(R["value_layout"]), int(R["value_op"]), int(R["value_order"])
            pc, g_w = int(R["position_coding"]), int(R["gap_width"])
            n_pos = n_position_streams(pc, g_w)
            # D3: every stream that needs no other: stored, constant and zstd streams,
            # and lane rANS streams of context 0; the header of every lane rANS stream
            # (§8.7, §8.9)
            fs, sc = int(R["first_stream"]), int(R["stream_count"])
            out, raws, pending, o = [None] * sc, [None] * sc, {}, start
            for q in range(sc):
                S = delta.streams[fs + q]
                sl, dl, codec = int(S["stored_len"]), int(S["decoded_len"]), int(S["codec"])
                raw = raws[q] = mv[o:o + sl]
                o += sl
                if codec == CODEC_STORED:
                    out[q] = raw
                elif codec == CODEC_CONSTANT:
                    out[q] = constant_decode(raw, dl)
                elif codec == CODEC_ZSTD:
                    out[q] = zstd_decode(raw, dl)
                else:  # codecs 2 and 4
                    allowed = rans_allowed_contexts(q, enc, layout, order, pc, g_w, t.wb)
                    h = rans_header(raw, dl, allowed, packed=codec == CODEC_RANS_PACKED)
                    if h.context == CTX_NONE:
                        out[q] = rans_decode_payload(h, raw, None)
                    else:
                        pending[q] = h

            def decode_pending(q, ctx):
                out[q] = rans_decode_payload(pending[q], raws[q], ctx)

            # D3: gap planes of context 2, each after the plane above it
            for q in reversed(range(n_pos)):
                if q in pending:
                    decode_pending(q, np.frombuffer(out[q + 1], dtype=np.uint8))
            if enc == ENC_SPARSE:  # D4
                positions = delta.positions(pc, out[:n_pos], m, n, t, k)
                b_at = t_words[positions]  # the base words of D2, before any value
            else:
                b_at = t_words  # dense: word i is value i's word (raw has no context 1)
            # D3: value planes of context 1 (after the positions and the base words)
            # or 2 (after the plane above it), from the most significant down
            for q in reversed(range(n_pos, sc)):
                if q in pending:
                    if pending[q].context == CTX_BASE_KEY:
                        decode_pending(q, base_key(b_at, 8 * t.wb))
                    else:
                        decode_pending(q, np.frombuffer(out[q + 1], dtype=np.uint8))
            vstreams = out[n_pos:]
            if enc == ENC_SPARSE:
                values = read_values(vstreams, layout, m, t.wb)  # D5
                if order == ORDER_GROUPED:
                    values = to_positional(values, b_at, 8 * t.wb)
                t_words[positions] = combine(b_at, values, op)
            else:
                values = read_values(vstreams, layout, n, t.wb)  # D5
                if enc == ENC_RAW:
                    t_words = values.astype(wdt, copy=True)
                else:
                    if order == ORDER_GROUPED:
                        values = to_positional(values, t_words, 8 * t.wb)
                    t_words = combine(t_words, values, op)
            if enc != ENC_RAW and np.count_nonzero(values) != m:  # D6
                fail("E_CHANGED_COUNT", f"chunk {g}")
        if xxh128(t_words) != R["digest"].tobytes():  # D7
            fail("E_CHUNK_DIGEST", f"chunk {g}")
        yield t_words


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def canonical(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False) + "\n"


def cmd_decode(delta_path, base_path, references=()):
    delta = open_chain(delta_path, references)
    bases = resolve_base(delta, base_path)
    entries = []
    for t in delta.tensors:
        h = hashlib.sha256()
        for words in decode_tensor(delta, t, bases.get(t.index)):
            h.update(memoryview(words).cast("B"))
        entries.append({"dtype": t.dtype, "name": t.name, "sha256": h.hexdigest(),
                        "shape": t.shape})
    return {"tensors": entries}


def _write_file(delta, f, bases, path):
    """§11.3: u64 LE len(H) ‖ H ‖ the file's tensors in header order."""
    hdr = delta.files[f]["safetensors_header"].encode("utf-8")
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(hdr)))
        out.write(hdr)
        for t in delta.file_tensors[f]:
            for words in decode_tensor(delta, t, bases.get(t.index)):
                out.write(memoryview(words).cast("B"))


def _shards_named_by_index(path):
    """The shard files that the index of a directory names; none without a valid one."""
    try:
        with open(os.path.join(path, INDEX_NAME), "rb") as f:
            weight_map = json.loads(f.read()).get("weight_map")
        return {v for v in weight_map.values() if isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        return set()


def _is_written_here(name, shards):
    """§11.3: a file a reader writes into a sharded output, or one of its temporaries."""
    return name == INDEX_NAME or name.startswith(".tpde-") or (name.endswith(".safetensors") and name in shards)


def _holds_only_checkpoint(path):
    """Whether every entry is a regular file: the index, a shard it names, a temporary."""
    shards = _shards_named_by_index(path)
    with os.scandir(path) as entries:
        return all(e.is_file(follow_symlinks=False) and _is_written_here(e.name, shards) for e in entries)


def _remove_checkpoint_dir(path):
    """Removes the files a reader writes, then the directory if nothing else is left."""
    shards = _shards_named_by_index(path)
    with os.scandir(path) as entries:
        for e in entries:
            if e.is_file(follow_symlinks=False) and _is_written_here(e.name, shards):
                os.unlink(e.path)
    try:
        os.rmdir(path)
    except OSError:
        pass  # it holds a file the reader did not write: it stays


def _check_not_an_input(out_path, inputs):
    """§11.3: an output that is, holds or lies inside an input is refused."""
    out = os.path.realpath(out_path)
    for i in inputs:
        if i is None:
            continue
        i = os.path.realpath(i)
        if os.path.commonpath([out, i]) in (out, i):
            fail("E_INVALID_ARGUMENT", f"the output {out_path} is, holds or lies inside an input")


def _place_dir(tmpdir, out_path):
    """Renames a directory into place without replacing anything: mkdir claims the
    name, and rename then replaces only that empty directory."""
    try:
        os.mkdir(out_path)
    except FileExistsError:
        fail("E_OUTPUT_EXISTS", out_path)
    try:
        os.replace(tmpdir, out_path)
    except OSError:
        fail("E_OUTPUT_EXISTS", f"{out_path}: something appeared there meanwhile")


def cmd_rebuild(delta_path, base_path, out_path, force):
    """§11.3: writes the target; output appears only when complete, never replaces
    what appeared meanwhile, and replacing never removes a file it did not write."""
    delta = Delta(delta_path)
    bases = resolve_base(delta, base_path)
    _check_not_an_input(out_path, [delta_path, base_path])
    if os.path.lexists(out_path):
        is_dir = os.path.isdir(out_path) and not os.path.islink(out_path)
        if not force or (delta.kind == "file") == is_dir or (is_dir and not _holds_only_checkpoint(out_path)):
            fail("E_OUTPUT_EXISTS", out_path)
    parent = os.path.dirname(os.path.abspath(out_path))
    try:
        if delta.kind == "file":
            # mkstemp: O_EXCL and a random name, so a planted symlink is never followed.
            fd, tmp = tempfile.mkstemp(prefix=".tpde-", dir=parent)
            os.fchmod(fd, 0o666 & ~_umask())
            os.close(fd)
            try:
                _write_file(delta, 0, bases, tmp)
                if force:
                    os.replace(tmp, out_path)
                else:
                    try:
                        os.link(tmp, out_path)  # fails if anything is there
                    except FileExistsError:
                        fail("E_OUTPUT_EXISTS", f"{out_path}: something appeared there meanwhile")
                    os.unlink(tmp)
            except BaseException:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                raise
        else:
            tmpdir = tempfile.mkdtemp(prefix=".tpde-", dir=parent)
            os.chmod(tmpdir, 0o777 & ~_umask())
            try:
                for f, fobj in enumerate(delta.files):
                    _write_file(delta, f, bases, os.path.join(tmpdir, fobj["name"]))
                with open(os.path.join(tmpdir, INDEX_NAME), "wb") as out:
                    out.write(delta.index_json.encode("utf-8"))
                if force and os.path.isdir(out_path):
                    if not _holds_only_checkpoint(out_path):
                        fail("E_OUTPUT_EXISTS", out_path)
                    aside = tempfile.mkdtemp(prefix=".tpde-", dir=parent)
                    os.replace(out_path, aside)
                    try:
                        _place_dir(tmpdir, out_path)
                    except BaseException:
                        try:
                            os.replace(aside, out_path)
                        except OSError:
                            pass  # something took its place: the old one stays aside
                        raise
                    _remove_checkpoint_dir(aside)
                else:
                    _place_dir(tmpdir, out_path)
            except BaseException:
                import shutil
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise
    except OSError as e:
        fail("E_IO", str(e))


_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_for_terminal(text):
    """§14: control characters and bidirectional controls escaped, as `\\u{1b}`."""
    short = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
    return "".join(
        short.get(c) or (f"\\u{{{ord(c):x}}}" if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in _BIDI_CONTROLS else c)
        for c in text
    )


def run_decode(delta_path, base_path=None, references=()):
    """The conformance contract of §11.4 in-process: (exit status, stdout text)."""
    try:
        return 0, canonical(cmd_decode(delta_path, base_path, references))
    except TpdeError as e:
        return 1, canonical({"error": e.code})


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv=None):
    p = argparse.ArgumentParser(prog="tpde_reader.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode", help="print the canonical decode (spec §11.4)")
    d.add_argument("delta")
    d.add_argument("--base")
    d.add_argument("--reference", action="append", default=[],
                   help="the delta's reference delta, then that file's, and so on (spec §11.4)")
    r = sub.add_parser("rebuild", help="write the target safetensors file(s) (spec §11.3)")
    r.add_argument("delta")
    r.add_argument("--base")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--force", action="store_true",
                   help="replace an existing output: a file, or a directory holding nothing but a checkpoint")
    args = p.parse_args(argv)
    try:
        if args.cmd == "decode":
            result = cmd_decode(args.delta, args.base, args.reference)
            sys.stdout.buffer.write(canonical(result).encode("utf-8"))
        else:
            cmd_rebuild(args.delta, args.base, args.output, args.force)
    except TpdeError as e:
        print(f"tpde_reader: {escape_for_terminal(str(e))}", file=sys.stderr)
        sys.stdout.buffer.write(canonical({"error": e.code}).encode("utf-8"))
        return 1
    except OSError as e:
        print(f"tpde_reader: {escape_for_terminal(str(e))}", file=sys.stderr)
        sys.stdout.buffer.write(canonical({"error": "E_IO"}).encode("utf-8"))
        return 1
    except MemoryError:
        # Spec §9.1: an allocation failure is a code, never a crash.
        print("tpde_reader: out of memory", file=sys.stderr)
        sys.stdout.buffer.write(canonical({"error": "E_OUT_OF_MEMORY"}).encode("utf-8"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
