//! Our own Engine.IO v4 server for Socket.IO v5 clients at `/socket.io/`:
//! sessions that open on the websocket transport, and sessions that open on
//! long-polling and may upgrade to websocket (`polling.rs`); the default
//! namespace's Socket.IO packets on both.
//!
//! Why our own: a socket here is a native-style connection. Its frames go
//! through the same bounded [`Outbox`] as `ws.rs` (drained by the writer
//! over websocket, or by the long-poll requests before an upgrade), each
//! publication's `42[…]` frame is encoded once per node and shared by every
//! socket (a refcount), the slow-consumer policy applies to the one socket
//! that is full, and the CONNECT answer can carry a `pid` for connection
//! state recovery (`recovery.rs`), which socketioxide 0.18 cannot send.
//!
//! Scope: Engine.IO v4 (`EIO=4`), the default namespace `/` (others are
//! refused with CONNECT_ERROR), text packets only (binary attachments are
//! refused with an `error` event), acknowledgements of client events; the
//! server never asks for acks. No JSONP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::FromRequest;
use axum::extract::Request;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::api::ApiError;
use crate::backend::hooks::{Hello, transport};
use crate::gateway::admission::Seats;
use crate::gateway::outbox::{
    self, Frame, Heartbeat, Liveness, Outbox, ReadyFrames, WRITE_TIMEOUT, Writer, close, next_frame,
};
use crate::gateway::polling;
use crate::gateway::recovery::Recovery;
use crate::gateway::sio::{self, Ack, Peer, Session};
use crate::history::GapRange;
use crate::hub::{ConnId, Delivery, Publication, Subscriber};
use crate::limits::Arrival;
use crate::metrics as m;
use crate::node::Node;

/// The Engine.IO sessions of this node that can be reached by their `sid`
/// (long-polling requests and upgrades find them here), until they end.
#[derive(Default)]
pub struct Sessions {
    /// std Mutex: held for a lookup or an insert, never across `.await`.
    by_sid: Mutex<HashMap<Arc<str>, Arc<Conn>>>,
}

impl Sessions {
    pub(super) fn insert(&self, conn: Arc<Conn>) {
        self.by_sid.lock().unwrap().insert(conn.sid.clone(), conn);
    }

    pub(super) fn get(&self, sid: &str) -> Option<Arc<Conn>> {
        self.by_sid.lock().unwrap().get(sid).cloned()
    }

    fn remove(&self, sid: &str) {
        self.by_sid.lock().unwrap().remove(sid);
    }
}

/// Answers every request to `/socket.io/`: the Engine.IO handshake on
/// either transport, long-polling requests and upgrades of a session.
pub async fn serve(node: Node, req: Request) -> Response {
    let query = Query::parse(req.uri().query().unwrap_or(""));
    if query.eio.as_deref() != Some("4") {
        return refuse(5, "Unsupported protocol version");
    }
    let conn = match &query.sid {
        None => None,
        Some(sid) => match node.engineio().get(sid) {
            Some(conn) => Some(conn),
            None => return refuse(1, "Session ID unknown"),
        },
    };
    let method = req.method().clone();
    match (query.transport.as_deref(), conn) {
        (Some("websocket"), None) => upgrade(node, req).await,
        (Some("websocket"), Some(conn)) => polling::upgrade(conn, req).await,
        (Some("polling"), None) if method == axum::http::Method::GET => polling::open(node, req),
        (Some("polling"), None) => refuse(2, "Bad handshake method"),
        (Some("polling"), Some(conn)) if method == axum::http::Method::GET => {
            polling::poll(conn).await
        }
        (Some("polling"), Some(conn)) if method == axum::http::Method::POST => {
            polling::post(conn, req).await
        }
        (Some("polling"), Some(_)) => refuse(3, "Bad request"),
        _ => refuse(0, "Transport unknown"),
    }
}

/// The query parameters Engine.IO routes by.
#[derive(Default)]
struct Query {
    eio: Option<String>,
    transport: Option<String>,
    sid: Option<String>,
}

