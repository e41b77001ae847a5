//! Resharding: what the user asked for turned into a placement per tensor
//! ([`target`]), every view file laid out without touching tensor data
//! ([`plan`]) and the view's file tree ([`namespace`]), any byte range of
//! any view file computed from the source ([`engine`]), and `--dtype`'s
//! casts ([`cast`]). The layout math itself is the format's
//! ([`crate::checkpoint::layout`]).

pub mod cast;
pub mod engine;
pub mod namespace;
pub mod plan;
pub mod target;
