//! What `inspect` and `plan` print. Each report is built once as a serde
//! structure; `--json` prints it as is and the text form is rendered from the
//! same structure, so the two never disagree.

use std::fmt::Write as _;

use serde::Serialize;

use crate::checkpoint::layout::unravel;
use crate::checkpoint::models;
use crate::checkpoint::names::Kind;
use crate::checkpoint::source::{Assembly, Iteration, Source, SourceKind, Tensor};
use crate::reshard::plan::{Plan, piece_count, pieces};

#[derive(Serialize)]
pub struct InspectReport {
    pub path: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest: Option<u64>,
    pub iterations: Vec<InspectIteration>,
}

#[derive(Serialize)]
pub struct InspectIteration {
    pub name: Option<String>,
    pub world: u64,
    pub stages: u64,
    pub ranks_per_stage: u64,
    pub prefix: Option<String>,
    pub files: usize,
    pub model_bytes: u64,
    pub opt_bytes: u64,
    pub tensors: Vec<InspectTensor>,
    /// The model map the source was read through (`qwen3`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Where the model's sizes came from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub model_notes: Vec<String>,
    /// Source tensors the model map does not place, left out of every view.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub omitted: Vec<String>,
    /// Of those, the ones the map does not know as derived buffers: a view
    /// refuses the source unless asked to leave them out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
}

#[derive(Serialize)]
pub struct InspectTensor {
    pub name: String,
    pub kind: Kind,
    pub dtype: String,
    pub global_shape: Vec<u64>,
    pub stage: u64,
    /// `alias=size,...` of the device matrix, or null when not split.
    pub mesh: Option<String>,
    /// Per dimension, the aliases splitting it (`[tp, -]`).
    pub map: Option<String>,
    pub rank_list: Option<Vec<u64>>,
    pub chunks: Vec<InspectChunk>,
    /// For a tensor assembled from rows of others (a fused QKV or gate/up,
    /// or one of them read back out of the fused tensor): those tensors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows_of: Vec<String>,
}

#[derive(Serialize)]
pub struct InspectChunk {
    pub index: u64,
    pub start: Vec<u64>,
    pub shape: Vec<u64>,
    /// Files holding this slice (the first is the one views read).
    pub files: Vec<String>,
}

fn kind_name(kind: &SourceKind) -> &'static str {
    match kind {
        SourceKind::Root { .. } => "root",
        SourceKind::Iteration => "iteration",
        SourceKind::Plain => "plain",
    }
}

pub fn inspect(source: &Source) -> InspectReport {
    InspectReport {
        path: source.path.display().to_string(),
        kind: kind_name(&source.kind),
        latest: match source.kind {
            SourceKind::Root { latest, .. } => Some(latest),
            _ => None,
        },
        iterations: source.iterations.iter().map(inspect_iteration).collect(),
    }
}

