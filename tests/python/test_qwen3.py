"""The Hugging Face bridge: Qwen3 HF folders as MindFormers checkpoints and back.

References, all independent of reshardfs: the fixtures written by transformers and by MindSpore
Transformers' own converter (tests/fixtures/qwen3-*), qwen3ref.py (numpy), and transformers
itself (it builds, saves and loads the models; its logits are the check).

Part A (`test_ref_*`) checks the references against the fixtures and against torch: it needs no
binary and passes on its own. Part B runs reshardfs (export, mount, inspect, plan); a missing
feature fails with the command, its exit code and output, never a skip.

Mount rules as in test_mount.py: one guarded mount per use, every access to a mount from a
subprocess with a timeout (here: a copy of the mounted tree to a local folder, `cmp`, and
transformers loading the mount in this file run as a script).

Run as a script (always in a subprocess):
  build OUT SEED MAX_SHARD_SIZE       a tiny random Qwen3ForCausalLM saved by save_pretrained in bf16
  load DIR OUT.npz                    AutoModelForCausalLM.from_pretrained(DIR, dtype=bfloat16):
                                      every parameter and the logits on PROMPT, as raw bits, and
                                      the loading info (missing/unexpected/mismatched keys)
  vllm DIR OUT.npz                    vLLM's own loader on DIR: its file discovery
                                      (DefaultModelLoader._prepare_weights), its safetensors
                                      iterator and get_config; every tensor as raw bits
  copytree SRC DST                    copy every file under SRC except .reshardfs/ (a mount)
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "scripts"))

import ckpt  # noqa: E402
import qwen3ref as ref  # noqa: E402
import synth_qwen3  # noqa: E402
from ckpt import FIXTURES, TRACKER  # noqa: E402

HF_FX = FIXTURES / "qwen3-tiny-hf"
MF_FX = FIXTURES / "qwen3-tiny-mf-tp2-pp2-f32"
MF_IT = MF_FX / "iteration_00001000"
EXP_FX = FIXTURES / "expected" / "qwen3-tiny-hf.dp=1,tp=2,pp=2"
EXP_ARGS = ["--mesh", "dp=1,tp=2", "--pp", "2"]
EXP_STRATEGY = ref.Strategy(dp=1, cp=1, tp=2, pp=2)
LAYOUT_KEYS = ("global_shape", "axis_fragmentations", "layout", "chunk")
PROMPT = [[151, 7, 42, 300, 5, 88, 19, 256, 3, 64, 1, 499]]
HF_INDEX = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
PY = sys.executable
SELF = str(Path(__file__).resolve())


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def hf_tensors(folder) -> dict:
    """{name: (dtype, array)} of an HF folder, checked against its index."""
    return ref.read_hf_folder(folder)


def mf_model_params(it) -> dict:
    """{name: (dtype, array)} of a Checkpoint 2.0 iteration's model parameters, reassembled."""
    params, _, _ = ckpt.load_checkpoint(it)
    return {p.name: (p.dtype, p.array) for p in params if p.kind == "model"}


def hf_dims(folder=HF_FX) -> ref.Dims:
    return ref.Dims.from_folder(folder)


def ref_rank_files(hf: dict, d: ref.Dims, s: ref.Strategy, dtype=None) -> dict:
    """{file name: {mf name: (dtype, slice)}} the view of an HF folder must hold for strategy s."""
    mf, _ = ref.hf_to_mf({n: a for n, (_, a) in hf.items()}, d)
    src_dtype = {ref.hf_to_mf_name(n): dt for n, (dt, _) in hf.items() if ref.hf_to_mf_name(n)}
    out = {}
    for r, ts in ref.mf_rank_tensors(mf, d, s).items():
        out[ref.mf_file_name("qwen3", r, s.world)] = {
            n: (dtype or src_dtype[n], ref.cast(a, src_dtype[n], dtype) if dtype else a) for n, a in ts.items()}
    return out


def assert_same_tensors(got: dict, want: dict, what: str):
    """Both {name: (dtype, array)}: same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want), f"{what}: tensor names differ:\n  only in view: " \
        f"{sorted(set(got) - set(want))}\n  missing: {sorted(set(want) - set(got))}"
    for n in sorted(want):
        gd, ga = got[n]
        wd, wa = want[n]
        assert gd == wd, f"{what}: {n}: dtype {gd}, want {wd}"
        assert list(ga.shape) == list(wa.shape), f"{what}: {n}: shape {list(ga.shape)}, want {list(wa.shape)}"
        if ga.tobytes() != wa.tobytes():
            diff = np.flatnonzero(np.asarray(ga).reshape(-1) != np.asarray(wa).reshape(-1))
            pytest.fail(f"{what}: {n}: bytes differ at {diff.size} of {wa.size} elements (first flat index "
                        f"{diff[:5].tolist()})", pytrace=False)


def run_bin(args, timeout=120) -> ckpt.Run:
    return ckpt.run_cli(args, timeout)


def ok(r):
    assert r.code == 0, f"reshardfs failed (the Qwen3 bridge is needed):\n{r}"
    return r


def export_ok(src, dest, args, timeout=180) -> Path:
    ok(ckpt.export(src, dest, list(args), timeout=timeout))
    return Path(dest)


def snapshot_mount(m, dest) -> Path:
    """Copy the mounted tree (without .reshardfs/) to a local folder, from a subprocess."""
    import mountutil

    p = mountutil.run([PY, SELF, "copytree", m.mnt, dest], timeout=180)
    assert p.code == 0, f"reading the mount failed:\n{p}"
    return Path(dest)


def mount_and_copy(mounts, src, args, dest, name="mnt") -> tuple[Path, str]:
    """Mount SRC with ARGS, copy the tree out, read .reshardfs/summary; unmount (guard)."""
    import mountutil

    m = mounts(name)
    m.start_ok(src, list(args))
    out = snapshot_mount(m, dest)
    s = mountutil.run(["cat", m.path(".reshardfs", "summary")], timeout=30)
    summary = s.stdout if s.code == 0 else ""
    m.cleanup()
    return out, summary


def tree(root) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def check_mf_view(folder, want_files: dict, want_meta: dict | None, prefix="qwen3"):
    """An MF view of an HF source: exactly metadata.json + the rank files, each holding exactly
    the reference tensors; metadata.json's layouts equal want_meta's."""
    folder = Path(folder)
    names = sorted(os.listdir(folder))
    want_names = sorted(["metadata.json"] + [f.replace("qwen3-", prefix + "-", 1) for f in want_files])
    assert names == want_names, f"{folder}: files {names}, want {want_names} (no opt files, no common.json, " \
        "no tracker, no iteration folder)"
    for fn, want in want_files.items():
        fn = fn.replace("qwen3-", prefix + "-", 1)
        sf = ckpt.read_safetensors(folder / fn)
        problems = ckpt.format_problems(sf)
        assert not problems, "\n".join(problems)
        assert_same_tensors(sf.tensors, want, fn)
    meta = json.loads((folder / "metadata.json").read_text())
    sdm = meta["state_dict_metadata"]
    if want_meta is not None:
        assert sorted(sdm) == sorted(want_meta), f"{folder}/metadata.json: tensors differ"
        for n, w in want_meta.items():
            for k in LAYOUT_KEYS:
                assert sdm[n][k] == w[k], f"metadata.json: {n}: {k} = {sdm[n][k]!r}, want {w[k]!r}"
    return meta


def check_mf_view_of(folder, hf: dict, d: ref.Dims, strat: ref.Strategy):
    """check_mf_view against qwen3ref's view of the HF tensors `hf` for strategy `strat`."""
    mf, _ = ref.hf_to_mf({n: a for n, (_, a) in hf.items()}, d)
    return check_mf_view(folder, ref_rank_files(hf, d, strat),
                         ref.mf_metadata({n: a.shape for n, a in mf.items()}, d, strat))


