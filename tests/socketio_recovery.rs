//! Socket.IO connection state recovery (`SOCKETIO_STATE_RECOVERY=true`)
//! with the official client: an unchanged `socket.io-client` app
//! (`tests/interop/sio_csr.mjs`: `io(url)`, default transports) behind the
//! deployment's nginx (sticky `/socket.io/`, next upstream when a node is
//! gone), two nodes, a private `redis-server` and three publishers using
//! `FCALL switchboard_publish`. Also the wire form, spoken by hand.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{Node, Redis, eventually, prefix};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const TOPICS: [&str; 3] = ["t1", "t2", "t3"];

fn csr_node(name: &str, redis: &Redis, pfx: &str, extra: &[(&str, &str)]) -> Node {
    let mut env = vec![
        ("SOCKETIO_STATE_RECOVERY", "true"),
        ("HISTORY_SIZE", "1000"),
    ];
    env.extend_from_slice(extra);
    Node::start_on_redis(name, &redis.url(), pfx, &env, Duration::from_secs(15))
}

fn port_of(node: &Node) -> u16 {
    node.addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `FCALL switchboard_publish` of `{"n": n}` on `topic` (event = topic).
fn fcall(redis: &Redis, pfx: &str, topic: &str, n: u64) -> u64 {
    let envelope = json!({"event": topic, "data": {"n": n}}).to_string();
    let reply = redis
        .call(&["FCALL", "switchboard_publish", "1", topic, &envelope, pfx])
        .unwrap_or_else(|e| panic!("FCALL failed: {e}"));
    reply[0].parse().unwrap()
}

// === nginx ===

/// Debian's nginx with the configuration `scripts/cluster` derives from
/// `deploy/nginx.conf`, in front of the given node ports.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(ports: &[u16]) -> Nginx {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!(
            "sb-csr-nginx-{}-{}",
            std::process::id(),
            common::free_port()
        ));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        // nginx workers run as an unprivileged user and must reach their temp dirs.
        for d in [&dir, &dir.join("tmp")] {
            Command::new("chmod").arg("0755").arg(d).status().unwrap();
        }
        let port = common::free_port();
        let mut args = vec![
            "nginx-conf".to_string(),
            dir.display().to_string(),
            port.to_string(),
        ];
        args.extend(ports.iter().map(u16::to_string));
        let conf = Command::new(root.join("scripts/cluster"))
            .args(&args)
            .output()
            .expect("scripts/cluster nginx-conf");
        assert!(conf.status.success(), "{conf:?}");
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, &conf.stdout).unwrap();
        let bin = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|b| Command::new(b).arg("-v").output().is_ok())
            .expect("nginx is not installed: run ./scripts/test, which installs it");
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-g")
            .arg(format!(
                "daemon off; pid {};",
                dir.join("nginx.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx { child, port, dir };
        let addr = format!("127.0.0.1:{port}");
        assert!(
            eventually(Duration::from_secs(10), || {
                std::net::TcpStream::connect(&addr).is_ok()
                    && common::http(&addr, "GET", "/lb-healthz", None, &[]).0 == 200
            }),
            "nginx did not start: {}",
            std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default()
        );
        nginx
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers before it exits; a
    /// SIGKILL would leave the workers running as orphans, still holding the
    /// listening port. SIGKILL only if the master has not gone in 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- nginx access log ---\n{}",
                std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// === the app ===

/// `tests/interop/sio_csr.mjs`, driven over stdin/stdout.
struct App {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl App {
    fn start(url: &str) -> App {
        let tools = common::tools();
        assert!(
            tools.join("node/node_modules/socket.io-client").exists(),
            "socket.io-client is not installed in {}: run ./scripts/test",
            tools.display()
        );
        let mut child = Command::new("node")
            .arg(common::interop_script("sio_csr.mjs"))
            .arg(url)
            .args(TOPICS)
            .env("SWITCHBOARD_TOOLS", &tools)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        App {
            child,
            stdin,
            lines,
            log,
        }
    }

    /// The rest of the next line that starts with `prefix` (others skipped).
    fn expect(&self, prefix: &str, within: Duration) -> String {
        self.expect_all(&[prefix], within).remove(0)
    }

    /// Waits for lines starting with each of `prefixes`, in any order, and
    /// returns the rest of each (in the order of `prefixes`; the first line
    /// with that prefix).
    fn expect_all(&self, prefixes: &[&str], within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    for (prefix, slot) in prefixes.iter().zip(&mut found) {
                        if slot.is_none()
                            && let Some(rest) = line.strip_prefix(prefix)
                        {
                            *slot = Some(rest.trim().to_string());
                        }
                    }
                }
                Err(_) => panic!(
                    "the app did not print {:?} within {within:?}; it printed:\n{}",
                    prefixes
                        .iter()
                        .zip(&found)
                        .filter(|(_, f)| f.is_none())
                        .map(|(p, _)| p)
                        .collect::<Vec<_>>(),
                    self.log.lock().unwrap().join("\n")
                ),
            }
        }
        found.into_iter().flatten().collect()
    }

    fn report(&mut self) -> Value {
        writeln!(self.stdin, "report").unwrap();
        serde_json::from_str(&self.expect("REPORT ", Duration::from_secs(10))).unwrap()
    }

    /// What the app received of `topic`, in order.
    fn seen(report: &Value, topic: &str) -> Vec<u64> {
        report["seen"][topic]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === publishers ===

/// One thread per topic publishing `{"n": 1, 2, …}` at about 100/s.
struct Publishers {
    stop: Arc<AtomicBool>,
    counts: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Publishers {
    fn start(redis: &Redis, pfx: &str) -> Publishers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut counts = Vec::new();
        let mut threads = Vec::new();
        for topic in TOPICS {
            let count = Arc::new(AtomicU64::new(0));
            let (stop, c) = (stop.clone(), count.clone());
            let redis = Redis::connect_existing(redis.port);
            let pfx = pfx.to_string();
            threads.push(std::thread::spawn(move || {
                let start = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    let n = c.load(Ordering::Acquire) + 1;
                    assert_eq!(fcall(&redis, &pfx, topic, n), n, "offset = n");
                    c.store(n, Ordering::Release);
                    // 100/s on average, whatever one call took.
                    let due = start + Duration::from_millis(10 * n);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
            }));
            counts.push(count);
        }
        Publishers {
            stop,
            counts,
            threads,
        }
    }

    fn published(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect()
    }

    fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().expect("publisher");
        }
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect()
    }
}

/// The index of the node the app is connected to (its one Socket.IO
/// connection).
fn holder(nodes: &[Node]) -> usize {
    let mut found = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            found = nodes.iter().position(|n| n.health()["connections"] == 1);
            found.is_some()
        }),
        "no node holds the app's socket"
    );
    found.unwrap()
}

