//! Native WebSocket sessions at `WEBSOCKET_PATH` and `WEBSOCKET_PATH/{topic}`.
//!
//! One connection is two tasks: the reader loop (the task axum spawned for the
//! upgrade) and a writer task that owns the sink. Everything the connection
//! sends goes through one bounded queue, bounded in messages and in bytes;
//! when it is full the connection is closed with 1013 (the slow-consumer
//! policy, see `docs/protocol.md`) and the fan-out moves on without waiting.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::sync::Notify;

use crate::api::ApiError;
use crate::auth::{self, Identity};
use crate::config::RateLimit;
use crate::history::GapRange;
use crate::hub::{ConnId, Delivery, Outcome, Publication, PublishError, Subscribed, Subscriber};
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{self, ClientMessage, ProtocolError, ServerMessage, Since};

/// Close codes this gateway sends. 1000–1015 are standard; see
/// `docs/protocol.md` for which ones mean "reconnect".
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    /// The peer was silent for two heartbeat intervals.
    pub const HEARTBEAT_TIMEOUT: u16 = 1011;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// How long one flush to a client may take; past it the connection is
/// dropped as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// tungstenite read/write buffer sizes. Every idle connection keeps its read
/// buffer allocated (CRATE-NOTES: ~5 KiB RSS at 4 KiB, ~2 KiB at 1 KiB), and
/// clients send little, so reads use 1 KiB chunks; a large frame only takes
/// more reads. Writes batch up to 4 KiB before a `send`.
pub const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 4 * 1024;

/// `GET WEBSOCKET_PATH`
pub async fn upgrade(
    State(node): State<Node>,
    headers: axum::http::HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    match admit(&node, &headers, query.as_deref()) {
        Ok(identity) => accept(node, ws, identity, None),
        Err(refusal) => refusal.into_response(),
    }
}

/// Checks the connection limit and the client's token before an upgrade.
pub fn admit(
    node: &Node,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> Result<Identity, ApiError> {
    if node.is_draining() {
        return Err(ApiError::Unavailable("node is shutting down".into()));
    }
    if let Some(max) = node.config().max_connections
        && node.total_connections() >= max
    {
        return Err(ApiError::Unavailable(format!(
            "this node is at its limit of {max} connections; try another node or later"
        )));
    }
    let token = auth::token_from(headers, query);
    node.config()
        .auth
        .authenticate(token.as_deref())
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
}

/// `GET WEBSOCKET_PATH/{topic}`: subscribes to `topic` right after
/// `connected`. `WEBSOCKET_PATH/proxy/{name}` is the proxy, so a topic whose
/// name starts with `proxy/` can only be subscribed with a message.
pub async fn upgrade_topic(
    State(node): State<Node>,
    Path(topic): Path<String>,
    headers: axum::http::HeaderMap,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Some(name) = topic.strip_prefix("proxy/") {
        return crate::proxy::upgrade(node, name, &headers, query.as_deref(), ws).await;
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
    let identity = match admit(&node, &headers, query.as_deref()) {
        Ok(identity) => identity,
        Err(refusal) => return refusal.into_response(),
    };
    if !identity.may_subscribe(&topic) {
        return ApiError::Forbidden(format!("not allowed to subscribe to \"{topic}\""))
            .into_response();
    }
    accept(node, ws, identity, Some(topic))
}

fn accept(node: Node, ws: WebSocketUpgrade, identity: Identity, topic: Option<String>) -> Response {
    let max = node.config().max_payload;
    let guard = node.sessions().token();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max.saturating_mul(2).max(1 << 20))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            run(node, socket, identity, topic).await;
            drop(guard);
        })
}

// === outbox ===

/// Asks the writer to close the connection with a code. The first request wins.
struct CloseSignal {
    code: AtomicU16,
    notify: Notify,
}

impl CloseSignal {
    fn request(&self, code: u16) -> bool {
        let first = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.notify.notify_one();
        }
        first
    }

    fn code(&self) -> u16 {
        self.code.load(Ordering::Acquire)
    }
}

/// One connection's send queue, bounded in frames and in bytes.
///
/// A `VecDeque` under a std `Mutex` (held for a push or a swap, never across
/// `.await`) rather than a channel: it allocates nothing until used and
/// gives its memory back after a burst, and the writer takes everything
/// queued in one swap and is woken only when the queue turns non-empty.
struct Queue {
    inner: Mutex<Queued>,
    waker: AtomicWaker,
    max_frames: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: bool,
}

