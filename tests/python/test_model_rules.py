"""What a model map may assume, leave out or restate, for Qwen3 and Qwen3-MoE alike.

* A generated config.json (`--hf` on a MindSpore Transformers checkpoint, no `--hf-files`)
  assumes what the released models use, says so on stderr, and takes `--hf-config KEY=VALUE`;
  transformers itself reads it (the values it acts on, and the logits).
* A Hub tensor the map does not know refuses the view (exit 2, named) unless
  `--drop-unknown-tensors`; derived buffers (`rotary_emb.inv_freq`) go without a word.
* `tie_word_embeddings: true` with `lm_head.weight` stored: no `output_layer.weight`, as
  MindSpore Transformers' converter has it (its network has no output layer to load it into).
* `--dtype` on `--hf` restates a passed-through config.json's dtype, and nothing else in it.

References: the fixtures (transformers' folders, MindSpore Transformers' checkpoints and what its
converter writes), transformers run in a subprocess. Mounts are read only from subprocesses."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ckpt  # noqa: E402
import mountutil  # noqa: E402
import qwen3ref as q3  # noqa: E402
from ckpt import FIXTURES  # noqa: E402

PY = sys.executable
SELF = str(Path(__file__).resolve())
PROMPT = [[11, 7, 42, 90, 5, 88, 19, 56, 3, 64, 1, 49]]  # within both tiny vocabularies (96, 256)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass(frozen=True)
class Model:
    name: str
    hf: Path  # transformers' folder
    mf: Path  # the same weights as MindSpore Transformers saved them (an iteration)
    expected: Path  # what MindSpore Transformers' converter writes for `hf` under `args`
    args: tuple
    prefix: str
    unknown: str  # a tensor name the map does not know
    # What the fixture's own config.json holds where a generated one assumes otherwise.
    own: tuple

    def __str__(self):
        return self.name


MODELS = [
    Model("qwen3", FIXTURES / "qwen3-tiny-hf", FIXTURES / "qwen3-tiny-mf-tp2-pp2-f32" / "iteration_00001000",
          FIXTURES / "expected" / "qwen3-tiny-hf.dp=1,tp=2,pp=2", ("--mesh", "dp=1,tp=2", "--pp", "2"), "qwen3",
          "model.layers.0.self_attn.o_proj.bias", (("rope_theta", 10000.0), ("max_position_embeddings", 128))),
    Model("qwen3_moe", FIXTURES / "qwen3-moe-tiny-hf",
          FIXTURES / "qwen3-moe-tiny-mf-dp2-tp2-ep2-f32" / "iteration_00001000",
          FIXTURES / "expected" / "qwen3-moe-tiny-hf.dp=2,tp=2,ep=4", ("--mesh", "dp=2,tp=2,ep=4"), "qwen3_moe",
          "model.layers.0.mlp.shared_expert_gate.weight",
          (("rope_theta", 10000.0), ("max_position_embeddings", 128), ("num_experts_per_tok", 2))),
]
# What every released model of the family has where the class defaults differ.
RELEASED = {"qwen3": {"rope_theta": 1000000.0, "max_position_embeddings": 40960},
            "qwen3_moe": {"rope_theta": 1000000.0, "max_position_embeddings": 40960, "norm_topk_prob": True,
                          "num_experts_per_tok": 4}}  # top-8 as released, but the tiny model has 4 experts

params = pytest.mark.parametrize("m", MODELS, ids=str)


def run(args, timeout=180) -> ckpt.Run:
    return ckpt.run_cli(args, timeout=timeout)


def ok(r: ckpt.Run) -> ckpt.Run:
    assert r.code == 0, str(r)
    assert "panicked" not in r.stderr, str(r)
    return r


def hf_copy(m: Model, dest: Path, config=None, add=None) -> Path:
    """A writable copy of the model's folder, its config.json edited, tensors added, in one
    model.safetensors."""
    dest.mkdir(parents=True)
    cfg = json.loads((m.hf / "config.json").read_text())
    cfg.update(config or {})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    ts = dict(q3.read_hf_folder(m.hf))
    ts.update(add or {})
    ckpt.write_safetensors(dest / "model.safetensors", ts, metadata={"format": "pt"})
    return dest


def rank_tensors(folder: Path, prefix: str) -> dict:
    """{rank file: {name: (dtype, array)}} of a MindFormers view's model files."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(prefix + "-model-") and f.endswith(".safetensors"):
            out[f] = ckpt.read_safetensors(folder / f).tensors
    return out


def transformers_reads(folder, out_npz: Path, dtype="bfloat16") -> dict:
    p = mountutil.run([PY, SELF, "load", folder, out_npz, dtype], timeout=300)
    assert p.code == 0, f"transformers could not load {folder}:\n{p}"
    got = dict(np.load(out_npz))
    got["facts"] = json.loads(got["facts"].tobytes())
    return got