def check_hf_view(folder, want: dict, max_shard_bytes: int | None = None) -> dict:
    """An HF view: model-0000i-of-0000N.safetensors (always with an index) holding exactly
    `want` ({hf name: (dtype, array)}), {"format": "pt"} metadata, index total_size and
    weight_map right, each shard's data at most max_shard_bytes (unless it holds one tensor)."""
    folder = Path(folder)
    files = sorted(os.listdir(folder))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards and HF_INDEX in files, f"{folder}: no shards or no {HF_INDEX}: {files}"
    nums = [SHARD_RE.match(f) for f in shards]
    assert all(nums), f"{folder}: shard names not model-0000i-of-0000N.safetensors: {shards}"
    n = len(shards)
    assert sorted((int(m.group(1)), int(m.group(2))) for m in nums) == [(i + 1, n) for i in range(n)], shards
    idx = json.loads((folder / HF_INDEX).read_text())
    got = {}
    total = 0
    for fn in shards:
        sf = ckpt.read_safetensors(folder / fn)
        assert sf.metadata == {"format": "pt"}, f"{fn}: __metadata__ {sf.metadata!r}, want {{'format': 'pt'}}"
        data = 0
        for name, t in sf.tensors.items():
            assert idx["weight_map"].get(name) == fn, f"{HF_INDEX}: {name} maps to " \
                f"{idx['weight_map'].get(name)!r}, but it is in {fn}"
            got[name] = t
            data += t[1].nbytes
        total += data
        if max_shard_bytes is not None and len(sf.tensors) > 1:
            assert data <= max_shard_bytes, f"{fn}: {data} bytes of tensors > max shard size {max_shard_bytes}"
    assert sorted(idx["weight_map"]) == sorted(got), f"{HF_INDEX}: weight_map names tensors the shards lack " \
        f"or misses some: {sorted(set(idx['weight_map']) ^ set(got))}"
    assert idx["metadata"]["total_size"] == total, f"{HF_INDEX}: total_size {idx['metadata']['total_size']}, " \
        f"tensors hold {total}"
    assert_same_tensors(got, want, str(folder))
    return got


def make_hf(folder, shape: dict, dtype="bf16", shards=2, seed=0, **kw) -> Path:
    synth_qwen3.write_folder(folder, shape, dtype, shards, "random", seed, **kw)
    return Path(folder)


def hf_from_fixture(dest, drop=(), replace=None, add=None, index=True) -> Path:
    """A writable copy of qwen3-tiny-hf with tensors dropped/replaced/added, re-sharded as the
    fixture (two shards + index) or as one model.safetensors (index=False)."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(HF_FX / f, dest / f)
    ts = {n: t for n, t in hf_tensors(HF_FX).items() if n not in drop}
    ts.update(replace or {})
    ts.update(add or {})
    if not index:
        ckpt.write_safetensors(dest / "model.safetensors", ts, metadata={"format": "pt"})
        return dest
    wm0 = json.loads((HF_FX / HF_INDEX).read_text())["weight_map"]
    wm = {n: wm0.get(n, "model-00002-of-00002.safetensors") for n in ts}
    for fn in sorted(set(wm.values())):
        ckpt.write_safetensors(dest / fn, {n: t for n, t in ts.items() if wm[n] == fn}, metadata={"format": "pt"})
    (dest / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return dest


# ===========================================================================
# A. the references against the fixtures (no binary)
# ===========================================================================


def test_ref_hf_fixture_shapes_follow_config():
    d = hf_dims()
    got = {n: (dt, list(a.shape)) for n, (dt, a) in hf_tensors(HF_FX).items()}
    assert got == {n: ("BF16", s) for n, s in d.hf_shapes().items()}
    assert {n: s for n, s in synth_qwen3.hf_tensor_shapes(synth_qwen3.PRESETS["tiny"])} == d.hf_shapes()


def test_ref_hf_to_mf_equals_mindformers_expected():
    """qwen3ref's HF -> MF (dp=1, tp=2, 2 stages) equals what MindSpore Transformers wrote,
    tensor by tensor, and re-serialised gives the expected rank files byte for byte."""
    want = ref_rank_files(hf_tensors(HF_FX), hf_dims(), EXP_STRATEGY)
    files = sorted(f for f in os.listdir(EXP_FX) if f.endswith(".safetensors"))
    assert files == sorted(want)
    for fn in files:
        sf = ckpt.read_safetensors(EXP_FX / fn)
        assert_same_tensors(sf.tensors, want[fn], fn)
        assert ckpt.safetensors_bytes(want[fn]) == (EXP_FX / fn).read_bytes(), fn


def test_ref_metadata_equals_mindformers_expected():
    meta = json.loads((EXP_FX / "metadata.json").read_text())["state_dict_metadata"]
    d = hf_dims()
    mf, _ = ref.hf_to_mf({n: a for n, (_, a) in hf_tensors(HF_FX).items()}, d)
    want = ref.mf_metadata({n: a.shape for n, a in mf.items()}, d, EXP_STRATEGY)
    assert sorted(meta) == sorted(want)
    for n, w in want.items():
        assert meta[n]["properties"]["dtype"] == "BFloat16", n
        for k in LAYOUT_KEYS:
            assert meta[n][k] == w[k], (n, k, meta[n][k], w[k])


def test_ref_mf_f32_fixture_is_the_hf_fixture_widened():
    """The MindFormers float32 fixture, cast to bf16 (numpy RNE) and un-fused, is qwen3-tiny-hf;
    the float32 values are the bf16 ones widened exactly; its layouts are qwen3ref's."""
    d = hf_dims()
    mf = mf_model_params(MF_IT)
    assert {dt for dt, _ in mf.values()} == {"F32"}
    back = ref.mf_to_hf({n: ref.f32_to_bf16(a) for n, (_, a) in mf.items()}, d)
    hf = hf_tensors(HF_FX)
    assert_same_tensors({n: ("BF16", a) for n, a in back.items()}, hf, "mf fixture -> bf16 -> hf")
    hf_as_mf, unknown = ref.hf_to_mf({n: ref.bf16_to_f32(a) for n, (_, a) in hf.items()}, d)
    assert not unknown
    assert_same_tensors({n: ("F32", a) for n, a in hf_as_mf.items()}, mf, "hf widened -> mf")
    meta = json.loads((MF_IT / "metadata.json").read_text())["state_dict_metadata"]
    want = ref.mf_metadata({n: a.shape for n, (_, a) in mf.items()}, d, EXP_STRATEGY)
    for n, w in want.items():
        for k in LAYOUT_KEYS:
            assert meta[n][k] == w[k], (n, k)
        for opt in ("adam_m.", "adam_v."):
            assert opt + n in meta, opt + n


