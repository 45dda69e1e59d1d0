//! The LED drivers on the wire, and fencing down to the wire: real nodes
//! (and their own `redis-server`) send DDP or E1.31 to a UDP receiver in
//! this test that records every packet with its source address. The
//! receivers decode the packets from the protocol specifications
//! (3waylabs' DDP, ANSI E1.31-2018 section 4), not with the server's code.
//!
//! Checked: frames come at `DEVICE_FPS` from exactly one source; after
//! `kill -9` of the leader one new source takes over within the lease + 1 s;
//! a SIGTERM handover never has two sources sending (the gap is printed);
//! a leader cut off from Redis stops before another one starts; reassembled
//! frames equal `GET /api/frame`; an unreachable display shows on
//! `/api/health` and in the metrics while the leader's other duties go on,
//! and the driver recovers when the display appears.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Node, Redis, eventually, free_port, http_text, prefix};

const FPS: usize = 20;
const LEASE: Duration = Duration::from_millis(3000);
const FRAME_BYTES: usize = 64 * 32 * 3;

// === the receivers ===

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    Ddp,
    E131,
}

impl Proto {
    fn url(self, port: u16) -> String {
        match self {
            Proto::Ddp => format!("ddp://127.0.0.1:{port}"),
            Proto::E131 => format!("e131://127.0.0.1:{port}?universe={FIRST_UNIVERSE}"),
        }
    }
}

/// The first universe the E1.31 tests use (not 1, to see it honored).
const FIRST_UNIVERSE: u16 = 5;

/// One whole frame as the receiver put it together.
#[derive(Clone, Debug)]
struct Frame {
    at: Instant,
    from: SocketAddr,
    rgb: Vec<u8>,
    /// E1.31: the packets carried the Stream_Terminated option.
    terminated: bool,
}

#[derive(Default)]
struct Log {
    /// Every packet: when and from where.
    packets: Vec<(Instant, SocketAddr)>,
    frames: Vec<Frame>,
    /// Protocol violations seen.
    errors: Vec<String>,
}

