"""The FUSE mount (`reshardfs mount`) against the fixtures, the Python oracle and `export`.

Rules (see mountutil.py): one mount per test, torn down by a guard even on failure; the pytest
process never touches a path under a mount point: every access is a subprocess with a
timeout (cat, cmp, ls, stat, find, or mountutil.py run as a reader); "mounted?" comes from
/proc/self/mountinfo. Machines without /dev/fuse or root make these tests fail, not skip.
"""

import json
import os
import re
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest

import ckpt
import mountutil
from ckpt import FIXTURES, TRACKER
from mountutil import Mount, cat, cmp, read_bytes, read_tensors, run

TP4 = "tp4-f32"
GPT = "gpt-dp2-tp2-pp2-bf16"
# MindSpore's reshard results; the Qwen3 expected files are mounted in test_qwen3.py.
EXPECTED = sorted(
    p
    for p in (FIXTURES / "expected").iterdir()
    if p.is_dir() and (p / "rank-0.safetensors").exists()
)
META = ".reshardfs"
# Every key the tests read: a renamed key fails here, instead of an assertion silently skipped.
STATS_KEYS = ("pid", "bytes_served", "source_bytes_read", "cache_hits", "cache_misses", "cache_bytes",
              "cache_capacity", "cache_blocks", "reads", "direct_reads", "mapped_reads", "read_errors", "internal_errors",
              "block_size")
# The mount is read-only (README): every write-like call fails with EROFS, none with another error.
RO_ERROR = "Read-only file system"


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def split_expected_name(d: Path):
    fx, target = d.name.split(".", 1)
    return fx, ckpt.parse_target_name(target)


def local_tree(root) -> dict:
    """{relative path: "f" | "d"} of a local folder (never a mount)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = "d"
        for f in filenames:
            out[os.path.normpath(os.path.join(rel, f))] = "f"
    return out


def mount_tree(m: Mount, with_meta=False) -> dict:
    """{relative path: "f" | "d" | ...} of the mount, listed by `find` in a subprocess."""
    r = run(["find", m.mnt, "-mindepth", "1", "-printf", "%y %P\\n"])
    assert r.code == 0, str(r)
    out = {}
    for line in r.stdout.splitlines():
        t, p = line.split(" ", 1)
        out[p] = t
    if not with_meta:
        out = {p: t for p, t in out.items() if p != META and not p.startswith(META + "/")}
    return out


def files_of(tree) -> list:
    return sorted(p for p, t in tree.items() if t == "f")


def digest_local(path) -> dict:
    """{name: [dtype, shape, sha256]} of a local safetensors file (raw reader, in-process)."""
    sf = ckpt.read_safetensors(path)
    return {n: [dt, list(a.shape), mountutil._sha(a.tobytes())] for n, (dt, a) in sf.tensors.items()}


def tensor_names(path) -> list:
    return list(ckpt.read_safetensors(path).tensors)


def assert_cmp_all(m: Mount, ref_root, rels):
    bad = []
    for rel in rels:
        r = cmp(m.path(rel), Path(ref_root) / rel)
        if r.code != 0:
            bad.append(str(r))
    assert not bad, "files differ through the mount:\n" + "\n".join(bad[:6])


def daemon_pid(m: Mount) -> int:
    pid = m.stats().get("pid")
    assert isinstance(pid, int), f"stats pid {pid!r}"
    return pid


def view_files(src, args, exp_root):
    """(iteration folder in the view or "", sorted relative paths of the export's rank files)."""
    it = ckpt.resolve_iteration(src)
    base = it.name if (Path(exp_root) / TRACKER).exists() else ""
    rfs = ckpt.rank_files(Path(exp_root) / base)
    rels = sorted(os.path.join(base, f) for f in rfs.values())
    return base, rels


def needed_sources(it, exp: ckpt.Expected, prefix) -> dict:
    """{view rank file name: set of source file names its bytes come from}: each target slice
    intersected with each source chunk. A chunk with one copy is read from it; a replicated one
    from the lowest-ranked copy in a file that the view file reads a one-copy chunk from, else
    from its lowest storage rank (docs/FORMAT.md, "Which copy is read")."""
    meta = json.loads((Path(it) / "metadata.json").read_text())
    sdm, storage = meta["state_dict_metadata"], meta["storage_data"]
    chunks = {}  # name -> [(box, [file, ...] by storage rank)]
    for key, entries in storage.items():
        name, k = ckpt.parse_shard_key(key)
        m = sdm[name]
        ch = next(c for c in m["chunk"] if c["global_offset"] == [k])
        box = ckpt.chunk_box(m["global_shape"], m["axis_fragmentations"], k, ch["local_shape"])
        files = [e["file_name"] for e in sorted(entries, key=lambda e: e["storage_rank"])]
        chunks.setdefault(name, []).append((box, files))
    met = {}  # view file name -> [[file, ...] of each chunk it meets]
    for r in range(exp.world):
        for name, box in exp.holdings[r].items():
            fn = ckpt.file_name(prefix, exp.params[name].kind, r, exp.world)
            for cbox, files in chunks[name]:
                if all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(box, cbox)):
                    met.setdefault(fn, []).append(files)
    out = {}
    for fn, holders in met.items():
        home = {files[0] for files in holders if len(files) == 1}
        out[fn] = {next((f for f in files if f in home), files[0]) for files in holders}
    return out


