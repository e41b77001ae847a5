"""View files that are a source file whole: marked by `plan`, read by the kernel straight from the
source file when mounted (FUSE passthrough), copied whole by `export`.

The reference for every byte is the source file itself, read from disk by this process, and the
mapping of view ranks to source ranks is written out by hand from the fixture's layout
(dp=2 x tp=2 x pp=2, ranks numbered stage, then dp, then tp). Every access to a mount is a
subprocess (mountutil.py); every mount has a guard. The ordinary user's fallback is tested in
test_user_mount.py, where the suite mounts as a second user.
"""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

import ckpt
import mountutil
from ckpt import FIXTURES
from mountutil import cat, cmp

GPT = "gpt-dp2-tp2-pp2-bf16"
IT = "iteration_00000001"
DP1 = ["--mesh", "dp=1"]
# View rank (stage p, tp t) of the dp=1 view is source rank 4p + t, for model and optimizer files.
SOURCE_OF = {
    f"gpt-{kind}-{v:07d}-0000004.safetensors": f"gpt-{kind}-{s:07d}-0000008.safetensors"
    for kind in ("model", "opt")
    for v, s in ((0, 0), (1, 1), (2, 4), (3, 5))
}
# The file the fault tests change, and the view file that is it.
CHANGED_VIEW = "gpt-model-0000003-0000004.safetensors"
CHANGED_SOURCE = SOURCE_OF[CHANGED_VIEW]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_plan_marks_the_files_that_are_a_source_file_whole():
    r = ckpt.run_cli(["plan", FIXTURES / GPT, *DP1, "--json"])
    assert r.code == 0, str(r)
    plan = json.loads(r.stdout)
    got = {f["name"]: f.get("same_as_source") for f in plan["iterations"][0]["files"]}
    assert got == SOURCE_OF
    assert plan["totals"]["same_as_source"] == 8
    text = ckpt.run_cli(["plan", FIXTURES / GPT, *DP1]).stdout
    assert f"byte for byte the source file {SOURCE_OF[CHANGED_VIEW]}, whole" in text, text
    assert "8 of the 8 view file(s) are a source file whole" in text, text
    # A tensor-parallel change makes new files: none is marked.
    r = ckpt.run_cli(["plan", FIXTURES / GPT, "--mesh", "tp=4", "--json"])
    plan = json.loads(r.stdout)
    assert all("same_as_source" not in f for f in plan["iterations"][0]["files"])
    assert plan["totals"]["same_as_source"] == 0


def check_every_file(m, src):
    """Every view file against its source file: cmp (read) and the sha256 of an mmap of it."""
    for view, source in SOURCE_OF.items():
        r = cmp(src / IT / source, m.path(IT, view))
        assert r.code == 0, f"{view} (read) differs from {source}:\n{r}"
        code = ("import hashlib, mmap, sys; f = open(sys.argv[1], 'rb'); "
                "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); print(hashlib.sha256(m).hexdigest())")
        r = mountutil.run([mountutil.PYTHON, "-c", code, m.path(IT, view)])
        assert r.code == 0, str(r)
        assert r.stdout.strip() == sha((src / IT / source).read_bytes()), f"{view} (mmap) differs from {source}"


def test_a_data_parallel_view_is_read_by_the_kernel(mounts):
    src = FIXTURES / GPT
    m = mounts()
    m.start_ok(src, DP1)
    check_every_file(m, src)
    s = m.stats()
    # 16 opens (cmp and the mmap per file); not one byte went through the daemon.
    assert s["passthrough_opens"] == 16, s
    assert (s["passthrough_fallbacks"], s["bytes_served"], s["read_errors"]) == (0, 0, 0), s
    assert s["passthrough_backing_files"] == 0, "backing files left registered after every file closed"
    summary = mountutil.read_text(m.path(".reshardfs", "summary"))
    for view, source in SOURCE_OF.items():
        assert any(view in line and f"= {source}" in line for line in summary.splitlines()), summary
    text = mountutil.read_text(m.path(".reshardfs", "plan", IT, CHANGED_VIEW + ".txt"))
    assert f"byte for byte the source file {CHANGED_SOURCE}" in text, text
    # A reader holding a file open keeps one backing file registered.
    with holder(m.path(IT, CHANGED_VIEW)) as h:
        assert h.read() == (sha((src / IT / CHANGED_SOURCE).read_bytes()), os.path.getsize(src / IT / CHANGED_SOURCE))
        assert m.stats()["passthrough_backing_files"] == 1
    mountutil.wait_until(lambda: m.stats()["passthrough_backing_files"] == 0, 10, "the backing file to go")


def test_no_passthrough_serves_them_through_the_daemon(mounts):
    src = FIXTURES / GPT
    m = mounts()
    m.start_ok(src, DP1 + ["--no-passthrough"])
    check_every_file(m, src)
    s = m.stats()
    assert (s["passthrough_opens"], s["passthrough_backing_files"]) == (0, 0), s
    assert s["passthrough_fallbacks"] == 16 and s["bytes_served"] > 0, s


