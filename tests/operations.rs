//! Operations: Prometheus metrics, the admin port, rolling restarts, and a
//! cluster behind a real load balancer (Debian's nginx via scripts/cluster).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, Closed, Node, Redis, eventually, http_text, prefix};
use serde_json::json;

/// Parses Prometheus text format strictly enough to catch a broken
/// exposition: every sample line is `name{labels} value`, every family has a
/// TYPE. Returns samples keyed by `name{labels}`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "{line}");
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            typed.contains(name) || typed.contains(family),
            "no TYPE for {line}"
        );
        samples.insert(key.to_string(), value);
    }
    samples
}

fn metric(samples: &HashMap<String, f64>, prefix: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_as_clients_connect_and_messages_flow() {
    let node = Node::start("ops-metrics", &[]);
    let scrape = || {
        let (status, text) = http_text(&node.addr, "GET", "/metrics", None, &[]);
        assert_eq!(status, 200);
        parse_prometheus(&text)
    };
    // The leader publishes the device state (four events) once it leads;
    // start counting after that.
    assert!(eventually(Duration::from_secs(5), || metric(
        &scrape(),
        "switchboard_backplane_publishes_total"
    ) >= 4.0));
    let before = scrape();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        c.subscribe("m").await;
        clients.push(c);
    }
    for i in 0..5 {
        node.post("/api/publish", &format!(r#"{{"topic":"m","data":{i}}}"#));
    }
    for c in &mut clients {
        for _ in 0..5 {
            c.expect("event").await;
        }
        c.send_text("oops").await;
        c.expect("error").await;
    }
    // The dispatcher counts a publication's deliveries right after queueing
    // them, so the clients can be a moment ahead of the counters.
    let mut after = scrape();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&after, "switchboard_deliveries_total{transport=\"ws\"}")
        - metric(&before, "switchboard_deliveries_total{transport=\"ws\"}")
        < 15.0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        after = scrape();
    }
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    assert_eq!(
        metric(&after, "switchboard_connections{transport=\"ws\"}"),
        3.0
    );
    assert_eq!(
        delta("switchboard_connections_opened_total{transport=\"ws\"}"),
        3.0
    );
    assert_eq!(
        delta("switchboard_deliveries_total{transport=\"ws\"}"),
        15.0
    );
    // The leader's live frame stream (device.frame) publishes too: a frame
    // at start and when the clock's minute turns.
    let streamed = |s: &HashMap<String, f64>| {
        metric(s, "switchboard_backplane_publishes_total")
            - metric(s, "switchboard_device_frames_published_total")
    };
    assert!(
        eventually(Duration::from_secs(5), || streamed(&scrape())
            - streamed(&before)
            == 5.0),
        "5 publications besides the frame stream"
    );
    // Counted once the message is handled, after its answer is queued: on
    // the input runtime the client may read the answer first.
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &scrape(),
            "switchboard_client_messages_total"
        ) - metric(
            &before,
            "switchboard_client_messages_total"
        ) >= 6.0),
        "6 client messages counted"
    );
    assert_eq!(after.get("switchboard_subscriptions"), Some(&3.0));
    assert_eq!(after.get("switchboard_leader"), Some(&1.0));
    assert!(metric(&after, "switchboard_fanout_seconds_count") >= 5.0);
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("switchboard_http_requests_total{")
                && k.contains("route=\"/api/publish\"")),
        "HTTP requests by matched route"
    );
    drop(clients);
    assert!(eventually(Duration::from_secs(10), || {
        metric(&scrape(), "switchboard_connections{transport=\"ws\"}") == 0.0
    }));
}

