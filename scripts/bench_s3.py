#!/usr/bin/env python3
"""Object-store rows of the benchmark (`scripts/bench.sh s3`): a synthetic tp=8 checkpoint in a
file-backed S3 server on loopback (s3rver, tests/s3), read

  S1  by rclone copy (8 parallel transfers) into /dev/shm: what the server delivers to a
      well-known parallel client, the baseline of every ratio;
  S2  as a tp=2 view and S3 as an `--unshard` view, through a fresh `reshardfs mount s3://...`,
      every view file read once with cat, timed from the mount on: throughput as a ratio of S1's;
  S4  the tp=2 view through reshardfs mounted on s3fs (Debian's FUSE S3 client), what users
      stack today, timed from the s3fs mount on: its time against S2's;
  S5-S7 the same three through a proxy that holds every request --latency-ms (default 10), as an
      object store across a network does;

  S9  the peer vLLM users load from S3 with: Run:ai Model Streamer (PyPI runai-model-streamer and
      runai-model-streamer-s3 0.17.1, installed into WORKDIR) streaming a Qwen3-MoE-shaped Hugging
      Face folder into CPU tensors, against safetensors' safe_open of the same folder through a
      `reshardfs mount s3://... --model none --unshard`, both timed inside their scripts
      (--no-runai skips it): each tensor made resident once (Run:ai's own buffers; every page of
      safe_open's faulted in), and each copied once more (clone) on both sides; the same mount
      with --serve-zeros (headers as they are, tensors zeros: FUSE, the page cache and the
      reader, no data path), its ceiling; and the scripts on the folder's own files in /dev/shm
      (no mount, no store): the reader's floor on this machine;
  S8  a 70B-shaped checkpoint (80 layers, hidden 8192, tp=8 x pp=8 with optimizer states: 128
      rank files, sparse on the server's disk): `mount` + `ls -lR` of a fresh mount, the listing
      and every header fetched;

with, for S2/S3, the read amplification (bytes fetched from the store / bytes the view holds) and
the daemon's peak RSS against its bound (--cache-size + --s3-cache-size + the prefetch window +
64 MiB). The page cache is dropped before every pass (the server's files are read from disk);
runs are interleaved, each figure the median of --reps with its spread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "python"))

import bench  # noqa: E402  (run, cat, drop_caches, median, spread_text, proc_status, Mounts, view_files)
from s3util import FaultProxy, S3Server, KEY, SECRET  # noqa: E402

BUCKET = "bench"
MiB = 1 << 20


def log(msg):
    bench.log(msg)


def rclone(conf: Path, endpoint: str, dest: Path) -> float:
    conf.write_text(
        f"[s]\ntype = s3\nprovider = Other\naccess_key_id = {KEY}\nsecret_access_key = {SECRET}\n"
        f"endpoint = {endpoint}\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    # rclone refuses a plain-http endpoint while AWS_CA_BUNDLE is set.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    # Files past 16 MiB in 4 ranged streams each: rclone at its most parallel (1.60's default
    # cutoff, 250 MiB, left these 160 MiB files to one stream each).
    dt, _ = bench.run(["rclone", "--config", conf, "copy", "--transfers", "8", "--multi-thread-cutoff", "16M",
                       f"s:{BUCKET}/ck", dest],
                      env=env, capture_output=True, text=True)
    shutil.rmtree(dest, ignore_errors=True)
    return dt


def native(mounts, endpoint, mnt, args):
    """(seconds from `mount` to the last byte of every view file read once, view bytes, bytes
    fetched by the reads, peak RSS) of a fresh mount. The mount is timed too, as in `stacked`:
    there, s3fs fetches 50 MiB of each object (its parallel_count x multipart_size) when the
    mount reads its header, so timing the reads alone left 400 of the 1274 MiB out (measured:
    s3rver wrote 874 MiB during the reads)."""
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    t0 = time.perf_counter()
    mounts.mount(f"s3://{BUCKET}/ck", mnt, *args)
    files = bench.view_files(mnt)
    size = sum(os.stat(f).st_size for f in files)
    start = mounts.stats(mnt)["s3_bytes_fetched"]
    bench.cat(files)
    dt = time.perf_counter() - t0
    st = mounts.stats(mnt)
    rss = bench.proc_status(st["pid"]).get("VmHWM", 0)
    mounts.umount(mnt, "s3")
    return dt, size, st["s3_bytes_fetched"] - start, rss


def many_readers(mounts, endpoint, mnt, args, n=16):
    """(seconds, peak RSS, bytes read) of `n` readers at once on a fresh mount, reader i reading
    one n/2-th of view file i % 2 with dd: the memory bound must hold whatever the readers."""
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    mounts.mount(f"s3://{BUCKET}/ck", mnt, *args)
    files = [f for f in bench.view_files(mnt) if str(f).endswith(".safetensors")]
    size = sum(os.stat(f).st_size for f in files)
    per = n // len(files)
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        f = files[i % len(files)]
        part = os.stat(f).st_size // (1 << 20) // per + 1
        procs.append(subprocess.Popen(["dd", f"if={f}", "of=/dev/null", "bs=1M", f"skip={(i // len(files)) * part}",
                                       f"count={part}", "status=none"]))
    for p in procs:
        p.wait()
    dt = time.perf_counter() - t0
    st = mounts.stats(mnt)
    rss = bench.proc_status(st["pid"]).get("VmHWM", 0)
    mounts.umount(mnt, "many")
    return dt, rss, size, st["s3_bytes_fetched"], st["s3_requests"]


class S3fs:
    def __init__(self, work: Path):
        self.mnt = work / "s3fs"
        self.passwd = work / "s3fs.passwd"
        self.passwd.write_text(f"{KEY}:{SECRET}\n")
        self.passwd.chmod(0o600)

    def mount(self, endpoint):
        self.mnt.mkdir(parents=True, exist_ok=True)
        bench.run(["s3fs", BUCKET, self.mnt, "-o", f"url={endpoint}", "-o", "use_path_request_style",
                   "-o", f"passwd_file={self.passwd}", "-o", "ro"], capture_output=True, text=True)
        deadline = time.time() + 10
        while not os.path.ismount(self.mnt) and time.time() < deadline:
            time.sleep(0.05)

    def umount(self):
        subprocess.run(["umount", str(self.mnt)], stderr=subprocess.DEVNULL)
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], stderr=subprocess.DEVNULL)


def stacked(mounts, s3fs, endpoint, mnt, args):
    """Seconds from mounting s3fs to the last byte of every view file read once."""
    t0 = time.perf_counter()
    s3fs.mount(endpoint)
    try:
        mounts.mount(s3fs.mnt / "ck", mnt, *args)
        bench.cat(bench.view_files(mnt))
        dt = time.perf_counter() - t0
        mounts.umount(mnt, "s3fs")
        return dt
    finally:
        s3fs.umount()


def place_sparse(srv: S3Server, src: Path, prefix: str) -> int:
    """Puts every file of `src` into the server's own folder as s3rver keeps objects
    (`KEY._S3rver_object`, its `.md5` ETag, its metadata), copied sparse: a 70B-shaped save costs
    no disk, and no upload. Returns the files placed."""
    n = 0
    for p in src.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(src).as_posix()
        dest = srv.dir / BUCKET / prefix / f"{rel}._S3rver_object"
        dest.parent.mkdir(parents=True, exist_ok=True)
        bench.run(["cp", "--sparse=always", p, dest])
        Path(f"{dest}.md5").write_text(f"{n:032x}")
        Path(str(dest).replace("._S3rver_object", "._S3rver_metadata.json")).write_text(
            '{"content-type": "binary/octet-stream"}')
        n += 1
    return n


RUNAI = ["runai-model-streamer==0.17.1", "runai-model-streamer-s3==0.17.1"]

RUNAI_READ = """
import sys, time
from runai_model_streamer import SafetensorsStreamer
clone = sys.argv[1] == "clone"
t = time.perf_counter(); n = 0
with SafetensorsStreamer() as s:
    s.stream_files(sys.argv[2:])
    for _, x in s.get_tensors():
        if clone:
            x = x.clone()
        n += x.numel() * x.element_size()
