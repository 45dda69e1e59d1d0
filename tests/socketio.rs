//! The node's own Engine.IO server (websocket and long-polling), spoken by hand where the
//! official clients cannot show it: publications encoded once, the
//! slow-consumer policy per socket, the Engine.IO heartbeat, refusals.
//! (The official clients on this transport: tests/device.rs, history.rs,
//! security.rs, lifecycle.rs.)

mod common;

use std::time::Duration;

use common::Node;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a Socket.IO session on the websocket transport and connects to `/`.
async fn open(node: &Node, auth: Option<Value>) -> (Ws, Value) {
    let url = node.ws_url("/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let open = text(&mut ws).await;
    let handshake: Value =
        serde_json::from_str(open.strip_prefix('0').expect("OPEN first")).unwrap();
    assert_eq!(handshake["upgrades"], json!([]));
    let connect = match auth {
        Some(a) => format!("40{a}"),
        None => "40".into(),
    };
    ws.send(Message::Text(connect.into())).await.unwrap();
    (ws, handshake)
}

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

/// Reads until a frame starting with `prefix`.
async fn until(ws: &mut Ws, prefix: &str) -> String {
    loop {
        let t = text(ws).await;
        if t.starts_with(prefix) {
            return t;
        }
    }
}

async fn subscribe(ws: &mut Ws, topic: &str) -> Value {
    ws.send(Message::Text(
        format!(r#"421["subscribe","{topic}"]"#).into(),
    ))
    .await
    .unwrap();
    let ack = until(ws, "431").await;
    let ack: Value = serde_json::from_str(&ack[3..]).unwrap();
    assert_eq!(ack[0]["ok"], true, "{ack}");
    ack[0].clone()
}

#[tokio::test]
async fn engine_io_handshake_events_acks_and_refusals() {
    let node = Node::start(
        "eio",
        &[
            ("SOCKETIO_PING_INTERVAL", "300"),
            ("SOCKETIO_PING_TIMEOUT", "300"),
        ],
    );
    let (mut ws, handshake) = open(&node, None).await;
    assert_eq!(handshake["pingInterval"], 300);
    assert!(until(&mut ws, "40").await.starts_with("40{\"sid\":"));
    // The four device events follow the CONNECT ack.
    assert!(until(&mut ws, "42[\"apps_list\"").await.len() > 20);
    let ack = subscribe(&mut ws, "news").await;
    assert_eq!(ack["offset"], 0, "a history topic: {ack}");
    let (status, _) = node.post("/api/publish", r#"{"topic":"news","data":{"n":1}}"#);
    assert_eq!(status, 202);
    assert_eq!(until(&mut ws, "42[\"news\"").await, r#"42["news",{"n":1}]"#);
    // The object form opts into the position argument.
    ws.send(Message::Text(r#"422["subscribe",{"topic":"feed"}]"#.into()))
        .await
        .unwrap();
    until(&mut ws, "432").await;
    node.post("/api/publish", r#"{"topic":"feed","data":5}"#);
    assert_eq!(
        until(&mut ws, "42[\"feed\"").await,
        r#"42["feed",5,{"topic":"feed","offset":1}]"#
    );
    // Errors are `error` events; an unknown namespace is refused.
    ws.send(Message::Text(r#"423["subscribe","bad topic"]"#.into()))
        .await
        .unwrap();
    let nack = until(&mut ws, "433").await;
    assert!(nack.contains(r#""ok":false"#), "{nack}");
    ws.send(Message::Text("40/admin,".into())).await.unwrap();
    assert!(
        until(&mut ws, "44/admin,")
            .await
            .contains("Invalid namespace")
    );
    // A client that stops answering pings is closed after interval + timeout.
    let (mut silent, _) = open(&node, None).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(_)) => continue,
                _ => return 0,
            }
        }
    })
    .await
    .expect("closed by the heartbeat");
    assert_eq!(closed, 1011);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_reading_is_closed_alone() {
    let node = Node::start(
        "eio-slow",
        &[
            ("WEBSOCKET_CLIENT_QUEUE_MESSAGES", "64"),
            ("HTTP_BODY_LIMIT", "1048576"),
        ],
    );
    let (mut slow, _) = open(&node, None).await;
    until(&mut slow, "40").await;
    subscribe(&mut slow, "flood").await;
    let (mut fast, _) = open(&node, None).await;
    until(&mut fast, "40").await;
    subscribe(&mut fast, "flood").await;
    // `slow` reads nothing from here on; `fast` reads everything.
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < 400 {
            if until(&mut fast, "42[\"flood\"").await.len() > 16_000 {
                got += 1;
            }
        }
        got
    });
    let addr = node.addr.clone();
    tokio::task::spawn_blocking(move || {
        let pad = "x".repeat(16_384);
        for i in 0..400 {
            let body = json!({"topic": "flood", "data": {"i": i, "pad": pad}}).to_string();
            let (status, _) = common::http(&addr, "POST", "/api/publish", Some(&body), &[]);
            assert_eq!(status, 202);
        }
    })
    .await
    .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .unwrap()
            .unwrap(),
        400,
        "the reading socket got everything"
    );
    // The stalled one, reading again, finds what was written, then 1013.
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 1013);
    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    assert!(
        metrics.lines().any(|l| l
            .starts_with("switchboard_slow_consumer_disconnects_total{transport=\"socketio\"} 1")),
        "{metrics}"
    );
}

/// Engine.IO long-polling spoken by hand: the handshake offers the upgrade,
/// a POST carries CONNECT, a GET takes the queued packets, and bad requests
/// get engine.io's refusals without affecting the session.
#[test]
fn long_polling_by_hand_and_its_refusals() {
    let node = Node::start("eio-poll", &[("WEBSOCKET_MAX_PAYLOAD", "1024")]);
    let at = |q: &str| format!("/socket.io/?EIO=4&transport=polling{q}");
    let (status, open) = common::http_text(&node.addr, "GET", &at(""), None, &[]);
    assert_eq!(status, 200);
    let handshake: Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    assert_eq!(handshake["upgrades"], json!(["websocket"]));
    assert_eq!(handshake["maxPayload"], 1024);
    let sid = handshake["sid"].as_str().unwrap().to_string();
    assert_eq!(sid.len(), 32, "128 random bits");
    let with_sid = at(&format!("&sid={sid}"));
    let (status, ok) = common::http_text(&node.addr, "POST", &with_sid, Some("40"), &[]);
    assert_eq!((status, ok.as_str()), (200, "ok"));
    let (status, payload) = common::http_text(&node.addr, "GET", &with_sid, None, &[]);
    assert_eq!(status, 200);
    let packets: Vec<&str> = payload.split('\x1e').collect();
    assert!(packets[0].starts_with("40{\"sid\":"), "{payload}");
    assert!(packets[1].starts_with("42[\"apps_list\""), "{payload}");
    // Refusals: engine.io's codes.
    let refused = |path: &str, method: &str, body: Option<&str>| {
        let (status, text) = common::http_text(&node.addr, method, path, body, &[]);
        (status, serde_json::from_str::<Value>(&text).ok())
    };
    assert_eq!(
        refused(&at("&sid=nope"), "GET", None),
        (
            400,
            Some(json!({"code": 1, "message": "Session ID unknown"}))
        )
    );
    assert_eq!(
        refused("/socket.io/?EIO=3&transport=polling", "GET", None),
        (
            400,
            Some(json!({"code": 5, "message": "Unsupported protocol version"}))
        )
    );
    assert_eq!(
        refused("/socket.io/?EIO=4&transport=carrier-pigeon", "GET", None),
        (
            400,
            Some(json!({"code": 0, "message": "Transport unknown"}))
        )
    );
    assert_eq!(
        refused(&at(""), "POST", Some("40")),
        (
            400,
            Some(json!({"code": 2, "message": "Bad handshake method"}))
        )
    );
    // The session still works; then a POST over maxPayload ends it (413).
    let event = r#"421["subscribe","news"]"#;
    let (status, _) = common::http_text(&node.addr, "POST", &with_sid, Some(event), &[]);
    assert_eq!(status, 200);
    let (_, payload) = common::http_text(&node.addr, "GET", &with_sid, None, &[]);
    assert!(payload.contains(r#"431[{"#), "{payload}");
    let big = format!(r#"42["x","{}"]"#, "y".repeat(2000));
    let (status, _) = common::http_text(&node.addr, "POST", &with_sid, Some(&big), &[]);
    assert_eq!(status, 413);
    let (_, payload) = common::http_text(&node.addr, "GET", &with_sid, None, &[]);
    assert_eq!(payload, "1", "the CLOSE packet");
    assert!(common::eventually(Duration::from_secs(10), || refused(
        &with_sid, "GET", None
    )
    .0 == 400));
    assert!(common::eventually(Duration::from_secs(10), || node
        .health()["connections"]
        == 0));
}

/// Reads until the server closes; the close code (0: no close frame).
async fn close_code(ws: &mut Ws, within: Duration) -> Option<u16> {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    let _ = ws.send(Message::Text("3".into())).await;
                }
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)).unwrap_or(0),
                Some(Ok(_)) => continue,
                _ => return 0,
            }
        }
    })
    .await
    .ok()
}

