"""reshardfs against the real MindSpore Transformers fixtures.

tests/fixtures/expected/<fixture>.<target>/rank-R.safetensors holds what rank R
of <target> must see; `export` of the fixture must reproduce it exactly.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import ckpt
from ckpt import FIXTURES, TRACKER

# MindSpore's reshard results (rank-N.safetensors) and the Checkpoint 2.0 sources they come
# from. The Qwen3 fixtures (a Hugging Face folder, a MindFormers checkpoint and the files
# MindFormers writes, named as it names them) are covered by test_qwen3.py.
EXPECTED = sorted(
    p
    for p in (FIXTURES / "expected").iterdir()
    if p.is_dir() and (p / "rank-0.safetensors").exists()
)
SOURCES = sorted(
    p.name
    for p in FIXTURES.iterdir()
    if p.is_dir() and p.name != "expected" and not p.name.startswith("qwen3-")
)


def split_expected_name(d: Path):
    fx, target = d.name.split(".", 1)
    return fx, ckpt.parse_target_name(target)


def load_tensors(path) -> dict:
    """{name: (dtype, bytes, shape)} via the `safetensors` package where numpy supports the
    dtype, via ckpt's raw reader for BF16 (safe_open(framework="numpy") rejects bfloat16).
    Both readers are cross-checked on every non-BF16 tensor."""
    raw = ckpt.read_safetensors(path)
    out = {}
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(raw.tensors), path
        for name, (dtype, arr) in raw.tensors.items():
            if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):
                out[name] = (dtype, arr.tobytes(), list(arr.shape))
                continue
            t = f.get_tensor(name)
            assert t.dtype == ckpt.NP_DTYPES[dtype] and t.tobytes() == arr.tobytes(), (path, name)
            out[name] = (dtype, np.array(t, order="C").tobytes(), list(t.shape))
    return out


def rank_union(folder, prefix, rank, world, kinds) -> dict:
    got = {}
    for kind in kinds:
        fn = Path(folder) / ckpt.file_name(prefix, kind, rank, world)
        for n, t in load_tensors(fn).items():
            assert n not in got, f"{n} in both model and opt files of rank {rank}"
            got[n] = t
    return got


def source_of(fx):
    it = ckpt.resolve_iteration(FIXTURES / fx)
    params, S, P = ckpt.load_checkpoint(it)
    return it, params, S, P


def iteration_name(fx):
    return ckpt.resolve_iteration(FIXTURES / fx).name


# ---------------------------------------------------------------------------
# Self-tests of the Python reference (no binary needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fx", SOURCES)
def test_reference_writer_regenerates_fixture(fx, tmp_path):
    """Reassembling a fixture and re-saving it with ckpt's writer gives the same bytes:
    checks the reader, the layout math and the writer against MindFormers' output."""
    it, params, S, P = source_of(fx)
    common = json.loads((it / "common.json").read_text())
    ckpt.write_iteration(tmp_path, params, S, P, prefix=ckpt.source_prefix(it), common=common)
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(it))
    for f in sorted(os.listdir(it)):
        assert (tmp_path / f).read_bytes() == (it / f).read_bytes(), f


@pytest.mark.parametrize("exp_dir", EXPECTED, ids=lambda p: p.name)
def test_reference_oracle_matches_expected(exp_dir):
    """ckpt.expected_for (docs/FORMAT.md §4 layout math + §5 target rules) reproduces expected/."""
    fx, target = split_expected_name(exp_dir)
    _, params, S, P = source_of(fx)
    exp = ckpt.expected_for(params, S, P, target)
    assert sorted(os.listdir(exp_dir)) == sorted(f"rank-{r}.safetensors" for r in range(exp.world))
    for r in range(exp.world):
        got = load_tensors(exp_dir / f"rank-{r}.safetensors")
        want = exp.rank_tensors(r)
        assert set(got) == set(want), r
        for n, (dt, arr) in want.items():
            assert got[n] == (dt, arr.tobytes(), list(arr.shape)), (r, n)


