//! Rank-file headers: the safetensors format as Checkpoint 2.0 uses it.
//!
//! Reading validates the header with the `safetensors` crate itself (offsets
//! contiguous, sizes matching dtype and shape, the file exactly as long as the
//! header says), so a view never trusts a byte range it has not checked.
//! Writing builds headers with the crate's own `Metadata`, so what we serve is
//! what the reference implementation would write. Pure functions over bytes.

use std::collections::HashMap;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::Result;
use crate::{bad, internal};

/// Where a tensor sits in a rank file.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Absolute byte offset of the first element in the file.
    pub offset: u64,
    pub len: u64,
}

/// Checks a whole safetensors file's header against its length and returns
/// where each tensor sits. Errors say what is wrong, without the path.
pub fn parse_header(file: &[u8]) -> Result<HashMap<String, StoredTensor>, String> {
    let len = file.len() as u64;
    let (n, meta) = SafeTensors::read_metadata(file)
        .map_err(|e| format!("invalid safetensors header: {}", explain(&e, len)))?;
    let data_start = 8 + n as u64;
    let mut tensors = HashMap::new();
    for (tname, info) in meta.tensors() {
        let t = stored(&tname, info, data_start)?;
        tensors.insert(tname, t);
    }
    Ok(tensors)
}

/// Where a tensor the header lists sits, its data starting at `data_start`
/// (offsets already checked); refused for sub-byte dtypes.
fn stored(
    tname: &str,
    info: &safetensors::tensor::TensorInfo,
    data_start: u64,
) -> Result<StoredTensor, String> {
    if !info.dtype.bitsize().is_multiple_of(8) {
        return Err(format!(
            "tensor {tname}: dtype {:?} has sub-byte elements, which cannot be resliced",
            info.dtype
        ));
    }
    Ok(StoredTensor {
        dtype: info.dtype,
        shape: info.shape.iter().map(|&s| s as u64).collect(),
        offset: data_start + info.data_offsets.0 as u64,
        len: (info.data_offsets.1 - info.data_offsets.0) as u64,
    })
}

/// [`parse_header`] for a file of `file_len` bytes of which only `head`,
/// its first bytes, are at hand (an object in a store, read by ranged
/// GETs): the same checks, the tensors' bytes never read. `head` must hold
/// at least the 8-byte length and the header it gives
/// ([`header_len`] says how much that is).
pub fn parse_header_of(
    head: &[u8],
    file_len: u64,
) -> Result<HashMap<String, StoredTensor>, String> {
    let n = header_len(head, file_len)?;
    let json = head.get(8..8 + n as usize).ok_or_else(|| {
        format!(
            "invalid safetensors header: {}",
            explain(&SafeTensorError::InvalidHeaderLength, file_len)
        )
    })?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(json).map_err(|e| format!("invalid safetensors header: {e}"))?;
    let data_start = 8 + n;
    let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
        meta.tensors().into_iter().collect();
    infos.sort_by_key(|(_, i)| i.data_offsets);
    let mut at = 0usize;
    let mut tensors = HashMap::new();
    for (tname, info) in infos {
        let (s, e) = info.data_offsets;
        if s != at || e < s {
            return Err(format!(
                "invalid safetensors header: {}",
                explain(&SafeTensorError::InvalidOffset(tname), file_len)
            ));
        }
        let t = stored(&tname, info, data_start)?;
        let nbytes = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize() / 8, |a, &d| a.checked_mul(d));
        if nbytes != Some(e - s) {
            return Err(format!(
                "invalid safetensors header: {}",
                explain(&SafeTensorError::TensorInvalidInfo, file_len)
            ));
        }
        at = e;
        tensors.insert(tname, t);
    }
    if data_start.checked_add(at as u64) != Some(file_len) {
        return Err(format!(
            "invalid safetensors header: {}",
            explain(&SafeTensorError::MetadataIncompleteBuffer, file_len)
        ));
    }
    Ok(tensors)
}

