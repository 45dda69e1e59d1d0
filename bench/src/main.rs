//! `switchboard-bench`: the load generator of `scripts/bench`.
//!
//! Opens N WebSocket connections (native protocol or Socket.IO) round-robin
//! over the target nodes, subscribes them to one topic, publishes through
//! Redis `PUBLISH` (the publisher contract) and measures what arrives:
//! delivered/expected per connection (loss, duplicates), deliveries per
//! second, latency from the publisher's clock, the connect rate, and the CPU
//! time and RSS of the server processes. Prints a table on stderr and one
//! JSON line on stdout. Run `switchboard-bench --help`.
//!
//! Layout:
//! - this file: command line, the coordinator (spawns workers, publishes,
//!   samples `/proc`, merges and prints the results);
//! - `worker.rs`: a worker process holding a share of the
//!   connections on a single-threaded runtime;
//! - `ws.rs`: the minimal allocation-free WebSocket client;
//! - `publish.rs`: the RESP publisher;
//! - `hist.rs`: the latency histogram;
//! - `procfs.rs`: `/proc` samples and `RLIMIT_NOFILE`;
//! - `report.rs`: the table, targets and Markdown;
//! - `probe.rs`: the physical-limit probe (`write(2)` to N loopback sockets);
//! - `abuse.rs`: hostile clients churning random topics (issue 26);
//! - `scale.rs`: the scale-out scenario (its own coordinator and workers:
//!   several phases on the same connections, a node killed, clients that
//!   reconnect like the official one).

mod abuse;
mod hist;
mod probe;
mod procfs;
mod publish;
mod report;
mod scale;
mod worker;
mod ws;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use hist::Hist;
use procfs::Sample;
use report::{Expect, Outcome};
use worker::{Protocol, ReadyLine, WorkerConfig, WorkerReport};

/// Connections per source address before another 127.0.0.x is used (the
/// ephemeral port range holds ~28,000 per address).
const PER_SOURCE: usize = 25_000;
/// Descriptors a worker keeps for itself besides its connections.
const FD_HEADROOM: u64 = 200;

const USAGE: &str = "\
switchboard-bench: load generator for Switchboard nodes

