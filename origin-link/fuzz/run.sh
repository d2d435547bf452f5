#!/usr/bin/env bash
# Fuzzes one target of the origin-link wire codec for SECONDS (default 600) with cargo-fuzz,
# from the committed seeds (seeds/TARGET) and the working corpus (corpus/TARGET, not
# committed, grows between runs). Extra arguments go to libFuzzer.
#
#   origin-link/fuzz/run.sh decode 600
#   origin-link/fuzz/run.sh round_trip 60 -jobs=2
#
# AddressSanitizer needs `-Zsanitizer`, a nightly flag: on stable Rust, RUSTC_BOOTSTRAP=1
# allows it (TERN_FUZZ_SANITIZER=none builds without). Needs `cargo install cargo-fuzz`
# (scripts/setup installs it). A crash leaves its input in artifacts/TARGET/: add it to
# seeds/TARGET (`cargo test` replays every file there) and fix the codec.
set -euo pipefail
cd "$(dirname "$0")"
target="${1:?usage: run.sh decode|round_trip [SECONDS] [libFuzzer args...]}"
seconds="${2:-600}"
shift $(($# < 2 ? $# : 2))
mkdir -p "corpus/$target"
RUSTC_BOOTSTRAP=1 exec cargo fuzz run --sanitizer "${TERN_FUZZ_SANITIZER:-address}" \
  --target-dir ../../target/fuzz "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -print_final_stats=1 "$@"
