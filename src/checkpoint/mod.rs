//! Reading checkpoints: the on-disk format of Checkpoint 2.0 (`metadata.json`
//! and shard-id keys, rank-file headers, file names), the mapped source files,
//! and a whole source checked and ready to plan from.
//!
//! [`header`], [`metadata`] and [`names`] are pure parsing and building;
//! [`mapped`] and [`guard`] live with files that may change under them;
//! [`source`] (with [`iteration`], [`plain`] and [`paths`]) turns a folder
//! into a [`source::Source`]; [`storage`] says when the filesystem under it
//! will make cold reads slow.

pub(crate) mod guard;
pub mod header;
pub(crate) mod iteration;
pub(crate) mod mapped;
pub mod metadata;
pub mod models;
pub mod names;
pub(crate) mod paths;
pub(crate) mod plain;
pub mod source;
pub mod storage;