/// The tensors `t` is made of (and, for each of them that is itself
/// assembled, its own parts): `q_proj + k_proj + v_proj`, or for a tiled
/// tensor `gate_proj (transposed) + ...`.
fn rows_of(it: &Iteration, t: &Tensor) -> Vec<String> {
    let Some(a) = &t.assembly else {
        return Vec::new();
    };
    let transposed = match a {
        Assembly::Tiles(m) => m.bands.iter().flat_map(|b| &b.tiles).any(|t| t.transposed),
        Assembly::Rows(_) => false,
    };
    let mut out: Vec<String> = Vec::new();
    for part in a.parts() {
        let p = &it.parts[part];
        let inner = rows_of(it, p);
        let mut name = if inner.is_empty() {
            p.name.clone()
        } else {
            format!("{} (rows of {})", p.name, inner.join(" + "))
        };
        if transposed {
            name.push_str(" (transposed)");
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

fn inspect_iteration(it: &Iteration) -> InspectIteration {
    let bytes = |k: Kind| -> u64 {
        it.tensors
            .iter()
            .filter(|t| t.kind == k)
            .map(|t| t.nbytes())
            .sum()
    };
    InspectIteration {
        name: it.name.clone(),
        world: it.world,
        stages: it.stages,
        ranks_per_stage: it.stage_devices,
        prefix: it.prefix.clone(),
        files: it.files.len(),
        model_bytes: bytes(Kind::Model),
        opt_bytes: bytes(Kind::Opt),
        tensors: it
            .tensors
            .iter()
            .map(|t| InspectTensor {
                name: t.name.clone(),
                kind: t.kind,
                dtype: format!("{:?}", t.dtype),
                global_shape: t.global_shape.clone(),
                stage: t.stage,
                mesh: t.layout.as_ref().map(|l| l.describe_mesh()),
                map: t.layout.as_ref().map(|l| l.describe_map()),
                rank_list: t.layout.as_ref().map(|l| l.rank_list.clone()),
                chunks: t
                    .chunks
                    .iter()
                    .enumerate()
                    .map(|(k, c)| InspectChunk {
                        index: k as u64,
                        start: unravel(k as u64, &t.frag)
                            .iter()
                            .zip(&t.chunk_shape)
                            .map(|(g, s)| g * s)
                            .collect(),
                        shape: t.chunk_shape.clone(),
                        files: c
                            .holders
                            .iter()
                            .map(|h| it.files[h.0].name.clone())
                            .collect(),
                    })
                    .collect(),
                rows_of: rows_of(it, t),
            })
            .collect(),
        model: it.model.as_ref().map(|m| m.model_type.clone()),
        model_notes: it
            .model
            .as_ref()
            .map(|m| m.notes.clone())
            .unwrap_or_default(),
        omitted: it.omitted.clone(),
        unknown: models::unknown_tensors(it)
            .into_iter()
            .map(String::from)
            .collect(),
    }
}

impl InspectReport {
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = write!(o, "source    {} ({} ", self.path, self.kind);
        match self.latest {
            Some(l) => {
                let _ = writeln!(
                    o,
                    "with {} iteration(s), latest {l})",
                    self.iterations.len()
                );
            }
            None => o.push_str("folder)\n"),
        }
        for it in &self.iterations {
            let _ = writeln!(
                o,
                "\n{}world {} = {} stage(s) x {} rank(s); prefix {}; {} {}",
                it.name
                    .as_ref()
                    .map(|n| format!("{n}: "))
                    .unwrap_or_default(),
                it.world,
                it.stages,
                it.ranks_per_stage,
                it.prefix.as_deref().unwrap_or("(none)"),
                it.files,
                // A plain or Hugging Face folder's files are no ranks' files.
                if self.kind == "plain" {
                    "safetensors file(s)"
                } else {
                    "rank file(s)"
                }
            );
            let count = |k: Kind| it.tensors.iter().filter(|t| t.kind == k).count();
            let _ = writeln!(
                o,
                "model     {} in {} tensors\noptimizer {} in {} tensors\n",
                human(it.model_bytes),
                count(Kind::Model),
                human(it.opt_bytes),
                count(Kind::Opt)
            );
            let mut rows = vec![[
                "TENSOR".to_string(),
                "DTYPE".into(),
                "SHAPE".into(),
                "STAGE".into(),
                "LAYOUT".into(),
                "SLICES".into(),
                "FILES (per slice)".into(),
            ]];
            for t in &it.tensors {
                let layout = match (&t.mesh, &t.map) {
                    (Some(m), Some(p)) => format!("{m} {p}"),
                    _ => "whole".into(),
                };
                let files: Vec<String> = if t.rows_of.is_empty() {
                    t.chunks
                        .iter()
                        .map(|c| {
                            let ranks: Vec<String> =
                                c.files.iter().map(|f| short_file(f)).collect();
                            ranks.join("|")
                        })
                        .collect()
                } else {
                    let what = if t.rows_of.iter().any(|r| r.ends_with("(transposed)")) {
                        "tiles of"
                    } else {
                        "rows of"
                    };
                    vec![format!("{what} {}", compact(&t.rows_of))]
                };
                rows.push([
                    t.name.clone(),
                    t.dtype.clone(),
                    format!("{:?}", t.global_shape),
                    t.stage.to_string(),
                    layout,
                    if t.rows_of.is_empty() {
                        format!(
                            "{} x {:?}",
                            t.chunks.len(),
                            t.chunks
                                .first()
                                .map(|c| c.shape.clone())
                                .unwrap_or_default()
                        )
                    } else {
                        "assembled".to_string()
                    },
                    files.join(" "),
                ]);
            }
            o.push_str(&table(&rows));
            o.push_str(&model_lines(
                it.model.as_deref(),
                &it.model_notes,
                &it.omitted,
                &it.unknown,
            ));
        }
        o
    }
}

/// The target as the user said it, with the view's shape (`--hf`,
/// `--dtype`, `--prefix`).
fn describe_target(plan: &Plan) -> String {
    let o = &plan.options;
    let mut d = match &o.hf {
        Some(hf) => format!(
            "Hugging Face folder, shards of at most {} bytes",
            hf.max_shard_size
        ),
        None => plan.spec.describe(),
    };
    if let Some(t) = o.dtype {
        let _ = write!(d, ", floating-point tensors cast to {t:?}");
    }
    if let Some(p) = &o.prefix {
        let _ = write!(d, ", prefix {p}");
    }
    d
}

/// What a model map did: the model, where its sizes came from, and the
/// source tensors left out: derived buffers, and those it does not know.
fn model_lines(
    model: Option<&str>,
    notes: &[String],
    omitted: &[String],
    unknown: &[String],
) -> String {
    let mut o = String::new();
    if let Some(m) = model {
        let _ = writeln!(
            o,
            "
model map {m}"
        );
        for n in notes {
            let _ = writeln!(o, "  {n}");
        }
    }
    let derived: Vec<&String> = omitted.iter().filter(|n| !unknown.contains(n)).collect();
    if !derived.is_empty() {
        let _ = writeln!(
            o,
            "
left out of every view ({} buffer(s) the model derives from its config):",
            derived.len()
        );
        for n in derived {
            let _ = writeln!(o, "  {n}");
        }
    }
    if !unknown.is_empty() {
        let _ = writeln!(
            o,
            "
not known to the model map ({} source tensor(s)): plan, export and mount refuse the source unless --drop-unknown-tensors leaves them out:",
            unknown.len()
        );
        for n in unknown {
            let _ = writeln!(o, "  {n}");
        }
    }
    o
}

/// A list joined with ` + `, its middle elided when long (a Qwen3-MoE
/// layer's stacked experts come from 256 tensors; `--json` lists them all).
fn compact(items: &[String]) -> String {
    if items.len() <= 6 {
        return items.join(" + ");
    }
    format!(
        "{} + ... ({} in all) ... + {}",
        items[..3].join(" + "),
        items.len(),
        items[items.len() - 1]
    )
}

/// `gpt-model-0000004-0000008.safetensors` -> `model#4`, for dense tables.
fn short_file(name: &str) -> String {
    match crate::checkpoint::names::parse_rank_file_name(name) {
        Some(n) => format!("{}#{}", n.kind.as_str(), n.idx),
        None => name.to_string(),
    }
}

#[derive(Serialize)]
pub struct PlanReport {
    pub source: String,
    pub target: String,
    pub iterations: Vec<PlanIteration>,
    pub totals: PlanTotals,
}

#[derive(Serialize)]
pub struct PlanIteration {
    pub name: Option<String>,
    pub world: u64,
    pub files: Vec<PlanFile>,
    /// The small files beside them (metadata.json, common.json; or the
    /// index, config.json, tokenizer files) and their sizes.
    pub small_files: Vec<(String, usize)>,
    /// How the view was made: the model map and where its sizes came from,
    /// a generated config.json's inferred and defaulted fields.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Source tensors the model map does not know, left out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub omitted: Vec<String>,
}

#[derive(Serialize)]
pub struct PlanFile {
    pub name: String,
    pub rank: u64,
    pub kind: Kind,
    pub size: u64,
    pub header_bytes: usize,
    pub tensors: Vec<PlanTensor>,
    /// The source file this view file is byte for byte, whole: a mount
    /// serves it by FUSE passthrough where it may, `export` copies it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_as_source: Option<String>,
}

#[derive(Serialize)]
pub struct PlanTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Start of the slice in the global tensor.
    pub global_start: Vec<u64>,
    pub offset: u64,
    pub bytes: u64,
    pub pieces: Vec<PlanPiece>,
}

#[derive(Serialize)]
pub struct PlanPiece {
    /// Source file read (one replica of the source slice).
    pub file: String,
    /// For a tensor assembled from rows of others (fused QKV or gate/up,
    /// or q_proj read out of a fused QKV): the stored tensor read, in
    /// whose coordinates `start` and `shape` are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    /// The source slice's grid index (its shard id's `k`).
    pub chunk: u64,
    pub start: Vec<u64>,
    pub shape: Vec<u64>,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct PlanTotals {
    pub files: usize,
    pub bytes: u64,
    pub tensor_bytes: u64,
    pub pieces: u64,
    /// Source bytes read to serve every byte of the view once.
    pub source_bytes_per_byte_served: f64,
    /// View files that are a source file whole (`same_as_source`).
    pub same_as_source: usize,
}

pub fn plan(plan: &Plan) -> PlanReport {
    let mut totals = PlanTotals {
        files: 0,
        bytes: 0,
        tensor_bytes: 0,
        pieces: 0,
        source_bytes_per_byte_served: 0.0,
        same_as_source: 0,
    };
    let mut iterations = Vec::new();
    for (ip, it) in plan.iterations.iter().zip(&plan.source.iterations) {
        let mut files = Vec::new();
        for vf in &ip.files {
            totals.files += 1;
            totals.bytes += vf.size;
            totals.same_as_source += usize::from(vf.whole_source.is_some());
            let mut tensors = Vec::new();
            for pt in &vf.tensors {
                let t = &it.tensors[pt.source];
                totals.tensor_bytes += pt.len;
                totals.pieces += piece_count(it, t, &pt.slice);
                let ps = pieces(it, t, &pt.slice, &vf.home)
                    .into_iter()
                    .map(|p| PlanPiece {
                        file: it.files[p.file].name.clone(),
                        tensor: p.part.map(|i| it.parts[i].name.clone()),
                        chunk: p.chunk,
                        bytes: p.shape.iter().product::<u64>() * t.elem_size(),
                        start: p.start,
                        shape: p.shape,
                    })
                    .collect();
                tensors.push(PlanTensor {
                    name: t.name.clone(),
                    dtype: format!("{:?}", t.dtype),
                    shape: pt.slice.shape.clone(),
                    global_start: pt.slice.start.clone(),
                    offset: pt.offset,
                    bytes: pt.len,
                    pieces: ps,
                });
            }
            files.push(PlanFile {
                name: vf.name.clone(),
                rank: vf.rank,
                kind: vf.kind,
                size: vf.size,
                header_bytes: vf.header.len(),
                tensors,
                same_as_source: vf.whole_source.map(|f| it.files[f].name.clone()),
            });
        }
        totals.bytes += ip.small.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        iterations.push(PlanIteration {
            name: it.name.clone(),
            world: ip.world,
            files,
            small_files: ip.small.iter().map(|(n, b)| (n.clone(), b.len())).collect(),
            notes: ip.notes.clone(),
            omitted: it.omitted.clone(),
        });
    }
    // Each piece is read once from one replica, so the source bytes read
    // equal the tensor bytes; headers and metadata are generated.
    totals.source_bytes_per_byte_served = if totals.bytes == 0 {
        0.0
    } else {
        totals.tensor_bytes as f64 / totals.bytes as f64
    };
    PlanReport {
        source: plan.source.path.display().to_string(),
        target: describe_target(plan),
        iterations,
        totals,
    }
}

impl PlanReport {
    /// The whole plan: the summary's header, then every file.
    pub fn text(&self) -> String {
        let mut o = self.head();
        for it in &self.iterations {
            o.push_str(&iteration_line(it));
            for f in &it.files {
                o.push('\n');
                o.push_str(&f.text());
            }
        }
        o.push_str(&self.totals_line());
        o
    }

    /// Source, target, each iteration's world and files, totals.
    pub fn summary(&self) -> String {
        let mut o = self.head();
        for it in &self.iterations {
            o.push_str(&iteration_line(it));
            let rows: Vec<[String; 4]> = it
                .files
                .iter()
                .map(|f| {
                    [
                        f.name.clone(),
                        format!("{} bytes", f.size),
                        format!("{} tensor(s)", f.tensors.len()),
                        f.same_as_source_note(),
                    ]
                })
                .collect();
            o.push_str(&indent(&table(&rows), "  "));
        }
        o.push_str(&self.totals_line());
        o
    }

    fn head(&self) -> String {
        format!("source    {}\ntarget    {}\n", self.source, self.target)
    }

    fn totals_line(&self) -> String {
        let t = &self.totals;
        let mut o = format!(
            "\ntotal     {} file(s), {} bytes ({}), {} piece(s); source bytes read per byte served: {:.4}\n",
            t.files,
            t.bytes,
            human(t.bytes),
            t.pieces,
            t.source_bytes_per_byte_served
        );
        if t.same_as_source > 0 {
            let _ = writeln!(
                o,
                "          {} of the {} view file(s) are a source file whole (mounted: read by the kernel from the source file, FUSE passthrough, where allowed)",
                t.same_as_source, t.files
            );
        }
        o
    }
}

fn iteration_line(it: &PlanIteration) -> String {
    let small: Vec<String> = it
        .small_files
        .iter()
        .map(|(n, b)| format!("{n} ({b} bytes)"))
        .collect();
    let mut o = format!(
        "\n{}world {}: {} file(s) + {}\n",
        it.name
            .as_ref()
            .map(|n| format!("{n}: "))
            .unwrap_or_default(),
        it.world,
        it.files.len(),
        small.join(", ")
    );
    for n in &it.notes {
        let _ = writeln!(o, "  {n}");
    }
    if !it.omitted.is_empty() {
        let _ = writeln!(
            o,
            "  left out of the view ({} source tensor(s) the model map does not place): {}",
            it.omitted.len(),
            it.omitted.join(", ")
        );
    }
    o
}

impl PlanFile {
    /// `= SOURCE` for a file that is a source file whole, else empty.
    fn same_as_source_note(&self) -> String {
        self.same_as_source
            .as_ref()
            .map_or(String::new(), |s| format!("= {s}"))
    }

    /// One view file: its size and, per tensor, the byte range it occupies
    /// and the source regions its bytes come from.
    pub fn text(&self) -> String {
        let mut o = format!(
            "{}  rank {} {}: {} bytes ({}), header {} bytes, {} tensor(s)\n",
            self.name,
            self.rank,
            self.kind.as_str(),
            self.size,
            human(self.size),
            self.header_bytes,
            self.tensors.len()
        );
        if let Some(s) = &self.same_as_source {
            let _ = writeln!(
                o,
                "  byte for byte the source file {s}, whole (mounted: served by FUSE passthrough where allowed)"
            );
        }
        let mut rows = vec![[
            "OFFSET".to_string(),
            "BYTES".into(),
            "TENSOR".into(),
            "DTYPE".into(),
            "SLICE".into(),
            "<- SOURCE REGIONS".into(),
        ]];
        for t in &self.tensors {
            let sources: Vec<String> = t
                .pieces
                .iter()
                .map(|p| {
                    let r = ranges(&p.start, &p.shape);
                    match &p.tensor {
                        Some(t) => format!("{t}{r} {}", p.file),
                        None => format!("{r} {}", p.file),
                    }
                })
                .collect();
            rows.push([
                t.offset.to_string(),
                t.bytes.to_string(),
                t.name.clone(),
                t.dtype.clone(),
                ranges(&t.global_start, &t.shape),
                sources.join("; "),
            ]);
        }
        o.push_str(&indent(&table(&rows), "  "));
        o
    }
}

fn indent(text: &str, by: &str) -> String {
    text.lines().map(|l| format!("{by}{l}\n")).collect()
}

/// `[0:64, 32:64]`: a box as Python slices.
fn ranges(start: &[u64], shape: &[u64]) -> String {
    let parts: Vec<String> = start
        .iter()
        .zip(shape)
        .map(|(s, n)| format!("{s}:{}", s + n))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Bytes with a binary unit.
pub fn human(bytes: u64) -> String {
    // indicatif (already drawing export's progress bar) formats binary units.
    indicatif::BinaryBytes(bytes).to_string()
}

/// Left-aligned columns separated by two spaces.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut o = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            }
        }
        o.push_str(line.trim_end());
        o.push('\n');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reshard::target::TargetSpec;
    use std::path::Path;

    #[test]
    fn a_fused_tensors_regions_name_the_tensors_read() {
        let src = Source::open(Path::new("tests/fixtures/qwen3-tiny-hf")).unwrap();
        let spec = TargetSpec::Mesh {
            sizes: vec![("tp".into(), 2)],
            pp: None,
            offset: None,
        };
        let r = plan(&Plan::build(src, spec).unwrap());
        let qkv = "decoder.layers.0.self_attention.linear_qkv.weight";
        let t = r.iterations[0].files[0]
            .tensors
            .iter()
            .find(|t| t.name == qkv)
            .unwrap();
        // tests/fixtures/README.md: 4 heads in 2 groups of head_dim 16; rank
        // 0 of tp=2 holds group 0: query heads 0-1, key and value head 0.
        let read: Vec<(Option<&str>, Vec<u64>)> = t
            .pieces
            .iter()
            .map(|p| (p.tensor.as_deref(), p.shape.clone()))
            .collect();
        let l0 = "model.layers.0.self_attn.";
        assert_eq!(
            read,
            vec![
                (Some(&*format!("{l0}q_proj.weight")), vec![32, 64]),
                (Some(&*format!("{l0}k_proj.weight")), vec![16, 64]),
                (Some(&*format!("{l0}v_proj.weight")), vec![16, 64]),
            ]
        );
        let text = r.iterations[0].files[0].text();
        assert!(
            text.contains(&format!("{l0}k_proj.weight[0:16, 0:64] model-")),
            "{text}"
        );
        // A stored tensor's regions name no tensor: the row is its own.
        let norm = r.iterations[0].files[0]
            .tensors
            .iter()
            .find(|t| t.name == "decoder.layers.0.input_layernorm.weight")
            .unwrap();
        assert!(norm.pieces.iter().all(|p| p.tensor.is_none()));
    }
}
