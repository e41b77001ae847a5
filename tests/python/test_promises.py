"""README promises no other test pins, each checked against what the README says:

* `ls -l` reads no data: listing every folder with sizes reads no source byte (stats);
* SIGINT/SIGTERM/SIGHUP detach the mount lazily: open files finish their reads, then it exits;
* `export` writes each file under a temporary name renamed when complete, the tracker last: a
  failed write (exit 1) leaves no file under its final name that is not complete;
* the tree shows the source's times;
* `--no-prefetch` turns prefetch off; the caps: blocks at most a quarter of `--cache-size`, the
  prefetch window at most half of it.

Same rules as test_mount.py: one guarded mount per test, every access under a mount point is a
subprocess with a timeout.
"""

import os
import resource
import signal
import subprocess

import ckpt
import mountutil
from ckpt import FIXTURES, TRACKER
from mountutil import run

TP4 = "tp4-f32"
GPT = "gpt-dp2-tp2-pp2-bf16"


def view_rels(root) -> list[str]:
    """Relative paths of every file of a local export."""
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return sorted(out)


def test_ls_l_reads_no_data(mounts):
    """A resharded view (no file a source file whole), listed with sizes and stat'ed throughout:
    every size comes from the headers, so no source byte is read and no view byte served."""
    m = mounts()
    m.start_ok(FIXTURES / GPT, ["--mesh", "dp=1,tp=4", "--pp", "1", "--no-passthrough"])
    for cmd in (["ls", "-lR", m.path()], ["find", m.path(), "-type", "f", "-exec", "stat", "-c", "%s %n", "{}", "+"]):
        r = run(cmd, timeout=30)
        assert r.code == 0 and ".safetensors" in r.stdout, str(r)
    s = m.stats()
    assert s["source_bytes_read"] == 0, f"ls -lR and stat read {s['source_bytes_read']} source bytes: {s}"
    assert s["bytes_served"] == 0 and s["reads"] == 0, f"ls -lR and stat read view data: {s}"


