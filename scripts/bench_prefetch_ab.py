#!/usr/bin/env python3
"""Prefetch modes A/B, cold: which way of working ahead reads a cold view fastest?

    .venv/bin/python scripts/bench_prefetch_ab.py [--where disk|sshfs|both] [--reps 9]
                                                 [--modes compute,advise,both,off] [--target ARGS]
    .venv/bin/python scripts/bench_prefetch_ab.py --raw [--where ...]

Reuses scripts/bench.py's cold checkpoint (WORKDIR/cold-row, written by
`bench.py --only 11 --keep`) and its sshfs-in-a-network-namespace setup. Per
repetition, in rotating order and each after dropping the page cache: `cat`
of the source files, then `cat` of the view files once per mode
(`compute` is the default prefetch, `advise` and `both` set
RESHARDFS_PREFETCH, `off` is --no-prefetch). Prints each mode's median ratio
(source seconds / view seconds of the same repetition; > 1: the view is
faster) with the spread.

--raw compares ways of reading the source files themselves, cold, with
examples/cold_read.rs: `pread` in 1 MiB blocks (one descriptor, or a fresh
one per block), copies out of a memory map, and the map with MADV_WILLNEED
ahead or MADV_SEQUENTIAL (is `pread`
faster than the byte engine's maps?).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/var/tmp/reshardfs-bench")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "reshardfs"))
    ap.add_argument("--where", default="both", choices=["disk", "throttled", "sshfs", "both", "all"],
                    help="both: disk and sshfs; all: disk, the throttled image and sshfs")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--modes", default=None,
                    help="views: some of compute,advise,both,off (default compute,off); "
                         "with --raw: some of its modes (default all)")
    ap.add_argument("--target", default="--unshard")
    ap.add_argument("--col", action="store_true", help="the column-split checkpoint (cold-col) instead of cold-row")
    ap.add_argument("--source-ra", type=int, default=None, metavar="KIB",
                    help="set the sshfs mount's read_ahead_kb (its bdi; 128 by default) for the run")
    ap.add_argument("--raw", action="store_true",
                    help="instead of views, read the source files with examples/cold_read.rs: "
                         "pread, pread-reopen, mmap, mmap-willneed, mmap-willneed-chunks, mmap-seq")
    a = ap.parse_args()
    work = Path(a.workdir)
    ckpt = work / ("cold-col" if a.col else "cold-row")
    if not ckpt.is_dir():
        sys.exit(f"{ckpt} missing: run `scripts/bench.py --only 11 --keep --workdir {work}` first")
    raw = ["pread", "pread-reopen", "mmap", "mmap-willneed", "mmap-willneed-chunks", "mmap-seq"]
    modes = a.modes.split(",") if a.modes else raw if a.raw else ["compute", "off"]
    if a.raw:
        subprocess.run(["cargo", "build", "--release", "--example", "cold_read", "-q"], cwd=ROOT, check=True)
    mounts = bench.Mounts(a.bin)
    mnt = work / "mnt-ab"

    def one(src, where):
        srcs = sorted(str(p) for p in Path(src).glob("iteration_*/*.safetensors"))
        kinds = ["src"] + modes
        t = {k: [] for k in kinds}
        for i in range(a.reps):
            for k in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                bench.drop_caches()
                if k == "src":
                    t[k].append(bench.cat(srcs))
                    continue
                if a.raw:
                    t0 = time.perf_counter()
                    for f in srcs:
                        subprocess.run([str(ROOT / "target/release/examples/cold_read"), k, f],
                                       check=True, capture_output=True)
                    t[k].append(time.perf_counter() - t0)
                    continue
                os.environ["RESHARDFS_PREFETCH"] = k if k in ("advise", "both") else "default"
                mounts.mount(src, mnt, *a.target.split(), *(["--no-prefetch"] if k == "off" else []))
                t[k].append(bench.cat(bench.view_files(mnt)))
                mounts.umount(mnt, k)
        print(f"{where}, {'raw source reads' if a.raw else a.target}, {a.reps} reps; source cat median {statistics.median(t['src']):.3f} s")
        for k in modes:
            r = sorted(s / v for s, v in zip(t["src"], t[k]))
            print(f"  {k:9} {statistics.median(r):.2f}x  ({r[0]:.2f}..{r[-1]:.2f}; view median "
                  f"{statistics.median(t[k]):.3f} s)")

    try:
        if a.where in ("disk", "both", "all"):
            one(ckpt, "local disk")
        if a.where in ("throttled", "all"):
            with bench.Throttled(work, [ckpt]) as th:
                th.enter()
                try:
                    one(th.path(ckpt), f"throttled image ({th.what})")
                finally:
                    th.leave()
        if a.where in ("sshfs", "both", "all"):
            with bench.Sshfs(work) as net:
                dev = os.stat(net.mnt).st_dev
                bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
                ra = bdi.read_text().strip()
                if a.source_ra is not None:
                    bdi.write_text(str(a.source_ra))
                try:
                    one(net.path(ckpt), f"sshfs (read_ahead_kb {bdi.read_text().strip()})")
                finally:
                    bdi.write_text(ra)
    finally:
        for m in list(mounts.live):
            mounts.umount(m)


if __name__ == "__main__":
    main()
