#!/usr/bin/env bash
# Runs every fuzz target for a while and reports executions and crashes.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600 s, all targets)
#
# Targets (fuzz/fuzz_targets/, properties in src/fuzzing.rs): shard_id,
# safetensors_header, metadata, plan. Two run at once (2 cores). Inputs that
# crash are copied to fuzz/regressions/<target>/, where tests/fuzz_regressions.rs
# replays them on every `cargo test --features fuzzing` (scripts/test.sh runs it); commit them with the fix.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`); the stable toolchain runs it
# with RUSTC_BOOTSTRAP=1 (libFuzzer and ASan need -Z flags).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECS="${1:-600}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(shard_id safetensors_header metadata plan)
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
cargo fuzz build >/dev/null
LOGS="$(mktemp -d /tmp/reshardfs-fuzz.XXXXXX)"

run() {
    local t="$1"
    mkdir -p "fuzz/corpus/$t"
    cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=4096 -timeout=30 >"$LOGS/$t.log" 2>&1
    echo $? >"$LOGS/$t.rc"
}

i=0
for t in "${TARGETS[@]}"; do
    run "$t" &
    i=$((i + 1))
    if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait

status=0
printf '%-20s %12s %10s %8s  %s\n' TARGET EXECUTIONS EXEC/S CRASHES CORPUS
for t in "${TARGETS[@]}"; do
    log="$LOGS/$t.log"
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1)
    rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    crashes=0
    if [ "$(cat "$LOGS/$t.rc")" != 0 ]; then
        status=1
        mkdir -p "fuzz/regressions/$t"
        for a in fuzz/artifacts/"$t"/*; do
            [ -e "$a" ] || continue
            cp "$a" "fuzz/regressions/$t/" && crashes=$((crashes + 1))
        done
        echo "--- $t failed; log tail:" >&2
        tail -n 40 "$log" >&2
    fi
    printf '%-20s %12s %10s %8s  %s\n' "$t" "${runs:-?}" "${rate:-?}" "$crashes" \
        "$(find "fuzz/corpus/$t" -type f | wc -l) inputs"
done
echo "logs: $LOGS"
exit $status
