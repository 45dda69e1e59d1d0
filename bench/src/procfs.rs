//! CPU time and resident memory of processes, from `/proc`, and the
//! descriptor limit (`RLIMIT_NOFILE`) of this one.

use std::process::Command;
use std::sync::OnceLock;

use serde::Serialize;

#[derive(Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    /// VmRSS, KiB.
    pub rss_kb: u64,
    /// VmHWM (peak RSS), KiB.
    pub hwm_kb: u64,
}

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`, 100 on
/// Linux in practice).
fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Zeros when the process is gone.
pub fn sample(pid: u32) -> Sample {
    let mut s = Sample::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        && let Some(after) = stat.rsplit_once(')').map(|(_, a)| a)
    {
        // Fields after "(comm)": state is field 3, utime 14, stime 15.
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        s.cpu_s = (ticks(11) + ticks(12)) as f64 / clk_tck();
    }
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            let kb = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("VmRSS:") {
                s.rss_kb = kb(line);
            } else if line.starts_with("VmHWM:") {
                s.hwm_kb = kb(line);
            }
        }
    }
    s
}

/// (soft, hard) open-file limits of this process.
pub fn nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    for line in limits.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            let mut it = rest.split_whitespace();
            let parse = |v: Option<&str>| match v {
                Some("unlimited") => u64::MAX,
                Some(v) => v.parse().unwrap_or(1024),
                None => 1024,
            };
            let soft = parse(it.next());
            let hard = parse(it.next());
            return (soft, hard);
        }
    }
    (1024, 1024)
}

/// Raises the soft open-file limit to the hard one (what an unprivileged
/// process may do), with `prlimit(1)` on this process since the crate has no
/// libc binding. Returns the (soft, hard) limits in force afterwards.
pub fn raise_nofile() -> (u64, u64) {
    let (soft, hard) = nofile();
    if soft < hard {
        let value = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let _ = Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={value}:{value}"))
            .status();
    }
    nofile()
}

/// CPU seconds the whole machine spent busy since boot (all CPUs; from the
/// first line of `/proc/stat`: user, nice, system, irq, softirq, steal).
pub fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (get(0) + get(1) + get(2) + get(5) + get(6) + get(7)) as f64 / clk_tck()
}

/// CPU seconds (user + system) of the calling thread so far, from
/// `/proc/thread-self/stat`; 0 when unavailable.
pub fn thread_cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return 0.0;
    };
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / clk_tck()
}
