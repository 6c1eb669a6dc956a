//! The engine's guard against outgrowing the host's memory: a run whose state grows past the limit
//! (`--max-memory`, by default 90% of what the host had available when the process started) stops
//! with `EngineError::Memory`, a clear error and exit code 2, instead of being killed by the kernel's
//! OOM killer half-way through. A functional run on a large mesh is what grows: every PE keeps the
//! fragments of the values it stores (a tiny model's training step spread over a whole wafer holds
//! hundreds of fragments on each of 750k PEs).
//!
//! The guard reads the process's resident set (`/proc/self/status`) at most every
//! `CHECK_EVERY` windows and `CHECK_INTERVAL` of wall time, so it costs nothing measurable; it never
//! changes a result, only whether a run that would not fit stops early. Where `/proc` is missing (not
//! Linux) there is no default limit and no check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Windows between two looks at the clock (a window of a functional run on a whole wafer can take
/// tens of milliseconds: 1,024 of them took 19 s and grew the process by 4.4 GB).
const CHECK_EVERY: u32 = 16;
/// Wall time between two reads of the resident set.
const CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Share of the host's available memory a run may take by default.
const DEFAULT_SHARE: f64 = 0.9;

/// The limit set by `set_limit` (0: not set).
static SET: AtomicU64 = AtomicU64::new(0);
/// The default limit, computed once per process (None: no /proc to compute it from).
static DEFAULT: OnceLock<Option<u64>> = OnceLock::new();

/// Sets the process's limit on resident memory in bytes (the CLI's `--max-memory`).
pub fn set_limit(bytes: u64) {
    SET.store(bytes.max(1), Ordering::Relaxed);
}

/// The limit runs are held to, in bytes: the one set, or the default (what the process held when it
/// first asked plus 90% of the memory the host had available then); None where neither is known.
pub fn limit() -> Option<u64> {
    match SET.load(Ordering::Relaxed) {
        0 => *DEFAULT.get_or_init(|| {
            let available = meminfo_kb("MemAvailable:")?.saturating_mul(1024);
            Some(resident().unwrap_or(0) + (available as f64 * DEFAULT_SHARE) as u64)
        }),
        set => Some(set),
    }
}

/// The process's resident set in bytes, from `/proc/self/status`.
pub fn resident() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// A memory figure of this process in bytes from `/proc/self/status` (`VmRSS:`, `VmHWM:` for the peak).
pub fn status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    field_kb(&s, key).map(|kb| kb.saturating_mul(1024))
}

fn meminfo_kb(key: &str) -> Option<u64> {
    field_kb(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// The value of a `Key:   1234 kB` line.
fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// One run's watch over the limit, called once per window by the coordinating thread.
pub(crate) struct Guard {
    limit: Option<u64>,
    windows: u32,
    /// When the resident set was last read (None: not yet; the first window, which follows the build
    /// of the whole mesh's state, is checked).
    last: Option<Instant>,
}

impl Guard {
    pub(crate) fn new() -> Guard {
        Guard { limit: limit(), windows: 0, last: None }
    }

    /// After a window: Err((resident bytes, limit)) once the process holds more than the limit.
    pub(crate) fn check(&mut self) -> Result<(), (u64, u64)> {
        let Some(limit) = self.limit else { return Ok(()) };
        if let Some(last) = self.last {
            self.windows += 1;
            if self.windows < CHECK_EVERY {
                return Ok(());
            }
            self.windows = 0;
            if last.elapsed() < CHECK_INTERVAL {
                return Ok(());
            }
        }
        self.last = Some(Instant::now());
        match resident() {
            Some(rss) if rss > limit => Err((rss, limit)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kilobyte_fields() {
        let status = "Name:\twafer\nVmPeak:\t  123 kB\nVmRSS:\t    4567 kB\nThreads:\t2\n";
        assert_eq!(field_kb(status, "VmRSS:"), Some(4567));
        assert_eq!(field_kb(status, "VmSwap:"), None);
        assert_eq!(field_kb("MemAvailable:   22000000 kB\n", "MemAvailable:"), Some(22_000_000));
    }

    /// On Linux the process's own resident set is readable and nonzero.
    #[test]
    #[cfg(target_os = "linux")]
    fn reads_its_own_resident_set() {
        assert!(resident().is_some_and(|b| b > 0));
    }
}
