//! Model maps: how one model's tensors are named and fused in a Hugging Face
//! folder and in a MindSpore Transformers checkpoint.
//!
//! A map is a transform of an [`Iteration`](super::source::Iteration): it
//! renames tensors and describes fused ones as [`RowMap`](super::source::RowMap)s
//! over the stored ones, so the planner and the byte engine see ordinary
//! tensors and nothing is ever materialised.
//!
//! This module is the only place that knows which models there are: each
//! map is a [`Map`] in its own file, listed in [`MODELS`]; everything else
//! (opening a source, `--hf`, the plan's generated `config.json`) goes
//! through the functions here. Adding a model is a new file and a line in
//! that table.

use std::path::Path;

use safetensors::Dtype;
use serde_json::Value;

use super::limits::{MAX_CONFIG_BYTES, MAX_HF_FILE_BYTES};
use super::paths::read_small;
use super::source::{Iteration, Source, SourceKind};
use super::store;
use crate::error::Result;
use crate::{bad, bail};

pub mod qwen3;
pub mod qwen3_moe;

/// Every model with a map, by the Hub's `model_type`. A MindSpore
/// Transformers checkpoint is matched against them in this order.
pub static MODELS: &[&Map] = &[&qwen3::MAP, &qwen3_moe::MAP];

/// The Hugging Face config file of a model folder.
pub const CONFIG: &str = "config.json";

/// One model's map between Hugging Face and MindSpore Transformers.
pub struct Map {
    /// The Hub's `model_type` (`qwen3`), also what `--model` takes.
    pub model_type: &'static str,
    /// The model's name in prose (`Qwen3`).
    pub display: &'static str,
    /// A Hugging Face folder (loaded as plain tensors) as the MindSpore
    /// Transformers checkpoint it converts to; the sizes come from its
    /// `config.json`.
    pub hf_to_mf: fn(Iteration, &Config) -> Result<Iteration>,
    /// A MindSpore Transformers iteration as the Hugging Face model it is;
    /// sizes from the config when given, else read off the tensors.
    pub mf_to_hf: fn(Iteration, Option<&Config>) -> Result<Iteration>,
    /// Marks the split rules of a MindSpore Transformers iteration's fused
    /// tensors (the cuts a target may make); `false`, leaving it as it
    /// is, when the tensors are not this model's.
    pub mark_mf_rules: fn(&mut Iteration) -> bool,
    /// What [`Map::mark_mf_rules`] needs, for the message when
    /// `--model` insists on a checkpoint that lacks it.
    pub mf_needs: &'static str,
    /// Whether a tensor the map does not place is a buffer the model
    /// derives from its config (a rotary embedding's `inv_freq`), which a
    /// view may leave out. Any other tensor the map does not know makes a
    /// view refuse the source ([`check_left_out`]): without it the view is
    /// not the model.
    pub derived: fn(&str) -> bool,
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Map({})", self.model_type)
    }
}

/// Maps are told apart by name: there is one per `model_type`.
impl PartialEq for Map {
    fn eq(&self, other: &Map) -> bool {
        self.model_type == other.model_type
    }
}
impl Eq for Map {}

/// The map of a `model_type`, if there is one.
pub fn lookup(model_type: &str) -> Option<&'static Map> {
    MODELS.iter().copied().find(|m| m.model_type == model_type)
}

/// `model_type`s with a map, for messages: `qwen3, ...`.
pub fn supported() -> String {
    MODELS
        .iter()
        .map(|m| m.model_type)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `--model` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelChoice {
    /// Decided by the folder: a `config.json` names the model.
    #[default]
    Auto,
    /// This model's map, whatever the folder says.
    Map(&'static Map),
    /// No map: tensors under their stored names, every one whole.
    None,
}

impl ModelChoice {
    pub fn parse(s: &str) -> std::result::Result<ModelChoice, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(ModelChoice::Auto),
            "none" => Ok(ModelChoice::None),
            other => lookup(other)
                .map(ModelChoice::Map)
                .ok_or_else(|| format!("unknown model {s:?}; supported: {}, or none", supported())),
        }
    }
}

/// What a model map made of an iteration: which model, where its sizes
/// came from, and the `config.json` a Hugging Face view of it would show
/// when none is given.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `qwen3`.
    pub model_type: String,
    /// One line each: `hidden_size = 64 (inferred from embedding.word_embeddings.weight)`.
    pub notes: Vec<String>,
    pub config: GeneratedConfig,
}

/// A `config.json` for transformers, as the map would write it: every
/// field but the dtype, which is the view's ([`GeneratedConfig::render`]).
#[derive(Debug, Clone)]
pub struct GeneratedConfig {
    /// The model's name in prose, for notes.
    pub model: &'static str,
    pub fields: serde_json::Map<String, Value>,
    /// Fields not known from the tensors: the model's defaults.
    pub defaulted: &'static [&'static str],
}

/// Fields a user sets in a generated `config.json` (`--hf-config KEY=VALUE`).
pub type ConfigOverrides = [(String, Value)];

impl GeneratedConfig {
    /// The file's bytes for a view whose tensors are `dtype`: keys sorted,
    /// pretty-printed as transformers writes them, ending in a newline.
    pub fn render(&self, dtype: Dtype) -> Vec<u8> {
        self.render_with(dtype, &[])
    }

