//! Drop-in ingest for back ends written for other realtime servers: their
//! emit calls stay as they are, Switchboard reads what they put on Redis.
//!
//! - [`python`]: python-socketio's `RedisManager(write_only=True)` /
//!   `AsyncRedisManager` / Flask-SocketIO `message_queue` (`COMPAT_PYTHON_SOCKETIO`);
//! - [`emitter`]: Node's `@socket.io/redis-emitter` (`COMPAT_SOCKETIO_EMITTER`);
//! - [`channels`]: `channels_redis`'s `RedisPubSubChannelLayer` group sends
//!   (`COMPAT_CHANNELS_PREFIX`);
//! - [`msgpack`]: the MessagePack reader the last two need.
//!
//! Every source decodes into an [`Action`]: an emit becomes one publication
//! per room through [`Hub::publish_routed`] (the same atomic path as
//! `POST /api/publish` and `FCALL switchboard_publish`: offsets on history
//! topics, every node's fan-out, never a delivery of its own); room changes
//! and disconnects go to the control bus, which reaches the client on
//! whichever node holds it.
//!
//! **Exactly once**: only the leader consumes ([`Compat::run`] is a leader
//! duty), so each message on Redis becomes one publication, not one per
//! node. Redis pub/sub keeps nothing for a subscriber that is not there: a
//! message published between the old leader's unsubscribe and the new
//! leader's subscribe is lost (the handover window, measured in
//! `tests/compat.rs` and documented in docs/migration.md).
//!
//! Nothing a publisher sends can stop the consumer: each message is
//! decoded, checked and published on its own; whatever cannot be served is
//! counted in `switchboard_compat_messages_total{source,outcome}` and
//! logged with its channel and why.

pub mod channels;
pub mod emitter;
pub mod msgpack;
pub mod python;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clients::{Command, Target};
use crate::config::CompatConfig;
use crate::control::ControlBus;
use crate::hub::{Hub, PublishError};
use crate::metrics as m;
use crate::protocol::{self, MAX_DATA_DEPTH, MAX_ROUTING, Routing, TOPIC_PATTERN};

/// The topic of an emit without a room ("to everyone"). Every Socket.IO
/// socket is subscribed to it at connect while an emitter source that can
/// emit to everyone is on; native clients subscribe to it like to any topic.
pub const BROADCAST: &str = "broadcast";

/// The close code of a `disconnect` / `disconnectSockets`: 45xx, "do not
/// reconnect", as a Socket.IO server-side disconnect.
pub const DISCONNECT_CODE: u16 = 4500;
const DISCONNECT_REASON: &str = "disconnected by the back end";

/// Room commands (enter_room, socketsJoin, …, one per client) waiting or in
/// flight at once; past it a message's commands are refused (`failed`).
const ROOM_COMMANDS: usize = 4096;

/// Room commands run in this many lanes, each in order: all of one client's
/// go through the same lane, so an `enter_room` and the `leave_room` after
/// it reach the client in that order (as on a Socket.IO server), while one
/// command waiting up to the control bus's answer timeout for an absent
/// client holds up only its lane.
const ROOM_LANES: u64 = 16;

/// What one message asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Emit(Emit),
    /// Change the rooms of (or disconnect) the clients with these ids.
    Rooms {
        clients: Vec<String>,
        command: RoomCommand,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum RoomCommand {
    Join(Vec<String>),
    Leave(Vec<String>),
    Disconnect,
}

/// An emit: `event` with `data` to every subscriber of `rooms` (none: of
/// [`BROADCAST`]), but not to the connections `except` names (client ids
/// or rooms).
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    pub rooms: Vec<String>,
    pub event: String,
    pub data: Value,
    pub except: Vec<String>,
    /// `data` holds the emit's arguments (none: `null`; several: a list),
    /// which Socket.IO clients get as separate arguments.
    pub spread: bool,
}

