#!/usr/bin/env bash
# Run the main job: build twinhost, start the server on its embedded sled store in ./demo-data,
# play the seed's factory floor against it over HTTP, then stop the server cleanly.
#   PORT=7878   listen port          KEEP=1   leave the server running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-7878}"
DATA="${DATA:-demo-data}"

echo "== building (release; the first build compiles wasmtime and takes a few minutes)"
./scripts/build-guests.sh
cargo build --release --bin twinhost --example factory_floor
BIN="${CARGO_TARGET_DIR:-target}/release"

rm -rf "$DATA"
"$BIN/twinhost" serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" --node-id demo-node &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "the server exited; see its log above"; exit 1; }
  sleep 0.1
done

"$BIN/examples/factory_floor" --url "http://127.0.0.1:$PORT" --data-dir "$DATA" \
  --guests guests/target/wasm32-wasip2/release

if [ "${KEEP:-0}" = "1" ]; then
  trap - EXIT
  echo "== the server keeps running (pid $SERVER) on http://127.0.0.1:$PORT; token in $DATA/admin.token"
  wait $SERVER
else
  echo "== stopping the server (SIGTERM: drain, flush, exit 0)"
  kill -TERM $SERVER
  wait $SERVER
  trap - EXIT
  echo "== done. Explore again with: $BIN/twinhost serve --data-dir $DATA"
fi
