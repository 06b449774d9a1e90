#!/usr/bin/env bash
# Build the guest components in guests/ for wasm32-wasip2 (installing the target if needed).
# Output: guests/target/wasm32-wasip2/release/*.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "== installing the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi
echo "== building guest components"
cargo build --release --target wasm32-wasip2 --manifest-path guests/Cargo.toml
ls -l guests/target/wasm32-wasip2/release/*.wasm
