"""Independent Python reference for reshardfs integration tests.

Everything here is written from docs/FORMAT.md (and the real
fixtures), *not* from the Rust sources, so that it can serve as the reference
the Rust code is checked against.

Contents
  (a) a minimal safetensors reader/writer working on raw bytes (BF16 is kept as
      uint16 arrays, every other dtype as its little-endian numpy dtype);
  (b) the Checkpoint 2.0 layout math (device matrix, tensor map, slices, grid
      index of chunks, replica ids, rank groups);
  (c) a Checkpoint 2.0 writer (metadata.json / common.json / tracker / rank
      files, normal and remove_redundancy saves) and a reader that reassembles
      full tensors from a checkpoint;
  (d) the "oracle": what every rank of a target strategy must hold;
  (e) helpers to run the CLI and to verify an exported checkpoint.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
TRACKER = "latest_checkpointed_iteration.txt"

# --------------------------------------------------------------------------
# (a) safetensors
# --------------------------------------------------------------------------

# safetensors dtype name -> numpy storage dtype (little endian). BF16 and the
# F8 types have no numpy dtype: their raw bits are kept in unsigned ints.
NP_DTYPES = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}

# safetensors dtype name -> MindSpore dtype name as found in metadata.json
MS_DTYPES = {
    "BOOL": "Bool",
    "U8": "UInt8",
    "I8": "Int8",
    "U16": "UInt16",
    "I16": "Int16",
    "F16": "Float16",
    "BF16": "BFloat16",
    "U32": "UInt32",
    "I32": "Int32",
    "F32": "Float32",
    "U64": "UInt64",
    "I64": "Int64",
    "F64": "Float64",
}

MS_METADATA = {"format": "ms"}


class SafetensorsError(Exception):
    pass


@dataclass
class SafeFile:
    path: str
    header_len: int
    header_raw: bytes  # the header bytes, padding included
    header: dict  # parsed header, in file order
    metadata: dict | None
    tensors: dict  # name -> (dtype, ndarray)

    def names(self):
        return list(self.tensors)


def as_storage(dtype: str, array) -> np.ndarray:
    """The array in the storage dtype for `dtype`, C-contiguous, little endian."""
    # (np.ascontiguousarray would turn a 0-d array into shape [1])
    return np.array(array, dtype=NP_DTYPES[dtype], order="C")


def safetensors_bytes(tensors: dict, metadata: dict | None = MS_METADATA) -> bytes:
    """Serialise {name: (dtype, array)}: keys sorted, header padded with spaces to 8."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs = []
    off = 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        arr = as_storage(dtype, arr)
        b = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def write_safetensors(path, tensors: dict, metadata: dict | None = MS_METADATA):
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))


