"""Never destroy or hide the source: `export` refuses a DEST that is the source, lies
inside it or contains it (after resolving symlinks), with or without --force, and --force never
deletes a file the source holds; `mount` refuses such a mount point. Exit 2, a message, nothing
written, nothing mounted, the source byte-identical."""

import os

import pytest

import ckpt
import mountutil

TP4 = "tp4-f32"
IT = "iteration_00000005"


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(run, src_root, before, words=("source",)):
    assert run.code == 2, f"expected exit 2\n{run}"
    assert "panicked" not in run.stderr, str(run)
    for w in words:
        assert w in run.stderr, f"stderr lacks {w!r}\n{run}"
    assert snapshot(src_root) == before, "the source changed"


# (DEST or MNT relative to the work folder, the source relative to it, how the message says it)
def layouts(tmp_path, root):
    link = tmp_path / "link-to-src"
    link.symlink_to(root)
    return {
        "is": (root, "is"),
        "is_via_symlink": (link, "is"),
        "is_via_dotdot": (root / IT / "..", "is"),
        "inside": (root / IT, "lies inside"),
        "inside_missing": (root / "new" / "deeper", "lies inside"),
        "inside_via_symlink": (link / IT, "lies inside"),
        "contains": (tmp_path, "contains"),
        "contains_via_symlink_parent": (tmp_path / "link-to-parent", "contains"),
    }


CASES = ["is", "is_via_symlink", "is_via_dotdot", "inside", "inside_missing", "inside_via_symlink", "contains",
         "contains_via_symlink_parent"]


# How DEST relates to an iteration-folder source (root/IT) in each case; None: apart (not tested).
AS_ITERATION = {"is": "contains", "is_via_symlink": "contains", "is_via_dotdot": "contains", "inside": "is",
                "inside_missing": None, "inside_via_symlink": "is", "contains": "contains",
                "contains_via_symlink_parent": "contains"}


EXPORT_PARAMS = [(kind, case) for kind in ("root", "iteration") for case in CASES
                 if kind == "root" or AS_ITERATION[case] is not None]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("src_kind,case", EXPORT_PARAMS)
def test_export_refuses_dest_overlapping_source(tmp_path, fixture_copy, reshardfs_bin, case, force, src_kind):
    root = fixture_copy(TP4)
    (tmp_path / "link-to-parent").symlink_to(tmp_path)
    dest, how = layouts(tmp_path, root)[case]
    src = root
    if src_kind == "iteration":
        src, how = root / IT, AS_ITERATION[case]
    before = snapshot(root)
    listing = sorted(os.listdir(tmp_path))
    run = ckpt.export(src, dest, ["--mesh", "tp=2"], force=force)
    assert_refused(run, root, before, words=("source", how))
    assert not (root / "new").exists(), "export created a folder inside the source"
    assert sorted(os.listdir(tmp_path)) == listing, "export wrote beside the source"


def test_force_never_deletes_a_source_file(tmp_path, fixture_copy, reshardfs_bin):
    """A DEST holding a hard link of a source rank file under a name the new view does not have:
    --force would remove it as a stale rank file. Refused before anything is written."""
    root = fixture_copy(TP4)
    dest = tmp_path / "dest"
    (dest / IT).mkdir(parents=True)
    stale = dest / IT / "model-0000003-0000004.safetensors"
    os.link(root / IT / "model-0000003-0000004.safetensors", stale)
    before = snapshot(root)
    run = ckpt.export(root, dest, ["--mesh", "tp=2"], force=True)
    assert_refused(run, root, before, words=(str(stale),))
    assert sorted(p.name for p in (dest / IT).iterdir()) == [stale.name], "export wrote into DEST"
    assert stale.read_bytes() == before[(root / IT / stale.name).relative_to(root)]


def test_force_still_replaces_an_earlier_view(tmp_path, fixture_copy, reshardfs_bin):
    """The refusals above do not break --force over an earlier export (stale rank files removed)."""
    root = fixture_copy(TP4)
    dest = tmp_path / "dest"
    assert ckpt.export(root, dest, ["--mesh", "tp=4"]).code == 0
    run = ckpt.export(root, dest, ["--mesh", "tp=2"], force=True)
    assert run.code == 0, str(run)
    names = sorted(os.listdir(dest / IT))
    assert names == ["common.json", "metadata.json", "model-0000000-0000002.safetensors",
                     "model-0000001-0000002.safetensors"], names


MOUNT_CASES = ["is", "is_via_symlink", "inside", "inside_via_symlink", "contains", "contains_via_symlink_parent"]


@pytest.mark.parametrize("case", MOUNT_CASES)
def test_mount_refuses_mount_point_overlapping_source(tmp_path, fixture_copy, mount_bin, case):
    root = fixture_copy(TP4)
    (tmp_path / "link-to-parent").symlink_to(tmp_path)
    mnt, how = layouts(tmp_path, root)[case]
    before = snapshot(root)
    try:
        run = ckpt.run_cli(["mount", root, mnt, "--mesh", "tp=2"], timeout=60)
    finally:
        left = mountutil.is_mounted(mnt)
        if left:
            mountutil.run(["umount", "-l", str(mnt)])
    assert not left, f"mounted at {mnt}"
    assert_refused(run, root, before, words=("source", how))
