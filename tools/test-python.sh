#!/usr/bin/env bash
# The Python package: build the abi3 wheel with maturin, install it in a fresh
# virtual environment with numpy and torch, and run its tests, which compare its
# outputs with those of the `tpde` command built from the same sources.
#
# Everything lives under target/: the environment, the wheel, and a wheelhouse of
# the pinned requirements, so that torch (PyPI's CUDA build, a 540 MB download) is
# downloaded once and later runs install it from disk. A wheelhouse rather than
# pip's HTTP cache, which stores only what the index's caching headers allow.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1
venv=target/python-venv
wheels=target/python-wheels
wheelhouse=target/pip-wheelhouse
rm -rf "$venv" "$wheels"
# The environment holds torch, 5 GiB installed: made afresh each run, so not kept.
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
# `pip download` skips the files already in the wheelhouse.
"$venv/bin/pip" download --quiet --dest "$wheelhouse" -r python/requirements-test.txt
"$venv/bin/pip" install --quiet --no-index --find-links "$wheelhouse" -r python/requirements-test.txt
"$venv/bin/maturin" build --quiet --release --locked --manifest-path python/Cargo.toml \
  --target-dir target/python-build --out "$wheels"
"$venv/bin/pip" install --quiet "$wheels"/tpde-*.whl

cargo build --quiet --locked -p tpde-cli
# From the repository root, so that the installed wheel is imported, not python/tpde.
TPDE_CLI="$PWD/target/debug/tpde" "$venv/bin/pytest" -q -p no:cacheprovider python/tests
