//! Native WebSocket sessions at `WEBSOCKET_PATH` and `WEBSOCKET_PATH/{topic}`.
//!
//! One connection is two tasks: the reader loop (the task axum spawned for the
//! upgrade) and a writer task that owns the sink. Everything the connection
//! sends goes through one bounded queue, bounded in messages and in bytes;
//! when it is full the connection is closed with 1013 (the slow-consumer
//! policy, see `docs/protocol.md`) and the fan-out moves on without waiting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, StreamExt};
use serde_json::value::RawValue;

use crate::api::ApiError;
use crate::auth::Identity;
use crate::backend::hooks::transport;
use crate::backend::{Caller, Denial, HookError};
use crate::gateway::admission::{self, Seats};
use crate::gateway::outbox::{
    self, Frame, Heartbeat, Liveness, Outbox, ReadyFrames, WRITE_TIMEOUT, Writer, next_frame,
};
use crate::history::GapRange;
use crate::hub::{ConnId, Delivery, Outcome, Publication, Subscribed, Subscriber};
use crate::limits::{Arrival, TokenBucket};
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{self, ClientMessage, ProtocolError, ServerMessage, Since};

pub use super::outbox::close;

/// `GET WEBSOCKET_PATH`
pub async fn upgrade(
    State(node): State<Node>,
    headers: axum::http::HeaderMap,
    RawQuery(query): RawQuery,
    extensions: axum::http::Extensions,
    ws: WebSocketUpgrade,
) -> Response {
    let compact = match compact_requested(query.as_deref()) {
        Ok(compact) => compact,
        Err(refusal) => return refusal.into_response(),
    };
    let id = crate::hub::new_conn_id();
    let remote = admission::remote_addr(&extensions);
    match admit_native(&node, &headers, query.as_deref(), id, remote).await {
        Ok((identity, seats)) => accept(node, ws, id, (identity, seats), None, compact),
        Err(refusal) => refusal.into_response(),
    }
}

/// The `format` query parameter: `json` (the default event frame) or
/// `compact` (`[topic_id,data,offset?,name?]`, docs/protocol.md).
fn compact_requested(query: Option<&str>) -> Result<bool, ApiError> {
    let format = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("format="));
    match format {
        None | Some("json") => Ok(false),
        Some("compact") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "format={} is not valid: json (the default) or compact",
            other.chars().take(40).collect::<String>()
        ))),
    }
}

