//! Results: the JSON line, the readable table, target checks, and the
//! Markdown tables `scripts/bench` puts into `docs/benchmarks.md`.
//!
//! Targets only label a result as met or missed; they never change how a
//! scenario runs.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};

use super::Phases;
use super::hist::Hist;
use super::publish::PublishReport;
use super::worker::{Protocol, WorkerReport};

#[derive(Clone, Default)]
pub struct Expect {
    pub p99_ms: Option<f64>,
    pub deliveries_per_s: Option<f64>,
    pub rss_per_conn_bytes: Option<f64>,
    pub connect_per_s: Option<f64>,
}

pub struct Outcome {
    pub label: String,
    /// What was measured ("switchboard native", "socketioxide", …) and the
    /// row of the side-by-side table it belongs to.
    pub system: String,
    pub compare: String,
    /// Published with `FCALL switchboard_publish` (offsets checked).
    pub history: bool,
    /// Recovery: when the reconnect started (µs since the epoch).
    pub reconnect_us: Option<u64>,
    pub mode: &'static str,
    pub protocol: Protocol,
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub workers: usize,
    pub nofile: (u64, u64),
    pub topic: String,
    /// Topics the connections spread over (`--topics`).
    pub topics: usize,
    pub pad: usize,
    pub rate: f64,
    pub total: WorkerReport,
    pub open: Hist,
    pub latency: Hist,
    pub publish: Option<PublishReport>,
    /// Watched processes; the first `servers` of them are Switchboard nodes.
    pub pids: Vec<(String, u32)>,
    pub servers: usize,
    pub phases: Phases,
    pub generator_cpu_s: f64,
    pub generator_rss_kb: u64,
    /// CPU seconds the whole machine was busy from start to end.
    pub machine_busy_s: f64,
    /// CPUs busy (by anything) in the second before the run.
    pub background_before: f64,
    pub wall_s: f64,
    pub expect: Expect,
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// `count` per second over `seconds`; 0 over no time.
pub fn per_s(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

impl Outcome {
    pub fn lossless(&self) -> bool {
        let t = &self.total;
        t.failed == 0
            && t.ready == t.connections
            && t.closed_early == 0
            && t.missing == 0
            && t.duplicates == 0
            && t.unexpected == 0
            && t.offset_errors == 0
            && t.not_recovered == 0
            && (self.reconnect_us.is_none() || t.reconnected == t.connections)
            && (!self.history || self.publish.as_ref().is_none_or(|p| p.errors == 0))
    }

    fn published(&self) -> u64 {
        self.publish.as_ref().map_or(0, |p| p.events)
    }

    fn expected(&self) -> u64 {
        if self.topics > 1 {
            // Each connection expects its own topic's share (the workers
            // counted what each one got and missed; a failed connection
            // missed its whole share).
            self.total.unique.saturating_sub(self.total.unexpected) + self.total.missing
        } else {
            self.published() * self.total.connections as u64
        }
    }

    fn open_seconds(&self) -> f64 {
        secs(
            self.total
                .last_open_us
                .saturating_sub(self.total.first_start_us),
        )
    }

    fn open_per_s(&self) -> f64 {
        per_s(self.total.opened as u64, self.open_seconds())
    }

    fn ready_seconds(&self) -> f64 {
        secs(
            self.total
                .last_ready_us
                .saturating_sub(self.total.first_start_us),
        )
    }

    /// From the first publication (recovery: from the reconnect) to the
    /// last delivery.
    fn delivery_seconds(&self) -> f64 {
        match &self.publish {
            Some(p) if self.total.received > 0 => secs(
                self.total
                    .last_recv_us
                    .saturating_sub(self.reconnect_us.unwrap_or(p.first_us)),
            ),
            _ => 0.0,
        }
    }

    /// Server CPU time per delivery during the run, µs.
    fn cpu_us_per_delivery(&self) -> f64 {
        if self.total.received == 0 || self.servers == 0 {
            return 0.0;
        }
        self.server_cpu_run() * 1e6 / self.total.received as f64
    }

    /// CPU seconds of the watched processes named `redis` or `redis-<n>`
    /// (the shards of a cluster) during the run, summed.
    fn redis_cpu_run(&self) -> f64 {
        self.redis_cpu_per_server().iter().sum()
    }

    /// CPU seconds of each Redis server during the run, in `--watch-pid` order.
    fn redis_cpu_per_server(&self) -> Vec<f64> {
        self.pids
            .iter()
            .enumerate()
            .filter(|(i, (name, _))| {
                (name == "redis" || name.starts_with("redis-")) && *i < self.phases.end.len()
            })
            .map(|(i, _)| self.phases.end[i].cpu_s - self.phases.ready[i].cpu_s)
            .collect()
    }

    /// WebSocket bytes (frame header and payload) per delivery, as received.
    fn bytes_per_delivery(&self) -> f64 {
        if self.total.received == 0 {
            return 0.0;
        }
        self.total.event_bytes as f64 / self.total.received as f64
    }

    /// Send syscalls of the servers per delivery (`--count-syscalls`).
    fn sends_per_delivery(&self) -> Option<f64> {
        let sends = self.phases.server_sends?;
        (self.total.received > 0).then(|| sends as f64 / self.total.received as f64)
    }

    fn deliveries_per_s(&self) -> f64 {
        per_s(self.total.received, self.delivery_seconds())
    }

    /// Server RSS growth per ready connection, bytes: from before connecting
    /// to after the hold (idle) or to all ready (other modes).
    fn rss_per_conn_bytes(&self) -> f64 {
        let after = if self.mode == "idle" {
            &self.phases.end
        } else {
            &self.phases.ready
        };
        let n = self.servers.min(after.len()).min(self.phases.start.len());
        if n == 0 || self.total.ready == 0 {
            return 0.0;
        }
        let before: u64 = self.phases.start[..n].iter().map(|s| s.rss_kb).sum();
        let after: u64 = after[..n].iter().map(|s| s.rss_kb).sum();
        (after as f64 - before as f64) * 1024.0 / self.total.ready as f64
    }

    fn server_cpu_run(&self) -> f64 {
        (0..self.servers.min(self.phases.end.len()))
            .map(|i| self.phases.end[i].cpu_s - self.phases.ready[i].cpu_s)
            .sum()
    }

    /// CPU seconds used during the run by processes that are neither
    /// watched nor the generator (other work on the machine).
    fn other_cpu_s(&self) -> f64 {
        let watched: f64 = (0..self.phases.end.len())
            .map(|i| self.phases.end[i].cpu_s - self.phases.start[i].cpu_s)
            .sum();
        (self.machine_busy_s - watched - self.generator_cpu_s).max(0.0)
    }

    fn checks(&self) -> Vec<(String, String, bool)> {
        let mut c = Vec::new();
        let t = &self.total;
        if self.publish.is_some() {
            let mut measured = format!(
                "{}/{} delivered, {} missing, {} duplicates, {} closed early, {} failed",
                t.unique,
                self.expected(),
                t.missing,
                t.duplicates,
                t.closed_early,
                t.failed
            );
            if self.history {
                let errors = self.publish.as_ref().map_or(0, |p| p.errors);
                let _ = write!(
                    measured,
                    ", {} offset errors, {errors} publish errors",
                    t.offset_errors
                );
            }
            if self.reconnect_us.is_some() {
                let _ = write!(
                    measured,
                    ", {}/{} reconnected, {} recovered, {} not recovered",
                    t.reconnected, t.connections, t.recovered, t.not_recovered
                );
            }
            c.push(("nothing lost".to_string(), measured, self.lossless()));
        } else {
            c.push((
                "every connection ready".to_string(),
                format!(
                    "{}/{} ready, {} failed, {} closed early",
                    t.ready, t.connections, t.failed, t.closed_early
                ),
                self.lossless(),
            ));
        }
        if let Some(x) = self.expect.p99_ms {
            let p99 = ms(self.latency.quantile(0.99));
            c.push((format!("p99 ≤ {x} ms"), format!("{p99} ms"), p99 <= x));
        }
        if let Some(x) = self.expect.deliveries_per_s {
            let v = self.deliveries_per_s();
            c.push((
                format!("≥ {} deliveries/s", thousands(x)),
                format!("{} /s", thousands(v)),
                v >= x,
            ));
        }
        if let Some(x) = self.expect.rss_per_conn_bytes {
            let v = self.rss_per_conn_bytes();
            c.push((
                format!("≤ {} bytes RSS per connection", thousands(x)),
                format!("{} bytes", thousands(v)),
                v <= x,
            ));
        }
        if let Some(x) = self.expect.connect_per_s {
            let v = self.open_per_s();
            c.push((
                format!("≥ {} connections/s", thousands(x)),
                format!("{} /s", thousands(v)),
                v >= x,
            ));
        }
        c
    }

    pub fn to_json(&self) -> Value {
        let t = &self.total;
        let lat = &self.latency;
        let servers: Vec<Value> = self
            .pids
            .iter()
            .enumerate()
            .map(|(i, (name, pid))| {
                let (s, r, e) = (
                    self.phases.start[i],
                    self.phases.ready[i],
                    self.phases.end[i],
                );
                json!({
                    "name": name,
                    "pid": pid,
                    "server": i < self.servers,
                    "cpu_s_connect": round(r.cpu_s - s.cpu_s, 2),
                    "cpu_s_run": round(e.cpu_s - r.cpu_s, 2),
                    "rss_kb_start": s.rss_kb,
                    "rss_kb_ready": r.rss_kb,
                    "rss_kb_end": e.rss_kb,
                    "hwm_kb": e.hwm_kb,
                })
            })
            .collect();
        let checks: Vec<Value> = self
            .checks()
            .into_iter()
            .map(|(target, measured, met)| json!({"target": target, "measured": measured, "met": met}))
            .collect();
        json!({
            "scenario": self.label,
            "system": self.system,
            "compare": self.compare,
            "history": self.history,
            "mode": self.mode,
            "protocol": self.protocol,
            "connections": t.connections,
            "targets": self.targets,
            "sources": self.sources,
            "workers": self.workers,
            "nofile": self.nofile.0,
            "topic": self.topic,
            "topics": self.topics,
            "connect": {
                "opened": t.opened,
                "ready": t.ready,
                "failed": t.failed,
                "fail_reasons": t.fail_reasons,
                "open_seconds": round(self.open_seconds(), 3),
                "open_per_s": self.open_per_s().round(),
                "ready_seconds": round(self.ready_seconds(), 3),
                "handshake_ms": {
                    "p50": ms(self.open.quantile(0.5)),
                    "p99": ms(self.open.quantile(0.99)),
                    "max": ms(self.open.max()),
                },
            },
            "publish": self.publish.as_ref().map(|p| json!({
                "events": p.events,
                "rate_target": self.rate,
                "rate": p.rate.round(),
                "seconds": round(p.seconds, 3),
                "pad_bytes": self.pad,
                "errors": p.errors,
                "max_behind_ms": round(p.max_behind_ms, 2),
                "first_offset": p.first_offset,
                "last_offset": p.last_offset,
                "redis_receivers_min": p.receivers_min,
                "redis_receivers_max": p.receivers_max,
                "shards": p.shards,
            })),
            "delivery": {
                "expected": self.expected(),
                "unique": t.unique,
                "received": t.received,
                "missing": t.missing,
                "duplicates": t.duplicates,
                "unexpected": t.unexpected,
                "closed_early": t.closed_early,
                "close_reasons": t.close_reasons,
                "complete_connections": t.complete,
                "offset_errors": t.offset_errors,
                "min_per_conn": t.min_per_conn,
                "max_per_conn": t.max_per_conn,
                "seconds": round(self.delivery_seconds(), 3),
                "per_s": self.deliveries_per_s().round(),
                "bytes": t.event_bytes,
                "bytes_per_delivery": round(self.bytes_per_delivery(), 1),
                "latency_ms": {
                    "p50": ms(lat.quantile(0.5)),
                    "p90": ms(lat.quantile(0.9)),
                    "p99": ms(lat.quantile(0.99)),
                    "p999": ms(lat.quantile(0.999)),
                    "max": ms(lat.max()),
                    "mean": round(lat.mean() / 1000.0, 2),
                },
            },
            "processes": servers,
            "rss_per_conn_bytes": self.rss_per_conn_bytes().round(),
            "server_cpu_s_run": round(self.server_cpu_run(), 2),
            "server_cpu_us_per_delivery": round(self.cpu_us_per_delivery(), 3),
            "server_send_syscalls_run": self.phases.server_sends,
            "server_sends_per_delivery": self.sends_per_delivery().map(|v| round(v, 4)),
            "redis_cpu_s_run": round(self.redis_cpu_run(), 3),
            "redis_cpu_s_per_server": self
                .redis_cpu_per_server()
                .iter()
                .map(|&c| round(c, 3))
                .collect::<Vec<_>>(),
            "recovery": self.reconnect_us.map(|_| json!({
                "disconnected": t.disconnected,
                "reconnected": t.reconnected,
                "recovered": t.recovered,
                "not_recovered": t.not_recovered,
                "seconds_until_all_live": round(self.delivery_seconds(), 3),
                "server_cpu_s": round(self.server_cpu_run(), 3),
                "redis_cpu_s": round(self.redis_cpu_run(), 3),
            })),
            "generator": {
                "cpu_s": round(self.generator_cpu_s, 2),
                "rss_kb": self.generator_rss_kb,
            },
            "machine": {
                "busy_cpu_s": round(self.machine_busy_s, 2),
                "other_cpu_s": round(self.other_cpu_s(), 2),
                "background_cpus_before": round(self.background_before, 2),
            },
            "lossless": self.lossless(),
            "checks": checks,
            "wall_s": round(self.wall_s, 2),
            "unix_time": super::now_us() / 1_000_000,
        })
    }

    pub fn table(&self) -> String {
        let t = &self.total;
        let mut s = String::new();
        let proto = match self.protocol {
            Protocol::Native => "native",
            Protocol::Socketio => "socket.io",
            Protocol::Sse => "sse",
        };
        let _ = writeln!(
            s,
            "\n== {} ({}, {}): {} connections → {} node(s), {} worker(s), RLIMIT_NOFILE {}",
            self.label,
            self.mode,
            proto,
            t.connections,
            self.targets.len(),
            self.workers,
            self.nofile.0
        );
        let _ = writeln!(
            s,
            "  connect    {}/{} ready ({} failed{}) in {:.2} s; opened at {}/s; handshake p50 {} ms p99 {} ms max {} ms",
            t.ready,
            t.connections,
            t.failed,
            reasons(&t.fail_reasons),
            self.ready_seconds(),
            thousands(self.open_per_s()),
            ms(self.open.quantile(0.5)),
            ms(self.open.quantile(0.99)),
            ms(self.open.max()),
        );
        if let Some(p) = &self.publish {
            let receivers = if self.history {
                format!(
                    "FCALL offsets {}..{} epoch {}",
                    p.first_offset, p.last_offset, p.epoch
                )
            } else {
                format!("Redis receivers {}..{}", p.receivers_min, p.receivers_max)
            };
            let _ = writeln!(
                s,
                "  publish    {} events in {:.3} s ({}/s, target {}), pad {} B, {receivers}, errors {}",
                p.events,
                p.seconds,
                thousands(p.rate),
                if self.rate > 0.0 {
                    format!("{}/s", thousands(self.rate))
                } else {
                    "max".into()
                },
                self.pad,
                p.errors
            );
            let _ = writeln!(
                s,
                "  delivery   {}/{} ({} missing, {} duplicates, {} unexpected, {} closed early{}) in {:.3} s = {} deliveries/s",
                thousands(t.unique as f64),
                thousands(self.expected() as f64),
                t.missing,
                t.duplicates,
                t.unexpected,
                t.closed_early,
                reasons(&t.close_reasons),
                self.delivery_seconds(),
                thousands(self.deliveries_per_s()),
            );
            if self.reconnect_us.is_some() {
                let _ = writeln!(
                    s,
                    "  recovery   {}/{} reconnected ({} recovered, {} not); all live {:.3} s after the reconnect; server CPU {:.2} s, Redis CPU {:.3} s",
                    t.reconnected,
                    t.connections,
                    t.recovered,
                    t.not_recovered,
                    self.delivery_seconds(),
                    self.server_cpu_run(),
                    self.redis_cpu_run(),
                );
            }
            if self.history {
                let _ = writeln!(s, "  history    {} offset errors", t.offset_errors);
            }
            let _ = writeln!(
                s,
                "  cpu        {:.3} µs server CPU per delivery",
                self.cpu_us_per_delivery()
            );
            let _ = writeln!(
                s,
                "  wire       {:.1} bytes per delivery{}",
                self.bytes_per_delivery(),
                match self.sends_per_delivery() {
                    Some(v) => format!("; {v:.3} server send syscalls per delivery"),
                    None => String::new(),
                }
            );
            let l = &self.latency;
            let _ = writeln!(
                s,
                "  latency    p50 {} ms  p90 {} ms  p99 {} ms  p99.9 {} ms  max {} ms",
                ms(l.quantile(0.5)),
                ms(l.quantile(0.9)),
                ms(l.quantile(0.99)),
                ms(l.quantile(0.999)),
                ms(l.max())
            );
        } else if t.closed_early > 0 {
            let _ = writeln!(
                s,
                "  closed     {} early{}",
                t.closed_early,
                reasons(&t.close_reasons)
            );
        }
        for (i, (name, pid)) in self.pids.iter().enumerate() {
            let (a, r, e) = (
                self.phases.start[i],
                self.phases.ready[i],
                self.phases.end[i],
            );
            let _ = writeln!(
                s,
                "  {:<10} pid {pid}: cpu {:.2} s connecting, {:.2} s after; rss {:.1} → {:.1} → {:.1} MiB (peak {:.1})",
                name,
                r.cpu_s - a.cpu_s,
                e.cpu_s - r.cpu_s,
                a.rss_kb as f64 / 1024.0,
                r.rss_kb as f64 / 1024.0,
                e.rss_kb as f64 / 1024.0,
                e.hwm_kb as f64 / 1024.0,
            );
        }
        if self.servers > 0 {
            let _ = writeln!(
                s,
                "  memory     server RSS per connection {} bytes",
                thousands(self.rss_per_conn_bytes())
            );
        }
        let _ = writeln!(
            s,
            "  generator  cpu {:.2} s, rss {:.1} MiB; wall {:.1} s",
            self.generator_cpu_s,
            self.generator_rss_kb as f64 / 1024.0,
            self.wall_s
        );
        let _ = writeln!(
            s,
            "  machine    busy {:.2} CPU s during the run, {:.2} s of it by other processes; {:.2} CPUs busy before",
            self.machine_busy_s,
            self.other_cpu_s(),
            self.background_before
        );
        for (target, measured, met) in self.checks() {
            let _ = writeln!(
                s,
                "  target     {target}: {} ({measured})",
                if met { "met" } else { "MISSED" }
            );
        }
        s
    }
}

fn reasons(r: &std::collections::BTreeMap<String, usize>) -> String {
    if r.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = r.iter().map(|(k, v)| format!("{v}× {k}")).collect();
    format!(": {}", parts.join(", "))
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(v: f64) -> String {
    let n = v.round() as i128;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

// === Markdown ===

/// The Markdown tables of `scripts/bench` from a file of JSON lines: all
/// results, the side-by-side comparison (per scenario: Switchboard native,
/// Switchboard Socket.IO, socketioxide, the probe), recovery, targets.
pub fn markdown(path: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    // The scale scenario's rows have their own tables (scripts/bench puts
    // them in their own section).
    let (scale, rows): (Vec<Value>, Vec<Value>) = rows
        .into_iter()
        .partition(|r| r["mode"].as_str() == Some("scale"));
    if rows.is_empty() {
        return Ok(super::scale::markdown(&scale));
    }
    let mut s = String::new();
    s.push_str(
        "| Scenario | System | Connections | Events | Delivered / expected | Lost | Dup. | Closed early | Deliveries/s | p50 ms | p90 ms | p99 ms | max ms | Opened/s | Server RSS/conn | Server CPU s | Server CPU µs/delivery | Redis CPU s | Generator CPU s | Other CPU s |\n",
    );
    s.push_str(
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for r in &rows {
        let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
        let probe = r["mode"].as_str() == Some("probe");
        let published = r.pointer("/publish/events").and_then(Value::as_u64);
        let has_pub = published.is_some();
        let dash = |v: String| if has_pub { v } else { "–".into() };
        let lat = |p: &str| {
            if has_pub && !probe {
                f(p).to_string()
            } else {
                "–".into()
            }
        };
        let cpu: f64 = server_processes(r)
            .map(|p| {
                p["cpu_s_connect"].as_f64().unwrap_or(0.0) + p["cpu_s_run"].as_f64().unwrap_or(0.0)
            })
            .sum::<f64>()
            + if probe { f("/server_cpu_s_run") } else { 0.0 };
        let rate = match r.pointer("/publish/rate_target").and_then(Value::as_f64) {
            Some(x) if x > 0.0 => format!(" @ {}/s", thousands(x)),
            Some(_) => " @ max".into(),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {:.1} | {:.1} |",
            r["scenario"].as_str().unwrap_or("?"),
            system(r),
            thousands(f("/connections")),
            published.map_or("–".into(), |e| format!("{}{rate}", thousands(e as f64))),
            dash(format!(
                "{} / {}",
                thousands(f("/delivery/unique")),
                thousands(f("/delivery/expected"))
            )),
            dash(thousands(f("/delivery/missing"))),
            dash(thousands(f("/delivery/duplicates"))),
            thousands(f("/delivery/closed_early")),
            dash(thousands(f("/delivery/per_s"))),
            lat("/delivery/latency_ms/p50"),
            lat("/delivery/latency_ms/p90"),
            lat("/delivery/latency_ms/p99"),
            lat("/delivery/latency_ms/max"),
            if probe {
                "–".into()
            } else {
                thousands(f("/connect/open_per_s"))
            },
            if probe {
                "–".into()
            } else {
                format!("{} B", thousands(f("/rss_per_conn_bytes")))
            },
            cpu,
            dash(format!("{:.2}", f("/server_cpu_us_per_delivery"))),
            if probe { "–".into() } else { redis_cpu(r) },
            f("/generator/cpu_s"),
            f("/machine/other_cpu_s"),
        );
    }

    // Side by side: the rows that delivered something, grouped by scenario.
    let mut groups: Vec<&str> = Vec::new();
    for r in &rows {
        let g = r["compare"]
            .as_str()
            .or(r["scenario"].as_str())
            .unwrap_or("?");
        if r.pointer("/publish/events").is_some() && r["recovery"].is_null() && !groups.contains(&g)
        {
            groups.push(g);
        }
    }
    if !groups.is_empty() {
        s.push_str(
            "\n| Scenario | System | Connections | Deliveries/s | p50 ms | p99 ms | Server CPU µs/delivery | Server sends/delivery | Bytes/delivery | Redis CPU s | Other CPU s |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for g in groups {
            for r in rows.iter().filter(|r| {
                r["compare"].as_str().or(r["scenario"].as_str()) == Some(g)
                    && r.pointer("/publish/events").is_some()
                    && r["recovery"].is_null()
            }) {
                let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
                let probe = r["mode"].as_str() == Some("probe");
                let lat = |p: &str| {
                    if probe {
                        "–".into()
                    } else {
                        f(p).to_string()
                    }
                };
                let sends = match r
                    .pointer("/server_sends_per_delivery")
                    .and_then(Value::as_f64)
                {
                    Some(v) => format!("{v:.3}"),
                    None => "–".into(),
                };
                let bytes = match r
                    .pointer("/delivery/bytes_per_delivery")
                    .and_then(Value::as_f64)
                {
                    Some(v) if !probe && v > 0.0 => format!("{v:.0}"),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {g} | {} | {} | {} | {} | {} | {:.2} | {sends} | {bytes} | {} | {:.1} |",
                    system(r),
                    thousands(f("/connections")),
                    thousands(f("/delivery/per_s")),
                    lat("/delivery/latency_ms/p50"),
                    lat("/delivery/latency_ms/p99"),
                    f("/server_cpu_us_per_delivery"),
                    if probe { "–".into() } else { redis_cpu(r) },
                    f("/machine/other_cpu_s"),
                );
            }
        }
    }

    s.push_str(&against_peer(&rows));

    let recoveries: Vec<&Value> = rows.iter().filter(|r| r["recovery"].is_object()).collect();
    if !recoveries.is_empty() {
        s.push_str(
            "\n| Recovery | Connections | Missed publications | Reconnected | `recovered: true` | Offset errors | All live after s | p50 / p99 per connection ms | Server CPU s | Redis CPU s |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for r in recoveries {
            let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {} / {} | {:.2} | {:.3} |",
                r["scenario"].as_str().unwrap_or("?"),
                thousands(f("/connections")),
                thousands(f("/publish/events")),
                thousands(f("/recovery/reconnected")),
                thousands(f("/recovery/recovered")),
                thousands(f("/delivery/offset_errors")),
                f("/recovery/seconds_until_all_live"),
                f("/delivery/latency_ms/p50"),
                f("/delivery/latency_ms/p99"),
                f("/recovery/server_cpu_s"),
                f("/recovery/redis_cpu_s"),
            );
        }
    }

    s.push_str("\n| Scenario | Target | Measured | Result |\n|---|---|---|---|\n");
    for r in &rows {
        for c in r["checks"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                r["scenario"].as_str().unwrap_or("?"),
                c["target"].as_str().unwrap_or("?"),
                c["measured"].as_str().unwrap_or("?"),
                if c["met"].as_bool() == Some(true) {
                    "met"
                } else {
                    "**missed**"
                }
            );
        }
    }
    Ok(s)
}

/// Each Switchboard row next to the socketioxide row of the same scenario
/// (same run), as ratios; on `fanout` with issue 23's targets: server CPU
/// per delivery at most the peer's, p99 at most half the peer's.
fn against_peer(rows: &[Value]) -> String {
    let mut s = String::new();
    let group = |r: &Value| {
        r["compare"]
            .as_str()
            .or(r["scenario"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let delivered = |r: &&Value| {
        r.pointer("/publish/events").is_some()
            && r["recovery"].is_null()
            && r["mode"].as_str() != Some("probe")
    };
    for peer in rows.iter().filter(delivered).filter(|r| {
        r["system"]
            .as_str()
            .is_some_and(|v| v.starts_with("socketioxide"))
    }) {
        let g = group(peer);
        let f = |r: &Value, p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
        let (peer_cpu, peer_p99) = (
            f(peer, "/server_cpu_us_per_delivery"),
            f(peer, "/delivery/latency_ms/p99"),
        );
        if peer_cpu <= 0.0 || peer_p99 <= 0.0 {
            continue;
        }
        if s.is_empty() {
            s.push_str(
                "\n| Scenario | System | Server CPU µs/delivery (peer) | CPU / peer's | p99 ms (peer) | p99 / peer's | Targets (fanout: CPU ≤ 1×, p99 ≤ 0.5×) |\n|---|---|--:|--:|--:|--:|---|\n",
            );
        }
        for r in rows.iter().filter(delivered).filter(|r| {
            group(r) == g
                && r["system"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("switchboard"))
        }) {
            let (cpu, p99) = (
                f(r, "/server_cpu_us_per_delivery"),
                f(r, "/delivery/latency_ms/p99"),
            );
            let verdict = if g == "fanout" {
                let ok = |met: bool| if met { "met" } else { "**missed**" };
                format!(
                    "CPU {}, p99 {}",
                    ok(cpu <= peer_cpu),
                    ok(p99 <= peer_p99 / 2.0)
                )
            } else {
                "–".into()
            };
            let _ = writeln!(
                s,
                "| {g} | {} vs {} | {cpu:.2} ({peer_cpu:.2}) | {:.2} | {p99} ({peer_p99}) | {:.2} | {verdict} |",
                system(r),
                system(peer),
                cpu / peer_cpu,
                p99 / peer_p99,
            );
        }
    }
    s
}

/// The Redis CPU cell: the sum, and with several servers (a cluster) each
/// shard's share, e.g. `0.90 (0.31 + 0.29 + 0.30)`.
fn redis_cpu(r: &Value) -> String {
    let sum = r
        .pointer("/redis_cpu_s_run")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let per: Vec<f64> = r
        .pointer("/redis_cpu_s_per_server")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    if per.len() > 1 {
        let parts: Vec<String> = per.iter().map(|c| format!("{c:.2}")).collect();
        format!("{sum:.2} ({})", parts.join(" + "))
    } else {
        format!("{sum:.2}")
    }
}

fn server_processes(r: &Value) -> impl Iterator<Item = &Value> {
    r.get("processes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| p["server"].as_bool() == Some(true))
}

/// The system column; results written before it existed fall back to the
/// protocol.
fn system(r: &Value) -> String {
    match r["system"].as_str() {
        Some(v) => v.to_string(),
        None => format!("switchboard {}", r["protocol"].as_str().unwrap_or("?")),
    }
}

#[cfg(test)]
mod tests {
    use super::{against_peer, thousands};
    use serde_json::json;

    #[test]
    fn each_switchboard_row_is_set_against_the_peer_of_its_scenario() {
        let row = |system: &str, compare: &str, cpu: f64, p99: f64| {
            json!({"system": system, "compare": compare, "mode": "fanout",
                "publish": {"events": 10}, "recovery": null,
                "server_cpu_us_per_delivery": cpu, "delivery": {"latency_ms": {"p99": p99}}})
        };
        let rows = [
            row("switchboard socket.io", "fanout", 3.0, 10.0),
            row("switchboard native", "fanout", 3.5, 13.0),
            row("socketioxide", "fanout", 3.3, 25.0),
            row("switchboard socket.io", "moderate", 5.0, 1.0),
            row("socketioxide", "moderate", 5.2, 35.0),
        ];
        let table = against_peer(&rows);
        assert!(table.contains("| fanout | switchboard socket.io vs socketioxide | 3.00 (3.30) | 0.91 | 10 (25) | 0.40 | CPU met, p99 met |"), "{table}");
        assert!(table.contains("| fanout | switchboard native vs socketioxide | 3.50 (3.30) | 1.06 | 13 (25) | 0.52 | CPU **missed**, p99 **missed** |"), "{table}");
        assert!(table.contains("| moderate | switchboard socket.io vs socketioxide | 5.00 (5.20) | 0.96 | 1 (35) | 0.03 | – |"), "{table}");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(-1234.0), "-1,234");
    }
}
