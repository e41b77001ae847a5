//! Qwen3 between Hugging Face and MindSpore Transformers.
//!
//! The map is the one MindSpore Transformers' own converter applies when it
//! loads a Hub Qwen3 (`pretrained_model_dir`), pinned by fixtures written by
//! that converter and by transformers (`tests/fixtures/qwen3-*`):
//!
//! * names: `model.embed_tokens` → `embedding.word_embeddings`,
//!   `model.layers.N.self_attn.{q,k,v}_proj` → `decoder.layers.N.self_attention.linear_qkv`
//!   (fused), `o_proj` → `linear_proj`, `q_norm`/`k_norm` →
//!   `q_layernorm`/`k_layernorm`, `mlp.{gate,up}_proj` → `mlp.linear_fc1`
//!   (fused), `down_proj` → `linear_fc2`, `post_attention_layernorm` →
//!   `pre_mlp_layernorm`, `model.norm` → `decoder.final_layernorm`, `lm_head`
//!   → `output_layer` (absent when embeddings are tied);
//! * fused QKV is interleaved per key/value group: for each group, its
//!   `heads/groups` query heads, then its key head, then its value head;
//! * fused gate/up is interleaved row by row: `fc1[2i] = gate[i]`, `fc1[2i+1] = up[i]`;
//! * layouts over the device matrix `(dp, cp, tp)`: `linear_qkv`,
//!   `linear_fc1`, `output_layer` split dimension 0 on tp, `linear_proj` and
//!   `linear_fc2` dimension 1, the embedding dimension 0 when the vocabulary
//!   divides by tp (else whole), norms whole.
//!
//! Both directions are [`RowMap`]s over the stored tensors, so a fused
//! tensor's bytes are read from its parts (and a part's from the fused
//! tensor) only when asked for.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{Value, json};

use super::{Config, GeneratedConfig, Map, ModelInfo};
use crate::checkpoint::header::dtype_to_mindspore;
use crate::checkpoint::layout::Layout;
use crate::checkpoint::names::{self, Kind, layer_index};
use crate::checkpoint::source::{Assembly, Iteration, RowMap, RowSegment, SplitRules, Tensor};
use crate::error::Result;
use crate::{bad, bail};

/// Qwen3's entry in the table of maps ([`super::MODELS`]).
pub static MAP: Map = Map {
    model_type: "qwen3",
    display: "Qwen3",
    hf_to_mf,
    mf_to_hf,
    mark_mf_rules,
    mf_needs: "embedding, q_layernorm, linear_proj, linear_qkv and linear_fc1 of layer 0",
    derived,
};

/// Buffers a Qwen3 computes from its config rather than learns: older
/// transformers saved the rotary embedding's `inv_freq` (from `rope_theta`
/// and `head_dim`), per layer or once; neither MindSpore Transformers nor
/// transformers loads it, so a view may leave it out.
pub(super) fn derived(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// The sizes that fix every tensor's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims {
    pub vocab: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub groups: u64,
    pub head_dim: u64,
    pub tied: bool,
    /// `attention_bias`: q/k/v carry biases (fused like their weights).
    pub qkv_bias: bool,
}

impl Dims {
    /// The sizes `config.json` gives, checked for sense.
    pub fn from_config(c: &Config) -> Result<Dims> {
        let hidden = c.need("hidden_size")?;
        let heads = c.need("num_attention_heads")?;
        let groups = c.uint("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match c.uint("head_dim")? {
            Some(d) => d,
            None => hidden / heads,
        };
        let d = Dims {
            vocab: c.need("vocab_size")?,
            hidden,
            intermediate: c.need("intermediate_size")?,
            layers: c.need("num_hidden_layers")?,
            heads,
            groups,
            head_dim,
            tied: c.flag("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: c.flag("attention_bias")?.unwrap_or(false),
        };
        d.check().map_err(|e| bad!("{}: {e}", c.path.display()))?;
        Ok(d)
    }

    pub(super) fn check(&self) -> std::result::Result<(), String> {
        if self.groups == 0 || self.head_dim == 0 {
            return Err("num_key_value_heads and head_dim must be positive".into());
        }
        if !self.heads.is_multiple_of(self.groups) {
            return Err(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.heads, self.groups
            ));
        }
        // Every size below is a product of these; refuse any that overflows
        // (the fused QKV's row count too, not only what it multiplies).
        let rows = self
            .groups
            .checked_mul(2)
            .and_then(|kv| kv.checked_add(self.heads))
            .and_then(|r| r.checked_mul(self.head_dim));
        let all = [
            rows.and_then(|r| r.checked_mul(self.hidden)),
            self.vocab.checked_mul(self.hidden),
            self.intermediate
                .checked_mul(2)
                .and_then(|r| r.checked_mul(self.hidden)),
            self.heads
                .checked_mul(self.head_dim)
                .and_then(|r| r.checked_mul(self.hidden)),
        ];
        if all
            .iter()
            .any(|v| v.and_then(|v| v.checked_mul(8)).is_none())
        {
            return Err("the sizes overflow 64-bit byte counts".into());
        }
        Ok(())
    }

    pub(super) fn q_rows(&self) -> u64 {
        self.heads * self.head_dim
    }
    pub(super) fn kv_rows(&self) -> u64 {
        self.groups * self.head_dim
    }
    /// Query heads per key/value group.
    pub(super) fn ratio(&self) -> u64 {
        self.heads / self.groups
    }
    /// Rows of one key/value group in the fused QKV.
    pub(super) fn group_rows(&self) -> u64 {
        (self.ratio() + 2) * self.head_dim
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "hidden_size={}, num_attention_heads={}, num_key_value_heads={}, head_dim={}, intermediate_size={}, vocab_size={}",
            self.hidden, self.heads, self.groups, self.head_dim, self.intermediate, self.vocab
        )
    }
}

/// MindSpore Transformers' order within a layer (as its metadata.json
/// lists one): input norm, fc2, fc1, pre-MLP norm, k norm, attention
/// projection, q norm, fused QKV.
const MF_LAYER_ORDER: &[&str] = &[
    "input_layernorm.weight",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc1.weight",
    "pre_mlp_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
];

/// transformers' order within a Qwen3 layer (its state_dict's).
const HF_LAYER_ORDER: &[&str] = &[
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
];

/// Where a layer's tensor comes in `order` (by the end of its name).
pub(super) fn layer_rank(order: &[&str], name: &str) -> usize {
    order
        .iter()
        .position(|o| name.ends_with(&format!(".{o}")))
        .unwrap_or(order.len())
}

/// Where a tensor is split: by tp on the dimensions marked true.
pub(super) fn tp_layout(split: &[bool]) -> Layout {
    Layout {
        device_matrix: vec![1, 1, 1],
        tensor_map: split
            .iter()
            .map(|&s| if s { vec![2] } else { Vec::new() })
            .collect(),
        alias_name: vec!["dp".into(), "cp".into(), "tp".into()],
        rank_list: vec![0],
    }
}

