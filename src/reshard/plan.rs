//! The reshard plan: every file of the view, its exact size and header, and
//! for each tensor the target slice whose bytes the engine will produce.
//!
//! Planning reads no tensor data: its cost grows with tensors and ranks, not
//! with bytes, so a view of any size is listed (and mounted) at once.

use std::sync::Arc;

use serde::Serialize;

use crate::checkpoint::header::{HeaderEntry, build_header};
use crate::checkpoint::metadata::{
    ChunkJson, Properties, StorageEntry, TensorMeta, format_shard_id,
};
use crate::checkpoint::names::{self, Kind};
use crate::checkpoint::source::{Iteration, Source, SourceKind, Tensor};
use crate::error::Result;
use crate::reshard::layout::{Slice, ravel};
use crate::reshard::target::{Placement, TargetSpec};

/// The whole view of a source under one target.
#[derive(Debug)]
pub struct Plan {
    /// Shared so that several plans (targets) of one source load it once.
    pub source: Arc<Source>,
    pub spec: TargetSpec,
    /// Parallel to `source.iterations`.
    pub iterations: Vec<IterationPlan>,
}

/// The view of one iteration folder.
#[derive(Debug)]
pub struct IterationPlan {
    pub world: u64,
    pub placements: Vec<Placement>,
    /// Model files for ranks `0..world`, then opt files (when the source has them).
    pub files: Vec<VirtualFile>,
    /// The view's metadata.json, generated in MindSpore's schema.
    pub metadata_json: Vec<u8>,
}

/// One safetensors file of the view.
#[derive(Debug)]
pub struct VirtualFile {
    pub name: String,
    pub rank: u64,
    pub kind: Kind,
    /// Length prefix and JSON, padded: the file's first bytes.
    pub header: Vec<u8>,
    /// In file order; their bytes follow the header back to back.
    pub tensors: Vec<PlannedTensor>,
    pub size: u64,
}

/// One tensor of a view file: which slice of which source tensor.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Index into `Iteration::tensors`.
    pub source: usize,
    /// The target slice in global coordinates.
    pub slice: Slice,
    /// Absolute offset of its first byte in the view file.
    pub offset: u64,
    pub len: u64,
}

/// A box of a target slice that comes from one source slice.
#[derive(Debug, Clone, Serialize)]
pub struct Piece {
    /// The source slice's grid index (`k` in its shard id).
    pub chunk: u64,
    /// Index into `Iteration::files` of the replica read.
    #[serde(skip)]
    pub file: usize,
    /// Start and shape in global coordinates.
    pub start: Vec<u64>,
    pub shape: Vec<u64>,
}

impl Plan {
    /// Plans the view of every iteration of `source` under `spec`.
    pub fn build(source: impl Into<Arc<Source>>, spec: TargetSpec) -> Result<Plan> {
        let source = source.into();
        let mut iterations = Vec::with_capacity(source.iterations.len());
        for it in &source.iterations {
            let planned = spec
                .resolve(it)
                .and_then(|t| plan_iteration(it, t.placements, t.world));
            iterations.push(planned.map_err(|e| in_iteration(e, it))?);
        }
        Ok(Plan {
            source,
            spec,
            iterations,
        })
    }

    /// The tracker's bytes when the source is a checkpoint root.
    pub fn tracker(&self) -> Option<&[u8]> {
        match &self.source.kind {
            SourceKind::Root { tracker, .. } => Some(tracker),
            _ => None,
        }
    }
}

/// In a checkpoint root, says which iteration a target failed on.
fn in_iteration(e: crate::error::Error, it: &Iteration) -> crate::error::Error {
    match (e, &it.name) {
        (crate::error::Error::Input(m), Some(n)) => crate::bad!("{n}: {m}"),
        (e, _) => e,
    }
}

/// Tensor slices a view may hold in all (a tensor held by n ranks counts n):
/// each costs a few hundred bytes of plan. A 70B view at 64 ranks has ~20k.
const MAX_SLICES: usize = 1 << 24;

