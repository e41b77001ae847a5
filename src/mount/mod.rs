//! Mounting a view: the block cache ([`cache`]), the namespace ([`tree`]),
//! attributes and bytes of every node ([`serve`]), the thin FUSE adapter
//! ([`fuse`]) that only translates, and the background daemon ([`daemon`]).
//!
//! Only [`fuse`] and [`daemon`] know about FUSE; everything else is plain
//! logic, unit-tested directly.

pub mod cache;
pub mod daemon;
pub mod fuse;
pub mod serve;
pub mod tree;
