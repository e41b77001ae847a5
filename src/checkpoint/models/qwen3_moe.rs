//! Qwen3-MoE between Hugging Face and MindSpore Transformers.
//!
//! The map is the one MindSpore Transformers' own converter applies
//! (`Qwen3MoePreTrainedModel.weight_converters`, `ExpertsConvertOp`), pinned
//! by fixtures written by that converter and by transformers
//! (`tests/fixtures/qwen3-moe-*`, their README):
//!
//! * embedding, attention (fused `linear_qkv`), norms, final norm and head
//!   as for dense Qwen3 ([`super::qwen3`]);
//! * the router `mlp.gate.weight` `[E, H]` → `mlp.router.weight`, unchanged;
//! * the experts, **transposed and stacked**: `mlp.experts.J.{gate,up}_proj`
//!   `[F, H]` → `mlp.experts.weight1` `[E·H, 2F]`, rows `J·H..J·H+H` being
//!   `[gate_Jᵀ | up_Jᵀ]`; `mlp.experts.J.down_proj` `[H, F]` →
//!   `mlp.experts.weight2` `[E·F, H]`, rows `J·F..` being `down_Jᵀ`;
//! * layouts: dense tensors on `(dp, cp, tp)` as for Qwen3; the experts and
//!   the router on the expert matrix `(dp_ex_ep, ep)`, `dp_ex_ep` being
//!   `dp·tp·cp/ep` (the target resizes it with the others): `weight1` and
//!   `weight2` split dimension 0 on `ep` (whole experts per rank), the router
//!   whole.
//!
//! Both directions are tile maps ([`TileMap`]) of transposed tiles, read by
//! the byte engine's blocked transpose straight from the source maps.
//! MindSpore Transformers' Qwen3-MoE has no dense layers (its config drops
//! `mlp_only_layers` and `decoder_sparse_step`, its converter maps no dense
//! MLP), so a Hugging Face config asking for them is refused. Its network's
//! non-trainable `mlp.router.fi_accu` has no Hugging Face counterpart: a
//! checkpoint that holds it shows it nowhere in a Hugging Face view (listed
//! as left out), and a view made from a Hugging Face folder has none (its
//! `load_checkpoint` leaves the buffer at its initial value).

use std::collections::HashMap;

use safetensors::Dtype;
use serde_json::{Value, json};

use super::qwen3::{
    self, Dims, HF_EMBED, HF_HEAD, HF_NORM, MF_EMBED, MF_HEAD, MF_NORM, Pool, assembled, hf_layer,
    hf_shape, layer_rank, mf_layer, qkv_from_parts, renamed, rows_of, same_dtype, shape_of,
    shapes_of, tp_layout,
};
use super::{Config, GeneratedConfig, Map, ModelInfo};
use crate::checkpoint::layout::Layout;
use crate::checkpoint::names::{self, Kind, layer_index};
use crate::checkpoint::source::{Assembly, Band, Iteration, SplitRules, Tensor, Tile, TileMap};
use crate::error::Result;
use crate::{bad, bail};

/// Qwen3-MoE's entry in the table of maps ([`super::MODELS`]).
pub static MAP: Map = Map {
    model_type: "qwen3_moe",
    display: "Qwen3-MoE",
    hf_to_mf,
    mf_to_hf,
    mark_mf_rules,
    mf_needs: "embedding, q_layernorm, linear_proj, linear_qkv, mlp.router and mlp.experts.weight1/weight2 of layer 0",
    derived,
};

/// Buffers a view may leave out: the dense model's (the rotary embedding's
/// `inv_freq`, the same rotary embedding) and the router's `fi_accu`, the
/// expert-load counts MindSpore Transformers' network accumulates for its
/// load balancing: not a weight, no Hugging Face counterpart, and left at
/// its initial value by its `load_checkpoint` when a checkpoint lacks it.
fn derived(name: &str) -> bool {
    qwen3::derived(name) || name.ends_with(".mlp.router.fi_accu")
}

/// The sizes that fix every tensor's shape: the dense Qwen3 ones
/// (`intermediate` unused: there are no dense layers) and the experts'.
#[derive(Debug, Clone)]
pub struct MoeDims {
    pub base: Dims,
    /// `num_experts` (E).
    pub experts: u64,
    /// `moe_intermediate_size` (F).
    pub moe_intermediate: u64,
    /// `num_experts_per_tok` and `norm_topk_prob`, when a config says.
    pub top_k: Option<u64>,
    pub norm_topk_prob: Option<bool>,
}

