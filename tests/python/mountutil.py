"""Helpers for testing the reshardfs FUSE mount, and the reader run in subprocesses.

The pytest process never touches a path under a mount point: a hung or dead daemon would
block it (a hung daemon blocks `stat` forever) or leave it holding the mount busy. Every
access to a mount goes through a subprocess with a timeout; "is it mounted" is answered by
/proc/self/mountinfo; the daemon's pid is found in /proc (and in `.reshardfs/stats`).

`Mount` is the guard: on cleanup (also after a failure) it lazily unmounts, waits for the
daemon to exit, kills it if it does not, and as a last resort aborts the FUSE connection
through fusectl.

Run as a script (`python mountutil.py CMD ...`, always in a subprocess, on mount paths):
  tensors FILE...                 every tensor of each safetensors file, read with
                                  safetensors' safe_open (mmap) for every non-BF16 tensor and
                                  ckpt's raw reader (read()) for all, cross-checked; prints
                                  JSON {file: {"size", "tensors": {name: [dtype, shape, sha256]}}}
  pread FILE REF SEED N MAXLEN [DROP]
                                  N random os.pread()s of FILE compared with the same ranges
                                  of REF (a regular file), each after dropping the kernel's
                                  cached pages of FILE unless DROP is 0 (so reads reach the
                                  daemon); JSON summary, exit 1 on mismatch
  hold FILE                       open FILE, print "open"; on each stdin line "read" print the
                                  sha256 and length of the whole file read through that fd;
                                  exit on stdin EOF
  maphold FILE                    open FILE and mmap it whole (its fstat size), print "mapped";
                                  on each stdin line "read" print the sha256 of the whole map
                                  (a SIGBUS ends the process); exit on stdin EOF
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ckpt  # noqa: E402

PYTHON = sys.executable
SELF = str(Path(__file__).resolve())
FUSECTL = Path("/sys/fs/fuse/connections")
SUB_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "RUST_BACKTRACE": "0"}

# ---------------------------------------------------------------------------
# /proc/self/mountinfo
# ---------------------------------------------------------------------------


@dataclass
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    dev: str  # "major:minor" of the superblock
    options: str = ""  # per-mount options (ro, nosuid, ...)
    superopts: str = ""  # superblock options (allow_other, ...)

    @property
    def dev_num(self) -> int:
        """The kernel dev_t: the name of the mount's folder under /sys/fs/fuse/connections."""
        major, minor = (int(x) for x in self.dev.split(":"))
        return (major << 20) | minor


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            fields = pre.split(" ")
            rest = post.split(" ")
            out.append(MountEntry(_unescape(fields[4]), rest[0], _unescape(rest[1]) if len(rest) > 1 else "", fields[2],
                                  fields[5], rest[2] if len(rest) > 2 else ""))
    return out


