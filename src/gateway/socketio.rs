//! Socket.IO v5 at `/socket.io/` (socketioxide, local adapter only).
//!
//! A Socket.IO socket is one more kind of hub subscriber: rooms are topics,
//! and publications reach sockets through our backplane and hub, never
//! through socketioxide's adapters. On connect a socket follows topic
//! `device` and receives the four state events. Handlers are registered in
//! a connect middleware, which socketioxide awaits before it acknowledges
//! the connection, so a client that emits right after connecting is never
//! lost (CRATE-NOTES: connect-handler race).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use socketioxide::extract::{AckSender, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;
use socketioxide::{SendError, SocketError, SocketIo, TransportType};

use crate::auth::Identity;
use crate::device::state::{EVENTS, TOPIC};
use crate::gateway::ws::TokenBucket;
use crate::history::GapRange;
use crate::hub::{Announce, ConnId, Delivery, Outcome, Publication, Subscriber};
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{self, Since, TOPIC_PATTERN};

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
        .ws_read_buffer_size(crate::gateway::ws::READ_BUFFER)
        .max_buffer_size(SOCKET_BUFFER)
        .transports([TransportType::Polling, TransportType::Websocket])
        .with_state(node.clone())
        .build_layer();
    io.ns("/", on_connect.with(register));
    (layer, io)
}

/// Per-socket state, kept in the socket's extensions.
struct Session {
    id: ConnId,
    topics: Mutex<HashSet<String>>,
    identity: Identity,
    bucket: Option<Mutex<TokenBucket>>,
    /// Why the server is disconnecting this socket, for the metric.
    closing: Mutex<Option<&'static str>>,
}

impl Session {
    /// The per-connection rate limit; past it the socket gets an `error`
    /// event and is disconnected.
    fn within_rate(&self, socket: &SocketRef) -> bool {
        let Some(bucket) = &self.bucket else {
            return true;
        };
        if bucket.lock().unwrap().take() {
            return true;
        }
        emit_error(socket, None, "rate limit exceeded; disconnecting");
        *self.closing.lock().unwrap() = Some(m::reason::POLICY);
        tokio::spawn(kick(socket.clone()));
        false
    }
}

/// Connect middleware: runs before the CONNECT ack. A refusal here reaches
/// the client as `connect_error` with the message.
async fn register(
    socket: SocketRef,
    State(node): State<Node>,
    TryData(auth): TryData<Value>,
) -> Result<(), String> {
    if node.is_draining() {
        return Err("node is shutting down; connect again".into());
    }
    if let Some(max) = node.config().max_connections
        && node.total_connections() >= max
    {
        return Err(format!("this node is at its limit of {max} connections"));
    }
    let parts = socket.req_parts();
    let token = auth
        .ok()
        .and_then(|a| a.get("token").and_then(Value::as_str).map(String::from))
        .or_else(|| crate::auth::token_from(&parts.headers, parts.uri.query()));
    let identity = node
        .config()
        .auth
        .authenticate(token.as_deref())
        .map_err(|e| e.to_string())?;
    socket.extensions.insert(Arc::new(Session {
        id: crate::hub::new_conn_id(),
        topics: Mutex::new(HashSet::new()),
        identity,
        bucket: node
            .config()
            .rate_limit
            .map(|l| Mutex::new(TokenBucket::new(l))),
        closing: Mutex::new(None),
    }));
    socket.on("subscribe", on_subscribe);
    socket.on("unsubscribe", on_unsubscribe);
    socket.on("request_state", on_request_state);
    socket.on("publish", on_publish);
    socket.on_disconnect(on_disconnect);
    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::SOCKETIO).increment(1.0);
    metrics::counter!(m::CONNECTIONS_OPENED, "transport" => m::transport::SOCKETIO).increment(1);
    node.connection_opened();
    Ok(())
}

/// Counts a client message and applies the rate limit; `None` when the
/// socket is over it (it is then being disconnected).
fn accept_message(socket: &SocketRef, kind: &'static str) -> Option<Arc<Session>> {
    metrics::counter!(m::CLIENT_MESSAGES, "transport" => m::transport::SOCKETIO, "type" => kind)
        .increment(1);
    let s = session(socket);
    s.within_rate(socket).then_some(s)
}

fn session(socket: &SocketRef) -> Arc<Session> {
    socket
        .extensions
        .get::<Arc<Session>>()
        .expect("registered at connect")
}

async fn on_connect(socket: SocketRef, State(node): State<Node>) {
    if !session(&socket).identity.may_subscribe(TOPIC) {
        return;
    }
    let request = SubscribeRequest {
        topic: TOPIC.to_string(),
        positions: false,
        since: None,
    };
    if let Err(e) = join(&socket, &node, request, Box::new(|_| {})).await {
        emit_error(&socket, None, &e);
    }
    send_state(&socket, &node);
}