# ---------------------------------------------------------------------------
# 1. every expected/ target: tensors right, files byte-identical to export
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("exp_dir", EXPECTED, ids=lambda p: p.name)
def test_mount_matches_expected_and_export(exp_dir, mounts, exports):
    fx, target = split_expected_name(exp_dir)
    src = FIXTURES / fx
    args = target.args(None)
    exp_root = exports(src, args)
    m = mounts()
    m.start_ok(src, args)

    tree = mount_tree(m)
    assert tree == local_tree(exp_root), "mounted tree (without .reshardfs) differs from export's"

    it = ckpt.resolve_iteration(src)
    prefix = ckpt.source_prefix(it)
    kinds = [k for k in ("model", "opt") if ckpt.rank_files(it, (k,))]
    world = len(os.listdir(exp_dir))
    paths = {(r, k): m.path(it.name, ckpt.file_name(prefix, k, r, world)) for r in range(world) for k in kinds}
    got = read_tensors(list(paths.values()))
    for (r, k), p in paths.items():
        size = (exp_root / it.name / os.path.basename(p)).stat().st_size
        assert got[p]["size"] == size, f"{p}: read {got[p]['size']} bytes, export has {size}"
    for r in range(world):
        want = digest_local(exp_dir / f"rank-{r}.safetensors")
        union = {}
        for k in kinds:
            for n, t in got[paths[(r, k)]]["tensors"].items():
                assert n not in union, f"rank {r}: {n} in both model and opt files"
                union[n] = t
        assert sorted(union) == sorted(want), f"rank {r} tensor names"
        for n in want:
            assert union[n][0] == want[n][0], f"rank {r} {n} dtype"
            assert union[n][1] == want[n][1], f"rank {r} {n} shape"
            assert union[n][2] == want[n][2], f"rank {r} {n} bytes"

    assert_cmp_all(m, exp_root, files_of(tree))


# ---------------------------------------------------------------------------
# 1b. other targets and sources: the mounted tree is the export, byte for byte
# ---------------------------------------------------------------------------


OTHER = [
    (GPT, "root", ["--unshard"]),
    (GPT, "root", ["--pp", "1"]),
    (GPT, "iter", ["--mesh", "tp=1"]),
    (TP4, "root", ["--mesh", "dp=2,tp=2", "--pp", "2"]),
]


