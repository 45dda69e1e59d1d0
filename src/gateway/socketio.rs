//! Socket.IO v5 at `/socket.io/` through socketioxide (local adapter
//! only): long-polling, and websocket after an upgrade. A socket that opens
//! with the websocket transport is served by our own transport
//! (`engineio.rs`); both run the handlers of `sio.rs`.
//!
//! A Socket.IO socket is one more kind of hub subscriber: rooms are topics,
//! and publications reach sockets through our backplane and hub, never
//! through socketioxide's adapters. Handlers are registered in a connect
//! middleware, which socketioxide awaits before it acknowledges the
//! connection, so a client that emits right after connecting is never lost
//! (CRATE-NOTES: connect-handler race).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, Event, SocketRef, State, TryData};
use socketioxide::handler::{ConnectHandler, FromMessageParts};
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;
use socketioxide::socket::Socket;
use socketioxide::{SendError, SocketError, SocketIo, TransportType};

use crate::backend::hooks::{Hello, transport};
use crate::gateway::sio::{self, Ack, Peer, Session};
use crate::history::GapRange;
use crate::hub::{Delivery, Publication, Subscriber};
use crate::metrics as m;
use crate::node::Node;

/// Packets a socket may have queued before it counts as a slow consumer.
const SOCKET_BUFFER: usize = 4096;

/// Builds the layer to mount on the router and the handle used at shutdown.
pub fn layer(node: &Node) -> (SocketIoLayer, SocketIo) {
    let config = node.config();
    let (layer, io) = SocketIo::builder()
        .ping_interval(config.socketio_ping_interval)
        .ping_timeout(config.socketio_ping_timeout)
        .max_payload(config.max_payload as u64)
        .ws_max_message_size(config.max_payload)
        .ws_max_frame_size(config.max_payload)
        .ws_read_buffer_size(crate::gateway::admission::READ_BUFFER)
        .max_buffer_size(SOCKET_BUFFER)
        .transports([TransportType::Polling, TransportType::Websocket])
        .with_state(node.clone())
        .build_layer();
    io.ns("/", on_connect.with(register));
    (layer, io)
}

/// A socketioxide socket as a [`Peer`]. Built per call, never stored in the
/// socket's own extensions (that would be a reference cycle).
struct IoPeer(SocketRef);

impl Peer for IoPeer {
    fn emit(&self, event: &str, data: &Value) {
        let _ = self.0.emit(event, data);
    }

    fn disconnect(&self) {
        tokio::spawn(kick(self.0.clone()));
    }

    fn subscriber(&self, positions: bool) -> Arc<dyn Subscriber> {
        Arc::new(SocketSubscriber {
            socket: self.0.clone(),
            kicked: AtomicBool::new(false),
            positions,
        })
    }
}

fn peer(socket: &SocketRef) -> Arc<dyn Peer> {
    Arc::new(IoPeer(socket.clone()))
}

fn ack(ack: AckSender) -> Ack {
    Box::new(move |v| {
        let _ = ack.send(&v);
    })
}

fn data(d: Result<Value, socketioxide::ParserError>) -> Result<Value, String> {
    d.map_err(|e| e.to_string())
}

/// Whether the client asked for an acknowledgement: an event without one
/// is a fire-and-forget RPC. (`AckSender` does not say.)
struct WantsAck(bool);

impl FromMessageParts<LocalAdapter> for WantsAck {
    type Error = std::convert::Infallible;

