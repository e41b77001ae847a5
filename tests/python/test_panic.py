"""The daemon's panic policy: a panic in a request handler is caught at the FUSE adapter, the
request gets EIO, the panic is logged at error level with the file and offset and counted as
`internal_errors` in `.reshardfs/stats`, and the worker thread keeps serving. A prefetch job that
panics is caught the same way: counted, logged, its blocks left to the reader, its worker kept.

The panics are injected through test hooks (the `test-hooks` cargo feature, src/mount/hooks.rs):
RESHARDFS_TEST_PANIC_ON_READ and RESHARDFS_TEST_PANIC_IN_PREFETCH name a file whose reads, or whose
prefetched blocks, panic. scripts/test.sh runs these tests on the debug build and again on a
release-profile build, whose panic handling is the shipped one."""

import sys

import pytest

import ckpt
import mountutil
from mountutil import run

pytestmark = pytest.mark.hooks

TP4 = "tp4-f32"
IT = "iteration_00000005"
BAD = "model-0000001-0000002.safetensors"
GOOD = "model-0000000-0000002.safetensors"
THREADS = 2
PANICS = 3 * THREADS  # more panics than worker threads: each would have killed one


def test_panicking_read_answers_eio_and_the_mount_keeps_serving(tmp_path, mounts):
    ref = tmp_path / "ref"
    r = ckpt.export(ckpt.FIXTURES / TP4, ref, ["--mesh", "tp=2"])
    assert r.code == 0, str(r)
    log = tmp_path / "daemon.log"
    m = mounts()
    m.env["RESHARDFS_TEST_PANIC_ON_READ"] = BAD
    m.start_ok(ckpt.FIXTURES / TP4, ["--mesh", "tp=2", "--threads", THREADS, "--log-file", log,
                                     "--log-level", "warn"])
    pid = m.stats()["pid"]
    for i in range(PANICS):
        r = run(["cat", m.path(IT, BAD)], timeout=30)
        assert r.code != 0, f"read {i} of {BAD} succeeded though its reads panic"
        assert "Input/output error" in r.stderr, str(r)
        # Interleaved, reads of other files are still answered, exactly.
        r = run(["cat", m.path(IT, GOOD)], timeout=30)
        assert r.code == 0, f"after {i + 1} panic(s), reading {GOOD} failed: {r}"
        assert r.out == (ref / IT / GOOD).read_bytes(), f"after {i + 1} panic(s), {GOOD} differs"
    # Every file but the bad one, whole.
    for f in sorted((ref / IT).iterdir()):
        if f.name != BAD:
            r = run(["cat", m.path(IT, f.name)], timeout=30)
            assert r.code == 0 and r.out == f.read_bytes(), f"{f.name} not served exactly: {r}"
    stats = m.stats()
    assert stats["pid"] == pid and mountutil.pid_alive(pid), "the daemon did not survive"
    assert stats["internal_errors"] >= PANICS, stats
    assert stats["read_errors"] == 0, stats
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if "internal error" in ln]
    assert lines, f"no internal error logged:\n{text[-3000:]}"
    assert any("ERROR" in ln and BAD in ln and "offset" in ln and "panicked" in ln for ln in lines), "\n".join(lines)


SLOW_CAT = """
import sys, time
with open(sys.argv[1], "rb") as f:
    while b := f.read(256 << 10):
        sys.stdout.buffer.write(b)
        time.sleep(0.02)
"""


def test_a_panicking_prefetch_job_is_counted_and_its_worker_goes_on(synth_ckpt, mounts, exports, tmp_path):
    """Every block a prefetch worker computes for one file panics: that file still reads exactly
    (its reader computes what the workers could not), each panic is counted and logged, and the
    two workers survive: prefetch still computes blocks ahead of a reader of another file."""
    args = ["--mesh", "tp=2"]
    ref = exports(synth_ckpt, args)
    files = sorted(p.relative_to(ref) for p in ref.rglob("*-model-*.safetensors"))
    bad, good = files[0], files[1]
    log = tmp_path / "daemon.log"
    m = mounts()
    # The sources sit in the page cache: prefetch must work ahead anyway.
    m.env["RESHARDFS_PREFETCH"] = "always"
    m.env["RESHARDFS_TEST_PANIC_IN_PREFETCH"] = bad.name
    m.start_ok(synth_ckpt, args + ["--cache-size", "8M", "--log-file", log, "--log-level", "warn"])
    # Read at a pace that leaves the workers time to work ahead (and panic) however loaded the
    # machine: a `cat` could pass every block before a worker got to it (2 panics, seen under load).
    r = run([sys.executable, "-c", SLOW_CAT, m.path(*bad.parts)], timeout=60)
    assert r.code == 0 and r.out == (ref / bad).read_bytes(), f"{bad} not served exactly: {r}"
    after_bad = m.stats()
    assert after_bad["internal_errors"] >= 3, f"fewer panics than the two workers could survive unguarded: {after_bad}"
    assert after_bad["read_errors"] == 0, after_bad
    r = run(["cat", m.path(*good.parts)], timeout=60)
    assert r.code == 0 and r.out == (ref / good).read_bytes(), f"{good} not served exactly: {r}"
    after_good = m.stats()
    assert after_good["prefetch_blocks"] > after_bad["prefetch_blocks"], (
        f"no block prefetched after the panics: the workers died\n{after_bad}\n{after_good}")
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if "internal error" in ln and "prefetch of" in ln]
    assert lines and all(bad.name in ln and "panicked" in ln for ln in lines), text[-3000:]