impl Queue {
    fn push(&self, frame: Utf8Bytes) -> Delivery {
        let len = frame.len();
        let mut q = self.inner.lock().unwrap();
        if q.closed {
            return Delivery::Closed;
        }
        // A single frame larger than the byte bound still goes to an empty queue.
        if q.frames.len() >= self.max_frames || (q.bytes > 0 && q.bytes + len > self.max_bytes) {
            return Delivery::Overflow;
        }
        let wake = q.frames.is_empty();
        q.frames.push_back(frame);
        q.bytes += len;
        drop(q);
        if wake {
            self.waker.wake();
        }
        Delivery::Queued
    }

    /// Moves everything queued into `batch` (which must be empty).
    fn take(&self, batch: &mut VecDeque<Utf8Bytes>) -> bool {
        let mut q = self.inner.lock().unwrap();
        if q.frames.is_empty() {
            return false;
        }
        std::mem::swap(&mut q.frames, batch);
        q.bytes = 0;
        true
    }

    fn poll_take(&self, cx: &mut Context<'_>, batch: &mut VecDeque<Utf8Bytes>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.take(batch) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// No more frames are accepted; what is queued is dropped.
    fn close(&self) {
        let mut q = self.inner.lock().unwrap();
        q.closed = true;
        q.frames = VecDeque::new();
    }
}

/// The producer side of one connection: its queue and its close signal.
struct Outbox {
    queue: Queue,
    close: CloseSignal,
}

impl Outbox {
    fn push(&self, frame: Utf8Bytes) -> Delivery {
        match self.queue.push(frame) {
            Delivery::Overflow => self.overflow(),
            other => other,
        }
    }

    fn overflow(&self) -> Delivery {
        if self.close.request(close::TRY_AGAIN_LATER) {
            metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS, "transport" => m::transport::WS)
                .increment(1);
        }
        Delivery::Overflow
    }

    fn send(&self, msg: &ServerMessage<'_>) {
        self.push(msg.to_json().into());
    }

    fn error(&self, err: &ProtocolError, event: Option<&str>) {
        self.error_text(err.to_string(), err.code(), event);
    }

    fn error_text(&self, error: String, code: &str, event: Option<&str>) {
        self.send(&ServerMessage::Error {
            error,
            code,
            event,
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

// === session ===

async fn run(node: Node, socket: WebSocket, identity: Identity, initial_topic: Option<String>) {
    let config = node.config().clone();
    let id: ConnId = crate::hub::new_conn_id();
    let client_id = format!("{id:016x}");
    let outbox = Arc::new(Outbox {
        queue: Queue {
            inner: Mutex::new(Queued::default()),
            waker: AtomicWaker::new(),
            max_frames: config.client_queue_messages,
            max_bytes: config.client_queue_bytes,
        },
        close: CloseSignal {
            code: AtomicU16::new(0),
            notify: Notify::new(),
        },
    });
    let started = Instant::now();
    let last_seen = Arc::new(AtomicU64::new(0));
    let (sink, stream) = socket.split();

    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::WS).increment(1.0);
    metrics::counter!(m::CONNECTIONS_OPENED, "transport" => m::transport::WS).increment(1);
    node.connection_opened();

    outbox.send(&ServerMessage::Connected {
        client_id: &client_id,
        timestamp: protocol::timestamp(),
        message: "Connected to Switchboard",
    });

    let mut writer = tokio::spawn(write_loop(Writer {
        sink,
        outbox: outbox.clone(),
        node: node.clone(),
        id,
        started,
        last_seen: last_seen.clone(),
    }));

    let mut session = Session {
        node: node.clone(),
        id,
        outbox: outbox.clone(),
        topics: HashSet::new(),
        identity,
        bucket: config.rate_limit.map(TokenBucket::new),
    };
    if let Some(topic) = initial_topic {
        session.subscribe(topic, None).await;
    }
    read_loop(&mut session, stream, &mut writer, started, &last_seen).await;

    // The reader is done: let the writer send its close frame and finish.
    outbox.close.request(close::NORMAL);
    if !writer.is_finished() {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, &mut writer).await;
        writer.abort();
    }
    for topic in session.topics.drain() {
        node.hub().unsubscribe(&topic, id).await;
    }
    let reason = match outbox.close.code() {
        close::TRY_AGAIN_LATER => m::reason::SLOW_CONSUMER,
        close::TOO_BIG => m::reason::TOO_BIG,
        close::GOING_AWAY | close::RESTART => m::reason::SHUTDOWN,
        close::POLICY => m::reason::POLICY,
        close::HEARTBEAT_TIMEOUT => m::reason::HEARTBEAT,
        _ => m::reason::CLIENT,
    };
    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::WS).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "transport" => m::transport::WS, "reason" => reason)
        .increment(1);
    node.connection_closed();
}

