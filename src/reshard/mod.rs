//! Resharding: MindSpore's layout math ([`layout`]), what the user asked for
//! turned into a placement per tensor ([`target`]), every view file laid out
//! without touching tensor data ([`plan`]), and any byte range of any view
//! file computed from the source ([`engine`]).

pub mod cast;
pub mod engine;
pub mod plan;
pub mod target;
