#!/usr/bin/env python3
"""The Hugging Face bridge's performance rows, ratios measured in the same run.

    .venv/bin/python scripts/bench_qwen3.py [--workdir DIR] [--reps 5] [--bin PATH] [--keep]
                                            [--quick] [--dry-run] [--no-pretouch]

  Q1  first read of a ~2 GiB synthetic Qwen3 HF folder (hidden 4096, bf16, 2 shards) mounted as
      --mesh dp=1,tp=2 (source in the page cache, view cold: a fresh mount per run), vs the FUSE
      ceiling: the same mount with --serve-zeros. Target: >= 0.8x. Row Q1f: the same folder
      mounted --model none --unshard, read in the same rotation: the same bytes as real data,
      each request one span of a source file (no reshard): what any view of them pays at least,
      since the ceiling's zeros cost no memory reads.
  Q2  that view exported to disk as float32 (`export --mesh dp=1,tp=2 --dtype f32`), mounted
      back with --hf --dtype bf16 --model qwen3, first read vs the same mount with
      --serve-zeros. Target: >= 0.6x.
  Q3  a Qwen3-32B-shaped sparse HF folder (64 layers, hidden 5120, intermediate 25600, 64 heads
      in 8 groups, head_dim 128, vocab 151936, 17 shards) mounted as --mesh tp=8 --pp 4: wall of
      mount + `ls -lR`. Target: < 0.5 s.
  Q4  Qwen3-MoE, Hugging Face -> MindSpore Transformers: one Qwen3-30B-A3B-shaped layer (hidden
      2048, 128 experts of 768, 32 heads of 128 over 4 groups, bf16, ~1.4 GiB) mounted as --mesh
      dp=8,tp=1,ep=8, first read vs its --serve-zeros ceiling (the experts are transposed and
      stacked on read). Target: >= 0.6x.
  Q5  that view exported to disk (bf16), mounted back --hf --model qwen3_moe (each expert
      transposed back out of its ep slice), first read vs its ceiling. Target: >= 0.6x.
  Q6  a Qwen3-235B-A22B-shaped sparse HF folder (94 layers x 128 experts, 36,945 tensors, 118
      shards): mount --mesh dp=8,tp=4,ep=32 --pp 8 + `ls -lR`, the daemon's peak RSS, and inspect
      and plan alone. Target: <= 1 s each.

Each figure is the median of --reps (>= 5) runs, with min..max; Q1 and Q2 interleave ceiling and
view runs (and Q1's floor), rotating their order every repetition, so that drift of the machine
hits all alike. Before a row's runs its source is dropped from the page cache and read back
(bench.recache: the page cache as a read leaves it, large folios; the notes give the share).
As in scripts/bench.py: each run reads the source once first (page cache), then touches and frees as
much anonymous memory as the run will fill (VM first-touch cost, see bench.py's doc), then
mounts afresh and `cat`s every view file. Results: stdout, WORKDIR/bench_qwen3.md and .json.

--quick: an 80 MiB folder (hidden 1024) and 3 runs: checks the script and the binary end to end in
about a minute (the figures are not the issue's). --dry-run: writes the synthetic folders and prints
every command it would time, without running reshardfs (works before the bridge exists).
Needs root or /dev/fuse access and a release build (scripts/bench.sh builds it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402  (helpers: run, cat, touch, meminfo, Mounts, view_files, fmt_*)
import synth_qwen3  # noqa: E402

GB = 1e9
GiB = 1 << 30
MiB = 1 << 20

QUICK_SHAPE = dict(layers=2, hidden=1024, intermediate=3072, heads=8, groups=4, head_dim=128, vocab=8192)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spread(xs):
    return f"{min(xs):.3f}..{max(xs):.3f} s" if xs else ""


class QBench:
    def __init__(self, a):
        self.a = a
        self.work = Path(a.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.bin = self.work / "reshardfs"
        if not a.dry_run:
            # a private copy: a rebuild during the run changes nothing
            shutil.copy2(a.bin, self.bin)
        self.mounts = bench.Mounts(self.bin)
        self.mnt = self.work / "mnt"
        self.rows, self.targets, self.notes, self.res = [], [], [], {}
        self.touched = []

    # ---- helpers

    def pretouch(self, nbytes):
        if not self.a.pretouch or nbytes <= 0:
            return
        nbytes = int(min(nbytes, 0.5 * bench.meminfo()["MemAvailable"]))
        self.touched.append((nbytes, bench.touch(nbytes)))

    def synth(self, name, shape, shards, fill):
        out = self.work / name
        stamp = out / ".complete"
        if stamp.exists() and json.loads(stamp.read_text()) == [shape, shards, fill]:
            log(f"reusing {out}")
            return out
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        synth_qwen3.write_folder(out, dict(shape), "bf16", shards, fill, seed=0)
        stamp.write_text(json.dumps([shape, shards, fill]))
        log(f"wrote {out} ({bench.fmt_b(self.size(self.weights(out)))}, {fill}) in {time.perf_counter() - t:.1f} s")
        return out

    @staticmethod
    def weights(folder):
        return sorted(p for p in Path(folder).rglob("*.safetensors"))

    @staticmethod
    def size(files):
        return sum(os.stat(f).st_size for f in files)

    def timed_read(self, src, args, label):
        """Fresh mount, cat every view file (timed), bytes, unmount."""
        self.mounts.mount(src, self.mnt, *args)
        try:
            files = bench.view_files(self.mnt)
            n = self.size(files)
            dt = bench.cat(files)
            served = bench.Mounts.stats(self.mnt).get("bytes_served", 0)
        finally:
            self.mounts.umount(self.mnt, label)
        if served < n:
            self.notes.append(f"{label}: bytes_served {served} < view size {n}")
        return dt, n

    def interleaved(self, num, what, src, args, target, floor=None):
        """ceiling (--serve-zeros) and view runs, alternating; row + target check. `floor`: args of
        a third mount of the same source read in the same rotation, a baseline with real data
        (row NUMf: the view's speed as a fraction of it)."""
        if self.a.dry_run:
            print(f"  {num}: {self.bin} mount {src} MNT {' '.join(args)} [--serve-zeros]; cat every view file "
                  f"({self.a.reps} runs each, interleaved)")
            return
        src_files = self.weights(src)
        bench.recache(src_files)  # the page cache as a read leaves it: see bench.recache
        folios = bench.large_folio_share(src_files)
        if folios is not None:
            self.notes.append(f"{num}: {folios:.0%} of the source's cached pages in large folios")
        ceil, view, base, nbytes, base_bytes = [], [], [], 0, 0
        # Each run fills the view's page cache: pre-touch that much (a view
        # holding replicated tensors is larger than its source).
        _, r = bench.run([self.bin, "plan", src, *args, "--json"], capture_output=True, text=True)
        touch = max(self.size(src_files), json.loads(r.stdout)["totals"]["bytes"])
        load0 = os.getloadavg()[0]
        arms = [("ceiling", list(args) + ["--serve-zeros"]), ("view", list(args))]
        if floor:
            arms.append(("floor", list(floor)))
        for i in range(self.a.reps):
            # rotated, so that no arm always follows the same one (the VM's first touch of
            # memory freed by the previous run costs whoever comes first)
            for kind, margs in arms[i % len(arms):] + arms[:i % len(arms)]:
                bench.cat(src_files)  # source in the page cache
                self.pretouch(touch)
                dt, n = self.timed_read(src, margs, f"{num} {kind}")
                if kind == "floor":
                    base.append(dt)
                    base_bytes = n
                else:
                    nbytes = n
                    (ceil if kind == "ceiling" else view).append(dt)
            log(f"{num} run {i + 1}/{self.a.reps}: ceiling {ceil[-1]:.3f} s, view {view[-1]:.3f} s"
                + (f", floor {base[-1]:.3f} s" if base else ""))
        load = max(load0, os.getloadavg()[0])
        if load > 0.75 * (os.cpu_count() or 1) + 1:
            self.notes.append(f"{num}: load average up to {load:.1f} on {os.cpu_count()} CPUs during the runs "
                              "(other processes): absolute figures are low, the ratio is the figure to read")
        cg = nbytes / bench.median(ceil) / GB
        vg = nbytes / bench.median(view) / GB
        ratio = vg / cg
        self.res[num] = {"bytes": nbytes, "ceiling_s": ceil, "view_s": view, "ceiling_gbps": cg, "view_gbps": vg,
                         "ratio": ratio, "target": target, "args": list(args),
                         "source_large_folio_share": folios}
        self.rows.append((num, f"{what} ({bench.fmt_b(nbytes)})", f"{vg:.2f} GB/s vs ceiling {cg:.2f} GB/s",
                          f"view {spread(view)}; ceiling {spread(ceil)}", f"{ratio:.2f}x (target >= {target}x)"))
        self.targets.append((f"{num}: >= {target}x the FUSE ceiling", ratio >= target, f"{ratio:.2f}x"))
        if base:
            bg = base_bytes / bench.median(base) / GB
            self.res[num].update({"floor_s": base, "floor_gbps": bg, "floor_args": list(floor)})
            pairs = sorted(b / v * nbytes / base_bytes for b, v in zip(base, view))
            self.rows.append((f"{num}f", f"the same source mounted {' '.join(floor)}: the same bytes as real data, "
                              "read whole (the floor any view of them pays)", f"{bg:.2f} GB/s",
                              f"floor {spread(base)}",
                              f"{bg / cg:.2f}x the ceiling; {num} is {vg / bg:.2f}x of it "
                              f"(pairs {pairs[0]:.2f}..{pairs[-1]:.2f})"))

    # ---- rows

    def q1(self, hf):
        self.interleaved("Q1", "HF Qwen3 folder as --mesh dp=1,tp=2, first read", hf, ["--mesh", "dp=1,tp=2"], 0.8,
                         floor=["--model", "none", "--unshard"])

    def q2(self, hf):
        dest = self.work / "mf-f32"
        cmd = [self.bin, "export", hf, dest, "--mesh", "dp=1,tp=2", "--dtype", "f32", "--force"]
        if self.a.dry_run:
            print("  Q2 setup: " + " ".join(map(str, cmd)))
        else:
            shutil.rmtree(dest, ignore_errors=True)
            dt, _ = bench.run(cmd, capture_output=True, text=True)
            log(f"Q2 setup: exported {bench.fmt_b(self.size(self.weights(dest)))} of float32 in {dt:.1f} s")
            self.res["Q2_export_s"] = dt
        self.interleaved("Q2", "its float32 MF export mounted --hf --dtype bf16 --model qwen3, first read", dest,
                         ["--hf", "--dtype", "bf16", "--model", "qwen3"], 0.6)

    def q3(self, s32):
        args = ["--mesh", "tp=8", "--pp", "4"]
        if self.a.dry_run:
            print(f"  Q3: {self.bin} mount {s32} MNT {' '.join(args)}; ls -lR MNT ({self.a.reps} runs)")
            return
        walls, mounts_t, lines = bench.mount_and_list(self.mounts, s32, self.mnt, args, self.a.reps, "Q3")
        med = bench.median(walls)
        apparent = self.size(self.weights(s32))
        self.res["Q3"] = {"mount_ls_s": walls, "mount_s": mounts_t, "ls_lines": lines, "apparent_bytes": apparent}
        self.rows.append(("Q3", f"Qwen3-32B-shaped sparse HF folder ({apparent / GiB:.0f} GiB, 17 shards): "
                                f"mount --mesh tp=8 --pp 4 + ls -lR", bench.fmt_s(med), spread(walls),
                          f"mount alone {bench.fmt_s(bench.median(mounts_t))}; {lines} ls lines; target < 0.5 s"))
        self.targets.append(("Q3: mount + ls -lR < 0.5 s", med < 0.5, bench.fmt_s(med)))

    def q4_q5(self, moe):
        self.interleaved("Q4", "HF Qwen3-MoE layer as --mesh dp=8,tp=1,ep=8, first read", moe,
                         ["--mesh", "dp=8,tp=1,ep=8"], 0.6)
        dest = self.work / "moe-mf"
        cmd = [self.bin, "export", moe, dest, "--mesh", "dp=8,tp=1,ep=8", "--force", "--no-progress"]
        if self.a.dry_run:
            print("  Q5 setup: " + " ".join(map(str, cmd)))
        else:
            shutil.rmtree(dest, ignore_errors=True)
            dt, _ = bench.run(cmd, capture_output=True, text=True)
            log(f"Q5 setup: exported {bench.fmt_b(self.size(self.weights(dest)))} in {dt:.1f} s")
        self.interleaved("Q5", "its MF export (8 ep slices) mounted --hf --model qwen3_moe, first read", dest,
                         ["--hf", "--model", "qwen3_moe"], 0.6)

    def q6(self, big):
        args = ["--mesh", "dp=8,tp=4,ep=32", "--pp", "8"]
        if self.a.dry_run:
            print(f"  Q6: {self.bin} mount {big} MNT {' '.join(args)}; ls -lR MNT; inspect; plan")
            return
        walls, mounts_t, rss = [], [], []
        lines = 0
        for _ in range(self.a.reps):
            t = time.perf_counter()
            self.mounts.mount(big, self.mnt, *args)
            mt = time.perf_counter() - t
            r = bench.subprocess.run(["ls", "-lR", str(self.mnt)], stdout=bench.subprocess.PIPE, check=True)
            walls.append(time.perf_counter() - t)
            mounts_t.append(mt)
            lines = r.stdout.count(b"\n")
            pid = self.mounts.live[self.mnt]
            rss.append(next(int(x.split()[1]) for x in open(f"/proc/{pid}/status") if x.startswith("VmHWM")) / 1024)
            self.mounts.umount(self.mnt, "Q6")
        insp = [bench.run([self.bin, "inspect", big], capture_output=True, text=True)[0] for _ in range(self.a.reps)]
        plan = [bench.run([self.bin, "plan", big, *args], capture_output=True, text=True)[0]
                for _ in range(self.a.reps)]
        med = bench.median(walls)
        self.res["Q6"] = {"mount_ls_s": walls, "mount_s": mounts_t, "ls_lines": lines, "peak_rss_mib": rss,
                          "inspect_s": insp, "plan_s": plan}
        self.rows.append(("Q6", "Qwen3-235B-A22B-shaped sparse HF folder (36,945 tensors, 118 shards): "
                                f"mount {' '.join(args)} + ls -lR", bench.fmt_s(med), spread(walls),
                          f"daemon peak RSS {bench.median(rss):.0f} MiB; inspect {bench.fmt_s(bench.median(insp))}"
                          f", plan {bench.fmt_s(bench.median(plan))}; target <= 1 s"))
        self.targets.append(("Q6: mount + ls -lR <= 1 s", med <= 1.0, bench.fmt_s(med)))
        self.targets.append(("Q6: inspect and plan <= 1 s", max(bench.median(insp), bench.median(plan)) <= 1.0,
                             f"{bench.fmt_s(bench.median(insp))}, {bench.fmt_s(bench.median(plan))}"))

    def run(self):
        t0 = time.time()
        if self.a.quick:
            hf = self.synth("q3-quick", QUICK_SHAPE, 2, "random")
        else:
            p = dict(synth_qwen3.PRESETS["bench-2g"])
            shards = p.pop("shards")
            hf = self.synth("q3-2g", p, shards, "random")
        p = dict(synth_qwen3.PRESETS["qwen3-32b"])
        shards, fill = p.pop("shards"), p.pop("fill")
        s32 = self.synth("q3-32b", p, shards, fill)
        if self.a.dry_run:
            print("dry run: would time")
        if not self.a.only_moe:
            self.q1(hf)
            self.q2(hf)
            self.q3(s32)
        p = dict(synth_qwen3.PRESETS["moe-30b-layer"])
        shards = p.pop("shards")
        if self.a.quick:
            p.update(experts=16, moe_intermediate=256, hidden=1024, heads=8, vocab=8192)
        moe = self.synth("q3-moe" + ("-quick" if self.a.quick else ""), p, shards, "random")
        p = dict(synth_qwen3.PRESETS["qwen3-235b-a22b"])
        shards, fill = p.pop("shards"), p.pop("fill")
        big = self.synth("q3-235b", p, shards, fill)
        self.q4_q5(moe)
        self.q6(big)
        if self.a.dry_run:
            return
        self.res["wall_s"] = time.time() - t0
        self.res["pretouch"] = self.touched
        self.report()

    def report(self):
        lines = ["| # | measure | value | spread (min..max of runs) | ratio / target |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in self.rows]
        lines += ["", "| target | met | measured |", "|---|---|---|"]
        lines += [f"| {n} | {'yes' if ok else 'NO'} | {m} |" for n, ok, m in self.targets]
        lines += ["", f"{self.a.reps} runs per figure (medians); "
                      f"{'quick shapes (not the issue figures)' if self.a.quick else 'full shapes'}; "
                      f"{len(self.touched)} pre-touches."]
        lines += [f"note: {n}" for n in self.notes]
        text = "\n".join(lines)
        print(text)
        (self.work / "bench_qwen3.md").write_text(text + "\n")
        (self.work / "bench_qwen3.json").write_text(json.dumps(
            {"rows": self.rows, "targets": self.targets, "notes": self.notes, "raw": self.res}, indent=1) + "\n")

    def cleanup(self):
        self.mounts.cleanup()
        if not self.a.keep:
            for n in ("q3-2g", "q3-quick", "q3-32b", "mf-f32", "q3-moe", "q3-moe-quick", "q3-235b", "moe-mf"):
                shutil.rmtree(self.work / n, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description="reshardfs Qwen3 bridge benchmark")
    ap.add_argument("--workdir", default="/var/tmp/reshardfs-bench-qwen3")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "reshardfs"))
    ap.add_argument("--reps", type=int, default=5, help="runs per figure (>= 5 for the issue's figures)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic folders (and reuse them next time)")
    ap.add_argument("--quick", action="store_true", help="small folder, 3 runs: an end-to-end check")
    ap.add_argument("--dry-run", action="store_true", help="write the folders, print the commands, run nothing")
    ap.add_argument("--no-pretouch", dest="pretouch", action="store_false")
    ap.add_argument("--only-moe", action="store_true", help="only the Qwen3-MoE rows Q4-Q6")
    a = ap.parse_args()
    if a.quick and a.reps == 5:
        a.reps = 3
    if not a.quick and a.reps < 5:
        log(f"warning: --reps {a.reps} < 5: not the issue's method")
    if not a.dry_run:
        if not os.access(a.bin, os.X_OK):
            sys.exit(f"bench_qwen3: no binary at {a.bin} (cargo build --release, or --bin)")
        if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
            sys.exit("bench_qwen3: needs /dev/fuse access (root or the fuse group)")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    need = (0.1 if a.quick else 2 * 1.0 + 2 * 2.0 + 0.5) * GiB  # bf16 folder + f32 export (~2x)
    if shutil.disk_usage(work).free < need:
        sys.exit(f"bench_qwen3: {work} needs about {need / GiB:.1f} GiB free")
    bench.run_bench("bench_qwen3", work, lambda: QBench(a))


if __name__ == "__main__":
    main()
