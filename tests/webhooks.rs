//! Signed webhooks and the control API with real nodes, their own
//! `redis-server`, and a real HTTP receiver (an axum server in this test
//! process that verifies each batch's signature against the raw body).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{Client, Closed, Node, Redis};
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "webhook-secret-for-tests";
const JWT_SECRET: &str = "a-test-secret-of-some-length";
const API_TOKEN: &str = "api-token-for-the-tests";

// === the receiver ===

/// One POST as received.
#[derive(Clone)]
struct Batch {
    node: String,
    events: Vec<Value>,
}

#[derive(Default)]
struct Received {
    batches: Mutex<Vec<Batch>>,
    /// Answer 500 until then.
    fail_until: Mutex<Option<Instant>>,
    /// Answer 307 to `/elsewhere` until then.
    redirect_until: Mutex<Option<Instant>>,
    /// Requests that reached `/elsewhere`.
    followed: AtomicUsize,
    refused: AtomicUsize,
    bad_signatures: AtomicUsize,
}

/// A real HTTP server that records what the nodes send.
struct Receiver {
    addr: SocketAddr,
    state: Arc<Received>,
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(Received::default());
        let app = axum::Router::new()
            .route("/hooks", axum::routing::post(receive))
            .route("/elsewhere", axum::routing::post(elsewhere))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    fn events(&self) -> Vec<Value> {
        let batches = self.state.batches.lock().unwrap();
        batches.iter().flat_map(|b| b.events.clone()).collect()
    }

    fn of_type(&self, ty: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["type"] == ty)
            .collect()
    }

    fn count(&self, ty: &str, f: impl Fn(&Value) -> bool) -> usize {
        self.of_type(ty).iter().filter(|e| f(e)).count()
    }
}

async fn elsewhere(State(state): State<Arc<Received>>) -> StatusCode {
    state.followed.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn receive(
    State(state): State<Arc<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let redirecting = state
        .redirect_until
        .lock()
        .unwrap()
        .is_some_and(|t| Instant::now() < t);
    if redirecting {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, "/elsewhere")],
        )
            .into_response();
    }
    verify(&state, &headers, &body).into_response()
}

/// The receiver proper: 500 while failing, the signature checked against
/// the raw bytes, the batch recorded.
fn verify(state: &Received, headers: &HeaderMap, body: &Bytes) -> StatusCode {
    let failing = state
        .fail_until
        .lock()
        .unwrap()
        .is_some_and(|t| Instant::now() < t);
    if failing {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    // Verify the raw bytes as they came, never re-serialized JSON.
    let sent = headers
        .get("x-switchboard-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    if sent != expected {
        state.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(body).unwrap();
    assert!(v["timeMs"].as_u64().unwrap() > 1_700_000_000_000, "{v}");
    let node = headers
        .get("x-switchboard-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    state.batches.lock().unwrap().push(Batch {
        node,
        events: v["events"].as_array().unwrap().clone(),
    });
    StatusCode::NO_CONTENT
}

// === helpers ===

/// Polls `f` every 50 ms (without blocking the runtime) until it holds or
/// `timeout` passes.
async fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hooks_env(receiver: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        ("WEBHOOK_URL", receiver.url()),
        ("WEBHOOK_SECRET", SECRET.to_string()),
        ("WEBHOOK_BATCH_MS", "50".to_string()),
        ("WEBHOOK_CLIENT_EVENT_TOPICS", "chat.*".to_string()),
        ("API_TOKEN", API_TOKEN.to_string()),
        ("LEADER_LEASE_MS", "2000".to_string()),
        ("WEBSOCKET_RATE_LIMIT", "0".to_string()),
    ]
}

