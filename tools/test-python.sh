#!/usr/bin/env bash
# The Python package: build the abi3 wheel with maturin, install it in a fresh
# virtual environment with numpy and torch, and run its tests, which compare its
# outputs with those of the `tpde` command built from the same sources.
#
# torch is PyPI's CUDA build: 3 GB of downloads, 5.3 GiB installed. The environment
# is made afresh each run under target/ and removed afterwards, and the pinned
# requirements are installed one at a time, so that no more than the environment
# and one download are on disk at once. Nothing is cached between runs: pip's HTTP
# cache stores only what the index's caching headers allow (here nothing), and a
# wheelhouse beside the environment would not fit a CI disk shared with other work.
# Where the disk has no room for torch even so, the package is tested without it,
# and the tests of `tpde.torch` say that they skipped and why.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
venv=target/python-venv
wheels=target/python-wheels
rm -rf "$venv" "$wheels"
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
install_pinned() {
  grep -v '^#' "$1" | while read -r requirement; do
    "$venv/bin/pip" install --quiet --no-compile --no-deps "$requirement"
  done
}
install_pinned python/requirements-test.txt

"$venv/bin/maturin" build --quiet --release --locked --manifest-path python/Cargo.toml \
  --target-dir target/python-build --out "$wheels"
"$venv/bin/pip" install --quiet --no-deps "$wheels"/tpde-*.whl
cargo build --quiet --locked -p tpde-cli

# Everything else is built by now: what is left is for torch and one download.
torch_needs_mib=7168
free_mib=$(df -Pm target | awk 'NR == 2 { print $4 }')
if [ "$free_mib" -ge "$torch_needs_mib" ]; then
  install_pinned python/requirements-torch.txt
  export TPDE_REQUIRE_TORCH=1
else
  echo "torch not installed: ${free_mib} MiB free under target/, it needs ${torch_needs_mib} MiB;" \
    "the tests of tpde.torch will say that they skipped"
fi
"$venv/bin/pip" check

# From the repository root, so that the installed wheel is imported, not python/tpde.
# The object-store tests must run here: moto is installed for python3 by tools/test-all.sh.
TPDE_REQUIRE_S3=1 TPDE_CLI="$PWD/target/debug/tpde" "$venv/bin/pytest" -q -rs -p no:cacheprovider python/tests
