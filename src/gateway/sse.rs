//! Server-Sent Events at `/sse?topic=a&topic=b` and `/sse/{topic}`: live
//! topics over plain HTTP, for networks that break WebSockets, for
//! `curl -N` and for the browser's `EventSource`.
//!
//! One stream is one hub subscriber like a native connection (the same
//! admission, the same bounded [`Outbox`] and slow-consumer policy), whose
//! frames are SSE events: `event:` the publication's name, `data:` the
//! native `event` frame on one line, `id:` where the stream stands in
//! *every* topic it follows. The id is built and queued under the stream's
//! one lock with the event it belongs to, so the last id a client received
//! names exactly what it received (the Socket.IO recovery token's rule,
//! `recovery.rs`). A reconnect to any node sends it back (`Last-Event-ID`,
//! or `?lastEventId=` on a first connection) and each topic is subscribed
//! with `since` from it: the hub's replay-then-live seam, or a `gap`.
//!
//! The id: `1` (the format's version), then per history topic
//! `_<key>.<epoch>.<offset>`, where key is the topic name's 32-bit FNV-1a
//! hash in base 36 and offset is base 36 (`1_1x2f3k.mk2v9s1.2s`). Keyed by
//! the topic, not by its place, so it stays right when topics come and go;
//! ids longer than [`MAX_ID_BYTES`] are refused, and a stream holds no more
//! history topics than its id can carry (113). Topics without history add
//! nothing to it.
//!
//! The response body is not a task of its own: hyper polls [`Events`],
//! which takes what the outbox queued (one chunk per batch), writes a
//! comment as heartbeat, and the last words when a close was asked for. The
//! session task holds the subscriptions, takes commands (`POST
//! /api/sse/{session}/subscribe` from any node, over the control bus),
//! watches token expiry and the drain, and cleans up when the body is
//! dropped (the client left) or a close is done.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::Utf8Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::api::{ApiError, Json};
use crate::auth::Identity;
use crate::backend::hooks::transport;
use crate::backend::{Caller, Denial};
use crate::clients::{ClientInfo, Command, Mailbox, Registration, Target};
use crate::gateway::admission::{self, Seats};
use crate::gateway::outbox::{Outbox, WRITE_TIMEOUT, close};
use crate::history::{GapRange, push_base36};
use crate::hub::{ConnId, Delivery, Outcome, Publication, Subscribed, Subscriber};
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{self, ProtocolError, ServerMessage, Since};

/// What `retry:` tells `EventSource` to wait before it reconnects.
pub const RETRY_MS: u64 = 2_000;
/// The longest event id taken back.
pub const MAX_ID_BYTES: usize = 4_096;
/// The longest entry of one topic whose epoch this server made: `_`, a key
/// of at most 7 base-36 digits, `.`, the epoch (13 bytes: 8 of creation
/// time, `.`, 4 random), `.`, an offset of at most 13 digits. A stream holds
/// at most as many history topics as such entries fit in [`MAX_ID_BYTES`]
/// (113), so that no offset it reaches makes an id the next reconnect
/// refuses. (An epoch comes from a client only in an id it sent back, up
/// to 32 bytes; a forged one can only spoil its own stream's ids.)
const ENTRY_BYTES: usize = 36;
/// The drain's `retry:` is spread over this range, so that the clients of
/// a node that goes away do not all come back in the same instant.
const DRAIN_RETRY_MS: std::ops::RangeInclusive<u64> = 500..=3_000;

// === event ids ===

/// A topic's key in event ids: FNV-1a, 32 bits.
pub fn topic_key(topic: &str) -> u32 {
    topic.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn parse_base36(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 13 || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    u64::from_str_radix(&s.to_ascii_lowercase(), 36).ok()
}

/// Why an event id sent back was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("the event id is {0} bytes long; at most {MAX_ID_BYTES} are accepted")]
    TooLong(usize),
    #[error("the event id is not one this server wrote: {0}")]
    Malformed(&'static str),
}

/// The positions an event id names: topic key → where the stream stood.
pub fn parse_id(id: &str) -> Result<HashMap<u32, Since>, IdError> {
    if id.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong(id.len()));
    }
    let mut parts = id.split('_');
    if parts.next() != Some("1") {
        return Err(IdError::Malformed("it does not start with version 1"));
    }
    let mut out = HashMap::new();
    for entry in parts {
        // Epochs carry dots themselves (`<ms>.<random>`) and pending ones
        // start with `~`: the key ends at the first dot, the offset starts
        // after the last.
        let Some((key, rest)) = entry.split_once('.') else {
            return Err(IdError::Malformed("a topic entry is not key.epoch.offset"));
        };
        let Some((epoch, offset)) = rest.rsplit_once('.') else {
            return Err(IdError::Malformed("a topic entry is not key.epoch.offset"));
        };
        let key = parse_base36(key)
            .and_then(|k| u32::try_from(k).ok())
            .ok_or(IdError::Malformed("a topic key is not a base-36 number"))?;
        if epoch.is_empty()
            || epoch.len() > 32
            || !epoch
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'~')
        {
            return Err(IdError::Malformed(
                "an epoch is not 1-32 letters, digits, dots or ~",
            ));
        }
        let offset =
            parse_base36(offset).ok_or(IdError::Malformed("an offset is not a base-36 number"))?;
        out.insert(
            key,
            Since {
                offset,
                epoch: epoch.to_string(),
            },
        );
    }
    Ok(out)
}