fn plan_iteration(it: &Iteration, placements: Vec<Placement>, world: u64) -> Result<IterationPlan> {
    let slices = placements
        .iter()
        .try_fold(0usize, |acc, p| acc.checked_add(p.ranks.len()))
        .unwrap_or(usize::MAX);
    if slices > MAX_SLICES {
        crate::bail!(
            "target: {slices} tensor slices across {world} ranks, more than the {MAX_SLICES} a view may have"
        );
    }
    // Which (tensor, position in ranks) each target rank holds.
    let mut held: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world as usize];
    for (ti, p) in placements.iter().enumerate() {
        for (pos, &r) in p.ranks.iter().enumerate() {
            held[r as usize].push((ti, pos));
        }
    }
    let kinds: &[Kind] = if it.has_opt() {
        &[Kind::Model, Kind::Opt]
    } else {
        &[Kind::Model]
    };
    let mut files = Vec::with_capacity(world as usize * kinds.len());
    for &kind in kinds {
        for (rank, tensors) in held.iter().enumerate() {
            let mut mine: Vec<(usize, usize)> = tensors
                .iter()
                .copied()
                .filter(|&(ti, _)| it.tensors[ti].kind == kind)
                .collect();
            // Keys sorted, data in key order: how MindSpore writes rank files.
            mine.sort_by(|a, b| it.tensors[a.0].name.cmp(&it.tensors[b.0].name));
            files.push(plan_file(it, &placements, rank as u64, world, kind, &mine)?);
        }
    }
    let metadata_json = view_metadata(it, &placements, world)?;
    Ok(IterationPlan {
        world,
        placements,
        files,
        metadata_json,
    })
}

fn plan_file(
    it: &Iteration,
    placements: &[Placement],
    rank: u64,
    world: u64,
    kind: Kind,
    mine: &[(usize, usize)],
) -> Result<VirtualFile> {
    let slices: Vec<Slice> = mine
        .iter()
        .map(|&(ti, pos)| placements[ti].slice(pos, &it.tensors[ti].global_shape))
        .collect();
    let entries: Vec<HeaderEntry<'_>> = mine
        .iter()
        .zip(&slices)
        .map(|(&(ti, _), s)| HeaderEntry {
            name: &it.tensors[ti].name,
            dtype: it.tensors[ti].dtype,
            shape: &s.shape,
        })
        .collect();
    let (header, offsets) = build_header(&entries)?;
    let base = header.len() as u64;
    let name = names::rank_file_name(it.prefix.as_deref(), kind, rank, world);
    // Sizes come from headers and metadata.json: every product and sum is
    // checked, so a hostile shape is refused rather than wrapped.
    let tensors: Vec<PlannedTensor> = mine
        .iter()
        .zip(slices)
        .zip(offsets)
        .map(|((&(ti, _), slice), off)| {
            let t = &it.tensors[ti];
            let len = crate::reshard::layout::checked_product(&slice.shape)
                .and_then(|n| n.checked_mul(t.elem_size()));
            let offset = base.checked_add(off);
            match (len, offset) {
                (Some(len), Some(offset)) if offset.checked_add(len).is_some() => {
                    Ok(PlannedTensor {
                        source: ti,
                        slice,
                        offset,
                        len,
                    })
                }
                _ => Err(crate::bad!(
                    "view file {name}: tensor {}: its slice {:?} at offset {off} overflows a 64-bit file size",
                    t.name,
                    slice.shape
                )),
            }
        })
        .collect::<Result<_>>()?;
    let size = tensors.last().map_or(base, |t| t.offset + t.len);
    Ok(VirtualFile {
        name,
        rank,
        kind,
        header,
        tensors,
        size,
    })
}