async fn read_loop(
    session: &mut Session,
    mut stream: SplitStream<WebSocket>,
    writer: &mut tokio::task::JoinHandle<()>,
    started: Instant,
    last_seen: &AtomicU64,
) {
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            // The writer closed the connection (slow consumer, shutdown, heartbeat).
            _ = &mut *writer => return,
        };
        last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        match msg {
            Some(Ok(Message::Text(text))) => {
                if !session.within_rate() {
                    return;
                }
                let kind = session.handle_text(text.as_str()).await;
                metrics::counter!(m::CLIENT_MESSAGES, "transport" => m::transport::WS, "type" => kind)
                    .increment(1);
            }
            Some(Ok(Message::Binary(_))) => {
                if !session.within_rate() {
                    return;
                }
                metrics::counter!(m::CLIENT_MESSAGES, "transport" => m::transport::WS, "type" => "invalid")
                    .increment(1);
                session.outbox.error(&ProtocolError::Binary, None);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => return,
            Some(Err(err)) => {
                if is_too_big(err) {
                    session.outbox.close.request(close::TOO_BIG);
                }
                return;
            }
        }
    }
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
    outbox: Arc<Outbox>,
    /// Topics this connection is subscribed to; owned by the reader.
    topics: HashSet<String>,
    identity: Identity,
    bucket: Option<TokenBucket>,
}

