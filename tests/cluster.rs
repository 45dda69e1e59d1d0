//! Several nodes on one private redis-server: cross-node fan-out, external
//! publishers, one mock stream, leader failover and handover, Redis restart.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Node, Redis, eventually, prefix};
use serde_json::{Value, json};

fn start_nodes(redis: &Redis, test: &str, n: usize, extra: &[(&str, &str)]) -> Vec<Node> {
    let url = redis.url();
    let pfx = prefix(test);
    (0..n)
        .map(|i| {
            let mut env = vec![("REDIS_URL", url.as_str()), ("REDIS_PREFIX", pfx.as_str())];
            env.extend_from_slice(extra);
            Node::start(&format!("{test}-{i}"), &env)
        })
        .collect()
}

fn ready(node: &Node) -> bool {
    node.get("/readyz").0 == 200
}

/// Whether `node` logs that its backplane is not ready within `limit`.
fn warns_within(node: &Node, limit: Duration) -> bool {
    eventually(limit, || node.log().contains("backplane not ready"))
}

fn leaders(nodes: &[&Node]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.health()["leader"] == true)
        .map(|n| n.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_and_http_publishes_reach_every_node_exactly_once() {
    let redis = Redis::start();
    let nodes = start_nodes(&redis, "fanout", 3, &[]);
    for n in &nodes {
        assert!(
            eventually(Duration::from_secs(10), || ready(n)),
            "{} ready",
            n.name
        );
    }
    let pfx = prefix("fanout");
    let mut news = Vec::new();
    for n in &nodes {
        let mut c = Client::connect(&n.ws_url("/ws")).await;
        c.subscribe("news").await;
        news.push(c);
    }
    let mut other = Client::connect(&nodes[0].ws_url("/ws/sports")).await;
    other.expect("subscribed").await;

    // Garbage first: it must reach no one and harm nothing.
    let channel = format!("{pfx}:t:news");
    assert_eq!(redis.publish(&channel, "garbage{"), 3, "3 nodes subscribed");
    redis.publish(&channel, r#"{"event":"news"}"#);
    redis.publish(&channel, r#"{"event":"bad event name","data":1}"#);
    redis.publish(&channel, r#"{"event":"news","data":{"n":1}}"#);
    for c in &mut news {
        let e = c.expect("event").await;
        assert_eq!(e["name"], "news");
        assert_eq!(e["data"], json!({"n":1}));
    }
    // Without "event" the topic is the event name.
    redis.publish(&channel, r#"{"data":{"n":2}}"#);
    for c in &mut news {
        assert_eq!(c.expect("event").await["data"], json!({"n":2}));
    }
    // HTTP publish on one node reaches the others.
    let (status, _) = nodes[2].post("/api/publish", r#"{"topic":"news","data":{"n":3}}"#);
    assert_eq!(status, 202);
    for c in &mut news {
        assert_eq!(c.expect("event").await["data"], json!({"n":3}));
        assert!(
            c.recv_within(Duration::from_millis(300)).await.is_none(),
            "exactly once"
        );
    }
    assert!(
        other
            .recv_within(Duration::from_millis(200))
            .await
            .is_none()
    );
    for n in &nodes {
        assert_eq!(n.health()["status"], "ok", "{} still healthy", n.name);
    }
    // Unsubscribing the last local subscriber unsubscribes the node.
    for c in &mut news {
        c.send(json!({"type":"unsubscribe","event":"news"})).await;
        c.expect("unsubscribed").await;
    }
    assert!(eventually(Duration::from_secs(3), || redis
        .publish(&channel, "{}")
        == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mock_stream_and_failover_after_kill_9() {
    let redis = Redis::start();
    let mut nodes = start_nodes(
        &redis,
        "failover",
        3,
        &[
            (
                "WEBSOCKET_MOCK_EVENTS",
                r#"[{"name":"ticker","interval":500,"data":{}}]"#,
            ),
            ("LEADER_LEASE_MS", "3000"),
        ],
    );
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(eventually(Duration::from_secs(10), || leaders(&refs).len() == 1));
    let leader_name = leaders(&refs)[0].clone();
    let li = nodes.iter().position(|n| n.name == leader_name).unwrap();
    let watcher_i = (li + 1) % 3;

    let mut c = Client::connect(&nodes[watcher_i].ws_url("/ws/ticker")).await;
    c.expect("subscribed").await;
    c.expect("event").await;
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        if c.recv_within(Duration::from_millis(100)).await.is_some() {
            n += 1;
        }
    }
    assert!(
        (4..=8).contains(&n),
        "{n} ticker events in 3 s: one stream at 2/s"
    );

    nodes[li].kill9();
    let killed = Instant::now();
    // Events resume within 7 s, from exactly one new leader.
    loop {
        if c.recv_within(Duration::from_millis(200)).await.is_some()
            && killed.elapsed() > Duration::from_millis(600)
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(7),
            "events resumed in 7 s"
        );
    }
    let survivors: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, n)| n)
        .collect();
    assert_eq!(leaders(&survivors).len(), 1);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if c.recv_within(Duration::from_millis(100)).await.is_some() {
            n += 1;
        }
    }
    assert!(
        (2..=6).contains(&n),
        "{n} events in 2 s after failover: one stream"
    );
    let epochs: Vec<u64> = survivors
        .iter()
        .map(|n| n.health()["epoch"].as_u64().unwrap())
        .collect();
    assert!(
        epochs.iter().any(|e| *e >= 2),
        "fencing epoch rose: {epochs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_leader_hands_over_within_a_second() {
    let redis = Redis::start();
    let mut nodes = start_nodes(&redis, "handover", 3, &[]);
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(eventually(Duration::from_secs(10), || leaders(&refs).len() == 1));
    let leader_name = leaders(&refs)[0].clone();
    let li = nodes.iter().position(|n| n.name == leader_name).unwrap();
    nodes[li].signal("TERM");
    let sent = Instant::now();
    let others: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, n)| n)
        .collect();
    assert!(
        eventually(Duration::from_millis(1000), || leaders(&others).len() == 1),
        "new leader within 1 s"
    );
    eprintln!("handover took {:?}", sent.elapsed());
    let status = nodes[li].wait_exit(Duration::from_secs(8)).expect("exited");
    assert!(status.success());
}

/// Redis forgets the lease and the epoch (a restart without persistence,
/// a flush, a failover to a replica that missed writes) while the leader
/// still believes it leads until its next renew. The node that takes the
/// lease next acts only a lease later: two nodes never lead at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_redis_forgot_is_acted_on_only_after_the_old_leader_stopped() {
    let redis = Redis::start();
    let nodes = start_nodes(&redis, "forgot", 2, &[("LEADER_LEASE_MS", "3000")]);
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(eventually(Duration::from_secs(10), || leaders(&refs).len() == 1));
    // Both nodes know the epoch (the follower from the device state).
    let epoch = |n: &Node| {
        let (_, metrics) = common::http_text(&n.addr, "GET", "/metrics", None, &[]);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("switchboard_leader_epoch "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let first = leaders(&refs)[0].clone();
    let leader = refs.iter().find(|n| n.name == first).unwrap();
    assert!(epoch(leader) >= 1.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.cmd(&["FLUSHALL"]);
    let flushed = Instant::now();
    let (mut both, mut gone, mut back) = (0, None, None);
    while flushed.elapsed() < Duration::from_secs(9) {
        let now = leaders(&refs);
        if now.len() > 1 {
            both += 1;
        }
        if now.is_empty() && gone.is_none() {
            gone = Some(flushed.elapsed());
        }
        if now.len() == 1 && gone.is_some() && back.is_none() {
            back = Some(flushed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(both, 0, "two nodes led at once after the flush");
    eprintln!("no leader from {gone:?} to {back:?} after the flush");
    assert!(
        back.is_some(),
        "a node leads again (no leader from {gone:?})"
    );
    assert!(
        refs.iter().any(|n| n
            .log()
            .contains("lease taken from a Redis that lost the previous epoch")),
        "{}\n{}",
        refs[0].log(),
        refs[1].log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_and_restart() {
    let mut redis = Redis::start();
    let port = redis.port;
    let nodes = start_nodes(&redis, "outage", 2, &[]);
    for n in &nodes {
        assert!(eventually(Duration::from_secs(10), || ready(n)));
        // A normal start is no warning; losing Redis (below) is.
        assert!(!n.log().contains("backplane not ready"), "{}", n.log());
    }
    let mut clients = Vec::new();
    for n in &nodes {
        let mut c = Client::connect(&n.ws_url("/ws/news")).await;
        c.expect("subscribed").await;
        clients.push(c);
    }
    redis.kill();
    let killed = Instant::now();
    for n in &nodes {
        assert!(
            eventually(
                Duration::from_secs(5).saturating_sub(killed.elapsed()),
                || !ready(n)
            ),
            "{} not ready within 5 s",
            n.name
        );
        assert!(warns_within(n, Duration::from_secs(2)), "{}", n.log());
        let health = n.health();
        assert_eq!(health["status"], "degraded");
        assert!(
            health["reason"].as_str().unwrap().contains("Redis"),
            "{health}"
        );
        let (status, body) = n.post("/api/publish", r#"{"topic":"news","data":1}"#);
        assert_eq!(status, 503, "{body}");
    }
    for c in &mut clients {
        c.send(json!({"type":"ping"})).await;
        c.expect("pong").await;
    }

    let redis = Redis::start_on(port);
    let back = Instant::now();
    for n in &nodes {
        assert!(
            eventually(
                Duration::from_secs(8).saturating_sub(back.elapsed()),
                || ready(n)
            ),
            "{} ready again within 8 s",
            n.name
        );
    }
    let channel = format!("{}:t:news", prefix("outage"));
    assert_eq!(
        redis.publish(&channel, r#"{"data":"after"}"#),
        2,
        "both nodes resubscribed"
    );
    for c in &mut clients {
        // Redis came back empty: the topic's history (and epoch) is gone,
        // which the node announces as a reset before delivering on.
        let mut m = c.recv().await;
        if m["type"] == "gap" {
            assert!(m["previousEpoch"].is_string(), "{m}");
            m = c.recv().await;
        }
        assert_eq!(m["type"], "event", "{m}");
        assert_eq!(m["data"], "after");
    }
}

/// Keeps a free port taken until dropped, answering every connection by
/// closing it (to the node, as good as nothing listening): left free for
/// seconds, the port can go to any socket on the machine (other tests'
/// outgoing connections draw from the same ephemeral range) and
/// redis-server could not bind it.
struct HeldPort {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeldPort {
    fn new() -> HeldPort {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Acquire) {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HeldPort {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HeldPort {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node started before its Redis is reachable: not ready, "connecting to
/// Redis", no warning for the first seconds (a normal start passes
/// through that state too), a warning once it lasts, ready when Redis comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_warns_after_its_grace_and_becomes_ready() {
    let held = HeldPort::new();
    let port = held.port;
    let url = format!("redis://127.0.0.1:{port}");
    let pfx = prefix("early");
    let started = Instant::now();
    let node = Node::start(
        "early-0",
        &[("REDIS_URL", url.as_str()), ("REDIS_PREFIX", pfx.as_str())],
    );
    let (status, body) = node.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("connecting to Redis")),
        "{body}"
    );
    // The series is there from the start (the backplane alerts compare it
    // with 0), not only once the connection changed.
    let gauge = |value: &str| {
        let (_, text) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
        text.lines()
            .any(|l| l == format!("switchboard_backplane_connected {value}"))
    };
    assert!(
        gauge("0"),
        "no switchboard_backplane_connected 0 before Redis"
    );
    if started.elapsed() < Duration::from_secs(4) {
        assert!(
            !node.log().contains("backplane not ready"),
            "{}",
            node.log()
        );
    }
    assert!(
        warns_within(&node, Duration::from_secs(8)),
        "{}",
        node.log()
    );
    drop(held);
    let _redis = Redis::start_on(port);
    assert!(
        eventually(Duration::from_secs(10), || ready(&node)),
        "ready once Redis is there:\n{}",
        node.log()
    );
    assert!(
        gauge("1"),
        "switchboard_backplane_connected is not 1 once ready"
    );
}

/// The control commands (control API, SSE commands from other nodes) come
/// over a subscriber connection of their own: a node whose backplane is up
/// but whose control subscription is refused must not report ready, and
/// must subscribe once it may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_not_ready_until_its_control_listener_is_subscribed() {
    let redis = Redis::start();
    let pfx = prefix("listeners");
    // Every channel of this prefix but `{pfx}:control` (`cmd` and
    // `control-reply:*` are the other names that start with a c).
    redis.cmd(&[
        "ACL",
        "SETUSER",
        "default",
        "resetchannels",
        &format!("&{pfx}:[^c]*"),
        &format!("&{pfx}:cmd"),
        &format!("&{pfx}:control-*"),
    ]);
    let url = redis.url();
    let node = Node::start(
        "listeners-0",
        &[("REDIS_URL", url.as_str()), ("REDIS_PREFIX", pfx.as_str())],
    );
    let refused = || {
        let (status, body) = node.get("/readyz");
        status == 503
            && body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not subscribed to control commands"))
    };
    assert!(
        eventually(Duration::from_secs(5), refused),
        "{:?}\n{}",
        node.get("/readyz"),
        node.log()
    );
    // Still refused a while later: the backplane alone does not make it ready.
    std::thread::sleep(Duration::from_millis(500));
    assert!(refused(), "{:?}", node.get("/readyz"));
    // The probe that did not come back within 2 s.
    assert!(
        eventually(Duration::from_secs(5), || node
            .log()
            .contains("subscribing failed")),
        "{}",
        node.log()
    );
    assert!(refused(), "{:?}", node.get("/readyz"));
    redis.cmd(&["ACL", "SETUSER", "default", "allchannels"]);
    assert!(
        eventually(Duration::from_secs(5), || ready(&node)),
        "ready once the control channel may be subscribed:\n{}",
        node.log()
    );
}

/// Nodes started at once on one Redis subscribe their listeners without a
/// warning: a listener's subscriber may connect before the commands client
/// (which refuses commands until it has), and its probe, published on the
/// commands connection, may reach Redis before the SUBSCRIBE does. Each
/// once made a normal start log `subscribing failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_subscribe_their_listeners_without_a_warning() {
    let redis = Redis::start();
    let url = redis.url();
    let pfx = prefix("together");
    let nodes: Vec<Node> = (0..4)
        .map(|i| {
            let (url, pfx) = (url.clone(), pfx.clone());
            std::thread::spawn(move || {
                Node::start(
                    &format!("together-{i}"),
                    &[("REDIS_URL", url.as_str()), ("REDIS_PREFIX", pfx.as_str())],
                )
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for node in &nodes {
        assert!(
            eventually(Duration::from_secs(10), || ready(node)),
            "{}",
            node.log()
        );
    }
    // Past a probe's 2 s, the time a failed try takes to be logged.
    std::thread::sleep(Duration::from_millis(2500));
    for node in &nodes {
        assert!(!node.log().contains("subscribing failed"), "{}", node.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_cluster_stats() {
    let redis = Redis::start();
    let nodes = start_nodes(&redis, "stats", 3, &[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&nodes[1].ws_url("/ws")).await);
    }
    clients.push(Client::connect(&nodes[2].ws_url("/ws")).await);
    // Asked on the node with no clients, the totals are cluster-wide.
    let stats = |n: &Node| -> Value { n.get("/admin/websocket/stats").1 };
    assert!(
        eventually(
            Duration::from_secs(6),
            || stats(&nodes[0])["data"]["connectedClients"] == 4
        ),
        "{}",
        stats(&nodes[0])
    );
    let s = stats(&nodes[0]);
    assert_eq!(s["success"], true);
    assert_eq!(s["data"]["nodes"].as_array().unwrap().len(), 3);
    assert!(s["data"]["leader"].is_string());
    assert!(s["meta"]["requestId"].is_string());
    let health = nodes[0].health();
    assert_eq!(health["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(health["backplane"], "redis");
}