@pytest.mark.parametrize("fx,kind,args", OTHER, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_mount_equals_export(fx, kind, args, mounts, exports):
    src = FIXTURES / fx if kind == "root" else ckpt.resolve_iteration(FIXTURES / fx)
    exp_root = exports(src, args)
    m = mounts()
    m.start_ok(src, args)
    tree = mount_tree(m)
    assert tree == local_tree(exp_root), f"mounted tree differs from export's ({args})"
    assert_cmp_all(m, exp_root, files_of(tree))


def test_mount_strategy_from_export_metadata(mounts, exports):
    """--strategy = the metadata.json of a tp=4 export: the mount shows that export's rank files."""
    src = FIXTURES / GPT
    it = ckpt.resolve_iteration(src).name
    first = exports(src, ["--mesh", "dp=1,tp=4", "--pp", "1"])
    args = ["--strategy", str(first / it / "metadata.json")]
    exp_root = exports(src, args)
    m = mounts()
    m.start_ok(src, args)
    tree = mount_tree(m)
    assert tree == local_tree(exp_root)
    assert_cmp_all(m, exp_root, files_of(tree))
    assert_cmp_all(m, first, [f for f in files_of(tree) if f.endswith(".safetensors")])


def test_mount_options(mounts, exports, tmp_path):
    """SIZE suffixes, --threads 1, --allow-other, --log-file; the view still reads right."""
    src = FIXTURES / TP4
    args = ["--mesh", "tp=2"]
    exp_root = exports(src, args)
    sizes = {"65536": 65536, "64K": 65536, "64KiB": 65536, "3M": 3 << 20, "1MiB": 1 << 20, "2G": 2 << 30}
    for i, (size, want) in enumerate(sizes.items()):
        m = mounts(f"mnt{i}")
        extra = ["--threads", "1", "--allow-other", "--log-level", "info", "--log-file", tmp_path / "daemon.log"] if i == 0 else []
        m.start_ok(src, args + ["--cache-size", size] + extra)
        assert m.stats()["cache_capacity"] == want, f"--cache-size {size}: {m.stats()}"
        if i == 0:
            assert "allow_other" in m.entries()[0].superopts, f"--allow-other: {m.entries()}"
            assert_cmp_all(m, exp_root, files_of(local_tree(exp_root)))
            pid = daemon_pid(m)
            r = run(["umount", m.mnt], timeout=30)
            assert r.code == 0, str(r)
            assert mountutil.wait_gone(pid, 5)
            assert (tmp_path / "daemon.log").read_text().strip(), "--log-file FILE --log-level info: nothing logged"
        m.cleanup()


def test_more_source_files_than_the_soft_open_file_limit(mounts, tmp_path):
    """Each source file's descriptor stays open while mounted (the page-cache check asks
    cachestat through it), so reshardfs raises the soft limit on open files to the hard one:
    a checkpoint of 512 ranks has 1024 files, the usual soft limit. Here 100 shards under a
    soft limit of 64 (without the raise: "Too many open files", exit 2)."""
    import hashlib

    import numpy as np

    src = tmp_path / "many"
    src.mkdir()
    n = 100
    weight_map, want = {}, {}
    for i in range(n):
        name, fn = f"t{i:03d}", f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        arr = np.arange(4, dtype=np.float32) + i
        ckpt.write_safetensors(src / fn, {name: ("F32", arr)}, {"format": "pt"})
        weight_map[name] = fn
        want[name] = ["F32", [4], hashlib.sha256(arr.tobytes()).hexdigest()]
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 16 * n}, "weight_map": weight_map}))
    wrapper = tmp_path / "reshardfs-soft-64"
    wrapper.write_text(f"#!/bin/sh\nulimit -Sn 64 || exit 99\nexec {ckpt.binary()} \"$@\"\n")
    wrapper.chmod(0o755)
    m = mounts()
    m.binary = str(wrapper)
    m.start_ok(src, ["--unshard"])
    daemon = daemon_pid(m)
    limits = Path(f"/proc/{daemon}/limits").read_text()
    soft, hard = re.search(r"Max open files\s+(\S+)\s+(\S+)", limits).groups()
    assert soft == hard and soft != "64", f"the daemon's open-file limit was not raised:\n{limits}"
    views = [m.path(f) for f in ("model-0000000-0000001.safetensors",)]
    got = read_tensors(views)[views[0]]["tensors"]
    assert got == want


# ---------------------------------------------------------------------------
# 2. ls -l sizes = bytes cat reads; stable listings and inode numbers
# ---------------------------------------------------------------------------


def ls_long(path) -> tuple[str, dict]:
    r = run(["ls", "-la", "--time-style=+%s", path])
    assert r.code == 0, str(r)
    entries = {}
    for line in r.stdout.splitlines():
        parts = line.split(None, 6)
        if len(parts) < 7 or parts[6] in (".", ".."):
            continue
        entries[parts[6]] = (parts[0], int(parts[4]))
    return r.stdout, entries


