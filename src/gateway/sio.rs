//! What a Socket.IO socket can ask for and what it is told, whichever
//! transport of ours carries it (`engineio.rs`: websocket; `polling.rs`:
//! long-polling and its upgrade). They hand their sockets to the handlers
//! here through [`Peer`], so every socket behaves the same to the letter.
//!
//! On connect a socket follows topic `device` and receives the four state
//! events. Events: `subscribe`, `unsubscribe`, `request_state`, `publish`,
//! `refresh` (see `docs/protocol.md`); with `PROXY_RPC_URL` set, any other
//! event is an RPC answered by the application back end.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::backend::hooks::{Hello, transport};
use crate::backend::{Caller, Denial, HookError};
use crate::device::state::{EVENTS, TOPIC};
use crate::gateway::recovery::Recovery;
use crate::hub::{Announce, ConnId, Outcome, Subscriber};
use crate::limits::{Arrival, TokenBucket};
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{self, Since, TOPIC_PATTERN};

/// What the handlers need from one socket.
pub trait Peer: Send + Sync + 'static {
    /// Queues event `event` with one argument.
    fn emit(&self, event: &str, data: &Value);
    /// Disconnects the socket from the server side (`io server disconnect`)
    /// after what is already queued.
    fn disconnect(&self);
    /// A hub subscriber that delivers to this socket; `positions`: history
    /// publications carry a second argument `{topic, offset}`.
    fn subscriber(&self, positions: bool) -> Arc<dyn Subscriber>;
    /// The socket's connection state recovery (`SOCKETIO_STATE_RECOVERY`),
    /// once its CONNECT was answered: where its subscriptions are recorded.
    fn recovery(&self) -> Option<&Arc<Recovery>> {
        None
    }
}

/// Sends an event's acknowledgement (a no-op when the client asked for none).
pub type Ack = Box<dyn FnOnce(Value) + Send>;

/// Per-socket state.
pub struct Session {
    pub id: ConnId,
    /// The outward id: the Socket.IO sid (the hooks' `client`).
    pub client_id: String,
    topics: Mutex<HashSet<String>>,
    identity: Mutex<Identity>,
    /// Wakes the expiry timer after a `refresh`.
    refreshed: Notify,
    /// Cancelled when the socket is gone.
    pub gone: CancellationToken,
    bucket: Option<Mutex<TokenBucket>>,
    /// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT`: the client's subscribes and
    /// unsubscribes (the server's own and the back end's are not counted).
    subscribes: Option<Mutex<TokenBucket>>,
    /// The socket's place under `MAX_CONNECTIONS_PER_USER`, given back on
    /// disconnect.
    seat: Mutex<Option<crate::limits::Seat>>,
    /// Why the server is disconnecting this socket, for the metric.
    closing: Mutex<Option<&'static str>>,
    /// Its place in the node's client registry, ended on disconnect.
    registration: Mutex<Option<crate::clients::Registration>>,
    rpc_slots: crate::backend::hooks::RpcSlots,
}

impl Session {
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.identity.lock().unwrap().may_subscribe(topic)
    }

    /// Whether connection state recovery gives `topic` back to the
    /// identity the socket came back with, by the rule of a `refresh`: not
    /// when that identity is refused it outright; on a topic the subscribe
    /// hook covers and the identity does not name, kept when the hook (or
    /// the back end) granted it, and ended when the subscribing identity's
    /// own permission did (`by_identity`): the hook was never asked then.
    pub fn may_restore(
        &self,
        hooks: &crate::backend::hooks::Hooks,
        topic: &str,
        by_identity: bool,
    ) -> bool {
        use crate::backend::hooks::Access;
        match self.access(hooks, topic) {
            Access::Allowed => true,
            Access::AskHook => !by_identity,
            Access::Forbidden => false,
        }
    }

    /// What the socket's identity itself says about subscribing to `topic`.
    fn access(
        &self,
        hooks: &crate::backend::hooks::Hooks,
        topic: &str,
    ) -> crate::backend::hooks::Access {
        hooks.subscribe_access(&self.identity.lock().unwrap(), topic)
    }

    /// The user the socket's identity names.
    pub fn user(&self) -> String {
        self.identity.lock().unwrap().user().to_string()
    }

    /// A copy of the identity, to hold across a hook call.
    fn identity(&self) -> Identity {
        self.identity.lock().unwrap().clone()
    }

    /// Records why the server closes the socket (the first reason wins).
    pub fn closing(&self, reason: &'static str) {
        self.closing.lock().unwrap().get_or_insert(reason);
    }

    /// The reason recorded by [`Session::closing`], if any.
    pub fn closing_reason(&self) -> Option<&'static str> {
        *self.closing.lock().unwrap()
    }

    /// A websocket reader tells the rate buckets how the frame about to be
    /// read reached it; long-polling does not (each POST is read whole,
    /// when it comes).
    pub fn pace(&self, arrival: Arrival) {
        for bucket in [&self.bucket, &self.subscribes].into_iter().flatten() {
            bucket.lock().unwrap().pace(arrival);
        }
    }
}

