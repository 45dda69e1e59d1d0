//! The scale-out scenario (`switchboard-bench scale`, issue 23): many
//! connections over many nodes, each subscribed to its own topic (one of
//! `--topics`) and to one topic that every connection shares, then a node
//! killed with SIGKILL while the topics are published.
//!
//! One run, several rows (one JSON line each):
//! - `scale-connect`: the connect rate, and each node's RSS per connection
//!   after the connections were held for `--hold`;
//! - `scale-all-<R>`: publications on the shared topic at R/s (`--all-rates`);
//! - `scale-topics`: the own topics at a combined `--topic-rate`;
//! - `scale-node-death`: the own topics at `--storm-rate`; after
//!   `--kill-after` the node `--victim` gets SIGKILL. Its clients reconnect
//!   like the official client (`clients/js`): close-code-driven backoff with
//!   full jitter over `[--min-delay, min(--max-delay, min·2^(n+1))]`, to
//!   another node than the one that dropped them (a load balancer that
//!   took the dead node out), and subscribe again to both topics with
//!   `since` = the last offset they hold.
//!
//! Every topic is a history topic (`hist.*`), published with `FCALL
//! switchboard_publish`. Each connection keeps one bitset per topic per
//! phase: lost = expected − distinct, duplicates counted apart. Nothing is
//! taken from server metrics.
//!
//! Worker control protocol (lines on stdin, answers on stdout): the worker
//! prints a [`ScaleReady`] once every connection is subscribed or failed;
//! `phase <kind> <start µs>` resets the per-phase counts (kind `all`,
//! `topics`, `storm`; answer `ok`); `drain <published>` waits until every
//! counted connection holds its share (or nothing arrives for
//! `drain_idle_ms`) and prints a [`PhaseReport`]; `keep <n>` closes the
//! connections with a global index ≥ n (answer `ok` once closed); EOF closes
//! everything and ends the worker.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::hist::{Hist, SparseHist};
use super::worker::{
    self, frame_bytes, number_after, print_line, share, short, string_after, topic_index,
    topic_name,
};
use super::ws::{self, Ended, Out};
use super::{dur, named_pid, now_us, num, procfs, publish, report, resolve, wait_quiet};

/// Descriptors a worker keeps for itself besides its connections.
const FD_HEADROOM: u64 = 200;
/// Descriptors a node needs besides its client connections (listeners,
/// Redis, epoll, logs), kept free when sizing the node-death phase.
const NODE_FD_HEADROOM: u64 = 400;
/// Connections per source address (127.0.0.x).
const PER_SOURCE: usize = 25_000;
/// Width of the storm timeline's buckets, µs.
const BUCKET_US: u64 = 250_000;
/// Sequence numbers per phase and topic are far below this (bitset bound).
const MAX_SEQ: u64 = 1 << 22;

pub const USAGE: &str = "\
switchboard-bench scale --target A,B,… --pid node-1=PID … --redis HOST:PORT [OPTIONS]

  Connections round-robin over the targets; connection i subscribes to topic
  (i / targets) % topics and to the shared topic. Rows: scale-connect,
  scale-all-<R> per --all-rates, scale-topics, scale-node-death.

  --connections N      default 100000
  --topics N           own topics (default 100)
  --hold D             hold before measuring RSS (default 5s)
  --all-rates R,R      shared-topic publications per second (default 1,10)
  --all-duration D     each (default 10s)
  --topic-rate R       own topics, combined events/s (default 2000)
  --topic-duration D   default 5s
  --storm-rate R       own topics during the node death (default 20)
  --storm-duration D   default 20s
  --kill-after D       SIGKILL of the victim this long into it (default 5s)
  --victim K           target index to kill (default: the last one)
  --storm-connections N  connections kept for the node death (default: as
                       many as the other nodes can hold under their
                       RLIMIT_NOFILE, at most --connections)
  --min-delay D        client backoff floor (default 500ms, as clients/js)
  --max-delay D        client backoff ceiling (default 30s)
  --pid NAME=PID       node processes, in --target order (CPU, RSS, SIGKILL)
  --watch-pid NAME=PID redis-server (CPU from /proc; INFO is read as well)
  --redis HOST:PORT    --prefix P   --label-prefix L (default scale)
  --concurrency N      initial handshakes in flight per worker (default 256)
  --drain-idle D       default 10s     --drain-max D  default 180s
  --max-time D         default 900s    --quiet-wait D default 0s
  --sources IP,…       default 127.0.0.1… one per 25,000 connections
  --out FILE           append the rows (JSON lines)
";

// === command line ===

struct Opts {
    targets: Vec<SocketAddr>,
    pids: Vec<(String, u32)>,
    watch_pids: Vec<(String, u32)>,
    redis: SocketAddr,
    prefix: String,
    label: String,
    connections: usize,
    topics: usize,
    hold: Duration,
    all_rates: Vec<f64>,
    all_duration: Duration,
    topic_rate: f64,
    topic_duration: Duration,
    storm_rate: f64,
    storm_duration: Duration,
    kill_after: Duration,
    victim: Option<usize>,
    storm_connections: Option<usize>,
    min_delay: Duration,
    max_delay: Duration,
    concurrency: usize,
    drain_idle: Duration,
    drain_max: Duration,
    max_time: Duration,
    quiet_wait: Duration,
    sources: Vec<IpAddr>,
    out: Option<String>,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let mut o = Opts {
            targets: Vec::new(),
            pids: Vec::new(),
            watch_pids: Vec::new(),
            redis: SocketAddr::from(([127, 0, 0, 1], 6379)),
            prefix: "switchboard".into(),
            label: "scale".into(),
            connections: 100_000,
            topics: 100,
            hold: Duration::from_secs(5),
            all_rates: vec![1.0, 10.0],
            all_duration: Duration::from_secs(10),
            topic_rate: 2000.0,
            topic_duration: Duration::from_secs(5),
            storm_rate: 20.0,
            storm_duration: Duration::from_secs(20),
            kill_after: Duration::from_secs(5),
            victim: None,
            storm_connections: None,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            concurrency: 256,
            drain_idle: Duration::from_secs(10),
            drain_max: Duration::from_secs(180),
            max_time: Duration::from_secs(900),
            quiet_wait: Duration::ZERO,
            sources: Vec::new(),
            out: None,
        };
        let mut redis = None;
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            i += 1;
            let mut value = || -> anyhow::Result<String> {
                if let Some(v) = &inline {
                    return Ok(v.clone());
                }
                let v = args
                    .get(i)
                    .with_context(|| format!("{name} needs a value"))?;
                i += 1;
                Ok(v.clone())
            };
            match name {
                "--target" => {
                    for t in value()?.split(',').filter(|t| !t.is_empty()) {
                        o.targets
                            .push(resolve(t).map_err(|e| anyhow::anyhow!("--target {t}: {e}"))?);
                    }
                }
                "--pid" => o.pids.push(named_pid(&value()?, name)?),
                "--watch-pid" => o.watch_pids.push(named_pid(&value()?, name)?),
                "--redis" => {
                    let v = value()?;
                    redis = Some(resolve(&v).map_err(|e| anyhow::anyhow!("--redis {v}: {e}"))?);
                }
                "--prefix" => o.prefix = value()?,
                "--label-prefix" => o.label = value()?,
                "--connections" => o.connections = num(&value()?, name)?,
                "--topics" => o.topics = num::<usize>(&value()?, name)?.max(1),
                "--hold" => o.hold = dur(&value()?, name)?,
                "--all-rates" => {
                    o.all_rates = value()?
                        .split(',')
                        .filter(|r| !r.is_empty())
                        .map(|r| num(r, name))
                        .collect::<anyhow::Result<_>>()?
                }
                "--all-duration" => o.all_duration = dur(&value()?, name)?,
                "--topic-rate" => o.topic_rate = num(&value()?, name)?,
                "--topic-duration" => o.topic_duration = dur(&value()?, name)?,
                "--storm-rate" => o.storm_rate = num(&value()?, name)?,
                "--storm-duration" => o.storm_duration = dur(&value()?, name)?,
                "--kill-after" => o.kill_after = dur(&value()?, name)?,
                "--victim" => o.victim = Some(num(&value()?, name)?),
                "--storm-connections" => o.storm_connections = Some(num(&value()?, name)?),
                "--min-delay" => o.min_delay = dur(&value()?, name)?,
                "--max-delay" => o.max_delay = dur(&value()?, name)?,
                "--concurrency" => o.concurrency = num::<usize>(&value()?, name)?.max(1),
                "--drain-idle" => o.drain_idle = dur(&value()?, name)?,
                "--drain-max" => o.drain_max = dur(&value()?, name)?,
                "--max-time" => o.max_time = dur(&value()?, name)?,
                "--quiet-wait" => o.quiet_wait = dur(&value()?, name)?,
                "--sources" => {
                    for s in value()?.split(',').filter(|s| !s.is_empty()) {
                        o.sources
                            .push(s.parse().map_err(|_| {
                                anyhow::anyhow!("--sources {s}: not an IP address")
                            })?);
                    }
                }
                "--out" => o.out = Some(value()?),
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                _ => bail!("unknown option {arg} (see switchboard-bench scale --help)"),
            }
        }
        o.redis = redis.context("--redis HOST:PORT is required (the topics are published)")?;
        if o.targets.len() < 2 {
            bail!("scale needs at least 2 --target nodes (one of them is killed)");
        }
        if o.pids.len() != o.targets.len() {
            bail!(
                "scale needs one --pid per --target, in the same order ({} targets, {} pids)",
                o.targets.len(),
                o.pids.len()
            );
        }
        if o.connections < o.targets.len() {
            bail!("--connections must be at least the number of targets");
        }
        if o.victim.is_some_and(|v| v >= o.targets.len()) {
            bail!("--victim must be a target index below {}", o.targets.len());
        }
        if o.min_delay.is_zero() || o.max_delay < o.min_delay {
            bail!("--min-delay must be > 0 and at most --max-delay");
        }
        Ok(o)
    }
}