def test_listing_sizes_and_inodes_stable(mounts):
    src = FIXTURES / GPT
    m = mounts()
    m.start_ok(src, ["--mesh", "dp=1,tp=4", "--pp", "1"])
    tree = mount_tree(m, with_meta=True)
    assert META in tree and tree[META] == "d", f"no {META}/ folder at the mount root: {sorted(tree)[:10]}"
    dirs = [""] + sorted(p for p, t in tree.items() if t == "d")
    files = files_of(tree)
    stats_rel = f"{META}/stats"

    sizes = {}
    for d in dirs:
        out1, ent = ls_long(m.path(d))
        out2, _ = ls_long(m.path(d))
        strip = lambda s: [ln for ln in s.splitlines() if not ln.endswith(" stats")]  # noqa: E731
        assert strip(out1) == strip(out2), f"`ls -la {d}` changed between two calls"
        children = {p.rsplit("/", 1)[-1] for p in tree if os.path.dirname(p) == d}
        assert set(ent) == children, f"ls -la {d} lists {sorted(ent)}, find lists {sorted(children)}"
        for name, (perms, size) in ent.items():
            sizes[os.path.join(d, name)] = size
        # raw readdir order (ls -f: unsorted) is stable
        r1 = run(["ls", "-f", "-a", m.path(d)])
        r2 = run(["ls", "-f", "-a", m.path(d)])
        assert r1.code == 0 and r1.stdout == r2.stdout, f"readdir order of {d!r} not stable:\n{r1}\n{r2}"

    problems = []
    for f in files:
        n = len(read_bytes(m.path(f)))
        if f == stats_rel:
            assert n > 0, "empty .reshardfs/stats"
            continue  # live counters: its size may change between ls and cat
        if sizes[f] != n:
            problems.append(f"{f}: ls -l says {sizes[f]} bytes, cat read {n}")
    assert not problems, "\n".join(problems)

    paths = [m.path(f) for f in files] + [m.path(d) for d in dirs]
    s1 = run(["stat", "-c", "%i %n", *paths])
    s2 = run(["stat", "-c", "%i %n", *paths])
    assert s1.code == 0, str(s1)
    assert s1.stdout == s2.stdout, f"inode numbers changed:\n{s1.stdout}\n{s2.stdout}"
    inos = [line.split(" ", 1)[0] for line in s1.stdout.splitlines()]
    dup = sorted({i for i in inos if inos.count(i) > 1})
    assert not dup, f"distinct paths share inode numbers {dup}:\n{s1.stdout}"


# ---------------------------------------------------------------------------
# 3. identity view = the source, byte for byte
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src",
    [FIXTURES / TP4, ckpt.resolve_iteration(FIXTURES / GPT)],
    ids=["tp4-root", "gpt-iteration-folder"],
)
def test_identity_mount_is_the_source(src, mounts):
    m = mounts()
    m.start_ok(src, [])
    tree = mount_tree(m)
    assert tree == local_tree(src), "identity mount tree differs from the source tree"
    assert_cmp_all(m, src, files_of(tree))


def test_relative_source_path(mounts):
    """The daemon leaves its working directory: a relative SRC must still serve every byte."""
    m = mounts()
    cmd = m.command(TP4, [])
    r = subprocess.run(cmd, cwd=FIXTURES, capture_output=True, timeout=30, env=mountutil.SUB_ENV)
    m.remember()
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert m.is_mounted()
    tree = mount_tree(m)
    assert_cmp_all(m, FIXTURES / TP4, files_of(tree))
    assert m.stats()["read_errors"] == 0


# ---------------------------------------------------------------------------
# 4. .reshardfs/: stats, plan, summary
# ---------------------------------------------------------------------------