fn send_state(socket: &SocketRef, node: &Node) {
    let state = node.device().state();
    for event in EVENTS {
        let _ = socket.emit(event, &state.event(event));
    }
}

/// What a `subscribe` event asks for.
struct SubscribeRequest {
    topic: String,
    /// Subscribed with the object form `{topic, offset?, epoch?}`: history
    /// publications carry a second argument `{topic, offset}`. The plain
    /// string form keeps one-argument events (python-socketio handlers with
    /// one parameter raise `TypeError` on a second one).
    positions: bool,
    since: Option<Since>,
}

async fn join(
    socket: &SocketRef,
    node: &Node,
    request: SubscribeRequest,
    announce: Announce,
) -> Result<(), String> {
    let s = session(socket);
    let topic = request.topic.as_str();
    if !s.identity.may_subscribe(topic) {
        return Err(format!("not allowed to subscribe to \"{topic}\""));
    }
    let limit = node.config().max_subscriptions;
    let at_limit = {
        let topics = s.topics.lock().unwrap();
        !topics.contains(topic) && topics.len() >= limit
    };
    if at_limit {
        return Err(format!(
            "subscription limit of {limit} topics per connection reached"
        ));
    }
    let sub: Arc<dyn Subscriber> = Arc::new(SocketSubscriber {
        socket: socket.clone(),
        kicked: AtomicBool::new(false),
        positions: request.positions,
    });
    node.hub()
        .subscribe(topic, s.id, sub, request.since, announce)
        .await
        .map_err(|e| format!("could not subscribe to \"{topic}\": {e}"))?;
    s.topics.lock().unwrap().insert(topic.to_string());
    Ok(())
}

/// `subscribe` takes a topic name, or `{"topic": …, "offset"?: N, "epoch"?: E}`
/// (or the older `{"event": …}`).
fn subscribe_arg(
    data: &Result<Value, socketioxide::ParserError>,
) -> Result<SubscribeRequest, String> {
    let topic = topic_arg(data)?;
    let Ok(Value::Object(o)) = data else {
        return Ok(SubscribeRequest {
            topic,
            positions: false,
            since: None,
        });
    };
    let since = match (o.get("offset"), o.get("epoch")) {
        (None | Some(Value::Null), None | Some(Value::Null)) => None,
        _ => Some(protocol::parse_since(&Value::Object(o.clone())).map_err(|e| e.to_string())?),
    };
    Ok(SubscribeRequest {
        topic,
        positions: o.contains_key("topic"),
        since,
    })
}

/// `subscribe` takes a topic name, or `{"topic": …}` / `{"event": …}`.
fn topic_arg(data: &Result<Value, socketioxide::ParserError>) -> Result<String, String> {
    let v = data
        .as_ref()
        .map_err(|e| format!("could not read the message: {e}"))?;
    let name = match v {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => o
            .get("topic")
            .or_else(|| o.get("event"))
            .and_then(Value::as_str),
        _ => None,
    }
    .ok_or_else(|| "expected a topic name, or {\"topic\": \"name\"}".to_string())?;
    if protocol::valid_topic(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "invalid topic name \"{name}\": must match {TOPIC_PATTERN}"
        ))
    }
}

/// The ack of a successful `subscribe`: on history topics with the topic's
/// offset and epoch, and `recovered` when the client sent a position.
fn subscribe_ack(topic: &str, outcome: &Outcome) -> Value {
    let mut ack = json!({"ok": true, "topic": topic});
    if let Some(p) = &outcome.position {
        ack["offset"] = json!(p.offset);
        ack["epoch"] = json!(&*p.epoch);
    }
    if let Some(r) = outcome.recovered {
        ack["recovered"] = json!(r);
    }
    ack
}

async fn on_subscribe(
    socket: SocketRef,
    State(node): State<Node>,
    TryData(data): TryData<Value>,
    ack: AckSender,
) {
    if accept_message(&socket, "subscribe").is_none() {
        return;
    }
    let request = match subscribe_arg(&data) {
        Ok(r) => r,
        Err(e) => return reply(&socket, ack, Err(e), named_topic(&data).as_deref()),
    };
    // The ack goes out when the hub announces the subscription: before any
    // missed publication is emitted.
    let ack = Arc::new(Mutex::new(Some(ack)));
    let topic = request.topic.clone();
    let announce = {
        let ack = ack.clone();
        let topic = topic.clone();
        Box::new(move |outcome: &Outcome| {
            if let Some(ack) = ack.lock().unwrap().take() {
                let _ = ack.send(&subscribe_ack(&topic, outcome));
            }
        })
    };
    if let Err(e) = join(&socket, &node, request, announce).await {
        let pending = ack.lock().unwrap().take();
        match pending {
            Some(ack) => reply(&socket, ack, Err(e), Some(&topic)),
            None => emit_error(&socket, Some(&topic), &e),
        }
    }
}

