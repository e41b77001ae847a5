"""An independent numpy reference of the Hugging Face Qwen3 <-> MindSpore Transformers mapping.

Written from tests/fixtures/README.md (section "Qwen3") and checked against the fixtures that
transformers and MindSpore Transformers' own converter wrote (test_qwen3.py, the `ref_*`
tests), never against reshardfs. Pure numpy: no torch, no reshardfs code.

* names: hf_to_mf_name / mf_to_hf_names
* fused tensors: fuse_qkv / split_qkv (interleaved per key/value group), fuse_fc1 / split_fc1
  (gate and up interleaved row by row)
* whole models: hf_to_mf / mf_to_hf ({name: array}, arrays in their storage dtype, bf16 as
  uint16 bits)
* strategies: mf_layout (tensor_map per tensor for a dp x cp x tp device matrix), stage_of
  (pipeline placement), mf_rank_tensors (what each rank holds), mf_metadata (the
  state_dict_metadata entries: global_shape, axis_fragmentations, layout, chunk)
* casts: f32_to_bf16 (round to nearest even, NaN stays NaN), bf16_to_f32, cast (any of
  BF16/F16/F32 to any)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIASES = ["dp", "cp", "tp"]
MS_DTYPE = {"BF16": "BFloat16", "F16": "Float16", "F32": "Float32"}
STORAGE = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}

# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    groups: int  # num_key_value_heads
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Dims":
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                   cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim,
                   bool(cfg.get("tie_word_embeddings", False)))

    @classmethod
    def from_folder(cls, folder) -> "Dims":
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))

    def hf_shapes(self) -> dict[str, list[int]]:
        """Every tensor a Qwen3ForCausalLM checkpoint holds, with its shape."""
        h, hd = self.hidden, self.head_dim
        out = {"model.embed_tokens.weight": [self.vocab, h], "model.norm.weight": [h]}
        if not self.tied:
            out["lm_head.weight"] = [self.vocab, h]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out.update({
                p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h],
                p + "self_attn.q_proj.weight": [self.heads * hd, h],
                p + "self_attn.k_proj.weight": [self.groups * hd, h],
                p + "self_attn.v_proj.weight": [self.groups * hd, h],
                p + "self_attn.o_proj.weight": [h, self.heads * hd],
                p + "self_attn.q_norm.weight": [hd],
                p + "self_attn.k_norm.weight": [hd],
                p + "mlp.gate_proj.weight": [self.intermediate, h],
                p + "mlp.up_proj.weight": [self.intermediate, h],
                p + "mlp.down_proj.weight": [h, self.intermediate],
            })
        return out


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------

_SIMPLE = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "self_attn.q_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.k_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.v_proj.weight": "self_attention.linear_qkv.weight",
    "mlp.gate_proj.weight": "mlp.linear_fc1.weight",
    "mlp.up_proj.weight": "mlp.linear_fc1.weight",
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MF_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def hf_to_mf_name(name: str) -> str | None:
    """The MindFormers tensor an HF tensor goes into (q/k/v -> linear_qkv, gate/up ->
    linear_fc1), or None for a tensor the map does not know."""
    if name in _SIMPLE:
        return _SIMPLE[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"decoder.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def mf_to_hf_names(name: str) -> list[str]:
    """The HF tensors a MindFormers tensor holds, in fusion order."""
    for hf, mf in _SIMPLE.items():
        if mf == name:
            return [hf]
    m = _MF_LAYER_RE.match(name)
    if not m:
        raise KeyError(name)
    parts = [hf for hf, mf in _LAYER.items() if mf == m.group(2)]
    if not parts:
        raise KeyError(name)
    return [f"model.layers.{m.group(1)}.{p}" for p in parts]


# ---------------------------------------------------------------------------
# fused tensors
# ---------------------------------------------------------------------------


def fuse_qkv(q, k, v, heads: int, groups: int, head_dim: int) -> np.ndarray:
    """Rows: for each group g, its r = heads/groups query heads, then k head g, then v head g."""
    assert heads % groups == 0, (heads, groups)
    r = heads // groups
    rows = []
    for g in range(groups):
        rows.append(q[g * r * head_dim:(g + 1) * r * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    out = np.concatenate(rows, axis=0)
    assert out.shape[0] == (heads + 2 * groups) * head_dim
    return out


def split_qkv(qkv, heads: int, groups: int, head_dim: int):
    r = heads // groups
    per = (r + 2) * head_dim
    q, k, v = [], [], []
    for g in range(groups):
        blk = qkv[g * per:(g + 1) * per]
        q.append(blk[: r * head_dim])
        k.append(blk[r * head_dim:(r + 1) * head_dim])
        v.append(blk[(r + 1) * head_dim:])
    return np.concatenate(q), np.concatenate(k), np.concatenate(v)


def fuse_fc1(gate, up) -> np.ndarray:
    """fc1[2i] = gate[i], fc1[2i+1] = up[i]."""
    assert gate.shape == up.shape
    out = np.empty((2 * gate.shape[0],) + gate.shape[1:], dtype=gate.dtype)
    out[0::2] = gate
    out[1::2] = up
    return out


def split_fc1(fc1):
    return np.ascontiguousarray(fc1[0::2]), np.ascontiguousarray(fc1[1::2])


def qkv_row_source(d: Dims, row: int) -> tuple[str, int]:
    """Which HF tensor and row fused QKV row `row` comes from (a second, per-row statement of
    the same rule, used by the property test)."""
    r = d.heads // d.groups
    per = (r + 2) * d.head_dim
    g, off = divmod(row, per)
    if off < r * d.head_dim:
        return "q", g * r * d.head_dim + off
    if off < (r + 1) * d.head_dim:
        return "k", g * d.head_dim + off - r * d.head_dim
    return "v", g * d.head_dim + off - (r + 1) * d.head_dim


# ---------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------


def hf_to_mf(hf: dict, d: Dims) -> tuple[dict, list[str]]:
    """{hf name: array} -> ({mf name: array}, [hf names the map does not know])."""
    out, unknown = {}, []
    for name, arr in hf.items():
        if hf_to_mf_name(name) is None:
            unknown.append(name)
    for i in range(d.layers):
        p = f"model.layers.{i}."
        m = f"decoder.layers.{i}."
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"], hf[p + "self_attn.v_proj.weight"],
            d.heads, d.groups, d.head_dim)
        out[m + "mlp.linear_fc1.weight"] = fuse_fc1(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"])
    for name, arr in hf.items():
        mf = hf_to_mf_name(name)
        if mf is not None and len(mf_to_hf_names(mf)) == 1:
            out[mf] = np.ascontiguousarray(arr)
    return out, sorted(unknown)


def mf_to_hf(mf: dict, d: Dims) -> dict:
    """{mf name: array} (model parameters only) -> {hf name: array}."""
    out = {}
    for name, arr in mf.items():
        hfs = mf_to_hf_names(name)
        if len(hfs) == 1:
            out[hfs[0]] = np.ascontiguousarray(arr)
        elif name.endswith("linear_qkv.weight"):
            for n, a in zip(hfs, split_qkv(arr, d.heads, d.groups, d.head_dim)):
                out[n] = np.ascontiguousarray(a)
        else:
            for n, a in zip(hfs, split_fc1(arr)):
                out[n] = a
    return out


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------


def layer_of(name: str) -> int | None:
    m = _MF_LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def stage_of(name: str, layers: int, pp: int) -> int:
    """Layer i of L on stage i*pp//L; embedding first; final norm and output layer last."""
    i = layer_of(name)
    if i is not None:
        return i * pp // layers
    if name.startswith("embedding."):
        return 0
    return pp - 1


