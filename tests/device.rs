//! The device control plane across nodes, and Socket.IO interop with the
//! official clients (socket.io-client from npm, python-socketio from PyPI).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Client, Node, Redis, eventually, interop_script, prefix, python, run_interop};
use serde_json::{Value, json};

fn nodes(redis: &Redis, test: &str, n: usize, extra: &[(&str, &str)]) -> Vec<Node> {
    let url = redis.url();
    let pfx = prefix(test);
    let nodes: Vec<Node> = (0..n)
        .map(|i| {
            let mut env = vec![
                ("REDIS_URL", url.as_str()),
                ("REDIS_PREFIX", pfx.as_str()),
                ("LEADER_LEASE_MS", "3000"),
            ];
            env.extend_from_slice(extra);
            Node::start(&format!("{test}-{i}"), &env)
        })
        .collect();
    for n in &nodes {
        assert!(eventually(Duration::from_secs(10), || n.get("/readyz").0 == 200));
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    assert!(eventually(Duration::from_secs(10), || leader_index(&refs).is_some()));
    nodes
}

fn leader_index(nodes: &[&Node]) -> Option<usize> {
    let leaders: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.health()["leader"] == true)
        .map(|(i, _)| i)
        .collect();
    (leaders.len() == 1).then(|| leaders[0])
}