impl Query {
    fn parse(query: &str) -> Self {
        let mut q = Query::default();
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            match k {
                "EIO" => q.eio = Some(v.to_string()),
                "transport" => q.transport = Some(v.to_string()),
                "sid" => q.sid = Some(v.to_string()),
                _ => {}
            }
        }
        q
    }
}

/// Engine.IO's refusal: 400 with `{"code", "message"}` (the clients read
/// only the status).
pub(super) fn refuse(code: u8, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"code": code, "message": message}).to_string(),
    )
        .into_response()
}

/// What the CONNECT packet's admission needs from the HTTP handshake.
pub(super) struct Handshake {
    token: Option<String>,
    /// Only the `PROXY_HEADERS` ones, and only with a connect hook: a
    /// socket keeps this for its whole life.
    headers: HeaderMap,
    remote: Option<SocketAddr>,
    /// The session's places under `MAX_CONNECTIONS` and
    /// `MAX_CONNECTIONS_PER_ADDRESS` (taken at the handshake, before any
    /// upgrade), then `MAX_CONNECTIONS_PER_USER`
    /// (at CONNECT); given back when the session ends.
    pub(super) seats: Mutex<Seats>,
}

impl Handshake {
    /// The handshake of a new session, refused (the JSON error format) by
    /// a draining or full node (503) or an address at its limit (429).
    pub(super) fn of(node: &Node, req: &Request) -> Result<Self, ApiError> {
        // The session holds its place under MAX_CONNECTIONS from here, so
        // sessions not yet CONNECTed count too.
        let remote = crate::gateway::admission::remote_addr(req.extensions());
        let seats = Seats::admit(node, remote, req.headers())?;
        let mut headers = HeaderMap::new();
        if node.hooks().connect_enabled() {
            for name in &node.config().hooks.headers {
                for value in req.headers().get_all(name.as_str()) {
                    if let Ok(name) = axum::http::HeaderName::from_bytes(name.as_bytes()) {
                        headers.append(name, value.clone());
                    }
                }
            }
        }
        Ok(Handshake {
            token: crate::auth::token_from(req.headers(), req.uri().query()),
            headers,
            remote,
            seats: Mutex::new(seats),
        })
    }
}

// === one connection ===

/// Where a session's frames go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Drained by long-poll requests.
    Polling,
    /// `2probe` answered on a websocket: long-polls get `6` at once and
    /// frames wait for the `5` that completes the upgrade.
    Upgrading,
    /// Drained by the websocket writer.
    Websocket,
    /// Long-polling, being closed with this code: the next poll takes what
    /// may still go out and the close packet.
    Closing(u16),
    Closed,
}

/// One Engine.IO session of ours, whichever transport carries it.
pub(super) struct Conn {
    /// The writer's id (it spreads the drain); also the websocket sid.
    pub(super) id: ConnId,
    /// The Engine.IO sid. For long-polling it is what authorizes a request
    /// to the session, hence 128 random bits.
    pub(super) sid: Arc<str>,
    pub(super) node: Node,
    pub(super) outbox: Arc<Outbox>,
    pub(super) peer: Arc<EioPeer>,
    handshake: Handshake,
    /// The Socket.IO side. Its lock orders packet handling: the POSTs one
    /// after another, then the websocket reader after an upgrade.
    pub(super) socket: tokio::sync::Mutex<SocketState>,
    /// std Mutex, never held across `.await`; every change notifies `changed`.
    phase: Mutex<Phase>,
    pub(super) changed: Notify,
    /// Long-polling: when the client last sent something.
    pub(super) liveness: Liveness,
    /// A long-poll request is open (Engine.IO allows one at a time).
    pub(super) polling: AtomicBool,
    /// A POST is being handled (one at a time).
    pub(super) posting: AtomicBool,
    /// A CONNECT was accepted ([`CONNECT_TIMEOUT`]).
    connected: AtomicBool,
}