impl Emit {
    /// `data` for an emit's `args`: the one argument, or (spread) `null`
    /// for none and the list for several.
    pub fn args(mut args: Vec<Value>) -> (Value, bool) {
        match args.len() {
            0 => (Value::Null, true),
            1 => (args.pop().expect("one"), false),
            _ => (Value::Array(args), true),
        }
    }
}

/// The `outcome` label of [`m::COMPAT_MESSAGES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An emit that became its publication(s).
    Published,
    /// A room change or disconnect handed to the control bus.
    Applied,
    /// Well-formed, but asks for what Switchboard cannot serve (pickle,
    /// another namespace, binary, a callback, …).
    Refused,
    /// Not a message of the source's format (bad JSON or msgpack, wrong shape).
    Malformed,
    /// Fails the checks every publication passes (size, depth, names).
    Invalid,
    /// Could not be published (Redis unreachable) or room commands were busy.
    Failed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Applied => "applied",
            Outcome::Refused => "refused",
            Outcome::Malformed => "malformed",
            Outcome::Invalid => "invalid",
            Outcome::Failed => "failed",
        }
    }
}

/// Why a message was not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub outcome: Outcome,
    pub why: String,
}

impl Refusal {
    pub fn refused(why: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Refused,
            why: why.into(),
        }
    }
    pub fn malformed(why: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Malformed,
            why: why.into(),
        }
    }
    pub fn invalid(why: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Invalid,
            why: why.into(),
        }
    }
    fn from_msgpack(e: msgpack::MsgpackError) -> Self {
        use msgpack::MsgpackError as E;
        match e {
            E::TooDeep(_) => Refusal::invalid(protocol::TOO_DEEP),
            E::Binary | E::Extension(_) => Refusal::refused(format!(
                "{e}: binary attachments cannot be served (send base64 in JSON instead)"
            )),
            other => Refusal::malformed(other.to_string()),
        }
    }
}

/// Parses a JSON message, refusing over-deep ones before the parser sees them.
fn parse_json(payload: &[u8]) -> Result<Value, Refusal> {
    // The message's own wrapping (object, data list) takes two levels.
    if protocol::json_depth_exceeds(payload, MAX_DATA_DEPTH + 2) {
        return Err(Refusal::invalid(protocol::TOO_DEEP));
    }
    serde_json::from_slice(payload).map_err(|e| Refusal::malformed(format!("not JSON: {e}")))
}

/// A value for a log line, at most 80 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Which source a message came from: the `source` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    PythonSocketio,
    SocketioEmitter,
    Channels,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::PythonSocketio => "python-socketio",
            Source::SocketioEmitter => "socketio-emitter",
            Source::Channels => "channels",
        }
    }
}