def mf_layout(name: str, shape, tp: int) -> list[int]:
    """tensor_map for the device matrix [dp, cp, tp] (value 0 = the tp axis)."""
    col = ("linear_qkv.weight", "linear_fc1.weight")
    if name == "output_layer.weight" or name.endswith(col):
        return [0, -1]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return [-1, 0]
    if name == "embedding.word_embeddings.weight":
        return [0, -1] if shape[0] % tp == 0 else [-1, -1]
    return [-1] * len(shape)


@dataclass(frozen=True)
class Strategy:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def stage_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def world(self) -> int:
        return self.stage_size * self.pp

    def tp_index(self, rank: int) -> int:
        """The device matrix [dp, cp, tp] is row major: tp is the fastest axis of a stage."""
        return (rank % self.stage_size) % self.tp


def _split_dim(tmap) -> int | None:
    return tmap.index(0) if 0 in tmap else None


def mf_rank_tensors(mf: dict, d: Dims, s: Strategy) -> dict[int, dict]:
    """{rank: {mf name: slice}}: what each rank of the strategy holds (every rank of a stage holds
    its slice of every tensor of the stage; no redundancy removal)."""
    out = {r: {} for r in range(s.world)}
    for name, arr in mf.items():
        st = stage_of(name, d.layers, s.pp)
        dim = _split_dim(mf_layout(name, arr.shape, s.tp))
        for r in range(st * s.stage_size, (st + 1) * s.stage_size):
            if dim is None:
                out[r][name] = arr
            else:
                n = arr.shape[dim]
                assert n % s.tp == 0, f"{name}: dimension {dim} ({n}) does not divide by tp={s.tp}"
                t = s.tp_index(r)
                sl = [slice(None)] * arr.ndim
                sl[dim] = slice(t * n // s.tp, (t + 1) * n // s.tp)
                out[r][name] = np.ascontiguousarray(arr[tuple(sl)])
    return out


def mf_metadata(mf_shapes: dict, d: Dims, s: Strategy) -> dict:
    """{mf name: {global_shape, axis_fragmentations, layout, chunk}} as MindFormers writes them."""
    out = {}
    for name, shape in mf_shapes.items():
        shape = list(shape)
        tmap = mf_layout(name, shape, s.tp)
        dim = _split_dim(tmap)
        frags = [s.tp if i == dim else 1 for i in range(len(shape))]
        st = stage_of(name, d.layers, s.pp)
        local = [n // f for n, f in zip(shape, frags)]
        out[name] = {
            "global_shape": shape,
            "axis_fragmentations": frags,
            "layout": {
                "device_matrix": [s.dp, s.cp, s.tp],
                "tensor_map": tmap,
                "interleaved_parallel": False,
                "alias_name": list(ALIASES),
                "rank_list": list(range(st * s.stage_size, (st + 1) * s.stage_size)),
            },
            "chunk": [{"global_offset": [k], "local_shape": local} for k in range(math.prod(frags))],
        }
    return out


def mf_file_name(prefix: str, rank: int, world: int, kind: str = "model") -> str:
    return f"{prefix}-{kind}-{rank:07d}-{world:07d}.safetensors"


# ---------------------------------------------------------------------------
# casts (numpy only; bf16 is carried as its uint16 bit pattern)
# ---------------------------------------------------------------------------


def f32_to_bf16(x) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even; NaN -> a quiet NaN of the same sign."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    quiet = ((u >> 16) | 0x0040).astype(np.uint16)
    return np.where(nan, quiet, rounded).astype("<u2")


def bf16_to_f32(b) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def is_nan_bf16(b) -> np.ndarray:
    b = np.asarray(b, dtype=np.uint16)
    return ((b & 0x7F80) == 0x7F80) & ((b & 0x007F) != 0)


def cast(arr, src: str, dst: str) -> np.ndarray:
    """Cast a tensor in storage form between BF16/F16/F32 (widening exact, narrowing one round
    to nearest even: the only intermediate, float32, holds every bf16 and f16 value exactly)."""
    if src == dst:
        return np.asarray(arr)
    f = bf16_to_f32(arr) if src == "BF16" else np.asarray(arr).astype(np.float32)
    if dst == "F32":
        return f.astype("<f4")
    if dst == "F16":
        with np.errstate(over="ignore"):
            return f.astype("<f2")
    return f32_to_bf16(f)


# ---------------------------------------------------------------------------
# reading folders (storage form: {name: (dtype, array)})
# ---------------------------------------------------------------------------


def read_hf_folder(folder) -> dict:
    """Every tensor of an HF folder (single file or index + shards), checked against the index."""
    import ckpt

    folder = Path(folder)
    idx = folder / "model.safetensors.index.json"
    out = {}
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        for fn in sorted(set(wm.values())):
            sf = ckpt.read_safetensors(folder / fn)
            for n, t in sf.tensors.items():
                assert wm.get(n) == fn, f"{fn}: {n} not mapped to it by the index"
                out[n] = t
        assert set(out) == set(wm), "index names tensors the files lack"
    else:
        out.update(ckpt.read_safetensors(folder / "model.safetensors").tensors)
    return out
