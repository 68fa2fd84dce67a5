//! Gateway resource usage from `/proc`: resident memory and CPU time of the
//! processes given with `--pid`, summed over all of them.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

/// Clock ticks per second of `utime`/`stime` in `/proc/PID/stat`. This is
/// `getconf CLK_TCK`, which is 100 on every mainstream Linux build; the tool
/// assumes it rather than calling into libc.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// The gateway processes being watched.
#[derive(Debug, Clone, Default)]
pub struct Gateway {
    pids: Vec<u32>,
}

/// Memory and CPU of all watched processes at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Sum of `VmRSS`, in bytes.
    pub rss_bytes: u64,
    /// Sum of `RssAnon`, in bytes: the heap and other anonymous memory,
    /// without the executable's and libraries' pages.
    pub rss_anon_bytes: u64,
    /// Sum of user and system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

/// Gateway usage over one measured window, as it appears in reports.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// CPU seconds (user + system) spent in the window.
    pub cpu_seconds: f64,
}

impl Usage {
    pub fn between(before: Sample, after: Sample) -> Usage {
        Usage {
            rss_before_bytes: before.rss_bytes,
            rss_after_bytes: after.rss_bytes,
            cpu_seconds: after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_SECOND,
        }
    }

    /// RSS growth over the window, in bytes (negative if it shrank).
    pub fn rss_growth(&self) -> i64 {
        self.rss_after_bytes as i64 - self.rss_before_bytes as i64
    }

    /// CPU time per unit of work, in microseconds; `None` without work.
    pub fn cpu_micros_per(&self, work: u64) -> Option<f64> {
        (work > 0).then(|| self.cpu_seconds * 1e6 / work as f64)
    }
}

impl Gateway {
    pub fn new(pids: &[u32]) -> Gateway {
        Gateway {
            pids: pids.to_vec(),
        }
    }

    /// Samples every process; `None` when no `--pid` was given.
    pub fn sample(&self) -> anyhow::Result<Option<Sample>> {
        if self.pids.is_empty() {
            return Ok(None);
        }
        let mut total = Sample {
            rss_bytes: 0,
            rss_anon_bytes: 0,
            cpu_ticks: 0,
        };
        for pid in &self.pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("reading /proc/{pid}/status (is --pid {pid} running?)"))?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("reading /proc/{pid}/stat"))?;
            let Some(rss) = status_bytes(&status, "VmRSS:") else {
                bail!("no VmRSS in /proc/{pid}/status");
            };
            let Some(ticks) = cpu_ticks(&stat) else {
                bail!("unexpected format of /proc/{pid}/stat");
            };
            total.rss_bytes += rss;
            total.rss_anon_bytes += status_bytes(&status, "RssAnon:").unwrap_or(0);
            total.cpu_ticks += ticks;
        }
        Ok(Some(total))
    }

    /// Samples after `settle`, letting in-flight work finish first.
    pub async fn sample_after(&self, settle: Duration) -> anyhow::Result<Option<Sample>> {
        if self.pids.is_empty() {
            return Ok(None);
        }
        tokio::time::sleep(settle).await;
        self.sample()
    }
}

/// A line such as `VmRSS:   1234 kB` from `/proc/PID/status`, in bytes.
fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `utime + stime` (fields 14 and 15) from `/proc/PID/stat`. The command
/// name in field 2 may contain spaces and parentheses, so fields are counted
/// from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state), 4, ...; utime is field 14.
    let mut fields = after_name.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss() {
        let status = "Name:\therald\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nRssAnon:\t  1024 kB\nThreads:\t3\n";
        assert_eq!(status_bytes(status, "VmRSS:"), Some(2048 * 1024));
        assert_eq!(status_bytes(status, "RssAnon:"), Some(1024 * 1024));
        assert_eq!(status_bytes("Name:\tx\n", "VmRSS:"), None);
    }

    #[test]
    fn parses_cpu_ticks_even_with_odd_names() {
        let stat =
            "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let gateway = Gateway::new(&[std::process::id()]);
        let sample = gateway.sample().unwrap().unwrap();
        assert!(sample.rss_bytes > 0);
        assert_eq!(Gateway::default().sample().unwrap(), None);
    }

    #[test]
    fn usage_over_a_window() {
        let before = Sample {
            rss_bytes: 1000,
            rss_anon_bytes: 500,
            cpu_ticks: 100,
        };
        let after = Sample {
            rss_bytes: 3000,
            rss_anon_bytes: 700,
            cpu_ticks: 150,
        };
        let usage = Usage::between(before, after);
        assert_eq!(usage.rss_growth(), 2000);
        assert!((usage.cpu_seconds - 0.5).abs() < 1e-9);
        assert_eq!(usage.cpu_micros_per(0), None);
        assert!((usage.cpu_micros_per(1000).unwrap() - 500.0).abs() < 1e-9);
    }
}
