#!/usr/bin/env bash
# A short run of every fuzz target, from its kept corpus: each must finish without a crash.
# The long runs (10 million executions each) are in README.md, Fuzzing.
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-20000}
for target in frame_codec request_validation allowlist config argv_template; do
    # Into a scratch copy: the kept corpus only changes when someone minimises it on purpose.
    scratch=$(mktemp -d)
    log=$(mktemp)
    cp -r "corpus/$target/." "$scratch/"
    if ! cargo +nightly fuzz run -O "$target" "$scratch" -- -runs="$RUNS" -max_len=4096 \
        -close_fd_mask=3 >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "fuzz $target: FAILED; the crashing input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    echo "fuzz $target: $(grep -E '^Done ' "$log" | tail -n 1)"
    rm -rf "$scratch" "$log"
done