/// A UDP display on 127.0.0.1 that records what arrives.
struct Receiver {
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(proto: Proto, port: u16) -> Receiver {
        let socket = UdpSocket::bind(("127.0.0.1", port)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Per source: the frame being assembled.
            let mut partial: BTreeMap<SocketAddr, (Vec<u8>, bool)> = BTreeMap::new();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let at = Instant::now();
                let p = &buf[..n];
                let mut log = l.lock().unwrap();
                log.packets.push((at, from));
                let (rgb, terminated) = partial
                    .entry(from)
                    .or_insert_with(|| (vec![0; FRAME_BYTES], false));
                let done = match proto {
                    Proto::Ddp => read_ddp(p, rgb),
                    Proto::E131 => read_e131(p, rgb, terminated),
                };
                match done {
                    Ok(true) => {
                        let frame = Frame {
                            at,
                            from,
                            rgb: rgb.clone(),
                            terminated: *terminated,
                        };
                        *terminated = false;
                        log.frames.push(frame);
                    }
                    Ok(false) => {}
                    Err(e) => log.errors.push(format!("{from}: {e}")),
                }
            }
        });
        Receiver {
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn frames(&self) -> Vec<Frame> {
        self.log.lock().unwrap().frames.clone()
    }

    fn packets(&self) -> Vec<(Instant, SocketAddr)> {
        self.log.lock().unwrap().packets.clone()
    }

    fn errors(&self) -> Vec<String> {
        self.log.lock().unwrap().errors.clone()
    }

    /// Sources that sent any packet at or after `since`.
    fn sources_since(&self, since: Instant) -> Vec<SocketAddr> {
        let mut s: Vec<SocketAddr> = self
            .packets()
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, f)| *f)
            .collect();
        s.sort();
        s.dedup();
        s
    }

    fn first_from(&self, source: SocketAddr) -> Option<Instant> {
        self.packets()
            .iter()
            .find(|(_, f)| *f == source)
            .map(|(at, _)| *at)
    }

    fn last_from(&self, source: SocketAddr) -> Option<Instant> {
        self.packets()
            .iter()
            .rev()
            .find(|(_, f)| *f == source)
            .map(|(at, _)| *at)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// DDP: `V V x T S R Q P | x x x x n n n n | C R TTT SSS | ID | offset (4) |
/// length (2) | data`. Returns whether the packet completed a frame (push).
fn read_ddp(p: &[u8], rgb: &mut [u8]) -> Result<bool, String> {
    if p.len() < 10 {
        return Err(format!("short packet of {} bytes", p.len()));
    }
    if p[0] & 0xc0 != 0x40 {
        return Err(format!("version bits {:#x}", p[0]));
    }
    if p[0] & 0x10 != 0 {
        return Err("a timecode was not expected".into());
    }
    let seq = p[1];
    if seq & 0xf0 != 0 || seq == 0 {
        return Err(format!("sequence {seq} outside 1..15"));
    }
    if p[2] != 0x0b {
        return Err(format!("data type {:#x}, expected RGB 8 bit (0x0b)", p[2]));
    }
    if p[3] != 1 {
        return Err(format!("destination id {}", p[3]));
    }
    let offset = u32::from_be_bytes([p[4], p[5], p[6], p[7]]) as usize;
    let len = u16::from_be_bytes([p[8], p[9]]) as usize;
    if len != p.len() - 10 || len > 1440 || offset + len > rgb.len() {
        return Err(format!(
            "offset {offset} length {len} in a {}-byte packet",
            p.len()
        ));
    }
    rgb[offset..offset + len].copy_from_slice(&p[10..]);
    Ok(p[0] & 0x01 != 0)
}

/// E1.31 data packet (ANSI E1.31-2018 table 4-1), 170 pixels per universe
/// from [`FIRST_UNIVERSE`]. Returns whether it completed a frame (the last
/// universe).
fn read_e131(p: &[u8], rgb: &mut [u8], terminated: &mut bool) -> Result<bool, String> {
    if p.len() < 126 {
        return Err(format!("short packet of {} bytes", p.len()));
    }
    let be16 = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let checks = [
        (be16(0) == 0x0010, "preamble size"),
        (be16(2) == 0, "postamble size"),
        (&p[4..16] == b"ASC-E1.17\0\0\0", "ACN packet identifier"),
        (
            be16(16) == 0x7000 | (p.len() as u16 - 16),
            "root flags and length",
        ),
        (be32(18) == 4, "root vector (E1.31 data)"),
        (
            be16(38) == 0x7000 | (p.len() as u16 - 38),
            "framing flags and length",
        ),
        (be32(40) == 2, "framing vector (data packet)"),
        (p[108] == 100, "priority 100"),
        (
            be16(115) == 0x7000 | (p.len() as u16 - 115),
            "DMP flags and length",
        ),
        (p[117] == 2 && p[118] == 0xa1, "DMP vector and address type"),
        (
            be16(119) == 0 && be16(121) == 1,
            "first address 0, increment 1",
        ),
        (be16(123) as usize == p.len() - 125, "property value count"),
        (p[125] == 0, "start code 0"),
    ];
    if let Some((_, what)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(format!("bad {what}"));
    }
    if p[112] & 0x40 != 0 {
        *terminated = true;
    }
    let universe = be16(113);
    let index = universe
        .checked_sub(FIRST_UNIVERSE)
        .filter(|i| *i < 13)
        .ok_or(format!("universe {universe}"))? as usize;
    let data = &p[126..];
    let start = index * 510;
    let expected = (FRAME_BYTES - start).min(510);
    if data.len() != expected {
        return Err(format!(
            "universe {universe} carries {} slots, expected {expected}",
            data.len()
        ));
    }
    rgb[start..start + data.len()].copy_from_slice(data);
    Ok(index == 12)
}

// === a Redis link that can be cut ===

/// A TCP relay between a node and Redis. [`Relay::cut`] makes it a black
/// hole: connections stay open and nothing passes either way, like a
/// network partition (not a refused connection, which a client notices at
/// once).
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl Relay {
    fn start(redis_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if !c.load(Ordering::Relaxed)
                                        && to.write_all(&buf[..n]).is_err()
                                    {
                                        break;
                                    }
                                }
                            }
                        }
                    });
                }
            }
        });
        Relay { port, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }
}