// === worker ===

/// A worker's share; passed as JSON on its command line.
#[derive(Serialize, Deserialize, Clone)]
pub struct ScaleWorkerConfig {
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub first: usize,
    pub count: usize,
    /// Own topics: `topic_name(topic, topics, k)`.
    pub topic: String,
    pub topics: usize,
    /// The topic every connection subscribes to.
    pub all_topic: String,
    pub concurrency: usize,
    pub connect_timeout_ms: u64,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    pub drain_idle_ms: u64,
    pub drain_max_ms: u64,
    pub max_time_ms: u64,
}

#[derive(Serialize, Deserialize, Default)]
pub struct ScaleReady {
    pub ready: usize,
    pub failed: usize,
    pub fail_reasons: BTreeMap<String, usize>,
    pub first_start_us: u64,
    pub last_ready_us: u64,
    pub open_us: SparseHist,
    /// The worker's CPU so far (its phase reports count from its start too,
    /// so the first phase's generator CPU is taken from here).
    #[serde(default)]
    pub cpu_s: f64,
}

/// One worker's counts for one phase.
#[derive(Serialize, Deserialize, Default)]
pub struct PhaseReport {
    /// Connections counted: subscribed at the phase's start.
    pub counted: usize,
    pub expected: u64,
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    /// Events of the other kind than the phase's, or beyond what was published.
    pub unexpected: u64,
    pub missing: u64,
    /// Connections that got every event of the phase exactly once.
    pub complete: usize,
    pub gaps: u64,
    pub first_recv_us: u64,
    pub last_recv_us: u64,
    pub event_bytes: u64,
    pub latency_us: SparseHist,
    /// Storm: connections dropped by their node, back (both topics
    /// subscribed again), answered `recovered: true` on both / not, holding
    /// every missed offset; when the last one got there.
    pub dropped: usize,
    pub back: usize,
    pub recovered: usize,
    pub not_recovered: usize,
    pub caught_up: usize,
    pub last_back_us: u64,
    pub last_caught_up_us: u64,
    /// Reconnect attempts, and those that failed (refused, timed out).
    pub attempts: u64,
    pub failed_attempts: u64,
    /// `error` answers to a subscription (the session was closed and
    /// retried with backoff, like a failed attempt).
    #[serde(default)]
    pub subscribe_errors: u64,
    /// Where the dropped connections came back: per target index.
    pub back_per_target: Vec<usize>,
    /// Connections ended for good (a close code the official client does
    /// not reconnect on), with the reason.
    pub stopped: usize,
    pub stop_reasons: BTreeMap<String, usize>,
    /// Latency of the connections that were never dropped, per
    /// [`BUCKET_US`] since the phase's start.
    pub timeline: Vec<(u32, SparseHist)>,
    pub cpu_s: f64,
    pub rss_kb: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    All,
    Topics,
    Storm,
}

/// One connection's state, kept across its sessions.
#[derive(Default)]
struct ConnState {
    topic_k: usize,
    ready: bool,
    failed: bool,
    /// Closed by the bench (`keep`) or stopped for good.
    gone: bool,
    /// Counted in the current phase.
    counted: bool,
    /// Last (offset, epoch) held, per topic: 0 = shared, 1 = own.
    pos: [Option<(u64, String)>; 2],
    /// This phase's bitsets and distinct counts, per topic.
    seen: [Vec<u64>; 2],
    unique: [u64; 2],
    /// Subscribed acknowledgements in the current session (bit per topic).
    subs: u8,
    resubscribing: bool,
    /// An `error` frame before both `subscribed` (e.g. the node could not
    /// read the topic's history in time): the session is retried.
    sub_error: Option<String>,
    /// Storm bookkeeping.
    dropped: bool,
    back_us: u64,
    recovered: [Option<bool>; 2],
    replay_to: Option<u64>,
    caught_up_us: u64,
}

struct Agg {
    report: PhaseReport,
    latency: Hist,
    timeline: Vec<Hist>,
    ready: ScaleReady,
    open: Hist,
}

struct Shared {
    cfg: ScaleWorkerConfig,
    conns: RefCell<Vec<ConnState>>,
    agg: RefCell<Agg>,
    kind: Cell<Kind>,
    phase_start_us: Cell<u64>,
    /// Events published in this phase, once known (`drain`).
    published: Cell<u64>,
    /// Closes every connection (EOF on stdin).
    close_all: CancellationToken,
    /// `keep n`: connections with a global index ≥ n close.
    keep: Cell<usize>,
    keep_changed: tokio::sync::Notify,
    handshakes: Semaphore,
    all_prefix: Vec<u8>,
    own_prefix: Vec<u8>,
    /// `"event":"<shared topic>"` in a `subscribed` frame.
    all_subscribed: Vec<u8>,
    live_tasks: Cell<usize>,
}

pub fn worker_main(cfg_json: &str) -> anyhow::Result<()> {
    let cfg: ScaleWorkerConfig = serde_json::from_str(cfg_json)?;
    let max_time = Duration::from_millis(cfg.max_time_ms);
    worker::process("switchboard-bench scale worker", max_time, |ctl| {
        run(cfg, ctl)
    })
}

fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

