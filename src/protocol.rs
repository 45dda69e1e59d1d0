//! Wire types: the native JSON protocol and the publisher envelope.
//!
//! Everything that crosses a socket or a Redis channel is defined here, and
//! documented in `docs/protocol.md`. Parsing never panics and every rejection
//! carries a sentence a client developer can act on.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The rule for topic and event names, as shown to clients.
pub const TOPIC_PATTERN: &str = "^[A-Za-z0-9_.:/-]{1,128}$";

/// Whether `name` is a valid topic (or event) name: 1 to 128 characters from
/// `A-Z a-z 0-9 _ . : / -`.
pub fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b))
}

/// How deeply publication `data` may nest arrays and objects: `data` that
/// is itself an array or object is level 1, so `[[1]]` has depth 2 and a
/// scalar has depth 0. Deeper data is refused at every entry point (REST,
/// native and Socket.IO `publish`, Redis publishers, mock events), so that
/// no subscriber's JSON parser has to choke on it.
pub const MAX_DATA_DEPTH: usize = 64;

/// The sentence every entry point answers deeper data with.
pub const TOO_DEEP: &str =
    "data is nested too deeply: at most 64 levels of arrays and objects are allowed";

/// Whether the JSON text `raw` nests arrays and objects deeper than `max`
/// levels. One pass over the bytes, no recursion and no allocation, so it is
/// safe on hostile input of any depth; brackets inside strings (escapes
/// included) do not count. It does not validate the JSON: run it before a
/// parser (serde_json gives up at 128 levels with a less helpful message).
pub fn json_depth_exceeds(raw: impl AsRef<[u8]>, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in raw.as_ref() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// ISO-8601 UTC with milliseconds, such as `2026-11-22T10:00:00.123Z`.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

// === client → server ===

/// A message a native client may send.
#[derive(Debug, Clone)]
pub enum ClientMessage {
    Subscribe {
        event: String,
        /// Where the client stopped: recover what it missed since then.
        since: Option<Since>,
        /// Passed to the subscribe hook (`PROXY_SUBSCRIBE_URL`).
        data: Option<Box<RawValue>>,
        /// `"presence": true`: the client wants `presence_diff` frames.
        presence: bool,
    },
    Unsubscribe {
        event: String,
    },
    Request {
        event: String,
    },
    /// Who is present on topic `event` (`PRESENCE_TOPICS`).
    Presence {
        event: String,
    },
    /// How many clients and users are present on topic `event`.
    PresenceStats {
        event: String,
    },
    /// A liveness check; `id` (a JSON string or number), when given, comes
    /// back in the `pong`, so that a client can tell which of its pings an
    /// answer belongs to after one of them timed out.
    Ping {
        id: Option<Box<RawValue>>,
    },
    /// Publish to topic `event` (allowed only by a token's `publish` claim).
    Publish {
        event: String,
        name: Option<String>,
        data: Box<RawValue>,
    },
    /// Replace the connection's token before it expires.
    Refresh {
        token: String,
    },
    /// A call answered by the application back end (`PROXY_RPC_URL`).
    Rpc {
        /// The client's id of the call (a JSON string or number), echoed as is.
        id: Box<RawValue>,
        method: String,
        data: Box<RawValue>,
    },
}

/// A client's position in a history topic: the last offset it received in
/// the topic's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub offset: u64,
    pub epoch: String,
}

/// Why a client frame was rejected. The text is sent to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    #[error("message must be a JSON object with a \"type\" field")]
    NotObject,
    #[error("message has no \"type\" field")]
    MissingType,
    #[error("\"type\" must be a string")]
    TypeNotString,
    #[error(
        "unknown message type \"{0}\": expected subscribe, unsubscribe, request, presence, presence_stats, ping, publish, refresh or rpc"
    )]
    UnknownType(String),
    #[error("\"presence\" must be true or false")]
    InvalidPresence,
    #[error("\"{0}\" message needs an \"event\" field naming the topic")]
    MissingEvent(&'static str),
    #[error("\"event\" must be a string")]
    EventNotString,
    #[error("invalid topic name \"{0}\": must match {TOPIC_PATTERN}")]
    InvalidTopic(String),
    #[error("binary frames are not supported: send JSON text frames")]
    Binary,
    #[error("\"publish\" message needs a \"data\" field")]
    MissingData,
    #[error("invalid event name \"{0}\": must match {TOPIC_PATTERN}")]
    InvalidName(String),
    #[error("\"since\" must be an object {{\"offset\": <integer ≥ 0>, \"epoch\": \"<string>\"}}")]
    InvalidSince,
    #[error("{TOO_DEEP}")]
    TooDeep,
    #[error("\"refresh\" message needs a \"token\" field with the new token")]
    MissingToken,
    #[error("\"rpc\" message needs an \"id\": a string of at most 128 characters or a number")]
    BadRpcId,
    /// A bad `rpc` whose `id` could be read: the error frame carries it.
    #[error("{why}")]
    BadRpc { id: String, why: String },
}