USAGE
  switchboard-bench <idle|connect|fanout|maxrate|recovery> --target HOST:PORT[,…] [OPTIONS]
  switchboard-bench probe [--pairs N] [--rate R] [--duration D] [--size B] [--label L] [--out F]
                                          CPU per write(2) of one frame to each of N
                                          loopback sockets (the receiving side drains)
  switchboard-bench abuse --target HOST:PORT[,…] --redis HOST:PORT [--clients N] [--rate R]
                    [--duration D] [--after D] [--pid NAME=PID]… [--label L] [--out F]
                                          hostile clients subscribing to and unsubscribing
                                          from new random topics; Redis used_memory, DBSIZE
                                          and node RSS during and after, per client-second
  switchboard-bench scale --target A,…,F --pid node-1=PID,… --redis HOST:PORT [OPTIONS]
                                          the scale-out scenario: many connections over
                                          many nodes, a shared topic and own topics, one
                                          node killed (scale --help)
  switchboard-bench report FILE.jsonl     Markdown tables of recorded results
  switchboard-bench free-port             print a free TCP port on 127.0.0.1
  switchboard-bench wait-ready [--timeout 60s] URL…
                                          wait until each URL (http://host:port/path)
                                          answers 200

SCENARIOS
  idle     hold N subscribed connections for --hold, report server RSS per connection
  connect  open N connections as fast as allowed, report the connect rate
  fanout   publish --rate events/s for --duration (default 200/s for 10s)
  maxrate  publish --events as fast as the publisher goes (default 5000)
  recovery (history, native) subscribe N, close them all, publish --events (default
           100) with FCALL, reconnect all at once with since; report the time until
           every connection has every missed offset, and server and Redis CPU

OPTIONS
  --protocol native|socketio|sse
                               wire protocol (default native; Socket.IO is EIO=4 websocket;
                               sse: Server-Sent Events at /sse/<topic>)
  --target ADDR[,ADDR…]        nodes, used round-robin (repeatable)
  --connections N              default 1000
  --topic NAME                 default bench-<random>
  --topics N                   spread the connections over N topics <topic>-<k>:
                               connection i (on target i % T) subscribes to topic
                               k = (i / T) % N, so every topic has subscribers on
                               every node; event j goes to topic j % N with seq
                               j / N (default 1: <topic> itself)
  --event NAME                 event name in the envelope (default tick)
  --subscribe / --no-subscribe subscribe each connection (default: yes, except connect)
  --subscribe-via message|path native: a subscribe message (default) or /ws/<topic>
  --format json|compact        native: the default event frame or the compact one
                               (?format=compact); not with --history
  --redis HOST:PORT            Redis to PUBLISH on (fanout, maxrate)
  --redis-cluster              --redis is a Redis Cluster node: read CLUSTER SLOTS,
                               one connection per primary, SPUBLISH {prefix}:t:{<topic>}
                               (or FCALL) on the primary owning the topic's slot
  --prefix P                   REDIS_PREFIX of the nodes (default switchboard)
  --history                    publish with FCALL switchboard_publish 1 <topic> <envelope>
                               <prefix> and check the offsets clients receive (native;
                               Socket.IO events carry no offset to check); the
                               default topic is then hist.<random>
  --system NAME                what is measured, for the side-by-side table (default:
                               \"switchboard native\" or \"switchboard socket.io\")
  --compare NAME               the row of the side-by-side table (default: the label)
  --rate N                     events per second, 0 = as fast as possible
  --duration D                 fanout length (default 10s); events = rate × duration
  --events N                   number of events (overrides --duration)
  --pad BYTES                  padding string in each event (default 32)
  --workers N                  worker processes (default: as few as RLIMIT_NOFILE allows)
  --concurrency N              handshakes in flight per worker (default 256)
  --connect-rate N             connection attempts per second in total (default unlimited)
  --sources IP[,IP…]           source addresses (default: one more 127.0.0.x per 25,000)
  --hold D                     idle: how long to hold before measuring (default 5s)
  --connect-timeout D          per-connection handshake limit (default 60s)
  --drain-idle D               stop waiting after D without a delivery (default 3s)
  --drain-max D                stop waiting D after publishing ended (default 30s)
  --max-time D                 hard limit of the run after --quiet-wait (default 180s)
  --quiet-wait D               first wait up to D until the machine is quiet: less than
                               --quiet-cores (default 0.25) CPUs busy over one second
  --pid [NAME=]PID             a server process: CPU and RSS (repeatable)
  --watch-pid [NAME=]PID       another process to report, e.g. Redis (repeatable)
  --label NAME                 scenario name in the output (default: the mode)
  --count-syscalls             count the --pid processes' send syscalls (write, writev,
                               sendto, sendmsg) during the run with `perf stat`
                               (tracepoints; needs perf and perf_event access)
  --out FILE                   append the JSON line to FILE
  --expect-p99-ms X            targets, reported as met or missed (never change the run)
  --expect-deliveries-per-s X
  --expect-rss-per-conn-bytes X
  --expect-connect-per-s X

OUTPUT
  A table on stderr and one JSON line on stdout. Exit status 1 when anything
  was lost (failed or closed connections, missing or duplicate events).

ENVIRONMENT
  BENCH_TRACE=PATH             each worker writes \"<seq> <latency µs>\" for every
                               delivery to PATH.<worker pid> (for timelines)
";

/// Microseconds since the Unix epoch: the clock of the `ts` field.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("__worker") => {
            worker::main(args.get(1).map(String::as_str).unwrap_or("{}")).map(|_| ExitCode::SUCCESS)
        }
        Some("free-port") => free_port().map(|p| {
            println!("{p}");
            ExitCode::SUCCESS
        }),
        Some("wait-ready") => wait_ready(&args[1..]).map(|_| ExitCode::SUCCESS),
        Some("report") => match args.get(1) {
            Some(file) => report::markdown(file).map(|md| {
                print!("{md}");
                ExitCode::SUCCESS
            }),
            None => Err(anyhow::anyhow!("report needs a FILE.jsonl")),
        },
        Some("probe") => probe::main(&args[1..]).map(|_| ExitCode::SUCCESS),
        Some("abuse") => abuse::main(&args[1..]).map(|_| ExitCode::SUCCESS),
        Some("__scale_worker") => {
            scale::worker_main(args.get(1).map(String::as_str).unwrap_or("{}"))
                .map(|_| ExitCode::SUCCESS)
        }
        Some("scale") => scale::main(&args[1..]),
        Some("idle" | "connect" | "fanout" | "maxrate" | "recovery") => {
            Opts::parse(&args).and_then(|o| coordinate(&o))
        }
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprint!("{USAGE}");
            Ok(ExitCode::from(64))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchboard-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// === command line ===

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    Connect,
    Fanout,
    Maxrate,
    Recovery,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Connect => "connect",
            Mode::Fanout => "fanout",
            Mode::Maxrate => "maxrate",
            Mode::Recovery => "recovery",
        }
    }

    fn publishes(self) -> bool {
        matches!(self, Mode::Fanout | Mode::Maxrate | Mode::Recovery)
    }
}

