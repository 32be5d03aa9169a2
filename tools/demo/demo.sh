#!/usr/bin/env bash
# The main job on the example pair: encode a fine-tune against its base, inspect the
# delta, rebuild the fine-tune from it, and prove the rebuild is byte-identical.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

cargo build --release --quiet --manifest-path "$repo/Cargo.toml" -p tpde-cli
tpde="$(cargo metadata --format-version 1 --no-deps --manifest-path "$repo/Cargo.toml" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/tpde"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
base="$here/base.safetensors"
target="$here/target.safetensors"

echo "== encode: base + fine-tune -> delta"
"$tpde" encode "$base" "$target" -o "$work/finetune.tpde"
echo
echo "== inspect"
"$tpde" inspect "$work/finetune.tpde"
echo
echo "== apply: base + delta -> rebuilt fine-tune"
"$tpde" apply "$base" "$work/finetune.tpde" -o "$work/rebuilt.safetensors"
echo
echo "== byte identity"
cmp "$target" "$work/rebuilt.safetensors"
sha256sum "$target" "$work/rebuilt.safetensors" | sed "s|$work/||; s|$here/||"
"$tpde" verify "$base" "$work/finetune.tpde" --target "$target"
echo
target_bytes=$(stat -c %s "$target")
delta_bytes=$(stat -c %s "$work/finetune.tpde")
python3 - "$target_bytes" "$delta_bytes" <<'PY'
import sys
target, delta = map(int, sys.argv[1:])
print(f"summary: target {target:,} bytes -> delta {delta:,} bytes "
      f"({100 * delta / target:.1f}% of the target, {target / delta:.1f}x smaller); "
      "rebuilt file is byte-identical (cmp and sha256 agree)")
PY
