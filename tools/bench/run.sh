#!/usr/bin/env bash
# Regenerates BENCHMARKS.md at the repository root, its series section included.
#
#   bash tools/bench/run.sh [tpde-bench options, e.g. --quick or --scale 2]
#
# Installs the baseline tools if missing, builds tpde and the harness in
# release mode, and runs every method on a freshly generated (or cached,
# if unchanged) corpus in /tmp/tpde-bench.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash tools/bench/install-baselines.sh

# The harness runs without tpde (its rows say why), so a tpde build failure
# is reported but not fatal.
cargo build --release -p tpde-cli || echo "warning: tpde did not build; its rows will be skipped" >&2
cargo run --release -p tpde-bench -- --out BENCHMARKS.md "$@"
# Checkpoint series (spec/SERIES.md): seeded runs added step by step, appended as
# the last section.
cargo run --release -p tpde-bench -- series --out target/series.md
cat target/series.md >> BENCHMARKS.md
