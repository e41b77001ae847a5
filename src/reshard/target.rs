//! The target strategy: how the view should look, tensor by tensor.
//!
//! Users say it in one of four ways (`--mesh`, `--pp`, `--strategy`,
//! `--unshard`); each is resolved against a source iteration into one
//! [`Placement`] per tensor: the layout the tensor takes and the ranks that
//! hold it. Everything after this point (plan, metadata, bytes) only sees
//! placements.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::layout::{Layout, Slice};
use crate::checkpoint::limits::{MAX_METADATA_BYTES, MAX_WORLD};
use crate::checkpoint::metadata::{LayoutJson, StorageEntry, from_value, parse_shard_id};
use crate::checkpoint::names::{Kind, layer_index, parameter_name};
use crate::checkpoint::paths::read_small;
use crate::checkpoint::source::{Iteration, Tensor};
use crate::error::Result;
use crate::{bad, bail};

/// What the user asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    /// New sizes for named device axes (possibly none) and optionally a new
    /// number of pipeline stages, with MindSpore Transformers' `offset`
    /// (`--pp-offset`: per stage, layers beyond `layers / pp`).
    Mesh {
        sizes: Vec<(String, u64)>,
        pp: Option<u64>,
        offset: Option<Vec<i64>>,
    },
    /// Layouts taken from a file.
    Strategy(PathBuf),
    /// One rank holding every tensor whole.
    Unshard,
}

/// Where one tensor goes in the view.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// `None`: the tensor is not split and every rank in `ranks` holds it whole.
    pub layout: Option<Layout>,
    /// The ranks holding the tensor; `layout.rank_list` when there is a layout.
    pub ranks: Vec<u64>,
}

impl Placement {
    /// The slice that position `i` of `ranks` holds.
    pub fn slice(&self, i: usize, global_shape: &[u64]) -> Slice {
        match &self.layout {
            Some(l) => l.slice(i, global_shape),
            None => Slice::whole(global_shape),
        }
    }
}

/// A resolved target for one iteration: a placement per source tensor.
#[derive(Debug)]
pub struct Target {
    /// Parallel to `Iteration::tensors`.
    pub placements: Vec<Placement>,
    pub world: u64,
}

impl TargetSpec {
    /// Parses `--mesh tp=2,dp=1` (repeated flags are joined).
    pub fn parse_mesh(values: &[String]) -> Result<Vec<(String, u64)>> {
        let mut sizes: Vec<(String, u64)> = Vec::new();
        for item in values.iter().flat_map(|v| v.split(',')) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (alias, n) = item
                .split_once('=')
                .ok_or_else(|| bad!("--mesh: {item:?} is not ALIAS=N (e.g. tp=2)"))?;
            let n: u64 = n
                .trim()
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad!("--mesh: {item:?}: the size must be a positive integer"))?;
            let alias = alias.trim().to_string();
            if sizes.iter().any(|(a, _)| *a == alias) {
                bail!("--mesh names {alias} twice");
            }
            sizes.push((alias, n));
        }
        Ok(sizes)
    }

    /// A short human description (`tp=2 pp=1`, `unshard`, `strategy FILE`).
    pub fn describe(&self) -> String {
        match self {
            TargetSpec::Mesh { sizes, pp, offset } => {
                let mut parts: Vec<String> =
                    sizes.iter().map(|(a, n)| format!("{a}={n}")).collect();
                if let Some(pp) = pp {
                    parts.push(format!("pp={pp}"));
                }
                if let Some(o) = offset {
                    parts.push(format!("offset={}", join_offsets(o)));
                }
                if parts.is_empty() {
                    "same strategy as the source".into()
                } else {
                    parts.join(",")
                }
            }
            TargetSpec::Strategy(p) => format!("strategy {}", p.display()),
            TargetSpec::Unshard => "unshard".into(),
        }
    }

    /// Resolves the target against one source iteration.
    pub fn resolve(&self, it: &Iteration) -> Result<Target> {
        let placements = match self {
            TargetSpec::Mesh { sizes, pp, offset } => {
                resolve_mesh(it, sizes, *pp, offset.as_deref())?
            }
            TargetSpec::Strategy(path) => resolve_strategy(it, path)?,
            TargetSpec::Unshard => it
                .tensors
                .iter()
                .map(|_| Placement {
                    layout: None,
                    ranks: vec![0],
                })
                .collect(),
        };
        for (t, p) in it.tensors.iter().zip(&placements) {
            check_rules(t, p)?;
        }
        let what = self.describe();
        if let Some((t, _)) = it
            .tensors
            .iter()
            .zip(&placements)
            .find(|(_, p)| p.ranks.is_empty())
        {
            bail!(
                "target {what}: tensor {}: no rank would hold it (an empty placement)",
                t.name
            );
        }
        let mut max = 0;
        for (t, p) in it.tensors.iter().zip(&placements) {
            for &r in &p.ranks {
                if r >= MAX_WORLD {
                    bail!(
                        "target {what}: tensor {}: rank {r} is beyond the {MAX_WORLD} ranks a view may have",
                        t.name
                    );
                }
                max = max.max(r);
            }
        }
        Ok(Target {
            placements,
            world: max + 1,
        })
    }
}

