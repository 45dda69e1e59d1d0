//! Hostile clients against real nodes and a private `redis-server`
//! (issue 26): reads write nothing durable (a subscription to a topic that
//! was never published creates no key, yet the first publication reaches
//! its subscribers with offset 1 and a `since` taken before it recovers
//! it), churn of random topics leaves Redis and the nodes where they were,
//! and the per-address connection limit refuses before the upgrade.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Client, Node, Redis, eventually, http, prefix};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn redis_node(name: &str, redis: &Redis, pfx: &str, extra: &[(&str, &str)]) -> Node {
    Node::start_on_redis(name, &redis.url(), pfx, extra, Duration::from_secs(15))
}

fn dbsize(redis: &Redis) -> i64 {
    let reply = redis.cmd(&["DBSIZE"]);
    reply.trim().trim_start_matches(':').parse().unwrap()
}

/// `INFO memory` `used_memory`, in bytes.
fn used_memory(redis: &Redis) -> i64 {
    let info = redis.cmd(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no used_memory in {info}"))
}

/// A process's resident set, in bytes.
fn rss(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

async fn subscribe_since(c: &mut Client, topic: &str, since: Option<(u64, &str)>) -> Value {
    let mut msg = json!({"type": "subscribe", "event": topic});
    if let Some((offset, epoch)) = since {
        msg["since"] = json!({"offset": offset, "epoch": epoch});
    }
    c.send(msg).await;
    c.expect("subscribed").await
}

/// The pending position, the first publication and a `since` from before
/// it, on one node and across nodes.
async fn first_publication_after_a_pending_subscription(
    subscribe_on: &Node,
    recover_on: &Node,
    publish: impl Fn(u64),
) {
    let topic = "quiet.news";
    let mut early = Client::connect(&subscribe_on.ws_url("/ws")).await;
    let subscribed = subscribe_since(&mut early, topic, None).await;
    assert_eq!(subscribed["offset"], 0, "{subscribed}");
    let pending = subscribed["epoch"].as_str().unwrap().to_string();
    assert!(pending.starts_with('~'), "a pending epoch: {subscribed}");
    // The first publication comes later (the logic for 5 minutes is in the
    // unit tests of `history`: times are compared, not waited for).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish(1);
    let event = early.expect("event").await;
    assert_eq!(
        event["offset"], 1,
        "the first publication, not a gap: {event}"
    );
    assert_eq!(event["data"]["n"], 1);
    // A client whose position is from before the first publication
    // reconnects (to another node): it recovers it.
    let mut back = Client::connect(&recover_on.ws_url("/ws")).await;
    let resumed = subscribe_since(&mut back, topic, Some((0, &pending))).await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
    assert_eq!(resumed["offset"], 1);
    let epoch = resumed["epoch"].as_str().unwrap();
    assert!(!epoch.starts_with('~'), "the real epoch now: {resumed}");
    let replayed = back.expect("event").await;
    assert_eq!(
        (replayed["offset"].as_u64(), &replayed["data"]["n"]),
        (Some(1), &json!(1))
    );
    // Live ones continue on both.
    publish(2);
    assert_eq!(early.expect("event").await["offset"], 2);
    assert_eq!(back.expect("event").await["offset"], 2);
    // A pending position from another time (before an epoch that already
    // existed) is not taken for this epoch.
    let mut stale = Client::connect(&recover_on.ws_url("/ws")).await;
    let refused = subscribe_since(&mut stale, topic, Some((0, "~1"))).await;
    assert_eq!(refused["recovered"], false, "{refused}");
}

#[tokio::test]
async fn reads_of_a_topic_never_published_create_no_key_and_the_first_publication_is_offset_1() {
    let redis = Redis::start();
    let pfx = prefix("pending");
    let a = redis_node("a", &redis, &pfx, &[]);
    let b = redis_node("b", &redis, &pfx, &[]);
    // Let the nodes' own keys settle (registry, lease, device state).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keys = dbsize(&redis);

    // Reads of never-published topics: subscribe, request, GET /api/history.
    let mut c = Client::connect(&a.ws_url("/ws")).await;
    for i in 0..20 {
        subscribe_since(&mut c, &format!("nobody.{i}"), None).await;
        c.send(json!({"type": "request", "event": format!("nobody.{i}")}))
            .await;
        let answer = c.expect("error").await;
        assert_eq!(answer["code"], "no_data", "{answer}");
        let (status, body) = b.get(&format!("/api/history/nobody.{i}"));
        assert_eq!(status, 200, "{body}");
        assert!(
            body["data"]["epoch"].as_str().unwrap().starts_with('~'),
            "{body}"
        );
    }
    let meta = format!("{pfx}:history-meta:{{nobody.1}}");
    assert_eq!(redis.cmd(&["EXISTS", &meta]).trim(), ":0");
    assert_eq!(dbsize(&redis), keys, "reads created keys");

    let publish = |n: u64| {
        let envelope = json!({"event": "quiet.news", "data": {"n": n}}).to_string();
        redis
            .call(&[
                "FCALL",
                "switchboard_publish",
                "1",
                "quiet.news",
                &envelope,
                &pfx,
            ])
            .unwrap_or_else(|e| panic!("FCALL failed: {e}"));
    };
    first_publication_after_a_pending_subscription(&a, &b, publish).await;
}

#[tokio::test]
async fn the_embedded_node_hands_out_pending_positions_too() {
    let node = Node::start("solo", &[]);
    let publish = |n: u64| {
        let (status, body) = node.post(
            "/api/publish",
            &json!({"topic": "quiet.news", "data": {"n": n}}).to_string(),
        );
        assert_eq!(status, 202, "{body}");
    };
    first_publication_after_a_pending_subscription(&node, &node, publish).await;
}

/// 200 anonymous clients, each subscribing to and unsubscribing from a new
/// topic 50 times a second, against 2 nodes on one Redis. The nodes are
/// configured so that this is allowed (`WEBSOCKET_RATE_LIMIT` 1000,
/// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT` 200: the defaults, 100 messages and 10
/// subscribes a second, would refuse most of it): what is measured is what
/// the churn leaves behind, not the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_churn_leaves_redis_and_the_nodes_where_they_were() {
    const CLIENTS: usize = 200;
    const PER_SECOND: u64 = 50;
    const SECONDS: u64 = 20;
    let redis = Redis::start();
    let pfx = prefix("churn");
    let env = [
        ("WEBSOCKET_RATE_LIMIT", "1000"),
        ("WEBSOCKET_SUBSCRIBE_RATE_LIMIT", "200"),
        ("WEBSOCKET_SUBSCRIBE_RATE_BURST", "200"),
    ];
    let nodes = [
        redis_node("a", &redis, &pfx, &env),
        redis_node("b", &redis, &pfx, &env),
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keys_before = dbsize(&redis);
    let memory_before = used_memory(&redis);
    let rss_before: Vec<i64> = nodes.iter().map(|n| rss(n.pid())).collect();

    let acks = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(AtomicU64::new(0));
    let mut sinks = Vec::new();
    let mut readers = Vec::new();
    for i in 0..CLIENTS {
        let c = Client::connect(&nodes[i % 2].ws_url("/ws")).await;
        let (sink, mut stream) = c.ws.split();
        let acks = acks.clone();
        let refusals = refusals.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(t) = msg {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("subscribed") => acks.fetch_add(1, Ordering::Relaxed),
                        Some("error") => refusals.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            }
        }));
        sinks.push(sink);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(SECONDS);
    let writers: Vec<_> = sinks
        .into_iter()
        .enumerate()
        .map(|(i, sink)| tokio::spawn(churn(i, sink, deadline, PER_SECOND)))
        .collect();
    let (mut keys_max, mut memory_max) = (keys_before, memory_before);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        keys_max = keys_max.max(dbsize(&redis));
        memory_max = memory_max.max(used_memory(&redis));
    }
    let mut sent = 0;
    for writer in writers {
        sent += writer.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after: Vec<i64> = nodes.iter().map(|n| rss(n.pid())).collect();
    for reader in readers {
        reader.abort();
    }
    let acked = acks.load(Ordering::Relaxed);
    eprintln!(
        "churn: {CLIENTS} clients, {sent} subscribes sent and {acked} answered in {elapsed:.1} s \
         ({:.0}/s, target {}/s), {} refused; Redis keys {keys_before} → max {keys_max}, \
         used_memory {memory_before} → max {memory_max} (+{} bytes); RSS {:?} → {:?}",
        acked as f64 / elapsed,
        CLIENTS as u64 * PER_SECOND,
        refusals.load(Ordering::Relaxed),
        memory_max - memory_before,
        rss_before,
        rss_after,
    );
    assert!(
        acked as f64 >= 0.1 * (CLIENTS as u64 * PER_SECOND * SECONDS) as f64,
        "the churn did not happen: {acked} subscriptions"
    );
    assert!(
        keys_max - keys_before <= 100,
        "keys grew from {keys_before} to {keys_max}"
    );
    assert!(
        memory_max - memory_before <= 5 << 20,
        "Redis grew by {} bytes",
        memory_max - memory_before
    );
    assert!(
        eventually(Duration::from_secs(60), || dbsize(&redis) - keys_before
            <= 100),
        "keys did not come back: {}",
        dbsize(&redis)
    );
    for (before, after) in rss_before.iter().zip(&rss_after) {
        assert!(
            after - before <= 50 << 20,
            "a node's RSS grew from {before} to {after}"
        );
    }
}