print(time.perf_counter() - t, n)
"""

# Run:ai yields tensors the caller owns (`owned=True`, its default), written once from the
# network into its buffers. A tensor from `safe_open` is a window on the file's mapping: the
# like-for-like reader faults every page of it in ("touch": one byte of each 4 KiB and the
# last), which leaves it resident in the page cache, written once from the daemon. `get_tensor`
# alone reads nothing but the page it faults on first (the kernel reads 2 MiB around it: 818 of
# a 1515 MB view were read so). "clone" copies each tensor once more, on both sides.
SAFE_OPEN_READ = """
import sys, time
import torch
from safetensors import safe_open
clone = sys.argv[1] == "clone"
t = time.perf_counter(); n = 0
for f in sys.argv[2:]:
    with safe_open(f, "pt") as s:
        for k in s.keys():
            x = s.get_tensor(k)
            if clone:
                x = x.clone()
            elif x.numel():
                b = x.reshape(-1).view(torch.uint8)
                b[::4096].sum() + b[-1]
            n += x.numel() * x.element_size()
print(time.perf_counter() - t, n)
"""


def runai_packages(work: Path) -> Path:
    """Run:ai's streamer and its S3 backend in WORKDIR/runai-pkgs (torch and numpy come from the
    project's venv)."""
    pkgs = work / "runai-pkgs"
    if not (pkgs / "runai_model_streamer_s3").exists():
        log("installing runai-model-streamer into " + str(pkgs))
        bench.run([sys.executable, "-m", "pip", "install", "-q", "--target", pkgs, "boto3", "humanize"],
                  capture_output=True, text=True)
        bench.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", pkgs, *RUNAI],
                  capture_output=True, text=True)
    return pkgs


