//! Drop-in migration (`COMPAT_*`): back ends keep their emit calls, and the
//! REAL packages publish in these tests: python-socketio's
//! `RedisManager(write_only=True)`, Node's `@socket.io/redis-emitter`
//! (with node-redis 4) and `channels_redis`'s `RedisPubSubChannelLayer`
//! (scripts in `tests/interop/compat_*`). Official socket.io-client and
//! python-socketio apps and native clients on several nodes receive; every
//! emit must arrive once at exactly the clients a Socket.IO server would
//! have delivered it to, and be exactly one publication (offsets on history
//! topics) however many nodes run.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Client, Node, Redis, consuming, eventually, interop_script, prefix, python, tools};
use serde_json::{Value, json};

const PY_CHANNEL: &str = "socketio";
const EMITTER_KEY: &str = "socket.io";
const CHANNELS_PREFIX: &str = "asgi";

fn compat_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("COMPAT_PYTHON_SOCKETIO", PY_CHANNEL),
        ("COMPAT_SOCKETIO_EMITTER", EMITTER_KEY),
        ("COMPAT_CHANNELS_PREFIX", CHANNELS_PREFIX),
        ("HISTORY_SIZE", "5000"),
        ("SHUTDOWN_READINESS_DELAY_MS", "0"),
        ("SHUTDOWN_GRACE_MS", "3000"),
        ("LEADER_LEASE_MS", "3000"),
        ("RUST_LOG", "info,switchboard::compat=debug"),
    ]
}

fn start(name: &str, redis: &Redis, pfx: &str) -> Node {
    Node::start_on_redis(
        name,
        &redis.url(),
        pfx,
        &compat_env(),
        Duration::from_secs(15),
    )
}

fn node_bin() -> std::path::PathBuf {
    "node".into()
}

/// A helper process whose stdout lines are read as they come.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    what: String,
}

impl Proc {
    fn spawn(program: &std::path::Path, args: &[&str]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .env("SWITCHBOARD_TOOLS", tools())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: vec![],
            what: format!("{} {}", program.display(), args.join(" ")),
        }
    }

    /// The rest of the first line starting with `tag`.
    fn line(&mut self, tag: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if let Some(rest) = l.strip_prefix(tag) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!(
                    "{}: no {tag} line within {within:?}; output:\n{}",
                    self.what,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the exit (and an `OK` line) of a process that ends by itself.
    fn finish(mut self, within: Duration) -> Vec<String> {
        self.line("OK", within);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}: {status}", self.what);
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn py_emit(redis: &Redis, steps: Value) -> Proc {
    py_emit_on(redis, PY_CHANNEL, steps)
}

fn py_emit_on(redis: &Redis, channel: &str, steps: Value) -> Proc {
    Proc::spawn(
        &python(),
        &[
            &interop_script("compat_python_emit.py"),
            &redis.url(),
            channel,
            "steps",
            &steps.to_string(),
        ],
    )
}

fn js_emit(redis: &Redis, steps: Value) -> Proc {
    Proc::spawn(
        &node_bin(),
        &[
            &interop_script("compat_emitter.mjs"),
            &redis.url(),
            EMITTER_KEY,
            "steps",
            &steps.to_string(),
        ],
    )
}

/// An official Socket.IO client app ("js" or "py") on `node` in `rooms`;
/// returns it once it is subscribed, with its `sid`.
fn sio_client(kind: &str, node: &Node, rooms: &str) -> (Proc, String) {
    sio_client_at(kind, &node.addr, rooms)
}

fn sio_client_at(kind: &str, addr: &str, rooms: &str) -> (Proc, String) {
    let url = format!("http://{addr}");
    let mut p = match kind {
        "js" => Proc::spawn(
            &node_bin(),
            &[&interop_script("compat_client.mjs"), &url, rooms],
        ),
        _ => Proc::spawn(
            &python(),
            &[&interop_script("compat_client.py"), &url, rooms],
        ),
    };
    let sid = p.line("READY", Duration::from_secs(20));
    (p, sid)
}

/// The events a Socket.IO client app printed: `[event, args...]` each.
fn sio_events(p: Proc) -> Vec<Value> {
    let lines = p.finish(Duration::from_secs(30));
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("EVENTS "))
        .expect("EVENTS line");
    serde_json::from_str::<Vec<Value>>(line).unwrap()
}

/// A native client's events until `done`: `[name, data]` each (the node's
/// `subscribed` answers and the like skipped).
async fn native_events(c: &mut Client) -> Vec<Value> {
    let mut out = vec![];
    loop {
        let m = c.recv().await;
        if m["type"] != "event" {
            continue;
        }
        out.push(json!([m["name"], m["data"]]));
        if m["name"] == "done" {
            return out;
        }
    }
}

async fn native(node: &Node, topics: &[&str]) -> Client {
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    for t in topics {
        c.subscribe(t).await;
    }
    c
}

/// Publications stored in `topic`'s history: `(offset, event, data)`.
fn history(node: &Node, topic: &str) -> Vec<(u64, String, Value)> {
    let (status, body) = node.get(&format!("/api/history/{topic}?limit=5000"));
    assert_eq!(status, 200, "{body}");
    body["data"]["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|p| {
            (
                p["offset"].as_u64().unwrap(),
                p["event"].as_str().unwrap_or_default().to_string(),
                p["data"].clone(),
            )
        })
        .collect()
}

