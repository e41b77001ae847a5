"""A model as the Hugging Face Hub cache holds it, read where it lies (docs/FORMAT.md §7.1).

`huggingface_hub` (and so `from_pretrained`) keeps a download as

    models--ORG--NAME/refs/main               the commit `main` names, no newline
    models--ORG--NAME/snapshots/<commit>/F    a relative link ../../blobs/<hash>, per file F
    models--ORG--NAME/blobs/<hash>            the bytes (sha256 for LFS files, git's sha1 else)

The cache here is made with huggingface_hub's own link function and checked with its own lookup
(`try_to_load_from_cache`); the views of it are compared with what MindSpore Transformers'
converter wrote for the same weights (tests/fixtures/expected/qwen3-tiny-hf.dp=1,tp=2,pp=2).
Mounts follow test_mount.py's rules: guarded, every access from a subprocess with a timeout."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import ckpt
import mountutil
from ckpt import FIXTURES

# Every test builds its cache with huggingface_hub, which the quick tier does not install.
pytestmark = pytest.mark.hf_stack

HF_FX = FIXTURES / "qwen3-tiny-hf"
MF_IT = FIXTURES / "qwen3-tiny-mf-tp2-pp2-f32" / "iteration_00001000"
EXP_FX = FIXTURES / "expected" / "qwen3-tiny-hf.dp=1,tp=2,pp=2"
EXP_ARGS = ["--mesh", "dp=1,tp=2", "--pp", "2"]
REPO_ID = "org/qwen3-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def blob_name(path: Path) -> str:
    """The name the Hub gives a file's blob: its etag, the sha256 of an LFS file (the
    safetensors), git's blob sha1 of any other."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_cache(cache: Path, src: Path = HF_FX) -> Path:
    """`src`'s files downloaded into a Hub cache at `cache`, as huggingface_hub lays them out
    (its own _create_symlink makes the links); returns the repository folder."""
    from huggingface_hub.file_download import _create_symlink, repo_folder_name

    repo = cache / repo_folder_name(repo_id=REPO_ID, repo_type="model")
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / blob_name(f)
        shutil.copyfile(f, blob)
        os.chmod(blob, 0o644)
        _create_symlink(str(blob), str(snap / f.name), new_blob=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


@pytest.fixture
def hub(tmp_path):
    return make_cache(tmp_path / "hub")


def snapshot_of(repo: Path) -> Path:
    return repo / "snapshots" / COMMIT


def test_the_cache_is_huggingface_hubs(hub):
    """The reference layout: links relative into ../../blobs, resolved by the Hub itself."""
    from huggingface_hub import try_to_load_from_cache

    snap = snapshot_of(hub)
    for f in sorted(HF_FX.iterdir()):
        link = snap / f.name
        assert link.is_symlink() and os.readlink(link) == f"../../blobs/{blob_name(f)}", link
        got = try_to_load_from_cache(REPO_ID, f.name, cache_dir=hub.parent)
        assert got == str(link), (f.name, got)
        assert link.read_bytes() == f.read_bytes()


def check_expected(folder: Path):
    """The rank files MindSpore Transformers' converter wrote, byte for byte."""
    rank_files = sorted(f for f in os.listdir(EXP_FX) if f.endswith(".safetensors"))
    assert sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == rank_files
    for f in rank_files:
        assert (folder / f).read_bytes() == (EXP_FX / f).read_bytes(), f"{f}: not MindSpore Transformers' own"


@pytest.mark.parametrize("form", ["snapshot", "repository", "refs/main"])
def test_export_plan_inspect_read_through_the_links(form, hub, tmp_path, reshardfs_bin):
    src = {"snapshot": snapshot_of(hub), "repository": hub, "refs/main": hub / "refs" / "main"}[form]
    r = ckpt.run_cli(["inspect", src])
    assert r.code == 0, str(r)
    assert f"source    {snapshot_of(hub)} (plain folder)" in r.stdout, r.stdout[:400]
    assert "2 safetensors file(s)" in r.stdout and "rank file" not in r.stdout, r.stdout[:600]
    r = ckpt.run_cli(["plan", src] + EXP_ARGS)
    assert r.code == 0, str(r)
    # The plan names the files as the folder does, not by their blobs' hashes.
    shard = HF_FX / "model-00001-of-00002.safetensors"
    assert shard.name in r.stdout and blob_name(shard) not in r.stdout, r.stdout[:800]
    out = tmp_path / "out"
    r = ckpt.export(src, out, EXP_ARGS)
    assert r.code == 0, str(r)
    check_expected(out)
    # --model none reads the links too: the Hub tensors, whole.
    r = ckpt.export(src, tmp_path / "plain", ["--model", "none", "--unshard"])
    assert r.code == 0, str(r)


@pytest.mark.parametrize("form", ["snapshot", "repository"])
def test_mount_reads_through_the_links(form, hub, mounts, tmp_path):
    src = snapshot_of(hub) if form == "snapshot" else hub
    m = mounts()
    m.start_ok(src, EXP_ARGS)
    snap = tmp_path / "copy"
    snap.mkdir()
    for f in sorted(os.listdir(EXP_FX)):
        if f.endswith(".safetensors"):
            (snap / f).write_bytes(mountutil.read_bytes(m.path(f)))
    m.cleanup()
    check_expected(snap)


def test_hf_files_may_name_the_repository(hub, tmp_path, reshardfs_bin):
    """--hf-files models--ORG--NAME: the snapshot's files (links) shown beside the weights."""
    out = tmp_path / "out"
    r = ckpt.export(MF_IT, out, ["--hf", "--hf-files", hub, "--dtype", "bf16"])
    assert r.code == 0, str(r)
    for f in ("config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (HF_FX / f).read_bytes(), f


def test_a_mount_point_over_the_blobs_is_refused(hub, tmp_path, mount_bin):
    """Mounting over the folder the links lead to would hide the bytes; exporting into it would
    write among them."""
    r = ckpt.run_cli(["mount", snapshot_of(hub), hub / "blobs", "--mesh", "tp=2"])
    assert r.code == 2 and "blobs" in r.stderr and "hide" in r.stderr, str(r)
    assert not mountutil.is_mounted(hub / "blobs")
    r = ckpt.export(snapshot_of(hub), hub / "blobs", ["--mesh", "tp=2"], force=True)
    assert r.code == 2 and "blobs" in r.stderr, str(r)


def break_link(snap: Path, how: str) -> Path:
    """Replace the second shard's link by a broken one of kind `how`; returns the link."""
    link = snap / "model-00002-of-00002.safetensors"
    blob = link.resolve()
    link.unlink()
    if how == "dangling":
        link.symlink_to(os.path.relpath(blob.parent / "0000000000000000", snap))
    elif how == "loop":
        link.symlink_to(link.name)
    elif how == "directory":
        link.symlink_to("../../blobs")
    elif how == "device":
        link.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(blob.parent / "pipe")
        link.symlink_to("../../blobs/pipe")
    return link


BROKEN = {"dangling": "dangling link", "loop": "loop", "directory": "a directory", "device": "a device",
          "fifo": "FIFO"}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_broken_links_are_refused_by_name(how, hub, tmp_path, mounts):
    link = break_link(snapshot_of(hub), how)
    for cmd in (["inspect", snapshot_of(hub)], ["plan", snapshot_of(hub)] + EXP_ARGS,
                ["export", snapshot_of(hub), tmp_path / "out"] + EXP_ARGS):
        r = ckpt.run_cli(cmd, timeout=30)  # a FIFO opened for reading would block: the timeout fails it
        assert r.code == 2, str(r)
        assert str(link) in r.stderr and BROKEN[how] in r.stderr, str(r)
        assert "panicked" not in r.stderr, str(r)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    m = mounts()
    r = m.start(snapshot_of(hub), EXP_ARGS)
    assert r.code == 2 and BROKEN[how] in r.stderr, str(r)
    assert not m.is_mounted()


def test_a_blob_replaced_or_a_link_repointed_under_a_mount_fails_its_reads(hub, mounts):
    """The identity of every source file is checked on every read through the folder's name for
    it, the link: a blob replaced under it (renamed over, the same bytes, another inode) and a
    link pointed at another blob both fail the reads that need them (EIO); files that need
    neither keep reading right. Under --mesh dp=1,tp=2 --pp 2, ranks 0-1 hold the embedding and
    layer 0 (shard 1 of the index), ranks 2-3 layer 1, the norm and the head (shard 2)."""
    snap = snapshot_of(hub)
    m = mounts()
    m.start_ok(snap, EXP_ARGS)
    rank = lambda r: f"qwen3-model-000000{r}-0000004.safetensors"  # noqa: E731
    blob2 = (snap / "model-00002-of-00002.safetensors").resolve()
    fresh = blob2.with_name("fresh")
    shutil.copyfile(blob2, fresh)
    os.replace(fresh, blob2)
    failed = mountutil.cat(m.path(rank(2)))
    assert failed.code != 0 and "Input/output error" in failed.stderr, f"replaced blob still served\n{failed}"
    assert mountutil.read_bytes(m.path(rank(1))) == (EXP_FX / rank(1)).read_bytes()
    link1 = snap / "model-00001-of-00002.safetensors"
    other = link1.resolve().with_name("copy-of-shard-1")
    shutil.copyfile(link1, other)
    link1.unlink()
    link1.symlink_to(f"../../blobs/{other.name}")
    failed = mountutil.cat(m.path(rank(0)))
    assert failed.code != 0 and "Input/output error" in failed.stderr, f"repointed link still served\n{failed}"
    assert m.stats()["read_errors"] >= 2
    m.cleanup()
