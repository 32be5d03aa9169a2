#!/usr/bin/env bash
# The Python package's tests on a GPU machine: the CUDA tests of `tpde.torch`
# (marker `cuda`), then the whole suite, against a wheel built elsewhere.
#
# The GPU machine has Python, PyTorch and NumPy but no network and no Rust, so
# everything else travels with the working tree, built on an x86-64 Linux machine
# with Rust and PyPI:
#
#   # the wheel, as tools/test-python.sh builds it (abi3: any CPython >= 3.9; the
#   # platform tag, manylinux_2_34 from a Debian 12 builder, is the oldest glibc it
#   # runs on; the GPU loader finds libcuda and NVRTC at run time)
#   python3 -m venv target/py-build && target/py-build/bin/pip install maturin==1.16.0
#   target/py-build/bin/maturin build --release --locked --manifest-path python/Cargo.toml \
#     --target-dir target/python-build --out target/gpu-python
#   # the command the tests compare with, and the test-only packages, for the
#   # GPU machine's Python (3.12 there)
#   cargo build --release --locked -p tpde-cli && strip -o target/gpu-python/tpde target/release/tpde
#   pip download --only-binary=:all: --implementation cp --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --dest target/gpu-python/wheelhouse pytest safetensors
#
# then, on the GPU machine, with target/gpu-python sent along (it is ignored by git):
#
#   bash tools/gpu-python.sh target/gpu-python/tpde-*.whl
#
# TPDE_CLI (default target/gpu-python/tpde) is the command, WHEELHOUSE (default
# target/gpu-python/wheelhouse) holds pytest and safetensors where the machine's
# Python lacks them, and PYTHON (default python3) is the Python whose torch is used
# (on the GPU machine: PYTHON=/opt/torch/.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

wheel=${1:?usage: tools/gpu-python.sh WHEEL}
python=${PYTHON:-python3}
cli=${TPDE_CLI:-$PWD/target/gpu-python/tpde}
wheelhouse=${WHEELHOUSE:-target/gpu-python/wheelhouse}
venv=target/gpu-python-venv

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
rm -rf "$venv"
trap 'rm -rf "$venv"' EXIT
# The machine's torch and numpy, seen through the environment; tpde goes in it.
"$python" -m venv --system-site-packages "$venv"
# --system-site-packages reaches the base interpreter's packages only; where
# $PYTHON is itself a virtual environment (torch installed in one), its packages
# are added by a .pth file.
"$python" -c 'import site; print("\n".join(site.getsitepackages()))' \
  >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-packages.pth"
"$venv/bin/pip" install --quiet --no-deps --no-index "$wheel"
for module in pytest safetensors; do
  if ! "$venv/bin/python" -c "import $module" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --no-index --find-links "$wheelhouse" "$module"
  fi
done

"$venv/bin/python" - <<'EOF'
import platform, sys
import numpy, torch
import tpde
print(f"python {platform.python_version()}, numpy {numpy.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print(f"tpde from {tpde.__file__}")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU here: the cuda tests would only skip")
for i in range(torch.cuda.device_count()):
    major, minor = torch.cuda.get_device_capability(i)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

# From the repository root, so that the installed wheel is imported, not python/tpde.
echo "== the CUDA tests"
"$venv/bin/python" -m pytest -q -rs -p no:cacheprovider -m cuda python/tests
echo "== the whole suite"
if [ ! -x "$cli" ]; then
  echo "the tpde command is missing at $cli (set TPDE_CLI): the suite compares with it" >&2
  exit 1
fi
TPDE_CLI="$cli" "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider python/tests
