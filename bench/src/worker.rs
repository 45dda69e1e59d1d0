//! A worker process: opens its share of the connections on a single-threaded
//! runtime, reports when they are all ready, then counts and times the
//! publications they receive until the coordinator says how many to expect.
//!
//! Workers exist because one process may hold no more descriptors than its
//! `RLIMIT_NOFILE` (often 20,000 here, and not raisable without privileges),
//! and because a single thread per worker keeps the generator's share of the
//! two cores small and predictable.
//!
//! Control protocol (lines): the worker prints `{"ready":…}` on stdout once
//! every connection is ready or failed; the coordinator writes
//! `drain <published>` on stdin; the worker prints its [`WorkerReport`] when
//! everything expected arrived or nothing arrived for `drain_idle_ms`, then
//! closes its connections and exits. A watchdog ends the process after
//! `max_time_ms` whatever happens.
//!
//! Recovery (`recover`): after `ready`, `disconnect` closes every
//! connection (the worker answers with another ready line once all are
//! closed); `reconnect <published>` reconnects them all at once, each
//! subscribing with `since` = the position its first `subscribed` reported;
//! the worker prints a ready line when every one is back, then drains as
//! above without waiting for `drain`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hist::{Hist, SparseHist};
use super::now_us;
use super::procfs;
use super::ws::{self, Ended, Out};

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Native,
    Socketio,
    /// Server-Sent Events (`/sse/<topic>`): the native frames as `data:` lines.
    Sse,
}

/// Sequence numbers at or beyond this are counted as unexpected instead of
/// growing a connection's bitset (2 MiB at most).
const MAX_SEQ: u64 = 1 << 24;

fn one() -> usize {
    1
}

/// The topic index of connection `index` with `targets` nodes:
/// `(index / targets) % topics`, so that every topic has subscribers on
/// every node (connection `i` goes to target `i % targets`).
pub fn topic_index(index: usize, topics: usize, targets: usize) -> usize {
    (index / targets.max(1)) % topics.max(1)
}

/// The name of topic `k`: `topic` itself (one topic), or `topic-<k>`.
pub fn topic_name(topic: &str, topics: usize, k: usize) -> String {
    if topics <= 1 {
        topic.to_string()
    } else {
        format!("{topic}-{k}")
    }
}

/// How many of `published` round-robin events topic `k` of `topics` got.
pub fn share(published: u64, topics: usize, k: usize) -> u64 {
    let n = topics.max(1) as u64;
    let k = (k % topics.max(1)) as u64;
    published / n + u64::from(k < published % n)
}

/// Everything a worker needs; passed as JSON on its command line.
#[derive(Serialize, Deserialize, Clone)]
pub struct WorkerConfig {
    pub protocol: Protocol,
    pub targets: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    /// Global connection indexes `first..first + count` (round-robin over
    /// targets and sources by global index).
    pub first: usize,
    pub count: usize,
    pub topic: String,
    /// Topics the connections spread over: connection `i` (on target
    /// `i % targets`) subscribes to topic [`topic_index`]`(i, topics, targets)`;
    /// the publisher sends event `j` to topic `j % topics` with `seq`
    /// `j / topics`.
    #[serde(default = "one")]
    pub topics: usize,
    pub event: String,
    pub subscribe: bool,
    /// Native only: subscribe with `/ws/<topic>` instead of a message.
    pub subscribe_via_path: bool,
    /// Native only: ask for compact event frames (`?format=compact`).
    #[serde(default)]
    pub compact: bool,
    /// A history topic: `subscribed` must carry a position and every event
    /// the offset `position + seq + 1` (the publisher is the topic's only one).
    pub history: bool,
    /// The recovery scenario (see the module doc); implies `history`.
    pub recover: bool,
    pub concurrency: usize,
    /// Connection attempts per second for this worker; 0 = unlimited.
    pub connect_rate: f64,
    pub connect_timeout_ms: u64,
    pub drain_idle_ms: u64,
    pub drain_max_ms: u64,
    pub max_time_ms: u64,
}

#[derive(Serialize, Deserialize)]
pub struct ReadyLine {
    pub ready: usize,
    pub failed: usize,
}