struct Opts {
    mode: Mode,
    protocol: Protocol,
    targets: Vec<SocketAddr>,
    connections: usize,
    topic: String,
    topics: usize,
    event: String,
    subscribe: bool,
    subscribe_via_path: bool,
    compact: bool,
    history: bool,
    redis: Option<SocketAddr>,
    redis_cluster: bool,
    prefix: String,
    rate: f64,
    events: u64,
    pad: usize,
    workers: Option<usize>,
    concurrency: usize,
    connect_rate: f64,
    sources: Vec<IpAddr>,
    hold: Duration,
    connect_timeout: Duration,
    drain_idle: Duration,
    drain_max: Duration,
    max_time: Duration,
    quiet_wait: Duration,
    quiet_cores: f64,
    pids: Vec<(String, u32)>,
    watch_pids: Vec<(String, u32)>,
    label: String,
    count_syscalls: bool,
    system: Option<String>,
    compare: Option<String>,
    out: Option<String>,
    expect: Expect,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let mode = match args[0].as_str() {
            "idle" => Mode::Idle,
            "connect" => Mode::Connect,
            "fanout" => Mode::Fanout,
            "recovery" => Mode::Recovery,
            _ => Mode::Maxrate,
        };
        let mut o = Opts {
            mode,
            protocol: Protocol::Native,
            targets: Vec::new(),
            connections: 1000,
            topic: format!("bench-{:08x}", rand::random::<u32>()),
            topics: 1,
            event: "tick".into(),
            subscribe: mode != Mode::Connect,
            subscribe_via_path: false,
            compact: false,
            history: mode == Mode::Recovery,
            redis: None,
            redis_cluster: false,
            prefix: "switchboard".into(),
            rate: if matches!(mode, Mode::Maxrate | Mode::Recovery) {
                0.0
            } else {
                200.0
            },
            events: 0,
            pad: 32,
            workers: None,
            concurrency: 256,
            connect_rate: 0.0,
            sources: Vec::new(),
            hold: Duration::from_secs(if mode == Mode::Idle { 5 } else { 0 }),
            connect_timeout: Duration::from_secs(60),
            drain_idle: Duration::from_secs(3),
            drain_max: Duration::from_secs(30),
            max_time: Duration::from_secs(180),
            quiet_wait: Duration::ZERO,
            quiet_cores: 0.25,
            pids: Vec::new(),
            watch_pids: Vec::new(),
            label: mode.name().into(),
            count_syscalls: false,
            system: None,
            compare: None,
            out: None,
            expect: Expect::default(),
        };
        let mut duration = Duration::from_secs(10);
        let mut events: Option<u64> = None;
        let mut topic: Option<String> = None;
        let mut i = 1;
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
            let bad = |v: &str, why: &str| anyhow::anyhow!("{name} {v} is not valid: {why}");
            match name {
                "--protocol" => {
                    o.protocol = match value()?.as_str() {
                        "native" => Protocol::Native,
                        "socketio" | "socket.io" => Protocol::Socketio,
                        "sse" => Protocol::Sse,
                        v => return Err(bad(v, "expected native or socketio")),
                    }
                }
                "--target" => {
                    for t in value()?.split(',').filter(|t| !t.is_empty()) {
                        o.targets
                            .push(resolve(t).map_err(|e| bad(t, &e.to_string()))?);
                    }
                }
                "--connections" => o.connections = num(&value()?, name)?,
                "--topic" => topic = Some(value()?),
                "--topics" => o.topics = num::<usize>(&value()?, name)?.max(1),
                "--redis-cluster" => o.redis_cluster = true,
                "--history" => o.history = true,
                "--system" => o.system = Some(value()?),
                "--compare" => o.compare = Some(value()?),
                "--event" => o.event = value()?,
                "--subscribe" => o.subscribe = true,
                "--no-subscribe" => o.subscribe = false,
                "--format" => {
                    o.compact = match value()?.as_str() {
                        "json" => false,
                        "compact" => true,
                        v => return Err(bad(v, "expected json or compact")),
                    }
                }
                "--subscribe-via" => {
                    o.subscribe_via_path = match value()?.as_str() {
                        "message" => false,
                        "path" => true,
                        v => return Err(bad(v, "expected message or path")),
                    }
                }
                "--redis" => {
                    let v = value()?;
                    let v = v
                        .strip_prefix("redis://")
                        .unwrap_or(&v)
                        .trim_end_matches('/');
                    o.redis = Some(resolve(v).map_err(|e| bad(v, &e.to_string()))?);
                }
                "--prefix" => o.prefix = value()?,
                "--rate" => o.rate = num(&value()?, name)?,
                "--duration" => duration = dur(&value()?, name)?,
                "--events" => events = Some(num(&value()?, name)?),
                "--pad" => o.pad = num(&value()?, name)?,
                "--workers" => o.workers = Some(num::<usize>(&value()?, name)?.max(1)),
                "--concurrency" => o.concurrency = num(&value()?, name)?,
                "--connect-rate" => o.connect_rate = num(&value()?, name)?,
                "--sources" => {
                    for s in value()?.split(',').filter(|s| !s.is_empty()) {
                        o.sources
                            .push(s.parse().map_err(|_| bad(s, "not an IP address"))?);
                    }
                }
                "--hold" => o.hold = dur(&value()?, name)?,
                "--connect-timeout" => o.connect_timeout = dur(&value()?, name)?,
                "--drain-idle" => o.drain_idle = dur(&value()?, name)?,
                "--drain-max" => o.drain_max = dur(&value()?, name)?,
                "--max-time" => o.max_time = dur(&value()?, name)?,
                "--quiet-wait" => o.quiet_wait = dur(&value()?, name)?,
                "--quiet-cores" => o.quiet_cores = num(&value()?, name)?,
                "--pid" => o.pids.push(named_pid(&value()?, name)?),
                "--watch-pid" => o.watch_pids.push(named_pid(&value()?, name)?),
                "--label" => o.label = value()?,
                "--count-syscalls" => o.count_syscalls = true,
                "--out" => o.out = Some(value()?),
                "--expect-p99-ms" => o.expect.p99_ms = Some(num(&value()?, name)?),
                "--expect-deliveries-per-s" => {
                    o.expect.deliveries_per_s = Some(num(&value()?, name)?)
                }
                "--expect-rss-per-conn-bytes" => {
                    o.expect.rss_per_conn_bytes = Some(num(&value()?, name)?)
                }
                "--expect-connect-per-s" => o.expect.connect_per_s = Some(num(&value()?, name)?),
                _ => bail!("unknown option {arg} (see --help)"),
            }
        }
        if o.targets.is_empty() {
            bail!("--target HOST:PORT is required");
        }
        o.topic = match topic {
            Some(t) => t,
            None if o.history => format!("hist.{:08x}", rand::random::<u32>()),
            None => o.topic,
        };
        if o.mode == Mode::Recovery && o.protocol != Protocol::Native {
            bail!("the recovery scenario runs on the native protocol");
        }
        if o.compact && (o.protocol != Protocol::Native || o.history) {
            bail!("--format compact is a native form, measured without --history");
        }
        if o.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if mode.publishes() {
            if o.redis.is_none() {
                bail!(
                    "{} publishes through Redis: --redis HOST:PORT is required",
                    mode.name()
                );
            }
            if !o.subscribe {
                bail!("{} needs subscribed connections", mode.name());
            }
            o.events = match (events, mode) {
                (Some(n), _) => n,
                (None, Mode::Maxrate) => 5000,
                (None, Mode::Recovery) => 100,
                (None, _) if o.rate > 0.0 => (o.rate * duration.as_secs_f64()).round() as u64,
                (None, _) => bail!("--rate 0 needs --events"),
            };
        }
        Ok(o)
    }
}

