#!/usr/bin/env bash
# Long load run: 16 readers at random offsets and lengths over every view
# file of a synthetic checkpoint for SECONDS (default 300), checking every
# byte against an exported copy, while the daemon's RSS is sampled every 10 s.
#
#   scripts/load.sh [SECONDS] [CACHE_SIZE]       (defaults: 300, 256M)
#
# Prints the RSS curve and a summary; exits non-zero on any wrong byte, read
# error, or a daemon that died. (The test suite runs the same readers for 30 s:
# tests/python/test_load.py.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECONDS_RUN="${1:-300}"
CACHE="${2:-256M}"
PY="$(scripts/pyenv.sh)"
cargo build --release --quiet
BIN="$ROOT/target/release/reshardfs"
WORK="$(mktemp -d /var/tmp/reshardfs-load.XXXXXX)"
MNT="$WORK/mnt"
mkdir -p "$MNT"
cleanup() {
    umount -l "$MNT" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

TARGET=(--mesh tp=2 --pp 1)
echo "== synthetic checkpoint (hidden 1024, 4 layers, tp=4 x pp=2, Adam states)"
"$PY" scripts/synth_checkpoint.py "$WORK/src" --layers 4 --hidden 1024 --vocab 16384 --tp 4 --pp 2 --opt
"$BIN" export "$WORK/src" "$WORK/ref" "${TARGET[@]}" --no-progress
du -sh "$WORK/ref"
"$BIN" mount "$WORK/src" "$MNT" "${TARGET[@]}" --cache-size "$CACHE"
PID=$(awk '/^pid:/{print $2}' "$MNT/.reshardfs/stats")
mapfile -t FILES < <(cd "$WORK/ref" && find . -type f -name '*.safetensors' | sort)

echo "== 16 readers for $SECONDS_RUN s, cache $CACHE, daemon pid $PID"
pids=()
for seed in $(seq 1 16); do
    timeout $((SECONDS_RUN + 120)) "$PY" tests/python/loadreader.py "$seed" "$SECONDS_RUN" "$MNT" "$WORK/ref" "${FILES[@]}" \
        >"$WORK/reader-$seed.json" 2>"$WORK/reader-$seed.err" &
    pids+=($!)
done
echo "   t(s)   RSS(MiB)"
start=$(date +%s)
while kill -0 "${pids[0]}" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/{print int($2/1024)}' "/proc/$PID/status" 2>/dev/null || echo "?")
    printf '   %4d   %s\n' $(($(date +%s) - start)) "$rss"
    sleep 10
done
fail=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || fail=1
done
hwm=$(awk '/^VmHWM:/{print int($2/1024)}' "/proc/$PID/status")
"$PY" - "$WORK" <<'PYEOF'
import json, sys, glob
rs = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/reader-*.json")]
print(f"== {len(rs)} readers: {sum(r['reads'] for r in rs)} reads, {sum(r['bytes'] for r in rs) / 2**30:.1f} GiB, "
      f"{sum(r['mismatches'] for r in rs)} wrong, {sum(r['errors'] for r in rs)} errors, "
      f"slowest read {max(r['max_read_s'] for r in rs):.3f} s")
PYEOF
echo "== daemon peak RSS $hwm MiB; stats:"
cat "$MNT/.reshardfs/stats"
kill -0 "$PID" || { echo "daemon died"; fail=1; }
exit $fail
