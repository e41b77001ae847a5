//! File and folder names of a Checkpoint 2.0 save.

/// The tracker file in a checkpoint root.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";
pub const METADATA: &str = "metadata.json";
pub const COMMON: &str = "common.json";

/// Which kind of rank file a name is: network weights or optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Model,
    Opt,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Opt => "opt",
        }
    }
}

/// A parsed `{prefix}-{kind}-{idx:07d}-{total:07d}.safetensors` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankFileName {
    pub prefix: Option<String>,
    pub kind: Kind,
    pub idx: u64,
    pub total: u64,
}

/// Parses a rank file name; `None` if it does not follow the pattern.
pub fn parse_rank_file_name(name: &str) -> Option<RankFileName> {
    let stem = name.strip_suffix(".safetensors")?;
    let mut parts = stem.rsplitn(4, '-');
    let total = parts.next()?;
    let idx = parts.next()?;
    let kind = parts.next()?;
    let prefix = parts.next();
    let digits = |s: &str| s.len() == 7 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(total) || !digits(idx) {
        return None;
    }
    let kind = match kind {
        "model" => Kind::Model,
        "opt" => Kind::Opt,
        _ => return None,
    };
    Some(RankFileName {
        prefix: prefix.map(str::to_string),
        kind,
        idx: idx.parse().ok()?,
        total: total.parse().ok()?,
    })
}

/// The parameter an optimizer state belongs to: `adam_m.X` and `adam_v.X`
/// (MindSpore's Adam moments) name X; any other name is itself.
pub fn parameter_name(name: &str) -> &str {
    name.strip_prefix("adam_m.")
        .or_else(|| name.strip_prefix("adam_v."))
        .unwrap_or(name)
}

/// The layer index in a parameter name: `i` in `...layers.<i>....`.
pub fn layer_index(name: &str) -> Option<u64> {
    let mut rest = name;
    loop {
        let at = rest.find("layers.")?;
        let at_boundary = at == 0 || rest.as_bytes()[at - 1] == b'.';
        let after = &rest[at + "layers.".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if at_boundary && digits > 0 && after.as_bytes().get(digits) == Some(&b'.') {
            return after[..digits].parse().ok();
        }
        rest = &rest[at + 1..];
    }
}

/// `{prefix}-{kind}-{idx:07d}-{total:07d}.safetensors`, or without the prefix.
pub fn rank_file_name(prefix: Option<&str>, kind: Kind, idx: u64, total: u64) -> String {
    match prefix {
        Some(p) => format!("{p}-{}-{idx:07}-{total:07}.safetensors", kind.as_str()),
        None => format!("{}-{idx:07}-{total:07}.safetensors", kind.as_str()),
    }
}

/// `iteration_{N:08d}`.
pub fn iteration_dir(n: u64) -> String {
    format!("iteration_{n:08}")
}

/// The number of an `iteration_N` folder name.
pub fn parse_iteration_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("iteration_")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_file_names() {
        let n = parse_rank_file_name("gpt-model-0000004-0000008.safetensors").unwrap();
        assert_eq!(n.prefix.as_deref(), Some("gpt"));
        assert_eq!((n.kind, n.idx, n.total), (Kind::Model, 4, 8));
        let n = parse_rank_file_name("opt-0000000-0000004.safetensors").unwrap();
        assert_eq!((n.prefix, n.kind), (None, Kind::Opt));
        let n = parse_rank_file_name("my-llama-opt-0000001-0000002.safetensors").unwrap();
        assert_eq!(n.prefix.as_deref(), Some("my-llama"));
        assert!(parse_rank_file_name("model.safetensors").is_none());
        assert!(parse_rank_file_name("x-model-01-02.safetensors").is_none());
        assert_eq!(
            rank_file_name(Some("gpt"), Kind::Opt, 3, 16),
            "gpt-opt-0000003-0000016.safetensors"
        );
        assert_eq!(
            rank_file_name(None, Kind::Model, 0, 1),
            "model-0000000-0000001.safetensors"
        );
    }

    /// Both numbers of a rank file name are seven digits: one of them
    /// short, long or signed (which `u64` parses) is not a rank file.
    #[test]
    fn a_rank_file_name_needs_seven_digits_in_both_numbers() {
        for name in [
            "gpt-model-0000004-08.safetensors",
            "gpt-model-04-0000008.safetensors",
            "gpt-model-0000004-00000008.safetensors",
            "gpt-model-+000004-0000008.safetensors",
            "gpt-model-0000004-+000008.safetensors",
        ] {
            assert_eq!(parse_rank_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("decoder.layers.12.mlp.w"), Some(12));
        assert_eq!(layer_index("adam_m.decoder.layers.3.w"), Some(3));
        assert_eq!(layer_index("layers.0.w"), Some(0));
        assert_eq!(layer_index("model.sublayers.4.w"), None);
        assert_eq!(layer_index("decoder.layers.x.w"), None);
        assert_eq!(layer_index("decoder.layers.7"), None);
        // `layers.` with no digits after it is not the index: read on.
        assert_eq!(layer_index("a.layers..b.layers.3.w"), Some(3));
        assert_eq!(layer_index("embedding.word_embeddings.weight"), None);
    }

    #[test]
    fn iteration_dirs() {
        assert_eq!(iteration_dir(1000), "iteration_00001000");
        assert_eq!(parse_iteration_dir("iteration_00001000"), Some(1000));
        assert_eq!(parse_iteration_dir("iteration_"), None);
        assert_eq!(parse_iteration_dir("iteration_1x"), None);
        // Digits only: a sign `u64` would parse is no iteration folder.
        assert_eq!(parse_iteration_dir("iteration_+5"), None);
    }
}
