//! The application back end's hooks (docs/backend.md) with real processes:
//! `switchboard` nodes, `redis-server`, the Flask example back end
//! (`examples/flask-backend/app.py`, run by the tools venv's Python), the
//! official Socket.IO clients, and, for the failure modes, a real HTTP
//! server in this test process that sleeps, answers garbage, HTTP 500 or a
//! typed refusal (a back end that is down is a closed port).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Client, Closed, Node, Redis, eventually, free_port, interop_script, prefix, python, run_interop,
};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "a-test-secret-of-some-length";

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

// === the Flask example back end ===

/// `examples/flask-backend/app.py` on a free port, killed on drop.
struct Flask {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Flask {
    fn start() -> Flask {
        Flask::start_with(&[])
    }

    /// With `env` for the back end's process (`PROXY_SECRET`).
    fn start_with(env: &[(&str, &str)]) -> Flask {
        let app = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/flask-backend/app.py");
        assert!(
            python().exists(),
            "{} is missing: run ./scripts/test, which installs the tools (Flask included)",
            python().display()
        );
        let port = free_port();
        let mut child = Command::new(python())
            .arg(&app)
            .args(["--port", &port.to_string()])
            .current_dir(app.parent().unwrap())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the Flask example");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let flask = Flask {
            child,
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        assert!(
            eventually(Duration::from_secs(30), || flask.try_get("/healthz").0
                == 200),
            "the Flask example did not start:\n{}",
            flask.log.lock().unwrap()
        );
        flask
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path`: status and raw response (headers included); 0 when the
    /// server does not answer.
    fn try_get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(&self.addr) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        if s.write_all(req.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, raw)
    }

    /// Signs `user` in (`/login`) and returns the `Cookie` header value.
    fn login(&self, user: &str) -> String {
        let (status, raw) = self.try_get(&format!("/login?user={user}"));
        assert_eq!(status, 200, "{raw}");
        let line = raw
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: session="))
            .unwrap_or_else(|| panic!("no session cookie: {raw}"));
        line["set-cookie: ".len()..]
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }

    /// The node settings that point every hook at this back end, as the
    /// example's docstring says.
    fn hooks(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PROXY_CONNECT_URL", self.url("/switchboard/connect")),
            ("PROXY_HEADERS", "Cookie".into()),
            ("PROXY_SUBSCRIBE_URL", self.url("/switchboard/subscribe")),
            ("PROXY_SUBSCRIBE_TOPICS", "room.*".into()),
            ("PROXY_PUBLISH_URL", self.url("/switchboard/publish")),
            ("PROXY_PUBLISH_TOPICS", "chat.*".into()),
            ("PROXY_RPC_URL", self.url("/switchboard/rpc")),
        ]
    }
}

impl Drop for Flask {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- Flask example log ---\n{}", self.log.lock().unwrap());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a node with `env` plus `owned` (settings built at run time).
fn start_node(name: &str, env: &[(&str, &str)], owned: &[(&'static str, String)]) -> Node {
    let mut all: Vec<(&str, &str)> = env.to_vec();
    all.extend(owned.iter().map(|(k, v)| (*k, v.as_str())));
    Node::start(name, &all)
}

fn start_on_redis(
    name: &str,
    redis: &Redis,
    prefix: &str,
    owned: &[(&'static str, String)],
) -> Node {
    let url = redis.url();
    let mut env: Vec<(&str, &str)> = vec![("REDIS_URL", &url), ("REDIS_PREFIX", prefix)];
    env.extend(owned.iter().map(|(k, v)| (*k, v.as_str())));
    let node = Node::start(name, &env);
    assert!(
        eventually(
            Duration::from_secs(20),
            || node.health()["backplaneConnected"] == true
        ),
        "{name} never connected: {}",
        node.health()
    );
    node
}

// === native clients ===

/// Opens a native connection with an optional `Cookie` header; `Err` with
/// the handshake refusal's status and JSON body.
async fn open(url: &str, cookie: Option<&str>) -> Result<Client, (u16, Value)> {
    match cookie {
        Some(c) => open_with(url, &[("cookie", c)]).await,
        None => open_with(url, &[]).await,
    }
}

/// [`open`] with any handshake headers.
async fn open_with(url: &str, headers: &[(&'static str, &str)]) -> Result<Client, (u16, Value)> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => {
            let mut c = Client {
                ws,
                client_id: String::new(),
            };
            let hello = c.recv().await;
            assert_eq!(hello["type"], "connected", "{hello}");
            c.client_id = hello["clientId"].as_str().unwrap().to_string();
            Ok(c)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let body = res
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((res.status().as_u16(), body))
        }
        Err(e) => panic!("connect {url}: {e}"),
    }
}

async fn admitted(url: &str, cookie: Option<&str>) -> Client {
    match open(url, cookie).await {
        Ok(c) => c,
        Err((status, body)) => panic!("refused with {status}: {body}"),
    }
}

/// `?data=<URL-encoded JSON>`.
fn with_data(url: &str, data: &Value) -> String {
    let mut encoded = String::new();
    for b in data.to_string().bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}data={encoded}")
}

/// Sends `rpc` and returns the frame that answers its `id` (`rpc_result`
/// or `error`), skipping everything else.
async fn rpc(c: &mut Client, id: Value, method: &str, data: Value) -> Value {
    c.send(json!({"type": "rpc", "id": id, "method": method, "data": data}))
        .await;
    answer(c, &id).await
}

async fn answer(c: &mut Client, id: &Value) -> Value {
    loop {
        let m = c.recv().await;
        if m.get("id") == Some(id) {
            return m;
        }
    }
}

/// The next frame of type `ty` about topic `topic`, skipping others.
async fn frame(c: &mut Client, ty: &str, topic: &str) -> Value {
    loop {
        let m = c.recv().await;
        if m["type"] == ty && (m["event"] == topic || m["topic"] == topic || m["name"] == topic) {
            return m;
        }
    }
}

// === with the Flask example ===

/// With `PROXY_SECRET`, every hook call carries `X-Switchboard-Signature`
/// (the HMAC-SHA256 of its body), and a back end that checks it, as the
/// example does, answers the node that has the secret and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_calls_are_signed_with_proxy_secret_and_a_checking_back_end_refuses_others() {
    const HOOK_SECRET: &str = "a-hook-secret-0123456789";
    let flask = Flask::start_with(&[("PROXY_SECRET", HOOK_SECRET)]);
    let alice = flask.login("alice");
    let mut signed = flask.hooks();
    signed.push(("PROXY_SECRET", HOOK_SECRET.into()));
    let node = start_node("hooks-signed", &[], &signed);
    // The connect, subscribe and RPC hooks: all signed, all answered.
    let mut a = admitted(&node.ws_url("/ws"), Some(&alice)).await;
    let who = rpc(&mut a, json!(1), "whoami", json!(null)).await;
    assert_eq!(who["type"], "rpc_result", "{who}");
    assert_eq!(who["data"]["user"], "alice");
    a.send(json!({"type": "subscribe", "event": "room.1"}))
        .await;
    let sub = frame(&mut a, "subscribed", "room.1").await;
    assert_eq!(sub["event"], "room.1", "{sub}");

    // The back end refuses a correctly signed call made long ago: the
    // signature covers the timestamp, so a recorded call cannot be dated
    // anew (the example allows 5 minutes).
    let body =
        r#"{"client":"c1","user":"alice","transport":"websocket","method":"whoami","data":null}"#;
    let sign = |timestamp: &str| {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.{body}").as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    for (age_ms, want) in [(0, 200), (600_000, 401)] {
        let timestamp = (now_ms - age_ms).to_string();
        let signature = sign(&timestamp);
        let (status, answer) = common::http(
            &flask.addr,
            "POST",
            "/switchboard/rpc",
            Some(body),
            &[
                ("Content-Type", "application/json"),
                ("X-Switchboard-Timestamp", &timestamp),
                ("X-Switchboard-Signature", &signature),
            ],
        );
        assert_eq!(status, want, "a call {age_ms} ms old: {answer}");
    }

    // A node without the secret, or with another one, is not believed:
    // its client is told the back end could not decide (503).
    let mut wrong = flask.hooks();
    wrong.push(("PROXY_SECRET", "another-secret-0123456789".into()));
    for (name, hooks) in [("hooks-unsigned", flask.hooks()), ("hooks-wrong", wrong)] {
        let node = start_node(name, &[], &hooks);
        let (status, body) = open(&node.ws_url("/ws"), Some(&alice))
            .await
            .err()
            .expect("refused");
        assert_eq!(status, 503, "{name}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("401"),
            "{name}: {body}"
        );
        assert!(!node.log().contains("another-secret"), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_hook_admits_with_the_back_ends_identity_and_refuses_with_its_message() {
    let flask = Flask::start();
    let node = start_node(
        "hooks-connect",
        &[("AUTH_JWT_SECRET", SECRET)],
        &flask.hooks(),
    );
    let url = node.ws_url("/ws");

    // No session: the back end's `error`, before the upgrade.
    let (status, body) = open(&url, None).await.err().expect("refused");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "not signed in: sign in at /login first");
    // A banned user: the back end's `disconnect`.
    let (status, body) = open(&url, Some(&flask.login("mallory")))
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "mallory is banned");
    // Bad connect data is the client's mistake.
    let alice = flask.login("alice");
    let bad = format!("{url}?data=%7Bnope");
    let (status, body) = open(&bad, Some(&alice)).await.err().expect("refused");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("must be URL-encoded JSON"),
        "{body}"
    );

    // Alice: the user, permissions and info the back end returned; the
    // connect data travelled in `info` (the example puts it there).
    let data = json!({"device": "kiosk", "n": [1, 2]});
    let mut a = admitted(&with_data(&url, &data), Some(&alice)).await;
    let who = rpc(&mut a, json!(1), "whoami", json!(null)).await;
    assert_eq!(who["type"], "rpc_result", "{who}");
    assert_eq!(who["data"]["user"], "alice");
    assert_eq!(who["data"]["client"], a.client_id.as_str());
    assert_eq!(who["data"]["transport"], "websocket");
    assert_eq!(
        who["data"]["info"],
        json!({"name": "Alice", "connectData": data})
    );
    // `publish: ["chat.*"]`: allowed by the permission, published as sent
    // (the publish hook is not asked).
    a.subscribe("chat.lobby").await;
    a.send(json!({"type": "publish", "event": "chat.lobby", "data": {"text": "raw", "x": 1}}))
        .await;
    let ev = frame(&mut a, "event", "chat.lobby").await;
    assert_eq!(ev["data"], json!({"text": "raw", "x": 1}));
    // No `publish` permission elsewhere, and no hook covers `news`.
    a.send(json!({"type": "publish", "event": "news", "data": 1}))
        .await;
    let e = a.expect("error").await;
    assert_eq!(e["code"], "forbidden");
    assert_eq!(e["error"], "not allowed to publish to \"news\"");

    // Bob's `topics` (news, chat.*, room.*) limit him like a token's claim.
    let mut b = admitted(&url, Some(&flask.login("bob"))).await;
    b.send(json!({"type": "subscribe", "event": "weather"}))
        .await;
    let e = b.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["error"].as_str()),
        (
            Some("forbidden"),
            Some("not allowed to subscribe to \"weather\"")
        )
    );

    // A valid JWT keeps today's behaviour: its own identity (and `info`
    // claim), no connect hook; an invalid one is refused as always.
    let t = token(json!({"sub": "tok-user", "info": {"plan": "pro"}, "topics": ["news"]}));
    let mut tc = admitted(&format!("{url}?token={t}"), None).await;
    let who = rpc(&mut tc, json!("w"), "whoami", json!(null)).await;
    assert_eq!(who["data"]["user"], "tok-user");
    assert_eq!(who["data"]["info"], json!({"plan": "pro"}));
    let (status, body) = open(&format!("{url}?token=garbage"), Some(&alice))
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 401);
    assert!(
        body["error"].as_str().unwrap().starts_with("invalid token"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_hook_allows_room_1_refuses_room_2_and_publish_hook_replaces_data() {
    let flask = Flask::start();
    let redis = Redis::start();
    let p = prefix("hooks-sub");
    let a = start_on_redis("hooks-sub-a", &redis, &p, &flask.hooks());
    let b = start_on_redis("hooks-sub-b", &redis, &p, &flask.hooks());

    let mut alice = admitted(&a.ws_url("/ws"), Some(&flask.login("alice"))).await;
    alice.subscribe("room.1").await;
    alice
        .send(json!({"type": "subscribe", "event": "room.2"}))
        .await;
    let e = alice.expect("error").await;
    assert_eq!(e["code"], "forbidden", "{e}");
    assert_eq!(e["error"], "alice is not a member of room.2");
    assert_eq!(e["event"], "room.2");
    // Reading is decided like subscribing.
    alice
        .send(json!({"type": "request", "event": "room.2"}))
        .await;
    let e = alice.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["error"].as_str()),
        (Some("forbidden"), Some("alice is not a member of room.2"))
    );
    let (status, body) = a.get("/api/history/room.2");
    assert_eq!(status, 403, "{body}");
    // Subscribe data: the room's invite code lets her in.
    alice
        .send(json!({"type": "subscribe", "event": "room.2", "data": {"invite": "sesame"}}))
        .await;
    let ok = alice.expect("subscribed").await;
    assert_eq!(ok["event"], "room.2");
    // `/ws/{topic}` asks the hook before the upgrade.
    let (status, body) = open(&a.ws_url("/ws/room.2"), Some(&flask.login("bob")))
        .await
        .map(|_| (101, Value::Null))
        .unwrap_or_else(|e| e);
    // Bob's `topics` names room.* : allowed without asking the hook.
    assert_eq!(status, 101, "{body}");
    let (status, body) = open(&a.ws_url("/ws/room.2"), Some(&flask.login("alice")))
        .await
        .map(|_| (101, Value::Null))
        .unwrap_or_else(|e| e);
    assert_eq!(status, 403);
    assert_eq!(body["error"], "alice is not a member of room.2");

    // Publish hook over two nodes: Carol has no `publish` permission, the
    // hook decides on chat.*: spam refused, the rest replaced by the back
    // end's data, which is what every subscriber gets.
    let mut carol = admitted(&b.ws_url("/ws"), Some(&flask.login("carol"))).await;
    alice.subscribe("chat.room").await;
    carol.subscribe("chat.room").await;
    carol
        .send(json!({"type": "publish", "event": "chat.room", "data": {"text": "buy spam now"}}))
        .await;
    let e = carol.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["error"].as_str()),
        (Some("forbidden"), Some("no spam, please"))
    );
    carol
        .send(json!({"type": "publish", "event": "chat.room", "data": {"text": "hello", "evil": "<script>"}}))
        .await;
    for c in [&mut alice, &mut carol] {
        let ev = frame(c, "event", "chat.room").await;
        assert_eq!(
            ev["data"],
            json!({"from": "carol", "text": "hello"}),
            "{ev}"
        );
    }
}

#[test]
fn socketio_clients_are_admitted_refused_and_answered_by_the_back_end() {
    let flask = Flask::start();
    let node = start_node("hooks-sio", &[], &flask.hooks());
    let url = format!("http://{}", node.addr);
    let (alice, mallory, carol) = (
        flask.login("alice"),
        flask.login("mallory"),
        flask.login("carol"),
    );
    let script = interop_script("hooks_sio.py");
    for transport in ["polling", "websocket"] {
        run_interop(
            &python(),
            &[&script, &url, &alice, &mallory, &carol, transport],
        );
    }
    let script = interop_script("hooks_sio.mjs");
    for transport in ["polling", "websocket"] {
        run_interop(
            std::path::Path::new("node"),
            &[
                &script, "scenario", &url, &alice, &mallory, &carol, transport,
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_are_answered_each_to_its_own_caller_200_from_50_clients_over_2_nodes() {
    let flask = Flask::start();
    let redis = Redis::start();
    let p = prefix("hooks-rpc");
    // A busy shared machine may make the Flask dev server slow: the point
    // here is matching, not latency.
    let mut settings = flask.hooks();
    settings.push(("PROXY_TIMEOUT_MS", "15000".into()));
    let a = start_on_redis("hooks-rpc-a", &redis, &p, &settings);
    let b = start_on_redis("hooks-rpc-b", &redis, &p, &settings);
    let cookies = [flask.login("alice"), flask.login("carol")];

    // Native: 50 clients, 4 RPCs each, all sent before any answer is read.
    let mut clients = Vec::new();
    for i in 0..50 {
        let node = if i % 2 == 0 { &a } else { &b };
        clients.push(admitted(&node.ws_url("/ws"), Some(&cookies[i % 2])).await);
    }
    let ids = |i: usize| -> Vec<Value> {
        vec![
            json!(1),
            json!("two"),
            json!(i * 10 + 3),
            json!(format!("c{i}-4")),
        ]
    };
    for (i, c) in clients.iter_mut().enumerate() {
        for (j, id) in ids(i).into_iter().enumerate() {
            c.send(json!({"type": "rpc", "id": id, "method": "your_action", "data": {"marker": format!("{i}/{j}")}}))
                .await;
        }
    }
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let expected = ids(i);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 4 {
                let m = c
                    .recv_within(Duration::from_secs(60))
                    .await
                    .expect("every RPC is answered");
                assert_eq!(m["type"], "rpc_result", "client {i}: {m}");
                let j = expected
                    .iter()
                    .position(|id| *id == m["id"])
                    .unwrap_or_else(|| panic!("client {i} got someone else's id: {m}"));
                let result = &m["data"];
                assert_eq!(result["type"], "action_result");
                assert_eq!(result["data"]["echo"]["marker"], format!("{i}/{j}"), "{m}");
                assert_eq!(result["data"]["client"], c.client_id.as_str(), "{m}");
                assert!(!seen.contains(&j), "answered twice: {m}");
                seen.push(j);
            }
            // Nothing else arrives for this client.
            assert!(c.recv_within(Duration::from_millis(300)).await.is_none());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // Socket.IO (socket.io-client): the same over both nodes and both
    // transports, each ack matched to its emit.
    let (ua, ub) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let script = interop_script("hooks_sio.mjs");
    let cookie = cookies[0].clone();
    tokio::task::spawn_blocking(move || {
        run_interop(
            std::path::Path::new("node"),
            &[&script, "load", &ua, &ub, &cookie],
        )
    })
    .await
    .unwrap();
}

// === failure modes, with a real HTTP server in this process ===

/// A back end whose behaviour each request chooses: `mode` is the RPC
/// `method`, else `data.mode`, else the part of `topic` before the first
/// dot. `sleep` answers after 5 s, `garbage` is not JSON, `fail500` is an
/// HTTP 500, `refuse` an `error`, `kick` a `disconnect`, `wrongshape` none
/// of the three, `redirect` a 307 to `/elsewhere` (which would answer a
/// `result`); anything else is a `result` echoing the data.
async fn test_backend() -> SocketAddr {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    async fn hook(axum::Json(body): axum::Json<Value>) -> axum::response::Response {
        let mode = body["method"]
            .as_str()
            .or_else(|| body["data"]["mode"].as_str())
            .or_else(|| body["topic"].as_str().and_then(|t| t.split('.').next()))
            .unwrap_or("ok")
            .to_string();
        let ok = json!({"result": {
            "user": "tester",
            // The connect request, kept as the connection's info.
            "info": {"remoteAddr": body["remoteAddr"], "headers": body["headers"]},
            "data": {"echo": body["data"], "client": body["client"], "info": body["info"]},
        }});
        match mode.as_str() {
            "sleep" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                axum::Json(ok).into_response()
            }
            "garbage" => "this is not json".into_response(),
            "fail500" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
            "refuse" => axum::Json(json!({"error": {"code": 1001, "message": "refused by test"}}))
                .into_response(),
            "kick" => axum::Json(
                json!({"disconnect": {"code": 4501, "reason": "kicked by the back end"}}),
            )
            .into_response(),
            "wrongshape" => axum::Json(json!({"answer": 42})).into_response(),
            "redirect" => (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, "/elsewhere")],
            )
                .into_response(),
            _ => axum::Json(ok).into_response(),
        }
    }
    async fn elsewhere() -> axum::Json<Value> {
        axum::Json(json!({"result": {"data": "followed a redirect"}}))
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .route("/elsewhere", axum::routing::post(elsewhere));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// `GET path` off the async runtime; status and elapsed time.
async fn timed_get(addr: &str, path: &str) -> (u16, Duration) {
    let (addr, path) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let (status, _) = common::http(&addr, "GET", &path, None, &[]);
        (status, start.elapsed())
    })
    .await
    .unwrap()
}

async fn rest_publish(addr: &str, topic: &str, data: Value) {
    let (addr, body) = (
        addr.to_string(),
        json!({"topic": topic, "data": data}).to_string(),
    );
    let status = tokio::task::spawn_blocking(move || {
        common::http(&addr, "POST", "/api/publish", Some(&body), &[]).0
    })
    .await
    .unwrap();
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_that_sleeps_costs_only_its_callers_one_timeout() {
    let backend = test_backend().await;
    let hook = format!("http://{backend}/hook");
    let node = start_node(
        "hooks-slow",
        &[
            ("PROXY_TIMEOUT_MS", "1000"),
            ("PROXY_SUBSCRIBE_TOPICS", "sleep.*"),
        ],
        &[
            ("PROXY_CONNECT_URL", hook.clone()),
            ("PROXY_SUBSCRIBE_URL", hook.clone()),
            ("PROXY_RPC_URL", hook.clone()),
        ],
    );
    let url = node.ws_url("/ws");
    let mut watcher = admitted(&url, None).await;
    watcher.subscribe("live").await;

    // Usual latency first.
    let mut usual = Duration::ZERO;
    for n in 0..10 {
        let start = Instant::now();
        rest_publish(&node.addr, "live", json!({"n": n})).await;
        let ev = frame(&mut watcher, "event", "live").await;
        assert_eq!(ev["data"]["n"], n);
        usual = usual.max(start.elapsed());
    }

    // 20 clients call a back end that sleeps 5 s, three calls in a row each
    // (one always pending for about 3 s); each answer's delay is measured
    // where it arrives.
    let mut callers = Vec::new();
    for _ in 0..20 {
        let mut c = admitted(&url, None).await;
        callers.push(tokio::spawn(async move {
            let mut took = Vec::new();
            for id in 0..3 {
                let start = Instant::now();
                c.send(json!({"type": "rpc", "id": id, "method": "sleep"}))
                    .await;
                let e = answer(&mut c, &json!(id)).await;
                took.push(start.elapsed());
                assert_eq!(e["type"], "error", "{e}");
                assert_eq!(e["code"], "unavailable");
                assert_eq!(
                    e["error"],
                    "the application back end did not answer the rpc hook within 1000 ms"
                );
            }
            took
        }));
    }
    // A caller's other messages are not held behind its pending RPC.
    let mut c = admitted(&url, None).await;
    c.send(json!({"type": "rpc", "id": "p", "method": "sleep"}))
        .await;
    let t = Instant::now();
    c.send(json!({"type": "ping"})).await;
    let first = c.recv().await;
    assert_eq!(first["type"], "pong", "{first}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "a ping waited {:?} behind the RPC",
        t.elapsed()
    );
    // Meanwhile publications flow with their usual latency and /api/health
    // answers at once.
    let mut during = Duration::ZERO;
    for n in 0..20 {
        let start = Instant::now();
        rest_publish(&node.addr, "live", json!({"n": n})).await;
        let ev = frame(&mut watcher, "event", "live").await;
        assert_eq!(ev["data"]["n"], n);
        during = during.max(start.elapsed());
        let (status, took) = timed_get(&node.addr, "/api/health").await;
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_millis(500),
            "/api/health took {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        during < usual + Duration::from_millis(500),
        "publications slowed down from {usual:?} to {during:?} while the back end slept"
    );
    // Every call got `unavailable` after about PROXY_TIMEOUT_MS.
    for caller in callers {
        for took in caller.await.unwrap() {
            assert!(
                took >= Duration::from_millis(950) && took < Duration::from_secs(3),
                "answered after {took:?}"
            );
        }
    }
    // The subscribe hook and the connect hook time out the same way.
    let mut s = admitted(&url, None).await;
    let t = Instant::now();
    s.send(json!({"type": "subscribe", "event": "sleep.room"}))
        .await;
    let e = s.expect("error").await;
    assert_eq!(e["code"], "unavailable");
    assert_eq!(
        e["error"],
        "the application back end did not answer the subscribe hook within 1000 ms"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    let t = Instant::now();
    let (status, body) = open(&with_data(&url, &json!({"mode": "sleep"})), None)
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["error"],
        "the application back end did not answer the connect hook within 1000 ms"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
    let metrics = common::http_text(&node.addr, "GET", "/metrics", None, &[]).1;
    assert!(
        metrics.contains(r#"switchboard_proxy_requests_total{hook="rpc",outcome="timeout"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"switchboard_proxy_duration_seconds_count{hook="rpc"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_that_is_down_or_answers_garbage_gives_clear_errors_and_the_node_stays_healthy()
{
    let backend = test_backend().await;
    let hook = format!("http://{backend}/hook");
    let down = format!("http://127.0.0.1:{}/hook", free_port());
    let node = start_node(
        "hooks-fail",
        &[("PROXY_HEADERS", "X-Tenant,Cookie")],
        &[
            ("PROXY_CONNECT_URL", hook.clone()),
            ("PROXY_SUBSCRIBE_URL", hook.clone()),
            ("PROXY_RPC_URL", hook.clone()),
            ("PROXY_PUBLISH_URL", down.clone()),
        ],
    );
    let url = node.ws_url("/ws");
    // The connect request carries the client's address and only the
    // headers named in PROXY_HEADERS (the back end keeps them as `info`).
    let mut c = open_with(&url, &[("x-tenant", "acme"), ("x-other", "secret")])
        .await
        .expect("admitted");
    let ok = rpc(&mut c, json!("info"), "ok", json!(null)).await;
    let info = &ok["data"]["info"];
    assert_eq!(info["headers"], json!({"X-Tenant": "acme"}), "{ok}");
    assert!(
        info["remoteAddr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{ok}"
    );
    let cases = [
        (
            "garbage",
            "unavailable",
            "the application back end answered the rpc hook with something unusable: its answer is not a JSON object",
        ),
        (
            "fail500",
            "unavailable",
            "the application back end answered the rpc hook with HTTP 500",
        ),
        (
            "wrongshape",
            "unavailable",
            "the application back end answered the rpc hook with something unusable: its answer must have exactly one of \"result\", \"error\" or \"disconnect\"",
        ),
        ("refuse", "rpc_failed", "refused by test"),
        // Not followed: a call (and its signature) goes only where the
        // setting says.
        (
            "redirect",
            "unavailable",
            "the application back end answered the rpc hook with HTTP 307",
        ),
    ];
    for (i, (mode, code, text)) in cases.iter().enumerate() {
        let e = rpc(&mut c, json!(i), mode, json!({"k": i})).await;
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["code"], *code, "{e}");
        let got = e["error"].as_str().unwrap();
        assert!(got.starts_with(text), "{mode}: {got}");
    }
    let e = rpc(&mut c, json!("r"), "refuse", json!(null)).await;
    assert_eq!(e["backendCode"], 1001);
    let ok = rpc(&mut c, json!("ok"), "ok", json!({"a": [1]})).await;
    assert_eq!(ok["type"], "rpc_result");
    assert_eq!(ok["data"]["echo"], json!({"a": [1]}));
    assert_eq!(ok["data"]["client"], c.client_id.as_str());
    // A bad `rpc` gets `bad_message` with its id.
    c.send(json!({"type": "rpc", "id": "b", "method": "no spaces allowed"}))
        .await;
    let e = answer(&mut c, &json!("b")).await;
    assert_eq!(e["code"], "bad_message");

    // The publish hook's back end is down: a clean `unavailable`.
    c.send(json!({"type": "publish", "event": "chat", "data": 1}))
        .await;
    let e = c.expect("error").await;
    assert_eq!(e["code"], "unavailable");
    assert_eq!(
        e["error"],
        "the application back end could not be reached for the publish hook: it refused the connection or could not be found"
    );
    // Subscribe hook: garbage, 500, a refusal.
    for (topic, code, text) in [
        (
            "garbage.x",
            "unavailable",
            "answered the subscribe hook with something unusable",
        ),
        (
            "fail500.x",
            "unavailable",
            "answered the subscribe hook with HTTP 500",
        ),
        ("refuse.x", "forbidden", "refused by test"),
    ] {
        c.send(json!({"type": "subscribe", "event": topic})).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], code, "{e}");
        assert!(e["error"].as_str().unwrap().contains(text), "{e}");
        assert_eq!(e["event"], topic);
    }
    // Connect hook: each answer is a refusal before the upgrade.
    for (mode, status, text) in [
        (
            "garbage",
            503,
            "answered the connect hook with something unusable",
        ),
        ("fail500", 503, "answered the connect hook with HTTP 500"),
        ("refuse", 401, "refused by test"),
        ("kick", 403, "kicked by the back end"),
    ] {
        let (got, body) = open(&with_data(&url, &json!({"mode": mode})), None)
            .await
            .err()
            .expect("refused");
        assert_eq!(got, status, "{mode}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(text),
            "{mode}: {body}"
        );
    }
    // An RPC answered `disconnect`: `forbidden`, then the close with its
    // code and reason (as `POST /api/disconnect` closes).
    let e = rpc(&mut c, json!("k"), "kick", json!(null)).await;
    assert_eq!(
        (e["code"].as_str(), e["error"].as_str()),
        (Some("forbidden"), Some("kicked by the back end"))
    );
    assert_eq!(
        c.close_frame_within(Duration::from_secs(5)).await,
        Some((4501, "kicked by the back end".to_string()))
    );

    // The node is healthy and still serves clients.
    assert_eq!(node.get("/api/health").0, 200);
    assert_eq!(node.get("/readyz").0, 200);
    let mut fresh = admitted(&url, None).await;
    fresh.send(json!({"type": "ping"})).await;
    fresh.expect("pong").await;
    let metrics = common::http_text(&node.addr, "GET", "/metrics", None, &[]).1;
    for (hook, outcome) in [
        ("rpc", "bad_answer"),
        ("rpc", "bad_status"),
        ("rpc", "error"),
        ("rpc", "disconnect"),
        ("rpc", "ok"),
        ("publish", "unreachable"),
        ("connect", "ok"),
    ] {
        let series =
            format!(r#"switchboard_proxy_requests_total{{hook="{hook}",outcome="{outcome}"}}"#);
        assert!(metrics.contains(&series), "no {series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_limit_a_call_is_refused_at_once() {
    let backend = test_backend().await;
    let node = start_node(
        "hooks-inflight",
        &[("PROXY_MAX_INFLIGHT", "2"), ("PROXY_TIMEOUT_MS", "3000")],
        &[("PROXY_RPC_URL", format!("http://{backend}/hook"))],
    );
    let mut c = admitted(&node.ws_url("/ws"), None).await;
    for id in 0..2 {
        c.send(json!({"type": "rpc", "id": id, "method": "sleep"}))
            .await;
    }
    // Give the two calls time to take their slots (they hold them 3 s).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let e = rpc(&mut c, json!(2), "ok", json!(null)).await;
    assert_eq!(e["code"], "unavailable", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("the application back end is busy: 2 calls are already in flight"),
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Once they time out, calls go through again.
    for id in 0..2 {
        assert_eq!(answer(&mut c, &json!(id)).await["code"], "unavailable");
    }
    let ok = rpc(&mut c, json!(3), "ok", json!(null)).await;
    assert_eq!(ok["type"], "rpc_result", "{ok}");
}

/// One connection cannot hold more than 64 RPC calls at once: past that a
/// call is refused at once, and the node's other clients (and hooks) keep
/// their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_at_most_64_rpc_calls_at_once() {
    let backend = test_backend().await;
    let node = start_node(
        "hooks-rpc-per-conn",
        &[("PROXY_MAX_INFLIGHT", "70"), ("PROXY_TIMEOUT_MS", "2000")],
        &[("PROXY_RPC_URL", format!("http://{backend}/hook"))],
    );
    let mut greedy = admitted(&node.ws_url("/ws"), None).await;
    for id in 0..64 {
        greedy
            .send(json!({"type": "rpc", "id": id, "method": "sleep"}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let e = rpc(&mut greedy, json!(64), "ok", json!(null)).await;
    assert_eq!(e["code"], "unavailable", "{e}");
    assert_eq!(
        e["error"],
        "this connection already has 64 rpc calls in flight; wait for an answer before sending more"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Another client still gets through: the node's 70 slots are not all taken.
    let mut other = admitted(&node.ws_url("/ws"), None).await;
    let ok = rpc(&mut other, json!(1), "ok", json!(null)).await;
    assert_eq!(ok["type"], "rpc_result", "{ok}");
    // Once the calls time out (answered in any order), the greedy client
    // may call again.
    let mut timed_out = std::collections::HashSet::new();
    while timed_out.len() < 64 {
        let m = greedy.recv().await;
        if let Some(id) = m["id"].as_u64() {
            assert_eq!(m["code"], "unavailable", "{m}");
            timed_out.insert(id);
        }
    }
    let ok = rpc(&mut greedy, json!(65), "ok", json!(null)).await;
    assert_eq!(ok["type"], "rpc_result", "{ok}");
}

/// `MAX_CONNECTIONS` counts a handshake from its admission, not from its
/// upgrade: clients that arrive together while the connect hook is slow
/// cannot all pass the check, and those past the limit are refused at once
/// (before the hook is asked) with the node's 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_waiting_on_the_connect_hook_count_against_max_connections() {
    let backend = test_backend().await;
    let node = start_node(
        "hooks-maxconn",
        &[("MAX_CONNECTIONS", "3"), ("PROXY_TIMEOUT_MS", "8000")],
        &[("PROXY_CONNECT_URL", format!("http://{backend}/hook"))],
    );
    // The back end answers these after 5 s.
    let url = with_data(&node.ws_url("/ws"), &json!({"mode": "sleep"}));
    let started = Instant::now();
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = open(&url, None).await;
                (r, started.elapsed())
            })
        })
        .collect();
    let (mut admitted, mut refused) = (Vec::new(), Vec::new());
    for a in attempts {
        match a.await.unwrap() {
            (Ok(c), _) => admitted.push(c),
            (Err((status, body)), after) => refused.push((status, body, after)),
        }
    }
    assert_eq!(admitted.len(), 3, "refused: {refused:?}");
    for (status, body, after) in &refused {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["code"], "unavailable", "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("this node is at its limit of 3 connections"),
            "{body}"
        );
        assert!(*after < Duration::from_secs(2), "refused after {after:?}");
    }
    // A closed connection gives its place back.
    drop(admitted.pop());
    let ok = format!("{}?data=%7B%7D", node.ws_url("/ws"));
    assert!(
        common::admitted_within(&ok, Duration::from_secs(5)).await,
        "a place came free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_rpc_hook_native_rpc_is_forbidden() {
    let node = Node::start("hooks-none", &[]);
    let mut c = admitted(&node.ws_url("/ws"), None).await;
    let e = rpc(&mut c, json!(1), "your_action", json!(null)).await;
    assert_eq!(e["code"], "forbidden", "{e}");
    assert_eq!(
        e["error"],
        "rpc is not enabled on this node (PROXY_RPC_URL is not set)"
    );
    // A connection without hooks behaves as before: any topic.
    c.subscribe("room.2").await;
}

/// Sends a subscribe to `sleep.rate` (the back end sleeps past the node's
/// 3 s hook timeout, so the node's reader waits 3 s on it), then `pings`
/// pings at `per_second` on the client's own clock; returns the answers
/// read and how the connection ended (`None`: still open).
async fn paced_through_a_wait(
    url: &str,
    per_second: f64,
    pings: u32,
) -> (Vec<Value>, Option<Closed>) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut c = admitted(url, None).await;
    let every = Duration::from_secs_f64(1.0 / per_second);
    let start = tokio::time::Instant::now();
    c.send(json!({"type": "subscribe", "event": "sleep.rate"}))
        .await;
    for i in 1..=pings {
        tokio::time::sleep_until(start + every * i).await;
        c.send(json!({"type": "ping"})).await;
    }
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answers.len() <= pings as usize {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Err(_) => panic!("{} answers within 10 s: {answers:?}", answers.len()),
            Ok(Some(Ok(Message::Text(t)))) => answers.push(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return (answers, Some(Closed::Code(f.code.into())));
            }
            Ok(Some(Ok(Message::Close(None)) | Err(_)) | None) => {
                return (answers, Some(Closed::NoCode));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
    (answers, None)
}

/// The rate limit charges a client for the rate it sends at, not for the
/// time its node spent elsewhere: a client pinging at exactly
/// `WEBSOCKET_RATE_LIMIT` while its node waits 3 s on the back end (30
/// pings queue, past the burst of 20) is answered in full and stays open;
/// one at twice the rate through the same wait is still closed with 1008.
/// Native and socket.io-client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_at_its_rate_is_not_closed_for_the_time_its_node_waited() {
    let backend = test_backend().await;
    let node = start_node(
        "hooks-rate",
        &[
            ("PROXY_TIMEOUT_MS", "3000"),
            ("PROXY_SUBSCRIBE_TOPICS", "sleep.*"),
            ("WEBSOCKET_RATE_LIMIT", "10"),
        ],
        &[("PROXY_SUBSCRIBE_URL", format!("http://{backend}/hook"))],
    );
    let url = node.ws_url("/ws");

    let (answers, closed) = paced_through_a_wait(&url, 10.0, 50).await;
    assert_eq!(closed, None, "closed after {answers:?}");
    assert_eq!(answers[0]["type"], "error", "{}", answers[0]);
    assert_eq!(answers[0]["code"], "unavailable", "{}", answers[0]);
    assert!(
        answers[1..].iter().all(|a| a["type"] == "pong"),
        "{answers:?}"
    );

    let (answers, closed) = paced_through_a_wait(&url, 20.0, 100).await;
    assert_eq!(closed, Some(Closed::Code(1008)), "{answers:?}");
    let last = answers.last().unwrap();
    assert_eq!(last["code"], "rate_limited", "{last}");
    // A burst (20) and the rate times the wait (about 30) were answered.
    let pongs = answers.iter().filter(|a| a["type"] == "pong").count();
    assert!((45..=60).contains(&pongs), "{pongs} pongs: {answers:?}");

    // The same for socket.io-client over websocket.
    let script = interop_script("sio_rate_pace.mjs");
    let url = format!("http://{}", node.addr);
    for (rate, emits, expect) in [("10", "50", "open"), ("20", "100", "closed")] {
        let args = [
            script.clone(),
            url.clone(),
            rate.into(),
            emits.into(),
            expect.into(),
        ];
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_interop(std::path::Path::new("node"), &args);
        })
        .await
        .unwrap();
    }
    // Each close is counted with the other limits' refusals: the native
    // one above, and the socket's (at least one: a burst of its emits may
    // have been read before the disconnect took effect).
    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    let closed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_limit_refusals_total{limit=\"message_rate\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(closed >= 2, "{metrics}");
}