/// Refuses a placement that cuts a tensor where its model says it may not
/// be cut: a fused QKV between the heads of one key/value group.
fn check_rules(t: &Tensor, p: &Placement) -> Result<()> {
    let (Some((group, what)), Some(l)) = (t.rules.dim0_group, &p.layout) else {
        return Ok(());
    };
    let split = l.split(0);
    let rows = t.global_shape.first().copied().unwrap_or(0);
    let groups = rows.checked_div(group).unwrap_or(0);
    if split > 1 && groups % split != 0 {
        let axes: Vec<String> = l.tensor_map[0]
            .iter()
            .map(|&a| format!("{}={}", l.alias_name[a], l.device_matrix[a]))
            .collect();
        bail!(
            "target: tensor {}: {} does not divide its {groups} {what}; MindSpore Transformers refuses this split",
            t.name,
            axes.join("*")
        );
    }
    Ok(())
}

/// The device axis of MindSpore Transformers' expert matrix `(dp_ex_ep,
/// ep)` that follows the others: `dp*tp*cp/ep`, so that the experts and the
/// dense tensors of a stage agree on its ranks.
const DERIVED_AXIS: &str = "dp_ex_ep";

/// Sizes the derived axis of `l` so that `l` has `devices` ranks, those of
/// the stage's dense layout `dense`; MindSpore Transformers also requires
/// `ep` (the expert matrix's other axes) to divide `dp*tp`.
fn derive_axis(l: &mut Layout, devices: u64, dense: &Layout) -> std::result::Result<(), String> {
    let Some(axis) = l.alias_name.iter().position(|a| a == DERIVED_AXIS) else {
        return Ok(());
    };
    let others: u64 = (0..l.device_matrix.len())
        .filter(|&a| a != axis)
        .map(|a| l.device_matrix[a])
        .product();
    let cp = dense
        .alias_name
        .iter()
        .position(|a| a == "cp")
        .map_or(1, |a| dense.device_matrix[a]);
    let dp_tp = devices / cp.max(1);
    let names: Vec<String> = (0..l.device_matrix.len())
        .filter(|&a| a != axis)
        .map(|a| format!("{}={}", l.alias_name[a], l.device_matrix[a]))
        .collect();
    if others == 0 || !dp_tp.is_multiple_of(others) {
        return Err(format!(
            "{} does not divide dp*tp = {dp_tp} ({}); MindSpore Transformers requires it for its expert matrix",
            names.join("*"),
            dense.describe_mesh()
        ));
    }
    l.device_matrix[axis] = devices / others;
    Ok(())
}

fn resolve_mesh(
    it: &Iteration,
    sizes: &[(String, u64)],
    pp: Option<u64>,
    offset: Option<&[i64]>,
) -> Result<Vec<Placement>> {
    let present: BTreeSet<&str> = it
        .tensors
        .iter()
        .filter_map(|t| t.layout.as_ref())
        .flat_map(|l| l.alias_name.iter().map(String::as_str))
        .collect();
    for (alias, _) in sizes {
        if !present.contains(alias.as_str()) {
            let list = if present.is_empty() {
                "none (the source has no layouts; use --unshard, --pp or --strategy)".to_string()
            } else {
                present.iter().copied().collect::<Vec<_>>().join(", ")
            };
            bail!(
                "--mesh {alias}=...: no tensor has a device axis named {alias}; aliases present: {list}"
            );
        }
    }
    let what = TargetSpec::Mesh {
        sizes: sizes.to_vec(),
        pp,
        offset: offset.map(<[i64]>::to_vec),
    }
    .describe();

    if sizes.iter().any(|(a, _)| a == DERIVED_AXIS) {
        bail!(
            "--mesh {DERIVED_AXIS}=...: {DERIVED_AXIS} follows dp*tp*cp/ep; give dp, tp, cp and ep instead"
        );
    }
    // New layouts (rank lists filled in below, once stages are known): the
    // ones without a derived axis first, which fix the ranks per stage.
    let mut layouts: Vec<Option<Layout>> = vec![None; it.tensors.len()];
    // The first tensor's ranks per stage, which every other must match.
    let mut first: Option<(u64, &str, String, Layout)> = None;
    let derived = |l: &Layout| l.alias_name.iter().any(|a| a == DERIVED_AXIS);
    for pass in [false, true] {
        for (ti, t) in it.tensors.iter().enumerate() {
            let Some(src) = &t.layout else {
                continue;
            };
            if derived(src) != pass {
                continue;
            }
            let mut l = src
                .with_sizes(sizes)
                .map_err(|e| bad!("target {what}: tensor {}: {e}", t.name))?;
            if pass && let Some((n, _, _, dense)) = &first {
                derive_axis(&mut l, *n, dense)
                    .map_err(|e| bad!("target {what}: tensor {}: {e}", t.name))?;
            }
            if t.rules.whole_if_uneven && l.check_divides(&t.global_shape).is_err() {
                // MindSpore Transformers keeps such a tensor whole rather than refusing.
                l.tensor_map.iter_mut().for_each(Vec::clear);
            }
            l.check_divides(&t.global_shape)
                .map_err(|e| bad!("target {what}: tensor {}: {e}", t.name))?;
            let n = l.devices();
            match &first {
                None => first = Some((n, &t.name, l.describe_mesh(), l.clone())),
                Some((m, other, mesh, _)) if *m != n => bail!(
                    "target {what}: tensors disagree on ranks per stage: {other} has {m} ({mesh}), {} has {n} ({})",
                    t.name,
                    l.describe_mesh()
                ),
                _ => {}
            }
            layouts[ti] = Some(l);
        }
    }
    let rule = StageRule::new(it, pp, offset)?;
    let stages = pp.unwrap_or(it.stages);
    let stage_devices = first.as_ref().map_or(1, |d| d.0);
    if stage_devices.saturating_mul(stages) > MAX_WORLD {
        let (name, mesh) = first.map_or(("", String::new()), |d| (d.1, d.2));

        bail!(
            "target {what}: tensor {name}: {stages} stage(s) x {stage_devices} rank(s) ({mesh}) is more than the {MAX_WORLD} ranks a view may have"
        );
    }

    it.tensors
        .iter()
        .zip(layouts)
        .map(|(t, layout)| {
            let s = rule.stage(t);
            // A source stage beyond the view's is refused, not wrapped.
            let first = s
                .checked_mul(stage_devices)
                .filter(|f| f.saturating_add(stage_devices) <= MAX_WORLD)
                .ok_or_else(|| {
                    bad!(
                        "target {what}: tensor {}: stage {s} x {stage_devices} rank(s) is beyond the {MAX_WORLD} ranks a view may have",
                        t.name
                    )
                })?;
            let ranks: Vec<u64> = (first..first + stage_devices).collect();
            Ok(match layout {
                Some(mut l) => {
                    l.rank_list = ranks.clone();
                    Placement {
                        layout: Some(l),
                        ranks,
                    }
                }
                None => Placement {
                    layout: None,
                    ranks,
                },
            })
        })
        .collect()
}

