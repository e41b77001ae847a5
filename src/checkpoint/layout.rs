//! MindSpore's `Layout` math: which slice of a tensor each rank holds.
//!
//! A layout arranges the ranks of one pipeline stage in a device matrix and
//! maps each tensor dimension to zero or more device axes. Internally the map
//! holds *axis indices* (0 = first axis of the device matrix); MindSpore's JSON
//! counts from the last axis, and the conversion lives only in
//! [`Layout::from_json`] and [`Layout::to_json`].

use super::metadata::{LayoutJson, MapEntry};

/// A validated layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub device_matrix: Vec<u64>,
    /// Per tensor dimension, the device axes that split it, most significant first.
    pub tensor_map: Vec<Vec<usize>>,
    pub alias_name: Vec<String>,
    pub rank_list: Vec<u64>,
}

/// A box in a tensor: per dimension a start and a size, in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub start: Vec<u64>,
    pub shape: Vec<u64>,
}

impl Slice {
    pub fn whole(shape: &[u64]) -> Slice {
        Slice {
            start: vec![0; shape.len()],
            shape: shape.to_vec(),
        }
    }
}

impl Layout {
    /// Validates a JSON layout for a tensor of `ndim` dimensions.
    /// Errors name the field and say what was expected.
    pub fn from_json(json: &LayoutJson, ndim: usize) -> Result<Layout, String> {
        if json.interleaved_parallel {
            return Err(
                "layout.interleaved_parallel is true: interleaved layouts are not supported".into(),
            );
        }
        let axes = json.device_matrix.len();
        if axes == 0 {
            return Err("layout.device_matrix is empty".into());
        }
        if let Some(i) = json.device_matrix.iter().position(|&m| m == 0) {
            return Err(format!("layout.device_matrix[{i}] is 0"));
        }
        if json.alias_name.len() != axes {
            return Err(format!(
                "layout.alias_name has {} names for a device_matrix of {} axes",
                json.alias_name.len(),
                axes
            ));
        }
        for (i, a) in json.alias_name.iter().enumerate() {
            if a.is_empty() {
                return Err(format!("layout.alias_name[{i}] is empty"));
            }
            if json.alias_name[..i].contains(a) {
                return Err(format!("layout.alias_name repeats {a:?}"));
            }
        }
        if json.tensor_map.len() != ndim {
            return Err(format!(
                "layout.tensor_map has {} entries for a tensor of {} dimensions",
                json.tensor_map.len(),
                ndim
            ));
        }
        let mut used = vec![false; axes];
        let mut tensor_map = Vec::with_capacity(ndim);
        for (d, entry) in json.tensor_map.iter().enumerate() {
            let values: Vec<i64> = match entry {
                MapEntry::One(v) => vec![*v],
                MapEntry::Many(vs) => vs.clone(),
            };
            let mut dim_axes = Vec::new();
            for v in values {
                if v == -1 {
                    continue;
                }
                if v < 0 || v as usize >= axes {
                    return Err(format!(
                        "layout.tensor_map[{d}] holds {v}, outside -1..{} for a device_matrix of {axes} axes",
                        axes - 1
                    ));
                }
                let axis = axes - 1 - v as usize;
                if used[axis] {
                    return Err(format!(
                        "layout.tensor_map maps device axis {v} ({}) twice",
                        json.alias_name[axis]
                    ));
                }
                used[axis] = true;
                dim_axes.push(axis);
            }
            tensor_map.push(dim_axes);
        }
        let devices = checked_product(&json.device_matrix)
            .ok_or("layout.device_matrix: product overflows")?;
        if json.rank_list.len() as u64 != devices {
            return Err(format!(
                "layout.rank_list has {} ranks, but device_matrix {:?} needs {devices}",
                json.rank_list.len(),
                json.device_matrix
            ));
        }
        let mut sorted = json.rank_list.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("layout.rank_list lists rank {} twice", w[0]));
        }
        Ok(Layout {
            device_matrix: json.device_matrix.clone(),
            tensor_map,
            alias_name: json.alias_name.clone(),
            rank_list: json.rank_list.clone(),
        })
    }

    /// The layout in MindSpore's JSON form.
    pub fn to_json(&self) -> LayoutJson {
        let axes = self.device_matrix.len();
        let tensor_map = self
            .tensor_map
            .iter()
            .map(|dim_axes| match dim_axes.as_slice() {
                [] => MapEntry::One(-1),
                [a] => MapEntry::One((axes - 1 - a) as i64),
                many => MapEntry::Many(many.iter().map(|a| (axes - 1 - a) as i64).collect()),
            })
            .collect();
        LayoutJson {
            device_matrix: self.device_matrix.clone(),
            tensor_map,
            interleaved_parallel: false,
            alias_name: self.alias_name.clone(),
            rank_list: self.rank_list.clone(),
        }
    }

    /// Number of ranks in this layout (one pipeline stage).
    ///
    /// Every constructor checks that this product fits in a `u64`
    /// ([`Layout::from_json`], and [`Layout::with_sizes`] for a target that
    /// resizes axes), so it cannot wrap here; saturating keeps that true even
    /// for a layout built field by field.
    pub fn devices(&self) -> u64 {
        self.device_matrix
            .iter()
            .try_fold(1u64, |acc, &m| acc.checked_mul(m))
            .unwrap_or(u64::MAX)
    }

    /// How many pieces dimension `d` is cut into (a sub-product of
    /// [`Layout::devices`], so it fits when that does).
    pub fn split(&self, d: usize) -> u64 {
        self.split_checked(d).unwrap_or(u64::MAX)
    }

    /// [`Layout::split`], or `None` when the product of the axes overflows.
    fn split_checked(&self, d: usize) -> Option<u64> {
        self.tensor_map[d]
            .iter()
            .try_fold(1u64, |acc, &a| acc.checked_mul(self.device_matrix[a]))
    }

    /// This layout with the device axes named in `sizes` resized, checked
    /// like a layout read from JSON: the new device matrix must have a rank
    /// count that fits in a `u64`. (A hostile `--mesh dp=2^63` once wrapped
    /// the product to 0 and gave a view whose files held no tensors.)
    pub fn with_sizes(&self, sizes: &[(String, u64)]) -> Result<Layout, String> {
        let mut l = self.clone();
        for (axis, alias) in l.alias_name.iter().enumerate() {
            if let Some((_, n)) = sizes.iter().find(|(a, _)| a == alias) {
                if *n == 0 {
                    return Err(format!("device axis {alias} of size 0"));
                }
                l.device_matrix[axis] = *n;
            }
        }
        if checked_product(&l.device_matrix).is_none() {
            return Err(format!(
                "device matrix {} has more ranks than a 64-bit count holds",
                l.describe_mesh()
            ));
        }
        Ok(l)
    }

    /// `axis_fragmentations`: the split of every dimension.
    pub fn fragmentations(&self) -> Vec<u64> {
        (0..self.tensor_map.len()).map(|d| self.split(d)).collect()
    }

    /// Device coordinates of position `i` in `rank_list` (row-major, last axis fastest).
    pub fn coords(&self, i: usize) -> Vec<u64> {
        unravel(i as u64, &self.device_matrix)
    }

    /// Per dimension, which piece position `i` holds.
    fn piece_index(&self, coords: &[u64]) -> Vec<u64> {
        self.tensor_map
            .iter()
            .map(|dim_axes| {
                dim_axes
                    .iter()
                    .fold(0, |acc, &a| acc * self.device_matrix[a] + coords[a])
            })
            .collect()
    }

    /// Checks that every split divides its dimension.
    /// The error names the dimension, its size and the split.
    pub fn check_divides(&self, global_shape: &[u64]) -> Result<(), String> {
        for (d, &size) in global_shape.iter().enumerate() {
            let axes = || -> Vec<String> {
                self.tensor_map[d]
                    .iter()
                    .map(|&a| format!("{}={}", self.alias_name[a], self.device_matrix[a]))
                    .collect()
            };
            let Some(split) = self.split_checked(d) else {
                return Err(format!(
                    "dimension {d} of size {size} is split by {}, a product beyond 64 bits",
                    axes().join(" x ")
                ));
            };
            if size % split != 0 {
                let axes = axes();
                return Err(format!(
                    "dimension {d} of size {size} does not split evenly into {split} ({})",
                    axes.join(" x ")
                ));
            }
        }
        Ok(())
    }

    /// The slice held by position `i` of `rank_list` (splits must divide).
    pub fn slice(&self, i: usize, global_shape: &[u64]) -> Slice {
        let pieces = self.piece_index(&self.coords(i));
        let mut start = Vec::with_capacity(global_shape.len());
        let mut shape = Vec::with_capacity(global_shape.len());
        for (d, &size) in global_shape.iter().enumerate() {
            let len = size / self.split(d);
            start.push(pieces[d] * len);
            shape.push(len);
        }
        Slice { start, shape }
    }

    /// The slice's row-major index in the fragmentation grid (a chunk's `global_offset`).
    pub fn grid_index(&self, i: usize) -> u64 {
        let pieces = self.piece_index(&self.coords(i));
        ravel(&pieces, &self.fragmentations())
    }

    /// Which copy of its slice position `i` holds: its coordinates on the
    /// device axes that split no dimension, as a mixed-radix number.
    pub fn replica_id(&self, i: usize) -> u64 {
        let coords = self.coords(i);
        let mapped: Vec<bool> = (0..self.device_matrix.len())
            .map(|a| self.tensor_map.iter().any(|m| m.contains(&a)))
            .collect();
        (0..self.device_matrix.len())
            .filter(|&a| !mapped[a])
            .fold(0, |acc, a| acc * self.device_matrix[a] + coords[a])
    }

    /// The layout's axes as `alias=size` (for messages and `inspect`).
    pub fn describe_mesh(&self) -> String {
        self.alias_name
            .iter()
            .zip(&self.device_matrix)
            .map(|(a, m)| format!("{a}={m}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The tensor map with aliases: `[tp, -]`, `[(dp,tp), -]`.
    pub fn describe_map(&self) -> String {
        let dims: Vec<String> = self
            .tensor_map
            .iter()
            .map(|axes| match axes.as_slice() {
                [] => "-".to_string(),
                [a] => self.alias_name[*a].clone(),
                many => format!(
                    "({})",
                    many.iter()
                        .map(|&a| self.alias_name[a].as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            })
            .collect();
        format!("[{}]", dims.join(", "))
    }
}

/// Row-major unravel of `index` over `dims` (last fastest).
pub fn unravel(index: u64, dims: &[u64]) -> Vec<u64> {
    let mut out = vec![0; dims.len()];
    unravel_into(index, dims, &mut out);
    out
}

/// [`unravel`] into a caller's buffer of `dims.len()` entries.
pub fn unravel_into(mut index: u64, dims: &[u64], out: &mut [u64]) {
    for (o, &d) in out.iter_mut().zip(dims).rev() {
        *o = index % d;
        index /= d;
    }
}

/// Row-major ravel of `idx` over `dims`.
pub fn ravel(idx: &[u64], dims: &[u64]) -> u64 {
    idx.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
}

/// Product that reports overflow instead of wrapping.
pub fn checked_product(values: &[u64]) -> Option<u64> {
    values.iter().try_fold(1u64, |acc, &v| acc.checked_mul(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dm: &[u64], map: Vec<MapEntry>, alias: &[&str], ranks: &[u64]) -> Layout {
        let json = LayoutJson {
            device_matrix: dm.to_vec(),
            tensor_map: map.clone(),
            interleaved_parallel: false,
            alias_name: alias.iter().map(|s| s.to_string()).collect(),
            rank_list: ranks.to_vec(),
        };
        Layout::from_json(&json, map.len()).unwrap()
    }
    use MapEntry::{Many, One};

    #[test]
    fn row_parallel_on_the_last_axis() {
        // dp=2 x tp=2, dimension 0 split on tp (value 0 = last axis).
        let l = layout(&[2, 2], vec![One(0), One(-1)], &["dp", "tp"], &[4, 5, 6, 7]);
        let shape = [192, 64];
        let starts: Vec<u64> = (0..4).map(|i| l.slice(i, &shape).start[0]).collect();
        assert_eq!(starts, vec![0, 96, 0, 96]);
        assert_eq!(l.slice(1, &shape).shape, vec![96, 64]);
        let replicas: Vec<u64> = (0..4).map(|i| l.replica_id(i)).collect();
        assert_eq!(replicas, vec![0, 0, 1, 1]);
        let grid: Vec<u64> = (0..4).map(|i| l.grid_index(i)).collect();
        assert_eq!(grid, vec![0, 1, 0, 1]);
        assert_eq!(l.fragmentations(), vec![2, 1]);
    }

    #[test]
    fn nested_map_first_listed_is_most_significant() {
        // Optimizer sharding style: dimension 0 split on (dp, tp) = 4 ways.
        let l = layout(
            &[2, 2],
            vec![Many(vec![1, 0]), One(-1)],
            &["dp", "tp"],
            &[0, 1, 2, 3],
        );
        let starts: Vec<u64> = (0..4).map(|i| l.slice(i, &[8, 3]).start[0]).collect();
        assert_eq!(starts, vec![0, 2, 4, 6]);
        // Reversed order: tp most significant.
        let l = layout(
            &[2, 2],
            vec![Many(vec![0, 1]), One(-1)],
            &["dp", "tp"],
            &[0, 1, 2, 3],
        );
        let starts: Vec<u64> = (0..4).map(|i| l.slice(i, &[8, 3]).start[0]).collect();
        assert_eq!(starts, vec![0, 4, 2, 6]);
        assert_eq!(l.replica_id(3), 0);
        assert_eq!(l.to_json().tensor_map, vec![Many(vec![0, 1]), One(-1)]);
    }

    #[test]
    fn graph_style_aliases_and_three_axes() {
        // a=2, b=3, c=2; dim 0 on b, dim 1 on a.
        let ranks: Vec<u64> = (0..12).collect();
        let l = layout(&[2, 3, 2], vec![One(1), One(2)], &["a", "b", "c"], &ranks);
        // position 7 = coords (1, 0, 1): b=0, a=1.
        assert_eq!(l.coords(7), vec![1, 0, 1]);
        let s = l.slice(7, &[6, 4]);
        assert_eq!(s.start, vec![0, 2]);
        assert_eq!(s.shape, vec![2, 2]);
        assert_eq!(l.replica_id(7), 1);
        assert_eq!(l.grid_index(7), ravel(&[0, 1], &[3, 2]));
        assert_eq!(l.describe_map(), "[b, a]");
    }

    #[test]
    fn invalid_layouts_name_the_field() {
        let base = LayoutJson {
            device_matrix: vec![2, 2],
            tensor_map: vec![One(0)],
            interleaved_parallel: false,
            alias_name: vec!["dp".into(), "tp".into()],
            rank_list: vec![0, 1, 2, 3],
        };
        let mut j = base.clone();
        j.rank_list = vec![0, 1, 2];
        assert!(
            Layout::from_json(&j, 1)
                .unwrap_err()
                .contains("rank_list has 3")
        );
        let mut j = base.clone();
        j.rank_list = vec![0, 1, 1, 2];
        assert!(Layout::from_json(&j, 1).unwrap_err().contains("twice"));
        let mut j = base.clone();
        j.tensor_map = vec![One(2)];
        assert!(
            Layout::from_json(&j, 1)
                .unwrap_err()
                .contains("tensor_map[0] holds 2")
        );
        assert!(
            Layout::from_json(&base, 2)
                .unwrap_err()
                .contains("tensor_map has 1")
        );
        let l = Layout::from_json(&base, 1).unwrap();
        let e = l.check_divides(&[5]).unwrap_err();
        assert!(
            e.contains("dimension 0 of size 5") && e.contains("tp=2"),
            "{e}"
        );
    }

    #[test]
    fn hostile_sizes_are_refused_not_wrapped() {
        let l = layout(
            &[2, 2],
            vec![Many(vec![1, 0])],
            &["dp", "tp"],
            &[0, 1, 2, 3],
        );
        // dp=2^63 x tp=2 wraps to 0 in u64.
        let e = l.with_sizes(&[("dp".into(), 1 << 63)]).unwrap_err();
        assert!(e.contains("dp=9223372036854775808,tp=2"), "{e}");
        let ok = l.with_sizes(&[("tp".into(), 4)]).unwrap();
        assert_eq!(ok.device_matrix, vec![2, 4]);
        assert_eq!(ok.devices(), 8);
        // A dimension split by two axes whose product wraps: an error, not a
        // panic on `%` by the wrapped 0.
        let wide = Layout {
            device_matrix: vec![1 << 32, 1 << 32],
            ..l
        };
        let e = wide.check_divides(&[1 << 40]).unwrap_err();
        assert!(
            e.contains("beyond 64 bits") && e.contains("dp=4294967296"),
            "{e}"
        );
        assert_eq!(wide.devices(), u64::MAX);
    }

    #[test]
    fn ravel_unravel() {
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(ravel(&[1, 2], &[2, 3]), 5);
        assert_eq!(unravel(0, &[]), Vec::<u64>::new());
        assert_eq!(ravel(&[], &[]), 0);
    }
}
