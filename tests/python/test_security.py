"""Security of the mount: only the mounting user reads it unless
--allow-other; every write-like operation is refused. Accesses run as
subprocesses with timeouts; mount points sit in a world-traversable folder
so that another user's denial comes from the mount, not from the path."""

import os
import tempfile
from pathlib import Path

import pytest

import ckpt
import mountutil
from ckpt import FIXTURES
from mountutil import Mount, run

TP4 = "tp4-f32"
FILE = "iteration_00000005/model-0000000-0000002.safetensors"
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def open_mount(mount_bin):
    """A guarded Mount in a fresh 0755 folder under /tmp."""
    made = []

    def make():
        base = Path(tempfile.mkdtemp(prefix="reshardfs-sec-", dir="/tmp"))
        os.chmod(base, 0o755)
        (base / "mnt").mkdir(mode=0o755)
        m = Mount(base / "mnt", mount_bin)
        made.append((base, m))
        return m

    yield make
    for base, m in made:
        m.cleanup()
        if not m.is_mounted():
            (base / "mnt").rmdir()
            base.rmdir()


@pytest.mark.parametrize("allow_other", [False, True], ids=["owner-only", "allow-other"])
def test_other_users(allow_other, open_mount, exports):
    args = ["--mesh", "tp=2"] + (["--allow-other"] if allow_other else [])
    ref = exports(FIXTURES / TP4, ["--mesh", "tp=2"])
    m = open_mount()
    m.start_ok(FIXTURES / TP4, args)
    assert run(["cmp", ref / FILE, m.path(FILE)]).code == 0, "the mounting user must read the view"
    r = run(AS_NOBODY + ["cat", m.path(FILE)])
    if allow_other:
        assert r.code == 0 and len(r.out) == (ref / FILE).stat().st_size, f"--allow-other: nobody must read\n{r}"
    else:
        assert r.code != 0 and "Permission denied" in r.stderr, f"without --allow-other nobody must be refused\n{r}"


@pytest.mark.parametrize("cmd", [
    ["chmod", "777", "{f}"],
    ["truncate", "-s", "0", "{f}"],
    ["mv", "{f}", "{d}/moved"],
    ["ln", "-s", "x", "{d}/link"],
    ["ln", "{f}", "{d}/hard"],
    ["cp", "/etc/hostname", "{d}/new"],
    ["rmdir", "{d}"],
    ["setfattr", "-n", "user.x", "-v", "1", "{f}"],
], ids=lambda c: c[0] + ("-hard" if c[:1] == ["ln"] and "-s" not in c else ""))
def test_write_operations_refused(cmd, open_mount, exports):
    ref = exports(FIXTURES / TP4, ["--mesh", "tp=2"])
    m = open_mount()
    m.start_ok(FIXTURES / TP4, ["--mesh", "tp=2"])
    f, d = m.path(FILE), m.path("iteration_00000005")
    if cmd[0] == "setfattr" and run(["sh", "-c", "command -v setfattr"]).code != 0:
        cmd = ["python3", "-c", f"import os; os.setxattr({f!r}, 'user.x', b'1')"]
    r = run([c.format(f=f, d=d) for c in cmd])
    assert r.code != 0, f"{cmd[0]} succeeded on the read-only view\n{r}"
    # Refused because the view is read-only, not for another reason (a missing file, a crash).
    assert "Read-only file system" in r.stderr, f"{cmd[0]} failed, but not with EROFS\n{r}"
    assert run(["cmp", ref / FILE, f]).code == 0, "the view changed"
    listing = run(["ls", d]).stdout.split()
    assert sorted(listing) == sorted(p.name for p in (ref / "iteration_00000005").iterdir())


AS_NOBODY_IN_ROOTS_GROUP = ["setpriv", "--reuid=65534", "--regid=0", "--clear-groups"]
PRIVATE = "iteration_00000005/model-0000003-0000004.safetensors"  # read by view rank 1 of tp=2
V0 = "iteration_00000005/model-0000000-0000002.safetensors"
V1 = "iteration_00000005/model-0000001-0000002.safetensors"


@pytest.fixture
def open_source():
    """A copy of the tp4 fixture in a fresh 0755 folder under /tmp (files 0644, owned by root):
    whatever another user is refused, the mount refuses, not the path."""
    import shutil

    made = []

    def make(modes: dict):
        base = Path(tempfile.mkdtemp(prefix="reshardfs-src-", dir="/tmp"))
        made.append(base)
        os.chmod(base, 0o755)
        shutil.copytree(FIXTURES / TP4, base / "src")
        for d, _, files in os.walk(base / "src"):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        for rel, mode in modes.items():
            os.chmod(base / "src" / rel, mode)
        return base / "src"

    yield make
    for base in made:
        shutil.rmtree(base, ignore_errors=True)


