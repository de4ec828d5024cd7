//! The agent's clocks, in one place.
//!
//! Policy is judged by an injected [`Clock`] (time windows, audit stamps,
//! ingress), so tests move policy time by writing a file. Certificate
//! lifetimes (issue, rotation, JWT expiry) always use [`unix_now`]: peers
//! check them against real time, so a moved clock must not shift them.

use std::path::PathBuf;
use std::sync::Arc;

/// Unix seconds, for policy decisions.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Real Unix time in seconds (0 before the epoch, which no host is at).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The system clock as a policy [`Clock`].
pub fn system() -> Clock {
    Arc::new(unix_now)
}

/// A policy clock that reads Unix time from a file (tests move time by
/// writing it), falling back to the system clock.
pub fn file(path: PathBuf) -> Clock {
    Arc::new(move || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(unix_now)
    })
}
