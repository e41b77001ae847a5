"""The daemon's start-up is bounded: `mount` waits at most 30 s (as mount-s3 does) for its daemon to
report the mount live; past that it reports what the daemon logged, kills it and exits 1, leaving
nothing mounted or running.

Test hooks (the `test-hooks` cargo feature): RESHARDFS_TEST_HANG_BEFORE_MOUNT makes the daemon hang
before mounting; RESHARDFS_TEST_START_TIMEOUT_S shortens the 30 s."""

import time

import pytest

import ckpt
import mountutil


@pytest.mark.hooks
def test_a_hung_daemon_is_killed_and_reported(mounts, tmp_path):
    m = mounts()
    m.env["RESHARDFS_TEST_HANG_BEFORE_MOUNT"] = "1"
    m.env["RESHARDFS_TEST_START_TIMEOUT_S"] = "2"
    t0 = time.monotonic()
    r = m.start(ckpt.FIXTURES / "tp4-f32", ["--mesh", "tp=2", "--log-level", "info"], timeout=30)
    took = time.monotonic() - t0
    assert r.code == 1, str(r)
    assert "within 2 s" in r.stderr and "killed" in r.stderr, str(r)
    assert "hanging before mounting" in r.stderr, f"the daemon's log is not reported\n{r}"
    assert took < 10, f"mount returned after {took:.1f} s with a 2 s limit"
    assert not m.is_mounted()
    # Killed and reaped by the parent before it exits: no daemon left.
    assert not m.live_pids(), f"daemon processes left: {m.live_pids()}"


def test_a_live_daemon_logs_to_its_file(mounts, tmp_path):
    """After start-up the daemon's log goes to --log-file (and its start-up pipe is closed, so
    `mount` returns at once)."""
    m = mounts()
    log = tmp_path / "log"
    t0 = time.monotonic()
    r = m.start(ckpt.FIXTURES / "tp4-f32", ["--mesh", "tp=2", "--log-file", log, "--log-level", "info"])
    assert r.code == 0, str(r)
    assert time.monotonic() - t0 < 10
    assert m.is_mounted()
    assert "mounted at" in log.read_text(), log.read_text()
