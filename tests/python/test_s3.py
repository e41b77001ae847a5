"""Sources in an S3-compatible object store, read through a real S3 server over HTTP.

The server is s3rver (npm, installed by scripts/test.sh into tests/s3), made strict about SigV4
signatures and If-Match (tests/s3/s3rver-strict.js); faults come from s3util.FaultProxy, a proxy
of the test's own between reshardfs and the server. The fixtures are uploaded as they lie on
disk; every view from the bucket is compared byte for byte with the same view exported from
disk (itself compared with MindSpore Transformers' own results by the other tests).
Mounts follow test_mount.py's rules: guarded, every access from a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import ckpt
import mountutil
from ckpt import FIXTURES
from s3util import FaultProxy, S3Server

BUCKET = "ckpts"
# (fixture, the key prefix it is uploaded to, the folder of it a source names)
SOURCES = {
    "gpt": ("gpt-dp2-tp2-pp2-bf16", ""),
    "tp4": ("tp4-f32", ""),
    "qwen3-hf": ("qwen3-tiny-hf", ""),
    "qwen3-mf": ("qwen3-tiny-mf-tp2-pp2-f32", "iteration_00001000"),
    "moe-hf": ("qwen3-moe-tiny-hf", ""),
    "moe-mf": ("qwen3-moe-tiny-mf-dp2-tp2-ep2-f32", ""),
}
# Targets the local tests use, both bridge directions among them.
VIEWS = [
    ("gpt", ["--mesh", "tp=4"]),
    ("gpt", ["--unshard"]),
    ("gpt", ["--mesh", "dp=1,tp=2", "--pp", "1", "--dtype", "f32"]),
    ("tp4", ["--mesh", "tp=2"]),
    ("tp4", ["--mesh", "tp=4"]),
    ("qwen3-hf", ["--mesh", "dp=1,tp=2", "--pp", "2"]),
    ("qwen3-hf", ["--hf", "--max-shard-size", "40KB"]),
    ("qwen3-mf", ["--hf"]),
    ("qwen3-mf", ["--unshard"]),
    ("moe-hf", ["--mesh", "dp=2,ep=2"]),
    ("moe-mf", ["--hf"]),
]


def local(name) -> Path:
    fx, sub = SOURCES[name]
    return FIXTURES / fx / sub if sub else FIXTURES / fx


def remote(name) -> str:
    fx, sub = SOURCES[name]
    return f"s3://{BUCKET}/{name}" + (f"/{sub}" if sub else "")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    srv = S3Server(tmp_path_factory.mktemp("s3"), buckets=(BUCKET,))
    srv.start()
    try:
        for name, (fx, _) in SOURCES.items():
            srv.upload_tree(FIXTURES / fx, BUCKET, name)
        yield srv
    finally:
        srv.cleanup()


def _run_env(cmd, env, timeout) -> mountutil.Proc:
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       env={**os.environ, "RUST_BACKTRACE": "0", **env})
    return mountutil.Proc(cmd, p.returncode, p.stdout, p.stderr)


def files_under(root: Path) -> list[str]:
    out = []
    for d, _, fs in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in fs]
    return sorted(out)


def s3_mount(mounts, srv_env, src, args, name="mnt"):
    m = mounts(name)
    m.env.update(srv_env)
    m.start_ok(src, args)
    return m


@pytest.mark.parametrize("name,args", VIEWS, ids=[f"{n}:{' '.join(a) or 'as-saved'}" for n, a in VIEWS])
def test_a_view_from_the_bucket_is_the_view_from_disk(s3, mounts, exports, name, args):
    """Every file of the mount from the bucket equals the same view exported from disk (cmp,
    through the kernel); the tree is the same; and `export` from the bucket writes the same."""
    ref = exports(local(name), args)
    m = s3_mount(mounts, s3.env(), remote(name), args)
    listed = mountutil.run(["find", m.mnt, "-type", "f", "-not", "-path", "*/.reshardfs/*"])
    assert listed.code == 0, str(listed)
    got = sorted(os.path.relpath(p, m.mnt) for p in listed.stdout.split())
    assert got == files_under(ref)
    for rel in got:
        r = mountutil.cmp(ref / rel, m.path(rel))
        assert r.code == 0, f"{rel}: {r}"
    stats = m.stats()
    assert stats["s3_requests"] > 0 and stats["read_errors"] == 0, stats
    dest = Path(m.mnt).parent / "exported"
    r = _run_env([ckpt.binary(), "export", remote(name), dest, *args], s3.env(), 120)
    assert r.code == 0, str(r)
    diff = mountutil.run(["diff", "-r", ref, dest])
    assert diff.code == 0, str(diff)


def test_a_large_view_faulted_in_at_random_is_the_view_from_disk(s3, mounts, exports, tmp_path):
    """A plain folder larger than the fixtures (a 24 MiB tensor across three of the store's 8 MiB
    blocks, and small ones), mounted from the bucket and read through a map in a shuffled order of
    pages: the kernel asks for windows around each fault, straddling the view's 1 MiB blocks and
    the store's, which the daemon answers from the store's blocks in place. Every tensor is
    numpy's, and the file equals the view exported from disk."""
    import hashlib

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    tensors = {
        "big": rng.standard_normal((6, 1 << 20), dtype=np.float32),
        "half": rng.standard_normal((3, 4096)).astype(np.float16),
        "ids": rng.integers(0, 1 << 30, 5000, dtype=np.int32),
    }
    src = tmp_path / "plain"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    s3.upload_tree(src, BUCKET, "big-plain")
    args = ["--model", "none", "--unshard"]
    ref = exports(src, args)
    m = s3_mount(mounts, s3.env(), f"s3://{BUCKET}/big-plain", args)
    files = [f for f in files_under(ref) if f.endswith(".safetensors")]
    assert files
    for rel in files:
        p = mountutil.py("mapshuffled", m.path(rel), "3", timeout=120)
        assert p.code == 0, str(p)
        want = hashlib.sha256((ref / rel).read_bytes()).hexdigest()
        assert p.stdout.split()[0] == want, rel
    got = {}
    for f in mountutil.read_tensors([m.path(rel) for rel in files]).values():
        got.update(f["tensors"])
    dtypes = {"big": "F32", "half": "F16", "ids": "I32"}
    assert got == {k: [dtypes[k], list(v.shape), hashlib.sha256(v.tobytes()).hexdigest()]
                   for k, v in tensors.items()}
    st = m.stats()
    assert st["read_errors"] == 0 and st["mapped_reads"] > 0, st