def timed_py(code, args, env=None):
    _, r = bench.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    t, n = r.stdout.split()
    return float(t), int(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/var/tmp/reshardfs-bench-s3")
    ap.add_argument("--layers", type=int, default=8, help="of the synthetic model (8: about 1.2 GiB)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=10.0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the server's data")
    ap.add_argument("--no-runai", action="store_true", help="skip row S9 (Run:ai's streamer)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_s3: needs root (drops the page cache, mounts s3fs)")
    for tool in ("rclone", "s3fs", "node"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_s3: {tool} is missing (Debian: apt-get install rclone s3fs nodejs npm)")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ck = work / f"ck-{a.layers}"
    if not ck.exists():
        log(f"writing a tp=8 checkpoint of {a.layers} layers")
        bench.run([sys.executable, HERE / "synth_checkpoint.py", ck, "--layers", a.layers, "--hidden", 2048,
                   "--vocab", 32000, "--tp", 8, "--fill", "random"], capture_output=True, text=True)
    src_bytes = sum(p.stat().st_size for p in ck.rglob("*") if p.is_file())
    srv = S3Server(work / "server", buckets=(BUCKET,))
    srv.start()
    proxy = None
    mounts = bench.Mounts(str(ROOT / "target" / "release" / "reshardfs"))
    s3fs = S3fs(work)
    try:
        log(f"uploading {src_bytes / MiB:.0f} MiB")
        srv.upload_tree(ck, BUCKET, "ck")
        os.environ.update(srv.env())
        proxy = FaultProxy(srv.port)
        proxy.delay = a.latency_ms / 1000
        conf = work / "rclone.conf"
        shm = Path("/dev/shm/reshardfs-bench-s3")
        mnt = work / "mnt"
        rows = {}
        configs = []
        for where, ep in (("loopback", srv.endpoint), (f"{a.latency_ms:g} ms", proxy.endpoint)):
            configs += [
                (where, "rclone copy --transfers 8 (4 streams a file)", lambda ep=ep: (rclone(conf, ep, shm), None)),
                (where, "reshardfs s3:// tp8 -> tp2", lambda ep=ep: (None, native(mounts, ep, mnt, ["--mesh", "tp=2"]))),
                (where, "reshardfs s3:// --unshard", lambda ep=ep: (None, native(mounts, ep, mnt, ["--unshard"]))),
                (where, "reshardfs on s3fs, tp8 -> tp2", lambda ep=ep: (stacked(mounts, s3fs, ep, mnt, ["--mesh", "tp=2"]), None)),
            ]
        for rep in range(a.reps):
            order = configs[rep % len(configs):] + configs[: rep % len(configs)]
            for where, name, fn in order:
                bench.drop_caches()
                t, nat = fn()
                r = rows.setdefault((where, name), {"t": [], "amp": [], "rss": [], "size": 0})
                if nat:
                    dt, size, fetched, rss = nat
                    r["t"].append(dt)
                    r["amp"].append(fetched / size)
                    r["rss"].append(rss)
                    r["size"] = size
                else:
                    r["t"].append(t)
                    r["size"] = src_bytes
                log(f"rep {rep + 1}/{a.reps} {where:>9} {name}: {r['t'][-1]:.2f} s")
        bench.drop_caches()
        many = many_readers(mounts, srv.endpoint, mnt, ["--mesh", "tp=2"])
        log(f"16 readers: {many[0]:.2f} s, peak RSS {many[1] / MiB:.0f} MiB")
        if not a.no_runai:
            pkgs = runai_packages(work)
            moe = work / "moe-hf"
            if not moe.exists():
                log("writing a Qwen3-MoE-shaped Hugging Face folder")
                bench.run([sys.executable, HERE / "synth_qwen3.py", moe, "--preset", "moe-30b-layer"],
                          capture_output=True, text=True)
            srv.upload_tree(moe, BUCKET, "moe")
            shards = sorted(p.name for p in moe.glob("*.safetensors"))
            renv = {**os.environ, "PYTHONPATH": str(pkgs), "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                    "AWS_ENDPOINT_URL": srv.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
            renv.pop("AWS_CA_BUNDLE", None)
            os.environ["AWS_ENDPOINT_URL"] = srv.endpoint
            # The reader's floor: the same script on the folder's files in tmpfs, which no
            # page-cache drop empties.
            shm_moe = Path("/dev/shm/reshardfs-bench-s3/moe")
            shm_moe.mkdir(parents=True, exist_ok=True)
            for f in shards:
                shutil.copyfile(moe / f, shm_moe / f)
            # "mount", "local", "ceiling": the touch reader; "clone", "localclone": the clone
            # one; "runaiclone": Run:ai's tensors copied once more, as "clone" does.
            s9 = {k: [] for k in ("runai", "mount", "runaiclone", "clone", "cat", "ceiling", "local",
                                  "localclone")}
            moe_bytes = 0
            order = list(s9)
            for rep in range(a.reps):
                # cat of the same view file: the mount's sequential rate, without safe_open's
                # page faults, to tell the two costs apart.
                for which in (order if rep % 2 == 0 else order[::-1]):
                    bench.drop_caches()
                    how = "clone" if "clone" in which else "touch"
                    if which.startswith("runai"):
                        t, moe_bytes = timed_py(RUNAI_READ, [how] + [f"s3://{BUCKET}/moe/{f}" for f in shards],
                                                renv)
                    elif which.startswith("local"):
                        t = timed_py(SAFE_OPEN_READ, [how] + [str(shm_moe / f) for f in shards])[0]
                    else:
                        t0 = time.perf_counter()
                        zeros = ["--serve-zeros"] if which == "ceiling" else []
                        mounts.mount(f"s3://{BUCKET}/moe", mnt, "--model", "none", "--unshard", *zeros)
                        views = [f for f in bench.view_files(mnt) if f.name.endswith(".safetensors")]
                        if which == "cat":
                            bench.cat(views)
                            t = time.perf_counter() - t0
                        else:
                            # Timed as Run:ai is, inside the script (Python and torch start
                            # outside it, 0.6 s here), plus the mount.
                            t = time.perf_counter() - t0 + timed_py(SAFE_OPEN_READ, [how] + views)[0]
                        # Every reader must have had every byte of the view from the daemon.
                        served = mounts.stats(mnt)["bytes_served"]
                        size = sum(f.stat().st_size for f in views)
                        if served < size:
                            sys.exit(f"S9 {which}: the daemon served {served} of the view's {size} bytes")
                        mounts.umount(mnt, "moe")
                    s9[which].append(t)
                    log(f"rep {rep + 1}/{a.reps} S9 {which}: {t:.2f} s")
        big = work / "ck-70b"
        if not big.exists():
            log("writing a 70B-shaped sparse checkpoint")
            bench.run([sys.executable, HERE / "synth_checkpoint.py", big, "--layers", 80, "--hidden", 8192,
                       "--ffn", 28672, "--vocab", 128256, "--kv", 1024, "--tp", 8, "--pp", 8, "--opt",
                       "--fill", "sparse"], capture_output=True, text=True)
        placed = place_sparse(srv, big, "ck-70b")
        os.environ["AWS_ENDPOINT_URL"] = srv.endpoint
        walls, mount_t, lines = bench.mount_and_list(mounts, f"s3://{BUCKET}/ck-70b", mnt, ["--mesh", "tp=4"],
                                                     a.reps, "70b")
        bound = (1024 + 512 + 64 + 64) * MiB
        print(f"\n## Object store (s3rver on loopback; {src_bytes / MiB:.0f} MiB tp=8 checkpoint; "
              f"medians of {a.reps}, spread min..max)\n")
        print("| where | reader | time | throughput | ratio | amplification | peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for where in dict.fromkeys(w for w, _ in rows):
            base = rows[(where, "rclone copy --transfers 8 (4 streams a file)")]
            base_tput = base["size"] / bench.median(base["t"])
            nat_t = bench.median(rows[(where, "reshardfs s3:// tp8 -> tp2")]["t"])
            for (w, name), r in rows.items():
                if w != where:
                    continue
                med = bench.median(r["t"])
                tput = r["size"] / med
                if name.startswith("reshardfs on s3fs"):
                    ratio = f"{med / nat_t:.2f}x the time of native tp2"
                else:
                    ratio = f"{tput / base_tput:.2f}x rclone"
                amp = f"{bench.median(r['amp']):.4f}" if r["amp"] else ""
                rss = f"{max(r['rss']) / MiB:.0f} MiB (bound {bound / MiB:.0f})" if r["rss"] else ""
                print(f"| {where} | {name} | {med:.2f} s ({bench.spread_text(r['t'])}) | "
                      f"{tput / MiB:.0f} MiB/s | {ratio} | {amp} | {rss} |")
        print(f"\n16 readers at once on a fresh tp=2 mount (each one eighth of a view file, dd bs=1M): "
              f"{many[0]:.2f} s for {many[2] / MiB:.0f} MiB, peak RSS {many[1] / MiB:.0f} MiB (bound {bound / MiB:.0f}), "
              f"{many[3] / many[2]:.2f}x the view's bytes fetched in {many[4]} GETs")
        if not a.no_runai:
            med = {k: bench.median(v) for k, v in s9.items()}

            def fig(k):
                return f"{med[k]:.2f} s ({bench.spread_text(s9[k])}), {moe_bytes / med[k] / MiB:.0f} MiB/s"

            print(f"\nQwen3-MoE-shaped folder ({moe_bytes / MiB:.0f} MiB of tensors), each figure the mount (if "
                  f"any) plus the script's own time. Every tensor resident once: Run:ai streamer {fig('runai')}; "
                  f"safe_open through a reshardfs s3:// mount, every page of each tensor faulted in "
                  f"{fig('mount')}: {med['runai'] / med['mount']:.2f}x Run:ai's throughput. Each tensor copied "
                  f"once more (clone): Run:ai {fig('runaiclone')}; safe_open {fig('clone')}: "
                  f"{med['runaiclone'] / med['clone']:.2f}x (against Run:ai without the copy "
                  f"{med['runai'] / med['clone']:.2f}x). cat of the same view {fig('cat')}; the FUSE ceiling, the "
                  f"touch reader through a --serve-zeros mount, {fig('ceiling')}; the reader's floor, the "
                  f"scripts on the folder's files in /dev/shm: touch {fig('local')}, clone {fig('localclone')}")
        print(f"\n70B-shaped checkpoint on the server ({placed} objects): `mount` + `ls -lR` "
              f"{bench.median(walls) * 1000:.0f} ms ({bench.spread_text([w * 1000 for w in walls], '{:.0f}')}), "
              f"of which `mount` {bench.median(mount_t) * 1000:.0f} ms; ls printed {lines} lines")
    finally:
        mounts.cleanup()
        s3fs.umount()
        if proxy:
            proxy.close()
        srv.stop()
        shutil.rmtree("/dev/shm/reshardfs-bench-s3", ignore_errors=True)
        if not a.keep:
            shutil.rmtree(work / "server", ignore_errors=True)


if __name__ == "__main__":
    main()