pub(crate) fn num<T: std::str::FromStr>(v: &str, name: &str) -> anyhow::Result<T> {
    v.replace('_', "")
        .parse()
        .map_err(|_| anyhow::anyhow!("{name} {v} is not valid: expected a number"))
}

pub(crate) fn dur(v: &str, name: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(v).map_err(|e| anyhow::anyhow!("{name} {v} is not valid: {e}"))
}

fn named_pid(v: &str, name: &str) -> anyhow::Result<(String, u32)> {
    let (label, pid) = match v.split_once('=') {
        Some((l, p)) => (l.to_string(), p),
        None => (format!("pid {v}"), v),
    };
    Ok((label, num(pid, name)?))
}

fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))
}

// === small subcommands ===

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `wait-ready [--timeout D] URL…`: GET each URL until it answers 200.
fn wait_ready(args: &[String]) -> anyhow::Result<()> {
    let mut timeout = Duration::from_secs(60);
    let mut urls = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--timeout" {
            timeout = dur(it.next().context("--timeout needs a value")?, "--timeout")?;
        } else {
            urls.push(a.clone());
        }
    }
    let deadline = Instant::now() + timeout;
    for url in urls {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs"))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = resolve(host)?;
        loop {
            let ok = (|| -> std::io::Result<bool> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                )?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                Ok(line.starts_with("HTTP/1.1 200"))
            })()
            .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{url} did not answer 200 within {}",
                    humantime::format_duration(timeout)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