def test_inspect_and_plan_name_the_objects(s3):
    r = _run_env([ckpt.binary(), "inspect", remote("gpt")], s3.env(), 60)
    assert r.code == 0, str(r)
    assert f"s3://{BUCKET}/gpt" in r.stdout and "16 rank file(s)" in r.stdout, r.stdout
    r = _run_env([ckpt.binary(), "plan", remote("tp4"), "--mesh", "tp=2"], s3.env(), 60)
    assert r.code == 0 and f"s3://{BUCKET}/tp4" in r.stdout, str(r)


def test_mount_reads_only_headers_until_data_is_read(s3, mounts):
    """`ls -l` of a fresh mount reads no tensor data: what is fetched is the small files and, per
    rank file, one GET of its first 64 KiB at most (the header; these rank files are smaller than
    that); then reading a view file fetches about what it needs, in whole blocks."""
    m = s3_mount(mounts, s3.env(), remote("gpt"), ["--mesh", "tp=4"])
    assert mountutil.run(["ls", "-lR", m.mnt]).code == 0
    s0 = m.stats()
    rank_files = list(local("gpt").rglob("*.safetensors"))
    small = sum(p.stat().st_size for p in local("gpt").rglob("*") if p.is_file() and p.suffix != ".safetensors")
    heads = sum(min(p.stat().st_size, 64 << 10) for p in rank_files)
    assert s0["s3_bytes_fetched"] == heads + small, (s0, heads, small)
    assert mountutil.run(["cat", m.path(".reshardfs", "summary")]).code == 0
    assert m.stats()["s3_bytes_fetched"] == s0["s3_bytes_fetched"], "listing and .reshardfs read no data"


def run_fails(args, env, *needles):
    r = _run_env([ckpt.binary(), *args], env, 60)
    assert r.code == 2, str(r)
    for n in needles:
        assert n in r.stderr, f"{n!r} not in: {r.stderr}"
    return r


