//! History, recovery and gap repair with real processes: several
//! `switchboard` nodes and a private `redis-server`, publishers using
//! `FCALL switchboard_publish` and `POST /api/publish`, clients counting
//! offsets.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Node, Redis, eventually, prefix};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn redis_node(name: &str, redis: &Redis, pfx: &str, extra: &[(&str, &str)]) -> Node {
    Node::start_on_redis(name, &redis.url(), pfx, extra, Duration::from_secs(15))
}

/// `FCALL switchboard_publish 1 <topic> <envelope> <prefix>` → (offset, epoch).
fn fcall(redis: &Redis, pfx: &str, topic: &str, data: Value) -> (u64, String) {
    let envelope = json!({"event": topic, "data": data}).to_string();
    let reply = redis
        .call(&["FCALL", "switchboard_publish", "1", topic, &envelope, pfx])
        .unwrap_or_else(|e| panic!("FCALL failed: {e}"));
    (reply[0].parse().unwrap(), reply[1].clone())
}

/// Subscribes with an optional `since`; returns the `subscribed` frame.
async fn subscribe_since(c: &mut Client, topic: &str, since: Option<(u64, &str)>) -> Value {
    let mut msg = json!({"type": "subscribe", "event": topic});
    if let Some((offset, epoch)) = since {
        msg["since"] = json!({"offset": offset, "epoch": epoch});
    }
    c.send(msg).await;
    let m = c.recv().await;
    assert_eq!(m["type"], "subscribed", "{m}");
    m
}

/// The next `n` event offsets (data must carry `n` equal to the offset's
/// publication number when `check_data`).
async fn offsets(c: &mut Client, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = c.recv().await;
        assert_eq!(m["type"], "event", "{m}");
        out.push(
            m["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("no offset: {m}")),
        );
    }
    out
}