/// An Engine.IO session holds a socket, a queue and its places under the
/// connection limits before any namespace is joined: one that never joins
/// (no CONNECT, or only refused ones) is closed, as socket.io's
/// `connectTimeout` does, and a node full of them refuses the handshake
/// itself.
#[tokio::test]
async fn a_session_without_a_connected_namespace_is_closed() {
    let node = Node::start(
        "eio-connect",
        &[
            ("AUTH_JWT_SECRET", "a-secret-of-at-least-32-bytes-length!!"),
            ("MAX_CONNECTIONS", "2"),
        ],
    );
    let url = node.ws_url("/socket.io/?EIO=4&transport=websocket");
    // Alive by its heartbeat, but never a CONNECT.
    let (mut idle, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let started = std::time::Instant::now();
    assert!(text(&mut idle).await.starts_with('0'));
    // Refused CONNECTs (no token): each answered, the tenth closes it.
    let (mut refused, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(text(&mut refused).await.starts_with('0'));
    for i in 1..=10 {
        refused.send(Message::Text("40".into())).await.unwrap();
        let answer = until(&mut refused, "44").await;
        assert!(answer.contains("message"), "refusal {i}: {answer}");
    }
    assert_eq!(
        close_code(&mut refused, Duration::from_secs(5)).await,
        Some(1008),
        "closed after ten refused CONNECTs"
    );
    // The idle session and one connected socket fill the node: the next
    // handshake is refused with 503 before the session exists.
    let token = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        encode(
            &Header::default(),
            &json!({"exp": exp}),
            &EncodingKey::from_secret(b"a-secret-of-at-least-32-bytes-length!!"),
        )
        .unwrap()
    };
    // The refused session's place comes back once it has ended.
    let mut full = None;
    for _ in 0..50 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            full = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut full = full.expect("the refused session's place came back within 5 s");
    assert!(text(&mut full).await.starts_with('0'));
    full.send(Message::Text(
        format!("40{}", json!({"token": token})).into(),
    ))
    .await
    .unwrap();
    assert!(until(&mut full, "40").await.starts_with("40{\"sid\":"));
    let (status, body) = common::http_text(
        &node.addr,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        None,
        &[],
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("at its limit of 2 connections"), "{body}");
    // The idle session goes at 45 s (socket.io's connectTimeout), not before.
    let code = close_code(&mut idle, Duration::from_secs(60)).await;
    let after = started.elapsed();
    assert_eq!(code, Some(1008), "closed without a CONNECT");
    assert!(
        after >= Duration::from_secs(44) && after < Duration::from_secs(55),
        "closed after {after:?}"
    );
    // The connected socket is not affected.
    full.send(Message::Text(r#"421["subscribe","news"]"#.into()))
        .await
        .unwrap();
    until(&mut full, "431").await;
}