/// Admits a new socket as connection `id`: the node must not be draining
/// (its Engine.IO session has held a place under `MAX_CONNECTIONS` since
/// the handshake), and the token (from the CONNECT auth payload, the query or the
/// headers) must be accepted, or without one the connect hook must admit it
/// (with `auth.data`). The error is the `connect_error` message.
pub async fn open(
    node: &Node,
    token: Option<&str>,
    id: ConnId,
    hello: Hello<'_>,
) -> Result<Arc<Session>, String> {
    if node.is_draining() {
        return Err("node is shutting down; connect again".into());
    }
    let identity = crate::gateway::admission::identify(node, token, hello)
        .await
        .map_err(|e| e.to_string())?;
    let seat = node
        .limits()
        .user_seat(identity.user())
        .map_err(|e| e.to_string())?;
    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::SOCKETIO).increment(1.0);
    metrics::counter!(m::CONNECTIONS_OPENED, "transport" => m::transport::SOCKETIO).increment(1);
    node.connection_opened();
    Ok(Arc::new(Session {
        id,
        client_id: hello.client.to_string(),
        topics: Mutex::new(HashSet::new()),
        identity: Mutex::new(identity),
        refreshed: Notify::new(),
        gone: CancellationToken::new(),
        bucket: node
            .config()
            .rate_limit
            .map(|l| Mutex::new(TokenBucket::new(l))),
        subscribes: node
            .config()
            .subscribe_rate_limit
            .map(|l| Mutex::new(TokenBucket::new(l))),
        seat: Mutex::new(seat),
        closing: Mutex::new(None),
        registration: Mutex::new(None),
        rpc_slots: Default::default(),
    }))
}

/// The connect data of a CONNECT auth payload `{"data": …}`.
pub fn auth_data(auth: Option<&Value>) -> Option<Box<RawValue>> {
    let data = auth?.get("data").filter(|d| !d.is_null())?;
    serde_json::value::to_raw_value(data).ok()
}

/// Puts an admitted socket in the node's client registry under its `sid`,
/// so that the back end can reach it (control API) and hears of it
/// (webhooks). Call once, right after [`open`].
pub fn register(node: &Node, peer: &Arc<dyn Peer>, s: &Arc<Session>) {
    let id: Arc<str> = s.client_id.as_str().into();
    let (user, info) = {
        let identity = s.identity.lock().unwrap();
        (identity.user().into(), identity.info().cloned())
    };
    let handle = Arc::new(Handle {
        peer: peer.clone(),
        session: Arc::downgrade(s),
        node: node.clone(),
        pending: Arc::new(AtomicUsize::new(0)),
        leaving: std::sync::atomic::AtomicBool::new(false),
        commands: Arc::new(Mutex::new(Commands::default())),
    });
    let registration = node.clients().register(
        crate::clients::ClientInfo {
            id,
            user,
            info,
            transport: crate::clients::transport::SOCKETIO,
            sse_key: None,
        },
        handle,
    );
    *s.registration.lock().unwrap() = Some(registration);
}

/// How the registry reaches a socket: its commands run one after another,
/// in the order they came (an `/api/subscribe` then an `/api/unsubscribe`
/// must not end subscribed), in a task that lives only while some are
/// queued, at most [`crate::clients::PENDING_COMMANDS`] at a time per socket.
struct Handle {
    peer: Arc<dyn Peer>,
    /// Weak: the registry must not keep a gone socket's session alive.
    session: Weak<Session>,
    node: Node,
    pending: Arc<AtomicUsize>,
    /// Set once a disconnect was taken: the socket is on its way out (its
    /// session ends only when the transport has closed) and is not reached
    /// by later commands.
    leaving: std::sync::atomic::AtomicBool,
    commands: Arc<Mutex<Commands>>,
}

/// A socket's queued control commands; `running` while a task drains them.
#[derive(Default)]
struct Commands {
    queue: std::collections::VecDeque<crate::clients::Command>,
    running: bool,
}