/// Many topics subscribed at once on one node (its backplane subscribes
/// them in batches) each hear their publication from the other node; once
/// their subscribers leave, Redis holds none of their channels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_topics_hears_every_publication_and_leaves_no_channel_behind() {
    const CLIENTS: usize = 10;
    const TOPICS: usize = 50;
    let redis = Redis::start();
    let pfx = prefix("burst");
    let a = redis_node("a", &redis, &pfx, &[]);
    let b = redis_node("b", &redis, &pfx, &[]);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::connect(&a.ws_url("/ws")).await);
    }
    // Every subscribe goes out before any answer is read: the node gets
    // CLIENTS × TOPICS new topics at once.
    for (i, c) in clients.iter_mut().enumerate() {
        for t in 0..TOPICS {
            c.send(json!({"type": "subscribe", "event": format!("burst.{i}.{t}")}))
                .await;
        }
    }
    for c in clients.iter_mut() {
        for _ in 0..TOPICS {
            c.expect("subscribed").await;
        }
    }
    let pattern = format!("{pfx}:t:burst.*");
    let channels = || -> usize {
        redis
            .call(&["PUBSUB", "CHANNELS", &pattern])
            .unwrap()
            .iter()
            .filter(|c| !c.is_empty())
            .count()
    };
    assert_eq!(channels(), CLIENTS * TOPICS);
    let stats = redis.cmd(&["INFO", "commandstats"]);
    let subscribes = stats.lines().find(|l| l.starts_with("cmdstat_subscribe:"));
    eprintln!(
        "{} new topics: {}",
        CLIENTS * TOPICS,
        subscribes.unwrap_or("no SUBSCRIBE")
    );
    for i in 0..CLIENTS {
        for t in 0..TOPICS {
            let body = json!({"topic": format!("burst.{i}.{t}"), "data": {"i": i, "t": t}});
            let (_, answer) = b.post("/api/publish", &body.to_string());
            assert_eq!(answer["success"], true, "{answer}");
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut heard = std::collections::HashSet::new();
        while heard.len() < TOPICS {
            let event = c.expect("event").await;
            // `topic` is left out where it equals `name`.
            let topic = event["topic"].as_str().or(event["name"].as_str());
            let topic = topic.unwrap().to_string();
            assert!(topic.starts_with(&format!("burst.{i}.")), "{event}");
            assert!(heard.insert(topic), "heard twice: {event}");
        }
    }
    drop(clients);
    assert!(
        eventually(Duration::from_secs(10), || channels() == 0),
        "channels left: {}",
        channels()
    );
}