#[test]
fn official_socketio_clients_across_two_nodes() {
    let redis = Redis::start();
    let n = nodes(&redis, "sio", 2, &[]);
    let a = format!("http://{}", n[0].addr);
    let b = format!("http://{}", n[1].addr);
    // socket.io-client forced to long-polling on node B, commands through A.
    let node_js = Path::new("node");
    run_interop(
        node_js,
        &[&interop_script("sio_scenario.mjs"), "polling", &b, &a],
    );
    // socket.io-client over websocket on node A, commands through B.
    run_interop(
        node_js,
        &[&interop_script("sio_scenario.mjs"), "websocket", &a, &b],
    );
    // python-socketio AsyncClient on node A, commands through B.
    run_interop(&python(), &[&interop_script("sio_scenario.py"), &a, &b]);
    // python-socketio opening on the websocket transport (the node's own).
    run_interop(
        &python(),
        &[&interop_script("sio_scenario.py"), &b, &a, "websocket"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_any_node_reach_every_client_and_bad_ones_change_nothing() {
    let redis = Redis::start();
    let n = nodes(&redis, "cmds", 2, &[]);
    let mut on_a = Client::connect(&n[0].ws_url("/ws/device")).await;
    on_a.expect("subscribed").await;
    let mut on_b = Client::connect(&n[1].ws_url("/ws")).await;
    on_b.subscribe("device").await;

    let (status, body) = n[1].post("/api/settings", r#"{"brightness":20}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["settings"]["brightness"], 20);
    for c in [&mut on_a, &mut on_b] {
        let e = c.expect("event").await;
        assert_eq!(e["topic"], "device");
        assert_eq!(e["name"], "settings");
        assert_eq!(e["data"], json!({"brightness":20}));
    }
    let (status, body) = n[0].post("/api/config", r#"{"config":{"color":[255,0,0]}}"#);
    assert_eq!(status, 200, "{body}");
    for c in [&mut on_a, &mut on_b] {
        let e = c.expect("event").await;
        assert_eq!(e["name"], "current_app");
        assert_eq!(e["data"]["config"]["color"], json!([255, 0, 0]));
    }

    for (path, body, field) in [
        ("/api/settings", r#"{"brightness":150}"#, "brightness"),
        ("/api/settings", r#"{"brightness":"max"}"#, "brightness"),
        ("/api/switch", r#"{"app":"tetris"}"#, "tetris"),
        ("/api/switch", r#"{}"#, "app"),
        (
            "/api/config",
            r#"{"app":"stars","config":{"density":500}}"#,
            "config.density",
        ),
        (
            "/api/carousel",
            r#"{"enabled":true,"apps":[{"app":"clock","duration":-1}]}"#,
            "duration",
        ),
    ] {
        let (status, resp) = n[1].post(path, body);
        assert_eq!(status, 400, "{path} {body}: {resp}");
        assert!(
            resp["error"].as_str().unwrap().contains(field),
            "{path}: {resp}"
        );
    }
    assert!(
        on_a.recv_within(Duration::from_millis(500)).await.is_none(),
        "nothing changed"
    );
    for node in &n {
        let (_, s) = node.get("/api/state");
        assert_eq!(s["data"]["settings"]["brightness"], 20);
        assert_eq!(s["data"]["current_app"], "clock");
    }
    let (_, apps) = n[1].get("/api/apps");
    assert_eq!(
        apps["data"]["apps"],
        json!(["clock", "scroll_text", "stars"])
    );
    // native request of `device` holds the whole state
    on_a.send(json!({"type":"request","event":"device"})).await;
    let r = on_a.expect("response").await;
    assert_eq!(r["data"]["settings"]["brightness"], 20);
    // the leader's driver rendered it
    let refs: Vec<&Node> = n.iter().collect();
    let li = leader_index(&refs).unwrap();
    let (_, s) = n[li].get("/api/state");
    assert_eq!(s["data"]["driver"]["driver"], "simulated");
    assert!(s["data"]["driver"]["applied"].as_u64().unwrap() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carousel_rotates_once_per_interval_on_every_node() {
    let redis = Redis::start();
    let n = nodes(&redis, "carousel", 2, &[]);
    let mut clients = Vec::new();
    for node in &n {
        clients.push(Client::connect(&node.ws_url("/ws/device")).await);
    }
    for c in &mut clients {
        c.expect("subscribed").await;
    }
    let (status, body) = n[0].post(
        "/api/carousel",
        r#"{"enabled":true,"apps":[{"app":"stars","duration":1},{"app":"clock","duration":1}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut apps = Vec::new();
            while start.elapsed() < Duration::from_millis(4500) {
                if let Some(e) = c.recv_within(Duration::from_millis(100)).await
                    && e["name"] == "current_app"
                {
                    apps.push(e["data"]["app"].as_str().unwrap().to_string());
                }
            }
            apps
        }));
    }
    for t in tasks {
        let apps = t.await.unwrap();
        // stars at once, then about one switch a second: five in 4.5 s,
        // one fewer when a loaded machine delays the first ones.
        assert!((3..=6).contains(&apps.len()), "{apps:?}");
        for pair in apps.windows(2) {
            assert_ne!(pair[0], pair[1], "alternates: {apps:?}");
        }
    }
    n[1].post("/api/carousel", r#"{"enabled":false}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_kill_9_of_the_leader_and_a_redis_restart_empty() {
    let mut redis = Redis::start();
    let port = redis.port;
    let mut n = nodes(&redis, "survive", 2, &[]);
    assert_eq!(n[0].post("/api/settings", r#"{"brightness":33}"#).0, 200);
    assert_eq!(n[1].post("/api/switch", r#"{"app":"stars"}"#).0, 200);
    let refs: Vec<&Node> = n.iter().collect();
    let li = leader_index(&refs).unwrap();
    let old_epoch = n[li].health()["epoch"].as_u64().unwrap();
    let survivor = 1 - li;

    n[li].kill9();
    let killed = Instant::now();
    let (_, s) = n[survivor].get("/api/state");
    assert_eq!(s["data"]["settings"]["brightness"], 33);
    assert_eq!(s["data"]["current_app"], "stars");
    // a new command succeeds within 7 s
    loop {
        let (status, _) = n[survivor].post("/api/settings", r#"{"brightness":44}"#);
        if status == 200 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(7),
            "command failed for 7 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let h = n[survivor].health();
    assert_eq!(h["leader"], true);
    assert!(h["epoch"].as_u64().unwrap() > old_epoch);
    let (_, s) = n[survivor].get("/api/state");
    assert_eq!(
        s["data"]["current_app"], "stars",
        "nothing reset by the failover"
    );
    let stored: Value =
        serde_json::from_str(&redis.cmd(&["GET", &format!("{}:device", prefix("survive"))]))
            .unwrap();
    assert_eq!(stored["settings"]["brightness"], 44);
    assert_eq!(stored["epoch"], h["epoch"]);

    // Redis restarts with nothing in it: the state is re-seeded from the node.
    redis.kill();
    drop(redis);
    let redis = Redis::start_on(port);
    assert!(eventually(Duration::from_secs(10), || n[survivor]
        .get("/readyz")
        .0
        == 200));
    let (_, s) = n[survivor].get("/api/state");
    assert_eq!(s["data"]["settings"]["brightness"], 44);
    assert_eq!(s["data"]["current_app"], "stars");
    let start = Instant::now();
    loop {
        let (status, body) = n[survivor].post("/api/switch", r#"{"app":"clock"}"#);
        if status == 200 {
            assert_eq!(body["data"]["settings"]["brightness"], 44);
            assert!(
                body["data"]["epoch"].as_u64().unwrap() > old_epoch,
                "epochs keep rising"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{status} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored = redis.cmd(&["GET", &format!("{}:device", prefix("survive"))]);
    assert!(stored.contains("\"brightness\":44"), "{stored}");
}

#[tokio::test]
async fn a_write_with_an_older_epoch_is_rejected_by_redis() {
    use switchboard::device::state::DeviceState;
    use switchboard::device::store::{DeviceStore, RedisStore, StoreError};
    use switchboard::redis::{Keys, Redis as Conn};

    let redis = Redis::start();
    let conn = Conn::connect(&redis.url()).unwrap();
    assert!(conn.wait_connected(Duration::from_secs(5)).await);
    let keys = Keys::new(&prefix("fence"), switchboard::redis::Mode::Standalone);
    let store = RedisStore::new(conn, keys);
    let mut s = DeviceState::initial(&["clock".into()]);
    s.epoch = 5;
    store.save(&s, 5).await.unwrap();
    s.epoch = 3;
    s.settings.brightness = 1;
    assert!(matches!(
        store.save(&s, 3).await,
        Err(StoreError::Fenced { epoch: 3 })
    ));
    // A newer lease (epoch counter) fences out even before it wrote anything.
    redis.cmd(&["SET", &format!("{}:epoch", prefix("fence")), "9"]);
    assert!(matches!(
        store.save(&s, 6).await,
        Err(StoreError::Fenced { .. })
    ));
    let loaded = store.load().await.unwrap().unwrap();
    assert_eq!(loaded.epoch, 5);
    assert_eq!(loaded.settings.brightness, 75);
    s.epoch = 9;
    store.save(&s, 9).await.unwrap();
}
