#!/usr/bin/env bash
# The main job on the bundled sample: a real MindSpore Transformers checkpoint
# saved with dp=2 x tp=2 and 2 pipeline stages (8 ranks), shown as a 4-rank
# tp=4 checkpoint with one stage: inspected, planned, mounted, read, compared
# with the same view exported to disk, and unmounted. Then the Hugging Face
# bridge: a transformers-written Qwen3 folder mounted as the checkpoint
# MindSpore Transformers writes for dp=1 x tp=2 x 2 stages (compared with
# MindSpore's own files), and a MindSpore Transformers Qwen3 checkpoint
# (float32) mounted as a Hugging Face folder in bf16.
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
MNT2="$WORK/mnt-hf"
mkdir -p "$MNT2"
cleanup() {
    umount -l "$MNT" 2>/dev/null || true
    umount -l "$MNT2" 2>/dev/null || true
}
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
echo

HF=tests/fixtures/qwen3-tiny-hf
EXPECTED="tests/fixtures/expected/qwen3-tiny-hf.dp=1,tp=2,pp=2"
echo "== reshardfs mount $HF $MNT --mesh dp=1,tp=2 --pp 2   (a Hugging Face Qwen3 as MindSpore Transformers)"
"$BIN" mount "$HF" "$MNT" --mesh dp=1,tp=2 --pp 2
ls -l "$MNT"
for f in "$EXPECTED"/qwen3-model-*.safetensors; do
    cmp "$f" "$MNT/$(basename "$f")"
    echo "   identical to MindSpore Transformers' own: $(basename "$f")"
done
umount "$MNT"
echo
MF=tests/fixtures/qwen3-tiny-mf-tp2-pp2-f32
echo "== reshardfs mount $MF $MNT2 --hf --hf-files $HF --dtype bf16   (MindSpore Transformers as Hugging Face)"
"$BIN" mount "$MF" "$MNT2" --hf --hf-files "$HF" --dtype bf16
ls -l "$MNT2"/iteration_00001000
"$(scripts/pyenv.sh)" - "$MNT2/iteration_00001000" "$HF" <<'PY'
import sys
from pathlib import Path
from safetensors import safe_open

def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out

mounted, original = tensors(sys.argv[1]), tensors(sys.argv[2])
assert mounted.keys() == original.keys(), "tensor names differ"
assert all(mounted[k].dtype == original[k].dtype and mounted[k].equal(original[k]) for k in original)
print(f"   {len(original)} tensors equal to transformers' own folder (names, dtypes, values)")
PY
umount "$MNT2"
trap - EXIT
echo "done; the exported copy is in $WORK/export"