async fn on_unsubscribe(
    socket: SocketRef,
    State(node): State<Node>,
    TryData(data): TryData<Value>,
    ack: AckSender,
) {
    let Some(s) = accept_message(&socket, "unsubscribe") else {
        return;
    };
    let res = match topic_arg(&data) {
        Ok(topic) => {
            let was = s.topics.lock().unwrap().remove(&topic);
            if was {
                node.hub().unsubscribe(&topic, s.id).await;
            }
            Ok(topic)
        }
        Err(e) => Err(e),
    };
    reply(&socket, ack, res, named_topic(&data).as_deref());
}

async fn on_request_state(socket: SocketRef, State(node): State<Node>, ack: AckSender) {
    let Some(s) = accept_message(&socket, "request_state") else {
        return;
    };
    if !s.identity.may_subscribe(TOPIC) {
        let e = format!("not allowed to read \"{TOPIC}\"");
        let _ = ack.send(&json!({"ok": false, "error": e}));
        emit_error(&socket, Some(TOPIC), &e);
        return;
    }
    send_state(&socket, &node);
    let _ = ack.send(&json!({"ok": true}));
}

/// `publish` with `{"topic", "event"?, "data"}`, allowed by a token's
/// `publish` claim only.
async fn on_publish(
    socket: SocketRef,
    State(node): State<Node>,
    TryData(data): TryData<Value>,
    ack: AckSender,
) {
    let Some(s) = accept_message(&socket, "publish") else {
        return;
    };
    let res = async {
        let topic = topic_arg(&data)?;
        let v = data.as_ref().map_err(|e| e.to_string())?;
        if topic == TOPIC {
            return Err(
                "topic \"device\" carries device state: change it with the device commands".into(),
            );
        }
        if !s.identity.may_publish(&topic) {
            return Err(format!("not allowed to publish to \"{topic}\""));
        }
        let event = match v.get("event") {
            None | Some(Value::Null) => topic.clone(),
            Some(Value::String(e)) if protocol::valid_topic(e) => e.clone(),
            Some(_) => return Err(format!("event must be a name matching {TOPIC_PATTERN}")),
        };
        let payload = v.get("data").ok_or("publish needs a \"data\" field")?;
        let raw = serde_json::value::to_raw_value(payload).map_err(|e| e.to_string())?;
        node.hub()
            .publish(&topic, &event, &raw)
            .await
            .map_err(|e| format!("publication not accepted: {e}"))?;
        Ok(topic)
    }
    .await;
    reply(&socket, ack, res, named_topic(&data).as_deref());
}

fn reply(socket: &SocketRef, ack: AckSender, res: Result<String, String>, topic: Option<&str>) {
    match res {
        Ok(topic) => {
            let _ = ack.send(&json!({"ok": true, "topic": topic}));
        }
        Err(e) => {
            let _ = ack.send(&json!({"ok": false, "error": e, "topic": topic}));
            emit_error(socket, topic, &e);
        }
    }
}

/// The topic named in a message, when it can be read, for error reports.
fn named_topic(data: &Result<Value, socketioxide::ParserError>) -> Option<String> {
    match data.as_ref().ok()? {
        Value::String(s) => Some(s.chars().take(140).collect()),
        Value::Object(o) => o
            .get("topic")
            .or_else(|| o.get("event"))
            .and_then(Value::as_str)
            .map(|s| s.chars().take(140).collect()),
        _ => None,
    }
}

fn emit_error(socket: &SocketRef, topic: Option<&str>, message: &str) {
    let _ = socket.emit("error", &json!({"message": message, "topic": topic}));
}

async fn on_disconnect(socket: SocketRef, State(node): State<Node>, reason: DisconnectReason) {
    let s = session(&socket);
    let topics: Vec<String> = s.topics.lock().unwrap().drain().collect();
    for topic in topics {
        node.hub().unsubscribe(&topic, s.id).await;
    }
    let closing = *s.closing.lock().unwrap();
    let reason = match reason {
        DisconnectReason::ServerNSDisconnect => closing.unwrap_or(m::reason::SERVER),
        DisconnectReason::ClosingServer => m::reason::SHUTDOWN,
        DisconnectReason::HeartbeatTimeout => m::reason::HEARTBEAT,
        DisconnectReason::PacketParsingError => m::reason::ERROR,
        _ => m::reason::CLIENT,
    };
    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::SOCKETIO).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "transport" => m::transport::SOCKETIO, "reason" => reason)
        .increment(1);
    node.connection_closed();
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
                        s.closing
                            .lock()
                            .unwrap()
                            .get_or_insert(m::reason::SLOW_CONSUMER);
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
