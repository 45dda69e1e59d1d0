//! The WebSocket proxy against a local echo upstream.

// tungstenite's handshake callback must return its (large) error response type.
#![allow(clippy::result_large_err)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Closed, Node};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// An upstream that echoes frames, reports the Authorization header it got,
/// and closes with 4001 when asked to.
async fn echo_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut auth = String::new();
                let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                          resp| {
                    auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(t) if t.as_str() == "close-4001" => {
                            let _ = ws
                                .send(Message::Close(Some(CloseFrame {
                                    code: 4001.into(),
                                    reason: "upstream says bye".into(),
                                })))
                                .await;
                            break;
                        }
                        Message::Text(t) if t.as_str() == "auth?" => {
                            let _ = ws.send(Message::Text(auth.clone().into())).await;
                        }
                        Message::Text(_) | Message::Binary(_) => {
                            let _ = ws.send(msg).await;
                        }
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, task)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(node: &Node, route: &str) -> Ws {
    let url = node.ws_url(&format!("/ws/proxy/{route}"));
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer abc".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let Some(Ok(Message::Text(hello))) = ws.next().await else {
        panic!("no proxy_connected")
    };
    let hello: Value = serde_json::from_str(&hello).unwrap();
    assert_eq!(hello["type"], "proxy_connected");
    assert_eq!(hello["routeName"], route);
    assert!(hello["clientId"].is_string() && hello["timestamp"].is_string());
    ws
}

fn proxy_connections(node: &Node) -> u64 {
    node.get("/admin/websocket/stats").1["data"]["proxyConnections"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_round_trip_and_close_codes_propagate() {
    let (upstream, _task) = echo_server().await;
    let routes = format!("echo:ws://{upstream}/feed,dead:ws://127.0.0.1:1/x");
    let node = Node::start(
        "proxy",
        &[
            ("WEBSOCKET_PROXY_ENABLED", "true"),
            ("WEBSOCKET_PROXY_ROUTES", &routes),
        ],
    );
    let mut ws = open(&node, "echo").await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("hello".into())
    );
    ws.send(Message::Binary(vec![0, 1, 2, 255].into()))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Binary(vec![0, 1, 2, 255].into())
    );
    ws.send(Message::Text("auth?".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("Bearer abc".into())
    );
    assert_eq!(proxy_connections(&node), 1);
    ws.send(Message::Text("close-4001".into())).await.unwrap();
    let mut client = common::Client {
        ws,
        client_id: String::new(),
    };
    assert_eq!(
        client.closed_within(Duration::from_secs(5)).await,
        Some(Closed::Code(4001))
    );

    // Unknown route: 404 before the upgrade. Unreachable upstream: 502.
    let start = Instant::now();
    assert_eq!(node.get("/ws/proxy/nope").0, 404);
    let err = tokio_tungstenite::connect_async(node.ws_url("/ws/proxy/dead")).await;
    let status = match err {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    };
    assert_eq!(status, 502);
    assert!(start.elapsed() < Duration::from_secs(5));

    // 200 connect/disconnect cycles leave nothing counted.
    for _ in 0..200 {
        let mut ws = open(&node, "echo").await;
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    assert!(common::eventually(
        Duration::from_secs(5),
        || proxy_connections(&node) == 0
    ));
    let _one = open(&node, "echo").await;
    assert!(common::eventually(
        Duration::from_secs(2),
        || proxy_connections(&node) == 1
    ));
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_times_out_with_504() {
    // Accepts TCP but never completes the WebSocket handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let routes = format!("slow:ws://{}/x", silent.local_addr().unwrap());
    let node = Node::start(
        "proxy-slow",
        &[
            ("WEBSOCKET_PROXY_ENABLED", "true"),
            ("WEBSOCKET_PROXY_ROUTES", &routes),
            ("WEBSOCKET_PROXY_CONNECT_TIMEOUT_MS", "500"),
        ],
    );
    let start = Instant::now();
    match tokio_tungstenite::connect_async(node.ws_url("/ws/proxy/slow")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 504)
        }
        other => panic!("expected 504, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn disabled_proxy_is_404_and_bad_routes_stop_start_up() {
    let node = Node::start(
        "proxy-off",
        &[("WEBSOCKET_PROXY_ROUTES", "a:ws://127.0.0.1:9/x")],
    );
    assert_eq!(node.get("/ws/proxy/a").0, 404);
    let out = std::process::Command::new(common::BIN)
        .env_clear()
        .env("PORT", "0")
        .env("WEBSOCKET_PROXY_ENABLED", "true")
        .env(
            "WEBSOCKET_PROXY_ROUTES",
            "good:ws://h:1/x,broken:http://h/x",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WEBSOCKET_PROXY_ROUTES") && err.contains("broken"),
        "{err}"
    );
}

fn token(sub: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-proxy-test-secret-of-some-length"),
    )
    .unwrap()
}

/// The status and error text of a handshake refused over HTTP.
fn refusal(
    resp: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>,
) -> (u16, String) {
    let body = resp
        .body()
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    (resp.status().as_u16(), body)
}

/// The status and error text of a handshake the node refuses.
async fn refused(url: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => refusal(&resp),
        Ok(_) => panic!("{url} was admitted"),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// A proxied connection holds a seat under the per-address and per-user
/// limits like a native one, so neither limit can be walked around through
/// the proxy, and gives it back when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_connections_count_against_the_address_and_user_limits() {
    let (upstream, _task) = echo_server().await;
    let routes = format!("echo:ws://{upstream}/feed");
    let node = Node::start(
        "proxy-seats",
        &[
            ("WEBSOCKET_PROXY_ENABLED", "true"),
            ("WEBSOCKET_PROXY_ROUTES", &routes),
            ("AUTH_JWT_SECRET", "a-proxy-test-secret-of-some-length"),
            ("MAX_CONNECTIONS_PER_ADDRESS", "3"),
            ("MAX_CONNECTIONS_PER_USER", "2"),
        ],
    );
    let proxy = |sub: &str| node.ws_url(&format!("/ws/proxy/echo?token={}", token(sub)));
    let native = |sub: &str| node.ws_url(&format!("/ws?token={}", token(sub)));
    let (mut alice_1, _) = tokio_tungstenite::connect_async(proxy("alice"))
        .await
        .unwrap();
    let (_alice_2, _) = tokio_tungstenite::connect_async(proxy("alice"))
        .await
        .unwrap();
    // Alice's third connection is refused on the proxy and on /ws alike.
    for url in [proxy("alice"), native("alice")] {
        let (status, body) = refused(&url).await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("MAX_CONNECTIONS_PER_USER"), "{body}");
    }
    // Bob takes the address's third seat; the fourth is refused, through
    // the proxy and on /ws.
    let (_bob, _) = tokio_tungstenite::connect_async(proxy("bob"))
        .await
        .unwrap();
    for url in [proxy("carol"), native("carol")] {
        let (status, body) = refused(&url).await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("MAX_CONNECTIONS_PER_ADDRESS"), "{body}");
    }
    // A proxied connection that ends gives both seats back.
    alice_1.close(None).await.unwrap();
    assert!(
        common::admitted_within(&proxy("alice"), Duration::from_secs(5)).await,
        "the seats of a closed proxied connection are given back"
    );
}

