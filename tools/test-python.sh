#!/usr/bin/env bash
# The Python package: build the abi3 wheel with maturin, install it in a fresh
# virtual environment with numpy and torch, and run its tests, which compare its
# outputs with those of the `tpde` command built from the same sources.
#
# torch is PyPI's CUDA build: 3 GB of downloads, 5 GiB installed. The environment
# is made afresh each run under target/ and removed afterwards, and the pinned
# requirements are installed one at a time, so that no more than the environment
# and one download are on disk at once. Nothing is cached between runs: pip's HTTP
# cache stores only what the index's caching headers allow (here nothing), and a
# wheelhouse beside the environment would not fit a CI disk shared with other work.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
venv=target/python-venv
wheels=target/python-wheels
rm -rf "$venv" "$wheels"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
grep -v '^#' python/requirements-test.txt | while read -r requirement; do
  "$venv/bin/pip" install --quiet --no-compile --no-deps "$requirement"
done
"$venv/bin/pip" check

"$venv/bin/maturin" build --quiet --release --locked --manifest-path python/Cargo.toml \
  --target-dir target/python-build --out "$wheels"
"$venv/bin/pip" install --quiet --no-deps "$wheels"/tpde-*.whl

cargo build --quiet --locked -p tpde-cli
# From the repository root, so that the installed wheel is imported, not python/tpde.
# The object-store tests must run here: moto is installed for python3 by tools/test-all.sh.
TPDE_REQUIRE_S3=1 TPDE_CLI="$PWD/target/debug/tpde" "$venv/bin/pytest" -q -p no:cacheprovider python/tests