/// `GET WEBSOCKET_PATH/{topic}`: subscribes to `topic` right after
/// `connected`. `WEBSOCKET_PATH/proxy/{name}` is the proxy, so a topic whose
/// name starts with `proxy/` can only be subscribed with a message.
pub async fn upgrade_topic(
    State(node): State<Node>,
    crate::api::PathText(topic): crate::api::PathText,
    headers: axum::http::HeaderMap,
    RawQuery(query): RawQuery,
    extensions: axum::http::Extensions,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Some(name) = topic.strip_prefix("proxy/") {
        let remote = admission::remote_addr(&extensions);
        return crate::proxy::upgrade(node, name, &headers, query.as_deref(), remote, ws).await;
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    if !protocol::valid_topic(&topic) {
        return ApiError::BadRequest(
            ProtocolError::InvalidTopic(topic.chars().take(140).collect()).to_string(),
        )
        .into_response();
    }
    let compact = match compact_requested(query.as_deref()) {
        Ok(compact) => compact,
        Err(refusal) => return refusal.into_response(),
    };
    let id = crate::hub::new_conn_id();
    let remote = admission::remote_addr(&extensions);
    let (identity, seats) = match admit_native(&node, &headers, query.as_deref(), id, remote).await
    {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let client = format!("{id:016x}");
    let caller = caller(&client, &identity);
    if let Err(denial) = node
        .hooks()
        .authorize_subscribe(caller, &identity, &topic, None)
        .await
    {
        return ApiError::from(denial).into_response();
    }
    accept(node, ws, id, (identity, seats), Some(topic), compact)
}

/// Admission of a native client: the drain and connection limit, the
/// per-address limit, then its token or the connect hook (with `?data=`)
/// and the per-user limit, all before the upgrade.
async fn admit_native(
    node: &Node,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
    id: ConnId,
    remote: Option<SocketAddr>,
) -> Result<(Identity, Seats), ApiError> {
    let mut seats = Seats::admit(node, remote, headers)?;
    let client = format!("{id:016x}");
    let origin = admission::Origin {
        client: &client,
        transport: transport::WEBSOCKET,
        remote,
        route: None,
    };
    let identity = admission::identify_request(node, headers, query, origin).await?;
    seats.user(node, &identity)?;
    Ok((identity, seats))
}

/// Who a native connection is, for the back end.
fn caller<'a>(client: &'a str, identity: &'a Identity) -> Caller<'a> {
    Caller {
        client,
        transport: transport::WEBSOCKET,
        user: identity.user(),
        info: identity.info().map(|i| &**i),
    }
}

/// Upgrades an admitted client; its seats are held until the session ends.
fn accept(
    node: Node,
    ws: WebSocketUpgrade,
    id: ConnId,
    (identity, seats): (Identity, Seats),
    topic: Option<String>,
    compact: bool,
) -> Response {
    let n = node.clone();
    outbox::upgrade(&n, ws, move |socket| {
        // Split here and chained with `map`, not awaited in an `async`
        // block: a future held by a block (or an `async fn`'s argument)
        // keeps its room next to the one being polled, and every
        // connection's task pays for it.
        let (sink, stream) = socket.split();
        run(node, sink, stream, id, identity, topic, compact).map(move |()| drop(seats))
    })
}

impl Outbox {
    fn send(&self, msg: &ServerMessage<'_>) {
        self.push(msg.to_json().into());
    }

    fn error(&self, err: &ProtocolError, event: Option<&str>) {
        self.error_text(err.to_string(), err.code(), event);
    }

    fn error_text(&self, error: String, code: &str, event: Option<&str>) {
        self.error_reply(None, error, code, event);
    }

    /// An `error` answering a client message of type `reply_to` (its
    /// `replyTo` field).
    fn error_reply(&self, reply_to: Option<&str>, error: String, code: &str, event: Option<&str>) {
        self.send(&ServerMessage::Error {
            error,
            code,
            event,
            reply_to,
            timestamp: protocol::timestamp(),
        });
    }
}

impl Subscriber for Outbox {
    fn deliver(&self, publication: &Publication) -> Delivery {
        self.push(publication.native_frame().clone())
    }

    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery {
        self.push(
            ServerMessage::Gap {
                event: topic,
                from: gap.from,
                to: gap.to,
                epoch: &gap.epoch,
                previous_epoch: gap.previous_epoch.as_deref(),
                timestamp: protocol::timestamp(),
            }
            .to_json()
            .into(),
        )
    }

    fn transport(&self) -> &'static str {
        m::transport::WS
    }
}

/// A connection that asked for `?format=compact`: its events are compact
/// frames, which name the topic by its number on this node.
struct Compact(Arc<Outbox>);

impl Subscriber for Compact {
    fn deliver(&self, publication: &Publication) -> Delivery {
        // The hub always says which number the topic has; without it only
        // the default frame can name the topic.
        self.0.deliver(publication)
    }

    fn deliver_numbered(&self, publication: &Publication, topic_id: u32) -> Delivery {
        self.0.push(publication.compact_frame(topic_id))
    }

    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery {
        self.0.gap(topic, gap)
    }

    fn transport(&self) -> &'static str {
        m::transport::WS
    }
}

// === session ===