impl MoeDims {
    /// The sizes `config.json` gives, checked for sense; a config asking
    /// for dense layers is refused (MindSpore Transformers has none).
    pub fn from_config(c: &Config) -> Result<MoeDims> {
        let p = c.path.display();
        let base = Dims::from_config(c)?;
        // transformers 5 writes `num_local_experts`, the Hub `num_experts`.
        let experts = match (c.uint("num_experts")?, c.uint("num_local_experts")?) {
            (Some(a), Some(b)) if a != b => {
                bail!("{p}: `num_experts` is {a} but `num_local_experts` is {b}")
            }
            (Some(0), _) | (_, Some(0)) => bail!("{p}: the expert count is 0"),
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => bail!("{p}: missing `num_experts` (or `num_local_experts`)"),
        };
        if let Some(v) = c.json.get("mlp_only_layers")
            && !(v.is_null() || v.as_array().is_some_and(Vec::is_empty))
        {
            bail!(
                "{p}: `mlp_only_layers` is {v}: MindSpore Transformers' Qwen3-MoE has no dense layers (its converter maps no dense MLP)"
            );
        }
        if let Some(step) = c.uint("decoder_sparse_step")?
            && step != 1
        {
            bail!(
                "{p}: `decoder_sparse_step` is {step}: MindSpore Transformers' Qwen3-MoE has a MoE block in every layer (step 1)"
            );
        }
        let d = MoeDims {
            base,
            experts,
            moe_intermediate: c.need("moe_intermediate_size")?,
            top_k: c.uint("num_experts_per_tok")?,
            norm_topk_prob: c.flag("norm_topk_prob")?,
        };
        d.check().map_err(|e| bad!("{p}: {e}"))?;
        Ok(d)
    }

    fn check(&self) -> std::result::Result<(), String> {
        self.base.check()?;
        let (e, h, f) = (self.experts, self.base.hidden, self.moe_intermediate);
        // weight1, [E * H, 2 * F], is the largest; 2 * F is checked first.
        let w1 = f
            .checked_mul(2)
            .and_then(|f2| e.checked_mul(h)?.checked_mul(f2))
            .and_then(|n| n.checked_mul(8));
        if w1.is_none() {
            return Err("the expert sizes overflow 64-bit byte counts".into());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{}, num_experts={}, moe_intermediate_size={}",
            self.base.describe(),
            self.experts,
            self.moe_intermediate
        )
    }
}

/// The expert matrix `(dp_ex_ep, ep)` of a job's Qwen3-MoE: the experts
/// (`split0`) split dimension 0 on `ep`, the router is whole. Sized 1 x 1
/// here; the target gives `ep` its size and derives `dp_ex_ep`.
fn expert_layout(ndim: usize, split0: bool) -> Layout {
    let mut tensor_map = vec![Vec::new(); ndim];
    if split0 {
        tensor_map[0] = vec![1];
    }
    Layout {
        device_matrix: vec![1, 1],
        tensor_map,
        alias_name: vec!["dp_ex_ep".into(), "ep".into()],
        rank_list: vec![0],
    }
}

/// `weight1`/`weight2` may only be cut between whole experts.
fn expert_rules(rows_per_expert: u64) -> SplitRules {
    SplitRules {
        dim0_group: Some((rows_per_expert, "experts (num_experts)")),
        whole_if_uneven: false,
    }
}

/// A tensor made of tiles of `Iteration::parts`.
fn tiled(
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    map: TileMap,
    layout: Option<Layout>,
    rules: SplitRules,
) -> Tensor {
    qwen3::made_of(name, dtype, shape, Assembly::Tiles(map), layout, rules)
}

/// One transposed tile: columns `col..col+cols` of its band from the part
/// `part`, transposed from its rectangle at `(row, col0)`.
fn transposed(col: u64, cols: u64, part: usize, row: u64, col0: u64) -> Tile {
    Tile {
        col,
        cols,
        part,
        row,
        col0,
        transposed: true,
    }
}

/// MindSpore Transformers' order within a MoE layer (its metadata.json's).
const MF_LAYER_ORDER: &[&str] = &[
    "input_layernorm.weight",
    "mlp.experts.weight2",
    "mlp.experts.weight1",
    "mlp.router.weight",
    "pre_mlp_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "self_attention.linear_proj.weight",
    "self_attention.q_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
];