type Sink = futures_util::stream::SplitSink<common::WsStream, Message>;

/// A hostile client's writer: a new topic subscribed and unsubscribed
/// `per_second` times a second until `deadline`, without waiting for
/// answers; returns how many subscribes it sent.
async fn churn(client: usize, mut sink: Sink, deadline: Instant, per_second: u64) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        let topic = format!("abuse.{client}.{n}.{:x}", rand::random::<u32>());
        let sub = json!({"type": "subscribe", "event": &topic}).to_string();
        let unsub = json!({"type": "unsubscribe", "event": &topic}).to_string();
        if sink.send(Message::Text(sub.into())).await.is_err()
            || sink.send(Message::Text(unsub.into())).await.is_err()
        {
            break;
        }
        n += 1;
    }
    let _ = sink.close().await;
    n
}

/// A WebSocket connection attempt that must be refused: status and JSON body.
async fn refused_upgrade(url: &str) -> (u16, Value) {
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("{url} was upgraded"),
        Err(Error::Http(res)) => {
            let body = res.body().clone().unwrap_or_default();
            (
                res.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        Err(e) => panic!("{url}: {e}"),
    }
}

#[tokio::test]
async fn the_101st_connection_from_one_address_is_refused_before_the_upgrade() {
    let node = Node::start(
        "limited",
        &[
            ("MAX_CONNECTIONS_PER_ADDRESS", "100"),
            ("TRUSTED_PROXIES", "127.0.0.1"),
        ],
    );
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(Client::connect(&node.ws_url("/ws")).await);
    }
    // The 101st: refused with 429 and the JSON error format, no upgrade.
    let (status, body) = refused_upgrade(&node.ws_url("/ws")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_requests", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("MAX_CONNECTIONS_PER_ADDRESS"),
        "{body}"
    );
    // Socket.IO shares the count: its handshake is refused the same way, on
    // either transport, before any upgrade.
    let (status, body) =
        refused_upgrade(&node.ws_url("/socket.io/?EIO=4&transport=websocket")).await;
    assert_eq!((status, &body["code"]), (429, &json!("too_many_requests")));
    let (status, body) = http(
        &node.addr,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        None,
        &[],
    );
    assert_eq!(status, 429, "{body}");

    // Another address is unaffected: a connection from 127.0.0.2 …
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(node.addr.parse().unwrap()).await.unwrap();
    let (mut other, _) = tokio_tungstenite::client_async(node.ws_url("/ws"), stream)
        .await
        .expect("another address is admitted");
    let hello = other.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("connected"));
    // … and a client behind the trusted proxy (127.0.0.1) named by
    // X-Forwarded-For.
    let mut req = node.ws_url("/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let (_proxied, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("a forwarded address is admitted");
    // A forwarded header from an untrusted peer is not believed.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let stream = socket.connect(node.addr.parse().unwrap()).await.unwrap();
    let mut req = node.ws_url("/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", "127.0.0.1".parse().unwrap());
    tokio_tungstenite::client_async(req, stream)
        .await
        .expect("127.0.0.3 is not at its limit, whatever it claims");

    // One closes: there is room again.
    let mut closing = open.pop().unwrap();
    closing.ws.close(None).await.unwrap();
    assert!(
        common::admitted_within(&node.ws_url("/ws"), Duration::from_secs(5)).await,
        "a seat is given back when its connection ends"
    );
    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    let refused: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("switchboard_limit_refusals_total{limit=\"connections_per_address\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refusal metric:\n{metrics}"));
    assert!(refused >= 2.0, "{refused}");
    assert!(node.log().contains("refused by a limit"), "a log line");
}

