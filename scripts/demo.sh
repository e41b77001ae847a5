#!/usr/bin/env bash
# The main job on the bundled sample: a real MindSpore Transformers checkpoint
# saved with dp=2 x tp=2 and 2 pipeline stages (8 ranks), shown as a 4-rank
# tp=4 checkpoint with one stage: inspected, planned, mounted, read, compared
# with the same view exported to disk, and unmounted.
#
#   scripts/demo.sh [WORKDIR]     (WORKDIR defaults to a fresh temporary folder)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SAMPLE=tests/fixtures/gpt-dp2-tp2-pp2-bf16
TARGET=(--mesh dp=1,tp=4 --pp 1)
WORK="${1:-$(mktemp -d /tmp/reshardfs-demo.XXXXXX)}"
MNT="$WORK/mnt"
mkdir -p "$MNT"

cargo build --release --quiet
BIN=target/release/reshardfs
cleanup() { umount -l "$MNT" 2>/dev/null || true; }
trap cleanup EXIT

echo "== reshardfs inspect $SAMPLE   (first lines)"
"$BIN" inspect "$SAMPLE" | head -n 12
echo
echo "== reshardfs plan $SAMPLE ${TARGET[*]}   (summary)"
"$BIN" plan "$SAMPLE" "${TARGET[@]}" | tail -n 1
echo
echo "== reshardfs mount $SAMPLE $MNT ${TARGET[*]}"
"$BIN" mount "$SAMPLE" "$MNT" "${TARGET[@]}"
ls -l "$MNT" "$MNT"/iteration_00000001
echo
echo "== $MNT/.reshardfs/plan/iteration_00000001/gpt-model-0000001-0000004.safetensors.txt   (first lines)"
head -n 6 "$MNT/.reshardfs/plan/iteration_00000001/gpt-model-0000001-0000004.safetensors.txt"
echo
echo "== the mounted view equals the same view exported to disk"
"$BIN" export "$SAMPLE" "$WORK/export" "${TARGET[@]}" --force --no-progress
for f in "$WORK"/export/iteration_00000001/* "$WORK"/export/latest_checkpointed_iteration.txt; do
    rel="${f#"$WORK"/export/}"
    cmp "$f" "$MNT/$rel"
    echo "   identical: $rel"
done
echo
echo "== $MNT/.reshardfs/stats"
cat "$MNT/.reshardfs/stats"
echo
echo "== umount $MNT"
umount "$MNT"
trap - EXIT
echo "done; the exported copy is in $WORK/export"