impl crate::clients::Handle for Handle {
    fn send(&self, command: crate::clients::Command) -> crate::clients::Handed {
        use crate::clients::Handed;
        let Some(s) = self.session.upgrade() else {
            return Handed::Gone;
        };
        if s.gone.is_cancelled() || self.leaving.load(Ordering::Acquire) {
            return Handed::Gone;
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= crate::clients::PENDING_COMMANDS {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Handed::Busy;
        }
        if matches!(command, crate::clients::Command::Disconnect { .. })
            && self.leaving.swap(true, Ordering::AcqRel)
        {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Handed::Gone;
        }
        {
            let mut commands = self.commands.lock().unwrap();
            commands.queue.push_back(command);
            if std::mem::replace(&mut commands.running, true) {
                return Handed::Taken;
            }
        }
        let (peer, node) = (self.peer.clone(), self.node.clone());
        let (pending, commands) = (self.pending.clone(), self.commands.clone());
        tokio::spawn(async move {
            loop {
                let command = {
                    let mut commands = commands.lock().unwrap();
                    let Some(command) = commands.queue.pop_front() else {
                        commands.running = false;
                        return;
                    };
                    command
                };
                if !s.gone.is_cancelled() {
                    server_command(&peer, &s, &node, command).await;
                }
                pending.fetch_sub(1, Ordering::AcqRel);
            }
        });
        Handed::Taken
    }
}

/// A control API command: `subscribe` (no permission check: the back end
/// decided; acknowledged with a `subscribed` event), `unsubscribe` (an
/// `unsubscribed` event with `reason: "server"`), `disconnect` (a
/// `server_disconnect` event `{code, reason, reconnect}`, then
/// `io server disconnect`).
async fn server_command(
    peer: &Arc<dyn Peer>,
    s: &Session,
    node: &Node,
    command: crate::clients::Command,
) {
    use crate::clients::Command;
    match command {
        Command::Subscribe { topic } => {
            let request = SubscribeRequest {
                topic: topic.to_string(),
                positions: false,
                since: None,
                data: None,
                presence: None,
            };
            let announce = {
                let peer = peer.clone();
                Box::new(move |outcome: &Outcome| {
                    let mut ack = subscribe_ack(&topic, outcome);
                    if let Some(o) = ack.as_object_mut() {
                        o.remove("ok");
                    }
                    peer.emit("subscribed", &ack);
                })
            };
            let name = request.topic.clone();
            if let Err(e) = join(peer, s, node, request, announce).await {
                emit_error(&**peer, Some(&name), &e);
            }
        }
        Command::Unsubscribe { topic } => {
            let was = s.topics.lock().unwrap().remove(&*topic);
            if was {
                node.hub().unsubscribe(&topic, s.id).await;
                node.presence().left(&topic, &s.client_id);
                if let Some(r) = peer.recovery() {
                    r.leave(&topic).await;
                }
                peer.emit(
                    "unsubscribed",
                    &json!({"topic": &*topic, "reason": "server"}),
                );
            }
        }
        Command::Disconnect { code, reason } => {
            peer.emit(
                "server_disconnect",
                &json!({"code": code, "reason": &*reason, "reconnect": code < 4500}),
            );
            s.closing(m::reason::BACKEND);
            peer.disconnect();
        }
        // Only SSE streams are reached by these (`Clients::apply`).
        Command::SseSubscribe { .. } | Command::SseUnsubscribe { .. } => {}
    }
}

/// The token in a CONNECT auth payload `{"token": "…"}`.
pub fn auth_token(auth: Option<&Value>) -> Option<String> {
    auth?.get("token")?.as_str().map(String::from)
}

/// Counts a client message and applies the rate limit; false when the
/// socket is over it (it gets an `error` event and is disconnected).
fn accept(peer: &dyn Peer, s: &Session, kind: &'static str) -> bool {
    metrics::counter!(m::CLIENT_MESSAGES, "transport" => m::transport::SOCKETIO, "type" => kind)
        .increment(1);
    let Some(bucket) = &s.bucket else {
        return true;
    };
    if bucket.lock().unwrap().take() {
        return true;
    }
    crate::limits::refused(
        crate::limits::Limit::MessageRate,
        "a Socket.IO client sent faster than WEBSOCKET_RATE_LIMIT and is disconnected",
    );
    emit_error(
        peer,
        None,
        &Refusal::new("rate_limited", "rate limit exceeded; disconnecting"),
    );
    s.closing(m::reason::POLICY);
    peer.disconnect();
    false
}

/// Right after the CONNECT ack: topic `device` and its four state events;
/// with a compat emitter source on, the broadcast topic (its emits "to
/// everyone" reach every socket, as on a Socket.IO server).
pub async fn connected(peer: &Arc<dyn Peer>, s: &Session, node: &Node) {
    if node.config().compat.broadcasts() && s.may_subscribe(crate::compat::BROADCAST) {
        join_for_server(peer, s, node, crate::compat::BROADCAST).await;
    }
    if !s.may_subscribe(TOPIC) {
        return;
    }
    join_for_server(peer, s, node, TOPIC).await;
    send_state(&**peer, node);
}

/// One of the server's own subscriptions: the identity decides, not the
/// subscribe hook (docs/backend.md); a refusal is answered as an `error`
/// event.
async fn join_for_server(peer: &Arc<dyn Peer>, s: &Session, node: &Node, topic: &str) {
    let request = SubscribeRequest {
        topic: topic.to_string(),
        positions: false,
        since: None,
        data: None,
        presence: None,
    };
    if let Err(e) = join(peer, s, node, request, Box::new(|_| {})).await {
        emit_error(&**peer, None, &e);
    }
}

fn send_state(peer: &dyn Peer, node: &Node) {
    let state = node.device().state();
    for event in EVENTS {
        peer.emit(event, &state.event(event));
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
    /// Passed to the subscribe hook.
    data: Option<Box<RawValue>>,
    /// The client's own subscribe: `presence: true` (object form) for
    /// `presence_diff` events, false for none. `None`: the server's, which
    /// leaves them as they were.
    presence: Option<bool>,
}

async fn join(
    peer: &Arc<dyn Peer>,
    s: &Session,
    node: &Node,
    request: SubscribeRequest,
    announce: Announce,
) -> Result<(), Refusal> {
    let topic = request.topic.as_str();
    let limit = node.config().max_subscriptions;
    let at_limit = {
        let topics = s.topics.lock().unwrap();
        !topics.contains(topic) && topics.len() >= limit
    };
    if at_limit {
        crate::limits::refused(
            crate::limits::Limit::SubscriptionsPerConnection,
            "a socket is at WEBSOCKET_MAX_SUBSCRIPTIONS",
        );
        return Err(Refusal::new(
            "subscription_limit",
            format!("subscription limit of {limit} topics per connection reached"),
        ));
    }
    // With connection state recovery a new subscription (other than the
    // device state, sent again on every connect) first gets its place in
    // the session's record.
    let recorded = match peer.recovery() {
        Some(r) if topic != TOPIC && !s.topics.lock().unwrap().contains(topic) => Some(r),
        _ => None,
    };
    let (subscriber, since, announce) = match recorded {
        Some(r) => {
            let by_identity = matches!(
                s.access(node.hooks(), topic),
                crate::backend::hooks::Access::Allowed
            );
            let presence = request.presence == Some(true);
            r.prepare(
                node,
                topic,
                request.positions,
                request.since,
                announce,
                by_identity,
                presence,
            )
            .await?
        }
        None => (peer.subscriber(request.positions), request.since, announce),
    };
    // The watcher goes in with the join itself: registered after it, a
    // diff ticked in between would carry the socket's own join to the
    // watchers of that moment only.
    let watcher = (request.presence == Some(true)).then(|| watcher(peer));
    let joined = attach(s, node, topic, subscriber, since, announce, watcher).await;
    if let (Err(_), Some(r)) = (&joined, recorded) {
        r.leave(topic).await;
    }
    if let (Ok(()), Some(r), Some(presence)) = (&joined, peer.recovery(), request.presence) {
        r.watch(topic, presence).await;
    }
    if joined.is_ok() && request.presence == Some(false) {
        node.presence().unwatch(topic, &s.client_id);
    }
    if joined.is_ok() && request.presence == Some(true) && !node.presence().covers(topic) {
        emit_error(
            &**peer,
            Some(topic),
            &Refusal::new(
                "no_presence",
                format!(
                    "\"{topic}\" keeps no presence (PRESENCE_TOPICS): subscribed without presence_diff"
                ),
            ),
        );
    }
    joined
}

/// A socket subscribed with `presence: true`.
struct Watcher(Arc<dyn Peer>);

/// The `presence_diff` watcher of the socket `peer`.
pub fn watcher(peer: &Arc<dyn Peer>) -> Arc<dyn crate::presence::Watcher> {
    Arc::new(Watcher(peer.clone()))
}

impl crate::presence::Watcher for Watcher {
    fn diff(&self, diff: &crate::presence::Diff) {
        self.0.emit("presence_diff", &diff.object);
    }
}

/// Subscribes the socket to `topic` on the hub with `subscriber` (from
/// [`Peer`] or its [`Recovery`]) and records it as one of its topics; on a
/// presence topic it joins, with `watcher` for its `presence_diff` events.
pub async fn attach(
    s: &Session,
    node: &Node,
    topic: &str,
    subscriber: Arc<dyn Subscriber>,
    since: Option<Since>,
    announce: Announce,
    watcher: Option<Arc<dyn crate::presence::Watcher>>,
) -> Result<(), Refusal> {
    node.hub()
        .subscribe(topic, s.id, subscriber, since, announce)
        .await
        .map_err(|e| Refusal::subscribe(topic, &e))?;
    let present = node.presence().covers(topic);
    if present {
        let (user, info) = {
            let identity = s.identity.lock().unwrap();
            (identity.user().to_string(), identity.info().cloned())
        };
        node.presence()
            .joined(topic, &s.client_id, &user, info.as_deref(), watcher);
    }
    // A control command's subscribe can finish after the socket left:
    // `disconnected` cancels `gone` before it takes the topics, so checked
    // under the same lock, the subscription is either recorded in time to
    // be ended there or undone here, never left in the hub.
    let kept = {
        let mut topics = s.topics.lock().unwrap();
        let kept = !s.gone.is_cancelled();
        if kept {
            topics.insert(topic.to_string());
        }
        kept
    };
    if !kept {
        node.hub().unsubscribe(topic, s.id).await;
        if present {
            node.presence().left(topic, &s.client_id);
        }
        return Err(Refusal::new(
            "unavailable",
            format!("could not subscribe to \"{topic}\": the socket disconnected"),
        ));
    }
    Ok(())
}

/// `subscribe` takes a topic name, or `{"topic": …, "offset"?: N, "epoch"?: E}`
/// (or the older `{"event": …}`).
fn subscribe_arg(data: &Result<Value, String>) -> Result<SubscribeRequest, Refusal> {
    let topic = topic_arg(data)?;
    let Ok(Value::Object(o)) = data else {
        return Ok(SubscribeRequest {
            topic,
            positions: false,
            since: None,
            data: None,
            presence: Some(false),
        });
    };
    let since = match (o.get("offset"), o.get("epoch")) {
        (None | Some(Value::Null), None | Some(Value::Null)) => None,
        _ => Some(protocol::parse_since(&Value::Object(o.clone())).map_err(Refusal::bad)?),
    };
    let data = match o.get("data") {
        None | Some(Value::Null) => None,
        Some(d) => Some(serde_json::value::to_raw_value(d).map_err(Refusal::bad)?),
    };
    let presence = match o.get("presence") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Refusal::bad("\"presence\" must be true or false")),
    };
    Ok(SubscribeRequest {
        topic,
        positions: o.contains_key("topic"),
        since,
        data,
        presence: Some(presence),
    })
}

