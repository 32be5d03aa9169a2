//! Running a command while measuring its wall time and peak anonymous memory.
//!
//! Peak memory is the largest `RssAnon` seen in `/proc/<pid>/status`, sampled
//! every couple of milliseconds from a helper thread. `RssAnon` leaves out
//! the page cache of memory-mapped inputs, which would otherwise make a tool
//! that maps a 10 GB checkpoint look like it needs 10 GB of RAM. Sampling
//! can miss a spike shorter than the interval; for the sizes here that is
//! well below the figures' precision.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What one measured run produced.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Wall time from spawn to exit.
    pub wall: Duration,
    /// Peak RssAnon in bytes.
    pub peak_anon: u64,
    /// Whether the process exited with status 0.
    pub success: bool,
    /// The tail of its stderr, for error notes.
    pub stderr_tail: String,
}

/// Sampling interval for `/proc/<pid>/status`.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);

/// Runs `cmd` to completion. If `stdout_to` is given, stdout goes to that
/// file (for tools that write to stdout); otherwise it is discarded.
/// Stderr goes to `stderr_path` so a chatty child cannot block on a pipe.
pub fn run(cmd: &mut Command, stdout_to: Option<&Path>, stderr_path: &Path) -> Result<Measured> {
    let stdout = match stdout_to {
        Some(p) => Stdio::from(File::create(p).with_context(|| format!("create {}", p.display()))?),
        None => Stdio::null(),
    };
    let stderr = File::create(stderr_path)?;
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr).spawn().with_context(|| format!("spawn {cmd:?}"))?;

    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        let status_path = format!("/proc/{}/status", child.id());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = read_rss_anon_kib(&status_path) {
                    peak.fetch_max(kib * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    let status = child.wait().context("wait for child")?;
    let wall = start.elapsed();
    done.store(true, Ordering::Relaxed);
    // The sampler only reads /proc; a panic there would be a bug in this file.
    sampler.join().map_err(|_| anyhow::anyhow!("memory sampler panicked"))?;

    let err = std::fs::read_to_string(stderr_path).unwrap_or_default();
    let tail: String = err.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    Ok(Measured { wall, peak_anon: peak.load(Ordering::Relaxed), success: status.success(), stderr_tail: tail })
}

/// `RssAnon` in KiB, or `None` once the process has gone (or on kernels
/// without the field).
fn read_rss_anon_kib(status_path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(status_path).ok()?;
    parse_rss_anon_kib(&text)
}

fn parse_rss_anon_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let s = "Name:\tzstd\nVmRSS:\t  9000 kB\nRssAnon:\t    1234 kB\nRssFile:\t 100 kB\n";
        assert_eq!(parse_rss_anon_kib(s), Some(1234));
        assert_eq!(parse_rss_anon_kib("Name: x\n"), None);
    }

    #[test]
    fn measures_a_child_that_allocates() {
        // Python is not guaranteed; `head -c` through `sh` holds little anon memory,
        // so only check that the run succeeds and time is recorded.
        let dir = std::env::temp_dir();
        let m = run(Command::new("sh").args(["-c", "sleep 0.05"]), None, &dir.join("tpde-bench-measure-test.err"))
            .expect("run");
        assert!(m.success);
        assert!(m.wall >= Duration::from_millis(40));
    }
}
