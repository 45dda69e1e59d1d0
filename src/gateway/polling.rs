//! Engine.IO v4 long-polling, and the upgrade of a polling session to
//! websocket: the transport unchanged official clients open with.
//!
//! A session is a [`Conn`] in the node's [`Sessions`](super::engineio::Sessions),
//! found by its `sid`:
//! - `GET` without `sid`: the handshake, answered with the OPEN packet
//!   (`upgrades: ["websocket"]`);
//! - `GET` with `sid`: a long-poll. It takes everything the socket's outbox
//!   holds, packets separated by `\x1e`, or waits until something is queued
//!   (at the latest the next ping, every `pingInterval`). One at a time: an
//!   overlapping poll closes the session (400);
//! - `POST` with `sid`: the client's packets (`\x1e`-separated, at most
//!   `maxPayload` bytes, else 413 and the session closes), handled in order
//!   before `ok` is answered. One at a time as well;
//! - a websocket with `sid`: the upgrade. `2probe` is answered `3probe`,
//!   the open long-poll (and any poll until the upgrade ends) gets a NOOP
//!   (`6`) so the client can pause polling, and `5` moves the session to
//!   the websocket, where the writer takes over the outbox; what was queued
//!   meanwhile goes out there, in order. A probe that fails leaves the
//!   session on long-polling.
//!
//! A driver task per polling session does what the websocket writer does
//! for websockets: the heartbeat (a PING `2` queued every `pingInterval`;
//! no POST for `pingInterval` + `pingTimeout` closes the session), the
//! drain's spread close, and the end of a session. A close reaches the
//! client as the CLOSE packet `1` in a poll of its own, after the polls that
//! take what was queued (nothing more after a slow-consumer or heartbeat
//! close): `transport close`, so socket.io-client reconnects by itself (and
//! recovers, with `SOCKETIO_STATE_RECOVERY`); after the `41` of a server
//! disconnect it does not.
//!
//! Long-polling needs every request of a session at the node that holds it
//! (sticky routing); an upgraded session does not.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::engineio::{self, Conn, Flow, Handshake, Phase, refuse};
use crate::gateway::outbox::{self, close};
use crate::gateway::sio;
use crate::node::Node;

/// How long the client has to complete an upgrade once its websocket is
/// open (engine.io's `upgradeTimeout`).
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closing session waits for the poll that takes its CLOSE packet.
const LAST_POLL: Duration = Duration::from_secs(5);

/// The handshake: a new session, answered with its OPEN packet.
pub(super) fn open(node: Node, req: Request) -> Response {
    let handshake = match Handshake::of(&node, &req) {
        Ok(handshake) => handshake,
        Err(refusal) => return refusal.into_response(),
    };
    let sid: Arc<str> = format!("{:032x}", rand::random::<u128>()).into();
    let conn = Conn::new(&node, handshake, Some(sid));
    let open = conn.open_packet(true);
    node.engineio().insert(conn.clone());
    let guard = node.sessions().token();
    tokio::spawn(async move {
        drive(conn).await;
        drop(guard);
    });
    text(open)
}

fn text(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=UTF-8")],
        body,
    )
        .into_response()
}

/// Clears a flag when dropped (the request ended, however).
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A long-poll: what is queued, or the next thing that is.
pub(super) async fn poll(conn: Arc<Conn>) -> Response {
    if conn.polling.swap(true, Ordering::AcqRel) {
        // Two polls at once: the client is broken (engine.io closes too).
        conn.outbox.close.request(close::POLICY);
        return StatusCode::BAD_REQUEST.into_response();
    }
    let _release = Release(&conn.polling);
    let mut batch = VecDeque::new();
    loop {
        let changed = conn.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match conn.phase() {
            Phase::Polling => {}
            Phase::Upgrading => return text("6".into()),
            Phase::Websocket => return refuse(3, "Bad request"),
            Phase::Closing(code) => return last_poll(&conn, code),
            Phase::Closed => return refuse(1, "Session ID unknown"),
        }
        tokio::select! {
            biased;
            _ = &mut changed => continue,
            () = conn.outbox.next_batch(&mut batch) => return text(payload(&mut batch)),
        }
    }
}

/// A poll of a closing session: what may still go out, then (in a poll of
/// its own, as engine.io does: socket.io-client handles the packets of a
/// payload a tick after the CLOSE in it) the CLOSE packet.
fn last_poll(conn: &Conn, code: u16) -> Response {
    let mut batch = VecDeque::new();
    if !close::drops_queued(code) && conn.outbox.take(&mut batch) {
        return text(payload(&mut batch));
    }
    conn.set_phase(Phase::Closed);
    text("1".into())
}

/// Packets separated by `\x1e` (a record separator, which JSON escapes).
fn payload(batch: &mut VecDeque<Utf8Bytes>) -> String {
    let len = batch.iter().map(|f| f.len() + 1).sum::<usize>();
    let mut body = String::with_capacity(len);
    for frame in batch.drain(..) {
        if !body.is_empty() {
            body.push('\x1e');
        }
        body.push_str(&frame);
    }
    body
}