/// The Socket.IO state of a connection.
#[derive(Default)]
pub(super) struct SocketState {
    session: Option<Arc<Session>>,
    /// The client ended the connection (close, or namespace disconnect).
    pub(super) client_closed: bool,
    /// The client disconnected the namespace (`41`): the session is over,
    /// not interrupted.
    left: bool,
    /// CONNECTs refused so far: each may cost a token check or a connect
    /// hook call, so a session gets [`MAX_REFUSED_CONNECTS`].
    refused: u32,
}

/// How long an Engine.IO session may stay without a connected namespace
/// (socket.io's `connectTimeout` default): a transport that never sends a
/// CONNECT, or whose CONNECTs are all refused, holds a socket, a queue and
/// an address seat, and is closed then.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(45);

/// Refused CONNECTs after which a session is closed.
const MAX_REFUSED_CONNECTS: u32 = 10;

/// Closes `conn` when it has no connected namespace [`CONNECT_TIMEOUT`]
/// after its handshake.
async fn connect_deadline(conn: std::sync::Weak<Conn>) {
    tokio::time::sleep(CONNECT_TIMEOUT).await;
    let Some(conn) = conn.upgrade() else {
        return;
    };
    // Not the socket lock: a websocket's reader holds it for its life.
    if !conn.connected.load(Ordering::Acquire) && conn.phase() != Phase::Closed {
        tracing::debug!(sid = %conn.sid, "no Socket.IO CONNECT within 45 s: session closed");
        conn.outbox.close.request(close::POLICY);
    }
}

impl Conn {
    pub(super) fn new(node: &Node, handshake: Handshake, sid: Option<Arc<str>>) -> Arc<Conn> {
        let id = crate::hub::new_conn_id();
        let outbox = Arc::new(Outbox::new(node.config(), m::transport::SOCKETIO));
        let conn = Arc::new(Conn {
            id,
            sid: sid.unwrap_or_else(|| format!("{id:016x}").into()),
            node: node.clone(),
            peer: Arc::new(EioPeer {
                outbox: outbox.clone(),
                recovery: OnceLock::new(),
                namespace_closed: AtomicBool::new(false),
            }),
            outbox,
            handshake,
            socket: tokio::sync::Mutex::new(SocketState::default()),
            phase: Mutex::new(Phase::Polling),
            changed: Notify::new(),
            liveness: Liveness::new(),
            polling: AtomicBool::new(false),
            posting: AtomicBool::new(false),
            connected: AtomicBool::new(false),
        });
        tokio::spawn(connect_deadline(Arc::downgrade(&conn)));
        conn
    }

    pub(super) fn phase(&self) -> Phase {
        *self.phase.lock().unwrap()
    }

    /// Moves to `to` if the phase is `from`; true when it did.
    pub(super) fn advance(&self, from: Phase, to: Phase) -> bool {
        let moved = {
            let mut phase = self.phase.lock().unwrap();
            let moved = *phase == from;
            if moved {
                *phase = to;
            }
            moved
        };
        if moved {
            self.changed.notify_waiters();
        }
        moved
    }

    pub(super) fn set_phase(&self, to: Phase) {
        *self.phase.lock().unwrap() = to;
        self.changed.notify_waiters();
    }

    /// The Engine.IO OPEN packet; `upgrades`: the session may move to websocket.
    pub(super) fn open_packet(&self, upgrades: bool) -> String {
        let config = self.node.config();
        let open = json!({
            "sid": &*self.sid,
            "upgrades": if upgrades { json!(["websocket"]) } else { json!([]) },
            "pingInterval": config.socketio_ping_interval.as_millis() as u64,
            "pingTimeout": config.socketio_ping_timeout.as_millis() as u64,
            "maxPayload": config.max_payload,
        });
        format!("0{open}")
    }
}

/// What a reader does after a packet.
pub(super) enum Flow {
    Go,
    /// The client closed the connection, or sent something that is not Engine.IO.
    Left,
}

