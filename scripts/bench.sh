#!/usr/bin/env bash
# The reshardfs benchmark: builds synthetic checkpoints (about 2 GiB each by
# default), mounts, reads, exports and converts them, and prints one table of
# figures, ratios and targets (also WORKDIR/bench.md and WORKDIR/bench.json).
# Needs root or /dev/fuse access; takes a few minutes on 2 cores.
#
#   scripts/bench.sh [--size-gib N] [--workdir DIR] [--keep] [--reps N] [--prefault-gib N]
#
# WORKDIR defaults to /var/tmp/reshardfs-bench; the checkpoints are removed at
# the end unless --keep (which also reuses them on the next run). See
# scripts/bench.py for what is measured and how.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$(scripts/pyenv.sh)"
cargo build --release --quiet
exec "$PY" scripts/bench.py "$@"
