"""Mounting as an ordinary user, through fusermount3.

An ordinary user cannot call mount(2): reshardfs then mounts through the setuid helper
`fusermount3` (from the forked daemon too) and unmounts through `fusermount3 -u`. fusermount3
opens /dev/fuse with the user's own rights, so the user needs /dev/fuse mode 0666 (desktops,
Debian's fuse3 udev rule) -- on machines and containers where it is 0600 (this one) no ordinary
user can mount FUSE at all, and reshardfs says so.

Run as root, each case creates an ordinary user (`useradd`) and runs inside a private mount
namespace (`unshare --mount`) where /dev/fuse (and /etc/fuse.conf) are replaced by bind mounts of
the mode under test, so both kinds of machine are tested here without changing the host. Run as
an ordinary user, the cases that need a particular /dev/fuse mode run when the host has it and are
skipped with the reason otherwise."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import ckpt

TP4 = "tp4-f32"
USER = "reshardfs-test"
IS_ROOT = os.geteuid() == 0


def have(cmd):
    return shutil.which(cmd) is not None


@pytest.fixture(scope="module")
def user():
    """An ordinary user to mount as: ourselves when not root, else a system user made here (and
    removed again at the end when this module made it)."""
    if not IS_ROOT:
        yield None
        return
    for tool in ("unshare", "runuser", "mknod", "useradd"):
        if not have(tool):
            pytest.skip(f"{tool} is not installed")
    made = False
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"cannot create an ordinary user with useradd: {r.stderr.strip()}")
        made = True
    yield USER
    if made:
        subprocess.run(["userdel", USER], capture_output=True, timeout=30)


@pytest.fixture
def world(tmp_path_factory, reshardfs_bin, user):
    """A 0755 folder every user can traverse: the binary, a readable source, a mount point owned
    by the user, and a reference export."""
    base = Path(tempfile.mkdtemp(prefix="reshardfs-user-", dir="/tmp"))
    os.chmod(base, 0o755)
    shutil.copy(reshardfs_bin, base / "reshardfs")
    os.chmod(base / "reshardfs", 0o755)
    shutil.copytree(ckpt.FIXTURES / TP4, base / "src")
    for d, _, files in os.walk(base / "src"):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    (base / "mnt").mkdir()
    (base / "out").mkdir()
    if user:
        shutil.chown(base / "mnt", user)
        shutil.chown(base / "out", user)
    yield base
    subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True, timeout=30)
    shutil.rmtree(base, ignore_errors=True)


def scenario(base: Path, user, body: str, fuse_mode=None, fuse_conf=None, no_dev_fuse=False, timeout=120):
    """Run `body` (sh) as the ordinary user; as root inside a private mount namespace where
    /dev/fuse has `fuse_mode` (or is missing) and /etc/fuse.conf holds `fuse_conf`."""
    setup = ["set -u"]
    if IS_ROOT:
        setup.append(f"mkdir -p {base}/ns")
        if no_dev_fuse:
            setup += [f"mount -t tmpfs tmpfs /dev", "mknod -m 666 /dev/null c 1 3"]
        elif fuse_mode is not None:
            setup += [f"mknod -m {fuse_mode:o} {base}/ns/fuse c 10 229", f"mount --bind {base}/ns/fuse /dev/fuse"]
        if fuse_conf is not None:
            (base / "fuse.conf").write_text(fuse_conf)
            os.chmod(base / "fuse.conf", 0o644)
            setup.append(f"mount --bind {base}/fuse.conf /etc/fuse.conf")
        (base / "body.sh").write_text(body)
        os.chmod(base / "body.sh", 0o755)
        setup.append(f"runuser -u {user} -- /bin/sh {base}/body.sh")
        cmd = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(setup)]
    else:
        cmd = ["/bin/sh", "-c", body]
    env = {k: v for k, v in os.environ.items() if k != "FUSERMOUNT_PATH"}
    env["RUST_BACKTRACE"] = "0"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    return r


def host_fuse_mode():
    try:
        return stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    except FileNotFoundError:
        return None


def need_mode(world_ok: bool, why: str):
    if not IS_ROOT and not world_ok:
        pytest.skip(why)


MOUNT = "{b}/reshardfs mount {b}/src {b}/mnt --mesh tp=2"


def test_mount_through_fusermount3_reads_every_file_and_unmounts(world, user, reshardfs_bin):
    if not have("fusermount3"):
        pytest.fail("fusermount3 is not installed: scripts/test.sh installs Debian's fuse3")
    need_mode(os.access("/dev/fuse", os.R_OK | os.W_OK),
              "/dev/fuse is not readable and writable by this (ordinary) user: no user mount possible here")
    b = world
    ref = b / "ref"
    r = ckpt.export(b / "src", ref, ["--mesh", "tp=2"])
    assert r.code == 0, str(r)
    body = f"""
{MOUNT.format(b=b)} --log-file {b}/out/daemon.log; echo "mount-exit $?"
grep -q " {b}/mnt " /proc/self/mountinfo && echo mounted
grep " {b}/mnt " /proc/self/mountinfo
pid=$(sed -n 's/^pid: //p' {b}/mnt/.reshardfs/stats)
echo "pid $pid"
cd {b}/mnt && find . -path ./.reshardfs -prune -o -type f -print | sort | while read f; do
  echo "file $f $(sha256sum < "$f" | cut -d' ' -f1)"