impl ProtocolError {
    /// The type of the message this error answers, when the parser got far
    /// enough to know it (the `replyTo` of the `error` frame).
    pub fn reply_to(&self) -> Option<&'static str> {
        match self {
            ProtocolError::MissingEvent(kind) => Some(kind),
            ProtocolError::InvalidSince | ProtocolError::InvalidPresence => Some("subscribe"),
            ProtocolError::MissingData | ProtocolError::InvalidName(_) => Some("publish"),
            ProtocolError::MissingToken => Some("refresh"),
            ProtocolError::BadRpcId | ProtocolError::BadRpc { .. } => Some("rpc"),
            _ => None,
        }
    }

    /// Stable machine-readable code sent beside the text.
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::NotJson(_) | ProtocolError::NotObject | ProtocolError::Binary => {
                "bad_message"
            }
            ProtocolError::MissingType
            | ProtocolError::TypeNotString
            | ProtocolError::UnknownType(_) => "bad_type",
            ProtocolError::MissingEvent(_) | ProtocolError::EventNotString => "bad_event",
            ProtocolError::InvalidTopic(_) => "bad_topic",
            ProtocolError::MissingData
            | ProtocolError::InvalidName(_)
            | ProtocolError::InvalidSince
            | ProtocolError::InvalidPresence
            | ProtocolError::TooDeep
            | ProtocolError::MissingToken
            | ProtocolError::BadRpcId
            | ProtocolError::BadRpc { .. } => "bad_message",
        }
    }
}

/// Parses one text frame. Unknown extra fields are ignored so that clients
/// written for other servers keep working.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ProtocolError> {
    // The message object is level 1, its `data` level 2.
    if json_depth_exceeds(text, MAX_DATA_DEPTH + 1) {
        return Err(ProtocolError::TooDeep);
    }
    // The fields as their text: `data` goes on as the client wrote it
    // (key order, number spelling), the others are read as values.
    let fields: std::collections::BTreeMap<String, Box<RawValue>> = match serde_json::from_str(text)
    {
        Ok(fields) => fields,
        Err(_) => {
            serde_json::from_str::<serde::de::IgnoredAny>(text)
                .map_err(|e| ProtocolError::NotJson(e.to_string()))?;
            return Err(ProtocolError::NotObject);
        }
    };
    let mut data: Option<Box<RawValue>> = None;
    let mut obj = serde_json::Map::new();
    for (key, raw) in fields {
        if key == "data" {
            data = Some(raw);
        } else {
            let value = serde_json::from_str(raw.get()).expect("a field of a parsed object");
            obj.insert(key, value);
        }
    }

    let ty = match obj.get("type") {
        None => return Err(ProtocolError::MissingType),
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(_) => return Err(ProtocolError::TypeNotString),
    };
    let event = |kind: &'static str| -> Result<String, ProtocolError> {
        match obj.get("event") {
            None | Some(serde_json::Value::Null) => Err(ProtocolError::MissingEvent(kind)),
            Some(serde_json::Value::String(s)) if valid_topic(s) => Ok(s.clone()),
            Some(serde_json::Value::String(s)) => {
                Err(ProtocolError::InvalidTopic(truncate(s, 140)))
            }
            Some(_) => Err(ProtocolError::EventNotString),
        }
    };
    match ty {
        "subscribe" => Ok(ClientMessage::Subscribe {
            event: event("subscribe")?,
            since: match obj.get("since") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(parse_since(v)?),
            },
            // `null` is no data (a publish's `null` is JSON null).
            data: data.filter(|d| d.get().trim() != "null"),
            presence: match obj.get("presence") {
                None | Some(serde_json::Value::Null) => false,
                Some(serde_json::Value::Bool(b)) => *b,
                Some(_) => return Err(ProtocolError::InvalidPresence),
            },
        }),
        "unsubscribe" => Ok(ClientMessage::Unsubscribe {
            event: event("unsubscribe")?,
        }),
        "request" => Ok(ClientMessage::Request {
            event: event("request")?,
        }),
        "presence" => Ok(ClientMessage::Presence {
            event: event("presence")?,
        }),
        "presence_stats" => Ok(ClientMessage::PresenceStats {
            event: event("presence_stats")?,
        }),
        // An `id` that is not a call id is ignored, as any unknown field
        // was before ids were echoed: a client that sent one still gets
        // its `pong`.
        "ping" => Ok(ClientMessage::Ping {
            id: obj.get("id").and_then(call_id),
        }),
        "publish" => {
            let event = event("publish")?;
            let name = match obj.get("name") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(n)) if valid_topic(n) => Some(n.clone()),
                // A string as itself (its text goes between quotes in the
                // message), anything else as its JSON.
                Some(serde_json::Value::String(n)) => {
                    return Err(ProtocolError::InvalidName(truncate(n, 140)));
                }
                Some(other) => {
                    return Err(ProtocolError::InvalidName(truncate(
                        &other.to_string(),
                        140,
                    )));
                }
            };
            let data = data.ok_or(ProtocolError::MissingData)?;
            Ok(ClientMessage::Publish { event, name, data })
        }
        "refresh" => match obj.get("token") {
            Some(serde_json::Value::String(t)) if !t.is_empty() => {
                Ok(ClientMessage::Refresh { token: t.clone() })
            }
            _ => Err(ProtocolError::MissingToken),
        },
        "rpc" => {
            let id = obj
                .get("id")
                .and_then(call_id)
                .ok_or(ProtocolError::BadRpcId)?
                .get()
                .to_owned();
            let bad = |why: String| ProtocolError::BadRpc {
                id: id.clone(),
                why,
            };
            let method = match obj.get("method") {
                Some(serde_json::Value::String(m)) if valid_topic(m) => m.clone(),
                Some(serde_json::Value::String(m)) => {
                    return Err(bad(format!(
                        "invalid rpc method \"{}\": must match {TOPIC_PATTERN}",
                        truncate(m, 140)
                    )));
                }
                _ => return Err(bad("\"rpc\" message needs a \"method\" string".into())),
            };
            let data =
                data.unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"));
            Ok(ClientMessage::Rpc {
                id: RawValue::from_string(id).expect("a serialized JSON value"),
                method,
                data,
            })
        }
        other => Err(ProtocolError::UnknownType(truncate(other, 64))),
    }
}

