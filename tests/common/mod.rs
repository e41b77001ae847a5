//! Helpers the model property tests share: deterministic tensor bytes,
//! safetensors files written by hand from the format's definition, casts
//! with the `half` crate, and the expected bytes of a whole view file.
//! Independent of `src/`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

/// A tensor's shape and bytes, and the dimension tp splits (if any).
pub type Split = (Vec<u64>, Vec<u8>, Option<usize>);

pub fn es(d: Dtype) -> usize {
    d.bitsize() / 8
}

/// Deterministic bytes for a tensor.
pub fn bytes_for(name: &str, n: usize, seed: u64, dtype: Dtype) -> Vec<u8> {
    let mut x = seed
        ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    let mut out = Vec::with_capacity(n * es(dtype));
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Finite values near 1 in every float format (no NaN payload games).
        let v = (x % 20_000) as f32 / 10_000.0 - 1.0;
        match dtype {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

pub fn st_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::BF16 => "BF16",
        Dtype::F16 => "F16",
        _ => unreachable!(),
    }
}

/// Writes `tensors` (name -> shape, bytes, all of `dtype`) as one
/// safetensors file at `path`, in name order, from the format's definition.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<u64>, Vec<u8>)>,
    dtype: Dtype,
) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, b)) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_dtype(dtype), "shape": shape, "data_offsets": [data.len(), data.len() + b.len()]}),
        );
        data.extend_from_slice(b);
    }
    let mut hj = serde_json::to_vec(&header).unwrap();
    hj.resize(hj.len().next_multiple_of(8), b' ');
    let mut file = (hj.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&hj);
    file.extend_from_slice(&data);
    std::fs::write(path, file).unwrap();
}

pub fn cast(bytes: &[u8], from: Dtype, to: Dtype) -> Vec<u8> {
    let vals: Vec<f32> = match from {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => unreachable!(),
    };
    let mut out = Vec::new();
    for v in vals {
        match to {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

/// The expected bytes of a whole view file, from its header (which the
/// test checks against the expected names, shapes and dtypes first).
pub fn expected_file(
    file: &[u8],
    expect: &BTreeMap<String, (Vec<u64>, Vec<u8>)>,
    dtype: Dtype,
) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let mut out = file[..8 + n].to_vec();
    let mut entries: Vec<(u64, String)> = Vec::new();
    for (name, v) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let (shape, _) = &expect[name];
        let got: Vec<u64> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(&got, shape, "{name}: shape");
        assert_eq!(
            v["dtype"].as_str().unwrap(),
            st_dtype(dtype),
            "{name}: dtype"
        );
        entries.push((v["data_offsets"][0].as_u64().unwrap(), name.clone()));
    }
    assert_eq!(entries.len(), expect.len(), "tensor count");
    entries.sort();
    // The header is the file's own, so check what else it claims: tensors
    // back to back from offset 0, each as long as its expected bytes, after
    // a header padded to 8 bytes as safetensors writes it.
    assert_eq!(n % 8, 0, "header length {n} is not padded to 8 bytes");
    let mut end = 0u64;
    for (start, name) in &entries {
        let v = &header[name.as_str()]["data_offsets"];
        let stop = v[1].as_u64().unwrap();
        assert_eq!(*start, end, "{name}: data starts at {start}, want {end}");
        let want_len = expect[name].1.len() as u64;
        assert_eq!(
            stop - start,
            want_len,
            "{name}: {} data bytes, want {want_len}",
            stop - start
        );
        end = stop;
    }
    for (_, name) in entries {
        out.extend_from_slice(&expect[&name].1);
    }
    out
}
