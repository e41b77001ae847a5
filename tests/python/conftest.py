import os
import shutil
import stat
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ckpt  # noqa: E402
import mountutil  # noqa: E402
from mountutil import Mount, run  # noqa: E402


# Tiers. `scripts/test.sh --quick` runs `-m "not fuse and not hf_stack and not slow"`: the tests
# that need nothing but the binary, numpy and safetensors. CI runs everything.
MARKERS = {
    "fuse": "mounts a FUSE filesystem (root, or a user through fusermount3)",
    "hf_stack": "needs torch, transformers or vLLM",
    "slow": "takes more than a few seconds (load, synthetic checkpoints)",
    "hooks": "needs a binary built with the `test-hooks` feature; test.sh also runs these on a release build",
}
# Fixtures that imply a marker: whatever uses them gets it.
FIXTURE_MARKERS = {
    "mounts": "fuse",
    "mount_bin": "fuse",
    "world": "fuse",
    "user": "fuse",
    "tiny_model": "hf_stack",
    "synth_ckpt": "slow",
    # A real S3 server (Node.js, installed by the full tier only).
    "s3": "slow",
}


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


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

    base = tmp_path_factory.getbasetemp()
    left = mountutil.fuse_mounts_under(base)
    for e in left:
        subprocess.run(["umount", "-l", e.mount_point], capture_output=True, timeout=30)
    if left:
        pytest.fail(
            "FUSE mounts left behind (now lazily unmounted): " + ", ".join(e.mount_point for e in left),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def mount_bin(reshardfs_bin):
    """The binary, once FUSE is usable here and it has a `mount` subcommand. Fails, never skips."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()})")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse does not exist")
    elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
        problems.append("/dev/fuse is not readable and writable")
    if problems:
        pytest.fail("cannot test the FUSE mount on this machine: " + "; ".join(problems), pytrace=False)
    r = run([reshardfs_bin, "mount", "--help"], timeout=30)
    if r.code != 0:
        pytest.fail(f"the binary has no working `mount` subcommand (`mount --help` must exit 0):\n{r}", pytrace=False)
    return reshardfs_bin


@pytest.fixture
def mounts(tmp_path, mount_bin):
    """mounts(name="mnt", create=True) -> a guarded Mount at tmp_path/name. Every Mount made
    is cleaned up after the test (lazy unmount, daemon reaped, fusectl abort as last resort)."""
    made = []

    def make(name="mnt", create=True):
        mnt = tmp_path / name
        if create:
            mnt.mkdir()
        m = Mount(mnt, mount_bin)
        made.append(m)
        return m

    yield make
    notes = []
    for m in reversed(made):
        notes += m.cleanup()
    if notes:
        warnings.warn("mount cleanup had to force things: " + "; ".join(notes))


@pytest.fixture(scope="session")
def exports(tmp_path_factory, reshardfs_bin):
    """exports(src, target_args) -> folder holding `reshardfs export src ... target_args`."""
    cache = {}

    def get(src, args):
        key = (str(src), tuple(args))
        if key not in cache:
            dest = tmp_path_factory.mktemp("mexport") / "out"
            r = ckpt.export(src, dest, list(args))
            assert r.code == 0, str(r)
            cache[key] = dest
        return cache[key]

    return get


@pytest.fixture(scope="session")
def synth_export(synth_ckpt, exports):
    """synth_export(target_args) -> exports(synth_ckpt, target_args), checked once per target
    against the numpy oracle (ckpt.expected_for), so that the load and fault tests, which compare
    the mount with it, compare with something checked independently of reshardfs."""
    checked = set()

    def get(args):
        ref = exports(synth_ckpt, args)
        key = tuple(args)
        if key not in checked:
            assert args[0] == "--mesh" and (len(args) == 2 or args[2] == "--pp"), f"a mesh target: {args}"
            name = args[1] + (f",pp={args[3]}" if len(args) > 2 else "")
            it = ckpt.resolve_iteration(synth_ckpt)
            params, S, P = ckpt.load_checkpoint(it)
            exp = ckpt.expected_for(params, S, P, ckpt.parse_target_name(name))
            firsts = [f.name for f in it.iterdir() if "model-" in f.name]
            prefix = firsts[0].split("-model-")[0] if "-model-" in firsts[0] else None
            problems = ckpt.check_export_iteration(ref / it.name, it, exp, prefix)
            assert not problems, f"export of the synthetic checkpoint {args} != the oracle:\n" + "\n".join(problems[:20])
            checked.add(key)
        return ref

    return get


@pytest.fixture(scope="session")
def synth_ckpt(tmp_path_factory):
    """A synthetic checkpoint of real random data, larger than the fixtures
    (~120 MiB: 2 layers, hidden 512, tp=4 x pp=2, Adam states), written by
    scripts/synth_checkpoint.py."""
    out = tmp_path_factory.mktemp("synth") / "ckpt"
    script = ckpt.REPO_ROOT / "scripts" / "synth_checkpoint.py"
    r = run([sys.executable, script, out, "--layers", "2", "--hidden", "512", "--vocab", "4096",
             "--tp", "4", "--pp", "2", "--opt", "--fill", "random"], timeout=300)
    assert r.code == 0, str(r)
    return out