/// Handles one Engine.IO text packet from the client.
pub(super) async fn on_text(conn: &Arc<Conn>, st: &mut SocketState, text: &str) -> Flow {
    match text.as_bytes().first() {
        // PING from the client (v3 style): answer PONG.
        Some(b'2') => {
            conn.outbox.push(Utf8Bytes::from_static("3"));
            Flow::Go
        }
        // PONG, UPGRADE, NOOP.
        Some(b'3' | b'5' | b'6') => Flow::Go,
        Some(b'4') => {
            // Boxed: what a packet may await stays out of every idle
            // socket's task.
            if Box::pin(packet(conn, st, &text[1..])).await {
                Flow::Go
            } else {
                st.left = true;
                Flow::Left
            }
        }
        // CLOSE, or something that is not Engine.IO.
        _ => Flow::Left,
    }
}

/// The Socket.IO session's end: leaves its topics, counts it, and settles
/// its recovery record. `code`: the close the transport ended with.
pub(super) async fn finish(conn: &Arc<Conn>, st: &mut SocketState, code: u16) {
    conn.node.engineio().remove(&conn.sid);
    drop(std::mem::take(&mut *conn.handshake.seats.lock().unwrap()));
    conn.set_phase(Phase::Closed);
    conn.outbox.close_queue();
    let Some(s) = st.session.take() else {
        return;
    };
    let reason = match code {
        _ if st.client_closed => m::reason::CLIENT,
        close::TRY_AGAIN_LATER => m::reason::SLOW_CONSUMER,
        close::GOING_AWAY | close::RESTART => m::reason::SHUTDOWN,
        close::HEARTBEAT_TIMEOUT => m::reason::HEARTBEAT,
        _ => s.closing_reason().unwrap_or(m::reason::SERVER),
    };
    if let Some(r) = conn.peer.recovery.get() {
        // A namespace disconnect (by either side) ends the session; any
        // other end is an interruption the client may recover from.
        let over = st.left || conn.peer.namespace_closed.load(Ordering::Acquire);
        let r = r.clone();
        tokio::spawn(async move { r.end(!over).await });
    }
    sio::disconnected(&s, &conn.node, reason).await;
}

// === websocket ===

/// Whether `req` opens a Socket.IO session directly on the websocket
/// transport (no `sid`: not an upgrade of a polling session).
pub fn opens_websocket(req: &Request) -> bool {
    if req.uri().path().trim_end_matches('/') != "/socket.io" {
        return false;
    }
    let query = Query::parse(req.uri().query().unwrap_or(""));
    query.eio.as_deref() == Some("4")
        && query.transport.as_deref() == Some("websocket")
        && query.sid.is_none()
}

/// Upgrades and runs a session that opens on websocket.
pub async fn upgrade(node: Node, req: Request) -> Response {
    let handshake = match Handshake::of(&node, &req) {
        Ok(handshake) => handshake,
        Err(refusal) => return refusal.into_response(),
    };
    let ws = match WebSocketUpgrade::from_request(req, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let n = node.clone();
    outbox::upgrade(&n, ws, move |socket| {
        // The session future is returned, not awaited in an `async` block
        // (which would hold it and the socket twice in every task).
        let conn = Conn::new(&node, handshake, None);
        conn.set_phase(Phase::Websocket);
        conn.outbox.push(conn.open_packet(false).into());
        run_websocket(conn, socket)
    })
}

/// Acts on one websocket frame from the client; false when the session
/// ends.
async fn on_frame(conn: &Arc<Conn>, st: &mut SocketState, msg: Frame, liveness: &Liveness) -> bool {
    liveness.heard();
    let outbox = &conn.outbox;
    let text = match msg {
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Binary(_))) => {
            sio::emit_error(
                &*conn.peer,
                None,
                &sio::Refusal::bad("binary packets are not supported"),
            );
            return true;
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return true,
        // The client's own close, unless it answers the server's (a
        // client closes its transport when the server's `41` arrives,
        // and the reader may see that before the writer's end).
        Some(Ok(Message::Close(_))) => {
            st.client_closed = outbox.close.request(close::BY_CLIENT);
            return false;
        }
        None | Some(Err(_)) => {
            st.client_closed = outbox.close.code() == 0;
            return false;
        }
    };
    if let Flow::Left = on_text(conn, st, &text).await {
        st.client_closed = outbox.close.code() == 0;
        return false;
    }
    true
}