    fn from_message_parts(
        _: &Arc<Socket<LocalAdapter>>,
        _: &mut socketioxide::handler::Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Self::Error> {
        Ok(WantsAck(ack_id.is_some()))
    }
}

/// Connect middleware: runs before the CONNECT ack. A refusal here reaches
/// the client as `connect_error` with the message.
async fn register(
    socket: SocketRef,
    State(node): State<Node>,
    TryData(auth): TryData<Value>,
) -> Result<(), String> {
    let parts = socket.req_parts();
    let auth = auth.ok();
    let token = sio::auth_token(auth.as_ref())
        .or_else(|| crate::auth::token_from(&parts.headers, parts.uri.query()));
    let connect_data = sio::auth_data(auth.as_ref());
    let client = socket.id.to_string();
    let hello = Hello {
        client: &client,
        transport: transport::SOCKETIO,
        remote: crate::gateway::admission::remote_addr(&parts.extensions),
        headers: &parts.headers,
        data: connect_data.as_deref(),
    };
    let s = sio::open(&node, token.as_deref(), crate::hub::new_conn_id(), hello).await?;
    sio::register(&node, &peer(&socket), &s);
    socket.extensions.insert(s.clone());
    tokio::spawn(sio::expire_when_due(peer(&socket), s));
    for event in sio::CLIENT_EVENTS {
        socket.on(
            event,
            async move |socket: SocketRef,
                        State(node): State<Node>,
                        TryData(d): TryData<Value>,
                        WantsAck(wants): WantsAck,
                        a: AckSender| {
                let (peer, s) = (peer(&socket), session(&socket));
                sio::handle(event, &peer, &s, &node, data(d), ack(a), wants).await;
            },
        );
    }
    // Every other event: an RPC when PROXY_RPC_URL is set (`sio::handle`).
    socket.on_fallback(
        async move |socket: SocketRef,
                    State(node): State<Node>,
                    Event(event): Event,
                    TryData(d): TryData<Value>,
                    WantsAck(wants): WantsAck,
                    a: AckSender| {
            let (peer, s) = (peer(&socket), session(&socket));
            sio::handle(&event, &peer, &s, &node, data(d), ack(a), wants).await;
        },
    );
    socket.on_disconnect(on_disconnect);
    Ok(())
}

fn session(socket: &SocketRef) -> Arc<Session> {
    socket
        .extensions
        .get::<Arc<Session>>()
        .expect("registered at connect")
}

async fn on_connect(socket: SocketRef, State(node): State<Node>) {
    sio::connected(&peer(&socket), &session(&socket), &node).await;
}

async fn on_disconnect(socket: SocketRef, State(node): State<Node>, reason: DisconnectReason) {
    let s = session(&socket);
    let reason = match reason {
        DisconnectReason::ServerNSDisconnect => s.closing_reason().unwrap_or(m::reason::SERVER),
        DisconnectReason::ClosingServer => m::reason::SHUTDOWN,
        DisconnectReason::HeartbeatTimeout => m::reason::HEARTBEAT,
        DisconnectReason::PacketParsingError => m::reason::ERROR,
        _ => m::reason::CLIENT,
    };
    sio::disconnected(&s, &node, reason).await;
}

/// Disconnects a slow socket. socketioxide queues the disconnect packet like
/// any other, so it is refused while the queue is full: retry until it fits
/// or the socket is gone (the Engine.IO heartbeat ends a client that reads
/// nothing at all). Not under the hub's lock: disconnecting runs our handler.
async fn kick(socket: SocketRef) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while socket.connected() && tokio::time::Instant::now() < deadline {
        match socket.clone().disconnect() {
            Err(SocketError::InternalChannelFull) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => return,
        }
    }
}

/// One socket as a hub subscriber of one topic.
struct SocketSubscriber {
    socket: SocketRef,
    kicked: AtomicBool,
    /// Subscribed with the object form: history publications carry `{topic, offset}`.
    positions: bool,
}

impl Subscriber for SocketSubscriber {
    fn deliver(&self, p: &Publication) -> Delivery {
        if self.kicked.load(Ordering::Acquire) {
            // Being disconnected as a slow consumer: nothing more is queued.
            return Delivery::Overflow;
        }
        let sent = match p.offset {
            Some(offset) if self.positions => self.socket.emit(
                &*p.event,
                &(&*p.data, json!({"topic": &*p.topic, "offset": offset})),
            ),
            _ => self.socket.emit(&*p.event, &*p.data),
        };
        self.sent(sent)
    }

    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery {
        if self.kicked.load(Ordering::Acquire) {
            return Delivery::Overflow;
        }
        let mut body =
            json!({"topic": topic, "from": gap.from, "to": gap.to, "epoch": &*gap.epoch});
        if let Some(previous) = &gap.previous_epoch {
            body["previousEpoch"] = json!(&**previous);
        }
        self.sent(self.socket.emit("gap", &body))
    }

    fn transport(&self) -> &'static str {
        m::transport::SOCKETIO
    }
}

impl SocketSubscriber {
    /// Applies the slow-consumer policy to the result of one emit.
    fn sent(&self, sent: Result<(), SendError>) -> Delivery {
        match sent {
            Ok(()) => Delivery::Queued,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                // Slow consumer: the same policy as native clients.
                if !self.kicked.swap(true, Ordering::AcqRel) {
                    metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS, "transport" => m::transport::SOCKETIO)
                        .increment(1);
                    if let Some(s) = self.socket.extensions.get::<Arc<Session>>() {
                        s.closing(m::reason::SLOW_CONSUMER);
                    }
                    tokio::spawn(kick(self.socket.clone()));
                }
                Delivery::Overflow
            }
            Err(SendError::Socket(SocketError::Closed)) => Delivery::Closed,
            Err(e) => {
                tracing::warn!(cause = %e, "socket.io emit failed");
                Delivery::Closed
            }
        }
    }
}