def test_bad_locations_and_credentials_exit_2_naming_the_key(s3, tmp_path):
    env = s3.env()
    run_fails(["inspect", "s3://nosuchbucket/x"], env, "nosuchbucket", "no such bucket")
    run_fails(["inspect", f"s3://{BUCKET}/nothing-here"], env, f"s3://{BUCKET}/nothing-here", "not a directory")
    secret = "WrongSecret/Do-Not-Print-0123456789"
    r = run_fails(["inspect", remote("gpt")], {**env, "AWS_SECRET_ACCESS_KEY": secret}, f"s3://{BUCKET}")
    assert secret not in r.stderr and "S3RVER" not in r.stderr, r.stderr
    assert "denied" in r.stderr or "Signature" in r.stderr, r.stderr
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_SECRET")}
    bare.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    run_fails(["inspect", remote("gpt")], bare, "no credentials")
    # A public bucket (s3rver serves anonymous requests): no credentials needed.
    r = _run_env([ckpt.binary(), "--no-sign-request", "inspect", remote("gpt")], bare, 60)
    assert r.code == 0, str(r)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _run_env([ckpt.binary(), "mount", "s3://nosuchbucket/x", mnt, "--mesh", "tp=2"], env, 60)
    assert r.code == 2 and not mountutil.is_mounted(mnt), str(r)


def test_a_missing_or_short_shard_exits_2_naming_it(s3):
    env = s3.env()
    fx = FIXTURES / "gpt-dp2-tp2-pp2-bf16"
    s3.upload_tree(fx, BUCKET, "gpt-missing")
    it = next(p for p in fx.iterdir() if p.name.startswith("iteration_"))
    victim = sorted(f.name for f in it.glob("*.safetensors"))[3]
    s3.delete(BUCKET, f"gpt-missing/{it.name}/{victim}")
    run_fails(["inspect", f"s3://{BUCKET}/gpt-missing"], env, victim, "does not exist")
    s3.upload_tree(fx, BUCKET, "gpt-short")
    data = (it / victim).read_bytes()
    s3.put(BUCKET, f"gpt-short/{it.name}/{victim}", data[: len(data) - 100])
    run_fails(["inspect", f"s3://{BUCKET}/gpt-short"], env, victim, "end of the file")
    s3.put(BUCKET, f"gpt-short/{it.name}/{victim}", data[:5])
    run_fails(["inspect", f"s3://{BUCKET}/gpt-short"], env, victim, "shorter than the 8-byte header length")


@pytest.fixture
def proxy(s3):
    p = FaultProxy(s3.port)
    try:
        yield p
    finally:
        p.close()


def test_faults_are_retried_and_never_serve_a_wrong_byte(s3, proxy, exports, tmp_path):
    """503s, resets, stalls past the timeout and bodies cut short, on listings, headers and
    data: retried; the export equals the one from disk."""
    args = ["--mesh", "tp=4"]
    ref = exports(local("gpt"), args)
    env = s3.env(proxy.endpoint)
    proxy.stall_s = 3.0
    for i, faults in enumerate([["503"] * 3, ["reset", "503", "reset"], ["truncate"] * 2, ["stall"]]):
        # Faults land on the first requests (listing, headers) and, spread, on data reads.
        proxy.arm(*faults)
        dest = tmp_path / f"out{i}"
        r = _run_env([ckpt.binary(), "--s3-timeout", "1", "export", remote("gpt"), dest, *args], env, 120)
        assert r.code == 0, f"{faults}: {r}"
        assert mountutil.run(["diff", "-r", ref, dest]).code == 0, faults
    assert proxy.requests > 0