fn metric(node: &Node, source: &str, outcome: &str) -> u64 {
    let (_, text) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    let want =
        format!("switchboard_compat_messages_total{{source=\"{source}\",outcome=\"{outcome}\"}}");
    text.lines()
        .filter(|l| l.starts_with("switchboard_compat_messages_total{"))
        .find(|l| {
            // Label order is the exporter's; compare as sets.
            let labels = |s: &str| {
                let mut v: Vec<String> = s[s.find('{').unwrap() + 1..s.find('}').unwrap()]
                    .split(',')
                    .map(str::to_string)
                    .collect();
                v.sort();
                v
            };
            labels(l) == labels(&want)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_socketio_emits_reach_each_client_once() {
    let redis = Redis::start();
    let pfx = prefix("compat-py");
    let a = start("a", &redis, &pfx);
    let b = start("b", &redis, &pfx);
    consuming(&[&a, &b]);

    let (js_a, js_sid) = sio_client("js", &a, "room1");
    let (py_b, py_sid) = sio_client("py", &b, "room1");
    let mut native_a = native(&a, &["room1", "broadcast"]).await;
    let mut native_b = native(&b, &["broadcast"]).await;

    let steps = |js_sid: &str, py_sid: &str, skip: &str| {
        json!([
            ["emit", "c1", {"n": 1}, {"room": "room1"}],
            ["emit", "c2", [1, 2], {}],
            ["emit", "c3", "skip", {"room": "room1", "skip_sid": js_sid}],
            ["enter_room", py_sid, "room2"],
            ["sleep", 0.5],
            ["emit", "c4", {"private": true}, {"to": "room2"}],
            ["emit", "c5", {"n": 5}, {"room": ["room1", "room2"], "skip_sid": [skip]}],
            ["emit_args", "c6", [1, "two"], {}],
            ["sleep", 0.2],
            ["emit", "done", null, {}],
        ])
    };
    py_emit(&redis, steps(&js_sid, &py_sid, &native_a.client_id)).finish(Duration::from_secs(20));
    let (js_got, py_got) = (sio_events(js_a), sio_events(py_b));

    // python-socketio's own servers (two, sharing the Redis manager on a
    // channel of their own), the same clients, the same emits.
    let ref_channel = "socketio-reference";
    let servers: Vec<(Proc, String)> = (0..2)
        .map(|_| {
            let port = common::free_port().to_string();
            let mut p = Proc::spawn(
                &python(),
                &[
                    &interop_script("compat_reference_server.py"),
                    &redis.url(),
                    ref_channel,
                    &port,
                ],
            );
            p.line("LISTENING", Duration::from_secs(20));
            (p, format!("127.0.0.1:{port}"))
        })
        .collect();
    let (ref_js, ref_js_sid) = sio_client_at("js", &servers[0].1, "room1");
    let (ref_py, ref_py_sid) = sio_client_at("py", &servers[1].1, "room1");
    let mut ref_steps = steps(&ref_js_sid, &ref_py_sid, "nobody");
    // The reference servers subscribe to Redis after their first connection.
    ref_steps
        .as_array_mut()
        .unwrap()
        .insert(0, json!(["sleep", 1.0]));
    py_emit_on(&redis, ref_channel, ref_steps).finish(Duration::from_secs(20));
    assert_eq!(
        js_got,
        sio_events(ref_js),
        "socket.io-client: as python-socketio delivers"
    );
    assert_eq!(
        py_got,
        sio_events(ref_py),
        "python-socketio client: as python-socketio delivers"
    );
    drop(servers);

    // Which is, each once:
    assert_eq!(
        js_got,
        [
            json!(["c1", {"n": 1}]),
            json!(["c2", [1, 2]]),
            json!(["c5", {"n": 5}]),
            json!(["c6", 1, "two"]),
            json!(["done"])
        ]
    );
    assert_eq!(
        py_got,
        [
            json!(["c1", {"n": 1}]),
            json!(["c2", [1, 2]]),
            json!(["c3", "skip"]),
            json!(["c4", {"private": true}]),
            json!(["c5", {"n": 5}]),
            json!(["c6", 1, "two"]),
            json!(["done"])
        ]
    );
    assert_eq!(
        native_events(&mut native_a).await,
        [
            json!(["c1", {"n": 1}]),
            json!(["c2", [1, 2]]),
            json!(["c3", "skip"]),
            json!(["c6", [1, "two"]]),
            json!(["done", null])
        ]
    );
    assert_eq!(
        native_events(&mut native_b).await,
        [
            json!(["c2", [1, 2]]),
            json!(["c6", [1, "two"]]),
            json!(["done", null])
        ]
    );
    // One publication per emit and room, with offsets (not one per node).
    let events =
        |t| -> Vec<(u64, String)> { history(&a, t).into_iter().map(|(o, e, _)| (o, e)).collect() };
    assert_eq!(
        events("room1"),
        [(1, "c1".into()), (2, "c3".into()), (3, "c5".into())]
    );
    assert_eq!(events("room2"), [(1, "c4".into()), (2, "c5".into())]);
    assert_eq!(
        events("broadcast"),
        [(1, "c2".into()), (2, "c6".into()), (3, "done".into())]
    );
    let published =
        metric(&a, "python-socketio", "published") + metric(&b, "python-socketio", "published");
    assert_eq!(published, 7, "each emit consumed once, by the leader");
    let applied =
        metric(&a, "python-socketio", "applied") + metric(&b, "python-socketio", "applied");
    assert_eq!(applied, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_emitter_emits_and_sockets_join() {
    let redis = Redis::start();
    let pfx = prefix("compat-js");
    let a = start("a", &redis, &pfx);
    let b = start("b", &redis, &pfx);
    consuming(&[&a, &b]);

    let (js_a, js_sid) = sio_client("js", &a, "r1,r2");
    let (py_b, _) = sio_client("py", &b, "r1");
    let mut native_b = native(&b, &["r2", "r3", "broadcast"]).await;
    let mut native_a = native(&a, &["r2", "broadcast"]).await;

    let emit = js_emit(
        &redis,
        json!([
            ["emit", "m1", {"n": 1}, {"rooms": ["r1"]}],
            ["emit", "m2", {"n": 2}, {"rooms": ["r1", "r2"], "except": ["r3"]}],
            ["emit", "m3", "all", {}],
            ["socketsJoin", [js_sid], ["r4"]],
            ["sleep", 500],
            ["emit", "m4", {"n": 4}, {"rooms": ["r4"]}],
            ["emit_args", "m5", [1, "two"], {"rooms": ["r1"]}],
            // A JavaScript Date: what a Socket.IO server would send for it.
            ["emit_date", "m6", "2026-12-07T08:32:23.123Z", {"rooms": ["r1"]}],
            ["sleep", 200],
            ["emit", "done", null, {}],
        ]),
    );
    emit.finish(Duration::from_secs(20));

    assert_eq!(
        sio_events(js_a),
        [
            json!(["m1", {"n": 1}]),
            json!(["m2", {"n": 2}]),
            json!(["m3", "all"]),
            json!(["m4", {"n": 4}]),
            json!(["m5", 1, "two"]),
            json!(["m6", {"at": "2026-12-07T08:32:23.123Z"}]),
            json!(["done", null])
        ]
    );
    assert_eq!(
        sio_events(py_b),
        [
            json!(["m1", {"n": 1}]),
            json!(["m2", {"n": 2}]),
            json!(["m3", "all"]),
            json!(["m5", 1, "two"]),
            json!(["m6", {"at": "2026-12-07T08:32:23.123Z"}]),
            json!(["done", null])
        ]
    );
    assert_eq!(
        native_events(&mut native_b).await,
        [json!(["m3", "all"]), json!(["done", null])]
    );
    assert_eq!(
        native_events(&mut native_a).await,
        [
            json!(["m2", {"n": 2}]),
            json!(["m3", "all"]),
            json!(["done", null])
        ]
    );
    assert_eq!(history(&b, "r1").len(), 4);
    assert_eq!(history(&b, "r2").len(), 1);
    assert_eq!(history(&b, "r4").len(), 1);
}

/// A Redis user `sb` with `rules` besides its password; the URL that logs
/// in as it.
fn acl_user(redis: &Redis, rules: &[&str]) -> String {
    let mut cmd = vec!["ACL", "SETUSER", "sb", "on", ">sb-pass"];
    cmd.extend_from_slice(rules);
    redis.cmd(&cmd);
    format!("redis://sb:sb-pass@127.0.0.1:{}", redis.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_group_send_is_an_event_on_the_group() {
    let redis = Redis::start();
    let pfx = prefix("compat-dj");
    // No COMPAT_* setting at all: channels_redis's default prefix `asgi` is
    // the node's default too, so an unchanged Channels app needs none.
    let a = Node::start_on_redis(
        "a",
        &redis.url(),
        &pfx,
        &[("LEADER_LEASE_MS", "3000")],
        Duration::from_secs(15),
    );
    consuming(&[&a]);
    let m = common::group_send_arrives(&a, &redis.url(), CHANNELS_PREFIX, "feature_42", 7).await;
    assert_eq!(m["name"], "status_update", "{m}");
    assert_eq!(m["topic"], "feature_42", "{m}");
    assert_eq!(m["data"], json!({"value": 7}), "{m}");
    assert_eq!(m["offset"], 1, "{m}");
}

/// A leader whose compat subscription is refused (a Redis ACL without the
/// compat channels, or a `PSUBSCRIBE` that timed out) keeps trying, and
/// consumes once it may, without waiting for a reconnect or a new term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_compat_subscription_is_tried_again_until_it_holds() {
    let redis = Redis::start();
    let pfx = prefix("compat-acl");
    // The node's own user may use its prefix's channels only; the Channels
    // app publishes as `default`, which may use every channel.
    let own = format!("&{pfx}:*");
    let url = acl_user(&redis, &["~*", "+@all", "resetchannels", &own]);
    let a = Node::start_on_redis(
        "a",
        &url,
        &pfx,
        &[
            ("LEADER_LEASE_MS", "3000"),
            ("RUST_LOG", "info,switchboard::compat=debug"),
        ],
        Duration::from_secs(15),
    );
    // Refused, logged once, and refused again on every try while the ACL
    // stands (the tries 100, 200, 400 ms … apart; the refusal logged again
    // once a minute).
    assert!(
        eventually(Duration::from_secs(15), || a
            .log()
            .contains("subscribing to compat channels failed")),
        "{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        a.log()
            .matches("subscribing to compat channels failed")
            .count(),
        1,
        "{}",
        a.log()
    );
    assert!(
        !a.log().contains("listening on compat channels"),
        "{}",
        a.log()
    );
    redis.cmd(&[
        "ACL",
        "SETUSER",
        "sb",
        &format!("&{CHANNELS_PREFIX}__group__*"),
    ]);
    consuming(&[&a]);
    let m = common::group_send_arrives(&a, &redis.url(), CHANNELS_PREFIX, "feature_7", 8).await;
    assert_eq!(m["name"], "status_update", "{m}");
    assert_eq!(m["data"], json!({"value": 8}), "{m}");
}

/// A Redis user without `CLIENT INFO` cannot have its compat subscription
/// checked: the consumer takes it as sent, and consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_info_the_compat_subscription_is_taken_as_sent() {
    let redis = Redis::start();
    let pfx = prefix("compat-noinfo");
    let url = acl_user(&redis, &["~*", "+@all", "-client|info", "allchannels"]);
    let a = Node::start_on_redis(
        "a",
        &url,
        &pfx,
        &[("LEADER_LEASE_MS", "3000")],
        Duration::from_secs(15),
    );
    consuming(&[&a]);
    assert!(!a.log().contains("compat channels failed"), "{}", a.log());
    let m = common::group_send_arrives(&a, &redis.url(), CHANNELS_PREFIX, "feature_8", 9).await;
    assert_eq!(m["data"], json!({"value": 9}), "{m}");
}

// === malformed input ===

/// `PUBLISH channel payload` over a raw connection: payloads of any bytes
/// and any size (redis-cli arguments cannot carry 10 MB).
fn publish_raw(redis: &Redis, channel: &str, payload: &[u8]) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    let mut cmd = Vec::new();
    for arg in [b"PUBLISH".as_slice(), channel.as_bytes(), payload] {
        cmd.extend(format!("${}\r\n", arg.len()).as_bytes());
        cmd.extend(arg);
        cmd.extend(b"\r\n");
    }
    s.write_all(b"*3\r\n").unwrap();
    s.write_all(&cmd).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    assert!(reply.starts_with(':'), "{reply}");
}

/// MessagePack of a JSON value (enough for the tests' shapes).
fn pack(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    fn put(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Null => out.push(0xc0),
            Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            Value::Number(n) => {
                out.push(0xd3);
                out.extend(n.as_i64().unwrap().to_be_bytes());
            }
            Value::String(s) => {
                out.push(0xdb);
                out.extend((s.len() as u32).to_be_bytes());
                out.extend(s.as_bytes());
            }
            Value::Array(a) => {
                out.push(0xdd);
                out.extend((a.len() as u32).to_be_bytes());
                a.iter().for_each(|x| put(x, out));
            }
            Value::Object(m) => {
                out.push(0xdf);
                out.extend((m.len() as u32).to_be_bytes());
                for (k, x) in m {
                    put(&Value::String(k.clone()), out);
                    put(x, out);
                }
            }
        }
    }
    put(v, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_refused_counted_logged_and_the_next_is_served() {
    let redis = Redis::start();
    let pfx = prefix("compat-bad");
    let a = start("a", &redis, &pfx);
    consuming(&[&a]);
    let mut c = native(&a, &["ok"]).await;
    let deep_json = format!(
        "{{\"method\":\"emit\",\"event\":\"x\",\"data\":{}1{}}}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let big = format!(
        "{{\"method\":\"emit\",\"event\":\"x\",\"room\":\"ok\",\"data\":[\"{}\"]}}",
        "a".repeat(10_000_000)
    );
    let deep_msgpack = [vec![0x91u8; 20_000], vec![0xc0]].concat();
    let big_msgpack = pack(
        &json!(["e", {"type": 2, "data": ["x", "a".repeat(10_000_000)], "nsp": "/"}, {"rooms": ["ok"]}]),
    );
    let emitter = format!("{EMITTER_KEY}#/#");
    let request = format!("{EMITTER_KEY}-request#/#");
    let group = format!("{CHANNELS_PREFIX}__group__ok");
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        // (source label, channel, payload, outcome)
        (
            "python-socketio",
            PY_CHANNEL,
            b"{not json".to_vec(),
            "malformed",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            b"[1,2]".to_vec(),
            "malformed",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            br#"{"method":"emit","data":[1]}"#.to_vec(),
            "malformed",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            deep_json.into_bytes(),
            "invalid",
        ),
        ("python-socketio", PY_CHANNEL, big.into_bytes(), "invalid"),
        (
            "python-socketio",
            PY_CHANNEL,
            b"\x80\x04\x95\x20\x00\x00".to_vec(),
            "refused",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            br#"{"method":"emit","event":"x","data":[1],"namespace":"/chat"}"#.to_vec(),
            "refused",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            br#"{"method":"emit","event":"x","data":["x"],"binary":true}"#.to_vec(),
            "refused",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            br#"{"method":"emit","event":"x","data":[1],"room":"ok","callback":["ok","/",1]}"#
                .to_vec(),
            "refused",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            br#"{"method":"emit","event":"bad event","data":[1],"room":"ok"}"#.to_vec(),
            "invalid",
        ),
        (
            "python-socketio",
            PY_CHANNEL,
            br#"{"method":"emit","event":"x","data":[1],"room":"00000000000000ab"}"#.to_vec(),
            "refused",
        ),
        (
            "socketio-emitter",
            emitter.as_str(),
            b"\xc1\xc1".to_vec(),
            "malformed",
        ),
        (
            "socketio-emitter",
            emitter.as_str(),
            b"{\"json\": true}".to_vec(),
            "malformed",
        ),
        (
            "socketio-emitter",
            emitter.as_str(),
            pack(&json!({"a": 1})),
            "malformed",
        ),
        (
            "socketio-emitter",
            emitter.as_str(),
            deep_msgpack.clone(),
            "invalid",
        ),
        ("socketio-emitter", emitter.as_str(), big_msgpack, "invalid"),
        (
            "socketio-emitter",
            "socket.io#/admin#",
            pack(&json!(["e", {"type": 2, "data": ["x"], "nsp": "/admin"}, {}])),
            "refused",
        ),
        (
            "socketio-emitter",
            request.as_str(),
            b"not json".to_vec(),
            "malformed",
        ),
        (
            "socketio-emitter",
            request.as_str(),
            br#"{"type":2,"opts":{"rooms":[],"except":[]},"rooms":["x"]}"#.to_vec(),
            "refused",
        ),
        ("channels", group.as_str(), b"\xc1".to_vec(), "malformed"),
        (
            "channels",
            group.as_str(),
            pack(&json!({"value": 7})),
            "malformed",
        ),
        ("channels", group.as_str(), deep_msgpack, "invalid"),
        (
            "channels",
            group.as_str(),
            pack(&json!({"type": "x", "blob": "a".repeat(10_000_000)})),
            "invalid",
        ),
    ];
    let mut expected: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (source, channel, payload, outcome) in &cases {
        publish_raw(&redis, channel, payload);
        *expected.entry((*source, *outcome)).or_default() += 1;
    }
    // The next good message of each source is delivered.
    let good_py = json!({"method": "emit", "event": "good", "data": [1], "binary": false,
        "namespace": "/", "room": "ok", "skip_sid": null, "callback": null, "host_id": "t"});
    publish_raw(&redis, PY_CHANNEL, good_py.to_string().as_bytes());
    publish_raw(
        &redis,
        &format!("{emitter}ok#"),
        &pack(
            &json!(["e", {"type": 2, "data": ["good", 2], "nsp": "/"}, {"rooms": ["ok"], "except": [], "flags": {}}]),
        ),
    );
    publish_raw(
        &redis,
        group.as_str(),
        &pack(&json!({"type": "good", "n": 3})),
    );
    let mut got = vec![];
    for _ in 0..3 {
        let m = c.expect("event").await;
        got.push(m["data"].clone());
    }
    assert_eq!(got, [json!(1), json!(2), json!({"n": 3})]);
    *expected
        .entry(("python-socketio", "published"))
        .or_default() += 1;
    *expected
        .entry(("socketio-emitter", "published"))
        .or_default() += 1;
    *expected.entry(("channels", "published")).or_default() += 1;
    for ((source, outcome), n) in &expected {
        assert_eq!(metric(&a, source, outcome), *n, "{source} {outcome}");
    }
    assert_eq!(a.health()["status"], "ok", "{}", a.health());
    let log = a.log();
    assert!(log.contains("compat message not served"), "{log}");
    assert!(log.contains("pickle"), "the log says why");
    assert!(log.contains(&emitter), "the log names the channel");
}

// === exactly once, 3 nodes ===

fn load(source: &str, redis: &Redis, topic: &str, count: u32, rate: u32) -> Proc {
    let (count, rate) = (count.to_string(), rate.to_string());
    match source {
        "python" => Proc::spawn(
            &python(),
            &[
                &interop_script("compat_python_emit.py"),
                &redis.url(),
                PY_CHANNEL,
                "load",
                topic,
                &count,
                &rate,
            ],
        ),
        "emitter" => Proc::spawn(
            &node_bin(),
            &[
                &interop_script("compat_emitter.mjs"),
                &redis.url(),
                EMITTER_KEY,
                "load",
                topic,
                &count,
                &rate,
            ],
        ),
        _ => Proc::spawn(
            &python(),
            &[
                &interop_script("compat_channels.py"),
                &redis.url(),
                CHANNELS_PREFIX,
                "load",
                topic,
                &count,
                &rate,
            ],
        ),
    }
}

/// The `seq`s stored in `topic`'s history, with how often each is there.
fn seqs(node: &Node, topic: &str) -> (u64, HashMap<u64, usize>) {
    let h = history(node, topic);
    let top = h.last().map_or(0, |p| p.0);
    let mut counts = HashMap::new();
    for (_, _, data) in h {
        *counts.entry(data["seq"].as_u64().unwrap()).or_default() += 1;
    }
    (top, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_publication_per_emit_and_a_rolling_restart() {
    let redis = Redis::start();
    let pfx = prefix("compat-3");
    let mut nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| start(n, &redis, &pfx))
        .collect();
    consuming(&nodes.iter().collect::<Vec<_>>());

    // 1,000 emits at 200/s from each source at once: 1,000 publications each.
    let runs: Vec<Proc> = [
        ("python", "load.py"),
        ("emitter", "load.js"),
        ("channels", "load.dj"),
    ]
    .iter()
    .map(|(s, t)| load(s, &redis, t, 1000, 200))
    .collect();
    for r in runs {
        r.finish(Duration::from_secs(30));
    }
    for topic in ["load.py", "load.js", "load.dj"] {
        assert!(eventually(Duration::from_secs(5), || seqs(
            &nodes[0], topic
        )
        .0 >= 1000));
        let (top, counts) = seqs(&nodes[0], topic);
        assert_eq!(
            top, 1000,
            "{topic}: exactly 1,000 publications (offsets 1..=1000)"
        );
        assert_eq!(counts.len(), 1000, "{topic}: every seq once");
        assert!(counts.values().all(|n| *n == 1), "{topic}: none doubled");
    }

    // A rolling restart of all 3 nodes during a 200/s stream.
    let stream = load("python", &redis, "load.roll", 2400, 200);
    std::thread::sleep(Duration::from_millis(1000));
    for node in nodes.iter_mut() {
        let name = node.name.clone();
        node.signal("TERM");
        assert!(
            node.wait_exit(Duration::from_secs(10)).is_some(),
            "{name} drained"
        );
        *node = start(&name, &redis, &pfx);
        std::thread::sleep(Duration::from_millis(1000));
    }
    stream.finish(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let (top, counts) = seqs(&nodes[0], "load.roll");
    assert!(counts.values().all(|n| *n == 1), "none doubled");
    assert_eq!(
        top as usize,
        counts.len(),
        "one publication per stored emit"
    );
    // Lost emits come in runs, one per leader handover; a run is the window.
    let runs = lost(&counts, 2400);
    let windows_ms = windows(&runs);
    eprintln!(
        "rolling restart: {} of 2400 emits stored, lost runs {runs:?}, handover windows {windows_ms:?} ms",
        counts.len()
    );
    assert!(
        runs.len() <= 3,
        "at most one window per node restart: {runs:?}"
    );
    assert!(
        windows_ms.iter().all(|w| *w <= 1000),
        "each handover window within the documented 1 s: {windows_ms:?}"
    );

    // The leader killed (-9): emits are lost until its lease expires
    // (LEADER_LEASE_MS=3000 here) and a follower takes over.
    let stream = load("python", &redis, "load.kill", 1600, 200);
    std::thread::sleep(Duration::from_millis(2500));
    let leader = nodes
        .iter()
        .position(|n| n.health()["leader"] == true)
        .expect("a leader");
    nodes[leader].kill9();
    stream.finish(Duration::from_secs(30));
    let alive = &nodes[(leader + 1) % nodes.len()];
    std::thread::sleep(Duration::from_millis(500));
    let (_, counts) = seqs(alive, "load.kill");
    assert!(counts.values().all(|n| *n == 1), "none doubled");
    let runs = lost(&counts, 1600);
    let windows_ms = windows(&runs);
    eprintln!("leader killed: lost runs {runs:?}, window {windows_ms:?} ms (lease 3000 ms)");
    assert!(runs.len() <= 1, "{runs:?}");
    assert!(
        windows_ms.iter().all(|w| *w <= 3000 + 1000),
        "within the lease plus 1 s: {windows_ms:?}"
    );
}

/// Runs of consecutive `seq`s below `count` that are not in `counts`.
fn lost(counts: &HashMap<u64, usize>, count: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = vec![];
    for seq in 0..count {
        if !counts.contains_key(&seq) {
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == seq => *end = seq,
                _ => runs.push((seq, seq)),
            }
        }
    }
    runs
}

/// Each run's length in ms at 200 emits a second.
fn windows(runs: &[(u64, u64)]) -> Vec<u64> {
    runs.iter().map(|(s, e)| (e - s + 1) * 5).collect()
}
