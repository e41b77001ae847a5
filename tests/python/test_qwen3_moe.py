"""The Hugging Face bridge for Qwen3-MoE, with expert parallelism, both ways.

References, independent of reshardfs: the fixtures written by transformers and by MindSpore
Transformers' own converter (tests/fixtures/qwen3-moe-*: the HF folder, the same weights as a
dp=2 x tp=2 x ep=2 MindFormers checkpoint with Adam states, and what MindFormers writes for the HF
folder under dp=2, tp=2, ep=4), moeref.py (numpy), and transformers and vLLM themselves.

Part A checks moeref against the fixtures (no binary). Part B runs reshardfs; mounts are read
only from subprocesses (test_qwen3.py's helpers).

Run as a script (always in a subprocess):
  load DIR OUT.npz    Qwen3MoeForCausalLM.from_pretrained(DIR, dtype=bfloat16): every parameter
                      and the logits on PROMPT as raw bits, and the loading info
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ckpt  # noqa: E402
import moeref  # noqa: E402
import qwen3ref as q3  # noqa: E402
import test_qwen3 as q3t  # noqa: E402
from ckpt import FIXTURES  # noqa: E402

HF_FX = FIXTURES / "qwen3-moe-tiny-hf"
MF_FX = FIXTURES / "qwen3-moe-tiny-mf-dp2-tp2-ep2-f32"
MF_IT = MF_FX / "iteration_00001000"
EXP_FX = FIXTURES / "expected" / "qwen3-moe-tiny-hf.dp=2,tp=2,ep=4"
EXP_ARGS = ["--mesh", "dp=2,tp=2,ep=4"]
EXP_STRATEGY = moeref.Strategy(dp=2, tp=2, ep=4)
MF_STRATEGY = moeref.Strategy(dp=2, tp=2, ep=2)
PREFIX = "qwen3_moe"
LAYOUT_KEYS = q3t.LAYOUT_KEYS
PROMPT = [[11, 7, 42, 90, 5, 88, 19, 56, 3, 64, 1, 49]]  # within the tiny vocabulary (96)
PY = sys.executable
SELF = str(Path(__file__).resolve())

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def dims() -> moeref.Dims:
    return moeref.Dims.from_folder(HF_FX)


def hf_arrays(folder=HF_FX) -> dict:
    return {n: a for n, (_, a) in q3.read_hf_folder(folder).items()}


def mf_params(it=MF_IT) -> dict:
    """{name: (dtype, array)} of every tensor of an iteration (parameters and Adam states)."""
    params, _, _ = ckpt.load_checkpoint(it)
    return {p.name: (p.dtype, p.array) for p in params}


def view_rank_tensors(folder, world: int, kinds=("model", "opt")) -> dict[int, dict]:
    """{rank: {name: (dtype, array)}} of a view's rank files, model and opt merged."""
    out = {}
    for r in range(world):
        out[r] = {}
        for kind in kinds:
            p = Path(folder) / q3.mf_file_name(PREFIX, r, world, kind)
            if p.exists():
                sf = ckpt.read_safetensors(p)
                assert not ckpt.format_problems(sf), ckpt.format_problems(sf)
                out[r].update(sf.tensors)
    return out


def check_layouts(folder, want_meta: dict):
    sdm = json.loads((Path(folder) / "metadata.json").read_text())["state_dict_metadata"]
    assert sorted(sdm) == sorted(want_meta), f"{folder}/metadata.json: tensors differ: " \
        f"{sorted(set(sdm) ^ set(want_meta))}"
    for n, w in want_meta.items():
        for k in LAYOUT_KEYS:
            assert sdm[n][k] == w[k], f"metadata.json: {n}: {k} = {sdm[n][k]!r}, want {w[k]!r}"
    return sdm


# ===========================================================================
# A. the reference against the fixtures
# ===========================================================================


def test_ref_hf_to_mf_equals_mindformers_expected():
    d = dims()
    mf = moeref.hf_to_mf(hf_arrays(), d)
    want = moeref.rank_tensors(mf, EXP_STRATEGY, d.base.layers)
    got = view_rank_tensors(EXP_FX, EXP_STRATEGY.world, kinds=("model",))
    for r in range(EXP_STRATEGY.world):
        assert sorted(got[r]) == sorted(want[r]), f"rank {r}: names differ"
        for n, a in want[r].items():
            assert got[r][n][1].tobytes() == a.tobytes(), f"rank {r}: {n}: the reference differs from MindFormers"
    check_layouts(EXP_FX, moeref.metadata({n: a.shape for n, a in mf.items()}, EXP_STRATEGY, d.base.layers))


