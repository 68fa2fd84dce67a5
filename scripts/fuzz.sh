#!/usr/bin/env bash
# Fuzzing: runs each cargo-fuzz target in fuzz/ for SECONDS (default 20),
# starting from its committed seeds in fuzz/corpus/<target>/, prints the
# executions it reached and fails on any crash, hang or failed property.
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs the nightly toolchain (`cargo +nightly`); installs cargo-fuzz when it
# is missing. Inputs the fuzzer finds go to fuzz/target/corpus/<target>/, not
# to the committed seeds. A crash leaves its input in fuzz/artifacts/<target>/;
# once it is fixed, copy that file into fuzz/corpus/<target>/ so that
# tests/fuzz_corpora.rs replays it under a plain `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi
targets=(frame_reader request token channel subject config jwks)
# Only one cargo at a time on a shared machine, the fuzzer's runs included.
lock=/tmp/herald-cargo.lock

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    flock "$lock" cargo install cargo-fuzz --locked
fi
flock "$lock" cargo +nightly fuzz build

failed=0
for target in "${targets[@]}"; do
    found=fuzz/target/corpus/$target
    log=fuzz/target/$target.log
    mkdir -p "$found" "fuzz/artifacts/$target"
    options=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
    if [ -f "fuzz/dict/$target.dict" ]; then
        options+=(-dict="fuzz/dict/$target.dict")
    fi
    # The first corpus directory receives new inputs; the seeds are only read.
    if flock "$lock" cargo +nightly fuzz run "$target" "$found" "fuzz/corpus/$target" -- \
        "${options[@]}" >"$log" 2>&1; then
        outcome=ok
    else
        outcome="FAILED (see $log)"
        failed=1
    fi
    # libFuzzer's last words: "Done 123456 runs in 20 second(s)", and the
    # final stats when it stopped on a crash.
    runs=$(sed -n 's/^Done \([0-9]*\) runs in.*/\1/p' "$log" | tail -n 1)
    if [ -z "$runs" ]; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    fi
    echo "fuzz: $target: ${runs:-?} executions in ${seconds}s, $outcome"
    if [ "$outcome" != ok ]; then
        grep -E "panicked at|^thread '|Test unit written to|ERROR: " "$log" | head -n 8 | sed 's/^/fuzz:   /'
    fi
done
exit "$failed"