def test_signal_detaches_lazily_while_an_open_file_finishes(mounts, exports, tmp_path):
    """SIGTERM to a --foreground mount with a view file open: the mount leaves the tree at once,
    the open file still reads every byte right, and the process exits 0 once it is closed."""
    src, args = FIXTURES / TP4, ["--mesh", "tp=2"]
    ref = exports(src, args)
    rel = "iteration_00000005/model-0000001-0000002.safetensors"
    want = f"{mountutil._sha((ref / rel).read_bytes())} {(ref / rel).stat().st_size}"
    m = mounts()
    log = tmp_path / "fg.log"
    p = m.start_foreground(src, args, log=log)
    assert m.wait_mounted(10, p), f"not mounted within 10 s:\n{log.read_text(errors='replace')[-2000:]}"
    holder = subprocess.Popen([mountutil.PYTHON, mountutil.SELF, "hold", m.path(rel)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mountutil.SUB_ENV)
    try:
        assert mountutil.readline_timeout(holder.stdout, 30) == b"open\n", "the holder could not open the file"
        p.send_signal(signal.SIGTERM)
        mountutil.wait_until(lambda: not m.is_mounted(), 5, "the mount to detach after SIGTERM")
        assert p.poll() is None, f"the mount exited (code {p.poll()}) with a file still open"
        holder.stdin.write(b"read\n")
        holder.stdin.flush()
        got = mountutil.readline_timeout(holder.stdout, 30).decode().strip()
        assert got == want, f"reading the open file after SIGTERM: {got!r}, want {want!r}"
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for f in (holder.stdin, holder.stdout, holder.stderr):
            if f and not f.closed:
                f.close()
    try:
        rc = p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the mount still runs 10 s after its last open file closed")
    assert rc == 0, f"exit {rc} after SIGTERM:\n{log.read_text(errors='replace')[-2000:]}"


def test_export_failed_write_leaves_no_partial_file(tmp_path, reshardfs_bin, exports):
    """Writes beyond 64 KiB fail (RLIMIT_FSIZE, EFBIG): export exits 1 naming the file, every file
    under its final name is complete (equal to a full export's), the tracker is not written, and
    no temporary file is left."""
    src, args = FIXTURES / TP4, ["--mesh", "tp=2"]
    ref = exports(src, args)
    limit = 64 << 10
    assert any((ref / r).stat().st_size > limit for r in view_rels(ref)), "no view file is larger than the limit"
    dest = tmp_path / "dest"

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, inherited by exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cp = subprocess.run([str(reshardfs_bin), "export", str(src), str(dest), *args, "--threads", "1"],
                        capture_output=True, timeout=120, preexec_fn=limited, stdin=subprocess.DEVNULL)
    err = cp.stderr.decode(errors="replace")
    assert cp.returncode == 1, f"a failed write must exit 1, got {cp.returncode}:\n{err}"
    assert ".safetensors" in err and "panicked" not in err, f"stderr does not name the file:\n{err}"
    got = view_rels(dest) if dest.exists() else []
    assert TRACKER not in got, f"the tracker was written although a file failed: {got}"
    leftovers = [r for r in got if "reshardfs-tmp" in r]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for r in got:
        assert (ref / r).exists(), f"{r}: not a file of the view"
        assert (dest / r).read_bytes() == (ref / r).read_bytes(), f"{r}: incomplete under its final name"


def test_the_tree_shows_the_sources_times(mounts):
    """Iteration folders and view files take the source iteration folder's mtime, common.json its
    own, the tracker the tracker's, the root the source root's."""
    src = FIXTURES / TP4
    it = src / "iteration_00000005"
    m = mounts()
    m.start_ok(src, ["--mesh", "tp=2"])
    want = {
        "": src, "iteration_00000005": it, TRACKER: src / TRACKER,
        "iteration_00000005/common.json": it / "common.json",
        "iteration_00000005/metadata.json": it,
        "iteration_00000005/model-0000000-0000002.safetensors": it,
        "iteration_00000005/model-0000001-0000002.safetensors": it,
    }
    r = run(["stat", "-c", "%Y %n", *[m.path(k) for k in want]], timeout=30)
    assert r.code == 0, str(r)
    got = {os.path.relpath(line.split(" ", 1)[1], m.path()): int(line.split(" ", 1)[0])
           for line in r.stdout.splitlines()}
    for rel, source in want.items():
        key = os.path.relpath(m.path(rel), m.path())
        assert got[key] == int(source.stat().st_mtime), \
            f"{rel or '/'}: mtime {got[key]}, want {source}'s {int(source.stat().st_mtime)}"


def read_sequentially(m, rel):
    r = run(["cat", m.path(rel)], timeout=30)
    assert r.code == 0, str(r)
    return r


def test_no_prefetch_and_the_caps(mounts, exports, monkeypatch):
    """With a 128 KiB cache: blocks of 32 KiB (a quarter), a prefetch window of 64 KiB (half)
    although 1 MiB was asked; a sequential read prefetches; with --no-prefetch the same read
    prefetches nothing. RESHARDFS_PREFETCH=always: prefetch even though the source is in the page
    cache, so that only the flag decides."""
    monkeypatch.setitem(mountutil.SUB_ENV, "RESHARDFS_PREFETCH", "always")
    src, target = FIXTURES / TP4, ["--mesh", "tp=2"]
    args = target + ["--cache-size", "128K", "--prefetch-window", "1M"]
    rel = "iteration_00000005/model-0000000-0000002.safetensors"
    size = (exports(src, target) / rel).stat().st_size
    assert size > 4 * (32 << 10), f"the view file must span several 32 KiB blocks ({size} bytes)"
    for no_prefetch in (False, True):
        m = mounts(f"mnt{int(no_prefetch)}")
        m.start_ok(src, args + (["--no-prefetch"] if no_prefetch else []))
        s = m.stats()
        assert s["cache_capacity"] == 128 << 10 and s["block_size"] == 32 << 10, \
            f"a 128 KiB cache must have 32 KiB blocks (a quarter): {s}"
        # 4 KiB reads past the page cache (O_DIRECT): each request a part of one block, in order,
        # as a sequential reader's are once the kernel's readahead is spent.
        r = run(["dd", f"if={m.path(rel)}", "of=/dev/null", "bs=4096", "iflag=direct"], timeout=30)
        assert r.code == 0 and f"{size} bytes" in r.stderr, str(r)
        s = m.stats()
        if no_prefetch:
            assert s["prefetch_blocks"] == 0, f"--no-prefetch: {s['prefetch_blocks']} blocks computed ahead: {s}"
        else:
            assert s["prefetch_window"] == 64 << 10, f"the window must be capped at half the cache: {s}"
            assert s["prefetch_blocks"] > 0, f"a sequential read without --no-prefetch prefetched nothing: {s}"
        r = run(["umount", m.mnt], timeout=30)
        assert r.code == 0, str(r)
