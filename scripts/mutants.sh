#!/usr/bin/env bash
# Mutation testing of the core with cargo-mutants: each mutant (a function body replaced, an
# operator flipped, a match arm deleted...) is built and the Rust tests run against it; a mutant
# the tests pass is a behaviour no test pins. Too slow for CI (see docs/MUTANTS.md for how long
# a pass takes); run it after changing the core, and kill or explain every new missed mutant.
#
#   scripts/mutants.sh [--budget MINUTES] [--jobs N] [--out DIR] [--iterate] [FILE...] [-- ARGS]
#
# FILE defaults to the core: src/reshard/, the checkpoint layout and names, the model maps.
# --budget (default 120 minutes): stop after that long; the mutants tested so far are reported
#   (cargo-mutants stops cleanly on SIGINT and writes what it has).
# --jobs (default 1): mutants built and tested at once; each job is a full build directory, and
#   the machine is shared, so one by default.
# --out (default target/mutants): where mutants.out/ goes.
# --iterate: test again only what an earlier run in --out left missed, timed out or untested
#   (after adding tests for the missed ones; also how to finish a pass a budget cut short).
# ARGS after `--` go to cargo-mutants as they are (e.g. -E 'in row_part_slices' to leave out a
#   function's mutants, -F REGEX to test only those matching).
#
# Results: DIR/mutants.out/ (caught.txt, missed.txt, unviable.txt, timeout.txt,
# outcomes.json, a log per mutant). The test command is the Rust tests as scripts/test.sh runs
# them (`cargo test --all-features`, debug profile: an incremental rebuild and the whole Rust
# suite take about 8 s each there, where a release build is not incremental); the Python tiers are not
# run per mutant.
#
# Needs cargo-mutants: `cargo install cargo-mutants --locked`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BUDGET=120
JOBS=1
OUTDIR=target/mutants
ITERATE=()
FILES=()
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET="$2"; shift 2 ;;
        --jobs) JOBS="$2"; shift 2 ;;
        --out) OUTDIR="$2"; shift 2 ;;
        --iterate) ITERATE=(--iterate); shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "mutants.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) FILES+=("$1"); shift ;;
    esac
done
if [ ${#FILES[@]} -eq 0 ]; then
    FILES=(src/reshard/ src/checkpoint/layout.rs src/checkpoint/names.rs src/checkpoint/models/)
fi

if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: cargo-mutants is missing; install it with: cargo install cargo-mutants --locked" >&2
    exit 2
fi

ARGS=()
for f in "${FILES[@]}"; do
    case "$f" in
        */) ARGS+=(-f "${f}**/*.rs") ;;
        *) ARGS+=(-f "$f") ;;
    esac
done

mkdir -p "$OUTDIR"
# A mutant that loops is stopped after 60 s (the whole unmutated suite takes about 5 s);
# a build after 10 minutes (a cold one on a busy shared machine takes 2).
set +e
timeout --signal=INT --kill-after=120 "$((BUDGET * 60))" \
    cargo mutants --all-features --jobs "$JOBS" --timeout 60 --build-timeout 600 \
    --output "$OUTDIR" "${ITERATE[@]}" "${ARGS[@]}" "${EXTRA[@]}"
rc=$?
set -e
OUT="$OUTDIR/mutants.out"
for k in caught missed unviable timeout; do
    printf '%-9s %s\n' "$k" "$( [ -f "$OUT/$k.txt" ] && wc -l <"$OUT/$k.txt" || echo 0)"
done
if [ "$rc" = 124 ] || [ "$rc" = 130 ]; then
    echo "mutants.sh: stopped at the ${BUDGET}-minute budget; the figures above are partial" >&2
fi
# cargo-mutants: 0 all caught, 2 some missed, 3 some timed out, 4 the unmutated tests fail.
exit "$rc"
