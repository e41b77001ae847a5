#!/usr/bin/env bash
# Create (idempotently) the Python venv used by the integration tests and
# print the path of its python interpreter on stdout.
#   usage: scripts/pyenv.sh            -> prints /path/to/repo/.venv/bin/python
#          scripts/pyenv.sh --base     -> the same venv with at least the base tools (numpy,
#                                         safetensors, pytest: the quick tier's), ~15 s fresh
#   in scripts: PY="$(scripts/pyenv.sh)"
#
# Every package is pinned in tests/python/requirements.txt (the whole closure, including
# requirements-base.txt) and installed with `pip install --no-deps`, so nothing unpinned is ever
# resolved. When the venv already holds exactly those packages (a stamp with the files' sha256,
# written only after a successful install and import check), this prints the path at once
# (~10 ms).
#
# Cost on a fresh machine (2 cores, PyPI only, no pip cache; measured 2026-11-29): about
# 2 minutes and 5.6 GB in .venv, almost all of it torch (1.2 GB), the CUDA runtime libraries
# its Linux wheel links against (3.0 GB; see requirements.txt for why and what is left out) and
# vLLM's wheel (0.9 GB, for its loader code).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
REQ="$ROOT/tests/python/requirements.txt"
BASE_REQ="$ROOT/tests/python/requirements-base.txt"
STAMP="$VENV/.reshardfs-requirements.sha256"
BASE_STAMP="$VENV/.reshardfs-requirements-base.sha256"

log() { echo "pyenv: $*" >&2; }

want="$(cat "$REQ" "$BASE_REQ" | sha256sum | cut -d' ' -f1)"
want_base="$(sha256sum "$BASE_REQ" | cut -d' ' -f1)"
stamped() { [ -x "$PY" ] && [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
if stamped "$STAMP" "$want" || { [ "${1:-}" = --base ] && stamped "$BASE_STAMP" "$want_base"; }; then
    echo "$PY"
    exit 0
fi

BASE_PY="${PYTHON:-$(command -v python3)}"
if [ ! -x "$PY" ]; then
    rm -rf "$VENV"
    if ! "$BASE_PY" -m venv "$VENV" >/dev/null 2>&1; then
        log "python3 -m venv failed; installing python3-venv"
        rm -rf "$VENV"
        if [ "$(id -u)" = 0 ]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >&2
            # versioned package name first (e.g. python3.11-venv), then the generic one
            pyver="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
            apt-get install -y -qq "python${pyver}-venv" >&2 || apt-get install -y -qq python3-venv >&2
        else
            log "not root: cannot apt-get install python3-venv"; exit 1
        fi
        "$BASE_PY" -m venv "$VENV"
    fi
fi

rm -f "$STAMP"
if [ "${1:-}" = --base ]; then
    log "installing tests/python/requirements-base.txt into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps -r "$BASE_REQ" >&2
    "$PY" -c "import numpy, safetensors, pytest" >&2 || { log "base packages not importable"; exit 1; }
    echo "$want_base" > "$BASE_STAMP"
    echo "$PY"
    exit 0
fi
log "installing tests/python/requirements.txt into $VENV (torch, transformers, vllm: ~2 min, 5.6 GB the first time)"
# The install needs the venv's 5.6 GB plus pip's unpacked wheel (up to 0.9 GB at a time) on the
# venv's own file system: pip unpacks under TMPDIR, pointed here so that a small /tmp (a tmpfs,
# say) is never what runs out. Free space varies between machines (CI once ran out here), so
# it is printed first, and again if pip fails, to make such a failure say what it was.
free_gb() { df -Pk "$VENV" | awk 'NR == 2 { printf "%.1f", $4 / 1048576 }'; }
log "$(free_gb) GiB free on the venv's file system; the full install needs about 6.5 GiB"
export TMPDIR="$VENV/.pip-tmp"
rm -rf "$TMPDIR" && mkdir -p "$TMPDIR"
start=$(date +%s)
if ! "$PY" -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps -r "$REQ" >&2; then
    log "pip failed with $(free_gb) GiB free on the venv's file system (about 6.5 GiB are needed)"
    rm -rf "$TMPDIR"
    exit 1
fi
rm -rf "$TMPDIR"
unset TMPDIR
# torch must import and compute on CPU; transformers must find torch (it silently degrades
# to "no backend" otherwise, and the Qwen3 tests would then fail on an odd error)
if ! "$PY" - >&2 <<'EOF'
import numpy, safetensors, pytest
import torch
assert float((torch.ones(2, 2) @ torch.ones(2, 2)).sum()) == 8.0
import transformers
from transformers import Qwen3ForCausalLM  # noqa: F401
assert transformers.utils.is_torch_available()
# vLLM's loader, as test_qwen3.py imports it (the wheel's GPU kernels are never loaded)
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader  # noqa: F401
from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator  # noqa: F401
EOF
then
    log "packages installed but not importable"; exit 1
fi
echo "$want" > "$STAMP"
echo "$want_base" > "$BASE_STAMP"
log "done in $(( $(date +%s) - start )) s, venv $(du -sh "$VENV" | cut -f1)"

echo "$PY"