// === coordinator ===

/// Waits (at most `limit`) until other processes keep less than `cores` CPUs
/// busy over a one-second window; returns the last window's busy CPUs. The
/// benchmark shares the machine, so this is recorded with every result.
pub(crate) fn wait_quiet(limit: Duration, cores: f64) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let before = procfs::machine_busy_s();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let busy = (procfs::machine_busy_s() - before) / t.elapsed().as_secs_f64();
        if busy < cores || Instant::now() >= deadline {
            if busy >= cores && !limit.is_zero() {
                eprintln!(
                    "switchboard-bench: warning: the machine is busy ({busy:.2} CPUs) before the run"
                );
            }
            return busy;
        }
    }
}

struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl WorkerProc {
    fn read_line(&mut self, what: &str) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("a worker ended ({status}) before reporting {what}");
        }
        Ok(line)
    }

    /// The worker's next line, a JSON object of type `T`.
    fn read_json<T: serde::de::DeserializeOwned>(&mut self, what: &str) -> anyhow::Result<T> {
        let line = self.read_line(what)?;
        serde_json::from_str(&line).with_context(|| format!("worker said {line:?}"))
    }

    fn tell(&mut self, line: &str) {
        if let Some(stdin) = &mut self.stdin {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }
}

/// `/proc` samples of every watched process at one moment.
type Samples = Vec<Sample>;

fn sample_all(pids: &[(String, u32)]) -> Samples {
    pids.iter().map(|(_, pid)| procfs::sample(*pid)).collect()
}

