//! Authentication, permissions, endpoint tokens, limits and hostile input.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Client, Node, Redis, eventually, http};
use futures_util::SinkExt;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

const SECRET: &str = "a-test-secret-of-some-length";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: Value, secret: &str) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The HTTP status of a refused WebSocket handshake (0 if it was accepted).
async fn handshake_status(req: tungstenite::handshake::client::Request) -> u16 {
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 0,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

fn request(url: &str) -> tungstenite::handshake::client::Request {
    url.into_client_request().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_origins_and_topic_permissions() {
    let node = Node::start(
        "sec-jwt",
        &[
            ("AUTH_JWT_SECRET", SECRET),
            ("CORS_ALLOWED_ORIGINS", "https://app.example"),
        ],
    );
    let url = node.ws_url("/ws");
    let good = token(
        json!({"sub":"u1","exp": now() + 600, "topics":["news.*"]}),
        SECRET,
    );
    let expired = token(json!({"sub":"u1","exp": now() - 60}), SECRET);
    let forged = token(
        json!({"sub":"u1","exp": now() + 600}),
        "another-secret-entirely",
    );

    assert_eq!(handshake_status(request(&url)).await, 401, "no token");
    assert_eq!(
        handshake_status(request(&format!("{url}?token={expired}"))).await,
        401
    );
    assert_eq!(
        handshake_status(request(&format!("{url}?token={forged}"))).await,
        401
    );
    let mut foreign = request(&format!("{url}?token={good}"));
    foreign
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    assert_eq!(handshake_status(foreign).await, 403, "foreign Origin");

    let mut c = Client::connect(&format!("{url}?token={good}")).await;
    c.subscribe("news.sports").await;
    c.send(json!({"type":"subscribe","event":"admin"})).await;
    let e = c.expect("error").await;
    assert_eq!(e["code"], "forbidden");
    assert!(e["error"].as_str().unwrap().contains("admin"));
    c.send(json!({"type":"ping"})).await;
    c.expect("pong").await;
    // no publish claim: client publishing is refused
    c.send(json!({"type":"publish","event":"news.sports","data":1}))
        .await;
    assert_eq!(c.expect("error").await["code"], "forbidden");

    // The Bearer header works like the query parameter; allowed origin passes.
    let mut req = request(&url);
    req.headers_mut()
        .insert("authorization", format!("Bearer {good}").parse().unwrap());
    req.headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut bearer = Client {
        ws,
        client_id: String::new(),
    };
    assert_eq!(bearer.recv().await["type"], "connected");
    // A forbidden topic in the path is refused before the upgrade.
    assert_eq!(
        handshake_status(request(&format!(
            "{}?token={good}",
            node.ws_url("/ws/admin")
        )))
        .await,
        403
    );

    // A publish claim lets a client publish to matching topics.
    let publisher = token(json!({"exp": now() + 600, "publish":["news.*"]}), SECRET);
    let mut p = Client::connect(&format!("{url}?token={publisher}")).await;
    p.send(json!({"type":"publish","event":"news.sports","data":{"goal":1}}))
        .await;
    let e = c.expect("event").await;
    assert_eq!(e["data"], json!({"goal":1}));
}

#[test]
fn python_socketio_needs_auth_token() {
    let node = Node::start("sec-sio", &[("AUTH_JWT_SECRET", SECRET)]);
    let good = token(json!({"exp": now() + 600}), SECRET);
    let url = format!("http://{}", node.addr);
    let script = common::interop_script("sio_auth.py");
    common::run_interop(&common::python(), &[&script, &url, &good]);
    common::run_interop(&common::python(), &[&script, &url, &good, "websocket"]);
}

#[test]
fn endpoint_tokens_are_enforced_separately() {
    let api = "api-token-0123456789abcdef";
    let admin = "admin-token-0123456789abcdef";
    let node = Node::start("sec-tokens", &[("API_TOKEN", api), ("ADMIN_TOKEN", admin)]);
    let publish = r#"{"topic":"news","data":1}"#;
    let bearer = |t: &str| format!("Bearer {t}");
    let post = |path: &str, body: &str, auth: Option<&str>| {
        let h = auth.map(bearer);
        let headers: Vec<(&str, &str)> = h.iter().map(|v| ("Authorization", v.as_str())).collect();
        http(&node.addr, "POST", path, Some(body), &headers)
    };
    let get = |path: &str, auth: Option<&str>| {
        let h = auth.map(bearer);
        let headers: Vec<(&str, &str)> = h.iter().map(|v| ("Authorization", v.as_str())).collect();
        http(&node.addr, "GET", path, None, &headers)
    };
    let (status, body) = post("/api/publish", publish, None);
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthorized");
    assert_eq!(
        post("/api/publish", publish, Some(admin)).0,
        401,
        "admin token is not the API token"
    );
    assert_eq!(post("/api/publish", publish, Some(api)).0, 202);
    assert_eq!(post("/api/switch", r#"{"app":"stars"}"#, None).0, 401);
    assert_eq!(post("/api/switch", r#"{"app":"stars"}"#, Some(api)).0, 200);
    assert_eq!(get("/admin/websocket/stats", None).0, 401);
    assert_eq!(
        get("/admin/websocket/stats", Some(api)).0,
        401,
        "API token is not the admin token"
    );
    assert_eq!(get("/admin/websocket/stats", Some(admin)).0, 200);
    // reads and probes stay open
    assert_eq!(get("/api/state", None).0, 200);
    assert_eq!(get("/healthz", None).0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_connection_limit() {
    let node = Node::start(
        "sec-limits",
        &[("WEBSOCKET_RATE_LIMIT", "20"), ("MAX_CONNECTIONS", "60")],
    );
    let mut calm = Client::connect(&node.ws_url("/ws")).await;
    let mut flood = Client::connect(&node.ws_url("/ws")).await;
    for _ in 0..3000 {
        if flood
            .ws
            .feed(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = flood.ws.flush().await;
    // The client is told why before the close.
    let mut told = false;
    loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(&mut flood.ws),
        )
        .await
        .expect("closed within 5 s")
        {
            Some(Ok(Message::Text(t))) => {
                told |= serde_json::from_str::<Value>(&t).unwrap()["code"] == "rate_limited";
            }
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1008);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("expected close 1008, got {other:?}"),
        }
    }
    assert!(told, "a rate_limited error came before the close");
    // Counted with the other limits' refusals, for the operator.
    let (_, metrics) = common::http_text(&node.addr, "GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("switchboard_limit_refusals_total{limit=\"message_rate\"} 1"),
        "{metrics}"
    );
    let sent = Instant::now();
    calm.send(json!({"type":"ping"})).await;
    calm.expect("pong").await;
    assert!(sent.elapsed() < Duration::from_millis(500));

    let mut held = vec![calm];
    while held.len() < 60 {
        held.push(Client::connect(&node.ws_url("/ws")).await);
    }
    assert!(eventually(
        Duration::from_secs(2),
        || node.health()["connections"] == 60
    ));
    assert_eq!(handshake_status(request(&node.ws_url("/ws"))).await, 503);
    held.pop();
    assert!(eventually(
        Duration::from_secs(2),
        || node.health()["connections"] == 59
    ));
    Client::connect(&node.ws_url("/ws")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_leave_the_node_healthy_and_others_served() {
    let node = Node::start("sec-hostile", &[("WEBSOCKET_RATE_LIMIT", "0")]);
    let mut others = Vec::new();
    for _ in 0..100 {
        let mut c = Client::connect(&node.ws_url("/ws/steady")).await;
        c.expect("subscribed").await;
        others.push(c);
    }
    let mut attacker = Client::connect(&node.ws_url("/ws")).await;
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let templates = [
        r#"{"type":"subscribe","event":"x"}"#,
        r#"{"type":"request","event":"ticker"}"#,
        r#"{"type":"publish","event":"steady","data":{"a":[1,2,3]}}"#,
        r#"{"type":"unsubscribe","event":"y"}"#,
    ];
    let publisher = {
        let addr = node.addr.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..50 {
                let (s, _) = http(
                    &addr,
                    "POST",
                    "/api/publish",
                    Some(&format!(r#"{{"topic":"steady","data":{i}}}"#)),
                    &[],
                );
                assert_eq!(s, 202);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    for i in 0..4000 {
        let msg = if i % 3 == 0 {
            let len = (next() % 64) as usize;
            Message::Binary((0..len).map(|_| next() as u8).collect::<Vec<u8>>().into())
        } else {
            let mut bytes = templates[i % templates.len()].as_bytes().to_vec();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = (next() % 128) as u8;
            }
            Message::Text(String::from_utf8_lossy(&bytes).into_owned().into())
        };
        attacker.ws.feed(msg).await.unwrap();
        if i % 256 == 0 {
            attacker.ws.flush().await.unwrap();
        }
    }
    attacker.ws.flush().await.unwrap();
    publisher.await.unwrap();
    for c in &mut others {
        for i in 0..50 {
            assert_eq!(c.expect("event").await["data"], i);
        }
    }
    assert_eq!(node.health()["status"], "ok");
    assert_eq!(node.get("/healthz").0, 200);
}

#[test]
fn slow_handshakes_are_dropped() {
    let node = Node::start(
        "sec-slowloris",
        &[("WEBSOCKET_HANDSHAKE_TIMEOUT_MS", "300")],
    );
    let mut s = std::net::TcpStream::connect(&node.addr).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "dropped after the timeout"
    );
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_or_outputs() {
    let redis_password = "redis-pass-0123456789";
    let redis = Redis::start();
    redis.cmd(&["CONFIG", "SET", "requirepass", redis_password]);
    let url = format!("redis://:{redis_password}@127.0.0.1:{}", redis.port);
    let api = "api-secret-0123456789abcdef";
    let admin = "admin-secret-0123456789abcdef";
    let webhook_secret = "webhook-secret-0123456789abcdef";
    // A webhook receiver behind a password, on a port nobody listens on:
    // every failed delivery is logged, without the password.
    let webhook_password = "webhook-pass-0123456789";
    let webhook_url = format!(
        "http://hooks:{webhook_password}@127.0.0.1:{}/in",
        common::free_port()
    );
    let node = Node::start(
        "sec-secrets",
        &[
            ("REDIS_URL", &url),
            ("REDIS_PREFIX", &common::prefix("secrets")),
            ("AUTH_JWT_SECRET", SECRET),
            ("API_TOKEN", api),
            ("ADMIN_TOKEN", admin),
            ("WEBHOOK_URL", &webhook_url),
            ("WEBHOOK_SECRET", webhook_secret),
            ("RUST_LOG", "debug"),
        ],
    );
    assert!(eventually(Duration::from_secs(10), || node
        .get("/readyz")
        .0
        == 200));
    let good = token(json!({"exp": now() + 600}), SECRET);
    let mut c = Client::connect(&node.ws_url(&format!("/ws?token={good}"))).await;
    c.subscribe("x").await;
    let _ = node.post("/api/publish", r#"{"topic":"x","data":1}"#);
    let auth = format!("Bearer {admin}");
    let (_, stats) = http(
        &node.addr,
        "GET",
        "/admin/websocket/stats",
        None,
        &[("Authorization", &auth)],
    );
    let (_, health) = node.get("/api/health");
    assert!(
        eventually(Duration::from_secs(10), || node
            .log()
            .contains("webhook batch not delivered")),
        "no failed webhook delivery logged:\n{}",
        node.log()
    );
    let outputs = format!("{stats}{health}{}", node.log());
    for secret in [
        redis_password,
        api,
        admin,
        SECRET,
        webhook_secret,
        webhook_password,
    ] {
        assert!(!outputs.contains(secret), "{secret} leaked");
    }
    // A bad secret at start-up is named but not echoed.
    let out = std::process::Command::new(common::BIN)
        .env_clear()
        .env("API_TOKEN", "bad token value")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("API_TOKEN") && !err.contains("bad token value"),
        "{err}"
    );
}

/// `rediss://` with a private CA (`REDIS_CA_FILE`) against redis-server's TLS port.
#[test]
fn rediss_with_a_ca_file() {
    let dir = std::env::temp_dir().join(format!("sb-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=switchboard-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    let port = common::free_port();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let ca = dir.join("ca.crt");
    let node = Node::start(
        "sec-tls",
        &[
            ("REDIS_URL", &format!("rediss://localhost:{port}")),
            ("REDIS_CA_FILE", ca.to_str().unwrap()),
            ("REDIS_PREFIX", &common::prefix("tls")),
        ],
    );
    let ready = eventually(Duration::from_secs(10), || node.get("/readyz").0 == 200);
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ready, "ready over TLS: {}", node.health());
    assert_eq!(node.health()["backplane"], "redis");
}
