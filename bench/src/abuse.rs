//! The abuse scenario (issue 26): hostile anonymous clients subscribe to and
//! unsubscribe from new random topics as fast as the nodes let them, while
//! Redis (`INFO memory` `used_memory`, `DBSIZE`) and the nodes' RSS are
//! sampled every second, during the run and for a while after it. The
//! report is the growth per client-second: what one hostile client costs
//! the deployment for every second it runs.
//!
//! `scripts/bench --only abuse` runs it beside a fan-out measurement of
//! well-behaved clients, once quiet and once under the abuse, so their
//! delivery p99 can be compared.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{procfs, ws};

const USAGE: &str = "switchboard-bench abuse --target HOST:PORT[,HOST:PORT…] --redis HOST:PORT \
[--clients N (200)] [--rate PAIRS_PER_S (50)] [--duration D (30s)] [--after D (60s)] \
[--pid NAME=PID]… [--label L] [--out FILE]";

struct Opts {
    targets: Vec<SocketAddr>,
    redis: SocketAddr,
    clients: usize,
    rate: u64,
    duration: Duration,
    after: Duration,
    pids: Vec<(String, u32)>,
    label: String,
    out: Option<String>,
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        targets: Vec::new(),
        redis: SocketAddr::from(([127, 0, 0, 1], 6379)),
        clients: 200,
        rate: 50,
        duration: Duration::from_secs(30),
        after: Duration::from_secs(60),
        pids: Vec::new(),
        label: "abuse".into(),
        out: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value; usage: {USAGE}"))
        };
        match flag.as_str() {
            "--target" => {
                for t in value()?.split(',') {
                    o.targets
                        .push(t.parse().with_context(|| format!("--target {t}"))?);
                }
            }
            "--redis" => o.redis = value()?.parse().context("--redis")?,
            "--clients" => o.clients = value()?.parse().context("--clients")?,
            "--rate" => o.rate = value()?.parse().context("--rate")?,
            "--duration" => o.duration = humantime::parse_duration(&value()?)?,
            "--after" => o.after = humantime::parse_duration(&value()?)?,
            "--pid" => {
                let v = value()?;
                let (name, pid) = v.split_once('=').context("--pid NAME=PID")?;
                o.pids
                    .push((name.to_string(), pid.parse().context("--pid")?));
            }
            "--label" => o.label = value()?,
            "--out" => o.out = Some(value()?),
            other => bail!("unknown flag {other}; usage: {USAGE}"),
        }
    }
    if o.targets.is_empty() || o.rate == 0 || o.clients == 0 {
        bail!("usage: {USAGE}");
    }
    Ok(o)
}

/// One command to Redis over RESP; the reply's first line (or bulk string).
fn redis_cmd(redis: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&redis, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if let Some(len) = line.trim_end().strip_prefix('$') {
        let len: usize = len.parse()?;
        let mut body = vec![0; len + 2];
        std::io::Read::read_exact(&mut r, &mut body)?;
        return Ok(String::from_utf8_lossy(&body[..len]).into_owned());
    }
    Ok(line.trim_end().trim_start_matches(':').to_string())
}

/// Redis `used_memory` (bytes) and `DBSIZE` now.
fn redis_sample(redis: SocketAddr) -> anyhow::Result<(u64, u64)> {
    let info = redis_cmd(redis, &["INFO", "memory"])?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no used_memory in INFO memory")?;
    let keys = redis_cmd(redis, &["DBSIZE"])?.parse()?;
    Ok((used, keys))
}

/// What the hostile clients saw.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    subscribed: AtomicU64,
    refused: AtomicU64,
    closed: AtomicU64,
    /// The longest any client waited for the answer to one of its frames,
    /// in µs: how far behind its hostile clients a node's readers fell.
    answer_lag_us: AtomicU64,
    /// Why, by kind: the connect failed, the node closed the socket, or
    /// a read or write failed.
    why_closed: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counts {
    fn closed(&self, why: String) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        *self.why_closed.lock().unwrap().entry(why).or_default() += 1;
    }
}