def parse_safetensors(buf: bytes, path: str = "<bytes>") -> SafeFile:
    """Strictly parse a safetensors file (the checks the reference library makes)."""
    if len(buf) < 8:
        raise SafetensorsError(f"{path}: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise SafetensorsError(f"{path}: header length {n} past end of file ({len(buf)} bytes)")
    raw = buf[8 : 8 + n]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not JSON: {e}")
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    data = buf[8 + n :]
    metadata = header.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{path}: tensor {name!r}: bad entry {info!r}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in NP_DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise SafetensorsError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise SafetensorsError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * NP_DTYPES[dtype].itemsize
        if offs[1] - offs[0] != nbytes:
            raise SafetensorsError(
                f"{path}: tensor {name!r}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, "
                f"dtype {dtype} shape {shape} needs {nbytes}"
            )
        entries.append((offs[0], offs[1], name, dtype, shape))
    entries.sort()
    pos = 0
    for s, e, name, _, _ in entries:
        if s != pos:
            raise SafetensorsError(f"{path}: tensor {name!r}: data not contiguous (starts {s}, expected {pos})")
        pos = e
    if pos != len(data):
        raise SafetensorsError(f"{path}: data section has {len(data)} bytes, tensors cover {pos}")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        dt = NP_DTYPES[info["dtype"]]
        arr = np.frombuffer(data, dtype=dt, count=(e - s) // dt.itemsize, offset=s).reshape(info["shape"])
        tensors[name] = (info["dtype"], arr)
    return SafeFile(str(path), n, raw, header, metadata, tensors)


def read_safetensors(path) -> SafeFile:
    return parse_safetensors(Path(path).read_bytes(), str(path))


def format_problems(sf: SafeFile) -> list[str]:
    """Formatting rules of docs/FORMAT.md §2 beyond validity."""
    probs = []
    if sf.header_len % 8:
        probs.append(f"{sf.path}: header length {sf.header_len} not a multiple of 8")
    if sf.metadata != MS_METADATA:
        probs.append(f"{sf.path}: __metadata__ is {sf.metadata!r}, expected {MS_METADATA!r}")
    names = [k for k in sf.header if k != "__metadata__"]
    if names != sorted(names):
        probs.append(f"{sf.path}: tensor keys not sorted")
    stripped = sf.header_raw.rstrip(b" ")
    if not stripped.endswith(b"}"):
        probs.append(f"{sf.path}: header padded with something other than spaces")
    return probs


# --------------------------------------------------------------------------
# (b) layout math (docs/FORMAT.md §3, §4)
# --------------------------------------------------------------------------


class LayoutError(Exception):
    pass


def unravel(k: int, dims) -> list[int]:
    out = []
    for d in reversed(list(dims)):
        out.append(k % d)
        k //= d
    return out[::-1]


def ravel(idx, dims) -> int:
    k = 0
    for i, d in zip(idx, dims):
        k = k * d + i
    return k


def is_whole(layout) -> bool:
    """A null layout or one whose tensor map is all -1: every holder has the whole tensor."""
    if layout is None:
        return True
    ndev = len(layout["device_matrix"])
    return all(not tm_axes(e, ndev) for e in layout["tensor_map"])


def tm_axes(entry, ndev: int) -> list[int]:
    """Device axes (indices into device_matrix) of one tensor_map entry, most significant first."""
    vals = entry if isinstance(entry, list) else [entry]
    axes = []
    for v in vals:
        if v == -1:
            continue
        if not isinstance(v, int) or not 0 <= v < ndev:
            raise LayoutError(f"tensor_map value {v!r} out of range for {ndev} device axes")
        axes.append(ndev - 1 - v)
    return axes


def dim_axes(layout) -> list[list[int]]:
    ndev = len(layout["device_matrix"])
    return [tm_axes(e, ndev) for e in layout["tensor_map"]]


def stage_size(layout) -> int:
    return math.prod(layout["device_matrix"])


def splits(layout, shape) -> list[int]:
    """axis_fragmentations: how many slices each dimension is cut into."""
    if layout is None:
        return [1] * len(shape)
    dm = layout["device_matrix"]
    if len(layout["tensor_map"]) != len(shape):
        raise LayoutError(f"tensor_map {layout['tensor_map']} has {len(layout['tensor_map'])} entries, shape {list(shape)}")
    return [math.prod(dm[a] for a in axes) for axes in dim_axes(layout)]


def check_divisible(layout, shape, name="tensor"):
    for d, (n, s) in enumerate(zip(shape, splits(layout, shape))):
        if n % s:
            raise LayoutError(f"{name}: dimension {d} of size {n} does not split {s} ways")


def divides(layout, shape) -> bool:
    try:
        check_divisible(layout, shape)
        return True
    except LayoutError:
        return False


def slice_ids(layout, i: int) -> list[int]:
    """Per dimension, which slice the device at position i of rank_list holds."""
    dm = layout["device_matrix"]
    c = unravel(i, dm)
    out = []
    for axes in dim_axes(layout):
        sid = 0
        for a in axes:
            sid = sid * dm[a] + c[a]
        out.append(sid)
    return out


def rank_box(layout, shape, i: int) -> tuple:
    """((start, stop), ...) of the slice held by position i of the layout's rank_list."""
    if layout is None:
        return tuple((0, n) for n in shape)
    sp = splits(layout, shape)
    box = []
    for n, s, sid in zip(shape, sp, slice_ids(layout, i)):
        if n % s:
            raise LayoutError(f"dimension of size {n} does not split {s} ways")
        size = n // s
        box.append((sid * size, sid * size + size))
    return tuple(box)


def grid_index(layout, i: int) -> int:
    """The chunk number k (global_offset [k]) of position i's slice."""
    if layout is None:
        return 0
    sp = [math.prod(layout["device_matrix"][a] for a in axes) for axes in dim_axes(layout)]
    return ravel(slice_ids(layout, i), sp)


def replica_id(layout, i: int) -> int:
    """Which copy of its slice position i holds: mixed radix over the unmapped axes."""
    dm = layout["device_matrix"]
    used = {a for axes in dim_axes(layout) for a in axes}
    c = unravel(i, dm)
    rid = 0
    for a, n in enumerate(dm):
        if a not in used:
            rid = rid * n + c[a]
    return rid


def rank_groups(layout, shape) -> dict[int, list[int]]:
    """chunk k -> sorted global ranks holding it."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(layout["rank_list"]):
        groups.setdefault(grid_index(layout, i), []).append(r)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def chunk_box(global_shape, frags, k: int, local_shape) -> tuple:
    """Box of chunk {"global_offset": [k], "local_shape": local_shape} (docs/FORMAT.md §3.1)."""
    idx = unravel(k, frags)
    return tuple(
        (i * n // f, i * n // f + l) for i, n, f, l in zip(idx, global_shape, frags, local_shape)
    )


def box_slices(box) -> tuple:
    return tuple(slice(a, b) for a, b in box)


def take(array: np.ndarray, box) -> np.ndarray:
    return np.array(array[box_slices(box) + (Ellipsis,)], order="C")


def make_layout(device_matrix, tensor_map, alias_name, rank_list, interleaved=False) -> dict:
    return {
        "device_matrix": list(device_matrix),
        "tensor_map": [list(e) if isinstance(e, (list, tuple)) else e for e in tensor_map],
        "interleaved_parallel": interleaved,
        "alias_name": list(alias_name),
        "rank_list": list(rank_list),
    }


def shard_key(name: str, k: int) -> str:
    """storage_data key: the Python repr of (name, (k,))."""
    return repr((name, (k,)))


def parse_shard_key(key: str) -> tuple[str, int]:
    v = ast.literal_eval(key)
    if not (
        isinstance(v, tuple)
        and len(v) == 2
        and isinstance(v[0], str)
        and isinstance(v[1], tuple)
        and len(v[1]) == 1
        and isinstance(v[1][0], int)
    ):
        raise ValueError(f"not a shard id: {key!r}")
    return v[0], v[1][0]


LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def on_last_stage(name: str) -> bool:
    """A MindFormers job keeps the final norm and the output layer (and their adam_m./adam_v.
    states) on its last pipeline stage."""
    for pre in ("adam_m.", "adam_v."):
        if name.startswith(pre):
            name = name[len(pre):]
            break
    return name.startswith(("decoder.final_layernorm.", "output_layer."))


def layer_of(name: str):
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------
# (c) checkpoint writer / reader
# --------------------------------------------------------------------------


@dataclass
class Param:
    """One tensor of a checkpoint, whole, with where it lives."""

    name: str
    dtype: str  # safetensors dtype name
    array: np.ndarray  # the full tensor in its storage dtype
    layout: dict | None  # MindSpore layout incl. rank_list, or None (held whole)
    stage: int  # pipeline stage (used for null layouts; must match rank_list otherwise)
    kind: str = "model"  # "model" or "opt"
    ms_dtype: str | None = None  # properties.dtype override (e.g. "bfloat16")
    store_whole: bool = False  # rank files hold the whole tensor instead of the slice (docs/FORMAT.md §2.2)

    @property
    def shape(self):
        return list(self.array.shape)


def holders(p: Param, stage_sz: int) -> dict[int, tuple]:
    """global rank -> box of the slice it holds."""
    if p.layout is None:
        return {r: rank_box(None, p.shape, 0) for r in range(p.stage * stage_sz, (p.stage + 1) * stage_sz)}
    return {r: rank_box(p.layout, p.shape, i) for i, r in enumerate(p.layout["rank_list"])}


def file_name(prefix: str | None, kind: str, idx: int, total: int) -> str:
    pfx = f"{prefix}-" if prefix else ""
    return f"{pfx}{kind}-{idx:07d}-{total:07d}.safetensors"


def tensor_metadata(p: Param) -> dict:
    shape = p.shape
    if p.layout is not None:
        check_divisible(p.layout, shape, p.name)
        frags = splits(p.layout, shape)
        rids = [replica_id(p.layout, i) for i in range(len(p.layout["rank_list"]))]
        ks = sorted(rank_groups(p.layout, shape))
        local = [n // f for n, f in zip(shape, frags)]
        chunks = [{"global_offset": [k], "local_shape": list(local)} for k in ks]
        layout = make_layout(
            p.layout["device_matrix"],
            p.layout["tensor_map"],
            p.layout["alias_name"],
            p.layout["rank_list"],
            p.layout.get("interleaved_parallel", False),
        )
    else:
        frags = [1] * len(shape)
        rids = [0]
        chunks = [{"global_offset": [0], "local_shape": list(shape)}]
        layout = None
    return {
        "properties": {
            "dtype": p.ms_dtype or MS_DTYPES[p.dtype],
            "replica_id": rids,
            "allow_shape_mismatch": False,
            "allow_to_save": True,
        },
        "global_shape": list(shape),
        "axis_fragmentations": frags,
        "layout": layout,
        "chunk": chunks,
    }


def plan_files(params, stage_sz, world, prefix=None, remove_redundancy=False, rng=None, rank_group=True):
    """-> (storage_data, files) with files = {file name: {tensor name: (dtype, slice)}}.

    Normal save: one file per rank and kind, idx = rank, total = world; one
    storage entry per holding rank.  remove_redundancy: one holder per slice
    (chosen with rng among its rank group, else the first), idx counts ranks
    with at least one slice of that kind, total = that count.
    """
    kinds = [k for k in ("model", "opt") if any(p.kind == k for p in params)]
    storage: dict[str, list] = {}
    files: dict[str, dict] = {}
    for kind in kinds:
        kparams = [p for p in params if p.kind == kind]
        # rank -> [(param, k, box, group)]
        per_rank: dict[int, list] = {}
        for p in kparams:
            if p.layout is None:
                groups = {0: sorted(holders(p, stage_sz))}
            else:
                groups = rank_groups(p.layout, p.shape)
            boxes = holders(p, stage_sz)
            for k, group in groups.items():
                if remove_redundancy:
                    chosen = [group[int(rng.integers(len(group)))] if rng is not None else group[0]]
                else:
                    chosen = group
                for r in chosen:
                    per_rank.setdefault(r, []).append((p, k, boxes[r], group))
        if remove_redundancy:
            ranks = sorted(per_rank)
            fname = {r: file_name(prefix, kind, i, len(ranks)) for i, r in enumerate(ranks)}
        else:
            ranks = list(range(world))
            fname = {r: file_name(prefix, kind, r, world) for r in ranks}
        order = {p.name: i for i, p in enumerate(kparams)}
        for r in ranks:
            held = sorted(per_rank.get(r, []), key=lambda t: order[t[0].name])
            files[fname[r]] = {p.name: (p.dtype, p.array if p.store_whole else take(p.array, box)) for p, _, box, _ in held}
            for p, k, _, group in held:
                entry = {"file_name": fname[r], "storage_rank": r}
                if rank_group:
                    entry["rank_group"] = list(group)
                storage.setdefault(shard_key(p.name, k), []).append(entry)
    return storage, files


def build_metadata(params, stage_sz, world, prefix=None, remove_redundancy=False, rng=None, rank_group=True):
    sdm = {p.name: tensor_metadata(p) for p in params}
    storage, files = plan_files(params, stage_sz, world, prefix, remove_redundancy, rng, rank_group)
    return {"state_dict_metadata": sdm, "storage_data": storage}, files


def dumps_metadata(meta) -> str:
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=False)


DEFAULT_COMMON = {
    "epoch_num": 1,
    "step_num": 1,
    "global_step": 1,
    "loss_scale": 1.0,
    "global_batch_size": 64,
    "consumed_samples": 64,
    "ckpt_status": 0,
}


def write_iteration(
    folder,
    params,
    stage_sz,
    num_stages,
    prefix=None,
    remove_redundancy=False,
    rng=None,
    common: dict | None = None,
    with_metadata=True,
    rank_group=True,
):
    """Write one iteration folder as MindFormers would. Returns the metadata dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = stage_sz * num_stages
    meta, files = build_metadata(params, stage_sz, world, prefix, remove_redundancy, rng, rank_group)
    for fname, tensors in files.items():
        write_safetensors(folder / fname, tensors)
    if with_metadata:
        (folder / "metadata.json").write_text(dumps_metadata(meta), encoding="utf-8")
    (folder / "common.json").write_text(json.dumps(common or DEFAULT_COMMON, indent=4))
    return meta


def iteration_dir_name(it: int) -> str:
    return f"iteration_{it:08d}"


def write_tracker(root, it: int, newline=False):
    Path(root, TRACKER).write_text(str(it) + ("\n" if newline else ""))


# ---- reader: reassemble full tensors from a checkpoint ---------------------


def resolve_iteration(src) -> Path:
    src = Path(src)
    if (src / TRACKER).exists():
        it = int((src / TRACKER).read_text().strip())
        return src / iteration_dir_name(it)
    return src


def load_checkpoint(iter_dir) -> tuple[list[Param], int, int]:
    """Reassemble every tensor of a Checkpoint 2.0 iteration folder.

    Returns (params, stage size S, number of stages).  Uses storage_data to find
    each chunk and the grid-index chunk math to place it.
    """
    iter_dir = Path(iter_dir)
    meta = json.loads((iter_dir / "metadata.json").read_text())
    sdm, storage = meta["state_dict_metadata"], meta["storage_data"]
    cache: dict[str, SafeFile] = {}

    def open_file(fn):
        if fn not in cache:
            cache[fn] = read_safetensors(iter_dir / fn)
        return cache[fn]

    by_name: dict[str, dict[int, list]] = {}
    for key, entries in storage.items():
        name, k = parse_shard_key(key)
        by_name.setdefault(name, {})[k] = entries
    sizes = {stage_size(m["layout"]) for m in sdm.values() if m["layout"] is not None}
    assert len(sizes) <= 1, f"mixed stage sizes {sizes}"
    S = sizes.pop() if sizes else 1
    params = []
    all_ranks = set()
    for name, m in sdm.items():
        shape = m["global_shape"]
        frags = m["axis_fragmentations"]
        full = None
        dtype = None
        kind = None
        ranks = set()
        for ch in m["chunk"]:
            (k,) = ch["global_offset"]
            entries = by_name[name][k]
            e = entries[0]
            sf = open_file(e["file_name"])
            dt, arr = sf.tensors[name]
            for e2 in entries:
                ranks.add(e2["storage_rank"])
                ranks.update(e2.get("rank_group", []))
            if full is None:
                dtype = dt
                full = np.zeros(shape, dtype=NP_DTYPES[dt])
                kind = "opt" if "-opt-" in "-" + e["file_name"] else "model"
            if list(arr.shape) == list(shape):
                box = tuple((0, n) for n in shape)
            else:
                box = chunk_box(shape, frags, k, ch["local_shape"])
            full[box_slices(box)] = arr
        layout = m["layout"]
        if layout is not None:
            ranks = set(layout["rank_list"])
        all_ranks |= ranks
        params.append(
            Param(name, dtype, full, layout, min(ranks) // S, kind, ms_dtype=m["properties"]["dtype"])
        )
    num_stages = (max(all_ranks) // S) + 1
    return params, S, num_stages


# --------------------------------------------------------------------------
# (d) targets and the oracle
# --------------------------------------------------------------------------


@dataclass
class Target:
    kind: str  # "mesh" | "pp" | "unshard" | "strategy"
    mesh: dict = field(default_factory=dict)  # alias -> size
    pp: int | None = None
    strategy: dict | None = None  # name -> layout (for the oracle)
    strategy_doc: object = None  # what is written to the --strategy file
    pp_offset: list | None = None  # --pp-offset, one integer per stage

    def args(self, workdir) -> list[str]:
        if self.kind == "unshard":
            return ["--unshard"]
        if self.kind == "strategy":
            path = Path(workdir) / "strategy.json"
            path.write_text(json.dumps(self.strategy_doc))
            return ["--strategy", str(path)]
        out = []
        if self.mesh:
            out += ["--mesh", ",".join(f"{a}={n}" for a, n in self.mesh.items())]
        if self.pp is not None:
            out += ["--pp", str(self.pp)]
        if self.pp_offset is not None:
            out += ["--pp-offset", ",".join(map(str, self.pp_offset))]
        return out

    def describe(self) -> str:
        if self.kind == "strategy":
            return "--strategy " + json.dumps(self.strategy)
        return " ".join(self.args(None)) if self.kind != "strategy" else "--strategy"


def pp_offset_for(layers: int, pp: int) -> list | None:
    """MindSpore Transformers' `offset` that puts layer i of `layers` on stage i*pp//layers (None
    when pp divides the layers: no offset is needed). Its stage s holds layers//pp + offset[s]
    layers, in order (LayerSetting in mindformers/parallel_core/training_graph/transformer/utils.py)."""
    if layers % pp == 0:
        return None
    held = [sum(1 for i in range(layers) if i * pp // layers == s) for s in range(pp)]
    return [h - layers // pp for h in held]


def parse_target_name(s: str) -> Target:
    """'dp=1,tp=4,pp=1' -> --mesh dp=1,tp=4 --pp 1 ; 'pp=2' -> --pp 2 ; 'unshard' -> --unshard."""
    if s == "unshard":
        return Target("unshard")
    mesh, pp = {}, None
    for part in s.split(","):
        a, n = part.split("=")
        if a == "pp":
            pp = int(n)
        else:
            mesh[a] = int(n)
    return Target("mesh" if mesh else "pp", mesh=mesh, pp=pp)


@dataclass
class Expected:
    world: int
    params: dict  # name -> Param (target layout / stage)
    holdings: dict  # rank -> {name: box}
    kinds: list  # kinds of rank files ("model", maybe "opt")
    stage_size: int  # ranks per stage of the target (world for --strategy)

    def rank_tensors(self, r) -> dict:
        return {n: (self.params[n].dtype, take(self.params[n].array, box)) for n, box in self.holdings[r].items()}


def expected_for(params: list[Param], S: int, P: int, target: Target) -> Expected:
    """What each target rank must hold (the behaviour docs/FORMAT.md §5 and §6.2 describe)."""
    out: dict[str, Param] = {}
    if target.kind == "unshard":
        world = 1
        for p in params:
            out[p.name] = Param(p.name, p.dtype, p.array, None, 0, p.kind)
        St = 1
    elif target.kind == "strategy":
        ranks = set()
        for p in params:
            lay = target.strategy[p.name]
            out[p.name] = Param(p.name, p.dtype, p.array, lay, 0, p.kind)
            ranks |= set(lay["rank_list"])
        world = max(ranks) + 1
        St = None
    else:
        layouts = [p.layout for p in params if p.layout is not None]
        for a in target.mesh:
            assert any(a in lay["alias_name"] for lay in layouts), f"unknown alias {a}"

        def new_dm(lay):
            return [target.mesh.get(a, n) for a, n in zip(lay["alias_name"], lay["device_matrix"])]

        St = math.prod(new_dm(layouts[0])) if layouts else S
        Pt = target.pp if target.pp is not None else P
        world = St * Pt
        if target.pp is not None:
            layers = [layer_of(p.name) for p in params if layer_of(p.name) is not None]
            L = max(layers) + 1
        for p in params:
            if target.pp is None:
                st = p.stage
            else:
                li = layer_of(p.name)
                if li is not None:
                    st = li * Pt // L
                elif P == 1:  # a single-stage source: where MindFormers puts them (README, --pp)
                    st = Pt - 1 if on_last_stage(p.name) else 0
                else:
                    st = 0 if p.stage == 0 else Pt - 1
            lay = None
            if p.layout is not None:
                lay = make_layout(
                    new_dm(p.layout),
                    p.layout["tensor_map"],
                    p.layout["alias_name"],
                    range(st * St, (st + 1) * St),
                    p.layout.get("interleaved_parallel", False),
                )
            out[p.name] = Param(p.name, p.dtype, p.array, lay, st, p.kind)
    holdings: dict[int, dict] = {r: {} for r in range(world)}
    for p in out.values():
        for r, box in holders(p, St if St is not None else 1).items():
            holdings[r][p.name] = box
    kinds = [k for k in ("model", "opt") if any(p.kind == k for p in params)]
    return Expected(world, out, holdings, kinds, St if St is not None else world)


def reference_export(src_iter, dest_iter, exp: Expected, prefix):
    """What a correct `export` of one iteration writes (used to self-test the verifier)."""
    write_iteration(dest_iter, list(exp.params.values()), exp.stage_size, exp.world // exp.stage_size, prefix)
    src_common = Path(src_iter) / "common.json"
    if src_common.exists():
        (Path(dest_iter) / "common.json").write_bytes(src_common.read_bytes())
    else:
        (Path(dest_iter) / "common.json").unlink()


# --------------------------------------------------------------------------
# (e) CLI and verification of an export
# --------------------------------------------------------------------------

DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "reshardfs"


def binary() -> str:
    return os.path.abspath(os.environ.get("RESHARDFS_BIN") or str(DEFAULT_BIN))


@dataclass
class Run:
    args: list
    code: int
    stdout: str
    stderr: str

    def cmd(self) -> str:
        import shlex

        return " ".join(shlex.quote(str(a)) for a in [binary()] + list(self.args))

    def __str__(self):
        return f"$ {self.cmd()}\nexit {self.code}\n--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"


def run_cli(args, timeout=120) -> Run:
    args = [str(a) for a in args]
    try:
        cp = subprocess.run(
            [binary()] + args,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_BACKTRACE": "0"},
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out after {timeout}s: {binary()} {' '.join(args)}") from e
    return Run(args, cp.returncode, cp.stdout.decode("utf-8", "replace"), cp.stderr.decode("utf-8", "replace"))


def export(src, dest, target_args, force=False, timeout=120) -> Run:
    return run_cli(["export", src, dest, *target_args] + (["--force"] if force else []), timeout)


def rank_files(folder, kinds=("model", "opt")) -> dict:
    """{(kind, idx, total): file name} of the rank files in a folder."""
    pat = re.compile(r"^(?:(.+)-)?(model|opt)-(\d{7})-(\d{7})\.safetensors$")
    out = {}
    for f in os.listdir(folder):
        m = pat.match(f)
        if m and m.group(2) in kinds:
            out[(m.group(2), int(m.group(3)), int(m.group(4)))] = f
    return out


def source_prefix(iter_dir) -> str | None:
    for f in sorted(os.listdir(iter_dir)):
        m = re.match(r"^(?:(.+)-)?(model|opt)-\d{7}-\d{7}\.safetensors$", f)
        if m:
            return m.group(1)
    return None


def check_export_iteration(dest, src_iter, exp: Expected, prefix, check_oracle_bytes=True) -> list[str]:
    """Verify one exported iteration folder against the oracle. Returns problems (empty = ok)."""
    dest, src_iter = Path(dest), Path(src_iter)
    probs: list[str] = []
    W = exp.world
    want = {"metadata.json"} | ({"common.json"} if (src_iter / "common.json").exists() else set())
    for kind in exp.kinds:
        for r in range(W):
            want.add(file_name(prefix, kind, r, W))
    have = set(os.listdir(dest))
    if have != want:
        probs.append(f"{dest}: files differ: missing {sorted(want - have)[:8]}, unexpected {sorted(have - want)[:8]}")
    if (src_iter / "common.json").exists() and (dest / "common.json").exists():
        if (src_iter / "common.json").read_bytes() != (dest / "common.json").read_bytes():
            probs.append("common.json not byte-identical")
    files: dict[str, SafeFile] = {}
    for fn in sorted(have & want):
        if fn.endswith(".safetensors"):
            try:
                files[fn] = read_safetensors(dest / fn)
            except SafetensorsError as e:
                probs.append(str(e))
                continue
            probs += format_problems(files[fn])
    if probs:
        return probs
    kind_of = {n: p.kind for n, p in exp.params.items()}
    for r in range(W):
        got = {}
        for kind in exp.kinds:
            sf = files[file_name(prefix, kind, r, W)]
            for n, t in sf.tensors.items():
                if n in got:
                    probs.append(f"rank {r}: {n} in both model and opt files")
                if kind_of.get(n, kind) != kind:
                    probs.append(f"rank {r}: {kind_of[n]} tensor {n} stored in the {kind} file")
                got[n] = t
        wantn = set(exp.holdings[r])
        if set(got) != wantn:
            probs.append(
                f"rank {r}: tensor set differs: missing {sorted(wantn - set(got))[:6]}, unexpected {sorted(set(got) - wantn)[:6]}"
            )
        if not check_oracle_bytes:
            continue
        for n in sorted(wantn & set(got)):
            p = exp.params[n]
            box = exp.holdings[r][n]
            dt, arr = got[n]
            ref = take(p.array, box)
            if dt != p.dtype:
                probs.append(f"rank {r}: {n}: dtype {dt}, expected {p.dtype}")
            elif list(arr.shape) != list(ref.shape):
                probs.append(f"rank {r}: {n}: shape {list(arr.shape)}, expected {list(ref.shape)} (box {box})")
            elif arr.tobytes() != ref.tobytes():
                probs.append(f"rank {r}: {n}: bytes differ from the full tensor sliced at {box}")
        if len(probs) > 30:
            return probs
    if (dest / "metadata.json").exists():
        probs += check_metadata(dest, exp, files, prefix)
    return probs


def check_metadata(dest, exp: Expected, files: dict, prefix) -> list[str]:
    """Exported metadata.json: schema, layout math, chunks tiling, storage_data pointing right."""
    probs = []
    try:
        meta = json.loads((Path(dest) / "metadata.json").read_text())
    except Exception as e:  # noqa: BLE001
        return [f"metadata.json unreadable: {e}"]
    if not isinstance(meta, dict) or set(meta) != {"state_dict_metadata", "storage_data"}:
        return [f"metadata.json top-level keys {list(meta) if isinstance(meta, dict) else type(meta)}"]
    sdm, storage = meta["state_dict_metadata"], meta["storage_data"]
    if set(sdm) != set(exp.params):
        probs.append(
            f"metadata.json tensors differ: missing {sorted(set(exp.params) - set(sdm))[:5]}, extra {sorted(set(sdm) - set(exp.params))[:5]}"
        )
        return probs
    rf_rev = {f: key for key, f in rank_files(dest).items()}
    # storage: name -> k -> entries
    st: dict[str, dict[int, list]] = {}
    for key, entries in storage.items():
        try:
            name, k = parse_shard_key(key)
        except Exception:  # noqa: BLE001
            probs.append(f"storage_data key not a shard id: {key!r}")
            continue
        if shard_key(name, k) != key:
            probs.append(f"storage_data key {key!r} not in Python repr form {shard_key(name, k)!r}")
        st.setdefault(name, {})[k] = entries
    for name, m in sdm.items():
        p = exp.params[name]
        where = f"metadata.json: {name}"
        if set(m) != {"properties", "global_shape", "axis_fragmentations", "layout", "chunk"}:
            probs.append(f"{where}: keys {sorted(m)}")
            continue
        props = m["properties"]
        if set(props) != {"dtype", "replica_id", "allow_shape_mismatch", "allow_to_save"}:
            probs.append(f"{where}: properties keys {sorted(props)}")
        if str(props.get("dtype", "")).lower() != MS_DTYPES.get(p.dtype, p.dtype).lower():
            probs.append(f"{where}: properties.dtype {props.get('dtype')!r} for a {p.dtype} tensor")
        shape = m["global_shape"]
        if list(shape) != p.shape:
            probs.append(f"{where}: global_shape {shape}, expected {p.shape}")
            continue
        lay = m["layout"]
        # who holds what according to the exported metadata
        if lay is not None:
            if set(lay) != {"device_matrix", "tensor_map", "interleaved_parallel", "alias_name", "rank_list"}:
                probs.append(f"{where}: layout keys {sorted(lay)}")
                continue
            if len(lay["rank_list"]) != stage_size(lay) or len(lay["alias_name"]) != len(lay["device_matrix"]):
                probs.append(f"{where}: rank_list/alias_name do not fit device_matrix {lay}")
                continue
            try:
                frags = splits(lay, shape)
                check_divisible(lay, shape, name)
                meta_hold = {r: rank_box(lay, shape, i) for i, r in enumerate(lay["rank_list"])}
            except LayoutError as e:
                probs.append(f"{where}: {e}")
                continue
            rids = [replica_id(lay, i) for i in range(len(lay["rank_list"]))]
            if props.get("replica_id") != rids:
                probs.append(f"{where}: replica_id {props.get('replica_id')}, layout gives {rids}")
            groups = rank_groups(lay, shape)
        else:
            frags = [1] * len(shape)
            ranks = set()
            for entries in st.get(name, {}).values():
                for e in entries:
                    ranks.add(e.get("storage_rank"))
                    ranks.update(e.get("rank_group", []))
            meta_hold = {r: tuple((0, n) for n in shape) for r in ranks}
            groups = {0: sorted(ranks)}
        if m["axis_fragmentations"] != frags:
            probs.append(f"{where}: axis_fragmentations {m['axis_fragmentations']}, layout gives {frags}")
        want_hold = {r: h[name] for r, h in exp.holdings.items() if name in h}
        if meta_hold != want_hold:
            diff = sorted(set(meta_hold.items()) ^ set(want_hold.items()))[:4]
            probs.append(f"{where}: layout places slices differently from the target: {diff}")
        # chunks tile the global shape exactly once
        cover = np.zeros(shape, dtype=np.int32)
        ks = []
        for ch in m["chunk"]:
            if set(ch) != {"global_offset", "local_shape"} or len(ch["global_offset"]) != 1:
                probs.append(f"{where}: bad chunk {ch}")
                continue
            (k,) = ch["global_offset"]
            ks.append(k)
            box = chunk_box(shape, frags, k, ch["local_shape"])
            if any(b > n for (_, b), n in zip(box, shape)):
                probs.append(f"{where}: chunk {ch} exceeds global shape {shape}")
                continue
            cover[box_slices(box)] += 1
            if lay is not None and k in groups:
                i0 = lay["rank_list"].index(groups[k][0])
                if box != rank_box(lay, shape, i0):
                    probs.append(f"{where}: chunk {k} box {box} differs from the layout's {rank_box(lay, shape, i0)}")
            # storage entries for this chunk
            entries = st.get(name, {}).get(k)
            if not entries:
                probs.append(f"{where}: chunk {k} has no storage_data entry")
                continue
            named = set()
            for e in entries:
                fn, sr = e.get("file_name"), e.get("storage_rank")
                named.add(sr)
                named.update(e.get("rank_group", []))
                if "rank_group" in e and sorted(e["rank_group"]) != groups.get(k):
                    probs.append(f"{where}: chunk {k} rank_group {e['rank_group']}, layout gives {groups.get(k)}")
                if fn not in files:
                    probs.append(f"{where}: chunk {k} names {fn!r}, not an exported rank file")
                    continue
                idx = rf_rev.get(fn)
                if idx and idx[1] != sr:
                    probs.append(f"{where}: chunk {k}: storage_rank {sr} but file {fn}")
                t = files[fn].tensors.get(name)
                if t is None:
                    probs.append(f"{where}: chunk {k}: file {fn} does not hold it")
                    continue
                if list(t[1].shape) not in (list(ch["local_shape"]), list(shape)):
                    probs.append(f"{where}: chunk {k}: {fn} holds shape {list(t[1].shape)}, local_shape {ch['local_shape']}")
                elif list(t[1].shape) == list(ch["local_shape"]) and t[1].tobytes() != take(p.array, box).tobytes():
                    probs.append(f"{where}: chunk {k}: {fn} holds other bytes than the chunk's slice {box}")
            if set(named) != set(groups.get(k, [])):
                probs.append(f"{where}: chunk {k}: storage names ranks {sorted(named)}, holders {groups.get(k)}")
        if len(ks) != len(set(ks)):
            probs.append(f"{where}: duplicate chunks {ks}")
        if cover.size and not (cover == 1).all():
            probs.append(f"{where}: chunks do not tile the global shape exactly once")
        if set(st.get(name, {})) - set(ks):
            probs.append(f"{where}: storage_data has chunks {sorted(set(st[name]) - set(ks))} not in chunk list")
        if len(probs) > 30:
            break
    for name in set(st) - set(sdm):
        probs.append(f"storage_data names unknown tensor {name!r}")
    return probs