#[test]
fn admin_port_serves_metrics_and_admin_only_there() {
    let admin_port = common::free_port();
    let node = Node::start("ops-admin", &[("ADMIN_PORT", &admin_port.to_string())]);
    let admin = format!("127.0.0.1:{admin_port}");
    assert!(eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(&admin).is_ok()
    }));
    assert_eq!(http_text(&admin, "GET", "/metrics", None, &[]).0, 200);
    assert_eq!(
        http_text(&admin, "GET", "/admin/websocket/stats", None, &[]).0,
        200
    );
    assert_eq!(node.get("/metrics").0, 404);
    assert_eq!(node.get("/admin/websocket/stats").0, 404);
    assert_eq!(node.get("/api/health").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_closes_every_client_with_1012_spread_over_the_drain() {
    let redis = Redis::start();
    let pfx = prefix("rolling");
    let mut node = Node::start(
        "ops-rolling",
        &[
            ("REDIS_URL", &redis.url()),
            ("REDIS_PREFIX", &pfx),
            ("SHUTDOWN_READINESS_DELAY_MS", "1500"),
            ("SHUTDOWN_DRAIN_MS", "1000"),
            ("SHUTDOWN_GRACE_MS", "8000"),
        ],
    );
    assert!(eventually(Duration::from_secs(10), || node
        .get("/readyz")
        .0
        == 200));
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut c = Client::connect(&node.ws_url("/ws/news")).await;
        c.expect("subscribed").await;
        clients.push(c);
    }
    node.signal("TERM");
    let sent = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || node.get("/readyz").0 == 503),
        "/readyz is 503 within 1 s"
    );
    // Still serving its clients during the readiness delay...
    clients[0].send(json!({"type":"ping"})).await;
    clients[0].expect("pong").await;
    // ...while probes answer 503 and new WebSocket clients are refused.
    assert_eq!(node.get("/readyz").0, 503);
    let refused = tokio_tungstenite::connect_async(node.ws_url("/ws")).await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503),
        "{refused:?}"
    );

    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            let code = c.closed_within(Duration::from_secs(8)).await;
            (code, Instant::now())
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        let (code, at) = t.await.unwrap();
        assert_eq!(code, Some(Closed::Code(1012)));
        times.push(at.duration_since(sent));
    }
    times.sort();
    let first = times[0];
    let last = *times.last().unwrap();
    assert!(
        first >= Duration::from_millis(1400),
        "not before the readiness delay: {first:?}"
    );
    assert!(
        last - first >= Duration::from_millis(500),
        "closes spread over the drain window: {first:?}..{last:?}"
    );
    let status = node.wait_exit(Duration::from_secs(8)).expect("exited");
    assert!(status.success());
}

/// Three nodes behind Debian's nginx, as `scripts/cluster` sets them up:
/// native WebSocket and Socket.IO long-polling through the load balancer.
#[test]
fn cluster_behind_nginx_serves_native_and_socketio_polling() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let state = std::env::temp_dir().join(format!("sb-cluster-test-{}", std::process::id()));
    let out = Command::new(root.join("scripts/cluster"))
        .arg("start")
        .env("SWITCHBOARD_BIN", common::BIN)
        .env("CLUSTER_PORT", "0")
        .env("CLUSTER_STATE_DIR", &state)
        .env("CLUSTER_WATCH_PID", std::process::id().to_string())
        .env("WEBSOCKET_MOCK_EVENTS", "[]")
        .output()
        .expect("scripts/cluster start");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    struct Stop(PathBuf, PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new(self.0.join("scripts/cluster"))
                .arg("stop")
                .arg(&self.1)
                .output();
        }
    }
    let _stop = Stop(root.clone(), state.clone());
    assert!(
        out.status.success(),
        "cluster start failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CLUSTER_URL="))
        .expect("CLUSTER_URL")
        .to_string();
    let addr = url.trim_start_matches("http://").to_string();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Several native clients through the balancer, spread over the nodes.
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(Client::connect(&format!("ws://{addr}/ws/lb")).await);
        }
        for c in &mut clients {
            c.expect("subscribed").await;
        }
        let (status, _) = common::http(
            &addr,
            "POST",
            "/api/publish",
            Some(r#"{"topic":"lb","data":1}"#),
            &[],
        );
        assert_eq!(status, 202);
        for c in &mut clients {
            assert_eq!(c.expect("event").await["data"], 1);
        }
    });
    let nodes: std::collections::HashSet<String> = (0..6)
        .map(|_| common::http(&addr, "GET", "/api/health", None, &[]).1["node"].to_string())
        .collect();
    assert!(nodes.len() >= 2, "the balancer spreads requests: {nodes:?}");

    // socket.io-client forced to long-polling, through nginx both ways.
    common::run_interop(
        std::path::Path::new("node"),
        &[
            &common::interop_script("sio_scenario.mjs"),
            "polling",
            &url,
            &url,
        ],
    );
}