/// What one worker measured.
#[derive(Serialize, Deserialize, Default)]
pub struct WorkerReport {
    pub connections: usize,
    /// TCP connected and upgraded, first server message received.
    pub opened: usize,
    /// Opened and (when asked) subscribed.
    pub ready: usize,
    pub failed: usize,
    pub fail_reasons: BTreeMap<String, usize>,
    /// Connections that ended before the coordinator stopped them.
    pub closed_early: usize,
    pub close_reasons: BTreeMap<String, usize>,
    /// Bench events received, duplicates included.
    pub received: u64,
    /// Their WebSocket frames' bytes (header and payload), as they came
    /// over TCP.
    #[serde(default)]
    pub event_bytes: u64,
    pub unique: u64,
    pub duplicates: u64,
    /// Events with a sequence number outside `0..published`.
    pub unexpected: u64,
    /// Sum over connections of events published but not received (a failed
    /// connection misses all of them).
    pub missing: u64,
    /// Connections that received every event exactly once.
    pub complete: usize,
    /// History: events without the expected offset.
    pub offset_errors: u64,
    /// Recovery: connections closed by the bench, back and subscribed again,
    /// and how many `subscribed` said `recovered: true` / not.
    pub disconnected: usize,
    pub reconnected: usize,
    pub recovered: usize,
    pub not_recovered: usize,
    pub min_per_conn: u64,
    pub max_per_conn: u64,
    pub first_start_us: u64,
    pub last_open_us: u64,
    pub last_ready_us: u64,
    pub first_recv_us: u64,
    pub last_recv_us: u64,
    /// Connect start → first server message, per connection.
    pub open_us: SparseHist,
    /// Publisher clock → receive, per delivery.
    pub latency_us: SparseHist,
    pub cpu_s: f64,
    pub rss_kb: u64,
}

/// Shared by the tasks of this (single-threaded) worker.
struct Agg {
    report: WorkerReport,
    open: Hist,
    latency: Hist,
    trace: Option<Vec<(u32, u32)>>,
    /// Connections ready in phase 0, per topic index.
    ready_by_topic: Vec<u64>,
}

struct Shared {
    cfg: WorkerConfig,
    agg: RefCell<Agg>,
    /// Events published, known once the coordinator says `drain`.
    published: Cell<u64>,
    /// Prefix of a bench event message for this protocol.
    prefix: Vec<u8>,
    /// Stop receiving and fold the counts into `agg`.
    stop: CancellationToken,
    /// Then close the connections (after the coordinator sampled `/proc`).
    close: CancellationToken,
    /// Connections whose counts are in `agg`.
    folded: Cell<usize>,
    /// Recovery: 0 before `disconnect`, 1 once reconnecting.
    phase: Cell<u8>,
    disconnect: CancellationToken,
    reconnect: CancellationToken,
    handshakes: Semaphore,
}

pub fn main(cfg_json: &str) -> anyhow::Result<()> {
    let cfg: WorkerConfig = serde_json::from_str(cfg_json)?;
    let max_time = Duration::from_millis(cfg.max_time_ms);
    process("switchboard-bench worker", max_time, |ctl| run(cfg, ctl))
}

/// A worker process's frame, shared by the fan-out and scale workers: a
/// hard time limit (exit 3), the coordinator's control lines from stdin
/// (EOF means "stop now"), and `run` on a single-threaded local runtime.
pub fn process<F, Fut>(name: &'static str, max_time: Duration, run: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::sync::mpsc::Receiver<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    std::thread::spawn(move || {
        std::thread::sleep(max_time);
        eprintln!("{name}: time limit reached, exiting");
        std::process::exit(3);
    });
    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if ctl_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(ctl_rx))
}