    /// [`GeneratedConfig::render`] with the fields `overrides` sets (checked
    /// by [`GeneratedConfig::check_overrides`]).
    pub fn render_with(&self, dtype: Dtype, overrides: &ConfigOverrides) -> Vec<u8> {
        let mut fields = self.fields.clone();
        for (k, v) in overrides {
            fields.insert(k.clone(), v.clone());
        }
        let name = Value::from(torch_dtype_name(dtype));
        fields.insert("dtype".into(), name.clone());
        fields.insert("torch_dtype".into(), name);
        fields.sort_keys();
        let mut out = serde_json::to_vec_pretty(&Value::Object(fields)).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Refuses an override of a field the tensors fix (the config would
    /// then contradict the weights) or of the dtype (the view's, `--dtype`).
    /// Fields the map does not write may be added (`bos_token_id`...).
    pub fn check_overrides(&self, overrides: &ConfigOverrides) -> Result<()> {
        for (k, _) in overrides {
            if k == "dtype" || k == "torch_dtype" {
                bail!("--hf-config {k}: the view's dtype goes there; change it with --dtype");
            }
            if let Some(v) = self.fields.get(k)
                && !self.defaulted.contains(&k.as_str())
            {
                bail!(
                    "--hf-config {k}: is {v}, read off the tensors; a config.json saying otherwise would not describe these weights"
                );
            }
        }
        Ok(())
    }

    /// `key = value` of each field assumed (not known from the tensors and
    /// not set by `overrides`).
    pub fn assumed(&self, overrides: &ConfigOverrides) -> Vec<String> {
        self.defaulted
            .iter()
            .filter(|k| !overrides.iter().any(|(o, _)| o == *k))
            .filter_map(|k| self.fields.get(*k).map(|v| format!("{k} = {v}")))
            .collect()
    }

    /// What a plan says of a generated config, and what stderr says: which
    /// fields were assumed, with their values, and which the user set.
    pub fn note(&self, overrides: &ConfigOverrides) -> String {
        let mut o = format!(
            "config.json generated: the sizes read off the tensors; not known from them, so assumed as in the released {} models: {}",
            self.model,
            self.assumed(overrides).join(", ")
        );
        if !overrides.is_empty() {
            let set: Vec<String> = overrides
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect();
            o.push_str(&format!("; set by --hf-config: {}", set.join(", ")));
        }
        o.push_str("; set any field with --hf-config KEY=VALUE");
        o
    }
}

/// Source tensors of `it` that its model map left out and does not know as
/// derived buffers ([`Map::derived`]).
pub fn unknown_tensors(it: &Iteration) -> Vec<&str> {
    let Some(map) = it.model.as_ref().and_then(|m| lookup(&m.model_type)) else {
        return it.omitted.iter().map(String::as_str).collect();
    };
    it.omitted
        .iter()
        .map(String::as_str)
        .filter(|n| !(map.derived)(n))
        .collect()
}

/// Every view of `it` leaves out what its map left out. Derived buffers go
/// silently (listed by `inspect` and the plan); any other tensor makes the
/// view fail, naming them, unless `drop_unknown` (`--drop-unknown-tensors`)
/// says to leave them out, which the returned warning then says on stderr:
/// a view that drops weights is another model.
pub fn check_left_out(it: &Iteration, drop_unknown: bool) -> Result<Option<String>> {
    let unknown = unknown_tensors(it);
    if unknown.is_empty() {
        return Ok(None);
    }
    let model = it
        .model
        .as_ref()
        .and_then(|m| lookup(&m.model_type))
        .map_or("model", |m| m.display);
    let listed = list_some(&unknown);
    if !drop_unknown {
        bail!(
            "{}: {} tensor(s) the {model} map does not know: {listed}; a view without them would not be this model. Pass --drop-unknown-tensors to leave them out anyway, or --model none to read the tensors as stored",
            it.dir.display(),
            unknown.len()
        );
    }
    Ok(Some(format!(
        "{}: left out, as --drop-unknown-tensors asks: {} tensor(s) the {model} map does not know: {listed}",
        it.dir.display(),
        unknown.len()
    )))
}

/// Up to 8 names, then how many more.
fn list_some(names: &[&str]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// A model folder's `config.json` restating the dtype of a view cast to
/// `dtype`: the values of its top-level `dtype` and `torch_dtype` become
/// transformers' name of `dtype`, and every other byte stays as it was.
/// transformers 5 loads a model in its config's dtype by default, so a
/// config left saying `bfloat16` over float32 weights undoes the cast. A
/// config with neither field gets `dtype` as its first member when `add`
/// (the view was cast: without it the weights are the folder's own).
/// `None` when nothing changes; `raw` must be a JSON object.
pub fn config_with_dtype(raw: &[u8], dtype: Dtype, add: bool) -> Option<Vec<u8>> {
    let name = format!("\"{}\"", torch_dtype_name(dtype));
    let members = top_level_members(raw)?;
    let mut out = Vec::with_capacity(raw.len() + 32);
    let mut at = 0;
    let mut found = false;
    for (key, value) in &members {
        if key == "dtype" || key == "torch_dtype" {
            found = true;
            out.extend_from_slice(&raw[at..value.start]);
            out.extend_from_slice(name.as_bytes());
            at = value.end;
        }
    }
    out.extend_from_slice(&raw[at..]);
    if !found {
        if !add {
            return None;
        }
        // After the brace, indented as the first member is.
        let brace = raw.iter().position(|&b| b == b'{')?;
        let indent: Vec<u8> = match members.first() {
            Some(_) => raw[brace + 1..]
                .iter()
                .copied()
                .take_while(u8::is_ascii_whitespace)
                .collect(),
            None => b"\n  ".to_vec(),
        };
        let mut member = indent.clone();
        member.extend_from_slice(format!("\"dtype\": {name}").as_bytes());
        if !members.is_empty() {
            member.push(b',');
        } else {
            member.push(b'\n');
        }
        out = raw.to_vec();
        out.splice(brace + 1..brace + 1, member);
    }
    (out != raw).then_some(out)
}

/// The top-level members of a JSON object text: each key (decoded) and the
/// byte range of its value. `None` unless `raw` is one valid JSON object.
fn top_level_members(raw: &[u8]) -> Option<Vec<(String, std::ops::Range<usize>)>> {
    let ws = |i: &mut usize| {
        while raw.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    // The end of the string starting at `i` (a quote), past its closing quote.
    let string_end = |mut i: usize| -> Option<usize> {
        i += 1;
        loop {
            match raw.get(i)? {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
    };
    // The end of the value starting at `i`.
    let value_end = |mut i: usize| -> Option<usize> {
        match raw.get(i)? {
            b'"' => string_end(i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match raw.get(i)? {
                        b'"' => {
                            i = string_end(i)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(i + 1);
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            _ => {
                while raw
                    .get(i)
                    .is_some_and(|b| !b.is_ascii_whitespace() && !matches!(b, b',' | b'}' | b']'))
                {
                    i += 1;
                }
                Some(i)
            }
        }
    };
    serde_json::from_slice::<serde_json::Map<String, Value>>(raw).ok()?;
    let mut i = 0;
    ws(&mut i);
    if raw.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        ws(&mut i);
        match raw.get(i)? {
            b'}' => return Some(out),
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = string_end(i)?;
        let key: String = serde_json::from_slice(&raw[i..key_end]).ok()?;
        i = key_end;
        ws(&mut i);
        if raw.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        let end = value_end(i)?;
        out.push((key, i..end));
        i = end;
    }
}

/// transformers' name for a dtype, as config.json writes it.
pub fn torch_dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        Dtype::F64 => "float64",
        _ => "float32",
    }
}

/// A freshly opened source read through a model's map, as `choice` asks
/// (see [`Source::open_with`]): a Hugging Face folder whose `config.json`
/// names a model becomes the MindSpore Transformers checkpoint it converts
/// to; a MindSpore Transformers checkpoint of a known model gets its fused
/// tensors' split rules.
pub fn read_through(mut src: Source, choice: ModelChoice) -> Result<Source> {
    if choice == ModelChoice::None {
        return Ok(src);
    }
    if !matches!(src.kind, SourceKind::Plain) {
        // Fused tensors may only be cut between whole groups, as for a
        // Hugging Face source. Checkpoints of other models (none of the
        // maps recognises them) stay as they are.
        for it in &mut src.iterations {
            let marked = match choice {
                ModelChoice::Map(m) => (m.mark_mf_rules)(it),
                _ => MODELS.iter().any(|m| (m.mark_mf_rules)(it)),
            };
            if let (false, ModelChoice::Map(m)) = (marked, choice) {
                let name = it.name.as_deref().unwrap_or("");
                bail!(
                    "{}{}{name}: --model {}, but the tensors are not a MindSpore Transformers {}'s ({} are needed)",
                    src.path.display(),
                    if name.is_empty() { "" } else { "/" },
                    m.model_type,
                    m.display,
                    m.mf_needs
                );
            }
        }
        return Ok(src);
    }
    let config = match (Config::find(&src.path)?, choice) {
        (None, ModelChoice::Auto) => return Ok(src),
        (None, ModelChoice::Map(m)) => bail!(
            "{}: no {CONFIG}: --model {} reads a Hugging Face folder's config.json",
            src.path.display(),
            m.model_type
        ),
        (None, ModelChoice::None) => return Ok(src),
        (Some(c), _) => c,
    };
    let found = config.model()?;
    if let ModelChoice::Map(m) = choice
        && m != found
    {
        bail!(
            "{}: model_type is {:?}, not {} as --model says",
            config.path.display(),
            config.model_type()?,
            m.model_type
        );
    }
    let it = src.iterations.remove(0);
    src.iterations.push((found.hf_to_mf)(it, &config)?);
    Ok(src)
}

/// A parsed `config.json` and where it came from.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: std::path::PathBuf,
    pub json: Value,
}

impl Config {
    /// Reads `dir/config.json` if there is one.
    pub fn find(dir: &Path) -> Result<Option<Config>> {
        let path = dir.join(CONFIG);
        if store::of(&path)?.exists(&path)? {
            Config::read(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn read(path: &Path) -> Result<Config> {
        Config::parse(path, &read_small(path, MAX_CONFIG_BYTES)?)
    }

    /// A config.json already read (`path` names it in messages).
    pub fn parse(path: &Path, raw: &[u8]) -> Result<Config> {
        let json: Value = serde_json::from_slice(raw)
            .map_err(|e| bad!("{}: not valid JSON: {e}", path.display()))?;
        if !json.is_object() {
            bail!("{}: expected a JSON object", path.display());
        }
        Ok(Config {
            path: path.to_path_buf(),
            json,
        })
    }

    /// `model_type`, which must be present.
    pub fn model_type(&self) -> Result<&str> {
        self.json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                bad!(
                    "{}: no `model_type` string; supported models: {}",
                    self.path.display(),
                    supported()
                )
            })
    }

    /// The model this config describes, refusing the ones without a map.
    pub fn model(&self) -> Result<&'static Map> {
        let t = self.model_type()?;
        lookup(t).ok_or_else(|| {
            bad!(
                "{}: model_type {t:?} is not supported (supported: {}); pass --model none to read the safetensors files as they are",
                self.path.display(),
                supported()
            )
        })
    }

    /// A non-negative integer field.
    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                bad!(
                    "{}: `{key}` is {v}, expected a non-negative integer",
                    self.path.display()
                )
            }),
        }
    }

    /// A positive integer field that must be present.
    pub fn need(&self, key: &str) -> Result<u64> {
        match self.uint(key)? {
            Some(0) => bail!("{}: `{key}` is 0", self.path.display()),
            Some(v) => Ok(v),
            None => bail!("{}: missing `{key}`", self.path.display()),
        }
    }

    pub fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => bail!(
                "{}: `{key}` is {v}, expected true or false",
                self.path.display()
            ),
        }
    }
}

