"""Faults under a live mount: sources deleted or replaced, a reader killed in
the middle of a read, `umount -l` while reads are in flight. Every access to
the mount is a subprocess with a timeout; every mount has a guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ckpt
import mountutil
from ckpt import FIXTURES
from mountutil import cat, cmp

TP4 = "tp4-f32"
READER = str(Path(__file__).resolve().parent / "loadreader.py")


def delete(p: Path):
    p.unlink()


def replace(p: Path):
    """A new save renamed over the old file: same name and size, another inode."""
    tmp = p.with_name(p.name + ".new")
    shutil.copyfile(p, tmp)
    os.replace(tmp, p)


@pytest.mark.parametrize("change", [delete, replace], ids=["deleted", "replaced"])
def test_changed_source_fails_only_the_reads_that_need_it(change, mounts, fixture_copy, exports):
    # Identity view of tp4: view rank r reads its slices from source rank r
    # (its replicated tensors too), so changing rank 3's file affects view
    # rank 3 only.
    args = ["--mesh", "tp=4"]
    ref = exports(FIXTURES / TP4, args)
    src = fixture_copy(TP4)
    it = ckpt.resolve_iteration(src)
    m = mounts()
    m.start_ok(src, args)
    pid = m.stats()["pid"]
    change(it / "model-0000003-0000004.safetensors")

    r = cat(m.path(it.name, "model-0000003-0000004.safetensors"))
    assert r.code != 0 and "Input/output error" in r.stderr, f"reading the affected view file:\n{r}"
    for rank in range(3):
        name = f"model-{rank:07d}-0000004.safetensors"
        r = cmp(ref / it.name / name, m.path(it.name, name))
        assert r.code == 0, f"{name} does not need the changed file but reads differently:\n{r}"
    stats = m.stats()
    assert stats["read_errors"] > 0 and stats["pid"] == pid and mountutil.pid_alive(pid)


def test_reader_killed_mid_read(synth_ckpt, mounts, synth_export):
    args = ["--mesh", "tp=2", "--pp", "1"]
    ref = synth_export(args)
    big = max((p for p in ref.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    rel = str(big.relative_to(ref))
    m = mounts()
    m.start_ok(synth_ckpt, args + ["--cache-size", "8M"])
    pid = m.stats()["pid"]
    for delay in (0.0, 0.02, 0.1):
        p = subprocess.Popen(["cat", m.path(rel)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Killed mid-read: once the file is open (and at varied points after), not before.
            mountutil.wait_until(lambda: mountutil.open_files_under(p.pid, m.mnt) > 0 or p.poll() is not None,
                                 30, f"cat to open {rel}")
            time.sleep(delay)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
    assert mountutil.pid_alive(pid), "daemon died when a reader was killed"
    r = cmp(big, m.path(rel), timeout=120)
    assert r.code == 0, f"after killed readers the file reads differently:\n{r}"
    assert m.stats()["read_errors"] == 0


def test_lazy_umount_while_reads_are_in_flight(synth_ckpt, mounts, synth_export):
    args = ["--mesh", "tp=2", "--pp", "1"]
    ref = synth_export(args)
    files = sorted(str(p.relative_to(ref)) for p in ref.rglob("*.safetensors"))
    m = mounts()
    m.start_ok(synth_ckpt, args)
    pid = m.stats()["pid"]
    readers = [subprocess.Popen([sys.executable, READER, str(seed), "4", m.path(), str(ref), *files],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mountutil.SUB_ENV)
               for seed in range(4)]
    try:
        # In flight: every reader holds all its files open on the mount, and the daemon is
        # answering reads (polled, not a fixed sleep that may be too short on a loaded machine).
        before = m.stats()["reads"]
        mountutil.wait_until(
            lambda: all(mountutil.open_files_under(p.pid, m.mnt) >= len(files) for p in readers)
            and m.stats()["reads"] >= before + 2 * len(readers),
            30, "every reader to open its files and read")
        assert all(p.poll() is None for p in readers), "a reader ended before umount -l"
        r = mountutil.run(["umount", "-l", m.mnt], timeout=30)
        assert r.code == 0, str(r)
        assert not m.is_mounted()
        for p in readers:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, f"a reader with open files failed after umount -l: {out.decode()} {err.decode()[-1000:]}"
            assert json.loads(out)["reads"] > 0
    finally:
        for p in readers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert mountutil.wait_gone(pid, 10), f"daemon {pid} still running 10 s after the last reader closed"