/// Reads a websocket session (opened on websocket, or upgraded) until it
/// ends, with the writer draining the outbox.
pub(super) async fn run_websocket(conn: Arc<Conn>, socket: WebSocket) {
    let config = conn.node.config().clone();
    let (sink, mut stream) = socket.split();
    let heartbeat = Heartbeat::EngineIo {
        interval: config.socketio_ping_interval,
        timeout: config.socketio_ping_timeout,
    };
    let (mut writer, liveness) = Writer::spawn(sink, &conn.outbox, &conn.node, conn.id, heartbeat);
    let outbox = conn.outbox.clone();
    let mut st = conn.socket.lock().await;
    if let Some(session) = &st.session {
        // Upgraded from long-polling: its frames start from a wait.
        session.pace(Arrival::idle());
    }
    loop {
        let msg = tokio::select! {
            msg = next_frame(&mut stream) => msg,
            // The writer closed the connection (slow consumer, shutdown,
            // heartbeat, server disconnect).
            _ = &mut writer => break,
        };
        // The answers to this frame and to those that arrived with it go
        // out in one write (`hold_wakes`).
        let hold = outbox.hold_wakes();
        let mut frames = ReadyFrames::after(msg);
        let mut open = true;
        while open && let Some((msg, arrival)) = frames.next(&mut stream) {
            if let Some(session) = &st.session {
                session.pace(arrival);
            }
            open = hold.run(on_frame(&conn, &mut st, msg, &liveness)).await;
        }
        drop(hold);
        if !open {
            break;
        }
    }
    outbox.close.request(close::NORMAL);
    if !writer.is_finished() {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, &mut writer).await;
        writer.abort();
    }
    finish(&conn, &mut st, outbox.close.code()).await;
}

// === Socket.IO ===

/// `42["event",data]`: a Socket.IO EVENT in an Engine.IO MESSAGE.
fn event_frame(event: &str, args: &[&Value]) -> Utf8Bytes {
    let mut frame = String::from("42[");
    frame.push_str(&serde_json::to_string(event).expect("strings serialize"));
    for arg in args {
        frame.push(',');
        frame.push_str(&arg.to_string());
    }
    frame.push(']');
    frame.into()
}

/// One socket of ours as a [`Peer`].
pub(super) struct EioPeer {
    outbox: Arc<Outbox>,
    /// Set when its CONNECT is answered, with `SOCKETIO_STATE_RECOVERY`.
    recovery: OnceLock<Arc<Recovery>>,
    /// The server disconnected the namespace (`41`): the session is over.
    namespace_closed: AtomicBool,
}

impl Peer for EioPeer {
    fn emit(&self, event: &str, data: &Value) {
        match self.recovery.get() {
            // A string last argument would become the client's offset.
            Some(r) if data.is_string() => {
                r.emit_string(event, data);
            }
            _ => {
                self.outbox.push(event_frame(event, &[data]));
            }
        }
    }

    fn disconnect(&self) {
        // DISCONNECT of the namespace ("io server disconnect" for the
        // client), then the closing handshake.
        self.namespace_closed.store(true, Ordering::Release);
        self.outbox.push(Utf8Bytes::from_static("41"));
        self.outbox.close.request(close::NORMAL);
    }

    fn subscriber(&self, positions: bool) -> Arc<dyn Subscriber> {
        match self.recovery.get() {
            Some(r) => r.subscriber(None, positions),
            None => Arc::new(SocketSubscriber {
                outbox: self.outbox.clone(),
                positions,
            }),
        }
    }