/// The view's metadata.json: MindSpore's own schema, describing the target
/// layout and pointing every slice at the view files that hold it, so that
/// MindSpore Transformers loads the view as an ordinary checkpoint.
fn view_metadata(it: &Iteration, placements: &[Placement], world: u64) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct MetadataOut {
        state_dict_metadata: serde_json::Map<String, serde_json::Value>,
        storage_data: serde_json::Map<String, serde_json::Value>,
    }
    let mut sdm = serde_json::Map::new();
    let mut shards: Vec<(u64, usize, u64, Vec<u64>)> = Vec::new();
    for (ti, (t, p)) in it.tensors.iter().zip(placements).enumerate() {
        let frag: Vec<u64> = match &p.layout {
            Some(l) => l.fragmentations(),
            None => vec![1; t.global_shape.len()],
        };
        let chunk_shape: Vec<u64> = t
            .global_shape
            .iter()
            .zip(&frag)
            .map(|(s, f)| s / f)
            .collect();
        let nchunks: u64 = frag.iter().product();
        let replica_id: Vec<u64> = match &p.layout {
            Some(l) => (0..p.ranks.len()).map(|i| l.replica_id(i)).collect(),
            None => (0..p.ranks.len() as u64).collect(),
        };
        let meta = TensorMeta {
            properties: Properties {
                dtype: t.ms_dtype.clone(),
                replica_id: Some(serde_json::json!(replica_id)),
                allow_shape_mismatch: t.allow_shape_mismatch,
                allow_to_save: t.allow_to_save,
            },
            global_shape: t.global_shape.clone(),
            axis_fragmentations: frag.clone(),
            layout: p.layout.as_ref().map(|l| l.to_json()),
            chunk: (0..nchunks)
                .map(|k| ChunkJson {
                    global_offset: vec![k],
                    local_shape: chunk_shape.clone(),
                })
                .collect(),
        };
        let value = serde_json::to_value(&meta)
            .map_err(|e| crate::internal!("metadata for {}: {e}", t.name))?;
        sdm.insert(t.name.clone(), value);

        // Holders of each slice, by grid index.
        let mut by_chunk: Vec<Vec<u64>> = vec![Vec::new(); nchunks as usize];
        for (pos, &r) in p.ranks.iter().enumerate() {
            let k = p.layout.as_ref().map_or(0, |l| l.grid_index(pos));
            by_chunk[k as usize].push(r);
        }
        for (k, mut ranks) in by_chunk.into_iter().enumerate() {
            ranks.sort_unstable();
            shards.push((ranks.first().copied().unwrap_or(0), ti, k as u64, ranks));
        }
    }
    // MindSpore lists model shards before optimizer shards, rank by rank,
    // each in tensor order; doing the same makes the metadata.json of a view
    // with the source's own strategy byte-identical to the source's.
    shards.sort_by_key(|s| (it.tensors[s.1].kind, s.0, s.1, s.2));
    let mut storage = serde_json::Map::new();
    for (_, ti, k, ranks) in shards {
        let t = &it.tensors[ti];
        let entries: Vec<StorageEntry> = ranks
            .iter()
            .map(|&r| StorageEntry {
                file_name: names::rank_file_name(it.prefix.as_deref(), t.kind, r, world),
                storage_rank: r,
                rank_group: Some(ranks.clone()),
            })
            .collect();
        let entries = serde_json::to_value(entries)
            .map_err(|e| crate::internal!("storage_data for {}: {e}", t.name))?;
        storage.insert(format_shard_id(&t.name, k), entries);
    }
    serde_json::to_vec(&MetadataOut {
        state_dict_metadata: sdm,
        storage_data: storage,
    })
    .map_err(|e| crate::internal!("cannot serialize metadata.json: {e}"))
}

/// The pieces of a target slice: its intersections with the source slices,
/// each read from one replica. They tile the slice.
pub fn pieces(t: &Tensor, slice: &Slice) -> Vec<Piece> {
    let per_dim: Vec<Vec<(u64, u64, u64)>> = (0..slice.shape.len())
        .map(|d| intervals(slice.start[d], slice.shape[d], t.chunk_shape[d]))
        .collect();
    if per_dim.iter().any(Vec::is_empty) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut pick = vec![0usize; per_dim.len()];
    loop {
        let grid: Vec<u64> = pick.iter().zip(&per_dim).map(|(&i, v)| v[i].0).collect();
        let k = ravel(&grid, &t.frag);
        out.push(Piece {
            chunk: k,
            file: t.chunks[k as usize].file,
            start: pick.iter().zip(&per_dim).map(|(&i, v)| v[i].1).collect(),
            shape: pick.iter().zip(&per_dim).map(|(&i, v)| v[i].2).collect(),
        });
        // Odometer over the per-dimension intervals, last fastest.
        let mut d = pick.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            pick[d] += 1;
            if pick[d] < per_dim[d].len() {
                break;
            }
            pick[d] = 0;
        }
    }
}

/// How many pieces `pieces` would return, without building them.
pub fn piece_count(t: &Tensor, slice: &Slice) -> u64 {
    (0..slice.shape.len())
        .map(|d| intervals(slice.start[d], slice.shape[d], t.chunk_shape[d]).len() as u64)
        .product()
}

/// Cuts `[start, start+len)` at multiples of `chunk`: (chunk index, start, len).
fn intervals(start: u64, len: u64, chunk: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let end = start + len;
    let mut at = start;
    while at < end {
        let c = at / chunk;
        let stop = end.min((c + 1) * chunk);
        out.push((c, at, stop - at));
        at = stop;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cut_at_chunk_boundaries() {
        assert_eq!(intervals(0, 8, 4), vec![(0, 0, 4), (1, 4, 4)]);
        assert_eq!(intervals(2, 4, 4), vec![(0, 2, 2), (1, 4, 2)]);
        assert_eq!(intervals(4, 2, 4), vec![(1, 4, 2)]);
        assert_eq!(intervals(0, 0, 4), vec![]);
    }
}
