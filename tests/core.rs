//! The core node in embedded mode, as a client sees it: real processes,
//! real sockets.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Closed, Node, eventually};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn subscribe_receive_request_ping_unsubscribe() {
    let node = Node::start(
        "core-basic",
        &[(
            "WEBSOCKET_MOCK_EVENTS",
            r#"[{"name":"ticker","interval":150,"data":{"price":1}},{"name":"quiet","data":{"q":true}}]"#,
        )],
    );
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    assert_eq!(c.client_id.len(), 16);

    c.subscribe("ticker").await;
    let start = Instant::now();
    for _ in 0..3 {
        let e = c.expect("event").await;
        assert_eq!(e["name"], "ticker");
        assert_eq!(e["data"], json!({"price":1}));
        assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(e.get("topic").is_none(), "topic only when it differs: {e}");
    }
    assert!(start.elapsed() < Duration::from_secs(3));

    // request: the last publication, or the configured data of an on-demand event
    c.send(json!({"type":"request","event":"quiet"})).await;
    let r = c.expect("response").await;
    assert_eq!(r["event"], "quiet");
    assert_eq!(r["data"], json!({"q":true}));
    c.send(json!({"type":"request","event":"nothing-here"}))
        .await;
    let r = c.expect("error").await;
    assert!(r["error"].as_str().unwrap().contains("nothing-here"), "{r}");

    c.send(json!({"type":"ping"})).await;
    let p = c.expect("pong").await;
    assert!(p["timestamp"].is_string());
    assert!(p.get("id").is_none(), "{p}");
    // A ping's id comes back; one that is not a string or number is
    // ignored, and the ping still answered.
    c.send(json!({"type":"ping","id":"p-1"})).await;
    assert_eq!(c.expect("pong").await["id"], "p-1");
    c.send(json!({"type":"ping","id":17})).await;
    assert_eq!(c.expect("pong").await["id"], 17);
    c.send(json!({"type":"ping","id":{"n":1}})).await;
    let p = c.expect("pong").await;
    assert!(p.get("id").is_none(), "{p}");

    c.send(json!({"type":"unsubscribe","event":"ticker"})).await;
    c.expect("unsubscribed").await;
    // Anything already queued may still arrive; after that, nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while c.recv_within(Duration::from_millis(50)).await.is_some() {}
    assert!(
        c.recv_within(Duration::from_millis(600)).await.is_none(),
        "no events after unsubscribe"
    );

    // on-demand publication of a configured event; unknown names are 404
    c.subscribe("quiet").await;
    let (status, _) = node.post("/admin/events/quiet", "");
    assert_eq!(status, 202);
    let e = c.expect("event").await;
    assert_eq!(e["name"], "quiet");
    assert_eq!(node.post("/admin/events/nope", "").0, 404);
}