/// One renamed (not fused) tensor of a layer: HF suffix, MF suffix, split.
const LAYER_RENAMES: &[(&str, &str, &[bool])] = &[
    ("input_layernorm.weight", "input_layernorm.weight", &[false]),
    (
        "mlp.down_proj.weight",
        "mlp.linear_fc2.weight",
        &[false, true],
    ),
    (
        "post_attention_layernorm.weight",
        "pre_mlp_layernorm.weight",
        &[false],
    ),
    (
        "self_attn.k_norm.weight",
        "self_attention.k_layernorm.weight",
        &[false],
    ),
    (
        "self_attn.o_proj.weight",
        "self_attention.linear_proj.weight",
        &[false, true],
    ),
    (
        "self_attn.q_norm.weight",
        "self_attention.q_layernorm.weight",
        &[false],
    ),
];

pub(super) fn hf_layer(i: u64, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}
pub(super) fn mf_layer(i: u64, suffix: &str) -> String {
    format!("decoder.layers.{i}.{suffix}")
}

pub(super) const HF_EMBED: &str = "model.embed_tokens.weight";
pub(super) const HF_NORM: &str = "model.norm.weight";
pub(super) const HF_HEAD: &str = "lm_head.weight";
pub(super) const MF_EMBED: &str = "embedding.word_embeddings.weight";
pub(super) const MF_NORM: &str = "decoder.final_layernorm.weight";
pub(super) const MF_HEAD: &str = "output_layer.weight";

/// The shape a Hugging Face tensor must have (by its name within a layer).
pub(super) fn hf_shape(d: &Dims, suffix: &str) -> Vec<u64> {
    match suffix {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![d.hidden],
        "self_attn.q_norm.weight" | "self_attn.k_norm.weight" => vec![d.head_dim],
        "self_attn.o_proj.weight" => vec![d.hidden, d.q_rows()],
        "mlp.down_proj.weight" => vec![d.hidden, d.intermediate],
        "self_attn.q_proj.weight" => vec![d.q_rows(), d.hidden],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![d.kv_rows(), d.hidden],
        "self_attn.q_proj.bias" => vec![d.q_rows()],
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![d.kv_rows()],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![d.intermediate, d.hidden],
        _ => Vec::new(),
    }
}

/// Tensors by name, taken out one by one as the map places them.
pub(super) struct Pool<'a> {
    pub(super) it: &'a Iteration,
    pub(super) tensors: HashMap<String, Tensor>,
    /// Says where the sizes came from, for shape errors.
    pub(super) sizes_from: String,
    /// The model, for messages (`Qwen3`).
    pub(super) model: &'static str,
}

impl Pool<'_> {
    pub(super) fn file_of(&self, t: &Tensor) -> String {
        t.chunks
            .first()
            .map(|c| self.it.files[c.file].path.display().to_string())
            .unwrap_or_else(|| self.it.dir.display().to_string())
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes `name`, which must exist with shape `shape`.
    pub(super) fn take(&mut self, name: &str, shape: &[u64], needed_for: &str) -> Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            bad!(
                "{}: tensor {name} is missing; {} needs it for {needed_for}",
                self.it.dir.display(),
                self.model
            )
        })?;
        if t.global_shape != shape {
            bail!(
                "{}: tensor {name}: shape {:?}, but {} gives {:?}",
                self.file_of(&t),
                t.global_shape,
                self.sizes_from,
                shape
            );
        }
        Ok(t)
    }
}

/// A tensor under a new name, with a new layout, in the single source stage.
pub(super) fn renamed(
    mut t: Tensor,
    name: String,
    layout: Option<Layout>,
    rules: SplitRules,
) -> Tensor {
    t.name = name;
    t.layout = layout;
    t.stage = 0;
    t.kind = Kind::Model;
    t.rules = rules;
    t
}

/// A tensor assembled from rows of `Iteration::parts`.
pub(super) fn assembled(
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    map: RowMap,
    layout: Option<Layout>,
    rules: SplitRules,
) -> Tensor {
    made_of(name, dtype, shape, Assembly::Rows(map), layout, rules)
}

/// A tensor made of `Iteration::parts` as `assembly` says, in the single
/// source stage.
pub(super) fn made_of(
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    assembly: Assembly,
    layout: Option<Layout>,
    rules: SplitRules,
) -> Tensor {
    let n = shape.len();
    Tensor {
        name,
        kind: Kind::Model,
        dtype,
        ms_dtype: dtype_to_mindspore(dtype),
        chunk_shape: shape.clone(),
        global_shape: shape,
        layout,
        frag: vec![1; n],
        chunks: Vec::new(),
        stage: 0,
        allow_shape_mismatch: false,
        allow_to_save: true,
        assembly: Some(assembly),
        rules,
    }
}

/// All parts of a fused tensor must share one dtype.
pub(super) fn same_dtype(pool: &Pool<'_>, parts: &[&Tensor]) -> Result<Dtype> {
    let d = parts[0].dtype;
    if let Some(p) = parts.iter().find(|p| p.dtype != d) {
        bail!(
            "{}: tensor {}: dtype {:?}, but {} is {:?}; the parts of a fused tensor must share a dtype",
            pool.file_of(p),
            p.name,
            p.dtype,
            parts[0].name,
            d
        );
    }
    Ok(d)
}

