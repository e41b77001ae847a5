#!/usr/bin/env bash
# Build, run the Rust tests, then the Python integration tests against the debug binary.
#   scripts/test.sh [extra pytest args, e.g. -k fixtures -x]
# Env: RESHARDFS_PROP_CASES (default 150), RESHARDFS_PROP_SEED (property-test base seed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$(scripts/pyenv.sh)"

cargo build
cargo test

# no .pytest_cache / __pycache__ in the work tree
export PYTHONDONTWRITEBYTECODE=1
RESHARDFS_BIN="${RESHARDFS_BIN:-target/debug/reshardfs}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/python "$@"
