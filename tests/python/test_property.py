"""Seeded random checkpoints and targets: every exported tensor must equal numpy slicing of
the full tensor with the target layout (computed by ckpt's independent layout math).

  RESHARDFS_PROP_CASES  number of random cases (default 150)
  RESHARDFS_PROP_SEED   base seed (default 20250601); case i uses seed base+i
Re-run one case:  pytest tests/python/test_property.py -k 'seed=20250642'
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import Param, Target, make_layout

N_CASES = int(os.environ.get("RESHARDFS_PROP_CASES", "150"))
BASE_SEED = int(os.environ.get("RESHARDFS_PROP_SEED", "20250601"))

DTYPES = ["F32", "BF16", "F16", "I64", "U8"] * 3 + ["I32", "F64", "BOOL"]
ALIAS_STYLES = [["dp", "tp", "cp"], ["a", "b", "c"], ["dp", "cp", "tp"]]
AXIS_SIZES = [1, 2, 3, 4]
MAX_STAGE = 16  # ranks per stage, keeps the number of files small
PREFIXES = [None, "gpt", "CKP", "llama-7b"]
LAYER_SUFFIXES = [
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
    "input_layernorm.weight",
    "mlp.router.expert_bias",
]


# ---------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------


def rand_array(rng, dtype, shape):
    """Random bits (NaNs included for floats): the comparison is on bytes."""
    dt = ckpt.NP_DTYPES[dtype]
    n = math.prod(shape) * dt.itemsize
    if dtype == "BOOL":
        return rng.integers(0, 2, shape, dtype=np.uint8).astype(bool)
    return np.frombuffer(rng.integers(0, 256, n, dtype=np.uint8).tobytes(), dtype=dt).reshape(shape).copy()


def rand_shape(rng):
    r = rng.random()
    if r < 0.08:
        return []  # scalar
    if r < 0.16:
        nd = int(rng.integers(1, 3))
        shape = [int(rng.choice([12, 24])) for _ in range(nd)]
        shape[int(rng.integers(nd))] = 0  # empty
        return shape
    nd = int(rng.integers(1, 4))
    sizes = {1: [12, 24, 36, 48], 2: [12, 24, 36], 3: [12, 24]}[nd]
    return [int(rng.choice(sizes)) for _ in range(nd)]


def rand_device_matrix(rng):
    while True:
        dm = [int(rng.choice(AXIS_SIZES)) for _ in range(int(rng.integers(1, 4)))]
        if math.prod(dm) <= MAX_STAGE:
            return dm


def alt_device_matrix(rng, dm):
    """Another device matrix with the same number of ranks (permuted, a 4 split, two 2s merged)."""
    dm = list(dm)
    r = rng.random()
    if r < 0.4 and 4 in dm and len(dm) < 3:
        j = dm.index(4)
        return dm[:j] + [2, 2] + dm[j + 1 :]
    if r < 0.6 and dm.count(2) >= 2:
        i = dm.index(2)
        j = dm.index(2, i + 1)
        return [n for k, n in enumerate(dm) if k not in (i, j)] + [4]
    return [int(x) for x in rng.permutation(dm)]


def rand_tensor_map(rng, ndim, ndev):
    free = [int(a) for a in rng.permutation(ndev)]
    tm = []
    for _ in range(ndim):
        r = rng.random()
        if r < 0.35 or not free:
            tm.append(-1)
        elif r < 0.8 or len(free) < 2:
            tm.append(ndev - 1 - free.pop())
        else:
            k = 3 if len(free) >= 3 and rng.random() < 0.3 else 2
            tm.append([ndev - 1 - free.pop() for _ in range(k)])
    return tm


def rand_layout(rng, shape, dm, alias, rank_list, p_null):
    if rng.random() < p_null:
        return None
    for _ in range(30):
        lay = make_layout(dm, rand_tensor_map(rng, len(shape), len(dm)), alias, rank_list)
        if ckpt.divides(lay, shape):
            return lay
    return make_layout(dm, [-1] * len(shape), alias, rank_list)


def stage_rank_lists(rng, S, P, p_perm, p_interleave=0.0):
    out = []
    interleave = rng.random() < p_interleave
    for s in range(P):
        ranks = list(range(s, S * P, P)) if interleave else list(range(s * S, (s + 1) * S))
        if rng.random() < p_perm:
            ranks = [int(x) for x in rng.permutation(ranks)]
        out.append(ranks)
    return out


@dataclass
class Source:
    params: list
    S: int
    P: int
    L: int
    dm: list
    alias: list
    prefix: object
    remove_redundancy: bool
    has_opt: bool
    rank_group: bool = True
    mixed_dm: bool = False  # some layouts use another device matrix of the same size
    tracker_newline: bool = False

    def describe(self):
        lines = [
            f"source: device_matrix {self.dm} alias {self.alias} stages {self.P} layers {self.L} "
            f"prefix {self.prefix!r} remove_redundancy {self.remove_redundancy} opt {self.has_opt} "
            f"rank_group {self.rank_group} mixed_dm {self.mixed_dm}"
        ]
        for p in self.params:
            lay = p.layout and (p.layout["device_matrix"], p.layout["tensor_map"], p.layout["rank_list"])
            whole = " (files hold it whole)" if p.store_whole else ""
            lines.append(f"  {p.kind:5} {p.name} {p.dtype} {p.shape} stage {p.stage} layout {lay}{whole}")
        return "\n".join(lines)


def gen_source(rng) -> Source:
    dm = rand_device_matrix(rng)
    alias = ALIAS_STYLES[int(rng.integers(len(ALIAS_STYLES)))][: len(dm)]
    S = math.prod(dm)
    P = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    many_layers = rng.random() < 0.1
    L = int(rng.integers(max(P, 10), 13)) if many_layers else int(rng.integers(P, 5))
    ranks = stage_rank_lists(rng, S, P, 0.15)
    lower = rng.random() < 0.3
    names = []
    if rng.random() < 0.7:
        names.append(("embedding.word_embeddings.weight", 0))
    for i in range(L):
        k = 1 if many_layers else int(rng.integers(1, 3))
        for suf in rng.choice(LAYER_SUFFIXES, k, replace=False):
            names.append((f"decoder.layers.{i}.{suf}", i * P // L))
    if rng.random() < 0.15:
        j = int(rng.integers(L))
        names.append((f"decoder.layers.{j}.it's_gate", j * P // L))  # shard id in double quotes
    if rng.random() < 0.5:
        names.append(("decoder.final_layernorm.weight", P - 1))
    if rng.random() < 0.5:
        names.append(("output_layer.weight", P - 1))
    if rng.random() < 0.3:
        names.append(("rotary_scale", int(rng.integers(P))))  # a non-layer tensor on any stage
    if rng.random() < 0.08:  # Python repr escapes in the shard id
        names.append((str(rng.choice(["a'b\"c.weight", "back\\slash.weight", "caf\u00e9.weight"])), 0))
    has_opt = rng.random() < 0.5
    mixed_dm = has_opt and rng.random() < 0.2
    params = []
    for name, st in names:
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        shape = rand_shape(rng)
        lay = rand_layout(rng, shape, dm, alias, ranks[st], 0.1 if shape else 0.4)
        ms = ckpt.MS_DTYPES[dtype].lower() if lower else None
        params.append(Param(name, dtype, rand_array(rng, dtype, shape), lay, st, "model", ms,
                            store_whole=rng.random() < 0.08))
        if has_opt and rng.random() < 0.85:  # else: a frozen parameter without optimizer state
            if mixed_dm:
                odm = alt_device_matrix(rng, dm)
                olay = rand_layout(rng, shape, odm, (ALIAS_STYLES[1] + ["d"])[: len(odm)], ranks[st], 0.1)
            else:
                olay = lay if rng.random() < 0.7 else rand_layout(rng, shape, dm, alias, ranks[st], 0.1)
            for pre in ("adam_m.", "adam_v."):
                params.append(Param(pre + name, "F32", rand_array(rng, "F32", shape), olay, st, "opt"))
    if has_opt and rng.random() < 0.3:
        params.append(Param("global_step", "I64", rand_array(rng, "I64", [1]), None, 0, "opt"))
    if all(p.layout is None for p in params):
        p = params[0]
        p.layout = make_layout(dm, [-1] * len(p.shape), alias, ranks[p.stage])
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    return Source(params, S, P, L, dm, alias, prefix, rng.random() < 0.3, has_opt,
                  rank_group=rng.random() < 0.8, mixed_dm=mixed_dm, tracker_newline=rng.random() < 0.2)


def gen_mesh(rng, src: Source):
    layouts = [p for p in src.params if p.layout is not None]
    for _ in range(60):
        k = int(rng.integers(1, len(src.alias) + 1))
        chosen = set(rng.choice(src.alias, k, replace=False).tolist())
        mesh = {a: int(rng.choice(AXIS_SIZES)) for a in src.alias if a in chosen}
        dm = [mesh.get(a, n) for a, n in zip(src.alias, src.dm)]
        if math.prod(dm) > MAX_STAGE:
            continue
        if all(ckpt.divides(dict(p.layout, device_matrix=dm), p.shape) for p in layouts):
            return mesh
    return {src.alias[0]: src.dm[0]}


def gen_strategy(rng, src: Source) -> Target:
    dm = rand_device_matrix(rng)
    alias = ALIAS_STYLES[int(rng.integers(len(ALIAS_STYLES)))][: len(dm)]
    S = math.prod(dm)
    model = [p for p in src.params if p.kind == "model"]
    P = min(int(rng.integers(1, 4)), len(model))
    ranks = stage_rank_lists(rng, S, P, 0.3, p_interleave=0.2)
    per_tensor_dm = rng.random() < 0.3
    stage = {p.name: int(rng.integers(P)) for p in model}
    for s, p in zip(rng.permutation(P), model):  # every stage gets a tensor
        stage[p.name] = int(s)
    tparams = []
    for p in src.params:
        base = p.name.split(".", 1)[1] if p.name.startswith(("adam_m.", "adam_v.")) else p.name
        st = stage.get(base, 0)
        tdm, talias = dm, alias
        if per_tensor_dm:
            tdm = alt_device_matrix(rng, dm)
            talias = (ALIAS_STYLES[1] + ["d"])[: len(tdm)]
        lay = rand_layout(rng, p.shape, tdm, talias, ranks[st], 0.0)
        tparams.append(Param(p.name, p.dtype, p.array, lay, st, p.kind))
    layouts = {p.name: p.layout for p in tparams}
    if rng.random() < 0.5:
        doc, _ = ckpt.build_metadata(tparams, S, S * P)  # a target job's metadata.json
    else:
        doc = layouts
    return Target("strategy", strategy=layouts, strategy_doc=doc)


def gen_target(rng, src: Source) -> Target:
    r = rng.random()
    if src.mixed_dm and r < 0.5:
        r = 0.5 + r  # --mesh is undefined for mixed device matrices: pp / unshard / strategy
    if r < 0.35:
        return Target("mesh", mesh=gen_mesh(rng, src))
    if r < 0.5:
        pp = int(rng.integers(1, min(src.L, 4) + 1))
        return Target("mesh", mesh=gen_mesh(rng, src), pp=pp, pp_offset=ckpt.pp_offset_for(src.L, pp))
    if r < 0.65:
        pp = int(rng.integers(1, min(src.L, 4) + 1))
        return Target("pp", pp=pp, pp_offset=ckpt.pp_offset_for(src.L, pp))
    if r < 0.75:
        return Target("unshard")
    return gen_strategy(rng, src)


def write_source(rng, src: Source, root: Path, iterations):
    """Write src at each iteration in `iterations` (fresh tensor values and save options after
    the first); the tracker names the last one, or a random one when there are several."""
    per_iter = {}
    for n, it in enumerate(iterations):
        params = src.params
        rr, rg = src.remove_redundancy, src.rank_group
        if n:
            params = [Param(p.name, p.dtype, rand_array(rng, p.dtype, p.shape), p.layout, p.stage, p.kind,
                            p.ms_dtype, rng.random() < 0.08) for p in src.params]
            rr, rg = rng.random() < 0.5, rng.random() < 0.5
        common = dict(ckpt.DEFAULT_COMMON, step_num=it, global_step=it)
        folder = root / ckpt.iteration_dir_name(it)
        ckpt.write_iteration(folder, params, src.S, src.P, src.prefix, rr, rng, common, rank_group=rg)
        per_iter[it] = (folder, params)
    latest = iterations[-1] if len(iterations) == 1 else int(rng.choice(iterations))
    ckpt.write_tracker(root, latest, src.tracker_newline)
    return per_iter, latest


# ---------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------


def run_case(seed, tmp: Path, exporter, iterations=None):
    rng = np.random.default_rng(seed)
    src = gen_source(rng)
    target = gen_target(rng, src)
    if iterations is None:
        iterations = [int(rng.integers(1, 10**6))]
    use_root = len(iterations) > 1 or rng.random() < 0.5
    root = tmp / "src"
    per_iter, latest = write_source(rng, src, root, iterations)
    src_path = root if use_root else per_iter[latest][0]
    dest = tmp / "out"
    targs = target.args(tmp)
    context = (
        f"seed={seed}  (RESHARDFS_PROP_SEED={seed} RESHARDFS_PROP_CASES=1 reproduces it)\n"
        f"target: {' '.join(targs)}\n{src.describe()}\n"
    )
    exps = {it: ckpt.expected_for(params, src.S, src.P, target) for it, (_, params) in per_iter.items()}
    run = exporter(src_path, dest, targs, per_iter, exps, src.prefix)
    if run is not None:
        context = f"{context}{run}\n"
        assert run.code == 0, context
    problems = []
    if use_root:
        want = {ckpt.TRACKER} | {ckpt.iteration_dir_name(it) for it in iterations}
        if set(os.listdir(dest)) != want:
            problems.append(f"{dest}: holds {sorted(os.listdir(dest))}, expected {sorted(want)}")
        elif (dest / ckpt.TRACKER).read_bytes() != (root / ckpt.TRACKER).read_bytes():
            problems.append("tracker not identical")
        outs = {it: dest / ckpt.iteration_dir_name(it) for it in iterations}
    else:
        outs = {latest: dest}
    if not problems:
        for it, out in outs.items():
            problems += [f"iteration {it}: {p}" for p in
                         ckpt.check_export_iteration(out, per_iter[it][0], exps[it], src.prefix)]
    assert not problems, context + "\n".join(problems[:40])
    if run is not None and seed % 4 == 0:  # inspect / plan agree the input is fine
        for args in (["inspect", src_path, "--json"], ["plan", src_path, *targs, "--json"]):
            r = ckpt.run_cli(args)
            assert r.code == 0, f"{context}{r}"
            json.loads(r.stdout)
    return src, target


def cli_exporter(src_path, dest, targs, per_iter, exps, prefix):
    return ckpt.export(src_path, dest, targs)


def reference_exporter(src_path, dest, targs, per_iter, exps, prefix):
    """The Python reference's own export (self-test of generator + verifier)."""
    root_mode = (Path(src_path) / ckpt.TRACKER).exists()
    for it, (folder, _) in per_iter.items():
        if not root_mode and folder != Path(src_path):
            continue
        out = dest / ckpt.iteration_dir_name(it) if root_mode else dest
        ckpt.reference_export(folder, out, exps[it], prefix)
    if root_mode:
        (dest / ckpt.TRACKER).write_bytes((Path(src_path) / ckpt.TRACKER).read_bytes())
    return None