fn token(sub: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": sub, "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-test-secret-of-some-length"),
    )
    .unwrap()
}

#[tokio::test]
async fn users_subscribe_rates_and_topics_per_node_are_limited_with_clear_errors() {
    let node = Node::start(
        "limits",
        &[
            ("AUTH_JWT_SECRET", "a-test-secret-of-some-length"),
            ("AUTH_PUBLIC_TOPICS", "*"),
            ("MAX_CONNECTIONS_PER_USER", "2"),
            ("WEBSOCKET_SUBSCRIBE_RATE_LIMIT", "1"),
            ("WEBSOCKET_SUBSCRIBE_RATE_BURST", "4"),
            ("MAX_TOPICS_PER_NODE", "6"),
        ],
    );
    // Per user: the third connection of alice is refused before the upgrade;
    // bob and anonymous clients are not counted with her.
    let alice = node.ws_url(&format!("/ws?token={}", token("alice")));
    let _a1 = Client::connect(&alice).await;
    let _a2 = Client::connect(&alice).await;
    let (status, body) = refused_upgrade(&alice).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("MAX_CONNECTIONS_PER_USER"),
        "{body}"
    );
    let _b = Client::connect(&node.ws_url(&format!("/ws?token={}", token("bob")))).await;
    let anonymous = node.ws_url("/ws");
    let mut _anon = Vec::new();
    for _ in 0..3 {
        _anon.push(Client::connect(&anonymous).await);
    }
    // Socket.IO: the same user limit, as connect_error.
    let (mut sio, _) =
        tokio_tungstenite::connect_async(node.ws_url("/socket.io/?EIO=4&transport=websocket"))
            .await
            .unwrap();
    let _open = sio.next().await;
    let t = token("alice");
    sio.send(Message::Text(format!(r#"40{{"token":"{t}"}}"#).into()))
        .await
        .unwrap();
    let refused = loop {
        let Some(Ok(Message::Text(t))) = sio.next().await else {
            panic!("no CONNECT answer")
        };
        if t.starts_with("44") {
            break t.to_string();
        }
    };
    assert!(refused.contains("MAX_CONNECTIONS_PER_USER"), "{refused}");

    // Subscribe rate: a burst of 4, then 1 a second; unsubscribes always pass.
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    for i in 0..4 {
        c.subscribe(&format!("rate.{i}")).await;
    }
    c.send(json!({"type": "subscribe", "event": "rate.4"}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(e["code"], "subscribe_rate_limited", "{e}");
    assert_eq!(e["replyTo"], "subscribe");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("WEBSOCKET_SUBSCRIBE_RATE_LIMIT"),
        "{e}"
    );
    c.send(json!({"type": "unsubscribe", "event": "rate.0"}))
        .await;
    assert_eq!(c.expect("unsubscribed").await["event"], "rate.0");

    // Topics per node: 6 (rate.1–3 are still held, and the node's own
    // `device`); a new one past it is refused, one the node holds is not.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut d = Client::connect(&node.ws_url("/ws")).await;
    let mut new_topics = 0;
    let e = loop {
        assert!(new_topics < 6, "never refused");
        d.send(json!({"type": "subscribe", "event": format!("more.{new_topics}")}))
            .await;
        let m = d.recv().await;
        if m["type"] == "error" {
            break m;
        }
        new_topics += 1;
    };
    assert_eq!(new_topics, 2, "6 topics: device, rate.1–3, more.0–1");
    assert_eq!(e["code"], "topic_limit", "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("MAX_TOPICS_PER_NODE"),
        "{e}"
    );
    d.subscribe("rate.1").await;

    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    for limit in ["connections_per_user", "subscribe_rate", "topics_per_node"] {
        assert!(
            metrics.contains(&format!(
                "switchboard_limit_refusals_total{{limit=\"{limit}\"}}"
            )),
            "{limit}:\n{metrics}"
        );
    }
}

/// Presence entries (issue 26's audit): a client that joins and leaves
/// presence topics leaves no key behind in Redis once the leaves are
/// written (within seconds), and the topic's presence counts are back to 0.
#[tokio::test]
async fn presence_churn_leaves_redis_where_it_was() {
    let redis = Redis::start();
    let pfx = prefix("presence-churn");
    let a = redis_node("a", &redis, &pfx, &[("PRESENCE_TOPICS", "room.*")]);
    // Let the node's own keys settle (registry, lease, device, presence mark).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let keys = dbsize(&redis);
    let mut c = Client::connect(&a.ws_url("/ws")).await;
    let mut keys_max = keys;
    for i in 0..40 {
        let topic = format!("room.{i}");
        // Present without asking for diffs: its own diffs would arrive
        // between the answers.
        c.subscribe(&topic).await;
        if i % 10 == 9 {
            // The joins are written: the entries exist while subscribed.
            assert!(
                eventually(Duration::from_secs(5), || dbsize(&redis) > keys),
                "joins were never written"
            );
            keys_max = keys_max.max(dbsize(&redis));
        }
        c.send(json!({"type": "unsubscribe", "event": topic})).await;
        c.expect("unsubscribed").await;
    }
    assert!(
        keys_max > keys,
        "presence wrote nothing: {keys} → {keys_max}"
    );
    assert!(
        eventually(Duration::from_secs(10), || dbsize(&redis) == keys),
        "keys {keys} before, {} after the leaves",
        dbsize(&redis)
    );
    let (status, v) = a.get("/api/presence/room.3/stats");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["clients"], 0, "{v}");
}