/// One hostile client: a new topic subscribed and unsubscribed `rate`
/// times a second until `until`, answers read (never waited for).
async fn hostile(
    target: SocketAddr,
    client: usize,
    rate: u64,
    until: Instant,
    counts: Arc<Counts>,
) {
    let mut conn = match ws::connect(target, None, "/ws").await {
        Ok(conn) => conn,
        Err(e) => return counts.closed(format!("connect: {e}")),
    };
    // Bounded by `until` even when the node stops reading (its readers wait
    // on Redis) and a write blocks: what is still in the socket buffers
    // then is the node's backlog, not this client's doing.
    let churn = churn(&mut conn, client, rate, until, &counts);
    if let Ok(Err(why)) = tokio::time::timeout_at(until.into(), churn).await {
        return counts.closed(why);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
}

/// The client's loop; an error saying why when the connection ended
/// before `until`.
async fn churn(
    conn: &mut ws::Conn,
    client: usize,
    rate: u64,
    until: Instant,
    counts: &Counts,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    // When each frame not yet answered was sent: every frame gets one
    // answer, in order.
    let mut unanswered = std::collections::VecDeque::new();
    let mut lag = Duration::ZERO;
    while Instant::now() < until {
        tokio::select! {
            _ = tick.tick() => {
                let topic = format!("abuse.{client}.{n}.{:08x}", rand::random::<u32>());
                conn.out.text(format!(r#"{{"type":"subscribe","event":"{topic}"}}"#).as_bytes());
                conn.out.text(format!(r#"{{"type":"unsubscribe","event":"{topic}"}}"#).as_bytes());
                n += 1;
                let now = Instant::now();
                unanswered.extend([now, now]);
                counts.sent.fetch_add(1, Ordering::Relaxed);
                conn.flush().await.map_err(|e| format!("write: {e}"))?;
            }
            read = conn.fill() => {
                match read {
                    Ok(true) => {}
                    Ok(false) => return Err("the node closed the socket".into()),
                    Err(e) => return Err(format!("read: {e}")),
                }
                let drained = conn.drain(|payload: &[u8], _: &mut ws::Out| {
                    if let Some(sent) = unanswered.pop_front() {
                        lag = lag.max(sent.elapsed());
                    }
                    if ws::find(payload, br#""type":"subscribed""#).is_some() {
                        counts.subscribed.fetch_add(1, Ordering::Relaxed);
                    } else if ws::find(payload, br#""type":"error""#).is_some() {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                    }
                });
                counts.answer_lag_us.fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
                drained.map_err(|e| format!("{e:?}"))?;
                conn.flush().await.map_err(|e| format!("write: {e}"))?;
            }
        }
    }
    Ok(())
}

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let counts = Arc::new(Counts::default());
    let rss = |pids: &[(String, u32)]| -> Vec<u64> {
        pids.iter()
            .map(|(_, p)| procfs::sample(*p).rss_kb * 1024)
            .collect()
    };
    let (mem0, keys0) = redis_sample(o.redis)?;
    let rss0 = rss(&o.pids);
    let started = Instant::now();
    let until = started + o.duration;
    let mut samples: Vec<(f64, u64, u64)> = vec![(0.0, mem0, keys0)];
    let mut rss_max = rss0.clone();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..o.clients {
            let target = o.targets[i % o.targets.len()];
            tasks.push(tokio::spawn(hostile(
                target,
                i,
                o.rate,
                until,
                counts.clone(),
            )));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while Instant::now() < until + o.after {
            tick.tick().await;
            if let Ok((m, k)) = redis_sample(o.redis) {
                samples.push((started.elapsed().as_secs_f64(), m, k));
            }
            for (max, now) in rss_max.iter_mut().zip(rss(&o.pids)) {
                *max = (*max).max(now);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let run_s = o.duration.as_secs_f64();
    let during = samples.iter().filter(|s| s.0 <= run_s + 1.0);
    let (mem_max, keys_max) = during.fold((mem0, keys0), |(m, k), s| (m.max(s.1), k.max(s.2)));
    let &(_, mem_end, keys_end) = samples.last().unwrap_or(&(0.0, mem0, keys0));
    let rss_end = rss(&o.pids);
    let client_s = o.clients as f64 * run_s;
    let sent = counts.sent.load(Ordering::Relaxed);
    let subscribed = counts.subscribed.load(Ordering::Relaxed);
    let refused = counts.refused.load(Ordering::Relaxed);
    let why_closed = std::mem::take(&mut *counts.why_closed.lock().unwrap());
    let answer_lag_ms = counts.answer_lag_us.load(Ordering::Relaxed) as f64 / 1000.0;
    let result = serde_json::json!({
        "label": o.label,
        "mode": "abuse",
        "clients": o.clients,
        "rate_pairs_per_client_s": o.rate,
        "duration_s": run_s,
        "after_s": o.after.as_secs_f64(),
        "subscribes_sent": sent,
        "subscribes_accepted": subscribed,
        "subscribes_refused": refused,
        "clients_closed_by_node": counts.closed.load(Ordering::Relaxed),
        "clients_closed_why": &why_closed,
        "answer_lag_max_ms": answer_lag_ms,
        "redis_used_memory": {"before": mem0, "max_during": mem_max, "after": mem_end},
        "redis_keys": {"before": keys0, "max_during": keys_max, "after": keys_end},
        "node_rss": o.pids.iter().zip(rss0.iter().zip(rss_max.iter().zip(&rss_end)))
            .map(|((name, _), (b, (m, e)))| serde_json::json!({"node": name, "before": b, "max": m, "after": e}))
            .collect::<Vec<_>>(),
        "growth_per_client_s": {
            "redis_bytes": (mem_max as f64 - mem0 as f64) / client_s,
            "redis_keys": (keys_max as f64 - keys0 as f64) / client_s,
            "rss_bytes": rss_max.iter().zip(&rss0).map(|(m, b)| *m as f64 - *b as f64).sum::<f64>() / client_s,
        },
        "samples": samples.iter().map(|s| [s.0, s.1 as f64, s.2 as f64]).collect::<Vec<_>>(),
    });
    eprintln!(
        "abuse {}: {} clients × {}/s for {:.0} s: {sent} subscribes sent, {subscribed} accepted, {refused} refused\n\
         closed before the end: {why_closed:?}; longest wait for an answer {answer_lag_ms:.0} ms\n\
         Redis used_memory {mem0} → max {mem_max} → {mem_end} after {:.0} s; keys {keys0} → max {keys_max} → {keys_end}\n\
         node RSS before {:?}, max {:?}, after {:?}\n\
         growth per client-second: {:.1} B of Redis memory, {:.4} keys, {:.1} B of node RSS",
        o.label,
        o.clients,
        o.rate,
        run_s,
        o.after.as_secs_f64(),
        rss0,
        rss_max,
        rss_end,
        result["growth_per_client_s"]["redis_bytes"]
            .as_f64()
            .unwrap_or(0.0),
        result["growth_per_client_s"]["redis_keys"]
            .as_f64()
            .unwrap_or(0.0),
        result["growth_per_client_s"]["rss_bytes"]
            .as_f64()
            .unwrap_or(0.0),
    );
    let line = serde_json::to_string(&result)?;
    println!("{line}");
    if let Some(path) = &o.out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {path}"))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
