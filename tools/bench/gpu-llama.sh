#!/usr/bin/env bash
# GPU loading benchmark on real-shaped checkpoints, run on the GPU machine
# from pre-built binaries:
#
#   bash tools/bench/gpu-llama.sh BIN_DIR [SCRATCH_DIR]
#
# BIN_DIR holds `tpde-bench`, `tpde` and `load_bench` (or examples/load_bench),
# built with
#
#   cargo build --release -p tpde-cli -p tpde-bench
#   cargo build --release -p tpde-cuda --example load_bench
#
# (target/release/{tpde,tpde-bench} and target/release/examples/load_bench).
# For each pair, the small MiniLM-shaped case first, then the
# Llama-3-8B-shaped one (~16 GB per checkpoint): generate the pair in
# SCRATCH_DIR (default /tmp/tpde-gpu-llama), `tpde encode` it on every core,
# run load_bench (pinned upload vs `Loader::load` vs `apply_in_place`, with a
# bit-exact check), then delete the pair. Peak disk: base + target + delta of
# the 8B pair, about 40 GB.
#
# Environment:
#   SCALE=F LAYERS=N   gen-llama --scale / --layers (default 1 and 32)
#   REPS=N             timed repetitions per measurement (default 5)
#   ENCODE_ARGS="..."  extra `tpde encode` options, e.g. "--min-gain 0.25"
#   ONLY=small|llama   run one of the two pairs
#   KEEP=1             keep the generated files
set -euo pipefail

if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
bin=$(cd "$1" && pwd)
scratch=${2:-/tmp/tpde-gpu-llama}
scale=${SCALE:-1}
layers=${LAYERS:-32}
reps=${REPS:-5}
only=${ONLY:-}
threads=$(nproc)

load_bench=$bin/load_bench
[ -x "$load_bench" ] || load_bench=$bin/examples/load_bench
for b in "$bin/tpde-bench" "$bin/tpde" "$load_bench"; do
    if [ ! -x "$b" ]; then
        echo "gpu-llama.sh: missing $b" >&2
        exit 2
    fi
done

mkdir -p "$scratch"
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
echo "$threads CPU threads; $(free -g | awk '/^Mem:/{print $2}') GiB RAM"
df -h "$scratch" | tail -1
"$bin/tpde" --version

# Encodes BASE TARGET into DIR/delta.tpde, then runs load_bench on the three.
measure() {
    local name=$1 base=$2 target=$3 dir=$4
    echo
    echo "== $name: tpde encode ($threads threads)"
    local t0=$SECONDS
    # shellcheck disable=SC2086 # ENCODE_ARGS is a list of options
    "$bin/tpde" encode --threads "$threads" ${ENCODE_ARGS:-} "$base" "$target" -o "$dir/delta.tpde" || return 1
    echo "encode: $((SECONDS - t0)) s"
    du -sh "$base" "$target" "$dir/delta.tpde"
    echo
    echo "== $name: load_bench"
    "$load_bench" "$base" "$target" "$dir/delta.tpde" --reps "$reps" --in-place || return 1
}

# The two lines "base PATH" and "target PATH" that the generators print.
path_of() {
    awk -v k="$1" '$1 == k { print $2 }'
}

status=0
if [ "$only" != llama ]; then
    dir=$scratch/small
    rm -rf "$dir"
    mkdir -p "$dir"
    echo
    echo "== small: generate minilm-finetune-bf16"
    out=$("$bin/tpde-bench" gen-case --case minilm-finetune-bf16 --out "$dir")
    measure small "$(path_of base <<<"$out")" "$(path_of target <<<"$out")" "$dir" || status=1
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
fi

if [ "$only" != small ]; then
    dir=$scratch/llama
    rm -rf "$dir"
    mkdir -p "$dir"
    echo
    echo "== llama: generate the Llama-3-8B-shaped pair (scale $scale, $layers layers)"
    t0=$SECONDS
    "$bin/tpde-bench" gen-llama --out "$dir" --scale "$scale" --layers "$layers" >/dev/null
    echo "generate: $((SECONDS - t0)) s"
    measure llama "$dir/base" "$dir/target" "$dir" || status=1
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
fi
exit $status