def test_ref_names_and_shapes_match_transformers():
    """Every tensor transformers' Qwen3ForCausalLM has is known to the map, with qwen3ref's
    shape (untied and tied)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for tied in (False, True):
        cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
        with torch.device("meta"):
            model = Qwen3ForCausalLM(cfg)
        sd = {n: list(t.shape) for n, t in model.state_dict().items()}
        if tied:
            sd.pop("lm_head.weight", None)  # save_pretrained drops the tied copy
        assert sd == ref.Dims.from_config(cfg.to_dict()).hf_shapes()
        for n in sd:
            assert ref.hf_to_mf_name(n) is not None, n


def _special_f32():
    vals = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
            1.1754944e-38, 1.1754942e-38, 6.1e-05, 5.96e-08, 65504.0, 65520.0, 65519.99, 1e-8, 1e-40, 9.2e-41]
    # bf16 ties: exactly halfway between two bf16 values, even and odd low bits
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_8000, 0x7F7F_7FFF,
                     0x0000_8000, 0x0001_8000, 0x007F_8000, 0x7FC0_0001, 0x7F80_0001, 0xFF80_0001],
                    dtype=np.uint32).view(np.float32)
    # f16 ties around 1.0 (f16 ulp 2^-10): 1 + 2^-11 and 1 + 3*2^-11
    f16ties = np.array([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2.0 ** -24 * 1.5, 2.0 ** -25], dtype=np.float32)
    rnd = np.random.default_rng(5).standard_normal(4000).astype(np.float32) * np.float32(100)
    bits = np.random.default_rng(6).integers(0, 2 ** 32, 4000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([np.array(vals, dtype=np.float32), ties, f16ties, rnd, bits])


def test_ref_casts_match_torch():
    """numpy casts of qwen3ref agree with torch's .to() bit for bit on everything but NaN
    payloads (NaN stays NaN); widening is exact."""
    import torch

    x = _special_f32()
    tb = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    mine = ref.f32_to_bf16(x)
    nan = np.isnan(x)
    assert np.array_equal(ref.is_nan_bf16(mine), nan) and np.array_equal(ref.is_nan_bf16(tb), nan)
    assert np.array_equal(mine[~nan], tb[~nan]), np.flatnonzero(mine[~nan] != tb[~nan])[:10]
    th = torch.from_numpy(x.copy()).to(torch.float16).numpy()
    mh = ref.cast(x, "F32", "F16")
    assert np.array_equal(np.isnan(mh), nan) and np.array_equal(np.isnan(th), nan)
    assert np.array_equal(mh[~nan].view(np.uint16), th[~nan].view(np.uint16))
    # widening: every bf16 bit pattern, every f16 bit pattern
    allb = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    w = ref.cast(allb, "BF16", "F32")
    tw = torch.from_numpy(allb.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(w.view(np.uint32), tw.view(np.uint32))
    assert np.array_equal(ref.f32_to_bf16(w)[~np.isnan(w)], allb[~np.isnan(w)])  # narrowing back is exact
    h = allb.view(np.float16)
    hn = np.isnan(h)
    mw, tw = ref.cast(h, "F16", "F32"), torch.from_numpy(h.copy()).to(torch.float32).numpy()
    assert np.array_equal(np.isnan(mw), hn) and np.array_equal(np.isnan(tw), hn)
    assert np.array_equal(mw[~hn].view(np.uint32), tw[~hn].view(np.uint32))  # NaN payloads may differ


def random_shape(rng) -> tuple[dict, int]:
    """A random small Qwen3 shape and a tp that divides its groups (and intermediate)."""
    tp = int(rng.choice([1, 2, 4]))
    groups = tp * int(rng.integers(1, 3))
    r = int(rng.integers(1, 4))
    head_dim = int(rng.choice([4, 8, 12]))
    hidden = int(rng.choice([8, 16, 24]))
    inter = tp * int(rng.integers(1, 5)) * 2
    vocab = int(rng.integers(20, 60))
    div = vocab % tp == 0
    return dict(layers=int(rng.integers(1, 4)), hidden=hidden, intermediate=inter, heads=groups * r,
                groups=groups, head_dim=head_dim, vocab=vocab, tied=not div and tp > 1), tp


def test_ref_fused_rows_property():
    """Two statements of the fused-row rule agree on random shapes: fuse_qkv (block copy) vs
    qkv_row_source (per row), fc1 even/odd rows; split(fuse(x)) == x; every tp slice of a fused
    tensor is whole groups (QKV) or whole row pairs (fc1)."""
    rng = np.random.default_rng(1234)
    for _ in range(200):
        s, tp = random_shape(rng)
        d = ref.Dims(s["vocab"], s["hidden"], s["intermediate"], s["layers"], s["heads"], s["groups"],
                     s["head_dim"], s["tied"])
        q = rng.integers(0, 2 ** 16, (d.heads * d.head_dim, 3), dtype=np.uint16)
        k = rng.integers(0, 2 ** 16, (d.groups * d.head_dim, 3), dtype=np.uint16)
        v = rng.integers(0, 2 ** 16, (d.groups * d.head_dim, 3), dtype=np.uint16)
        qkv = ref.fuse_qkv(q, k, v, d.heads, d.groups, d.head_dim)
        src = {"q": q, "k": k, "v": v}
        for row in range(qkv.shape[0]):
            which, i = ref.qkv_row_source(d, row)
            assert np.array_equal(qkv[row], src[which][i])
        assert all(np.array_equal(a, b) for a, b in zip(ref.split_qkv(qkv, d.heads, d.groups, d.head_dim), (q, k, v)))
        per_rank = qkv.shape[0] // tp
        assert per_rank % ((d.heads // d.groups + 2) * d.head_dim) == 0
        g = rng.integers(0, 2 ** 16, (d.intermediate, 2), dtype=np.uint16)
        u = rng.integers(0, 2 ** 16, (d.intermediate, 2), dtype=np.uint16)
        fc1 = ref.fuse_fc1(g, u)
        for i in range(d.intermediate):
            assert np.array_equal(fc1[2 * i], g[i]) and np.array_equal(fc1[2 * i + 1], u[i])
        assert (fc1.shape[0] // tp) % 2 == 0


# ===========================================================================
# B. against the binary (the issue-8 implementation)
# ===========================================================================


@pytest.fixture(scope="module")
def hf_expected_export(tmp_path_factory, reshardfs_bin):
    dest = tmp_path_factory.mktemp("q3exp") / "out"
    return export_ok(HF_FX, dest, EXP_ARGS)


def expected_meta():
    return json.loads((EXP_FX / "metadata.json").read_text())["state_dict_metadata"]


def expected_files():
    return {f: ckpt.read_safetensors(EXP_FX / f).tensors for f in sorted(os.listdir(EXP_FX))
            if f.endswith(".safetensors")}


def test_hf_to_mf_export_equals_expected(hf_expected_export):
    """export qwen3-tiny-hf --mesh dp=1,tp=2 --pp 2: rank files byte-identical to MindSpore
    Transformers' own, same layouts in metadata.json, nothing else in DEST."""
    out = hf_expected_export
    meta = check_mf_view(out, expected_files(), expected_meta())
    for f in os.listdir(EXP_FX):
        if f.endswith(".safetensors"):
            assert (out / f).read_bytes() == (EXP_FX / f).read_bytes(), f"{f}: not byte-identical to expected/"
    for n, m in meta["state_dict_metadata"].items():
        assert m["properties"]["dtype"] == "BFloat16", n