/// What a channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind<'a> {
    Python,
    /// `key#<nsp>#…`, with the namespace.
    Broadcast(&'a str),
    /// `key-request#<nsp>#`, with the namespace.
    Request(&'a str),
    /// `{prefix}__group__<group>`.
    Group(&'a str),
}

impl Kind<'_> {
    fn source(&self) -> Source {
        match self {
            Kind::Python => Source::PythonSocketio,
            Kind::Broadcast(_) | Kind::Request(_) => Source::SocketioEmitter,
            Kind::Group(_) => Source::Channels,
        }
    }
}

/// The leader's consumer of the configured sources.
pub struct Compat {
    config: CompatConfig,
    url: String,
    hub: Hub,
    control: Arc<dyn ControlBus>,
    /// `HTTP_BODY_LIMIT`: the most `POST /api/publish` takes, and so the
    /// most one message may be.
    max_bytes: usize,
    room_commands: Arc<Semaphore>,
    /// Started on first use, from the consumer's task.
    room_lanes: std::sync::OnceLock<Vec<tokio::sync::mpsc::UnboundedSender<RoomJob>>>,
    log: LogLimit,
}

/// One client's commands of one message, holding its place in
/// [`ROOM_COMMANDS`] until they ran.
struct RoomJob {
    client: String,
    commands: Arc<[Command]>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Compat {
    /// `None` when no source is configured.
    pub fn new(
        config: &CompatConfig,
        url: &str,
        hub: Hub,
        control: Arc<dyn ControlBus>,
        max_bytes: usize,
    ) -> Option<Arc<Self>> {
        config.any().then(|| {
            Arc::new(Compat {
                config: config.clone(),
                url: url.to_string(),
                hub,
                control,
                max_bytes,
                room_commands: Arc::new(Semaphore::new(ROOM_COMMANDS)),
                room_lanes: std::sync::OnceLock::new(),
                log: LogLimit::default(),
            })
        })
    }

    /// The channels and patterns to listen on.
    pub fn subscriptions(&self) -> (Vec<String>, Vec<String>) {
        let mut channels = vec![];
        let mut patterns = vec![];
        if let Some(c) = &self.config.python_socketio {
            channels.push(c.clone());
        }
        if let Some(key) = &self.config.socketio_emitter {
            // Every namespace, so that other ones are counted as refused.
            patterns.push(format!("{key}#*"));
            patterns.push(format!("{key}-request#*"));
        }
        if let Some(prefix) = &self.config.channels_prefix {
            patterns.push(format!("{prefix}__group__*"));
        }
        (channels, patterns)
    }

    /// Consumes until `stop` (the end of this node's leadership term).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let (channels, patterns) = self.subscriptions();
        let mut rx =
            match crate::redis::listen_patterns(&self.url, channels, patterns, stop.clone()) {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::error!(cause = %e, "compat consumer could not start");
                    return;
                }
            };
        tracing::info!("compat consumer started (this node leads)");
        loop {
            let (channel, payload) = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            self.handle(&channel, &payload).await;
        }
        tracing::info!("compat consumer stopped");
    }

    fn kind<'a>(&self, channel: &'a str) -> Option<Kind<'a>> {
        if self.config.python_socketio.as_deref() == Some(channel) {
            return Some(Kind::Python);
        }
        if let Some(key) = &self.config.socketio_emitter {
            if let Some(rest) = channel
                .strip_prefix(key.as_str())
                .and_then(|r| r.strip_prefix("-request#"))
            {
                return Some(Kind::Request(emitter::namespace(rest)));
            }
            if let Some(rest) = channel
                .strip_prefix(key.as_str())
                .and_then(|r| r.strip_prefix('#'))
            {
                return Some(Kind::Broadcast(emitter::namespace(rest)));
            }
        }
        if let Some(prefix) = &self.config.channels_prefix
            && let Some(group) = channel
                .strip_prefix(prefix.as_str())
                .and_then(|r| r.strip_prefix("__group__"))
        {
            return Some(Kind::Group(group));
        }
        None
    }

    /// Serves one message of `channel`; never fails, whatever it holds.
    pub async fn handle(&self, channel: &str, payload: &[u8]) -> Outcome {
        let Some(kind) = self.kind(channel) else {
            return Outcome::Refused;
        };
        let source = kind.source();
        let result = match self.decode(&kind, payload) {
            Ok(Action::Emit(emit)) => self.emit(emit).await,
            Ok(Action::Rooms { clients, command }) => self.rooms(clients, command),
            Err(r) => Err(r),
        };
        let outcome = match result {
            Ok(o) => o,
            Err(r) => {
                if self.log.allow() {
                    let channel = short(&Value::String(channel.into()));
                    tracing::warn!(
                        source = source.label(),
                        channel = %channel,
                        outcome = r.outcome.label(),
                        bytes = payload.len(),
                        "compat message not served: {}",
                        r.why
                    );
                }
                r.outcome
            }
        };
        metrics::counter!(m::COMPAT_MESSAGES, "source" => source.label(), "outcome" => outcome.label())
            .increment(1);
        outcome
    }

    fn decode(&self, kind: &Kind<'_>, payload: &[u8]) -> Result<Action, Refusal> {
        if payload.len() > self.max_bytes {
            return Err(Refusal::invalid(format!(
                "{} bytes, more than a publication may have (HTTP_BODY_LIMIT={})",
                payload.len(),
                self.max_bytes
            )));
        }
        match kind {
            Kind::Python => python::decode(payload),
            Kind::Broadcast(nsp) | Kind::Request(nsp) if *nsp != "/" => {
                Err(Refusal::refused(format!(
                    "namespace {} cannot be served: Switchboard serves the default namespace \"/\" only",
                    short(&Value::String(nsp.to_string()))
                )))
            }
            Kind::Broadcast(_) => emitter::decode_broadcast(payload),
            Kind::Request(_) => emitter::decode_request(payload),
            Kind::Group(group) => channels::decode(group, payload),
        }
    }

    /// One publication per room, each carrying the others (`rooms`: a
    /// connection in several gets it once) and `except`.
    async fn emit(&self, emit: Emit) -> Result<Outcome, Refusal> {
        if !protocol::valid_topic(&emit.event) {
            return Err(Refusal::invalid(format!(
                "event name {} must match {TOPIC_PATTERN}",
                short(&Value::String(emit.event))
            )));
        }
        // The bound before the de-duplication: a message of a million room
        // names must not cost a million times a million comparisons.
        if emit.rooms.len() > MAX_ROUTING || emit.except.len() > MAX_ROUTING {
            return Err(Refusal::invalid(format!(
                "more than {MAX_ROUTING} rooms or exceptions in one emit"
            )));
        }
        let mut rooms: Vec<String> = Vec::with_capacity(emit.rooms.len().max(1));
        for room in emit.rooms {
            if !rooms.contains(&room) {
                rooms.push(room);
            }
        }
        if rooms.is_empty() {
            rooms.push(BROADCAST.to_string());
        }
        if let Some(bad) = rooms.iter().find(|r| !protocol::valid_topic(r)) {
            return Err(Refusal::invalid(format!(
                "room {} is not a valid topic: must match {TOPIC_PATTERN}",
                short(&Value::String(bad.clone()))
            )));
        }
        // A Socket.IO server puts each socket in a room named by its sid;
        // Switchboard has no per-connection topics, and such an emit would
        // go to a topic nobody subscribes to: refuse it loudly instead.
        if let Some(sid) = rooms
            .iter()
            .find(|r| crate::hub::client_conn_id(r).is_some())
        {
            return Err(Refusal::refused(format!(
                "an emit to one socket (room {sid} is a client id) cannot be served: put the socket in a topic of its own (enter_room / socketsJoin / POST /api/subscribe) and emit there"
            )));
        }
        if rooms.iter().any(|r| r == crate::device::state::TOPIC) {
            return Err(Refusal::invalid(
                "topic \"device\" carries device state: it is changed through the device API only",
            ));
        }
        let data = serde_json::to_string(&emit.data).expect("JSON values serialize");
        if protocol::json_depth_exceeds(&data, MAX_DATA_DEPTH) {
            return Err(Refusal::invalid(protocol::TOO_DEEP));
        }
        let data = RawValue::from_string(data).expect("serialized JSON");
        // Names that cannot be topics or client ids can match no connection.
        let except: Vec<String> = emit
            .except
            .into_iter()
            .filter(|e| protocol::valid_topic(e))
            .collect();
        let routing = Routing {
            except,
            rooms: if rooms.len() > 1 {
                rooms.clone()
            } else {
                vec![]
            },
            spread: emit.spread,
        };
        for room in &rooms {
            if let Err(e) = self
                .hub
                .publish_routed(room, &emit.event, &data, None, &routing)
                .await
            {
                return Err(match e {
                    PublishError::Refused(why) => Refusal::invalid(why),
                    PublishError::Unavailable(why) => Refusal {
                        outcome: Outcome::Failed,
                        why: format!("not published on \"{room}\": {why}"),
                    },
                });
            }
        }
        Ok(Outcome::Published)
    }

    /// Hands room changes and disconnects to the control bus, in a task of
    /// their own: a client that is nowhere costs the bus's answer timeout,
    /// which must not hold up the emits behind it.
    fn rooms(&self, clients: Vec<String>, command: RoomCommand) -> Result<Outcome, Refusal> {
        let commands: Vec<Command> = match command {
            RoomCommand::Join(rooms) | RoomCommand::Leave(rooms)
                if rooms.iter().any(|r| !protocol::valid_topic(r)) =>
            {
                return Err(Refusal::invalid(format!(
                    "a room must be a valid topic ({TOPIC_PATTERN})"
                )));
            }
            RoomCommand::Join(rooms) => rooms
                .into_iter()
                .map(|r| Command::Subscribe { topic: r.into() })
                .collect(),
            RoomCommand::Leave(rooms) => rooms
                .into_iter()
                .map(|r| Command::Unsubscribe { topic: r.into() })
                .collect(),
            RoomCommand::Disconnect => vec![Command::Disconnect {
                code: DISCONNECT_CODE,
                reason: DISCONNECT_REASON.into(),
            }],
        };
        // Every client id is its connection id in hex: anything else (a sid
        // of another Socket.IO server) names nobody here, and would only
        // cost the control bus's answer timeout.
        if let Some(bad) = clients
            .iter()
            .find(|c| crate::hub::client_conn_id(c).is_none())
        {
            return Err(Refusal::refused(format!(
                "{} is not a Switchboard client id (16 hex digits, the socket's sid)",
                short(&Value::String(bad.clone()))
            )));
        }
        if clients.len() * commands.len() > MAX_ROUTING {
            return Err(Refusal::invalid(format!(
                "more than {MAX_ROUTING} client × room commands in one message"
            )));
        }
        let Ok(mut all) = self
            .room_commands
            .clone()
            .try_acquire_many_owned(clients.len() as u32)
        else {
            return Err(Refusal {
                outcome: Outcome::Failed,
                why: format!("{ROOM_COMMANDS} room commands are already waiting"),
            });
        };
        let commands: Arc<[Command]> = commands.into();
        let lanes = self.room_lanes.get_or_init(|| {
            (0..ROOM_LANES)
                .map(|_| {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(room_lane(self.control.clone(), rx));
                    tx
                })
                .collect()
        });
        let mut permits = Vec::with_capacity(clients.len());
        while all.num_permits() > 1 {
            permits.extend(all.split(1));
        }
        permits.push(all);
        for (client, permit) in clients.into_iter().zip(permits) {
            let lane = crate::hub::client_conn_id(&client).unwrap_or(0) % ROOM_LANES;
            let job = RoomJob {
                client,
                commands: commands.clone(),
                _permit: permit,
            };
            // A lane ends only with the node's runtime.
            let _ = lanes[lane as usize].send(job);
        }
        Ok(Outcome::Applied)
    }
}

/// Runs one lane's room commands, one after another.
async fn room_lane(
    control: Arc<dyn ControlBus>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<RoomJob>,
) {
    while let Some(job) = jobs.recv().await {
        for command in job.commands.iter() {
            match control
                .run(Target::Client(job.client.clone()), command.clone())
                .await
            {
                Ok(r) => tracing::debug!(
                    client = job.client,
                    command = command.label(),
                    reached = r.reached,
                    "compat room command"
                ),
                Err(e) => tracing::warn!(
                    client = job.client,
                    command = command.label(),
                    cause = %e,
                    "compat room command not sent"
                ),
            }
        }
    }
}

/// At most [`LogLimit::PER_SECOND`] log lines a second: a publisher that
/// sends garbage in a loop must not flood the log (the counter has them all).
#[derive(Default)]
struct LogLimit {
    second: AtomicU64,
    lines: AtomicU64,
}

impl LogLimit {
    const PER_SECOND: u64 = 20;

    fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.lines.store(0, Ordering::Relaxed);
        }
        self.lines.fetch_add(1, Ordering::Relaxed) < Self::PER_SECOND
    }
}