/// One JSON line on stdout, flushed: the coordinator reads them as they come.
pub fn print_line(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

async fn run(
    cfg: WorkerConfig,
    mut ctl: tokio::sync::mpsc::Receiver<String>,
) -> anyhow::Result<()> {
    let prefix = match cfg.protocol {
        Protocol::Native if cfg.compact => "[".to_string(),
        Protocol::Native | Protocol::Sse => {
            format!(r#"{{"type":"event","name":"{}""#, cfg.event)
        }
        Protocol::Socketio => format!(r#"42["{}","#, cfg.event),
    }
    .into_bytes();
    let shared = Rc::new(Shared {
        handshakes: Semaphore::new(cfg.concurrency.max(1)),
        agg: RefCell::new(Agg {
            report: WorkerReport {
                connections: cfg.count,
                min_per_conn: u64::MAX,
                first_start_us: u64::MAX,
                first_recv_us: u64::MAX,
                ..Default::default()
            },
            open: Hist::default(),
            latency: Hist::default(),
            trace: std::env::var_os("BENCH_TRACE").map(|_| Vec::new()),
            ready_by_topic: vec![0; cfg.topics.max(1)],
        }),
        published: Cell::new(0),
        prefix,
        stop: CancellationToken::new(),
        close: CancellationToken::new(),
        folded: Cell::new(0),
        phase: Cell::new(0),
        disconnect: CancellationToken::new(),
        reconnect: CancellationToken::new(),
        cfg,
    });
    let n = shared.cfg.count;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for k in 0..n {
        let at = if shared.cfg.connect_rate > 0.0 {
            Some(started + Duration::from_secs_f64(k as f64 / shared.cfg.connect_rate))
        } else {
            None
        };
        tasks.push(tokio::task::spawn_local(connection(
            shared.clone(),
            shared.cfg.first + k,
            at,
        )));
    }

    // Phase 1: wait until every connection is ready or failed (each has
    // its own handshake deadline, so this ends).
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        let a = shared.agg.borrow();
        if a.report.ready + a.report.failed >= n {
            break;
        }
    }
    {
        let a = shared.agg.borrow();
        print_line(&ReadyLine {
            ready: a.report.ready,
            failed: a.report.failed,
        })?;
    }

    // Phase 2: wait for `drain <published>` (EOF: nothing was published).
    // Recovery: `disconnect`, then `reconnect <published>`.
    let published = if shared.cfg.recover {
        recover(&shared, &mut ctl, &mut tick).await?
    } else {
        match ctl.recv().await {
            Some(line) => line
                .strip_prefix("drain ")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0),
            None => 0,
        }
    };
    shared.published.set(published);

    // Phase 3: until everything expected has arrived, or nothing arrives for
    // `drain_idle_ms`, or `drain_max_ms` passed.
    let expected: u64 = {
        let a = shared.agg.borrow();
        let topics = shared.cfg.topics;
        a.ready_by_topic
            .iter()
            .enumerate()
            .map(|(k, &ready)| share(published, topics, k) * ready)
            .sum()
    };
    let idle = Duration::from_millis(shared.cfg.drain_idle_ms);
    let deadline = Instant::now() + Duration::from_millis(shared.cfg.drain_max_ms);
    let mut last_count = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        if expected == 0 {
            break;
        }
        tick.tick().await;
        let unique = shared.agg.borrow().report.unique;
        if unique >= expected {
            break;
        }
        let now = Instant::now();
        if unique != last_count {
            last_count = unique;
            last_change = now;
        } else if now - last_change >= idle || now >= deadline {
            break;
        }
    }

    // Phase 4: every connection folds its counts into `agg`; report.
    shared.stop.cancel();
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.folded.get() < n && Instant::now() < deadline {
        tick.tick().await;
    }
    {
        let mut a = shared.agg.borrow_mut();
        let open = a.open.to_sparse();
        let latency = a.latency.to_sparse();
        let r = &mut a.report;
        r.open_us = open;
        r.latency_us = latency;
        if r.min_per_conn == u64::MAX {
            r.min_per_conn = 0;
        }
        let me = procfs::sample(std::process::id());
        r.cpu_s = me.cpu_s;
        r.rss_kb = me.rss_kb;
        print_line(r)?;
        if let (Some(t), Some(path)) = (&a.trace, std::env::var_os("BENCH_TRACE")) {
            let mut f = std::io::BufWriter::new(std::fs::File::create(format!(
                "{}.{}",
                path.to_string_lossy(),
                std::process::id()
            ))?);
            for (s, l) in t {
                writeln!(f, "{s} {l}")?;
            }
        }
    }

    // Phase 5: close when the coordinator says so (any line, or EOF).
    let _ = ctl.recv().await;
    shared.close.cancel();
    let all = futures_util::future::join_all(tasks);
    let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    Ok(())
}