#[test]
fn an_unchanged_client_recovers_every_publication_after_kill_9_of_its_node() {
    let redis = Redis::start();
    let pfx = prefix("csr");
    let mut nodes = vec![
        csr_node("a", &redis, &pfx, &[]),
        csr_node("b", &redis, &pfx, &[]),
    ];
    let ports: Vec<u16> = nodes.iter().map(port_of).collect();
    let nginx = Nginx::start(&ports);
    let mut app = App::start(&nginx.url());
    assert_eq!(
        app.expect("OPEN ", Duration::from_secs(20)),
        "polling",
        "the default: long-polling first"
    );
    // The upgrade to WebSocket may finish before or after the connect.
    let seen = app.expect_all(
        &["CONNECT ", "SUBSCRIBED", "UPGRADED"],
        Duration::from_secs(20),
    );
    let first: Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(first["recovered"], false);

    // Three publishers at 100/s each; after a while the app's node dies.
    let publishers = Publishers::start(&redis, &pfx);
    assert!(eventually(Duration::from_secs(20), || publishers
        .published()
        .iter()
        .all(|&n| n >= 150)));
    let mut victim = nodes.remove(holder(&nodes));
    let killed_port = port_of(&victim);
    victim.kill9();
    let back: Value =
        serde_json::from_str(&app.expect("CONNECT ", Duration::from_secs(30))).unwrap();
    assert_eq!(back["recovered"], true, "socket.recovered after kill -9");
    // Publishing goes on for a while on the surviving node.
    let at_reconnect = publishers.published();
    assert!(eventually(Duration::from_secs(20), || publishers
        .published()
        .iter()
        .zip(&at_reconnect)
        .all(|(now, then)| *now >= then + 150)));
    let published = publishers.stop();
    let mut report = app.report();
    let complete = |r: &Value| {
        TOPICS
            .iter()
            .zip(&published)
            .all(|(t, &n)| App::seen(r, t).len() as u64 >= n)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !complete(&report) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        report = app.report();
    }
    for (topic, &n) in TOPICS.iter().zip(&published) {
        assert_eq!(
            App::seen(&report, topic),
            (1..=n).collect::<Vec<_>>(),
            "{topic}: every publication once, in order"
        );
    }
    assert_eq!(report["gaps"], json!([]), "nothing lost");
    let connects = report["connects"].as_array().unwrap();
    assert!(
        connects[1..].iter().all(|c| c["recovered"] == true),
        "every reconnect recovered: {report}"
    );
    eprintln!("received {published:?} publications of {TOPICS:?}, once each, in order");

    // Beyond the history: the last node dies too, and meanwhile t1 gets
    // more publications than HISTORY_SIZE (1000) holds; t2 and t3 a few.
    let mut survivor = nodes.remove(holder(&nodes));
    survivor.kill9();
    let mut now = published.clone();
    for (i, topic) in TOPICS.iter().enumerate() {
        let more = if i == 0 { 1100 } else { 5 };
        for _ in 0..more {
            now[i] += 1;
            fcall(&redis, &pfx, topic, now[i]);
        }
    }
    let port = killed_port.to_string();
    nodes.push(csr_node("a2", &redis, &pfx, &[("PORT", &port)]));
    let again: Value =
        serde_json::from_str(&app.expect("CONNECT ", Duration::from_secs(60))).unwrap();
    assert_eq!(again["recovered"], false, "t1 lost more than history holds");
    let gap: Value = serde_json::from_str(&app.expect("GAP ", Duration::from_secs(10))).unwrap();
    assert_eq!(gap["topic"], "t1");
    assert_eq!(gap["from"], published[0] + 1);
    assert_eq!(gap["to"], now[0]);
    // The subscriptions are back: t2 and t3 replayed, then live ones.
    let live = nodes.last().unwrap();
    for topic in TOPICS {
        let (status, _) = live.post(
            "/api/publish",
            &json!({"topic": topic, "data": {"n": 0}}).to_string(),
        );
        assert_eq!(status, 202);
    }
    let mut report = app.report();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TOPICS
        .iter()
        .any(|t| App::seen(&report, t).last() != Some(&0))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        report = app.report();
    }
    let t1 = App::seen(&report, "t1");
    assert_eq!(
        t1[..t1.len() - 1],
        (1..=published[0]).collect::<Vec<_>>()[..]
    );
    assert_eq!(t1.last(), Some(&0), "t1 live again after the gap");
    for (i, topic) in TOPICS.iter().enumerate().skip(1) {
        let mut expected: Vec<u64> = (1..=now[i]).collect();
        expected.push(0);
        assert_eq!(
            App::seen(&report, topic),
            expected,
            "{topic}: replayed, then live"
        );
    }
    assert_eq!(report["gaps"].as_array().unwrap().len(), 1, "{report}");
}