    fn recovery(&self) -> Option<&Arc<Recovery>> {
        self.recovery.get()
    }
}

/// One socket as a hub subscriber of one topic.
struct SocketSubscriber {
    outbox: Arc<Outbox>,
    positions: bool,
}

impl Subscriber for SocketSubscriber {
    fn deliver(&self, p: &Publication) -> Delivery {
        self.outbox.push(p.socketio_frame(self.positions).clone())
    }

    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery {
        let mut body =
            json!({"topic": topic, "from": gap.from, "to": gap.to, "epoch": &*gap.epoch});
        if let Some(previous) = &gap.previous_epoch {
            body["previousEpoch"] = json!(&**previous);
        }
        self.outbox.push(event_frame("gap", &[&body]))
    }

    fn transport(&self) -> &'static str {
        m::transport::SOCKETIO
    }
}

/// The `{pid, offset}` a returning official client puts in its CONNECT
/// auth payload (both strings; `offset` absent when it received nothing).
fn resume(auth: Option<&Value>) -> Option<(String, Option<String>)> {
    let auth = auth?;
    let pid = auth.get("pid")?.as_str()?;
    let offset = auth.get("offset").and_then(Value::as_str);
    Some((pid.to_string(), offset.map(String::from)))
}

/// Handles one Socket.IO packet; false when the client left.
async fn packet(conn: &Arc<Conn>, st: &mut SocketState, p: &str) -> bool {
    let node = &conn.node;
    let outbox = &conn.outbox;
    let peer: Arc<dyn Peer> = conn.peer.clone();
    let (kind, rest) = p.split_at(p.len().min(1));
    // A namespace other than "/" comes as "/name," right after the type.
    let (ns, rest) = match rest.strip_prefix('/') {
        Some(r) => match r.split_once(',') {
            Some((ns, r)) => (ns, r),
            None => (r, ""),
        },
        None => ("", rest),
    };
    match kind {
        // CONNECT
        "0" => {
            if !ns.is_empty() {
                push(
                    outbox,
                    format!("44/{ns},{}", json!({"message": "Invalid namespace"})),
                );
                return true;
            }
            if st.session.is_some() {
                return true;
            }
            let auth: Option<Value> = serde_json::from_str(rest).ok();
            let token = sio::auth_token(auth.as_ref()).or_else(|| conn.handshake.token.clone());
            let data = sio::auth_data(auth.as_ref());
            let id = crate::hub::new_conn_id();
            let client = format!("{id:016x}");
            let hello = Hello {
                client: &client,
                transport: transport::SOCKETIO,
                remote: conn.handshake.remote,
                headers: &conn.handshake.headers,
                data: data.as_deref(),
                route: None,
            };
            match sio::open(node, token.as_deref(), id, hello).await {
                Ok(s) => {
                    conn.connected.store(true, Ordering::Release);
                    let sid = format!("{:016x}", s.id);
                    match node.socketio_recovery() {
                        None => {
                            // Registered before the answer: the back end may
                            // address the sid as soon as the client has it.
                            sio::register(node, &peer, &s);
                            push(outbox, format!("40{}", json!({"sid": &sid})));
                            tokio::spawn(sio::expire_when_due(peer.clone(), s.clone()));
                        }
                        Some(registry) => {
                            let resume = resume(auth.as_ref());
                            let (r, plan) =
                                Recovery::connect(registry, node, &s, outbox.clone(), resume).await;
                            let _ = conn.peer.recovery.set(r.clone());
                            sio::register(node, &peer, &s);
                            push(
                                outbox,
                                format!("40{}", json!({"sid": &sid, "pid": r.pid()})),
                            );
                            tokio::spawn(sio::expire_when_due(peer.clone(), s.clone()));
                            r.restore(&peer, &s, node, plan).await;
                        }
                    }
                    sio::connected(&peer, &s, node).await;
                    st.session = Some(s);
                }
                Err(e) => {
                    push(outbox, format!("44{}", json!({"message": e})));
                    st.refused += 1;
                    if st.refused >= MAX_REFUSED_CONNECTS {
                        tracing::debug!(sid = %conn.sid, "{MAX_REFUSED_CONNECTS} Socket.IO CONNECTs refused: session closed");
                        outbox.close.request(close::POLICY);
                    }
                }
            }
            true
        }
        // DISCONNECT
        "1" => false,
        // EVENT
        "2" => {
            let Some(s) = st.session.clone() else {
                return true;
            };
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let ack_id = rest[..digits].parse::<u64>().ok();
            let args: Vec<Value> = match serde_json::from_str(&rest[digits..]) {
                Ok(Value::Array(args)) if args.first().is_some_and(Value::is_string) => args,
                _ => {
                    sio::emit_error(
                        &*peer,
                        None,
                        &sio::Refusal::bad("could not read the message: not a Socket.IO event"),
                    );
                    return true;
                }
            };
            let mut args = args.into_iter();
            let event = match args.next() {
                Some(Value::String(e)) => e,
                _ => return true,
            };
            let data = args
                .next()
                .ok_or_else(|| "the event has no argument".to_string());
            let wants_ack = ack_id.is_some();
            let ack = ack(outbox, ack_id);
            sio::handle(&event, &peer, &s, node, data, ack, wants_ack).await;
            true
        }
        // ACK of a server event (none are asked for), binary packets.
        "3" => true,
        _ => {
            sio::emit_error(
                &*peer,
                None,
                &sio::Refusal::bad("binary packets are not supported"),
            );
            true
        }
    }
}