/// The recovery scenario's middle: close all, wait, reconnect all with
/// `since`. Returns the number of publications made meanwhile.
async fn recover(
    shared: &Shared,
    ctl: &mut tokio::sync::mpsc::Receiver<String>,
    tick: &mut tokio::time::Interval,
) -> anyhow::Result<u64> {
    let (ready, failed) = {
        let a = shared.agg.borrow();
        (a.report.ready, a.report.failed)
    };
    if ctl.recv().await.as_deref() != Some("disconnect") {
        return Ok(0);
    }
    shared.disconnect.cancel();
    loop {
        tick.tick().await;
        if shared.agg.borrow().report.disconnected >= ready {
            break;
        }
    }
    // Connections the server closed before `disconnect` do not come back.
    let gone = shared.agg.borrow().report.closed_early;
    print_line(&ReadyLine {
        ready: shared.agg.borrow().report.disconnected,
        failed,
    })?;
    let published = match ctl.recv().await {
        Some(line) => line
            .strip_prefix("reconnect ")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0),
        None => return Ok(0),
    };
    shared.published.set(published);
    shared.phase.set(1);
    shared.reconnect.cancel();
    loop {
        tick.tick().await;
        let a = shared.agg.borrow();
        if a.report.reconnected + (a.report.failed - failed) + gone >= ready {
            break;
        }
    }
    let a = shared.agg.borrow();
    print_line(&ReadyLine {
        ready: a.report.reconnected,
        failed: a.report.failed,
    })?;
    Ok(published)
}

// === one connection ===

/// What one connection saw; folded into the worker's report at the end.
struct ConnState {
    protocol: Protocol,
    subscribe: bool,
    opened: bool,
    subscribed: bool,
    failure: Option<String>,
    /// When this connection started connecting (µs since the epoch).
    started_us: u64,
    /// One bit per sequence number, allocated with the first event.
    seen: Vec<u64>,
    unique: u64,
    /// History: the position the first `subscribed` reported.
    base: Option<u64>,
    epoch: Option<String>,
    /// The topic this connection subscribes to, and its index.
    topic: String,
    topic_index: usize,
}

impl ConnState {
    fn ready(&self) -> bool {
        self.opened && (self.subscribed || !self.subscribe)
    }
}

async fn connection(shared: Rc<Shared>, index: usize, start_at: Option<Instant>) {
    let mut st = ConnState {
        protocol: shared.cfg.protocol,
        subscribe: shared.cfg.subscribe,
        opened: false,
        subscribed: false,
        failure: None,
        started_us: 0,
        seen: Vec::new(),
        unique: 0,
        base: None,
        epoch: None,
        topic: String::new(),
        topic_index: topic_index(index, shared.cfg.topics, shared.cfg.targets.len()),
    };
    st.topic = topic_name(&shared.cfg.topic, shared.cfg.topics, st.topic_index);
    let until = if shared.cfg.recover {
        &shared.disconnect
    } else {
        &shared.stop
    };
    let mut conn = session(&shared, &mut st, index, start_at, until).await;
    if shared.cfg.recover {
        conn = match conn {
            End::Stopped(mut c) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.close()).await;
                drop(c);
                shared.agg.borrow_mut().report.disconnected += 1;
                shared.reconnect.cancelled().await;
                st.opened = false;
                st.subscribed = false;
                session(&shared, &mut st, index, None, &shared.stop).await
            }
            // Closed early by the server: counted, not reconnected.
            End::Early => {
                shared.agg.borrow_mut().report.disconnected += 1;
                End::Early
            }
            End::Failed => End::Failed,
        };
    }
    // Counts are folded only once `published` is known.
    shared.stop.cancelled().await;
    if !matches!(conn, End::Failed) {
        let published = share(shared.published.get(), shared.cfg.topics, st.topic_index);
        let mut a = shared.agg.borrow_mut();
        let r = &mut a.report;
        r.missing += published.saturating_sub(st.unique);
        if st.unique == published && published > 0 {
            r.complete += 1;
        }
        r.min_per_conn = r.min_per_conn.min(st.unique);
        r.max_per_conn = r.max_per_conn.max(st.unique);
    } else if shared.cfg.topics > 1 {
        // A connection that never became ready missed its topic's share
        // (with one topic the coordinator counts it: everything published).
        let published = share(shared.published.get(), shared.cfg.topics, st.topic_index);
        shared.agg.borrow_mut().report.missing += published;
    }
    shared.folded.set(shared.folded.get() + 1);
    if let End::Stopped(mut conn) = conn {
        shared.close.cancelled().await;
        // Close politely, bounded: the server then closes first.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
    }
}

/// How a session ended.
enum End {
    /// Never became ready (counted as failed).
    Failed,
    /// Stopped by the coordinator, still open.
    Stopped(ws::Conn),
    /// Ready, then ended by the server or an error (counted).
    Early,
}