// === the wire, by hand ===

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame, answering Engine.IO pings on the way.
async fn text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => {
                ws.send(Message::Text("3".into())).await.unwrap();
            }
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no text frame: {other:?}"),
        }
    }
}

async fn until(ws: &mut Ws, prefix: &str) -> String {
    loop {
        let t = text(ws).await;
        if t.starts_with(prefix) {
            return t;
        }
    }
}

/// A websocket session connected to `/` with `auth`; the CONNECT answer.
async fn connect(node: &Node, auth: Value) -> (Ws, Value) {
    let url = node.ws_url("/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(text(&mut ws).await.starts_with('0'));
    ws.send(Message::Text(format!("40{auth}").into()))
        .await
        .unwrap();
    let answer = until(&mut ws, "40").await;
    (ws, serde_json::from_str(&answer[2..]).unwrap())
}

/// Subscribes `ws` to each of `topics` (acks 0, 1, …), each accepted.
async fn subscribe_all(ws: &mut Ws, topics: &[&str]) {
    for (i, topic) in topics.iter().enumerate() {
        ws.send(Message::Text(
            format!(r#"42{i}["subscribe","{topic}"]"#).into(),
        ))
        .await
        .unwrap();
        let ack = until(ws, &format!("43{i}")).await;
        assert!(ack.contains(r#""ok":true"#), "{topic}: {ack}");
    }
}

#[tokio::test]
async fn the_connect_answer_has_a_pid_and_publications_carry_the_positions_of_every_topic() {
    let redis = Redis::start();
    let pfx = prefix("csr-wire");
    let a = csr_node("a", &redis, &pfx, &[]);
    let b = csr_node("b", &redis, &pfx, &[]);
    let (mut ws, answer) = connect(&a, json!({})).await;
    let pid = answer["pid"].as_str().expect("pid").to_string();
    assert_eq!(pid.len(), 32);
    subscribe_all(&mut ws, &["x", "y"]).await;
    let publish = |topic: &str, data: &str| {
        let (status, _) = b.post(
            "/api/publish",
            &format!(r#"{{"topic":"{topic}","data":{data}}}"#),
        );
        assert_eq!(status, 202);
    };
    // Record revision 2 (one write per subscribe); slot 0 is x, slot 1 y.
    publish("x", r#"{"n":1}"#);
    assert_eq!(
        until(&mut ws, r#"42["x""#).await,
        r#"42["x",{"n":1},"2.1"]"#
    );
    publish("y", r#""a string""#);
    assert_eq!(
        until(&mut ws, r#"42["y""#).await,
        r#"42["y","a string","2.1.1"]"#
    );
    publish("x", r#"{"n":2}"#);
    assert_eq!(
        until(&mut ws, r#"42["x""#).await,
        r#"42["x",{"n":2},"2.2.1"]"#
    );
    // The socket goes away having received only the first two.
    drop(ws);
    publish("y", r#"{"n":3}"#);
    // Back on the other node with the offset of the second frame: the same
    // pid, x from 1 (its 2 again) and y from 1, once each, in order.
    let (mut ws, answer) = connect(&b, json!({"pid": pid, "offset": "2.1.1"})).await;
    assert_eq!(answer["pid"], pid, "recovered");
    let mut replay = Vec::new();
    while replay.len() < 2 {
        let t = text(&mut ws).await;
        if t.starts_with(r#"42["x""#) || t.starts_with(r#"42["y""#) {
            replay.push(t);
        }
    }
    // Restored slot by slot: x's replay is queued before y is subscribed.
    assert_eq!(
        replay,
        [r#"42["x",{"n":2},"3.2.1"]"#, r#"42["y",{"n":3},"3.2.2"]"#]
    );
    // An unknown pid: a new session.
    let (_ws, answer) = connect(&b, json!({"pid": "0".repeat(32), "offset": "1"})).await;
    assert_ne!(answer["pid"], json!("0".repeat(32)));
}

/// A recovery that fails answers with a new pid; when that answer is lost
/// (the connection drops again first), the client comes back with the old
/// pid and position and must be told the same: the old record stays.
#[tokio::test]
async fn a_failed_recovery_whose_answer_is_lost_fails_the_same_way_again() {
    let redis = Redis::start();
    let pfx = prefix("csr-lost");
    let small = [("HISTORY_SIZE", "2")];
    let a = csr_node("a", &redis, &pfx, &small);
    let b = csr_node("b", &redis, &pfx, &small);
    let (mut ws, answer) = connect(&a, json!({})).await;
    let pid = answer["pid"].as_str().expect("pid").to_string();
    ws.send(Message::Text(r#"420["subscribe","x"]"#.into()))
        .await
        .unwrap();
    assert!(until(&mut ws, "430").await.contains(r#""ok":true"#));
    let publish = |n: u64| {
        let (status, _) = b.post(
            "/api/publish",
            &json!({"topic": "x", "data": {"n": n}}).to_string(),
        );
        assert_eq!(status, 202);
    };
    publish(1);
    let first = until(&mut ws, r#"42["x""#).await;
    let token: Value = serde_json::from_str(&first[2..]).unwrap();
    let token = token[2].as_str().expect("positions token").to_string();
    drop(ws);
    // History keeps 3 and 4 of x: 2 is gone, so 2 to 4 are announced lost
    // (nothing of a broken range is replayed).
    for n in 2..=4 {
        publish(n);
    }
    for node in [&b, &a] {
        let (mut ws, answer) = connect(node, json!({"pid": pid, "offset": token})).await;
        assert_ne!(answer["pid"], json!(pid), "not recovered: {answer}");
        let gap = until(&mut ws, r#"42["gap""#).await;
        let gap: Value = serde_json::from_str(&gap[2..]).unwrap();
        assert_eq!(
            (&gap[1]["topic"], &gap[1]["from"], &gap[1]["to"]),
            (&json!("x"), &json!(2), &json!(4)),
            "{gap}"
        );
        // This connection drops before the client could keep its new pid.
        drop(ws);
    }
}

/// A drop-in emit of several arguments on a topic without history: the
/// client keeps the last string argument of any event as its offset, so
/// the frame must end with the session's positions, not with `"hi"`.
#[tokio::test]
async fn a_drop_in_emit_of_several_arguments_ends_with_the_positions() {
    let redis = Redis::start();
    let pfx = prefix("csr-spread");
    let a = csr_node(
        "a",
        &redis,
        &pfx,
        &[
            ("HISTORY_TOPICS", "kept.*"),
            ("COMPAT_PYTHON_SOCKETIO", "csr-spread-py"),
        ],
    );
    let (mut ws, _) = connect(&a, json!({})).await;
    ws.send(Message::Text(r#"420["subscribe","room1"]"#.into()))
        .await
        .unwrap();
    let ack = until(&mut ws, "430").await;
    assert!(ack.contains(r#""ok":true"#), "{ack}");
    // python-socketio 5.15.1+ `emit("chat", ("alice", "hi"), room="room1")`,
    // sent until the node (the leader, once elected) consumes it.
    let emit = json!({"method": "emit", "event": "chat", "data": ["alice", "hi"],
        "binary": false, "namespace": "/", "room": "room1", "skip_sid": null,
        "callback": null, "host_id": "py"})
    .to_string();
    let frame = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            // An integer reply, which `call` reports as not an array.
            let _ = redis.call(&["PUBLISH", "csr-spread-py", &emit]);
            if let Ok(t) =
                tokio::time::timeout(Duration::from_millis(300), until(&mut ws, r#"42["chat""#))
                    .await
            {
                return t;
            }
        }
    })
    .await
    .expect("the emit arrived");
    let args: Vec<Value> = serde_json::from_str(&frame[2..]).unwrap();
    assert_eq!(
        args[..3],
        [json!("chat"), json!("alice"), json!("hi")],
        "{frame}"
    );
    assert_eq!(args.len(), 4, "{frame}");
    assert_ne!(args[3], json!("hi"), "{frame}");
}

/// A topic the subscribe hook allowed, which the socket's token does not
/// name, comes back with the session: recovery does not ask the hook again
/// and must not take the hook's answer back either.
#[tokio::test]
async fn a_topic_the_subscribe_hook_allowed_comes_back_with_the_session() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    const SECRET: &str = "a-recovery-test-secret-of-some-length";
    let asked = Arc::new(AtomicU64::new(0));
    let hook = {
        let asked = asked.clone();
        axum::Router::new().route(
            "/subscribe",
            axum::routing::post(move || {
                asked.fetch_add(1, Ordering::SeqCst);
                async { axum::Json(json!({"result": {}})) }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/subscribe", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });
    let redis = Redis::start();
    let pfx = prefix("csr-hook");
    let env = [
        ("AUTH_JWT_SECRET", SECRET),
        ("PROXY_SUBSCRIBE_URL", hook_url.as_str()),
        ("PROXY_SUBSCRIBE_TOPICS", "room.*"),
    ];
    let a = csr_node("a", &redis, &pfx, &env);
    let b = csr_node("b", &redis, &pfx, &env);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let sign = |topics: Value| {
        encode(
            &Header::default(),
            &json!({"sub": "ann", "exp": exp, "topics": topics}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let token = sign(json!(["news"]));
    let (mut ws, answer) = connect(&a, json!({"token": token})).await;
    let pid = answer["pid"].as_str().expect("pid").to_string();
    subscribe_all(&mut ws, &["room.1", "news"]).await;
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "the hook decides room.1 only"
    );
    let publish = |topic: &str, n: u64| {
        let (status, v) = b.post(
            "/api/publish",
            &json!({"topic": topic, "data": {"n": n}}).to_string(),
        );
        assert_eq!(status, 202, "{v}");
    };
    publish("room.1", 1);
    let first = until(&mut ws, r#"42["room.1""#).await;
    let args: Vec<Value> = serde_json::from_str(&first[2..]).unwrap();
    let offset = args[2].as_str().expect("positions").to_string();
    drop(ws);
    publish("room.1", 2);
    let (mut ws, answer) = connect(&b, json!({"token": token, "pid": pid, "offset": offset})).await;
    assert_eq!(answer["pid"], json!(pid), "not recovered: {answer}");
    let mut replayed = None;
    let mut revoked: Vec<String> = Vec::new();
    while replayed.is_none() {
        let t = text(&mut ws).await;
        if t.starts_with(r#"42["room.1""#) {
            replayed = Some(t);
        } else if t.starts_with(r#"42["unsubscribed""#) {
            revoked.push(t);
        }
    }
    let replayed: Vec<Value> = serde_json::from_str(&replayed.unwrap()[2..]).unwrap();
    assert_eq!(replayed[1], json!({"n": 2}));
    // Live again, and still not asked again.
    publish("room.1", 3);
    let live = until(&mut ws, r#"42["room.1""#).await;
    assert!(live.contains(r#"{"n":3}"#), "{live}");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "recovery asked the hook");
    publish("news", 1);
    loop {
        let t = text(&mut ws).await;
        if t.starts_with(r#"42["unsubscribed""#) {
            revoked.push(t);
        } else if t.starts_with(r#"42["news""#) {
            break;
        }
    }
    assert!(revoked.is_empty(), "{revoked:?}");
}

/// Recovery gives topics back by the rule of a `refresh`: a hook-covered
/// topic that the old token named itself (the hook was never asked) is
/// ended when the returning token no longer names it, while one the hook
/// granted is kept; and a subscription made with `presence: true` comes
/// back with its `presence_diff` events.
#[tokio::test]
async fn recovery_keeps_what_the_hook_granted_ends_what_the_old_token_named_and_keeps_presence() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    const SECRET: &str = "a-recovery-test-secret-of-some-length";
    let hook = axum::Router::new().route(
        "/subscribe",
        axum::routing::post(|| async { axum::Json(json!({"result": {}})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/subscribe", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });
    let redis = Redis::start();
    let pfx = prefix("csr-rule");
    let env = [
        ("AUTH_JWT_SECRET", SECRET),
        ("PROXY_SUBSCRIBE_URL", hook_url.as_str()),
        ("PROXY_SUBSCRIBE_TOPICS", "room.*"),
        ("PRESENCE_TOPICS", "room.*"),
        ("PRESENCE_DIFF_INTERVAL_MS", "100"),
    ];
    let a = csr_node("a", &redis, &pfx, &env);
    let b = csr_node("b", &redis, &pfx, &env);
    let sign = |sub: &str, topics: Value| {
        encode(
            &Header::default(),
            &json!({"sub": sub, "exp": 4_000_000_000u64, "topics": topics}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    // room.1: granted by the hook, with presence; room.2: named by the token.
    let (mut ws, answer) = connect(&a, json!({"token": sign("ann", json!(["room.2"]))})).await;
    let pid = answer["pid"].as_str().expect("pid").to_string();
    let subscribes = [
        r#"["subscribe",{"topic":"room.1","presence":true}]"#,
        r#"["subscribe","room.2"]"#,
    ];
    for (i, frame) in subscribes.iter().enumerate() {
        ws.send(Message::Text(format!("42{i}{frame}").into()))
            .await
            .unwrap();
        let ack = until(&mut ws, &format!("43{i}")).await;
        assert!(ack.contains(r#""ok":true"#), "{frame}: {ack}");
    }
    drop(ws);
    // Back on the other node with a token that names room.2 no more.
    let (mut ws, answer) = connect(&b, json!({"token": sign("ann", json!([])), "pid": pid})).await;
    assert_ne!(answer["pid"], json!(pid), "a topic ended: not recovered");
    let revoked = until(&mut ws, r#"42["unsubscribed""#).await;
    assert!(
        revoked.contains("room.2") && revoked.contains("permission revoked"),
        "{revoked}"
    );
    // room.1 is back with its watcher: another user's join is a diff.
    let (mut other, _) = connect(&a, json!({"token": sign("bob", json!([]))})).await;
    other
        .send(Message::Text(r#"420["subscribe","room.1"]"#.into()))
        .await
        .unwrap();
    until(&mut other, "430").await;
    let diff = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let t = text(&mut ws).await;
            if t.starts_with(r#"42["presence_diff""#) && t.contains("bob") {
                return t;
            }
        }
    })
    .await
    .expect("a presence_diff with bob's join");
    assert!(diff.contains("room.1"), "{diff}");
}

/// A session's record can hold more topics than a node allows (written by
/// a node with a larger `WEBSOCKET_MAX_SUBSCRIPTIONS`, or before the limit
/// was lowered): the limit holds for what comes back too, the rest is
/// refused as a subscribe past it would be, and the recovery says so.
#[tokio::test]
async fn a_recovery_restores_no_more_topics_than_the_subscription_limit() {
    let redis = Redis::start();
    let pfx = prefix("csr-limit");
    let a = csr_node("a", &redis, &pfx, &[]);
    let b = csr_node("b", &redis, &pfx, &[("WEBSOCKET_MAX_SUBSCRIPTIONS", "4")]);
    let topics = ["l0", "l1", "l2", "l3", "l4", "l5"];
    let (mut ws, answer) = connect(&a, json!({})).await;
    let pid = answer["pid"].as_str().expect("pid").to_string();
    subscribe_all(&mut ws, &topics).await;
    drop(ws);
    // On b: the device state keeps its place, three of the six come back.
    let (mut ws, answer) = connect(&b, json!({"pid": pid})).await;
    assert_ne!(
        answer["pid"], pid,
        "not recovered: some topics are not back"
    );
    let mut refused = Vec::new();
    while refused.len() < 3 {
        let t = until(&mut ws, r#"42["error""#).await;
        let e: Value = serde_json::from_str(&t[2..]).unwrap();
        assert_eq!(e[1]["code"], "subscription_limit", "{t}");
        refused.push(e[1]["topic"].as_str().unwrap().to_string());
    }
    assert_eq!(refused, ["l3", "l4", "l5"]);
    // The device state is still subscribed (its events follow the CONNECT).
    until(&mut ws, r#"42["apps_list""#).await;
    // The refused ones first: had one come back, it would arrive first.
    for topic in ["l3", "l4", "l5", "l0", "l1", "l2"] {
        let (status, _) = b.post(
            "/api/publish",
            &format!(r#"{{"topic":"{topic}","data":"{topic}"}}"#),
        );
        assert_eq!(status, 202);
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while got.len() < 3 && tokio::time::Instant::now() < deadline {
        let t = text(&mut ws).await;
        if let Some(rest) = t.strip_prefix(r#"42[""#)
            && let Some((event, _)) = rest.split_once('"')
            && event.starts_with('l')
        {
            got.push(event.to_string());
        }
    }
    assert_eq!(got, ["l0", "l1", "l2"]);
    // A fourth topic is one past the limit, live as well.
    ws.send(Message::Text(r#"429["subscribe","l9"]"#.into()))
        .await
        .unwrap();
    let ack = until(&mut ws, "439").await;
    assert!(ack.contains("subscription limit of 4 topics"), "{ack}");
    let metrics = b.get("/metrics").1;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains(
            r#"switchboard_limit_refusals_total{limit="subscriptions_per_connection"} 4"#
        ),
        "{metrics}"
    );
}