def test_hf_to_mf_mount_equals_expected(mounts, hf_expected_export, tmp_path):
    got, summary = mount_and_copy(mounts, HF_FX, EXP_ARGS, tmp_path / "snap")
    assert tree(got) == tree(hf_expected_export), "mounted tree differs from the export's"
    for f in tree(got):
        assert (got / f).read_bytes() == (hf_expected_export / f).read_bytes(), f"{f}: mount != export"
    for f in os.listdir(EXP_FX):
        if f.endswith(".safetensors"):
            assert (got / f).read_bytes() == (EXP_FX / f).read_bytes(), f"{f}: mount != expected/"


@pytest.mark.parametrize("detect", ["auto", "model-qwen3"])
@pytest.mark.parametrize("style", ["index", "single"])
def test_hf_source_styles_and_prefix(detect, style, tmp_path, reshardfs_bin):
    """Single model.safetensors or index + shards, detected or with --model qwen3, and
    --prefix: the same rank files (modulo the prefix in their names)."""
    src = hf_from_fixture(tmp_path / "src", index=(style == "index"))
    args = EXP_ARGS + (["--model", "qwen3"] if detect != "auto" else []) + ["--prefix", "q3x"]
    out = export_ok(src, tmp_path / "out", args)
    check_mf_view(out, expected_files(), expected_meta(), prefix="q3x")


UNMAPPED = {"model.rotary_emb.inv_freq": ("F32", np.arange(8, dtype=np.float32)),
            "model.layers.0.self_attn.extra_bias": ("BF16", np.arange(4, dtype=np.uint16))}


def test_unknown_hf_tensor_left_out_and_listed(tmp_path, reshardfs_bin):
    """inspect lists both; a view needs --drop-unknown-tensors for the one that is not a derived
    buffer (test_model_rules.py: the refusal)."""
    extra = UNMAPPED
    src = hf_from_fixture(tmp_path / "src", add=extra)
    r = ok(run_bin(["inspect", src]))
    for n in extra:
        assert n in r.stdout, f"`inspect` does not list the unmapped tensor {n}:\n{r}"
    r = run_bin(["export", src, tmp_path / "refused"] + EXP_ARGS)
    assert r.code == 2 and "extra_bias" in r.stderr and "inv_freq" not in r.stderr, str(r)
    out = export_ok(src, tmp_path / "out", EXP_ARGS + ["--drop-unknown-tensors"])
    check_mf_view(out, expected_files(), expected_meta())


def test_unknown_hf_tensor_in_mount_summary(mounts, tmp_path):
    extra = UNMAPPED
    src = hf_from_fixture(tmp_path / "src", add=extra)
    snap, summary = mount_and_copy(mounts, src, EXP_ARGS + ["--drop-unknown-tensors"], tmp_path / "snap")
    check_mf_view(snap, expected_files(), expected_meta())
    for n in extra:
        assert n in summary, f".reshardfs/summary does not list the unmapped tensor {n}:\n{summary}"


def test_model_none_keeps_hf_names_whole(tmp_path, reshardfs_bin):
    out = export_ok(HF_FX, tmp_path / "out", ["--model", "none", "--unshard"])
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    got = ckpt.read_safetensors(out / files[0]).tensors
    assert_same_tensors(got, hf_tensors(HF_FX), "--model none --unshard")


def test_plan_and_inspect_on_hf_source(reshardfs_bin):
    for args in (["inspect", HF_FX], ["inspect", HF_FX, "--json"], ["plan", HF_FX] + EXP_ARGS,
                 ["plan", HF_FX, "--mesh", "tp=2", "--json"], ["plan", MF_FX, "--hf", "--model", "qwen3"],
                 ["plan", MF_FX, "--hf", "--hf-files", HF_FX, "--dtype", "bf16"]):
        r = ok(run_bin(args))
        assert r.stdout.strip(), str(r)
        if "--json" in args:
            json.loads(r.stdout)


# --- MF -> HF ---------------------------------------------------------------


def mf_to_hf_args(files):
    return ["--hf", "--dtype", "bf16"] + (["--model", "qwen3"] if files == "generated" else ["--hf-files", HF_FX])