/// Opens, subscribes and receives until stopped.
async fn session(
    shared: &Shared,
    st: &mut ConnState,
    index: usize,
    start_at: Option<Instant>,
    until: &CancellationToken,
) -> End {
    let cfg = &shared.cfg;
    let permit = tokio::select! {
        p = shared.handshakes.acquire() => p.ok(),
        _ = until.cancelled() => None,
    };
    if let Some(at) = start_at {
        tokio::time::sleep_until(at).await;
    }
    if until.is_cancelled() {
        fail(shared, "stopped before connecting");
        return End::Failed;
    }
    let started_us = now_us();
    st.started_us = started_us;
    {
        let mut a = shared.agg.borrow_mut();
        a.report.first_start_us = a.report.first_start_us.min(started_us);
    }
    let target = cfg.targets[index % cfg.targets.len()];
    let source = (!cfg.sources.is_empty()).then(|| cfg.sources[index % cfg.sources.len()]);
    let topic = st.topic.clone();
    let query = if cfg.compact { "?format=compact" } else { "" };
    let path = match cfg.protocol {
        Protocol::Native if cfg.subscribe && cfg.subscribe_via_path => {
            format!("/ws/{topic}{query}")
        }
        Protocol::Native => format!("/ws{query}"),
        Protocol::Socketio => "/socket.io/?EIO=4&transport=websocket".to_string(),
        Protocol::Sse if cfg.subscribe => format!("/sse/{topic}"),
        Protocol::Sse => "/sse".to_string(),
    };
    let handshake_deadline = Instant::now() + Duration::from_millis(cfg.connect_timeout_ms);
    let connect = async {
        match cfg.protocol {
            Protocol::Sse => ws::connect_sse(target, source, &path).await,
            _ => ws::connect(target, source, &path).await,
        }
    };
    let conn = tokio::time::timeout_at(handshake_deadline, connect).await;
    let mut conn = match conn {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            fail(shared, &e.to_string());
            return End::Failed;
        }
        Err(_) => {
            fail(shared, "connect timed out");
            return End::Failed;
        }
    };
    if cfg.protocol == Protocol::Native && cfg.subscribe && !cfg.subscribe_via_path {
        let msg = match (st.base, &st.epoch) {
            (Some(offset), Some(epoch)) if shared.phase.get() > 0 => format!(
                r#"{{"type":"subscribe","event":"{topic}","since":{{"offset":{offset},"epoch":"{epoch}"}}}}"#,
            ),
            _ => format!(r#"{{"type":"subscribe","event":"{topic}"}}"#),
        };
        conn.out.text(msg.as_bytes());
    }

    let mut permit = permit;
    let stop = until.cancelled();
    tokio::pin!(stop);
    let handshake_timeout = tokio::time::sleep_until(handshake_deadline);
    tokio::pin!(handshake_timeout);
    let mut ready = false;
    let mut pending = conn.has_buffered();
    let ended: Option<String> = loop {
        if !pending {
            if let Err(e) = conn.flush().await {
                break Some(format!("write: {e}"));
            }
            let r = tokio::select! {
                biased;
                _ = &mut stop => break None,
                _ = &mut handshake_timeout, if !ready => break Some("handshake timed out".into()),
                r = conn.fill() => r,
            };
            match r {
                Ok(true) => {}
                Ok(false) => break Some("closed by server (EOF)".into()),
                Err(e) => break Some(format!("read: {e}")),
            }
        }
        pending = false;
        let now = now_us();
        let res = {
            let mut agg = shared.agg.borrow_mut();
            let published = share(shared.published.get(), cfg.topics, st.topic_index);
            conn.drain(|msg, out| on_message(shared, st, &mut agg, msg, out, now, published))
        };
        if let Err(end) = res {
            break Some(match end {
                Ended::Close(Some(code)) => format!("close {code}"),
                Ended::Close(None) => "close".into(),
                Ended::Protocol(p) => format!("protocol: {p}"),
            });
        }
        if let Some(f) = st.failure.take() {
            break Some(f);
        }
        if !ready && st.ready() {
            ready = true;
            permit = None;
            let t = now_us();
            let mut a = shared.agg.borrow_mut();
            if shared.phase.get() == 0 {
                a.report.ready += 1;
                a.ready_by_topic[st.topic_index] += 1;
            } else {
                a.report.reconnected += 1;
            }
            a.report.last_ready_us = a.report.last_ready_us.max(t);
        }
    };
    drop(permit);
    match (ended, ready) {
        (None, true) => End::Stopped(conn),
        (None, false) => {
            fail(shared, "stopped before ready");
            End::Failed
        }
        (Some(reason), false) => {
            fail(shared, &reason);
            End::Failed
        }
        (Some(reason), true) => {
            let mut a = shared.agg.borrow_mut();
            a.report.closed_early += 1;
            *a.report.close_reasons.entry(short(&reason)).or_default() += 1;
            End::Early
        }
    }
}