/// The length of the JSON header a safetensors file of `file_len` bytes
/// starting with `head` (at least its first 8 bytes) declares, checked
/// against the format's 100 MB cap and the file's length.
pub fn header_len(head: &[u8], file_len: u64) -> Result<u64, String> {
    let Some(len) = head.get(..8) else {
        return Err(format!(
            "not a safetensors file: {file_len} bytes, shorter than the 8-byte header length"
        ));
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(len);
    let n = u64::from_le_bytes(b);
    if n > 100_000_000 {
        return Err(format!(
            "invalid safetensors header: {}",
            explain(&SafeTensorError::HeaderTooLarge, file_len)
        ));
    }
    if n + 8 > file_len {
        return Err(format!(
            "invalid safetensors header: {}",
            explain(&SafeTensorError::InvalidHeaderLength, file_len)
        ));
    }
    Ok(n)
}

fn explain(e: &SafeTensorError, file_len: u64) -> String {
    match e {
        SafeTensorError::HeaderTooLarge => "header length exceeds 100 MB".into(),
        SafeTensorError::InvalidHeaderLength => {
            format!("header length points past the end of the file ({file_len} bytes)")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("data offsets do not end exactly at the end of the file ({file_len} bytes)")
        }
        SafeTensorError::InvalidOffset(t) => {
            format!("tensor {t}: data_offsets are not contiguous with the previous tensor")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data_offsets do not match its dtype and shape".into()
        }
        other => other.to_string(),
    }
}

/// Element size in bytes (callers have rejected sub-byte dtypes).
pub fn elem_size(dtype: Dtype) -> u64 {
    (dtype.bitsize() / 8) as u64
}

/// One tensor of a file to be written: name, dtype, shape.
pub struct HeaderEntry<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [u64],
}