done
cd /
fusermount3 -u {b}/mnt; echo "umount-exit $?"
i=0; while [ -e /proc/$pid ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
[ -e /proc/$pid ] && echo "daemon-alive $pid" && kill -9 $pid
grep -q " {b}/mnt " /proc/self/mountinfo && echo still-mounted && fusermount3 -u -z {b}/mnt
echo done
"""
    r = scenario(b, user, body, fuse_mode=0o666)
    out = r.stdout
    assert "mount-exit 0" in out, f"mount failed\n{out}\n{r.stderr}\n{log_of(b)}"
    assert "mounted" in out.split(), out
    line = next(ln for ln in out.splitlines() if f" {b}/mnt " in ln and "fuse" in ln)
    if user:  # the mount is the user's, made by fusermount3
        uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)
        assert f"user_id={uid}" in line, line
    got = {ln.split()[1][2:]: ln.split()[2] for ln in out.splitlines() if ln.startswith("file ")}
    want = {str(p.relative_to(ref)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ref.rglob("*")) if p.is_file()}
    assert got == want, f"files differ from the export:\n{json.dumps(got, indent=1)}\n{json.dumps(want, indent=1)}"
    assert "umount-exit 0" in out, out
    assert "daemon-alive" not in out, f"daemon still running after fusermount3 -u\n{out}\n{log_of(b)}"
    assert "still-mounted" not in out, out
    assert "done" in out, out


def log_of(b):
    p = b / "out" / "daemon.log"
    return p.read_text(errors="replace")[-3000:] if p.exists() else "(no log)"


def refused(r, b, *words):
    out = r.stdout + r.stderr
    assert "mount-exit 2" in out, f"expected exit 2\n{out}"
    for w in words:
        assert w in out, f"message lacks {w!r}\n{out}"
    assert "panicked" not in out
    assert "mounted-anyway" not in out, out
    assert "leftover" not in out, out


CHECK_NOTHING_LEFT = """
grep -q " {b}/mnt " /proc/self/mountinfo && echo mounted-anyway && fusermount3 -u -z {b}/mnt
for p in /proc/[0-9]*; do
  [ "$(readlink $p/exe 2>/dev/null)" = "{b}/reshardfs" ] && echo "leftover ${{p#/proc/}}" && kill -9 ${{p#/proc/}}
done
true
"""


def test_dev_fuse_0600_is_explained(world, user):
    need_mode(not os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse is accessible to this user")
    b = world
    body = f"{MOUNT.format(b=b)}; echo \"mount-exit $?\"\n" + CHECK_NOTHING_LEFT.format(b=b)
    r = scenario(b, user, body, fuse_mode=0o600)
    refused(r, b, "/dev/fuse", "0666", "root")


def test_no_fusermount3_is_explained(world, user):
    need_mode(os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse is not accessible to this user")
    b = world
    body = (f"FUSERMOUNT_PATH={b}/no-such-fusermount3 PATH=/nonexistent {MOUNT.format(b=b)}; echo \"mount-exit $?\"\n"
            + CHECK_NOTHING_LEFT.format(b=b))
    r = scenario(b, user, body, fuse_mode=0o666)
    refused(r, b, "fusermount3", "fuse3")


def test_allow_other_without_user_allow_other_is_explained(world, user):
    need_mode(os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse is not accessible to this user")
    if not IS_ROOT and "user_allow_other" in Path("/etc/fuse.conf").read_text(errors="replace").split():
        pytest.skip("/etc/fuse.conf has user_allow_other here")
    b = world
    body = f"{MOUNT.format(b=b)} --allow-other; echo \"mount-exit $?\"\n" + CHECK_NOTHING_LEFT.format(b=b)
    r = scenario(b, user, body, fuse_mode=0o666, fuse_conf="# mount_max = 1000\n#user_allow_other\n")
    refused(r, b, "--allow-other", "user_allow_other", "/etc/fuse.conf")


def test_allow_other_with_user_allow_other_mounts(world, user):
    if not IS_ROOT:
        pytest.skip("needs root to give /etc/fuse.conf user_allow_other in a private namespace")
    b = world
    body = f"""{MOUNT.format(b=b)} --allow-other; echo "mount-exit $?"
grep " {b}/mnt " /proc/self/mountinfo
fusermount3 -u {b}/mnt; echo "umount-exit $?"
""" + CHECK_NOTHING_LEFT.format(b=b)
    r = scenario(b, user, body, fuse_mode=0o666, fuse_conf="user_allow_other\n")
    assert "mount-exit 0" in r.stdout, r.stdout + r.stderr
    assert "allow_other" in r.stdout, r.stdout
    assert "umount-exit 0" in r.stdout and "mounted-anyway" not in r.stdout, r.stdout


def test_no_dev_fuse_is_explained(world, user):
    if not IS_ROOT:
        pytest.skip("needs root to hide /dev/fuse in a private namespace")
    b = world
    body = f"{MOUNT.format(b=b)}; echo \"mount-exit $?\"\n" + CHECK_NOTHING_LEFT.format(b=b)
    r = scenario(b, user, body, no_dev_fuse=True)
    refused(r, b, "/dev/fuse", "does not exist", "modprobe")


def test_fusermount3_refusal_is_reported(world, user):
    """A mount point the user may not write: fusermount3 refuses, from inside the daemon; its
    message comes back as the command's error (exit 2) and nothing is left."""
    need_mode(os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse is not accessible to this user")
    if not IS_ROOT:
        pytest.skip("needs root to make a mount point the user does not own")
    b = world
    (b / "rootmnt").mkdir(mode=0o755)
    body = (f"{b}/reshardfs mount {b}/src {b}/rootmnt --mesh tp=2; echo \"mount-exit $?\"\n"
            + CHECK_NOTHING_LEFT.format(b=b).replace(f"{b}/mnt", f"{b}/rootmnt"))
    r = scenario(b, user, body, fuse_mode=0o666)
    refused(r, b, "fusermount3", "rootmnt")


def test_foreground_user_mount_unmounts_on_sigterm(world, user):
    """--foreground as an ordinary user: SIGTERM unmounts through fusermount3 -u and ends."""
    need_mode(os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse is not accessible to this user")
    b = world
    body = f"""{MOUNT.format(b=b)} --foreground &
fg=$!
i=0; until grep -q " {b}/mnt " /proc/self/mountinfo || [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done
grep -q " {b}/mnt " /proc/self/mountinfo && echo mounted
head -c 8 {b}/mnt/iteration_00000005/model-0000000-0000002.safetensors | od -An -tu8 | tr -d ' ' | sed 's/^/header-len /'
kill -TERM $fg
i=0; while [ -e /proc/$fg ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
[ -e /proc/$fg ] && echo "still-running" && kill -9 $fg
wait $fg; echo "fg-exit $?"
""" + CHECK_NOTHING_LEFT.format(b=b)
    r = scenario(b, user, body, fuse_mode=0o666)
    out = r.stdout
    assert "mounted" in out.split(), out + r.stderr
    assert "header-len" in out, out
    assert "still-running" not in out, out
    assert "fg-exit 0" in out, out + r.stderr
    assert "mounted-anyway" not in out and "leftover" not in out, out


def test_an_ordinary_user_gets_the_daemon_instead_of_passthrough(world, user):
    """The source's own strategy: every view file is a source file whole, which root's mount hands
    to the kernel (test_passthrough.py). An ordinary user may not register backing files
    (CAP_SYS_ADMIN): the files are served through the daemon, the same bytes, and the log says
    why in one line."""
    need_mode(os.access("/dev/fuse", os.R_OK | os.W_OK), "/dev/fuse is not accessible to this user")
    b = world
    it = "iteration_00000005"
    body = f"""{b}/reshardfs mount {b}/src {b}/mnt --mesh tp=4 --log-file {b}/out/daemon.log; echo "mount-exit $?"
for f in {b}/mnt/{it}/*.safetensors; do echo "file $(basename $f) $(sha256sum < $f | cut -d' ' -f1)"; done
sed 's/^/stat /' {b}/mnt/.reshardfs/stats
fusermount3 -u {b}/mnt; echo "umount-exit $?"
""" + CHECK_NOTHING_LEFT.format(b=b)
    r = scenario(b, user, body, fuse_mode=0o666)
    out = r.stdout
    assert "mount-exit 0" in out, f"{out}\n{r.stderr}\n{log_of(b)}"
    got = {ln.split()[1]: ln.split()[2] for ln in out.splitlines() if ln.startswith("file ")}
    want = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (b / "src" / it).glob("*.safetensors")}
    assert got == want and len(got) == 4, f"the view files are not the source files:\n{got}\n{want}"
    stats = {ln.split()[1].rstrip(":"): ln.split()[2] for ln in out.splitlines() if ln.startswith("stat ")}
    assert stats["passthrough_opens"] == "0" and stats["passthrough_fallbacks"] == "4", stats
    log = log_of(b)
    lines = [ln for ln in log.splitlines() if "FUSE passthrough" in ln]
    assert len(lines) == 1 and "CAP_SYS_ADMIN" in lines[0] and "through the daemon" in lines[0], log
    assert "umount-exit 0" in out and "mounted-anyway" not in out and "leftover" not in out, out