async fn run(
    node: Node,
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    id: ConnId,
    identity: Identity,
    initial_topic: Option<String>,
    compact: bool,
) {
    let config = node.config().clone();
    let client_id = format!("{id:016x}");
    let outbox = Arc::new(Outbox::new(&config, m::transport::WS));

    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::WS).increment(1.0);
    metrics::counter!(m::CONNECTIONS_OPENED, "transport" => m::transport::WS).increment(1);
    node.connection_opened();

    // Registered before `connected` is queued: the writer runs on the main
    // runtime and the client may call the control API (`POST
    // /api/subscribe`) with its id before this task goes on.
    let mailbox = Arc::new(crate::clients::Mailbox::default());
    let registration = node.clients().register(
        crate::clients::ClientInfo {
            id: client_id.as_str().into(),
            user: identity.user().into(),
            info: identity.info().cloned(),
            transport: crate::clients::transport::WEBSOCKET,
            sse_key: None,
        },
        mailbox.clone(),
    );
    outbox.send(&ServerMessage::Connected {
        client_id: &client_id,
        timestamp: protocol::timestamp(),
        message: "Connected to Switchboard",
    });

    let heartbeat = Heartbeat::Ping {
        interval: config.heartbeat_interval,
    };
    let (mut writer, liveness) = Writer::spawn(sink, &outbox, &node, id, heartbeat);

    let subscriber: Arc<dyn Subscriber> = match compact {
        true => Arc::new(Compact(outbox.clone())),
        false => outbox.clone(),
    };
    let mut session = Session {
        node: node.clone(),
        id,
        client_id,
        outbox: outbox.clone(),
        subscriber,
        compact,
        topics: HashSet::new(),
        identity,
        bucket: config.rate_limit.map(TokenBucket::new),
        subscribes: config.subscribe_rate_limit.map(TokenBucket::new),
        refreshed: false,
        rpc_slots: Default::default(),
    };
    if let Some(topic) = initial_topic {
        // Allowed before the upgrade (the subscribe hook included).
        Box::pin(session.join(topic, None, Some(false))).await;
    }
    read_loop(&mut session, stream, &mut writer, &liveness, &mailbox).await;
    // Nothing reads commands any more: the control API must not count
    // this connection as reached.
    mailbox.close();
    // The teardown runs once; boxed so that its timers and unsubscribe
    // futures take no room in every idle connection's task.
    Box::pin(async move {
        // The reader is done: let the writer send its close frame and finish.
        // The socket is dropped with the writer's half; `Lingering` then
        // half-closes it and drains what the client still sends, so the close
        // frame is not lost to a TCP reset.
        outbox.close.request(close::NORMAL);
        if !writer.is_finished() {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, &mut writer).await;
            writer.abort();
        }
        for topic in session.topics.drain() {
            node.hub().unsubscribe(&topic, id).await;
            node.presence().left(&topic, &session.client_id);
        }
        let reason = match outbox.close.code() {
            close::TRY_AGAIN_LATER => m::reason::SLOW_CONSUMER,
            close::TOO_BIG => m::reason::TOO_BIG,
            close::GOING_AWAY | close::RESTART => m::reason::SHUTDOWN,
            close::POLICY => m::reason::POLICY,
            close::HEARTBEAT_TIMEOUT => m::reason::HEARTBEAT,
            close::TOKEN_EXPIRED => m::reason::TOKEN_EXPIRED,
            4000..=4999 => m::reason::BACKEND,
            _ => m::reason::CLIENT,
        };
        registration.end(reason);
        metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::WS).decrement(1.0);
        metrics::counter!(m::CONNECTIONS_CLOSED, "transport" => m::transport::WS, "reason" => reason)
            .increment(1);
        node.connection_closed();
    })
    .await;
}