async fn run(
    cfg: ScaleWorkerConfig,
    mut ctl: tokio::sync::mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    let n = cfg.count;
    let targets = cfg.targets.len();
    let conns = (0..n)
        .map(|i| ConnState {
            topic_k: topic_index(cfg.first + i, cfg.topics, targets),
            ..Default::default()
        })
        .collect();
    let shared = Rc::new(Shared {
        conns: RefCell::new(conns),
        agg: RefCell::new(Agg {
            report: PhaseReport::default(),
            latency: Hist::default(),
            timeline: Vec::new(),
            ready: ScaleReady {
                first_start_us: u64::MAX,
                ..Default::default()
            },
            open: Hist::default(),
        }),
        kind: Cell::new(Kind::None),
        phase_start_us: Cell::new(0),
        published: Cell::new(0),
        close_all: CancellationToken::new(),
        keep: Cell::new(usize::MAX),
        keep_changed: tokio::sync::Notify::new(),
        handshakes: Semaphore::new(cfg.concurrency.max(1)),
        all_prefix: br#"{"type":"event","name":"all""#.to_vec(),
        own_prefix: br#"{"type":"event","name":"tick""#.to_vec(),
        all_subscribed: format!(r#""event":"{}""#, cfg.all_topic).into_bytes(),
        live_tasks: Cell::new(n),
        cfg,
    });
    let mut tasks = Vec::with_capacity(n);
    for li in 0..n {
        tasks.push(tokio::task::spawn_local(connection(shared.clone(), li)));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        let a = shared.agg.borrow();
        if a.ready.ready + a.ready.failed >= n {
            break;
        }
    }
    {
        let mut a = shared.agg.borrow_mut();
        a.ready.open_us = a.open.to_sparse();
        a.ready.cpu_s = procfs::sample(std::process::id()).cpu_s;
        print_line(&a.ready)?;
    }
    while let Some(line) = ctl.recv().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("phase") => {
                let kind = match words.next() {
                    Some("all") => Kind::All,
                    Some("topics") => Kind::Topics,
                    Some("storm") => Kind::Storm,
                    other => bail!("unknown phase {other:?}"),
                };
                let start: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                start_phase(&shared, kind, start);
                say("ok")?;
            }
            Some("drain") => {
                let published: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                shared.published.set(published);
                drain(&shared, &mut tick).await;
                let report = fold(&shared);
                print_line(&report)?;
                shared.kind.set(Kind::None);
            }
            Some("keep") => {
                let keep: usize = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                shared.keep.set(keep);
                shared.keep_changed.notify_waiters();
                let local_keep = keep.saturating_sub(shared.cfg.first).min(n);
                loop {
                    tick.tick().await;
                    let c = shared.conns.borrow();
                    if c[local_keep..].iter().all(|c| c.gone || c.failed) {
                        break;
                    }
                }
                say("ok")?;
            }
            _ => {}
        }
    }
    shared.close_all.cancel();
    shared.keep.set(0);
    shared.keep_changed.notify_waiters();
    let all = futures_util::future::join_all(tasks);
    let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    Ok(())
}

fn start_phase(sh: &Shared, kind: Kind, start_us: u64) {
    for c in sh.conns.borrow_mut().iter_mut() {
        for s in &mut c.seen {
            s.clear();
        }
        c.unique = [0, 0];
        c.counted = c.ready && !c.gone && !c.failed;
        c.dropped = false;
        c.back_us = 0;
        c.recovered = [None, None];
        c.replay_to = None;
        c.caught_up_us = 0;
    }
    let mut a = sh.agg.borrow_mut();
    a.report = PhaseReport {
        first_recv_us: u64::MAX,
        back_per_target: vec![0; sh.cfg.targets.len()],
        ..Default::default()
    };
    a.latency = Hist::default();
    a.timeline.clear();
    sh.published.set(0);
    sh.phase_start_us.set(start_us);
    sh.kind.set(kind);
}

/// The events a counted connection should hold at the end of the phase.
fn expected_for(sh: &Shared, c: &ConnState) -> u64 {
    let published = sh.published.get();
    match sh.kind.get() {
        Kind::All => published,
        Kind::Topics | Kind::Storm => share(published, sh.cfg.topics, c.topic_k),
        Kind::None => 0,
    }
}

fn which(kind: Kind) -> usize {
    if kind == Kind::All { 0 } else { 1 }
}

async fn drain(sh: &Shared, tick: &mut tokio::time::Interval) {
    let expected: u64 = sh
        .conns
        .borrow()
        .iter()
        .filter(|c| c.counted)
        .map(|c| expected_for(sh, c))
        .sum();
    let idle = Duration::from_millis(sh.cfg.drain_idle_ms);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(sh.cfg.drain_max_ms);
    let mut last = u64::MAX;
    let mut last_change = tokio::time::Instant::now();
    if expected == 0 {
        return;
    }
    loop {
        tick.tick().await;
        let unique = sh.agg.borrow().report.unique;
        // Storm: also wait until every dropped connection is back (its
        // share can be complete before its resubscription answered).
        if unique >= expected
            && (sh.kind.get() != Kind::Storm
                || !sh
                    .conns
                    .borrow()
                    .iter()
                    .any(|c| c.counted && c.dropped && !c.gone && c.back_us == 0))
        {
            break;
        }
        let now = tokio::time::Instant::now();
        // A dropped client still backing off (up to --max-delay) is waited
        // for until --drain-max, not given up after --drain-idle.
        let backing_off = sh.kind.get() == Kind::Storm
            && sh
                .conns
                .borrow()
                .iter()
                .any(|c| c.counted && c.dropped && !c.gone && c.back_us == 0);
        if unique != last {
            last = unique;
            last_change = now;
        } else if (now - last_change >= idle && !backing_off) || now >= deadline {
            break;
        }
    }
}

fn fold(sh: &Shared) -> PhaseReport {
    let w = which(sh.kind.get());
    let mut a = sh.agg.borrow_mut();
    let mut r = std::mem::take(&mut a.report);
    for c in sh.conns.borrow().iter().filter(|c| c.counted) {
        let exp = expected_for(sh, c);
        r.counted += 1;
        r.expected += exp;
        r.missing += exp.saturating_sub(c.unique[w]);
        if c.unique[w] == exp && exp > 0 {
            r.complete += 1;
        }
        if c.dropped {
            r.dropped += 1;
            if c.back_us > 0 {
                r.back += 1;
                r.last_back_us = r.last_back_us.max(c.back_us);
                if c.recovered.iter().all(|x| *x == Some(true)) {
                    r.recovered += 1;
                } else {
                    r.not_recovered += 1;
                }
            }
            if c.caught_up_us > 0 {
                r.caught_up += 1;
                r.last_caught_up_us = r.last_caught_up_us.max(c.caught_up_us);
            }
        }
    }
    if r.first_recv_us == u64::MAX {
        r.first_recv_us = 0;
    }
    r.latency_us = a.latency.to_sparse();
    r.timeline = a
        .timeline
        .iter()
        .enumerate()
        .filter(|(_, h)| h.max() > 0)
        .map(|(i, h)| (i as u32, h.to_sparse()))
        .collect();
    let me = procfs::sample(std::process::id());
    r.cpu_s = me.cpu_s;
    r.rss_kb = me.rss_kb;
    r
}

/// How a session ended.
enum SessionEnd {
    /// Closed by the bench.
    Closed,
    /// Never got both `subscribed` (refused, timed out, node gone).
    NotReady(String),
    /// Was live, then the connection dropped with this close code (1006
    /// for an end without a close frame).
    Dropped(u16, String),
}

/// The longest wait before reconnect attempt `attempt` (0 = the first after
/// a drop), as `clients/js`: a random time in `[min, min(max, min·2^(n+1))]`
/// (full jitter with a floor).
fn backoff_cap(min: u64, max: u64, attempt: u32) -> u64 {
    max.min(min.saturating_mul(1u64 << (attempt + 1).min(20)))
        .max(min)
}

/// Target `r` (in `0..targets - 1`) of the others than `current`: a load
/// balancer that took the node which dropped or refused us out.
fn other_target(current: usize, targets: usize, r: usize) -> usize {
    debug_assert!(targets >= 2 && r < targets - 1);
    if r >= current { r + 1 } else { r }
}

/// Close codes the official client reconnects on (docs/client.md).
fn reconnects_on(code: u16) -> bool {
    matches!(
        code,
        1000 | 1001 | 1005 | 1006 | 1011 | 1012 | 1013 | 1014 | 4000..=4499
    )
}

async fn connection(sh: Rc<Shared>, li: usize) {
    let gi = sh.cfg.first + li;
    let targets = sh.cfg.targets.len();
    let mut target = gi % targets;
    let mut attempt: u32 = 0;
    let mut initial = true;
    loop {
        if gi >= sh.keep.get() {
            break;
        }
        let end = session(&sh, li, gi, target, initial).await;
        match end {
            SessionEnd::Closed => break,
            SessionEnd::NotReady(reason) if initial => {
                let mut a = sh.agg.borrow_mut();
                a.ready.failed += 1;
                *a.ready.fail_reasons.entry(short(&reason)).or_default() += 1;
                sh.conns.borrow_mut()[li].failed = true;
                break;
            }
            SessionEnd::NotReady(_) => {
                sh.agg.borrow_mut().report.failed_attempts += 1;
                attempt += 1;
            }
            SessionEnd::Dropped(code, reason) => {
                if !reconnects_on(code) {
                    let mut a = sh.agg.borrow_mut();
                    a.report.stopped += 1;
                    *a.report.stop_reasons.entry(short(&reason)).or_default() += 1;
                    sh.conns.borrow_mut()[li].gone = true;
                    break;
                }
                let mut c = sh.conns.borrow_mut();
                c[li].dropped = true;
                c[li].back_us = 0;
                c[li].caught_up_us = 0;
                c[li].replay_to = None;
                c[li].recovered = [None, None];
                attempt = 0;
            }
        }
        initial = false;
        // Full jitter with a floor, as clients/js: attempt n waits a random
        // time in [min, min(max, min·2^(n+1))].
        let cap = backoff_cap(sh.cfg.min_delay_ms, sh.cfg.max_delay_ms, attempt);
        let wait = rand::random_range(sh.cfg.min_delay_ms..=cap);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = sh.close_all.cancelled() => break,
        }
        target = other_target(target, targets, rand::random_range(0..targets - 1));
        sh.agg.borrow_mut().report.attempts += 1;
    }
    let mut c = sh.conns.borrow_mut();
    c[li].gone = true;
    sh.live_tasks.set(sh.live_tasks.get() - 1);
}

