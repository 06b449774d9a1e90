#!/usr/bin/env bash
# Run the main job: build twinhost, start the server on its embedded sled store in ./demo-data
# (the edge node), start a second node in ./demo-data-cloud linked to it over WebSocket (the
# cloud node), play the seed's factory floor against the edge over HTTP, show that the cloud
# holds the same twins, merge a conflicting write on both nodes with the max-resolver component,
# run the seed's workflow, watch a simulated machine warm up on ticks, then stop both cleanly.
#   PORT=7878   edge listen port (the cloud listens on PORT+1)
#   KEEP=1      leave the servers running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-7878}"
DATA="${DATA:-demo-data}"

echo "== building (release; the first build compiles wasmtime and takes a few minutes)"
./scripts/build-guests.sh
cargo build --release --bin twinhost --example factory_floor
BIN="${CARGO_TARGET_DIR:-target}/release"

CLOUD_PORT=$((PORT + 1))
rm -rf "$DATA" "$DATA-cloud"
"$BIN/twinhost" serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" --node-id demo-node &
SERVER=$!
CLOUD=
trap 'kill -TERM $SERVER $CLOUD 2>/dev/null || true' EXIT
wait_up() { # port pid
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "the server exited; see its log above"; exit 1; }
    sleep 0.1
  done
}
wait_up "$PORT" "$SERVER"

# The cloud node dials the edge with a token of the `peer` role (it may only sync).
PEER_TOKEN=$("$BIN/twinhost" token create --role peer --url "http://127.0.0.1:$PORT" --data-dir "$DATA")
"$BIN/twinhost" serve --data-dir "$DATA-cloud" --listen "127.0.0.1:$CLOUD_PORT" --node-id demo-cloud \
  --peer "http://127.0.0.1:$PORT" --peer-token "$PEER_TOKEN" 2>"$DATA-cloud.log" &
CLOUD=$!
wait_up "$CLOUD_PORT" "$CLOUD"
echo "== a cloud node (demo-cloud) on http://127.0.0.1:$CLOUD_PORT syncs with this edge node over WebSocket (log: $DATA-cloud.log)"

"$BIN/examples/factory_floor" --url "http://127.0.0.1:$PORT" --data-dir "$DATA" \
  --guests guests/target/wasm32-wasip2/release

echo "== the cloud node holds the same twins (changes made on the edge, replicated)"
EDGE_TOKEN=$(cat "$DATA/admin.token")
CLOUD_TOKEN=$(cat "$DATA-cloud/admin.token")
count() { # port token body → number of twins the query matches
  curl -fs -X POST -H "Authorization: Bearer $2" -H 'content-type: application/json' \
    -d "$3" "http://127.0.0.1:$1/v1/query" |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)["items"]))'
}
ALL='{"entity_type": "machine", "limit": 1000}'
HOT='{"entity_type": "machine", "properties": {"overheated": true}, "limit": 1000}'
for _ in $(seq 1 50); do
  [ "$(count "$PORT" "$EDGE_TOKEN" "$HOT")" = "$(count "$CLOUD_PORT" "$CLOUD_TOKEN" "$HOT")" ] &&
    [ "$(count "$PORT" "$EDGE_TOKEN" "$ALL")" = "$(count "$CLOUD_PORT" "$CLOUD_TOKEN" "$ALL")" ] && break
  sleep 0.1
done
echo "   machines: edge $(count "$PORT" "$EDGE_TOKEN" "$ALL"), cloud $(count "$CLOUD_PORT" "$CLOUD_TOKEN" "$ALL");" \
  "marked overheated by the edge's behavior: edge $(count "$PORT" "$EDGE_TOKEN" "$HOT"), cloud $(count "$CLOUD_PORT" "$CLOUD_TOKEN" "$HOT")"
alerts() { # port token → "<count> (<origins>)" of the node's alert events
  python3 - "$1" "$2" <<'PY'
import json, sys, urllib.request
port, token = sys.argv[1], sys.argv[2]
after, n, origins = 0, 0, set()
while True:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/events/log?types=alert&limit=10000&after={after}",
        headers={"Authorization": f"Bearer {token}"})
    page = json.load(urllib.request.urlopen(req))
    n += len(page["events"])
    origins.update(e["origin"] for e in page["events"])
    if page["next_after"] == after or page["next_after"] + 1 >= page["next_seq"]:
        break
    after = page["next_after"]
print(f"{n} (raised on {', '.join(sorted(origins)) or 'none'})")
PY
}
for _ in $(seq 1 50); do
  [ "$(alerts "$PORT" "$EDGE_TOKEN")" = "$(alerts "$CLOUD_PORT" "$CLOUD_TOKEN")" ] && break
  sleep 0.1