def test_reference_layout_math_examples():
    # docs/FORMAT.md §4.6 example: dp=2 x tp=2, tensor_map [-1, 0] on [64, 64]
    lay = ckpt.make_layout([2, 2], [-1, 0], ["dp", "tp"], [4, 5, 6, 7])
    assert ckpt.splits(lay, [64, 64]) == [1, 2]
    assert [ckpt.rank_box(lay, [64, 64], i) for i in range(4)] == [
        ((0, 64), (0, 32)),
        ((0, 64), (32, 64)),
        ((0, 64), (0, 32)),
        ((0, 64), (32, 64)),
    ]
    assert [ckpt.replica_id(lay, i) for i in range(4)] == [0, 0, 1, 1]
    assert ckpt.rank_groups(lay, [64, 64]) == {0: [4, 6], 1: [5, 7]}
    # nested map: first listed most significant
    lay = ckpt.make_layout([2, 3], [[1, 0], -1], ["a", "b"], range(6))
    assert ckpt.splits(lay, [12, 5]) == [6, 1]
    assert [ckpt.rank_box(lay, [12, 5], i)[0] for i in range(6)] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    lay = ckpt.make_layout([2, 3], [[0, 1], -1], ["a", "b"], range(6))
    # axis b (value 0) most significant: position (a, b) -> slice b*2 + a
    assert [ckpt.grid_index(lay, i) for i in range(6)] == [0, 2, 4, 1, 3, 5]
    # chunk grid index: k unravelled over axis_fragmentations
    assert ckpt.chunk_box([12, 6], [2, 3], 4, [6, 2]) == ((6, 12), (2, 4))
    assert ckpt.shard_key("w", 3) == "('w', (3,))"
    assert ckpt.shard_key("it's", 0) == "(\"it's\", (0,))"
    assert ckpt.parse_shard_key("(\"it's\", (0,))") == ("it's", 0)


# ---------------------------------------------------------------------------
# Against the binary
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory, reshardfs_bin):
    """Export each fixture root once per expected target; cached across tests."""
    cache = {}

    def get(exp_dir):
        if exp_dir not in cache:
            fx, target = split_expected_name(exp_dir)
            dest = tmp_path_factory.mktemp("export") / "out"
            run = ckpt.export(FIXTURES / fx, dest, target.args(None))
            cache[exp_dir] = (run, dest)
        return cache[exp_dir]

    return get


@pytest.mark.parametrize("exp_dir", EXPECTED, ids=lambda p: p.name)
def test_export_matches_expected(exp_dir, exports):
    fx, target = split_expected_name(exp_dir)
    run, dest = exports(exp_dir)
    assert run.code == 0, str(run)
    it = ckpt.resolve_iteration(FIXTURES / fx)
    # root layout: tracker + one iteration folder
    assert sorted(os.listdir(dest)) == sorted([TRACKER, it.name])
    assert (dest / TRACKER).read_bytes() == (FIXTURES / fx / TRACKER).read_bytes()
    out = dest / it.name
    prefix = ckpt.source_prefix(it)
    kinds = [k for k in ("model", "opt") if ckpt.rank_files(it, (k,))]
    world = len(os.listdir(exp_dir))
    want_files = {"metadata.json", "common.json"} | {
        ckpt.file_name(prefix, k, r, world) for k in kinds for r in range(world)
    }
    assert set(os.listdir(out)) == want_files
    for r in range(world):
        want = load_tensors(exp_dir / f"rank-{r}.safetensors")
        got = rank_union(out, prefix, r, world, kinds)
        assert sorted(got) == sorted(want), f"rank {r} tensor names"
        for n in want:
            assert got[n][0] == want[n][0], f"rank {r} {n} dtype"
            assert got[n][2] == want[n][2], f"rank {r} {n} shape"
            assert got[n][1] == want[n][1], f"rank {r} {n} bytes"


