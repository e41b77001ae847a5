#!/usr/bin/env python3
"""Offline reshard of one target rank, the way users do it today without
reshardfs, and the safetensors loader the benchmark uses for both paths.

    offline_convert.py convert SRC OUT --mesh tp=2 [--rank 0] [--kind model] [--then-load] [--hash]
    offline_convert.py load FILE [--hash]

`convert` reads SRC/metadata.json (SRC: an iteration folder, or a checkpoint
root whose tracker names one), memory-maps the source rank files with numpy,
assembles every tensor the target rank owns (np.concatenate of the source
slices along the split dimension; a generic box copy for anything else),
writes them as a MindSpore-style safetensors file (sorted keys,
`{"format":"ms"}`, header padded to 8 bytes) and fsyncs it. With
`--then-load` it then loads OUT exactly as `load` does.

`load` gets every tensor of a safetensors file as a numpy array: BF16 tensors
(numpy has no bfloat16) are read raw into a uint16 array with one pread per
tensor at the header's offsets; other dtypes through
`safetensors.safe_open(path, "np")`. Either way the bytes are copied into
process memory, so every byte is read.

Both print one JSON object on stdout: timings, tensor and byte counts and,
with `--hash`, a BLAKE2b digest, dtype and shape per tensor (computed after the
timed part) so two runs can be compared array for array.

Limits: the target changes device-axis sizes only (`--mesh`, as
`reshardfs --mesh`); pipeline stages are kept; layouts are MindSpore's
(tensor_map values or lists of them; null = whole tensor).
"""

import argparse
import ast
import hashlib
import json
import os
import struct
import sys
import time

import numpy as np

# safetensors dtype -> numpy dtype (BF16 kept raw as uint16: numpy has no bfloat16)
NP = {
    "BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_,
}


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


# ---------------------------------------------------------------- loading

def load(path):
    """{name: numpy array} for every tensor of a safetensors file."""
    from safetensors import safe_open

    header, base = read_header(path)
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        with safe_open(path, "np") as st:
            for name in st.keys():
                info = header[name]
                if info["dtype"] != "BF16":
                    out[name] = st.get_tensor(name)
                    continue
                start, end = info["data_offsets"]
                arr = np.empty(info["shape"], dtype=np.uint16)
                buf = memoryview(arr.reshape(-1)).cast("B")
                done = 0
                while done < end - start:
                    got = os.preadv(fd, [buf[done:]], base + start + done)
                    if got <= 0:
                        raise IOError(f"{path}: short read in {name} at {done} of {end - start}")
                    done += got
                out[name] = arr
    finally:
        os.close(fd)
    return out


def digests(arrays):
    return {
        name: {
            "dtype": str(a.dtype),
            "shape": list(a.shape),
            "blake2b": hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"), digest_size=16).hexdigest(),
        }
        for name, a in sorted(arrays.items())
    }


def timed_load(path, want_hash):
    t = time.perf_counter()
    arrays = load(path)
    load_s = time.perf_counter() - t
    res = {"load_s": load_s, "tensors": len(arrays), "bytes": int(sum(a.nbytes for a in arrays.values()))}
    if want_hash:
        res["hashes"] = digests(arrays)
    return res


# ------------------------------------------------------------- resharding

def unravel(i, dims):
    out = []
    for d in reversed(dims):
        out.append(i % d)
        i //= d
    return out[::-1]


def iteration_dir(src):
    if os.path.exists(os.path.join(src, "metadata.json")):
        return src
    with open(os.path.join(src, "latest_checkpointed_iteration.txt")) as f:
        return os.path.join(src, f"iteration_{int(f.read().strip()):08d}")


def target_box(meta, dm_new, pos):
    """Per dimension [start, end) of the target slice at position `pos` of the
    new device matrix."""
    shape, layout = meta["global_shape"], meta["layout"]
    if layout is None:
        return [(0, s) for s in shape]
    coord = unravel(pos, dm_new)
    box = []
    for d, m in enumerate(layout["tensor_map"]):
        axes = [] if m == -1 else (m if isinstance(m, list) else [m])
        axes = [len(dm_new) - 1 - v for v in axes if v != -1]
        split, sid = 1, 0
        for ax in axes:  # first listed is most significant
            split *= dm_new[ax]
            sid = sid * dm_new[ax] + coord[ax]
        if shape[d] % split:
            raise SystemExit(f"{d}: {shape[d]} does not divide by {split}")
        size = shape[d] // split
        box.append((sid * size, sid * size + size))
    return box


class Sources:
    """Numpy memmaps of the source rank files, opened once each."""

    def __init__(self, it_dir):
        self.dir, self.files = it_dir, {}

    def tensor(self, fname, name):
        if fname not in self.files:
            path = os.path.join(self.dir, fname)
            header, base = read_header(path)
            self.files[fname] = (np.memmap(path, dtype=np.uint8, mode="r"), header, base)
        mm, header, base = self.files[fname]
        info = header[name]
        s, e = info["data_offsets"]
        return mm[base + s: base + e].view(NP[info["dtype"]]).reshape(info["shape"]), info["dtype"]


