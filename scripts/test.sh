#!/usr/bin/env bash
# Run the whole test suite: unit tests, and end-to-end tests that start the real binary.
# Prints cargo test's summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests upload the guest components: build them first (installs wasm32-wasip2).
./scripts/build-guests.sh
mkdir -p target
set +e
# --release: the same build as scripts/demo.sh, so a newcomer compiles wasmtime once for both.
cargo test --release --workspace --no-fail-fast 2>&1 | tee target/test.log
status=${PIPESTATUS[0]}
# The guest SDK is outside the workspace (it targets wasm32-wasip2) but its unit tests run on
# the host target.
cargo test --manifest-path sdk/Cargo.toml 2>&1 | tee -a target/test.log
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
set -e
echo
echo "== summary"
grep -E "^test result:|Running " target/test.log | sed 's/^ *//'
grep -E "^test result:" target/test.log |
  awk '{for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }}
       END { printf "total: %d passed, %d failed\n", p, f }'
exit "$status"