done
echo "   alerts: edge $(alerts "$PORT" "$EDGE_TOKEN"), cloud $(alerts "$CLOUD_PORT" "$CLOUD_TOKEN") (forwarded over the link, each once)"
curl -fs -H "Authorization: Bearer $CLOUD_TOKEN" "http://127.0.0.1:$CLOUD_PORT/v1/peers" | python3 -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    print("   link with %s: %s, %s entries and %s alerts received, %s bytes, last lag %s ms"
          % (p["node_id"], p["state"], p.get("ops_in"), p.get("alerts_in"), p.get("bytes_in"), p.get("lag_ms")))'

api() { # method port token path [body] → response body
  curl -fs -X "$1" -H "Authorization: Bearer $3" -H 'content-type: application/json' \
    ${5:+-d "$5"} "http://127.0.0.1:$2$4"
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "== a conflict: both nodes write one property while apart; the model's resolver merges it"
# Modules stay per node: the resolver goes to both. The model, put on the edge, replicates.
WASM=guests/target/wasm32-wasip2/release/max_resolver.wasm
for p in "$PORT:$EDGE_TOKEN" "$CLOUD_PORT:$CLOUD_TOKEN"; do
  SHA=$(curl -fs -X PUT -H "Authorization: Bearer ${p#*:}" -H 'content-type: application/wasm' \
    --data-binary "@$WASM" "http://127.0.0.1:${p%%:*}/v1/modules/max-resolver" | field '["sha256"]')
done
api PUT "$PORT" "$EDGE_TOKEN" /v1/models/boiler \
  "{\"conflict\": {\"strategy\": \"merge\", \"resolver\": \"max-resolver\", \"sha256\": \"$SHA\"}}" >/dev/null
BOILER=$(api POST "$PORT" "$EDGE_TOKEN" /v1/twins '{"entity_type": "boiler", "properties": {"pressure": 1}}' | field '["id"]')
for _ in $(seq 1 50); do
  api GET "$CLOUD_PORT" "$CLOUD_TOKEN" "/v1/twins/$BOILER" >/dev/null 2>&1 &&
    api GET "$CLOUD_PORT" "$CLOUD_TOKEN" /v1/models/boiler >/dev/null 2>&1 && break
  sleep 0.1
done
# Apart: the cloud restarts without its link; the edge writes 9, then the cloud writes 4
# (last-writer-wins would keep 4; the max-resolver keeps the larger).
kill -TERM $CLOUD; wait $CLOUD || true
"$BIN/twinhost" serve --data-dir "$DATA-cloud" --listen "127.0.0.1:$CLOUD_PORT" --node-id demo-cloud \
  2>>"$DATA-cloud.log" &
CLOUD=$!
wait_up "$CLOUD_PORT" "$CLOUD"
api PATCH "$PORT" "$EDGE_TOKEN" "/v1/twins/$BOILER" '{"pressure": 9}' >/dev/null
sleep 0.05
api PATCH "$CLOUD_PORT" "$CLOUD_TOKEN" "/v1/twins/$BOILER" '{"pressure": 4}' >/dev/null
echo "   apart: edge pressure 9, then cloud pressure 4"
kill -TERM $CLOUD; wait $CLOUD || true
"$BIN/twinhost" serve --data-dir "$DATA-cloud" --listen "127.0.0.1:$CLOUD_PORT" --node-id demo-cloud \
  --peer "http://127.0.0.1:$PORT" --peer-token "$PEER_TOKEN" 2>>"$DATA-cloud.log" &
CLOUD=$!
wait_up "$CLOUD_PORT" "$CLOUD"
for _ in $(seq 1 100); do
  [ "$(api GET "$PORT" "$EDGE_TOKEN" /v1/conflicts | field '["items"].__len__()')" = 1 ] &&
    [ "$(api GET "$CLOUD_PORT" "$CLOUD_TOKEN" /v1/conflicts | field '["items"].__len__()')" = 1 ] && break
  sleep 0.1
done
echo "   linked again: pressure edge $(api GET "$PORT" "$EDGE_TOKEN" "/v1/twins/$BOILER" | field '["properties"]["pressure"]')," \
  "cloud $(api GET "$CLOUD_PORT" "$CLOUD_TOKEN" "/v1/twins/$BOILER" | field '["properties"]["pressure"]')"
api GET "$CLOUD_PORT" "$CLOUD_TOKEN" /v1/conflicts | python3 -c '
import json, sys
for c in json.load(sys.stdin)["items"]:
    print("   conflict %s on %s: %s, sides %s -> %s" % (c["id"], c["property"], c["strategy"],
          " and ".join("%s from %s" % (s["value"], s["origin"]) for s in c["sides"]), c["value"]))'


echo "== the seed's workflow on the edge: collect_temperatures -> analyze_patterns over the 100 machines"
BUILDING=$(curl -fs -X POST -H "Authorization: Bearer $EDGE_TOKEN" -H 'content-type: application/json' \
  -d '{"entity_type": "building", "limit": 1}' "http://127.0.0.1:$PORT/v1/query" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')
WORKFLOW='{"steps": [
  {"id": "collect_temperatures", "type": "aggregate", "function": "collect_property",
   "query": {"entity_type": "machine", "parent_id": "'"$BUILDING"'", "limit": 1000},
   "parameters": {"property": "temperature"}},
  {"id": "hottest", "type": "aggregate", "function": "max", "parameters": {"property": "temperature", "group_by": "parent"},
   "query": {"entity_type": "machine", "parent_id": "'"$BUILDING"'", "limit": 1000}},
  {"id": "analyze_patterns", "type": "compute", "twin_ids": ["'"$BUILDING"'"], "function": "thermal-analysis",
   "parameters": {"algorithm": "thermal_analysis"}}],
  "dependencies": {"analyze_patterns": ["collect_temperatures"]}}'
