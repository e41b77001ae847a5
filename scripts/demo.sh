#!/usr/bin/env bash
# The main job on the bundled sample: a real MindSpore Transformers checkpoint
# saved with dp=2 x tp=2 and 2 pipeline stages (8 ranks), shown as a 4-rank
# tp=4 checkpoint with one stage.
#
#   scripts/demo.sh [OUT]     (OUT defaults to a fresh temporary folder)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SAMPLE=tests/fixtures/gpt-dp2-tp2-pp2-bf16
OUT="${1:-$(mktemp -d /tmp/reshardfs-demo.XXXXXX)}"

cargo build --release --quiet
BIN=target/release/reshardfs

echo "== reshardfs inspect $SAMPLE"
"$BIN" inspect "$SAMPLE" | head -n 14
echo "   ..."
echo
echo "== reshardfs plan $SAMPLE --mesh dp=1,tp=4 --pp 1   (first lines and the totals)"
"$BIN" plan "$SAMPLE" --mesh dp=1,tp=4 --pp 1 > "$OUT.plan.txt"
head -n 8 "$OUT.plan.txt"
echo "   ..."
tail -n 1 "$OUT.plan.txt"
rm -f "$OUT.plan.txt"
echo
echo "== reshardfs export $SAMPLE $OUT/view --mesh dp=1,tp=4 --pp 1"
"$BIN" export "$SAMPLE" "$OUT/view" --mesh dp=1,tp=4 --pp 1 --force
ls -l "$OUT/view" "$OUT/view"/iteration_*
echo
echo "The exported view is in $OUT/view"
