//! reshardfs: a distributed checkpoint (MindSpore Transformers Checkpoint
//! 2.0) seen as if it had been saved with another parallel strategy.
//!
//! The pipeline, one module per step:
//! [`source`] reads and checks a checkpoint (using [`format`] and [`layout`]),
//! [`target`] turns what the user asked for into a placement per tensor,
//! [`plan`] lays out every view file without touching tensor data, and
//! [`engine`] produces any byte range of any view file from the memory-mapped
//! source. [`export`] writes a view to disk; [`report`] renders `inspect`
//! and `plan`.

pub mod cache;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod export;
pub mod format;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod layout;
pub mod plan;
pub mod report;
pub mod serve;
pub mod source;
pub mod target;
pub mod tree;

pub use error::{Error, Result};