// === helpers ===

fn start_node(name: &str, redis_url: &str, pfx: &str, driver: &str) -> Node {
    Node::start(
        name,
        &[
            ("REDIS_URL", redis_url),
            ("REDIS_PREFIX", pfx),
            ("LEADER_LEASE_MS", "3000"),
            ("DEVICE_DRIVER", driver),
            ("DEVICE_FPS", "20"),
        ],
    )
}

fn leader_of<'a>(nodes: &[&'a Node]) -> Option<&'a Node> {
    let leaders: Vec<&Node> = nodes
        .iter()
        .copied()
        .filter(|n| n.health()["leader"] == true)
        .collect();
    (leaders.len() == 1).then(|| leaders[0])
}

/// Waits until packets arrive from a source other than `old` (any source
/// when `None`), and returns it.
fn wait_new_source(
    rx: &Receiver,
    old: &[SocketAddr],
    since: Instant,
    within: Duration,
) -> SocketAddr {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = rx
            .sources_since(since)
            .into_iter()
            .find(|s| !old.contains(s))
        {
            return s;
        }
        assert!(Instant::now() < deadline, "no new source within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /api/frame`'s pixels as RGB bytes.
fn api_rgb(node: &Node) -> (Vec<u8>, i64) {
    let (status, body) = node.get("/api/frame");
    assert_eq!(status, 200, "{body}");
    let hex = body["data"]["pixels"].as_str().unwrap();
    let rgb = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    (rgb, body["data"]["t"].as_i64().unwrap())
}

/// Frames per second from `source` over the `window` just ended.
fn rate(rx: &Receiver, source: SocketAddr, window: Duration) -> f64 {
    let since = Instant::now() - window;
    let n = rx
        .frames()
        .iter()
        .filter(|f| f.from == source && f.at >= since)
        .count();
    n as f64 / window.as_secs_f64()
}

/// The whole scenario for one protocol.
fn failover(proto: Proto) {
    let port = free_port();
    let rx = Receiver::start(proto, port);
    let redis = Redis::start();
    let pfx = prefix(&format!("{proto:?}-failover"));
    let url = redis.url();
    let driver = proto.url(port);
    let a = start_node(&format!("{proto:?}-a"), &url, &pfx, &driver);
    let b = start_node(&format!("{proto:?}-b"), &url, &pfx, &driver);
    assert!(eventually(Duration::from_secs(10), || leader_of(&[&a, &b]).is_some()));
    let leader = leader_of(&[&a, &b]).unwrap();
    let follower = if std::ptr::eq(leader, &a) { &b } else { &a };
    assert_eq!(follower.post("/api/switch", r#"{"app":"clock"}"#).0, 200);

    // One source, at the configured rate.
    let first = wait_new_source(
        &rx,
        &[],
        Instant::now() - Duration::from_secs(60),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(3));
    let window_start = Instant::now() - Duration::from_secs(3);
    assert_eq!(
        rx.sources_since(window_start),
        vec![first],
        "exactly one source"
    );
    let fps = rate(&rx, first, Duration::from_secs(3));
    eprintln!("{proto:?}: {fps:.1} frames/s from {first}");
    assert!(
        (FPS as f64 * 0.7..=FPS as f64 * 1.1).contains(&fps),
        "{fps} frames/s, configured {FPS}"
    );
    let health = leader.health();
    assert_eq!(health["driver"]["ok"], true, "{health}");
    assert_eq!(
        health["driver"]["driver"],
        if proto == Proto::Ddp { "ddp" } else { "e131" }
    );
    assert!(
        follower.health().get("driver").is_none(),
        "only the leader drives"
    );

    // What arrives is what GET /api/frame answers, on the follower too.
    let same = (0..5).any(|_| {
        let (want, _) = api_rgb(follower);
        std::thread::sleep(Duration::from_millis(150));
        rx.frames().last().is_some_and(|f| f.rgb == want)
    });
    assert!(same, "reassembled frames equal GET /api/frame");
    let lit = rx
        .frames()
        .last()
        .unwrap()
        .rgb
        .chunks(3)
        .filter(|p| p != &[0, 0, 0])
        .count();
    assert!(lit > 20, "the clock is drawn ({lit} pixels)");

    // kill -9 of the leader: one new source within the lease + 1 s.
    let (mut leader_node, survivor) = if std::ptr::eq(leader, &a) {
        (a, b)
    } else {
        (b, a)
    };
    leader_node.kill9();
    let killed = Instant::now();
    let second = wait_new_source(&rx, &[first], killed, LEASE + Duration::from_secs(3));
    let took = rx.first_from(second).unwrap() - killed;
    eprintln!("{proto:?}: new source {second} {took:?} after kill -9");
    assert!(
        took <= LEASE + Duration::from_secs(1),
        "took over after {took:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        rx.sources_since(killed + took),
        vec![second],
        "one new source"
    );

    // A third node joins; SIGTERM of the leader hands over with no overlap.
    let c = start_node(&format!("{proto:?}-c"), &url, &pfx, &driver);
    assert!(eventually(Duration::from_secs(10), || {
        survivor.health()["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    }));
    assert!(leader_of(&[&survivor, &c]).is_some_and(|l| std::ptr::eq(l, &survivor)));
    let mut survivor = survivor;
    survivor.signal("TERM");
    let termed = Instant::now();
    let third = wait_new_source(&rx, &[first, second], termed, Duration::from_secs(10));
    let last_second = rx.last_from(second).unwrap();
    let first_third = rx.first_from(third).unwrap();
    eprintln!(
        "{proto:?}: SIGTERM handover gap {:?} (last packet of the old leader {:?} after SIGTERM, first of the new {:?} after)",
        first_third.saturating_duration_since(last_second),
        last_second.saturating_duration_since(termed),
        first_third - termed
    );
    assert!(
        last_second < first_third,
        "the old leader stopped before the new one started"
    );
    assert!(
        survivor
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.sources_since(first_third), vec![third]);
    if proto == Proto::E131 {
        // The old source said goodbye: its last frames are marked terminated.
        let ended: Vec<bool> = rx
            .frames()
            .iter()
            .filter(|f| f.from == second)
            .map(|f| f.terminated)
            .collect();
        assert!(
            ended.ends_with(&[true, true, true]),
            "stream termination sent: {:?}",
            &ended[ended.len().saturating_sub(5)..]
        );
    }
    assert_eq!(
        rx.errors(),
        Vec::<String>::new(),
        "every packet followed the protocol"
    );
}

#[test]
fn ddp_frames_come_from_exactly_one_leader_through_failover_and_handover() {
    failover(Proto::Ddp);
}

#[test]
fn e131_frames_come_from_exactly_one_leader_through_failover_and_handover() {
    failover(Proto::E131);
}

#[test]
fn a_leader_cut_off_from_redis_stops_sending_before_another_starts() {
    let port = free_port();
    let rx = Receiver::start(Proto::Ddp, port);
    let redis = Redis::start();
    let relay = Relay::start(redis.port);
    let pfx = prefix("cutoff");
    let driver = Proto::Ddp.url(port);
    // A reaches Redis through the relay and leads; B is connected directly.
    let a = start_node("cut-a", &relay.url(), &pfx, &driver);
    assert!(eventually(Duration::from_secs(10), || a.health()["leader"] == true));
    let b = start_node("cut-b", &redis.url(), &pfx, &driver);
    assert!(eventually(Duration::from_secs(10), || b.health()["nodes"]
        .as_array()
        .is_some_and(|n| n.len() == 2)));
    let old = wait_new_source(
        &rx,
        &[],
        Instant::now() - Duration::from_secs(60),
        Duration::from_secs(10),
    );

    relay.cut();
    let cut = Instant::now();
    let new = wait_new_source(&rx, &[old], cut, LEASE + Duration::from_secs(5));
    let last_old = rx.last_from(old).unwrap();
    let first_new = rx.first_from(new).unwrap();
    eprintln!(
        "cut off: old leader's last packet {:?} after the cut, new leader's first {:?} after (gap {:?})",
        last_old - cut,
        first_new - cut,
        first_new.saturating_duration_since(last_old)
    );
    assert!(last_old < first_new, "no two senders at once");
    assert!(
        last_old - cut < LEASE,
        "stopped before the lease could expire"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rx.sources_since(first_new), vec![new]);
    assert_eq!(b.health()["leader"], true);
    assert!(eventually(Duration::from_secs(5), || a.health()["leader"] == false));
    assert!(a.health().get("driver").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_display_is_reported_while_the_leader_goes_on_and_recovers() {
    // Nobody listens on this port yet: the kernel refuses every packet.
    let port = free_port();
    let driver = Proto::Ddp.url(port);
    let node = Node::start(
        "ddp-unreachable",
        &[
            ("DEVICE_DRIVER", &driver),
            (
                "WEBSOCKET_MOCK_EVENTS",
                r#"[{"name":"tick","interval":200,"data":{"n":1}}]"#,
            ),
        ],
    );
    assert!(
        eventually(Duration::from_secs(10), || node.health()["driver"]["ok"]
            == false),
        "{}",
        node.health()
    );
    let health = node.health();
    let error = health["driver"]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("sending to ddp://127.0.0.1:{port} failed")),
        "{health}"
    );
    assert!(error.to_lowercase().contains("refused"), "{health}");
    assert_eq!(
        health["status"], "ok",
        "a driver error does not make the node unready"
    );
    let (_, metrics) = http_text(&node.addr, "GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("switchboard_driver_failing 1"),
        "{metrics}"
    );
    let errors = metric(&metrics, "switchboard_driver_errors_total{driver=\"ddp\"}");
    assert!(errors > 0.0, "{errors}");

    // The leader's other duties: mock events and the carousel.
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    c.subscribe("tick").await;
    c.subscribe("device").await;
    let (status, body) = node.post(
        "/api/carousel",
        r#"{"enabled":true,"apps":[{"app":"stars","duration":1},{"app":"clock","duration":1}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (mut ticks, mut apps) = (0, Vec::new());
    let end = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Some(m) = c
        .recv_within(end.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if m["type"] == "event" && m["name"] == "tick" {
            ticks += 1;
        }
        if m["type"] == "event" && m["name"] == "current_app" {
            apps.push(m["data"]["app"].as_str().unwrap().to_string());
        }
    }
    assert!(ticks >= 10, "{ticks} mock events in 3.5 s");
    assert!(apps.len() >= 3, "the carousel turns: {apps:?}");
    assert_eq!(node.health()["driver"]["ok"], false);

    // The display appears: frames arrive and the driver is healthy again.
    let rx = Receiver::start(Proto::Ddp, port);
    assert!(
        eventually(Duration::from_secs(10), || node.health()["driver"]["ok"]
            == true),
        "{}",
        node.health()
    );
    assert!(node.health()["driver"].get("error").is_none());
    assert!(eventually(Duration::from_secs(5), || rx.frames().len() >= 10));
    assert_eq!(rx.errors(), Vec::<String>::new());
    let (_, metrics) = http_text(&node.addr, "GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("switchboard_driver_failing 0"),
        "{metrics}"
    );
    assert!(metric(&metrics, "switchboard_driver_frames_total{driver=\"ddp\"}") > 0.0);
    node.post("/api/carousel", r#"{"enabled":false}"#);
}

#[test]
fn a_display_host_that_does_not_resolve_is_reported_and_retried() {
    let node = Node::start(
        "ddp-nxdomain",
        &[("DEVICE_DRIVER", "ddp://no-such-board.invalid")],
    );
    assert!(
        eventually(Duration::from_secs(15), || node.health()["driver"]["ok"]
            == false),
        "{}",
        node.health()
    );
    let health = node.health();
    let error = health["driver"]["error"].as_str().unwrap();
    assert!(
        error.contains("cannot resolve host no-such-board.invalid"),
        "{health}"
    );
    assert_eq!(
        health["driver"]["target"],
        "ddp://no-such-board.invalid:4048"
    );
    // Commands still work.
    assert_eq!(node.post("/api/switch", r#"{"app":"stars"}"#).0, 200);
}

/// The value of the sample `name` (with its labels) in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics"))
}