def test_runs_of_blocks_cut_short_are_finished_and_never_serve_a_wrong_byte(s3, proxy, mounts, exports, tmp_path):
    """A plain folder of a 56 MiB tensor (seven of the store's 8 MiB blocks) read in order through
    the proxy: the blocks after the first come in runs, one GET of several blocks each. Bodies cut
    short, runs among them, are finished block by block; every byte equals the view from disk."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(11)
    src = tmp_path / "plain"
    src.mkdir()
    save_file({"w": rng.standard_normal((14, 1 << 20), dtype=np.float32)}, str(src / "model.safetensors"))
    s3.upload_tree(src, BUCKET, "runs-plain")
    args = ["--model", "none", "--unshard"]
    ref = exports(src, args)
    m = mounts()
    m.env.update(s3.env(proxy.endpoint))
    m.start_ok(f"s3://{BUCKET}/runs-plain", ["--s3-timeout", "5", *args])
    files = [f for f in files_under(ref) if f.endswith(".safetensors")]
    # Every data GET from here on is cut short, then every other one: each is tried again.
    proxy.arm(*(["truncate"] * 3 + ["ok", "truncate"] * 4))
    for rel in files:
        r = mountutil.cmp(ref / rel, m.path(rel))
        assert r.code == 0, f"{rel}: {r}"
    st = m.stats()
    assert st["read_errors"] == 0 and st["s3_retries"] > 0, st

    def span(r):
        first, _, last = r.removeprefix("bytes=").partition("-")
        return int(last) - int(first) + 1

    assert any(span(r) > 8 << 20 for r in proxy.truncated if r), proxy.truncated


def test_an_unreachable_store_fails_reads_within_the_bound_then_recovers(s3, proxy, mounts, exports):
    """The server gone mid-mount: reads that need it fail with EIO within the retry bound, the
    daemon lives, cached bytes still serve; back again: reads succeed, byte for byte."""
    args = ["--mesh", "tp=4"]
    ref = exports(local("tp4"), args)
    m = mounts()
    m.env.update(s3.env(proxy.endpoint))
    m.start_ok(remote("tp4"), ["--s3-retry-timeout", "2", "--s3-timeout", "1", "--s3-cache-size", "8M", *args])
    files = [f for f in files_under(ref) if f.endswith(".safetensors")]
    first = files[0]
    assert mountutil.cmp(ref / first, m.path(first)).code == 0
    proxy.faults = []
    proxy.arm(*(["reset"] * 10_000))
    t0 = time.monotonic()
    r = mountutil.run(["cat", m.path(files[1])], timeout=60)
    took = time.monotonic() - t0
    assert r.code != 0 and "Input/output error" in r.stderr, str(r)
    assert took < 15, f"the failing read took {took:.1f} s"
    assert m.is_mounted() and m.stats()["s3_failures"] > 0
    with proxy.lock:
        proxy.faults.clear()
    assert mountutil.cmp(ref / files[1], m.path(files[1])).code == 0
    assert mountutil.cmp(ref / first, m.path(first)).code == 0


def test_an_object_rewritten_under_the_mount_fails_its_reads(s3, mounts, exports):
    """The same key put again with other bytes (a new ETag): the reads that need it fail with
    EIO, from then on; the other files still read right. Never a mix of old and new bytes."""
    fx = FIXTURES / "tp4-f32"
    s3.upload_tree(fx, BUCKET, "tp4-rewrite")
    args = ["--mesh", "tp=4", "--s3-cache-size", "8M"]
    ref = exports(fx, ["--mesh", "tp=4"])
    m = s3_mount(mounts, s3.env(), f"s3://{BUCKET}/tp4-rewrite", args)
    files = [f for f in files_under(ref) if f.endswith(".safetensors")]
    it = next(p for p in fx.iterdir() if p.name.startswith("iteration_"))
    # As saved, view file k is source file k: rewrite one source file.
    victim = next(f for f in files if f.endswith("0000001-0000004.safetensors"))
    data = bytearray((fx / victim).read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"
    s3.put(BUCKET, f"tp4-rewrite/{victim}", bytes(data))
    r = mountutil.run(["cat", m.path(victim)])
    assert r.code != 0 and "Input/output error" in r.stderr, str(r)
    r = mountutil.run(["cat", m.path(victim)])
    assert r.code != 0, "a changed object must keep failing"
    other = next(f for f in files if f != victim)
    assert mountutil.cmp(ref / other, m.path(other)).code == 0
    assert it.name in victim


def test_two_nodes_each_fetch_only_their_own_ranks(s3, mounts):
    """Two mounts of one bucket, as two nodes of a tp=2 job from a tp=4 save: each reads its own
    rank's file, which holds tp slices 2r and 2r+1. Beyond what a mount fetches at start
    (headers, small files), each fetches exactly source ranks 2r and 2r+1's objects (under one
    block each, so fetched whole), and no other: its replicated tensors (norms) come from those
    objects too, not from rank 0's. So the two nodes together fetch each object once."""
    args = ["--mesh", "tp=2"]
    plan = json.loads(_run_env([ckpt.binary(), "plan", remote("tp4"), *args, "--json"], s3.env(), 60).stdout)
    it = plan["iterations"][0]
    size = {p.name: p.stat().st_size for p in local("tp4").rglob("*.safetensors")}
    fetched, needed = [], []
    for rank, name in enumerate(["node-a", "node-b"]):
        vf = next(f for f in it["files"] if f["rank"] == rank and f["kind"] == "model")
        m = s3_mount(mounts, s3.env(), remote("tp4"), args, name=name)
        start = m.stats()["s3_bytes_fetched"]
        rel = f"{it['name']}/{vf['name']}" if it["name"] else vf["name"]
        assert mountutil.cat(m.path(rel)).code == 0
        fetched.append(m.stats()["s3_bytes_fetched"] - start)
        own = {f"model-{q:07d}-0000004.safetensors" for q in (2 * rank, 2 * rank + 1)}
        named = {p["file"] for t in vf["tensors"] for p in t["pieces"]}
        assert named == own, f"node {name}: the plan reads {sorted(named)}, tp=2 rank {rank} holds {sorted(own)}"
        needed.append(sum(size[f] for f in own))
    assert fetched == needed, (fetched, needed)
    assert sum(fetched) == sum(size.values()), "together the nodes fetch each object once"