fn coordinate(o: &Opts) -> anyhow::Result<ExitCode> {
    let background_before = wait_quiet(o.quiet_wait, o.quiet_cores);
    let started = Instant::now();
    let hard_stop = o.max_time;
    std::thread::spawn(move || {
        std::thread::sleep(hard_stop);
        eprintln!("switchboard-bench: --max-time reached, exiting");
        std::process::exit(2);
    });

    let (soft, hard) = procfs::raise_nofile();
    let per_worker_fds = soft.saturating_sub(FD_HEADROOM).max(1) as usize;
    let workers = o
        .workers
        .unwrap_or(o.connections.div_ceil(per_worker_fds))
        .clamp(1, o.connections);
    let per_worker = o.connections.div_ceil(workers);
    if per_worker as u64 + FD_HEADROOM > soft {
        eprintln!(
            "switchboard-bench: warning: {per_worker} connections per worker with RLIMIT_NOFILE {soft}"
        );
    }
    let sources = if o.sources.is_empty() && o.connections > PER_SOURCE {
        (0..o.connections.div_ceil(PER_SOURCE))
            .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + k as u8)))
            .collect()
    } else {
        o.sources.clone()
    };

    let all_pids: Vec<(String, u32)> = o.pids.iter().chain(&o.watch_pids).cloned().collect();
    let at_start = (procfs::machine_busy_s(), sample_all(&all_pids));

    // Workers: each takes a contiguous range of global connection indexes.
    let exe = std::env::current_exe()?;
    let mut procs = Vec::new();
    let mut first = 0;
    for _ in 0..workers {
        let count = per_worker.min(o.connections - first);
        if count == 0 {
            break;
        }
        let cfg = WorkerConfig {
            protocol: o.protocol,
            targets: o.targets.clone(),
            sources: sources.clone(),
            first,
            count,
            topic: o.topic.clone(),
            topics: o.topics,
            event: o.event.clone(),
            subscribe: o.subscribe,
            subscribe_via_path: o.subscribe_via_path,
            compact: o.compact,
            // Offsets are checked on the native protocol (Socket.IO events
            // carry none in the string form of subscribe).
            history: o.history && o.protocol == Protocol::Native,
            recover: o.mode == Mode::Recovery,
            concurrency: o.concurrency,
            connect_rate: o.connect_rate / workers as f64,
            connect_timeout_ms: o.connect_timeout.as_millis() as u64,
            drain_idle_ms: o.drain_idle.as_millis() as u64,
            drain_max_ms: o.drain_max.as_millis() as u64,
            max_time_ms: o.max_time.as_millis() as u64,
        };
        let mut child = Command::new(&exe)
            .arg("__worker")
            .arg(serde_json::to_string(&cfg)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a worker process")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        procs.push(WorkerProc {
            child,
            stdin,
            stdout,
        });
        first += count;
    }

    let result = drive(o, &mut procs, &all_pids, at_start);
    // Whatever happened, the workers end: EOF on stdin stops them, and they
    // have their own time limit; then they are killed.
    for p in &mut procs {
        p.stdin = None;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
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
    let (reports, phases, publish, reconnect_us) = result?;
    let machine_busy_s = phases.busy_end - phases.busy_start;

    // === merge ===
    let mut total = WorkerReport {
        first_start_us: u64::MAX,
        first_recv_us: u64::MAX,
        min_per_conn: u64::MAX,
        ..Default::default()
    };
    let mut open = Hist::default();
    let mut latency = Hist::default();
    let mut gen_cpu = procfs::sample(std::process::id()).cpu_s;
    let mut gen_rss = 0;
    for r in &reports {
        total.connections += r.connections;
        total.opened += r.opened;
        total.ready += r.ready;
        total.failed += r.failed;
        for (k, v) in &r.fail_reasons {
            *total.fail_reasons.entry(k.clone()).or_default() += v;
        }
        total.closed_early += r.closed_early;
        for (k, v) in &r.close_reasons {
            *total.close_reasons.entry(k.clone()).or_default() += v;
        }
        total.received += r.received;
        total.event_bytes += r.event_bytes;
        total.unique += r.unique;
        total.duplicates += r.duplicates;
        total.unexpected += r.unexpected;
        total.missing += r.missing;
        total.complete += r.complete;
        total.offset_errors += r.offset_errors;
        total.disconnected += r.disconnected;
        total.reconnected += r.reconnected;
        total.recovered += r.recovered;
        total.not_recovered += r.not_recovered;
        total.min_per_conn = total.min_per_conn.min(r.min_per_conn);
        total.max_per_conn = total.max_per_conn.max(r.max_per_conn);
        total.first_start_us = total.first_start_us.min(r.first_start_us);
        total.last_open_us = total.last_open_us.max(r.last_open_us);
        total.last_ready_us = total.last_ready_us.max(r.last_ready_us);
        total.first_recv_us = total.first_recv_us.min(r.first_recv_us);
        total.last_recv_us = total.last_recv_us.max(r.last_recv_us);
        open.merge(&r.open_us);
        latency.merge(&r.latency_us);
        gen_cpu += r.cpu_s;
        gen_rss += r.rss_kb;
    }
    let published = publish.as_ref().map_or(0, |p| p.events);
    // A connection that never became ready missed every event (of its
    // topic: with several topics the workers counted that share).
    if o.topics <= 1 {
        total.missing += published * total.failed as u64;
    }
    if total.failed > 0 && published > 0 {
        total.min_per_conn = 0;
    }

    let outcome = Outcome {
        label: o.label.clone(),
        system: o.system.clone().unwrap_or_else(|| {
            match (o.protocol, o.history, o.compact) {
                (Protocol::Native, false, true) => "switchboard native, compact",
                (Protocol::Native, false, false) => "switchboard native",
                (Protocol::Native, true, _) => "switchboard native, history",
                (Protocol::Socketio, true, _) => "switchboard socket.io, history",
                (Protocol::Socketio, ..) => "switchboard socket.io",
                (Protocol::Sse, ..) => "switchboard sse",
            }
            .into()
        }),
        compare: o.compare.clone().unwrap_or_else(|| o.label.clone()),
        history: o.history,
        reconnect_us,
        mode: o.mode.name(),
        protocol: o.protocol,
        targets: o.targets.clone(),
        sources: sources.clone(),
        workers: procs.len(),
        nofile: (soft, hard),
        topic: o.topic.clone(),
        topics: o.topics,
        pad: o.pad,
        rate: o.rate,
        total,
        open,
        latency,
        publish,
        pids: all_pids.clone(),
        servers: o.pids.len(),
        phases,
        generator_cpu_s: gen_cpu,
        machine_busy_s,
        background_before,
        generator_rss_kb: gen_rss,
        wall_s: started.elapsed().as_secs_f64(),
        expect: o.expect.clone(),
    };
    let json = outcome.to_json();
    eprint!("{}", outcome.table());
    write_result(&json, o.out.as_deref())?;
    Ok(if outcome.lossless() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `/proc` samples at the phase boundaries: start, all ready, after the
/// hold or the publication and drain.
pub struct Phases {
    pub start: Samples,
    pub ready: Samples,
    pub end: Samples,
    /// Machine-wide busy CPU seconds at `start` and `end`.
    pub busy_start: f64,
    pub busy_end: f64,
    /// Send syscalls of the servers from `ready` to `end` (`--count-syscalls`).
    pub server_sends: Option<u64>,
}

/// `perf stat` counting the servers' send syscalls while it runs.
struct SyscallCount {
    child: Child,
    out: std::path::PathBuf,
}

/// The syscalls a server sends frames with: tokio and tungstenite use
/// `write`/`writev` or `send` (`sendto`), socketioxide the same.
const SEND_SYSCALLS: [&str; 4] = ["write", "writev", "sendto", "sendmsg"];

impl SyscallCount {
    fn start(pids: &[(String, u32)]) -> anyhow::Result<SyscallCount> {
        let out =
            std::env::temp_dir().join(format!("switchboard-bench-perf-{}.csv", std::process::id()));
        let events: Vec<String> = SEND_SYSCALLS
            .iter()
            .map(|s| format!("syscalls:sys_enter_{s}"))
            .collect();
        let pids: Vec<String> = pids.iter().map(|(_, p)| p.to_string()).collect();
        let child = Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                &events.join(","),
                "-p",
                &pids.join(","),
                "-o",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // perf attaches within a few ms; the run has not started yet.
        std::thread::sleep(Duration::from_millis(300));
        Ok(SyscallCount { child, out })
    }

    /// Stops perf (SIGINT makes it write its counts) and sums them.
    fn stop(mut self) -> anyhow::Result<u64> {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)?;
        let _ = std::fs::remove_file(&self.out);
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("syscalls:sys_enter_"))
            .filter_map(|l| l.split(',').next()?.trim().parse().ok())
            .collect();
        if counts.is_empty() {
            bail!("perf stat counted nothing (is perf_event access allowed?): {text}");
        }
        Ok(counts.iter().sum())
    }
}