@pytest.mark.parametrize("exp_dir", EXPECTED, ids=lambda p: p.name)
def test_export_files_well_formed(exp_dir, exports):
    fx, target = split_expected_name(exp_dir)
    run, dest = exports(exp_dir)
    assert run.code == 0, str(run)
    it = ckpt.resolve_iteration(FIXTURES / fx)
    out = dest / it.name
    assert (out / "common.json").read_bytes() == (it / "common.json").read_bytes()
    problems = []
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            problems += ckpt.format_problems(ckpt.read_safetensors(out / f))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("exp_dir", EXPECTED, ids=lambda p: p.name)
def test_export_metadata_consistent(exp_dir, exports):
    fx, target = split_expected_name(exp_dir)
    run, dest = exports(exp_dir)
    assert run.code == 0, str(run)
    it, params, S, P = source_of(fx)
    exp = ckpt.expected_for(params, S, P, target)
    problems = ckpt.check_export_iteration(dest / it.name, it, exp, ckpt.source_prefix(it))
    assert not problems, "\n".join(problems[:40])


IDENTITY = [("tp4-f32", "tp=4"), ("gpt-dp2-tp2-pp2-bf16", "dp=2,tp=2"), ("gpt-dp2-tp2-pp2-bf16", "tp=2,pp=2")]


