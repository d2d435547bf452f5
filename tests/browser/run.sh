#!/bin/sh
# Run the browser end-to-end tests inside a private network namespace that has only
# loopback, so Chromium's ICE can only use 127.0.0.1 (see docs / PEERS.md).
#
#   tests/browser/run.sh                         # all tests in tests/browser/
#   tests/browser/run.sh tests/browser/hls.test.mjs
#   TERN_BIN=/path/to/tern TERN_TEST_LOG=1 tests/browser/run.sh
#
# Works from any directory; paths given as arguments are relative to the repo root.
# Needs root (CI, dev VMs); without root it falls back to an unprivileged user namespace.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

if [ ! -d "$here/node_modules/playwright-core" ]; then
  npm ci --prefix "$here" --no-audit --no-fund
fi
if [ ! -f web/node_modules/hls.js/dist/hls.min.js ]; then
  npm ci --prefix web --no-audit --no-fund
fi

[ "$#" -gt 0 ] || set -- tests/browser/

# One tern at a time: each test file starts its own `tern demo`, which also binds
# non-HTTP ports (media, origin link) that two instances might otherwise both want.
if [ "$(id -u)" = 0 ]; then ns="-n"; else ns="-rn"; fi
exec unshare $ns sh -c 'ip link set lo up && exec node --test --test-concurrency=1 --test-force-exit "$@"' sh "$@"