/// A topic name, or `{"topic": …}` / `{"event": …}`.
fn topic_arg(data: &Result<Value, String>) -> Result<String, Refusal> {
    let v = data
        .as_ref()
        // No argument, so no topic: the native protocol's missing `event`.
        .map_err(|e| Refusal::new("bad_event", format!("could not read the message: {e}")))?;
    let name = match v {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => o
            .get("topic")
            .or_else(|| o.get("event"))
            .and_then(Value::as_str),
        _ => None,
    }
    .ok_or_else(|| {
        Refusal::new(
            "bad_event",
            "expected a topic name, or {\"topic\": \"name\"}",
        )
    })?;
    if protocol::valid_topic(name) {
        Ok(name.to_string())
    } else {
        Err(Refusal::new(
            "bad_topic",
            format!("invalid topic name \"{name}\": must match {TOPIC_PATTERN}"),
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

/// The client events Switchboard answers; others are ignored (unless they
/// are RPCs), as a Socket.IO server ignores an event without a handler.
pub const CLIENT_EVENTS: [&str; 7] = [
    "subscribe",
    "unsubscribe",
    "request_state",
    "publish",
    "refresh",
    "presence",
    "presence_stats",
];

/// Runs client event `event` with its first argument and acknowledgement
/// (`wants_ack`: the client asked for one), once it is counted and within
/// the rate limit. Events that are not Switchboard's own are RPCs when
/// `PROXY_RPC_URL` is set, and ignored otherwise.
pub async fn handle(
    event: &str,
    peer: &Arc<dyn Peer>,
    s: &Arc<Session>,
    node: &Node,
    data: Result<Value, String>,
    ack: Ack,
    wants_ack: bool,
) {
    let Some(&kind) = CLIENT_EVENTS.iter().find(|&&e| e == event) else {
        if node.hooks().rpc_enabled() && accept(&**peer, s, "rpc") {
            rpc(event, peer, s, node, data, wants_ack.then_some(ack));
        }
        return;
    };
    if !accept(&**peer, s, kind) {
        return;
    }
    match kind {
        "subscribe" => subscribe(peer, s, node, data, ack).await,
        "unsubscribe" => unsubscribe(peer, s, node, data, ack).await,
        "request_state" => request_state(peer, s, node, ack),
        "publish" => publish(peer, s, node, data, ack).await,
        "refresh" => refresh(peer, s, node, data, ack).await,
        "presence" => presence(peer, s, node, data, ack, false).await,
        "presence_stats" => presence(peer, s, node, data, ack, true).await,
        _ => {}
    }
}

/// Who this socket is, for the back end.
fn caller<'a>(s: &'a Session, identity: &'a Identity) -> Caller<'a> {
    Caller {
        client: &s.client_id,
        transport: transport::SOCKETIO,
        user: identity.user(),
        info: identity.info().map(|i| &**i),
    }
}

/// An event that is not Switchboard's own, as an RPC (method = event name,
/// data = its first argument). Run in its own task, bounded by
/// `PROXY_MAX_INFLIGHT` and `PROXY_TIMEOUT_MS`: the socket's other events
/// go on meanwhile. With an acknowledgement the ack carries the back end's
/// `data`; a failure acks `{"ok": false, "code", "error"}` and, with or
/// without an ack, is emitted as an `error` event. Without an ack a result
/// is dropped (the back end saw the event: fire and forget).
fn rpc(
    method: &str,
    peer: &Arc<dyn Peer>,
    s: &Arc<Session>,
    node: &Node,
    data: Result<Value, String>,
    ack: Option<Ack>,
) {
    let fail = |ack: Option<Ack>, code: &str, message: String| {
        if let Some(ack) = ack {
            ack(json!({"ok": false, "code": code, "error": message}));
        }
        peer.emit(
            "error",
            &json!({"message": message, "code": code, "event": method, "topic": null}),
        );
    };
    if !protocol::valid_topic(method) {
        let name: String = method.chars().take(140).collect();
        return fail(
            ack,
            "bad_message",
            format!("invalid rpc method \"{name}\": must match {TOPIC_PATTERN}"),
        );
    }
    let data = data.unwrap_or(Value::Null);
    let raw = match serde_json::value::to_raw_value(&data) {
        Ok(raw) => raw,
        Err(e) => return fail(ack, "bad_message", e.to_string()),
    };
    let slot = match s.rpc_slots.take() {
        Ok(slot) => slot,
        Err(e) => return fail(ack, "unavailable", e.to_string()),
    };
    let identity = s.identity();
    let call = match node.hooks().rpc(caller(s, &identity), method, &raw) {
        Ok(call) => call,
        Err(e) => return fail(ack, "unavailable", e.to_string()),
    };
    let (peer, s) = (peer.clone(), s.clone());
    let method = method.to_string();
    tokio::spawn(async move {
        let answer = call.await;
        drop(slot);
        let (code, message, close) = match answer {
            Ok(result) => {
                if let Some(ack) = ack {
                    ack(serde_json::from_str(result.get()).unwrap_or(Value::Null));
                }
                return;
            }
            Err(HookError::Refused { message, .. }) => ("rpc_failed", message, false),
            Err(HookError::Disconnect { reason, .. }) => ("forbidden", reason, true),
            Err(HookError::Unavailable(why)) => ("unavailable", why, false),
        };
        if let Some(ack) = ack {
            ack(json!({"ok": false, "code": code, "error": message}));
        }
        peer.emit(
            "error",
            &json!({"message": message, "code": code, "event": method, "topic": null}),
        );
        if close {
            s.closing(m::reason::BACKEND);
            peer.disconnect();
        }
    });
}

/// Turns a refusal into the ack `{"ok": false, …}` and an `error` event;
/// the back end's `disconnect` then disconnects the socket.
fn deny(peer: &dyn Peer, s: &Session, ack: Ack, denial: Denial, topic: &str, coded: bool) {
    let disconnect = matches!(denial, Denial::Disconnect { .. });
    if coded {
        reply_coded(peer, ack, denial.into(), Some(topic));
    } else {
        reply(peer, ack, Err(denial.into()), Some(topic));
    }
    if disconnect {
        s.closing(m::reason::BACKEND);
        peer.disconnect();
    }
}

/// `subscribe`: the ack goes out when the hub announces the subscription,
/// before any missed publication is emitted.
async fn subscribe(
    peer: &Arc<dyn Peer>,
    s: &Session,
    node: &Node,
    data: Result<Value, String>,
    ack: Ack,
) {
    let mut request = match subscribe_arg(&data) {
        Ok(r) => r,
        Err(e) => return reply(&**peer, ack, Err(e), named_topic(&data).as_deref()),
    };
    if let Some(bucket) = &s.subscribes
        && !bucket.lock().unwrap().take()
    {
        let (e, code) = crate::limits::subscribe_rate_refusal(node, &request.topic);
        return reply(
            &**peer,
            ack,
            Err(Refusal::new(code, e)),
            Some(&request.topic),
        );
    }
    let identity = s.identity();
    if let Err(denial) = node
        .hooks()
        .authorize_subscribe(
            caller(s, &identity),
            &identity,
            &request.topic,
            request.data.take().as_deref(),
        )
        .await
    {
        return deny(&**peer, s, ack, denial, &request.topic, false);
    }
    let ack = Arc::new(Mutex::new(Some(ack)));
    let topic = request.topic.clone();
    let announce = {
        let ack = ack.clone();
        let topic = topic.clone();
        Box::new(move |outcome: &Outcome| {
            if let Some(ack) = ack.lock().unwrap().take() {
                ack(subscribe_ack(&topic, outcome));
            }
        })
    };
    if let Err(e) = join(peer, s, node, request, announce).await {
        let pending = ack.lock().unwrap().take();
        match pending {
            Some(ack) => reply(&**peer, ack, Err(e), Some(&topic)),
            None => emit_error(&**peer, Some(&topic), &e),
        }
    }
}

/// `unsubscribe`, same argument forms as `subscribe`.
async fn unsubscribe(
    peer: &Arc<dyn Peer>,
    s: &Session,
    node: &Node,
    data: Result<Value, String>,
    ack: Ack,
) {
    if let Some(bucket) = &s.subscribes {
        // Counted, never refused: leaving a topic must always work.
        bucket.lock().unwrap().take();
    }
    let res = match topic_arg(&data) {
        Ok(topic) => {
            let was = s.topics.lock().unwrap().remove(&topic);
            if was {
                node.hub().unsubscribe(&topic, s.id).await;
                node.presence().left(&topic, &s.client_id);
                if let Some(r) = peer.recovery() {
                    r.leave(&topic).await;
                }
            }
            Ok(topic)
        }
        Err(e) => Err(e),
    };
    reply(&**peer, ack, res, named_topic(&data).as_deref());
}

/// `presence` / `presence_stats` (`stats`) with a topic (same argument forms
/// as `subscribe`), allowed like subscribing to it. Ack `{"ok": true,
/// "topic", "clients": {id: {user, info}}}` or `{"ok": true, "topic",
/// "clients": N, "users": M}`; a failure `{"ok": false, "code", "error",
/// "topic"}` and an `error` event.
async fn presence(
    peer: &Arc<dyn Peer>,
    s: &Session,
    node: &Node,
    data: Result<Value, String>,
    ack: Ack,
    stats: bool,
) {
    let topic = match topic_arg(&data) {
        Ok(t) => t,
        Err(e) => return reply_coded(&**peer, ack, e, named_topic(&data).as_deref()),
    };
    let identity = s.identity();
    if let Err(denial) = node
        .hooks()
        .authorize_subscribe(caller(s, &identity), &identity, &topic, None)
        .await
    {
        let denial = match denial {
            Denial::Forbidden(_) if !node.hooks().covers_subscribe(&topic) => {
                Denial::Forbidden(format!("not allowed to read \"{topic}\""))
            }
            other => other,
        };
        return deny(&**peer, s, ack, denial, &topic, true);
    }
    let presence = node.presence();
    let answer = if stats {
        presence
            .stats(&topic)
            .await
            .map(|st| json!({"ok": true, "topic": topic, "clients": st.clients, "users": st.users}))
    } else {
        presence.list(&topic).await.map(|list| {
            let clients: Value = serde_json::from_str(&crate::presence::clients_json(&list))
                .unwrap_or_else(|_| json!({}));
            json!({"ok": true, "topic": topic, "clients": clients})
        })
    };
    match answer {
        Ok(a) => ack(a),
        Err(e) => {
            let refusal = Refusal::new(e.code(), e.to_string());
            reply_coded(&**peer, ack, refusal, Some(&topic));
        }
    }
}

/// `request_state`: the four device events again.
fn request_state(peer: &Arc<dyn Peer>, s: &Session, node: &Node, ack: Ack) {
    if !s.may_subscribe(TOPIC) {
        let e = Refusal::new("forbidden", format!("not allowed to read \"{TOPIC}\""));
        ack(json!({"ok": false, "error": e.message}));
        emit_error(&**peer, Some(TOPIC), &e);
        return;
    }
    send_state(&**peer, node);
    ack(json!({"ok": true}));
}

/// `publish` with `{"topic", "event"?, "data"}`, allowed by a token's
/// `publish` claim, or by the publish hook (which may replace the data).
async fn publish(
    peer: &Arc<dyn Peer>,
    s: &Session,
    node: &Node,
    data: Result<Value, String>,
    ack: Ack,
) {
    let mut denied = None;
    let res = async {
        let topic = topic_arg(&data)?;
        let v = data.as_ref().map_err(Refusal::bad)?;
        if topic == TOPIC {
            return Err(Refusal::new(
                "forbidden",
                "topic \"device\" carries device state: change it with the device commands",
            ));
        }
        if topic == crate::device::frame::TOPIC {
            return Err(Refusal::new(
                "forbidden",
                crate::device::frame::PUBLISH_REFUSAL,
            ));
        }
        let event = match v.get("event") {
            None | Some(Value::Null) => topic.clone(),
            Some(Value::String(e)) if protocol::valid_topic(e) => e.clone(),
            Some(_) => {
                return Err(Refusal::bad(format!(
                    "event must be a name matching {TOPIC_PATTERN}"
                )));
            }
        };
        let payload = v
            .get("data")
            .ok_or_else(|| Refusal::bad("publish needs a \"data\" field"))?;
        let raw = serde_json::value::to_raw_value(payload).map_err(Refusal::bad)?;
        if protocol::json_depth_exceeds(raw.get(), protocol::MAX_DATA_DEPTH) {
            return Err(Refusal::bad(protocol::TOO_DEEP));
        }
        let identity = s.identity();
        let raw = match node
            .hooks()
            .authorize_publish(caller(s, &identity), &identity, &topic, &event, &raw)
            .await
        {
            Ok(Some(replaced)) => replaced,
            Ok(None) => raw,
            Err(denial) => {
                let why = Refusal::from(&denial);
                denied = Some(denial);
                return Err(why);
            }
        };
        node.hub()
            .publish(&topic, &event, &raw)
            .await
            .map_err(|e| Refusal::new(e.code(), format!("publication not accepted: {e}")))?;
        let user = s.identity.lock().unwrap().user().to_string();
        node.client_published(&topic, &event, &raw, &s.client_id, &user);
        Ok(topic)
    }
    .await;
    reply(&**peer, ack, res, named_topic(&data).as_deref());
    if let Some(Denial::Disconnect { .. }) = denied {
        s.closing(m::reason::BACKEND);
        peer.disconnect();
    }
}

/// Acks `{"ok": true, "topic"}`, or `{"ok": false, "error", "topic"}` and
/// the `error` event (with its `code`). The failure ack keeps the shape
/// that clients written for it compare with; `presence` acks, documented
/// with their `code`, go through [`reply_coded`].
fn reply(peer: &dyn Peer, ack: Ack, res: Result<String, Refusal>, topic: Option<&str>) {
    match res {
        Ok(topic) => ack(json!({"ok": true, "topic": topic})),
        Err(e) => {
            ack(json!({"ok": false, "error": e.message, "topic": topic}));
            emit_error(peer, topic, &e);
        }
    }
}

/// A failure acked `{"ok": false, "code", "error", "topic"}`, and the
/// `error` event.
fn reply_coded(peer: &dyn Peer, ack: Ack, e: Refusal, topic: Option<&str>) {
    ack(json!({"ok": false, "code": e.code, "error": e.message, "topic": topic}));
    emit_error(peer, topic, &e);
}

/// The topic named in a message, when it can be read, for error reports.
fn named_topic(data: &Result<Value, String>) -> Option<String> {
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

/// The `error` event: `{"message", "code", "topic"}`.
pub fn emit_error(peer: &dyn Peer, topic: Option<&str>, e: &Refusal) {
    peer.emit(
        "error",
        &json!({"message": e.message, "code": e.code, "topic": topic}),
    );
}

/// Why a socket's request failed: the `code` (the native protocol's
/// codes, so that a client tells a refusal from a limit from an outage
/// without reading the text) and the text of its ack and `error` event.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// A message that could not be read as the event's argument.
    pub fn bad(message: impl std::fmt::Display) -> Refusal {
        Refusal::new("bad_message", message.to_string())
    }

    /// The hub could not subscribe the socket to `topic`.
    pub fn subscribe(topic: &str, e: &crate::hub::HubError) -> Refusal {
        Refusal::new(e.code(), format!("could not subscribe to \"{topic}\": {e}"))
    }
}

impl From<&Denial> for Refusal {
    fn from(denial: &Denial) -> Refusal {
        Refusal::new(denial.code(), denial.to_string())
    }
}

impl From<Denial> for Refusal {
    fn from(denial: Denial) -> Refusal {
        Refusal::from(&denial)
    }
}

/// `refresh` with the new token (a string or `{"token": …}`): the same
/// rules as the native `refresh`. Ack `{"ok": true, "expiresAt": ms|null}`
/// or `{"ok": false, "error": …}` (plus an `error` event, code `bad_token`).
async fn refresh(
    peer: &Arc<dyn Peer>,
    s: &Session,
    node: &Node,
    data: Result<Value, String>,
    ack: Ack,
) {
    let token = match &data {
        Ok(Value::String(t)) => Some(t.as_str()),
        Ok(Value::Object(o)) => o.get("token").and_then(Value::as_str),
        _ => None,
    }
    .filter(|t| !t.is_empty());
    let identity = match token {
        None => Err("refresh needs the new token, as a string or {\"token\": \"…\"}".to_string()),
        Some(t) => node
            .config()
            .auth
            .refresh(&s.identity(), t)
            .map_err(|e| format!("refresh refused, the current token still applies: {e}")),
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err(e) => {
            let e = Refusal::new("bad_token", e);
            ack(json!({"ok": false, "error": e.message}));
            emit_error(&**peer, None, &e);
            return;
        }
    };
    let expires_at = identity.expires_at();
    let old = s.identity();
    let lost: Vec<String> = s
        .topics
        .lock()
        .unwrap()
        .iter()
        .filter(|t| node.hooks().revoked(&old, &identity, t))
        .cloned()
        .collect();
    *s.identity.lock().unwrap() = identity;
    s.refreshed.notify_one();
    for topic in lost {
        let was = s.topics.lock().unwrap().remove(&topic);
        if was {
            node.hub().unsubscribe(&topic, s.id).await;
            node.presence().left(&topic, &s.client_id);
            if let Some(r) = peer.recovery() {
                r.leave(&topic).await;
            }
            peer.emit(
                "unsubscribed",
                &json!({"topic": topic, "reason": "permission revoked"}),
            );
        }
    }
    ack(json!({"ok": true, "expiresAt": expires_at}));
}

/// Disconnects the socket when its token expires (`exp` + leeway) unless a
/// `refresh` moved the deadline: an `error` event with code
/// `token_expired` first, then the disconnect (`io server disconnect`).
pub async fn expire_when_due(peer: Arc<dyn Peer>, s: Arc<Session>) {
    loop {
        let left = s.identity.lock().unwrap().time_left();
        let due = async {
            match left {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = due => {
                let left = s.identity.lock().unwrap().time_left();
                if left.is_some_and(|l| l.is_zero()) {
                    break;
                }
            }
            _ = s.refreshed.notified() => {}
            _ = s.gone.cancelled() => return,
        }
    }
    peer.emit(
        "error",
        &json!({
            "message": "the token has expired: send a refresh before it expires, or connect again with a new token",
            "code": "token_expired",
            "topic": null,
        }),
    );
    s.closing(m::reason::TOKEN_EXPIRED);
    peer.disconnect();
}

/// The socket is gone: leave its topics, count it with `reason`.
pub async fn disconnected(s: &Session, node: &Node, reason: &'static str) {
    s.gone.cancel();
    drop(s.seat.lock().unwrap().take());
    let registration = s.registration.lock().unwrap().take();
    if let Some(r) = registration {
        r.end(reason);
    }
    let topics: Vec<String> = s.topics.lock().unwrap().drain().collect();
    for topic in topics {
        node.hub().unsubscribe(&topic, s.id).await;
        node.presence().left(&topic, &s.client_id);
    }
    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::SOCKETIO).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "transport" => m::transport::SOCKETIO, "reason" => reason)
        .increment(1);
    node.connection_closed();
}