/// Frames pass through unread, so a proxied connection cannot `refresh`:
/// when its token expires it is closed with 3000, as a native one that did
/// not refresh, and the client reconnects with a new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_connection_ends_with_3000_when_its_token_expires() {
    let (upstream, _task) = echo_server().await;
    let routes = format!("echo:ws://{upstream}/feed");
    let node = Node::start(
        "proxy-expiry",
        &[
            ("WEBSOCKET_PROXY_ENABLED", "true"),
            ("WEBSOCKET_PROXY_ROUTES", &routes),
            ("AUTH_JWT_SECRET", "a-proxy-test-secret-of-some-length"),
        ],
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3;
    let short = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "alice", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-proxy-test-secret-of-some-length"),
    )
    .unwrap();
    let url = node.ws_url(&format!("/ws/proxy/echo?token={short}"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let Some(Ok(Message::Text(hello))) = ws.next().await else {
        panic!("no proxy_connected")
    };
    assert!(hello.contains("proxy_connected"), "{hello}");
    ws.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("still here".into())
    );
    assert_eq!(
        close_frame(&mut ws, Duration::from_secs(10)).await,
        Some((3000, "token expired".to_string()))
    );
}

/// The code and reason of the Close frame `ws` gets within `within`
/// (`None`: the connection ended without one).
async fn close_frame(ws: &mut Ws, within: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Some((u16::from(frame.code), frame.reason.to_string()));
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("closed in time")
}

