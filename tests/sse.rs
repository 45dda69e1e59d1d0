//! Server-Sent Events: `curl -N`, resume by event id on another node, gaps,
//! commands from the node that does not hold the stream, drain, token
//! expiry and hostile input.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Node, Redis, eventually, http, prefix};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "a-test-secret-of-some-length";

/// One SSE event as received.
#[derive(Debug, Clone)]
struct Ev {
    event: String,
    id: Option<String>,
    data: Value,
    /// `data:` lines in the event (the protocol promises one).
    data_lines: usize,
    retry: Option<u64>,
}

/// A minimal SSE client: HTTP/1.1, chunked body, events on a channel.
struct Sse {
    status: u16,
    head: String,
    rx: mpsc::Receiver<Ev>,
    sock: TcpStream,
}

impl Sse {
    fn open(addr: &str, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut sock = TcpStream::connect(addr).expect("connect");
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        sock.write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(sock.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::channel();
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        std::thread::spawn(move || {
            let mut buf = String::new();
            loop {
                let piece = if chunked {
                    let mut size = String::new();
                    if reader.read_line(&mut size).unwrap_or(0) == 0 {
                        return;
                    }
                    let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let mut data = vec![0; n + 2];
                    if reader.read_exact(&mut data).is_err() {
                        return;
                    }
                    data.truncate(n);
                    String::from_utf8_lossy(&data).into_owned()
                } else {
                    let mut data = String::new();
                    if reader.read_to_string(&mut data).is_err() || data.is_empty() {
                        return;
                    }
                    data
                };
                buf.push_str(&piece);
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let mut ev = Ev {
                        event: String::new(),
                        id: None,
                        data: Value::Null,
                        data_lines: 0,
                        retry: None,
                    };
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event: ") {
                            ev.event = v.into();
                        } else if let Some(v) = line.strip_prefix("id: ") {
                            ev.id = Some(v.into());
                        } else if let Some(v) = line.strip_prefix("data: ") {
                            data.push_str(v);
                            ev.data_lines += 1;
                        } else if let Some(v) = line.strip_prefix("retry: ") {
                            ev.retry = v.parse().ok();
                        }
                    }
                    if ev.event.is_empty() && ev.retry.is_none() {
                        continue; // a heartbeat comment
                    }
                    ev.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
        });
        Sse {
            status,
            head,
            rx,
            sock,
        }
    }

    fn next(&self, within: Duration) -> Option<Ev> {
        self.rx.recv_timeout(within).ok()
    }

    /// The next event named `name` (skipping others), or a panic.
    fn expect(&self, name: &str) -> Ev {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(ev) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if ev.event == name {
                return ev;
            }
        }
        panic!("no `{name}` event within 10 s");
    }

    fn close(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

fn publish(node: &Node, topic: &str, n: u64) {
    let (status, body) = node.post(
        "/api/publish",
        &json!({"topic": topic, "data": {"n": n}}).to_string(),
    );
    assert!(status == 200 || status == 202, "{status} {body}");
}

#[test]
fn curl_shows_ticker_events_with_event_id_and_one_data_line() {
    let node = Node::start(
        "sse-curl",
        &[
            (
                "WEBSOCKET_MOCK_EVENTS",
                r#"[{"name":"ticker","interval":500,"data":{"symbol":"DEMO","price":1}}]"#,
            ),
            ("WEBSOCKET_HEARTBEAT_INTERVAL", "700"),
        ],
    );
    let started = Instant::now();
    let out = Command::new("curl")
        .args(["-sN", "--max-time", "3"])
        .arg(format!("http://{}/sse/ticker", node.addr))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(started.elapsed() < Duration::from_secs(5));
    let tickers: Vec<&str> = text
        .split("\n\n")
        .filter(|b| b.starts_with("event: ticker\n"))
        .collect();
    assert!(tickers.len() >= 2, "{text}");
    for block in tickers {
        let lines: Vec<&str> = block.lines().collect();
        assert_eq!(lines.len(), 3, "{block}");
        assert!(lines[1].starts_with("id: 1_"), "{block}");
        let data: Value = serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], "event");
        assert_eq!(data["name"], "ticker");
        assert_eq!(data["data"]["symbol"], "DEMO");
        assert!(data["offset"].as_u64().is_some());
    }
    assert!(text.starts_with("retry: "), "{text}");
    // Heartbeats: comment lines, about every WEBSOCKET_HEARTBEAT_INTERVAL.
    assert!(text.matches("\n:\n").count() >= 2, "{text}");
    assert!(text.contains("event: connected\ndata: {"), "{text}");
}

