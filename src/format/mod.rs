//! The on-disk format of Checkpoint 2.0: `metadata.json`, shard-id keys,
//! rank-file headers and file names. Pure parsing and building, no policy.

pub mod metadata;
pub mod names;
pub mod rankfile;
