#!/usr/bin/env bash
# The reshardfs benchmark: builds synthetic checkpoints (about 2 GiB each by
# default), mounts, reads, exports and converts them, and prints one table of
# figures, ratios and targets (also WORKDIR/bench.md and WORKDIR/bench.json).
# Needs root or /dev/fuse access; takes a few minutes on 2 cores.
#
#   scripts/bench.sh [--size-gib N] [--workdir DIR] [--keep] [--reps N] [--only 11,12,...]
#                    [--cold-reps N] [--cold-size-gib N] [--pt-size-gib N]
#   scripts/bench.sh qwen3 [--reps N] [--keep] [--quick]   # the Hugging Face bridge rows only
#   scripts/bench.sh s3 [--reps N] [--layers N] [--latency-ms MS] [--keep]   # object-store rows
#
# Without `qwen3`, the Hugging Face bridge rows (scripts/bench_qwen3.py: Q1-Q3)
# run after the others unless BENCH_QWEN3=0.
#
# Sections 11-15 drop the page cache before every pass (root); section 13
# serves the checkpoint over sshfs from an sshd in a network namespace and
# installs Debian's openssh-server and sshfs when they are missing.
#
# WORKDIR defaults to /var/tmp/reshardfs-bench; the checkpoints are removed at
# the end unless --keep (which also reuses them on the next run). See
# scripts/bench.py for what is measured and how.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$(scripts/pyenv.sh)"
if { ! command -v sshfs >/dev/null || [ ! -x /usr/sbin/sshd ]; } && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
    echo "bench: installing openssh-server and sshfs (section 13)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq openssh-server sshfs >&2 \
        || { apt-get update -qq >&2 && apt-get install -y -qq openssh-server sshfs >&2; } \
        || echo "bench: could not install them; section 13 will fail" >&2
fi
cargo build --release --quiet
if [ "${1:-}" = s3 ]; then
    shift
    # The S3 server (s3rver, npm) and the clients compared with (Debian's rclone and s3fs).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # Only what is missing: a Node.js from elsewhere (nodesource's has npm inside it)
        # conflicts with Debian's nodejs and npm packages.
        missing=()
        for t in rclone s3fs; do command -v "$t" >/dev/null || missing+=("$t"); done
        command -v npm >/dev/null || missing+=(nodejs npm)
        if [ "${#missing[@]}" -gt 0 ]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -qq "${missing[@]}" >&2 \
                || { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; }
        fi
    fi
    [ -d tests/s3/node_modules/s3rver ] || npm ci --prefix tests/s3 --no-audit --no-fund --loglevel=error
    exec "$PY" scripts/bench_s3.py "$@"
fi
if [ "${1:-}" = qwen3 ]; then
    shift
    exec "$PY" scripts/bench_qwen3.py "$@"
fi
"$PY" scripts/bench.py "$@"
if [ "${BENCH_QWEN3:-1}" != 0 ]; then
    "$PY" scripts/bench_qwen3.py
fi