async fn read_loop(
    session: &mut Session,
    mut stream: SplitStream<WebSocket>,
    writer: &mut tokio::task::JoinHandle<()>,
    liveness: &Liveness,
    commands: &crate::clients::Mailbox,
) {
    // Armed while the token has an `exp`; a `refresh` moves it. Boxed, and
    // only then: an idle connection's task stays small.
    let armed = |s: &Session| {
        s.identity
            .time_left()
            .map(|left| Box::pin(tokio::time::sleep(left)))
    };
    let mut expiry = armed(session);
    loop {
        let expired = async {
            match expiry.as_mut() {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            msg = next_frame(&mut stream) => msg,
            // The writer closed the connection (slow consumer, shutdown, heartbeat).
            _ = &mut *writer => return,
            _ = expired => {
                session.expire();
                return;
            }
            // The back end (control API) acts on this connection.
            command = commands.recv() => {
                // Counted as a wait for the client: the reader was idle
                // until now, unless a frame came at the same moment, and
                // then this errs toward the burst's cap.
                session.pace(Arrival::idle());
                if Box::pin(session.command(command)).await {
                    return;
                }
                continue;
            }
        };
        // The answers to this frame and to those that arrived with it go
        // out in one write (`hold_wakes`).
        let outbox = session.outbox.clone();
        let hold = outbox.hold_wakes();
        let mut frames = ReadyFrames::after(msg);
        let mut go = true;
        while go && let Some((msg, arrival)) = frames.next(&mut stream) {
            session.pace(arrival);
            go = hold.run(on_frame(session, msg, liveness)).await;
        }
        drop(hold);
        if !go {
            return;
        }
        if session.refreshed {
            session.refreshed = false;
            expiry = armed(session);
        }
    }
}

/// Acts on one frame from the client; false when the session ends.
async fn on_frame(session: &mut Session, msg: Frame, liveness: &Liveness) -> bool {
    liveness.heard();
    match msg {
        Some(Ok(Message::Text(text))) => {
            if !session.within_rate() {
                return false;
            }
            // Boxed: what a message may await (subscribe, request,
            // publish) would otherwise be part of every idle
            // connection's task.
            let kind = Box::pin(session.handle_text(text.as_str())).await;
            if kind == "refresh" {
                session.refreshed = true;
            }
            metrics::counter!(m::CLIENT_MESSAGES, "transport" => m::transport::WS, "type" => kind)
                .increment(1);
        }
        Some(Ok(Message::Binary(_))) => {
            if !session.within_rate() {
                return false;
            }
            metrics::counter!(m::CLIENT_MESSAGES, "transport" => m::transport::WS, "type" => "invalid")
                .increment(1);
            session.outbox.error(&ProtocolError::Binary, None);
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
        Some(Ok(Message::Close(_))) => {
            session.outbox.close.request(close::BY_CLIENT);
            return false;
        }
        None => return false,
        Some(Err(err)) => {
            if is_too_big(err) {
                session.outbox.close.request(close::TOO_BIG);
            }
            return false;
        }
    }
    true
}

fn is_too_big(err: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    err.into_inner()
        .downcast_ref::<WsError>()
        .is_some_and(|e| matches!(e, WsError::Capacity(_)))
}

struct Session {
    node: Node,
    id: ConnId,
    /// The outward id (`connected.clientId`, the hooks' `client`).
    client_id: String,
    outbox: Arc<Outbox>,
    /// What the hub hands this connection's events to: the outbox, or its
    /// compact form.
    subscriber: Arc<dyn Subscriber>,
    compact: bool,
    /// Topics this connection is subscribed to; owned by the reader.
    topics: HashSet<String>,
    identity: Identity,
    bucket: Option<TokenBucket>,
    /// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT`: the client's subscribes and
    /// unsubscribes (the back end's and the path's topic are not counted).
    subscribes: Option<TokenBucket>,
    /// A `refresh` moved the token's expiry since the reader last armed it.
    refreshed: bool,
    rpc_slots: crate::backend::hooks::RpcSlots,
}

impl Session {
    /// The token expired without a refresh: an `error`, then close 3000.
    fn expire(&self) {
        self.outbox.error_text(
            "the token has expired: send a refresh before it expires, or connect again with a new token".into(),
            "token_expired",
            None,
        );
        self.outbox.close.request(close::TOKEN_EXPIRED);
    }

    /// `refresh`: a valid token replaces the connection's permissions and
    /// expiry; topics it no longer allows are unsubscribed. An invalid one
    /// changes nothing.
    async fn refresh(&mut self, token: &str) {
        let identity = match self.node.config().auth.refresh(&self.identity, token) {
            Ok(identity) => identity,
            Err(e) => {
                self.outbox.error_reply(
                    Some("refresh"),
                    format!("refresh refused, the current token still applies: {e}"),
                    "bad_token",
                    None,
                );
                return;
            }
        };
        let lost: Vec<String> = self
            .topics
            .iter()
            .filter(|t| self.node.hooks().revoked(&self.identity, &identity, t))
            .cloned()
            .collect();
        self.identity = identity;
        for topic in lost {
            self.topics.remove(&topic);
            self.node.hub().unsubscribe(&topic, self.id).await;
            self.node.presence().left(&topic, &self.client_id);
            self.outbox.send(&ServerMessage::Unsubscribed {
                event: &topic,
                reason: Some("permission revoked"),
                timestamp: protocol::timestamp(),
            });
        }
        self.outbox.send(&ServerMessage::Refreshed {
            expires_at: self.identity.expires_at(),
            timestamp: protocol::timestamp(),
        });
    }

    /// Tells the rate buckets how the frame about to be read reached the
    /// reader.
    fn pace(&mut self, arrival: Arrival) {
        for bucket in [&mut self.bucket, &mut self.subscribes]
            .into_iter()
            .flatten()
        {
            bucket.pace(arrival);
        }
    }

    /// Applies the rate limit: past it, an `error` and close 1008.
    fn within_rate(&mut self) -> bool {
        let Some(bucket) = &mut self.bucket else {
            return true;
        };
        if bucket.take() {
            return true;
        }
        let limit = bucket.limit().per_second;
        crate::limits::refused(
            crate::limits::Limit::MessageRate,
            "a websocket client sent faster than WEBSOCKET_RATE_LIMIT and is closed (1008)",
        );
        self.outbox.error_text(
            format!("rate limit of {limit} messages per second exceeded; closing"),
            "rate_limited",
            None,
        );
        self.outbox.close.request(close::POLICY);
        false
    }

    /// Handles one text frame; returns the message type for metrics.
    async fn handle_text(&mut self, text: &str) -> &'static str {
        match protocol::parse_client_message(text) {
            Ok(ClientMessage::Subscribe {
                event,
                since,
                data,
                presence,
            }) => {
                if let Some(bucket) = &mut self.subscribes
                    && !bucket.take()
                {
                    let (e, code) = crate::limits::subscribe_rate_refusal(&self.node, &event);
                    self.outbox
                        .error_reply(Some("subscribe"), e, code, Some(&event));
                    return "subscribe";
                }
                self.subscribe(event, since, data, presence).await;
                "subscribe"
            }
            Ok(ClientMessage::Unsubscribe { event }) => {
                if let Some(bucket) = &mut self.subscribes {
                    // Counted, never refused: leaving a topic must always work.
                    bucket.take();
                }
                if self.topics.remove(&event) {
                    self.node.hub().unsubscribe(&event, self.id).await;
                    self.node.presence().left(&event, &self.client_id);
                }
                self.outbox.send(&ServerMessage::Unsubscribed {
                    event: &event,
                    reason: None,
                    timestamp: protocol::timestamp(),
                });
                "unsubscribe"
            }
            Ok(ClientMessage::Request { event }) => {
                // Reading a topic is decided like subscribing to it.
                match self
                    .node
                    .hooks()
                    .authorize_subscribe(self.caller(), &self.identity, &event, None)
                    .await
                {
                    Ok(()) => self.request(&event).await,
                    Err(Denial::Forbidden(_)) if !self.node.hooks().covers_subscribe(&event) => {
                        self.outbox.error_reply(
                            Some("request"),
                            format!("not allowed to read \"{event}\""),
                            "forbidden",
                            Some(&event),
                        );
                    }
                    Err(denial) => self.deny("request", denial, Some(&event)),
                }
                "request"
            }
            Ok(ClientMessage::Presence { event }) => {
                self.presence(&event, false).await;
                "presence"
            }
            Ok(ClientMessage::PresenceStats { event }) => {
                self.presence(&event, true).await;
                "presence_stats"
            }
            Ok(ClientMessage::Refresh { token }) => {
                self.refresh(&token).await;
                "refresh"
            }
            Ok(ClientMessage::Ping { id }) => {
                self.outbox.send(&ServerMessage::Pong {
                    id: id.as_deref(),
                    timestamp: protocol::timestamp(),
                });
                "ping"
            }
            Ok(ClientMessage::Publish { event, name, data }) => {
                self.publish(event, name, data).await;
                "publish"
            }
            Ok(ClientMessage::Rpc { id, method, data }) => {
                self.rpc(id, method, data);
                "rpc"
            }
            Err(ProtocolError::BadRpc { id, why }) => {
                let id = RawValue::from_string(id).expect("the id was read as JSON");
                rpc_error(&self.outbox, &id, "bad_message", why, None);
                "invalid"
            }
            Err(err) => {
                self.outbox
                    .error_reply(err.reply_to(), err.to_string(), err.code(), None);
                "invalid"
            }
        }
    }

    /// A command of the control API; true when the connection must close.
    async fn command(&mut self, command: crate::clients::Command) -> bool {
        use crate::clients::Command;
        match command {
            // Server-side: the back end decided, no permission check.
            Command::Subscribe { topic } => self.join(topic.to_string(), None, None).await,
            Command::Unsubscribe { topic } => {
                if self.topics.remove(&*topic) {
                    self.node.hub().unsubscribe(&topic, self.id).await;
                    self.node.presence().left(&topic, &self.client_id);
                    self.outbox.send(&ServerMessage::Unsubscribed {
                        event: &topic,
                        reason: Some("server"),
                        timestamp: protocol::timestamp(),
                    });
                }
            }
            Command::Disconnect { code, reason } => {
                self.outbox.close.request_with_reason(code, &reason);
                return true;
            }
            // Only SSE streams are reached by these (`Clients::apply`).
            Command::SseSubscribe { .. } | Command::SseUnsubscribe { .. } => {}
        }
        false
    }

    /// Who this connection is, for the back end.
    fn caller(&self) -> Caller<'_> {
        caller(&self.client_id, &self.identity)
    }

    /// Tells the client why its message of type `reply_to` was not
    /// allowed; the back end's `disconnect` also closes the connection with
    /// its code.
    fn deny(&self, reply_to: &str, denial: Denial, topic: Option<&str>) {
        let code = denial.code();
        let (why, close) = match denial {
            Denial::Forbidden(why) | Denial::Unavailable(why) => (why, None),
            // The back end's reason goes in the Close frame too, as for
            // `POST /api/disconnect`.
            Denial::Disconnect { code, reason } => (reason.clone(), Some((code, reason))),
        };
        self.outbox.error_reply(Some(reply_to), why, code, topic);
        if let Some((code, reason)) = close {
            self.outbox.close.request_with_reason(code, &reason);
        }
    }

    /// `publish`: allowed by the identity or by the publish hook, which may
    /// replace the data. Awaited in the reader, so a client's publications
    /// keep their order.
    async fn publish(&mut self, event: String, name: Option<String>, data: Box<RawValue>) {
        if event == crate::device::state::TOPIC {
            self.outbox.error_reply(
                Some("publish"),
                "topic \"device\" carries device state: change it with the device commands".into(),
                "forbidden",
                Some(&event),
            );
            return;
        }
        if event == crate::device::frame::TOPIC {
            let why = crate::device::frame::PUBLISH_REFUSAL.into();
            self.outbox
                .error_reply(Some("publish"), why, "forbidden", Some(&event));
            return;
        }
        let name = name.as_deref().unwrap_or(&event);
        let data = match self
            .node
            .hooks()
            .authorize_publish(self.caller(), &self.identity, &event, name, &data)
            .await
        {
            Ok(Some(replaced)) => replaced,
            Ok(None) => data,
            Err(denial) => return self.deny("publish", denial, Some(&event)),
        };
        match self.node.hub().publish(&event, name, &data).await {
            Ok(_) => self.node.client_published(
                &event,
                name,
                &data,
                &self.client_id,
                self.identity.user(),
            ),
            Err(e) => {
                self.outbox.error_reply(
                    Some("publish"),
                    format!("publication not accepted: {e}"),
                    e.code(),
                    Some(&event),
                );
            }
        }
    }

    /// `rpc`: the call runs in its own task (bounded by `PROXY_MAX_INFLIGHT`,
    /// `RPC_PER_CONNECTION` and `PROXY_TIMEOUT_MS`), so the client's other
    /// messages, its other RPCs included, are not held behind it; the
    /// answer carries its `id`.
    fn rpc(&self, id: Box<RawValue>, method: String, data: Box<RawValue>) {
        let hooks = self.node.hooks();
        if !hooks.rpc_enabled() {
            return rpc_error(
                &self.outbox,
                &id,
                "forbidden",
                "rpc is not enabled on this node (PROXY_RPC_URL is not set)".into(),
                None,
            );
        }
        let slot = match self.rpc_slots.take() {
            Ok(slot) => slot,
            Err(e) => return rpc_failed(&self.outbox, &id, e),
        };
        let call = match hooks.rpc(self.caller(), &method, &data) {
            Ok(call) => call,
            Err(e) => return rpc_failed(&self.outbox, &id, e),
        };
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let answer = call.await;
            drop(slot);
            match answer {
                Ok(data) => outbox.send(&ServerMessage::RpcResult {
                    id: &id,
                    data: &data,
                    timestamp: protocol::timestamp(),
                }),
                Err(e) => rpc_failed(&outbox, &id, e),
            }
        });
    }

    /// `subscribe`: allowed by the identity or by the subscribe hook (with
    /// the client's `data`), awaited in the reader so that a client's
    /// subscriptions keep their order.
    async fn subscribe(
        &mut self,
        topic: String,
        since: Option<Since>,
        data: Option<Box<RawValue>>,
        presence: bool,
    ) {
        if let Err(denial) = self
            .node
            .hooks()
            .authorize_subscribe(self.caller(), &self.identity, &topic, data.as_deref())
            .await
        {
            return self.deny("subscribe", denial, Some(&topic));
        }
        self.join(topic, since, Some(presence)).await;
    }

    /// Subscribes an allowed topic: the subscription limit, then the hub,
    /// then presence (`watch`: the client's own subscribe, with
    /// `presence_diff` frames or without; `None`, the server's, which
    /// leaves them as they were).
    async fn join(&mut self, topic: String, since: Option<Since>, watch: Option<bool>) {
        let limit = self.node.config().max_subscriptions;
        if !self.topics.contains(&topic) && self.topics.len() >= limit {
            crate::limits::refused(
                crate::limits::Limit::SubscriptionsPerConnection,
                "a connection is at WEBSOCKET_MAX_SUBSCRIPTIONS",
            );
            self.outbox.error_reply(
                Some("subscribe"),
                format!("subscription limit of {limit} topics per connection reached"),
                "subscription_limit",
                Some(&topic),
            );
            return;
        }
        // Topic `device` is state, not a log: a client that comes back gets
        // the current state instead of a replay, and is told it recovered.
        let device = topic == crate::device::state::TOPIC;
        let (since, state_recovery) = match since {
            Some(_) if device => (None, true),
            other => (other, false),
        };
        let sub = self.subscriber.clone();
        let compact = self.compact;
        let outbox = self.outbox.clone();
        let node = self.node.clone();
        let name = topic.clone();
        let announce = Box::new(move |outcome: &Outcome| {
            let position = outcome.position.as_ref();
            outbox.send(&ServerMessage::Subscribed {
                event: &name,
                offset: position.map(|p| p.offset),
                epoch: position.map(|p| &*p.epoch),
                recovered: if state_recovery {
                    Some(true)
                } else {
                    outcome.recovered
                },
                id: compact.then_some(outcome.topic_id),
                timestamp: protocol::timestamp(),
            });
            if state_recovery {
                let state = node.device().state();
                for event in crate::device::state::EVENTS {
                    let data = RawValue::from_string(state.event(event).to_string())
                        .expect("device events are JSON");
                    let frame = match compact {
                        true => protocol::compact_event_frame(
                            outcome.topic_id,
                            &name,
                            event,
                            &data,
                            None,
                        ),
                        false => {
                            protocol::event_frame(&name, event, &data, None, &protocol::timestamp())
                        }
                    };
                    outbox.push(frame.into());
                }
            }
        });
        match self
            .node
            .hub()
            .subscribe(&topic, self.id, sub, since, announce)
            .await
        {
            Ok(Subscribed::New | Subscribed::Already) => {
                let presence = self.node.presence();
                if watch == Some(true) && !presence.covers(&topic) {
                    // No `replyTo`: the subscription itself succeeded.
                    self.outbox.error_reply(
                        None,
                        format!("\"{topic}\" keeps no presence (PRESENCE_TOPICS): subscribed without presence_diff"),
                        "no_presence",
                        Some(&topic),
                    );
                }
                let watcher: Option<Arc<dyn crate::presence::Watcher>> =
                    (watch == Some(true)).then(|| Arc::new(Watcher(self.outbox.clone())) as _);
                if watch == Some(false) {
                    presence.unwatch(&topic, &self.client_id);
                }
                presence.joined(
                    &topic,
                    &self.client_id,
                    self.identity.user(),
                    self.identity.info().map(|i| &**i),
                    watcher,
                );
                self.topics.insert(topic);
            }
            Err(err) => {
                let (error, code) = super::subscribe_refused(&topic, &err);
                self.outbox
                    .error_reply(Some("subscribe"), error, code, Some(&topic));
            }
        }
    }

    /// Answers `presence` (`stats`: `presence_stats`), allowed like
    /// subscribing to the topic.
    async fn presence(&mut self, event: &str, stats: bool) {
        let kind = if stats { "presence_stats" } else { "presence" };
        match self
            .node
            .hooks()
            .authorize_subscribe(self.caller(), &self.identity, event, None)
            .await
        {
            Ok(()) => {}
            Err(Denial::Forbidden(_)) if !self.node.hooks().covers_subscribe(event) => {
                return self.outbox.error_reply(
                    Some(kind),
                    format!("not allowed to read \"{event}\""),
                    "forbidden",
                    Some(event),
                );
            }
            Err(denial) => return self.deny(kind, denial, Some(event)),
        }
        let presence = self.node.presence();
        let frame = if stats {
            presence.stats(event).await.map(|s| {
                serde_json::json!({
                    "type": "presence_stats", "event": event,
                    "clients": s.clients, "users": s.users,
                })
                .to_string()
            })
        } else {
            presence.list(event).await.map(|list| {
                format!(
                    r#"{{"type":"presence","event":{},"clients":{}}}"#,
                    serde_json::to_string(event).expect("strings serialize"),
                    crate::presence::clients_json(&list)
                )
            })
        };
        match frame {
            Ok(frame) => {
                self.outbox.push(frame.into());
            }
            Err(e) => self
                .outbox
                .error_reply(Some(kind), e.to_string(), e.code(), Some(event)),
        }
    }

    /// Answers `request`: the device state, the newest publication of a
    /// history topic (from history, right on any node), else the last one
    /// this node delivered or the configured mock data.
    async fn request(&mut self, event: &str) {
        if event != crate::device::state::TOPIC && self.node.hub().is_history(event) {
            match self.node.hub().latest(event).await {
                Ok(Some(p)) => {
                    return self.outbox.send(&ServerMessage::Response {
                        event,
                        data: &p.data,
                        offset: p.offset,
                        timestamp: protocol::timestamp(),
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    return self.outbox.error_reply(
                        Some("request"),
                        format!("could not read \"{event}\": {e}"),
                        "unavailable",
                        Some(event),
                    );
                }
            }
        }
        match self.node.current_data(event) {
            Some(data) => self.outbox.send(&ServerMessage::Response {
                event,
                data: &data,
                offset: None,
                timestamp: protocol::timestamp(),
            }),
            None => self.outbox.error_reply(
                Some("request"),
                format!("no data for \"{event}\": nothing has been published on it yet"),
                "no_data",
                Some(event),
            ),
        }
    }
}

/// An `error` frame answering `rpc` `id`.
fn rpc_error(outbox: &Outbox, id: &RawValue, code: &str, error: String, backend_code: Option<i64>) {
    outbox.send(&ServerMessage::RpcError {
        id,
        error,
        code,
        backend_code,
        reply_to: "rpc",
        timestamp: protocol::timestamp(),
    });
}

/// The answer to an RPC the back end did not answer with `result`:
/// `rpc_failed` for its `error`, `forbidden` (then the close) for its
/// `disconnect`, `unavailable` otherwise.
fn rpc_failed(outbox: &Outbox, id: &RawValue, e: HookError) {
    match e {
        HookError::Refused { code, message } => {
            rpc_error(outbox, id, "rpc_failed", message, Some(code))
        }
        HookError::Disconnect { code, reason } => {
            rpc_error(outbox, id, "forbidden", reason.clone(), None);
            outbox.close.request_with_reason(code, &reason);
        }
        HookError::Unavailable(why) => rpc_error(outbox, id, "unavailable", why, None),
    }
}

/// A native subscriber with `presence: true`: the diff frame, built once
/// for every watcher, through the connection's queue.
struct Watcher(Arc<Outbox>);

impl crate::presence::Watcher for Watcher {
    fn diff(&self, diff: &crate::presence::Diff) {
        self.0.push(diff.native.clone());
    }
}