# --- a generated config.json ----------------------------------------------------------------


@pytest.mark.hf_stack
@params
def test_a_generated_config_assumes_the_released_models_and_says_so(m, tmp_path, reshardfs_bin):
    """No --hf-files: config.json is generated; what the tensors cannot tell is the released
    models' (not the class defaults), stderr names every assumed field, and transformers reads
    those values."""
    r = ok(ckpt.export(m.mf, tmp_path / "out", ["--hf", "--model", m.name, "--dtype", "bf16"]))
    assert "assumed as in the released" in r.stderr and "--hf-config KEY=VALUE" in r.stderr, str(r)
    for k, v in RELEASED[m.name].items():
        assert f"{k} = " in r.stderr, f"stderr does not say {k} was assumed:\n{r.stderr}"
    got = transformers_reads(tmp_path / "out", tmp_path / "gen.npz")
    facts = got["facts"]
    for k, v in RELEASED[m.name].items():
        assert facts[k] == v, f"transformers reads {k} = {facts[k]!r}, the released models' is {v!r}"
    assert facts["info"] == [], facts["info"]


@pytest.mark.hf_stack
@params
def test_hf_config_sets_fields_and_gives_the_original_logits(m, tmp_path, mounts):
    """The fixture's own values given with --hf-config (the tiny models use rope_theta 10000 and,
    for the MoE, top-2): transformers loading the mount gives the original folder's weights and
    logits bit for bit, and stderr says what was set."""
    want = transformers_reads(m.hf, tmp_path / "orig.npz")
    sets = []
    for k, v in m.own:
        sets += ["--hf-config", f"{k}={json.dumps(v)}"]
    args = ["--hf", "--model", m.name, "--dtype", "bf16"] + sets
    r = ok(run(["plan", m.mf] + args))
    assert "set by --hf-config: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in m.own) in r.stdout, r.stdout
    mt = mounts()
    mt.start_ok(m.mf, args)
    got = transformers_reads(mt.mnt, tmp_path / "set.npz")
    cfg = json.loads(mountutil.read_text(mt.path("config.json")))
    mt.cleanup()
    for k, v in m.own:
        assert cfg[k] == v and got["facts"][k] == v, (k, cfg[k], got["facts"][k])
    assert got["facts"]["info"] == [], got["facts"]["info"]
    for k in want:
        if k != "facts":
            assert np.array_equal(got[k], want[k]), f"{k} differs with the model's own config values set"


def test_hf_config_may_not_contradict_the_tensors(tmp_path, reshardfs_bin):
    for m in MODELS:
        for field in ("hidden_size", "num_hidden_layers"):
            r = run(["plan", m.mf, "--hf", "--model", m.name, "--hf-config", f"{field}=8"])
            assert r.code == 2 and field in r.stderr and "tensors" in r.stderr, str(r)
        # A folder's own config.json is shown as it is: nothing to set.
        r = run(["plan", m.mf, "--hf", "--hf-files", m.hf, "--hf-config", "rope_theta=1"])
        assert r.code == 2 and "--hf-config" in r.stderr, str(r)


# --- tensors the map does not know ----------------------------------------------------------


def unknown_folder(m: Model, dest: Path) -> Path:
    return hf_copy(m, dest, add={m.unknown: ("BF16", np.arange(64, dtype="<u2")),
                                 "model.rotary_emb.inv_freq": ("F32", np.arange(4, dtype="<f4"))})


@params
def test_an_unknown_tensor_refuses_every_view_by_name(m, tmp_path, mounts):
    src = unknown_folder(m, tmp_path / "src")
    r = ok(run(["inspect", src]))  # inspect describes; it shows no view
    assert m.unknown in r.stdout and "inv_freq" in r.stdout, r.stdout
    for args in (["plan", src] + list(m.args), ["export", src, tmp_path / "out"] + list(m.args),
                 ["plan", src, "--hf"], ["export", src, tmp_path / "hf", "--hf", "--dtype", "f32"]):
        r = run(args)
        assert r.code == 2, f"exit {r.code}, want 2\n{r}"
        assert m.unknown in r.stderr and "--drop-unknown-tensors" in r.stderr, str(r)
        assert "inv_freq" not in r.stderr, f"a derived buffer named as unknown\n{r}"
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    mt = mounts()
    r = mt.start(src, list(m.args))
    assert r.code == 2 and m.unknown in r.stderr, str(r)
    assert not mt.is_mounted()