/// The source as Hugging Face folders (`--hf`): a MindSpore Transformers
/// checkpoint's iterations through the model's map back to HF names, whole
/// tensors, no optimizer states. A Hugging Face folder read through a map is
/// mapped back (so `--hf` reshapes it); a plain folder stays as it is.
/// `config` (from `--hf-files`) gives the sizes when there is one.
pub fn as_hf(mut src: Source, model: ModelChoice, config: Option<&Config>) -> Result<Source> {
    let plain = matches!(src.kind, SourceKind::Plain);
    if plain && src.iterations.iter().all(|it| it.model.is_none()) {
        return Ok(src);
    }
    // A plain folder read through a map goes back through the same one.
    let read_through = || {
        src.iterations
            .iter()
            .find_map(|it| it.model.as_ref().and_then(|m| lookup(&m.model_type)))
    };
    let map = match (model, config) {
        (ModelChoice::Map(m), _) => m,
        (ModelChoice::Auto, Some(c)) => c.model()?,
        (ModelChoice::Auto, None) => match read_through().filter(|_| plain) {
            Some(m) => m,
            // A MindSpore Transformers checkpoint says nothing of its model
            // but its tensor names: the one map that recognises them.
            None => recognise(&mut src)?,
        },
        (ModelChoice::None, _) => bail!(
            "{}: --hf with --model none: a MindSpore Transformers checkpoint needs a model map to become a Hugging Face folder (supported: {})",
            src.path.display(),
            supported()
        ),
    };
    let iterations = std::mem::take(&mut src.iterations);
    for it in iterations {
        let name = it.name.clone();
        let mapped = (map.mf_to_hf)(it, config).map_err(|e| match (e, name) {
            (crate::Error::Input(m), Some(n)) => bad!("{n}: {m}"),
            (e, _) => e,
        })?;
        src.iterations.push(mapped);
    }
    Ok(src)
}