/// Reads a Hugging Face Qwen3 folder (already loaded as plain tensors) as
/// the MindSpore Transformers checkpoint it converts to: MF names, fused
/// QKV and gate/up, Qwen3's layouts on a `(dp, cp, tp) = (1, 1, 1)` device
/// matrix (so `--mesh dp=D,tp=T` resizes them), one stage, prefix `qwen3`.
pub fn hf_to_mf(mut it: Iteration, config: &Config) -> Result<Iteration> {
    let d = Dims::from_config(config)?;
    let tensors: HashMap<String, Tensor> =
        it.tensors.drain(..).map(|t| (t.name.clone(), t)).collect();
    let mut pool = Pool {
        it: &it,
        tensors,
        sizes_from: format!("{} ({})", config.path.display(), d.describe()),
        model: MAP.display,
    };
    let mut out: Vec<Tensor> = Vec::new();
    let mut parts: Vec<Tensor> = Vec::new();

    let embed_rules = SplitRules {
        dim0_group: None,
        whole_if_uneven: true,
    };
    let t = pool.take(HF_EMBED, &[d.vocab, d.hidden], MF_EMBED)?;
    out.push(renamed(
        t,
        MF_EMBED.into(),
        Some(tp_layout(&[true, false])),
        embed_rules,
    ));

    for i in 0..d.layers {
        let mut layer: Vec<Tensor> = Vec::new();
        for &(hf, mf, split) in LAYER_RENAMES {
            let t = pool.take(&hf_layer(i, hf), &hf_shape(&d, hf), &mf_layer(i, mf))?;
            layer.push(renamed(
                t,
                mf_layer(i, mf),
                Some(tp_layout(split)),
                SplitRules::default(),
            ));
        }
        // gate/up, row by row.
        let fc1 = mf_layer(i, "mlp.linear_fc1.weight");
        let gate = pool.take(
            &hf_layer(i, "mlp.gate_proj.weight"),
            &hf_shape(&d, "mlp.gate_proj.weight"),
            &fc1,
        )?;
        let up = pool.take(
            &hf_layer(i, "mlp.up_proj.weight"),
            &hf_shape(&d, "mlp.up_proj.weight"),
            &fc1,
        )?;
        let dtype = same_dtype(&pool, &[&gate, &up])?;
        let p = parts.len();
        parts.push(gate);
        parts.push(up);
        layer.push(assembled(
            fc1,
            dtype,
            vec![2 * d.intermediate, d.hidden],
            fc1_from_parts(p),
            Some(tp_layout(&[true, false])),
            SplitRules {
                dim0_group: Some((2, "gate/up row pairs (intermediate_size)")),
                whole_if_uneven: false,
            },
        ));
        // q/k/v, per key/value group; biases the same way when present.
        let kinds: &[(&str, bool)] = if d.qkv_bias {
            &[("weight", true), ("bias", false)]
        } else {
            &[("weight", true)]
        };
        for &(what, is_weight) in kinds {
            let qkv = mf_layer(i, &format!("self_attention.linear_qkv.{what}"));
            let mut three = Vec::with_capacity(3);
            for x in ["q", "k", "v"] {
                let hf = format!("self_attn.{x}_proj.{what}");
                three.push(pool.take(&hf_layer(i, &hf), &hf_shape(&d, &hf), &qkv)?);
            }
            let dtype = same_dtype(&pool, &[&three[0], &three[1], &three[2]])?;
            let p = parts.len();
            parts.extend(three);
            let rows = d.groups * d.group_rows();
            let (shape, split) = if is_weight {
                (vec![rows, d.hidden], &[true, false][..])
            } else {
                (vec![rows], &[true][..])
            };
            layer.push(assembled(
                qkv,
                dtype,
                shape,
                qkv_from_parts(&d, p),
                Some(tp_layout(split)),
                SplitRules {
                    dim0_group: Some((d.group_rows(), "key/value groups (num_key_value_heads)")),
                    whole_if_uneven: false,
                },
            ));
        }
        // MindSpore Transformers' own order within a layer (its metadata.json's).
        layer.sort_by_key(|t| layer_rank(MF_LAYER_ORDER, &t.name));
        out.extend(layer);
    }

    let t = pool.take(HF_NORM, &[d.hidden], MF_NORM)?;
    out.push(renamed(
        t,
        MF_NORM.into(),
        Some(tp_layout(&[false])),
        SplitRules::default(),
    ));
    let mut notes = vec![format!(
        "sizes from {}: {}",
        config.path.display(),
        d.describe()
    )];
    out.extend(hf_head(&mut pool, &d, &mut notes)?);

    let mut omitted: Vec<String> = pool.tensors.into_keys().collect();
    omitted.sort();
    let stray = omitted
        .iter()
        .find(|n| layer_index(n).is_some_and(|l| l >= d.layers) && n.starts_with("model.layers."));
    if let Some(n) = stray {
        bail!(
            "{}: tensor {n} belongs to a layer beyond num_hidden_layers = {}",
            config.path.display(),
            d.layers
        );
    }
    it.tensors = out;
    it.parts = parts;
    it.omitted = omitted;
    it.prefix = Some("qwen3".into());
    it.world = 1;
    it.stage_devices = 1;
    it.stages = 1;
    it.model = Some(ModelInfo {
        model_type: MAP.model_type.into(),
        notes,
        config: generated_config(&d),
    });
    Ok(it)
}

/// The output layer a Hugging Face folder converts to: `lm_head.weight` as
/// `output_layer.weight`, split on tp; none when the config ties it to the
/// embedding, even when a copy is stored, as MindSpore Transformers'
/// converter has it: its network (`GPTModel` with
/// `share_embeddings_and_output_weights = tie_word_embeddings`, for Qwen3
/// and Qwen3-MoE alike) has no output layer to load one into. A stored
/// copy left out so is said in `notes` (and so by `inspect`).
pub(super) fn hf_head(
    pool: &mut Pool,
    d: &Dims,
    notes: &mut Vec<String>,
) -> Result<Option<Tensor>> {
    if d.tied {
        if pool.tensors.remove(HF_HEAD).is_some() {
            notes.push(format!(
                "{HF_HEAD} is stored but left out: config.json ties it to the embedding (tie_word_embeddings: true), so {MF_HEAD} is not shown, as MindSpore Transformers' converter drops it"
            ));
        }
        return Ok(None);
    }
    let t = pool.take(HF_HEAD, &[d.vocab, d.hidden], MF_HEAD)?;
    Ok(Some(renamed(
        t,
        MF_HEAD.into(),
        Some(tp_layout(&[true, false])),
        SplitRules::default(),
    )))
}

/// `fc1[2i] = gate[i]`, `fc1[2i+1] = up[i]`; gate at part `p`, up at `p+1`.
fn fc1_from_parts(p: usize) -> RowMap {
    RowMap {
        period: 2,
        segments: vec![
            RowSegment {
                out_start: 0,
                len: 1,
                part: p,
                stride: 1,
                base: 0,
            },
            RowSegment {
                out_start: 1,
                len: 1,
                part: p + 1,
                stride: 1,
                base: 0,
            },
        ],
    }
}

/// Per key/value group: its query heads, its key head, its value head;
/// q, k, v at parts `p`, `p+1`, `p+2`.
pub(super) fn qkv_from_parts(d: &Dims, p: usize) -> RowMap {
    let q = d.ratio() * d.head_dim;
    let h = d.head_dim;
    RowMap {
        period: d.group_rows(),
        segments: vec![
            RowSegment {
                out_start: 0,
                len: q,
                part: p,
                stride: q,
                base: 0,
            },
            RowSegment {
                out_start: q,
                len: h,
                part: p + 1,
                stride: h,
                base: 0,
            },
            RowSegment {
                out_start: q + h,
                len: h,
                part: p + 2,
                stride: h,
                base: 0,
            },
        ],
    }
}