def mode_of(path) -> int:
    r = run(["stat", "-c", "%a", path])
    assert r.code == 0, str(r)
    return int(r.stdout.strip(), 8)


def test_allow_other_grants_no_more_than_the_source(open_mount, open_source, exports):
    """--allow-other over a source with one file -rw------- (as transformers writes shards): the
    view file made from it, every listing and every .reshardfs/ file grant only the mounting user,
    so another user reads nothing (the root folder lists every file of the view); with the file
    -rw-r----- the members of the mounting user's group read what is made of it; with -rw-r--r--
    everyone does, byte for byte."""
    ref = exports(FIXTURES / TP4, ["--mesh", "tp=2"])
    cases = [(0o600, {V1: 0o400, V0: 0o444, "": 0o500, ".reshardfs": 0o500, ".reshardfs/summary": 0o400,
                      f".reshardfs/plan/{V1}.txt": 0o400, "iteration_00000005/metadata.json": 0o400}),
             (0o640, {V1: 0o440, V0: 0o444, "": 0o550, ".reshardfs/summary": 0o440}),
             (0o644, {V1: 0o444, V0: 0o444, "": 0o555, ".reshardfs/summary": 0o444})]
    for mode, want in cases:
        src = open_source({PRIVATE: mode})
        m = open_mount()
        m.start_ok(src, ["--mesh", "tp=2", "--allow-other"])
        got = {rel: mode_of(m.path(rel) if rel else m.mnt) for rel in want}
        assert got == want, f"source file mode {mode:o}: view modes " + \
            str({k: oct(v) for k, v in got.items()})
        assert run(["cmp", ref / V1, m.path(V1)]).code == 0, "the mounting user must read the view"
        other = run(AS_NOBODY + ["cat", m.path(V0)])
        member = run(AS_NOBODY_IN_ROOTS_GROUP + ["cat", m.path(V1)])
        listing = run(AS_NOBODY + ["ls", m.mnt])
        summary = run(AS_NOBODY + ["cat", m.path(".reshardfs", "summary")])
        m.cleanup()
        if mode == 0o600:
            for r in (other, member, listing, summary):
                assert r.code != 0 and "Permission denied" in r.stderr, f"mode {mode:o}: must be refused\n{r}"
        elif mode == 0o640:
            assert member.code == 0 and member.out == (ref / V1).read_bytes(), f"a group member must read\n{member}"
            assert other.code != 0 and "Permission denied" in other.stderr, f"others must be refused\n{other}"
        else:
            assert other.code == 0 and other.out == (ref / V0).read_bytes(), str(other)
            assert member.code == 0 and member.out == (ref / V1).read_bytes(), str(member)
            assert listing.code == 0 and summary.code == 0, f"{listing}\n{summary}"


WHOLE = "iteration_00000005/model-0000001-0000004.safetensors"


@pytest.mark.parametrize("allow_other", [False, True], ids=["owner-only", "allow-other"])
def test_passthrough_files_keep_the_same_rules(allow_other, open_mount):
    """The source's own strategy: every view file is a source file whole, opened by passthrough.
    Other users, modes and writes are as for every view file."""
    args = ["--mesh", "tp=4"] + (["--allow-other"] if allow_other else [])
    src = FIXTURES / TP4 / WHOLE
    m = open_mount()
    m.start_ok(FIXTURES / TP4, args)
    assert run(["cmp", src, m.path(WHOLE)]).code == 0
    r = run(AS_NOBODY + ["cat", m.path(WHOLE)])
    if allow_other:
        assert r.code == 0 and r.out == src.read_bytes(), f"--allow-other: nobody must read\n{r}"
    else:
        assert r.code != 0 and "Permission denied" in r.stderr, f"without --allow-other nobody must be refused\n{r}"
    # The view file's own attributes (read-only), not the source file's.
    mode = int(run(["stat", "-c", "%a", m.path(WHOLE)]).stdout.strip(), 8)
    assert mode & 0o222 == 0, oct(mode)
    for cmd in (["truncate", "-s", "0", m.path(WHOLE)], ["sh", "-c", f"echo x >> {m.path(WHOLE)}"]):
        r = run(cmd)
        assert r.code != 0, f"{cmd} succeeded on the read-only view"
        assert "Read-only file system" in r.stderr, f"{cmd} failed, but not with EROFS\n{r}"
    assert run(["cmp", src, m.path(WHOLE)]).code == 0, "the view (or its source) changed"
    s = m.stats()
    assert s["passthrough_opens"] >= 2 + allow_other and s["bytes_served"] == 0, s