curl -fs -X POST -H "Authorization: Bearer $EDGE_TOKEN" -H 'content-type: application/json' \
  -d "$WORKFLOW" "http://127.0.0.1:$PORT/v1/workflows?wait=true" | python3 -c '
import json, sys
from datetime import datetime
run = json.load(sys.stdin)
def ms(s):
    t = lambda k: datetime.fromisoformat(s[k].replace("Z", "+00:00"))
    return (t("finished_at") - t("started_at")).total_seconds() * 1000
steps = run["steps"]
a = steps["analyze_patterns"]["result"]
r = next(iter(a.values()))
print("   run %s: %s" % (run["id"], run["status"]))
print("   collect_temperatures: %d machines (%.1f ms); hottest: %s (%.1f ms, in parallel)"
      % (len(steps["collect_temperatures"]["result"]), ms(steps["collect_temperatures"]),
         next(iter(steps["hottest"]["result"].values())), ms(steps["hottest"])))
print("   analyze_patterns (thermal-analysis on the building, given the temperatures): "
      "mean %.1f, max %.1f, %d over 85 (%.1f ms)" % (r["mean"], r["max"], r["over_threshold"], ms(steps["analyze_patterns"])))'

echo "== a simulated machine warms up on ticks: machine-sim bound with \"every\": \"200ms\""
curl -fs -X PUT -H "Authorization: Bearer $EDGE_TOKEN" -H 'content-type: application/wasm' \
  --data-binary @guests/target/wasm32-wasip2/release/machine_sim.wasm \
  "http://127.0.0.1:$PORT/v1/modules/machine-sim" >/dev/null
SIM=$(api POST "$PORT" "$EDGE_TOKEN" /v1/twins \
  "{\"entity_type\": \"simulated-machine\", \"parent_id\": \"$BUILDING\", \"properties\": {\"temperature\": 20, \"target_temperature\": 80}}" |
  field '["id"]')
api PUT "$PORT" "$EDGE_TOKEN" /v1/behaviors/simulate \
  '{"module": "machine-sim", "entity_type": "simulated-machine", "every": "200ms"}' >/dev/null
TEMPS=""
for _ in $(seq 1 8); do
  TEMPS="$TEMPS $(api GET "$PORT" "$EDGE_TOKEN" "/v1/twins/$SIM" | field '["properties"]["temperature"]')"
  sleep 0.4
done
echo "   temperature every 0.4 s on the edge:$TEMPS (target 80)"
api GET "$PORT" "$EDGE_TOKEN" /v1/behaviors/simulate | python3 -c '
import json, sys
b = json.load(sys.stdin)
print("   behavior simulate: %d ticks, %d skipped (the pool was busy), %d patches, %d errors"
      % (b["ticks"], b["ticks_skipped"], b["patches"], b["errors"]))'
# Unbound, the machine stops where it is; the cloud's copy catches up with it.
api DELETE "$PORT" "$EDGE_TOKEN" /v1/behaviors/simulate >/dev/null
temp() { api GET "$1" "$2" "/v1/twins/$SIM" 2>/dev/null | field '["properties"]["temperature"]' 2>/dev/null; }
for _ in $(seq 1 50); do
  [ "$(temp "$CLOUD_PORT" "$CLOUD_TOKEN")" = "$(temp "$PORT" "$EDGE_TOKEN")" ] && break
  sleep 0.1
done
echo "   unbound: edge $(temp "$PORT" "$EDGE_TOKEN"), cloud $(temp "$CLOUD_PORT" "$CLOUD_TOKEN")" \
  "(the ticks ran on the edge; their patches replicate)"

if [ "${KEEP:-0}" = "1" ]; then
  trap - EXIT
  echo "== the servers keep running: edge (pid $SERVER) on http://127.0.0.1:$PORT, token in $DATA/admin.token;"
  echo "   cloud (pid $CLOUD) on http://127.0.0.1:$CLOUD_PORT, token in $DATA-cloud/admin.token"
  wait $SERVER
else
  echo "== stopping both nodes (SIGTERM: drain, flush, exit 0)"
  kill -TERM $SERVER $CLOUD
  wait $SERVER
  wait $CLOUD
  trap - EXIT
  echo "== done. Explore again with: $BIN/twinhost serve --data-dir $DATA"
fi