/// A client's id of an `rpc` or a `ping`, echoed as it came: a number, or
/// a string of at most 128 characters.
fn call_id(v: &serde_json::Value) -> Option<Box<RawValue>> {
    match v {
        serde_json::Value::Number(_) => {}
        serde_json::Value::String(s) if s.chars().count() <= 128 => {}
        _ => return None,
    }
    serde_json::value::to_raw_value(v).ok()
}

/// `{"offset": N, "epoch": "E"}`.
pub fn parse_since(v: &serde_json::Value) -> Result<Since, ProtocolError> {
    let offset = v.get("offset").and_then(serde_json::Value::as_u64);
    let epoch = v.get("epoch").and_then(serde_json::Value::as_str);
    match (offset, epoch) {
        (Some(offset), Some(epoch)) if epoch.len() <= 64 => Ok(Since {
            offset,
            epoch: epoch.to_string(),
        }),
        _ => Err(ProtocolError::InvalidSince),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

// === server → client ===

/// A message the server sends on the native protocol. Serialized with
/// [`ServerMessage::to_json`]; publications use [`event_frame`] instead so
/// that they are serialized once for all subscribers.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage<'a> {
    Connected {
        #[serde(rename = "clientId")]
        client_id: &'a str,
        timestamp: String,
        message: &'a str,
    },
    Subscribed {
        event: &'a str,
        /// History topics: the topic's current top offset (0 before the first publication).
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// History topics: the epoch of the topic's history.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        /// Present when the client sent `since`: whether everything it missed follows.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// Connections with `?format=compact`: the number this node's
        /// compact frames carry for the topic.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        timestamp: String,
    },
    Unsubscribed {
        event: &'a str,
        /// Set when the server unsubscribed the client (`permission revoked`).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        timestamp: String,
    },
    /// The answer to `refresh`: the new token's `exp` in Unix milliseconds.
    Refreshed {
        #[serde(rename = "expiresAt")]
        expires_at: Option<u64>,
        timestamp: String,
    },
    Response {
        event: &'a str,
        data: &'a RawValue,
        /// History topics: the offset of the publication answered.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        timestamp: String,
    },
    /// Publications `from..=to` of `epoch` on topic `event` are lost and will
    /// not be delivered; the subscription continues after `to`.
    Gap {
        event: &'a str,
        from: u64,
        to: u64,
        epoch: &'a str,
        /// Set when the topic's history was reset (Redis lost it): the client's
        /// position in the previous epoch is void.
        #[serde(rename = "previousEpoch", skip_serializing_if = "Option::is_none")]
        previous_epoch: Option<&'a str>,
        timestamp: String,
    },
    Pong {
        /// The ping's `id`, when it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        timestamp: String,
    },
    Error {
        error: String,
        code: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<&'a str>,
        /// The type of the client message this error answers, so that a
        /// client can match it to what it sent without reading the text.
        #[serde(rename = "replyTo", skip_serializing_if = "Option::is_none")]
        reply_to: Option<&'a str>,
        timestamp: String,
    },
    /// The back end's answer to `rpc` `id`.
    #[serde(rename = "rpc_result")]
    RpcResult {
        id: &'a RawValue,
        data: &'a RawValue,
        timestamp: String,
    },
    /// An `rpc` that got no result: `rpc_failed` (the back end's `error`,
    /// whose numeric code is `backendCode`), `unavailable`, `forbidden`,
    /// `bad_message`.
    #[serde(rename = "error")]
    RpcError {
        id: &'a RawValue,
        error: String,
        code: &'a str,
        #[serde(rename = "backendCode", skip_serializing_if = "Option::is_none")]
        backend_code: Option<i64>,
        /// Always `rpc`, like `replyTo` of the other `error` frames.
        #[serde(rename = "replyTo")]
        reply_to: &'static str,
        timestamp: String,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

#[derive(Serialize)]
struct EventFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    timestamp: &'a str,
}

/// The native `event` frame of a publication: `topic` is present only when it
/// differs from the event name, `offset` only on history topics.
pub fn event_frame(
    topic: &str,
    event: &str,
    data: &RawValue,
    offset: Option<u64>,
    timestamp: &str,
) -> String {
    serde_json::to_string(&EventFrame {
        ty: "event",
        name: event,
        topic: (topic != event).then_some(topic),
        data,
        offset,
        timestamp,
    })
    .expect("event frames always serialize")
}

/// The native compact `event` frame a client asks for with
/// `?format=compact`: a JSON array, `[topic_id, data]`, then the offset on
/// history topics, then the event name when it differs from the topic
/// (`[7,{"n":1},42,"tick"]`). `topic_id` is the number the connection's
/// `subscribed` answer gave the topic; no `type`, no timestamp.
pub fn compact_event_frame(
    topic_id: u32,
    topic: &str,
    event: &str,
    data: &RawValue,
    offset: Option<u64>,
) -> String {
    let mut frame = String::with_capacity(data.get().len() + 32);
    frame.push('[');
    frame.push_str(&topic_id.to_string());
    frame.push(',');
    frame.push_str(data.get());
    if let Some(offset) = offset {
        frame.push(',');
        frame.push_str(&offset.to_string());
    }
    if topic != event {
        frame.push(',');
        frame.push_str(&serde_json::to_string(event).expect("strings serialize"));
    }
    frame.push(']');
    frame
}

// === publisher envelope ===

/// What a publisher puts on `{prefix}:t:{topic}`: `{"event": "...", "data": ...}`.
/// `event` defaults to the topic. `v` is reserved for future versions.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub v: Option<u32>,
    #[serde(default)]
    pub event: Option<String>,
    pub data: Box<RawValue>,
    /// Set by the leader on device state: the fencing epoch that wrote it.
    #[serde(default)]
    pub fence: Option<u64>,
    /// History topics: assigned by the history publish (`switchboard_publish`).
    #[serde(default)]
    pub offset: Option<u64>,
    /// History topics: the epoch of the topic's history, with `offset`.
    #[serde(default)]
    pub epoch: Option<String>,
    /// Connections that must not get this publication: each entry is a
    /// client id (the connection with that id) or a topic (every connection
    /// subscribed to it). Socket.IO's `skip_sid` and `except`.
    #[serde(default)]
    pub except: Option<Vec<String>>,
    /// The topics one emit to several rooms was published on, this one
    /// among them: a connection subscribed to several of them gets it only
    /// through the first of them in this list (Socket.IO delivers an emit to
    /// several rooms once per socket).
    #[serde(default)]
    pub rooms: Option<Vec<String>>,
    /// `data` is the list of a Socket.IO emit's arguments (zero or several;
    /// `null` for none): Socket.IO clients get them as separate arguments,
    /// as from a Socket.IO server; native clients get `data` as it is.
    #[serde(default)]
    pub spread: Option<bool>,
}

/// How many entries `except` and `rooms` may have.
pub const MAX_ROUTING: usize = 1024;

/// Why a publisher payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("payload is not a JSON object with a \"data\" field: {0}")]
    NotJson(String),
    #[error("unsupported envelope version {0}: this node understands version 1")]
    Version(u32),
    #[error("invalid event name \"{0}\": must match {TOPIC_PATTERN}")]
    InvalidEvent(String),
    #[error("\"offset\" and \"epoch\" must come together")]
    HalfPosition,
    #[error("\"{0}\" must be a list of at most 1024 names, each matching {TOPIC_PATTERN}")]
    Routing(&'static str),
    #[error("{TOO_DEEP}")]
    TooDeep,
}

/// A validated publication as carried between nodes.
#[derive(Debug, Clone)]
pub struct ParsedEnvelope {
    pub event: Option<String>,
    pub data: Arc<RawValue>,
    pub fence: Option<u64>,
    /// Offset and epoch, on publications of a history topic.
    pub position: Option<(u64, String)>,
    /// [`Envelope::except`] and [`Envelope::rooms`].
    pub routing: Routing,
}

/// Who gets a publication besides "every subscriber of its topic": see
/// [`Envelope::except`] and [`Envelope::rooms`]. Empty for almost every
/// publication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub except: Vec<String>,
    pub rooms: Vec<String>,
    /// [`Envelope::spread`].
    pub spread: bool,
}