@pytest.mark.parametrize("kind", ["root", "iteration"])
@pytest.mark.parametrize("files", ["generated", "hf-files"])
def test_mf_to_hf_mount_equals_export(kind, files, mounts, tmp_path, reshardfs_bin):
    src = MF_FX if kind == "root" else MF_IT
    out = export_ok(src, tmp_path / "out", mf_to_hf_args(files))
    snap, _ = mount_and_copy(mounts, src, mf_to_hf_args(files), tmp_path / "snap")
    assert tree(snap) == tree(out), "mounted tree differs from the export's"
    for f in tree(out):
        assert (snap / f).read_bytes() == (out / f).read_bytes(), f"{f}: mount != export"


@pytest.mark.parametrize("kind", ["root", "iteration"])
@pytest.mark.parametrize("files", ["generated", "hf-files"])
def test_mf_to_hf_export_equals_hf_fixture(kind, files, tmp_path, reshardfs_bin):
    """--hf --dtype bf16 of the float32 MindFormers fixture holds exactly qwen3-tiny-hf's tensors
    (root: per iteration folder with the tracker; iteration: at the root)."""
    src = MF_FX if kind == "root" else MF_IT
    out = export_ok(src, tmp_path / "out", mf_to_hf_args(files))
    if kind == "root":
        assert sorted(os.listdir(out)) == sorted([TRACKER, MF_IT.name]), os.listdir(out)
        assert (out / TRACKER).read_bytes() == (MF_FX / TRACKER).read_bytes()
        out = out / MF_IT.name
    check_hf_view(out, hf_tensors(HF_FX))
    names = sorted(os.listdir(out))
    assert not any("adam" in n or "opt" in n for n in names), names
    if files == "hf-files":
        assert sorted(names) == sorted(["config.json", "generation_config.json", HF_INDEX]
                                       + [f for f in names if f.endswith(".safetensors")])
        for f in ("config.json", "generation_config.json"):
            assert (out / f).read_bytes() == (HF_FX / f).read_bytes(), f
    else:
        cfg = json.loads((out / "config.json").read_text())
        want = json.loads((HF_FX / "config.json").read_text())
        for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
            assert cfg.get(k) == want[k], f"generated config.json: {k} = {cfg.get(k)!r}, want {want[k]!r}"


def test_mf_to_hf_keeps_dtype_unless_asked(tmp_path, reshardfs_bin):
    out = export_ok(MF_IT, tmp_path / "out", ["--hf", "--model", "qwen3"])
    want = {n: ("F32", ref.bf16_to_f32(a)) for n, (_, a) in hf_tensors(HF_FX).items()}
    check_hf_view(out, want)


@pytest.mark.parametrize("size,limit", [("60KB", 60_000), ("50KiB", 50 * 1024), ("0.1MB", 100_000)])
def test_max_shard_size(size, limit, tmp_path, reshardfs_bin):
    out = export_ok(MF_IT, tmp_path / "out", ["--hf", "--model", "qwen3", "--dtype", "bf16", "--max-shard-size", size])
    check_hf_view(out, hf_tensors(HF_FX), max_shard_bytes=limit)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) >= 189184 // limit


def test_hf_source_reshaped_as_hf(tmp_path, reshardfs_bin):
    """--hf on an HF source: other shard size and dtype, same tensors."""
    out = export_ok(HF_FX, tmp_path / "out", ["--hf", "--hf-files", HF_FX, "--dtype", "f32", "--max-shard-size", "1MB"])
    want = {n: ("F32", ref.bf16_to_f32(a)) for n, (_, a) in hf_tensors(HF_FX).items()}
    check_hf_view(out, want)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model-00001-of-00001.safetensors"]


# --- transformers reads the mount ------------------------------------------


BUILD_SHAPE = dict(vocab=512, hidden=128, intermediate=256, layers=2, heads=8, groups=2, head_dim=16)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random bf16 Qwen3ForCausalLM saved by transformers in 4+ shards, and its logits/weights
    as transformers itself loads them from that folder."""
    import mountutil

    base = tmp_path_factory.mktemp("q3model")
    orig = base / "orig"
    p = mountutil.run([PY, SELF, "build", orig, "0", "150KB"], timeout=300)
    assert p.code == 0, str(p)
    assert len([f for f in os.listdir(orig) if f.endswith(".safetensors")]) >= 3, os.listdir(orig)
    p = mountutil.run([PY, SELF, "load", orig, base / "orig.npz"], timeout=300)
    assert p.code == 0, str(p)
    return orig, dict(np.load(base / "orig.npz"))


def load_via_transformers(folder, out_npz) -> dict:
    import mountutil

    p = mountutil.run([PY, SELF, "load", folder, out_npz], timeout=300)
    assert p.code == 0, f"transformers could not load {folder}:\n{p}"
    return dict(np.load(out_npz))


@pytest.fixture(scope="module")
def tiny_mf(tiny_model, tmp_path_factory, reshardfs_bin):
    """The model as a float32 MindFormers checkpoint (tp=2, 2 stages), exported to disk."""
    orig, _ = tiny_model
    return export_ok(orig, tmp_path_factory.mktemp("q3mf") / "mf", ["--mesh", "tp=2", "--pp", "2", "--dtype", "f32"])


def test_mf_export_of_transformers_model_matches_reference(tiny_model, tiny_mf):
    orig, _ = tiny_model
    d = hf_dims(orig)
    want = ref_rank_files(hf_tensors(orig), d, ref.Strategy(tp=2, pp=2), dtype="F32")
    meta = check_mf_view(tiny_mf, want, None)
    for n, m in meta["state_dict_metadata"].items():
        assert m["properties"]["dtype"] == "Float32", f"metadata.json: {n}: dtype {m['properties']['dtype']}"


def test_transformers_loads_mount_with_hf_files(tiny_model, tiny_mf, mounts, tmp_path):
    """bf16 model -> MF float32 checkpoint on disk -> mount --hf --hf-files ORIG --dtype bf16 ->
    AutoModelForCausalLM.from_pretrained(mount): every weight and the bf16 logits on PROMPT are
    bit-identical (torch.equal) to loading the original folder."""
    orig, want = tiny_model
    m = mounts("mnt")
    m.start_ok(tiny_mf, ["--hf", "--hf-files", orig, "--dtype", "bf16"])
    got = load_via_transformers(m.mnt, tmp_path / "mnt.npz")
    m.cleanup()
    assert got["info"].tobytes() == b"[]", f"loading info: {got['info'].tobytes().decode()}"
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{k} differs after the round trip"


def test_transformers_loads_mount_with_generated_config(tiny_model, tiny_mf, mounts, tmp_path):
    orig, want = tiny_model
    m = mounts("mnt")
    m.start_ok(tiny_mf, ["--hf", "--model", "qwen3", "--dtype", "bf16"])
    got = load_via_transformers(m.mnt, tmp_path / "mnt.npz")
    snap = snapshot_mount(m, tmp_path / "snap")
    m.cleanup()
    assert got["info"].tobytes() == b"[]", f"loading info: {got['info'].tobytes().decode()}"
    for k in want:
        if k.startswith("param:"):
            assert np.array_equal(got[k], want[k]), f"{k} differs (generated config.json)"
    check_hf_view(snap, hf_tensors(orig))


def test_vllm_loader_reads_mount(tiny_model, tiny_mf, mounts, tmp_path):
    """vLLM's weight loader (the vllm 0.33.0 wheel; no GPU here, so not an engine run: the same
    file discovery, index filtering, safetensors iterator and config parsing `vllm serve` runs
    before the weights go to the device) on a `--hf --hf-files ORIG --dtype bf16` mount of the
    float32 MindFormers checkpoint: it finds the view's shards, and every tensor it yields is
    bit-identical to the original model's parameter of that name."""
    import mountutil

    orig, want = tiny_model
    m = mounts("mnt")
    m.start_ok(tiny_mf, ["--hf", "--hf-files", orig, "--dtype", "bf16"])
    p = mountutil.run([PY, SELF, "vllm", m.mnt, tmp_path / "vllm.npz"], timeout=300)
    index = json.loads(mountutil.read_text(m.path("model.safetensors.index.json")))
    m.cleanup()
    assert p.code == 0, f"vLLM's loader could not read the mount:\n{p}"
    got = dict(np.load(tmp_path / "vllm.npz"))
    info = json.loads(got.pop("info").tobytes())
    assert info["files"] == sorted(set(index["weight_map"].values())), info
    assert info["model_type"] == "qwen3" and info["layers"] == BUILD_SHAPE["layers"], info
    params = {k for k in want if k.startswith("param:")}
    assert set(got) == params, sorted(set(got) ^ params)
    for k in params:
        assert np.array_equal(got[k], want[k]), f"{k}: vLLM read other bits than the original model's"


