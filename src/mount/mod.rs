//! Mounting a view: the block cache ([`cache`]), the namespace ([`tree`])
//! and who may read each node of it ([`access`]),
//! attributes, handles and bytes of every node ([`serve`]), prefetch for
//! sequential readers ([`prefetch`]), the thin FUSE adapter
//! ([`fuse`]) that only translates, and the background daemon ([`daemon`]).
//!
//! Only [`fuse`] and [`daemon`] know about FUSE; everything else is plain
//! logic, unit-tested directly.

pub(crate) mod access;
pub(crate) mod cache;
pub mod daemon;
pub(crate) mod fuse;
pub(crate) mod hooks;
pub mod prefetch;
pub mod serve;
pub(crate) mod sync;
pub(crate) mod tree;
