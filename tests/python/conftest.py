import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ckpt  # noqa: E402


@pytest.fixture(scope="session")
def reshardfs_bin():
    """Path of the binary under test. Fails (never skips) when it is missing."""
    b = ckpt.binary()
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        pytest.fail(
            f"reshardfs binary not found at {b!r}: run `cargo build` or set RESHARDFS_BIN",
            pytrace=False,
        )
    return b


def copy_tree_writable(src, dst):
    """copytree, then make everything writable (the fixtures are read-only)."""
    shutil.copytree(src, dst)
    for dirpath, dirnames, filenames in os.walk(dst):
        os.chmod(dirpath, os.stat(dirpath).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    return Path(dst)


@pytest.fixture
def fixture_copy(tmp_path):
    def make(name):
        return copy_tree_writable(ckpt.FIXTURES / name, tmp_path / ("src-" + name))

    return make


@pytest.fixture(scope="session", autouse=True)
def _no_fuse_mount_left_behind(tmp_path_factory):
    """At session end no FUSE mount may remain under this session's tmp dirs: leftovers are
    lazily unmounted and the session fails."""
    yield
    import subprocess

    import mountutil

    base = tmp_path_factory.getbasetemp()
    left = mountutil.fuse_mounts_under(base)
    for e in left:
        subprocess.run(["umount", "-l", e.mount_point], capture_output=True, timeout=30)
    if left:
        pytest.fail(
            "FUSE mounts left behind (now lazily unmounted): " + ", ".join(e.mount_point for e in left),
            pytrace=False,
        )