impl Routing {
    /// Whether nobody is excluded (`spread` aside: it changes no audience).
    pub fn is_empty(&self) -> bool {
        self.except.is_empty() && self.rooms.is_empty()
    }
}

fn routing_list(
    list: Option<Vec<String>>,
    name: &'static str,
) -> Result<Vec<String>, EnvelopeError> {
    let list = list.unwrap_or_default();
    if list.len() > MAX_ROUTING || !list.iter().all(|n| valid_topic(n)) {
        return Err(EnvelopeError::Routing(name));
    }
    Ok(list)
}

pub fn parse_envelope(payload: &[u8]) -> Result<ParsedEnvelope, EnvelopeError> {
    // The envelope object is level 1, its `data` level 2.
    if json_depth_exceeds(payload, MAX_DATA_DEPTH + 1) {
        return Err(EnvelopeError::TooDeep);
    }
    let env: Envelope =
        serde_json::from_slice(payload).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    if let Some(v) = env.v
        && v != 1
    {
        return Err(EnvelopeError::Version(v));
    }
    if let Some(event) = &env.event
        && !valid_topic(event)
    {
        return Err(EnvelopeError::InvalidEvent(truncate(event, 140)));
    }
    let position = match (env.offset, env.epoch) {
        (Some(offset), Some(epoch)) => Some((offset, epoch)),
        (None, None) => None,
        _ => return Err(EnvelopeError::HalfPosition),
    };
    let routing = Routing {
        except: routing_list(env.except, "except")?,
        rooms: routing_list(env.rooms, "rooms")?,
        spread: env.spread == Some(true),
    };
    Ok(ParsedEnvelope {
        event: env.event,
        data: Arc::from(env.data),
        fence: env.fence,
        position,
        routing,
    })
}