@pytest.mark.parametrize("fx,tname", IDENTITY, ids=lambda v: v)
def test_identity_export_is_byte_identical(fx, tname, tmp_path, reshardfs_bin):
    """Target = source strategy: rank files come out byte-identical (cmp) to the source's."""
    it, params, S, P = source_of(fx)
    target = ckpt.parse_target_name(tname)
    out = tmp_path / "out"
    run = ckpt.export(it, out, target.args(None))
    assert run.code == 0, str(run)
    src_files = sorted(f for f in os.listdir(it) if f.endswith(".safetensors"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == src_files
    for f in src_files:
        assert (out / f).read_bytes() == (it / f).read_bytes(), f"{f} differs from the source (cmp)"
    exp = ckpt.expected_for(params, S, P, target)
    problems = ckpt.check_export_iteration(out, it, exp, ckpt.source_prefix(it))
    assert not problems, "\n".join(problems[:40])


OTHER_TARGETS = [
    ("gpt-dp2-tp2-pp2-bf16", "unshard"),
    ("gpt-dp2-tp2-pp2-bf16", "pp=1"),
    ("gpt-dp2-tp2-pp2-bf16", "dp=1,tp=1,pp=2"),
    ("gpt-dp2-tp2-pp2-bf16", "dp=4,tp=1"),
    ("tp4-f32", "pp=2"),
    ("tp4-f32", "dp=2,tp=2,pp=2"),
    ("tp4-f32", "unshard"),
]


@pytest.mark.parametrize("fx,tname", OTHER_TARGETS, ids=lambda v: v)
def test_export_other_targets(fx, tname, tmp_path, reshardfs_bin):
    """Targets without expected/ files, checked against the Python oracle."""
    it, params, S, P = source_of(fx)
    target = ckpt.parse_target_name(tname)
    run = ckpt.export(it, tmp_path / "out", target.args(None))
    assert run.code == 0, str(run)
    exp = ckpt.expected_for(params, S, P, target)
    problems = ckpt.check_export_iteration(tmp_path / "out", it, exp, ckpt.source_prefix(it))
    assert not problems, f"{run.cmd()}\n" + "\n".join(problems[:40])


def test_export_strategy_from_fixture_metadata(tmp_path, reshardfs_bin):
    """--strategy FILE with a fixture's own metadata.json reproduces its rank files
    (root and iteration-folder sources)."""
    gpt = ckpt.resolve_iteration(FIXTURES / "gpt-dp2-tp2-pp2-bf16")
    tp4 = ckpt.resolve_iteration(FIXTURES / "tp4-f32")
    for src, strat, ref in ((FIXTURES / "tp4-f32", tp4, tp4), (gpt, gpt, gpt)):
        out = tmp_path / f"out-{strat.parent.name}"
        run = ckpt.export(src, out, ["--strategy", str(strat / "metadata.json")])
        assert run.code == 0, str(run)
        if (out / TRACKER).exists():
            out = out / ref.name
        for f in sorted(os.listdir(ref)):
            if f.endswith(".safetensors"):
                assert (out / f).read_bytes() == (ref / f).read_bytes(), f"{run.cmd()}: {f}"


@pytest.mark.parametrize("style", ["single", "index"])
def test_export_plain_safetensors_folder(style, tmp_path, reshardfs_bin):
    """A folder of whole tensors without metadata.json (docs/FORMAT.md §7.1), resharded with
    --strategy = the tp4 fixture's metadata.json, gives the tp4 fixture's rank files."""
    src4 = ckpt.resolve_iteration(FIXTURES / "tp4-f32")
    params, S, P = ckpt.load_checkpoint(src4)
    plain = tmp_path / "plain"
    plain.mkdir()
    whole = {p.name: (p.dtype, p.array) for p in params}
    if style == "single":
        ckpt.write_safetensors(plain / "model.safetensors", whole)
    else:
        names = sorted(whole)
        parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                 "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
        wm = {}
        for fn, ns in parts.items():
            ckpt.write_safetensors(plain / fn, {n: whole[n] for n in ns}, metadata={"format": "pt"})
            wm.update({n: fn for n in ns})
        (plain / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    run = ckpt.export(plain, tmp_path / "out", ["--strategy", str(src4 / "metadata.json")])
    assert run.code == 0, str(run)
    out = tmp_path / "out"
    for f in sorted(os.listdir(src4)):
        if f.endswith(".safetensors"):
            assert (out / f).read_bytes() == (src4 / f).read_bytes(), f
    # unshard of the plain folder: one rank holding everything whole
    run = ckpt.export(plain, tmp_path / "out1", ["--unshard"])
    assert run.code == 0, str(run)
    got = load_tensors(tmp_path / "out1" / "model-0000000-0000001.safetensors")
    assert sorted(got) == sorted(whole)
    for n, (dt, arr) in whole.items():
        assert got[n] == (dt, arr.tobytes(), list(arr.shape)), n


def test_export_iteration_folder_writes_directly(tmp_path, reshardfs_bin):
    it = ckpt.resolve_iteration(FIXTURES / "tp4-f32")
    run = ckpt.export(it, tmp_path / "out", ["--mesh", "tp=2"])
    assert run.code == 0, str(run)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["metadata.json", "common.json", "model-0000000-0000002.safetensors", "model-0000001-0000002.safetensors"]
    )


def test_export_force_replaces_previous_export(tmp_path, reshardfs_bin):
    """--force over an earlier export of another world size: DEST then holds exactly the new
    export (no stale rank files of the old world next to the new metadata.json)."""
    dest = tmp_path / "out"
    run = ckpt.export(FIXTURES / "tp4-f32", dest, ["--mesh", "tp=4"])
    assert run.code == 0, str(run)
    run = ckpt.export(FIXTURES / "tp4-f32", dest, ["--mesh", "tp=2"], force=True)
    assert run.code == 0, str(run)
    it = ckpt.resolve_iteration(FIXTURES / "tp4-f32")
    assert sorted(os.listdir(dest)) == sorted([TRACKER, it.name])
    params, S, P = ckpt.load_checkpoint(it)
    exp = ckpt.expected_for(params, S, P, ckpt.parse_target_name("tp=2"))
    problems = ckpt.check_export_iteration(dest / it.name, it, exp, None)
    assert not problems, f"{run.cmd()}\n" + "\n".join(problems[:40])


def test_export_into_existing_empty_dest(tmp_path, reshardfs_bin):
    dest = tmp_path / "out"
    dest.mkdir()
    it = ckpt.resolve_iteration(FIXTURES / "gpt-dp2-tp2-pp2-bf16")
    run = ckpt.export(it, dest, ["--mesh", "tp=1"])
    assert run.code == 0, str(run)
    params, S, P = ckpt.load_checkpoint(it)
    exp = ckpt.expected_for(params, S, P, ckpt.parse_target_name("tp=1"))
    problems = ckpt.check_export_iteration(dest, it, exp, "gpt")
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("tname", ["pp=2", "unshard"])
def test_export_plain_folder_pp(tname, tmp_path, reshardfs_bin):
    """Plain safetensors (no metadata.json): every tensor whole on one rank (S = 1); --pp N
    spreads the layers over N single-rank stages."""
    it = ckpt.resolve_iteration(FIXTURES / "gpt-dp2-tp2-pp2-bf16")
    params, _, _ = ckpt.load_checkpoint(it)
    plain = tmp_path / "plain"
    plain.mkdir()
    model = [ckpt.Param(p.name, p.dtype, p.array, None, 0, "model") for p in params if p.kind == "model"]
    ckpt.write_safetensors(plain / "model.safetensors", {p.name: (p.dtype, p.array) for p in model})
    target = ckpt.parse_target_name(tname)
    run = ckpt.export(plain, tmp_path / "out", target.args(None))
    assert run.code == 0, str(run)
    exp = ckpt.expected_for(model, 1, 1, target)
    problems = ckpt.check_export_iteration(tmp_path / "out", plain, exp, None)
    assert not problems, f"{run.cmd()}\n" + "\n".join(problems[:40])


@pytest.mark.parametrize("fx", SOURCES)
def test_inspect_and_plan(fx, reshardfs_bin):
    src = FIXTURES / fx
    for args in (["inspect", src], ["inspect", src, "--json"], ["plan", src, "--unshard"],
                 ["plan", src, "--mesh", "tp=1", "--json"], ["plan", ckpt.resolve_iteration(src), "--pp", "2"]):
        run = ckpt.run_cli(args)
        assert run.code == 0, str(run)
        assert run.stdout.strip(), str(run)
        if "--json" in args:
            json.loads(run.stdout)


def st_header(path) -> tuple[int, dict]:
    """(header bytes including the length prefix, header JSON) of a safetensors file."""
    b = Path(path).read_bytes()
    n = int.from_bytes(b[:8], "little")
    return 8 + n, json.loads(b[8:8 + n])


@pytest.mark.parametrize("fx", SOURCES)
def test_inspect_json_describes_the_source(fx, reshardfs_bin):
    """`inspect --json` against the source's own metadata.json (read here): every tensor with its
    dtype and global shape, the world and stage count, the files."""
    src = FIXTURES / fx
    it = ckpt.resolve_iteration(src)
    meta = json.loads((it / "metadata.json").read_text())["state_dict_metadata"]
    run = ckpt.run_cli(["inspect", src, "--json"])
    assert run.code == 0, str(run)
    got = json.loads(run.stdout)
    [gi] = [i for i in got["iterations"] if i["name"] == it.name]
    files = sorted(f for f in os.listdir(it) if f.endswith(".safetensors"))
    assert gi["files"] == len(files), f"inspect counts {gi['files']} files, the folder has {len(files)}"
    world = max(int(f.rsplit("-", 1)[1].split(".")[0]) for f in files)
    assert gi["world"] == world, f"world {gi['world']}, the file names say {world}"
    tensors = {t["name"]: t for t in gi["tensors"]}
    assert sorted(tensors) == sorted(meta), "inspect lists other tensors than metadata.json"
    for name, m in meta.items():
        t = tensors[name]
        assert t["global_shape"] == m["global_shape"], f"{name}: shape {t['global_shape']}, want {m['global_shape']}"
        if m["layout"] is not None:
            assert t["rank_list"] == m["layout"]["rank_list"], f"{name}: rank_list"
    # Each tensor's bytes once (global shape x element size), by the kind of file holding it.
    size_of = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}
    kind = {}
    for f in files:
        _, h = st_header(it / f)
        for k, v in h.items():
            if k != "__metadata__":
                kind[k] = ("opt" if "opt-" in f else "model", size_of[v["dtype"]])
    data = {"model": 0, "opt": 0}
    for name, m in meta.items():
        k, es = kind[name]
        data[k] += int(np.prod(m["global_shape"], dtype=np.int64)) * es
    assert (gi["model_bytes"], gi["opt_bytes"]) == (data["model"], data["opt"]), \
        f"inspect: model/opt bytes {gi['model_bytes']}/{gi['opt_bytes']}, the tensors' sizes say {data}"


@pytest.mark.parametrize("fx", SOURCES)
def test_plan_json_matches_the_export(fx, tmp_path, reshardfs_bin):
    """`plan --json` against the files `export` writes for the same target, read here: the same
    file names and sizes, each tensor's offset and length where the file's own header puts it."""
    src = FIXTURES / fx
    target = ["--unshard"]
    run = ckpt.run_cli(["plan", src, *target, "--json"])
    assert run.code == 0, str(run)
    plan = json.loads(run.stdout)
    out = tmp_path / "out"
    ex = ckpt.export(src, out, target)
    assert ex.code == 0, str(ex)
    for pi in plan["iterations"]:
        d = out / pi["name"] if (out / pi["name"]).is_dir() else out
        written = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        assert sorted(f["name"] for f in pi["files"]) == written, f"{pi['name']}: plan names other files"
        for f in pi["files"]:
            path = d / f["name"]
            assert f["size"] == path.stat().st_size, f"{f['name']}: plan says {f['size']} bytes, export wrote {path.stat().st_size}"
            hb, header = st_header(path)
            assert f["header_bytes"] == hb, f"{f['name']}: header_bytes {f['header_bytes']}, the file's {hb}"
            assert sorted(t["name"] for t in f["tensors"]) == sorted(k for k in header if k != "__metadata__")
            for t in f["tensors"]:
                a, b = header[t["name"]]["data_offsets"]
                assert (t["offset"], t["bytes"]) == (hb + a, b - a), f"{f['name']}: {t['name']}: offset/bytes"
                assert t["shape"] == header[t["name"]]["shape"], f"{f['name']}: {t['name']}: shape"
                assert sum(p["bytes"] for p in t["pieces"]) == t["bytes"], f"{t['name']}: pieces do not tile it"


def test_strategy_of_a_model_only_job_places_optimizer_states(tmp_path, reshardfs_bin):
    """--strategy from a job saved without optimizer states (its layouts name no adam_m./adam_v.
    tensor) on a checkpoint with them: each state takes its parameter's layout, as in MindSpore
    Transformers. GPT under the model-only layouts of dp=1,tp=4,pp=1 (written by the oracle)
    must hold exactly what MindSpore Transformers' own reshard wrote for that strategy, Adam
    states included; and GPT's own metadata.json stripped of its states reproduces its rank files."""
    it, params, S, P = source_of("gpt-dp2-tp2-pp2-bf16")
    exp_dir = FIXTURES / "expected" / "gpt-dp2-tp2-pp2-bf16.dp=1,tp=4,pp=1"
    exp = ckpt.expected_for(params, S, P, ckpt.parse_target_name("dp=1,tp=4,pp=1"))
    layouts = {n: p.layout for n, p in exp.params.items() if p.kind == "model"}
    assert len(layouts) < len(exp.params), "the fixture must have optimizer states"
    (tmp_path / "model-only.json").write_text(json.dumps(layouts))
    out = tmp_path / "out"
    run = ckpt.export(it, out, ["--strategy", tmp_path / "model-only.json"])
    assert run.code == 0, str(run)
    prefix, world = ckpt.source_prefix(it), len(os.listdir(exp_dir))
    for r in range(world):
        want = load_tensors(exp_dir / f"rank-{r}.safetensors")
        assert any(n.startswith("adam_") for n in want)
        assert rank_union(out, prefix, r, world, ("model", "opt")) == want, f"rank {r}"

    meta = json.loads((it / "metadata.json").read_text())
    meta["state_dict_metadata"] = {n: v for n, v in meta["state_dict_metadata"].items() if not n.startswith("adam_")}
    meta["storage_data"] = {k: v for k, v in meta["storage_data"].items() if "adam_" not in k}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    run = ckpt.export(it, tmp_path / "same", ["--strategy", tmp_path / "metadata.json"])
    assert run.code == 0, str(run)
    for f in sorted(os.listdir(it)):
        if f.endswith(".safetensors"):
            assert (tmp_path / "same" / f).read_bytes() == (it / f).read_bytes(), f