ROUND_TRIP_TARGETS = [["--mesh", "tp=1"], ["--mesh", "dp=2,tp=2"], ["--mesh", "tp=2", "--pp", "2"],
                      ["--mesh", "dp=1,cp=2,tp=2"], ["--pp", "2"], ["--unshard"]]


@pytest.mark.parametrize("target", ROUND_TRIP_TARGETS, ids=lambda a: " ".join(a))
def test_round_trip_hf_mf_hf(target, tiny_model, tmp_path, reshardfs_bin):
    """HF -> MF view (exported) under several strategies -> HF view == the original tensors; the
    MF export matches qwen3ref for the strategies it can name."""
    orig, _ = tiny_model
    mf = export_ok(orig, tmp_path / "mf", target)
    s = None
    if "--unshard" not in target:
        kv = dict(x.split("=") for x in target[target.index("--mesh") + 1].split(",")) if "--mesh" in target else {}
        pp = int(target[target.index("--pp") + 1]) if "--pp" in target else 1
        s = ref.Strategy(dp=int(kv.get("dp", 1)), cp=int(kv.get("cp", 1)), tp=int(kv.get("tp", 1)), pp=pp)
        d = hf_dims(orig)
        hf = hf_tensors(orig)
        shapes = {n: a.shape for n, a in ref.hf_to_mf({n: a for n, (_, a) in hf.items()}, d)[0].items()}
        check_mf_view(mf, ref_rank_files(hf, d, s), ref.mf_metadata(shapes, d, s))
    back = export_ok(mf, tmp_path / "hf", ["--hf", "--hf-files", orig])
    check_hf_view(back, hf_tensors(orig))


def test_property_random_shapes_against_reference(tmp_path, reshardfs_bin):
    """Seeded random shapes (heads, groups, head_dim, tp, intermediate, vocab divisible by tp or
    not, tied when not): the HF -> MF export equals qwen3ref rank file by rank file and layout by
    layout, and --hf of that export gives the original tensors back."""
    seed = int(os.environ.get("RESHARDFS_PROP_SEED", "8"))
    rng = np.random.default_rng(seed)
    for case in range(int(os.environ.get("RESHARDFS_QWEN3_CASES", "8"))):
        s, tp = random_shape(rng)
        # tied embeddings on several stages: where MindFormers keeps the last stage's copy is not
        # pinned down by any fixture, so tied shapes stay on one stage here
        pp = 1 if s["tied"] else int(rng.integers(1, s["layers"] + 1))
        dp = int(rng.choice([1, 2]))
        src = make_hf(tmp_path / f"src{case}", s, shards=int(rng.integers(1, 4)), seed=case)
        strat = ref.Strategy(dp=dp, tp=tp, pp=pp)
        args = ["--mesh", f"dp={dp},tp={tp}", "--pp", str(pp)]
        offset = ckpt.pp_offset_for(s["layers"], pp)  # qwen3ref places layer i on stage i*pp//L
        if offset is not None:
            args += ["--pp-offset", ",".join(map(str, offset))]
        r = ckpt.export(src, tmp_path / f"out{case}", args)
        assert r.code == 0, f"case {case} (seed {seed}) {s}:\n{r}"
        hf = hf_tensors(src)
        check_mf_view_of(tmp_path / f"out{case}", hf, hf_dims(src), strat)
        back = export_ok(tmp_path / f"out{case}", tmp_path / f"back{case}", ["--hf", "--hf-files", src])
        check_hf_view(back, hf)


def cat_tree(m, dest) -> Path:
    """Copy the mounted files (without .reshardfs/) with `cat`, as a user would: sequential
    128 KiB reads, which the kernel turns into 1 MiB readahead requests on block boundaries."""
    import mountutil

    dest = Path(dest)
    dest.mkdir()
    r = mountutil.sh(f'cd {shlex.quote(str(m.mnt))} && for f in *; do [ -f "$f" ] && '
                     f'cat "$f" > {shlex.quote(str(dest))}/"$f"; done; true', timeout=180)
    assert r.code == 0, f"reading the mount failed:\n{r}"
    return dest


