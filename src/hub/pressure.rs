//! How much of the time runnable threads wait for a CPU: the fan-out's sign
//! that a write now costs more than the latency a longer batch adds.
//!
//! The pacer's write budget ([`super::pacer::BUDGET`]) is a fixed share of a
//! core. On a machine whose CPUs are contended (clients or a load generator
//! on the same box, other pods on the node), every write takes its CPU from
//! somebody else, and a publication already spends most of its latency
//! waiting for a CPU, in this node or in its receivers. There, batching more
//! lowers both the CPU and the latency: the `fanout` shape on a saturated
//! 2-vCPU machine measured 6.5 µs per delivery and p99 50–72 ms in pairs,
//! 4.9 µs and p99 34 ms in threes (docs/benchmarks.md). Where CPUs are free,
//! the same threes would only add latency.
//!
//! Linux reports that waiting as pressure stall information (PSI): the
//! `some` line of `cpu.pressure` counts the microseconds during which at
//! least one runnable task waited for a CPU. The share of wall time it
//! grows by is read every [`PERIOD`] from the node's own cgroup (v2) when it
//! has the file, else from the whole system's `/proc/pressure/cpu`. Without
//! either (not Linux, PSI compiled out or disabled) the share stays 0 and
//! the pacer works from its demand alone, as it did before.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics as m;

/// How often the pressure is read: the pacer's demand window.
const PERIOD: Duration = Duration::from_millis(100);

/// The CPU pressure as the fan-out sees it, smoothed over a few periods.
#[derive(Default)]
pub struct Pressure {
    /// Share of wall time, in millionths.
    millionths: AtomicU32,
}

impl Pressure {
    /// No pressure until a sampler runs.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A fixed share, for tests of what depends on it.
    #[cfg(test)]
    pub fn fixed(share: f64) -> Arc<Self> {
        let p = Self::default();
        p.store(share);
        Arc::new(p)
    }

    /// The share of the last periods' wall time during which some runnable
    /// thread waited for a CPU, 0–1.
    pub fn share(&self) -> f64 {
        f64::from(self.millionths.load(Ordering::Relaxed)) / 1e6
    }

    fn store(&self, share: f64) {
        let share = share.clamp(0.0, 1.0);
        self.millionths
            .store((share * 1e6).round() as u32, Ordering::Relaxed);
        metrics::gauge!(m::CPU_PRESSURE).set(share);
    }

    /// Starts reading the pressure every [`PERIOD`] while `self` lives.
    /// `None` when this system reports none.
    pub fn spawn_sampler(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let source = source()?;
        tracing::debug!(source = %source.display(), "the fan-out follows CPU pressure");
        self.sample(source)
    }

    fn sample(self: &Arc<Self>, source: PathBuf) -> Option<tokio::task::JoinHandle<()>> {
        let mut last = (read_total(&source)?, Instant::now());
        let pressure: Weak<Self> = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pressure) = pressure.upgrade() else {
                    return;
                };
                // A file that stops being readable leaves the last value.
                let Some(total) = read_total(&source) else {
                    continue;
                };
                let now = Instant::now();
                let wall = now.duration_since(last.1).as_micros().max(1) as f64;
                let share = total.saturating_sub(last.0) as f64 / wall;
                last = (total, now);
                pressure.store(0.5 * pressure.share() + 0.5 * share.min(1.0));
            }
        }))
    }
}

/// The node's own cgroup's `cpu.pressure` (cgroup v2, also under a hybrid
/// hierarchy's `unified` mount), else the system's.
fn source() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim_start_matches('/'));
    let candidates = own
        .into_iter()
        .flat_map(|path| {
            [
                Path::new("/sys/fs/cgroup").join(path),
                Path::new("/sys/fs/cgroup/unified").join(path),
            ]
        })
        .map(|dir| dir.join("cpu.pressure"))
        .chain([PathBuf::from("/proc/pressure/cpu")]);
    candidates.into_iter().find(|p| read_total(p).is_some())
}

fn read_total(path: &Path) -> Option<u64> {
    parse_some_total(&std::fs::read_to_string(path).ok()?)
}

/// The `total=` of the `some` line: microseconds with at least one runnable
/// task waiting, since boot (or since the cgroup was made).
fn parse_some_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_some_line_total_is_read() {
        let text = "some avg10=0.85 avg60=8.87 avg300=8.90 total=341273926\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=12\n";
        assert_eq!(parse_some_total(text), Some(341_273_926));
        assert_eq!(parse_some_total("full avg10=0.00 total=12\n"), None);
        assert_eq!(parse_some_total("some avg10=0.85 total=x\n"), None);
        assert_eq!(parse_some_total(""), None);
    }

    #[test]
    fn a_share_is_kept_between_0_and_1() {
        assert_eq!(Pressure::new().share(), 0.0);
        assert_eq!(Pressure::fixed(0.25).share(), 0.25);
        assert_eq!(Pressure::fixed(3.0).share(), 1.0);
        assert_eq!(Pressure::fixed(-1.0).share(), 0.0);
    }

    /// The sampler follows the file's `some` total as a share of wall
    /// time, and ends with its owner.
    #[tokio::test(start_paused = true)]
    async fn the_sampler_follows_the_stall_time_and_ends_with_its_owner() {
        let dir = std::env::temp_dir().join(format!("sb-pressure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cpu.pressure");
        let write = |total: u64| {
            std::fs::write(
                &file,
                format!("some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\n"),
            )
            .unwrap()
        };
        write(0);
        let pressure = Pressure::new();
        let task = pressure.sample(file.clone()).expect("a readable file");
        // Stalled for the whole of every period from now on.
        let start = Instant::now();
        for _ in 0..30 {
            tokio::time::sleep(PERIOD / 4).await;
            write(start.elapsed().as_micros() as u64);
        }
        assert!(pressure.share() > 0.8, "{}", pressure.share());
        // No stall any more: the share decays.
        tokio::time::sleep(PERIOD * 8).await;
        assert!(pressure.share() < 0.1, "{}", pressure.share());
        drop(pressure);
        tokio::time::timeout(PERIOD * 5, task)
            .await
            .expect("the sampler ended")
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
