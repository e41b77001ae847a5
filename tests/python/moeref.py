"""An independent reference for the Qwen3-MoE bridge: the name map, the stacked and transposed
experts, and MindSpore Transformers' layouts for a strategy with expert parallelism, in numpy,
written from tests/fixtures/README.md ("Qwen3-MoE") and checked against the fixtures MindSpore
Transformers and transformers wrote (test_qwen3_moe.py part A), never against reshardfs.

Tensors are in storage form (bf16 as its uint16 bits), as qwen3ref carries them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import qwen3ref as q3

_LAYER_RE = re.compile(r"^(model|decoder)\.layers\.(\d+)\.(.+)$")
EXPERT_ALIASES = ["dp_ex_ep", "ep"]


@dataclass(frozen=True)
class Dims:
    base: q3.Dims
    experts: int
    moe_intermediate: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Dims":
        cfg = dict(cfg)
        cfg.setdefault("intermediate_size", 0)
        e = cfg.get("num_experts", cfg.get("num_local_experts"))
        return cls(q3.Dims.from_config(cfg), int(e), int(cfg["moe_intermediate_size"]))

    @classmethod
    def from_folder(cls, folder) -> "Dims":
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))


# ---------------------------------------------------------------------------
# the map
# ---------------------------------------------------------------------------

_ATTN = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
}


def stack_experts(gates, ups, downs):
    """weight1 [E*H, 2F]: rows J*H..J*H+H are [gate_J^T | up_J^T]; weight2 [E*F, H]: rows J*F.. are
    down_J^T."""
    w1 = np.concatenate([np.concatenate([g.T, u.T], axis=1) for g, u in zip(gates, ups)], axis=0)
    w2 = np.concatenate([dn.T for dn in downs], axis=0)
    return np.ascontiguousarray(w1), np.ascontiguousarray(w2)


def unstack_experts(w1, w2, e: int):
    """The inverse: ([gate_J], [up_J], [down_J])."""
    h = w1.shape[0] // e
    f = w1.shape[1] // 2
    gates = [np.ascontiguousarray(w1[j * h:(j + 1) * h, :f].T) for j in range(e)]
    ups = [np.ascontiguousarray(w1[j * h:(j + 1) * h, f:].T) for j in range(e)]
    downs = [np.ascontiguousarray(w2[j * f:(j + 1) * f, :].T) for j in range(e)]
    return gates, ups, downs


def hf_to_mf(hf: dict, d: Dims) -> dict:
    """{hf name: array} -> {mf name: array} (model parameters)."""
    b = d.base
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if "lm_head.weight" in hf:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(b.layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for h, mf in _ATTN.items():
            out[m + mf] = hf[p + h]
        out[m + "self_attention.linear_qkv.weight"] = q3.fuse_qkv(
            hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"], hf[p + "self_attn.v_proj.weight"],
            b.heads, b.groups, b.head_dim)
        ex = [[hf[f"{p}mlp.experts.{j}.{w}_proj.weight"] for j in range(d.experts)] for w in ("gate", "up", "down")]
        out[m + "mlp.experts.weight1"], out[m + "mlp.experts.weight2"] = stack_experts(*ex)
    return out


def mf_to_hf(mf: dict, d: Dims) -> dict:
    """{mf name: array} (model parameters) -> {hf name: array}."""
    b = d.base
    out = {"model.embed_tokens.weight": mf["embedding.word_embeddings.weight"],
           "model.norm.weight": mf["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in mf:
        out["lm_head.weight"] = mf["output_layer.weight"]
    for i in range(b.layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for h, f in _ATTN.items():
            out[p + h] = mf[m + f]
        qs = q3.split_qkv(mf[m + "self_attention.linear_qkv.weight"], b.heads, b.groups, b.head_dim)
        for x, a in zip("qkv", qs):
            out[f"{p}self_attn.{x}_proj.weight"] = np.ascontiguousarray(a)
        g, u, dn = unstack_experts(mf[m + "mlp.experts.weight1"], mf[m + "mlp.experts.weight2"], d.experts)
        for j in range(d.experts):
            out[f"{p}mlp.experts.{j}.gate_proj.weight"] = g[j]
            out[f"{p}mlp.experts.{j}.up_proj.weight"] = u[j]
            out[f"{p}mlp.experts.{j}.down_proj.weight"] = dn[j]
    return out


# ---------------------------------------------------------------------------
# strategies with expert parallelism
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def stage_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def world(self) -> int:
        return self.stage_size * self.pp

    @property
    def dp_ex_ep(self) -> int:
        assert (self.dp * self.tp) % self.ep == 0, f"ep={self.ep} does not divide dp*tp"
        return self.stage_size // self.ep

    def dense(self) -> q3.Strategy:
        return q3.Strategy(self.dp, self.cp, self.tp, self.pp)


def is_expert(name: str) -> bool:
    base = name.split(".", 1)[1] if name.startswith(("adam_m.", "adam_v.")) else name
    return base.endswith((".mlp.experts.weight1", ".mlp.experts.weight2", ".mlp.router.weight"))


def base_name(name: str) -> str:
    return name.split(".", 1)[1] if name.startswith(("adam_m.", "adam_v.")) else name


def layout(name: str, shape, s: Strategy, layers: int) -> dict:
    """The layout MindSpore Transformers gives a tensor (optimizer states their parameter's)."""
    n = base_name(name)
    st = q3.stage_of(n, layers, s.pp)
    ranks = list(range(st * s.stage_size, (st + 1) * s.stage_size))
    if is_expert(n):
        tmap = [-1, -1] if n.endswith(".mlp.router.weight") else [0, -1]
        return {"device_matrix": [s.dp_ex_ep, s.ep], "tensor_map": tmap, "interleaved_parallel": False,
                "alias_name": list(EXPERT_ALIASES), "rank_list": ranks}
    return {"device_matrix": [s.dp, s.cp, s.tp], "tensor_map": q3.mf_layout(n, shape, s.tp),
            "interleaved_parallel": False, "alias_name": list(q3.ALIASES), "rank_list": ranks}


def _box(lay: dict, shape, pos: int):
    """The slice position `pos` of the rank list holds: row-major coordinates over the device
    matrix, each tensor dimension cut by the axis its tensor_map names (value v = axis
    len(dm)-1-v)."""
    dm = lay["device_matrix"]
    coords, r = [], pos
    for n in reversed(dm):
        coords.append(r % n)
        r //= n
    coords.reverse()
    out = []
    for dim, v in enumerate(lay["tensor_map"]):
        if v == -1:
            out.append(slice(None))
            continue
        a = len(dm) - 1 - v
        size = shape[dim] // dm[a]
        out.append(slice(coords[a] * size, (coords[a] + 1) * size))
    return tuple(out)


def rank_tensors(params: dict, s: Strategy, layers: int) -> dict[int, dict]:
    """{rank: {name: slice}}: what each rank of the strategy holds, for {name: array} (parameters
    and optimizer states alike)."""
    out = {r: {} for r in range(s.world)}
    for name, arr in params.items():
        lay = layout(name, arr.shape, s, layers)
        for pos, r in enumerate(lay["rank_list"]):
            out[r][name] = np.ascontiguousarray(arr[_box(lay, arr.shape, pos)])
    return out


def metadata(shapes: dict, s: Strategy, layers: int) -> dict:
    """{name: {global_shape, axis_fragmentations, layout, chunk}} as MindSpore Transformers writes
    them."""
    out = {}
    for name, shape in shapes.items():
        shape = list(shape)
        lay = layout(name, shape, s, layers)
        dm = lay["device_matrix"]
        frags = [1 if v == -1 else dm[len(dm) - 1 - v] for v in lay["tensor_map"]]
        local = [n // f for n, f in zip(shape, frags)]
        out[name] = {"global_shape": shape, "axis_fragmentations": frags, "layout": lay,
                     "chunk": [{"global_offset": [k], "local_shape": local} for k in range(math.prod(frags))]}
    return out
