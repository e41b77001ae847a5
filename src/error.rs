//! One error type for the whole crate.
//!
//! The split that matters to users is *whose fault*: a checkpoint or a target
//! that cannot be honoured is bad input (exit code 2, a message naming the file,
//! tensor and field); everything else (a full disk, a failed write) is an
//! operational failure (exit code 1). A third kind is ours: an internal error
//! is a bug in reshardfs (a state the code should never reach), never the
//! input's fault, so it exits 1 and says to report it.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source checkpoint or the requested target is invalid.
    #[error("{0}")]
    Input(String),
    /// A bug in reshardfs: a state it should never reach.
    #[error("internal error (a bug in reshardfs; please report it): {0}")]
    Internal(String),
    /// An I/O failure that is not the input's fault (writing the export, ...).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Process exit code for this error: 2 for bad input, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) => 2,
            Error::Internal(_) | Error::Io { .. } => 1,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Builds an input error. Use it as `bad!("{}: tensor {name}: ...", path.display())`.
#[macro_export]
macro_rules! bad {
    ($($arg:tt)*) => { $crate::error::Error::Input(format!($($arg)*)) };
}

/// Builds an internal error (a bug, exit code 1): `internal!("metadata for {name}: {e}")`.
#[macro_export]
macro_rules! internal {
    ($($arg:tt)*) => { $crate::error::Error::Internal(format!($($arg)*)) };
}

/// Shorthand for `return Err(bad!(...))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::bad!($($arg)*)) };
}

/// An I/O error while reading the source is the source's problem (missing,
/// unreadable, truncated): report it as bad input with the path.
pub fn source_io(path: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOTCONN) {
        // What a FUSE mount whose daemon died answers to everything.
        return Error::Input(format!(
            "{}: {e}: a FUSE mount whose daemon is gone is in the way (a reshardfs mount killed?); unmount it with `umount` or `fusermount3 -u`",
            path.display()
        ));
    }
    Error::Input(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_say_whose_fault() {
        assert_eq!(bad!("x").exit_code(), 2);
        assert_eq!(internal!("x").exit_code(), 1);
        assert!(internal!("x").to_string().contains("bug"));
        assert_eq!(Error::io("x", std::io::Error::other("y")).exit_code(), 1);
    }
}