/// A connection that never became ready: all its events are missing.
fn fail(shared: &Shared, reason: &str) {
    let mut a = shared.agg.borrow_mut();
    a.report.failed += 1;
    *a.report.fail_reasons.entry(short(reason)).or_default() += 1;
    // `missing` for failed connections is added by the coordinator, which
    // knows how many events were published.
}

/// Error texts carry addresses and ports; keep the kind only so that the
/// reasons aggregate.
pub fn short(reason: &str) -> String {
    reason
        .split(" (os error")
        .next()
        .unwrap_or(reason)
        .chars()
        .take(120)
        .collect()
}

fn on_message(
    shared: &Shared,
    st: &mut ConnState,
    agg: &mut Agg,
    msg: &[u8],
    out: &mut Out,
    now: u64,
    published: u64,
) {
    if msg.starts_with(&shared.prefix) {
        agg.report.event_bytes += frame_bytes(msg.len());
        on_event(
            &shared.cfg,
            st,
            agg,
            &msg[shared.prefix.len()..],
            now,
            published,
        );
        return;
    }
    match st.protocol {
        Protocol::Native | Protocol::Sse => {
            if msg.starts_with(br#"{"type":"connected""#) {
                opened(st, agg, now);
            } else if msg.starts_with(br#"{"type":"subscribed""#) {
                st.subscribed = true;
                if shared.cfg.history {
                    on_subscribed(shared, st, agg, msg);
                }
            } else if msg.starts_with(br#"{"type":"error""#) {
                st.failure = Some(format!("server error: {}", String::from_utf8_lossy(msg)));
            }
        }
        Protocol::Socketio => match msg {
            b"2" => out.text(b"3"),
            [b'0', b'{', ..] => out.text(b"40"),
            [b'4', b'0', ..] => {
                opened(st, agg, now);
                if st.subscribe {
                    let m = format!(r#"421["subscribe","{}"]"#, st.topic);
                    out.text(m.as_bytes());
                }
            }
            [b'4', b'3', b'1', b'[', ..] => {
                if ws::find(msg, br#""ok":true"#).is_some() {
                    st.subscribed = true;
                } else {
                    st.failure = Some(format!(
                        "subscribe refused: {}",
                        String::from_utf8_lossy(msg)
                    ));
                }
            }
            [b'4', b'4', ..] => {
                st.failure = Some(format!("connect refused: {}", String::from_utf8_lossy(msg)));
            }
            [b'1'] | [b'4', b'1', ..] => st.failure = Some("disconnected by server".into()),
            _ => {}
        },
    }
}

/// The size of a server's (unmasked) WebSocket frame with `payload` bytes.
pub fn frame_bytes(payload: usize) -> u64 {
    let header = match payload {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    };
    (header + payload) as u64
}

/// History: the first `subscribed` gives the position to count offsets
/// from (and to recover from); the one after a reconnect says whether
/// everything missed follows.
fn on_subscribed(shared: &Shared, st: &mut ConnState, agg: &mut Agg, msg: &[u8]) {
    if shared.phase.get() == 0 {
        st.base = number_after(msg, b"\"offset\":");
        st.epoch = string_after(msg, b"\"epoch\":\"");
        if st.base.is_none() || st.epoch.is_none() {
            st.failure = Some("subscribed without a position: not a history topic".into());
        }
    } else if ws::find(msg, br#""recovered":true"#).is_some() {
        agg.report.recovered += 1;
    } else {
        agg.report.not_recovered += 1;
    }
}

fn opened(st: &mut ConnState, agg: &mut Agg, now: u64) {
    if st.opened {
        return;
    }
    st.opened = true;
    agg.report.opened += 1;
    agg.report.last_open_us = agg.report.last_open_us.max(now);
    agg.open.record(now.saturating_sub(st.started_us));
}

/// A bench event: find `"seq":` and `"ts":` (and `"offset":` on history
/// topics) in the text, nothing more.
fn on_event(
    cfg: &WorkerConfig,
    st: &mut ConnState,
    agg: &mut Agg,
    rest: &[u8],
    now: u64,
    published: u64,
) {
    let (Some(seq), Some(ts)) = (
        number_after(rest, b"\"seq\":"),
        number_after(rest, b"\"ts\":"),
    ) else {
        agg.report.unexpected += 1;
        return;
    };
    let r = &mut agg.report;
    r.received += 1;
    r.first_recv_us = r.first_recv_us.min(now);
    r.last_recv_us = r.last_recv_us.max(now);
    if cfg.history && number_after(rest, b"\"offset\":") != st.base.map(|b| b + seq + 1) {
        r.offset_errors += 1;
    }
    // Recovery: the time since this connection started reconnecting (the
    // publication is older than the reconnect by design).
    let from = if cfg.recover { st.started_us } else { ts };
    agg.latency.record(now.saturating_sub(from));
    if let Some(t) = &mut agg.trace {
        t.push((seq as u32, now.saturating_sub(from) as u32));
    }
    // The count is not known before `drain`, so size the bitset by the
    // sequence numbers seen; bounded because seq < published is checked at
    // the end (anything beyond is counted as unexpected there).
    if seq >= MAX_SEQ {
        agg.report.unexpected += 1;
        return;
    }
    let (word, bit) = ((seq / 64) as usize, seq % 64);
    if word >= st.seen.len() {
        st.seen.resize((word + 1).next_power_of_two(), 0);
    }
    let mask = 1u64 << bit;
    if st.seen[word] & mask != 0 {
        agg.report.duplicates += 1;
    } else {
        st.seen[word] |= mask;
        st.unique += 1;
        agg.report.unique += 1;
        if published > 0 && seq >= published {
            agg.report.unexpected += 1;
        }
    }
}

/// The JSON string (without escapes) right after `key` (which ends with
/// the opening quote) in `hay`.
pub fn string_after(hay: &[u8], key: &[u8]) -> Option<String> {
    let i = ws::find(hay, key)? + key.len();
    let len = hay[i..].iter().position(|&b| b == b'"' || b == b'\\')?;
    (hay[i + len] == b'"').then(|| String::from_utf8_lossy(&hay[i..i + len]).into_owned())
}

/// Parses the unsigned integer right after `key` in `hay`.
pub fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let i = ws::find(hay, key)? + key.len();
    let digits = hay[i..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for &d in digits {
        n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
        any = true;
    }
    any.then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_split_round_robin() {
        assert_eq!(topic_name("b", 1, 0), "b");
        assert_eq!(topic_name("b", 48, 2), "b-2");
        // With 2 nodes, each topic has a connection on each node.
        assert_eq!(topic_index(4, 48, 2), 2);
        assert_eq!(topic_index(5, 48, 2), 2);
        assert_eq!(topic_index(96, 48, 2), 0);
        assert_eq!(topic_index(7, 1, 2), 0);
        for (published, topics) in [(0, 3), (10, 3), (48_000, 48), (5, 48), (7, 1)] {
            let total: u64 = (0..topics).map(|k| share(published, topics, k)).sum();
            assert_eq!(total, published);
        }
        // Events 0, 3, 6, 9 go to topic 0 (seq 0..4), 1, 4, 7 to topic 1.
        assert_eq!(share(10, 3, 0), 4);
        assert_eq!(share(10, 3, 1), 3);
        assert_eq!(share(10, 3, 4), 3);
    }

    #[test]
    fn numbers_are_found_without_parsing_json() {
        let m =
            br#","topic":"t","data":{"seq":42,"ts":1700000000123456,"pad":"xx"},"timestamp":"x"}"#;
        assert_eq!(number_after(m, b"\"seq\":"), Some(42));
        assert_eq!(number_after(m, b"\"ts\":"), Some(1_700_000_000_123_456));
        assert_eq!(number_after(m, b"\"nope\":"), None);
        assert_eq!(number_after(br#""seq":"x""#, b"\"seq\":"), None);
        let sub =
            br#"{"type":"subscribed","event":"hist.a","offset":0,"epoch":"k3x9","timestamp":"t"}"#;
        assert_eq!(number_after(sub, b"\"offset\":"), Some(0));
        assert_eq!(string_after(sub, b"\"epoch\":\""), Some("k3x9".into()));
        assert_eq!(string_after(br#""epoch":"a\"b""#, b"\"epoch\":\""), None);
    }
}
