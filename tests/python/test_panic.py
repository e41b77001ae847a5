"""The daemon's panic policy (issue 10): a panic in a request handler is caught at the FUSE
adapter, the request gets EIO, the panic is logged at error level with the file and offset and
counted as `internal_errors` in `.reshardfs/stats`, and the worker thread keeps serving.

The panic is injected through a test-only hook: in debug builds the daemon reads
RESHARDFS_TEST_PANIC_ON_READ at start-up and panics in every read of a file with that name."""

import pytest

import ckpt
import mountutil
from mountutil import run

TP4 = "tp4-f32"
IT = "iteration_00000005"
BAD = "model-0000001-0000002.safetensors"
GOOD = "model-0000000-0000002.safetensors"
THREADS = 2
PANICS = 3 * THREADS  # more panics than worker threads: each would have killed one


@pytest.fixture
def debug_build(reshardfs_bin):
    if "/release/" in reshardfs_bin:
        pytest.skip("the panic hook exists only in debug builds (RESHARDFS_BIN is a release build)")
    return reshardfs_bin


def test_panicking_read_answers_eio_and_the_mount_keeps_serving(tmp_path, mounts, debug_build):
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
