//! Presence with real nodes and their own `redis-server`: who is on a
//! topic from either node (native, REST, the official socket.io-client),
//! a node killed with -9, a storm of joins and leaves watched by 20
//! clients, the Redis memory per member, and the once-per-user webhooks.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use common::{Client, Node, Redis};
use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

const JWT_SECRET: &str = "a-test-secret-of-some-length";
const TTL_MS: u64 = 5000;

fn token(sub: &str, info: Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::default(),
        &json!({"sub": sub, "exp": exp, "info": info}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn start(name: &str, redis: &Redis, prefix: &str, extra: &[(&str, String)]) -> Node {
    let interval = extra
        .iter()
        .find(|(k, _)| *k == "PRESENCE_DIFF_INTERVAL_MS")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "200".into());
    let mut env: Vec<(&str, String)> = vec![
        ("PRESENCE_TOPICS", "room.*".into()),
        ("PRESENCE_DIFF_INTERVAL_MS", interval),
        ("AUTH_JWT_SECRET", JWT_SECRET.into()),
        ("LEADER_LEASE_MS", "2000".into()),
        ("WEBSOCKET_RATE_LIMIT", "0".into()),
    ];
    env.extend(
        extra
            .iter()
            .filter(|(k, _)| *k != "PRESENCE_DIFF_INTERVAL_MS")
            .cloned(),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Node::start_on_redis(name, &redis.url(), prefix, &env, Duration::from_secs(15))
}

/// `GET path` off the runtime's threads.
async fn get(node: &Node, path: &str) -> (u16, Value) {
    let (addr, path) = (node.addr.clone(), path.to_string());
    tokio::task::spawn_blocking(move || common::http(&addr, "GET", &path, None, &[]))
        .await
        .unwrap()
}

async fn rest_stats(node: &Node, topic: &str, tok: &str) -> (u64, u64) {
    let (status, v) = get(node, &format!("/api/presence/{topic}/stats?token={tok}")).await;
    assert_eq!(status, 200, "{v}");
    (
        v["data"]["clients"].as_u64().unwrap(),
        v["data"]["users"].as_u64().unwrap(),
    )
}

async fn until(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads frames until one of type `ty`; other frames are skipped.
async fn frame(c: &mut Client, ty: &str) -> Value {
    loop {
        let m = c.recv().await;
        if m["type"] == ty {
            return m;
        }
    }
}

async fn connect(node: &Node, tok: &str) -> Client {
    Client::connect(&node.ws_url(&format!("/ws?token={tok}"))).await
}

/// Checks a `clients` object against the expected client id → user map.
fn check_clients(clients: &Value, expected: &HashMap<String, String>) {
    let map = clients.as_object().expect("clients is an object");
    assert_eq!(map.len(), expected.len(), "{clients}");
    for (id, user) in expected {
        let entry = &map[id];
        assert_eq!(entry["user"], *user, "{entry}");
        assert_eq!(entry["info"]["name"], format!("N{user}"), "{entry}");
    }
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_tabs_of_ten_users_seen_from_both_nodes_and_a_killed_node_leaves() {
    let redis = Redis::start();
    let prefix = common::prefix("presence-a");
    let ttl = [("PRESENCE_TTL_MS", TTL_MS.to_string())];
    let a = start("pa", &redis, &prefix, &ttl);
    let mut b = start("pb", &redis, &prefix, &ttl);
    let topic = "room.1";

    // 30 connections: users u0..u9, three tabs each, over both nodes.
    let mut clients = Vec::new();
    let mut expected = HashMap::new();
    for i in 0..30 {
        let user = format!("u{}", i % 10);
        let tok = token(&user, json!({"name": format!("N{user}")}));
        let mut c = connect(if i % 2 == 0 { &a } else { &b }, &tok).await;
        c.subscribe(topic).await;
        expected.insert(c.client_id.clone(), user);
        clients.push((i, c));
    }
    let reader = token("reader", json!({"name": "Nreader"}));
    assert!(
        until(Duration::from_secs(10), async || rest_stats(
            &a, topic, &reader
        )
        .await
            == (30, 10))
        .await
    );

    // Native, from a client of either node.
    for (i, c) in clients.iter_mut().take(2) {
        c.send(json!({"type": "presence", "event": topic})).await;
        let m = frame(c, "presence").await;
        assert_eq!(m["event"], topic, "client {i}");
        check_clients(&m["clients"], &expected);
        c.send(json!({"type": "presence_stats", "event": topic}))
            .await;
        let m = frame(c, "presence_stats").await;
        assert_eq!(
            (m["clients"].as_u64(), m["users"].as_u64()),
            (Some(30), Some(10))
        );
    }
    // REST, from both nodes.
    for n in [&a, &b] {
        assert_eq!(rest_stats(n, topic, &reader).await, (30, 10));
        let (status, v) = get(n, &format!("/api/presence/{topic}?token={reader}")).await;
        assert_eq!(status, 200, "{v}");
        check_clients(&v["data"]["clients"], &expected);
    }
    // Refusals: no token, a topic without presence.
    let (status, v) = get(&a, &format!("/api/presence/{topic}/stats")).await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = get(&a, &format!("/api/presence/chat.1/stats?token={reader}")).await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("PRESENCE_TOPICS"),
        "{v}"
    );

    // Socket.IO (the official client), from both nodes; then it watches.
    let script = common::interop_script("sio_presence.mjs");
    let sio = tokio::process::Command::new("node")
        .arg(&script)
        .arg(topic)
        .arg(&reader)
        .arg(format!("http://{}", a.addr))
        .arg(format!("http://{}", b.addr))
        .env("SWITCHBOARD_TOOLS", common::tools())
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let out = String::from_utf8_lossy(&sio.stdout).to_string();
    assert!(
        sio.status.success() && out.contains("OK"),
        "{out}\n{}",
        String::from_utf8_lossy(&sio.stderr)
    );
    let mut answers = 0;
    for line in out.lines() {
        let mut parts = line.splitn(3, ' ');
        let (_, event, ack) = (parts.next(), parts.next(), parts.next());
        let Some(ack) = ack.and_then(|a| serde_json::from_str::<Value>(a).ok()) else {
            continue;
        };
        match event {
            Some("presence") => check_clients(&ack["clients"], &expected),
            Some("presence_stats") => {
                assert_eq!(
                    (ack["clients"].as_u64(), ack["users"].as_u64()),
                    (Some(30), Some(10))
                )
            }
            _ => continue,
        }
        answers += 1;
    }
    assert_eq!(answers, 4, "{out}");
    // Its own join appeared in a `presence_diff` event.
    assert!(
        out.lines()
            .any(|l| l.starts_with("DIFF ") && l.contains("\"reader\"")),
        "{out}"
    );

    // A watcher on node a (a fourth tab of u0).
    let mut watcher = connect(&a, &token("u0", json!({"name": "Nu0"}))).await;
    watcher
        .send(json!({"type": "subscribe", "event": topic, "presence": true}))
        .await;
    frame(&mut watcher, "subscribed").await;
    // Its own join comes (the Socket.IO reader's leave may come first).
    loop {
        let d = frame(&mut watcher, "presence_diff").await;
        if d["joins"].get(&watcher.client_id).is_some() {
            break;
        }
        assert!(d["joins"].as_object().unwrap().is_empty(), "{d}");
    }
    assert!(
        until(Duration::from_secs(5), async || rest_stats(
            &a, topic, &reader
        )
        .await
            == (31, 10))
        .await
    );

    // kill -9 node b: its 15 connections (users u1, u3, …, u9 entirely).
    let on_b: HashSet<String> = clients
        .iter()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, c)| c.client_id.clone())
        .collect();
    b.kill9();
    let killed = Instant::now();
    let mut left = HashSet::new();
    let bound = Duration::from_millis(TTL_MS) + Duration::from_secs(3);
    while left.len() < on_b.len() && killed.elapsed() < bound + Duration::from_secs(5) {
        let Some(d) = watcher.recv_within(Duration::from_millis(500)).await else {
            continue;
        };
        if d["type"] == "presence_diff" {
            for (id, entry) in d["leaves"].as_object().unwrap() {
                if entry["user"] == "reader" {
                    continue; // the Socket.IO reader, gone a moment ago
                }
                assert!(on_b.contains(id), "{id} was not on b: {d}");
                assert!(left.insert(id.clone()), "{id} left twice");
            }
        }
    }
    let seen = killed.elapsed();
    assert_eq!(left, on_b, "the watcher saw {} of 15 leaves", left.len());
    assert!(
        seen <= bound,
        "leaves seen {seen:?} after the kill (bound {bound:?})"
    );
    assert_eq!(rest_stats(&a, topic, &reader).await, (16, 5));
    let (_, v) = get(&a, &format!("/api/presence/{topic}?token={reader}")).await;
    let listed = v["data"]["clients"].as_object().unwrap();
    assert_eq!(listed.len(), 16, "{v}");
    assert!(listed.keys().all(|id| !on_b.contains(id)), "{v}");
    eprintln!("kill -9: b's 15 leaves seen by a watcher on a after {seen:?}");
}

/// One watcher's view of a storm: every client id joined and left, and the
/// frames that carried them.
#[derive(Default)]
struct Seen {
    joins: HashMap<String, usize>,
    leaves: HashMap<String, usize>,
    join_frames: usize,
    leave_frames: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_2000_joins_and_leaves_reaches_20_watchers_in_few_frames() {
    const STORM: usize = 2000;
    const INTERVAL_MS: u64 = 250;
    let redis = Redis::start();
    let prefix = common::prefix("presence-s");
    // The default TTL (10 s): a node starved of CPU by the storm must not be
    // taken for dead. No history on the topic: the storm is about presence.
    let interval = [
        ("PRESENCE_DIFF_INTERVAL_MS", INTERVAL_MS.to_string()),
        ("HISTORY_TOPICS", String::new()),
    ];
    let a = start("sa", &redis, &prefix, &interval);
    let b = start("sb", &redis, &prefix, &interval);
    let topic = "room.storm";
    let reader = token("reader", json!(null));

    // 20 watchers, 10 per node; their own joins settle first.
    let mut watchers = Vec::new();
    for i in 0..20 {
        let mut w = connect(
            if i % 2 == 0 { &a } else { &b },
            &token(&format!("w{i}"), json!(null)),
        )
        .await;
        w.send(json!({"type": "subscribe", "event": topic, "presence": true}))
            .await;
        frame(&mut w, "subscribed").await;
        watchers.push(w);
    }
    assert!(
        until(Duration::from_secs(10), async || rest_stats(
            &a, topic, &reader
        )
        .await
        .0 == 20)
        .await
    );
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS)).await;
    for w in &mut watchers {
        while w.recv_within(Duration::from_millis(50)).await.is_some() {}
    }
    let keys_before = presence_keys(&redis, &prefix);
    let before = topic_memory(&redis, &prefix, topic);

    // The watchers count what they see.
    let seen: Vec<Arc<Mutex<Seen>>> = (0..20).map(|_| Arc::default()).collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::new();
    for (w, seen) in watchers.into_iter().zip(seen.iter().cloned()) {
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut ws = w.ws;
            loop {
                let msg = tokio::select! {
                    m = ws.next() => m,
                    _ = stop.cancelled() => return ws,
                };
                let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = msg else {
                    continue;
                };
                let d: Value = serde_json::from_str(&t).unwrap();
                if d["type"] != "presence_diff" {
                    continue;
                }
                let mut s = seen.lock().unwrap();
                let (joins, leaves) = (
                    d["joins"].as_object().unwrap(),
                    d["leaves"].as_object().unwrap(),
                );
                s.join_frames += usize::from(!joins.is_empty());
                s.leave_frames += usize::from(!leaves.is_empty());
                for id in joins.keys() {
                    *s.joins.entry(id.clone()).or_default() += 1;
                }
                for id in leaves.keys() {
                    *s.leaves.entry(id.clone()).or_default() += 1;
                }
            }
        }));
    }

    // The storm: 2,000 connections (distinct users), half per node, all at once.
    let tokens: Vec<String> = (0..STORM)
        .map(|i| token(&format!("s{i}"), json!(null)))
        .collect();
    let urls = [a.ws_url("/ws?token="), b.ws_url("/ws?token=")];
    let started = Instant::now();
    // In 20 waves of 100, one every 100 ms: 2,000 joins within 2 s.
    let joined = futures_util::future::join_all(tokens.iter().enumerate().map(|(i, t)| {
        let url = format!("{}{t}", urls[i % 2]);
        async move {
            tokio::time::sleep(Duration::from_millis((i / 100) as u64 * 100)).await;
            let mut c = Client::connect(&url).await;
            c.subscribe(topic).await;
            c
        }
    }))
    .await;
    let storm = started.elapsed();
    let ids: HashSet<String> = joined.iter().map(|c| c.client_id.clone()).collect();
    let all_seen = |s: &Seen, leaves: bool| {
        let m = if leaves { &s.leaves } else { &s.joins };
        ids.iter().all(|id| m.contains_key(id))
    };
    assert!(
        until(Duration::from_secs(20), async || seen
            .iter()
            .all(|s| all_seen(&s.lock().unwrap(), false)))
        .await,
        "not every watcher saw every join"
    );
    let joins_done = started.elapsed();
    assert_eq!(
        rest_stats(&b, topic, &reader).await,
        (STORM as u64 + 20, STORM as u64 + 20)
    );
    let during = topic_memory(&redis, &prefix, topic);
    let per_member = (during - before) as f64 / STORM as f64;
    let used = redis_used_memory(&redis);

    // presence_stats at 10,000 members: 8,000 more entries of a ghost node
    // written straight into its hash (the same keys the nodes write).
    let ghost = format!("{prefix}:presence:{{{topic}}}:ghost");
    let users = format!("{prefix}:presence-users:{{{topic}}}");
    let nodes = format!("{prefix}:presence-nodes:{{{topic}}}");
    for chunk in (0..8000).collect::<Vec<_>>().chunks(1000) {
        let mut args = vec!["HSET".to_string(), ghost.clone()];
        let mut uargs = vec!["HSET".to_string(), users.clone()];
        for i in chunk {
            args.push(format!("g{i:015}"));
            args.push(format!(r#"{{"user":"g{i}","info":null}}"#));
            uargs.push(format!("g{i}"));
            uargs.push("1".into());
        }
        redis.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
        redis.cmd(&uargs.iter().map(String::as_str).collect::<Vec<_>>());
    }
    redis.cmd(&["SADD", &nodes, "ghost"]);
    assert_eq!(rest_stats(&a, topic, &reader).await, (10_020, 10_020));
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let (c, _) = rest_stats(&a, topic, &reader).await;
        times.push(t.elapsed());
        assert_eq!(c, 10_020);
    }
    times.sort();
    let median = times[times.len() / 2];
    assert!(
        median < Duration::from_millis(10),
        "presence_stats took {median:?} at 10,000 members"
    );
    redis.cmd(&["SREM", &nodes, "ghost"]);
    redis.cmd(&["DEL", &ghost]);
    for i in 0..8000 {
        if i % 1000 == 0 {
            let mut args = vec!["HDEL".to_string(), users.clone()];
            args.extend((i..i + 1000).map(|j| format!("g{j}")));
            redis.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }

    // Everyone of the storm leaves at once.
    let leaving = Instant::now();
    drop(joined);
    assert!(
        until(Duration::from_secs(20), async || seen
            .iter()
            .all(|s| all_seen(&s.lock().unwrap(), true)))
        .await,
        "not every watcher saw every leave"
    );
    let leaves_done = leaving.elapsed();
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS)).await;
    stop.cancel();
    // The watchers stay connected (and present) until the end.
    let mut _watchers = Vec::new();
    for r in readers {
        _watchers.push(r.await.unwrap());
    }
    let bound = |d: Duration| {
        (d.as_millis() as u64)
            .div_ceil(INTERVAL_MS)
            .max(2000 / INTERVAL_MS) as usize
            + 2
    };
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().unwrap();
        for id in &ids {
            assert_eq!(s.joins.get(id), Some(&1), "watcher {i}: joins of {id}");
            assert_eq!(s.leaves.get(id), Some(&1), "watcher {i}: leaves of {id}");
        }
        assert!(
            s.join_frames <= bound(storm),
            "watcher {i}: {} frames of joins for a storm of {storm:?}",
            s.join_frames
        );
        assert!(
            s.leave_frames <= bound(Duration::from_secs(2)),
            "watcher {i}: {} frames of leaves",
            s.leave_frames
        );
    }
    let max_frames = seen
        .iter()
        .map(|s| s.lock().unwrap().join_frames)
        .max()
        .unwrap();
    let max_leave_frames = seen
        .iter()
        .map(|s| s.lock().unwrap().leave_frames)
        .max()
        .unwrap();

    // Redis is back where it was: the watchers' entries only.
    assert!(
        until(Duration::from_secs(5), async || rest_stats(
            &a, topic, &reader
        )
        .await
            == (20, 20))
        .await,
        "{:?} {:?}",
        rest_stats(&a, topic, &reader).await,
        presence_keys(&redis, &prefix)
    );
    assert_eq!(presence_keys(&redis, &prefix), keys_before);
    let after = topic_memory(&redis, &prefix, topic);
    eprintln!(
        "storm: {STORM} joins in {storm:?} (all seen after {joins_done:?}, at most {max_frames} frames per watcher), \
         leaves all seen after {leaves_done:?} (at most {max_leave_frames} frames); \
         presence_stats median {median:?} at 10,020 members; \
         topic keys {before} B before, {during} B with {STORM} more members ({per_member:.0} B per member), {after} B after; \
         used_memory with the storm {used} B"
    );
    assert!(per_member <= 200.0, "{per_member:.0} bytes per member");
    assert!(
        after <= before + before / 10,
        "the topic's keys did not shrink back: {after} B after, {before} B before"
    );
}