/// Where a stream stands in each of its history topics, and the id that
/// says so (rebuilt on every change: one short string per topic).
#[derive(Default)]
struct Positions {
    entries: Vec<(Arc<str>, u32, Arc<str>, u64)>,
    id: String,
}

impl Positions {
    fn set(&mut self, topic: &str, epoch: &Arc<str>, offset: u64) {
        match self.entries.iter_mut().find(|e| *e.0 == *topic) {
            Some(e) if e.2 == *epoch && e.3 == offset => return,
            Some(e) => {
                e.2 = epoch.clone();
                e.3 = offset;
            }
            None => self
                .entries
                .push((topic.into(), topic_key(topic), epoch.clone(), offset)),
        }
        self.rebuild();
    }

    /// Where the stream stood in `topic` (epoch and offset), if anywhere.
    fn get(&self, topic: &str) -> Option<(Arc<str>, u64)> {
        self.entries
            .iter()
            .find(|e| *e.0 == *topic)
            .map(|e| (e.2.clone(), e.3))
    }

    /// Puts `topic` back where [`Positions::get`] found it.
    fn restore(&mut self, topic: &str, before: Option<(Arc<str>, u64)>) {
        match before {
            Some((epoch, offset)) => self.set(topic, &epoch, offset),
            None => self.remove(topic),
        }
    }