/// Rows `base..base+len` of every period of `period_in` rows of part `p`,
/// back to back: one of q/k/v out of a fused QKV, gate or up out of fc1.
pub(super) fn rows_of(p: usize, len: u64, period_in: u64, base: u64) -> RowMap {
    RowMap {
        period: len,
        segments: vec![RowSegment {
            out_start: 0,
            len,
            part: p,
            stride: period_in,
            base,
        }],
    }
}

/// Each tensor's shape by name.
pub(super) fn shapes_of<'a>(
    tensors: impl Iterator<Item = &'a Tensor>,
) -> HashMap<&'a str, &'a [u64]> {
    tensors
        .map(|t| (t.name.as_str(), t.global_shape.as_slice()))
        .collect()
}

/// The sizes of a MindSpore Transformers Qwen3 read off its tensors, each with the
/// tensor it came from.
fn infer_dims(dir: &Path, shapes: &HashMap<&str, &[u64]>) -> Result<(Dims, Vec<String>)> {
    let (mut d, mut notes) = infer_attention(dir, shapes, MAP.display)?;
    let fc1 = mf_layer(0, "mlp.linear_fc1.weight");
    let f = shape_of(dir, shapes, &fc1, 2, MAP.display)?[0];
    if f % 2 != 0 {
        bail!(
            "{}: tensor {fc1}: {f} rows, expected an even number (gate and up interleaved)",
            dir.display()
        );
    }
    notes.push(format!("intermediate_size = {} (from {fc1})", f / 2));
    d.intermediate = f / 2;
    d.check()
        .map_err(|e| bad!("{}: inferred sizes: {e}", dir.display()))?;
    Ok((d, notes))
}

/// The shape of tensor `name`, which must have `ndim` non-zero dimensions:
/// it is needed to infer `model`'s sizes.
pub(super) fn shape_of<'a>(
    dir: &Path,
    shapes: &HashMap<&str, &'a [u64]>,
    name: &str,
    ndim: usize,
    model: &str,
) -> Result<&'a [u64]> {
    let dir = dir.display();
    let s = *shapes.get(name).ok_or_else(|| {
        bad!("{dir}: tensor {name} is missing; it is needed to infer the {model} sizes (or give --hf-files DIR with a config.json)")
    })?;
    if s.len() != ndim || s.contains(&0) {
        bail!("{dir}: tensor {name}: shape {s:?}, expected {ndim} non-zero dimensions");
    }
    Ok(s)
}

/// The sizes a MindSpore Transformers Qwen3 (or Qwen3-MoE) shows in its
/// embedding, layers and attention, each with the tensor it came from;
/// `intermediate` is left 0 for the caller (dense or expert MLP).
pub(super) fn infer_attention(
    dir: &Path,
    shapes: &HashMap<&str, &[u64]>,
    model: &str,
) -> Result<(Dims, Vec<String>)> {
    let get = |name: &str, ndim: usize| shape_of(dir, shapes, name, ndim, model);
    let dir = dir.display();
    let mut notes = Vec::new();
    let e = get(MF_EMBED, 2)?;
    let (vocab, hidden) = (e[0], e[1]);
    notes.push(format!(
        "vocab_size = {vocab}, hidden_size = {hidden} (from {MF_EMBED})"
    ));
    let layers = shapes
        .keys()
        .filter(|n| n.starts_with("decoder.layers."))
        .filter_map(|n| layer_index(n))
        .max()
        .map_or(0, |m| m + 1);
    if layers == 0 {
        bail!("{dir}: no decoder.layers.N tensors: not a MindFormers {model} checkpoint");
    }
    notes.push(format!(
        "num_hidden_layers = {layers} (from the decoder.layers.N names)"
    ));
    let qn = mf_layer(0, "self_attention.q_layernorm.weight");
    let head_dim = get(&qn, 1)?[0];
    notes.push(format!("head_dim = {head_dim} (from {qn})"));
    let proj = mf_layer(0, "self_attention.linear_proj.weight");
    let p = get(&proj, 2)?;
    if p[1] % head_dim != 0 {
        bail!(
            "{dir}: tensor {proj}: {} columns are not a whole number of heads of head_dim {head_dim}",
            p[1]
        );
    }
    let heads = p[1] / head_dim;
    notes.push(format!("num_attention_heads = {heads} (from {proj})"));
    let qkv = mf_layer(0, "self_attention.linear_qkv.weight");
    let rows = get(&qkv, 2)?[0];
    let groups = (rows / head_dim)
        .checked_sub(heads)
        .filter(|r| rows % head_dim == 0 && r % 2 == 0 && *r > 0)
        .map(|r| r / 2)
        .ok_or_else(|| {
            bad!("{dir}: tensor {qkv}: {rows} rows are not (heads + 2 * groups) * head_dim for {heads} heads of {head_dim}")
        })?;
    notes.push(format!("num_key_value_heads = {groups} (from {qkv})"));
    let tied = !shapes.contains_key(MF_HEAD);
    notes.push(format!(
        "tie_word_embeddings = {tied} ({MF_HEAD} {})",
        if tied { "absent" } else { "present" }
    ));
    let qkv_bias = shapes.contains_key(mf_layer(0, "self_attention.linear_qkv.bias").as_str());
    let d = Dims {
        vocab,
        hidden,
        intermediate: 0,
        layers,
        heads,
        groups,
        head_dim,
        tied,
        qkv_bias,
    };
    Ok((d, notes))
}

/// Marks the fused tensors of a MindSpore Transformers Qwen3 iteration with
/// the cuts a target may make (whole key/value groups, whole gate/up row
/// pairs), as a Hugging Face source's are. The sizes are inferred from the
/// tensors; an iteration they cannot be inferred from (not a Qwen3) is left
/// as it is (`false`).
pub fn mark_mf_rules(it: &mut Iteration) -> bool {
    let shapes = shapes_of(it.tensors.iter());
    let Ok((d, _)) = infer_dims(&it.dir, &shapes) else {
        return false;
    };
    for t in &mut it.tensors {
        let base = names::parameter_name(&t.name);
        if base.ends_with(".self_attention.linear_qkv.weight")
            || base.ends_with(".self_attention.linear_qkv.bias")
        {
            t.rules.dim0_group = Some((d.group_rows(), "key/value groups (num_key_value_heads)"));
        } else if base.ends_with(".mlp.linear_fc1.weight") {
            t.rules.dim0_group = Some((2, "gate/up row pairs (intermediate_size)"));
        }
    }
    true
}