def test_ref_mf_fixture_is_the_hf_fixture_widened_with_its_layouts():
    d = dims()
    mf = moeref.hf_to_mf(hf_arrays(), d)
    got = mf_params()
    for n, a in mf.items():
        dt, arr = got[n]
        assert dt == "F32" and arr.tobytes() == q3.cast(a, "BF16", "F32").tobytes(), f"{n}: not the HF bytes widened"
    shapes = {n: a.shape for n, (_, a) in got.items()}
    check_layouts(MF_IT, moeref.metadata(shapes, MF_STRATEGY, d.base.layers))


def test_ref_round_trip():
    hf = hf_arrays()
    back = moeref.mf_to_hf(moeref.hf_to_mf(hf, dims()), dims())
    assert sorted(back) == sorted(hf)
    assert all(back[n].tobytes() == hf[n].tobytes() for n in hf)


# ===========================================================================
# B. reshardfs
# ===========================================================================


def test_hf_to_mf_export_is_byte_identical_to_mindformers(tmp_path, reshardfs_bin):
    out = q3t.export_ok(HF_FX, tmp_path / "out", EXP_ARGS)
    assert sorted(os.listdir(out)) == sorted(f for f in os.listdir(EXP_FX) if f != "common.json")
    for f in os.listdir(out):
        assert (out / f).read_bytes() == (EXP_FX / f).read_bytes(), f"{f} differs from MindFormers' own"


def test_hf_to_mf_mount_is_byte_identical_to_mindformers(mounts, tmp_path):
    out, summary = q3t.mount_and_copy(mounts, HF_FX, EXP_ARGS, tmp_path / "snap")
    for f in os.listdir(out):
        assert (out / f).read_bytes() == (EXP_FX / f).read_bytes(), f"{f} differs from MindFormers' own"
    assert "qwen3_moe" in summary, summary


# MindFormers -> MindFormers: sizes of dp, tp, ep (and stages) changed; Adam states follow.
MF_TARGETS = [
    (["--mesh", "dp=4,tp=2,ep=4"], moeref.Strategy(dp=4, tp=2, ep=4)),
    (["--mesh", "dp=1,tp=1,ep=1"], moeref.Strategy()),
    (["--mesh", "dp=2,tp=1,ep=2"], moeref.Strategy(dp=2, ep=2)),
    (["--mesh", "dp=1,tp=2,ep=2", "--pp", "2"], moeref.Strategy(tp=2, ep=2, pp=2)),
    (["--mesh", "tp=1"], moeref.Strategy(dp=2, tp=1, ep=2)),
]