/// Per-connection message rate limit; owned by the reader, so no locking.
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            limit,
            tokens: limit.burst,
            at: Instant::now(),
        }
    }

    /// Takes one token; false when the client is over its rate.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.limit.per_second;
        self.tokens = (self.tokens + refill).min(self.limit.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Session {
    /// Applies the rate limit: past it, an `error` and close 1008.
    fn within_rate(&mut self) -> bool {
        let Some(bucket) = &mut self.bucket else {
            return true;
        };
        if bucket.take() {
            return true;
        }
        let limit = bucket.limit.per_second;
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
            Ok(ClientMessage::Subscribe { event, since }) => {
                self.subscribe(event, since).await;
                "subscribe"
            }
            Ok(ClientMessage::Unsubscribe { event }) => {
                if self.topics.remove(&event) {
                    self.node.hub().unsubscribe(&event, self.id).await;
                }
                self.outbox.send(&ServerMessage::Unsubscribed {
                    event: &event,
                    timestamp: protocol::timestamp(),
                });
                "unsubscribe"
            }
            Ok(ClientMessage::Request { event }) if !self.identity.may_subscribe(&event) => {
                self.outbox.error_text(
                    format!("not allowed to read \"{event}\""),
                    "forbidden",
                    Some(&event),
                );
                "request"
            }
            Ok(ClientMessage::Request { event }) => {
                self.request(&event).await;
                "request"
            }
            Ok(ClientMessage::Ping) => {
                self.outbox.send(&ServerMessage::Pong {
                    timestamp: protocol::timestamp(),
                });
                "ping"
            }
            Ok(ClientMessage::Publish { event, name, data }) => {
                if event == crate::device::state::TOPIC {
                    self.outbox.error_text(
                        "topic \"device\" carries device state: change it with the device commands"
                            .into(),
                        "forbidden",
                        Some(&event),
                    );
                } else if !self.identity.may_publish(&event) {
                    self.outbox.error_text(
                        format!("not allowed to publish to \"{event}\""),
                        "forbidden",
                        Some(&event),
                    );
                } else if let Err(e) = self
                    .node
                    .hub()
                    .publish(&event, name.as_deref().unwrap_or(&event), &data)
                    .await
                {
                    let code = match e {
                        PublishError::Refused(_) => "bad_message",
                        PublishError::Unavailable(_) => "unavailable",
                    };
                    self.outbox.error_text(
                        format!("publication not accepted: {e}"),
                        code,
                        Some(&event),
                    );
                }
                "publish"
            }
            Err(err) => {
                self.outbox.error(&err, None);
                "invalid"
            }
        }
    }

    async fn subscribe(&mut self, topic: String, since: Option<Since>) {
        if !self.identity.may_subscribe(&topic) {
            self.outbox.error_text(
                format!("not allowed to subscribe to \"{topic}\""),
                "forbidden",
                Some(&topic),
            );
            return;
        }
        let limit = self.node.config().max_subscriptions;
        if !self.topics.contains(&topic) && self.topics.len() >= limit {
            self.outbox.error_text(
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
        let sub: Arc<dyn Subscriber> = self.outbox.clone();
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
                timestamp: protocol::timestamp(),
            });
            if state_recovery {
                let state = node.device().state();
                for event in crate::device::state::EVENTS {
                    let data = RawValue::from_string(state.event(event).to_string())
                        .expect("device events are JSON");
                    outbox.push(
                        protocol::event_frame(&name, event, &data, None, &protocol::timestamp())
                            .into(),
                    );
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
                self.topics.insert(topic);
            }
            Err(err) => {
                tracing::warn!(topic, cause = %err, "subscribe failed");
                self.outbox.error_text(
                    format!("could not subscribe to \"{topic}\": the backplane is unavailable, try again"),
                    "unavailable",
                    Some(&topic),
                );
            }
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
                    return self.outbox.error_text(
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
            None => self.outbox.error_text(
                format!("no data for \"{event}\": nothing has been published on it yet"),
                "no_data",
                Some(event),
            ),
        }
    }
}

// === writer ===

struct Writer {
    sink: SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    node: Node,
    id: ConnId,
    started: Instant,
    last_seen: Arc<AtomicU64>,
}

async fn write_loop(mut w: Writer) {
    let config = w.node.config().clone();
    let heartbeat = config.heartbeat_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = w.node.shutdown_token();
    // Armed on shutdown: each connection closes at its own point in the drain
    // window so that clients do not all reconnect in one burst.
    let close_at = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    // Created once, not per loop turn: registering a waiter costs a lock.
    let outbox = w.outbox.clone();
    let close_requested = outbox.close.notify.notified();
    let shutdown_started = shutdown.cancelled();
    tokio::pin!(close_at, close_requested, shutdown_started);
    let mut draining = false;
    let mut batch = VecDeque::new();

    let code = loop {
        tokio::select! {
            biased;
            _ = &mut close_requested => break w.outbox.close.code(),
            _ = &mut shutdown_started, if !draining => {
                draining = true;
                let window = config.shutdown_drain.as_millis() as u64;
                let offset = if window == 0 { 0 } else { w.id % window };
                close_at.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(offset));
            }
            _ = &mut close_at => {
                w.outbox.close.request(config.shutdown_close_code);
                break w.outbox.close.code();
            }
            () = std::future::poll_fn(|cx| outbox.queue.poll_take(cx, &mut batch)) => {
                if !write_batch(&mut w, &mut batch).await {
                    outbox.queue.close();
                    return;
                }
            }
            _ = ticker.tick() => {
                let silent_ms = (w.started.elapsed().as_millis() as u64)
                    .saturating_sub(w.last_seen.load(Ordering::Relaxed));
                if silent_ms > 2 * heartbeat.as_millis() as u64 {
                    w.outbox.close.request(close::HEARTBEAT_TIMEOUT);
                    break w.outbox.close.code();
                }
                let ping = tokio::time::timeout(WRITE_TIMEOUT, w.sink.send(Message::Ping(Default::default())));
                if !matches!(ping.await, Ok(Ok(()))) {
                    return;
                }
            }
        }
    };
    // What was queued before the close (an `error` explaining it, say) goes
    // out first, unless the queue is the problem.
    if code != close::TRY_AGAIN_LATER
        && code != close::HEARTBEAT_TIMEOUT
        && outbox.queue.take(&mut batch)
    {
        let pending = async {
            for frame in batch.drain(..) {
                w.sink.feed(Message::Text(frame)).await?;
            }
            w.sink.flush().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), pending).await;
    }
    outbox.queue.close();
    let reason = match code {
        close::TRY_AGAIN_LATER => "slow consumer: message queue full",
        close::TOO_BIG => "message too big",
        close::GOING_AWAY => "server going away",
        close::RESTART => "server restarting, reconnect",
        close::HEARTBEAT_TIMEOUT => "heartbeat timeout",
        close::POLICY => "policy violation",
        _ => "",
    };
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(2), w.sink.send(frame)).await;
}

/// Writes the whole batch and flushes once. Returns false when the
/// connection is unusable.
async fn write_batch(w: &mut Writer, batch: &mut VecDeque<Utf8Bytes>) -> bool {
    let work = async {
        for frame in batch.drain(..) {
            w.sink.feed(Message::Text(frame)).await?;
        }
        w.sink.flush().await
    };
    let ok = {
        let mut work = std::pin::pin!(work);
        // Most batches complete at once; only a write that has to wait arms
        // the timer (a timer-wheel entry per delivery showed up in profiles).
        let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(res) => res.is_ok(),
            Poll::Pending => {
                matches!(tokio::time::timeout(WRITE_TIMEOUT, work).await, Ok(Ok(())))
            }
        }
    };
    // Give back what a burst grew; an idle connection keeps almost nothing.
    if batch.capacity() > 64 {
        *batch = VecDeque::new();
    }
    ok
}