/// A layer's renamed (not fused) tensors: HF suffix, MF suffix, split on tp.
const LAYER_RENAMES: &[(&str, &str, &[bool])] = &[
    ("input_layernorm.weight", "input_layernorm.weight", &[false]),
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

fn hf_expert(i: u64, j: u64, what: &str) -> String {
    hf_layer(i, &format!("mlp.experts.{j}.{what}_proj.weight"))
}

/// Reads a Hugging Face Qwen3-MoE folder (already loaded as plain tensors)
/// as the MindSpore Transformers checkpoint it converts to, on a device
/// matrix of size 1 that `--mesh dp=D,tp=T,ep=E` resizes, one stage, prefix
/// `qwen3_moe`.
pub fn hf_to_mf(mut it: Iteration, config: &Config) -> Result<Iteration> {
    let d = MoeDims::from_config(config)?;
    let b = &d.base;
    let (e, h, f) = (d.experts, b.hidden, d.moe_intermediate);
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
    let tp = |split: &[bool]| Some(tp_layout(split));

    let mut notes = vec![format!(
        "sizes from {}: {}",
        config.path.display(),
        d.describe()
    )];
    // First, where MindSpore Transformers' metadata.json lists it.
    out.extend(qwen3::hf_head(&mut pool, b, &mut notes)?);
    let embed_rules = SplitRules {
        dim0_group: None,
        whole_if_uneven: true,
    };
    let t = pool.take(HF_EMBED, &[b.vocab, b.hidden], MF_EMBED)?;
    out.push(renamed(t, MF_EMBED.into(), tp(&[true, false]), embed_rules));

    for i in 0..b.layers {
        let mut layer: Vec<Tensor> = Vec::new();
        for &(hf, mf, split) in LAYER_RENAMES {
            let t = pool.take(&hf_layer(i, hf), &hf_shape(b, hf), &mf_layer(i, mf))?;
            layer.push(renamed(
                t,
                mf_layer(i, mf),
                tp(split),
                SplitRules::default(),
            ));
        }
        // q/k/v, per key/value group, as for dense Qwen3.
        let kinds: &[(&str, bool)] = if b.qkv_bias {
            &[("weight", true), ("bias", false)]
        } else {
            &[("weight", true)]
        };
        for &(what, is_weight) in kinds {
            let qkv = mf_layer(i, &format!("self_attention.linear_qkv.{what}"));
            let mut three = Vec::with_capacity(3);
            for x in ["q", "k", "v"] {
                let hf = format!("self_attn.{x}_proj.{what}");
                three.push(pool.take(&hf_layer(i, &hf), &hf_shape(b, &hf), &qkv)?);
            }
            let dtype = same_dtype(&pool, &[&three[0], &three[1], &three[2]])?;
            let p = parts.len();
            parts.extend(three);
            let rows = b.groups * b.group_rows();
            let (shape, split) = if is_weight {
                (vec![rows, b.hidden], &[true, false][..])
            } else {
                (vec![rows], &[true][..])
            };
            layer.push(assembled(
                qkv,
                dtype,
                shape,
                qkv_from_parts(b, p),
                tp(split),
                SplitRules {
                    dim0_group: Some((b.group_rows(), "key/value groups (num_key_value_heads)")),
                    whole_if_uneven: false,
                },
            ));
        }
        // The router, whole on the expert matrix.
        let router = mf_layer(i, "mlp.router.weight");
        let t = pool.take(&hf_layer(i, "mlp.gate.weight"), &[e, h], &router)?;
        layer.push(renamed(
            t,
            router,
            Some(expert_layout(2, false)),
            SplitRules::default(),
        ));
        // The experts, transposed and stacked: band J of weight1 is
        // [gate_Jᵀ | up_Jᵀ], band J of weight2 is down_Jᵀ.
        let w1 = mf_layer(i, "mlp.experts.weight1");
        let w2 = mf_layer(i, "mlp.experts.weight2");
        let mut bands1 = Vec::with_capacity(e as usize);
        let mut bands2 = Vec::with_capacity(e as usize);
        let mut dtypes = Vec::new();
        for j in 0..e {
            let gate = pool.take(&hf_expert(i, j, "gate"), &[f, h], &w1)?;
            let up = pool.take(&hf_expert(i, j, "up"), &[f, h], &w1)?;
            let down = pool.take(&hf_expert(i, j, "down"), &[h, f], &w2)?;
            dtypes.push(same_dtype(&pool, &[&gate, &up, &down])?);
            let p = parts.len();
            parts.extend([gate, up, down]);
            bands1.push(Band {
                start: j * h,
                rows: h,
                tiles: vec![transposed(0, f, p, 0, 0), transposed(f, f, p + 1, 0, 0)],
            });
            bands2.push(Band {
                start: j * f,
                rows: f,
                tiles: vec![transposed(0, h, p + 2, 0, 0)],
            });
        }
        let dtype = dtypes[0];
        if let Some(j) = dtypes.iter().position(|&x| x != dtype) {
            bail!(
                "{}: tensor {}: dtype {:?}, but expert 0's is {dtype:?}; the experts of a layer must share a dtype",
                config.path.display(),
                hf_expert(i, j as u64, "gate"),
                dtypes[j]
            );
        }
        layer.push(tiled(
            w1,
            dtype,
            vec![e * h, 2 * f],
            TileMap { bands: bands1 },
            Some(expert_layout(2, true)),
            expert_rules(h),
        ));
        layer.push(tiled(
            w2,
            dtype,
            vec![e * f, h],
            TileMap { bands: bands2 },
            Some(expert_layout(2, true)),
            expert_rules(f),
        ));
        layer.sort_by_key(|t| layer_rank(MF_LAYER_ORDER, &t.name));
        out.extend(layer);
    }
    let t = pool.take(HF_NORM, &[b.hidden], MF_NORM)?;
    out.push(renamed(
        t,
        MF_NORM.into(),
        tp(&[false]),
        SplitRules::default(),
    ));

    let mut omitted: Vec<String> = pool.tensors.into_keys().collect();
    omitted.sort();
    if let Some(n) = omitted
        .iter()
        .find(|n| n.starts_with("model.layers.") && layer_index(n).is_some_and(|l| l >= b.layers))
    {
        bail!(
            "{}: tensor {n} belongs to a layer beyond num_hidden_layers = {}",
            config.path.display(),
            b.layers
        );
    }
    if let Some(n) = omitted.iter().find(|n| n.contains(".mlp.experts.")) {
        bail!(
            "{}: tensor {n} is not one of the num_experts = {e} experts the config declares",
            config.path.display()
        );
    }
    if let Some(n) = omitted.iter().find(|n| {
        n.ends_with(".mlp.gate_proj.weight")
            || n.ends_with(".mlp.up_proj.weight")
            || n.ends_with(".mlp.down_proj.weight")
    }) {
        bail!(
            "{}: tensor {n} is a dense MLP: MindSpore Transformers' Qwen3-MoE has no dense layers",
            config.path.display()
        );
    }
    it.tensors = out;
    it.parts = parts;
    it.omitted = omitted;
    it.prefix = Some(MAP.model_type.into());
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

/// The sizes of a MindSpore Transformers Qwen3-MoE read off its tensors.
fn infer_dims(it: &Iteration, tensors: &[&Tensor]) -> Result<(MoeDims, Vec<String>)> {
    let shapes = shapes_of(tensors.iter().copied());
    let (mut base, mut notes) = qwen3::infer_attention(&it.dir, &shapes, MAP.display)?;
    let router = mf_layer(0, "mlp.router.weight");
    let r = shape_of(&it.dir, &shapes, &router, 2, MAP.display)?;
    let (e, h) = (r[0], r[1]);
    let dir = it.dir.display();
    if h != base.hidden {
        bail!(
            "{dir}: tensor {router}: {h} columns, but the embedding's hidden size is {}",
            base.hidden
        );
    }
    notes.push(format!("num_experts = {e} (from {router})"));
    let w2 = mf_layer(0, "mlp.experts.weight2");
    let rows = shape_of(&it.dir, &shapes, &w2, 2, MAP.display)?[0];
    if rows % e != 0 {
        bail!("{dir}: tensor {w2}: {rows} rows are not {e} experts of equal size");
    }
    let f = rows / e;
    notes.push(format!("moe_intermediate_size = {f} (from {w2})"));
    base.intermediate = 0;
    let d = MoeDims {
        base,
        experts: e,
        moe_intermediate: f,
        top_k: None,
        norm_topk_prob: None,
    };
    d.check().map_err(|e| bad!("{dir}: inferred sizes: {e}"))?;
    Ok((d, notes))
}

/// Marks the fused tensors of a MindSpore Transformers Qwen3-MoE iteration
/// with the cuts a target may make: whole key/value groups, whole experts.
/// `false` (and nothing changed) when the tensors are not a Qwen3-MoE's.
pub fn mark_mf_rules(it: &mut Iteration) -> bool {
    let model: Vec<&Tensor> = it
        .tensors
        .iter()
        .filter(|t| t.kind == Kind::Model)
        .collect();
    let Ok((d, _)) = infer_dims(it, &model) else {
        return false;
    };
    let (groups, h, f) = (d.base.group_rows(), d.base.hidden, d.moe_intermediate);
    for t in &mut it.tensors {
        let base = names::parameter_name(&t.name);
        if base.ends_with(".self_attention.linear_qkv.weight")
            || base.ends_with(".self_attention.linear_qkv.bias")
        {
            t.rules.dim0_group = Some((groups, "key/value groups (num_key_value_heads)"));
        } else if base.ends_with(".mlp.experts.weight1") {
            t.rules = expert_rules(h);
        } else if base.ends_with(".mlp.experts.weight2") {
            t.rules = expert_rules(f);
        }
    }
    true
}

/// transformers' order within a Qwen3-MoE layer (its state_dict's): the
/// attention, the router, then the experts in order, then the norms.
fn hf_rank(name: &str) -> (usize, u64, usize) {
    const ORDER: &[&str] = &[
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "mlp.gate.weight",
    ];
    if let Some(rest) = name.split(".mlp.experts.").nth(1) {
        let (j, what) = rest.split_once('.').unwrap_or((rest, ""));
        let w = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
            .iter()
            .position(|x| *x == what)
            .unwrap_or(3);
        return (ORDER.len(), j.parse().unwrap_or(0), w);
    }
    let r = layer_rank(ORDER, name);
    if r < ORDER.len() {
        (r, 0, 0)
    } else {
        // The norms after the experts.
        let norms = ["input_layernorm.weight", "post_attention_layernorm.weight"];
        (ORDER.len() + 1 + layer_rank(&norms, name), 0, 0)
    }
}

/// Reads a MindSpore Transformers Qwen3-MoE iteration as the Hugging Face
/// model it is: HF names, QKV split back out of the fused tensor, each
/// expert's `gate`, `up` and `down` transposed back out of `weight1` and
/// `weight2` (wherever their ep slices are stored), every tensor whole,
/// optimizer states left out. Sizes come from `config` when given (and are
/// checked against the tensors), else from the tensors.
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
            let d = MoeDims::from_config(c)?;
            let from = format!("{} ({})", c.path.display(), d.describe());
            (d, vec![format!("sizes from {from}")], from)
        }
        None => {
            let tensors: Vec<&Tensor> = by_name.values().collect();
            let (d, notes) = infer_dims(&it, &tensors)?;
            let from = format!("the sizes inferred from the tensors ({})", d.describe());
            (d, notes, from)
        }
    };
    if opt > 0 {
        notes.push(format!("{opt} optimizer-state tensors not shown"));
    }
    let b = d.base.clone();
    let (e, h, f) = (d.experts, b.hidden, d.moe_intermediate);
    let mut parts: Vec<Tensor> = std::mem::take(&mut it.parts);
    let mut pool = Pool {
        it: &it,
        tensors: by_name,
        sizes_from,
        model: MAP.display,
    };
    let mut out: Vec<Tensor> = Vec::new();
    let whole = SplitRules::default;

    let t = pool.take(MF_EMBED, &[b.vocab, b.hidden], HF_EMBED)?;
    out.push(renamed(t, HF_EMBED.into(), None, whole()));
    for i in 0..b.layers {
        let mut layer: Vec<Tensor> = Vec::new();
        let kinds: &[(&str, bool)] = if b.qkv_bias {
            &[("weight", true), ("bias", false)]
        } else {
            &[("weight", true)]
        };
        for &(what, is_weight) in kinds {
            let name = mf_layer(i, &format!("self_attention.linear_qkv.{what}"));
            let rows = b.groups * b.group_rows();
            let shape: Vec<u64> = if is_weight {
                vec![rows, b.hidden]
            } else {
                vec![rows]
            };
            let hf_q = hf_layer(i, &format!("self_attn.q_proj.{what}"));
            let fused = pool.take(&name, &shape, &hf_q)?;
            let (dtype, p) = (fused.dtype, parts.len());
            parts.push(fused);
            let q = b.ratio() * b.head_dim;
            let hd = b.head_dim;
            for (x, len, base, total) in [
                ("q", q, 0, b.q_rows()),
                ("k", hd, q, b.kv_rows()),
                ("v", hd, q + hd, b.kv_rows()),
            ] {
                let mut s = shape.clone();
                s[0] = total;
                layer.push(assembled(
                    hf_layer(i, &format!("self_attn.{x}_proj.{what}")),
                    dtype,
                    s,
                    rows_of(p, len, b.group_rows(), base),
                    None,
                    whole(),
                ));
            }
        }
        for &(hf, mf, _) in LAYER_RENAMES {
            let t = pool.take(&mf_layer(i, mf), &hf_shape(&b, hf), &hf_layer(i, hf))?;
            layer.push(renamed(t, hf_layer(i, hf), None, whole()));
        }
        let gate = hf_layer(i, "mlp.gate.weight");
        let t = pool.take(&mf_layer(i, "mlp.router.weight"), &[e, h], &gate)?;
        layer.push(renamed(t, gate, None, whole()));
        let w1 = pool.take(
            &mf_layer(i, "mlp.experts.weight1"),
            &[e * h, 2 * f],
            &hf_expert(i, 0, "gate"),
        )?;
        let w2 = pool.take(
            &mf_layer(i, "mlp.experts.weight2"),
            &[e * f, h],
            &hf_expert(i, 0, "down"),
        )?;
        let (dtype, p) = (w1.dtype, parts.len());
        if w2.dtype != dtype {
            bail!(
                "{}: tensor {}: dtype {:?}, but {} is {dtype:?}",
                pool.file_of(&w2),
                w2.name,
                w2.dtype,
                w1.name
            );
        }
        parts.extend([w1, w2]);
        let one = |rows: u64, tile: Tile| TileMap {
            bands: vec![Band {
                start: 0,
                rows,
                tiles: vec![tile],
            }],
        };
        for j in 0..e {
            for (what, col0) in [("gate", 0), ("up", f)] {
                layer.push(tiled(
                    hf_expert(i, j, what),
                    dtype,
                    vec![f, h],
                    one(f, transposed(0, h, p, j * h, col0)),
                    None,
                    whole(),
                ));
            }
            layer.push(tiled(
                hf_expert(i, j, "down"),
                dtype,
                vec![h, f],
                one(h, transposed(0, f, p + 1, j * f, 0)),
                None,
                whole(),
            ));
        }
        layer.sort_by_key(|t| hf_rank(&t.name));
        out.extend(layer);
    }
    let t = pool.take(MF_NORM, &[b.hidden], HF_NORM)?;
    out.push(renamed(t, HF_NORM.into(), None, whole()));
    if !b.tied || pool.has(MF_HEAD) {
        let t = pool.take(MF_HEAD, &[b.vocab, b.hidden], HF_HEAD)?;
        out.push(renamed(t, HF_HEAD.into(), None, whole()));
    }
    let mut omitted: Vec<String> = pool.tensors.into_keys().collect();
    omitted.sort();
    if omitted.iter().any(|n| n.ends_with(".mlp.router.fi_accu")) {
        notes.push(
            "mlp.router.fi_accu left out: a buffer of MindSpore Transformers' network with no Hugging Face counterpart"
                .into(),
        );
    }
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
/// takes the value the released Qwen3-MoE models (Qwen3-30B-A3B and
/// Qwen3-235B-A22B, April 2025) have in their `config.json`, not
/// `Qwen3MoeConfig`'s class default where the two differ: `rope_theta`
/// 10000, `max_position_embeddings` 32768 and `norm_topk_prob` false there,
/// each of which changes the logits. `max_window_layers` equals
/// `num_hidden_layers` in both (it does nothing while `use_sliding_window`
/// is false); `intermediate_size` (6144 in 30B-A3B) sizes no tensor of a
/// model without dense layers. Listed as stderr lists them: those that
/// change the logits first.
pub const DEFAULTED: &[&str] = &[
    "rope_theta",
    "max_position_embeddings",
    "rope_scaling",
    "num_experts_per_tok",
    "norm_topk_prob",
    "rms_norm_eps",
    "hidden_act",
    "attention_dropout",
    "initializer_range",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "router_aux_loss_coef",
    "output_router_logits",
    "intermediate_size",
    "use_cache",
];

