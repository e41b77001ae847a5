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
    assert run(["cmp", ref / FILE, f]).code == 0, "the view changed"
    listing = run(["ls", d]).stdout.split()
    assert sorted(listing) == sorted(p.name for p in (ref / "iteration_00000005").iterdir())


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
        assert run(cmd).code != 0, f"{cmd} succeeded on the read-only view"
    assert run(["cmp", src, m.path(WHOLE)]).code == 0, "the view (or its source) changed"
    s = m.stats()
    assert s["passthrough_opens"] >= 2 + allow_other and s["bytes_served"] == 0, s