#[tokio::test]
async fn a_client_that_reconnects_to_another_node_recovers_exactly_what_it_missed() {
    let redis = Redis::start();
    let pfx = prefix("recover");
    let a = redis_node("a", &redis, &pfx, &[]);
    let b = redis_node("b", &redis, &pfx, &[]);

    let mut c = Client::connect(&a.ws_url("/ws")).await;
    let first = subscribe_since(&mut c, "news", None).await;
    assert_eq!(first["offset"], 0, "nothing published yet: {first}");
    // Nothing published: a pending epoch (the topic has none, and the
    // subscription created none).
    assert!(first["epoch"].as_str().unwrap().starts_with('~'), "{first}");

    let mut other = Client::connect(&b.ws_url("/ws")).await;
    let seen_on_b = subscribe_since(&mut other, "news", None).await;
    assert!(seen_on_b["epoch"].as_str().unwrap().starts_with('~'));
    let (o1, epoch) = fcall(&redis, &pfx, "news", json!({"n": 1}));
    assert_eq!(o1, 1);
    let (status, body) = b.post(
        "/api/publish",
        &json!({"topic": "news", "data": {"n": 2}}).to_string(),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["data"]["offset"], 2, "{body}");
    assert_eq!(body["data"]["epoch"], epoch.as_str());
    assert_eq!(offsets(&mut c, 2).await, [1, 2]);
    assert_eq!(offsets(&mut other, 2).await, [1, 2]);
    drop(c);

    // 20 publications while the client is away, half through the function,
    // half through the HTTP endpoint of the other node.
    for i in 3..=22u64 {
        if i % 2 == 0 {
            fcall(&redis, &pfx, "news", json!({"n": i}));
        } else {
            let (status, _) = b.post(
                "/api/publish",
                &json!({"topic": "news", "data": {"n": i}}).to_string(),
            );
            assert_eq!(status, 202);
        }
    }
    let mut c = Client::connect(&b.ws_url("/ws")).await;
    let sub = subscribe_since(&mut c, "news", Some((2, &epoch))).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(sub["offset"], 22, "{sub}");
    let mut got = Vec::new();
    while got.len() < 20 {
        let m = c.recv().await;
        assert_eq!(m["type"], "event", "{m}");
        assert_eq!(
            m["data"]["n"], m["offset"],
            "payload matches its offset: {m}"
        );
        got.push(m["offset"].as_u64().unwrap());
    }
    assert_eq!(got, (3..=22).collect::<Vec<_>>());
    // Live publications continue with the next offset, no gap, no duplicate.
    fcall(&redis, &pfx, "news", json!({"n": 23}));
    assert_eq!(offsets(&mut c, 1).await, [23]);
    assert!(c.recv_within(Duration::from_millis(300)).await.is_none());

    // `request` answers from history, with the offset, even on a node where
    // nobody subscribed to the topic.
    let lonely = redis_node("c", &redis, &pfx, &[]);
    let mut r = Client::connect(&lonely.ws_url("/ws")).await;
    r.send(json!({"type": "request", "event": "news"})).await;
    let resp = r.expect("response").await;
    assert_eq!(resp["offset"], 23, "{resp}");
    assert_eq!(resp["data"]["n"], 23);

    // REST backfill.
    let (status, body) = lonely.get("/api/history/news?since=20&limit=2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["epoch"], epoch.as_str());
    assert_eq!(body["data"]["offset"], 23);
    let pubs: Vec<u64> = body["data"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(pubs, [21, 22]);
    let (status, _) = lonely.get("/api/history/news?limit=0");
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_function_refuses_bad_publications_with_a_reason() {
    let redis = Redis::start();
    let pfx = prefix("fcallbad");
    let _a = redis_node("a", &redis, &pfx, &[("HISTORY_TOPICS", "news,chat.*")]);
    let call = |topic: &str, envelope: &str| {
        redis.call(&["FCALL", "switchboard_publish", "1", topic, envelope, &pfx])
    };
    assert!(call("news", r#"{"data":1}"#).is_ok());
    assert!(call("chat.room-1", r#"{"data":1}"#).is_ok());
    let refused = [
        ("other", r#"{"data":1}"#, "not a history topic"),
        ("news", "not json", "not valid JSON"),
        ("news", r#"{"event":"news"}"#, "\"data\""),
        ("news", "[1]", "\"data\""),
        ("news", r#"{"event":"bad name","data":1}"#, "invalid event"),
        ("news", r#"{"offset":4,"epoch":"x","data":1}"#, "assigned"),
    ];
    for (topic, envelope, why) in refused {
        let err = call(topic, envelope).unwrap_err();
        assert!(err.contains(why), "{topic} {envelope}: {err}");
    }
    let deep = format!(
        r#"{{"data":{}1{}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let err = call("news", &deep).unwrap_err();
    assert!(err.contains("nested"), "{err}");
    let deep65 = format!(r#"{{"data":{}1{}}}"#, "[".repeat(65), "]".repeat(65));
    assert!(call("news", &deep65).unwrap_err().contains("nested"));
    // Nothing refused took an offset.
    let ok = call("news", r#"{"data":2}"#).unwrap();
    assert_eq!(ok[0], "2");
    // A node's shared read can ask for far more than follows (one
    // waiter's `since` far ahead of another's): it gets what there is.
    let read = redis
        .call(&[
            "FCALL",
            "switchboard_history",
            "1",
            "news",
            "0",
            &u64::MAX.to_string(),
            &pfx,
        ])
        .unwrap_or_else(|e| panic!("a read with a huge limit failed: {e}"));
    assert_eq!(read[1], "2", "{read:?}");
    assert_eq!(read.len(), 2 + 2 * 2, "{read:?}");
}

#[tokio::test]
async fn a_trimmed_range_or_a_lost_history_is_not_recovered() {
    let mut redis = Redis::start();
    let port = redis.port;
    let pfx = prefix("trim");
    let env = [("HISTORY_SIZE", "10")];
    let a = redis_node("a", &redis, &pfx, &env);
    let mut c = Client::connect(&a.ws_url("/ws")).await;
    subscribe_since(&mut c, "news", None).await;
    let (_, epoch) = fcall(&redis, &pfx, "news", json!(1));
    assert_eq!(offsets(&mut c, 1).await, [1]);
    drop(c);
    for i in 2..=31 {
        fcall(&redis, &pfx, "news", json!(i));
    }
    let mut c = Client::connect(&a.ws_url("/ws")).await;
    let sub = subscribe_since(&mut c, "news", Some((1, &epoch))).await;
    assert_eq!(sub["recovered"], false, "30 missed, 10 kept: {sub}");
    assert_eq!(sub["offset"], 31);
    assert_eq!(sub["epoch"], epoch.as_str());
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_none(),
        "nothing replayed"
    );
    fcall(&redis, &pfx, "news", json!(32));
    assert_eq!(offsets(&mut c, 1).await, [32]);
    drop(c);

    // Redis restarts empty: the history and its epoch are gone.
    redis.kill();
    let redis = Redis::start_on(port);
    assert!(eventually(
        Duration::from_secs(15),
        || a.health()["backplaneConnected"] == true
    ));
    let mut c = Client::connect(&a.ws_url("/ws")).await;
    // Wait until the node has loaded its functions into the new Redis.
    assert!(eventually(Duration::from_secs(10), || redis
        .cmd(&["FUNCTION", "LIST"])
        != "*0"));
    let sub = subscribe_since(&mut c, "news", Some((32, &epoch))).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_ne!(sub["epoch"], epoch.as_str(), "a new epoch after the loss");
    assert!(
        sub["epoch"].as_str().unwrap().starts_with('~'),
        "pending: {sub}"
    );
    assert_eq!(sub["offset"], 0);
    let (o, _) = fcall(&redis, &pfx, "news", json!(1));
    assert_eq!(o, 1);
    assert_eq!(offsets(&mut c, 1).await, [1], "the first epoch is no gap");
}

#[tokio::test]
async fn embedded_mode_keeps_history_in_memory_with_the_same_semantics() {
    let node = Node::start("solo", &[("HISTORY_SIZE", "5")]);
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    let sub = subscribe_since(&mut c, "news", None).await;
    assert!(sub["epoch"].as_str().unwrap().starts_with('~'), "{sub}");
    assert_eq!(sub["offset"], 0);
    let epoch = std::sync::OnceLock::new();
    let publish = |n: u64| {
        let (status, body) = node.post(
            "/api/publish",
            &json!({"topic": "news", "data": {"n": n}}).to_string(),
        );
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["data"]["offset"], n);
        let e = epoch.get_or_init(|| body["data"]["epoch"].as_str().unwrap().to_string());
        assert_eq!(body["data"]["epoch"], e.as_str());
    };
    publish(1);
    let epoch = epoch.get().unwrap().clone();
    assert_eq!(offsets(&mut c, 1).await, [1]);
    drop(c);
    for n in 2..=4 {
        publish(n);
    }
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    let sub = subscribe_since(&mut c, "news", Some((1, &epoch))).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(offsets(&mut c, 3).await, [2, 3, 4]);
    drop(c);
    for n in 5..=12 {
        publish(n);
    }
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    let sub = subscribe_since(&mut c, "news", Some((4, &epoch))).await;
    assert_eq!(sub["recovered"], false, "only 5 kept: {sub}");
    assert_eq!(sub["offset"], 12);
    // Topic `device` is state: a client coming back gets the current state.
    let sub = subscribe_since(&mut c, "device", Some((1, "whatever"))).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let state = c.recv().await;
    assert_eq!(state["type"], "event");
    assert_eq!(state["topic"], "device", "{state}");
}

/// One test client of the rolling restart: follows `topic` across node
/// restarts, reconnecting with `since` to whichever node answers.
async fn follow(
    nodes: Arc<Mutex<Vec<String>>>,
    start: usize,
    topic: &'static str,
    until: u64,
    log: Arc<Mutex<Vec<u64>>>,
    problems: Arc<Mutex<Vec<String>>>,
    deadline: Instant,
) {
    let mut position: Option<(u64, String)> = None;
    let mut attempt = start;
    while Instant::now() < deadline {
        let url = {
            let nodes = nodes.lock().unwrap();
            format!("ws://{}/ws", nodes[attempt % nodes.len()])
        };
        attempt += 1;
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut msg = json!({"type": "subscribe", "event": topic});
        if let Some((offset, epoch)) = &position {
            msg["since"] = json!({"offset": offset, "epoch": epoch});
        }
        if futures_util::SinkExt::send(&mut ws, Message::Text(msg.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let next = tokio::time::timeout_at(deadline.into(), ws.next()).await;
            let Ok(Some(Ok(frame))) = next else { break };
            let Message::Text(text) = frame else {
                if matches!(frame, Message::Close(_)) {
                    break;
                }
                continue;
            };
            let m: Value = serde_json::from_str(&text).unwrap();
            match m["type"].as_str() {
                Some("subscribed") => {
                    let epoch = m["epoch"].as_str().unwrap().to_string();
                    match &position {
                        Some((_, e)) => {
                            // A position taken before the first publication
                            // is a pending one (`~…`): it recovers into the
                            // topic's first epoch.
                            if m["recovered"] != true || (*e != epoch && !e.starts_with('~')) {
                                problems.lock().unwrap().push(format!("not recovered: {m}"));
                            }
                            position.as_mut().unwrap().1 = epoch;
                        }
                        None => position = Some((m["offset"].as_u64().unwrap(), epoch)),
                    }
                }
                Some("event") => {
                    let offset = m["offset"].as_u64().unwrap();
                    let (last, _) = position.as_mut().unwrap();
                    if offset != *last + 1 {
                        problems
                            .lock()
                            .unwrap()
                            .push(format!("offset {offset} after {last}"));
                    }
                    *last = offset;
                    log.lock().unwrap().push(offset);
                    if offset >= until {
                        return;
                    }
                }
                Some("gap") => problems.lock().unwrap().push(format!("gap: {m}")),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_and_duplicates_nothing() {
    let redis = Redis::start();
    let pfx = prefix("rolling");
    let ports = [common::free_port(), common::free_port()];
    let start = |i: usize| {
        let port = ports[i].to_string();
        redis_node(
            ["a", "b"][i],
            &redis,
            &pfx,
            &[("PORT", port.as_str()), ("SHUTDOWN_GRACE_MS", "4000")],
        )
    };
    let mut nodes = [start(0), start(1)];
    let addrs = Arc::new(Mutex::new(vec![
        nodes[0].addr.clone(),
        nodes[1].addr.clone(),
    ]));

    const CLIENTS: usize = 50;
    const RATE: u64 = 200;
    const SECONDS: u64 = 15;
    let total = RATE * SECONDS;
    let deadline = Instant::now() + Duration::from_secs(SECONDS + 30);
    let problems = Arc::new(Mutex::new(Vec::new()));
    let logs: Vec<Arc<Mutex<Vec<u64>>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let mut followers = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        followers.push(tokio::spawn(follow(
            addrs.clone(),
            i,
            "ticker",
            total,
            log.clone(),
            problems.clone(),
            deadline,
        )));
    }
    // Every client subscribed before the first publication.
    assert!(eventually(Duration::from_secs(10), || {
        let subs: u64 = nodes
            .iter()
            .map(|n| n.health()["subscriptions"].as_u64().unwrap_or(0))
            .sum();
        subs >= CLIENTS as u64
    }));

    let publisher = {
        let redis_port = redis.port;
        let pfx = pfx.clone();
        std::thread::spawn(move || {
            let redis = Redis::connect_existing(redis_port);
            let started = Instant::now();
            for i in 1..=total {
                let due = started + Duration::from_micros(i * 1_000_000 / RATE);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (offset, _) = fcall(&redis, &pfx, "ticker", json!({"i": i}));
                assert_eq!(offset, i);
            }
        })
    };
    // Restart A, then B, while publishing: SIGTERM (clients get 1012 and
    // move to the other node), then start it again on the same port.
    for (i, at) in [(0usize, 3u64), (1, 8)] {
        tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(at.min(5)))
            .await;
        nodes[i].signal("TERM");
        assert!(
            nodes[i].wait_exit(Duration::from_secs(10)).is_some(),
            "node exits after its drain"
        );
        nodes[i] = start(i);
    }
    publisher.join().unwrap();
    for f in followers {
        f.await.unwrap();
    }
    let problems = problems.lock().unwrap();
    assert!(
        problems.is_empty(),
        "{} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    for (i, log) in logs.iter().enumerate() {
        let log = log.lock().unwrap();
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for o in log.iter() {
            *counts.entry(*o).or_default() += 1;
        }
        let missing = (1..=total).filter(|o| !counts.contains_key(o)).count();
        let duplicated = counts.values().filter(|n| **n > 1).count();
        assert_eq!(
            (missing, duplicated),
            (0, 0),
            "client {i}: {missing} lost, {duplicated} duplicated"
        );
    }
    println!("{CLIENTS} clients × {total} publications across two restarts: 0 lost, 0 duplicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_lost_by_pubsub_are_repaired_from_history_without_resubscribing() {
    let redis = Redis::start();
    let pfx = prefix("repair");
    let a = redis_node("a", &redis, &pfx, &[]);
    let b = redis_node("b", &redis, &pfx, &[]);
    let mut clients = Vec::new();
    for node in [&a, &b, &a, &b] {
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        let sub = subscribe_since(&mut c, "feed", None).await;
        assert_eq!(sub["offset"], 0);
        clients.push(c);
    }
    const TOTAL: u64 = 600;
    let publisher = {
        let redis_port = redis.port;
        let pfx = pfx.clone();
        std::thread::spawn(move || {
            let redis = Redis::connect_existing(redis_port);
            for i in 1..=TOTAL {
                fcall(&redis, &pfx, "feed", json!({"i": i}));
                if i % 150 == 0 {
                    // Drop every node's subscriber connection mid-stream.
                    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let every: Vec<u64> = (1..=TOTAL).collect();
    for c in clients.iter_mut() {
        // No gap, no other frame: every offset once, in order.
        assert_eq!(offsets(c, every.len()).await, every);
    }
    publisher.join().unwrap();
    let repairs: f64 = [&a, &b]
        .iter()
        .map(|n| metric(n, "switchboard_history_repairs_total"))
        .sum();
    assert!(repairs >= 1.0, "the nodes counted their repairs");
    assert_eq!(metric(&a, "switchboard_history_gaps_total"), 0.0);
}

fn metric(node: &Node, name: &str) -> f64 {
    let (_, text) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn official_socketio_clients_recover_with_offsets() {
    let redis = Redis::start();
    let pfx = prefix("sio-recover");
    let a = redis_node("a", &redis, &pfx, &[]);
    let b = redis_node("b", &redis, &pfx, &[]);
    let port = redis.port.to_string();
    let here = format!("http://{}", a.addr);
    let there = format!("http://{}", b.addr);
    common::run_interop(
        &common::python(),
        &[
            &common::interop_script("sio_recover.py"),
            &here,
            &there,
            &port,
            &pfx,
        ],
    );
    common::run_interop(
        std::path::Path::new("node"),
        &[
            &common::interop_script("sio_recover.mjs"),
            &here,
            &there,
            &port,
            &pfx,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_lost_by_a_lagging_receiver_are_repaired_too() {
    let redis = Redis::start();
    let pfx = prefix("lag");
    // A tiny buffer between the Redis client and the hub: a burst overflows it.
    let a = redis_node(
        "a",
        &redis,
        &pfx,
        &[("REDIS_PUBSUB_BUFFER", "16"), ("HISTORY_SIZE", "5000")],
    );
    let mut c = Client::connect(&a.ws_url("/ws")).await;
    let sub = subscribe_since(&mut c, "burst", None).await;
    assert_eq!(sub["offset"], 0);
    const TOTAL: u64 = 3000;
    // Every FCALL written at once on one connection, replies read after.
    let started = Instant::now();
    let port = redis.port;
    let p = pfx.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut out = String::new();
        for i in 1..=TOTAL {
            let env =
                json!({"event": "burst", "data": {"i": i, "pad": "x".repeat(200)}}).to_string();
            let args = ["FCALL", "switchboard_publish", "1", "burst", &env, &p];
            out.push_str(&format!("*{}\r\n", args.len()));
            for a in args {
                out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
        }
        s.write_all(out.as_bytes()).unwrap();
        // Each reply is `*2`, `:offset`, `$len`, `epoch`.
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        for _ in 0..TOTAL * 4 {
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(!line.starts_with('-'), "{line}");
        }
    })
    .await
    .unwrap();
    // No gap, no other frame: every offset once, in order.
    let every: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(offsets(&mut c, every.len()).await, every);
    let burst = started.elapsed();
    let lagged = metric(&a, "switchboard_backplane_lagged_messages_total");
    let repaired = metric(&a, "switchboard_history_repaired_publications_total");
    println!(
        "lagging receiver: {lagged} publications lost in transit, {repaired} repaired from history \
         in a burst of {burst:?}"
    );
    assert!(lagged > 0.0, "the burst overflowed the buffer");
    // The backplane's self-probe (one a second) shares the connection: one
    // lost with the burst is counted as lagged and needs no repair. A slow
    // machine spreads the burst over several seconds, and as many probes
    // (one more at each end of it).
    let probes = burst.as_secs_f64().ceil() + 2.0;
    assert!(
        repaired + probes >= lagged,
        "everything lost was repaired: {lagged} lost, {repaired} repaired, \
         at most {probes} probes in {burst:?}"
    );
    assert_eq!(metric(&a, "switchboard_history_gaps_total"), 0.0);
}