/// A `config.json` for transformers: every size from `d`; what the tensors
/// cannot tell, as the released Qwen3-MoE models have it ([`DEFAULTED`]);
/// the dtype is the view's.
fn generated_config(d: &MoeDims) -> GeneratedConfig {
    let b = &d.base;
    let v: Value = json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": b.qkv_bias,
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "head_dim": b.head_dim,
        "hidden_act": "silu",
        "hidden_size": b.hidden,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
        "max_window_layers": b.layers,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": d.moe_intermediate,
        "norm_topk_prob": d.norm_topk_prob.unwrap_or(true),
        "num_attention_heads": b.heads,
        "num_experts": d.experts,
        // As released, but never more experts than there are.
        "num_experts_per_tok": d.top_k.unwrap_or(8.min(d.experts)),
        "num_hidden_layers": b.layers,
        "num_key_value_heads": b.groups,
        "output_router_logits": false,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": null,
        "tie_word_embeddings": b.tied,
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": b.vocab,
    });
    let fields = v.as_object().cloned().unwrap_or_default();
    GeneratedConfig {
        model: MAP.display,
        fields,
        defaulted: DEFAULTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::models::qwen3::tests::{
        check_optimizer_note, check_output_layer, config_of, groups_marked, hf_with, stored,
    };
    use crate::checkpoint::source::tests::input_err;

    /// Qwen3-30B-A3B's sizes.
    fn a3b() -> MoeDims {
        MoeDims {
            base: Dims {
                vocab: 151936,
                hidden: 2048,
                intermediate: 0,
                layers: 48,
                heads: 32,
                groups: 4,
                head_dim: 128,
                tied: false,
                qkv_bias: false,
            },
            experts: 128,
            moe_intermediate: 768,
            top_k: None,
            norm_topk_prob: None,
        }
    }

    #[test]
    fn a_generated_config_is_the_released_models() {
        // Qwen3-30B-A3B's config.json as released on the Hub, but for what
        // a view states itself (the dtype) and what no tensor or size
        // tells (token ids, the writer's version).
        let released: Value = serde_json::from_str(
            r#"{"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "decoder_sparse_step": 1, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
            "intermediate_size": 6144, "max_position_embeddings": 40960,
            "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
            "moe_intermediate_size": 768, "norm_topk_prob": true, "num_attention_heads": 32,
            "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
            "num_key_value_heads": 4, "output_router_logits": false, "rms_norm_eps": 1e-06,
            "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
            "sliding_window": null, "tie_word_embeddings": false, "use_cache": true,
            "use_sliding_window": false, "vocab_size": 151936}"#,
        )
        .unwrap();
        let c = generated_config(&a3b());
        assert_eq!(Value::Object(c.fields.clone()), released);
        // Every assumed field is written; those that change the logits,
        // where Qwen3MoeConfig's class defaults differ (10000, 32768,
        // false), come first.
        for k in DEFAULTED {
            assert!(c.fields.contains_key(*k), "{k} is listed but not written");
        }
        let assumed = c.assumed(&[]);
        assert_eq!(assumed.len(), DEFAULTED.len());
        assert_eq!(
            &assumed[..5],
            &[
                "rope_theta = 1000000.0",
                "max_position_embeddings = 40960",
                "rope_scaling = null",
                "num_experts_per_tok = 8",
                "norm_topk_prob = true",
            ]
        );
        let note = c.note(&[]);
        assert!(
            note.contains("released Qwen3-MoE models") && note.contains("--hf-config KEY=VALUE"),
            "{note}"
        );
        // A model with fewer experts than the released top-k routes to all.
        let mut d = a3b();
        d.experts = 4;
        assert_eq!(generated_config(&d).fields["num_experts_per_tok"], json!(4));
    }

    #[test]
    fn overrides_set_assumed_fields_only() {
        let c = generated_config(&a3b());
        let set = [
            ("rope_theta".to_string(), json!(500000.0)),
            ("num_experts_per_tok".to_string(), json!(2)),
            ("bos_token_id".to_string(), json!(151643)),
        ];
        c.check_overrides(&set).unwrap();
        let text: Value = serde_json::from_slice(&c.render_with(Dtype::F32, &set)).unwrap();
        assert_eq!(text["rope_theta"], json!(500000.0));
        assert_eq!(text["num_experts_per_tok"], json!(2));
        assert_eq!(text["bos_token_id"], json!(151643));
        assert_eq!(text["dtype"], json!("float32"));
        assert!(!c.assumed(&set).iter().any(|a| a.starts_with("rope_theta")));
        assert!(
            c.note(&set)
                .contains("set by --hf-config: rope_theta = 500000.0")
        );
        // The sizes are the tensors'.
        for k in [
            "num_experts",
            "moe_intermediate_size",
            "hidden_size",
            "dtype",
        ] {
            let e = c.check_overrides(&[(k.to_string(), json!(1))]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{k}");
        }
    }

    #[test]
    fn the_routers_counts_and_rotary_buffers_are_derived() {
        assert!(derived("decoder.layers.3.mlp.router.fi_accu"));
        assert!(derived("model.rotary_emb.inv_freq"));
        for n in [
            "model.layers.0.mlp.gate.bias",
            "model.layers.0.mlp.shared_expert.gate_proj.weight",
            "decoder.layers.0.mlp.router.expert_bias",
            "fi_accu",
        ] {
            assert!(!derived(n), "{n}");
        }
    }

    #[test]
    fn hf_order_puts_experts_in_order_after_the_router() {
        let n = |s: &str| hf_rank(&format!("model.layers.0.{s}"));
        assert!(n("self_attn.o_proj.weight") < n("mlp.gate.weight"));
        assert!(n("mlp.gate.weight") < n("mlp.experts.0.gate_proj.weight"));
        assert!(n("mlp.experts.0.gate_proj.weight") < n("mlp.experts.0.up_proj.weight"));
        assert!(n("mlp.experts.0.down_proj.weight") < n("mlp.experts.1.gate_proj.weight"));
        assert!(n("mlp.experts.2.gate_proj.weight") < n("mlp.experts.10.gate_proj.weight"));
        assert!(n("mlp.experts.127.down_proj.weight") < n("input_layernorm.weight"));
        assert!(n("input_layernorm.weight") < n("post_attention_layernorm.weight"));
    }

    const HF: &str = "qwen3-moe-tiny-hf";
    const MF: &str = "qwen3-moe-tiny-mf-dp2-tp2-ep2-f32";

    #[test]
    fn either_expert_count_is_read_and_both_must_agree() {
        // qwen3-moe-tiny-hf states num_local_experts = 4, as transformers 5 writes it.
        let experts = |edit: &dyn Fn(&mut Value)| MoeDims::from_config(&config_of(HF, edit));
        assert_eq!(experts(&|_| {}).unwrap().experts, 4);
        // The Hub's name alone, and both when they agree.
        let hub = |j: &mut Value| {
            j.as_object_mut().unwrap().remove("num_local_experts");
            j["num_experts"] = json!(4);
        };
        assert_eq!(experts(&hub).unwrap().experts, 4);
        assert_eq!(
            experts(&|j| j["num_experts"] = json!(4)).unwrap().experts,
            4
        );
        let c = config_of(HF, |j| j["num_experts"] = json!(8));
        let path = c.path.display().to_string();
        input_err(
            MoeDims::from_config(&c),
            &[&path, "`num_experts` is 8 but `num_local_experts` is 4"],
        );
    }

    #[test]
    fn experts_too_big_for_64_bit_byte_counts_are_refused() {
        // weight1 is [E * H, 2 * F]: with H = 64 and F = 32, 2^12 * E
        // elements, 2^15 * E bytes at 8 an element: past 2^64 from E = 2^49.
        let with_experts =
            |e: u64| MoeDims::from_config(&config_of(HF, |j| j["num_local_experts"] = json!(e)));
        with_experts(1 << 48).unwrap();
        input_err(
            with_experts(1 << 49),
            &["the expert sizes overflow 64-bit byte counts"],
        );
        // An expert size whose 2 * F alone passes 2^64 is refused too, not
        // a panic on the way.
        let c = config_of(HF, |j| j["moe_intermediate_size"] = json!(1u64 << 63));
        input_err(
            MoeDims::from_config(&c),
            &["the expert sizes overflow 64-bit byte counts"],
        );
    }

    #[test]
    fn an_expert_shape_error_names_the_file_and_the_expert_sizes() {
        // qwen3-moe-tiny-hf's experts' gate_proj is [32, 64], in its first shard.
        let c = config_of(HF, |j| j["moe_intermediate_size"] = json!(31));
        let path = c.path.display().to_string();
        input_err(
            hf_to_mf(stored(HF), &c),
            &[
                "model-00001-of-00002.safetensors: tensor model.layers.0.mlp.experts.0.gate_proj.weight: shape [32, 64]",
                &format!(
                    "{path} (hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=96, vocab_size=96, num_experts=4, moe_intermediate_size=31) gives [31, 64]"
                ),
            ],
        );
    }

    #[test]
    fn a_dense_mlp_in_a_moe_folder_is_refused() {
        for (x, shape) in [("gate", [96, 64]), ("up", [96, 64]), ("down", [64, 96])] {
            let name = format!("model.layers.0.mlp.{x}_proj.weight");
            let (_dir, it) = hf_with(HF, &[(&name, &shape)]);
            let c = config_of(HF, |_| {});
            let path = c.path.display().to_string();
            input_err(
                hf_to_mf(it, &c),
                &[&format!(
                    "{path}: tensor {name} is a dense MLP: MindSpore Transformers' Qwen3-MoE has no dense layers"
                )],
            );
        }
    }

    /// The cuts a target may make in a layer's fused and stacked tensors:
    /// whole key/value groups of linear_qkv, whole experts of weight1 (H
    /// rows each) and weight2 (F rows each).
    fn want_group(name: &str) -> Option<(u64, &'static str)> {
        // qwen3-moe-tiny: 4 heads in 2 groups of head_dim 8, so (2 + 2) * 8
        // rows a group; H = 64, F = 32.
        if name.ends_with(".self_attention.linear_qkv.weight") {
            Some((32, "key/value groups (num_key_value_heads)"))
        } else if name.ends_with(".mlp.experts.weight1") {
            Some((64, "experts (num_experts)"))
        } else if name.ends_with(".mlp.experts.weight2") {
            Some((32, "experts (num_experts)"))
        } else {
            None
        }
    }

    #[test]
    fn a_hugging_face_folders_experts_are_cut_only_between_whole_experts() {
        let it = hf_to_mf(stored(HF), &config_of(HF, |_| {})).unwrap();
        assert_eq!(groups_marked(&it, want_group), 2 * 3);
    }

    #[test]
    fn a_mindformers_moes_stacked_tensors_are_cut_only_between_groups_and_experts() {
        let mut it = stored(MF);
        assert!(it.tensors.iter().all(|t| t.rules.dim0_group.is_none()));
        assert!(mark_mf_rules(&mut it));
        // 2 layers, 3 tensors each, each with its adam_m and adam_v copies.
        assert_eq!(groups_marked(&it, want_group), 2 * 3 * 3);
        // A dense Qwen3's has no router: not a Qwen3-MoE's, left as it is.
        let mut dense = stored("qwen3-tiny-mf-tp2-pp2-f32");
        assert!(!mark_mf_rules(&mut dense));
        assert!(dense.tensors.iter().all(|t| t.rules.dim0_group.is_none()));
    }

    #[test]
    fn q_k_and_v_come_back_out_of_each_key_value_group() {
        // Per group of linear_qkv (32 rows): 2 query heads of 8, then its
        // key head, then its value head.
        let it = mf_to_hf(stored(MF), None).unwrap();
        for i in 0..2 {
            let qkv = format!("decoder.layers.{i}.self_attention.linear_qkv.weight");
            for (x, rows) in [("q", 32), ("k", 16), ("v", 16)] {
                let name = format!("model.layers.{i}.self_attn.{x}_proj.weight");
                let t = it.tensors.iter().find(|t| t.name == name).unwrap();
                assert_eq!(t.global_shape, [rows, 64]);
                let m = t.assembly.as_ref().unwrap().rows().unwrap();
                for r in 0..rows {
                    let want = match x {
                        "q" => r / 16 * 32 + r % 16,
                        "k" => r / 8 * 32 + 16 + r % 8,
                        _ => r / 8 * 32 + 24 + r % 8,
                    };
                    let (part, row, _) = m.locate(r);
                    assert_eq!(
                        (it.parts[part].name.as_str(), row),
                        (qkv.as_str(), want),
                        "{name} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_hugging_face_view_says_how_many_optimizer_states_it_leaves_out() {
        // qwen3-moe-tiny-mf: 21 parameters, each with adam_m and adam_v.
        check_optimizer_note(MF, mf_to_hf, 42);
    }

    #[test]
    fn a_stored_output_layer_is_shown_and_an_untied_config_needs_one() {
        check_output_layer(HF, MF, mf_to_hf, "Qwen3-MoE");
    }
}
