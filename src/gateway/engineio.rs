//! Our own Engine.IO v4 websocket transport for Socket.IO v5 clients that
//! open with the websocket transport (`/socket.io/?EIO=4&transport=websocket`,
//! no `sid`): official clients configured with `transports: ["websocket"]`,
//! python-socketio with `transports=["websocket"]`, most production setups.
//!
//! Why not socketioxide for these: its per-socket `emit` encodes the packet
//! for every socket, and its room broadcast, which encodes once, cannot say
//! which socket is full. Here a socket is a native-style connection: the
//! same bounded [`Outbox`], writer and closing handshake as `ws.rs`, and
//! each publication's `42[…]` frame is encoded once per node and shared by
//! every such socket (a refcount, like native frames), while the
//! slow-consumer policy still applies to the one socket that is full.
//! Long-polling sockets, and sockets that upgrade from polling, stay with
//! socketioxide (`socketio.rs`); both run the handlers of `sio.rs`.
//!
//! Scope: the default namespace `/` (others are refused with CONNECT_ERROR),
//! text packets only (binary attachments are refused with an `error` event),
//! acknowledgements of client events; the server never asks for acks.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::FromRequest;
use axum::extract::Request;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::backend::hooks::{Hello, transport};
use crate::gateway::outbox::{self, Heartbeat, Outbox, WRITE_TIMEOUT, Writer, close};
use crate::gateway::sio::{self, Ack, Peer, Session};
use crate::history::GapRange;
use crate::hub::{Delivery, Publication, Subscriber};
use crate::metrics as m;
use crate::node::Node;

/// Whether `req` opens a Socket.IO session directly on the websocket
/// transport (no `sid`: not an upgrade of a polling session).
pub fn opens_websocket(req: &Request) -> bool {
    if req.uri().path().trim_end_matches('/') != "/socket.io" {
        return false;
    }
    let query = req.uri().query().unwrap_or("");
    let mut eio4 = false;
    let mut websocket = false;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            "EIO" => eio4 = v == "4",
            "transport" => websocket = v == "websocket",
            "sid" => return false,
            _ => {}
        }
    }
    eio4 && websocket
}

/// What the CONNECT packet's admission needs from the HTTP handshake.
struct Handshake {
    token: Option<String>,
    /// Only the `PROXY_HEADERS` ones, and only with a connect hook: a
    /// socket keeps this for its whole life.
    headers: HeaderMap,
    remote: Option<SocketAddr>,
}

