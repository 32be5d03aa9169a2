#!/usr/bin/env bash
# Seeds corpus/<target>/ with the golden files of the suite, one file per case.
#
#   conformance/fuzz/seed-corpus.sh open decode apply series_manifest
#
# `open` and `decode` take a delta as it is. `apply` takes one byte that picks its
# base (0: valid/mixed's file, 1: valid/sharded's shards) and then the delta, so
# each case gets the byte of the base its manifest entry names. `series_manifest`
# takes the series manifests of conformance/series.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(open decode apply)
python3 - "${targets[@]}" <<'PY'
import json, sys
from pathlib import Path

suite = Path("..")
targets = sys.argv[1:]
if "series_manifest" in targets:
    out = Path("corpus") / "series_manifest"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((suite / "series").rglob("*.json")):
        (out / path.name).write_bytes(path.read_bytes())
    targets = [t for t in targets if t != "series_manifest"]
for case in json.loads((suite / "manifest.json").read_text(encoding="utf-8"))["cases"]:
    delta = (suite / case["path"]).read_bytes()
    name = case["id"] + ".tpde"
    for target in targets:
        (Path("corpus") / target).mkdir(parents=True, exist_ok=True)
        if target == "apply":
            selector = b"\x01" if case.get("base") == "valid/sharded/base" else b"\x00"
            (Path("corpus") / target / name).write_bytes(selector + delta)
        else:
            (Path("corpus") / target / name).write_bytes(delta)
PY
