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
use crate::error::{Result, source_io};
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

impl GeneratedConfig {
    /// The file's bytes for a view whose tensors are `dtype`: keys sorted,
    /// pretty-printed as transformers writes them, ending in a newline.
    pub fn render(&self, dtype: Dtype) -> Vec<u8> {
        let mut fields = self.fields.clone();
        let name = Value::from(torch_dtype_name(dtype));
        fields.insert("dtype".into(), name.clone());
        fields.insert("torch_dtype".into(), name);
        fields.sort_keys();
        let mut out = serde_json::to_vec_pretty(&Value::Object(fields)).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The note a plan shows for a generated config.
    pub fn note(&self) -> String {
        format!(
            "config.json generated: sizes as above; {} defaults for {}",
            self.model,
            self.defaulted.join(", ")
        )
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
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Config::read(&path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(source_io(&path, e)),
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
            None => bail!(
                "{}: --hf needs to know the model: pass --model MODEL ({}), or --hf-files DIR whose config.json names it",
                src.path.display(),
                supported()
            ),
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

/// Small files by name, with their bytes.
pub type SmallFiles = Vec<(String, Vec<u8>)>;

/// What `--hf` shows for `src`: the source through the model's map back to
/// Hugging Face names, and the files beside the weights, read once each:
/// those of `hf_files`, else of a Hugging Face source's own folder; their
/// config.json (if any) names the model and gives its sizes.
pub fn hf_view(
    src: Source,
    model: ModelChoice,
    hf_files: Option<&Path>,
) -> Result<(Source, SmallFiles)> {
    let dir = match hf_files {
        Some(d) => Some(d.to_path_buf()),
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
    Ok((as_hf(src, model, config.as_ref())?, files))
}

/// A Hugging Face folder's weights: what a view shows anew, not as is.
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors") || name == "model.safetensors.index.json"
}

/// Every file of `dir` a Hugging Face view shows beside its weights, by
/// name, byte for byte: all regular files (symlinks followed, as in a Hub
/// cache snapshot) except `*.safetensors` and `model.safetensors.index.json`.
pub fn read_hf_files(dir: &Path) -> Result<SmallFiles> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| source_io(dir, e))? {
        let e = e.map_err(|e| source_io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if is_weight_file(&name) || name.starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(|e| source_io(&path, e))?;
        if !meta.is_file() {
            continue;
        }
        out.push((name, read_small(&path, MAX_HF_FILE_BYTES)?));
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
    fn a_dangling_link_is_an_input_error() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("tokenizer.json");
        std::os::unix::fs::symlink(tmp.path().join("gone"), &link).unwrap();
        input_err(read_hf_files(tmp.path()), &[&link.display().to_string()]);
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
            &[&path, "--model MODEL", "qwen3, qwen3_moe"],
        );
    }
}