async fn session(sh: &Shared, li: usize, gi: usize, target: usize, initial: bool) -> SessionEnd {
    let cfg = &sh.cfg;
    let permit = if initial {
        tokio::select! {
            p = sh.handshakes.acquire() => p.ok(),
            _ = sh.close_all.cancelled() => return SessionEnd::Closed,
        }
    } else {
        None
    };
    let started = now_us();
    if initial {
        let mut a = sh.agg.borrow_mut();
        a.ready.first_start_us = a.ready.first_start_us.min(started);
    }
    let addr = cfg.targets[target];
    let source = (!cfg.sources.is_empty()).then(|| cfg.sources[gi % cfg.sources.len()]);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.connect_timeout_ms);
    let mut conn = match tokio::time::timeout_at(deadline, ws::connect(addr, source, "/ws")).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return SessionEnd::NotReady(e.to_string()),
        Err(_) => return SessionEnd::NotReady("connect timed out".into()),
    };
    {
        let mut c = sh.conns.borrow_mut();
        let st = &mut c[li];
        st.subs = 0;
        st.sub_error = None;
        st.resubscribing = !initial;
        let names = [
            cfg.all_topic.clone(),
            topic_name(&cfg.topic, cfg.topics, st.topic_k),
        ];
        for (k, name) in names.iter().enumerate() {
            let msg = match (&st.pos[k], initial) {
                (Some((offset, epoch)), false) => format!(
                    r#"{{"type":"subscribe","event":"{name}","since":{{"offset":{offset},"epoch":"{epoch}"}}}}"#
                ),
                _ => format!(r#"{{"type":"subscribe","event":"{name}"}}"#),
            };
            conn.out.text(msg.as_bytes());
        }
    }
    let mut permit = permit;
    let mut ready = false;
    let handshake = tokio::time::sleep_until(deadline);
    tokio::pin!(handshake);
    let mut pending = conn.has_buffered();
    let mut keep_wait = Box::pin(sh.keep_changed.notified());
    // `{"type":"ping"}` every 25 s like clients/js (pingInterval): when the
    // machine is saturated, the server's own pings wait behind tens of
    // seconds of queued events, and a client that sends nothing would look
    // silent to the server's heartbeat.
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(rand::random_range(1_000..25_000)),
        Duration::from_secs(25),
    );
    let ended: Result<(), (u16, String)> = loop {
        if gi >= sh.keep.get() || sh.close_all.is_cancelled() {
            break Ok(());
        }
        if !pending {
            if let Err(e) = conn.flush().await {
                break Err((1006, format!("write: {e}")));
            }
            let r = tokio::select! {
                biased;
                _ = sh.close_all.cancelled() => break Ok(()),
                _ = &mut keep_wait => {
                    keep_wait = Box::pin(sh.keep_changed.notified());
                    continue;
                }
                _ = &mut handshake, if !ready => break Err((1006, "handshake timed out".into())),
                _ = ping.tick() => {
                    conn.out.text(br#"{"type":"ping"}"#);
                    continue;
                }
                r = conn.fill() => r,
            };
            match r {
                Ok(true) => {}
                Ok(false) => break Err((1006, "closed by server (EOF)".into())),
                Err(e) => break Err((1006, format!("read: {e}"))),
            }
        }
        pending = false;
        let now = now_us();
        let res = {
            let mut c = sh.conns.borrow_mut();
            let mut a = sh.agg.borrow_mut();
            let st = &mut c[li];
            conn.drain(|msg, out| on_message(sh, st, &mut a, msg, out, now, started, target))
        };
        if let Err(end) = res {
            break Err(match end {
                Ended::Close(Some(code)) => (code, format!("close {code}")),
                Ended::Close(None) => (1005, "close".into()),
                Ended::Protocol(p) => (1002, format!("protocol: {p}")),
            });
        }
        if !ready && let Some(e) = sh.conns.borrow_mut()[li].sub_error.take() {
            break Err((4000, e));
        }
        if !ready && sh.conns.borrow()[li].subs == 0b11 {
            ready = true;
            permit = None;
            if initial {
                let t = now_us();
                let mut a = sh.agg.borrow_mut();
                a.ready.ready += 1;
                a.ready.last_ready_us = a.ready.last_ready_us.max(t);
                sh.conns.borrow_mut()[li].ready = true;
            }
        }
    };
    drop(permit);
    match ended {
        Ok(()) => {
            // Close politely, bounded: the server closes first, so the
            // client's port is free at once.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
            sh.conns.borrow_mut()[li].gone = true;
            SessionEnd::Closed
        }
        Err((_, reason)) if !ready => SessionEnd::NotReady(reason),
        Err((code, reason)) => SessionEnd::Dropped(code, reason),
    }
}

#[allow(clippy::too_many_arguments)]
fn on_message(
    sh: &Shared,
    st: &mut ConnState,
    a: &mut Agg,
    msg: &[u8],
    _out: &mut Out,
    now: u64,
    started: u64,
    target: usize,
) {
    let kind = sh.kind.get();
    let k = if msg.starts_with(&sh.all_prefix) {
        Some(0)
    } else if msg.starts_with(&sh.own_prefix) {
        Some(1)
    } else {
        None
    };
    if let Some(k) = k {
        let r = &mut a.report;
        r.received += 1;
        r.event_bytes += frame_bytes(msg.len());
        r.first_recv_us = r.first_recv_us.min(now);
        r.last_recv_us = r.last_recv_us.max(now);
        let (Some(seq), Some(ts), Some(offset)) = (
            number_after(msg, b"\"seq\":"),
            number_after(msg, b"\"ts\":"),
            number_after(msg, b"\"offset\":"),
        ) else {
            r.unexpected += 1;
            return;
        };
        if let Some((last, _)) = &mut st.pos[k] {
            *last = (*last).max(offset);
        }
        if k == 1
            && let Some(to) = st.replay_to
            && st.caught_up_us == 0
            && offset >= to
        {
            st.caught_up_us = now;
        }
        if kind == Kind::None || which(kind) != k || seq >= MAX_SEQ {
            r.unexpected += 1;
            return;
        }
        let latency = now.saturating_sub(ts);
        a.latency.record(latency);
        if kind == Kind::Storm && !st.dropped {
            let b = (now.saturating_sub(sh.phase_start_us.get()) / BUCKET_US) as usize;
            if b < 4096 {
                if a.timeline.len() <= b {
                    a.timeline.resize_with(b + 1, Hist::default);
                }
                a.timeline[b].record(latency);
            }
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let seen = &mut st.seen[k];
        if word >= seen.len() {
            seen.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << bit;
        if seen[word] & mask != 0 {
            a.report.duplicates += 1;
        } else {
            seen[word] |= mask;
            st.unique[k] += 1;
            if st.counted {
                a.report.unique += 1;
            }
        }
        return;
    }
    if msg.starts_with(br#"{"type":"subscribed""#) {
        let k = if ws::find(msg, &sh.all_subscribed).is_some() {
            0
        } else {
            1
        };
        st.subs |= 1 << k;
        let offset = number_after(msg, b"\"offset\":");
        let epoch = string_after(msg, b"\"epoch\":\"");
        if !st.resubscribing {
            if let (Some(o), Some(e)) = (offset, epoch) {
                st.pos[k] = Some((o, e));
            }
        } else {
            st.recovered[k] = Some(ws::find(msg, br#""recovered":true"#).is_some());
            if k == 1 {
                st.replay_to = offset;
                let held = st.pos[1].as_ref().map_or(0, |(o, _)| *o);
                if offset.is_none_or(|to| held >= to) {
                    st.caught_up_us = now;
                }
            }
            if st.subs == 0b11 && st.dropped && st.back_us == 0 {
                st.back_us = now;
                if let Some(n) = a.report.back_per_target.get_mut(target) {
                    *n += 1;
                }
            }
        }
        return;
    }
    if msg.starts_with(br#"{"type":"connected""#) {
        if !st.resubscribing {
            a.open.record(now.saturating_sub(started));
        }
    } else if msg.starts_with(br#"{"type":"gap""#) {
        a.report.gaps += 1;
    } else if msg.starts_with(br#"{"type":"error""#) && st.subs != 0b11 {
        a.report.subscribe_errors += 1;
        st.sub_error = Some(format!(
            "subscribe refused: {}",
            String::from_utf8_lossy(msg)
        ));
    }
}

// === coordinator ===

struct WorkerProc {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl WorkerProc {
    fn read_line(&mut self, what: &str) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("a scale worker ended ({status}) before reporting {what}");
        }
        Ok(line)
    }

    fn read_json<T: serde::de::DeserializeOwned>(&mut self, what: &str) -> anyhow::Result<T> {
        let line = self.read_line(what)?;
        serde_json::from_str(&line).with_context(|| format!("scale worker said {line:?}"))
    }

    fn tell(&mut self, line: &str) {
        if let Some(stdin) = &mut self.stdin {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }
}

fn tell_all(procs: &mut [WorkerProc], line: &str, answer: &str) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        p.tell(line);
    }
    for p in procs.iter_mut() {
        let got = p.read_line(answer)?;
        anyhow::ensure!(
            got.trim() == "ok",
            "scale worker answered {got:?} to {line:?}"
        );
    }
    Ok(())
}

/// `INFO <section>` of a Redis, as key → value.
fn redis_info(addr: SocketAddr, section: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "INFO {section}\r\n")?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head)?;
    let len: usize = head
        .trim()
        .strip_prefix('$')
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("INFO answered {head:?}"))?;
    let mut body = vec![0u8; len + 2];
    r.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// Redis CPU seconds (user + sys), memory bytes (used, RSS) and `FCALL`s
