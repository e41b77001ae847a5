#!/usr/bin/env python3
"""Writes a synthetic Checkpoint 2.0 of a GPT-shaped model (stdlib only).

Used by the benchmarks and the planning-scale check: e.g. a 70B-shaped
checkpoint (80 layers, hidden 8192, tp=8, pp=8, optimizer states) as sparse
files costs no disk, yet has exactly the headers, metadata.json and file sizes
MindSpore Transformers would write (docs/FORMAT.md). With --fill random the data
is real, for byte-for-byte checks and throughput runs.

    scripts/synth_checkpoint.py OUT --layers 80 --hidden 8192 --ffn 28672 \
        --vocab 128256 --kv 1024 --tp 8 --pp 8 --opt --fill sparse
"""

import argparse
import json
import os
import struct
import zlib

DTYPES = {"BF16": (2, "BFloat16"), "F16": (2, "Float16"), "F32": (4, "Float32")}


def params(a):
    """(name, shape, split_dim or None, stage) per parameter, Megatron names.

    --split megatron splits qkv/fc1/embeddings on dimension 0 and proj/fc2 on
    dimension 1, as Megatron does; `row` splits every matrix on dimension 0
    (slices are contiguous runs), `col` on dimension 1 (slices are strided
    rows) - the two extremes a reshard meets.
    """
    h, L = a.hidden, a.layers

    def d(natural):
        return {"megatron": natural, "row": 0, "col": 1}[a.split]

    out = [("embedding.word_embeddings.weight", [a.vocab, h], d(0), 0)]
    for i in range(L):
        stage = i * a.pp // L
        p = f"decoder.layers.{i}."
        out += [
            (p + "input_layernorm.weight", [h], None, stage),
            (p + "self_attention.linear_qkv.weight", [h + 2 * a.kv, h], d(0), stage),
            (p + "self_attention.linear_proj.weight", [h, h], d(1), stage),
            (p + "pre_mlp_layernorm.weight", [h], None, stage),
            (p + "mlp.linear_fc1.weight", [2 * a.ffn, h], d(0), stage),
            (p + "mlp.linear_fc2.weight", [h, a.ffn], d(1), stage),
        ]
    out += [
        ("decoder.final_layernorm.weight", [h], None, a.pp - 1),
        ("output_layer.weight", [a.vocab, h], d(0), a.pp - 1),
    ]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=None, help="default: 4 * hidden")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--kv", type=int, default=None, help="K and V width (GQA); default: hidden")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dtype", default="BF16", choices=sorted(DTYPES))
    ap.add_argument("--opt", action="store_true", help="also write adam_m/adam_v (F32) in opt files")
    ap.add_argument("--fill", default="random", choices=["random", "sparse", "zero"])
    ap.add_argument("--split", default="megatron", choices=["megatron", "row", "col"],
                    help="which dimension matrices are split on (see params())")
    ap.add_argument("--prefix", default="synth")
    ap.add_argument("--iteration", type=int, default=1)
    a = ap.parse_args()
    a.ffn = a.ffn or 4 * a.hidden
    a.kv = a.kv if a.kv is not None else a.hidden

    it_dir = os.path.join(a.out, f"iteration_{a.iteration:08d}")
    os.makedirs(it_dir, exist_ok=True)
    S = a.dp * a.tp
    world = S * a.pp
    dm, alias = [a.dp, a.tp], ["dp", "tp"]

    # tensors[rank][kind] = list of (name, dtype, local shape)
    tensors = [{"model": [], "opt": []} for _ in range(world)]
    sdm, storage = {}, {"model": [], "opt": []}
    for name, shape, split, stage in params(a):
        variants = [(name, a.dtype, "model")]
        if a.opt:
            variants += [(f"adam_m.{name}", "F32", "opt"), (f"adam_v.{name}", "F32", "opt")]
        for tname, dtype, kind in variants:
            frag = [a.tp if d == split else 1 for d in range(len(shape))]
            local = [s // f for s, f in zip(shape, frag)]
            ranks = list(range(stage * S, (stage + 1) * S))
            tmap = [0 if d == split else -1 for d in range(len(shape))]
            replica = [r // a.tp if split is not None else r for r in range(S)]
            sdm[tname] = {
                "properties": {"dtype": DTYPES[dtype][1], "replica_id": replica,
                               "allow_shape_mismatch": False, "allow_to_save": True},
                "global_shape": shape,
                "axis_fragmentations": frag,
                "layout": {"device_matrix": dm, "tensor_map": tmap, "interleaved_parallel": False,
                           "alias_name": alias, "rank_list": ranks},
                "chunk": [{"global_offset": [k], "local_shape": local} for k in range(a.tp if split is not None else 1)],
            }
            holders = {}
            for pos, r in enumerate(ranks):
                k = pos % a.tp if split is not None else 0
                holders.setdefault(k, []).append(r)
                tensors[r][kind].append((tname, dtype, local, k))
            for k, group in holders.items():
                storage[kind].append((min(group), len(storage[kind]), tname, k, group))

    def fname(kind, r):
        return f"{a.prefix}-{kind}-{r:07d}-{world:07d}.safetensors"

    kinds = ["model", "opt"] if a.opt else ["model"]
    chunk = os.urandom(1 << 20) if a.fill == "random" else bytes(1 << 20)
    for r in range(world):
        for kind in kinds:
            items = sorted(tensors[r][kind])
            header, off = {"__metadata__": {"format": "ms"}}, 0
            spans = []
            for tname, dtype, local, k in items:
                n = DTYPES[dtype][0]
                for s in local:
                    n *= s
                header[tname] = {"dtype": dtype, "shape": local, "data_offsets": [off, off + n]}
                spans.append((zlib.crc32(f"{tname}:{k}".encode()), n))
                off += n
            hj = json.dumps(header, separators=(",", ":")).encode()
            hj += b" " * (-len(hj) % 8)
            with open(os.path.join(it_dir, fname(kind, r)), "wb") as f:
                f.write(struct.pack("<Q", len(hj)) + hj)
                if a.fill == "sparse":
                    f.truncate(8 + len(hj) + off)
                else:
                    # Every copy of a slice (data-parallel replicas, a norm
                    # on every tp rank) holds the same bytes, as in a real
                    # save: its bytes depend on its name and index only.
                    for seed, left in spans:
                        i = seed
                        while left:
                            # Rotate the random block per write so slices differ.
                            n = min(left, len(chunk))
                            s = (i * 4099) % len(chunk)
                            f.write((chunk[s:] + chunk[:s])[:n])
                            left -= n
                            i += 1

    sd = {}
    for kind in kinds:
        for _, _, tname, k, group in sorted(storage[kind], key=lambda e: e[:2]):
            sd[f"('{tname}', ({k},))"] = [
                {"file_name": fname(kind, r), "storage_rank": r, "rank_group": group} for r in group
            ]
    with open(os.path.join(it_dir, "metadata.json"), "w") as f:
        json.dump({"state_dict_metadata": sdm, "storage_data": sd}, f, separators=(",", ":"))
    with open(os.path.join(it_dir, "common.json"), "w") as f:
        json.dump({"epoch_num": 1, "step_num": a.iteration, "global_step": a.iteration, "loss_scale": 1.0,
                   "global_batch_size": 32, "consumed_samples": 32 * a.iteration, "ckpt_status": 0}, f, indent=4)
    with open(os.path.join(a.out, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(a.iteration))


if __name__ == "__main__":
    main()