/// The target stage of each tensor. Without `--pp` a tensor stays on its
/// source stage (which also keeps any uneven split the source job chose);
/// with `--pp N`, the layers go to the stages in order, `L / N` each, as
/// MindSpore Transformers places them (its `LayerSetting`): a split that
/// does not divide the layers needs its `offset` (`--pp-offset`), one
/// integer per stage added to `L / N`, summing to `L % N`, and is refused
/// without one, as MindSpore Transformers refuses it. A tensor outside the
/// layers:
/// * from a multi-stage source, stays first if it was first, else goes last;
/// * from a single-stage source (which says nothing about stages), goes where
///   MindSpore Transformers puts it: the final norm and the output layer
///   ([`on_last_stage`]) on the last stage, everything else on the first.
///   Keyed on names, not on the kind of source, so any single-stage source
///   with MindSpore Transformers names (a Hugging Face folder mapped to them included)
///   follows the same rule.
enum StageRule {
    Keep,
    Pp {
        stages: u64,
        layers: Layers,
        single_stage_source: bool,
    },
}

/// How the layers are split over the stages.
enum Layers {
    /// `per` layers on every stage (`L % N == 0`, no offset).
    Even { per: u64 },
    /// Stage `s` holds the layers below `ends[s]` not held by an earlier one.
    Ends(Vec<u64>),
}

