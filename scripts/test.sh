#!/usr/bin/env bash
# Every test: formatting and lints, the fuser fork against crate + patch, the Rust unit and
# property tests, then the Python integration tests (real FUSE mounts read by real clients)
# against the debug binary, and the test-hook tests again against a release-profile binary.
#
#   scripts/test.sh [extra pytest args, e.g. -k fixtures -x]
#   scripts/test.sh --quick [extra pytest args]
#
# --quick: formatting, lints, the Rust tests and the Python tests that need neither FUSE nor
# torch/transformers/vLLM (pytest -m "not fuse and not hf_stack and not slow"), with only numpy,
# safetensors and pytest installed (about a minute once built). CI runs everything.
#
# Env: RESHARDFS_PROP_CASES (default 150), RESHARDFS_PROP_SEED (property-test base seed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0
if [ "${1:-}" = --quick ]; then
    QUICK=1
    shift
fi

if [ "$QUICK" = 1 ]; then
    PY="$(scripts/pyenv.sh --base)"
else
    PY="$(scripts/pyenv.sh)"
    # The mount tests need FUSE's fusermount3 (Debian's fuse3): install it when missing and root.
    if ! command -v fusermount3 >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
        else
            echo "test.sh: fusermount3 is missing; install Debian's fuse3 (as root: apt-get install fuse3)" >&2
        fi
    fi
    # The object-store tests' S3 server (s3rver, from npm) needs Node.js; Debian's will do.
    if ! command -v npm >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
        else
            echo "test.sh: npm is missing; install Debian's nodejs and npm" >&2
        fi
    fi
    # Installed once per lock file: tests/s3/node_modules is kept between runs.
    if ! cmp -s tests/s3/package-lock.json tests/s3/node_modules/.installed-lock 2>/dev/null; then
        npm ci --prefix tests/s3 --no-audit --no-fund --loglevel=error
        cp tests/s3/package-lock.json tests/s3/node_modules/.installed-lock
    fi
fi

# Formatting and lints first: a style or lint failure fails the suite.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi
cargo fmt --check
cargo clippy --all-targets --all-features -- -D warnings
if [ "$QUICK" = 0 ]; then
    # vendor/fuser must be the published crate plus vendor/fuser.patch, nothing else.
    scripts/vendor-fuser.sh --check
fi
cargo build --features test-hooks
cargo test --all-features

# no .pytest_cache / __pycache__ in the work tree
export PYTHONDONTWRITEBYTECODE=1
if [ "$QUICK" = 1 ]; then
    RESHARDFS_BIN="${RESHARDFS_BIN:-target/debug/reshardfs}" \
        "$PY" -m pytest -q -p no:cacheprovider -m "not fuse and not hf_stack and not slow" tests/python "$@"
    exit 0
fi
RESHARDFS_BIN="${RESHARDFS_BIN:-target/debug/reshardfs}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/python "$@"
# The panic and start-up policies as shipped: a release-profile build (optimised, its own panic
# handling) with the test hooks, in target/release-hooks so target/release stays the real one.
cargo build --profile release-hooks --features test-hooks
RESHARDFS_BIN=target/release-hooks/reshardfs \
    "$PY" -m pytest -q -p no:cacheprovider -m hooks tests/python "$@"
