#!/usr/bin/env python3
"""Write a synthetic Qwen3 Hugging Face folder of any shape.

    scripts/synth_qwen3.py OUT [--layers L] [--hidden H] [--intermediate I] [--heads N]
        [--groups G] [--head-dim D] [--vocab V] [--tied] [--dtype bf16|f16|f32]
        [--shards S] [--fill random|zeros|sparse] [--seed N]

OUT gets config.json (as transformers' Qwen3Config.save_pretrained lays it out, with the sizes
given), generation_config.json, and the weights: `model.safetensors` when --shards 1, else
`model-0000i-of-0000S.safetensors` + `model.safetensors.index.json` (the tensors cut in model
order into S shards of about equal size, as save_pretrained's greedy cut does).

--fill random: real random data (normal * 0.02, rounded to the dtype; seeded), written in
  blocks so a 2 GiB folder needs no 2 GiB buffer.
--fill zeros: zeros written to disk.
--fill sparse: each shard is its header and a hole (ftruncate): a Qwen3-32B-shaped folder
  (65 GB of bf16) costs a few KiB of disk and no time to write. Reads return zeros.

Presets: --preset tiny (the fixture's shape), --preset bench-2g (hidden 4096, ~2 GiB bf16),
--preset qwen3-32b (64 layers, hidden 5120, intermediate 25600, 64 heads in 8 groups,
head_dim 128, vocab 151936, 17 shards, sparse); Qwen3-MoE folders (128 experts per layer):
--preset moe-30b-layer (one Qwen3-30B-A3B-shaped layer, ~1.4 GiB bf16), --preset
qwen3-235b-a22b (Qwen3-235B-A22B's shape, 118 shards, sparse).

Importable: write_folder(out, shape, ...) and hf_tensor_shapes(shape) are used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

DTYPES = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4)}
TORCH_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}

PRESETS = {
    "tiny": dict(layers=2, hidden=64, intermediate=96, heads=4, groups=2, head_dim=16, vocab=256, shards=2),
    # 1.94 GiB in bf16: 4 layers of hidden 4096 (0.36 GiB each, intermediate 12288) + 0.5 GiB of
    # untied embeddings (vocab 32768)
    "bench-2g": dict(layers=4, hidden=4096, intermediate=12288, heads=32, groups=8, head_dim=128, vocab=32768,
                     shards=2),
    "qwen3-32b": dict(layers=64, hidden=5120, intermediate=25600, heads=64, groups=8, head_dim=128, vocab=151936,
                      shards=17, fill="sparse"),
    # Qwen3-MoE (`experts` set): one Qwen3-30B-A3B-shaped layer, ~1.4 GiB bf16 (128 experts of 768
    # at hidden 2048: 1.13 GiB; untied embeddings at vocab 32768: 0.25 GiB)
    "moe-30b-layer": dict(layers=1, hidden=2048, intermediate=6144, heads=32, groups=4, head_dim=128, vocab=32768,
                          experts=128, moe_intermediate=768, shards=2),
    # Qwen3-235B-A22B's shape, sparse: 94 layers x 128 experts x 3 = 36,096 expert tensors, 118 shards
    "qwen3-235b-a22b": dict(layers=94, hidden=4096, intermediate=12288, heads=64, groups=4, head_dim=128,
                            vocab=151936, experts=128, moe_intermediate=1536, shards=118, fill="sparse"),
}


def hf_tensor_shapes(s: dict) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor of a Qwen3ForCausalLM, in transformers' state_dict order."""
    h, hd = s["hidden"], s["head_dim"]
    out = [("model.embed_tokens.weight", [s["vocab"], h])]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", [s["heads"] * hd, h]),
            (p + "self_attn.k_proj.weight", [s["groups"] * hd, h]),
            (p + "self_attn.v_proj.weight", [s["groups"] * hd, h]),
            (p + "self_attn.o_proj.weight", [h, s["heads"] * hd]),
            (p + "self_attn.q_norm.weight", [hd]),
            (p + "self_attn.k_norm.weight", [hd]),
        ]
        if s.get("experts"):
            f = s["moe_intermediate"]
            out.append((p + "mlp.gate.weight", [s["experts"], h]))
            for j in range(s["experts"]):
                out += [(p + f"mlp.experts.{j}.gate_proj.weight", [f, h]),
                        (p + f"mlp.experts.{j}.up_proj.weight", [f, h]),
                        (p + f"mlp.experts.{j}.down_proj.weight", [h, f])]
        else:
            out += [
                (p + "mlp.gate_proj.weight", [s["intermediate"], h]),
                (p + "mlp.up_proj.weight", [s["intermediate"], h]),
                (p + "mlp.down_proj.weight", [h, s["intermediate"]]),
            ]
        out += [
            (p + "input_layernorm.weight", [h]),
            (p + "post_attention_layernorm.weight", [h]),
        ]
    out.append(("model.norm.weight", [h]))
    if not s.get("tied"):
        out.append(("lm_head.weight", [s["vocab"], h]))
    return out


