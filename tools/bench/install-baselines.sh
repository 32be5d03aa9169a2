#!/usr/bin/env bash
# Installs the external baseline tools used by tpde-bench. Idempotent: tools
# already on PATH are left alone. Python packages are optional; the harness
# records them as "not available" when they are missing.
set -euo pipefail

need_apt=()
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
command -v xdelta3 >/dev/null 2>&1 || need_apt+=(xdelta3)
[ -x /usr/bin/time ] || need_apt+=(time)

if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# Optional single-checkpoint compressors from PyPI. Failure is not fatal.
PY="${PYTHON:-python3}"
if command -v "$PY" >/dev/null 2>&1; then
    for pkg in zipnn lmzip; do
        if "$PY" -c "import $pkg" >/dev/null 2>&1; then
            continue
        fi
        echo "installing optional python package: $pkg"
        "$PY" -m pip install --quiet "$pkg" || echo "warning: pip install $pkg failed (optional)"
    done
else
    echo "warning: $PY not found; zipnn and lmzip baselines will be skipped"
fi

zstd --version
xdelta3 -V 2>&1 | head -n 1 || true