fn start(name: &str, redis: &Redis, prefix: &str, env: &[(&'static str, String)]) -> Node {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Node::start_on_redis(name, &redis.url(), prefix, &env, Duration::from_secs(15))
}

/// `POST path` with the API token, off the runtime's threads.
async fn post(node: &Node, path: &str, body: Value) -> (u16, Value) {
    let addr = node.addr.clone();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        common::http(
            &addr,
            "POST",
            &path,
            Some(&body.to_string()),
            &[("Authorization", &format!("Bearer {API_TOKEN}"))],
        )
    })
    .await
    .unwrap()
}

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::default(),
        &json!({"sub": sub, "exp": exp, "publish": ["chat.*"]}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// Reads frames until one of type `ty`; other frames are skipped.
async fn frame(c: &mut Client, ty: &str) -> Value {
    loop {
        let m = c.recv().await;
        if m["type"] == ty {
            return m;
        }
    }
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_batches_one_occupied_and_one_vacated_for_100_clients_on_two_nodes() {
    let receiver = Receiver::start().await;
    let redis = Redis::start();
    let prefix = common::prefix("wh-occupancy");
    let env = hooks_env(&receiver);
    let a = start("wh-occ-a", &redis, &prefix, &env);
    let b = start("wh-occ-b", &redis, &prefix, &env);

    // 100 clients, half on each node, all subscribing to one topic at once.
    let mut clients = Vec::new();
    for i in 0..100 {
        let node = if i % 2 == 0 { &a } else { &b };
        clients.push(Client::connect(&node.ws_url("/ws")).await);
    }
    for c in &mut clients {
        c.send(json!({"type": "subscribe", "event": "room.1"}))
            .await;
    }
    for c in &mut clients {
        frame(c, "subscribed").await;
    }
    let ids: Vec<String> = clients.iter().map(|c| c.client_id.clone()).collect();
    assert!(
        until(Duration::from_secs(20), || receiver
            .count("client_connected", |_| true)
            == 100)
        .await,
        "client_connected: {}",
        receiver.count("client_connected", |_| true)
    );
    assert!(
        until(Duration::from_secs(20), || receiver
            .count("topic_occupied", |e| e["topic"] == "room.1")
            >= 1)
        .await
    );
    let connected = receiver.of_type("client_connected");
    for e in &connected {
        assert!(
            ids.contains(&e["client"].as_str().unwrap().to_string()),
            "{e}"
        );
        assert_eq!(e["transport"], "websocket");
        assert_eq!(e["user"], "");
        assert!(e["node"] == "wh-occ-a" || e["node"] == "wh-occ-b", "{e}");
    }

    // A client publication on a WEBHOOK_CLIENT_EVENT_TOPICS topic.
    // (Publishing needs a `publish` claim: without client tokens nobody
    // may, so this node refuses it and sends no client_event.)
    clients[0]
        .send(json!({"type": "publish", "event": "chat.1", "data": {"x": 1}}))
        .await;
    assert_eq!(frame(&mut clients[0], "error").await["code"], "forbidden");

    // All leave: a third unsubscribe, a third close politely, a third drop
    // their TCP connection without a close.
    let mut rest = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        match i % 3 {
            0 => {
                c.send(json!({"type": "unsubscribe", "event": "room.1"}))
                    .await;
                frame(&mut c, "unsubscribed").await;
                rest.push(c);
            }
            1 => {
                c.ws.close(None).await.unwrap();
            }
            _ => drop(c),
        }
    }
    assert!(
        until(Duration::from_secs(20), || receiver
            .count("topic_vacated", |e| e["topic"] == "room.1")
            >= 1)
        .await,
        "no topic_vacated"
    );
    drop(rest);
    assert!(
        until(Duration::from_secs(20), || receiver
            .count("client_disconnected", |_| true)
            == 100)
        .await,
        "client_disconnected: {}",
        receiver.count("client_disconnected", |_| true)
    );
    // Nothing more arrives: exactly one event per transition.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.count("topic_occupied", |e| e["topic"] == "room.1"),
        1
    );
    assert_eq!(
        receiver.count("topic_vacated", |e| e["topic"] == "room.1"),
        1
    );
    let seq = |ty: &str| receiver.of_type(ty)[0]["seq"].as_u64().unwrap();
    assert!(seq("topic_occupied") < seq("topic_vacated"));
    assert_eq!(receiver.count("client_connected", |_| true), 100);
    assert_eq!(receiver.count("client_disconnected", |_| true), 100);
    // Each client: connected before disconnected, on one node.
    let events = receiver.events();
    for id in &ids {
        let mine: Vec<&Value> = events.iter().filter(|e| e["client"] == *id).collect();
        assert_eq!(mine.len(), 2, "{id}: {mine:?}");
        assert_eq!(mine[0]["type"], "client_connected");
        assert_eq!(mine[1]["type"], "client_disconnected");
        assert_eq!(mine[0]["node"], mine[1]["node"]);
        assert_eq!(mine[1]["reason"], "client");
    }
    assert_eq!(receiver.state.bad_signatures.load(Ordering::Relaxed), 0);
    assert!(
        receiver
            .state
            .batches
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.node == "wh-occ-a" || b.node == "wh-occ-b")
    );
    // Two nodes' /metrics count what was sent.
    let (_, metrics) = common::http_text(&a.addr, "GET", "/metrics", None, &[]);
    assert!(
        metrics.contains(
            r#"switchboard_webhook_events_total{type="client_connected",outcome="sent"} 50"#
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("webhook"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_reports_the_dead_nodes_50_clients_and_its_last_topic_within_the_bound() {
    let receiver = Receiver::start().await;
    let redis = Redis::start();
    let prefix = common::prefix("wh-kill");
    let env = hooks_env(&receiver);
    // The survivor starts first and leads: the reaper runs on the leader.
    let survivor = start("wh-kill-b", &redis, &prefix, &env);
    assert!(
        until(Duration::from_secs(10), || survivor.health()["leader"]
            == true)
        .await,
        "the survivor never led"
    );
    let mut victim = start("wh-kill-a", &redis, &prefix, &env);

    let mut on_victim = Vec::new();
    for i in 0..50 {
        let mut c = Client::connect(&victim.ws_url("/ws")).await;
        c.subscribe("shared").await;
        if i < 10 {
            c.subscribe("solo").await;
        }
        on_victim.push(c);
    }
    let mut on_survivor = Client::connect(&survivor.ws_url("/ws")).await;
    on_survivor.subscribe("shared").await;
    // Every client_connected of the victim went out, and so its records
    // were written before.
    assert!(
        until(Duration::from_secs(20), || receiver
            .count("client_connected", |e| e["node"] == "wh-kill-a")
            == 50)
        .await
    );
    assert!(
        until(Duration::from_secs(20), || receiver
            .count("topic_occupied", |e| e["topic"] == "solo")
            == 1)
        .await
    );

    victim.kill9();
    let killed = Instant::now();
    let lost = |r: &Receiver| {
        r.count("client_disconnected", |e| {
            e["node"] == "wh-kill-a" && e["reason"] == "node_lost"
        })
    };
    assert!(
        until(Duration::from_secs(40), || lost(&receiver) == 50
            && receiver.count("topic_vacated", |e| e["topic"] == "solo")
                == 1)
        .await,
        "after {:?}: {} client_disconnected, vacated: {:?}",
        killed.elapsed(),
        lost(&receiver),
        receiver.of_type("topic_vacated")
    );
    let took = killed.elapsed();
    eprintln!("the dead node was reported {took:?} after kill -9");
    // Documented bound: registry TTL (10 s) + one reaper round (2 s), plus delivery.
    assert!(took < Duration::from_secs(12 + 4), "took {took:?}");
    let victims: Vec<String> = on_victim.iter().map(|c| c.client_id.clone()).collect();
    for e in receiver.of_type("client_disconnected") {
        assert!(
            victims.contains(&e["client"].as_str().unwrap().to_string()),
            "{e}"
        );
    }
    // `shared` still has a subscriber on the survivor: not vacated.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.count("topic_vacated", |e| e["topic"] == "shared"),
        0
    );
    assert_eq!(lost(&receiver), 50);
    // The dead node's keys are gone.
    assert_eq!(
        redis.cmd(&["EXISTS", &format!("{prefix}:node-clients:wh-kill-a")]),
        ":0"
    );
    assert_eq!(
        redis.cmd(&["SISMEMBER", &format!("{prefix}:tracked-nodes"), "wh-kill-a"]),
        ":0"
    );
    on_survivor
        .send(json!({"type": "unsubscribe", "event": "shared"}))
        .await;
    assert!(
        until(Duration::from_secs(10), || receiver
            .count("topic_vacated", |e| e["topic"] == "shared")
            == 1)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_answering_500_for_10_s_loses_nothing_and_order_holds() {
    let receiver = Receiver::start().await;
    *receiver.state.fail_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(10));
    let redis = Redis::start();
    let prefix = common::prefix("wh-retry");
    let mut env = hooks_env(&receiver);
    env.push(("WEBHOOK_BATCH_MAX", "4".into()));
    let node = start("wh-retry", &redis, &prefix, &env);
    let mut ids = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        c.subscribe("t.retry").await;
        ids.push(c.client_id.clone());
        c.ws.close(None).await.unwrap();
        assert!(matches!(
            c.closed_within(Duration::from_secs(5)).await,
            Some(Closed::Code(_) | Closed::NoCode)
        ));
    }
    assert!(
        until(Duration::from_secs(60), || receiver
            .count("client_disconnected", |_| true)
            == 20)
        .await,
        "received {} events",
        receiver.events().len()
    );
    assert!(receiver.state.refused.load(Ordering::Relaxed) > 0);
    let events = receiver.events();
    // In the order they happened: the clients connected one after the
    // other, and each one's pair is in order.
    let connected: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "client_connected")
        .map(|e| e["client"].as_str().unwrap())
        .collect();
    assert_eq!(
        connected,
        ids.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for id in &ids {
        let types: Vec<&Value> = events
            .iter()
            .filter(|e| e["client"] == *id)
            .map(|e| &e["type"])
            .collect();
        assert_eq!(
            types,
            [&json!("client_connected"), &json!("client_disconnected")]
        );
    }
    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    assert!(metrics.contains("switchboard_webhook_queue 0"), "{metrics}");
}

/// Events a full queue drops are lost (counted), but the client records
/// behind them are not left in Redis for the node's whole life: a record
/// is kept only for a `client_connected` that was queued, and one whose
/// `client_disconnected` was dropped is deleted with the next batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_leaves_no_client_record_behind() {
    let receiver = Receiver::start().await;
    *receiver.state.fail_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(4));
    let redis = Redis::start();
    let prefix = common::prefix("wh-full");
    let mut env = hooks_env(&receiver);
    env.push(("WEBHOOK_BATCH_MAX", "1".into()));
    env.push(("WEBHOOK_QUEUE_SIZE", "3".into()));
    let node = start("wh-full", &redis, &prefix, &env);
    for _ in 0..30 {
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        c.ws.close(None).await.unwrap();
        assert!(matches!(
            c.closed_within(Duration::from_secs(5)).await,
            Some(Closed::Code(_) | Closed::NoCode)
        ));
    }
    let records = format!("{prefix}:node-clients:wh-full");
    // Once the receiver answers again and the queue is empty, no client is
    // connected and no record is left.
    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("outcome=\"overflow\""),
        "the queue overflowed: {metrics}"
    );
    assert!(
        until(Duration::from_secs(30), || {
            let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
            metrics.contains("switchboard_webhook_queue 0")
                && redis.cmd(&["HLEN", &records]) == ":0"
        })
        .await,
        "records left: {}",
        redis.cmd(&["HGETALL", &records])
    );
}