def config_json(s: dict, dtype: str) -> dict:
    if s.get("experts"):
        cfg = config_json({k: v for k, v in s.items() if k not in ("experts", "moe_intermediate")}, dtype)
        cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=s["experts"],
                   moe_intermediate_size=s["moe_intermediate"], num_experts_per_tok=8, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
        return cfg
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "dtype": TORCH_NAMES[dtype],
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "max_position_embeddings": 4096,
        "max_window_layers": s["layers"],
        "model_type": "qwen3",
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["groups"],
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": bool(s.get("tied")),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": s["vocab"],
    }


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def _random_bytes(rng, n_elems: int, dtype: str) -> bytes:
    x = (rng.standard_normal(n_elems, dtype=np.float32) * np.float32(0.02))
    if dtype == "bf16":
        return _f32_to_bf16_bits(x).tobytes()
    if dtype == "f16":
        return x.astype("<f2").tobytes()
    return x.astype("<f4").tobytes()


def split_shards(sizes: list[int], shards: int) -> list[list[int]]:
    """Indices cut greedily into `shards` groups of about total/shards bytes each."""
    total = sum(sizes)
    target = total / shards
    groups, cur, acc = [], [], 0
    for i, n in enumerate(sizes):
        left_tensors = len(sizes) - i
        left_groups = shards - len(groups)
        if cur and (acc + n > target * 1.0001 and left_groups > 1) and left_tensors >= left_groups - 1:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(i)
        acc += n
    groups.append(cur)
    return groups


def write_folder(out, shape: dict, dtype: str = "bf16", shards: int = 1, fill: str = "random", seed: int = 0,
                 overrides: dict | None = None, extra: dict | None = None, block_elems: int = 1 << 24) -> dict:
    """Write the folder; returns {name: (dtype, shape)}. `overrides`: {name: np.ndarray in storage
    form} replaces generated data (and shape); `extra`: {name: (st_dtype, array)} adds tensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st_dtype, esize = DTYPES[dtype]
    overrides = overrides or {}
    extra = extra or {}
    tensors = [(n, list(overrides[n].shape) if n in overrides else shp, st_dtype, esize)
               for n, shp in hf_tensor_shapes(shape)]
    tensors += [(n, list(a.shape), d, a.dtype.itemsize) for n, (d, a) in extra.items()]
    sizes = [int(np.prod(shp, dtype=np.int64)) * es for _, shp, _, es in tensors]
    groups = split_shards(sizes, shards)
    rng = np.random.default_rng(seed)
    names = [t[0] for t in tensors]
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for fn, idx in zip(files, groups):
        header = {"__metadata__": {"format": "pt"}}
        off = 0
        for i in sorted(idx, key=lambda i: names[i]):
            n, shp, d, _ = tensors[i]
            header[n] = {"dtype": d, "shape": shp, "data_offsets": [off, off + sizes[i]]}
            off += sizes[i]
            weight_map[n] = fn
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        with open(out / fn, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            if fill == "sparse":
                f.truncate(8 + len(h) + off)
                continue
            for i in sorted(idx, key=lambda i: names[i]):
                n, shp, d, es = tensors[i]
                if n in overrides:
                    f.write(np.ascontiguousarray(overrides[n]).tobytes())
                    continue
                if n in extra:
                    f.write(np.ascontiguousarray(extra[n][1]).tobytes())
                    continue
                left = sizes[i] // es
                while left:
                    k = min(left, block_elems)
                    f.write(_random_bytes(rng, k, dtype) if fill == "random" else bytes(k * es))
                    left -= k
    total = sum(sizes)
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config_json(shape, dtype), indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True, "use_cache": True}, indent=2)
                                                + "\n")
    return {n: (d, shp) for n, shp, d, _ in tensors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS))
    for k in ("layers", "hidden", "intermediate", "heads", "groups", "head-dim", "vocab", "shards", "experts",
              "moe-intermediate"):
        ap.add_argument("--" + k, type=int)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--fill", choices=["random", "zeros", "sparse"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    s = dict(PRESETS["tiny"])
    if a.preset:
        s.update(PRESETS[a.preset])
    for k in ("layers", "hidden", "intermediate", "heads", "groups", "head_dim", "vocab", "shards", "experts",
              "moe_intermediate"):
        v = getattr(a, k)
        if v is not None:
            s[k] = v
    s["tied"] = a.tied
    fill = a.fill or s.pop("fill", "random")
    s.pop("fill", None)
    if s["heads"] % s["groups"]:
        ap.error(f"--heads {s['heads']} is not a multiple of --groups {s['groups']}")
    if os.path.exists(a.out) and os.listdir(a.out):
        ap.error(f"{a.out} exists and is not empty")
    shards = s.pop("shards")
    written = write_folder(a.out, s, a.dtype, shards, fill, a.seed)
    total = sum(int(np.prod(shp, dtype=np.int64)) * DTYPES[a.dtype][1] for _, shp in written.values())
    print(f"wrote {a.out}: {len(written)} tensors, {total / 2**30:.2f} GiB of {a.dtype} in {shards} shard(s), "
          f"fill {fill}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
