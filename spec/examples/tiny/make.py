"""Builds the worked example of spec §15.8 from the spec alone, and its walk-through.

Writes base.safetensors, target.safetensors, delta.tpde and README.md beside this
script. Needs the `xxhash` package. Run: python3 spec/examples/tiny/make.py
"""

import json
import struct
from pathlib import Path

import xxhash

HERE = Path(__file__).resolve().parent
MAGIC = bytes.fromhex("89545044450d0a1a")
END_MAGIC = bytes.fromhex("8954504445454e44")


def xxh64(data):
    return xxhash.xxh3_64_intdigest(data)


def xxh128(data):
    return xxhash.xxh3_128_digest(data)  # canonical, big-endian


def tree(leaves):
    return xxhash.xxh3_128_hexdigest(b"".join(leaves))


def align64(x):
    return (x + 63) // 64 * 64


def safetensors_file(tensors):
    """tensors: list of (name, dtype, shape, bytes); returns (header text, file bytes)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-(8 + len(text)) % 8)
    return text, struct.pack("<Q", len(text)) + text.encode() + b"".join(t[3] for t in tensors)


def u16s(*words):
    return b"".join(struct.pack("<H", w) for w in words)


def zigzag(d, bits):
    d = (d + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))  # as signed
    return ((d << 1) ^ (d >> (bits - 1))) % (1 << bits)


def rotl1(v, bits):
    return ((v << 1) | (v >> (bits - 1))) % (1 << bits)


# Base: one BF16 tensor of 8 words. Target: the same tensor with words 1 and 6 one
# unit in the last place apart, and a standalone F32 tensor.
base_w = [0x3F80, 0x3F81, 0xBF00, 0x4000, 0x3E80, 0x0000, 0xC040, 0x3F00]
target_w = list(base_w)
target_w[1] = 0x3F82  # +1
target_w[6] = 0xC03F  # -1
target_b = [0x3F800000, 0xC0000000]  # 1.0, -2.0

base_header, base_file = safetensors_file([("w", "BF16", [2, 4], u16s(*base_w))])
target_tensors = [
    ("w", "BF16", [2, 4], u16s(*target_w)),
    ("b", "F32", [2], b"".join(struct.pack("<I", v) for v in target_b)),
]
target_header, target_file = safetensors_file(target_tensors)

# Chunk 0: tensor w, sparse, gaps of width 1, sub, byte planes (spec §8).
positions = [i for i in range(8) if target_w[i] != base_w[i]]
gaps = [positions[0]] + [b - a for a, b in zip(positions, positions[1:])]
values0 = [zigzag(target_w[i] - base_w[i], 16) for i in positions]
streams0 = [bytes(gaps)] + [bytes((v >> (8 * k)) & 0xFF for v in values0) for k in range(2)]
# Chunk 1: tensor b, raw, xor, rotated byte planes.
values1 = [rotl1(v, 32) for v in target_b]
streams1 = [bytes((v >> (8 * k)) & 0xFF for v in values1) for k in range(4)]

data0, data1 = b"".join(streams0), b"".join(streams1)
data = data0 + data1
w_bytes, b_bytes = target_tensors[0][3], target_tensors[1][3]


def chunk_record(offset, stored, changed, first_stream, encoding, op, layout, coding, gap_width, streams, target_bytes):
    return (struct.pack("<QIII", offset, len(stored), changed, first_stream)
            + bytes([encoding, op, layout, coding, gap_width, len(streams)]) + bytes(6)
            + struct.pack("<Q", xxh64(stored)) + xxh128(target_bytes) + bytes(8))


def stream_records(streams):
    return b"".join(struct.pack("<II", len(s), len(s)) + bytes(8) for s in streams)  # codec 0


chunk_table = (chunk_record(128, data0, 2, 0, 1, 1, 1, 1, 1, streams0, w_bytes)
               + chunk_record(128 + len(data0), data1, 2, len(streams0), 3, 0, 2, 0, 0, streams1, b_bytes))
stream_table = stream_records(streams0) + stream_records(streams1)
tables = chunk_table + stream_table

header = {
    "writer": "spec/examples/tiny/make.py",
    "target": {"kind": "file", "files": [{"name": "target.safetensors", "safetensors_header": target_header}]},
    "tensors": [
        {"name": "w", "dtype": "BF16", "shape": [2, 4], "file": 0, "chunk_words": 8, "first_chunk": 0,
         "chunk_count": 1, "digest": tree([xxh128(w_bytes)]),
         "base": {"shape": [2, 4], "digest": tree([xxh128(u16s(*base_w))])}},
        {"name": "b", "dtype": "F32", "shape": [2], "file": 0, "chunk_words": 8, "first_chunk": 1,
         "chunk_count": 1, "digest": tree([xxh128(b_bytes)])},
    ],
}
header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()

data_len = len(data)
header_offset = align64(128 + data_len)
table_offset = align64(header_offset + len(header_bytes))
file_len = table_offset + len(tables) + 16

pre = (MAGIC + struct.pack("<HH", 1, 0) + bytes(4)
       + struct.pack("<8Q", 0, 0, data_len, len(header_bytes), 2, len(streams0) + len(streams1),
                     xxh64(header_bytes), xxh64(tables))
       + bytes(40))
pre += struct.pack("<Q", xxh64(pre))
delta = (pre + data + bytes(header_offset - 128 - data_len) + header_bytes
         + bytes(table_offset - header_offset - len(header_bytes)) + tables
         + struct.pack("<Q", file_len) + END_MAGIC)
assert len(delta) == file_len

(HERE / "base.safetensors").write_bytes(base_file)
(HERE / "target.safetensors").write_bytes(target_file)
(HERE / "delta.tpde").write_bytes(delta)


def hexdump(b):
    return " ".join(f"{x:02x}" for x in b)


def row(offset, raw, text):
    return f"| {offset} | `{hexdump(raw)}` | {text} |"


rows = ["| offset | bytes | meaning |", "|---|---|---|"]
P = [
    (0, 8, "magic"), (8, 2, "major_version 1"), (10, 2, "minor_version 0"), (12, 4, "reserved"),
    (16, 8, "required_features 0"), (24, 8, "optional_features 0"), (32, 8, f"data_len {data_len}"),
    (40, 8, f"header_len {len(header_bytes)}"), (48, 8, "chunk_count 2"),
    (56, 8, f"stream_count {len(streams0) + len(streams1)}"),
    (64, 8, f"header_checksum 0x{xxh64(header_bytes):016x}"), (72, 8, f"table_checksum 0x{xxh64(tables):016x}"),
    (80, 40, "reserved"), (120, 8, f"preamble_checksum 0x{xxh64(pre[:120]):016x}"),
]
rows += [row(o, delta[o:o + n], m) for o, n, m in P]
at = 128
for label, s in [("chunk 0, stream 0: gap plane 0 (gaps 1, 5: positions 1, 6)", streams0[0]),
                 ("chunk 0, stream 1: value plane 0 (zigzag +1 = 2, zigzag −1 = 1)", streams0[1]),
                 ("chunk 0, stream 2: value plane 1", streams0[2]),
                 ("chunk 1, stream 0: plane 0 of rotl1(0x3F800000) = 0x7F000000, rotl1(0xC0000000) = 0x80000001", streams1[0]),
                 ("chunk 1, stream 1: plane 1", streams1[1]),
                 ("chunk 1, stream 2: plane 2", streams1[2]),
                 ("chunk 1, stream 3: plane 3", streams1[3])]:
    rows.append(row(at, s, label))
    at += len(s)
rows.append(row(at, delta[at:header_offset], f"zero padding to header_offset {header_offset}"))
rows.append(f"| {header_offset} | ({len(header_bytes)} bytes) | header JSON, below |")
pad_at = header_offset + len(header_bytes)
rows.append(row(pad_at, delta[pad_at:table_offset], f"zero padding to table_offset {table_offset}"))
C = [(0, 8, "data_offset"), (8, 4, "stored_len"), (12, 4, "changed_count"), (16, 4, "first_stream"),
     (20, 1, "encoding"), (21, 1, "value_op"), (22, 1, "value_layout"), (23, 1, "position_coding"),
     (24, 1, "gap_width"), (25, 1, "stream_count"), (26, 1, "value_order"), (27, 5, "reserved"),
     (32, 8, "checksum (u64 LE)"),
     (40, 16, "digest (XXH3-128, big-endian)"), (56, 8, "reserved")]
for c in range(2):
    base_at = table_offset + 64 * c
    for o, n, m in C:
        raw = delta[base_at + o:base_at + o + n]
        value = int.from_bytes(raw, "little") if n <= 4 or m in ("data_offset",) else None
        rows.append(row(base_at + o, raw, f"chunk {c} {m}" + (f" = {value}" if value is not None else "")))
for s in range(len(streams0) + len(streams1)):
    base_at = table_offset + 128 + 16 * s
    raw = delta[base_at:base_at + 16]
    rows.append(row(base_at, raw, f"stream {s}: stored_len {int.from_bytes(raw[:4], 'little')}, "
                    f"decoded_len {int.from_bytes(raw[4:8], 'little')}, codec 0 (stored), reserved"))
rows.append(row(file_len - 16, delta[-16:-8], f"trailer: file_len {file_len}"))
rows.append(row(file_len - 8, delta[-8:], "trailer: end magic"))

readme = f"""# Worked example (spec §15.8, non-normative)