/// A connect hook back end over real HTTP: the Cookie `user=<name>` is the
/// user (`banned` is refused with `disconnect`, `brief` expires in 2 s),
/// no cookie is `error`; it keeps every request body it got.
async fn connect_backend() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let calls = seen.clone();
    let hook = move |axum::Json(body): axum::Json<Value>| {
        let calls = calls.clone();
        async move {
            calls.lock().unwrap().push(body.clone());
            let user = body["headers"]["Cookie"]
                .as_str()
                .and_then(|c| c.strip_prefix("user="))
                .map(str::to_string);
            axum::Json(match user.as_deref() {
                None => json!({"error": {"code": 401, "message": "not signed in"}}),
                Some("banned") => json!({"disconnect": {"code": 4503, "reason": "banned here"}}),
                Some("brief") => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64;
                    json!({"result": {"user": "brief", "expiresAt": now + 2_000}})
                }
                Some(name) => json!({"result": {"user": name}}),
            })
        }
    };
    let app = axum::Router::new().route("/connect", axum::routing::post(hook));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/connect", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// A proxy handshake with `cookie` (or none).
async fn with_cookie(
    node: &Node,
    route: &str,
    cookie: Option<&str>,
) -> Result<(Ws, Value), (u16, String)> {
    let url = node.ws_url(&format!("/ws/proxy/{route}"));
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((mut ws, _)) => {
            let Some(Ok(Message::Text(hello))) = ws.next().await else {
                panic!("no proxy_connected")
            };
            Ok((ws, serde_json::from_str(&hello).unwrap()))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(refusal(&resp)),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// A deployment that admits clients through its back end (client tokens
/// off, `PROXY_CONNECT_URL` set) does not leave the proxy open: a proxied
/// client without a token is admitted, refused or timed out by the connect
/// hook exactly as on `/ws`, and the back end is told it is the proxy and
/// which route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_connect_hook_decides_who_may_use_the_proxy() {
    let (upstream, _task) = echo_server().await;
    let routes = format!("echo:ws://{upstream}/feed");
    let (hook, calls) = connect_backend().await;
    let node = Node::start(
        "proxy-hook",
        &[
            ("WEBSOCKET_PROXY_ENABLED", "true"),
            ("WEBSOCKET_PROXY_ROUTES", &routes),
            ("WEBSOCKET_PROXY_FORWARD_HEADERS", "Authorization"),
            ("PROXY_CONNECT_URL", &hook),
            ("PROXY_HEADERS", "Cookie"),
            ("AUTH_JWT_LEEWAY_MS", "0"),
            ("MAX_CONNECTIONS_PER_USER", "1"),
        ],
    );

    // Not an upgrade: refused before the back end is asked.
    assert_eq!(node.get("/ws/proxy/echo").0 / 100, 4);
    assert!(calls.lock().unwrap().is_empty(), "{:?}", calls.lock());

    // The back end's `error` and `disconnect`, before the upstream is
    // dialled, with its texts.
    let (status, body) = with_cookie(&node, "echo", None).await.err().unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("not signed in"), "{body}");
    let (status, body) = with_cookie(&node, "echo", Some("user=banned"))
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("banned here"), "{body}");
    assert_eq!(proxy_connections(&node), 0);

    // Alice: admitted with the back end's user, under her user's seat.
    let (mut alice, hello) = with_cookie(&node, "echo", Some("user=alice"))
        .await
        .unwrap();
    alice.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(
        alice.next().await.unwrap().unwrap(),
        Message::Text("hi".into())
    );
    let asked = calls.lock().unwrap().last().cloned().unwrap();
    assert_eq!(asked["transport"], "proxy", "{asked}");
    assert_eq!(asked["route"], "echo", "{asked}");
    assert_eq!(asked["client"], hello["clientId"], "{asked} {hello}");
    let (status, body) = with_cookie(&node, "echo", Some("user=alice"))
        .await
        .err()
        .unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("MAX_CONNECTIONS_PER_USER"), "{body}");

    // The hook's `expiresAt` ends a proxied connection as a token's `exp`.
    let (mut brief, _) = with_cookie(&node, "echo", Some("user=brief"))
        .await
        .unwrap();
    assert_eq!(
        close_frame(&mut brief, Duration::from_secs(10)).await,
        Some((3000, "token expired".to_string()))
    );
    // Alice's connection was not touched by any of it.
    alice.send(Message::Text("still".into())).await.unwrap();
    assert_eq!(
        alice.next().await.unwrap().unwrap(),
        Message::Text("still".into())
    );
}