/// Encodes an envelope the way this node's own publishers do.
pub fn encode_envelope(event: &str, data: &RawValue, fence: Option<u64>) -> String {
    encode_routed_envelope(event, data, fence, &Routing::default())
}

/// [`encode_envelope`] with `except` and `rooms` (left out when empty).
pub fn encode_routed_envelope(
    event: &str,
    data: &RawValue,
    fence: Option<u64>,
    routing: &Routing,
) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        v: u32,
        event: &'a str,
        data: &'a RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        fence: Option<u64>,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        except: &'a [String],
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        rooms: &'a [String],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        spread: bool,
    }
    serde_json::to_string(&Out {
        v: 1,
        event,
        data,
        fence,
        except: &routing.except,
        rooms: &routing.rooms,
        spread: routing.spread,
    })
    .expect("envelopes always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/protocol.md: `data` is passed through byte for byte, from a
    /// native publish as from `POST /api/publish` or Redis.
    #[test]
    fn a_publish_keeps_its_data_as_written() {
        let data = r#"{"z":1,"a":[1e3, 12345678901234567890123],"s":"\u00e9"}"#;
        let frame = format!(r#"{{"type":"publish","event":"t","data":{data}}}"#);
        match parse_client_message(&frame) {
            Ok(ClientMessage::Publish { data: d, .. }) => assert_eq!(d.get(), data),
            other => panic!("{other:?}"),
        }
        let null = r#"{"type":"publish","event":"t","data":null}"#;
        match parse_client_message(null) {
            Ok(ClientMessage::Publish { data, .. }) => assert_eq!(data.get(), "null"),
            other => panic!("{other:?}"),
        }
        let sub = r#"{"type":"subscribe","event":"t","data":null}"#;
        assert!(matches!(
            parse_client_message(sub),
            Ok(ClientMessage::Subscribe { data: None, .. })
        ));
        let rpc = r#"{"type":"rpc","id":1,"method":"m","data":{"b":2,"a":1}}"#;
        match parse_client_message(rpc) {
            Ok(ClientMessage::Rpc { data, .. }) => assert_eq!(data.get(), r#"{"b":2,"a":1}"#),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_client_message("[1]"),
            Err(ProtocolError::NotObject)
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"publish","data":}"#),
            Err(ProtocolError::NotJson(_))
        ));
    }

    #[test]
    fn parses_every_client_message() {
        assert!(matches!(
            parse_client_message(r#"{"type":"subscribe","event":"ticker"}"#),
            Ok(ClientMessage::Subscribe { event, since: None, data: None, presence: false }) if event == "ticker"
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"unsubscribe","event":"a.b:c/d-e_f"}"#),
            Ok(ClientMessage::Unsubscribe { event }) if event == "a.b:c/d-e_f"
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"request","event":"x","extra":1}"#),
            Ok(ClientMessage::Request { event }) if event == "x"
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping { id: None })
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"ping","id":null}"#),
            Ok(ClientMessage::Ping { id: None })
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"ping","id":7}"#),
            Ok(ClientMessage::Ping { id: Some(id) }) if id.get() == "7"
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"ping","id":"a\"b"}"#),
            Ok(ClientMessage::Ping { id: Some(id) }) if id.get() == r#""a\"b""#
        ));
        let long = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(129));
        for other in [
            r#"{"type":"ping","id":{}}"#,
            r#"{"type":"ping","id":true}"#,
            &long,
        ] {
            assert!(
                matches!(
                    parse_client_message(other),
                    Ok(ClientMessage::Ping { id: None })
                ),
                "{other}"
            );
        }
        assert!(matches!(
            parse_client_message(r#"{"type":"publish","event":"chat","data":{"m":1}}"#),
            Ok(ClientMessage::Publish { event, name: None, data })
                if event == "chat" && data.get() == r#"{"m":1}"#
        ));
        assert!(parse_client_message(r#"{"type":"publish","event":"chat"}"#).is_err());
        assert!(matches!(
            parse_client_message(r#"{"type":"subscribe","event":"t","since":{"offset":4,"epoch":"e1"}}"#),
            Ok(ClientMessage::Subscribe { since: Some(Since { offset: 4, epoch }), .. }) if epoch == "e1"
        ));
        for bad in [
            r#"{"offset":-1,"epoch":"e"}"#,
            r#"{"offset":1}"#,
            r#"5"#,
            r#"{"offset":"1","epoch":"e"}"#,
        ] {
            let msg = format!(r#"{{"type":"subscribe","event":"t","since":{bad}}}"#);
            assert_eq!(
                parse_client_message(&msg).unwrap_err(),
                ProtocolError::InvalidSince,
                "{bad}"
            );
        }
    }

    #[test]
    fn rpc_and_subscribe_data() {
        assert!(matches!(
            parse_client_message(r#"{"type":"subscribe","event":"room.1","data":{"k":[1]}}"#),
            Ok(ClientMessage::Subscribe { data: Some(d), .. }) if d.get() == r#"{"k":[1]}"#
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"subscribe","event":"room","presence":true}"#),
            Ok(ClientMessage::Subscribe { presence: true, .. })
        ));
        assert_eq!(
            parse_client_message(r#"{"type":"subscribe","event":"room","presence":1}"#)
                .unwrap_err(),
            ProtocolError::InvalidPresence
        );
        assert!(matches!(
            parse_client_message(r#"{"type":"presence_stats","event":"room"}"#),
            Ok(ClientMessage::PresenceStats { event }) if event == "room"
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"rpc","id":7,"method":"your_action","data":{"a":1}}"#),
            Ok(ClientMessage::Rpc { id, method, data })
                if id.get() == "7" && method == "your_action" && data.get() == r#"{"a":1}"#
        ));
        assert!(matches!(
            parse_client_message(r#"{"type":"rpc","id":"x-1","method":"m"}"#),
            Ok(ClientMessage::Rpc { id, data, .. }) if id.get() == r#""x-1""# && data.get() == "null"
        ));
        for bad in [
            r#"{"type":"rpc","method":"m"}"#,
            r#"{"type":"rpc","id":null,"method":"m"}"#,
            r#"{"type":"rpc","id":{"a":1},"method":"m"}"#,
        ] {
            assert_eq!(
                parse_client_message(bad).unwrap_err(),
                ProtocolError::BadRpcId,
                "{bad}"
            );
        }
        // A bad publication name is quoted once, whatever its JSON type.
        let err =
            parse_client_message(r#"{"type":"publish","event":"t","name":"bad name","data":1}"#)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("invalid event name \"bad name\": must match {TOPIC_PATTERN}")
        );
        let err = parse_client_message(r#"{"type":"publish","event":"t","name":7,"data":1}"#)
            .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid event name \"7\""),
            "{err}"
        );
        let err =
            parse_client_message(r#"{"type":"rpc","id":"q","method":"bad name"}"#).unwrap_err();
        assert!(
            matches!(&err, ProtocolError::BadRpc { id, .. } if id == r#""q""#),
            "{err:?}"
        );
        assert_eq!(err.code(), "bad_message");
        let frame = ServerMessage::RpcResult {
            id: &RawValue::from_string("7".into()).unwrap(),
            data: &RawValue::from_string("[1]".into()).unwrap(),
            timestamp: "t".into(),
        }
        .to_json();
        assert_eq!(
            frame,
            r#"{"type":"rpc_result","id":7,"data":[1],"timestamp":"t"}"#
        );
        let frame = ServerMessage::RpcError {
            id: &RawValue::from_string(r#""a""#.into()).unwrap(),
            error: "no".into(),
            code: "rpc_failed",
            backend_code: Some(1001),
            reply_to: "rpc",
            timestamp: "t".into(),
        }
        .to_json();
        assert_eq!(
            frame,
            r#"{"type":"error","id":"a","error":"no","code":"rpc_failed","backendCode":1001,"replyTo":"rpc","timestamp":"t"}"#
        );
    }

    #[test]
    fn rejects_malformed_messages_with_reasons() {
        let cases = [
            ("nope", "bad_message"),
            ("[1,2]", "bad_message"),
            ("{}", "bad_type"),
            (r#"{"type":5}"#, "bad_type"),
            (r#"{"type":"shout"}"#, "bad_type"),
            (r#"{"type":"subscribe"}"#, "bad_event"),
            (r#"{"type":"subscribe","event":7}"#, "bad_event"),
            (r#"{"type":"subscribe","event":"has space"}"#, "bad_topic"),
            (r#"{"type":"subscribe","event":""}"#, "bad_topic"),
        ];
        for (input, code) in cases {
            let err = parse_client_message(input).unwrap_err();
            assert_eq!(err.code(), code, "{input}: {err}");
        }
        let long = format!(r#"{{"type":"subscribe","event":"{}"}}"#, "a".repeat(129));
        assert!(matches!(
            parse_client_message(&long),
            Err(ProtocolError::InvalidTopic(_))
        ));
    }

    proptest::proptest! {
        /// Whatever a client sends, parsing answers Ok or a typed error, never panics.
        #[test]
        fn client_parser_never_panics(s in ".*") {
            let _ = parse_client_message(&s);
        }

        #[test]
        fn client_parser_survives_mutated_messages(
            ty in proptest::sample::select(vec!["subscribe", "unsubscribe", "request", "ping", "publish", "", "x"]),
            event in proptest::option::of(".{0,200}"),
            data in proptest::option::of(".{0,50}"),
        ) {
            let msg = serde_json::json!({"type": ty, "event": event, "data": data, "name": event});
            let _ = parse_client_message(&msg.to_string());
        }

        #[test]
        fn envelope_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_envelope(&bytes);
        }

        #[test]
        fn envelope_parser_survives_mutated_envelopes(
            event in proptest::option::of(".{0,200}"),
            v in proptest::option::of(0u32..4),
            fence in proptest::option::of(proptest::num::u64::ANY),
            offset in proptest::option::of(proptest::num::u64::ANY),
        ) {
            let msg = serde_json::json!({"event": event, "v": v, "fence": fence, "offset": offset, "epoch": "e", "data": {"x": event}});
            if let Ok(env) = parse_envelope(msg.to_string().as_bytes()) {
                proptest::prop_assert!(env.event.as_deref().is_none_or(valid_topic));
            }
        }
    }

    #[test]
    fn event_frame_adds_topic_only_when_different() {
        let data = RawValue::from_string(r#"{"n":1}"#.into()).unwrap();
        let same = event_frame("news", "news", &data, None, "T");
        assert_eq!(
            same,
            r#"{"type":"event","name":"news","data":{"n":1},"timestamp":"T"}"#
        );
        let diff = event_frame("device", "settings", &data, Some(7), "T");
        assert!(diff.contains(r#""topic":"device""#));
        assert!(diff.contains(r#""offset":7"#));
    }

    #[test]
    fn envelopes() {
        let e = parse_envelope(br#"{"event":"news","data":{"n":1}}"#).unwrap();
        assert_eq!(e.event.as_deref(), Some("news"));
        assert_eq!(e.data.get(), r#"{"n":1}"#);
        let e = parse_envelope(br#"{"data":null}"#).unwrap();
        assert_eq!(e.event, None);
        assert_eq!(e.data.get(), "null");
        assert!(parse_envelope(b"garbage{").is_err());
        assert!(parse_envelope(br#"{"event":"x"}"#).is_err());
        assert!(parse_envelope(br#"{"event":"bad name","data":1}"#).is_err());
        assert!(parse_envelope(br#"{"v":2,"data":1}"#).is_err());
        assert!(parse_envelope(br#"[1]"#).is_err());
        let round = encode_envelope("e", &RawValue::from_string("[1]".into()).unwrap(), Some(7));
        let e = parse_envelope(round.as_bytes()).unwrap();
        assert_eq!(e.data.get(), "[1]");
        assert_eq!(e.fence, Some(7));
        let e = parse_envelope(br#"{"offset":3,"epoch":"ab","data":1}"#).unwrap();
        assert_eq!(e.position, Some((3, "ab".to_string())));
        assert!(parse_envelope(br#"{"offset":3,"data":1}"#).is_err());
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn depth_scanner() {
        assert!(!json_depth_exceeds("1", 0));
        assert!(json_depth_exceeds("[]", 0));
        assert!(!json_depth_exceeds(r#"{"a":[1,{"b":2}]}"#, 3));
        assert!(json_depth_exceeds(r#"{"a":[1,{"b":2}]}"#, 2));
        // Brackets in strings, escaped quotes included, do not count.
        assert!(!json_depth_exceeds(r#"["[[[[\"[[[", "\\"]"#, 1));
        assert!(json_depth_exceeds(r#"["\\", [[]]]"#, 2));
        assert!(!json_depth_exceeds(nested(64), MAX_DATA_DEPTH));
        assert!(json_depth_exceeds(nested(65), MAX_DATA_DEPTH));
        assert!(json_depth_exceeds(nested(100_000), MAX_DATA_DEPTH));
    }

    #[test]
    fn deep_data_is_refused_everywhere_with_one_sentence() {
        let ok = format!(r#"{{"type":"publish","event":"t","data":{}}}"#, nested(64));
        assert!(parse_client_message(&ok).is_ok());
        for depth in [65, 200, 50_000] {
            let deep = format!(
                r#"{{"type":"publish","event":"t","data":{}}}"#,
                nested(depth)
            );
            let err = parse_client_message(&deep).unwrap_err();
            assert_eq!(err, ProtocolError::TooDeep);
            assert_eq!(err.code(), "bad_message");
            assert_eq!(err.to_string(), TOO_DEEP);
            let env = format!(r#"{{"event":"t","data":{}}}"#, nested(depth));
            assert_eq!(
                parse_envelope(env.as_bytes()).unwrap_err(),
                EnvelopeError::TooDeep
            );
        }
        let env = format!(r#"{{"event":"t","data":{}}}"#, nested(64));
        assert!(parse_envelope(env.as_bytes()).is_ok());
    }

    #[test]
    fn refresh_messages() {
        assert!(matches!(
            parse_client_message(r#"{"type":"refresh","token":"abc"}"#),
            Ok(ClientMessage::Refresh { token }) if token == "abc"
        ));
        for bad in [
            r#"{"type":"refresh"}"#,
            r#"{"type":"refresh","token":""}"#,
            r#"{"type":"refresh","token":5}"#,
        ] {
            assert_eq!(
                parse_client_message(bad).unwrap_err(),
                ProtocolError::MissingToken
            );
        }
    }

    fn value_depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
            serde_json::Value::Object(o) => 1 + o.values().map(value_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[\\[\\]{}\"\\\\a-z]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(12, 64, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[\\[{\"a-z]{0,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The scanner agrees with the depth of the parsed value, whatever
        /// brackets and quotes the strings hold.
        #[test]
        fn depth_scanner_agrees_with_the_parsed_value(v in json_value(), slack in 0usize..3) {
            let text = v.to_string();
            let depth = value_depth(&v);
            proptest::prop_assert!(!json_depth_exceeds(&text, depth));
            proptest::prop_assert_eq!(json_depth_exceeds(&text, depth.saturating_sub(slack)), slack > 0 && depth > 0);
        }

        #[test]
        fn depth_scanner_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), max in 0usize..8) {
            let _ = json_depth_exceeds(&bytes, max);
        }
    }

    #[test]
    fn timestamps_are_iso8601_utc() {
        let t = timestamp();
        assert!(t.ends_with('Z') && t.contains('T'), "{t}");
    }
}