/// Reads a MindSpore Transformers Qwen3 iteration as the Hugging Face model
/// it is: HF names, QKV and gate/up split back out of the fused tensors (by
/// row maps over them, wherever their slices are stored), every tensor
/// whole, optimizer states left out. Sizes come from `config` when given
/// (and are checked against the tensors), else from the tensors.
pub fn mf_to_hf(mut it: Iteration, config: Option<&Config>) -> Result<Iteration> {
    let mut by_name: HashMap<String, Tensor> = HashMap::new();
    let mut opt = 0usize;
    for t in it.tensors.drain(..) {
        if t.kind == Kind::Model {
            by_name.insert(t.name.clone(), t);
        } else {
            opt += 1;
        }
    }
    let (d, mut notes, sizes_from) = match config {
        Some(c) => {
            let d = Dims::from_config(c)?;
            let from = format!("{} ({})", c.path.display(), d.describe());
            (d, vec![format!("sizes from {from}")], from)
        }
        None => {
            let (d, notes) = infer_dims(&it.dir, &shapes_of(by_name.values()))?;
            let from = format!("the sizes inferred from the tensors ({})", d.describe());
            (d, notes, from)
        }
    };
    if opt > 0 {
        notes.push(format!("{opt} optimizer-state tensors not shown"));
    }
    // A Hugging Face source read as MindSpore Transformers already has parts; the
    // fused tensors moved into `parts` here keep pointing at them.
    let mut parts: Vec<Tensor> = std::mem::take(&mut it.parts);
    let mut pool = Pool {
        it: &it,
        tensors: by_name,
        sizes_from,
        model: MAP.display,
    };
    let mut out: Vec<Tensor> = Vec::new();
    let whole = SplitRules::default;

    let t = pool.take(MF_EMBED, &[d.vocab, d.hidden], HF_EMBED)?;
    out.push(renamed(t, HF_EMBED.into(), None, whole()));
    for i in 0..d.layers {
        // q, k, v out of the fused QKV (weights, then biases if any).
        let kinds: &[(&str, bool)] = if d.qkv_bias {
            &[("weight", true), ("bias", false)]
        } else {
            &[("weight", true)]
        };
        let mut layer: Vec<Tensor> = Vec::new();
        for &(what, is_weight) in kinds {
            let name = mf_layer(i, &format!("self_attention.linear_qkv.{what}"));
            let rows = d.groups * d.group_rows();
            let shape: Vec<u64> = if is_weight {
                vec![rows, d.hidden]
            } else {
                vec![rows]
            };
            let fused = pool.take(
                &name,
                &shape,
                &hf_layer(i, &format!("self_attn.q_proj.{what}")),
            )?;
            let (dtype, p) = (fused.dtype, parts.len());
            parts.push(fused);
            let q = d.ratio() * d.head_dim;
            let h = d.head_dim;
            for (x, len, base, total) in [
                ("q", q, 0, d.q_rows()),
                ("k", h, q, d.kv_rows()),
                ("v", h, q + h, d.kv_rows()),
            ] {
                let mut s = shape.clone();
                s[0] = total;
                layer.push(assembled(
                    hf_layer(i, &format!("self_attn.{x}_proj.{what}")),
                    dtype,
                    s,
                    rows_of(p, len, d.group_rows(), base),
                    None,
                    whole(),
                ));
            }
        }
        for &(hf, mf, _) in LAYER_RENAMES {
            let t = pool.take(&mf_layer(i, mf), &hf_shape(&d, hf), &hf_layer(i, hf))?;
            layer.push(renamed(t, hf_layer(i, hf), None, whole()));
        }
        let fc1 = mf_layer(i, "mlp.linear_fc1.weight");
        let fused = pool.take(
            &fc1,
            &[2 * d.intermediate, d.hidden],
            &hf_layer(i, "mlp.gate_proj.weight"),
        )?;
        let (dtype, p) = (fused.dtype, parts.len());
        parts.push(fused);
        for (x, base) in [("gate", 0), ("up", 1)] {
            layer.push(assembled(
                hf_layer(i, &format!("mlp.{x}_proj.weight")),
                dtype,
                vec![d.intermediate, d.hidden],
                rows_of(p, 1, 2, base),
                None,
                whole(),
            ));
        }
        // transformers' own order within a layer (its state_dict's).
        layer.sort_by_key(|t| layer_rank(HF_LAYER_ORDER, &t.name));
        out.extend(layer);
    }
    let t = pool.take(MF_NORM, &[d.hidden], HF_NORM)?;
    out.push(renamed(t, HF_NORM.into(), None, whole()));
    if !d.tied || pool.has(MF_HEAD) {
        let t = pool.take(MF_HEAD, &[d.vocab, d.hidden], HF_HEAD)?;
        out.push(renamed(t, HF_HEAD.into(), None, whole()));
    }
    let mut omitted: Vec<String> = pool.tensors.into_keys().collect();
    omitted.sort();
    it.tensors = out;
    it.parts = parts;
    // A Hugging Face source mapped back keeps what its first pass left out.
    it.omitted.extend(omitted);
    it.prefix = None;
    it.model = Some(ModelInfo {
        model_type: MAP.model_type.into(),
        notes,
        config: generated_config(&d),
    });
    Ok(it)
}

/// Fields of a generated `config.json` that the tensors cannot tell: each
/// takes the value every released Qwen3 (0.6B to 32B, April 2025) has in
/// its `config.json`, not `Qwen3Config`'s class default where the two
/// differ (`rope_theta` 10000 and `max_position_embeddings` 32768 there):
/// with the class defaults the logits of the 0.6B model moved by up to 0.59
/// with identical weights. `max_window_layers` equals `num_hidden_layers`
/// in those configs (it does nothing while `use_sliding_window` is false).
/// Listed as stderr lists them: those that change the logits first.
pub const DEFAULTED: &[&str] = &[
    "rope_theta",
    "max_position_embeddings",
    "rope_scaling",
    "rms_norm_eps",
    "hidden_act",
    "attention_dropout",
    "initializer_range",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "use_cache",
];

