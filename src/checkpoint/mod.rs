//! Reading checkpoints: the on-disk format of Checkpoint 2.0 (`metadata.json`
//! and shard-id keys, rank-file headers, file names), the mapped source files,
//! and a whole source checked and ready to plan from.
//!
//! [`header`], [`metadata`], [`names`] and [`layout`] (MindSpore's layout
//! math: which rank holds which slice) are pure parsing and building;
//! [`limits`] holds every cap on what a file may ask for; [`mapped`] and
//! [`guard`] live with files that may change under them;
//! [`source`] (with [`iteration`], [`plain`] and [`paths`]) turns a folder
//! into a [`source::Source`], [`hub`] finding the snapshot a Hub cache
//! folder names; [`storage`] says when the filesystem under it
//! will make cold reads slow.

pub(crate) mod guard;
pub mod header;
pub mod hub;
pub(crate) mod iteration;
pub mod layout;
pub mod limits;
pub(crate) mod mapped;
pub mod metadata;
pub mod models;
pub mod names;
pub(crate) mod paths;
pub(crate) mod plain;
pub mod s3;
pub mod source;
pub mod storage;
pub mod store;