#[tokio::test]
async fn path_topic_and_http_publish_reach_only_that_topic() {
    let node = Node::start("core-publish", &[]);
    let mut news = Client::connect(&node.ws_url("/ws/news")).await;
    news.expect("subscribed").await;
    let mut news2 = Client::connect(&node.ws_url("/ws")).await;
    news2.subscribe("news").await;
    let mut other = Client::connect(&node.ws_url("/ws/sports")).await;
    other.expect("subscribed").await;

    let (status, body) = node.post("/api/publish", r#"{"topic":"news","data":{"n":1}}"#);
    assert_eq!(status, 202, "{body}");
    for c in [&mut news, &mut news2] {
        let e = c.expect("event").await;
        assert_eq!(e["name"], "news");
        assert_eq!(e["data"], json!({"n":1}));
    }
    // event differs from topic: the frame names both
    let (status, _) = node.post(
        "/api/publish",
        r#"{"topic":"news","event":"breaking","data":[1,2]}"#,
    );
    assert_eq!(status, 202);
    let e = news.expect("event").await;
    assert_eq!(e["name"], "breaking");
    assert_eq!(e["topic"], "news");
    assert!(
        other
            .recv_within(Duration::from_millis(500))
            .await
            .is_none()
    );

    let (status, body) = node.post("/api/publish", r#"{"data":{"n":1}}"#);
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("topic"), "{body}");
    let (status, body) = node.post("/api/publish", r#"{"topic":"bad topic","data":1}"#);
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("bad topic"),
        "{body}"
    );
    assert_eq!(node.post("/api/publish", "{not json").0, 400);
    // an invalid topic in the path is refused before the upgrade
    assert_eq!(node.get("/ws/bad%20topic").0, 400);
}

#[tokio::test]
async fn malformed_frames_get_errors_and_oversize_frames_close_1009() {
    let node = Node::start("core-bad-input", &[("WEBSOCKET_MAX_PAYLOAD", "1024")]);
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    let mut bystander = Client::connect(&node.ws_url("/ws/news")).await;
    bystander.expect("subscribed").await;

    let cases = [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        (r#"{"event":"x"}"#, "\"type\""),
        (r#"{"type":"dance"}"#, "unknown message type"),
        (r#"{"type":"subscribe"}"#, "\"event\""),
        (r#"{"type":"subscribe","event":42}"#, "must be a string"),
        (
            r#"{"type":"subscribe","event":"no spaces allowed"}"#,
            "invalid topic",
        ),
    ];
    for (frame, expected) in cases {
        c.send_text(frame).await;
        let e = c.expect("error").await;
        let text = e["error"].as_str().unwrap();
        assert!(text.contains(expected), "{frame}: {text}");
        assert!(e["timestamp"].is_string());
    }
    c.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let e = c.expect("error").await;
    assert!(e["error"].as_str().unwrap().contains("binary"));
    // still works
    c.send(json!({"type":"ping"})).await;
    c.expect("pong").await;

    // the bystander noticed nothing and still receives
    node.post("/api/publish", r#"{"topic":"news","data":1}"#);
    assert_eq!(bystander.expect("event").await["data"], 1);

    c.send_text(&"x".repeat(4096)).await;
    assert_eq!(
        c.closed_within(Duration::from_secs(5)).await,
        Some(Closed::Code(1009))
    );
    bystander.send(json!({"type":"ping"})).await;
    bystander.expect("pong").await;
}

#[tokio::test]
async fn subscriptions_are_idempotent_and_limited() {
    let node = Node::start("core-limits", &[("WEBSOCKET_MAX_SUBSCRIPTIONS", "2")]);
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    c.subscribe("a").await;
    c.subscribe("a").await;
    c.subscribe("b").await;
    c.send(json!({"type":"subscribe","event":"c"})).await;
    let e = c.expect("error").await;
    assert!(e["error"].as_str().unwrap().contains("limit"), "{e}");
    node.post("/api/publish", r#"{"topic":"a","data":1}"#);
    c.expect("event").await;
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_none(),
        "one delivery per topic"
    );
    let health = node.health();
    assert_eq!(health["subscriptions"], 2);
}

#[test]
fn invalid_configuration_stops_start_up_with_exit_64() {
    let port = common::free_port();
    let out = std::process::Command::new(common::BIN)
        .env_clear()
        .env("PORT", port.to_string())
        .env(
            "WEBSOCKET_MOCK_EVENTS",
            r#"[{"name":"ticker","interval":"often"}]"#,
        )
        .env("WEBSOCKET_HEARTBEAT_INTERVAL", "-5")
        .env("TOKIO_WORKER_THREADS", "all")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WEBSOCKET_MOCK_EVENTS="), "{err}");
    assert!(err.contains("WEBSOCKET_HEARTBEAT_INTERVAL=-5"), "{err}");
    assert!(
        err.contains("TOKIO_WORKER_THREADS=all is not valid"),
        "{err}"
    );
    // nothing was bound
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_clients_receive_all_fifty_publications() {
    let node = Node::start("core-fanout", &[]);
    let mut clients = Vec::new();
    for _ in 0..300 {
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        c.subscribe("load").await;
        clients.push(c);
    }
    for i in 0..50 {
        let (status, _) = node.post("/api/publish", &format!(r#"{{"topic":"load","data":{i}}}"#));
        assert_eq!(status, 202);
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let e = c.expect("event").await;
                assert_eq!(e["data"], i, "in order, none missing");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Three worker threads: each topic is fanned out in three parallel slices.
/// A client on two topics still gets their publications in publishing order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliced_fan_out_keeps_every_client_in_publishing_order_across_topics() {
    let node = Node::start("core-slices", &[("TOKIO_WORKER_THREADS", "3")]);
    let mut clients = Vec::new();
    for i in 0..200 {
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        c.subscribe("even").await;
        if i % 2 == 0 {
            c.subscribe("odd").await;
        }
        clients.push(c);
    }
    for n in 0..60 {
        let topic = if n % 2 == 0 { "even" } else { "odd" };
        let (status, _) = node.post(
            "/api/publish",
            &format!(r#"{{"topic":"{topic}","data":{n}}}"#),
        );
        assert_eq!(status, 202);
    }
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let both = i % 2 == 0;
            for n in (0..60).filter(|n| both || n % 2 == 0) {
                let e = c.expect("event").await;
                assert_eq!(
                    e["data"], n,
                    "client {i}: in publishing order, none missing"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_others_are_not_delayed() {
    let node = Node::start("core-slow", &[("WEBSOCKET_MAX_PAYLOAD", "1048576")]);
    // The slow client subscribes, then is never read until the end.
    let mut slow = Client::connect(&node.ws_url("/ws/bulk")).await;
    slow.expect("subscribed").await;
    let mut fast = Vec::new();
    for _ in 0..10 {
        let mut c = Client::connect(&node.ws_url("/ws/bulk")).await;
        c.expect("subscribed").await;
        fast.push(c);
    }
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let start = Instant::now();
                for i in 0..500 {
                    let e = c.expect("event").await;
                    assert_eq!(e["data"]["i"], i);
                }
                (start.elapsed(), c)
            })
        })
        .collect();
    // 500 × 32 KiB = 16 MB: far more than the loopback socket buffers and
    // the slow client's 1 MiB queue (the default) can hold.
    let pad = "p".repeat(32 * 1024);
    let addr = node.addr.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..500 {
            let body = format!(r#"{{"topic":"bulk","data":{{"i":{i},"pad":"{pad}"}}}}"#);
            let (status, _) = common::http(&addr, "POST", "/api/publish", Some(&body), &[]);
            assert_eq!(status, 202);
            // Paced so that the test's own readers, sharing two cores, keep up.
            std::thread::sleep(Duration::from_millis(2));
        }
    })
    .await
    .unwrap();
    let mut keep = Vec::new();
    for r in readers {
        let (took, c) = r.await.unwrap();
        keep.push(c);
        assert!(took < Duration::from_secs(20), "fast readers took {took:?}");
    }
    assert_eq!(
        slow.closed_within(Duration::from_secs(20)).await,
        Some(Closed::Code(1013))
    );
    assert!(eventually(
        Duration::from_secs(5),
        || node.health()["connections"] == 10
    ));
}

#[tokio::test]
async fn silent_peer_is_closed_after_two_heartbeats() {
    let node = Node::start("core-heartbeat", &[("WEBSOCKET_HEARTBEAT_INTERVAL", "200")]);
    // A client that never reads never answers pings.
    let _silent = Client::connect(&node.ws_url("/ws")).await;
    assert!(eventually(
        Duration::from_secs(1),
        || node.health()["connections"] == 1
    ));
    assert!(
        eventually(Duration::from_secs(3), || node.health()["connections"] == 0),
        "silent peer closed"
    );
    // A client that reads (and so answers pings) stays.
    let mut alive = Client::connect(&node.ws_url("/ws")).await;
    assert!(
        alive
            .recv_within(Duration::from_millis(1000))
            .await
            .is_none()
    );
    alive.send(json!({"type":"ping"})).await;
    alive.expect("pong").await;
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let mut node = Node::start("core-sigterm", &[("SHUTDOWN_DRAIN_MS", "200")]);
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::connect(&node.ws_url("/ws/news")).await);
    }
    node.signal("TERM");
    for c in &mut clients {
        assert_eq!(
            c.closed_within(Duration::from_secs(5)).await,
            Some(Closed::Code(1001))
        );
    }
    let status = node.wait_exit(Duration::from_secs(8)).expect("exited");
    assert!(status.success(), "{status:?}");
}

/// Every `error` that answers a message says which type it answers
/// (`replyTo`), so a client routes it without reading the sentence: here a
/// topic named like a word of the sentences ("subscribe", "read").
#[tokio::test]
async fn errors_name_the_message_they_answer() {
    let node = Node::start("core-reply-to", &[("WEBSOCKET_MAX_SUBSCRIPTIONS", "1")]);
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    c.subscribe("read").await;
    let cases = [
        (
            json!({"type":"subscribe","event":"subscribe"}),
            "subscription_limit",
            Some("subscribe"),
        ),
        (
            json!({"type":"request","event":"subscribe"}),
            "no_data",
            Some("request"),
        ),
        (
            json!({"type":"publish","event":"read","data":1}),
            "forbidden",
            Some("publish"),
        ),
        (
            json!({"type":"publish","event":"device","data":1}),
            "forbidden",
            Some("publish"),
        ),
        (
            json!({"type":"subscribe","event":"x","since":{"offset":-1}}),
            "bad_message",
            Some("subscribe"),
        ),
        (
            json!({"type":"publish","event":"read"}),
            "bad_message",
            Some("publish"),
        ),
        (json!({"type":"refresh"}), "bad_message", Some("refresh")),
        (json!({"type":"nope"}), "bad_type", None),
    ];
    for (message, code, reply_to) in cases {
        c.send(message.clone()).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], code, "{message} → {e}");
        assert_eq!(
            e.get("replyTo").and_then(|v| v.as_str()),
            reply_to,
            "{message} → {e}"
        );
    }
}