def read_tp2_view(mounts, tmp_path, shape, shards, seed):
    """A Hugging Face folder of `shape`, mounted `--mesh dp=1,tp=2` and read whole with `cat`:
    (the folder, its tensors, its dims, the copy read, the mount's stats after the read)."""
    src = make_hf(tmp_path / "hf-src", shape, shards=shards, seed=seed)
    m = mounts("mf")
    m.start_ok(src, ["--mesh", "dp=1,tp=2"])
    mf_copy = cat_tree(m, tmp_path / "mf-copy")
    st = m.stats()
    m.cleanup()
    return src, hf_tensors(src), hf_dims(src), mf_copy, st


def test_big_rows_answered_from_the_maps(mounts, tmp_path, reshardfs_bin):
    """Rows of a real model's width (hidden 4096: 8 KiB bf16 rows), both ways through a mount:
    1 MiB requests of fused gate/up rows, q/k/v groups and row splits are answered with slices of
    the source maps (`mapped_reads`, fuser's vectored reply), column splits of 1 KiB pieces are
    copied; every tensor equals the numpy reference, so both paths are checked byte for byte."""
    shape = dict(layers=1, hidden=4096, intermediate=1024, heads=8, groups=4, head_dim=128, vocab=2048)
    src, hf, d, mf_copy, st = read_tp2_view(mounts, tmp_path, shape, shards=2, seed=3)
    assert st["read_errors"] == 0, st
    assert st["mapped_reads"] > 0, f"no request was answered from the maps: {st}"
    assert st["direct_reads"] > st["mapped_reads"], f"no request was copied: {st}"
    check_mf_view_of(mf_copy, hf, d, ref.Strategy(dp=1, tp=2, pp=1))

    h = mounts("hf")
    h.start_ok(mf_copy, ["--hf", "--hf-files", src])
    hf_copy = cat_tree(h, tmp_path / "hf-copy")
    st = h.stats()
    h.cleanup()
    assert st["read_errors"] == 0 and st["mapped_reads"] > 0, st
    check_hf_view(hf_copy, hf)


def test_column_splits_of_whole_pages_answered_from_the_maps(mounts, tmp_path):
    """A column split into 4 KiB pieces (o_proj and down_proj at hidden 4096 and 4096 wide, tp=2)
    starts mid-row in most 1 MiB requests: 256 whole pieces and two partial ones. Those requests
    must still be answered from the source maps, not fall back to a copy (the first version
    copied every one of them); the bytes equal the numpy reference."""
    shape = dict(layers=1, hidden=4096, intermediate=4096, heads=32, groups=4, head_dim=128, vocab=2048)
    _, hf, d, mf_copy, st = read_tp2_view(mounts, tmp_path, shape, shards=1, seed=5)
    assert st["read_errors"] == 0 and st["mapped_reads"] > 0, st
    assert st["direct_reads"] == st["mapped_reads"], f"some requests were copied: {st}"
    check_mf_view_of(mf_copy, hf, d, ref.Strategy(dp=1, tp=2, pp=1))


# --- --dtype ----------------------------------------------------------------


@pytest.mark.parametrize("src_dt,dst_dt", [("F32", "BF16"), ("F32", "F16"), ("BF16", "F32"), ("F16", "F32"),
                                           ("BF16", "F16"), ("F16", "BF16")])
def test_dtype_cast_against_numpy(src_dt, dst_dt, tmp_path, reshardfs_bin):
    """--dtype on a plain folder (--model none --unshard) and on an HF view: RNE like numpy
    (ties, subnormals, overflow to inf), NaN stays NaN, widening exact; metadata states it."""
    plain = cast_source(tmp_path, src_dt)
    arr = ckpt.read_safetensors(plain / "model.safetensors").tensors["w"][1]
    flag = {"BF16": "bf16", "F16": "f16", "F32": "f32"}[dst_dt]
    out = export_ok(plain, tmp_path / "out", ["--model", "none", "--unshard", "--dtype", flag])
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    got_dt, got = ckpt.read_safetensors(out / files[0]).tensors["w"]
    want = ref.cast(arr, src_dt, dst_dt)
    assert got_dt == dst_dt
    meta = json.loads((out / "metadata.json").read_text())["state_dict_metadata"]
    assert meta["w"]["properties"]["dtype"] == ref.MS_DTYPE[dst_dt]
    gf, wf = ref.cast(got, dst_dt, "F32"), ref.cast(want, dst_dt, "F32")
    nan = np.isnan(wf)
    assert np.array_equal(np.isnan(gf), nan), "NaN must stay NaN (and nothing else become NaN)"
    bad = np.flatnonzero(got.view(np.uint16 if dst_dt != "F32" else np.uint32)[~nan]
                         != want.view(np.uint16 if dst_dt != "F32" else np.uint32)[~nan])
    assert bad.size == 0, f"{bad.size} values differ from numpy's cast, e.g. input {arr.reshape(-1)[~nan.reshape(-1)][bad[:5]]}"


def cast_source(tmp_path, src_dt) -> Path:
    x = _special_f32()[:4096].reshape(64, 64)
    plain = tmp_path / "plain"
    plain.mkdir()
    ckpt.write_safetensors(plain / "model.safetensors", {"w": (src_dt, ref.cast(x, "F32", src_dt))},
                           metadata={"format": "pt"})
    return plain


@pytest.mark.parametrize("src_dt,flag", [("F32", "bf16"), ("BF16", "f32")])
def test_dtype_cast_mount_equals_export(src_dt, flag, mounts, tmp_path, reshardfs_bin):
    plain = cast_source(tmp_path, src_dt)
    args = ["--model", "none", "--unshard", "--dtype", flag]
    out = export_ok(plain, tmp_path / "out", args)
    snap, _ = mount_and_copy(mounts, plain, args, tmp_path / "snap")
    assert tree(snap) == tree(out)
    for f in tree(out):
        assert (snap / f).read_bytes() == (out / f).read_bytes(), f"{f}: mount != export"


# --- bad input ---------------------------------------------------------------