/// The client's packets, handled in order before the answer.
pub(super) async fn post(conn: Arc<Conn>, req: Request) -> Response {
    match conn.phase() {
        Phase::Websocket => return refuse(3, "Bad request"),
        Phase::Closed => return refuse(1, "Session ID unknown"),
        _ => {}
    }
    if conn.posting.swap(true, Ordering::AcqRel) {
        conn.outbox.close.request(close::POLICY);
        return StatusCode::BAD_REQUEST.into_response();
    }
    let _release = Release(&conn.posting);
    let max = conn.node.config().max_payload;
    let body = match axum::body::to_bytes(req.into_body(), max).await {
        Ok(body) => body,
        Err(_) => {
            conn.outbox.close.request(close::TOO_BIG);
            return StatusCode::PAYLOAD_TOO_LARGE.into_response();
        }
    };
    conn.liveness.heard();
    let Ok(body) = String::from_utf8(Vec::from(body)) else {
        conn.outbox.close.request(close::POLICY);
        return StatusCode::BAD_REQUEST.into_response();
    };
    // In a task of its own: a client that hangs up makes hyper drop this
    // request's future, and a CONNECT cut there would leave a connection
    // counted, registered and subscribed that its session never learnt of
    // (nothing would ever end it).
    match tokio::spawn(packets(conn.clone(), body)).await {
        Ok(response) => response,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The packets of one POST, in order, then its answer.
async fn packets(conn: Arc<Conn>, body: String) -> Response {
    let mut st = conn.socket.lock().await;
    if conn.phase() == Phase::Closed {
        return refuse(1, "Session ID unknown");
    }
    for packet in body.split('\x1e') {
        if packet.starts_with('b') {
            sio::emit_error(
                &*conn.peer,
                None,
                &sio::Refusal::bad("binary packets are not supported"),
            );
            continue;
        }
        if let Flow::Left = engineio::on_text(&conn, &mut st, packet).await {
            // The client's own close, unless it follows the server's.
            if conn.outbox.close.request(close::BY_CLIENT) {
                st.client_closed = true;
            }
            // A closing session whose client closes too polls no more.
            if let Phase::Closing(_) = conn.phase() {
                conn.set_phase(Phase::Closed);
            }
            break;
        }
    }
    text("ok".into())
}

/// The polling side of a session: heartbeat, the drain's close, the end.
async fn drive(conn: Arc<Conn>) {
    let node = conn.node.clone();
    let config = node.config().clone();
    let interval = config.socketio_ping_interval;
    let silence = interval + config.socketio_ping_timeout;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = node.shutdown_token();
    let close_at = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    tokio::pin!(close_at);
    let mut draining = false;
    loop {
        let changed = conn.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if conn.phase() == Phase::Websocket {
            // The websocket's writer and reader own the session now.
            return;
        }
        tokio::select! {
            biased;
            () = conn.outbox.close.requested() => break,
            _ = &mut changed => {}
            _ = shutdown.cancelled(), if !draining => {
                // Each session closes at its own point of the drain window,
                // so that clients do not all come back at once.
                draining = true;
                let window = config.shutdown_drain.as_millis() as u64;
                let offset = if window == 0 { 0 } else { conn.id % window };
                close_at.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(offset));
            }
            _ = &mut close_at => {
                conn.outbox.close.request(config.shutdown_close_code);
            }
            _ = ticker.tick() => {
                if conn.phase() != Phase::Polling {
                    continue;
                }
                if conn.liveness.silent_for() > silence {
                    conn.outbox.close.request(close::HEARTBEAT_TIMEOUT);
                } else {
                    conn.outbox.push(Utf8Bytes::from_static("2"));
                }
            }
        }
    }
    // A close was asked for. An upgrade under way decides where it goes:
    // to the websocket's writer once it completes.
    loop {
        let changed = conn.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match conn.phase() {
            Phase::Upgrading => changed.await,
            Phase::Websocket => return,
            _ => break,
        }
    }
    let code = conn.outbox.close.code();
    conn.set_phase(Phase::Closing(code));
    if !matches!(code, close::BY_CLIENT | close::HEARTBEAT_TIMEOUT) {
        // The client's next poll takes the CLOSE packet.
        let _ = tokio::time::timeout(LAST_POLL, async {
            loop {
                let changed = conn.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if conn.phase() == Phase::Closed {
                    return;
                }
                changed.await;
            }
        })
        .await;
    }
    let mut st = conn.socket.lock().await;
    engineio::finish(&conn, &mut st, code).await;
}

/// A websocket for a polling session: the upgrade.
pub(super) async fn upgrade(conn: Arc<Conn>, req: Request) -> Response {
    if conn.phase() != Phase::Polling {
        return refuse(3, "Bad request");
    }
    let ws = match WebSocketUpgrade::from_request(req, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let node = conn.node.clone();
    outbox::upgrade(&node, ws, move |socket| upgraded(conn, socket))
}

/// The next text frame of a websocket (pings and pongs skipped).
async fn next_text(socket: &mut WebSocket) -> Option<Utf8Bytes> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(t)) => return Some(t),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

async fn upgraded(conn: Arc<Conn>, mut socket: WebSocket) {
    let probe = tokio::time::timeout(UPGRADE_TIMEOUT, next_text(&mut socket)).await;
    if !matches!(probe, Ok(Some(ref t)) if t.as_str() == "2probe") {
        return;
    }
    if !conn.advance(Phase::Polling, Phase::Upgrading) {
        return;
    }
    let upgrade = async {
        socket
            .send(Message::Text(Utf8Bytes::from_static("3probe")))
            .await
            .ok()?;
        next_text(&mut socket).await
    };
    match tokio::time::timeout(UPGRADE_TIMEOUT, upgrade).await {
        Ok(Some(t)) if t.as_str() == "5" => {}
        _ => {
            // Go on with long-polling.
            conn.advance(Phase::Upgrading, Phase::Polling);
            return;
        }
    }
    conn.advance(Phase::Upgrading, Phase::Websocket);
    engineio::run_websocket(conn, socket).await;
}