@params
def test_drop_unknown_tensors_leaves_them_out_and_says_so(m, tmp_path, mounts):
    """With the flag: the view is MindSpore Transformers' own files for the model's weights, and
    stderr lists what was left out (the unknown tensor; not the derived buffer)."""
    src = unknown_folder(m, tmp_path / "src")
    args = list(m.args) + ["--drop-unknown-tensors"]
    r = ok(ckpt.export(src, tmp_path / "out", args))
    assert m.unknown in r.stderr and "left out" in r.stderr and "inv_freq" not in r.stderr, str(r)
    mt = mounts()
    r = mt.start_ok(src, args)
    snap = tmp_path / "snap"
    snap.mkdir()
    for f in sorted(os.listdir(m.expected)):
        if f.endswith(".safetensors"):
            (snap / f).write_bytes(mountutil.read_bytes(mt.path(f)))
    mt.cleanup()
    for folder in (tmp_path / "out", snap):
        for f in sorted(os.listdir(m.expected)):
            if f.endswith(".safetensors"):
                assert (folder / f).read_bytes() == (m.expected / f).read_bytes(), f"{folder.name}/{f}"


# --- a tied model with its head stored -------------------------------------------------------


@params
def test_a_tied_model_with_a_stored_head_has_no_output_layer(m, tmp_path, reshardfs_bin):
    """tie_word_embeddings: true, lm_head.weight stored anyway: the view is the converter's for the
    tied model (its files less output_layer.weight), inspect says why the head is not shown."""
    src = hf_copy(m, tmp_path / "src", config={"tie_word_embeddings": True})
    r = ok(run(["inspect", src]))
    assert "lm_head.weight is stored but left out" in r.stdout and "tie_word_embeddings" in r.stdout, r.stdout
    out = tmp_path / "out"
    ok(ckpt.export(src, out, list(m.args)))
    got, want = rank_tensors(out, m.prefix), rank_tensors(m.expected, m.prefix)
    assert sorted(got) == sorted(want)
    for f in want:
        exp = {n: t for n, t in want[f].items() if n != "output_layer.weight"}
        assert sorted(got[f]) == sorted(exp), f"{f}: {sorted(set(got[f]) ^ set(exp))}"
        for n, (dt, a) in exp.items():
            assert got[f][n][0] == dt and got[f][n][1].tobytes() == a.tobytes(), f"{f}: {n}"
    meta = json.loads((out / "metadata.json").read_text())
    assert "output_layer.weight" not in meta["state_dict_metadata"]


# --- --dtype and a passed-through config.json ------------------------------------------------


@pytest.mark.hf_stack
@params
@pytest.mark.parametrize("src", ["hf-folder", "mf-with-hf-files"])
def test_dtype_reaches_a_passed_through_config(m, src, tmp_path, mounts):
    """--hf --dtype f32 with the model folder's config.json shown: it says float32 (every other
    byte as it was), so a plain from_pretrained (transformers 5 takes the config's dtype) loads
    float32 weights, equal to the bf16 originals widened."""
    source, extra = (m.hf, []) if src == "hf-folder" else (m.mf, ["--hf-files", m.hf])
    mt = mounts()
    mt.start_ok(source, ["--hf", "--dtype", "f32"] + extra)
    raw = mountutil.read_bytes(mt.path("config.json"))
    got = transformers_reads(mt.mnt, tmp_path / "f32.npz", dtype="none")
    mt.cleanup()
    orig = (m.hf / "config.json").read_bytes()
    assert raw == orig.replace(b'"dtype": "bfloat16"', b'"dtype": "float32"'), raw.decode()
    assert got["facts"]["param_dtypes"] == ["torch.float32"], got["facts"]
    want = transformers_reads(m.hf, tmp_path / "orig.npz", dtype="float32")
    for k in want:
        if k.startswith("param:"):
            assert np.array_equal(got[k], want[k]), f"{k} differs"


# --- run as a script (a subprocess, so that no test process holds a mount open) -------------


def _cmd_load(folder, out, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {} if dtype == "none" else {"dtype": getattr(torch, dtype)}
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kw)
    model.eval()
    cfg = AutoConfig.from_pretrained(folder)
    rope = getattr(cfg, "rope_parameters", None) or {}
    facts = {
        "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
        "max_position_embeddings": cfg.max_position_embeddings,
        "info": [f"{k}: {v}" for k, v in info.items()
                 if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")],
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }
    for k in ("norm_topk_prob", "num_experts_per_tok"):
        if hasattr(cfg, k):
            facts[k] = getattr(cfg, k)
    res = {"facts": np.frombuffer(json.dumps(facts).encode(), dtype=np.uint8)}
    for n, p in model.state_dict().items():
        res["param:" + n] = p.detach().float().numpy().copy()
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits
    res["logits"] = logits.float().numpy().copy()
    np.savez(out, **res)


if __name__ == "__main__":
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd, *rest = sys.argv[1:]
    {"load": _cmd_load}[cmd](*rest)