def test_reshardfs_folder(mounts, exports):
    src = FIXTURES / TP4
    args = ["--mesh", "tp=2"]
    exp_root = exports(src, args)
    m = mounts()
    m.start_ok(src, args)

    r = run(["ls", "-a", m.mnt])
    assert r.code == 0 and META in r.stdout.split(), str(r)
    r = run(["ls", "-a", m.path(META)])
    assert r.code == 0, str(r)
    assert {"README", "stats", "summary", "plan"} <= set(r.stdout.split()), str(r)
    assert read_bytes(m.path(META, "README")).strip(), "empty README"

    stats = m.stats()
    missing = [k for k in STATS_KEYS if k not in stats]
    assert not missing, f"stats lacks {missing}: {stats}"
    notint = {k: stats[k] for k in STATS_KEYS if not isinstance(stats[k], int) or stats[k] < 0}
    assert not notint, f"stats values not non-negative integers: {notint}"
    pid = stats["pid"]
    assert mountutil.pid_alive(pid), f"stats pid {pid} is not a live process"
    assert pid in mountutil.daemon_pids(m.mnt), f"stats pid {pid}, daemon processes {mountutil.daemon_pids(m.mnt)}"

    summary = read_bytes(m.path(META, "summary")).decode()
    lines = summary.splitlines()
    assert lines[0].split() == ["source", str(src.resolve())] or lines[0].split() == ["source", str(src)], \
        f"the summary's first line must name the source:\n{summary}"
    assert lines[1].split() == ["target", "tp=2"], f"the summary's second line must name the target tp=2:\n{summary}"
    # Every view file of the export, with its size and tensor count, on a line of its own.
    _, rels_all = view_files(src, args, exp_root)
    for rel in rels_all:
        n_tensors = len(ckpt.read_safetensors(exp_root / rel).tensors)
        want = [os.path.basename(rel), str((exp_root / rel).stat().st_size), "bytes", str(n_tensors), "tensor(s)"]
        assert any(ln.split()[:5] == want for ln in lines), f"the summary lacks {' '.join(want)}:\n{summary}"
    base = os.path.dirname(rels_all[0])
    small = sum((exp_root / base / n).stat().st_size for n in ("metadata.json", "common.json"))
    total = sum((exp_root / rel).stat().st_size for rel in rels_all) + small  # the iteration's files
    assert any(ln.startswith("total") and f"{len(rels_all)} file(s), {total} bytes" in ln for ln in lines), \
        f"the summary's total must be {len(rels_all)} file(s), {total} bytes:\n{summary}"

    base, rels = view_files(src, args, exp_root)
    f = rels[1]
    size = (exp_root / f).stat().st_size
    n = len(read_bytes(m.path(f)))
    assert n == size
    after = m.stats()
    assert after["bytes_served"] - stats["bytes_served"] >= size, (
        f"bytes_served {stats['bytes_served']} -> {after['bytes_served']} after reading {size} bytes of {f}")
    assert after["reads"] > stats["reads"], f"reads {stats['reads']} -> {after['reads']}"
    # The first read of a view file on a fresh mount computes every data byte from the source.
    header_len = 8 + int.from_bytes((exp_root / f).read_bytes()[:8], "little")
    data = size - header_len
    assert after["source_bytes_read"] - stats["source_bytes_read"] >= data, (
        f"source_bytes_read {stats['source_bytes_read']} -> {after['source_bytes_read']} after a first read of "
        f"{f} ({data} data bytes)")
    assert after["internal_errors"] == 0, after
    assert after["pid"] == pid

    plan_tree = mount_tree(m, with_meta=True)
    plans = {p[len(META) + len("/plan/"):] for p, t in plan_tree.items() if t == "f" and p.startswith(f"{META}/plan/")}
    want = {rel + ".txt" for rel in files_of(local_tree(exp_root)) if rel.endswith(".safetensors")}
    assert plans == want, f"plan/ holds {sorted(plans)}, view safetensors files give {sorted(want)}"
    it = ckpt.resolve_iteration(src)
    params, S, P = ckpt.load_checkpoint(it)
    needs = needed_sources(it, ckpt.expected_for(params, S, P, ckpt.parse_target_name("tp=2")), None)
    source_files = set(ckpt.rank_files(it).values())
    for rel in sorted(want):
        text = read_bytes(m.path(META, "plan", rel)).decode()
        view = rel[: -len(".txt")]
        missing = [n for n in tensor_names(exp_root / view) if n not in text]
        assert not missing, f"plan/{rel} does not mention {missing}"
        named = {f for f in source_files if f in text}
        assert named == needs[os.path.basename(view)], (
            f"plan/{rel} names source files {sorted(named)}, the oracle reads {sorted(needs[os.path.basename(view)])}")


# ---------------------------------------------------------------------------
# 5. concurrent random reads (also with a cache small enough to evict)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [None, "64K"], ids=["default-cache", "cache-64K"])
def test_concurrent_random_reads(cache, mounts, exports):
    src = FIXTURES / GPT
    args = ["--mesh", "dp=1,tp=4", "--pp", "1"]
    exp_root = exports(src, args)
    m = mounts()
    extra = ["--cache-size", cache, "--threads", "2"] if cache else []
    m.start_ok(src, args + extra)
    _, rels = view_files(src, args, exp_root)
    model = [r for r in rels if "-model-" in r]
    opt = [r for r in rels if "-opt-" in r]
    picks = [model[0], model[0], model[1], opt[0], opt[2], opt[2]]
    procs = []
    for seed, rel in enumerate(picks, 1):
        cmd = [mountutil.PYTHON, mountutil.SELF, "pread", m.path(rel), exp_root / rel, 1000 + seed, 150, 65536]
        procs.append((cmd, subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=mountutil.SUB_ENV)))
    deadline = time.monotonic() + 60
    results = []
    try:
        for cmd, p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append((cmd, p.returncode, out.decode(), err.decode()))
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
    bad = [f"$ {mountutil.cmdline(c)}\nexit {rc}\n{o}\n{e[-2000:]}" for c, rc, o, e in results if rc != 0]
    assert not bad, "concurrent readers saw wrong bytes:\n" + "\n".join(bad)
    assert len(results) == len(procs), "readers timed out"
    if cache:  # end with a whole opt file (one block, larger than 64K) read
        assert len(read_bytes(m.path(opt[1]))) == (exp_root / opt[1]).stat().st_size
    stats = m.stats()
    assert stats["read_errors"] == 0, stats
    if cache:
        assert stats["cache_capacity"] == 64 * 1024, stats
        assert stats["cache_misses"] > 0, stats
        missing = [k for k in STATS_KEYS if k not in stats]
        assert not missing, f"stats lacks {missing}: {stats}"
        # blocks loaded > blocks resident: something was evicted
        assert stats["cache_misses"] > stats["cache_blocks"], f"no eviction with a 64K cache: {stats}"
        assert stats["cache_bytes"] <= stats["cache_capacity"], f"cache holds more than --cache-size 64K: {stats}"