/// A `config.json` for transformers: every size from `d`, the rest the
/// released Qwen3 models' values (listed in [`DEFAULTED`]); the dtype is
/// the view's.
fn generated_config(d: &Dims) -> GeneratedConfig {
    let v: Value = json!({
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": d.qkv_bias,
        "attention_dropout": 0.0,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": 40960,
        "max_window_layers": d.layers,
        "model_type": "qwen3",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.groups,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 1000000,
        "sliding_window": null,
        "tie_word_embeddings": d.tied,
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": d.vocab,
    });
    let fields = v.as_object().cloned().unwrap_or_default();
    GeneratedConfig {
        model: MAP.display,
        fields,
        defaulted: DEFAULTED,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::checkpoint::models::ModelChoice;
    use crate::checkpoint::source::Source;
    use crate::checkpoint::source::tests::{f32s, fixture, input_err, write_st};

    fn dims(heads: u64, groups: u64, head_dim: u64) -> Dims {
        Dims {
            vocab: 8,
            hidden: 4,
            intermediate: 3,
            layers: 1,
            heads,
            groups,
            head_dim,
            tied: false,
            qkv_bias: false,
        }
    }

    /// Row `r` of the fused QKV, computed the slow way from the definition.
    fn fused_row(d: &Dims, r: u64) -> (usize, u64) {
        let g = r / d.group_rows();
        let w = r % d.group_rows();
        let q = d.ratio() * d.head_dim;
        if w < q {
            (0, g * q + w)
        } else if w < q + d.head_dim {
            (1, g * d.head_dim + w - q)
        } else {
            (2, g * d.head_dim + w - q - d.head_dim)
        }
    }

    #[test]
    fn qkv_rows_follow_the_group_interleave() {
        for (h, g, hd) in [(4, 2, 16), (8, 1, 2), (6, 3, 1), (2, 2, 3)] {
            let d = dims(h, g, hd);
            let m = qkv_from_parts(&d, 0);
            for r in 0..g * d.group_rows() {
                let (part, row, left) = m.locate(r);
                assert_eq!((part, row), fused_row(&d, r), "h={h} g={g} hd={hd} r={r}");
                assert!(left >= 1);
            }
            // Splitting back: q/k/v rows read from the fused rows.
            let q = d.ratio() * hd;
            for (p, len, base) in [(0usize, q, 0), (1, hd, q), (2, hd, q + hd)] {
                let split = rows_of(9, len, d.group_rows(), base);
                let total = if p == 0 { d.q_rows() } else { d.kv_rows() };
                for r in 0..total {
                    let (_, fused, _) = split.locate(r);
                    assert_eq!(fused_row(&d, fused), (p, r));
                }
            }
        }
    }

    #[test]
    fn fc1_rows_interleave_gate_and_up() {
        let m = fc1_from_parts(5);
        assert_eq!(m.locate(0), (5, 0, 1));
        assert_eq!(m.locate(1), (6, 0, 1));
        assert_eq!(m.locate(7), (6, 3, 1));
        let up = rows_of(0, 1, 2, 1);
        assert_eq!(up.locate(3), (0, 7, 1));
    }

    #[test]
    fn a_generated_config_assumes_the_released_models_values() {
        // Qwen3-0.6B's config.json as released (and 1.7B to 32B: the same
        // rope_theta and max_position_embeddings), not Qwen3Config's
        // class defaults (10000, 32768).
        let mut d = dims(16, 8, 128);
        d.layers = 28;
        let c = generated_config(&d);
        let f = |k: &str| c.fields[k].clone();
        assert_eq!(f("rope_theta"), json!(1000000));
        assert_eq!(f("max_position_embeddings"), json!(40960));
        assert_eq!(f("max_window_layers"), json!(28));
        assert_eq!(f("rope_scaling"), Value::Null);
        assert_eq!(f("rms_norm_eps"), json!(1e-6));
        for k in DEFAULTED {
            assert!(c.fields.contains_key(*k), "{k} is listed but not written");
        }
        let assumed = c.assumed(&[]);
        assert_eq!(assumed[0], "rope_theta = 1000000");
        assert_eq!(assumed[1], "max_position_embeddings = 40960");
        assert_eq!(assumed.len(), DEFAULTED.len());
        let set = [("rope_theta".to_string(), json!(500000.0))];
        assert!(!c.assumed(&set).iter().any(|a| a.starts_with("rope_theta")));
        let text: Value = serde_json::from_slice(&c.render_with(Dtype::F32, &set)).unwrap();
        assert_eq!(text["rope_theta"], json!(500000.0));
        assert_eq!(text["dtype"], json!("float32"));
        assert_eq!(text["torch_dtype"], json!("float32"));
        let note = c.note(&set);
        assert!(
            note.contains("released Qwen3") && note.contains("--hf-config"),
            "{note}"
        );
        assert!(
            note.contains("set by --hf-config: rope_theta = 500000.0"),
            "{note}"
        );
    }

    #[test]
    fn overrides_may_not_contradict_the_tensors() {
        let c = generated_config(&dims(4, 2, 2));
        let ok = [
            ("rope_theta".to_string(), json!(5)),
            ("bos_token_id".to_string(), json!(1)),
        ];
        c.check_overrides(&ok).unwrap();
        for k in ["hidden_size", "num_key_value_heads", "tie_word_embeddings"] {
            let e = c.check_overrides(&[(k.to_string(), json!(1))]).unwrap_err();
            assert!(
                e.to_string().contains(k) && e.to_string().contains("tensors"),
                "{e}"
            );
            assert_eq!(e.exit_code(), 2);
        }
        for k in ["dtype", "torch_dtype"] {
            let e = c
                .check_overrides(&[(k.to_string(), json!("float16"))])
                .unwrap_err();
            assert!(e.to_string().contains("--dtype"), "{e}");
        }
    }

    #[test]
    fn only_rotary_buffers_are_derived() {
        assert!(derived("model.rotary_emb.inv_freq"));
        assert!(derived("model.layers.3.self_attn.rotary_emb.inv_freq"));
        for n in [
            "model.layers.0.self_attn.o_proj.bias",
            "model.layers.0.self_attn.extra_bias",
            "lm_head.weight",
            "inv_freq",
        ] {
            assert!(!derived(n), "{n}");
        }
    }

    #[test]
    fn groups_must_divide_heads() {
        assert!(dims(4, 3, 2).check().is_err());
        assert!(dims(4, 2, 2).check().is_ok());
    }

    /// A fixture's `config.json` with `edit` applied (its path the fixture's).
    pub(in crate::checkpoint::models) fn config_of(fx: &str, edit: impl Fn(&mut Value)) -> Config {
        let mut c = Config::read(&fixture(&format!("{fx}/config.json"))).unwrap();
        edit(&mut c.json);
        c
    }

    /// A fixture's first iteration as stored, no model map applied.
    pub(in crate::checkpoint::models) fn stored(fx: &str) -> Iteration {
        Source::open_with(&fixture(fx), ModelChoice::None)
            .unwrap()
            .iterations
            .remove(0)
    }

    /// A fixture Hugging Face folder's weights and `extra` f32 tensors (of
    /// zeros, in a third shard), as stored; the folder lives as long as the
    /// returned guard.
    pub(in crate::checkpoint::models) fn hf_with(
        fx: &str,
        extra: &[(&str, &[u64])],
    ) -> (tempfile::TempDir, Iteration) {
        let tmp = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(fixture(fx)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            // Without the index: it does not list the third shard.
            if name.ends_with(".safetensors") {
                std::fs::copy(&p, tmp.path().join(name)).unwrap();
            }
        }
        let data: Vec<Vec<u8>> = extra
            .iter()
            .map(|(_, s)| f32s(&vec![0.0; s.iter().product::<u64>() as usize]))
            .collect();
        let tensors: Vec<(&str, &str, &[u64], &[u8])> = extra
            .iter()
            .zip(&data)
            .map(|((n, s), d)| (*n, "F32", *s, d.as_slice()))
            .collect();
        write_st(tmp.path(), "model-00003-of-00003.safetensors", &tensors);
        let it = Source::open_with(tmp.path(), ModelChoice::None)
            .unwrap()
            .iterations
            .remove(0);
        (tmp, it)
    }

    pub(in crate::checkpoint::models) fn names(it: &Iteration) -> Vec<&str> {
        it.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    /// A map's reading of a MindSpore Transformers checkpoint as a Hugging
    /// Face folder (`qwen3::mf_to_hf`, `qwen3_moe::mf_to_hf`).
    pub(in crate::checkpoint::models) type MfToHf =
        fn(Iteration, Option<&Config>) -> Result<Iteration>;

    /// Asserts that each tensor of `it` may be cut on dimension 0 only as
    /// `want` says for its parameter's name; returns how many may be cut
    /// only between groups.
    pub(in crate::checkpoint::models) fn groups_marked(
        it: &Iteration,
        want: impl Fn(&str) -> Option<(u64, &'static str)>,
    ) -> usize {
        let mut marked = 0;
        for t in &it.tensors {
            let w = want(names::parameter_name(&t.name));
            marked += usize::from(w.is_some());
            assert_eq!(t.rules.dim0_group, w, "{}", t.name);
        }
        marked
    }

    /// The note of `mf`'s Hugging Face view counts the optimizer-state
    /// tensors it leaves out (`states` of them), and there is none when
    /// the checkpoint has none.
    pub(in crate::checkpoint::models) fn check_optimizer_note(
        mf: &str,
        mf_to_hf: MfToHf,
        states: usize,
    ) {
        let notes = |it: Iteration| mf_to_hf(it, None).unwrap().model.unwrap().notes;
        let n = notes(stored(mf));
        assert!(
            n.contains(&format!("{states} optimizer-state tensors not shown")),
            "{n:?}"
        );
        let mut it = stored(mf);
        it.tensors.retain(|t| t.kind == Kind::Model);
        let n = notes(it);
        assert!(!n.iter().any(|s| s.contains("optimizer")), "{n:?}");
    }

    /// `mf`'s output layer in its Hugging Face view (the config from `hf`):
    /// shown when stored, whatever the config says; when not stored, the
    /// embedding is the head (inferred tied) unless the config says the
    /// model has its own, which is refused naming `model`.
    pub(in crate::checkpoint::models) fn check_output_layer(
        hf: &str,
        mf: &str,
        mf_to_hf: MfToHf,
        model: &str,
    ) {
        let config = |tied: bool| config_of(hf, |j| j["tie_word_embeddings"] = json!(tied));
        let headless = || {
            let mut it = stored(mf);
            it.tensors.retain(|t| !t.name.ends_with(MF_HEAD));
            it
        };
        for tied in [false, true] {
            let it = mf_to_hf(stored(mf), Some(&config(tied))).unwrap();
            assert!(names(&it).contains(&HF_HEAD), "tied {tied}");
        }
        let it = mf_to_hf(headless(), None).unwrap();
        assert!(!names(&it).contains(&HF_HEAD));
        assert_eq!(
            it.model.unwrap().config.fields["tie_word_embeddings"],
            json!(true)
        );
        let it = mf_to_hf(headless(), Some(&config(true))).unwrap();
        assert!(!names(&it).contains(&HF_HEAD));
        input_err(
            mf_to_hf(headless(), Some(&config(false))),
            &[&format!(
                "tensor output_layer.weight is missing; {model} needs it for lm_head.weight"
            )],
        );
    }

    #[test]
    fn head_dim_defaults_to_hidden_size_over_heads() {
        // qwen3-tiny-hf: hidden_size 64, 4 heads, head_dim 16 stated.
        let c = config_of("qwen3-tiny-hf", |j| {
            j.as_object_mut().unwrap().remove("head_dim");
        });
        assert_eq!(Dims::from_config(&c).unwrap().head_dim, 64 / 4);
        // Qwen3-0.6B states 128, not its hidden_size 1024 over 16 heads.
        let c = config_of("qwen3-tiny-hf", |j| {
            j["hidden_size"] = json!(1024);
            j["num_attention_heads"] = json!(16);
            j["num_key_value_heads"] = json!(8);
            j["head_dim"] = json!(128);
        });
        let d = Dims::from_config(&c).unwrap();
        assert_eq!((d.head_dim, d.q_rows(), d.kv_rows()), (128, 2048, 1024));
    }

    #[test]
    fn key_value_heads_and_head_dim_must_be_positive() {
        for key in ["num_key_value_heads", "head_dim"] {
            let c = config_of("qwen3-tiny-hf", |j| j[key] = json!(0));
            let path = c.path.display().to_string();
            input_err(
                Dims::from_config(&c),
                &[&path, "num_key_value_heads and head_dim must be positive"],
            );
        }
    }

    #[test]
    fn a_fused_qkv_too_big_for_64_bit_byte_counts_is_refused() {
        // The fused QKV, (heads + 2 * groups) * head_dim rows of hidden
        // elements, is the largest attention tensor; at 8 bytes an element,
        // 2^64 bytes are 2^61 elements.
        let big = |heads: u64, groups: u64, head_dim: u64, hidden: u64| Dims {
            vocab: 1,
            hidden,
            intermediate: 1,
            layers: 1,
            heads,
            groups,
            head_dim,
            tied: false,
            qkv_bias: false,
        };
        let overflow = |d: Dims| {
            let e = d.check().unwrap_err();
            assert!(e.contains("overflow 64-bit byte counts"), "{e}");
        };
        // 1 head, 1 group: QKV 3 * 2^29 rows of 3 * 2^29, 9 * 2^58 > 2^61
        // elements, though q_proj (3 * 2^58) and k/v fit.
        overflow(big(1, 1, 1 << 29, 3 << 29));
        // 4 heads, 4 groups: 12 * 2^28 rows of 3 * 2^28, 9 * 2^58 > 2^61,
        // though q_proj (3 * 2^58) fits.
        overflow(big(4, 4, 1 << 28, 3 << 28));
        // A third smaller, QKV 3 * 2^58 elements: they fit.
        big(1, 1, 1 << 29, 1 << 29).check().unwrap();
        // Head counts whose QKV row count alone passes 2^64 are refused
        // too, not a panic on the way.
        overflow(big(1 << 63, 1 << 63, 1, 1));
        overflow(big(1 << 63, 1 << 62, 1, 1));
    }

    #[test]
    fn a_shape_error_names_the_file_and_the_sizes_it_was_checked_against() {
        // qwen3-tiny-hf's down_proj is [64, 96], in its first shard.
        let c = config_of("qwen3-tiny-hf", |j| j["intermediate_size"] = json!(95));
        let path = c.path.display().to_string();
        input_err(
            hf_to_mf(stored("qwen3-tiny-hf"), &c),
            &[
                "model-00001-of-00002.safetensors: tensor model.layers.0.mlp.down_proj.weight: shape [64, 96]",
                &format!(
                    "{path} (hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=95, vocab_size=256) gives [64, 95]"
                ),
            ],
        );
    }

    #[test]
    fn attention_biases_fuse_per_key_value_group_like_their_weights() {
        // 4 heads in 2 groups of head_dim 16: q_proj.bias [64], k/v [32];
        // the fused bias is, per group, 2 query heads, 1 key, 1 value head.
        let mut extra: Vec<(String, Vec<u64>)> = Vec::new();
        for i in 0..2 {
            for (x, n) in [("q", 64), ("k", 32), ("v", 32)] {
                extra.push((format!("model.layers.{i}.self_attn.{x}_proj.bias"), vec![n]));
            }
        }
        let extra: Vec<(&str, &[u64])> = extra
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let (_dir, it) = hf_with("qwen3-tiny-hf", &extra);
        let c = config_of("qwen3-tiny-hf", |j| j["attention_bias"] = json!(true));
        let it = hf_to_mf(it, &c).unwrap();
        assert!(it.omitted.is_empty(), "{:?}", it.omitted);
        for i in 0..2 {
            let name = format!("decoder.layers.{i}.self_attention.linear_qkv.bias");
            let t = it.tensors.iter().find(|t| t.name == name).unwrap();
            assert_eq!(t.global_shape, [128]);
            assert_eq!(t.layout.as_ref().unwrap().tensor_map, [vec![2]]);
            assert_eq!(
                t.rules.dim0_group,
                Some((64, "key/value groups (num_key_value_heads)"))
            );
            let m = t.assembly.as_ref().unwrap().rows().unwrap();
            for r in 0..128 {
                let (g, w) = (r / 64, r % 64);
                let want = match w {
                    0..32 => ("q", g * 32 + w),
                    32..48 => ("k", g * 16 + w - 32),
                    _ => ("v", g * 16 + w - 48),
                };
                let (part, row, _) = m.locate(r);
                let want_name = format!("model.layers.{i}.self_attn.{}_proj.bias", want.0);
                assert_eq!(
                    (it.parts[part].name.as_str(), row),
                    (want_name.as_str(), want.1),
                    "row {r}"
                );
            }
        }
    }

    #[test]
    fn tensors_of_layers_beyond_the_config_are_refused_others_left_out() {
        // The folder has 2 layers; a config saying 1 leaves layer 1 over.
        let c = config_of("qwen3-tiny-hf", |j| j["num_hidden_layers"] = json!(1));
        let path = c.path.display().to_string();
        input_err(
            hf_to_mf(stored("qwen3-tiny-hf"), &c),
            &[
                &path,
                ": tensor model.layers.1.",
                "belongs to a layer beyond num_hidden_layers = 1",
            ],
        );
        // A tensor the map does not know, in a layer there is, is left out
        // (for check_left_out to judge), not refused here.
        let bias = "model.layers.0.self_attn.o_proj.bias";
        let (_dir, it) = hf_with("qwen3-tiny-hf", &[(bias, &[64])]);
        let it = hf_to_mf(it, &config_of("qwen3-tiny-hf", |_| {})).unwrap();
        assert_eq!(it.omitted, [bias]);
    }

    #[test]
    fn qkv_rows_that_are_not_whole_key_value_groups_are_refused() {
        // qwen3-tiny-mf's layer 0: 4 heads of 16 (linear_proj [64, 64]),
        // so its QKV has (4 + 2 * groups) * 16 rows.
        let qkv = "decoder.layers.0.self_attention.linear_qkv.weight";
        let infer = |rows: u64| {
            let fused = [rows, 64];
            let shapes: HashMap<&str, &[u64]> = HashMap::from([
                (MF_EMBED, &[256u64, 64][..]),
                (
                    "decoder.layers.0.self_attention.q_layernorm.weight",
                    &[16][..],
                ),
                (
                    "decoder.layers.0.self_attention.linear_proj.weight",
                    &[64, 64][..],
                ),
                (qkv, &fused[..]),
            ]);
            infer_attention(Path::new("ck"), &shapes, "Qwen3")
        };
        let (d, _) = infer(128).unwrap();
        assert_eq!(
            (d.heads, d.groups, d.head_dim, d.vocab, d.hidden),
            (4, 2, 16, 256, 64)
        );
        // Not a whole number of heads, an odd number of key/value heads,
        // none, fewer rows than query heads.
        for rows in [129, 112, 64, 48] {
            input_err(
                infer(rows),
                &[&format!(
                    "ck: tensor {qkv}: {rows} rows are not (heads + 2 * groups) * head_dim for 4 heads of 16"
                )],
            );
        }
    }

    #[test]
    fn a_mindformers_qwen3s_fused_tensors_are_cut_only_between_groups() {
        // qwen3-tiny-mf: 4 heads in 2 groups of head_dim 16, so a group is
        // (2 + 2) * 16 = 64 rows of linear_qkv; fc1 rows go in gate/up pairs.
        let mut it = stored("qwen3-tiny-mf-tp2-pp2-f32");
        assert!(it.tensors.iter().all(|t| t.rules.dim0_group.is_none()));
        assert!(mark_mf_rules(&mut it));
        let marked = groups_marked(&it, |name| {
            if name.ends_with(".self_attention.linear_qkv.weight") {
                Some((64, "key/value groups (num_key_value_heads)"))
            } else if name.ends_with(".mlp.linear_fc1.weight") {
                Some((2, "gate/up row pairs (intermediate_size)"))
            } else {
                None
            }
        });
        // 2 layers, each tensor with its adam_m and adam_v copies.
        assert_eq!(marked, 2 * 2 * 3);
        // A Qwen3-MoE's has no linear_fc1: not a Qwen3's, left as it is.
        let mut moe = stored("qwen3-moe-tiny-mf-dp2-tp2-ep2-f32");
        assert!(!mark_mf_rules(&mut moe));
        assert!(moe.tensors.iter().all(|t| t.rules.dim0_group.is_none()));
    }

    #[test]
    fn a_hugging_face_view_says_how_many_optimizer_states_it_leaves_out() {
        // qwen3-tiny-mf: 19 parameters, each with adam_m and adam_v.
        check_optimizer_note("qwen3-tiny-mf-tp2-pp2-f32", mf_to_hf, 38);
    }

    #[test]
    fn a_stored_output_layer_is_shown_and_an_untied_config_needs_one() {
        check_output_layer(
            "qwen3-tiny-hf",
            "qwen3-tiny-mf-tp2-pp2-f32",
            mf_to_hf,
            "Qwen3",
        );
    }
}
