#!/usr/bin/env bash
# Check formatting and lints, build, run the Rust tests, then the Python integration tests
# against the debug binary.
#   scripts/test.sh [extra pytest args, e.g. -k fixtures -x]
# Env: RESHARDFS_PROP_CASES (default 150), RESHARDFS_PROP_SEED (property-test base seed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$(scripts/pyenv.sh)"

# The mount tests need FUSE's fusermount3 (Debian's fuse3): install it when missing and root.
if ! command -v fusermount3 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
    else
        echo "test.sh: fusermount3 is missing; install Debian's fuse3 (as root: apt-get install fuse3)" >&2
    fi
fi

# Formatting and lints first: a style or lint failure fails the suite.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo build
cargo test

# no .pytest_cache / __pycache__ in the work tree
export PYTHONDONTWRITEBYTECODE=1
RESHARDFS_BIN="${RESHARDFS_BIN:-target/debug/reshardfs}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/python "$@"