# ---------------------------------------------------------------------------
# 6. read-only
# ---------------------------------------------------------------------------


def test_read_only(mounts, exports):
    src = FIXTURES / TP4
    args = ["--mesh", "tp=2"]
    exp_root = exports(src, args)
    m = mounts()
    m.start_ok(src, args)
    it = ckpt.resolve_iteration(src).name
    _, rels = view_files(src, args, exp_root)
    f = m.path(rels[0])
    before = mount_tree(m, with_meta=True)
    _, ls_before = ls_long(m.path(it))

    writes = [  # must fail with EROFS
        ["touch", m.path("x")],
        ["touch", m.path(it, "new.safetensors")],
        ["sh", "-c", f"printf x >> '{f}'"],
        ["sh", "-c", f"printf x > '{f}'"],
        ["truncate", "-s", "0", f],
        ["rm", f],
        ["rm", m.path(it, "metadata.json")],
        ["mv", f, f + ".bak"],
        ["mkdir", m.path("d")],
        ["mkdir", m.path(it, "d")],
        ["ln", "-s", "x", m.path("link")],
        ["sh", "-c", f"printf x > '{m.path(META, 'stats')}'"],
        ["touch", m.path(META, "new")],
        ["rm", m.path(META, "README")],
    ]
    others = [  # metadata changes: must fail
        ["touch", f],
        ["chmod", "777", f],
    ]
    problems = []
    for cmd in writes + others:
        r = run(cmd, timeout=30)
        if r.code == 0:
            problems.append(f"succeeded: {mountutil.cmdline(cmd)}")
        elif cmd in writes and RO_ERROR not in r.stderr:
            problems.append(f"failed with another error than EROFS:\n{r}")
    assert not problems, "\n".join(problems)
    after = mount_tree(m, with_meta=True)
    assert after == before, f"tree changed: added {sorted(set(after) - set(before))}, removed {sorted(set(before) - set(after))}"
    _, ls_after = ls_long(m.path(it))
    assert ls_after == ls_before, "modes or sizes changed"
    assert_cmp_all(m, exp_root, files_of(local_tree(exp_root)))


# ---------------------------------------------------------------------------
# 7. bad input: exit 2, a message, nothing mounted
# ---------------------------------------------------------------------------


def _no_daemon_left(m: Mount, wait=2.0):
    deadline = time.monotonic() + wait
    while m.live_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not m.live_pids()