/// Every presence key under `prefix`, sorted.
fn presence_keys(redis: &Redis, prefix: &str) -> Vec<String> {
    let mut keys = redis
        .call(&["KEYS", &format!("{prefix}:presence*")])
        .expect("KEYS");
    keys.sort();
    keys
}

/// Bytes Redis uses for `topic`'s presence keys (`MEMORY USAGE … SAMPLES 0`: exact).
fn topic_memory(redis: &Redis, prefix: &str, topic: &str) -> u64 {
    presence_keys(redis, prefix)
        .iter()
        .filter(|k| k.contains(&format!("{{{topic}}}")))
        .map(|k| {
            redis
                .cmd(&["MEMORY", "USAGE", k, "SAMPLES", "0"])
                .trim_start_matches(':')
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

fn redis_used_memory(redis: &Redis) -> u64 {
    redis
        .cmd(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// === webhooks ===

#[derive(Default)]
struct Received(Mutex<Vec<Value>>);

async fn receive(State(state): State<Arc<Received>>, body: Bytes) -> StatusCode {
    let v: Value = serde_json::from_slice(&body).unwrap();
    state
        .0
        .lock()
        .unwrap()
        .extend(v["events"].as_array().unwrap().iter().cloned());
    StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_tabs_of_one_user_give_one_member_added_and_one_member_removed() {
    let received = Arc::new(Received::default());
    let app = axum::Router::new()
        .route("/hooks", axum::routing::post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let redis = Redis::start();
    let prefix = common::prefix("presence-w");
    let hooks = [
        ("WEBHOOK_URL", format!("http://{addr}/hooks")),
        ("WEBHOOK_SECRET", "webhook-secret".to_string()),
        ("WEBHOOK_BATCH_MS", "50".to_string()),
    ];
    let a = start("wa", &redis, &prefix, &hooks);
    let b = start("wb", &redis, &prefix, &hooks);
    let members = |ty: &str| -> Vec<Value> {
        received
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == ty)
            .cloned()
            .collect()
    };

    // Three tabs of w1 over both nodes, one at a time.
    let tok = token("w1", json!({"name": "Ann"}));
    let mut tabs = Vec::new();
    for n in [&a, &b, &a] {
        let mut c = connect(n, &tok).await;
        c.subscribe("room.w").await;
        tabs.push(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        until(Duration::from_secs(5), async || !members("member_added")
            .is_empty())
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        members("member_added"),
        [json!({"type": "member_added", "topic": "room.w", "user": "w1", "info": {"name": "Ann"}})]
    );
    assert!(members("member_removed").is_empty());

    // Closing two keeps the user; the last one removes it.
    tabs.pop();
    tabs.pop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(members("member_removed").is_empty());
    drop(tabs);
    assert!(
        until(Duration::from_secs(5), async || !members("member_removed")
            .is_empty())
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        members("member_removed"),
        [
            json!({"type": "member_removed", "topic": "room.w", "user": "w1", "info": {"name": "Ann"}})
        ]
    );
    assert_eq!(members("member_added").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_node_keeps_presence_in_memory() {
    let node = Node::start(
        "pm",
        &[
            ("PRESENCE_TOPICS", "room.*"),
            ("PRESENCE_DIFF_INTERVAL_MS", "100"),
        ],
    );
    let mut w = Client::connect(&node.ws_url("/ws")).await;
    w.send(json!({"type": "subscribe", "event": "room.m", "presence": true}))
        .await;
    frame(&mut w, "subscribed").await;
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    c.subscribe("room.m").await;
    let d = loop {
        let d = frame(&mut w, "presence_diff").await;
        if d["joins"].get(&c.client_id).is_some() {
            break d;
        }
    };
    assert_eq!(d["joins"][&c.client_id], json!({"user": "", "info": null}));
    w.send(json!({"type": "presence_stats", "event": "room.m"}))
        .await;
    let s = frame(&mut w, "presence_stats").await;
    assert_eq!(
        (s["clients"].as_u64(), s["users"].as_u64()),
        (Some(2), Some(0))
    );
    drop(c);
    let d = frame(&mut w, "presence_diff").await;
    assert_eq!(d["leaves"].as_object().unwrap().len(), 1, "{d}");
    // The back end subscribes the watcher to the topic again (control
    // API): its diffs go on.
    let body = json!({"client": w.client_id, "topic": "room.m"}).to_string();
    let (status, v) = node.post("/api/subscribe", &body);
    assert_eq!(v["data"]["reached"], 1, "{status} {v}");
    frame(&mut w, "subscribed").await;
    let mut again = Client::connect(&node.ws_url("/ws")).await;
    again.subscribe("room.m").await;
    let d = frame(&mut w, "presence_diff").await;
    assert!(d["joins"].get(&again.client_id).is_some(), "{d}");
    // Its own subscribe again without `presence`: no more diffs.
    w.send(json!({"type": "subscribe", "event": "room.m"}))
        .await;
    frame(&mut w, "subscribed").await;
    drop(again);
    assert!(
        tokio::time::timeout(Duration::from_millis(600), frame(&mut w, "presence_diff"))
            .await
            .is_err(),
        "a diff after the subscribe without presence"
    );
    // A topic without presence is refused with its reason.
    w.send(json!({"type": "presence", "event": "news"})).await;
    let e = frame(&mut w, "error").await;
    assert_eq!(e["code"], "no_presence", "{e}");
}

/// A node whose presence listener lost its Redis connection cannot know
/// which changes it missed meanwhile: its watchers get the whole list again
/// (`reset`), and changes made during the outage are not lost to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_lost_subscription_watchers_get_the_whole_list() {
    let redis = Redis::start();
    let a = start("a", &redis, "pgap", &[]);
    let b = start("b", &redis, "pgap", &[]);
    let mut w = connect(&a, &token("uw", json!({"name": "Nuw"}))).await;
    w.send(json!({"type": "subscribe", "event": "room.gap", "presence": true}))
        .await;
    frame(&mut w, "subscribed").await;
    let mut m = connect(&b, &token("um", json!({"name": "Num"}))).await;
    m.subscribe("room.gap").await;
    loop {
        let d = frame(&mut w, "presence_diff").await;
        assert!(d.get("reset").is_none(), "{d}");
        if d["joins"].get(&m.client_id).is_some() {
            break;
        }
    }
    // Every subscriber connection drops (the presence listeners' too), and
    // a client joins on b meanwhile.
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let mut late = connect(&b, &token("ul", json!({"name": "Nul"}))).await;
    late.subscribe("room.gap").await;
    let mut seen_late = false;
    let reset = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let d = frame(&mut w, "presence_diff").await;
            if d["reset"] == true {
                break d;
            }
            seen_late |= d["joins"].get(&late.client_id).is_some();
        }
    })
    .await
    .expect("no presence_diff with reset after the subscription was lost");
    let mut expected = HashMap::new();
    for (c, u) in [(&w, "uw"), (&m, "um")] {
        expected.insert(c.client_id.clone(), u.to_string());
    }
    let joins = reset["joins"].as_object().unwrap();
    if joins.contains_key(&late.client_id) {
        seen_late = true;
        expected.insert(late.client_id.clone(), "ul".into());
    }
    check_clients(&reset["joins"], &expected);
    assert_eq!(reset["leaves"], json!({}), "{reset}");
    // The late join is in the reset, or in a diff of its own.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen_late {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = tokio::time::timeout(left, frame(&mut w, "presence_diff"))
            .await
            .expect("the join made while the subscription was down never reached the watcher");
        seen_late = d["joins"].get(&late.client_id).is_some();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_a_topics_presence_lives_in_its_slot() {
    let cluster = common::RedisCluster::start(3, 0);
    let prefix = common::prefix("presence-c");
    let env = [
        ("REDIS_URL", cluster.url()),
        ("REDIS_PREFIX", prefix.clone()),
        ("PRESENCE_TOPICS", "room.*".to_string()),
        ("PRESENCE_DIFF_INTERVAL_MS", "100".to_string()),
        ("AUTH_JWT_SECRET", JWT_SECRET.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Node::start("ca", &env);
    let b = Node::start("cb", &env);
    let reader = token("reader", json!(null));
    for n in [&a, &b] {
        assert!(
            until(Duration::from_secs(20), async || get(n, "/readyz").await.0
                == 200)
            .await,
            "{} not ready",
            n.name
        );
    }
    // Two topics in (most likely) different slots, tabs on both nodes.
    let mut tabs = Vec::new();
    for (i, topic) in ["room.c1", "room.c2"].iter().enumerate() {
        for (j, n) in [&a, &b, &a].iter().enumerate() {
            let user = format!("u{j}");
            let mut c = connect(n, &token(&user, json!({"name": format!("N{user}")}))).await;
            c.subscribe(topic).await;
            tabs.push((i, c));
        }
    }
    for topic in ["room.c1", "room.c2"] {
        for n in [&a, &b] {
            assert!(
                until(Duration::from_secs(10), async || rest_stats(
                    n, topic, &reader
                )
                .await
                    == (3, 3))
                .await,
                "{topic} on {}",
                n.name
            );
            let (_, v) = get(n, &format!("/api/presence/{topic}?token={reader}")).await;
            assert_eq!(v["data"]["clients"].as_object().unwrap().len(), 3, "{v}");
        }
        // Every key of the topic sits on the shard that owns the topic.
        let owner = cluster.owner(topic).expect("owner");
        let keys = owner
            .call(&["KEYS", &format!("{prefix}:presence*{{{topic}}}*")])
            .unwrap();
        assert!(keys.len() >= 3, "{keys:?}");
    }
    tabs.retain(|(i, _)| *i == 1);
    assert!(
        until(Duration::from_secs(10), async || rest_stats(
            &b, "room.c1", &reader
        )
        .await
            == (0, 0))
        .await
    );
    assert_eq!(rest_stats(&a, "room.c2", &reader).await, (3, 3));
}

/// A leave that a node wrote to Redis and never sent (killed before its
/// next tick) does not stay a ghost in other nodes' watchers: once the
/// reaper removed what the node left, every node reads its topics again
/// and its watchers get the whole list (`reset`), without that client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leave_a_killed_node_never_sent_does_not_stay_a_ghost() {
    let redis = Redis::start();
    let prefix = common::prefix("presence-ghost");
    let ttl = ("PRESENCE_TTL_MS", "2000".to_string());
    let a = start("pg-a", &redis, &prefix, std::slice::from_ref(&ttl));
    // b sends its changes once a minute: what it writes before the kill is
    // never sent.
    let mut b = start(
        "pg-b",
        &redis,
        &prefix,
        &[ttl.clone(), ("PRESENCE_DIFF_INTERVAL_MS", "60000".into())],
    );
    let topic = "room.ghost";
    let mut ghost = connect(&b, &token("gus", json!(null))).await;
    ghost.subscribe(topic).await;
    let reader = token("reader", json!(null));
    assert!(
        until(Duration::from_secs(10), async || rest_stats(
            &a, topic, &reader
        )
        .await
        .0 == 1)
        .await
    );
    let mut watcher = connect(&a, &token("wanda", json!(null))).await;
    watcher
        .send(json!({"type": "subscribe", "event": topic, "presence": true}))
        .await;
    frame(&mut watcher, "subscribed").await;
    // Gus leaves: written on b, not sent. Then b dies.
    ghost
        .send(json!({"type": "unsubscribe", "event": topic}))
        .await;
    frame(&mut ghost, "unsubscribed").await;
    b.kill9();
    let deadline = Instant::now() + Duration::from_secs(15);
    let reset = loop {
        assert!(Instant::now() < deadline, "no reset after b was reaped");
        let Some(d) = watcher.recv_within(Duration::from_millis(500)).await else {
            continue;
        };
        if d["type"] == "presence_diff" && d["reset"] == true {
            break d;
        }
    };
    let listed = reset["joins"].as_object().unwrap();
    assert!(
        !listed.contains_key(&ghost.client_id),
        "gus is a ghost: {reset}"
    );
    assert!(listed.contains_key(&watcher.client_id), "{reset}");
}
