"""Bad inputs: exit code 2, a message naming the offending file / tensor / field, no panic or
traceback, and nothing written to DEST by export."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import ckpt
import mountutil
from ckpt import TRACKER

TP4 = "tp4-f32"
GPT = "gpt-dp2-tp2-pp2-bf16"
TP4_IT = "iteration_00000005"
GPT_IT = "iteration_00000001"
QKV = "decoder.layers.0.self_attention.linear_qkv.weight"  # tp4: [192, 64] split 4 on dim 0
QKV_FILE = "model-0000001-0000004.safetensors"  # holds QKV chunk 1 (and only that copy)


# ---------------------------------------------------------------------------
# mutation helpers (they work on a writable copy of a fixture root)
# ---------------------------------------------------------------------------


def edit_meta(fn, it=TP4_IT):
    def mutate(root: Path):
        p = root / it / "metadata.json"
        meta = json.loads(p.read_text())
        fn(meta)
        p.write_text(ckpt.dumps_metadata(meta))

    return mutate


def edit_header(fname, fn, it=TP4_IT):
    """Rewrite a rank file's header (fn edits the parsed header dict), keeping the data."""

    def mutate(root: Path):
        p = root / it / fname
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        fn(header)
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        p.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n :])

    return mutate


def write(rel, text):
    def mutate(root: Path):
        (root / rel).write_text(text)

    return mutate


def remove(rel):
    def mutate(root: Path):
        (root / rel).unlink()

    return mutate


def sdm(meta, name=QKV):
    return meta["state_dict_metadata"][name]


def drop_chunk_1(meta):
    m = sdm(meta)
    m["chunk"] = [c for c in m["chunk"] if c["global_offset"] != [1]]
    del meta["storage_data"][ckpt.shard_key(QKV, 1)]


def dup_chunk(meta):
    sdm(meta)["chunk"].append(dict(sdm(meta)["chunk"][1]))


def rename_shard_key(meta):
    st = meta["storage_data"]
    st["decoder.layers.0.self_attention.linear_qkv.weight@1"] = st.pop(ckpt.shard_key(QKV, 1))


def set_field(key, value, name=QKV, sub=None):
    def fn(meta):
        d = sdm(meta, name)
        if sub:
            d = d[sub]
        if value is DELETE:
            del d[key]
        else:
            d[key] = value

    return fn


DELETE = object()


def storage_file(fname):
    def fn(meta):
        for e in meta["storage_data"][ckpt.shard_key(QKV, 1)]:
            e["file_name"] = fname

    return fn


def header_tensor(key, value, name=QKV):
    def fn(h):
        h[name][key] = value

    return fn


def truncate(rel, nbytes):
    def mutate(root: Path):
        p = root / rel
        p.write_bytes(p.read_bytes()[:-nbytes])

    return mutate


def raw_header_len(fname, n, it=TP4_IT):
    """Overwrite a rank file's 8-byte header length."""

    def mutate(root: Path):
        p = root / it / fname
        raw = p.read_bytes()
        p.write_bytes(int(n).to_bytes(8, "little") + raw[8:])

    return mutate


def garble_header(fname, it=TP4_IT):
    """Keep the header length but fill the header with non-JSON bytes."""

    def mutate(root: Path):
        p = root / it / fname
        raw = p.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        p.write_bytes(raw[:8] + b"#" * n + raw[8 + n :])

    return mutate


def symlink_outside(fname, it=TP4_IT):
    """Move a rank file outside the checkpoint and leave a symlink to it."""

    def mutate(root: Path):
        p = root / it / fname
        outside = root.parent / ("outside-" + fname)
        p.rename(outside)
        p.symlink_to(outside)

    return mutate


def shift_offsets(fname, name, delta, it=TP4_IT):
    """Move one tensor's data_offsets by delta (overlap with < 0, gap with > 0)."""

    def fn(h):
        a, b = h[name]["data_offsets"]
        h[name]["data_offsets"] = [a + delta, b + delta]

    return edit_header(fname, fn, it)