ERROR_CASES = ["bad_source", "missing_mount_point", "mount_point_is_a_file", "bad_target", "bad_cache_size",
               "foreground_bad_target", "foreground_missing_mount_point"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_mount_bad_input(case, mounts, fixture_copy, tmp_path):
    src = FIXTURES / TP4
    args = ["--mesh", "tp=2"]
    mention = []
    if case == "bad_source":
        src = fixture_copy(TP4)
        (src / "iteration_00000005" / "metadata.json").write_text('{"state_dict_metadata": {"x": ')
        mention = ["metadata.json"]
        m = mounts()
    elif case == "missing_mount_point":
        m = mounts("nope", create=False)
        mention = ["nope"]
    elif case == "mount_point_is_a_file":
        m = mounts("afile", create=False)
        m.mnt.write_text("not a folder\n")
        mention = ["afile"]
    elif case == "bad_target":
        m = mounts()
        args = ["--mesh", "tp=3"]
    elif case == "bad_cache_size":
        m = mounts()
        args = ["--mesh", "tp=2", "--cache-size", "12Q"]
    elif case == "foreground_bad_target":
        m = mounts()
        args = ["--mesh", "tp=3", "--foreground"]
    elif case == "foreground_missing_mount_point":
        m = mounts("nope", create=False)
        args = ["--mesh", "tp=2", "--foreground"]
        mention = ["nope"]
    r = m.start(src, args, timeout=20)
    assert r.code == 2, f"expected exit 2\n{r}"
    assert r.stderr.strip(), f"no message on stderr\n{r}"
    assert "panicked" not in r.stderr, str(r)
    for s in mention:
        assert s in r.stderr, f"message does not mention {s!r}\n{r}"
    assert not m.is_mounted(), f"something is mounted at {m.mnt} after a failed mount\n{r}"
    assert _no_daemon_left(m), f"reshardfs processes left for {m.mnt}: {m.live_pids()}"
    if case == "mount_point_is_a_file":
        assert m.mnt.read_text() == "not a folder\n"
    if case == "missing_mount_point":
        assert not os.path.lexists(m.mnt)


def test_mount_point_already_mounted(mounts, exports):
    src = FIXTURES / TP4
    args = ["--mesh", "tp=2"]
    exp_root = exports(src, args)
    m = mounts()
    m.start_ok(src, args)
    pid = daemon_pid(m)
    r = m.start(FIXTURES / GPT, ["--mesh", "tp=1"])
    assert r.code == 2, f"mounting over a live mount: expected exit 2\n{r}"
    assert r.stderr.strip() and "panicked" not in r.stderr, str(r)
    assert len(m.entries()) == 1, f"mounts stacked at {m.mnt}: {m.entries()}"
    # The refused command has exited (m.start waits for it), and it refuses before forking: no
    # process but the first daemon exists, checked at once rather than after a sleep.
    assert m.live_pids() == {pid}, f"extra reshardfs processes for {m.mnt}: {m.live_pids()}"
    assert mountutil.pid_alive(pid), "the first daemon died"
    assert daemon_pid(m) == pid
    assert mount_tree(m) == local_tree(exp_root), "the first mount's tree changed"
    assert_cmp_all(m, exp_root, files_of(local_tree(exp_root)))


# ---------------------------------------------------------------------------
# 8. faults: a source file truncated under a live mount
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tname,victim", [("tp=2", 1), ("tp=4", 3)], ids=["tp2-rank1-truncated", "tp4-rank3-truncated"])
def test_truncated_source_file(tname, victim, mounts, fixture_copy, exports):
    args = ["--mesh", tname]
    exp_root = exports(FIXTURES / TP4, args)  # of the pristine fixture
    src = fixture_copy(TP4)
    it = ckpt.resolve_iteration(src)
    params, S, P = ckpt.load_checkpoint(it)
    exp = ckpt.expected_for(params, S, P, ckpt.parse_target_name(tname))
    victim_file = ckpt.file_name(None, "model", victim, 4)
    needs = needed_sources(it, exp, None)
    hit = sorted(f for f, srcs in needs.items() if victim_file in srcs)
    spared = sorted(f for f, srcs in needs.items() if victim_file not in srcs)
    assert hit and spared, f"case needs both affected and unaffected view files: {needs}"

    m = mounts()
    m.start_ok(src, args)
    pid = daemon_pid(m)
    p = it / victim_file
    os.truncate(p, p.stat().st_size // 2)

    for f in hit:
        for attempt in (1, 2):
            r = cat(m.path(it.name, f))
            assert r.code != 0, f"{f} (needs truncated {victim_file}) read fine, attempt {attempt}"
            assert "Input/output error" in r.stderr, f"expected EIO reading {f}\n{r}"
    stats = m.stats()
    assert stats["read_errors"] > 0, stats
    assert stats["pid"] == pid and mountutil.pid_alive(pid), "daemon died"
    assert_cmp_all(m, exp_root, [os.path.join(it.name, f) for f in spared] + [os.path.join(it.name, "metadata.json"), TRACKER])
    for f in hit + spared:
        text = read_bytes(m.path(META, "plan", it.name, f + ".txt")).decode()
        assert (victim_file in text) == (f in hit), (
            f"plan of {f} {'does not mention' if f in hit else 'mentions'} {victim_file}, oracle: needs {sorted(needs[f])}")
    assert mountutil.pid_alive(pid), "daemon died"
    assert m.is_mounted()


# ---------------------------------------------------------------------------
# 9. signals (--foreground) and umount (background)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_foreground_unmounts_on_signal(sig, mounts, exports, tmp_path):
    src = FIXTURES / TP4
    args = ["--mesh", "tp=2"]
    exp_root = exports(src, args)
    m = mounts()
    log = tmp_path / "fg.log"
    p = m.start_foreground(src, args + ["--log-level", "info"], log=log)
    ok = m.wait_mounted(10, p)
    assert ok, f"not mounted within 10s (exit {p.poll()}):\n{log.read_text(errors='replace')[-3000:]}"
    assert p.poll() is None, "the foreground mount returned while mounted"
    assert_cmp_all(m, exp_root, ["latest_checkpointed_iteration.txt"])
    p.send_signal(sig)
    try:
        rc = p.wait(timeout=1)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"--foreground mount still running 1 s after {sig.name}")
    assert rc == 0, f"exit {rc} after {sig.name}:\n{log.read_text(errors='replace')[-3000:]}"
    assert not m.is_mounted(), f"still mounted after {sig.name}"
    assert log.read_text(errors="replace").strip(), "--foreground --log-level info logged nothing to stderr"


def test_background_daemon_exits_on_umount(mounts):
    m = mounts()
    m.start_ok(FIXTURES / TP4, ["--mesh", "tp=2"])
    pid = daemon_pid(m)
    assert mountutil.pid_alive(pid)
    r = run(["umount", m.mnt], timeout=30)
    assert r.code == 0, str(r)
    assert not m.is_mounted()
    assert mountutil.wait_gone(pid, 5), f"daemon {pid} still running 5s after umount"


def test_lazy_umount_with_open_file(mounts, exports):
    src = FIXTURES / TP4
    args = ["--mesh", "tp=2"]
    exp_root = exports(src, args)
    _, rels = view_files(src, args, exp_root)
    want = mountutil._sha((exp_root / rels[1]).read_bytes())
    m = mounts()
    m.start_ok(src, args)
    pid = daemon_pid(m)
    holder = subprocess.Popen([mountutil.PYTHON, mountutil.SELF, "hold", m.path(rels[1])], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mountutil.SUB_ENV)
    try:
        assert mountutil.readline_timeout(holder.stdout, 30) == b"open\n", holder.stderr.read() if holder.poll() is not None else ""
        r = run(["umount", m.mnt], timeout=30)
        assert r.code != 0 and m.is_mounted(), f"plain umount of a busy mount should fail\n{r}"
        r = run(["umount", "-l", m.mnt], timeout=30)
        assert r.code == 0, str(r)
        assert not m.is_mounted()
        assert mountutil.pid_alive(pid), "daemon exited while a file was still open"
        holder.stdin.write(b"read\n")
        holder.stdin.flush()
        line = mountutil.readline_timeout(holder.stdout, 30).decode().split()
        assert line == [want, str((exp_root / rels[1]).stat().st_size)], f"read through the open fd after umount -l: {line}"
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for f in (holder.stdin, holder.stdout, holder.stderr):
            f.close()
    assert mountutil.wait_gone(pid, 5), f"daemon {pid} still running 5s after the last close"


def test_note_for_a_fuse_source_with_little_readahead(mounts, tmp_path):
    """A source on a FUSE filesystem whose readahead is under 1 MiB gets a note on stderr naming
    the sysfs file that raises it (the source here: a reshardfs mount of the GPT fixture, its
    read_ahead_kb set to 128 as sshfs mounts have it); at 1024 there is none. The export itself
    succeeds either way."""
    a = mounts("a")
    a.start_ok(FIXTURES / GPT, [])
    (entry,) = a.entries()
    bdi = Path(f"/sys/class/bdi/{entry.dev}/read_ahead_kb")
    assert bdi.exists(), f"no {bdi} for the mount {entry}"
    bdi.write_text("128")
    r = ckpt.export(a.mnt, tmp_path / "slow", ["--unshard"])
    assert r.code == 0, str(r)
    assert "note:" in r.stderr and str(bdi) in r.stderr and "128 KiB" in r.stderr \
        and "FUSE" in r.stderr, f"no readahead note for a 128 KiB FUSE source:\n{r}"
    bdi.write_text("1024")
    r = ckpt.export(a.mnt, tmp_path / "fast", ["--unshard"])
    assert r.code == 0, str(r)
    assert "note:" not in r.stderr, f"a note although the readahead is 1 MiB:\n{r}"


def test_mount_over_a_dead_mount_says_to_unmount_it(mounts):
    """A daemon killed (SIGKILL) leaves its mount point answering ENOTCONN ("Transport endpoint is
    not connected") to everything; `mount` there says so and what to run, exit 2."""
    m = mounts()
    m.start_ok(FIXTURES / TP4, ["--mesh", "tp=2"])
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGKILL)
    assert mountutil.wait_gone(pid, 10), "the daemon survived SIGKILL"
    assert m.is_mounted(), "a killed daemon's mount stays until unmounted"
    for args in (["mount", FIXTURES / TP4, m.mnt, "--mesh", "tp=2"], ["inspect", m.mnt]):
        r = ckpt.run_cli(args, timeout=30)
        assert r.code == 2, f"expected exit 2\n{r}"
        assert "umount" in r.stderr and str(m.mnt) in r.stderr, f"no hint to unmount\n{r}"
    assert "dead mount" in ckpt.run_cli(["mount", FIXTURES / TP4, m.mnt], timeout=30).stderr
