//! Every cap reshardfs puts on what a file or a user may ask for, in one
//! place: a hostile or corrupt checkpoint is refused with a message rather
//! than allowed to size an allocation, a loop or a view.
//!
//! Each cap sits far beyond any real save; the comment says what it is
//! measured against.

/// metadata.json (and a `--strategy` file, and a Hugging Face index) larger
/// than this is refused rather than parsed: parsing costs several times the
/// file in memory. A 70B save's is 2.6 MB; this allows about a million
/// storage entries.
pub const MAX_METADATA_BYTES: u64 = 256 << 20;

/// Tensors per iteration.
pub const MAX_TENSORS: usize = 1 << 20;

/// Rank files per iteration: each is mapped, holds a descriptor and has a
/// SIGBUS guard entry.
pub const MAX_FILES: usize = 1 << 15;

/// common.json and the tracker are small; a large one is not a checkpoint's.
pub const MAX_SMALL_FILE_BYTES: u64 = 16 << 20;

/// config.json is a few KB; a large one is not a model's.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// A file shown beside a Hugging Face view's weights (`--hf-files`):
/// tokenizers are tens of MB; anything far larger is not a model's metadata.
pub const MAX_HF_FILE_BYTES: u64 = 1 << 30;

/// Ranks a source may name and a view may have: far beyond any training
/// job, yet it keeps a hostile rank number from sizing a huge allocation.
pub const MAX_WORLD: u64 = 1 << 20;

/// Tensor slices a view may hold in all (a tensor held by n ranks counts
/// n): each costs a few hundred bytes of plan. A 70B view at 64 ranks has
/// ~20k.
pub const MAX_SLICES: usize = 1 << 24;
