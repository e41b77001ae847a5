"""`--pp N` places tensors outside the layers where MindFormers does, and splits the layers as it
does (with its `offset` when N does not divide them).

The expected views are built here from the rule as the README states it, over sources written by
the Python writer (`ckpt.write_iteration`), never from reshardfs's own output:

* layer `i` of `L` goes to stage `i*N//L` when N divides L; otherwise `--pp-offset` is needed, and
  stage s holds `L//N + offset[s]` layers in order (MindFormers' LayerSetting: `pp_ids[i] =
  searchsorted(cumsum(layers per stage), i + 1)`), the offsets summing to `L % N`;
* from a single-stage source, `decoder.final_layernorm.*` and `output_layer.*` (and their `adam_m.`
  and `adam_v.` states) go to the last stage, every other tensor outside the layers to the first;
* from a multi-stage source, such a tensor stays first if it was first, else goes last.
"""

import json

import numpy as np
import pytest

import ckpt
from ckpt import Param

L = 4
S = 2  # ranks per stage: dp=2 x tp=1
MODEL = ["embedding.word_embeddings.weight"] + [f"decoder.layers.{i}.mlp.weight" for i in range(L)] + [
    "decoder.final_layernorm.weight",
    "output_layer.weight",
]


def layout(stage: int, ndim: int) -> dict:
    return ckpt.make_layout([2, 1], [-1] * ndim, ["dp", "tp"], range(stage * S, (stage + 1) * S))


def write_source(root, stage_of: dict, stages: int):
    """A checkpoint root whose tensors sit on the given source stages, with optimizer states."""
    rng = np.random.default_rng(7)
    params = []
    for name in MODEL:
        st = stage_of[name]
        arr = rng.standard_normal((4, 2)).astype("<f4")
        params.append(Param(name, "F32", arr, layout(st, 2), st))
        for pre in ("adam_m.", "adam_v."):
            params.append(Param(pre + name, "F32", arr * 2, layout(st, 2), st, "opt"))
    params.append(Param("global_step", "I64", np.array([5], dtype="<i8"), None, 0, "opt"))
    it = root / ckpt.iteration_dir_name(1)
    ckpt.write_iteration(it, params, S, stages)
    ckpt.write_tracker(root, 1)
    return {p.name: p for p in params}


def strip(name: str) -> str:
    for pre in ("adam_m.", "adam_v."):
        if name.startswith(pre):
            return name[len(pre):]
    return name