    fn remove(&mut self, topic: &str) {
        let before = self.entries.len();
        self.entries.retain(|e| *e.0 != *topic);
        if self.entries.len() != before {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        self.id.clear();
        self.id.push('1');
        for (_, key, epoch, offset) in &self.entries {
            self.id.push('_');
            push_base36(&mut self.id, u64::from(*key));
            self.id.push('.');
            self.id.push_str(epoch);
            self.id.push('.');
            push_base36(&mut self.id, *offset);
        }
    }

    fn id(&mut self) -> &str {
        if self.id.is_empty() {
            self.rebuild();
        }
        &self.id
    }

    /// Whether one more topic could make the id too long to be taken back.
    fn full(&self) -> bool {
        1 + (self.entries.len() + 1) * ENTRY_BYTES > MAX_ID_BYTES
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Appends `text` as one SSE field value: a line break would end the
/// field, so CR and LF become spaces (in JSON they can only be whitespace
/// between tokens: inside strings they are escaped).
fn push_line(out: &mut String, text: &str) {
    if text.contains(['\n', '\r']) {
        out.extend(
            text.chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
        );
    } else {
        out.push_str(text);
    }
}

/// One SSE event: `event:`, `id:` (when given), one `data:` line.
fn event(name: &str, id: Option<&str>, data: &str) -> Utf8Bytes {
    let mut s = String::with_capacity(name.len() + data.len() + id.map_or(0, str::len) + 24);
    s.push_str("event: ");
    push_line(&mut s, name);
    if let Some(id) = id {
        s.push_str("\nid: ");
        s.push_str(id);
    }
    s.push_str("\ndata: ");
    push_line(&mut s, data);
    s.push_str("\n\n");
    s.into()
}

// === the stream ===

/// One SSE stream as the hub and its session see it.
pub struct Stream {
    outbox: Outbox,
    /// std Mutex: held to update a position, build one frame and queue it,
    /// never across `.await`; that is what keeps ids in queue order.
    positions: Mutex<Positions>,
}

impl Stream {
    fn new(config: &crate::config::Config) -> Self {
        Stream {
            outbox: Outbox::new(config, m::transport::SSE),
            positions: Mutex::new(Positions::default()),
        }
    }

    /// Queues a native server message as event `name`, with the current id.
    fn send(&self, name: &str, message: &ServerMessage) -> Delivery {
        let mut positions = self.positions.lock().unwrap();
        let frame = event(name, Some(positions.id()), &message.to_json());
        self.outbox.push(frame)
    }

    /// An `error` event (no id: the client's last id stays).
    fn error(&self, error: String, code: &str, topic: Option<&str>, reply_to: Option<&str>) {
        let message = ServerMessage::Error {
            error,
            code,
            event: topic,
            reply_to,
            timestamp: protocol::timestamp(),
        };
        self.outbox.push(event("error", None, &message.to_json()));
    }

    /// `held`: the stream already had the topic (a second subscribe).
    fn subscribed(&self, topic: &str, outcome: &Outcome, since: Option<&Since>, held: bool) {
        let mut positions = self.positions.lock().unwrap();
        if let Some(p) = &outcome.position {
            // What the client holds: its own position when everything after
            // it follows, the top otherwise (a `gap` says what is lost).
            match since {
                Some(s) if outcome.recovered == Some(true) => {
                    positions.set(topic, &p.epoch, s.offset)
                }
                // Already delivering: the position is what the stream was
                // given. The top can be ahead of publications still on
                // their way to this node, and an id naming it would skip
                // them on a resume.
                None if held => {}
                _ => positions.set(topic, &p.epoch, p.offset),
            }
        }
        let message = ServerMessage::Subscribed {
            event: topic,
            offset: outcome.position.as_ref().map(|p| p.offset),
            epoch: outcome.position.as_ref().map(|p| &*p.epoch),
            recovered: outcome.recovered,
            id: None,
            timestamp: protocol::timestamp(),
        };
        let frame = event("subscribed", Some(positions.id()), &message.to_json());
        self.outbox.push(frame);
    }
}

impl Subscriber for Stream {
    /// The id of the frame names the publication's offset; a frame that is
    /// not queued (a full queue) puts the position back, so no later frame's
    /// id (one that still fits, or went out in the race with the close)
    /// claims a publication the client never got.
    fn deliver(&self, publication: &Publication) -> Delivery {
        let mut positions = self.positions.lock().unwrap();
        let Some((offset, epoch)) = publication.offset.zip(publication.epoch.as_ref()) else {
            let native = publication.native_frame();
            let frame = event(&publication.event, Some(positions.id()), native.as_str());
            return self.outbox.push(frame);
        };
        let before = positions.get(&publication.topic);
        positions.set(&publication.topic, epoch, offset);
        let native = publication.native_frame();
        let frame = event(&publication.event, Some(positions.id()), native.as_str());
        let delivery = self.outbox.push(frame);
        if delivery != Delivery::Queued {
            positions.restore(&publication.topic, before);
        }
        delivery
    }

    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery {
        let mut positions = self.positions.lock().unwrap();
        let before = positions.get(topic);
        positions.set(topic, &gap.epoch, gap.to);
        let message = ServerMessage::Gap {
            event: topic,
            from: gap.from,
            to: gap.to,
            epoch: &gap.epoch,
            previous_epoch: gap.previous_epoch.as_deref(),
            timestamp: protocol::timestamp(),
        };
        let frame = event("gap", Some(positions.id()), &message.to_json());
        let delivery = self.outbox.push(frame);
        if delivery != Delivery::Queued {
            positions.restore(topic, before);
        }
        delivery
    }

    fn transport(&self) -> &'static str {
        m::transport::SSE
    }
}

// === the response body ===

/// The response body: what the outbox queued, heartbeats, last words.
/// Dropping it (the client left, hyper gave up) tells the session.
struct Events {
    stream: Arc<Stream>,
    heartbeat: tokio::time::Interval,
    batch: VecDeque<Utf8Bytes>,
    done: bool,
    _gone: DropGuard,
}

impl Events {
    /// The end of the stream: what explains the close, queued before it
    /// (unless the queue is what failed), and what tells `EventSource` how
    /// to come back.
    fn last_words(&mut self, code: u16) -> Bytes {
        let mut out = BytesMut::new();
        let outbox = &self.stream.outbox;
        if code == close::TRY_AGAIN_LATER {
            outbox.close_queue();
            let message = ServerMessage::Error {
                error: "slow consumer: the stream's queue was full; reconnect with the last event id to catch up".into(),
                code: "slow_consumer",
                event: None,
                reply_to: None,
                timestamp: protocol::timestamp(),
            };
            out.extend_from_slice(event("error", None, &message.to_json()).as_bytes());
            return out.freeze();
        }
        self.batch.clear();
        if outbox.take(&mut self.batch) {
            for frame in self.batch.drain(..) {
                out.extend_from_slice(frame.as_bytes());
            }
        }
        outbox.close_queue();
        if code == close::GOING_AWAY || code == close::RESTART {
            let retry = rand::random_range(DRAIN_RETRY_MS);
            let data = format!(
                r#"{{"type":"reconnect","reason":"server shutting down: reconnect (another node will answer)","retry":{retry},"timestamp":"{}"}}"#,
                protocol::timestamp()
            );
            out.extend_from_slice(
                format!("retry: {retry}\nevent: reconnect\ndata: {data}\n\n").as_bytes(),
            );
        }
        out.freeze()
    }
}

impl futures_util::Stream for Events {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut code = this.stream.outbox.close.code();
        if code == 0 {
            if this.stream.outbox.poll_take(cx, &mut this.batch).is_ready() {
                let len = this.batch.iter().map(|f| f.len()).sum();
                let mut out = BytesMut::with_capacity(len);
                for frame in this.batch.drain(..) {
                    out.extend_from_slice(frame.as_bytes());
                }
                if this.batch.capacity() > 64 {
                    this.batch = VecDeque::new();
                }
                return Poll::Ready(Some(Ok(out.freeze())));
            }
            // Registered for the queue's wake-up; a close asked for since
            // the first look is seen now, not at the next heartbeat.
            code = this.stream.outbox.close.code();
        }
        if code != 0 {
            this.done = true;
            return Poll::Ready(Some(Ok(this.last_words(code))));
        }
        if this.heartbeat.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Bytes::from_static(b":\n\n"))));
        }
        Poll::Pending
    }
}