@pytest.mark.parametrize("args,s", MF_TARGETS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_mf_to_mf_against_the_reference(args, s, tmp_path, reshardfs_bin):
    out = q3t.export_ok(MF_FX, tmp_path / "out", args) / "iteration_00001000"
    params = mf_params()
    layers = dims().base.layers
    want = moeref.rank_tensors({n: a for n, (_, a) in params.items()}, s, layers)
    got = view_rank_tensors(out, s.world)
    assert len(got) == s.world and sorted(os.listdir(out)).count("metadata.json") == 1
    for r in range(s.world):
        assert sorted(got[r]) == sorted(want[r]), f"rank {r}: names differ: {sorted(set(got[r]) ^ set(want[r]))}"
        for n, a in want[r].items():
            assert got[r][n][0] == params[n][0], f"rank {r}: {n}: dtype"
            assert got[r][n][1].tobytes() == a.tobytes(), f"rank {r}: {n}: bytes differ from the reference"
    check_layouts(out, moeref.metadata({n: a.shape for n, (_, a) in params.items()}, s, layers))


def test_hf_to_mf_with_a_moe_jobs_strategy_file(tmp_path, reshardfs_bin):
    """--strategy: a Qwen3-MoE job's metadata.json (the expected folder's) gives its layouts, and
    so MindSpore Transformers' own files; --unshard one rank holding every tensor whole."""
    out = q3t.export_ok(HF_FX, tmp_path / "s", ["--strategy", EXP_FX / "metadata.json"])
    for f in os.listdir(out):
        assert (out / f).read_bytes() == (EXP_FX / f).read_bytes(), f"{f} differs from MindFormers' own"
    out = q3t.export_ok(HF_FX, tmp_path / "u", ["--unshard"])
    d = dims()
    mf = moeref.hf_to_mf(hf_arrays(), d)
    got = view_rank_tensors(out, 1)[0]
    assert sorted(got) == sorted(mf)
    assert all(got[n][1].tobytes() == a.tobytes() for n, a in mf.items())


def test_mf_to_mf_mount_equals_export(mounts, tmp_path, reshardfs_bin):
    args = ["--mesh", "dp=4,tp=2,ep=4"]
    exp = q3t.export_ok(MF_FX, tmp_path / "exp", args)
    snap, _ = q3t.mount_and_copy(mounts, MF_FX, args, tmp_path / "snap")
    assert q3t.tree(snap) == q3t.tree(exp)
    for f in q3t.tree(exp):
        assert (snap / f).read_bytes() == (exp / f).read_bytes(), f"{f}: mount differs from export"


def test_hf_to_mf_other_strategies_against_the_reference(mounts, tmp_path):
    """HF -> MF with a cast, two stages and ep on tp alone, mounted."""
    s = moeref.Strategy(dp=1, tp=2, ep=2, pp=2)
    out, _ = q3t.mount_and_copy(mounts, HF_FX, ["--mesh", "dp=1,tp=2,ep=2", "--pp", "2", "--dtype", "f32"],
                                tmp_path / "snap")
    d = dims()
    mf = moeref.hf_to_mf(hf_arrays(), d)
    want = moeref.rank_tensors({n: q3.cast(a, "BF16", "F32") for n, a in mf.items()}, s, d.base.layers)
    got = view_rank_tensors(out, s.world)
    for r in range(s.world):
        assert sorted(got[r]) == sorted(want[r]), f"rank {r}"
        for n, a in want[r].items():
            assert got[r][n][0] == "F32" and got[r][n][1].tobytes() == a.tobytes(), f"rank {r}: {n}"
    check_layouts(out, moeref.metadata({n: a.shape for n, a in mf.items()}, s, d.base.layers))


def test_mf_to_hf_with_hf_files_gives_the_original_bytes(mounts, tmp_path, reshardfs_bin):
    exp = q3t.export_ok(MF_FX, tmp_path / "exp", ["--hf", "--hf-files", HF_FX, "--dtype", "bf16"])
    snap, _ = q3t.mount_and_copy(mounts, MF_FX, ["--hf", "--hf-files", HF_FX, "--dtype", "bf16"],
                                 tmp_path / "snap")
    want = q3.read_hf_folder(HF_FX)
    for folder in (exp / "iteration_00001000", snap / "iteration_00001000"):
        q3t.check_hf_view(folder, want)
        assert (folder / "config.json").read_bytes() == (HF_FX / "config.json").read_bytes()


def test_mf_to_hf_generated_config(tmp_path, reshardfs_bin):
    out = q3t.export_ok(MF_FX, tmp_path / "exp", ["--hf", "--model", "qwen3_moe"]) / "iteration_00001000"
    want = {n: ("F32", q3.cast(a, "BF16", "F32")) for n, a in hf_arrays().items()}
    q3t.check_hf_view(out, want)
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((HF_FX / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "moe_intermediate_size", "vocab_size", "tie_word_embeddings"):
        assert cfg[k] == src[k], f"config.json: {k} = {cfg[k]!r}, the model's is {src[k]!r}"
    assert cfg["num_experts"] == src["num_local_experts"]
    assert cfg["dtype"] == "float32"
    r = q3t.run_bin(["plan", MF_FX, "--hf", "--model", "qwen3_moe"])
    assert r.code == 0 and "num_experts_per_tok = 4" in r.stdout and "assumed" in r.stdout, str(r)


@pytest.mark.hf_stack
def test_transformers_loads_the_hf_mount_with_the_original_logits(mounts, tmp_path):
    """MF float32 (ep slices) -> mount --hf --hf-files ORIG --dtype bf16 ->
    Qwen3MoeForCausalLM.from_pretrained: every weight and the logits bit-identical to loading the
    original folder."""
    want = load_via_transformers(HF_FX, tmp_path / "orig.npz")
    m = mounts("mnt")
    m.start_ok(MF_FX, ["--hf", "--hf-files", HF_FX, "--dtype", "bf16"])
    got = load_via_transformers(m.path("iteration_00001000"), tmp_path / "mnt.npz")
    m.cleanup()
    assert got["info"].tobytes() == b"[]", got["info"].tobytes().decode()
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{k} differs"


@pytest.mark.hf_stack
def test_vllm_loader_reads_the_hf_mount(mounts, tmp_path):
    """vLLM's own loader code (file discovery, safetensors iterator, get_config) on the --hf mount:
    every tensor bit-identical to the original folder's."""
    import mountutil

    m = mounts("mnt")
    m.start_ok(MF_FX, ["--hf", "--hf-files", HF_FX, "--dtype", "bf16"])
    p = mountutil.run([PY, q3t.SELF, "vllm", m.path("iteration_00001000"), tmp_path / "vllm.npz"], timeout=300)
    m.cleanup()
    assert p.code == 0, f"vLLM's loader could not read the mount:\n{p}"
    got = dict(np.load(tmp_path / "vllm.npz"))
    info = json.loads(got.pop("info").tobytes())
    assert info["model_type"] == "qwen3_moe" and info["layers"] == 2, info
    hf = hf_arrays()
    assert sorted(k[len("param:"):] for k in got) == sorted(hf)
    for n, a in hf.items():
        assert got["param:" + n].view(np.uint16).tobytes() == a.tobytes(), f"{n}: vLLM read other bits"


def test_inspect_and_plan_show_the_expert_layouts_and_sources(reshardfs_bin):
    r = q3t.ok(q3t.run_bin(["inspect", HF_FX, "--json"]))
    rep = json.loads(r.stdout)
    ts = {t["name"]: t for t in rep["iterations"][0]["tensors"]}
    w1 = ts["decoder.layers.0.mlp.experts.weight1"]
    assert w1["mesh"] == "dp_ex_ep=1,ep=1" and w1["map"] == "[ep, -]", w1
    assert "model.layers.0.mlp.experts.3.up_proj.weight (transposed)" in w1["rows_of"], w1["rows_of"]
    assert ts["decoder.layers.0.mlp.router.weight"]["map"] == "[-, -]"
    r = q3t.ok(q3t.run_bin(["plan", HF_FX] + EXP_ARGS + ["--json"]))
    plan = json.loads(r.stdout)
    f0 = plan["iterations"][0]["files"][0]
    w1 = next(t for t in f0["tensors"] if t["name"] == "decoder.layers.0.mlp.experts.weight1")
    assert w1["shape"] == [64, 64] and w1["global_start"] == [0, 0], w1
    # Rank 0 holds expert 0: its gate and up, whole, from the HF shard.
    assert [(p["start"], p["shape"]) for p in w1["pieces"]] == [([0, 0], [32, 64]), ([0, 0], [32, 64])], w1


def test_fi_accu_is_left_out_of_a_hf_view_and_said(tmp_path, reshardfs_bin):
    """A MindFormers checkpoint holding the router's non-trainable fi_accu buffer: the --hf view
    leaves it out and the plan says so."""
    src = tmp_path / "src"
    params, S, stages = ckpt.load_checkpoint(MF_IT)
    lay = json.loads((MF_IT / "metadata.json").read_text())["state_dict_metadata"][
        "decoder.layers.0.mlp.router.weight"]["layout"]
    extra = ckpt.Param("decoder.layers.0.mlp.router.fi_accu", "F32", np.zeros(4, "<f4"),
                       dict(lay, tensor_map=[-1]), 0, "model")
    ckpt.write_iteration(src, params + [extra], S, stages, prefix=PREFIX)
    r = q3t.ok(q3t.run_bin(["plan", src, "--hf", "--hf-files", HF_FX]))
    assert "fi_accu" in r.stdout, r.stdout
    out = q3t.export_ok(src, tmp_path / "out", ["--hf", "--hf-files", HF_FX, "--dtype", "bf16"])
    q3t.check_hf_view(out, q3.read_hf_folder(HF_FX))


# --- bad input -----------------------------------------------------------------


def hf_copy(dest, drop=(), config=None, replace=None) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True)
    cfg = json.loads((HF_FX / "config.json").read_text())
    cfg.update(config or {})
    (dest / "config.json").write_text(json.dumps(cfg))
    ts = {n: t for n, t in q3.read_hf_folder(HF_FX).items() if n not in drop}
    ts.update(replace or {})
    ckpt.write_safetensors(dest / "model.safetensors", ts, metadata={"format": "pt"})
    return dest


BAD = [
    ("missing-expert", dict(drop=["model.layers.1.mlp.experts.2.up_proj.weight"]),
     ["model.layers.1.mlp.experts.2.up_proj.weight", "missing"]),
    ("misshapen-expert", dict(replace={"model.layers.0.mlp.experts.1.down_proj.weight":
                                       ("BF16", np.zeros((32, 64), "<u2"))}),
     ["model.layers.0.mlp.experts.1.down_proj.weight", "shape"]),
    # The router's shape holds the expert count: its message names both sides.
    ("more-experts-in-config", dict(config={"num_local_experts": 8}),
     ["model.layers.0.mlp.gate.weight", "[4, 64]", "num_experts=8"]),
    ("fewer-experts-in-config", dict(config={"num_local_experts": 2}),
     ["model.layers.0.mlp.gate.weight", "[4, 64]", "num_experts=2"]),
    ("dense-layers", dict(config={"mlp_only_layers": [1]}), ["mlp_only_layers", "no dense layers"]),
    ("sparse-step", dict(config={"decoder_sparse_step": 2}), ["decoder_sparse_step"]),
    ("two-expert-counts", dict(config={"num_experts": 3}), ["num_experts", "num_local_experts"]),
]


@pytest.mark.parametrize("case,edit,words", BAD, ids=[b[0] for b in BAD])
def test_bad_moe_folders_exit_2(case, edit, words, tmp_path, reshardfs_bin):
    src = hf_copy(tmp_path / "src", **edit)
    for cmd in (["inspect", src], ["plan", src] + EXP_ARGS):
        r = q3t.run_bin(cmd)
        assert r.code == 2, f"{case}: {cmd[0]}: exit {r.code}, want 2\n{r}"
        for w in words:
            assert w in r.stderr, f"{case}: {cmd[0]}: the message does not say {w!r}:\n{r.stderr}"


@pytest.mark.parametrize("mesh,words", [
    ("dp=2,tp=2,ep=3", ["ep=3", "experts"]),
    ("dp=1,tp=1,ep=2", ["ep=2", "dp*tp"]),
    ("dp=2,dp_ex_ep=2", ["dp_ex_ep"]),
], ids=["ep-does-not-divide-experts", "ep-does-not-divide-dp-tp", "dp_ex_ep-given"])
def test_bad_expert_parallelism_exits_2(mesh, words, tmp_path, reshardfs_bin):
    for src in (HF_FX, MF_FX):
        r = q3t.run_bin(["plan", src, "--mesh", mesh])
        assert r.code == 2, f"{src.name} --mesh {mesh}: exit {r.code}\n{r}"
        for w in words:
            assert w in r.stderr, f"{src.name} --mesh {mesh}: {w!r} not in {r.stderr}"


# ===========================================================================
# script side (run in subprocesses)
# ===========================================================================


def load_via_transformers(folder, out_npz) -> dict:
    import mountutil

    p = mountutil.run([PY, SELF, "load", folder, out_npz], timeout=300)
    assert p.code == 0, f"transformers could not load {folder}:\n{p}"
    return dict(np.load(out_npz))


def _cmd_load(folder, out):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM", type(model)
    problems = [f"{k}: {v}" for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                   "mismatched_keys")]
    res = {"info": np.frombuffer(json.dumps(problems).encode(), dtype=np.uint8)}
    for n, p in model.state_dict().items():
        res["param:" + n] = p.detach().to(torch.bfloat16).view(torch.int16).numpy().copy()
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits
    res["logits"] = logits.to(torch.bfloat16).view(torch.int16).numpy().copy()
    np.savez(out, **res)


if __name__ == "__main__":
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd, *rest = sys.argv[1:]
    {"load": _cmd_load}[cmd](*rest)
