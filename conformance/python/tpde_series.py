#!/usr/bin/env python3
"""A second, independent reader of tpde series, written from spec/SERIES.md alone:
it checks a manifest (§2, §3) and rebuilds a step (§4) with tpde_reader.

    tpde_series.py check RUN/series.json     -> {"steps":N} or {"error":"E_..."}
    tpde_series.py get RUN STEP OUT          -> rebuilds STEP at OUT

Errors are the codes of SERIES.md §7 (and FORMAT.md §13 from the step files).
"""

import hashlib
import os
import re
import sys
import tempfile

import tpde_reader as r

MAX_MANIFEST_BYTES = 1 << 30
MAX_INTEGER = 2**53 - 1
INDEX_FILE = "model.safetensors.index.json"
HEX64 = re.compile(r"[0-9a-f]{64}")
KINDS = ("keyframe", "delta", "same")


def invalid(msg):
    raise r.TpdeError("E_SERIES_INVALID", msg)


def _is_int(v):
    # bool is an int in Python; JSON true is not an integer
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INTEGER


def _plain_name(name):
    """M8: one path component (FORMAT.md §5.3, without the suffix rule)."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\x00")


def _members(obj, names, what):
    """M1: exactly these members, no other."""
    if not isinstance(obj, dict) or set(obj) != set(names):
        invalid(f"{what} must have exactly the members {sorted(names)}")


def _checkpoint(c, what):
    _members(c, ("kind", "files"), what)
    if c["kind"] not in ("file", "sharded") or not isinstance(c["files"], list):
        invalid(f"{what}: kind or files")
    names = []
    for f in c["files"]:
        _members(f, ("name", "bytes", "sha256"), what)
        if not isinstance(f["name"], str) or not _is_int(f["bytes"]) or not isinstance(f["sha256"], str):
            invalid(f"{what}: a file's types")
        if not _plain_name(f["name"]) or not HEX64.fullmatch(f["sha256"]):  # M5, M8
            invalid(f"{what}: a file's name or digest")
        names.append(f["name"].encode("utf-8"))
    if any(a >= b for a, b in zip(names, names[1:])):  # M8: strictly increasing
        invalid(f"{what}: files out of order")
    if c["kind"] == "file" and len(names) != 1:
        invalid(f"{what}: a file checkpoint has one file")
    if c["kind"] == "sharded" and INDEX_FILE.encode() not in names:
        invalid(f"{what}: a sharded checkpoint lists its index")


def _same_bytes(a, b):
    """M7: the same kind, and the same bytes and digests (names too when sharded)."""
    if a["kind"] != b["kind"] or len(a["files"]) != len(b["files"]):
        return False
    return all(x["bytes"] == y["bytes"] and x["sha256"] == y["sha256"]
               and (a["kind"] == "file" or x["name"] == y["name"])
               for x, y in zip(a["files"], b["files"]))


def parse_manifest(data):
    """§2 and §3 (M1 to M8). Returns the manifest; raises E_SERIES_INVALID."""
    if len(data) > MAX_MANIFEST_BYTES:  # M1
        invalid("manifest too large")
    try:
        m = r.strict_json(data)
    except (r._BadJson, r._DupKey) as e:  # M1
        invalid(f"not strict JSON: {e}")
    _members(m, ("series_version", "steps"), "the manifest")
    version = m["series_version"]
    if not isinstance(version, str) or not re.fullmatch(r"1\.[0-9]+", version):  # M2
        invalid(f"series version {version!r} is not 1.x")
    if not isinstance(m["steps"], list):
        invalid("steps is not an array")
    by_step = {}
    last = None
    for s in m["steps"]:
        _members(s, ("step", "kind", "reference", "file", "file_bytes", "file_sha256", "checkpoint"), "a step")
        step, kind, ref = s["step"], s["kind"], s["reference"]
        what = f"step {step}"
        if not _is_int(step) or kind not in KINDS or not _is_int(s["file_bytes"]):
            invalid(f"{what}: step, kind or file_bytes")
        if ref is not None and not _is_int(ref):
            invalid(f"{what}: reference")
        if s["file"] is not None and not isinstance(s["file"], str):
            invalid(f"{what}: file")
        if s["file_sha256"] is not None and not isinstance(s["file_sha256"], str):
            invalid(f"{what}: file_sha256")
        if last is not None and step <= last:  # M3
            invalid(f"{what}: steps must strictly increase")
        last = step
        stored = kind in ("keyframe", "delta")
        if stored:  # M4
            if (ref is None) != (kind == "keyframe") or s["file"] is None or s["file_sha256"] is None:
                invalid(f"{what}: kind, reference and file disagree")
            if not HEX64.fullmatch(s["file_sha256"]):  # M5
                invalid(f"{what}: file_sha256")
            if s["file"] != f"steps/{step:020d}-{s['file_sha256'][:16]}.tpde":
                invalid(f"{what}: file name")
        elif ref is None or s["file"] is not None or s["file_sha256"] is not None or s["file_bytes"] != 0:
            invalid(f"{what}: a same step has a reference and no file")
        _checkpoint(s["checkpoint"], what)
        if ref is not None:  # M6, M7
            target = by_step.get(ref)
            if target is None or target["kind"] == "same":
                invalid(f"{what}: reference {ref} is not an earlier stored step")
            if kind == "same" and not _same_bytes(target["checkpoint"], s["checkpoint"]):
                invalid(f"{what}: differs from its reference")
        by_step[step] = s
    return m


def read_manifest(root):
    path = os.path.join(root, "series.json")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise r.TpdeError("E_IO", f"{path}: {e}") from e
    return parse_manifest(data)


def chain(m, step):
    """§4: the stored steps that rebuild `step`, keyframe first."""
    by_step = {s["step"]: s for s in m["steps"]}
    at = by_step.get(step)
    if at is None:
        raise r.TpdeError("E_SERIES_STEP", f"no step {step}")
    if at["kind"] == "same":
        at = by_step[at["reference"]]
    out = [at]
    while at["kind"] == "delta":
        at = by_step[at["reference"]]
        out.append(at)
    return out[::-1]


def sha256_file(path):
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def checkpoint_digest(path, kind):
    """SHA-256 of a rebuilt checkpoint's files, as §2 lists them."""
    if kind == "file":
        digest, n = sha256_file(path)
        return [(n, digest)]
    return [(name, *sha256_file(os.path.join(path, name))[::-1]) for name in sorted(os.listdir(path))]