def edit_layout(key, value, name=QKV):
    return edit_meta(set_field(key, value, name=name, sub="layout"))


def empty_folder(root: Path):
    for f in sorted(root.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()


# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------

SOURCE_CMDS = ("inspect", "plan", "export", "mount")
TARGET_CMDS = ("plan", "export", "mount")

# Tensors of the gpt fixture a target message may name (the first one checked fails).
GPT_TENSORS = ["embedding.word_embeddings.weight", "decoder.layers.0.", "output_layer.weight", "final_layernorm"]

# QKV_FILE's tensors in data order: the first and the last, for offset edits.
FIRST_IN_QKV_FILE = "decoder.final_layernorm.weight"
LAST_IN_QKV_FILE = "output_layer.weight"


@dataclass
class Bad:
    id: str
    mutate: Callable | None  # edits the copied fixture root
    any_of: object  # substrings, at least one must be in stderr; or a callable(root) -> list
    fixture: str = TP4
    target: list = field(default_factory=lambda: ["--mesh", "tp=2"])
    cmds: tuple = SOURCE_CMDS
    src: str = "root"  # "root", "iter" (the iteration folder) or "plain" (a folder built by make_plain)
    all_of: tuple = ()  # substrings that must all be present too


CASES = [
    Bad("invalid_json_metadata", write(f"{TP4_IT}/metadata.json", '{"state_dict_metadata": {"x": '), ["metadata.json"]),
    Bad("metadata_not_object", write(f"{TP4_IT}/metadata.json", "[]"), ["metadata.json"]),
    Bad("missing_global_shape", edit_meta(set_field("global_shape", DELETE)), ["global_shape"]),
    Bad("global_shape_is_string", edit_meta(set_field("global_shape", "192,64")), ["global_shape"]),
    Bad("negative_global_shape", edit_meta(set_field("global_shape", [-192, 64])), ["global_shape", QKV]),
    Bad("missing_layout_key", edit_meta(set_field("tensor_map", DELETE, sub="layout")), ["tensor_map"]),
    Bad("unknown_dtype_in_rank_header", edit_header(QKV_FILE, header_tensor("dtype", "Q8")), [QKV_FILE]),
    Bad("rank_shape_not_matching_metadata", edit_header(QKV_FILE, header_tensor("shape", [64, 48])), [QKV_FILE, QKV]),
    Bad("rank_dtype_not_matching_metadata", edit_header(QKV_FILE, header_tensor("dtype", "I32")), [QKV_FILE, QKV]),
    Bad("rank_file_truncated", truncate(f"{TP4_IT}/{QKV_FILE}", 100), [QKV_FILE]),
    Bad("rank_file_not_safetensors", write(f"{TP4_IT}/{QKV_FILE}", "hello"), [QKV_FILE]),
    Bad("rank_file_lacks_tensor", edit_meta(storage_file("gpt-model-0000004-0000008.safetensors"), it=GPT_IT),
        [QKV, "gpt-model-0000004-0000008.safetensors"], fixture=GPT, target=["--mesh", "tp=1"]),
    Bad("chunk_gap", edit_meta(drop_chunk_1), [QKV]),
    Bad("chunk_overlap", edit_meta(dup_chunk), [QKV]),
    Bad("unparsable_shard_id", edit_meta(rename_shard_key), ["linear_qkv.weight@1", "storage_data"]),
    Bad("storage_names_missing_file", edit_meta(storage_file("model-0000009-0000004.safetensors")),
        ["model-0000009-0000004.safetensors"]),
    Bad("missing_rank_file", remove(f"{TP4_IT}/model-0000002-0000004.safetensors"), ["model-0000002-0000004.safetensors"]),
    Bad("rank_list_wrong_length", edit_meta(set_field("rank_list", [0, 1, 2], sub="layout")), ["rank_list", QKV]),
    Bad("rank_list_duplicates", edit_meta(set_field("rank_list", [0, 1, 1, 3], sub="layout")), ["rank_list", QKV]),
    Bad("tensor_map_out_of_range", edit_meta(set_field("tensor_map", [5, -1], sub="layout")), ["tensor_map", QKV]),
    Bad("tensor_map_wrong_rank", edit_meta(set_field("tensor_map", [0, -1, -1], sub="layout")), ["tensor_map", QKV]),
    Bad("uneven_split", edit_meta(set_field("global_shape", [194, 64])), [QKV]),
    Bad("tracker_missing_iteration", write(TRACKER, "7"), ["iteration_00000007", TRACKER]),
    Bad("tracker_not_a_number", write(TRACKER, "latest"), [TRACKER]),
    Bad("empty_folder", empty_folder, lambda root: [str(root), "empty", "no safetensors", "metadata.json"]),
    Bad("gpt_opt_file_missing", remove(f"{GPT_IT}/gpt-opt-0000005-0000008.safetensors"),
        ["gpt-opt-0000005-0000008.safetensors"], fixture=GPT, target=["--mesh", "tp=1"], src="iter"),
    # --- paths that leave the checkpoint folder ------------------------------------------
    Bad("file_name_with_slash", edit_meta(storage_file("sub/" + QKV_FILE)), ["sub/" + QKV_FILE, "file_name"]),
    Bad("file_name_dotdot", edit_meta(storage_file("../" + QKV_FILE)), ["../" + QKV_FILE, "file_name"]),
    Bad("file_name_absolute", edit_meta(storage_file("/etc/passwd")), ["/etc/passwd", "file_name"]),
    Bad("symlink_leading_outside", symlink_outside(QKV_FILE), [QKV_FILE], all_of=("outside",)),
    # --- safetensors headers --------------------------------------------------------------
    Bad("header_longer_than_file", raw_header_len(QKV_FILE, 1 << 20), [QKV_FILE], all_of=("header",)),
    Bad("header_over_100MiB", raw_header_len(QKV_FILE, 200 << 20), [QKV_FILE], all_of=("100",)),
    Bad("header_not_json", garble_header(QKV_FILE), [QKV_FILE], all_of=("header",)),
    Bad("data_offsets_out_of_bounds", shift_offsets(QKV_FILE, LAST_IN_QKV_FILE, 4096), [QKV_FILE]),
    Bad("data_offsets_overlapping", shift_offsets(QKV_FILE, LAST_IN_QKV_FILE, -4), [QKV_FILE]),
    Bad("data_offsets_not_contiguous", shift_offsets(QKV_FILE, FIRST_IN_QKV_FILE, 8), [QKV_FILE]),
    Bad("header_shape_negative", edit_header(QKV_FILE, header_tensor("shape", [-48, 64])), [QKV_FILE]),
    # --- metadata.json structure ----------------------------------------------------------
    Bad("missing_storage_data", edit_meta(lambda m: m.pop("storage_data")), ["storage_data"]),
    Bad("no_tensors", edit_meta(lambda m: (m["state_dict_metadata"].clear(), m["storage_data"].clear())),
        ["state_dict_metadata"]),
    Bad("overflowing_global_shape", edit_meta(set_field("global_shape", [2**62, 2**62])), [QKV, "global_shape"]),
    Bad("chunk_offset_huge", edit_meta(lambda m: sdm(m)["chunk"][1].__setitem__("global_offset", [2**63])),
        [QKV, "chunk"]),
    Bad("fragmentations_disagree_with_layout", edit_meta(set_field("axis_fragmentations", [1, 4])),
        [QKV, "axis_fragmentations"]),
    Bad("interleaved_parallel", edit_layout("interleaved_parallel", True), [QKV, "interleaved"]),
    Bad("device_matrix_zero", edit_layout("device_matrix", [0, 4]), [QKV, "device_matrix"]),
    Bad("alias_names_wrong_count", edit_layout("alias_name", ["tp"]), [QKV, "alias_name"]),
    Bad("storage_rank_not_a_number", edit_meta(lambda m: m["storage_data"][ckpt.shard_key(QKV, 1)][0]
                                               .__setitem__("storage_rank", "one")), ["storage_rank"]),
    Bad("shard_id_names_unknown_tensor", edit_meta(lambda m: m["storage_data"].__setitem__(
        ckpt.shard_key("no.such.tensor", 0), m["storage_data"][ckpt.shard_key(QKV, 1)])), ["no.such.tensor"]),
    Bad("tracker_empty", write(TRACKER, ""), [TRACKER]),
    # --- values MindSpore does not define----------------------------------------
    Bad("dtype_not_mindspore", edit_meta(set_field("dtype", "Float24", sub="properties")),
        [QKV], all_of=("Float24", "metadata.json")),
    Bad("dtype_safetensors_name", edit_meta(set_field("dtype", "F32", sub="properties")), [QKV], all_of=("F32",)),
    Bad("dtype_not_a_string", edit_meta(set_field("dtype", 32, sub="properties")), [QKV], all_of=("dtype",)),
    Bad("dtype_other_type_than_rank_file", edit_meta(set_field("dtype", "float16", sub="properties")),
        ["model-0000000-0000004.safetensors"], all_of=(QKV, "float16", "F32")),
    Bad("device_matrix_not_a_list", edit_layout("device_matrix", "1,4"), [QKV], all_of=("device_matrix",)),
    Bad("device_matrix_negative", edit_layout("device_matrix", [-1, 4]), [QKV], all_of=("device_matrix",)),
    Bad("device_matrix_fraction", edit_layout("device_matrix", [1, 4.5]), [QKV], all_of=("device_matrix",)),
    Bad("tensor_map_below_minus_one", edit_layout("tensor_map", [-2, -1]), [QKV], all_of=("tensor_map",)),
    Bad("tensor_map_fraction", edit_layout("tensor_map", [0.5, -1]), [QKV], all_of=("tensor_map",)),
    Bad("alias_name_not_strings", edit_layout("alias_name", [1, 2]), [QKV], all_of=("alias_name",)),
    Bad("alias_name_empty", edit_layout("alias_name", ["dp", ""]), [QKV], all_of=("alias_name",)),
    Bad("interleaved_not_bool", edit_layout("interleaved_parallel", "no"), [QKV], all_of=("interleaved_parallel",)),
    Bad("rank_list_negative", edit_layout("rank_list", [0, 1, 2, -3]), [QKV], all_of=("rank_list",)),
    Bad("allow_to_save_not_bool", edit_meta(set_field("allow_to_save", "yes", sub="properties")), [QKV],
        all_of=("allow_to_save",)),
    # --- targets --------------------------------------------------------------------------
    Bad("mesh_tp3_does_not_divide", None, None, target=["--mesh", "tp=3"], cmds=TARGET_CMDS),
    Bad("mesh_unknown_alias", None, ["xx"], target=["--mesh", "xx=2"], cmds=TARGET_CMDS, all_of=("xx", "dp", "tp")),
    Bad("mesh_zero", None, ["tp"], target=["--mesh", "tp=0"], cmds=TARGET_CMDS),
    Bad("mesh_syntax", None, ["tp"], target=["--mesh", "tp"], cmds=TARGET_CMDS),
    Bad("pp5_with_2_layers", None, ["layer", "Layer", "pp", "--pp"], fixture=GPT, target=["--pp", "5"],
        cmds=TARGET_CMDS, all_of=("5",)),
    Bad("strategy_file_missing", None, lambda root: [str(root.parent / "nope.json")],
        target=["--strategy", "{tmp}/nope.json"], cmds=TARGET_CMDS),
    Bad("strategy_not_dividing", None, [QKV], target=["--strategy", "{tmp}/strategy.json"], cmds=TARGET_CMDS),
    Bad("strategy_lacks_tensor", None, ["output_layer.weight"], target=["--strategy", "{tmp}/strategy.json"],
        cmds=TARGET_CMDS),
    Bad("strategy_not_json", None, ["strategy.json"], target=["--strategy", "{tmp}/strategy.json"], cmds=TARGET_CMDS),
    # A device reports size 0 and never ends: the cap holds while reading.
    Bad("strategy_endless", None, ["/dev/zero"], target=["--strategy", "/dev/zero"], cmds=TARGET_CMDS,
        all_of=("more than",)),
    # --- hostile sizes: products wrap in u64 unless checked --------------------
    # dp=2^63 x tp=2 wrapped to 0 ranks per stage: exit 0 and a view whose files held nothing.
    Bad("mesh_dp_2_63_wraps", None, GPT_TENSORS, fixture=GPT, target=["--mesh", "dp=9223372036854775808"],
        cmds=TARGET_CMDS, all_of=("dp=9223372036854775808",)),
    Bad("mesh_product_wraps", None, GPT_TENSORS, fixture=GPT, target=["--mesh", "dp=4294967296,tp=4294967296"],
        cmds=TARGET_CMDS, all_of=("4294967296",)),
    Bad("mesh_world_too_large", None, GPT_TENSORS, fixture=GPT, target=["--mesh", "dp=4611686018427387904"],
        cmds=TARGET_CMDS, all_of=("dp=4611686018427387904",)),
    Bad("mesh_size_beyond_u64", None, ["dp"], fixture=GPT, target=["--mesh", "dp=18446744073709551616"],
        cmds=TARGET_CMDS),
    Bad("pp_huge", None, ["pp", "layers"], fixture=GPT, target=["--pp", "18446744073709551615"], cmds=TARGET_CMDS),
    Bad("strategy_empty_placement", None, ["output_layer.weight"], target=["--strategy", "{tmp}/strategy.json"],
        cmds=TARGET_CMDS, all_of=("strategy.json", "no rank")),
    Bad("strategy_rank_huge", None, [QKV], target=["--strategy", "{tmp}/strategy.json"], cmds=TARGET_CMDS,
        all_of=("9223372036854775807",)),
    Bad("storage_rank_huge", edit_meta(lambda m: [e.__setitem__("storage_rank", 2**64 - 1)
                                                 for e in m["storage_data"][ckpt.shard_key(QKV, 1)]]),
        ["metadata.json"], all_of=("18446744073709551615",)),
    # --- MindSpore Transformers' offset --------------------------------------------------
    Bad("pp_offset_sum_not_the_remainder", None, ["--pp-offset"], fixture=GPT, target=["--pp", "2", "--pp-offset", "1,0"],
        cmds=TARGET_CMDS, all_of=("sums to 1", "leave 0")),
    Bad("pp_offset_one_per_stage", None, ["--pp-offset"], fixture=GPT, target=["--pp", "2", "--pp-offset", "0"],
        cmds=TARGET_CMDS, all_of=("1 value(s)", "2 stage(s)")),
    # --- options that would do nothing ---------------------------------------------------
    Bad("hf_files_without_hf", None, ["--hf-files"], target=["--mesh", "tp=2", "--hf-files", "{tmp}"],
        cmds=TARGET_CMDS, all_of=("--hf",)),
    Bad("max_shard_size_without_hf", None, ["--max-shard-size"], target=["--mesh", "tp=2", "--max-shard-size", "1GB"],
        cmds=TARGET_CMDS, all_of=("--hf",)),
    Bad("hf_config_without_hf", None, ["--hf-config"], target=["--mesh", "tp=2", "--hf-config", "rope_theta=1"],
        cmds=TARGET_CMDS, all_of=("--hf",)),
    Bad("threads_0", None, ["--threads"], target=["--mesh", "tp=2", "--threads", "0"], cmds=("export", "mount"),
        all_of=("at least 1",)),
    # A block is at least 4 KiB, and at most a quarter of the cache: 16K at least.
    Bad("cache_size_1K", None, ["--cache-size"], target=["--mesh", "tp=2", "--cache-size", "1K"], cmds=("mount",),
        all_of=("16K",)),
    # --- plain safetensors folders (no metadata.json) -------------------------------------
    Bad("plain_index_names_missing_file", None, ["b.safetensors"], src="plain"),
    Bad("plain_file_not_safetensors", None, ["broken.safetensors"], src="plain"),
]


def write_strategy(case, tmp: Path):
    meta = json.loads((ckpt.resolve_iteration(ckpt.FIXTURES / TP4) / "metadata.json").read_text())
    layouts = {n: m["layout"] for n, m in meta["state_dict_metadata"].items()}
    if case.id == "strategy_not_dividing":
        write_bad_strategy(tmp)
    elif case.id == "strategy_lacks_tensor":
        del layouts["output_layer.weight"]
        (tmp / "strategy.json").write_text(json.dumps(layouts))
    elif case.id == "strategy_not_json":
        (tmp / "strategy.json").write_text(json.dumps(layouts)[:-10])
    elif case.id == "strategy_empty_placement":
        # A metadata.json strategy whose storage_data names no holder of a whole tensor.
        target = json.loads(json.dumps(meta))
        target["state_dict_metadata"]["output_layer.weight"]["layout"] = None
        for key in list(target["storage_data"]):
            if key.startswith("('output_layer.weight'"):
                target["storage_data"][key] = []
        (tmp / "strategy.json").write_text(json.dumps(target))
    elif case.id == "strategy_rank_huge":
        layouts[QKV] = dict(layouts[QKV], rank_list=[0, 1, 2, 2**63 - 1])
        (tmp / "strategy.json").write_text(json.dumps(layouts))


def make_plain(case, tmp: Path) -> Path:
    plain = tmp / "plain"
    plain.mkdir()
    w = ("F32", np.arange(12, dtype="<f4"))
    if case.id == "plain_index_names_missing_file":
        ckpt.write_safetensors(plain / "a.safetensors", {"w": w})
        (plain / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
    else:
        # Not model.safetensors: that name alone would be read, as transformers reads it.
        ckpt.write_safetensors(plain / "w.safetensors", {"w": w})
        (plain / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    return plain


def write_bad_strategy(tmp: Path):
    meta = json.loads((ckpt.resolve_iteration(ckpt.FIXTURES / TP4) / "metadata.json").read_text())
    layouts = {n: m["layout"] for n, m in meta["state_dict_metadata"].items()}
    layouts[QKV] = ckpt.make_layout([1, 5], [0, -1], ["dp", "tp"], [0, 1, 2, 3, 4])  # 192 / 5
    for n, lay in layouts.items():
        if n != QKV:
            layouts[n] = dict(lay, device_matrix=[1, 5], rank_list=[0, 1, 2, 3, 4], tensor_map=[-1] * len(lay["tensor_map"]))
    (tmp / "strategy.json").write_text(json.dumps(layouts))


PARAMS = [pytest.param(c, cmd, id=f"{c.id}-{cmd}") for c in CASES for cmd in c.cmds]


def mesh_failures(root):
    """Tensors of the tp4 fixture that --mesh tp=3 cannot split, with their bad dimension sizes."""
    params, S, P = ckpt.load_checkpoint(ckpt.resolve_iteration(root))
    out = {}
    for p in params:
        if p.layout is None:
            continue
        lay = dict(p.layout, device_matrix=[1, 3])
        for n, s in zip(p.shape, ckpt.splits(lay, p.shape)):
            if n % s:
                out[p.name] = n
    return out


@pytest.mark.parametrize("case,cmd", PARAMS)
def test_bad_input(case: Bad, cmd, tmp_path, fixture_copy, reshardfs_bin):
    root = fixture_copy(case.fixture)
    if case.mutate:
        case.mutate(root)
    write_strategy(case, tmp_path)
    if case.src == "plain":
        src = make_plain(case, tmp_path)
        target = ["--unshard"]
    else:
        src = root if case.src == "root" else ckpt.resolve_iteration(root)
        target = [a.replace("{tmp}", str(tmp_path)) for a in case.target]
    dest = tmp_path / "dest"
    mnt = tmp_path / "mnt"
    if cmd == "inspect":
        args = ["inspect", src]
    elif cmd == "plan":
        args = ["plan", src, *target]
    elif cmd == "mount":
        mnt.mkdir()
        args = ["mount", src, mnt, *target]
    else:
        args = ["export", src, dest, *target]
    try:
        run = ckpt.run_cli(args)
    finally:
        if cmd == "mount" and mountutil.is_mounted(mnt):
            mountutil.run(["umount", "-l", str(mnt)])
            pytest.fail(f"bad input left a mount at {mnt}")
    assert run.code == 2, f"expected exit 2\n{run}"
    err = run.stderr
    assert err.strip(), f"no message on stderr\n{run}"
    for bad in ("panicked", "Traceback", "RUST_BACKTRACE", "stack backtrace"):
        assert bad not in err, f"{bad!r} in stderr\n{run}"
    if case.id == "mesh_tp3_does_not_divide":
        fails = mesh_failures(root)
        named = [n for n in fails if n in err]
        assert named, f"stderr names none of the tensors tp=3 cannot split {sorted(fails)}\n{run}"
        assert str(fails[named[0]]) in err and "3" in err, f"stderr lacks the size {fails[named[0]]} or split 3\n{run}"
    else:
        any_of = case.any_of(root) if callable(case.any_of) else case.any_of
        assert any(s in err for s in any_of), f"stderr names none of {any_of}\n{run}"
    for s in case.all_of:
        assert s in err, f"stderr lacks {s!r}\n{run}"
    if cmd == "export":
        assert not dest.exists() or not any(dest.iterdir()), f"export wrote into DEST: {sorted(os.listdir(dest))}\n{run}"


def test_dest_not_empty_without_force(tmp_path, reshardfs_bin):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    run = ckpt.export(ckpt.FIXTURES / TP4, dest, ["--mesh", "tp=2"])
    assert run.code == 2, f"expected exit 2\n{run}"
    assert "panicked" not in run.stderr and run.stderr.strip(), str(run)
    assert any(s in run.stderr for s in (str(dest), "--force", "not empty")), str(run)
    assert sorted(os.listdir(dest)) == ["keep.txt"] and (dest / "keep.txt").read_text() == "precious"


def test_source_left_untouched(tmp_path, reshardfs_bin):
    """A failed and a successful export leave the source byte-identical."""
    root = ckpt.FIXTURES / TP4
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    failed = ckpt.export(root, tmp_path / "a", ["--mesh", "tp=3"])
    assert failed.code == 2, f"tp=3 does not divide the tp4 fixture: expected exit 2\n{failed}"
    ok = ckpt.export(root, tmp_path / "b", ["--mesh", "tp=2"])
    assert ok.code == 0, f"tp=2: expected exit 0\n{ok}"
    assert sorted(os.listdir(tmp_path / "b" / "iteration_00000005")), "the successful export wrote nothing"
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("name", ["float32", "FLOAT32", "Float32"])
def test_dtype_names_compare_case_insensitively(name, fixture_copy, reshardfs_bin):
    """MindSpore writes `Float32` or `float32` by run mode: any case names the same type."""
    root = fixture_copy(TP4)
    edit_meta(set_field("dtype", name, sub="properties"))(root)
    run = ckpt.run_cli(["inspect", root])
    assert run.code == 0, str(run)