/// served so far (history publications and reads), from INFO.
#[derive(Clone, Copy, Default)]
struct RedisSample {
    cpu_s: f64,
    used_memory: u64,
    rss: u64,
    fcalls: u64,
}

fn redis_sample(addr: SocketAddr) -> RedisSample {
    let mut s = RedisSample::default();
    if let Ok(cpu) = redis_info(addr, "cpu") {
        let f = |k: &str| {
            cpu.get(k)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        s.cpu_s = f("used_cpu_user") + f("used_cpu_sys");
    }
    if let Ok(mem) = redis_info(addr, "memory") {
        let f = |k: &str| mem.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        s.used_memory = f("used_memory");
        s.rss = f("used_memory_rss");
    }
    if let Ok(stats) = redis_info(addr, "commandstats") {
        // cmdstat_fcall:calls=N,usec=…
        s.fcalls = stats
            .get("cmdstat_fcall")
            .and_then(|v| v.strip_prefix("calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
    s
}

/// Everything sampled at one moment: nodes, watched processes, Redis, the
/// machine.
#[derive(Clone)]
struct Snap {
    at_us: u64,
    nodes: Vec<procfs::Sample>,
    redis: RedisSample,
    busy_s: f64,
}

fn snap(o: &Opts) -> Snap {
    Snap {
        at_us: now_us(),
        nodes: o.pids.iter().map(|(_, p)| procfs::sample(*p)).collect(),
        redis: redis_sample(o.redis),
        busy_s: procfs::machine_busy_s(),
    }
}

fn quantiles_ms(h: &Hist) -> Value {
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    json!({
        "p50": ms(h.quantile(0.50)),
        "p90": ms(h.quantile(0.90)),
        "p99": ms(h.quantile(0.99)),
        "max": ms(h.max()),
        "mean": ms(h.mean() as u64),
    })
}

pub fn main(args: &[String]) -> anyhow::Result<ExitCode> {
    let o = Opts::parse(args)?;
    let background = wait_quiet(o.quiet_wait, 0.25);
    let hard_stop = o.max_time;
    std::thread::spawn(move || {
        std::thread::sleep(hard_stop);
        eprintln!("switchboard-bench scale: --max-time reached, exiting");
        std::process::exit(2);
    });
    let (soft, hard) = procfs::raise_nofile();
    let per_worker_fds = soft.saturating_sub(FD_HEADROOM).max(1) as usize;
    let workers = o.connections.div_ceil(per_worker_fds).max(1);
    let per_worker = o.connections.div_ceil(workers);
    let sources = if o.sources.is_empty() {
        (0..o.connections.div_ceil(PER_SOURCE))
            .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + k as u8)))
            .collect()
    } else {
        o.sources.clone()
    };
    let targets = o.targets.len();
    let victim = o.victim.unwrap_or(targets - 1);
    // The survivors must hold every connection after the death: each node
    // process has the same descriptor limit as this one (the script starts
    // them from the same shell).
    let capacity = (targets - 1) * hard.saturating_sub(NODE_FD_HEADROOM) as usize;
    let storm_connections = o
        .storm_connections
        .unwrap_or(o.connections.min(capacity))
        .min(o.connections);
    let tag = format!("{:08x}", rand::random::<u32>());
    let topic = format!("hist.scale-{tag}");
    let all_topic = format!("hist.scale-{tag}-all");
    let topics: Vec<String> = (0..o.topics)
        .map(|k| topic_name(&topic, o.topics, k))
        .collect();
    let conns_on = |count: usize, node: usize| (0..count).filter(|i| i % targets == node).count();

    let mut rows: Vec<Value> = Vec::new();
    let base = json!({
        "mode": "scale",
        "system": format!("switchboard native, {targets} nodes"),
        "nodes": targets,
        "workers": workers,
        "sources": sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "nofile": [soft, hard],
        "topics": o.topics,
        "background_cpus_before": background,
        "load_avg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    let row = |name: &str, extra: Value| {
        let mut r = base.clone();
        r["scenario"] = json!(format!("{}-{name}", o.label));
        if let (Some(r), Some(e)) = (r.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                r.insert(k.clone(), v.clone());
            }
        }
        r
    };

    // === connect ===
    let before = snap(&o);
    let exe = std::env::current_exe()?;
    let mut procs = Vec::new();
    let mut first = 0;
    for _ in 0..workers {
        let count = per_worker.min(o.connections - first);
        if count == 0 {
            break;
        }
        let cfg = ScaleWorkerConfig {
            targets: o.targets.clone(),
            sources: sources.clone(),
            first,
            count,
            topic: topic.clone(),
            topics: o.topics,
            all_topic: all_topic.clone(),
            concurrency: o.concurrency,
            connect_timeout_ms: 60_000,
            min_delay_ms: o.min_delay.as_millis() as u64,
            max_delay_ms: o.max_delay.as_millis() as u64,
            drain_idle_ms: o.drain_idle.as_millis() as u64,
            drain_max_ms: o.drain_max.as_millis() as u64,
            max_time_ms: o.max_time.as_millis() as u64,
        };
        let mut child = Command::new(&exe)
            .arg("__scale_worker")
            .arg(serde_json::to_string(&cfg)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a scale worker")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        procs.push(WorkerProc {
            child,
            stdin,
            stdout,
        });
        first += count;
    }
    let result = drive(
        &o,
        &mut procs,
        &Plan {
            topics: &topics,
            all_topic: &all_topic,
            victim,
            storm_connections,
            before,
            conns_on: &conns_on,
            row: &row,
        },
        &mut rows,
    );
    for p in &mut procs {
        p.stdin = None;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in &mut procs {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    // Rows measured so far are written even when a later phase failed.
    for r in &rows {
        let line = serde_json::to_string(r)?;
        println!("{line}");
        if let Some(path) = &o.out {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {path}"))?;
            writeln!(f, "{line}")?;
        }
    }
    eprint!("{}", markdown(&rows));
    result?;
    let lossless = rows.iter().all(|r| r["lossless"].as_bool() != Some(false));
    Ok(if lossless {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

struct Plan<'a> {
    topics: &'a [String],
    all_topic: &'a str,
    victim: usize,
    storm_connections: usize,
    before: Snap,
    conns_on: &'a dyn Fn(usize, usize) -> usize,
    row: &'a dyn Fn(&str, Value) -> Value,
}

fn merged(reports: &[PhaseReport]) -> (PhaseReport, Hist) {
    let mut t = PhaseReport {
        first_recv_us: u64::MAX,
        ..Default::default()
    };
    let mut lat = Hist::default();
    for r in reports {
        t.counted += r.counted;
        t.expected += r.expected;
        t.received += r.received;
        t.unique += r.unique;
        t.duplicates += r.duplicates;
        t.unexpected += r.unexpected;
        t.missing += r.missing;
        t.complete += r.complete;
        t.gaps += r.gaps;
        t.event_bytes += r.event_bytes;
        if r.first_recv_us > 0 {
            t.first_recv_us = t.first_recv_us.min(r.first_recv_us);
        }
        t.last_recv_us = t.last_recv_us.max(r.last_recv_us);
        t.dropped += r.dropped;
        t.back += r.back;
        t.recovered += r.recovered;
        t.not_recovered += r.not_recovered;
        t.caught_up += r.caught_up;
        t.last_back_us = t.last_back_us.max(r.last_back_us);
        t.last_caught_up_us = t.last_caught_up_us.max(r.last_caught_up_us);
        t.attempts += r.attempts;
        t.failed_attempts += r.failed_attempts;
        t.subscribe_errors += r.subscribe_errors;
        if t.back_per_target.len() < r.back_per_target.len() {
            t.back_per_target.resize(r.back_per_target.len(), 0);
        }
        for (i, n) in r.back_per_target.iter().enumerate() {
            t.back_per_target[i] += n;
        }
        t.stopped += r.stopped;
        for (k, v) in &r.stop_reasons {
            *t.stop_reasons.entry(k.clone()).or_default() += v;
        }
        t.cpu_s += r.cpu_s;
        t.rss_kb += r.rss_kb;
        lat.merge(&r.latency_us);
    }
    if t.first_recv_us == u64::MAX {
        t.first_recv_us = 0;
    }
    (t, lat)
}

/// CPU and memory over a phase: nodes (all, and each), Redis, the machine
/// minus what was measured.
fn costs(o: &Opts, a: &Snap, b: &Snap, gen_cpu_s: f64, deliveries: u64) -> Value {
    let node_cpu: Vec<f64> = a
        .nodes
        .iter()
        .zip(&b.nodes)
        .map(|(x, y)| (y.cpu_s - x.cpu_s).max(0.0))
        .collect();
    let server: f64 = node_cpu.iter().sum();
    let redis = (b.redis.cpu_s - a.redis.cpu_s).max(0.0);
    let busy = b.busy_s - a.busy_s;
    let secs = (b.at_us.saturating_sub(a.at_us)) as f64 / 1e6;
    json!({
        "seconds": secs,
        "server_cpu_s": server,
        "node_cpu_s": node_cpu,
        "node_names": o.pids.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "server_cpu_us_per_delivery": if deliveries > 0 { server * 1e6 / deliveries as f64 } else { 0.0 },
        "redis_cpu_s": redis,
        "redis_used_memory": b.redis.used_memory,
        "redis_used_memory_grew": b.redis.used_memory as i64 - a.redis.used_memory as i64,
        "redis_rss": b.redis.rss,
        "machine_busy_s": busy,
        "generator_cpu_s": gen_cpu_s,
        "other_cpu_s": (busy - server - redis - gen_cpu_s).max(0.0),
    })
}

fn delivery(t: &PhaseReport, lat: &Hist, published: u64, first_publish_us: u64) -> Value {
    let span = t.last_recv_us.saturating_sub(first_publish_us) as f64 / 1e6;
    json!({
        "expected": t.expected,
        "unique": t.unique,
        "received": t.received,
        "missing": t.missing,
        "duplicates": t.duplicates,
        "unexpected": t.unexpected,
        "gaps": t.gaps,
        "complete": t.complete,
        "counted": t.counted,
        "per_s": if span > 0.0 { t.unique as f64 / span } else { 0.0 },
        "seconds": span,
        "bytes_per_delivery": if t.received > 0 { t.event_bytes as f64 / t.received as f64 } else { 0.0 },
        "latency_ms": quantiles_ms(lat),
        "published": published,
    })
}

fn lossless(t: &PhaseReport) -> bool {
    t.missing == 0 && t.duplicates == 0 && t.unexpected == 0 && t.gaps == 0 && t.stopped == 0
}

fn publish_plan(
    o: &Opts,
    topics: Vec<String>,
    event: &str,
    rate: f64,
    d: Duration,
) -> publish::Plan {
    publish::Plan {
        redis: o.redis,
        cluster: false,
        prefix: o.prefix.clone(),
        topics,
        history: true,
        event: event.into(),
        events: (rate * d.as_secs_f64()).round().max(1.0) as u64,
        rate,
        pad: 32,
    }
}

fn drive(
    o: &Opts,
    procs: &mut [WorkerProc],
    p: &Plan,
    rows: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let targets = o.targets.len();
    let mut ready = ScaleReady {
        first_start_us: u64::MAX,
        ..Default::default()
    };
    let mut open = Hist::default();
    for w in procs.iter_mut() {
        let r: ScaleReady = w.read_json("readiness")?;
        ready.ready += r.ready;
        ready.failed += r.failed;
        for (k, v) in r.fail_reasons {
            *ready.fail_reasons.entry(k).or_default() += v;
        }
        ready.first_start_us = ready.first_start_us.min(r.first_start_us);
        ready.last_ready_us = ready.last_ready_us.max(r.last_ready_us);
        ready.cpu_s += r.cpu_s;
        open.merge(&r.open_us);
    }
    eprintln!(
        "switchboard-bench scale: {} connections subscribed, {} failed",
        ready.ready, ready.failed
    );
    std::thread::sleep(o.hold);
    let held = snap(o);
    let connect_s = ready.last_ready_us.saturating_sub(ready.first_start_us) as f64 / 1e6;
    let nodes: Vec<Value> = (0..targets)
        .map(|i| {
            let conns = (p.conns_on)(o.connections, i);
            let grew = held.nodes[i]
                .rss_kb
                .saturating_sub(p.before.nodes[i].rss_kb)
                * 1024;
            json!({
                "name": o.pids[i].0,
                "connections": conns,
                "rss_before_kb": p.before.nodes[i].rss_kb,
                "rss_kb": held.nodes[i].rss_kb,
                "rss_per_conn_bytes": if conns > 0 { grew as f64 / conns as f64 } else { 0.0 },
            })
        })
        .collect();
    let rss_grew: u64 = (0..targets)
        .map(|i| {
            held.nodes[i]
                .rss_kb
                .saturating_sub(p.before.nodes[i].rss_kb)
                * 1024
        })
        .sum();
    let redis_grew = held
        .redis
        .used_memory
        .saturating_sub(p.before.redis.used_memory);
    rows.push((p.row)(
        "connect",
        json!({
            "connections": o.connections,
            "lossless": ready.failed == 0,
            "connect": {
                "ready": ready.ready,
                "failed": ready.failed,
                "fail_reasons": ready.fail_reasons,
                "seconds": connect_s,
                "per_s": if connect_s > 0.0 { ready.ready as f64 / connect_s } else { 0.0 },
                "handshake_ms": quantiles_ms(&open),
                "subscriptions": ready.ready * 2,
            },
            "per_node": nodes,
            "rss_per_conn_bytes": rss_grew as f64 / ready.ready.max(1) as f64,
            "redis_used_memory": held.redis.used_memory,
            "redis_used_memory_grew": redis_grew,
            "server_cpu_us_per_connection": (held.nodes.iter().zip(&p.before.nodes)
                .map(|(b, a)| (b.cpu_s - a.cpu_s).max(0.0)).sum::<f64>()) * 1e6 / ready.ready.max(1) as f64,
            "redis_cpu_us_per_subscribe": (held.redis.cpu_s - p.before.redis.cpu_s).max(0.0) * 1e6
                / (2 * ready.ready).max(1) as f64,
            "costs": costs(o, &p.before, &held, ready.cpu_s, 0),
        }),
    ));
    let gen_cpu = |reports: &[PhaseReport]| reports.iter().map(|r| r.cpu_s).sum::<f64>();
    // The workers count CPU from their start: what connecting cost is not
    // the first phase's.
    let mut gen_before = ready.cpu_s;

    // === the shared topic, then the own topics ===
    let mut phases: Vec<(String, &str, publish::Plan)> = o
        .all_rates
        .iter()
        .map(|&r| {
            (
                format!("all-{r}"),
                "all",
                publish_plan(o, vec![p.all_topic.to_string()], "all", r, o.all_duration),
            )
        })
        .collect();
    phases.push((
        "topics".into(),
        "topics",
        publish_plan(o, p.topics.to_vec(), "tick", o.topic_rate, o.topic_duration),
    ));
    for (name, kind, plan) in phases {
        eprintln!("switchboard-bench scale: phase {name}");
        tell_all(procs, &format!("phase {kind} {}", now_us()), "phase")?;
        let a = snap(o);
        let pubr = publish::run(&plan).context("publishing")?;
        for w in procs.iter_mut() {
            w.tell(&format!("drain {}", pubr.events));
        }
        let reports = procs
            .iter_mut()
            .map(|w| w.read_json::<PhaseReport>("a phase report"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let b = snap(o);
        let (t, lat) = merged(&reports);
        let g = gen_cpu(&reports);
        rows.push((p.row)(
            &name,
            json!({
                "connections": t.counted,
                "lossless": lossless(&t),
                "publish": { "events": pubr.events, "rate_target": plan.rate, "topics": plan.topics.len(),
                             "errors": pubr.errors, "max_behind_ms": pubr.max_behind_ms },
                "delivery": delivery(&t, &lat, pubr.events, pubr.first_us),
                "costs": costs(o, &a, &b, g - gen_before, t.unique),
                "redis_cpu_us_per_publication": (b.redis.cpu_s - a.redis.cpu_s).max(0.0) * 1e6
                    / pubr.events.max(1) as f64,
            }),
        ));
        gen_before = g;
    }

    // === node death ===
    if p.storm_connections < o.connections {
        eprintln!(
            "switchboard-bench scale: closing {} connections so that {} nodes hold the rest",
            o.connections - p.storm_connections,
            targets - 1
        );
        tell_all(procs, &format!("keep {}", p.storm_connections), "keep")?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let victim_conns = (p.conns_on)(p.storm_connections, p.victim);
    eprintln!(
        "switchboard-bench scale: node death, {} on node {} of {}",
        victim_conns,
        p.victim + 1,
        targets
    );
    let start_us = now_us();
    tell_all(procs, &format!("phase storm {start_us}"), "phase")?;
    let a = snap(o);
    let plan = publish_plan(o, p.topics.to_vec(), "tick", o.storm_rate, o.storm_duration);
    let rate = plan.rate;
    let publisher = std::thread::spawn(move || publish::run(&plan));
    // Redis and node CPU every 250 ms: the storm's window is known only at
    // the end.
    let kill_at = Instant::now() + o.kill_after;
    let mut samples: Vec<Snap> = Vec::new();
    let mut killed_us = 0;
    let mut pre_kill: Option<Snap> = None;
    while !publisher.is_finished() {
        if killed_us == 0 && Instant::now() >= kill_at {
            let s = snap(o);
            let pid = o.pids[p.victim].1;
            // SAFETY: kill(2) on a pid we were given; no memory involved.
            let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            killed_us = now_us();
            if rc != 0 {
                bail!("kill -9 {pid} failed: {}", std::io::Error::last_os_error());
            }
            pre_kill = Some(s);
            eprintln!(
                "switchboard-bench scale: SIGKILL to {} (pid {pid})",
                o.pids[p.victim].0
            );
        }
        std::thread::sleep(Duration::from_millis(250));
        samples.push(snap(o));
    }
    let pubr = publisher
        .join()
        .map_err(|_| anyhow::anyhow!("the publisher panicked"))?
        .context("publishing")?;
    if killed_us == 0 {
        bail!("the publication ended before --kill-after; make --storm-duration longer");
    }
    for w in procs.iter_mut() {
        w.tell(&format!("drain {}", pubr.events));
    }
    let reports = procs
        .iter_mut()
        .map(|w| w.read_json::<PhaseReport>("the node-death report"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let b = snap(o);
    let (t, lat) = merged(&reports);
    let g = gen_cpu(&reports);
    // The storm: from the kill until every dropped client holds every
    // offset it missed (or was back, if that came later).
    let storm_end_us = t.last_caught_up_us.max(t.last_back_us).max(killed_us);
    let rel = |us: u64| us.saturating_sub(killed_us) as f64 / 1e6;
    let bucket = |us: u64| (us.saturating_sub(start_us) / BUCKET_US) as u32;
    let (kill_b, end_b) = (bucket(killed_us), bucket(storm_end_us));
    let mut during = Hist::default();
    let mut before_kill = Hist::default();
    for r in &reports {
        for (i, h) in &r.timeline {
            if *i >= kill_b && *i <= end_b {
                during.merge(h);
            } else if *i < kill_b {
                before_kill.merge(h);
            }
        }
    }
    // Redis and surviving nodes' CPU over the storm's window: the samples
    // closest around it.
    let pre = pre_kill.unwrap_or_else(|| a.clone());
    let post = samples
        .iter()
        .find(|s| s.at_us >= storm_end_us)
        .cloned()
        .unwrap_or_else(|| b.clone());
    let window_s = post.at_us.saturating_sub(pre.at_us) as f64 / 1e6;
    let redis_storm = (post.redis.cpu_s - pre.redis.cpu_s).max(0.0);
    let survivors_cpu: f64 = (0..targets)
        .filter(|&i| i != p.victim)
        .map(|i| (post.nodes[i].cpu_s - pre.nodes[i].cpu_s).max(0.0))
        .sum();
    // The same span before the kill, for comparison.
    let calm = samples
        .iter()
        .rev()
        .find(|s| s.at_us + (window_s * 1e6) as u64 <= pre.at_us)
        .cloned()
        .unwrap_or_else(|| a.clone());
    let calm_s = pre.at_us.saturating_sub(calm.at_us) as f64 / 1e6;
    let redis_calm = (pre.redis.cpu_s - calm.redis.cpu_s).max(0.0);
    let survivors_calm: f64 = (0..targets)
        .filter(|&i| i != p.victim)
        .map(|i| (pre.nodes[i].cpu_s - calm.nodes[i].cpu_s).max(0.0))
        .sum();
    let mut storm_lossless = lossless(&t);
    if t.back < t.dropped || t.caught_up < t.dropped || t.not_recovered > 0 {
        storm_lossless = false;
    }
    rows.push((p.row)(
        "node-death",
        json!({
            "connections": t.counted,
            "lossless": storm_lossless,
            "publish": { "events": pubr.events, "rate_target": rate, "topics": p.topics.len(),
                         "errors": pubr.errors, "max_behind_ms": pubr.max_behind_ms },
            "delivery": delivery(&t, &lat, pubr.events, pubr.first_us),
            "costs": costs(o, &a, &b, g - gen_before, t.unique),
            "redis_cpu_us_per_publication": (b.redis.cpu_s - a.redis.cpu_s).max(0.0) * 1e6
                / pubr.events.max(1) as f64,
            "storm": {
                "victim": o.pids[p.victim].0,
                "victim_connections": victim_conns,
                "kill_after_s": killed_us.saturating_sub(start_us) as f64 / 1e6,
                "dropped": t.dropped,
                "back": t.back,
                "recovered": t.recovered,
                "not_recovered": t.not_recovered,
                "caught_up": t.caught_up,
                "seconds_until_all_back": if t.back > 0 { rel(t.last_back_us) } else { 0.0 },
                "seconds_until_all_caught_up": if t.caught_up > 0 { rel(t.last_caught_up_us) } else { 0.0 },
                "attempts": t.attempts,
                "failed_attempts": t.failed_attempts,
                "subscribe_errors": t.subscribe_errors,
                "back_per_node": t.back_per_target,
                "stopped": t.stopped,
                "stop_reasons": t.stop_reasons,
                "min_delay_ms": o.min_delay.as_millis() as u64,
                "max_delay_ms": o.max_delay.as_millis() as u64,
                "survivors_latency_ms_during": quantiles_ms(&during),
                "survivors_latency_ms_before": quantiles_ms(&before_kill),
                "window_s": window_s,
                "redis_cpu_s_during": redis_storm,
                "history_reads": 2 * t.back,
                // What Redis served: every FCALL in the window less the
                // publications (at the storm rate); the nodes share
                // concurrent reads of one topic (history::coalesce).
                "redis_history_calls": post.redis.fcalls.saturating_sub(pre.redis.fcalls)
                    .saturating_sub((rate * window_s).round() as u64),
                "redis_cpu_us_per_history_read": if t.back > 0 {
                    (redis_storm - redis_calm / calm_s.max(1e-9) * window_s).max(0.0) * 1e6 / (2 * t.back) as f64
                } else { 0.0 },
                "redis_cpu_share_during": if window_s > 0.0 { redis_storm / window_s } else { 0.0 },
                "redis_cpu_share_before": if calm_s > 0.0 { redis_calm / calm_s } else { 0.0 },
                "survivors_cpu_s_during": survivors_cpu,
                "survivors_cpu_share_before": if calm_s > 0.0 { survivors_calm / calm_s } else { 0.0 },
            },
        }),
    ));
    Ok(())
}

// === report ===

/// The Markdown tables of the scale rows (from `report::markdown` and the
/// tool's own stderr).
pub fn markdown(rows: &[Value]) -> String {
    use std::fmt::Write as _;
    let f = |r: &Value, p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    let th = report::thousands;
    let mut s = String::new();
    let connects: Vec<&Value> = rows.iter().filter(|r| r["connect"].is_object()).collect();
    if !connects.is_empty() {
        s.push_str("\n| Scale: connect | Nodes | Connections | Subscriptions | Failed | Connect s | Connects/s | Handshake p99 ms | RSS/conn per node | Mean RSS/conn | Server CPU µs/connection | Redis used memory | Redis CPU µs/subscribe | Generator workers | Other CPU s |\n|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|\n");
        for r in connects {
            let per_node: Vec<String> = r["per_node"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| format!("{} B", th(n["rss_per_conn_bytes"].as_f64().unwrap_or(0.0))))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} B | {:.1} | {:.1} MB | {:.1} | {} | {:.1} |",
                r["scenario"].as_str().unwrap_or("?"),
                f(r, "/nodes"),
                th(f(r, "/connect/ready")),
                th(f(r, "/connect/subscriptions")),
                th(f(r, "/connect/failed")),
                f(r, "/connect/seconds"),
                th(f(r, "/connect/per_s")),
                f(r, "/connect/handshake_ms/p99"),
                per_node.join(", "),
                th(f(r, "/rss_per_conn_bytes")),
                f(r, "/server_cpu_us_per_connection"),
                f(r, "/redis_used_memory") / 1e6,
                f(r, "/redis_cpu_us_per_subscribe"),
                f(r, "/workers"),
                f(r, "/costs/other_cpu_s"),
            );
        }
    }
    let runs: Vec<&Value> = rows.iter().filter(|r| r["delivery"].is_object()).collect();
    if !runs.is_empty() {
        s.push_str("\n| Scale: publish | Connections | Topics | Events | Delivered / expected | Lost | Dup. | Deliveries/s | p50 ms | p99 ms | max ms | Server CPU s | Server CPU µs/delivery | Redis CPU s | Redis CPU µs/publication | Redis memory (change) | Generator CPU s | Other CPU s |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for r in runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} @ {}/s | {} / {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} MB ({:+.1}) | {:.1} | {:.1} |",
                r["scenario"].as_str().unwrap_or("?"),
                th(f(r, "/connections")),
                f(r, "/publish/topics"),
                th(f(r, "/publish/events")),
                th(f(r, "/publish/rate_target")),
                th(f(r, "/delivery/unique")),
                th(f(r, "/delivery/expected")),
                th(f(r, "/delivery/missing")),
                th(f(r, "/delivery/duplicates")),
                th(f(r, "/delivery/per_s")),
                f(r, "/delivery/latency_ms/p50"),
                f(r, "/delivery/latency_ms/p99"),
                f(r, "/delivery/latency_ms/max"),
                f(r, "/costs/server_cpu_s"),
                f(r, "/costs/server_cpu_us_per_delivery"),
                f(r, "/costs/redis_cpu_s"),
                f(r, "/redis_cpu_us_per_publication"),
                f(r, "/costs/redis_used_memory") / 1e6,
                f(r, "/costs/redis_used_memory_grew") / 1e6,
                f(r, "/costs/generator_cpu_s"),
                f(r, "/costs/other_cpu_s"),
            );
        }
    }
    let storms: Vec<&Value> = rows.iter().filter(|r| r["storm"].is_object()).collect();
    if !storms.is_empty() {
        s.push_str("\n| Scale: node death | Killed | Its connections | Back | `recovered: true` | All back after s | All hold every missed offset after s | Lost | Dup. | Reconnect attempts (failed) | Came back per node | Survivors' p99 before / during ms | Redis CPU during (share of a core) | Redis CPU before (share) | Resubscriptions with `since` | Redis history calls | Redis CPU µs/resubscription |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|\n");
        for r in storms {
            let per_node: Vec<String> = r
                .pointer("/storm/back_per_node")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|n| th(n.as_f64().unwrap_or(0.0)))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {} ({}) | {} | {} / {} | {:.2} s ({:.0} %) | {:.0} % | {} | {} | {:.1} |",
                r["scenario"].as_str().unwrap_or("?"),
                r.pointer("/storm/victim")
                    .and_then(Value::as_str)
                    .unwrap_or("?"),
                th(f(r, "/storm/dropped")),
                th(f(r, "/storm/back")),
                th(f(r, "/storm/recovered")),
                f(r, "/storm/seconds_until_all_back"),
                f(r, "/storm/seconds_until_all_caught_up"),
                th(f(r, "/delivery/missing")),
                th(f(r, "/delivery/duplicates")),
                th(f(r, "/storm/attempts")),
                th(f(r, "/storm/failed_attempts")),
                per_node.join(" / "),
                f(r, "/storm/survivors_latency_ms_before/p99"),
                f(r, "/storm/survivors_latency_ms_during/p99"),
                f(r, "/storm/redis_cpu_s_during"),
                f(r, "/storm/redis_cpu_share_during") * 100.0,
                f(r, "/storm/redis_cpu_share_before") * 100.0,
                th(f(r, "/storm/history_reads")),
                th(f(r, "/storm/redis_history_calls")),
                f(r, "/storm/redis_cpu_us_per_history_read"),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_official_client() {
        assert_eq!(backoff_cap(500, 30_000, 0), 1_000);
        assert_eq!(backoff_cap(500, 30_000, 1), 2_000);
        assert_eq!(backoff_cap(500, 30_000, 5), 30_000);
        assert_eq!(backoff_cap(500, 30_000, 400), 30_000);
        assert_eq!(backoff_cap(500, 400, 0), 500);
    }

    #[test]
    fn reconnects_go_to_every_other_node_and_never_back() {
        for current in 0..6 {
            let mut seen: Vec<usize> = (0..5).map(|r| other_target(current, 6, r)).collect();
            seen.sort();
            let others: Vec<usize> = (0..6).filter(|&t| t != current).collect();
            assert_eq!(seen, others);
        }
    }

    #[test]
    fn close_codes_as_clients_js() {
        for code in [1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014, 4000, 4499] {
            assert!(reconnects_on(code), "{code}");
        }
        for code in [1002, 1008, 3000, 4500, 4999] {
            assert!(!reconnects_on(code), "{code}");
        }
    }

    #[test]
    fn frames_are_read_without_parsing() {
        let ev = br#"{"type":"event","name":"tick","topic":"hist.scale-1-3","data":{"seq":7,"ts":123,"pad":"x"},"offset":42,"timestamp":"t"}"#;
        assert_eq!(number_after(ev, b"\"seq\":"), Some(7));
        assert_eq!(number_after(ev, b"\"offset\":"), Some(42));
        let sub =
            br#"{"type":"subscribed","event":"hist.a","offset":5,"epoch":"k3","recovered":true}"#;
        assert_eq!(string_after(sub, b"\"epoch\":\""), Some("k3".into()));
    }
}
