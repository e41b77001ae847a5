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