/// Builds a complete safetensors header (length prefix + JSON padded with
/// spaces to a multiple of 8) for tensors stored back to back in the order
/// given, and returns it with each tensor's data offset relative to the data
/// section. `__metadata__` is `{"format": format}`: `ms` as MindSpore
/// writes, `pt` as transformers does.
pub fn build_header(entries: &[HeaderEntry<'_>], format: &str) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(entries.len());
    let mut offsets = Vec::with_capacity(entries.len());
    for e in entries {
        let too_big = || {
            bad!(
                "tensor {}: shape {:?} is too large for a file",
                e.name,
                e.shape
            )
        };
        let shape: Vec<usize> = e
            .shape
            .iter()
            .map(|&s| usize::try_from(s).map_err(|_| too_big()))
            .collect::<Result<_>>()?;
        // The safetensors crate counts the tensor's bits in a usize: a
        // tensor whose bits do not fit is refused here, as the input's
        // fault, rather than by `Metadata::new` below as a bug.
        let len = shape
            .iter()
            .try_fold(e.dtype.bitsize() / 8, |acc, &s| acc.checked_mul(s))
            .filter(|len| len.checked_mul(8).is_some() && offset.checked_add(*len).is_some())
            .ok_or_else(too_big)?;
        offsets.push(offset as u64);
        infos.push((
            e.name.to_string(),
            TensorInfo {
                dtype: e.dtype,
                shape,
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let meta_map = HashMap::from([("format".to_string(), format.to_string())]);
    let meta = Metadata::new(Some(meta_map), infos)
        .map_err(|e| internal!("cannot build a safetensors header: {e}"))?;
    let mut json = serde_json::to_vec(&meta)
        .map_err(|e| internal!("cannot serialize a safetensors header: {e}"))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    Ok((header, offsets))
}

/// The MindSpore dtype names reshardfs reads (as `str(mindspore.float32)`
/// prints them; metadata.json may use any case).
pub const MINDSPORE_DTYPES: &[&str] = &[
    "Bool", "UInt8", "Int8", "Int16", "UInt16", "Float16", "BFloat16", "Int32", "UInt32",
    "Float32", "Float64", "Int64", "UInt64",
];

/// The safetensors name of a MindSpore dtype name, compared case-insensitively.
pub fn dtype_from_mindspore(name: &str) -> Option<Dtype> {
    Some(match name.to_ascii_lowercase().as_str() {
        "bool" | "bool_" => Dtype::BOOL,
        "uint8" => Dtype::U8,
        "int8" => Dtype::I8,
        "int16" => Dtype::I16,
        "uint16" => Dtype::U16,
        "float16" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        "int32" => Dtype::I32,
        "uint32" => Dtype::U32,
        "float32" => Dtype::F32,
        "float64" => Dtype::F64,
        "int64" => Dtype::I64,
        "uint64" => Dtype::U64,
        _ => return None,
    })
}

/// The MindSpore dtype name for a safetensors dtype (used when a source has
/// no metadata.json to take the name from).
pub fn dtype_to_mindspore(dtype: Dtype) -> String {
    match dtype {
        Dtype::BOOL => "Bool",
        Dtype::U8 => "UInt8",
        Dtype::I8 => "Int8",
        Dtype::I16 => "Int16",
        Dtype::U16 => "UInt16",
        Dtype::F16 => "Float16",
        Dtype::BF16 => "BFloat16",
        Dtype::I32 => "Int32",
        Dtype::U32 => "UInt32",
        Dtype::F32 => "Float32",
        Dtype::F64 => "Float64",
        Dtype::I64 => "Int64",
        Dtype::U64 => "UInt64",
        other => return format!("{other:?}"),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose head alone is read gives what the whole file gives, and
    /// the same refusals: a file shorter or longer than its header says,
    /// a header running past the end, a length below 8 bytes.
    #[test]
    fn a_head_alone_parses_as_the_whole_file() {
        let entries = [
            HeaderEntry {
                name: "w",
                dtype: Dtype::F32,
                shape: &[2, 3],
            },
            HeaderEntry {
                name: "b",
                dtype: Dtype::BF16,
                shape: &[4],
            },
        ];
        let (header, _) = build_header(&entries, "pt").unwrap();
        let mut file = header.clone();
        file.extend(std::iter::repeat_n(7u8, 6 * 4 + 4 * 2));
        let len = file.len() as u64;
        assert_eq!(parse_header_of(&header, len), parse_header(&file));
        for bad in [len - 1, len + 1] {
            let e = parse_header_of(&header, bad).unwrap_err();
            assert!(e.contains("end of the file"), "{e}");
        }
        assert!(parse_header_of(&header, 20).is_err());
        let e = parse_header_of(&header[..5], 5).unwrap_err();
        assert!(e.contains("shorter than the 8-byte header length"), "{e}");
    }

    #[test]
    fn header_is_padded_sorted_and_readable_by_the_crate() {
        let entries = [
            HeaderEntry {
                name: "a",
                dtype: Dtype::F32,
                shape: &[2, 3],
            },
            HeaderEntry {
                name: "b",
                dtype: Dtype::BF16,
                shape: &[],
            },
            HeaderEntry {
                name: "c",
                dtype: Dtype::U8,
                shape: &[0, 4],
            },
        ];
        let (header, offsets) = build_header(&entries, "ms").unwrap();
        assert_eq!(offsets, vec![0, 24, 26]);
        assert_eq!(header.len() % 8, 0);
        let json = std::str::from_utf8(&header[8..]).unwrap();
        assert!(
            json.starts_with(r#"{"__metadata__":{"format":"ms"},"a":"#),
            "{json}"
        );
        let mut file = header.clone();
        file.resize(header.len() + 26, 0);
        let st = SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("b").unwrap().shape(), &[] as &[usize]);
    }

    /// A tensor too large for a safetensors file is the input's fault: the
    /// crate counts a tensor's bits in a `usize`, so 2^61 bytes is one
    /// byte past the largest it takes, and a shape of 2^64 elements or more
    /// does not fit at all.
    #[test]
    fn a_tensor_too_large_for_a_file_is_refused_as_bad_input() {
        let entry = |shape: &'static [u64]| HeaderEntry {
            name: "w",
            dtype: Dtype::F32,
            shape,
        };
        let (_, offsets) = build_header(&[entry(&[(1 << 59) - 1])], "ms").unwrap();
        assert_eq!(offsets, vec![0]);
        for shape in [&[1u64 << 59][..], &[1 << 62], &[1 << 32, 1 << 32]] {
            let e = build_header(&[entry(shape)], "ms").unwrap_err();
            let msg = e.to_string();
            assert_eq!(e.exit_code(), 2, "{shape:?}: {msg}");
            assert!(
                msg.contains("tensor w") && msg.contains("too large"),
                "{msg}"
            );
        }
    }

    #[test]
    fn mindspore_dtype_names_round_trip() {
        for d in [Dtype::BF16, Dtype::F32, Dtype::F16, Dtype::I64, Dtype::U8] {
            assert_eq!(dtype_from_mindspore(&dtype_to_mindspore(d)), Some(d));
        }
        assert_eq!(dtype_from_mindspore("bfloat16"), Some(Dtype::BF16));
        assert_eq!(dtype_from_mindspore("Complex64"), None);
        for name in MINDSPORE_DTYPES {
            let d = dtype_from_mindspore(name).unwrap();
            assert_eq!(dtype_from_mindspore(&name.to_uppercase()), Some(d));
            assert_eq!(dtype_to_mindspore(d), *name);
        }
        assert_eq!(dtype_from_mindspore("F32"), None);
    }
}