class holder:
    """A subprocess holding a mount file open (mountutil.py hold / maphold)."""

    def __init__(self, path, cmd="hold"):
        self.p = subprocess.Popen([mountutil.PYTHON, mountutil.SELF, cmd, path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mountutil.SUB_ENV)
        line = mountutil.readline_timeout(self.p.stdout, 30).decode()
        assert line.strip() in ("open", "mapped"), f"{cmd} {path}: {line!r} {self.p.stderr.read(2000)!r}"

    def read(self):
        """(sha256, length) read through the open file, or None when the process died."""
        self.p.stdin.write(b"read\n")
        self.p.stdin.flush()
        line = mountutil.readline_timeout(self.p.stdout, 30).decode().split()
        if not line:
            return None
        return (line[0], int(line[1])) if line[0] != "error" else tuple(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        return False


def truncate(p):
    os.truncate(p, os.path.getsize(p) // 2)


def delete(p):
    p.unlink()


def replace(p):
    """A new save renamed over the old file: same name and bytes, another inode."""
    tmp = p.with_name(p.name + ".new")
    shutil.copyfile(p, tmp)
    os.replace(tmp, p)


def rewrite(p):
    """Other bytes written into the same file, same length."""
    n = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(n // 2)
        f.write(b"\xaa" * (n - n // 2))


CHANGES = [truncate, delete, replace, rewrite]
IDS = ["truncated", "deleted", "replaced", "rewritten"]


@pytest.mark.parametrize("change", CHANGES, ids=IDS)
def test_a_source_changed_before_an_open_fails_it(change, mounts, fixture_copy):
    src = fixture_copy(GPT)
    original = {v: (src / IT / s).read_bytes() for v, s in SOURCE_OF.items()}
    m = mounts()
    m.start_ok(src, DP1)
    change(src / IT / CHANGED_SOURCE)
    r = cat(m.path(IT, CHANGED_VIEW))
    assert r.code != 0 and "Input/output error" in r.stderr, f"reading the view of the changed file:\n{r}"
    for view in SOURCE_OF:
        if view != CHANGED_VIEW:
            assert mountutil.read_bytes(m.path(IT, view)) == original[view], view
    s = m.stats()
    assert s["read_errors"] > 0, s
    assert s["passthrough_opens"] == len(SOURCE_OF) - 1, "the changed file was handed to the kernel"


# What a reader that opened the view file before the change reads through it afterwards
# (README, Limits): passthrough reads the source file itself, so the kernel decides.
HELD = {
    # The inode it holds is the planned file, unchanged: the planned bytes.
    "deleted": "original",
    "replaced": "original",
    # Reads stop at the new end; a map of the old length raises SIGBUS past it.
    "truncated": "short",
    # The same inode with other bytes: the reader sees them.
    "rewritten": "new",
}


@pytest.mark.parametrize("change", CHANGES, ids=IDS)
def test_a_source_changed_under_an_open_passthrough_file(change, mounts, fixture_copy):
    src = fixture_copy(GPT)
    path = src / IT / CHANGED_SOURCE
    before = path.read_bytes()
    m = mounts()
    m.start_ok(src, DP1)
    with holder(m.path(IT, CHANGED_VIEW)) as h, holder(m.path(IT, CHANGED_VIEW), "maphold") as mh:
        assert h.read() == (sha(before), len(before))
        assert mh.read() == (sha(before), len(before))
        assert m.stats()["passthrough_opens"] == 2
        change(path)
        got, mapped = h.read(), mh.read()
        kind = HELD[IDS[CHANGES.index(change)]]
        if kind == "original":
            assert got == (sha(before), len(before)) and mapped == got, (got, mapped)
        elif kind == "short":
            half = len(before) // 2
            assert got == (sha(before[:half]), half), got
            assert mapped is None, f"a map past the new end read {mapped}"
            mh.p.wait(timeout=30)
            assert mh.p.returncode == -7, f"the mapping reader ended with {mh.p.returncode}, not SIGBUS"
        else:
            after = path.read_bytes()
            assert after != before and got == (sha(after), len(after)) and mapped == got, (got, mapped)
        # A new open of it fails: the changed file is never handed out again.
        r = cat(m.path(IT, CHANGED_VIEW))
        assert r.code != 0 and "Input/output error" in r.stderr, str(r)
    s = m.stats()
    assert s["read_errors"] > 0 and s["passthrough_opens"] == 2, s
    # The other files are unaffected.
    for view, source in SOURCE_OF.items():
        if view != CHANGED_VIEW:
            assert cmp(src / IT / source, m.path(IT, view)).code == 0, view
    mountutil.wait_until(lambda: m.stats()["passthrough_backing_files"] == 0, 10, "the backing files to go")


def test_export_copies_them_whole(tmp_path):
    dest = tmp_path / "out"
    r = ckpt.export(FIXTURES / GPT, dest, DP1)
    assert r.code == 0, str(r)
    assert "8 copied whole from the source" in r.stderr, r.stderr
    for view, source in SOURCE_OF.items():
        assert (dest / IT / view).read_bytes() == (FIXTURES / GPT / IT / source).read_bytes(), view
    # To another filesystem (tmpfs) copy_file_range refuses (EXDEV): the engine writes them.
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        pytest.fail("/dev/shm (tmpfs) is needed to test export across filesystems")
    import tempfile

    other = tempfile.mkdtemp(prefix="reshardfs-test-", dir=shm)
    try:
        r = ckpt.export(FIXTURES / GPT, os.path.join(other, "out"), DP1)
        assert r.code == 0, str(r)
        assert "copied whole" not in r.stderr, r.stderr
        for view, source in SOURCE_OF.items():
            got = open(os.path.join(other, "out", IT, view), "rb").read()
            assert got == (FIXTURES / GPT / IT / source).read_bytes(), view
    finally:
        shutil.rmtree(other, ignore_errors=True)