// === handlers ===

/// `GET /sse?topic=a&topic=b`
pub async fn open(
    State(node): State<Node>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    extensions: axum::http::Extensions,
) -> Response {
    start(node, None, &headers, query.as_deref(), &extensions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `GET /sse/{topic}` (more with `?topic=`).
pub async fn open_topic(
    State(node): State<Node>,
    crate::api::PathText(topic): crate::api::PathText,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    extensions: axum::http::Extensions,
) -> Response {
    start(node, Some(topic), &headers, query.as_deref(), &extensions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The stream's topics: the path's, then every `topic=` in order, once each.
fn topics(path: Option<String>, query: Option<&str>, max: usize) -> Result<Vec<String>, ApiError> {
    let mut topics: Vec<String> = path.into_iter().collect();
    for raw in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.strip_prefix("topic="))
    {
        let topic = admission::percent_decode(raw).ok_or_else(|| {
            ApiError::BadRequest("a topic parameter has an invalid %-escape or is not UTF-8".into())
        })?;
        if !topics.contains(&topic) {
            topics.push(topic);
        }
        if topics.len() > max {
            crate::limits::refused(
                crate::limits::Limit::SubscriptionsPerConnection,
                "a stream asked for more than WEBSOCKET_MAX_SUBSCRIPTIONS topics",
            );
            return Err(ApiError::BadRequest(format!(
                "at most {max} topics per stream (WEBSOCKET_MAX_SUBSCRIPTIONS)"
            )));
        }
    }
    if let Some(bad) = topics.iter().find(|t| !protocol::valid_topic(t)) {
        return Err(ApiError::BadRequest(
            ProtocolError::InvalidTopic(bad.chars().take(140).collect()).to_string(),
        ));
    }
    // None is fine: topics can be added with `POST /api/sse/{session}/subscribe`.
    Ok(topics)
}

/// The id a reconnecting client sends: the `Last-Event-ID` header
/// (`EventSource` sets it), else `?lastEventId=` (a first connection).
fn last_event_id(headers: &HeaderMap, query: Option<&str>) -> Option<Result<String, IdError>> {
    if let Some(v) = headers.get("last-event-id") {
        return Some(
            v.to_str()
                .map(str::to_string)
                .map_err(|_| IdError::Malformed("the header is not ASCII")),
        );
    }
    let raw = admission::query_value(query?, "lastEventId")?;
    Some(admission::percent_decode(raw).ok_or(IdError::Malformed("invalid %-escape")))
}

/// Who a stream's client is, for the back end.
fn caller<'a>(client: &'a str, identity: &'a Identity) -> Caller<'a> {
    Caller {
        client,
        transport: transport::SSE,
        user: identity.user(),
        info: identity.info().map(|i| &**i),
    }
}

/// Who asks: the token (query or `Authorization`), or the connect hook.
async fn who(
    node: &Node,
    client: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    extensions: &axum::http::Extensions,
) -> Result<Identity, ApiError> {
    let origin = admission::Origin {
        client,
        transport: transport::SSE,
        remote: admission::remote_addr(extensions),
        route: None,
    };
    admission::identify_request(node, headers, query, origin).await
}

async fn start(
    node: Node,
    path_topic: Option<String>,
    headers: &HeaderMap,
    query: Option<&str>,
    extensions: &axum::http::Extensions,
) -> Result<Response, ApiError> {
    let config = node.config().clone();
    let topics = topics(path_topic, query, config.max_subscriptions)?;
    // The connection limits, as for a WebSocket: held for the stream's life.
    let mut seats = Seats::admit(&node, admission::remote_addr(extensions), headers)?;
    let id = crate::hub::new_conn_id();
    let client_id = format!("{id:016x}");
    let identity = who(&node, &client_id, headers, query, extensions).await?;
    seats.user(&node, &identity)?;
    let (resume, bad_id, resuming) = match last_event_id(headers, query) {
        None => (HashMap::new(), None, false),
        Some(Ok(id)) if id.is_empty() => (HashMap::new(), None, false),
        // A resume carries an id the stream could have written (`1` at
        // least); a malformed one starts a new stream.
        Some(Ok(id)) => match parse_id(&id) {
            Ok(positions) => (positions, None, true),
            Err(e) => (HashMap::new(), Some(e), false),
        },
        Some(Err(e)) => (HashMap::new(), Some(e), false),
    };
    // The topics of the URL are the stream's own subscribes, charged like
    // its later requests, and before the subscribe hook is asked: opening
    // streams must not churn topics, or call the hook, faster than
    // subscribing on one. One refused here is told on the stream.
    let mut new_topics = config
        .subscribe_rate_limit
        .map(crate::limits::TokenBucket::new);
    let mut allowed = Vec::with_capacity(topics.len());
    let mut revoked = Vec::new();
    let mut too_fast = Vec::new();
    for topic in topics {
        if let Some(bucket) = new_topics.as_mut()
            && !node.hub().holds(&topic)
            && !bucket.take()
        {
            too_fast.push(topic);
            continue;
        }
        match node
            .hooks()
            .authorize_subscribe(caller(&client_id, &identity), &identity, &topic, None)
            .await
        {
            Ok(()) => allowed.push(topic),
            // A resume goes on without a topic the client may no longer
            // read, told by an `error` event, as a native reconnect's
            // resubscription is refused topic by topic: a 403 would end an
            // `EventSource` for good, with its other topics. A new stream
            // naming it is refused whole.
            Err(denial @ Denial::Forbidden(_)) if resuming => revoked.push((topic, denial)),
            Err(denial) => return Err(denial.into()),
        }
    }
    let topics = allowed;

    let stream = Arc::new(Stream::new(&config));
    stream.outbox.push(format!("retry: {RETRY_MS}\n\n").into());
    let key = format!("{:032x}", rand::random::<u128>());
    let session = format!("{client_id}{key}");
    let connected = Connected {
        ty: "connected",
        client_id: &client_id,
        session: &session,
        timestamp: protocol::timestamp(),
        message: "Connected to Switchboard",
    };
    let connected = serde_json::to_string(&connected).expect("serializes");
    stream.outbox.push(event("connected", None, &connected));
    for (topic, denial) in revoked {
        stream.error(
            denial.to_string(),
            denial.code(),
            Some(&topic),
            Some("subscribe"),
        );
    }
    if let Some(e) = bad_id {
        stream.error(
            format!("{e}; streaming from now"),
            "bad_event_id",
            None,
            None,
        );
    }
    let mailbox = Arc::new(Mailbox::default());
    // Registered before the answer: a `POST …/subscribe` right after
    // `connected` finds the session.
    let registration = node.clients().register(
        ClientInfo {
            id: client_id.as_str().into(),
            user: identity.user().into(),
            info: identity.info().cloned(),
            transport: crate::clients::transport::SSE,
            sse_key: Some(key.into()),
        },
        mailbox.clone(),
    );
    let device = crate::device::state::TOPIC;
    let joins: Vec<Join> = topics
        .into_iter()
        .map(|t| (t, false))
        .chain(too_fast.into_iter().map(|t| (t, true)))
        .map(|(t, too_fast)| {
            let since = (t != device)
                .then(|| resume.get(&topic_key(&t)).cloned())
                .flatten();
            (t, since, too_fast)
        })
        .collect();

    let gone = CancellationToken::new();
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + config.heartbeat_interval,
        config.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let body = Events {
        stream: stream.clone(),
        heartbeat,
        batch: VecDeque::new(),
        done: false,
        _gone: gone.clone().drop_guard(),
    };
    let session = Session {
        node: node.clone(),
        id,
        stream,
        topics: HashSet::new(),
        identity,
        new_topics,
        _seats: seats,
    };
    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::SSE).increment(1.0);
    metrics::counter!(m::CONNECTIONS_OPENED, "transport" => m::transport::SSE).increment(1);
    node.connection_opened();
    node.sessions()
        .spawn(run(session, joins, mailbox, registration, gone));

    let mut res = Body::from_stream(body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers proxied responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// The first event: the native `connected` frame with the stream's `session`.
#[derive(serde::Serialize)]
struct Connected<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "clientId")]
    client_id: &'a str,
    session: &'a str,
    timestamp: String,
    message: &'static str,
}

// === session ===

struct Session {
    node: Node,
    id: ConnId,
    stream: Arc<Stream>,
    topics: HashSet<String>,
    identity: Identity,
    /// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT` for the stream's own subscribes
    /// (its URL's topics, then its requests) to topics this node does not
    /// hold yet: the ones that cost Redis work (a channel subscribed and
    /// later released, a history read) and node memory. Each request is an
    /// HTTP request of its own, so subscribing again to a topic the node
    /// holds (or that lingers after its last subscriber) is not counted, nor
    /// are unsubscribes.
    new_topics: Option<crate::limits::TokenBucket>,
    /// Given back when the session ends.
    _seats: Seats,
}

/// A topic of the stream's URL, with its resume position, and whether the
/// subscribe rate refused it at the stream's start.
type Join = (String, Option<Since>, bool);

async fn run(
    mut s: Session,
    joins: Vec<Join>,
    mailbox: Arc<Mailbox>,
    registration: Registration,
    gone: CancellationToken,
) {
    let config = s.node.config().clone();
    for (topic, since, too_fast) in joins {
        if too_fast {
            s.keep_position(&topic, since.as_ref());
            let (e, code) = crate::limits::subscribe_rate_refusal(&s.node, &topic);
            s.stream.error(e, code, Some(&topic), Some("subscribe"));
            continue;
        }
        Box::pin(s.join(topic, since)).await;
    }
    let mut expiry = s
        .identity
        .time_left()
        .map(|left| Box::pin(tokio::time::sleep(left)));
    let shutdown = s.node.shutdown_token();
    let mut drain_at: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut draining = false;
    let left;
    loop {
        let expired = async {
            match expiry.as_mut() {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let drain_due = async {
            match drain_at.as_mut() {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = gone.cancelled() => {
                left = true;
                break;
            }
            _ = s.stream.outbox.close.requested() => {
                // The body writes the last words and ends; a client that
                // reads nothing more does not keep the session. A request
                // meanwhile would never be applied: not found.
                mailbox.close();
                s.stream.outbox.wake();
                left = tokio::time::timeout(WRITE_TIMEOUT, gone.cancelled()).await.is_ok();
                break;
            }
            _ = expired => {
                expiry = None;
                s.stream.error(
                    "the token has expired: connect again with a new token and the last event id".into(),
                    "token_expired",
                    None,
                    None,
                );
                s.stream.outbox.close.request(close::TOKEN_EXPIRED);
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                // Each stream ends at its own point of the drain window.
                let window = config.shutdown_drain.as_millis() as u64;
                let offset = if window == 0 { 0 } else { s.id % window };
                drain_at = Some(Box::pin(tokio::time::sleep(Duration::from_millis(offset))));
            }
            _ = drain_due => {
                drain_at = None;
                s.stream.outbox.close.request(close::RESTART);
            }
            command = mailbox.recv() => Box::pin(s.command(command)).await,
        }
    }
    mailbox.close();
    s.stream.outbox.close_queue();
    let client_id = s.client_id();
    for topic in s.topics.drain() {
        s.node.hub().unsubscribe(&topic, s.id).await;
        s.node.presence().left(&topic, &client_id);
    }
    let reason = match s.stream.outbox.close.code() {
        0 => m::reason::CLIENT,
        close::TRY_AGAIN_LATER => m::reason::SLOW_CONSUMER,
        close::GOING_AWAY | close::RESTART => m::reason::SHUTDOWN,
        close::TOKEN_EXPIRED => m::reason::TOKEN_EXPIRED,
        4000..=4999 => m::reason::BACKEND,
        _ if left => m::reason::CLIENT,
        _ => m::reason::SERVER,
    };
    registration.end(reason);
    metrics::gauge!(m::CONNECTIONS, "transport" => m::transport::SSE).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "transport" => m::transport::SSE, "reason" => reason)
        .increment(1);
    s.node.connection_closed();
}

impl Session {
    /// Whether the stream may subscribe `topic` by its own request: one
    /// this node does not hold yet takes a token of
    /// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT`.
    fn may_open(&mut self, topic: &str) -> bool {
        match &mut self.new_topics {
            Some(bucket) if !self.topics.contains(topic) && !self.node.hub().holds(topic) => {
                bucket.take()
            }
            _ => true,
        }
    }

    /// The stream's client id (and session id), as the registry knows it.
    fn client_id(&self) -> String {
        format!("{:016x}", self.id)
    }

    async fn command(&mut self, command: Command) {
        match command {
            // The back end's (no permission check) or the client's own,
            // checked where its request landed.
            Command::Subscribe { topic } => self.join(topic.to_string(), None).await,
            Command::SseSubscribe { topic, .. } => {
                if !self.may_open(&topic) {
                    let (e, code) = crate::limits::subscribe_rate_refusal(&self.node, &topic);
                    return self.stream.error(e, code, Some(&topic), Some("subscribe"));
                }
                self.join(topic.to_string(), None).await
            }
            Command::Unsubscribe { topic } => self.leave(&topic, Some("server")).await,
            Command::SseUnsubscribe { topic, .. } => self.leave(&topic, None).await,
            Command::Disconnect { code, reason } => {
                self.stream.error(
                    format!("disconnected by the server ({code}): {reason}"),
                    "disconnected",
                    None,
                    None,
                );
                self.stream.outbox.close.request_with_reason(code, &reason);
            }
        }
    }

    /// Ends a subscription; `unsubscribed` answers the client's own request
    /// in any case, the back end's (`reason`) only when it held the topic.
    async fn leave(&mut self, topic: &str, reason: Option<&str>) {
        if self.topics.remove(topic) {
            self.node.hub().unsubscribe(topic, self.id).await;
            self.stream.positions.lock().unwrap().remove(topic);
            self.node.presence().left(topic, &self.client_id());
        } else if reason.is_some() {
            // The back end's unsubscribe tells only a subscribed stream
            // (as on every transport); the client's own request is
            // answered either way.
            return;
        }
        self.stream.send(
            "unsubscribed",
            &ServerMessage::Unsubscribed {
                event: topic,
                reason,
                timestamp: protocol::timestamp(),
            },
        );
    }

    /// Subscribes an allowed topic (from `since` when resuming). A topic
    /// the stream does not hold but has a position for is one whose resume
    /// was refused ([`Session::keep_position`]): a later subscribe (a
    /// request, the back end's) resumes it from there, as the client's
    /// retry of a refused resubscription would on any other transport.
    async fn join(&mut self, topic: String, since: Option<Since>) {
        let limit = self.node.config().max_subscriptions;
        let held = self.topics.contains(&topic);
        let since = match since {
            None if !held => {
                self.stream
                    .positions
                    .lock()
                    .unwrap()
                    .get(&topic)
                    .map(|(epoch, offset)| Since {
                        offset,
                        epoch: epoch.to_string(),
                    })
            }
            since => since,
        };
        if !held && self.topics.len() >= limit {
            crate::limits::refused(
                crate::limits::Limit::SubscriptionsPerConnection,
                "a stream is at WEBSOCKET_MAX_SUBSCRIPTIONS",
            );
            self.keep_position(&topic, since.as_ref());
            return self.stream.error(
                format!("subscription limit of {limit} topics per connection reached"),
                "subscription_limit",
                Some(&topic),
                Some("subscribe"),
            );
        }
        if !held && self.node.hub().is_history(&topic) {
            let positions = self.stream.positions.lock().unwrap();
            if positions.full() {
                let n = positions.len();
                drop(positions);
                return self.stream.error(
                    format!(
                        "a stream holds at most the history topics whose positions fit in its event id ({MAX_ID_BYTES} bytes; this one holds {n}): \"{topic}\" was not subscribed; open another stream for more"
                    ),
                    "subscription_limit",
                    Some(&topic),
                    Some("subscribe"),
                );
            }
        }
        let stream = self.stream.clone();
        let name = topic.clone();
        let wanted = since.clone();
        let resume = since.clone();
        let ttl = self.node.config().history.ttl;
        let announce = Box::new(move |outcome: &Outcome| {
            stream.subscribed(&name, outcome, wanted.as_ref(), held);
            // What the replay cannot bring back is a gap, before anything live.
            let (Some(p), Some(since), Some(false)) =
                (&outcome.position, wanted, outcome.recovered)
            else {
                return;
            };
            // An id taken before the topic's first publication names a
            // pending epoch: the first epoch continues it (no reset).
            let same = *p.epoch == *since.epoch
                || crate::history::continues_into(&since.epoch, &p.epoch, 0, ttl);
            if let Some(gap) =
                GapRange::missed(&since.epoch, since.offset, &p.epoch, p.offset, same)
            {
                stream.gap(&name, &gap);
            }
        });
        let sub: Arc<dyn Subscriber> = self.stream.clone();
        match self
            .node
            .hub()
            .subscribe(&topic, self.id, sub, since, announce)
            .await
        {
            Ok(Subscribed::New | Subscribed::Already) => {
                // A stream is present on its topics like any connection
                // (it cannot ask for presence_diff: it has no way to say so).
                let presence = self.node.presence();
                if presence.covers(&topic) {
                    presence.joined(
                        &topic,
                        &self.client_id(),
                        self.identity.user(),
                        self.identity.info().map(|i| &**i),
                        None,
                    );
                }
                self.topics.insert(topic);
            }
            Err(err) => {
                self.keep_position(&topic, resume.as_ref());
                let (error, code) = super::subscribe_refused(&topic, &err);
                self.stream
                    .error(error, code, Some(&topic), Some("subscribe"));
            }
        }
    }

    /// A topic the stream resumes but could not subscribe (Redis down for a
    /// moment, a limit) keeps the position it came with in the stream's
    /// ids, so that the next reconnect resumes it from there instead of
    /// from now without a `gap`.
    fn keep_position(&self, topic: &str, since: Option<&Since>) {
        if let Some(since) = since
            && !self.topics.contains(topic)
        {
            let epoch: Arc<str> = since.epoch.as_str().into();
            let mut positions = self.stream.positions.lock().unwrap();
            if !positions.full() {
                positions.set(topic, &epoch, since.offset);
            }
        }
    }
}

// === commands from any node ===

#[derive(Deserialize)]
pub struct TopicBody {
    topic: String,
}

/// `POST /api/sse/{session}/subscribe` `{"topic"}`
pub async fn subscribe(
    State(node): State<Node>,
    crate::api::PathText(session): crate::api::PathText,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    extensions: axum::http::Extensions,
    Json(body): Json<TopicBody>,
) -> Result<Response, ApiError> {
    command(
        node,
        session,
        &headers,
        query.as_deref(),
        &extensions,
        body.topic,
        true,
    )
    .await
}

/// `POST /api/sse/{session}/unsubscribe` `{"topic"}`
pub async fn unsubscribe(
    State(node): State<Node>,
    crate::api::PathText(session): crate::api::PathText,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    extensions: axum::http::Extensions,
    Json(body): Json<TopicBody>,
) -> Result<Response, ApiError> {
    command(
        node,
        session,
        &headers,
        query.as_deref(),
        &extensions,
        body.topic,
        false,
    )
    .await
}

/// Checks the request as the stream's own subscription would be checked,
/// here, then hands it over the control bus to whichever node holds the
/// session. Every node answers alike: only the holder's reach differs.
async fn command(
    node: Node,
    session: String,
    headers: &HeaderMap,
    query: Option<&str>,
    extensions: &axum::http::Extensions,
    topic: String,
    subscribe: bool,
) -> Result<Response, ApiError> {
    if !protocol::valid_topic(&topic) {
        return Err(ApiError::BadRequest(
            ProtocolError::InvalidTopic(topic.chars().take(140).collect()).to_string(),
        ));
    }
    // The client id (16 hex digits) and the stream's secret.
    let (client, key) = match session.get(..16) {
        Some(client)
            if session.len() <= 64 && session.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            (client.to_string(), &session[16..])
        }
        _ => return Err(not_found(&session)),
    };
    let identity = who(&node, &client, headers, query, extensions).await?;
    if subscribe {
        node.hooks()
            .authorize_subscribe(caller(&client, &identity), &identity, &topic, None)
            .await
            .map_err(ApiError::from)?;
    }
    let (topic_arc, user, key): (Arc<str>, Arc<str>, Arc<str>) =
        (topic.as_str().into(), identity.user().into(), key.into());
    let command = match subscribe {
        true => Command::SseSubscribe {
            topic: topic_arc,
            user,
            key,
        },
        false => Command::SseUnsubscribe {
            topic: topic_arc,
            user,
            key,
        },
    };
    let reached = node
        .control()
        .run(Target::Client(client), command)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if reached.reached == 0 && reached.nodes_unknown {
        return Err(ApiError::Unavailable(format!(
            "the live nodes could not be listed and none took it within {} s; try again",
            crate::control::ANSWER_TIMEOUT.as_secs()
        )));
    }
    if reached.reached == 0 && !reached.unanswered.is_empty() {
        // A node that did not answer in time may hold the stream: not
        // found would tell the client to give up on a live session.
        return Err(ApiError::Unavailable(format!(
            "the stream's node did not answer within {} s (nodes {}); try again",
            crate::control::ANSWER_TIMEOUT.as_secs(),
            reached.unanswered.join(", ")
        )));
    }
    if reached.reached == 0 && reached.busy > 0 {
        // Alive, with its queue of commands full (a burst of requests
        // while it still joins its topics): not an ended session.
        return Err(ApiError::Unavailable(format!(
            "the stream has {} requests still waiting; try again",
            crate::clients::PENDING_COMMANDS
        )));
    }
    if reached.reached == 0 {
        return Err(not_found(&session));
    }
    Ok(crate::api::envelope(json!({"session": session, "topic": topic})).into_response())
}

fn not_found(session: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no SSE session \"{}\": it ended, or it is not yours",
        session.chars().take(64).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_stay_keyed_by_topic() {
        let mut p = Positions::default();
        assert_eq!(p.id(), "1");
        let e: Arc<str> = "mk2v9s1".into();
        p.set("a", &e, 100);
        p.set("b", &e, 0);
        let id = p.id().to_string();
        let back = parse_id(&id).unwrap();
        assert_eq!(back[&topic_key("a")].offset, 100);
        assert_eq!(back[&topic_key("b")].offset, 0);
        assert_eq!(back[&topic_key("b")].epoch, "mk2v9s1");
        // A topic leaving does not move the others.
        p.remove("a");
        let back = parse_id(p.id()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[&topic_key("b")].offset, 0);
        p.set("b", &e, u64::MAX);
        assert_eq!(parse_id(p.id()).unwrap()[&topic_key("b")].offset, u64::MAX);
        // Today's epochs carry a dot (`<ms>.<random>`); pending ones a `~`.
        for epoch in ["mx67cmcx.eucg", "~mx67cmcx"] {
            let e: Arc<str> = epoch.into();
            p.set("c", &e, 5);
            let back = parse_id(p.id()).unwrap();
            assert_eq!(back[&topic_key("c")].epoch, epoch);
            assert_eq!(back[&topic_key("c")].offset, 5);
        }
    }

    #[test]
    fn bad_ids_are_refused_with_a_reason() {
        for bad in [
            "",
            "2",
            "x",
            "1_",
            "1_a.b",
            "1_a.b_c.1",
            "1_zzzzzzz.e.1",
            "1_a..1",
            "1_a.e!.1",
            "1_a.e.-1",
        ] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_id(&"1".repeat(MAX_ID_BYTES + 1)),
            Err(IdError::TooLong(MAX_ID_BYTES + 1))
        );
        assert!(parse_id("1").unwrap().is_empty());
    }

    #[test]
    fn events_are_one_line_per_field() {
        let e = event("tick\nx", Some("1"), "{\n\"a\": 1\r\n}");
        assert_eq!(e.as_str(), "event: tick x\nid: 1\ndata: { \"a\": 1  }\n\n");
        assert_eq!(
            event("connected", None, "{}").as_str(),
            "event: connected\ndata: {}\n\n"
        );
    }

    #[test]
    fn topic_lists_are_checked() {
        assert_eq!(
            topics(
                Some("a".into()),
                Some("topic=b&topic=a&token=x&topic=c%2Fd"),
                10
            )
            .unwrap(),
            ["a", "b", "c/d"]
        );
        assert!(topics(None, Some("token=x"), 10).unwrap().is_empty());
        assert!(topics(None, Some("topic=bad%20topic"), 10).is_err());
        assert!(topics(None, Some("topic=a&topic=b"), 1).is_err());
        assert!(topics(None, Some("topic=%ZZ"), 10).is_err());
    }
}