/// The one map whose tensors every iteration of a MindSpore Transformers
/// checkpoint has ([`Map::mark_mf_rules`]); refused when none or several.
fn recognise(src: &mut Source) -> Result<&'static Map> {
    let fits: Vec<&'static Map> = MODELS
        .iter()
        .copied()
        .filter(|m| src.iterations.iter_mut().all(|it| (m.mark_mf_rules)(it)))
        .collect();
    match fits[..] {
        [m] => Ok(m),
        [] => bail!(
            "{}: --hf needs to know the model, and the tensors are no supported model's: pass --model MODEL ({}), or --hf-files DIR whose config.json names it",
            src.path.display(),
            supported()
        ),
        _ => bail!(
            "{}: the tensors fit several models ({}): pass --model to say which",
            src.path.display(),
            fits.iter()
                .map(|m| m.model_type)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Small files by name, with their bytes.
pub type SmallFiles = Vec<(String, Vec<u8>)>;

/// What `--hf` shows: the source as Hugging Face tensors, the files beside
/// the weights and the folder they were read from.
#[derive(Debug)]
pub struct HfView {
    pub source: Source,
    pub files: SmallFiles,
    pub dir: Option<std::path::PathBuf>,
}

/// What `--hf` shows for `src`: the source through the model's map back to
/// Hugging Face names, and the files beside the weights, read once each:
/// those of `hf_files`, else of a Hugging Face source's own folder; their
/// config.json (if any) names the model and gives its sizes.
pub fn hf_view(src: Source, model: ModelChoice, hf_files: Option<&Path>) -> Result<HfView> {
    let dir = match hf_files {
        // A Hub cache folder or ref, as for a source: the snapshot it names.
        Some(d) => Some(super::hub::resolve(d)?.unwrap_or_else(|| d.to_path_buf())),
        None if matches!(src.kind, SourceKind::Plain) => Some(src.path.clone()),
        None => None,
    };
    let files = match &dir {
        Some(d) => read_hf_files(d)?,
        None => Vec::new(),
    };
    let config = match (&dir, files.iter().find(|(n, _)| n == CONFIG)) {
        (Some(d), Some((_, raw))) => Some(Config::parse(&d.join(CONFIG), raw)?),
        _ => None,
    };
    if let (Some(d), None, ModelChoice::Auto) = (hf_files, &config, model) {
        bail!(
            "--hf-files {}: no config.json there to say which model this is; pass --model MODEL ({})",
            d.display(),
            supported()
        );
    }
    Ok(HfView {
        source: as_hf(src, model, config.as_ref())?,
        files,
        dir,
    })
}

/// A Hugging Face folder's weights: what a view shows anew, not as is.
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name == "model.safetensors.index.json"
}

/// Every file of `dir` a Hugging Face view shows beside its weights, by
/// name, byte for byte: all regular files (symlinks followed, as in a Hub
/// cache snapshot; one leading nowhere fails, naming it) except
/// `*.safetensors`, `model.safetensors.index.json` and dotfiles.
pub fn read_hf_files(dir: &Path) -> Result<SmallFiles> {
    let mut out = Vec::new();
    for e in store::of(dir)?.list(dir)? {
        if e.kind == store::EntryKind::File && !is_weight_file(&e.name) && !e.name.starts_with('.')
        {
            let data = read_small(&dir.join(&e.name), MAX_HF_FILE_BYTES)?;
            out.push((e.name, data));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::tests::{f32s, fixture, input_err, write_st};
    use std::fs;

    fn config(dir: &Path, text: &str) -> Config {
        fs::write(dir.join(CONFIG), text).unwrap();
        Config::read(&dir.join(CONFIG)).unwrap()
    }

    #[test]
    fn model_choices_parse_in_any_case() {
        assert_eq!(ModelChoice::parse("auto"), Ok(ModelChoice::Auto));
        let qwen3 = ModelChoice::Map(&qwen3::MAP);
        assert_eq!(ModelChoice::parse("qwen3"), Ok(qwen3));
        assert_eq!(ModelChoice::parse("Qwen3"), Ok(qwen3));
        // Maps compare and print by model type: a wrong map in a failed
        // assertion reads as its name.
        assert_ne!(qwen3, ModelChoice::Map(&qwen3_moe::MAP));
        assert_eq!(format!("{:?}", &qwen3::MAP), "Map(qwen3)");
        assert_eq!(ModelChoice::parse("NONE"), Ok(ModelChoice::None));
        assert_eq!(ModelChoice::default(), ModelChoice::Auto);
        for s in ["llama", "", "qwen"] {
            let e = ModelChoice::parse(s).unwrap_err();
            assert!(e.contains(&format!("{s:?}")), "{e}");
            assert!(e.contains("qwen3") && e.contains("none"), "{e}");
        }
    }

    #[test]
    fn model_type_decides_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(CONFIG).display().to_string();
        let c = config(tmp.path(), r#"{"model_type": "qwen3", "hidden_size": 64}"#);
        assert_eq!(c.model_type().unwrap(), "qwen3");
        assert_eq!(c.model().unwrap(), &qwen3::MAP);
        let c = config(tmp.path(), r#"{"model_type": "llama"}"#);
        input_err(c.model(), &[&path, "model_type", "\"llama\"", "qwen3"]);
        let c = config(tmp.path(), r#"{"hidden_size": 64}"#);
        input_err(c.model(), &[&path, "model_type", "qwen3"]);
        let c = config(tmp.path(), r#"{"model_type": 3}"#);
        input_err(c.model(), &[&path, "model_type"]);
    }

    #[test]
    fn the_fixture_config_is_qwen3() {
        let c = Config::find(&fixture("qwen3-tiny-hf")).unwrap().unwrap();
        assert_eq!(c.model().unwrap(), &qwen3::MAP);
        // tests/fixtures/README.md: hidden 64, 2 layers, untied embeddings.
        assert_eq!(c.need("hidden_size").unwrap(), 64);
        assert_eq!(c.uint("num_hidden_layers").unwrap(), Some(2));
        assert_eq!(c.flag("tie_word_embeddings").unwrap(), Some(false));
        assert_eq!(c.uint("bos_token_id").unwrap(), None);
    }

    #[test]
    fn config_fields_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(CONFIG).display().to_string();
        assert!(Config::find(tmp.path()).unwrap().is_none());
        let c = config(tmp.path(), r#"{"a": -1, "z": 0, "f": "yes"}"#);
        input_err(c.uint("a"), &[&path, "`a`"]);
        input_err(c.need("z"), &[&path, "`z`"]);
        input_err(c.need("missing"), &[&path, "`missing`"]);
        input_err(c.flag("f"), &[&path, "`f`"]);
        fs::write(tmp.path().join(CONFIG), "[1, 2]").unwrap();
        input_err(Config::find(tmp.path()), &[&path, "object"]);
        fs::write(tmp.path().join(CONFIG), "{").unwrap();
        input_err(Config::find(tmp.path()), &[&path, "JSON"]);
    }

    #[test]
    fn hf_files_skip_weights_and_dotfiles_and_follow_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let blobs = tmp.path().join("blobs");
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&blobs).unwrap();
        fs::write(dir.join(CONFIG), b"{}").unwrap();
        fs::write(dir.join("generation_config.json"), b"gen").unwrap();
        // A Hub cache snapshot: files are links into blobs/.
        fs::write(blobs.join("abc"), b"tok").unwrap();
        std::os::unix::fs::symlink(blobs.join("abc"), dir.join("tokenizer.json")).unwrap();
        std::os::unix::fs::symlink(&blobs, dir.join("linked_dir")).unwrap();
        fs::create_dir(dir.join("subdir")).unwrap();
        fs::write(dir.join(".gitattributes"), b"x").unwrap();
        fs::write(dir.join("model.safetensors.index.json"), b"{}").unwrap();
        write_st(
            &dir,
            "model-00001-of-00002.safetensors",
            &[("a", "F32", &[1], &f32s(&[1.0]))],
        );
        fs::write(dir.join("model.safetensors"), b"x").unwrap();
        let files = read_hf_files(&dir).unwrap();
        let want: Vec<(String, Vec<u8>)> = vec![
            ("config.json".into(), b"{}".to_vec()),
            ("generation_config.json".into(), b"gen".to_vec()),
            ("tokenizer.json".into(), b"tok".to_vec()),
        ];
        assert_eq!(files, want);
    }

    #[test]
    fn hf_files_of_the_fixture() {
        let files = read_hf_files(&fixture("qwen3-tiny-hf")).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["config.json", "generation_config.json"]);
        let want = fs::read(fixture("qwen3-tiny-hf/config.json")).unwrap();
        assert_eq!(files[0].1, want);
    }

    #[test]
    fn only_regular_files_are_shown_beside_the_weights() {
        // A FIFO (opening it to read would block) and a folder are left
        // out; a link to a regular file is read through.
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::write(d.join("tokenizer.json"), b"{}").unwrap();
        fs::write(d.join("real"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("vocab.txt")).unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        let fifo = std::ffi::CString::new(d.join("pipe").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let files = read_hf_files(d).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["real", "tokenizer.json", "vocab.txt"]);
        assert_eq!(files[2].1, b"x");
    }

    #[test]
    fn a_dangling_link_is_an_input_error() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("tokenizer.json");
        std::os::unix::fs::symlink(tmp.path().join("gone"), &link).unwrap();
        input_err(read_hf_files(tmp.path()), &[&link.display().to_string()]);
    }

    #[test]
    fn tensors_a_map_does_not_know_refuse_a_view_unless_dropped() {
        let mut src = Source::open(&fixture("qwen3-tiny-hf")).unwrap();
        let it = &mut src.iterations[0];
        assert_eq!(check_left_out(it, false).unwrap(), None);
        // A derived buffer goes without a word.
        it.omitted.push("model.rotary_emb.inv_freq".into());
        assert!(unknown_tensors(it).is_empty());
        assert_eq!(check_left_out(it, false).unwrap(), None);
        it.omitted
            .push("model.layers.0.self_attn.o_proj.bias".into());
        assert_eq!(
            unknown_tensors(it),
            vec!["model.layers.0.self_attn.o_proj.bias"]
        );
        let dir = it.dir.display().to_string();
        input_err(
            check_left_out(it, false),
            &[
                &dir,
                "1 tensor(s)",
                "Qwen3 map",
                "o_proj.bias",
                "--drop-unknown-tensors",
            ],
        );
        let w = check_left_out(it, true).unwrap().unwrap();
        assert!(w.contains("o_proj.bias") && !w.contains("inv_freq"), "{w}");
        // Long lists are cut.
        for i in 0..20 {
            it.omitted.push(format!("extra.{i}"));
        }
        let e = input_err(check_left_out(it, false), &["21 tensor(s)", "and 13 more"]);
        assert!(!e.contains("extra.19"), "{e}");
    }

    /// A fixture's Hugging Face folder with `edit` applied to its config.
    fn hf_folder_with(fx: &str, edit: impl Fn(&mut Value)) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        for e in fs::read_dir(fixture(fx)).unwrap() {
            let p = e.unwrap().path();
            let to = tmp.path().join(p.file_name().unwrap());
            fs::write(&to, fs::read(&p).unwrap()).unwrap();
        }
        let path = tmp.path().join(CONFIG);
        let mut cfg: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        edit(&mut cfg);
        fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        tmp
    }

    #[test]
    fn a_tied_model_leaves_a_stored_head_out_as_the_converter_does() {
        for fx in ["qwen3-tiny-hf", "qwen3-moe-tiny-hf"] {
            let names = |tied: bool| {
                let dir = hf_folder_with(fx, |c| c["tie_word_embeddings"] = Value::Bool(tied));
                let src = Source::open(dir.path()).unwrap();
                let it = &src.iterations[0];
                // Not an unknown tensor: the view goes ahead without a flag.
                assert_eq!(check_left_out(it, false).unwrap(), None, "{fx}");
                let notes = it.model.as_ref().unwrap().notes.join("\n");
                let said = notes.contains("lm_head.weight is stored but left out");
                assert_eq!(said, tied, "{fx}: {notes}");
                let names: Vec<String> = it.tensors.iter().map(|t| t.name.clone()).collect();
                assert!(
                    names
                        .iter()
                        .any(|n| n == "embedding.word_embeddings.weight")
                );
                names
            };
            assert!(
                !names(true).iter().any(|n| n == "output_layer.weight"),
                "{fx}"
            );
            assert!(
                names(false).iter().any(|n| n == "output_layer.weight"),
                "{fx}"
            );
        }
    }

    #[test]
    fn an_unknown_tensor_of_a_moe_folder_refuses_a_view_unless_dropped() {
        let dir = hf_folder_with("qwen3-moe-tiny-hf", |_| {});
        write_st(
            dir.path(),
            "model-00003-of-00003.safetensors",
            &[
                (
                    "model.layers.0.mlp.shared_expert_gate.weight",
                    "F32",
                    &[1],
                    &f32s(&[1.0]),
                ),
                ("model.rotary_emb.inv_freq", "F32", &[1], &f32s(&[1.0])),
            ],
        );
        // The index does not list the new file: read without it.
        fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
        let src = Source::open(dir.path()).unwrap();
        let it = &src.iterations[0];
        assert_eq!(
            unknown_tensors(it),
            vec!["model.layers.0.mlp.shared_expert_gate.weight"]
        );
        input_err(
            check_left_out(it, false),
            &[
                "Qwen3-MoE map",
                "shared_expert_gate.weight",
                "--drop-unknown-tensors",
            ],
        );
        let w = check_left_out(it, true).unwrap().unwrap();
        assert!(
            w.contains("shared_expert_gate") && !w.contains("inv_freq"),
            "{w}"
        );
    }

    #[test]
    fn a_config_restates_the_views_dtype_and_nothing_else() {
        let f32 = |raw: &str, add: bool| {
            config_with_dtype(raw.as_bytes(), Dtype::F32, add)
                .map(|b| String::from_utf8(b).unwrap())
        };
        // As transformers 5 writes it: only the value changes.
        let pretty = "{\n  \"architectures\": [\"Qwen3ForCausalLM\"],\n  \"dtype\": \"bfloat16\",\n  \"hidden_size\": 64\n}\n";
        assert_eq!(
            f32(pretty, true).unwrap(),
            pretty.replace("\"bfloat16\"", "\"float32\"")
        );
        // transformers 4's torch_dtype, both, compact, duplicates, escapes.
        assert_eq!(
            f32(r#"{"torch_dtype":"bfloat16","x":1}"#, false).unwrap(),
            r#"{"torch_dtype":"float32","x":1}"#
        );
        assert_eq!(
            f32(r#"{ "dtype" : "float16" , "torch_dtype": null }"#, false).unwrap(),
            r#"{ "dtype" : "float32" , "torch_dtype": "float32" }"#
        );
        // Only top-level members: nested ones and look-alike strings stay.
        let nested = r#"{"text_config": {"dtype": "bfloat16"}, "note": "\"dtype\": x", "a": [{"dtype": 1}], "dtype": "bfloat16"}"#;
        assert_eq!(
            f32(nested, false).unwrap(),
            r#"{"text_config": {"dtype": "bfloat16"}, "note": "\"dtype\": x", "a": [{"dtype": 1}], "dtype": "float32"}"#
        );
        // Already right: nothing to change.
        assert_eq!(f32(r#"{"dtype": "float32"}"#, true), None);
        // Neither field: added only for a cast view, indented as the rest.
        assert_eq!(f32("{\n  \"x\": 1\n}", false), None);
        assert_eq!(
            f32("{\n  \"x\": 1\n}", true).unwrap(),
            "{\n  \"dtype\": \"float32\",\n  \"x\": 1\n}"
        );
        assert_eq!(f32("{}", true).unwrap(), "{\n  \"dtype\": \"float32\"\n}");
        // Whatever it was given, what comes out parses and says float32.
        for raw in [
            pretty,
            nested,
            "{}",
            r#"{"a":{"b":[1,2,"}"]},"torch_dtype":"x"}"#,
        ] {
            let v: Value = serde_json::from_str(&f32(raw, true).unwrap_or(raw.into())).unwrap();
            assert!(
                v.get("dtype").or(v.get("torch_dtype")) == Some(&Value::from("float32")),
                "{raw}"
            );
        }
        // Not a JSON object: left alone.
        assert_eq!(f32("[1]", true), None);
        assert_eq!(f32("{", true), None);
    }

    /// The generated config.json: the map's fields and the view's dtype,
    /// under transformers 5's name (`dtype`) and 4's (`torch_dtype`), keys
    /// sorted, pretty-printed as transformers writes it, ending in a newline.
    #[test]
    fn a_generated_config_json_is_its_fields_and_the_views_dtype() {
        let c = GeneratedConfig {
            model: "Qwen3",
            fields: serde_json::from_str(
                r#"{"vocab_size": 256, "architectures": ["Qwen3ForCausalLM"]}"#,
            )
            .unwrap(),
            defaulted: &[],
        };
        for (dtype, name) in [
            (Dtype::BF16, "bfloat16"),
            (Dtype::F16, "float16"),
            (Dtype::F32, "float32"),
            (Dtype::F64, "float64"),
        ] {
            let want = format!(
                "{{\n  \"architectures\": [\n    \"Qwen3ForCausalLM\"\n  ],\n  \"dtype\": \"{name}\",\n  \"torch_dtype\": \"{name}\",\n  \"vocab_size\": 256\n}}\n"
            );
            assert_eq!(String::from_utf8(c.render(dtype)).unwrap(), want);
        }
    }

    #[test]
    fn a_list_of_unknown_tensors_shows_eight_then_counts_the_rest() {
        let names: Vec<String> = (0..9).map(|i| format!("t{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let eight = "t0, t1, t2, t3, t4, t5, t6, t7";
        assert_eq!(list_some(&names[..1]), "t0");
        assert_eq!(list_some(&names[..8]), eight);
        assert_eq!(list_some(&names), format!("{eight} and 1 more"));
    }

    /// The member scanner steps over strings wherever they are, so a
    /// bracket, a brace or an escaped quote inside one, at any depth, ends
    /// nothing.
    #[test]
    fn top_level_members_step_over_strings_inside_nested_values() {
        let raw =
            r#"{"a": {"b": "}"}, "c": ["\"]", "{", {"d": "\\"}], "e": "x}", "dtype": "bfloat16"}"#;
        let members = top_level_members(raw.as_bytes()).unwrap();
        let got: Vec<(&str, &str)> = members
            .iter()
            .map(|(k, r)| (k.as_str(), &raw[r.clone()]))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", r#"{"b": "}"}"#),
                ("c", r#"["\"]", "{", {"d": "\\"}]"#),
                ("e", r#""x}""#),
                ("dtype", r#""bfloat16""#),
            ]
        );
        let restated = config_with_dtype(raw.as_bytes(), Dtype::F32, false).unwrap();
        assert_eq!(
            String::from_utf8(restated).unwrap(),
            raw.replace(r#""bfloat16""#, r#""float32""#)
        );
    }

    /// `--model` names the model a source must be: a Hugging Face folder
    /// whose config.json says another is refused, and so is a MindSpore
    /// Transformers checkpoint whose tensors are another's, even when
    /// another map would take them.
    #[test]
    fn a_model_named_on_the_command_line_must_be_the_sources() {
        let qwen3 = ModelChoice::Map(&qwen3::MAP);
        let moe = ModelChoice::Map(&qwen3_moe::MAP);
        let hf = fixture("qwen3-tiny-hf");
        let src = Source::open_with(&hf, qwen3).unwrap();
        let it = &src.iterations[0];
        assert_eq!(it.model.as_ref().unwrap().model_type, "qwen3");
        assert!(
            it.tensors
                .iter()
                .any(|t| t.name == "embedding.word_embeddings.weight")
        );
        input_err(
            Source::open_with(&hf, moe),
            &["model_type is \"qwen3\"", "not qwen3_moe as --model says"],
        );
        let mf = fixture("qwen3-tiny-mf-tp2-pp2-f32");
        Source::open_with(&mf, qwen3).unwrap();
        input_err(
            Source::open_with(&mf, moe),
            &[
                "--model qwen3_moe",
                "not a MindSpore Transformers Qwen3-MoE's",
                "mlp.router",
            ],
        );
    }

    /// Which files `--hf` shows beside the weights: a Hugging Face folder's
    /// own (its config.json naming the model), none for a MindSpore
    /// Transformers checkpoint, those of `--hf-files` when given (whose
    /// config.json then names the model).
    #[test]
    fn hf_view_shows_the_files_of_the_folder_the_model_came_from() {
        let hf = fixture("qwen3-tiny-hf");
        let names =
            |v: &HfView| -> Vec<String> { v.files.iter().map(|(n, _)| n.clone()).collect() };
        let both = vec!["config.json".to_string(), "generation_config.json".into()];
        let src = Source::open(&hf).unwrap();
        let path = src.path.clone();
        let v = hf_view(src, ModelChoice::Auto, None).unwrap();
        assert_eq!(names(&v), both);
        assert_eq!(v.files[0].1, fs::read(hf.join(CONFIG)).unwrap());
        assert_eq!(v.dir, Some(path));
        assert!(
            v.source.iterations[0]
                .tensors
                .iter()
                .any(|t| t.name == "model.embed_tokens.weight")
        );
        let mf = fixture("qwen3-tiny-mf-tp2-pp2-f32");
        let v = hf_view(Source::open(&mf).unwrap(), ModelChoice::Auto, None).unwrap();
        assert!(v.files.is_empty(), "{:?}", names(&v));
        assert_eq!(v.dir, None);
        let v = hf_view(Source::open(&mf).unwrap(), ModelChoice::Auto, Some(&hf)).unwrap();
        assert_eq!(names(&v), both);
        assert_eq!(v.dir.as_deref(), Some(hf.as_path()));
        let it = &v.source.iterations[0];
        assert_eq!(it.model.as_ref().unwrap().model_type, "qwen3");
    }

    #[test]
    fn as_hf_leaves_a_plain_folder_alone() {
        let tmp = tempfile::tempdir().unwrap();
        write_st(
            tmp.path(),
            "model.safetensors",
            &[("w", "F32", &[1], &f32s(&[1.0]))],
        );
        let src = Source::open(tmp.path()).unwrap();
        let src = as_hf(src, ModelChoice::None, None).unwrap();
        assert_eq!(src.iterations[0].tensors[0].name, "w");
    }

    #[test]
    fn as_hf_needs_a_model_for_a_mindformers_checkpoint() {
        let gpt = fixture("gpt-dp2-tp2-pp2-bf16");
        let path = fs::canonicalize(&gpt).unwrap().display().to_string();
        let src = Source::open_with(&gpt, ModelChoice::None).unwrap();
        input_err(
            as_hf(src, ModelChoice::None, None),
            &[&path, "--model none", "qwen3"],
        );
        let src = Source::open_with(&gpt, ModelChoice::None).unwrap();
        input_err(
            as_hf(src, ModelChoice::Auto, None),
            &[
                &path,
                "--model MODEL",
                "qwen3, qwen3_moe",
                "no supported model",
            ],
        );
    }

    #[test]
    fn as_hf_recognises_a_mindformers_qwen3_by_its_tensors() {
        let src = Source::open(&fixture("qwen3-tiny-mf-tp2-pp2-f32")).unwrap();
        let src = as_hf(src, ModelChoice::Auto, None).unwrap();
        let it = &src.iterations[0];
        assert_eq!(it.model.as_ref().unwrap().model_type, "qwen3");
        assert!(
            it.tensors
                .iter()
                .any(|t| t.name == "model.embed_tokens.weight")
        );
    }
}