def _tls_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A certificate authority (key, certificate) of the test's own, by openssl."""
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
              "-keyout", key, "-out", cert])
    return key, cert


def _tls_server(d: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A server key and certificate for 127.0.0.1 issued by `ca` (an end-entity certificate, as
    TLS clients require of a server's)."""
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr])
    _openssl(["x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial", "-days", "2",
              "-extfile", ext, "-out", cert])
    return key, cert


def _openssl(args):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_https_trusts_the_aws_ca_bundle_and_only_it(mounts, exports, tmp_path):
    """An https endpoint whose certificate AWS_CA_BUNDLE names: mounted and read as over http.
    With a bundle that does not hold its issuer, every command refuses it at once (exit 2, the
    certificate named as the reason; nothing mounted), not after the retry budget."""
    ca = _tls_ca(tmp_path, "test-ca")
    _, other = _tls_ca(tmp_path, "other-ca")
    key, cert = _tls_server(tmp_path, ca)
    srv = S3Server(tmp_path / "tls", buckets=(BUCKET,), tls=(key, cert, ca[1]))
    srv.start()
    try:
        srv.upload_tree(local("tp4"), BUCKET, "tp4")
        args = ["--mesh", "tp=2"]
        ref = exports(local("tp4"), args)
        assert srv.endpoint.startswith("https://")
        m = s3_mount(mounts, {**srv.env(), "AWS_CA_BUNDLE": str(ca[1])}, f"s3://{BUCKET}/tp4", args)
        for rel in files_under(ref):
            assert mountutil.cmp(ref / rel, m.path(rel)).code == 0, rel
        m.cleanup()
        start = time.monotonic()
        r = _run_env([ckpt.binary(), "inspect", f"s3://{BUCKET}/tp4"], {**srv.env(), "AWS_CA_BUNDLE": str(other)}, 120)
        took = time.monotonic() - start
        assert r.code == 2, str(r)
        assert "certificate" in r.stderr.lower() and f"s3://{BUCKET}" in r.stderr, r.stderr
        assert took < 10, f"an untrusted certificate was retried for {took:.1f} s"
    finally:
        srv.cleanup()


def test_credentials_from_a_profile_in_the_shared_files(s3, tmp_path):
    """AWS_PROFILE names a profile of ~/.aws/credentials (HOME of the test's own): with the
    server's keys, inspect reads the bucket; a profile with a wrong secret is refused by the
    server (exit 2, SignatureDoesNotMatch), and neither secret is printed."""
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(
        "[work]\naws_access_key_id = S3RVER\naws_secret_access_key = S3RVER\n\n"
        "[stale]\naws_access_key_id = S3RVER\naws_secret_access_key = not-the-secret-4f1c\n")
    (aws / "config").write_text("[profile work]\nregion = us-east-1\n")
    base = {"HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
            "AWS_SESSION_TOKEN": "", "AWS_SHARED_CREDENTIALS_FILE": "", "AWS_CONFIG_FILE": "",
            "AWS_ENDPOINT_URL": s3.endpoint}
    r = _run_env([ckpt.binary(), "inspect", remote("tp4")], {**base, "AWS_PROFILE": "work"}, 60)
    assert r.code == 0 and "iteration_00000005: world 4" in r.stdout, str(r)
    r = _run_env([ckpt.binary(), "inspect", remote("tp4")], {**base, "AWS_PROFILE": "stale"}, 60)
    assert r.code == 2 and "SignatureDoesNotMatch" in r.stderr, str(r)
    assert "not-the-secret-4f1c" not in r.stderr + r.stdout