SEEDS = [BASE_SEED + i for i in range(N_CASES)]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed={s}")
def test_random_export(seed, tmp_path, reshardfs_bin):
    run_case(seed, tmp_path, cli_exporter)


def test_root_with_two_iterations(tmp_path, reshardfs_bin):
    for seed in (BASE_SEED + 10**6, BASE_SEED + 10**6 + 1):
        run_case(seed, tmp_path / str(seed), cli_exporter, iterations=[10, 20])


@pytest.mark.parametrize("seed", SEEDS[:12], ids=lambda s: f"seed={s}")
def test_reference_pipeline(seed, tmp_path):
    """No binary: the Python reference exporter passes the same verification (guards the
    generator and the verifier themselves)."""
    run_case(seed, tmp_path, reference_exporter)


def test_reference_verifier_catches_errors(tmp_path):
    """The verifier must notice a wrong slice, a missing tensor and a bad header pad."""
    seed = BASE_SEED

    def corrupt(kind):
        def exporter(src_path, dest, targs, per_iter, exps, prefix):
            reference_exporter(src_path, dest, targs, per_iter, exps, prefix)
            files = sorted(dest.rglob("*model-0000000-*.safetensors"))
            sf = ckpt.read_safetensors(files[0])
            tensors = dict(sf.tensors)
            name = max(tensors, key=lambda n: tensors[n][1].size)
            assert tensors[name][1].size, "pick a seed with a non-empty tensor"
            if kind == "bytes":
                dt, a = tensors[name]
                b = bytearray(a.tobytes())
                b[0] ^= 1
                tensors[name] = (dt, np.frombuffer(bytes(b), a.dtype).reshape(a.shape))
                ckpt.write_safetensors(files[0], tensors)
            elif kind == "missing":
                del tensors[name]
                ckpt.write_safetensors(files[0], tensors)
            else:
                raw = files[0].read_bytes()
                n = int.from_bytes(raw[:8], "little")
                h = raw[8 : 8 + n].rstrip(b" ")
                h += b" " * ((-len(h) % 8) + 1)
                files[0].write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n :])
        return exporter

    for kind in ("bytes", "missing", "pad"):
        with pytest.raises(AssertionError):
            run_case(seed, tmp_path / kind, corrupt(kind))