def assemble(name, meta, chunks, box, sources):
    """The target slice `box` of tensor `name`, from the source chunks."""
    shape, frag = meta["global_shape"], meta["axis_fragmentations"]
    pieces, dtype = [], None
    for k, fname in chunks:
        idx = unravel(k, frag)
        local = meta["chunk"][0]["local_shape"]
        src_box = [(i * g // f, i * g // f + l) for i, g, f, l in zip(idx, shape, frag, local)]
        inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(box, src_box)]
        if any(lo >= hi for lo, hi in inter):
            continue
        arr, dtype = sources.tensor(fname, name)
        if list(arr.shape) == list(shape):  # the file holds the whole tensor
            src_box = [(0, g) for g in shape]
        sl = tuple(slice(lo - s0, hi - s0) for (lo, hi), (s0, _) in zip(inter, src_box))
        pieces.append((inter, arr[sl]))
        if [tuple(b) for b in inter] == [tuple(b) for b in box]:
            break  # one source slice covers the whole target slice
    if not pieces:
        raise SystemExit(f"{name}: no source slice covers {box}")
    target_shape = [hi - lo for lo, hi in box]
    if len(pieces) == 1:
        return np.ascontiguousarray(pieces[0][1]), dtype
    # The usual case: pieces differ along one dimension only -> concatenate.
    differ = [d for d in range(len(box)) if len({p[0][d] for p in pieces}) > 1]
    if len(differ) == 1:
        d = differ[0]
        ordered = [a for _, a in sorted(pieces, key=lambda p: p[0][d][0])]
        out = np.concatenate(ordered, axis=d)
    else:
        out = np.empty(target_shape, dtype=pieces[0][1].dtype)
        for inter, a in pieces:
            out[tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, box))] = a
    assert list(out.shape) == target_shape, (name, out.shape, target_shape)
    return out, dtype


def convert(src, out_path, mesh, rank, kind):
    it_dir = iteration_dir(src)
    with open(os.path.join(it_dir, "metadata.json")) as f:
        md = json.load(f)
    sdm = md["state_dict_metadata"]
    # shard id -> the file of the lowest storage rank holding it
    chunks = {}
    for key, entries in md["storage_data"].items():
        name, (k,) = ast.literal_eval(key)
        e = min(entries, key=lambda e: e["storage_rank"])
        chunks.setdefault(name, []).append((k, e["file_name"], e["storage_rank"]))

    picked = []  # (name, box)
    for name in sorted(sdm):
        meta = sdm[name]
        cs = sorted(chunks[name])
        if f"-{kind}-" not in cs[0][1]:
            continue
        layout = meta["layout"]
        if layout is None:
            # whole, on the stage of its storage rank; one stage assumed per rank block
            picked.append((name, target_box(meta, None, 0), [(k, f) for k, f, _ in cs]))
            continue
        dm, alias, ranks = layout["device_matrix"], layout["alias_name"], layout["rank_list"]
        dm_new = [mesh.get(a, s) for a, s in zip(alias, dm)]
        S_new = 1
        for s in dm_new:
            S_new *= s
        S_src = len(ranks)
        stage = min(ranks) // S_src
        if rank // S_new != stage:
            continue
        box = target_box(meta, dm_new, rank - stage * S_new)
        picked.append((name, box, [(k, f) for k, f, _ in cs]))

    header = {"__metadata__": {"format": "ms"}}
    off = 0
    sources = Sources(it_dir)
    plan = []
    for name, box, cs in picked:
        meta = sdm[name]
        # the dtype of the source files, from the first holding file's header
        _, dtype = sources.tensor(cs[0][1], name)
        shape = [hi - lo for lo, hi in box]
        n = np.dtype(NP[dtype]).itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
        plan.append((name, box, cs))
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)

    written = 0
    with open(out_path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj)
        for name, box, cs in plan:
            arr, _ = assemble(name, sdm[name], cs, box, sources)
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
            written += arr.nbytes
        f.flush()
        t = time.perf_counter()
        os.fsync(f.fileno())
        fsync_s = time.perf_counter() - t
    assert written == off, (written, off)
    return {"tensors": len(plan), "file_bytes": 8 + len(hj) + off, "fsync_s": fsync_s}


def parse_mesh(specs):
    mesh = {}
    for spec in specs:
        for part in spec.split(","):
            a, n = part.split("=")
            mesh[a.strip()] = int(n)
    return mesh


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--mesh", action="append", required=True)
    c.add_argument("--rank", type=int, default=0)
    c.add_argument("--kind", default="model", choices=["model", "opt"])
    c.add_argument("--then-load", action="store_true")
    c.add_argument("--hash", action="store_true")
    l = sub.add_parser("load")
    l.add_argument("file")
    l.add_argument("--hash", action="store_true")
    a = ap.parse_args()

    if a.cmd == "load":
        res = timed_load(a.file, a.hash)
    else:
        t = time.perf_counter()
        res = convert(a.src, a.out, parse_mesh(a.mesh), a.rank, a.kind)
        res["convert_s"] = time.perf_counter() - t
        if a.then_load:
            res.update(timed_load(a.out, a.hash))
    json.dump(res, sys.stdout)
    print()


if __name__ == "__main__":
    main()
