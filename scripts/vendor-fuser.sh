#!/usr/bin/env bash
# vendor/fuser is the published fuser 0.18.0 crate plus vendor/fuser.patch, and nothing else
# (vendor/README.md says what the patch adds and why). This script rebuilds it from those two,
# or checks that it is exactly that (scripts/test.sh runs the check):
#
#   scripts/vendor-fuser.sh           rebuild vendor/fuser from the crate and the patch
#   scripts/vendor-fuser.sh --check   fail (exit 1) if vendor/fuser differs from crate + patch
#   scripts/vendor-fuser.sh --diff    write the patch anew from vendor/fuser (after editing it)
#
# The crate comes from crates.io (cached in target/vendor-fuser/) and must have the sha256 below:
# the registry's checksum for fuser 0.18.0. (Cargo.lock holds no checksum for fuser, since
# [patch.crates-io] makes it a path dependency.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VERSION=0.18.0
SHA256=b82b6597d216503555ead6b358f341ef748869bf5c6fbae6a0cb9dd231baecfd
URL="https://static.crates.io/crates/fuser/fuser-$VERSION.crate"
# What of the crate is kept: its examples, tests and CI files are not needed to build it.
KEEP=(Cargo.toml LICENSE.md README.md build.rs src)
CACHE=target/vendor-fuser
CRATE="$CACHE/fuser-$VERSION.crate"
PATCH=vendor/fuser.patch

mkdir -p "$CACHE"
if [ ! -f "$CRATE" ] || ! echo "$SHA256  $CRATE" | sha256sum -c --status; then
    curl -sSfL --retry 3 -o "$CRATE.part" "$URL"
    mv "$CRATE.part" "$CRATE"
fi
if ! echo "$SHA256  $CRATE" | sha256sum -c --status; then
    echo "vendor-fuser: $CRATE does not have the sha256 of fuser $VERSION ($SHA256)" >&2
    exit 1
fi

# The published crate, as kept, in $CACHE/pristine.
rm -rf "$CACHE/unpacked" "$CACHE/pristine"
mkdir -p "$CACHE/unpacked" "$CACHE/pristine"
tar -xzf "$CRATE" -C "$CACHE/unpacked"
for f in "${KEEP[@]}"; do
    cp -r "$CACHE/unpacked/fuser-$VERSION/$f" "$CACHE/pristine/"
done

case "${1:-}" in
--diff)
    # git diff --no-index exits 1 when the trees differ, which they should.
    { git diff --no-index --no-prefix "$CACHE/pristine" vendor/fuser || true; } |
        sed -e "s|^diff --git $CACHE/pristine/\(.*\) vendor/fuser/\(.*\)|diff --git a/\1 b/\2|" \
            -e "s|^--- $CACHE/pristine/|--- a/|" -e "s|^+++ vendor/fuser/|+++ b/|" > "$PATCH"
    echo "wrote $PATCH"
    exit 0
    ;;
esac

rm -rf "$CACHE/patched"
cp -r "$CACHE/pristine" "$CACHE/patched"
git apply --directory="$CACHE/patched" --unsafe-paths -p1 "$PATCH"

case "${1:-}" in
--check)
    if ! diff -r "$CACHE/patched" vendor/fuser >"$CACHE/check.diff"; then
        echo "vendor-fuser: vendor/fuser is not fuser $VERSION + $PATCH:" >&2
        head -n 40 "$CACHE/check.diff" >&2
        echo "(rebuild it with scripts/vendor-fuser.sh, or regenerate the patch with --diff)" >&2
        exit 1
    fi
    echo "vendor-fuser: vendor/fuser is fuser $VERSION + $PATCH"
    ;;
"")
    rm -rf vendor/fuser
    cp -r "$CACHE/patched" vendor/fuser
    echo "rebuilt vendor/fuser from fuser $VERSION + $PATCH"
    ;;
*)
    echo "usage: scripts/vendor-fuser.sh [--check | --diff]" >&2
    exit 2
    ;;
esac
