//! Test hooks: how the integration tests put a bug or a hang into a real
//! daemon, to check what the daemon does about it. Compiled only with the
//! cargo feature `test-hooks` (the tests build the debug and the release
//! binary with it); without the feature every hook is off and reads no
//! environment.
//!
//! | variable | effect |
//! |---|---|
//! | `RESHARDFS_TEST_PANIC_ON_READ=NAME` | every read of a file whose path ends in NAME panics |
//! | `RESHARDFS_TEST_PANIC_IN_PREFETCH=NAME` | every block a prefetch worker computes for file NAME panics |
//! | `RESHARDFS_TEST_HANG_BEFORE_MOUNT=1` | the daemon hangs before mounting |
//! | `RESHARDFS_TEST_START_TIMEOUT_S=N` | `mount` waits N s for its daemon instead of 30 |

use std::time::Duration;

/// The hooks set for this process, read once.
#[derive(Debug, Default)]
pub struct Hooks {
    pub panic_on_read: Option<String>,
    pub panic_in_prefetch: Option<String>,
    pub hang_before_mount: bool,
    pub start_timeout: Option<Duration>,
}

/// The hooks set for this process (all off without `test-hooks`).
pub fn get() -> &'static Hooks {
    static HOOKS: std::sync::OnceLock<Hooks> = std::sync::OnceLock::new();
    HOOKS.get_or_init(read)
}

#[cfg(feature = "test-hooks")]
fn read() -> Hooks {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Hooks {
        panic_on_read: var("RESHARDFS_TEST_PANIC_ON_READ"),
        panic_in_prefetch: var("RESHARDFS_TEST_PANIC_IN_PREFETCH"),
        hang_before_mount: var("RESHARDFS_TEST_HANG_BEFORE_MOUNT").is_some(),
        start_timeout: var("RESHARDFS_TEST_START_TIMEOUT_S")
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs),
    }
}

#[cfg(not(feature = "test-hooks"))]
fn read() -> Hooks {
    Hooks::default()
}
