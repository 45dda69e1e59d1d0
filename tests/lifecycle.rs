//! Connection lifecycle and hostile input: closes that reach the client
//! (no TCP reset), token expiry and refresh, proxy drain and heartbeat,
//! deeply nested payloads, oversized headers.

// tungstenite's handshake callback must return its (large) error response type.
#![allow(clippy::result_large_err)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Client, Closed, Node, Redis, eventually, http};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-test-secret-of-some-length";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Reads until a Close frame; `Err` with what came instead (a reset shows
/// as an error or as the end of the stream without a Close frame).
async fn close_frame(ws: &mut common::WsStream, timeout: Duration) -> Result<u16, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("timed out".into()),
            Ok(Some(Ok(Message::Close(Some(f))))) => return Ok(u16::from(f.code)),
            Ok(Some(Ok(Message::Close(None)))) => return Err("close without a code".into()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(format!("error instead of a close: {e}")),
            Ok(None) => return Err("stream ended without a close frame".into()),
        }
    }
}

#[test]
fn rate_limited_clients_always_get_the_error_and_close_1008() {
    let node = Node::start("life-rate", &[("WEBSOCKET_RATE_LIMIT", "50")]);
    let script = common::interop_script("ws_rate_limit.py");
    let url = node.ws_url("/ws");
    for pings in ["120", "3000"] {
        common::run_interop(&common::python(), &[&script, &url, pings, "20"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_resumes_reading_gets_close_1013() {
    let node = Node::start(
        "life-slow",
        &[
            ("WEBSOCKET_CLIENT_QUEUE_BYTES", "65536"),
            ("WEBSOCKET_RATE_LIMIT", "0"),
        ],
    );
    let mut slow = Client::connect(&node.ws_url("/ws/bulk")).await;
    slow.expect("subscribed").await;
    // 200 × 32 KiB = 6.4 MB: more than the socket buffers and the queue.
    let pad = "p".repeat(32 * 1024);
    let addr = node.addr.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..200 {
            let body = format!(r#"{{"topic":"bulk","data":{{"i":{i},"pad":"{pad}"}}}}"#);
            assert_eq!(http(&addr, "POST", "/api/publish", Some(&body), &[]).0, 202);
        }
    })
    .await
    .unwrap();
    // Still sending while not reading: these bytes are unread on the
    // server when it closes.
    for _ in 0..50 {
        slow.send(json!({"type":"ping"})).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        close_frame(&mut slow.ws, Duration::from_secs(10)).await,
        Ok(1013)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_clients_send_closes_them_with_1012() {
    let mut node = Node::start(
        "life-sigterm",
        &[
            ("SHUTDOWN_READINESS_DELAY_MS", "300"),
            ("SHUTDOWN_DRAIN_MS", "300"),
            ("WEBSOCKET_RATE_LIMIT", "0"),
        ],
    );
    let mut readers = Vec::new();
    for _ in 0..5 {
        let c = Client::connect(&node.ws_url("/ws")).await;
        let (mut tx, mut rx) = c.ws.split();
        tokio::spawn(async move {
            while tx
                .send(Message::Text(r#"{"type":"ping"}"#.into()))
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        });
        readers.push(tokio::spawn(async move {
            loop {
                match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                    Ok(Some(Ok(Message::Close(Some(f))))) => return Ok(u16::from(f.code)),
                    Ok(Some(Ok(_))) => continue,
                    other => return Err(format!("{other:?}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.signal("TERM");
    for r in readers {
        assert_eq!(r.await.unwrap(), Ok(1012));
    }
    let status = node.wait_exit(Duration::from_secs(8)).expect("exited");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_payloads_are_refused_from_every_source() {
    let redis = Redis::start();
    let pfx = common::prefix("deep");
    let node = Node::start(
        "life-deep",
        &[
            ("REDIS_URL", &redis.url()),
            ("REDIS_PREFIX", &pfx),
            ("AUTH_JWT_SECRET", SECRET),
        ],
    );
    assert!(eventually(Duration::from_secs(10), || node
        .get("/readyz")
        .0
        == 200));
    let reader = token(json!({"exp": now() + 600}));
    let writer = token(json!({"exp": now() + 600, "publish": ["deep"]}));
    let mut sub = Client::connect(&node.ws_url(&format!("/ws/deep?token={reader}"))).await;
    sub.expect("subscribed").await;
    let deep = nested(20_000);

    // A Redis publisher.
    let channel = format!("{pfx}:t:deep");
    redis.publish(&channel, &format!(r#"{{"event":"deep","data":{deep}}}"#));
    redis.publish(&channel, r#"{"event":"deep","data":{"n":1}}"#);
    assert_eq!(sub.expect("event").await["data"]["n"], 1);

    // REST.
    let (status, body) = node.post(
        "/api/publish",
        &format!(r#"{{"topic":"deep","data":{deep}}}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nested too deeply"),
        "{body}"
    );
    let (status, body) = node.post(
        "/api/publish",
        &format!(r#"{{"topic":"deep","data":{}}}"#, nested(65)),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        node.post("/api/publish", r#"{"topic":"deep","data":{"n":2}}"#)
            .0,
        202
    );
    assert_eq!(sub.expect("event").await["data"]["n"], 2);

    // A client's publish.
    let mut p = Client::connect(&node.ws_url(&format!("/ws?token={writer}"))).await;
    p.send_text(&format!(
        r#"{{"type":"publish","event":"deep","data":{deep}}}"#
    ))
    .await;
    let e = p.expect("error").await;
    assert_eq!(e["code"], "bad_message", "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("nested too deeply"),
        "{e}"
    );
    p.send(json!({"type":"publish","event":"deep","data":{"n":3}}))
        .await;
    assert_eq!(sub.expect("event").await["data"]["n"], 3);

    let metrics = node.get("/metrics").1;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchboard_invalid_publications_total") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Mock events configured too deep stop start-up.
    let out = std::process::Command::new(common::BIN)
        .env_clear()
        .env("PORT", "0")
        .env(
            "WEBSOCKET_MOCK_EVENTS",
            format!(r#"[{{"name":"x","data":{}}}]"#, nested(100)),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WEBSOCKET_MOCK_EVENTS="), "{stderr}");
}

#[test]
fn oversized_request_headers_get_431() {
    let node = Node::start("life-431", &[]);
    let big = "x".repeat(200 * 1024);
    let (status, _) = common::http_text(&node.addr, "GET", "/api/health", None, &[("X-Big", &big)]);
    assert_eq!(status, 431);
    let (status, _) = common::http_text(&node.addr, "GET", "/api/health", None, &[("X-Ok", "y")]);
    assert_eq!(status, 200);
    // The same on a raw socket that keeps sending: the 431 is not lost to a reset.
    let mut s = std::net::TcpStream::connect(&node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}").as_bytes());
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 431");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_unless_refreshed() {
    let node = Node::start("life-token", &[("AUTH_JWT_SECRET", SECRET)]);
    let exp = now() + 2;
    let short = token(json!({"exp": exp, "topics": ["a", "b"]}));
    let url = node.ws_url("/ws");

    // No refresh: an `error` token_expired, then close 3000 within 1 s of exp.
    let mut lapsing = Client::connect(&format!("{url}?token={short}")).await;
    let mut kept = Client::connect(&format!("{url}?token={short}")).await;
    kept.subscribe("a").await;
    kept.subscribe("b").await;
    // A subscription the back end made, to a topic the token does not name:
    // a refresh takes back only what the old token allowed.
    let body = json!({"client": kept.client_id, "topic": "c"}).to_string();
    let (status, v) = node.post("/api/subscribe", &body);
    assert_eq!(v["data"]["reached"], 1, "{status} {v}");
    assert_eq!(kept.expect("subscribed").await["event"], "c");

    // An invalid refresh changes nothing.
    kept.send(json!({"type":"refresh","token":"garbage"})).await;
    let e = kept.expect("error").await;
    assert_eq!(e["code"], "bad_token", "{e}");
    // A valid one that no longer allows `b`.
    let long_exp = now() + 600;
    let narrower = token(json!({"exp": long_exp, "topics": ["a"]}));
    kept.send(json!({"type":"refresh","token":narrower})).await;
    let u = kept.expect("unsubscribed").await;
    assert_eq!(u["event"], "b");
    assert_eq!(u["reason"], "permission revoked");
    let r = kept.expect("refreshed").await;
    assert_eq!(r["expiresAt"], long_exp * 1000, "{r}");

    let e = lapsing.expect("error").await;
    assert_eq!(e["code"], "token_expired", "{e}");
    let closed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(
        close_frame(&mut lapsing.ws, Duration::from_secs(3)).await,
        Ok(3000)
    );
    assert!(
        closed_at >= exp * 1000 && closed_at < exp * 1000 + 1000,
        "{closed_at} vs {exp}"
    );

    // The refreshed client outlives the first token and keeps receiving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        node.post("/api/publish", r#"{"topic":"a","data":1}"#).0,
        202
    );
    assert_eq!(kept.expect("event").await["data"], 1);
    assert_eq!(
        node.post("/api/publish", r#"{"topic":"b","data":2}"#).0,
        202
    );
    assert!(kept.recv_within(Duration::from_millis(300)).await.is_none());
    assert_eq!(
        node.post("/api/publish", r#"{"topic":"c","data":3}"#).0,
        202
    );
    assert_eq!(
        kept.expect("event").await["data"],
        3,
        "c outlived the refreshes"
    );

    // Socket.IO through python-socketio.
    // Long enough for the interpreter to start and connect on a busy machine.
    let short = token(json!({"exp": now() + 7, "topics": ["a", "b", "device"]}));
    let long = token(json!({"exp": now() + 600, "topics": ["a", "b", "device"]}));
    let narrow = token(json!({"exp": now() + 600, "topics": ["a", "device"]}));
    let base = format!("http://{}", node.addr);
    common::run_interop(
        &common::python(),
        &[
            &common::interop_script("sio_refresh.py"),
            &base,
            &short,
            &long,
            &narrow,
        ],
    );
}

// === proxy ===

/// An upstream that echoes text frames.
async fn echo_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn open_proxy(node: &Node) -> common::WsStream {
    let (mut ws, _) = tokio_tungstenite::connect_async(node.ws_url("/ws/proxy/echo"))
        .await
        .unwrap();
    let Some(Ok(Message::Text(hello))) = ws.next().await else {
        panic!("no proxy_connected")
    };
    assert!(hello.contains("proxy_connected"));
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_clients_are_closed_over_the_drain_window_and_silent_ones_by_heartbeat() {
    let upstream = echo_upstream().await;
    let routes = format!("echo:ws://{upstream}/feed");
    let silent_node = Node::start(
        "life-proxy-hb",
        &[
            ("WEBSOCKET_PROXY_ENABLED", "true"),
            ("WEBSOCKET_PROXY_ROUTES", &routes),
            ("WEBSOCKET_HEARTBEAT_INTERVAL", "200"),
        ],
    );
    // Never polled until the end, so it answers no ping.
    let mut silent = open_proxy(&silent_node).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        close_frame(&mut silent, Duration::from_secs(3)).await,
        Ok(1011)
    );

    let mut node = Node::start(
        "life-proxy-drain",
        &[
            ("WEBSOCKET_PROXY_ENABLED", "true"),
            ("WEBSOCKET_PROXY_ROUTES", &routes),
            ("SHUTDOWN_DRAIN_MS", "1000"),
            ("SHUTDOWN_GRACE_MS", "6000"),
        ],
    );
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut ws = open_proxy(&node).await;
        ws.send(Message::Text("hi".into())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text("hi".into())
        );
        tasks.push(tokio::spawn(async move {
            let code = close_frame(&mut ws, Duration::from_secs(8)).await;
            (code, Instant::now())
        }));
    }
    node.signal("TERM");
    let mut times = Vec::new();
    for t in tasks {
        let (code, at) = t.await.unwrap();
        assert_eq!(code, Ok(1001));
        times.push(at);
    }
    times.sort();
    let spread = *times.last().unwrap() - times[0];
    assert!(
        spread >= Duration::from_millis(400),
        "closes spread over the drain: {spread:?}"
    );
    let status = node.wait_exit(Duration::from_secs(8)).expect("exited");
    assert!(status.success(), "{status:?}");
    let _ = Closed::NoCode;
}