Generated by `make.py` from the spec alone; the reference reader opens `delta.tpde`
and rebuilds `target.safetensors` from it and `base.safetensors` byte for byte.

- `base.safetensors`: `w`, BF16 `[2, 4]`: words
  `{", ".join(f"{w:04x}" for w in base_w)}`.
- `target.safetensors`: `w` with word 1 one unit up (`3f81 → 3f82`) and word 6 one
  unit down (`c040 → c03f`), then `b`, F32 `[2]` = `1.0, -2.0`
  (`3f800000, c0000000`), standalone.
- `delta.tpde`: `chunk_words` 8, so each tensor is one chunk.
  - Chunk 0 (`w`): sparse (1), sub (1), byte planes (1), gaps (1) of width 1,
    `changed_count` 2. Streams: gap plane `01 05` (positions 1 and 6); value planes
    `02 01` and `00 00` (zigzag(+1) = 2, zigzag(−1) = 1). Decoding: start from the
    base words, then `t[1] = 3f81 + unzigzag(2) = 3f82` and
    `t[6] = c040 + unzigzag(1) = c040 − 1 = c03f`.
  - Chunk 1 (`b`): raw (3), xor (0), rotated byte planes (2), `changed_count` 2.
    Four planes of two bytes; joining them gives `7f000000` and `80000001`, and
    rotating right by one bit gives `3f800000` and `c0000000`.
  - All streams are stored (codec 0): zstd would not make bytes this small smaller.

File: {file_len} bytes.

{chr(10).join(rows)}

Header JSON (`header_offset` {header_offset}, {len(header_bytes)} bytes):

```json
{header_bytes.decode()}
```

Digests: chunk 0 `{xxh128(w_bytes).hex()}`, chunk 1 `{xxh128(b_bytes).hex()}`;
tensor `w` `{header["tensors"][0]["digest"]}` (the tree over one leaf), tensor `b`
`{header["tensors"][1]["digest"]}`, base `w` `{header["tensors"][0]["base"]["digest"]}`.
"""
(HERE / "README.md").write_text(readme)
print(f"wrote {file_len} bytes of delta")
