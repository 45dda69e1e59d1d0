//! The physical-limit probe: what one `write(2)` of one small frame to each
//! of N loopback TCP sockets costs on this machine, with nothing else in
//! the way (no runtime, no queues, no framing work). A server that sends
//! every delivery with its own `write` cannot go below this CPU per
//! delivery; `scripts/bench` reports it next to the servers.
//!
//! N connection pairs on 127.0.0.1: the sending ends are written by one
//! blocking thread, round after round (one frame per socket per round, at
//! `--rate` rounds per second or as fast as it goes); the receiving ends are
//! drained by a single-threaded tokio runtime on another thread. CPU is read
//! per thread from `/proc/thread-self/stat`. On loopback the sender's CPU
//! includes the receiving socket's TCP processing (softirq work runs in
//! the sender's context), as it does for a server.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::report::thousands;
use super::{dur, num, procfs};

struct Args {
    pairs: usize,
    rate: f64,
    duration: Duration,
    size: usize,
    label: String,
    compare: Option<String>,
    out: Option<String>,
    quiet_wait: Duration,
}

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut a = Args {
        pairs: 1000,
        rate: 0.0,
        duration: Duration::from_secs(3),
        size: 150,
        label: "probe".into(),
        compare: None,
        out: None,
        quiet_wait: Duration::ZERO,
    };
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let mut value = || it.next().with_context(|| format!("{name} needs a value"));
        match name.as_str() {
            "--pairs" => a.pairs = num::<usize>(value()?, name)?.max(1),
            "--rate" => a.rate = num(value()?, name)?,
            "--duration" => a.duration = dur(value()?, name)?,
            "--size" => a.size = num::<usize>(value()?, name)?.max(1),
            "--label" => a.label = value()?.clone(),
            "--compare" => a.compare = Some(value()?.clone()),
            "--out" => a.out = Some(value()?.clone()),
            "--quiet-wait" => a.quiet_wait = dur(value()?, name)?,
            _ => anyhow::bail!("probe: unknown option {name} (see --help)"),
        }
    }
    let background_before = super::wait_quiet(a.quiet_wait, 0.25);
    procfs::raise_nofile();

    // === connection pairs ===
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut senders = Vec::with_capacity(a.pairs);
    let mut receivers = Vec::with_capacity(a.pairs);
    for _ in 0..a.pairs {
        let client = TcpStream::connect(addr).context("connecting a pair")?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        senders.push(server);
        receivers.push(client);
    }

    // === receiving side ===
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (cpu_tx, cpu_rx) = std::sync::mpsc::channel::<f64>();
    let rx_thread = {
        let received = received.clone();
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let start_cpu = procfs::thread_cpu_s();
                for s in receivers {
                    let received = received.clone();
                    let mut s = tokio::net::TcpStream::from_std(s)?;
                    tokio::task::spawn_local(async move {
                        let mut buf = vec![0u8; 4096];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    });
                }
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let _ = cpu_tx.send(procfs::thread_cpu_s() - start_cpu);
                anyhow::Ok(())
            })
        })
    };

    // === sending side (this thread) ===
    let frame = frame(a.size);
    let busy_start = procfs::machine_busy_s();
    let process_start = procfs::sample(std::process::id()).cpu_s;
    let cpu_start = procfs::thread_cpu_s();
    let start = Instant::now();
    let planned = (a.rate > 0.0).then(|| (a.rate * a.duration.as_secs_f64()).round() as u64);
    let mut rounds = 0u64;
    let mut max_behind = Duration::ZERO;
    loop {
        match planned {
            Some(n) if rounds >= n => break,
            Some(_) => {
                let due = Duration::from_secs_f64(rounds as f64 / a.rate);
                let now = start.elapsed();
                if due > now {
                    std::thread::sleep(due - now);
                } else {
                    max_behind = max_behind.max(now - due);
                }
            }
            None if start.elapsed() >= a.duration => break,
            None => {}
        }
        for s in &mut senders {
            s.write_all(&frame)?;
        }
        rounds += 1;
    }
    let send_seconds = start.elapsed().as_secs_f64();
    let sender_cpu = procfs::thread_cpu_s() - cpu_start;
    let writes = rounds * a.pairs as u64;
    let expected_bytes = writes * a.size as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected_bytes && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let drained_seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let receiver_cpu = cpu_rx.recv_timeout(Duration::from_secs(10)).unwrap_or(0.0);
    let process_cpu = procfs::sample(std::process::id()).cpu_s - process_start;
    let busy = procfs::machine_busy_s() - busy_start;
    drop(senders);
    let _ = rx_thread.join();
    let frames = received.load(Ordering::Relaxed) / a.size as u64;

    let per_write_us = if writes > 0 {
        sender_cpu * 1e6 / writes as f64
    } else {
        0.0
    };
    let per_frame_rx_us = if frames > 0 {
        receiver_cpu * 1e6 / frames as f64
    } else {
        0.0
    };
    let per_s = crate::report::per_s(frames, drained_seconds);
    let other = (busy - process_cpu).max(0.0);
    eprintln!(
        "\n== {} (probe): {} loopback pairs, {}-byte frames, {} rounds{}\n  \
         writes     {} in {:.3} s ({}/s), all received after {:.3} s ({} frames)\n  \
         cpu        sender {:.2} s = {:.3} µs per write; receiver {:.2} s = {:.3} µs per frame\n  \
         machine    busy {:.2} CPU s, {:.2} s of it by other processes; {:.2} CPUs busy before",
        a.label,
        a.pairs,
        a.size,
        rounds,
        if a.rate > 0.0 {
            format!(
                " at {}/s (fell behind by up to {} ms)",
                thousands(a.rate),
                max_behind.as_millis()
            )
        } else {
            " as fast as possible".into()
        },
        thousands(writes as f64),
        send_seconds,
        thousands(writes as f64 / send_seconds.max(1e-9)),
        drained_seconds,
        thousands(frames as f64),
        sender_cpu,
        per_write_us,
        receiver_cpu,
        per_frame_rx_us,
        busy,
        other,
        background_before,
    );
    let line = json!({
        "scenario": a.label,
        "system": "probe: one write(2) per frame",
        "compare": a.compare.unwrap_or_else(|| a.label.clone()),
        "mode": "probe",
        "protocol": "tcp",
        "connections": a.pairs,
        "publish": {
            "events": rounds,
            "rate_target": a.rate,
            "seconds": send_seconds,
            "max_behind_ms": max_behind.as_secs_f64() * 1000.0,
        },
        "delivery": {
            "expected": writes,
            "unique": frames,
            "received": frames,
            "missing": writes.saturating_sub(frames),
            "duplicates": 0,
            "closed_early": 0,
            "seconds": drained_seconds,
            "per_s": per_s.round(),
        },
        "frame_bytes": a.size,
        "server_cpu_s_run": sender_cpu,
        "server_cpu_us_per_delivery": per_write_us,
        "receiver_cpu_us_per_frame": per_frame_rx_us,
        "processes": [],
        "generator": { "cpu_s": receiver_cpu },
        "machine": {
            "busy_cpu_s": busy,
            "other_cpu_s": other,
            "background_cpus_before": background_before,
        },
        "checks": [],
        "unix_time": super::now_us() / 1_000_000,
    });
    super::write_result(&line, a.out.as_deref())?;
    if frames < writes {
        anyhow::bail!("{} of {writes} frames did not arrive", writes - frames);
    }
    Ok(())
}

/// An unmasked WebSocket text frame of `size` bytes in all, as a server
/// sends it (the content does not matter to the kernel).
fn frame(size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    if size >= 4 + 126 {
        f.push(0x81);
        f.push(126);
        f.extend_from_slice(&((size - 4) as u16).to_be_bytes());
    } else if size >= 2 {
        f.push(0x81);
        f.push((size - 2) as u8);
    }
    f.resize(size, b'x');
    f
}

#[cfg(test)]
mod tests {
    use super::frame;

    #[test]
    fn frames_have_the_requested_size_and_a_valid_header() {
        let f = frame(150);
        assert_eq!(f.len(), 150);
        assert_eq!(&f[..4], &[0x81, 126, 0, 146]);
        let f = frame(100);
        assert_eq!(f.len(), 100);
        assert_eq!(&f[..2], &[0x81, 98]);
    }
}