/// Prints one result as a JSON line and appends it to `out` (`--out`).
fn write_result(result: &serde_json::Value, out: Option<&str>) -> anyhow::Result<()> {
    let line = serde_json::to_string(result)?;
    println!("{line}");
    if let Some(path) = out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {path}"))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// Worker reports, `/proc` phases, the publisher's report, and (recovery)
/// when the reconnect started.
type Driven = (
    Vec<WorkerReport>,
    Phases,
    Option<publish::PublishReport>,
    Option<u64>,
);

fn drive(
    o: &Opts,
    procs: &mut [WorkerProc],
    pids: &[(String, u32)],
    (busy_start, at_start): (f64, Samples),
) -> anyhow::Result<Driven> {
    let mut ready = 0;
    let mut failed = 0;
    for p in procs.iter_mut() {
        let r: ReadyLine = p.read_json("readiness")?;
        ready += r.ready;
        failed += r.failed;
    }
    if failed > 0 {
        eprintln!("switchboard-bench: {failed} connections failed, {ready} ready");
    }
    let at_ready = sample_all(pids);
    let counting = match o.count_syscalls && o.mode != Mode::Recovery {
        true => Some(SyscallCount::start(&o.pids).context("starting perf stat")?),
        false => None,
    };

    let plan = publish::Plan {
        // Checked by `Opts::parse` for the modes that publish.
        redis: o.redis.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 6379))),
        cluster: o.redis_cluster,
        prefix: o.prefix.clone(),
        topics: (0..o.topics)
            .map(|k| worker::topic_name(&o.topic, o.topics, k))
            .collect(),
        history: o.history,
        event: o.event.clone(),
        events: o.events,
        rate: o.rate,
        pad: o.pad,
    };
    if o.mode == Mode::Recovery {
        return recovery(o, procs, pids, &plan, busy_start, at_start);
    }
    let mut at_hold = None;
    let publish = if o.mode.publishes() && ready > 0 {
        let r = publish::run(&plan).context("publishing")?;
        for p in procs.iter_mut() {
            p.tell(&format!("drain {}", r.events));
        }
        Some(r)
    } else {
        std::thread::sleep(o.hold);
        at_hold = Some((procfs::machine_busy_s(), sample_all(pids)));
        for p in procs.iter_mut() {
            p.tell("drain 0");
        }
        None
    };
    // Workers report once drained and keep their connections open until
    // their stdin closes, so this sample still sees every connection.
    let reports = procs
        .iter_mut()
        .map(|p| p.read_json::<WorkerReport>("results"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (busy_end, at_end) =
        at_hold.unwrap_or_else(|| (procfs::machine_busy_s(), sample_all(pids)));
    let sends = match counting {
        Some(c) => Some(c.stop().context("reading perf stat")?),
        None => None,
    };
    Ok((
        reports,
        Phases {
            start: at_start,
            ready: at_ready,
            end: at_end,
            busy_start,
            busy_end,
            server_sends: sends,
        },
        publish,
        None,
    ))
}

/// The recovery scenario after every connection is subscribed: close them
/// all, publish with history while nobody listens, reconnect all at once
/// with `since`. The "run" phase of the `/proc` samples is the recovery:
/// from the reconnect until every connection has every missed publication.
fn recovery(
    o: &Opts,
    procs: &mut [WorkerProc],
    pids: &[(String, u32)],
    plan: &publish::Plan,
    busy_start: f64,
    at_start: Samples,
) -> anyhow::Result<Driven> {
    for p in procs.iter_mut() {
        p.tell("disconnect");
    }
    for p in procs.iter_mut() {
        p.read_line("disconnection")?;
    }
    // Let the nodes see the closes and drop the topic before publishing.
    std::thread::sleep(Duration::from_millis(500));
    let r = publish::run(plan).context("publishing")?;
    let at_ready = sample_all(pids);
    let reconnect_us = now_us();
    for p in procs.iter_mut() {
        p.tell(&format!("reconnect {}", r.events));
    }
    let mut back = 0;
    for p in procs.iter_mut() {
        let l: ReadyLine = p.read_json("reconnection")?;
        back += l.ready;
    }
    if back < o.connections {
        eprintln!(
            "switchboard-bench: {back} of {} connections came back",
            o.connections
        );
    }
    let reports = procs
        .iter_mut()
        .map(|p| p.read_json::<WorkerReport>("results"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let busy_end = procfs::machine_busy_s();
    let at_end = sample_all(pids);
    Ok((
        reports,
        Phases {
            start: at_start,
            ready: at_ready,
            end: at_end,
            busy_start,
            busy_end,
            server_sends: None,
        },
        Some(r),
        Some(reconnect_us),
    ))
}