def test_a_cache_dir_serves_the_next_start(s3, mounts, exports, tmp_path):
    """--cache-dir: a second mount on the same machine fetches no block and no header again
    (only the listings and the small files), and serves the same bytes; a replaced object is
    fetched anew, never served from the folder; the folder keeps its bound."""
    fx = FIXTURES / "tp4-f32"
    s3.upload_tree(fx, BUCKET, "tp4-cached")
    cache = tmp_path / "cache"
    args = ["--cache-dir", cache, "--mesh", "tp=2"]
    ref = exports(fx, ["--mesh", "tp=2"])
    small = sum(p.stat().st_size for p in fx.rglob("*") if p.is_file() and p.suffix != ".safetensors")
    fetched = []
    for run in range(2):
        m = s3_mount(mounts, s3.env(), f"s3://{BUCKET}/tp4-cached", args, name=f"mnt{run}")
        for rel in files_under(ref):
            assert mountutil.cmp(ref / rel, m.path(rel)).code == 0, rel
        fetched.append(m.stats()["s3_bytes_fetched"])
        m.cleanup()
    total = sum(p.stat().st_size for p in fx.rglob("*"))
    assert fetched[0] > total and fetched[1] == small, (fetched, total, small)
    assert (cache.stat().st_mode & 0o777) == 0o700
    # One object replaced by other bytes (a new ETag): the next start fetches it (its header and
    # its block) and nothing else, and serves the new bytes, as a view of the changed save on disk.
    changed = tmp_path / "changed"
    shutil.copytree(fx, changed)
    it = next(p for p in changed.iterdir() if p.name.startswith("iteration_"))
    name = sorted(f.name for f in it.glob("*.safetensors"))[0]
    data = bytearray((it / name).read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"
    (it / name).write_bytes(bytes(data))
    s3.put(BUCKET, f"tp4-cached/{it.name}/{name}", bytes(data))
    ref2 = exports(changed, ["--mesh", "tp=2"])
    m = s3_mount(mounts, s3.env(), f"s3://{BUCKET}/tp4-cached", args, name="mnt2")
    for rel in files_under(ref2):
        assert mountutil.cmp(ref2 / rel, m.path(rel)).code == 0, rel
    assert m.stats()["s3_bytes_fetched"] == small + min(len(data), 64 << 10) + len(data), m.stats()
    m.cleanup()
    # A bound smaller than what is kept: the folder is trimmed to it at start.
    m = s3_mount(mounts, s3.env(), f"s3://{BUCKET}/tp4-cached", [*args, "--cache-dir-size", "200K"], name="mnt3")
    assert mountutil.cat(m.path(files_under(ref)[0])).code == 0
    m.cleanup()
    assert sum(p.stat().st_size for p in cache.iterdir()) <= 200 << 10


def test_allow_other_lends_the_mounting_users_access(s3, exports):
    """A store has no modes: the view files from objects are 0444, and with --allow-other
    another user reads them, byte for byte (the kernel lets nobody else in without it)."""
    import tempfile

    args = ["--mesh", "tp=2"]
    ref = exports(local("tp4"), args)
    base = Path(tempfile.mkdtemp(prefix="reshardfs-s3-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "mnt").mkdir(mode=0o755)
    m = mountutil.Mount(base / "mnt")
    m.env.update(s3.env())
    try:
        m.start_ok(remote("tp4"), [*args, "--allow-other"])
        rel = next(f for f in files_under(ref) if f.endswith(".safetensors"))
        r = mountutil.run(["stat", "-c", "%a", m.path(rel)])
        assert r.stdout.strip() == "444", str(r)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        r = mountutil.run(nobody + ["cat", m.path(rel)])
        assert r.code == 0 and r.out == (ref / rel).read_bytes(), str(r)
    finally:
        m.cleanup()
        if not m.is_mounted():
            (base / "mnt").rmdir()
            base.rmdir()