fn two_nodes(name: &str, extra: &[(&str, &str)]) -> (Redis, Node, Node) {
    let redis = Redis::start();
    let p = prefix(name);
    let a = Node::start_on_redis(
        &format!("{name}-a"),
        &redis.url(),
        &p,
        extra,
        Duration::from_secs(10),
    );
    let b = Node::start_on_redis(
        &format!("{name}-b"),
        &redis.url(),
        &p,
        extra,
        Duration::from_secs(10),
    );
    (redis, a, b)
}

#[test]
fn resume_on_another_node_replays_the_missed_then_live_and_old_ids_get_a_gap() {
    let (_redis, a, b) = two_nodes("sse-resume", &[("HISTORY_SIZE", "50")]);
    let s = Sse::open(&a.addr, "/sse?topic=r1&topic=r2", &[]);
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(s.head.contains("text/event-stream"), "{}", s.head);
    s.expect("connected");
    s.expect("subscribed");
    s.expect("subscribed");
    for n in 1..=5 {
        publish(&a, "r1", n);
        publish(&a, "r2", n);
    }
    let mut last = None;
    for _ in 0..10 {
        let ev = s.next(Duration::from_secs(5)).expect("live event");
        assert_eq!(ev.data_lines, 1);
        last = ev.id;
    }
    s.close();
    let last = last.unwrap();
    for n in 6..=9 {
        publish(&b, "r1", n);
        publish(&b, "r2", n);
    }
    // Python httpx, as a reader of the docs would: the id to node B, then
    // the same id once history no longer holds what it missed (a gap).
    common::run_interop(
        &common::python(),
        &[
            &common::interop_script("sse_resume.py"),
            &b.addr,
            &last,
            &a.addr,
        ],
    );
}

