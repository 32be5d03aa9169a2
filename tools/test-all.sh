#!/usr/bin/env bash
# Every test: the Rust workspace (GPU tests report themselves as ignored where no GPU
# is present), the full-disk test where we may mount a tmpfs, the conformance suite
# through the second, independent reader in Python, and the Python package.
set -euo pipefail
cd "$(dirname "$0")/.."

# The object-store tests (tools/tpde/tests/remote.rs) start moto's S3 server, and
# Azurite, Microsoft's Azure Blob Storage emulator, from npm.
python3 -m pip install --quiet --disable-pip-version-check "moto[server]==5.*"
[ -x target/azurite/node_modules/.bin/azurite-blob ] ||
  npm install --silent --no-audit --no-fund --prefix target/azurite azurite@3.35.0
cargo test --workspace --locked
# Decoding memory at the largest chunk size: a 1 GiB input, fast enough only in release.
# --nocapture shows the line that says so when the disk has no room for it.
cargo test --release --locked -p tpde-cli --test memory -- --ignored --nocapture

# The kernels compile with NVRTC without a driver or a GPU: the PyPI wheel ships
# libnvrtc.so.13, which cudarc's loader finds by that name on LD_LIBRARY_PATH.
nvrtc_dir=target/nvrtc-pip
if [ ! -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc_dir" "nvidia-cuda-nvrtc==13.*"
fi
LD_LIBRARY_PATH="$PWD/$nvrtc_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --locked -p tpde-cuda --test nvrtc -- --ignored

if [ "$(id -u)" = 0 ]; then
  cargo test --locked -p tpde-cli --test cli -- --ignored a_full_disk_leaves_nothing_behind
else
  echo "full-disk test not run: mounting a tmpfs needs root"
fi

python3 -m pip install --quiet --disable-pip-version-check -r conformance/python/requirements.txt
python3 -m unittest discover -s conformance/python -p 'test_*.py'
bash conformance/run-suite.sh python3 conformance/python/tpde_reader.py

bash tools/test-python.sh