fn push(outbox: &Outbox, frame: String) {
    outbox.push(frame.into());
}

/// `43<id>[…]` when the client asked for an acknowledgement.
fn ack(outbox: &Arc<Outbox>, id: Option<u64>) -> Ack {
    let outbox = outbox.clone();
    Box::new(move |v| {
        if let Some(id) = id {
            outbox.push(format!("43{id}[{v}]").into());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use std::collections::VecDeque;

    fn peer() -> EioPeer {
        let config = crate::config::Config::from_source(&HashMap::new()).unwrap();
        EioPeer {
            outbox: Arc::new(Outbox::new(&config, m::transport::SOCKETIO)),
            recovery: OnceLock::new(),
            namespace_closed: AtomicBool::new(false),
        }
    }

    fn frames(peer: &EioPeer) -> VecDeque<Utf8Bytes> {
        let mut batch = VecDeque::new();
        peer.outbox.take(&mut batch);
        batch
    }

    #[test]
    fn sockets_of_one_topic_share_one_frame() {
        let data: Arc<RawValue> = Arc::from(RawValue::from_string(r#"{"n":1}"#.into()).unwrap());
        let mut p = Publication::new("t".into(), "t".into(), data, std::time::Instant::now());
        p.offset = Some(7);
        p.epoch = Some("e".into());
        let (a, b) = (peer(), peer());
        for (peer, positions) in [(&a, false), (&b, false)] {
            assert_eq!(peer.subscriber(positions).deliver(&p), Delivery::Queued);
        }
        let (fa, fb) = (frames(&a), frames(&b));
        assert_eq!(fa[0].as_str(), r#"42["t",{"n":1}]"#);
        assert_eq!(
            fa[0].as_str().as_ptr(),
            fb[0].as_str().as_ptr(),
            "one allocation"
        );
        // The object form's frame is shared among its sockets too.
        let (c, d) = (peer(), peer());
        c.subscriber(true).deliver(&p);
        d.subscriber(true).deliver(&p);
        let (fc, fd) = (frames(&c), frames(&d));
        assert_eq!(
            fc[0].as_str(),
            r#"42["t",{"n":1},{"topic":"t","offset":7}]"#
        );
        assert_eq!(fc[0].as_str().as_ptr(), fd[0].as_str().as_ptr());
    }
}