def get(root, step, out):
    """§4: checks each file's digest before decoding it, rebuilds the chain, and
    checks the result against the pinned checkpoint digests."""
    m = read_manifest(root)
    entries = chain(m, step)
    with tempfile.TemporaryDirectory(prefix=".tmp-", dir=root) as scratch:
        base = None
        for i, e in enumerate(entries):
            path = os.path.join(root, e["file"])
            digest, n = sha256_file(path)
            if digest != e["file_sha256"] or n != e["file_bytes"]:
                raise r.TpdeError("E_SERIES_DIGEST", f"step {e['step']}: {path}")
            dest = out if i == len(entries) - 1 else os.path.join(scratch, f"step-{e['step']}")
            r.cmd_rebuild(path, base, dest, False)
            base = dest
    want = chain(m, step)[-1]["checkpoint"]
    got = checkpoint_digest(out, want["kind"])
    if want["kind"] == "file":
        expected = [(f["bytes"], f["sha256"]) for f in want["files"]]
    else:
        expected = [(f["name"], f["bytes"], f["sha256"]) for f in want["files"]]
    if got != expected:
        raise r.TpdeError("E_SERIES_DIGEST", f"step {step} rebuilds other bytes")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 2 and argv[0] == "check":
            with open(argv[1], "rb") as f:
                m = parse_manifest(f.read(MAX_MANIFEST_BYTES + 1))
            sys.stdout.write(r.canonical({"steps": len(m["steps"])}))
        elif len(argv) == 4 and argv[0] == "get":
            get(argv[1], int(argv[2]), argv[3])
        else:
            sys.stderr.write(__doc__)
            return 2
    except r.TpdeError as e:
        sys.stdout.write(r.canonical({"error": e.code}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