/// A resumed topic that cannot be subscribed on the node a stream comes
/// back to (here its topic limit) keeps the position it came with in
/// the stream's ids: the next resume, on a node that can take it, replays
/// what it missed instead of starting it from now without a gap.
#[test]
fn a_resumed_topic_refused_on_one_node_keeps_its_position_for_the_next() {
    let redis = Redis::start();
    let p = prefix("sse-keep");
    let a = Node::start_on_redis("sse-keep-a", &redis.url(), &p, &[], Duration::from_secs(10));
    let b = Node::start_on_redis(
        "sse-keep-b",
        &redis.url(),
        &p,
        // Its own `device` and one more.
        &[("MAX_TOPICS_PER_NODE", "2")],
        Duration::from_secs(10),
    );
    let s = Sse::open(&a.addr, "/sse?topic=k1&topic=k2", &[]);
    assert_eq!(s.status, 200, "{}", s.head);
    s.expect("connected");
    s.expect("subscribed");
    s.expect("subscribed");
    for n in 1..=2 {
        publish(&a, "k1", n);
        publish(&a, "k2", n);
    }
    let mut id = None;
    for _ in 0..4 {
        id = s.next(Duration::from_secs(5)).expect("live event").id;
    }
    s.close();
    for n in 3..=4 {
        publish(&a, "k2", n);
    }
    // Node b takes one topic more: k1 resumes, k2 is refused.
    let r = Sse::open(
        &b.addr,
        "/sse?topic=k1&topic=k2",
        &[("Last-Event-ID", &id.unwrap())],
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let refused = r.expect("error");
    assert_eq!(refused.data["code"], "topic_limit", "{:?}", refused.data);
    assert_eq!(refused.data["event"], "k2", "{:?}", refused.data);
    publish(&a, "k1", 3);
    let live = r.expect("k1");
    r.close();
    // Back on a: k2 replays 3 and 4, then goes on live.
    let again = Sse::open(
        &a.addr,
        "/sse?topic=k1&topic=k2",
        &[("Last-Event-ID", &live.id.unwrap())],
    );
    assert_eq!(again.status, 200, "{}", again.head);
    let mut k2 = Vec::new();
    while k2.len() < 2 {
        let ev = again
            .next(Duration::from_secs(5))
            .expect("the missed k2 publications");
        match ev.event.as_str() {
            "k2" => k2.push(ev.data["offset"].as_u64().unwrap()),
            "subscribed" if ev.data["event"] == "k2" => {
                assert_eq!(ev.data["recovered"], true, "{:?}", ev.data)
            }
            "gap" | "error" => panic!("{ev:?}"),
            _ => {}
        }
    }
    assert_eq!(k2, [3, 4]);
}

/// The position a refused resumed topic keeps also serves the stream's own
/// next subscribe of it: a request (which cannot carry a position) resumes
/// it from there and replays what it missed, instead of starting it from
/// now with no `gap` (the JavaScript client retries a refused topic so).
#[test]
fn a_refused_resumed_topic_subscribed_again_replays_what_it_missed() {
    let redis = Redis::start();
    let p = prefix("sse-again");
    let a = Node::start_on_redis(
        "sse-again-a",
        &redis.url(),
        &p,
        &[],
        Duration::from_secs(10),
    );
    let b = Node::start_on_redis(
        "sse-again-b",
        &redis.url(),
        &p,
        // Its own `device` and one more.
        &[("MAX_TOPICS_PER_NODE", "2")],
        Duration::from_secs(10),
    );
    let s = Sse::open(&a.addr, "/sse?topic=r1&topic=r2", &[]);
    assert_eq!(s.status, 200, "{}", s.head);
    s.expect("connected");
    s.expect("subscribed");
    s.expect("subscribed");
    publish(&a, "r1", 1);
    publish(&a, "r2", 1);
    s.expect("r1");
    let id = s.expect("r2").id.unwrap();
    s.close();
    for n in 2..=3 {
        publish(&a, "r2", n);
    }
    // b takes one topic more: r1 resumes, r2 is refused.
    let r = Sse::open(&b.addr, "/sse?topic=r1&topic=r2", &[("Last-Event-ID", &id)]);
    assert_eq!(r.status, 200, "{}", r.head);
    let session = r.expect("connected").data["session"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = r.expect("error");
    assert_eq!(refused.data["code"], "topic_limit", "{:?}", refused.data);
    assert_eq!(refused.data["event"], "r2", "{:?}", refused.data);
    // It drops r1 and asks for r2 again until b has room (r1 lingers on b
    // for 1 s): 2 and 3 come first, recovered.
    let path = |op: &str| format!("/api/sse/{session}/{op}");
    let (status, body) = a.post(&path("unsubscribe"), r#"{"topic":"r1"}"#);
    assert_eq!(status, 200, "{body}");
    r.expect("unsubscribed");
    let subscribed = (0..20)
        .find_map(|_| {
            let (status, body) = a.post(&path("subscribe"), r#"{"topic":"r2"}"#);
            assert_eq!(status, 200, "{body}");
            let ev = r
                .next(Duration::from_secs(5))
                .expect("an answer on the stream");
            match ev.event.as_str() {
                "subscribed" => Some(ev),
                "error" if ev.data["code"] == "topic_limit" => {
                    std::thread::sleep(Duration::from_millis(300));
                    None
                }
                _ => panic!("{ev:?}"),
            }
        })
        .expect("r2 subscribed once b had room");
    assert_eq!(subscribed.data["event"], "r2", "{:?}", subscribed.data);
    assert_eq!(subscribed.data["recovered"], true, "{:?}", subscribed.data);
    let replayed: Vec<u64> = (0..2)
        .map(|_| r.expect("r2").data["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(replayed, [2, 3]);
}

/// A resume whose token no longer allows one of its topics goes on with
/// the others, and that topic gets an `error` event: a 403 would end an
/// `EventSource` for good. A new stream naming it is refused whole, as
/// before.
#[test]
fn a_resume_goes_on_without_a_topic_the_token_no_longer_allows() {
    let redis = Redis::start();
    let node = Node::start_on_redis(
        "sse-revoked",
        &redis.url(),
        &prefix("sse-revoked"),
        &[("AUTH_JWT_SECRET", SECRET)],
        Duration::from_secs(10),
    );
    let both = token(json!({"sub": "u1", "exp": now() + 600, "topics": ["v.*"]}));
    let one = token(json!({"sub": "u1", "exp": now() + 600, "topics": ["v.a"]}));
    let s = Sse::open(
        &node.addr,
        &format!("/sse?token={both}&topic=v.a&topic=v.b"),
        &[],
    );
    assert_eq!(s.status, 200, "{}", s.head);
    s.expect("connected");
    s.expect("subscribed");
    s.expect("subscribed");
    publish(&node, "v.a", 1);
    publish(&node, "v.b", 1);
    let mut id = None;
    for _ in 0..2 {
        id = s.next(Duration::from_secs(5)).expect("live event").id;
    }
    s.close();
    let id = id.unwrap();
    publish(&node, "v.a", 2);

    let (status, body) = http(
        &node.addr,
        "GET",
        &format!("/sse?token={one}&topic=v.a&topic=v.b"),
        None,
        &[],
    );
    assert_eq!(status, 403, "a new stream: {body}");
    // A malformed id makes a new stream too; `1` (what an EventSource sends
    // back after a stream without history topics) is a resume.
    let (status, body) = http(
        &node.addr,
        "GET",
        &format!("/sse?token={one}&topic=v.a&topic=v.b&lastEventId=nope"),
        None,
        &[],
    );
    assert_eq!(status, 403, "a malformed id: {body}");
    let plain = Sse::open(
        &node.addr,
        &format!("/sse?token={one}&topic=v.a&topic=v.b"),
        &[("Last-Event-ID", "1")],
    );
    assert_eq!(plain.status, 200, "{}", plain.head);
    plain.expect("connected");
    let e = plain.expect("error");
    assert_eq!(
        (&e.data["code"], &e.data["event"]),
        (&json!("forbidden"), &json!("v.b")),
        "{:?}",
        e.data
    );
    assert_eq!(plain.expect("subscribed").data["event"], "v.a");
    plain.close();

    let r = Sse::open(
        &node.addr,
        &format!("/sse?token={one}&topic=v.a&topic=v.b"),
        &[("Last-Event-ID", &id)],
    );
    assert_eq!(r.status, 200, "{}", r.head);
    r.expect("connected");
    let e = r.expect("error");
    assert_eq!(e.data["code"], "forbidden", "{:?}", e.data);
    assert_eq!(e.data["event"], "v.b", "{:?}", e.data);
    assert_eq!(e.data["replyTo"], "subscribe", "{:?}", e.data);
    let sub = r.expect("subscribed");
    assert_eq!(sub.data["event"], "v.a", "{:?}", sub.data);
    assert_eq!(r.expect("v.a").data["data"]["n"], 2, "the missed one");
    publish(&node, "v.b", 3);
    publish(&node, "v.a", 3);
    let next = r.next(Duration::from_secs(5)).expect("live event");
    assert_eq!(
        (next.event.as_str(), &next.data["data"]["n"]),
        ("v.a", &json!(3)),
        "nothing of v.b: {next:?}"
    );
}

/// A stream never writes an event id too long to be taken back: past the
/// history topics its id can carry, a further one is refused with a clear
/// error, and the id of the last one held resumes every one of them.
#[test]
fn a_stream_refuses_history_topics_its_event_id_could_not_carry() {
    let node = Node::start("sse-id-cap", &[("WEBSOCKET_SUBSCRIBE_RATE_LIMIT", "0")]);
    let topics: Vec<String> = (0..200).map(|i| format!("cap.topic.{i}")).collect();
    let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
    let s = Sse::open(&node.addr, &format!("/sse?{}", query.join("&")), &[]);
    assert_eq!(s.status, 200, "{}", s.head);
    s.expect("connected");
    let (mut held, mut refused, mut id) = (0, 0, String::new());
    while held + refused < topics.len() {
        let ev = s
            .next(Duration::from_secs(10))
            .expect("an answer for every topic");
        match ev.event.as_str() {
            "subscribed" => {
                held += 1;
                id = ev.id.expect("subscribed carries an id");
            }
            "error" => {
                assert_eq!(ev.data["code"], "subscription_limit", "{:?}", ev.data);
                assert!(
                    ev.data["error"].as_str().unwrap().contains("event id"),
                    "{:?}",
                    ev.data
                );
                refused += 1;
            }
            _ => {}
        }
    }
    assert_eq!(held, 113, "(4096 - 1) / 36 topics");
    assert!(id.len() <= 4096, "{} bytes", id.len());
    s.close();
    for t in &topics[..held] {
        publish(&node, t, 1);
    }
    // Every held topic resumes from the id: its one publication, no error.
    let r = Sse::open(
        &node.addr,
        &format!("/sse?{}", query[..held].join("&")),
        &[("Last-Event-ID", &id)],
    );
    assert_eq!(r.status, 200, "{}", r.head);
    let mut replayed = 0;
    while replayed < held {
        let ev = r
            .next(Duration::from_secs(10))
            .expect("every missed publication");
        match ev.event.as_str() {
            "error" | "gap" => panic!("{ev:?}"),
            "subscribed" => assert_eq!(ev.data["recovered"], true, "{:?}", ev.data),
            e if e.starts_with("cap.topic.") => replayed += 1,
            _ => {}
        }
    }
}

/// An id taken before a topic's first publication names a pending epoch.
/// When history no longer holds what followed it, the resume announces a
/// gap from offset 1 of the topic's first epoch, which continues the
/// pending one: not an epoch reset.
#[test]
fn an_id_from_before_the_first_publication_gets_a_gap_from_1_not_a_reset() {
    let (_redis, a, b) = two_nodes("sse-pending", &[("HISTORY_SIZE", "3")]);
    let s = Sse::open(&a.addr, "/sse?topic=fresh.p1", &[]);
    assert_eq!(s.status, 200, "{}", s.head);
    s.expect("connected");
    let sub = s.expect("subscribed");
    assert_eq!(sub.data["offset"], 0, "{:?}", sub.data);
    let pending = sub.data["epoch"].as_str().unwrap().to_string();
    assert!(pending.starts_with('~'), "{pending}");
    let id = sub.id.expect("subscribed carries an id");
    s.close();
    for n in 1..=8 {
        publish(&b, "fresh.p1", n);
    }
    let r = Sse::open(&b.addr, "/sse?topic=fresh.p1", &[("Last-Event-ID", &id)]);
    assert_eq!(r.status, 200, "{}", r.head);
    let sub = r.expect("subscribed");
    assert_eq!(sub.data["recovered"], false, "{:?}", sub.data);
    let gap = r.expect("gap");
    assert_eq!(
        (gap.data["from"].as_u64(), gap.data["to"].as_u64()),
        (Some(1), Some(8)),
        "{:?}",
        gap.data
    );
    assert!(
        gap.data.get("previousEpoch").is_none(),
        "not a reset: {:?}",
        gap.data
    );
    assert_ne!(gap.data["epoch"].as_str(), Some(pending.as_str()));
    publish(&a, "fresh.p1", 9);
    let live = r.expect("fresh.p1");
    assert_eq!(live.data["offset"], 9, "{:?}", live.data);
}

#[test]
fn subscribe_from_the_node_that_does_not_hold_the_stream() {
    let (_redis, a, b) = two_nodes("sse-post", &[]);
    let s = Sse::open(&a.addr, "/sse/base", &[]);
    let connected = s.expect("connected");
    let session = connected.data["session"].as_str().unwrap().to_string();
    let client_id = connected.data["clientId"].as_str().unwrap().to_string();
    // The session is the client id and a secret: the client id alone is
    // public (presence lists it) and every anonymous client is the same
    // user, so it names no stream by itself.
    assert_eq!(session.len(), 48, "{session}");
    assert_eq!(&session[..16], client_id);
    s.expect("subscribed");
    let path = |op: &str| format!("/api/sse/{session}/{op}");
    let mut took = Vec::new();
    for i in 0..200 {
        let body = json!({"topic": "extra"}).to_string();
        let t = Instant::now();
        let (status, answer) = b.post(&path("subscribe"), &body);
        assert_eq!(status, 200, "{answer}");
        let ev = s.expect("subscribed");
        took.push(t.elapsed());
        assert_eq!(ev.data["event"], "extra");
        if i == 0 {
            publish(&b, "extra", 7);
            let live = s.expect("extra");
            assert_eq!(live.data["data"]["n"], 7);
        }
        let (status, answer) = b.post(&path("unsubscribe"), &body);
        assert_eq!(status, 200, "{answer}");
        s.expect("unsubscribed");
    }
    took.sort();
    let p99 = took[197];
    eprintln!(
        "POST subscribe on the other node → subscribed: p50 {:?}, p99 {p99:?}",
        took[100]
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    // The holder and the other node answer alike.
    let (sa, ba) = a.post(&path("subscribe"), r#"{"topic":"x"}"#);
    let (sb, bb) = b.post(&path("subscribe"), r#"{"topic":"x"}"#);
    assert_eq!((sa, sb), (200, 200));
    assert_eq!(ba["data"], bb["data"]);
    // The client id alone, or another secret: 404, nothing happens.
    for forged in [client_id.clone(), format!("{client_id}{}", "0".repeat(32))] {
        for node in [&a, &b] {
            let (status, body) = node.post(
                &format!("/api/sse/{forged}/unsubscribe"),
                r#"{"topic":"x"}"#,
            );
            assert_eq!(status, 404, "{forged}: {body}");
        }
    }
    // The back end's unsubscribe of a topic the stream never held tells
    // it nothing (as on every transport).
    let (status, body) = b.post(
        "/api/unsubscribe",
        &json!({"client": client_id, "topic": "never"}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    publish(&b, "x", 8);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = s
            .next(deadline.saturating_duration_since(Instant::now()))
            .expect("x still arrives");
        assert_ne!(ev.event, "unsubscribed", "{:?}", ev.data);
        if ev.event == "x" {
            assert_eq!(ev.data["data"]["n"], 8);
            break;
        }
    }
    // An ended session, an unknown one: 404 on either node.
    s.close();
    assert!(eventually(Duration::from_secs(5), || {
        a.post(&path("subscribe"), r#"{"topic":"x"}"#).0 == 404
    }));
    for node in [&a, &b] {
        let (status, body) = node.post("/api/sse/0123456789abcdef/subscribe", r#"{"topic":"x"}"#);
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["code"], "not_found");
        let (status, body) = node.post(&path("subscribe"), r#"{"topic":"bad topic"}"#);
        assert_eq!(status, 400, "{body}");
    }
}

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn bad_input_gets_clear_errors_and_the_node_stays_healthy() {
    let node = Node::start(
        "sse-bad",
        &[
            ("AUTH_JWT_SECRET", SECRET),
            ("CORS_ALLOWED_ORIGINS", "https://app.example"),
        ],
    );
    let good = token(json!({"sub": "u1", "exp": now() + 600, "topics": ["news.*"]}));
    let other = token(json!({"sub": "u2", "exp": now() + 600, "topics": ["news.*"]}));
    let q = |rest: &str| format!("/sse?token={good}&{rest}");
    let (status, body) = http(&node.addr, "GET", &q("topic=bad%20topic"), None, &[]);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("invalid topic"),
        "{body}"
    );
    let (status, body) = http(&node.addr, "GET", &q("topic=secret"), None, &[]);
    assert_eq!(status, 403, "{body}");
    // A path that is not UTF-8 once decoded: the JSON error form too (here,
    // at /ws/{topic} and at the REST reads).
    for path in [
        "/sse/%FF",
        "/ws/%FF",
        "/api/history/%FF",
        "/api/sse/%FF/subscribe",
    ] {
        let method = if path.ends_with("subscribe") {
            "POST"
        } else {
            "GET"
        };
        let (status, body) = http(
            &node.addr,
            method,
            path,
            Some("{}"),
            &[("Content-Type", "application/json")],
        );
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("the path could not be read"),
            "{path}: {body}"
        );
    }
    let (status, body) = http(&node.addr, "GET", "/sse?topic=news.a", None, &[]);
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(
        &node.addr,
        "GET",
        &q("topic=news.a"),
        None,
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "forbidden_origin");
    // A 1 MB query string.
    let huge = format!("/sse?topic={}", "a".repeat(1 << 20));
    let (status, _) = http(&node.addr, "GET", &huge, None, &[]);
    assert!(status == 431 || status == 414 || status == 400, "{status}");
    // Garbage and too long ids: an error event, then a stream from now.
    for id in ["garbage", &"1_a.b.c".repeat(1000)] {
        let s = Sse::open(
            &node.addr,
            &q("topic=news.a"),
            &[("Last-Event-ID", id), ("Origin", "https://app.example")],
        );
        assert_eq!(s.status, 200, "{}", s.head);
        assert!(
            s.head
                .to_ascii_lowercase()
                .contains("access-control-allow-origin: https://app.example"),
            "{}",
            s.head
        );
        s.expect("connected");
        let err = s.expect("error");
        assert_eq!(err.data["code"], "bad_event_id", "{:?}", err.data);
        s.expect("subscribed");
    }
    // Commands need the stream's own user.
    let s = Sse::open(&node.addr, &q("topic=news.a"), &[]);
    let session = s.expect("connected").data["session"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/sse/{session}/subscribe");
    let (status, _) = http(
        &node.addr,
        "POST",
        &path,
        Some(r#"{"topic":"news.b"}"#),
        &[],
    );
    assert_eq!(status, 401);
    let auth_other = format!("Bearer {other}");
    let (status, _) = http(
        &node.addr,
        "POST",
        &path,
        Some(r#"{"topic":"news.b"}"#),
        &[("Authorization", &auth_other)],
    );
    assert_eq!(
        status, 404,
        "another user's request cannot reach the stream"
    );
    let auth = format!("Bearer {good}");
    let (status, body) = http(
        &node.addr,
        "POST",
        &path,
        Some(r#"{"topic":"secret"}"#),
        &[("Authorization", &auth)],
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = http(
        &node.addr,
        "POST",
        &path,
        Some("{"),
        &[("Authorization", &auth)],
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(
        &node.addr,
        "POST",
        &path,
        Some(r#"{"topic":"news.b"}"#),
        &[("Authorization", &auth)],
    );
    assert_eq!(status, 200, "{body}");
    s.expect("subscribed");
    s.expect("subscribed");
    assert_eq!(node.get("/healthz").0, 200);
}

#[test]
fn token_expiry_and_drain_end_the_stream_with_an_event() {
    let node = Node::start(
        "sse-life",
        &[("AUTH_JWT_SECRET", SECRET), ("SHUTDOWN_DRAIN_MS", "500")],
    );
    let short = token(json!({"sub": "u1", "exp": now() + 2}));
    let s = Sse::open(&node.addr, &format!("/sse/t?token={short}"), &[]);
    let err = s.expect("error");
    assert_eq!(err.data["code"], "token_expired");
    assert!(s.next(Duration::from_secs(3)).is_none(), "the stream ended");

    let long = token(json!({"sub": "u1", "exp": now() + 600}));
    let s = Sse::open(&node.addr, &format!("/sse/t?token={long}"), &[]);
    s.expect("subscribed");
    let metrics = node.get("/metrics").1;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(r#"switchboard_connections{transport="sse"} 1"#),
        "{metrics}"
    );
    node.signal("TERM");
    let bye = s.expect("reconnect");
    let retry = bye.retry.expect("retry: with the last event");
    assert!((500..=3000).contains(&retry), "{retry}");
    assert!(s.next(Duration::from_secs(3)).is_none(), "the stream ended");
}

#[test]
fn a_stream_that_does_not_keep_up_ends_with_an_error_event_and_is_counted() {
    let node = Node::start(
        "sse-slow",
        &[
            ("WEBSOCKET_CLIENT_QUEUE_MESSAGES", "16"),
            ("HISTORY_TOPICS", ""),
        ],
    );
    // A client that sends its request and then reads nothing.
    let mut sock = TcpStream::connect(&node.addr).unwrap();
    write!(sock, "GET /sse/slow HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let pad = "x".repeat(60_000);
    let metrics = || node.get("/metrics").1.as_str().unwrap_or("").to_string();
    let counted = r#"switchboard_slow_consumer_disconnects_total{transport="sse"} 1"#;
    let mut n = 0;
    while !metrics().contains(counted) {
        for _ in 0..20 {
            publish_pad(&node, n, &pad);
            n += 1;
        }
        assert!(n < 2_000, "never a slow consumer after {n} publications");
    }
    // What it reads in the end: what fit, then the reason.
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut all = Vec::new();
    let _ = sock.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    let tail = &text[text.len().saturating_sub(600)..];
    assert!(tail.contains("event: error\ndata: {"), "{tail}");
    assert!(tail.contains(r#""code":"slow_consumer""#), "{tail}");
    assert_eq!(node.get("/healthz").0, 200);
}

fn publish_pad(node: &Node, n: u64, pad: &str) {
    let (status, body) = node.post(
        "/api/publish",
        &json!({"topic": "slow", "data": {"n": n, "pad": pad}}).to_string(),
    );
    assert!(status == 200 || status == 202, "{status} {body}");
}

#[test]
fn a_stream_past_the_nodes_topic_limit_is_told_so_and_keeps_its_other_topics() {
    let node = Node::start("sse-topic-limit", &[("MAX_TOPICS_PER_NODE", "4")]);
    let topics: Vec<String> = (0..6).map(|i| format!("limit.{i}")).collect();
    let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
    let s = Sse::open(&node.addr, &format!("/sse?{}", query.join("&")), &[]);
    assert_eq!(s.status, 200, "{}", s.head);
    s.expect("connected");
    let (mut subscribed, mut refused) = (Vec::new(), Vec::new());
    while subscribed.len() + refused.len() < topics.len() {
        let ev = s
            .next(Duration::from_secs(10))
            .expect("an answer for every topic");
        match ev.event.as_str() {
            "subscribed" => subscribed.push(ev.data["event"].as_str().unwrap().to_string()),
            "error" => {
                assert_eq!(ev.data["code"], "topic_limit", "{:?}", ev.data);
                let text = ev.data["error"].as_str().unwrap();
                assert!(text.contains("MAX_TOPICS_PER_NODE"), "{text}");
                refused.push(ev.data["event"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    assert!(
        !subscribed.is_empty() && !refused.is_empty(),
        "{subscribed:?} {refused:?}"
    );
    // The topics it holds still deliver.
    publish(&node, &subscribed[0], 1);
    s.expect(&subscribed[0]);
    assert_eq!(node.get("/healthz").0, 200);
}

#[test]
fn a_stream_that_opens_new_topics_too_fast_is_refused_and_held_topics_are_not_counted() {
    let node = Node::start(
        "sse-churn",
        &[
            ("WEBSOCKET_SUBSCRIBE_RATE_LIMIT", "1"),
            ("WEBSOCKET_SUBSCRIBE_RATE_BURST", "2"),
        ],
    );
    let s = Sse::open(&node.addr, "/sse", &[]);
    let session = s.expect("connected").data["session"]
        .as_str()
        .unwrap()
        .to_string();
    let post = |op: &str, topic: &str| {
        let (status, body) = node.post(
            &format!("/api/sse/{session}/{op}"),
            &json!({ "topic": topic }).to_string(),
        );
        assert_eq!(status, 200, "{body}");
    };
    // Two new topics take the burst; the third is refused on the stream.
    for topic in ["churn.0", "churn.1"] {
        post("subscribe", topic);
        assert_eq!(s.expect("subscribed").data["event"], topic);
    }
    post("subscribe", "churn.2");
    let e = s.expect("error");
    assert_eq!(e.data["code"], "subscribe_rate_limited", "{:?}", e.data);
    assert_eq!(e.data["event"], "churn.2");
    let text = e.data["error"].as_str().unwrap();
    assert!(text.contains("WEBSOCKET_SUBSCRIBE_RATE_LIMIT"), "{text}");
    // Leaving and joining again a topic the node still holds costs nothing:
    // any number of times within the same second.
    for _ in 0..5 {
        post("unsubscribe", "churn.0");
        s.expect("unsubscribed");
        post("subscribe", "churn.0");
        assert_eq!(s.expect("subscribed").data["event"], "churn.0");
    }
    publish(&node, "churn.0", 1);
    s.expect("churn.0");
    // The topics of a stream's URL are its own subscribes too: a new stream
    // gets its burst of new topics, no more; one the node holds is free.
    let url = Sse::open(
        &node.addr,
        "/sse?topic=churn.0&topic=url.0&topic=url.1&topic=url.2",
        &[],
    );
    assert_eq!(url.status, 200, "{}", url.head);
    let (mut held, mut refused) = (Vec::new(), Vec::new());
    while held.len() + refused.len() < 4 {
        let ev = url
            .next(Duration::from_secs(5))
            .expect("an answer for every topic");
        match ev.event.as_str() {
            "subscribed" => held.push(ev.data["event"].as_str().unwrap().to_string()),
            "error" => {
                assert_eq!(ev.data["code"], "subscribe_rate_limited", "{:?}", ev.data);
                refused.push(ev.data["event"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    assert_eq!(held, ["churn.0", "url.0", "url.1"]);
    assert_eq!(refused, ["url.2"]);
    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("switchboard_limit_refusals_total{limit=\"subscribe_rate\"}"),
        "{metrics}"
    );
}