/// Upgrades and runs the session.
pub async fn upgrade(node: Node, req: Request) -> Response {
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
    let handshake = Handshake {
        token: crate::auth::token_from(req.headers(), req.uri().query()),
        headers,
        remote: crate::gateway::admission::remote_addr(req.extensions()),
    };
    let ws = match WebSocketUpgrade::from_request(req, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let n = node.clone();
    outbox::upgrade(&n, ws, move |socket| run(node, socket, handshake))
}

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

/// One socket of this transport as a [`Peer`].
struct WsPeer {
    outbox: Arc<Outbox>,
}

impl Peer for WsPeer {
    fn emit(&self, event: &str, data: &Value) {
        self.outbox.push(event_frame(event, &[data]));
    }

    fn disconnect(&self) {
        // DISCONNECT of the namespace ("io server disconnect" for the
        // client), then the closing handshake.
        self.outbox.push(Utf8Bytes::from_static("41"));
        self.outbox.close.request(close::NORMAL);
    }

    fn subscriber(&self, positions: bool) -> Arc<dyn Subscriber> {
        Arc::new(SocketSubscriber {
            outbox: self.outbox.clone(),
            positions,
        })
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

async fn run(node: Node, socket: WebSocket, handshake: Handshake) {
    let config = node.config().clone();
    let outbox = Arc::new(Outbox::new(&config, m::transport::SOCKETIO));
    let id = crate::hub::new_conn_id();
    let open = json!({
        "sid": format!("{id:016x}"),
        "upgrades": [],
        "pingInterval": config.socketio_ping_interval.as_millis() as u64,
        "pingTimeout": config.socketio_ping_timeout.as_millis() as u64,
        "maxPayload": config.max_payload,
    });
    outbox.push(format!("0{open}").into());
    let (sink, mut stream) = socket.split();
    let heartbeat = Heartbeat::EngineIo {
        interval: config.socketio_ping_interval,
        timeout: config.socketio_ping_timeout,
    };
    let (mut writer, liveness) = Writer::spawn(sink, &outbox, &node, id, heartbeat);
    let peer: Arc<dyn Peer> = Arc::new(WsPeer {
        outbox: outbox.clone(),
    });
    let mut session: Option<Arc<Session>> = None;
    let mut client_closed = false;
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            // The writer closed the connection (slow consumer, shutdown,
            // heartbeat, server disconnect).
            _ = &mut writer => break,
        };
        liveness.heard();
        let text = match msg {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                sio::emit_error(&*peer, None, "binary packets are not supported");
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) => {
                outbox.close.request(close::BY_CLIENT);
                client_closed = true;
                break;
            }
            None | Some(Err(_)) => {
                client_closed = true;
                break;
            }
        };
        match text.as_bytes().first() {
            // Engine.IO PING from the client (v3 style): answer PONG.
            Some(b'2') => {
                outbox.push(Utf8Bytes::from_static("3"));
            }
            // PONG, UPGRADE, NOOP.
            Some(b'3' | b'5' | b'6') => {}
            Some(b'4') => {
                // Boxed: what a packet may await stays out of every idle
                // socket's task.
                let handled = packet(&node, &peer, &outbox, &mut session, &text[1..], &handshake);
                if !Box::pin(handled).await {
                    client_closed = true;
                    break;
                }
            }
            // CLOSE, or something that is not Engine.IO.
            _ => {
                client_closed = true;
                break;
            }
        }
    }
    outbox.close.request(close::NORMAL);
    if !writer.is_finished() {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, &mut writer).await;
        writer.abort();
    }
    if let Some(s) = session {
        let reason = match outbox.close.code() {
            _ if client_closed => m::reason::CLIENT,
            close::TRY_AGAIN_LATER => m::reason::SLOW_CONSUMER,
            close::GOING_AWAY | close::RESTART => m::reason::SHUTDOWN,
            close::HEARTBEAT_TIMEOUT => m::reason::HEARTBEAT,
            _ => s.closing_reason().unwrap_or(m::reason::SERVER),
        };
        sio::disconnected(&s, &node, reason).await;
    }
}

/// Handles one Socket.IO packet; false when the client left.
async fn packet(
    node: &Node,
    peer: &Arc<dyn Peer>,
    outbox: &Arc<Outbox>,
    session: &mut Option<Arc<Session>>,
    p: &str,
    handshake: &Handshake,
) -> bool {
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
            if session.is_some() {
                return true;
            }
            let auth: Option<Value> = serde_json::from_str(rest).ok();
            let token = sio::auth_token(auth.as_ref()).or_else(|| handshake.token.clone());
            let data = sio::auth_data(auth.as_ref());
            let id = crate::hub::new_conn_id();
            let client = format!("{id:016x}");
            let hello = Hello {
                client: &client,
                transport: transport::SOCKETIO,
                remote: handshake.remote,
                headers: &handshake.headers,
                data: data.as_deref(),
            };
            match sio::open(node, token.as_deref(), id, hello).await {
                Ok(s) => {
                    let sid = format!("{:016x}", s.id);
                    push(outbox, format!("40{}", json!({"sid": &sid})));
                    sio::register(node, peer, &s);
                    tokio::spawn(sio::expire_when_due(peer.clone(), s.clone()));
                    sio::connected(peer, &s, node).await;
                    *session = Some(s);
                }
                Err(e) => push(outbox, format!("44{}", json!({"message": e}))),
            }
            true
        }
        // DISCONNECT
        "1" => false,
        // EVENT
        "2" => {
            let Some(s) = session.clone() else {
                return true;
            };
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let ack_id = rest[..digits].parse::<u64>().ok();
            let args: Vec<Value> = match serde_json::from_str(&rest[digits..]) {
                Ok(Value::Array(args)) if args.first().is_some_and(Value::is_string) => args,
                _ => {
                    sio::emit_error(
                        &**peer,
                        None,
                        "could not read the message: not a Socket.IO event",
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
            sio::handle(&event, peer, &s, node, data, ack, wants_ack).await;
            true
        }
        // ACK of a server event (none are asked for), binary packets.
        "3" => true,
        _ => {
            sio::emit_error(&**peer, None, "binary packets are not supported");
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
