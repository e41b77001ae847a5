//! reshardfs: a distributed checkpoint (MindSpore Transformers Checkpoint
//! 2.0) seen as if it had been saved with another parallel strategy.
//!
//! The pipeline, one folder per stage:
//!
//! 1. [`checkpoint`] reads a source: the on-disk format (`metadata.json`,
//!    rank-file headers, file names), the memory-mapped rank files with their
//!    SIGBUS guard, and every cross-check, giving a [`checkpoint::source::Source`].
//! 2. [`reshard`] turns the user's target into a placement per tensor
//!    ([`reshard::target`]), lays out every view file without touching tensor
//!    data ([`reshard::plan`]), and computes any byte range of any view file
//!    from the source ([`reshard::engine`]).
//! 3. [`mount`] serves a plan through FUSE: block cache, namespace, server,
//!    the thin FUSE adapter and the background daemon.
//!
//! Beside them, [`export`] writes a plan to disk and [`report`] renders
//! `inspect` and `plan`; `main.rs` is the command line.

pub mod checkpoint;
pub mod error;
pub mod export;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod mount;
pub mod report;
pub mod reshard;

pub use error::{Error, Result};
