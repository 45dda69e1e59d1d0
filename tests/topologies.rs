//! The service on a Redis Cluster (3 primaries + 3 replicas, sharded
//! pub/sub) and on a Sentinel-watched primary with a replica: cross-node
//! delivery, one mock stream, leader failover, device state, `FCALL`
//! publishers, and a Redis failover under load where every publication is
//! either delivered exactly once or announced as a gap.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Node, Redis, RedisCluster, RedisSentinel, eventually, prefix};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn node(name: &str, url: &str, pfx: &str, extra: &[(&str, &str)]) -> Node {
    Node::start_on_redis(name, url, pfx, extra, Duration::from_secs(20))
}

/// `FCALL switchboard_publish` on `server` → (offset, epoch), or the error.
fn fcall(server: &Redis, pfx: &str, topic: &str, data: Value) -> Result<(u64, String), String> {
    let envelope = json!({"event": topic, "data": data}).to_string();
    let reply = server.call(&["FCALL", "switchboard_publish", "1", topic, &envelope, pfx])?;
    Ok((reply[0].parse().unwrap(), reply[1].clone()))
}

/// The scenarios every Redis topology must pass with two nodes.
async fn two_nodes_work_together(url: &str, publish_on: impl Fn(&str, Value) -> (u64, String)) {
    let pfx = prefix("topo");
    let mock = r#"[{"name":"tick","interval":200,"data":{"n":1}}]"#;
    let env = [("WEBSOCKET_MOCK_EVENTS", mock), ("LEADER_LEASE_MS", "2000")];
    let a = node("a", url, &pfx, &env);
    let b = node("b", url, &pfx, &env);

    // Cross-node delivery: a client on each node, publications through the
    // function (a cluster-aware publisher) and through either node's REST.
    let mut on_a = Client::connect(&a.ws_url("/ws")).await;
    let mut on_b = Client::connect(&b.ws_url("/ws")).await;
    for c in [&mut on_a, &mut on_b] {
        c.send(json!({"type": "subscribe", "event": "news"})).await;
        let m = c.expect("subscribed").await;
        assert_eq!(m["offset"], 0, "{m}");
    }
    let (offset, _) = publish_on("news", json!({"n": 1}));
    assert_eq!(offset, 1);
    let (status, body) = b.post(
        "/api/publish",
        &json!({"topic": "news", "data": {"n": 2}}).to_string(),
    );
    assert_eq!(status, 202, "{body}");
    let (status, _) = a.post(
        "/api/publish",
        &json!({"topic": "plain", "data": 0}).to_string(),
    );
    assert_eq!(status, 202);
    for c in [&mut on_a, &mut on_b] {
        for expected in 1..=2 {
            let m = c.expect("event").await;
            assert_eq!(
                (m["name"].as_str(), m["offset"].as_u64()),
                (Some("news"), Some(expected)),
                "{m}"
            );
        }
    }

    // One mock stream for the cluster: only the leader runs the timers.
    on_a.send(json!({"type": "subscribe", "event": "tick"}))
        .await;
    on_a.expect("subscribed").await;
    let started = Instant::now();
    let mut ticks = Vec::new();
    while started.elapsed() < Duration::from_secs(2) {
        if let Some(m) = on_a.recv_within(Duration::from_millis(500)).await
            && m["name"] == "tick"
        {
            ticks.push(m["offset"].as_u64().unwrap());
        }
    }
    assert!(
        (6..=14).contains(&ticks.len()),
        "one 200 ms stream, not two: {ticks:?}"
    );
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");

    // Device state survives the leader's death.
    let (status, _) = b.post("/api/switch", r#"{"app":"stars"}"#);
    assert_eq!(status, 200);
    let leader_is_a = a.health()["leader"] == true;
    let (mut dead, survivor) = if leader_is_a { (a, b) } else { (b, a) };
    dead.kill9();
    assert!(
        eventually(Duration::from_secs(10), || survivor.health()["leader"]
            == true),
        "the survivor took over"
    );
    let (_, state) = survivor.get("/api/state");
    assert_eq!(state["data"]["current_app"], "stars", "{state}");
    let (status, _) = survivor.post("/api/switch", r#"{"app":"clock"}"#);
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_two_nodes_share_topics_one_stream_one_leader() {
    let cluster = RedisCluster::start(3, 1);
    let url = cluster.url();
    let cluster = &cluster;
    two_nodes_work_together(&url, |topic, data| {
        // A cluster-aware publisher routes FCALL by its key, the topic.
        let owner = cluster.owner(topic).expect("owner");
        let pfx = prefix("topo");
        fcall(owner, &pfx, topic, data).expect("FCALL on the owner")
    })
    .await;
    let anywhere = format!("redis://127.0.0.1:{}", cluster.ports()[1]);
    channels_send_arrives(&url, &anywhere).await;
    // The topics' keys live on the shard that owns the topic.
    let pfx = prefix("topo");
    let owner = cluster.owner("news").unwrap();
    assert_eq!(
        owner.cmd(&["EXISTS", &format!("{pfx}:history-meta:{{news}}")]),
        ":1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_two_nodes_share_topics_one_stream_one_leader() {
    let sentinel = RedisSentinel::start();
    let url = sentinel.url();
    let primary = &sentinel.primary;
    two_nodes_work_together(&url, |topic, data| {
        fcall(primary, &prefix("topo"), topic, data).expect("FCALL on the primary")
    })
    .await;
    channels_send_arrives(&url, &primary.url()).await;
}

/// The leader's compat consumer (`PSUBSCRIBE` on a RESP3 connection of its
/// own, checked with `CLIENT INFO`) holds on this topology: a Django
/// Channels `group_send`, published by `channels_redis` at `publisher_url`,
/// reaches a native client.
async fn channels_send_arrives(url: &str, publisher_url: &str) {
    let pfx = prefix("topo-compat");
    let a = node("compat", url, &pfx, &[("LEADER_LEASE_MS", "2000")]);
    common::consuming(&[&a]);
    assert!(!a.log().contains("compat channels failed"), "{}", a.log());
    let m = common::group_send_arrives(&a, publisher_url, "asgi", "feature_9", 9).await;
    assert_eq!(m["name"], "status_update", "{m}");
    assert_eq!(m["data"], json!({"value": 9}), "{m}");
}

/// Follows `topic` on one connection: every `event` position and `gap`
/// range, each with the epoch it belongs to.
#[derive(Default)]
struct Seen {
    epoch: String,
    offsets: Vec<(String, u64)>,
    gaps: Vec<(String, u64, u64)>,
    closed: bool,
}

async fn watch(url: String, topic: &'static str, seen: Arc<Mutex<Seen>>, until: Instant) {
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let sub = json!({"type": "subscribe", "event": topic}).to_string();
    futures_util::SinkExt::send(&mut ws, Message::Text(sub.into()))
        .await
        .unwrap();
    while let Ok(Some(msg)) = tokio::time::timeout_at(until.into(), ws.next()).await {
        match msg {
            Ok(Message::Text(t)) => {
                let m: Value = serde_json::from_str(&t).unwrap();
                let mut seen = seen.lock().unwrap();
                match m["type"].as_str() {
                    Some("subscribed") => seen.epoch = m["epoch"].as_str().unwrap().to_string(),
                    Some("event") => {
                        if seen.epoch.starts_with('~') {
                            // Subscribed before the first publication (a
                            // pending epoch): the events are of the topic's
                            // first epoch, which the node names.
                            let addr = url.trim_start_matches("ws://").trim_end_matches("/ws");
                            let (_, body) = common::http(
                                addr,
                                "GET",
                                &format!("/api/history/{topic}"),
                                None,
                                &[],
                            );
                            if let Some(e) = body["data"]["epoch"].as_str() {
                                seen.epoch = e.to_string();
                            }
                        }
                        let at = (seen.epoch.clone(), m["offset"].as_u64().unwrap());
                        seen.offsets.push(at);
                    }
                    Some("gap") => {
                        let epoch = m["epoch"].as_str().unwrap().to_string();
                        seen.epoch = epoch.clone();
                        seen.gaps.push((
                            epoch,
                            m["from"].as_u64().unwrap(),
                            m["to"].as_u64().unwrap(),
                        ));
                    }
                    _ => {}
                }
            }
            Ok(Message::Close(_)) | Err(_) => {
                seen.lock().unwrap().closed = true;
                return;
            }
            _ => {}
        }
    }
}

type Position = (String, u64);

/// Four clients following `news` until `until`, two on each node, once
/// every one is subscribed.
fn watch_news(nodes: [&Node; 2], until: Instant) -> Vec<Arc<Mutex<Seen>>> {
    let clients: Vec<Arc<Mutex<Seen>>> = (0..4).map(|_| Arc::default()).collect();
    for (i, seen) in clients.iter().enumerate() {
        tokio::spawn(watch(
            nodes[i % 2].ws_url("/ws"),
            "news",
            seen.clone(),
            until,
        ));
    }
    assert!(eventually(Duration::from_secs(5), || nodes
        .iter()
        .all(|n| n.health()["subscriptions"] == 2)));
    clients
}

/// Publishes `total` times at 200/s through `publish` (which retries on its
/// own until the new primary answers); returns (epoch, offset) → publication
/// number of what was acknowledged.
fn publish_at_200(
    total: u64,
    mut publish: impl FnMut(u64) -> Option<Position>,
) -> BTreeMap<Position, u64> {
    let mut acked = BTreeMap::new();
    let started = Instant::now();
    for i in 1..=total {
        let due = started + Duration::from_millis(i * 5);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if let Some(at) = publish(i) {
            acked.insert(at, i);
        }
    }
    acked
}

/// Polls both nodes' `/readyz` every 50 ms until `stop`; returns whether
/// each was seen not ready at some point.
fn watch_readiness(
    addrs: Vec<String>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<bool>> {
    std::thread::spawn(move || {
        let mut seen = vec![false; addrs.len()];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (i, addr) in addrs.iter().enumerate() {
                let (status, _) = common::http(addr, "GET", "/readyz", None, &[]);
                seen[i] |= status == 503;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        seen
    })
}

/// After a failover or a reshard: both nodes ready again, every client at
/// the last acknowledged publication, each node seen not ready in between
/// (when `readiness` watched), then the accounting.
async fn settle_and_account(
    label: &str,
    nodes: [&Node; 2],
    acked: &BTreeMap<Position, u64>,
    clients: &[Arc<Mutex<Seen>>],
    readiness: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<Vec<bool>>,
    )>,
) {
    assert!(eventually(Duration::from_secs(20), || nodes
        .iter()
        .all(|n| n.health()["backplaneConnected"] == true)));
    let last = acked.keys().last().unwrap().clone();
    let caught_up = || {
        clients.iter().all(|s| {
            let s = s.lock().unwrap();
            s.offsets.contains(&last) || s.gaps.iter().any(|(e, _, t)| *e == last.0 && *t >= last.1)
        })
    };
    assert!(
        eventually(Duration::from_secs(15), caught_up),
        "{label}: every client reached the last acknowledged publication"
    );
    if let Some((stop, watcher)) = readiness {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let went_unready = watcher.join().unwrap();
        println!("{label}: nodes seen not ready meanwhile: {went_unready:?}");
        assert!(
            went_unready.iter().all(|r| *r),
            "{label}: each node reported not ready, then ready again"
        );
    }
    account(label, acked, clients);
}

/// Every acknowledged publication reached each client exactly once or lies in
/// a gap it was told about; prints the counts.
fn account(label: &str, acked: &BTreeMap<Position, u64>, clients: &[Arc<Mutex<Seen>>]) {
    for (i, seen) in clients.iter().enumerate() {
        let seen = seen.lock().unwrap();
        assert!(!seen.closed, "{label}: client {i} was disconnected");
        let mut counts: BTreeMap<&Position, usize> = BTreeMap::new();
        for at in &seen.offsets {
            *counts.entry(at).or_default() += 1;
        }
        let in_gap = |(e, o): &Position| {
            seen.gaps
                .iter()
                .any(|(ge, f, t)| ge == e && (*f..=*t).contains(o))
        };
        let delivered = acked.keys().filter(|at| counts.get(at) == Some(&1)).count();
        let announced = acked
            .keys()
            .filter(|at| !counts.contains_key(at) && in_gap(at))
            .count();
        let duplicated: BTreeSet<&Position> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(at, _)| *at)
            .collect();
        let silent: Vec<&Position> = acked
            .keys()
            .filter(|at| !counts.contains_key(at) && !in_gap(at))
            .collect();
        println!(
            "{label}: client {i}: {} acknowledged, {delivered} delivered once, {announced} announced as gap, {} duplicated, {} silently lost",
            acked.len(),
            duplicated.len(),
            silent.len()
        );
        assert!(
            duplicated.is_empty(),
            "{label}: client {i} got duplicates {duplicated:?}"
        );
        assert!(
            silent.is_empty(),
            "{label}: client {i} silently lost {silent:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_cluster_primary_of_a_busy_topic_loses_nothing_silently() {
    let mut cluster = RedisCluster::start(3, 1);
    let url = cluster.url();
    let pfx = prefix("cfail");
    let a = node("a", &url, &pfx, &[]);
    let b = node("b", &url, &pfx, &[]);
    let until = Instant::now() + Duration::from_secs(40);
    let clients = watch_news([&a, &b], until);

    let ports = cluster.ports();
    let victim = cluster.owner("news").unwrap().port;
    let publisher = {
        let pfx = pfx.clone();
        std::thread::spawn(move || {
            let owner_of = |topic: &str| common::cluster_owner(&ports, topic);
            let mut owner = owner_of("news");
            publish_at_200(1000, |i| {
                // A cluster-aware publisher: retry on the new owner until
                // the failover is over, with the same publication.
                let deadline = Instant::now() + Duration::from_secs(15);
                while Instant::now() < deadline {
                    if let Some(port) = owner {
                        let r = Redis::connect_existing(port);
                        if let Ok(at) = fcall(&r, &pfx, "news", json!({"i": i})) {
                            return Some((at.1, at.0));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    owner = owner_of("news");
                }
                None
            })
        })
    };
    let stop_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readiness = watch_readiness(vec![a.addr.clone(), b.addr.clone()], stop_watch.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(victim);
    // The nodes notice, go not ready or stay ready, and are ready again on their own.
    assert!(
        eventually(Duration::from_secs(20), || cluster
            .owner("news")
            .is_some_and(|r| r.port != victim)),
        "a replica took over the slot"
    );
    let acked = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    settle_and_account(
        "cluster failover",
        [&a, &b],
        &acked,
        &clients,
        Some((stop_watch, readiness)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sentinel_primary_loses_nothing_silently() {
    let mut sentinel = RedisSentinel::start();
    let url = sentinel.url();
    let pfx = prefix("sfail");
    let a = node("a", &url, &pfx, &[]);
    let b = node("b", &url, &pfx, &[]);
    let until = Instant::now() + Duration::from_secs(45);
    let clients = watch_news([&a, &b], until);
    let sentinel_ports: Vec<u16> = sentinel.sentinels.iter().map(|s| s.port).collect();
    let publisher = {
        let pfx = pfx.clone();
        std::thread::spawn(move || {
            let primary = || -> Option<u16> {
                sentinel_ports.iter().find_map(|p| {
                    Redis::connect_existing(*p)
                        .call(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", RedisSentinel::NAME])
                        .ok()?
                        .get(1)?
                        .parse()
                        .ok()
                })
            };
            publish_at_200(1000, |i| {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    if let Some(port) = primary() {
                        let r = Redis::connect_existing(port);
                        if let Ok(at) = fcall(&r, &pfx, "news", json!({"i": i})) {
                            return Some((at.1, at.0));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                None
            })
        })
    };
    let stop_watch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readiness = watch_readiness(vec![a.addr.clone(), b.addr.clone()], stop_watch.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = sentinel.primary.port;
    sentinel.primary.kill();
    assert!(
        eventually(Duration::from_secs(20), || sentinel
            .primary_port()
            .is_some_and(|p| p != old)),
        "the sentinels promoted the replica"
    );
    let acked = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    settle_and_account(
        "sentinel failover",
        [&a, &b],
        &acked,
        &clients,
        Some((stop_watch, readiness)),
    )
    .await;
}

#[test]
fn a_wrong_redis_url_form_stops_start_up_naming_redis_url() {
    for url in [
        "redis-sentinel://127.0.0.1:26379",
        "http://127.0.0.1:6379",
        "redis-cluster://",
    ] {
        let out = std::process::Command::new(common::BIN)
            .env_clear()
            .env("REDIS_URL", url)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("REDIS_URL"), "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_busy_topics_slot_keeps_deliveries_going() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url();
    let pfx = prefix("reshard");
    // A topic in slot 0: `redis-cli --cluster reshard --cluster-slots 1`
    // moves a source's lowest slot first.
    let topic: &'static str = Box::leak(
        (0..)
            .map(|i| format!("busy-{i}"))
            .find(|t| fred::util::redis_keyslot(t.as_bytes()) == 0)
            .unwrap()
            .into_boxed_str(),
    );
    let a = node("a", &url, &pfx, &[]);
    let b = node("b", &url, &pfx, &[]);
    let until = Instant::now() + Duration::from_secs(40);
    let clients: Vec<Arc<Mutex<Seen>>> = (0..2).map(|_| Arc::default()).collect();
    for (seen, n) in clients.iter().zip([&a, &b]) {
        tokio::spawn(watch(n.ws_url("/ws"), topic, seen.clone(), until));
    }
    assert!(eventually(
        Duration::from_secs(5),
        || a.health()["subscriptions"] == 1 && b.health()["subscriptions"] == 1
    ));
    let ports = cluster.ports();
    let source = cluster.owner(topic).unwrap().port;
    let target = *cluster.primaries().iter().find(|p| **p != source).unwrap();
    let id = |port: u16| Redis::connect_existing(port).cmd(&["CLUSTER", "MYID"]);
    let (from, to) = (id(source), id(target));
    let publisher = {
        let pfx = pfx.clone();
        let ports = ports.clone();
        std::thread::spawn(move || {
            publish_at_200(1000, |i| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Some(port) = common::cluster_owner(&ports, topic) {
                        let r = Redis::connect_existing(port);
                        if let Ok(at) = fcall(&r, &pfx, topic, json!({"i": i})) {
                            return Some((at.1, at.0));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            })
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{source}")])
        .args(["--cluster-from", &from, "--cluster-to", &to])
        .args(["--cluster-slots", "1", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reshard: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        eventually(Duration::from_secs(10), || cluster
            .owner(topic)
            .is_some_and(|r| r.port == target)),
        "slot 0 moved to the target"
    );
    let acked = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        acked.len(),
        1000,
        "every publication was taken by the owner of its slot"
    );
    settle_and_account("slot migration", [&a, &b], &acked, &clients, None).await;
    for n in [&a, &b] {
        assert!(
            n.log().contains("cluster slot layout changed"),
            "{} followed the slot to its new owner",
            n.name
        );
    }
}
