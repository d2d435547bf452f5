#!/usr/bin/env bash
# Tern's relay and the Janus streaming plugin side by side, in one run, on the same network
# path: everything (both servers, the RTP source, every listener) runs inside a fresh network
# namespace holding only loopback and a veth pair d0 (10.77.0.1, the servers' WebRTC side)
# and d1 (10.77.0.2, the listeners). Janus gathers no loopback candidates, hence the pair; no
# packet leaves the namespace.
#
# Both addresses are local, so the kernel would normally carry their traffic over lo. Janus's
# ICE sockets are bound to d0, so its packets cross the veth instead (and arrive on d1 with a
# local source address, which needs accept_local). Policy routes send all locally generated
# 10.77.0.1 <-> 10.77.0.2 traffic over the veth, Tern's too, so both servers pay for the same path.
#
#   bench/relay/janus-vs-tern.sh [--listeners 100,300,600] [--seconds 8] [other tern-bench-relay flags]
#
# Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) for the namespace, and Debian's janus.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" != "--inside" ]; then
  if ! command -v janus >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends janus >&2
  fi
  cargo build --release -q -p tern-bench-relay -p tern-relay
  exec unshare -n "$0" --inside "$@"
fi
shift

ip link set lo up
ip link add d0 type veth peer name d1
ip addr add 10.77.0.1/24 dev d0
ip addr add 10.77.0.2/24 dev d1
ip link set d0 up
ip link set d1 up
for i in all default d0 d1; do
  sysctl -qw "net.ipv4.conf.$i.accept_local=1" "net.ipv4.conf.$i.rp_filter=0"
done
# Locally generated traffic between the two ends goes over the veth, both ways. `iif lo`
# keeps the rules off received packets, which the local table still delivers.
ip route add 10.77.0.2 dev d0 src 10.77.0.1 table 77
ip route add 10.77.0.1 dev d1 src 10.77.0.2 table 77
ip rule add pref 10 iif lo from 10.77.0.1 to 10.77.0.2 lookup 77
ip rule add pref 11 iif lo from 10.77.0.2 to 10.77.0.1 lookup 77
ip rule add pref 100 lookup local
ip rule del pref 0

servers=(--servers tern,janus)
for a in "$@"; do [[ $a == --servers* ]] && servers=(); done
exec target/release/tern-bench-relay --tern target/release/tern "${servers[@]}" \
  --server-ip 10.77.0.1 --listener-ip 10.77.0.2 --janus-iface d0 "$@"