/// `1,0,0`: offsets as `--pp-offset` takes them.
fn join_offsets(o: &[i64]) -> String {
    o.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// Whether a tensor outside the layers sits on a MindSpore Transformers job's last
/// pipeline stage: `decoder.final_layernorm.*` and `output_layer.*`, and
/// their optimizer states (`adam_m.`/`adam_v.` prefixes).
pub fn on_last_stage(name: &str) -> bool {
    let base = parameter_name(name);
    ["decoder.final_layernorm", "output_layer"].iter().any(|p| {
        base.strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The layers per stage that `offset` gives for `layers` layers over
/// `stages` stages, with MindSpore Transformers' checks (`LayerSetting.
/// _check_inputs`): one offset per stage, summing to `layers % stages`; the
/// first and last stage may hold no layer, every other at least one.
fn layers_per_stage(layers: u64, stages: u64, offset: &[i64]) -> Result<Vec<u64>> {
    let given = join_offsets(offset);
    if offset.len() as u64 != stages {
        bail!(
            "--pp-offset {given}: {} value(s) for {stages} stage(s); give one integer per stage",
            offset.len()
        );
    }
    let base = layers / stages;
    let rem = layers % stages;
    let sum: i128 = offset.iter().map(|&o| i128::from(o)).sum();
    if sum != i128::from(rem) {
        bail!(
            "--pp-offset {given}: sums to {sum}, but {layers} layers over {stages} stages leave {rem} ({layers} % {stages}); the offsets must sum to that"
        );
    }
    let last = offset.len() - 1;
    offset
        .iter()
        .enumerate()
        .map(|(s, &o)| {
            let n = i128::from(base) + i128::from(o);
            let least = if s == 0 || s == last { 0 } else { 1 };
            if n < least {
                bail!(
                    "--pp-offset {given}: stage {s} would hold {n} layer(s) ({base} + {o}); the first and last stage may hold none, every other stage needs at least one"
                );
            }
            // At most `layers`: the offsets sum to the remainder.
            Ok(n as u64)
        })
        .collect()
}

impl StageRule {
    fn new(it: &Iteration, pp: Option<u64>, offset: Option<&[i64]>) -> Result<StageRule> {
        let Some(stages) = pp else {
            if offset.is_some() {
                bail!("--pp-offset needs --pp: it says how --pp N splits the layers");
            }
            return Ok(StageRule::Keep);
        };
        if stages == 0 {
            bail!("--pp must be at least 1");
        }
        let layers = it
            .tensors
            .iter()
            .filter_map(|t| layer_index(&t.name))
            .max()
            // A layer index of u64::MAX (a hostile name) saturates: no stage
            // count can need more layers than that.
            .map_or(0, |m| m.saturating_add(1));
        if stages > 1 && stages > layers {
            bail!(
                "--pp {stages}: the checkpoint has {layers} layers (names with `layers.<i>.`), so at most {} stages",
                layers.max(1)
            );
        }
        let split = match offset {
            Some(o) => {
                let per = layers_per_stage(layers, stages, o)?;
                let mut end = 0u64;
                Layers::Ends(
                    per.into_iter()
                        .map(|n| {
                            end = end.saturating_add(n);
                            end
                        })
                        .collect(),
                )
            }
            None if layers % stages != 0 => {
                let rem = layers % stages;
                // One more layer on each of the first `rem` stages.
                let example: Vec<i64> = (0..stages.min(16)).map(|s| i64::from(s < rem)).collect();
                bail!(
                    "--pp {stages}: {layers} layers do not divide into {stages} stages, and MindSpore Transformers refuses such a split without an offset; say where the {rem} extra layer(s) go with --pp-offset, one integer per stage summing to {rem}{}",
                    if stages <= 16 {
                        format!(" (e.g. --pp-offset {})", join_offsets(&example))
                    } else {
                        String::new()
                    }
                );
            }
            None => Layers::Even {
                per: (layers / stages).max(1),
            },
        };
        Ok(StageRule::Pp {
            stages,
            layers: split,
            single_stage_source: it.stages <= 1,
        })
    }

    fn stage(&self, t: &Tensor) -> u64 {
        match self {
            StageRule::Keep => t.stage,
            StageRule::Pp {
                stages,
                layers,
                single_stage_source,
            } => {
                let (stages, single_stage_source) = (*stages, *single_stage_source);
                match layer_index(&t.name) {
                    Some(i) => match layers {
                        Layers::Even { per } => (i / per).min(stages - 1),
                        Layers::Ends(ends) => {
                            (ends.partition_point(|&e| e <= i) as u64).min(stages - 1)
                        }
                    },
                    None if single_stage_source && on_last_stage(&t.name) => stages - 1,
                    None if single_stage_source || t.stage == 0 => 0,
                    None => stages - 1,
                }
            }
        }
    }
}

fn resolve_strategy(it: &Iteration, path: &Path) -> Result<Vec<Placement>> {
    // Capped like a source's metadata.json: a strategy is one.
    let raw = read_small(path, MAX_METADATA_BYTES)?;
    let p = path.display();
    let json: Value = serde_json::from_slice(&raw).map_err(|e| bad!("{p}: not valid JSON: {e}"))?;
    let obj = json.as_object().ok_or_else(|| {
        bad!("{p}: expected a metadata.json or an object {{tensor name: layout}}")
    })?;
    // A target job's metadata.json, or a bare {name: layout} object.
    let (entries, holders) = match obj.get("state_dict_metadata") {
        Some(sdm) => {
            let sdm = sdm
                .as_object()
                .ok_or_else(|| bad!("{p}: `state_dict_metadata` is not an object"))?;
            (
                sdm,
                strategy_holders(obj.get("storage_data"), &p.to_string())?,
            )
        }
        None => (obj, HashMap::new()),
    };
    let from_metadata = obj.contains_key("state_dict_metadata");
    let mut missing = Vec::new();
    let mut placements = Vec::with_capacity(it.tensors.len());
    for t in &it.tensors {
        // An optimizer state takes its parameter's layout, as in MindSpore
        // Transformers, when the file has none of its own: the strategy of
        // a job saved without optimizer states applies to one with them.
        let param = parameter_name(&t.name);
        let (entry, from) = match (entries.get(&t.name), t.kind) {
            (Some(e), _) => (e, t.name.as_str()),
            (None, Kind::Opt) if param != t.name && entries.contains_key(param) => {
                (&entries[param], param)
            }
            _ => {
                missing.push(t.name.as_str());
                continue;
            }
        };
        let at = |e: String| {
            if from == t.name {
                bad!("{p}: tensor {}: {e}", t.name)
            } else {
                bad!("{p}: tensor {from} (whose layout {} takes): {e}", t.name)
            }
        };
        let layout_value = if from_metadata {
            if let Some(gs) = entry.get("global_shape") {
                let gs: Vec<u64> = from_value(gs).map_err(|e| at(format!("global_shape: {e}")))?;
                if gs != t.global_shape {
                    return Err(at(format!(
                        "global_shape is {gs:?}, but the source's is {:?}",
                        t.global_shape
                    )));
                }
            }
            entry.get("layout").unwrap_or(&Value::Null)
        } else {
            entry
        };
        let lj: Option<LayoutJson> =
            from_value(layout_value).map_err(|e| at(format!("layout: {e}")))?;
        let placement = match lj {
            Some(lj) => {
                let l = Layout::from_json(&lj, t.global_shape.len()).map_err(at)?;
                l.check_divides(&t.global_shape).map_err(at)?;
                Placement {
                    ranks: l.rank_list.clone(),
                    layout: Some(l),
                }
            }
            None => Placement {
                layout: None,
                ranks: holders.get(from).cloned().unwrap_or_else(|| vec![0]),
            },
        };
        placements.push(placement);
    }
    if !missing.is_empty() {
        bail!(
            "{p}: has no layout for {} source tensor(s): {}{}",
            missing.len(),
            missing
                .iter()
                .take(5)
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        );
    }
    Ok(placements)
}

/// For a strategy metadata.json: the ranks that hold each tensor, from its
/// storage_data (used for tensors whose layout is null).
fn strategy_holders(sd: Option<&Value>, p: &str) -> Result<HashMap<String, Vec<u64>>> {
    let mut out: HashMap<String, BTreeSet<u64>> = HashMap::new();
    if let Some(sd) = sd.and_then(Value::as_object) {
        for (key, value) in sd {
            let (name, _) = parse_shard_id(key).map_err(|e| bad!("{p}: storage_data: {e}"))?;
            let entries: Vec<StorageEntry> =
                from_value(value).map_err(|e| bad!("{p}: storage_data[{key:?}]: {e}"))?;
            let set = out.entry(name).or_default();
            for e in entries {
                set.insert(e.storage_rank);
                set.extend(e.rank_group.unwrap_or_default());
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_stage_names() {
        for n in [
            "decoder.final_layernorm.weight",
            "output_layer.weight",
            "adam_m.output_layer.weight",
            "adam_v.decoder.final_layernorm.bias",
        ] {
            assert!(on_last_stage(n), "{n}");
        }
        for n in [
            "embedding.word_embeddings.weight",
            "output_layer_norm.weight",
            "adam_m.embedding.word_embeddings.weight",
            "model.output_layer.weight",
            "global_step",
            "output_layer",
        ] {
            assert!(!on_last_stage(n), "{n}");
        }
    }

    #[test]
    fn offsets_follow_mindspore_transformers_checks() {
        // 28 layers over 3 stages: 9 each and one left over.
        assert_eq!(layers_per_stage(28, 3, &[1, 0, 0]).unwrap(), vec![10, 9, 9]);
        assert_eq!(layers_per_stage(28, 3, &[0, 0, 1]).unwrap(), vec![9, 9, 10]);
        // Moving layers between stages of an even split.
        assert_eq!(layers_per_stage(8, 2, &[-1, 1]).unwrap(), vec![3, 5]);
        // The first and last stage may be empty, the middle ones not.
        assert_eq!(layers_per_stage(4, 2, &[-2, 2]).unwrap(), vec![0, 4]);
        assert_eq!(layers_per_stage(6, 3, &[1, -1, 0]).unwrap(), vec![3, 1, 2]);
        let e = |l, n, o: &[i64], words: &[&str]| {
            let msg = layers_per_stage(l, n, o).unwrap_err().to_string();
            for w in words {
                assert!(msg.contains(w), "{msg:?} lacks {w:?}");
            }
        };
        e(28, 3, &[1, 0], &["2 value(s) for 3 stage(s)"]);
        e(28, 3, &[1, 1, 0], &["sums to 2", "leave 1", "28 % 3"]);
        e(28, 3, &[0, 0, 0], &["sums to 0", "leave 1"]);
        e(6, 3, &[2, -2, 0], &["stage 1", "0 layer(s)"]);
        e(4, 2, &[-3, 3], &["stage 0", "-1 layer(s)"]);
        e(4, 2, &[i64::MAX, i64::MIN], &["sums to"]);
    }

    #[test]
    fn mesh_arguments() {
        let m = TargetSpec::parse_mesh(&["dp=1,tp=4".into(), "cp=2".into()]).unwrap();
        assert_eq!(
            m,
            vec![("dp".into(), 1), ("tp".into(), 4), ("cp".into(), 2)]
        );
        assert!(TargetSpec::parse_mesh(&["tp".into()]).is_err());
        assert!(TargetSpec::parse_mesh(&["tp=0".into()]).is_err());
        assert!(TargetSpec::parse_mesh(&["tp=2,tp=4".into()]).is_err());
    }

    fn fixture_iteration(name: &str) -> Iteration {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let src = crate::checkpoint::source::Source::open(&dir).unwrap();
        src.iterations.into_iter().next().unwrap()
    }

    /// The stage `rule` gives a tensor named `name` on source stage
    /// `stage` (the iteration's first tensor, renamed and moved).
    fn stage_of(rule: &StageRule, it: &mut Iteration, name: &str, stage: u64) -> u64 {
        it.tensors[0].name = name.into();
        it.tensors[0].stage = stage;
        rule.stage(&it.tensors[0])
    }

    /// From a multi-stage source (tests/fixtures: gpt, 2 stages), a tensor
    /// outside the layers keeps its end of the pipeline whatever its name;
    /// the name rule is only for a single-stage source (tp4, one stage),
    /// which says nothing about stages.
    #[test]
    fn stages_of_tensors_outside_the_layers() {
        let mut multi = fixture_iteration("gpt-dp2-tp2-pp2-bf16");
        assert_eq!(multi.stages, 2, "the gpt fixture has 2 stages");
        let mut single = fixture_iteration("tp4-f32");
        assert_eq!(single.stages, 1, "the tp4 fixture has 1 stage");
        let cases: &[(bool, &str, u64, u64, &str)] = &[
            // (multi-stage source, name, source stage, want with --pp 2, why)
            (true, "mtp.head.weight", 1, 1, "was last, stays last"),
            (true, "mtp.head.weight", 0, 0, "was first, stays first"),
            (true, "output_layer.weight", 0, 0, "was first, stays first"),
            (
                true,
                "decoder.final_layernorm.weight",
                1,
                1,
                "was last, stays last",
            ),
            (
                true,
                "embedding.word_embeddings.weight",
                0,
                0,
                "was first, stays first",
            ),
            (
                false,
                "output_layer.weight",
                0,
                1,
                "named for the last stage",
            ),
            (
                false,
                "adam_m.decoder.final_layernorm.weight",
                0,
                1,
                "named for the last stage",
            ),
            (false, "mtp.head.weight", 0, 0, "everything else goes first"),
            (
                false,
                "embedding.word_embeddings.weight",
                0,
                0,
                "everything else goes first",
            ),
        ];
        for &(is_multi, name, from, want, why) in cases {
            let it = if is_multi { &mut multi } else { &mut single };
            let rule = StageRule::new(it, Some(2), None).unwrap();
            let got = stage_of(&rule, it, name, from);
            assert_eq!(
                got, want,
                "--pp 2 from a {}-stage source: {name} on source stage {from} went to stage {got}, want {want} ({why})",
                it.stages
            );
        }
        // Without --pp every tensor keeps its source stage.
        let keep = StageRule::new(&multi, None, None).unwrap();
        for s in [0, 1, 5] {
            assert_eq!(stage_of(&keep, &mut multi, "output_layer.weight", s), s);
            assert_eq!(stage_of(&keep, &mut multi, "decoder.layers.0.x", s), s);
        }
    }

    /// Layers go to the stages in order, `L / N` each, or as `--pp-offset`
    /// says; a layer index beyond the last (a hostile name) goes last.
    #[test]
    fn stages_of_layers() {
        let mut it = fixture_iteration("tp4-f32");
        let mut at = |rule: &StageRule, i: u64| {
            let name = format!("decoder.layers.{i}.mlp.linear_fc1.weight");
            stage_of(rule, &mut it, &name, 0)
        };
        let it2 = fixture_iteration("tp4-f32");
        let even = StageRule::new(&it2, Some(2), None).unwrap();
        assert_eq!((at(&even, 0), at(&even, 1), at(&even, 7)), (0, 1, 1));
        let one = StageRule::new(&it2, Some(1), None).unwrap();
        assert_eq!((at(&one, 0), at(&one, 1)), (0, 0));
        let ends = StageRule::new(&it2, Some(2), Some(&[1, -1])).unwrap();
        assert_eq!((at(&ends, 0), at(&ends, 1), at(&ends, 9)), (0, 0, 1));
        let ends = StageRule::new(&it2, Some(2), Some(&[-1, 1])).unwrap();
        assert_eq!((at(&ends, 0), at(&ends, 1)), (1, 1));
        // Four layers (a fourth named into the source) over 2 stages: 2 each.
        let mut it4 = fixture_iteration("tp4-f32");
        it4.tensors[0].name = "decoder.layers.3.extra.weight".into();
        let four = StageRule::new(&it4, Some(2), None).unwrap();
        assert_eq!(
            (0..4).map(|i| at(&four, i)).collect::<Vec<_>>(),
            vec![0, 0, 1, 1],
            "4 layers over 2 stages"
        );
        for (pp, offset, words) in [
            (Some(0), None, "at least 1"),
            (Some(3), None, "at most 2 stages"),
            (None, Some(&[0i64][..]), "needs --pp"),
        ] {
            let Err(e) = StageRule::new(&it2, pp, offset) else {
                panic!("--pp {pp:?} --pp-offset {offset:?} must be refused");
            };
            let msg = e.to_string();
            assert!(msg.contains(words), "{msg:?} lacks {words:?}");
        }
    }

    fn strategy_file(tag: &str, json: &Value) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "reshardfs-strategy-{}-{tag}.json",
            std::process::id()
        ));
        std::fs::write(&p, serde_json::to_vec(json).unwrap()).unwrap();
        p
    }

    /// A `--strategy` tensor with a null layout is held whole by exactly
    /// the ranks the strategy's storage_data names; a bare {name: null}
    /// strategy, which names none, by rank 0.
    #[test]
    fn a_null_layout_is_held_by_the_ranks_storage_data_names() {
        let it = fixture_iteration("tp4-f32");
        let meta_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tp4-f32/iteration_00000005/metadata.json");
        let mut meta: Value = serde_json::from_slice(&std::fs::read(meta_path).unwrap()).unwrap();
        let name = "decoder.layers.1.pre_mlp_layernorm.weight";
        meta["state_dict_metadata"][name]["layout"] = Value::Null;
        let key = format!("('{name}', (0,))");
        meta["storage_data"][&key] = serde_json::json!([
            {"file_name": "model-0000001-0000004.safetensors", "storage_rank": 1, "rank_group": [1, 3]},
            {"file_name": "model-0000003-0000004.safetensors", "storage_rank": 3, "rank_group": [1, 3]},
        ]);
        // A second null layout held by one rank, named only as storage_rank.
        let name2 = "decoder.final_layernorm.weight";
        meta["state_dict_metadata"][name2]["layout"] = Value::Null;
        meta["storage_data"][format!("('{name2}', (0,))")] = serde_json::json!([
            {"file_name": "model-0000002-0000004.safetensors", "storage_rank": 2},
        ]);
        let p = strategy_file("null", &meta);
        let target = TargetSpec::Strategy(p.clone()).resolve(&it);
        std::fs::remove_file(&p).unwrap();
        let target = target.unwrap();
        let placement = |n: &str| {
            let i = it.tensors.iter().position(|t| t.name == n).unwrap();
            target.placements[i].clone()
        };
        assert_eq!(
            placement(name),
            Placement {
                layout: None,
                ranks: vec![1, 3]
            },
            "{name}: a null layout must be held by the ranks its storage_data names (1 and 3)"
        );
        assert_eq!(
            placement(name2),
            Placement {
                layout: None,
                ranks: vec![2]
            },
            "{name2}: a null layout must be held by its storage_rank (2)"
        );
        assert_eq!(target.world, 4);

        // A bare object: no storage_data, so rank 0 holds it.
        let mut bare = serde_json::Map::new();
        for t in &it.tensors {
            let l = meta["state_dict_metadata"][&t.name]["layout"].clone();
            bare.insert(t.name.clone(), l);
        }
        let p = strategy_file("bare", &Value::Object(bare));
        let target = TargetSpec::Strategy(p.clone()).resolve(&it);
        std::fs::remove_file(&p).unwrap();
        let target = target.unwrap();
        let i = it.tensors.iter().position(|t| t.name == name).unwrap();
        assert_eq!(
            target.placements[i],
            Placement {
                layout: None,
                ranks: vec![0]
            },
            "{name}: a null layout in a bare strategy names no holder, so rank 0 holds it"
        );
    }

    fn mesh_of(sizes: &[(&str, u64)]) -> TargetSpec {
        TargetSpec::Mesh {
            sizes: sizes.iter().map(|&(a, n)| (a.to_string(), n)).collect(),
            pp: None,
            offset: None,
        }
    }

    /// What `plan`, the summary and every target error call the target.
    #[test]
    fn targets_describe_themselves() {
        let m = TargetSpec::Mesh {
            sizes: vec![("tp".into(), 2), ("dp".into(), 1)],
            pp: Some(2),
            offset: Some(vec![1, -1]),
        };
        assert_eq!(m.describe(), "tp=2,dp=1,pp=2,offset=1,-1");
        assert_eq!(mesh_of(&[]).describe(), "same strategy as the source");
        assert_eq!(
            TargetSpec::Strategy(PathBuf::from("/x/metadata.json")).describe(),
            "strategy /x/metadata.json"
        );
        assert_eq!(TargetSpec::Unshard.describe(), "unshard");
    }

    /// A fused QKV is cut only between whole key/value groups: the tiny
    /// Qwen3 has 2 groups, so tp=2 is allowed and tp=4 refused, naming
    /// the tensor, the axis and the groups (tests/fixtures/README.md).
    #[test]
    fn a_fused_qkv_is_cut_between_whole_groups() {
        let it = fixture_iteration("qwen3-tiny-hf");
        for tp in [1, 2] {
            assert!(mesh_of(&[("tp", tp)]).resolve(&it).is_ok(), "tp={tp}");
        }
        let Err(e) = mesh_of(&[("tp", 4)]).resolve(&it) else {
            panic!("tp=4 cuts inside a key/value group of 2 and must be refused");
        };
        let msg = e.to_string();
        for w in ["linear_qkv", "tp=4 does not divide its 2"] {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
    }

    /// The first tensor laid out on the expert matrix (its derived axis).
    fn expert_tensor(it: &Iteration) -> usize {
        it.tensors
            .iter()
            .position(|t| {
                t.layout
                    .as_ref()
                    .is_some_and(|l| l.alias_name.iter().any(|a| a == DERIVED_AXIS))
            })
            .expect("the MoE fixture has expert tensors")
    }

    /// The expert matrix (dp_ex_ep, ep) takes the stage's ranks: its
    /// derived axis is dp*tp*cp / ep, and ep must divide dp*tp (cp not
    /// counted), as MindSpore Transformers requires.
    #[test]
    fn the_expert_matrix_follows_the_dense_mesh() {
        let it = fixture_iteration("qwen3-moe-tiny-hf");
        let expert = expert_tensor(&it);
        let matrix = |sizes: &[(&str, u64)]| {
            let t = mesh_of(sizes).resolve(&it).unwrap();
            let l = t.placements[expert].layout.clone().unwrap();
            (l.device_matrix, t.world)
        };
        assert_eq!(matrix(&[("dp", 2), ("tp", 2), ("ep", 4)]), (vec![1, 4], 4));
        assert_eq!(matrix(&[("dp", 2), ("tp", 2), ("ep", 2)]), (vec![2, 2], 4));
        assert_eq!(
            matrix(&[("dp", 1), ("cp", 2), ("tp", 2), ("ep", 2)]),
            (vec![2, 2], 4)
        );
        // dp*tp = 2 (cp=2 does not count): ep=4 does not divide it.
        let Err(e) = mesh_of(&[("dp", 1), ("cp", 2), ("tp", 2), ("ep", 4)]).resolve(&it) else {
            panic!("ep=4 with dp*tp = 2 must be refused");
        };
        let msg = e.to_string();
        assert!(msg.contains("ep=4 does not divide dp*tp = 2"), "{msg}");
    }

    /// Every tensor of a stage must have the same ranks: a tensor whose
    /// mesh has another axis (here an extra `ep` of 2 on one tp4 tensor) is
    /// refused under a new mesh, naming both tensors and their meshes.
    #[test]
    fn tensors_that_disagree_on_ranks_per_stage_are_refused() {
        let mut it = fixture_iteration("tp4-f32");
        let name = it.tensors[1].name.clone();
        let l = it.tensors[1].layout.as_mut().unwrap();
        l.device_matrix.push(2);
        l.alias_name.push("ep".into());
        l.rank_list = (0..8).collect();
        let Err(e) = mesh_of(&[("tp", 2)]).resolve(&it) else {
            panic!("{name} has 4 ranks per stage under tp=2, the others 2: must be refused");
        };
        let msg = e.to_string();
        for w in ["disagree on ranks per stage", &name, "has 4", "has 2"] {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
    }

    /// A split that does not divide a tensor is refused (tp=3 of 256
    /// rows), unless the model keeps such a tensor whole (an embedding
    /// whose vocabulary tp does not divide): then it is held whole.
    #[test]
    fn an_uneven_split_is_refused_or_kept_whole_as_the_model_says() {
        let it = fixture_iteration("tp4-f32");
        let Err(e) = mesh_of(&[("tp", 3)]).resolve(&it) else {
            panic!("tp=3 does not divide 256 rows: must be refused");
        };
        assert!(e.to_string().contains("target tp=3: tensor "), "{e}");
        let mut it = fixture_iteration("qwen3-tiny-hf");
        let emb = it
            .tensors
            .iter()
            .position(|t| t.name == "embedding.word_embeddings.weight")
            .unwrap();
        assert!(it.tensors[emb].rules.whole_if_uneven);
        // Split when tp divides the vocabulary (256)...
        let t = mesh_of(&[("tp", 2)]).resolve(&it).unwrap();
        let l = t.placements[emb].layout.as_ref().unwrap();
        assert_eq!(l.split(0), 2, "the embedding is split on tp=2");
        // ...whole when it does not (a vocabulary of 255 rows).
        it.tensors[emb].global_shape[0] = 255;
        it.tensors[emb].rules.dim0_group = None;
        let t = mesh_of(&[("tp", 2)]).resolve(&it).unwrap();
        let l = t.placements[emb].layout.as_ref().unwrap();
        assert_eq!(
            l.split(0),
            1,
            "an embedding tp=2 does not divide is kept whole"
        );
    }

    /// The expert tensors take their mesh from the dense ones whatever
    /// order the tensors come in: an expert tensor first changes nothing.
    #[test]
    fn the_expert_matrix_does_not_depend_on_tensor_order() {
        let mut it = fixture_iteration("qwen3-moe-tiny-hf");
        let expert = expert_tensor(&it);
        let sizes = [("dp", 2), ("tp", 2), ("ep", 2)];
        let before = mesh_of(&sizes).resolve(&it).unwrap();
        it.tensors.swap(0, expert);
        let after = mesh_of(&sizes).resolve(&it).unwrap();
        assert_eq!(after.world, before.world);
        assert_eq!(after.placements[0], before.placements[expert]);
        assert_eq!(after.placements[expert], before.placements[0]);
    }

    /// A strategy from a job saved without optimizer states applies to one
    /// with them: each state takes its parameter's layout. A tensor with
    /// no layout of its own nor a parameter's is listed, not guessed (and
    /// never a panic), states included.
    #[test]
    fn optimizer_states_take_their_parameters_layout() {
        let it = fixture_iteration("gpt-dp2-tp2-pp2-bf16");
        let meta_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gpt-dp2-tp2-pp2-bf16/iteration_00000001/metadata.json");
        let meta: Value = serde_json::from_slice(&std::fs::read(meta_path).unwrap()).unwrap();
        let sdm = meta["state_dict_metadata"].as_object().unwrap();
        let model_only: serde_json::Map<String, Value> = sdm
            .iter()
            .filter(|(k, _)| !k.starts_with("adam_"))
            .map(|(k, v)| (k.clone(), v["layout"].clone()))
            .collect();
        let full: serde_json::Map<String, Value> = sdm
            .iter()
            .map(|(k, v)| (k.clone(), v["layout"].clone()))
            .collect();
        let resolve = |tag: &str, m: &serde_json::Map<String, Value>| {
            let p = strategy_file(tag, &Value::Object(m.clone()));
            let r = TargetSpec::Strategy(p.clone()).resolve(&it);
            std::fs::remove_file(&p).unwrap();
            r
        };
        let got = resolve("model-only", &model_only).unwrap();
        let want = resolve("full", &full).unwrap();
        for (i, t) in it.tensors.iter().enumerate() {
            assert_eq!(
                got.placements[i], want.placements[i],
                "{}: the model-only strategy placed it otherwise than its own layout",
                t.name
            );
        }
        // Without the output layer's layout: it and both its states are missing.
        let mut less = model_only.clone();
        less.remove("output_layer.weight");
        let Err(e) = resolve("less", &less) else {
            panic!("a strategy without output_layer.weight must be refused");
        };
        let msg = e.to_string();
        for w in [
            "has no layout for 3 source tensor(s)",
            "adam_m.output_layer.weight",
            "adam_v.output_layer.weight",
        ] {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
        // A bad layout is reported for the tensor it was read for, and
        // for a state as its parameter's ("whose layout ... takes").
        let mut bad = model_only.clone();
        bad.insert("output_layer.weight".into(), Value::from("not a layout"));
        let Err(e) = resolve("bad", &bad) else {
            panic!("a layout that is a string must be refused");
        };
        let msg = e.to_string();
        assert!(
            msg.contains(": tensor output_layer.weight: layout")
                || msg.contains(": tensor output_layer.weight (whose layout adam_"),
            "{msg}"
        );
    }
}