/// A redirect would carry a batch and its signature to wherever it points:
/// it is a failed delivery, retried at the configured URL, never followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_redirects_is_retried_in_place_and_never_followed() {
    let receiver = Receiver::start().await;
    *receiver.state.redirect_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(3));
    let redis = Redis::start();
    let prefix = common::prefix("wh-redirect");
    let node = start("wh-redirect", &redis, &prefix, &hooks_env(&receiver));
    let mut c = Client::connect(&node.ws_url("/ws")).await;
    let id = c.client_id.clone();
    c.ws.close(None).await.unwrap();
    assert!(
        until(Duration::from_secs(30), || receiver
            .count("client_disconnected", |e| e["client"] == id.as_str())
            == 1)
        .await,
        "received {:?}",
        receiver.events()
    );
    assert!(receiver.state.refused.load(Ordering::Relaxed) > 0);
    assert_eq!(receiver.state.followed.load(Ordering::Relaxed), 0);
    assert_eq!(
        receiver.count("client_connected", |e| e["client"] == id.as_str()),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_api_reaches_a_users_connections_on_both_nodes() {
    let receiver = Receiver::start().await;
    let redis = Redis::start();
    let prefix = common::prefix("wh-control");
    let mut env = hooks_env(&receiver);
    env.push(("AUTH_JWT_SECRET", JWT_SECRET.into()));
    let a = start("wh-ctl-a", &redis, &prefix, &env);
    let b = start("wh-ctl-b", &redis, &prefix, &env);
    // The registry must know both nodes for the answers to be awaited.
    assert!(
        until(Duration::from_secs(10), || a.health()["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2))
        .await
    );
    let (u1, u2) = (token("u1"), token("u2"));
    let mut a1 = Client::connect(&a.ws_url(&format!("/ws?token={u1}"))).await;
    let mut a2 = Client::connect(&a.ws_url(&format!("/ws?token={u1}"))).await;
    let mut b1 = Client::connect(&b.ws_url(&format!("/ws?token={u1}"))).await;
    let mut other = Client::connect(&b.ws_url(&format!("/ws?token={u2}"))).await;

    // Bad bodies: the project's error format.
    for (body, needle) in [
        (json!({"topic": "x"}), "\"client\""),
        (
            json!({"client": "a", "user": "u1", "topic": "x"}),
            "not both",
        ),
        (json!({"user": "u1", "topic": "bad topic"}), "invalid topic"),
        (json!({"user": "u1"}), "missing field `topic`"),
        (
            json!({"user": "u1", "topic": "x", "extra": 1}),
            "unknown field",
        ),
    ] {
        let (status, v) = post(&a, "/api/subscribe", body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["success"], false);
        assert_eq!(v["code"], "bad_request");
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    let (status, v) = post(&a, "/api/disconnect", json!({"user": "u1", "code": 1000})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("4000-4499"), "{v}");
    let (status, _) = tokio::task::spawn_blocking({
        let addr = a.addr.clone();
        move || {
            common::http(
                &addr,
                "POST",
                "/api/subscribe",
                Some(r#"{"user":"u1","topic":"x"}"#),
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 401);

    // Server-side subscription by user: both nodes, u1's three connections.
    let (status, v) = post(
        &a,
        "/api/subscribe",
        json!({"user": "u1", "topic": "news.u1"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["data"]["reached"], 3, "{v}");
    for c in [&mut a1, &mut a2, &mut b1] {
        let m = frame(c, "subscribed").await;
        assert_eq!(m["event"], "news.u1");
        // A history topic: the recovery fields.
        assert_eq!(m["offset"], 0, "{m}");
        assert!(m["epoch"].is_string(), "{m}");
    }
    let (status, v) = post(
        &b,
        "/api/publish",
        json!({"topic": "news.u1", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    for c in [&mut a1, &mut a2, &mut b1] {
        let m = frame(c, "event").await;
        assert_eq!(m["data"], json!({"n": 1}));
        assert_eq!(m["offset"], 1);
    }
    assert!(
        other
            .recv_within(Duration::from_millis(500))
            .await
            .is_none(),
        "u2 got something"
    );

    // By client id, from the other node.
    let (_, v) = post(
        &b,
        "/api/subscribe",
        json!({"client": a1.client_id, "topic": "solo"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 1, "{v}");
    assert_eq!(frame(&mut a1, "subscribed").await["event"], "solo");
    let (_, v) = post(
        &b,
        "/api/subscribe",
        json!({"client": "0000000000000000", "topic": "solo"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 0, "{v}");

    // A client publication on chat.*: a client_event webhook.
    a1.send(json!({"type": "publish", "event": "chat.1", "name": "msg", "data": {"text": "hi"}}))
        .await;
    assert!(
        until(Duration::from_secs(10), || receiver
            .count("client_event", |_| true)
            == 1)
        .await
    );
    let e = &receiver.of_type("client_event")[0];
    assert_eq!(
        *e,
        json!({"type": "client_event", "topic": "chat.1", "event": "msg", "data": {"text": "hi"}, "client": a1.client_id, "user": "u1"})
    );

    // Unsubscribe: `unsubscribed` with reason "server".
    let (_, v) = post(
        &a,
        "/api/unsubscribe",
        json!({"user": "u1", "topic": "news.u1"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 3, "{v}");
    for c in [&mut a1, &mut a2, &mut b1] {
        let m = frame(c, "unsubscribed").await;
        assert_eq!(m["event"], "news.u1");
        assert_eq!(m["reason"], "server");
    }

    // Disconnect: every u1 connection closes with 4500 and the reason.
    let (_, v) = post(
        &b,
        "/api/disconnect",
        json!({"user": "u1", "code": 4500, "reason": "account closed"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 3, "{v}");
    for c in [&mut a1, &mut a2, &mut b1] {
        let frame = loop {
            match tokio::time::timeout(
                Duration::from_secs(10),
                futures_util::StreamExt::next(&mut c.ws),
            )
            .await
            .expect("no close")
            {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => break f,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        };
        let f = frame.expect("a close code");
        assert_eq!(u16::from(f.code), 4500);
        assert_eq!(f.reason.as_str(), "account closed");
    }
    assert!(
        until(Duration::from_secs(10), || receiver
            .count("client_disconnected", |e| e["user"] == "u1"
                && e["reason"] == "backend")
            == 3)
        .await,
        "{:?}",
        receiver.of_type("client_disconnected")
    );
    // u2 is untouched.
    other.send(json!({"type": "ping"})).await;
    assert_eq!(other.expect("pong").await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socketio_sockets_on_both_transports_take_server_side_commands() {
    let receiver = Receiver::start().await;
    let redis = Redis::start();
    let prefix = common::prefix("wh-sio");
    let mut env = hooks_env(&receiver);
    env.push(("AUTH_JWT_SECRET", JWT_SECRET.into()));
    let a = start("wh-sio-a", &redis, &prefix, &env);
    let b = start("wh-sio-b", &redis, &prefix, &env);
    assert!(
        until(Duration::from_secs(10), || a.health()["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2))
        .await
    );
    // socket.io-client: one socket on our websocket transport (node a), one
    // long-polling (node b), both user u1.
    let script = common::interop_script("sio_control.mjs");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{}", a.addr))
        .arg(format!("http://{}", b.addr))
        .arg(token("u1"))
        .env("SWITCHBOARD_TOOLS", common::tools())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the script said nothing")
            .unwrap()
            .expect("the script ended")
    };
    let ready = next().await;
    let sids: Vec<String> = ready
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("{ready}"))
        .split(' ')
        .map(String::from)
        .collect();
    assert_eq!(sids.len(), 2);
    assert!(
        until(Duration::from_secs(10), || {
            let c = receiver.of_type("client_connected");
            sids.iter().all(|s| {
                c.iter()
                    .any(|e| e["client"] == *s && e["transport"] == "socketio" && e["user"] == "u1")
            })
        })
        .await,
        "{:?}",
        receiver.of_type("client_connected")
    );
    let (_, v) = post(
        &a,
        "/api/subscribe",
        json!({"user": "u1", "topic": "news.sio"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 2, "{v}");
    assert_eq!(next().await, "SUBSCRIBED 2");
    let (_, v) = post(
        &a,
        "/api/publish",
        json!({"topic": "news.sio", "data": {"n": 7}}),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(next().await, "EVENTS 2");
    let (_, v) = post(
        &b,
        "/api/unsubscribe",
        json!({"user": "u1", "topic": "news.sio"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 2, "{v}");
    assert_eq!(next().await, "UNSUBSCRIBED 2");
    let (_, v) = post(
        &b,
        "/api/disconnect",
        json!({"client": sids[1], "code": 4001, "reason": "moved"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 1, "{v}");
    assert_eq!(
        next().await,
        "DISCONNECTED 1 4001 moved true io server disconnect"
    );
    let (_, v) = post(
        &b,
        "/api/disconnect",
        json!({"user": "u1", "code": 4500, "reason": "bye"}),
    )
    .await;
    assert_eq!(v["data"]["reached"], 1, "{v}");
    assert_eq!(
        next().await,
        "DISCONNECTED 0 4500 bye false io server disconnect"
    );
    assert!(
        until(Duration::from_secs(10), || receiver.count(
            "client_disconnected",
            |e| sids.iter().any(|s| e["client"] == *s) && e["reason"] == "backend"
        ) == 2)
        .await,
        "{:?}",
        receiver.of_type("client_disconnected")
    );
    let _ = child.kill().await;
}

#[test]
fn a_drained_node_reports_its_clients_and_topics_before_it_exits() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = rt.block_on(Receiver::start());
    // Embedded mode: no Redis; the same webhooks.
    let env: Vec<(&'static str, String)> = hooks_env(&receiver);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut node = Node::start("wh-drain", &env);
    let clients: Vec<Client> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..10 {
            let mut c = Client::connect(&node.ws_url("/ws")).await;
            c.subscribe("drained").await;
            v.push(c);
        }
        v
    });
    assert!(common::eventually(Duration::from_secs(10), || receiver
        .count("topic_occupied", |e| e["topic"] == "drained")
        == 1));
    node.signal("TERM");
    assert!(node.wait_exit(Duration::from_secs(15)).is_some());
    // Delivered before the process ended.
    assert_eq!(
        receiver.count("client_disconnected", |e| e["reason"] == "shutdown"),
        10,
        "{:?}",
        receiver.events()
    );
    assert_eq!(
        receiver.count("topic_vacated", |e| e["topic"] == "drained"),
        1
    );
    drop(clients);
}

/// A receiver that is down for a node's whole drain still hears of that
/// node's clients: the node keeps its records when its last batches were
/// not delivered, and the other node's reaper reports them.
#[test]
fn clients_of_a_node_drained_while_the_receiver_was_down_are_reported_later() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = rt.block_on(Receiver::start());
    let redis = Redis::start();
    let prefix = common::prefix("wh-drain-down");
    let mut env = hooks_env(&receiver);
    env.push(("SHUTDOWN_GRACE_MS", "2000".into()));
    let mut a = start("wh-dd-a", &redis, &prefix, &env);
    let _b = start("wh-dd-b", &redis, &prefix, &env);
    let clients: Vec<Client> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(Client::connect(&a.ws_url("/ws")).await);
        }
        v
    });
    let ids: Vec<String> = clients.iter().map(|c| c.client_id.clone()).collect();
    assert!(common::eventually(Duration::from_secs(10), || receiver
        .count("client_connected", |e| e["node"] == "wh-dd-a")
        == 5));
    *receiver.state.fail_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(600));
    a.signal("TERM");
    assert!(a.wait_exit(Duration::from_secs(15)).is_some());
    assert_eq!(receiver.count("client_disconnected", |_| true), 0);
    *receiver.state.fail_until.lock().unwrap() = None;
    let reported = |id: &str| {
        receiver.count("client_disconnected", |e| {
            e["client"] == id && e["node"] == "wh-dd-a" && e["reason"] == "node_lost"
        })
    };
    assert!(
        common::eventually(Duration::from_secs(40), || ids
            .iter()
            .all(|id| reported(id) == 1)),
        "{:?}",
        receiver.of_type("client_disconnected")
    );
    drop(clients);
}

/// The Flask example's receiver (`examples/flask-backend/webhook_receiver.py`)
/// verifies the signature with Python's `hmac` and applies the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_flask_example_receiver_verifies_and_applies_the_events() {
    let python = common::python();
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test, which installs Flask",
        python.display()
    );
    let port = common::free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/flask-backend/webhook_receiver.py");
    let mut flask = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--port", &port.to_string()])
        .env("WEBHOOK_SECRET", SECRET)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python");
    let addr = format!("127.0.0.1:{port}");
    let state = {
        let addr = addr.clone();
        move || {
            let addr = addr.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    std::net::TcpStream::connect(&addr)
                        .ok()
                        .map(|_| common::http(&addr, "GET", "/webhooks/state", None, &[]).1)
                })
                .await
                .unwrap()
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while state().await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the Flask receiver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A forged batch is refused.
    let (status, _) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            common::http(
                &addr,
                "POST",
                "/webhooks",
                Some(r#"{"timeMs":1,"events":[{"type":"topic_occupied","topic":"x"}]}"#),
                &[("X-Switchboard-Signature", "sha256=00")],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 401);

    let node = Node::start(
        "wh-flask",
        &[
            ("WEBHOOK_URL", &format!("http://{addr}/webhooks")),
            ("WEBHOOK_SECRET", SECRET),
            ("WEBHOOK_BATCH_MS", "20"),
        ],
    );
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        c.subscribe("room.flask").await;
        clients.push(c);
    }
    let mut seen = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        seen = state().await.unwrap();
        if seen["connected"].as_object().is_some_and(|c| c.len() == 3)
            && seen["occupied"] == json!(["room.flask"])
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen["occupied"], json!(["room.flask"]), "{seen}");
    for c in &clients {
        assert_eq!(
            seen["connected"][&c.client_id]["transport"], "websocket",
            "{seen}"
        );
    }
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        seen = state().await.unwrap();
        if seen["counts"]["topic_vacated"] == 1 && seen["counts"]["client_disconnected"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen["occupied"], json!([]), "{seen}");
    assert_eq!(seen["connected"], json!({}), "{seen}");
    assert_eq!(seen["counts"]["topic_occupied"], 1, "{seen}");
    let _ = flask.kill().await;
}

/// A node drained under 60 clients that all reconnect at once to the other
/// node: every connection's pair arrives in order, none is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mass_reconnect_never_reorders_a_connections_pair() {
    let receiver = Receiver::start().await;
    let redis = Redis::start();
    let prefix = common::prefix("wh-mass");
    let mut env = hooks_env(&receiver);
    // Close everyone within 200 ms: a burst of reconnects.
    env.push(("SHUTDOWN_DRAIN_MS", "200".into()));
    let mut a = start("wh-mass-a", &redis, &prefix, &env);
    let b = start("wh-mass-b", &redis, &prefix, &env);
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let mut c = Client::connect(&a.ws_url("/ws")).await;
        c.subscribe("crowd").await;
        let url = b.ws_url("/ws");
        tasks.push(tokio::spawn(async move {
            // Wait for the drain's close, then come back on the other node.
            let closed = c.closed_within(Duration::from_secs(30)).await;
            assert!(closed.is_some(), "not closed by the drain");
            let mut again = Client::connect(&url).await;
            again.subscribe("crowd").await;
            (c.client_id, again)
        }));
    }
    assert!(
        until(Duration::from_secs(20), || receiver
            .count("client_connected", |e| e["node"] == "wh-mass-a")
            == 60)
        .await
    );
    a.signal("TERM");
    let mut ids = Vec::new();
    let mut again = Vec::new();
    for t in tasks {
        let (old, new) = t.await.unwrap();
        ids.push(old);
        ids.push(new.client_id.clone());
        again.push(new);
    }
    assert!(a.wait_exit(Duration::from_secs(15)).is_some());
    drop(again);
    assert!(
        until(Duration::from_secs(30), || receiver
            .count("client_disconnected", |_| true)
            == 120)
        .await,
        "{} client_disconnected",
        receiver.count("client_disconnected", |_| true)
    );
    let events = receiver.events();
    for id in &ids {
        let mine: Vec<&Value> = events.iter().filter(|e| e["client"] == *id).collect();
        let types: Vec<&str> = mine.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["client_connected", "client_disconnected"], "{id}");
    }
    assert_eq!(
        receiver.count("client_disconnected", |e| e["node"] == "wh-mass-a"
            && e["reason"] == "shutdown"),
        60
    );
    // The topic changed hands between the nodes: its transitions, put in
    // order by their seq (they come from both nodes' queues), alternate
    // and end vacated.
    assert!(
        until(Duration::from_secs(10), || {
            let mut crowd: Vec<(u64, String)> = receiver
                .events()
                .iter()
                .filter(|e| e["topic"] == "crowd")
                .map(|e| {
                    (
                        e["seq"].as_u64().unwrap(),
                        e["type"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            crowd.sort();
            crowd.last().is_some_and(|(_, t)| t == "topic_vacated")
        })
        .await
    );
    let mut crowd: Vec<(u64, String)> = receiver
        .events()
        .iter()
        .filter(|e| e["topic"] == "crowd")
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    crowd.sort();
    assert_eq!(crowd[0].1, "topic_occupied", "{crowd:?}");
    assert!(
        crowd
            .windows(2)
            .all(|w| w[0].1 != w[1].1 && w[0].0 < w[1].0),
        "transitions alternate: {crowd:?}"
    );
}

/// The code block of `docs/backend.md` whose info string starts with `lang`
/// under "### Verifying the signature", as written.
fn doc_snippet(lang: &str) -> String {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/backend.md"),
    )
    .unwrap();
    let section = &doc[doc.find("### Verifying the signature").unwrap()..];
    let start = section
        .find(&format!("```{lang} "))
        .unwrap_or_else(|| panic!("no {lang} block"));
    let body = &section[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("\n```").unwrap() + 1].to_string()
}

/// The Python and Node verification snippets of `docs/backend.md` run as
/// written: each receives a node's batches, verifies them and prints the
/// events, and refuses a forged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_documented_verification_snippets_receive_and_refuse() {
    let dir = std::env::temp_dir().join(format!("sb-doc-snippets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let python = dir.join("receiver.py");
    let js = dir.join("receiver.mjs");
    std::fs::write(&python, doc_snippet("python")).unwrap();
    std::fs::write(&js, doc_snippet("js")).unwrap();
    let runs: [(std::path::PathBuf, Vec<String>); 2] = [
        (
            common::python(),
            vec!["-u".into(), python.display().to_string()],
        ),
        ("node".into(), vec![js.display().to_string()]),
    ];
    for (program, args) in runs {
        let port = common::free_port();
        let mut receiver = tokio::process::Command::new(&program)
            .args(&args)
            .env("WEBHOOK_SECRET", SECRET)
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen",
                program.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let forged = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || {
                common::http(
                    &addr,
                    "POST",
                    "/webhooks",
                    Some(r#"{"timeMs":1,"events":[]}"#),
                    &[("X-Switchboard-Signature", "sha256=00")],
                )
                .0
            }
        })
        .await
        .unwrap();
        assert_eq!(forged, 401, "{} took a forged batch", program.display());
        let node = Node::start(
            "wh-snippet",
            &[
                ("WEBHOOK_URL", &format!("http://{addr}/webhooks")),
                ("WEBHOOK_SECRET", SECRET),
                ("WEBHOOK_BATCH_MS", "20"),
            ],
        );
        let mut c = Client::connect(&node.ws_url("/ws")).await;
        c.subscribe("doc").await;
        let stdout = receiver.stdout.take().unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let mut seen = Vec::new();
        while !(seen
            .iter()
            .any(|l: &String| l.starts_with("client_connected "))
            && seen.iter().any(|l| l.starts_with("topic_occupied ")))
        {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("{}: {seen:?}", program.display()))
                .unwrap()
                .expect("the receiver ended");
            seen.push(line);
        }
        let connected = seen
            .iter()
            .find_map(|l| l.strip_prefix("client_connected "))
            .unwrap();
        let v: Value = serde_json::from_str(connected).unwrap();
        assert_eq!(v["client"], c.client_id.as_str());
        drop(c);
        drop(node);
        let _ = receiver.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