def mount_key(path) -> str:
    """The path as mountinfo spells it, computed without stat()ing `path` itself (only its
    parent is resolved: the mount point may belong to a hung daemon)."""
    path = os.path.abspath(str(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounted_at(path) -> list[MountEntry]:
    k = mount_key(path)
    return [m for m in mounts() if m.mount_point == k]


def is_mounted(path) -> bool:
    return bool(mounted_at(path))


def fuse_mounts_under(prefix) -> list[MountEntry]:
    p = os.path.realpath(str(prefix)).rstrip("/") + "/"
    return [m for m in mounts() if m.fstype.startswith("fuse") and (m.mount_point + "/").startswith(p)]


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def open_files_under(pid: int, prefix) -> int:
    """How many of process `pid`'s descriptors are open on files under `prefix`. Read from
    /proc/PID/fd (readlink never touches the mount itself)."""
    prefix = os.path.abspath(str(prefix)).rstrip("/") + "/"
    n = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                n += 1
        except OSError:
            pass
    return n


def wait_until(cond, timeout: float, what: str, step=0.02):
    """Poll `cond()` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def daemon_pids(mnt) -> set[int]:
    """Live reshardfs processes whose command line names this mount point (the daemon, a
    foreground mount, or a `reshardfs mount` still starting)."""
    names = {str(mnt), mount_key(mnt), os.path.abspath(str(mnt))}
    exe = os.path.basename(ckpt.binary())
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode("utf-8", "replace") for a in args if a]
        if args and os.path.basename(args[0]) == exe and names & set(args[1:]) and pid_alive(int(d)):
            out.add(int(d))
    return out


# ---------------------------------------------------------------------------
# running commands (every access to a mount goes through one of these)
# ---------------------------------------------------------------------------


def cmdline(cmd) -> str:
    return " ".join(shlex.quote(str(a)) for a in cmd)


@dataclass
class Proc:
    cmd: list
    code: int
    out: bytes
    err: bytes

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    def __str__(self):
        return (
            f"$ {cmdline(self.cmd)}\nexit {self.code}\n--- stdout ---\n{self.stdout[-3000:]}\n"
            f"--- stderr ---\n{self.stderr[-3000:]}"
        )


def run(cmd, timeout=60, input=None) -> Proc:
    """Run a command (with a timeout, never a shell unless asked); a timeout fails the test."""
    cmd = [str(c) for c in cmd]
    try:
        cp = subprocess.run(
            cmd,
            capture_output=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=SUB_ENV,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out after {timeout}s (hung mount?): {cmdline(cmd)}") from e
    return Proc(cmd, cp.returncode, cp.stdout, cp.stderr)


def sh(script: str, timeout=60) -> Proc:
    return run(["sh", "-c", script], timeout)


def cat(path, timeout=60) -> Proc:
    return run(["cat", path], timeout)


def read_bytes(path, timeout=60) -> bytes:
    p = cat(path, timeout)
    assert p.code == 0, str(p)
    return p.out


def read_text(path, timeout=60) -> str:
    return read_bytes(path, timeout).decode("utf-8")


def cmp(a, b, timeout=60) -> Proc:
    return run(["cmp", a, b], timeout)


def py(*args, timeout=60) -> Proc:
    """This file run as a script in a subprocess."""
    return run([PYTHON, SELF, *args], timeout)


def read_tensors(paths, timeout=60) -> dict:
    """{path: {"size": n, "tensors": {name: [dtype, shape, sha256]}}} read in a subprocess."""
    p = py("tensors", *paths, timeout=timeout)
    assert p.code == 0, str(p)
    return json.loads(p.stdout)


def parse_kv(text: str) -> dict:
    """`key: value` lines -> dict; integer values as int."""
    out = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = line.split(":", 1)
        v = v.strip()
        out[k.strip()] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return out


def readline_timeout(pipe, timeout: float) -> bytes:
    """One line from a binary pipe, or AssertionError after `timeout` seconds."""
    fd = pipe.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line within {timeout}s (got {buf!r})")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            c = os.read(fd, 1)
            if not c:
                break
            buf += c
    return buf


# ---------------------------------------------------------------------------
# the guard
# ---------------------------------------------------------------------------


def abort_connection(dev_num: int) -> bool:
    """Write 1 to /sys/fs/fuse/connections/<dev>/abort (mounting fusectl if needed)."""
    try:
        if not any(FUSECTL.iterdir()):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, timeout=10)
        p = FUSECTL / str(dev_num) / "abort"
        if p.exists():
            p.write_text("1")
            return True
    except OSError:
        pass
    return False


class Mount:
    """One mount point and everything started on it. Use as a context manager or call
    cleanup(); cleanup never raises and returns notes about what it had to force."""

    def __init__(self, mnt, binary=None):
        self.mnt = Path(mnt)
        self.binary = binary or ckpt.binary()
        self.pids: set[int] = set()
        self.devs: set[int] = set()
        self.popens: list[subprocess.Popen] = []
        self.notes: list[str] = []
        self.env = dict(SUB_ENV)  # the environment the mount command (and its daemon) gets

    # -- starting ---------------------------------------------------------------------------

    def command(self, src, args=(), foreground=False) -> list[str]:
        return [self.binary, "mount", str(src), str(self.mnt), *map(str, args)] + (["--foreground"] if foreground else [])

    def start(self, src, args=(), timeout=30) -> Proc:
        """`reshardfs mount SRC MNT ARGS` in the background mode; returns when it exits."""
        cmd = self.command(src, args)
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        self.popens.append(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.remember()
            if p.poll() is not None:
                raise AssertionError(
                    f"`{cmdline(cmd)}` exited {p.returncode} but its stdout/stderr stayed open for {timeout}s "
                    "(the background daemon inherited them: `$(reshardfs mount ...)` would hang)"
                )
            raise AssertionError(f"`{cmdline(cmd)}` did not return within {timeout}s")
        self.remember()
        return Proc(cmd, p.returncode, out, err)

    def start_ok(self, src, args=(), timeout=30) -> Proc:
        r = self.start(src, args, timeout)
        assert r.code == 0, str(r)
        assert self.is_mounted(), f"`{cmdline(r.cmd)}` exited 0 but nothing is mounted at {self.mnt}\n{r}"
        return r

    def start_foreground(self, src, args=(), log=None) -> subprocess.Popen:
        cmd = self.command(src, args, foreground=True)
        logf = open(log, "wb") if log else subprocess.DEVNULL
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.env)
        if log:
            logf.close()
        self.popens.append(p)
        return p

    def wait_mounted(self, timeout=10.0, proc: subprocess.Popen | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_mounted():
                self.remember()
                return True
            if proc is not None and proc.poll() is not None:
                return self.is_mounted()
            time.sleep(0.02)
        return self.is_mounted()

    # -- state ------------------------------------------------------------------------------

    def remember(self):
        """Record the daemon pids and FUSE devices of this mount point (for cleanup)."""
        self.pids |= daemon_pids(self.mnt)
        self.devs |= {m.dev_num for m in mounted_at(self.mnt) if m.fstype.startswith("fuse")}

    def is_mounted(self) -> bool:
        return is_mounted(self.mnt)

    def entries(self) -> list[MountEntry]:
        return mounted_at(self.mnt)

    def path(self, *rel) -> str:
        return str(self.mnt.joinpath(*rel))

    def stats(self) -> dict:
        return parse_kv(read_text(self.path(".reshardfs", "stats")))

    def live_pids(self) -> set[int]:
        return {p for p in self.pids | daemon_pids(self.mnt) if pid_alive(p)}

    # -- cleanup ----------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        try:
            self._cleanup()
        except Exception as e:  # noqa: BLE001 - the guard must not raise
            self.notes.append(f"cleanup error: {e!r}")
        return self.notes

    def _cleanup(self):
        self.remember()
        for _ in range(4):
            if not self.is_mounted():
                break
            r = subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=30)
            if r.returncode != 0:
                self.notes.append(f"umount -l {self.mnt}: exit {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
                break
        pids = self.live_pids()
        deadline = time.monotonic() + 5
        for pid in pids:
            if not wait_gone(pid, max(0.0, deadline - time.monotonic())):
                self.notes.append(f"daemon pid {pid} still alive 5s after umount -l: SIGKILL")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.popens:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
        stuck = [pid for pid in pids if not wait_gone(pid, 2)]
        if stuck or self.is_mounted():
            for dev in sorted(self.devs):
                if abort_connection(dev):
                    self.notes.append(f"aborted fuse connection {dev} (stuck pids {stuck})")
            if self.is_mounted():
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=30)
        for p in self.popens:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.notes.append(f"process {p.pid} did not exit")
        if self.is_mounted():
            self.notes.append(f"{self.mnt} still mounted after cleanup")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False


# ---------------------------------------------------------------------------
# subprocess side
# ---------------------------------------------------------------------------


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _cmd_tensors(paths):
    from safetensors import safe_open

    out = {}
    for path in paths:
        buf = Path(path).read_bytes()
        raw = ckpt.parse_safetensors(buf, path)
        tensors = {}
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
            if keys != set(raw.tensors):
                raise SystemExit(f"{path}: safe_open keys {sorted(keys)} != raw reader keys {sorted(raw.tensors)}")
            for name, (dtype, arr) in raw.tensors.items():
                b = arr.tobytes()
                if dtype not in ("BF16", "F8_E4M3", "F8_E5M2"):
                    t = f.get_tensor(name)
                    tb = t.tobytes()
                    if t.dtype != ckpt.NP_DTYPES[dtype] or list(t.shape) != list(arr.shape) or tb != b:
                        raise SystemExit(f"{path}: {name}: safe_open (mmap) and read() disagree")
                tensors[name] = [dtype, list(arr.shape), _sha(b)]
        out[path] = {"size": len(buf), "tensors": tensors}
    print(json.dumps(out))


def _pread_full(fd, n, off) -> bytes:
    out = b""
    while len(out) < n:
        b = os.pread(fd, n - len(out), off + len(out))
        if not b:
            break
        out += b
    return out


def _cmd_pread(path, ref, seed, n, maxlen, drop_cache="1"):
    import random

    drop_cache = drop_cache == "1"

    rng = random.Random(int(seed))
    want = Path(ref).read_bytes()
    size = len(want)
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd).st_size
    bad = []
    total = 0
    if st != size:
        bad.append(f"fstat size {st}, reference {size}")
    for i in range(int(n)):
        r = rng.random()
        length = rng.randint(1, int(maxlen))
        if r < 0.1:
            off = max(0, size - rng.randint(1, length))  # straddles / touches EOF
        elif r < 0.13:
            off = size + rng.randint(0, 100)  # past EOF: 0 bytes
        else:
            off = rng.randrange(size)
        if drop_cache:  # drop the kernel's page cache of the file: the read goes to the daemon
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = _pread_full(fd, length, off)
        total += len(got)
        if got != want[off : off + length]:
            exp = want[off : off + length]
            first = next((j for j, (a, b) in enumerate(zip(got, exp)) if a != b), min(len(got), len(exp)))
            bad.append(f"read {i}: pread({length}, {off}) gave {len(got)} bytes, expected {len(exp)}; first difference at +{first}")
            if len(bad) > 5:
                break
    os.close(fd)
    print(json.dumps({"file": path, "reads": int(n), "bytes": total, "mismatches": bad}))
    sys.exit(1 if bad else 0)


def _cmd_hold(path):
    fd = os.open(path, os.O_RDONLY)
    sys.stdout.write("open\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() == "read":
            size = os.fstat(fd).st_size
            try:
                b = _pread_full(fd, size + 1, 0)
                sys.stdout.write(f"{_sha(b)} {len(b)}\n")
            except OSError as e:
                sys.stdout.write(f"error {e}\n")
            sys.stdout.flush()
    os.close(fd)


def _cmd_maphold(path):
    import mmap

    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    sys.stdout.write("mapped\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() == "read":
            sys.stdout.write(f"{hashlib.sha256(m).hexdigest()} {len(m)}\n")
            sys.stdout.flush()
    m.close()
    os.close(fd)


def _cmd_mapshuffled(path, seed):
    """Faults the pages of `path`'s map in a shuffled order (the kernel asks the daemon for the
    window around each fault, wherever it falls), then prints the whole map's sha256."""
    import mmap
    import random

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    pages = list(range(0, size, 4096))
    random.Random(int(seed)).shuffle(pages)
    for at in pages:
        m[at]
    sys.stdout.write(f"{hashlib.sha256(m).hexdigest()} {size}\n")
    m.close()
    os.close(fd)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tensors":
        _cmd_tensors(args)
    elif cmd == "pread":
        _cmd_pread(*args)
    elif cmd == "hold":
        _cmd_hold(*args)
    elif cmd == "maphold":
        _cmd_maphold(*args)
    elif cmd == "mapshuffled":
        _cmd_mapshuffled(*args)
    else:
        raise SystemExit(f"unknown command {cmd!r}")
