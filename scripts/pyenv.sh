#!/usr/bin/env bash
# Create (idempotently) the Python venv used by the integration tests and
# print the path of its python interpreter on stdout.
#   usage: scripts/pyenv.sh            -> prints /path/to/repo/.venv/bin/python
#   in scripts: PY="$(scripts/pyenv.sh)"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PKGS=(numpy safetensors pytest)

log() { echo "pyenv: $*" >&2; }

have_pkgs() {
    [ -x "$PY" ] && "$PY" -c 'import numpy, safetensors, pytest' >/dev/null 2>&1
}

if ! have_pkgs; then
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
    log "installing ${PKGS[*]} into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2 || true
    "$PY" -m pip install -q --disable-pip-version-check "${PKGS[@]}" >&2
    have_pkgs || { log "packages still not importable"; exit 1; }
fi

echo "$PY"