def mindformers_stage(i: int, n: int, offset) -> int:
    """MindFormers' LayerSetting: the stage of layer i of L over n stages with `offset`."""
    per = np.full(n, L // n) + np.array(offset if offset is not None else [0] * n)
    return int(np.searchsorted(np.cumsum(per), i + 1))


def expected_stage(name: str, n: int, src_stage: int, single_stage: bool, offset=None) -> int:
    base = strip(name)
    if base.startswith("decoder.layers."):
        i = int(base.split(".")[2])
        return mindformers_stage(i, n, offset) if offset is not None else i * n // L
    if single_stage:
        return n - 1 if base.startswith(("decoder.final_layernorm.", "output_layer.")) else 0
    return 0 if src_stage == 0 else n - 1


def check_view(dest, params: dict, n: int, single_stage: bool, offset=None):
    it = dest / ckpt.iteration_dir_name(1)
    world = n * S
    meta = json.loads((it / "metadata.json").read_text())
    held = {}
    for kind in ("model", "opt"):
        for r in range(world):
            sf = ckpt.read_safetensors(it / ckpt.file_name(None, kind, r, world))
            for name, (_, arr) in sf.tensors.items():
                held.setdefault(name, []).append(r)
                np.testing.assert_array_equal(arr, params[name].array, err_msg=f"{name} on rank {r}")
    assert set(held) == set(params)
    for name, p in params.items():
        st = expected_stage(name, n, p.stage, single_stage, offset)
        want = list(range(st * S, (st + 1) * S))
        assert sorted(held[name]) == want, f"{name}: held by ranks {held[name]}, expected stage {st}: {want}"
        lay = meta["state_dict_metadata"][name]["layout"]
        if lay is not None:
            assert lay["rank_list"] == want, f"{name}: metadata.json rank_list {lay['rank_list']}, expected {want}"
    return held


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("target", [["--pp"], ["--mesh", "dp=2,tp=1", "--pp"]], ids=["pp", "mesh+pp"])
def test_single_stage_source_puts_norm_and_output_last(tmp_path, reshardfs_bin, n, target):
    params = write_source(tmp_path / "src", {name: 0 for name in MODEL}, 1)
    run = ckpt.export(tmp_path / "src", tmp_path / "dest", target + [str(n)])
    assert run.code == 0, str(run)
    held = check_view(tmp_path / "dest", params, n, single_stage=True)
    # Read from the view itself, not from this file's rule: the output layer and its states left
    # the first stage for the last, the embedding did not.
    last = list(range((n - 1) * S, n * S))
    for name in ("output_layer.weight", "adam_v.output_layer.weight", "decoder.final_layernorm.weight"):
        assert sorted(held[name]) == last, f"{name}: held by ranks {held[name]}, want the last stage's {last}"
    assert sorted(held["embedding.word_embeddings.weight"]) == list(range(S)), "the embedding left the first stage"


@pytest.mark.parametrize("n", [1, 2, 4])
def test_multi_stage_source_keeps_first_and_last(tmp_path, reshardfs_bin, n):
    # Two source stages; the embedding on the first, norm and output on the last, layers split 2/2.
    stage_of = {name: 0 for name in MODEL}
    for name in MODEL[3:]:
        stage_of[name] = 1
    params = write_source(tmp_path / "src", stage_of, 2)
    run = ckpt.export(tmp_path / "src", tmp_path / "dest", ["--pp", str(n)])
    assert run.code == 0, str(run)
    check_view(tmp_path / "dest", params, n, single_stage=False)


@pytest.mark.parametrize("n", [2, 4])
def test_multi_stage_source_keeps_ends_against_the_names(tmp_path, reshardfs_bin, n):
    """A multi-stage source whose job put the embedding on the last stage and the final norm and
    output layer on the first (the reverse of the single-stage name rule): each keeps its end of
    the pipeline, so a view that applied the single-stage rule is caught on every such tensor."""
    stage_of = {name: 0 for name in MODEL}
    stage_of["embedding.word_embeddings.weight"] = 1
    for i in range(L // 2, L):
        stage_of[f"decoder.layers.{i}.mlp.weight"] = 1
    params = write_source(tmp_path / "src", stage_of, 2)
    run = ckpt.export(tmp_path / "src", tmp_path / "dest", ["--pp", str(n)])
    assert run.code == 0, str(run)
    held = check_view(tmp_path / "dest", params, n, single_stage=False)
    first, last = list(range(S)), list(range((n - 1) * S, n * S))
    for pre in ("", "adam_m.", "adam_v."):
        for name, want in ((pre + "embedding.word_embeddings.weight", last),
                           (pre + "output_layer.weight", first), (pre + "decoder.final_layernorm.weight", first)):
            assert sorted(held[name]) == want, \
                f"{name}: held by ranks {held[name]}, want {want} (it keeps its source end of the pipeline)"


def test_uneven_pp_needs_an_offset(tmp_path, reshardfs_bin):
    """4 layers over 3 stages: refused without --pp-offset (MindFormers refuses a split that does
    not divide the layers unless `offset` is given), with a message saying how."""
    write_source(tmp_path / "src", {name: 0 for name in MODEL}, 1)
    for cmd in (["export", tmp_path / "src", tmp_path / "dest"], ["plan", tmp_path / "src"]):
        run = ckpt.run_cli(cmd + ["--pp", "3"])
        assert run.code == 2, str(run)
        for w in ("--pp 3", "4 layers", "--pp-offset", "sum", "1,0,0"):
            assert w in run.stderr, f"the message lacks {w!r}\n{run}"
    assert not (tmp_path / "dest").exists() or not list((tmp_path / "dest").iterdir())


@pytest.mark.parametrize("offset", [[1, 0, 0], [0, 0, 1], [-1, 1, 1]], ids=lambda o: ",".join(map(str, o)))
def test_pp_offset_splits_layers_as_mindformers(tmp_path, reshardfs_bin, offset):
    params = write_source(tmp_path / "src", {name: 0 for name in MODEL}, 1)
    run = ckpt.export(tmp_path / "src", tmp_path / "dest", ["--pp", "3", "--pp-offset", ",".join(map(str, offset))])
    assert run.code == 0, str(run)
    check_view(tmp_path / "dest", params, 3, single_stage=True, offset=offset)


@pytest.mark.parametrize("offset,words", [("1,1,0", ["sums to 2", "leave 1"]), ("1,0", ["2 value(s)", "3 stage(s)"]),
                                          ("2,-1,0", ["stage 1", "0 layer(s)"]), ("1,x,0", ["--pp-offset"])])
def test_bad_pp_offset(tmp_path, reshardfs_bin, offset, words):
    write_source(tmp_path / "src", {name: 0 for name in MODEL}, 1)
    run = ckpt.run_cli(["plan", tmp_path / "src", "--pp", "3", "--pp-offset", offset])
    assert run.code == 2, str(run)
    for w in words:
        assert w in run.stderr, f"the message lacks {w!r}\n{run}"
