#!/usr/bin/env python3
"""Two reshardfs binaries, A and B, read the same views in interleaved runs: did a change move a
benchmark row beyond its noise?

For each view, every repetition mounts it fresh with A and with B (in an order that alternates
each repetition), times `cat` of every view file (a first read: the daemon computes every byte),
and records the daemon's peak RSS. The sources are the bench's synthetic checkpoints (2 GiB bf16
tp=8, row and column splits) and its synthetic Qwen3 folder, in the page cache, re-read once first
so that the cache lies in large folios (scripts/bench.py's recache). Prints per view the median
and spread of each binary, the median of the per-repetition ratios B/A and its spread.

    scripts/bench_ab.py A_BIN B_BIN [--reps 7] [--workdir /var/tmp/reshardfs-bench-ab] [--keep]
                                    [--only row_tp2,col_tp2,unshard,qwen3_tp2,qwen3_hf_bf16]

Needs root (or FUSE access). The checkpoints are written on the first run (about 6 GiB; --keep
reuses them later).
"""

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
import synth_qwen3  # noqa: E402


def peak_rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def first_read(binary, mnt, src, args, files):
    """Mounts `src` with `binary`, cats every view file, returns (seconds, peak RSS MiB)."""
    m = bench.Mounts(binary)
    try:
        m.mount(src, mnt, *args)
        pid = m.live[Path(mnt)]
        views = sorted(str(p) for p in Path(mnt).rglob("*.safetensors"))
        t = bench.cat(views)
        rss = peak_rss_kib(pid) / 1024
        st = m.stats(mnt)
        if st.get("read_errors"):
            raise bench.BenchError(f"{binary}: read errors on {src}: {st}")
        return t, rss
    finally:
        for p in list(m.live):
            m.umount(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--workdir", default="/var/tmp/reshardfs-bench-ab")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shape = ["--hidden", 4096, "--layers", 3, "--vocab", 32768, "--tp", 8]

    def synth(name, extra):
        out, stamp = work / name, work / f"{name}.params"
        args = [str(x) for x in extra]
        if not (out.exists() and stamp.exists() and stamp.read_text() == repr(args)):
            shutil.rmtree(out, ignore_errors=True)
            bench.run([bench.PY, bench.SYNTH, out, *args], capture_output=True, text=True)
            os.sync()
            stamp.write_text(repr(args))
        return out

    def synth_hf(name):
        out = work / name
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)
            p = dict(synth_qwen3.PRESETS["bench-2g"])
            shards = p.pop("shards")
            synth_qwen3.write_folder(out, p, "bf16", shards, "random", seed=0)
            (out / ".complete").write_text("1")
            os.sync()
        return out

    row = synth("row", shape + ["--split", "row"])
    col = synth("col", shape + ["--split", "col"])
    hf = synth_hf("qwen3")
    # The Q2 source: the tp=2 view of the Qwen3 folder exported as float32.
    q2 = work / "qwen3-tp2-f32"
    if not (q2 / "metadata.json").exists():
        shutil.rmtree(q2, ignore_errors=True)
        bench.run([a.b, "export", hf, q2, "--mesh", "dp=1,tp=2", "--dtype", "f32", "--no-progress"],
                  capture_output=True, text=True)
    cases = {
        "row_tp2": (row, ["--mesh", "tp=2"]),
        "col_tp2": (col, ["--mesh", "tp=2"]),
        "unshard": (row, ["--unshard"]),
        "qwen3_tp2": (hf, ["--mesh", "dp=1,tp=2"]),
        "qwen3_hf_bf16": (q2, ["--hf", "--dtype", "bf16", "--model", "qwen3"]),
    }
    if a.only:
        cases = {k: v for k, v in cases.items() if k in a.only.split(",")}
    mnt = work / "mnt"
    print(f"A = {a.a}\nB = {a.b}\n{a.reps} interleaved repetitions per view, first reads, sources cached\n")
    print(f"{'view':<14} {'A median (spread) s':<24} {'B median (spread) s':<24} {'B/A median (spread)':<22} "
          f"{'peak RSS A / B MiB'}")
    for name, (src, args) in cases.items():
        srcs = sorted(str(p) for p in Path(src).rglob("*.safetensors"))
        bench.recache(srcs)
        ta, tb, ra, rb, ratios = [], [], [], [], []
        for rep in range(a.reps):
            order = [("a", a.a), ("b", a.b)] if rep % 2 == 0 else [("b", a.b), ("a", a.a)]
            got = {}
            for k, binary in order:
                got[k] = first_read(binary, mnt, src, args, srcs)
            ta.append(got["a"][0])
            tb.append(got["b"][0])
            ra.append(got["a"][1])
            rb.append(got["b"][1])
            ratios.append(got["b"][0] / got["a"][0])
        med = statistics.median
        print(f"{name:<14} {med(ta):.3f} ({min(ta):.3f}..{max(ta):.3f}){'':<4} "
              f"{med(tb):.3f} ({min(tb):.3f}..{max(tb):.3f}){'':<4} "
              f"{med(ratios):.3f} ({min(ratios):.2f}..{max(ratios):.2f}){'':<6} "
              f"{max(ra):.0f} / {max(rb):.0f}", flush=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\ndone in {time.time() - t0:.0f} s")
