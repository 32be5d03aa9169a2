#!/usr/bin/env bash
# Builds the fuzz targets `open`, `decode`, `apply` and `series_manifest`.
#
#   conformance/fuzz/build.sh --check   type-check the targets with the stable
#                                       toolchain, no sanitizer (fast; for CI)
#   conformance/fuzz/build.sh [ARGS...] build them with cargo-fuzz (AddressSanitizer;
#                                       RUSTC_BOOTSTRAP=1 allows its nightly flags on
#                                       stable); installs cargo-fuzz when missing.
#
# To fuzz, seed a corpus with the golden files and run, for example:
#   conformance/fuzz/seed-corpus.sh decode apply
#   cd conformance/fuzz
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir . decode corpus/decode -- -runs=10000000
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir . apply corpus/apply -- -runs=10000000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ "${1:-}" = "--check" ]; then
  exec cargo check --locked --bins
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir . "$@"