def _bad_cases():
    """(id, builder(tmp) -> (src, args), words the message must contain)."""
    d = hf_dims()
    cases = []

    def no_config(t):
        src = hf_from_fixture(t / "src")
        (src / "config.json").unlink()
        return src, ["--model", "qwen3"] + EXP_ARGS

    cases.append(("config-missing", no_config, ["config.json"]))

    def bad_json(t):
        src = hf_from_fixture(t / "src")
        (src / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 64,')
        return src, EXP_ARGS

    cases.append(("config-unparsable", bad_json, ["config.json"]))

    def unsupported(t):
        src = hf_from_fixture(t / "src")
        cfg = json.loads((src / "config.json").read_text())
        cfg["model_type"] = "llama"
        (src / "config.json").write_text(json.dumps(cfg))
        return src, EXP_ARGS

    cases.append(("model-type-unsupported", unsupported, ["llama", "qwen3"]))

    def missing_tensor(t):
        return hf_from_fixture(t / "src", drop=["model.layers.1.self_attn.k_proj.weight"]), EXP_ARGS

    cases.append(("tensor-missing", missing_tensor, ["model.layers.1.self_attn.k_proj.weight"]))

    def wrong_shape(t):
        bad = ("BF16", np.zeros((d.groups * d.head_dim + 1, d.hidden), dtype=np.uint16))
        return hf_from_fixture(t / "src", replace={"model.layers.0.self_attn.v_proj.weight": bad}), EXP_ARGS

    cases.append(("tensor-wrong-shape", wrong_shape, ["model.layers.0.self_attn.v_proj.weight"]))

    def wrong_config(t):
        src = hf_from_fixture(t / "src")
        cfg = json.loads((src / "config.json").read_text())
        cfg["intermediate_size"] = 80
        (src / "config.json").write_text(json.dumps(cfg))
        return src, EXP_ARGS

    cases.append(("shape-not-config", wrong_config, ["mlp."]))

    def groups_tp(t):
        return hf_from_fixture(t / "src"), ["--mesh", "tp=4"]

    cases.append(("groups-not-divisible-by-tp", groups_tp, ["num_key_value_heads", "4"]))

    def index_placing(tensor, file):
        """The fixture with its index placing `tensor` in `file`."""
        def case(t):
            src = hf_from_fixture(t / "src")
            idx = json.loads((src / HF_INDEX).read_text())
            idx["weight_map"][tensor] = file
            (src / HF_INDEX).write_text(json.dumps(idx))
            return src, EXP_ARGS
        return case

    index_missing_file = index_placing("model.norm.weight", "model-00003-of-00003.safetensors")

    cases.append(("index-names-missing-file", index_missing_file, ["model-00003-of-00003.safetensors"]))

    index_missing_tensor = index_placing("model.layers.0.mlp.phantom.weight", "model-00001-of-00002.safetensors")

    cases.append(("index-names-absent-tensor", index_missing_tensor,
                  ["model.layers.0.mlp.phantom.weight", "model-00001-of-00002.safetensors"]))

    def hf_without_model(t):
        # A MindFormers Qwen3 is recognised by its tensors; a GPT is no supported model's.
        return ckpt.resolve_iteration(FIXTURES / "gpt-dp2-tp2-pp2-bf16"), ["--hf"]

    cases.append(("hf-without-model-or-files", hf_without_model, ["--model", "no supported model"]))
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exit_2(case, tmp_path, reshardfs_bin):
    _, build, words = case
    src, args = build(tmp_path)
    dest = tmp_path / "out"
    r = ckpt.export(src, dest, args)
    assert r.code == 2, f"export must exit 2:\n{r}"
    for w in words:
        assert w in r.stderr, f"the message must name {w!r}:\n{r}"
    assert not dest.exists() or not os.listdir(dest), f"export wrote {os.listdir(dest)} despite the error"
    r = run_bin(["plan", src] + args)
    assert r.code == 2, f"plan must exit 2:\n{r}"
    for w in words:
        assert w in r.stderr, f"plan's message must name {w!r}:\n{r}"
    # inspect reads the source alone: a bad target is not its to refuse
    if case[0] not in ("hf-without-model-or-files", "groups-not-divisible-by-tp"):
        r = run_bin(["inspect", src] + (["--model", "qwen3"] if "--model" in args else []))
        assert r.code == 2, f"inspect must exit 2:\n{r}"


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_mount_exit_2(case, mounts, tmp_path):
    _, build, words = case
    src, args = build(tmp_path)
    m = mounts("mnt")
    p = m.start(src, args)
    assert p.code == 2, f"mount must exit 2:\n{p}"
    assert not m.is_mounted(), "mounted despite the error"
    for w in words:
        assert w in p.stderr, f"mount's message must name {w!r}:\n{p}"


def test_unsupported_model_type_with_model_none(tmp_path, reshardfs_bin):
    src = hf_from_fixture(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    out = export_ok(src, tmp_path / "out", ["--model", "none", "--unshard"])
    assert any(f.endswith(".safetensors") for f in os.listdir(out))


# ===========================================================================
# script side (run in subprocesses)
# ===========================================================================


def _cmd_build(out, seed, max_shard):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(int(seed))
    s = BUILD_SHAPE
    cfg = Qwen3Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["groups"], head_dim=s["head_dim"], max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # the norms start at 1.0: make them random too so a mix-up shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(out, max_shard_size=max_shard)


def _cmd_load(folder, out):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    model.eval()
    problems = [f"{k}: {v}" for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                   "mismatched_keys")]
    res = {"info": np.frombuffer(json.dumps(problems).encode(), dtype=np.uint8)}
    for n, p in model.state_dict().items():
        res["param:" + n] = p.detach().to(torch.bfloat16).view(torch.int16).numpy().copy()
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits
    assert logits.dtype == torch.bfloat16
    res["logits"] = logits.view(torch.int16).numpy().copy()
    np.savez(out, **res)


def _cmd_vllm(folder, out):
    import torch
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.transformers_utils.config import get_config

    # What DefaultModelLoader.load_weights runs on a local folder, up to the device copy.
    _, files, use_safetensors, _ = DefaultModelLoader(LoadConfig())._prepare_weights(folder, None, None, True, None)
    assert use_safetensors, files
    res = {}
    for name, t in safetensors_weights_iterator(files, False):
        res["param:" + name] = t.to(torch.bfloat16).view(torch.int16).numpy().copy()
    cfg = get_config(folder, trust_remote_code=False)
    info = {"files": sorted(os.path.basename(f) for f in files), "model_type": cfg.model_type,
            "layers": cfg.num_hidden_layers}
    res["info"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    np.savez(out, **res)


def _cmd_copytree(src, dst):
    src = Path(src)
    for dirpath, dirnames, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != ".reshardfs"]
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in files:
            shutil.copyfile(os.path.join(dirpath, f), os.path.join(dst, rel, f))


if __name__ == "__main__":
    # never the network (everything is local), no progress bars in the test logs
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd, *rest = sys.argv[1:]
    {"build": _cmd_build, "load": _cmd_load, "vllm": _cmd_vllm, "copytree": _cmd_copytree}[cmd](*rest)
