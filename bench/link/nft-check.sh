#!/usr/bin/env bash
# Cross-checks the UDP proxy's loss model against the kernel's: the origin → relay latency
# of `link-latency` at 50 ms RTT + 2 % loss and 100 ms RTT + 5 % loss, once with the loss
# drawn by the proxy and once dropped by nftables (`numgen random` on the input hook) while
# the proxy adds only the delay. Runs alternate; one table line per run.
#
#   bench/link/nft-check.sh [SECONDS] [RUNS]      defaults: 30 s per run, 1 pair of runs
#
# Everything runs in a new network namespace with only loopback (unshare -n), so the rules
# never touch the host's ruleset and no datagram leaves the namespace. Needs root (or
# unprivileged user namespaces, then unshare -rn is used) and nftables, installed if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-30}"
runs="${2:-1}"

if ! command -v nft >/dev/null; then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
    --no-install-recommends nftables
fi
cargo build --release -p tern-bench-link --bin link-latency
userns=()
[[ $(id -u) -ne 0 ]] && userns=(-r)
exec unshare "${userns[@]}" -n sh -c \
  'ip link set lo up && exec target/release/link-latency --compare-nft --seconds "$1" --runs "$2"' \
  sh "$seconds" "$runs"
