//! `metadata.json`: the strategy and storage record of a Checkpoint 2.0 iteration.
//!
//! The same types read a source's file and write a view's, so a view's
//! metadata is, field for field, what MindSpore Transformers itself writes.
//! Reading goes through `serde_path_to_error` so that a bad field is reported
//! by its path (`global_shape[1]`), not by a line and column in a huge file.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One entry of `state_dict_metadata`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorMeta {
    pub properties: Properties,
    pub global_shape: Vec<u64>,
    pub axis_fragmentations: Vec<u64>,
    pub layout: Option<LayoutJson>,
    pub chunk: Vec<ChunkJson>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Properties {
    /// MindSpore's dtype name; its case varies by run mode (`BFloat16`, `bfloat16`).
    pub dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<Value>,
    #[serde(default = "no")]
    pub allow_shape_mismatch: bool,
    #[serde(default = "yes")]
    pub allow_to_save: bool,
}

fn no() -> bool {
    false
}
fn yes() -> bool {
    true
}

/// `layout` as MindSpore writes it (tensor-map values count axes from the *last*).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayoutJson {
    pub device_matrix: Vec<u64>,
    pub tensor_map: Vec<MapEntry>,
    #[serde(default = "no")]
    pub interleaved_parallel: bool,
    pub alias_name: Vec<String>,
    pub rank_list: Vec<u64>,
}

/// A tensor-map value: `-1`, one axis `v`, or several axes `[v0, v1]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MapEntry {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkJson {
    /// `[k]`: the slice's row-major index in the `axis_fragmentations` grid.
    pub global_offset: Vec<u64>,
    pub local_shape: Vec<u64>,
}

/// One entry of a `storage_data` list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageEntry {
    pub file_name: String,
    pub storage_rank: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_group: Option<Vec<u64>>,
}

/// Deserializes `value` as `T`, naming the failing field by its path.
pub fn from_value<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("field `{path}`: {inner}")
        }
    })
}

/// Parses a shard-id key, the Python repr of `(name, (k,))`.
///
/// Both quote styles occur: Python writes `"('w', (3,))"`, or double quotes
/// when the name holds a `'`.
pub fn parse_shard_id(key: &str) -> Result<(String, u64), String> {
    let err = |why: &str| format!("shard id {key:?}: {why}; expected the form \"('name', (k,))\"");
    let rest = key.trim();
    let rest = rest
        .strip_prefix('(')
        .ok_or_else(|| err("no opening '('"))?;
    let (name, rest) = parse_py_str(rest.trim_start()).map_err(|e| err(&e))?;
    let rest = rest.trim_start();
    let rest = rest
        .strip_prefix(',')
        .ok_or_else(|| err("no ',' after the name"))?;
    let rest = rest.trim_start();
    let rest = rest
        .strip_prefix('(')
        .ok_or_else(|| err("no '(' before the index"))?;
    let close = rest.find(')').ok_or_else(|| err("unclosed index tuple"))?;
    let inner = &rest[..close];
    let after = rest[close + 1..].trim();
    let parts: Vec<&str> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if parts.len() != 1 {
        return Err(err("the index tuple must hold exactly one integer"));
    }
    let k: u64 = parts[0].parse().map_err(|_| {
        err(&format!(
            "index {:?} is not a non-negative integer",
            parts[0]
        ))
    })?;
    let after = after.strip_prefix(',').unwrap_or(after).trim();
    if after != ")" {
        return Err(err("trailing text after the index tuple"));
    }
    Ok((name, k))
}

/// Reads one Python string literal at the start of `s`; returns it and the rest.
fn parse_py_str(s: &str) -> Result<(String, &str), String> {
    let mut chars = s.char_indices();
    let quote = match chars.next() {
        Some((_, q @ ('\'' | '"'))) => q,
        _ => return Err("the name is not a quoted string".into()),
    };
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            return Ok((out, &s[i + c.len_utf8()..]));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let (_, e) = chars.next().ok_or("unterminated escape")?;
        match e {
            '\\' | '\'' | '"' => out.push(e),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'x' | 'u' | 'U' => {
                let n = match e {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let hex: String = (0..n)
                    .filter_map(|_| chars.next().map(|(_, h)| h))
                    .collect();
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == n)
                    .and_then(char::from_u32)
                    .ok_or_else(|| format!("bad escape \\{e}{hex}"))?;
                out.push(code);
            }
            other => return Err(format!("unsupported escape \\{other}")),
        }
    }
    Err("unterminated string".into())
}

/// Formats a shard-id key exactly as Python's `repr((name, (k,)))` does.
pub fn format_shard_id(name: &str, k: u64) -> String {
    format!("({}, ({k},))", py_repr_str(name))
}

/// Python's `repr` of a `str`: single quotes unless the text holds `'` and no `"`.
fn py_repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_in_both_quote_styles() {
        assert_eq!(
            parse_shard_id("('decoder.layers.0.w', (3,))").unwrap(),
            ("decoder.layers.0.w".to_string(), 3)
        );
        assert_eq!(
            parse_shard_id("(\"it's\", (0,))").unwrap(),
            ("it's".to_string(), 0)
        );
        assert_eq!(
            parse_shard_id("('a\\'b\"c', (12,))").unwrap(),
            ("a'b\"c".to_string(), 12)
        );
    }

    #[test]
    fn shard_ids_round_trip_through_python_repr() {
        for name in [
            "w",
            "it's",
            "say \"hi\"",
            "both ' and \"",
            "back\\slash",
            "tab\there",
        ] {
            let key = format_shard_id(name, 7);
            assert_eq!(
                parse_shard_id(&key).unwrap(),
                (name.to_string(), 7),
                "{key}"
            );
        }
        assert_eq!(format_shard_id("it's", 0), "(\"it's\", (0,))");
        assert_eq!(format_shard_id("w", 3), "('w', (3,))");
        assert_eq!(
            format_shard_id("both ' and \"", 1),
            "('both \\' and \"', (1,))"
        );
    }

    #[test]
    fn bad_shard_ids_say_why() {
        for key in [
            "w",
            "('w', 3)",
            "('w', (3, 4))",
            "('w', (-1,))",
            "('w', (3,)) x",
            "('w, (3,))",
            "(w, (3,))",
        ] {
            let e = parse_shard_id(key).unwrap_err();
            assert!(e.contains("shard id"), "{key}: {e}");
        }
    }

    #[test]
    fn field_errors_name_the_path() {
        let v: Value = serde_json::json!({"properties": {"dtype": "Float32"},
            "global_shape": [4, -1], "axis_fragmentations": [1, 1], "layout": null,
            "chunk": []});
        let e = from_value::<TensorMeta>(&v).unwrap_err();
        assert!(e.contains("global_shape[1]"), "{e}");
        let v: Value = serde_json::json!({"properties": {"dtype": "Float32"},
            "axis_fragmentations": [1], "layout": null, "chunk": []});
        let e = from_value::<TensorMeta>(&v).unwrap_err();
        assert!(e.contains("global_shape"), "{e}");
    }
}
