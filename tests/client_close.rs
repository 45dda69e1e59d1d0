//! A close the client starts is answered with the server's Close frame on
//! every WebSocket a node terminates (RFC 6455 §5.5.1): native `/ws` and
//! `/ws/{topic}`, our Engine.IO websocket transport, Socket.IO sockets
//! upgraded from long-polling, and the proxy's client leg. Seen here by a
//! raw socket (the exact bytes), Python `websockets` and Node `ws`; Chromium
//! in `tests/browser/close.test.mjs`.

mod common;

use std::time::Duration;

use common::Node;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// An upstream for the proxy that echoes text and binary frames.
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
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    addr
}

async fn node_with_proxy() -> Node {
    let upstream = echo_upstream().await;
    let routes = format!("echo:ws://{upstream}/");
    tokio::task::spawn_blocking(move || {
        Node::start(
            "close",
            &[
                ("WEBSOCKET_PROXY_ENABLED", "true"),
                ("WEBSOCKET_PROXY_ROUTES", &routes),
            ],
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_and_node_ws_get_the_servers_close_on_every_path() {
    let node = node_with_proxy().await;
    let base = format!("http://{}", node.addr);
    let b = base.clone();
    tokio::task::spawn_blocking(move || {
        common::run_interop(
            &common::python(),
            &[&common::interop_script("client_close.py"), &b, "echo"],
        );
        common::run_interop(
            std::path::Path::new("node"),
            &[&common::interop_script("client_close.mjs"), &b, "echo"],
        );
    })
    .await
    .unwrap();
    drop(node);
}

/// Opens a WebSocket on `path` by hand, reads the first frame, sends a
/// masked Close with `payload`, and returns every Close frame payload the
/// server sent before its EOF (an error instead of EOF is a reset).
async fn raw_close(addr: &str, path: &str, payload: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    raw_close_after(addr, path, payload, true).await
}

/// [`raw_close`], optionally without waiting for a first frame: the Close
/// then races the server's own first frames.
async fn raw_close_after(
    addr: &str,
    path: &str,
    payload: &[u8],
    first_frame: bool,
) -> Result<Vec<Vec<u8>>, String> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The 101 answer, then at least one whole frame (`connected`).
    let body = loop {
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "EOF during the handshake");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let rest = buf[i + 4..].to_vec();
            if !first_frame || frames(&rest).is_some_and(|f| !f.is_empty()) {
                break rest;
            }
        }
    };
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut close = vec![0x88, 0x80 | payload.len() as u8];
    close.extend_from_slice(&mask);
    close.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    tcp.write_all(&close).await.unwrap();
    let mut rest = body;
    let read_all = async {
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("reset instead of EOF: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3), read_all)
        .await
        .map_err(|_| "no EOF within 3 s".to_string())??;
    let frames = frames(&rest).ok_or("a partial frame before EOF")?;
    Ok(frames
        .into_iter()
        .filter(|(op, _)| *op == 0x8)
        .map(|(_, p)| p)
        .collect())
}

/// Splits unmasked server frames (payloads under 64 KiB); None when the
/// bytes end inside a frame.
fn frames(mut b: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 2 {
            return None;
        }
        let op = b[0] & 0x0f;
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            126 => return None,
            n => (n as usize, 2),
        };
        if b.len() < head + len {
            return None;
        }
        out.push((op, b[head..head + len].to_vec()));
        b = &b[head + len..];
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_close_gets_exactly_one_close_frame_then_eof() {
    let node = node_with_proxy().await;
    for path in ["/ws", "/ws/news"] {
        // Close 1000: answered with 1000, then the server's FIN.
        assert_eq!(
            raw_close(&node.addr, path, &[0x03, 0xe8]).await,
            Ok(vec![vec![0x03, 0xe8]]),
            "{path}"
        );
        // Another code and a reason: the code comes back.
        let got = raw_close(&node.addr, path, b"\x0f\xa1bye").await.unwrap();
        assert_eq!(got.len(), 1, "{path}: {got:?}");
        assert_eq!(&got[0][..2], b"\x0f\xa1", "{path}");
        // No code at all: an empty Close comes back (the client reports 1005).
        assert_eq!(
            raw_close(&node.addr, path, &[]).await,
            Ok(vec![vec![]]),
            "{path}"
        );
    }
    let got = raw_close(&node.addr, "/ws/proxy/echo", &[0x03, 0xe8]).await;
    assert_eq!(got, Ok(vec![vec![0x03, 0xe8]]), "proxy");
    // Our Engine.IO transport: the OPEN packet is the first frame.
    let got = raw_close(
        &node.addr,
        "/socket.io/?EIO=4&transport=websocket",
        &[0x03, 0xe8],
    )
    .await;
    assert_eq!(got, Ok(vec![vec![0x03, 0xe8]]), "engine.io");
    // The closes were counted as the client's (once each session has ended).
    let addr = node.addr.clone();
    let counted = tokio::task::spawn_blocking(move || {
        common::eventually(Duration::from_secs(5), || {
            let (_, metrics) = common::http_text(&addr, "GET", "/metrics", None, &[]);
            metrics.contains(
                r#"switchboard_connections_closed_total{transport="ws",reason="client"} 6"#,
            )
        })
    });
    assert!(
        counted.await.unwrap(),
        "six native closes counted as reason=client"
    );
}

/// A Close that arrives while the server is still writing its first frames
/// (`connected`, `subscribed`) fails that write (no data frame may follow
/// the client's Close); the server must still answer it. This raced about
/// once in 25 connections before the writer flushed its answer after a
/// failed write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_racing_the_first_frames_is_still_answered() {
    let node = node_with_proxy().await;
    for i in 0..300 {
        let got = raw_close_after(&node.addr, "/ws/news", b"\x0f\xa1bye", false)
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "connection {i}: {got:?}");
        assert_eq!(&got[0][..2], b"\x0f\xa1", "connection {i}");
    }
}

/// The client leg of the proxy passes the client's code to the upstream
/// after answering the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_the_client_and_passes_its_code_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Close(frame) = msg {
                let _ = tx.send(frame.map(|f| u16::from(f.code)));
                break;
            }
        }
    });
    let routes = format!("up:ws://{upstream}/");
    let node = tokio::task::spawn_blocking(move || {
        Node::start(
            "close-proxy",
            &[
                ("WEBSOCKET_PROXY_ENABLED", "true"),
                ("WEBSOCKET_PROXY_ROUTES", &routes),
            ],
        )
    })
    .await
    .unwrap();
    let got = raw_close(&node.addr, "/ws/proxy/up", &[0x0f, 0xa2]).await;
    assert_eq!(got, Ok(vec![vec![0x0f, 0xa2]]));
    let upstream_got = tokio::time::timeout(Duration::from_secs(5), rx).await;
    assert_eq!(upstream_got.unwrap().unwrap(), Some(4002));
}
