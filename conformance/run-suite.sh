#!/usr/bin/env bash
# Runs a tpde reader over every case of conformance/manifest.json.
#
#   conformance/run-suite.sh [--skip ID]... READER_CMD...
#
# For each case it runs `READER_CMD decode DELTA [--base BASE] [--reference REF]...`
# (absolute paths; the case's `references`, in order) and
# checks the contract of spec §11.4 and conformance/README.md: an accepted case exits
# 0 and prints its expected decode; a rejected case exits 1 and prints
# {"error":"E_..."}. Stdout is compared as parsed JSON (spec §11.4); --strict also
# requires the canonical bytes. Cases named by --skip are reported but do not fail
# the run. Each case may take TPDE_SUITE_TIMEOUT seconds (default 60). Needs python3.
#
# Examples:
#   conformance/run-suite.sh target/debug/tpde-conformance
#   conformance/run-suite.sh python3 conformance/python/tpde_reader.py
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec python3 - "$here" "$@" <<'PY'
import json, os, subprocess, sys

root, args = sys.argv[1], sys.argv[2:]
skip, strict = set(), False
while args and args[0] in ("--skip", "--strict"):
    if args[0] == "--strict":
        strict, args = True, args[1:]
    elif len(args) >= 2:
        skip.add(args[1]); args = args[2:]
    else:
        sys.exit("--skip needs a case id")
if not args:
    sys.exit("usage: run-suite.sh [--skip ID]... [--strict] READER_CMD...")
timeout = float(os.environ.get("TPDE_SUITE_TIMEOUT", "60"))
manifest = json.load(open(os.path.join(root, "manifest.json"), encoding="utf-8"))
if manifest.get("format") != "tpde conformance manifest" or manifest.get("version") != 1:
    sys.exit("manifest.json: not a tpde conformance manifest of version 1")
cases = manifest["cases"]
passed = failed = skipped = 0
for case in cases:
    command = args + ["decode", os.path.join(root, case["path"])]
    if case.get("base"):
        command += ["--base", os.path.join(root, case["base"])]
    for reference in case.get("references", []):
        command += ["--reference", os.path.join(root, reference)]
    if case["expect"] == "accept":
        want_status = 0
        want = open(os.path.join(root, case["expected"]), "rb").read()
    else:
        want_status = 1
        want = ('{"error":"%s"}\n' % case["error"]).encode()
    try:
        run = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        status, out = run.returncode, run.stdout
    except subprocess.TimeoutExpired:
        status, out = "timeout", b""
    try:
        same = json.loads(out) == json.loads(want) and (not strict or out == want)
    except ValueError:
        same = False
    if status == want_status and same:
        passed += 1
    elif case["id"] in skip:
        skipped += 1
        print(f"SKIP {case['id']} (known failure)")
    else:
        failed += 1
        got = out[:300].decode("utf-8", "replace").strip()
        print(f"FAIL {case['id']}: wanted exit {want_status} and {want.decode().strip()[:120]}; got exit {status} and {got}")
print(f"conformance: {passed} passed, {failed} failed, {skipped} skipped (known failures)")
sys.exit(1 if failed else 0)
PY
