//! One publication as every local subscriber sees it, with its wire frames
//! built once and shared.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;

use super::ConnId;
use crate::history::Stored;
use crate::protocol;

/// One publication as every local subscriber sees it.
pub struct Publication {
    pub topic: Arc<str>,
    pub event: Arc<str>,
    pub data: Arc<RawValue>,
    pub received_at: Instant,
    /// Fencing epoch, on device state published by the leader.
    pub fence: Option<u64>,
    /// `data` is the list of a Socket.IO emit's arguments ([`protocol::Envelope::spread`]).
    pub spread: bool,
    /// Who must not get it besides the topic's subscribers' own say: set
    /// only for publications with an `except` or `rooms` (compat emits).
    pub routing: Option<Box<Routed>>,
    /// History topics: the publication's offset …
    pub offset: Option<u64>,
    /// … in this epoch of the topic's history.
    pub epoch: Option<Arc<str>>,
    timestamp: String,
    native: OnceLock<Utf8Bytes>,
    /// The Socket.IO frames (`42[…]`), without and with the position
    /// argument, for sockets of our own websocket transport.
    socketio: [OnceLock<Utf8Bytes>; 2],
    /// The same frames without their closing `]`, for sockets with
    /// connection state recovery, which end each with an argument of their own.
    socketio_open: [OnceLock<Box<str>>; 2],
    /// The native compact frame and the topic number it was built with.
    compact: OnceLock<(u32, Utf8Bytes)>,
}

impl Publication {
    pub fn new(
        topic: Arc<str>,
        event: Arc<str>,
        data: Arc<RawValue>,
        received_at: Instant,
    ) -> Self {
        Self {
            topic,
            event,
            data,
            received_at,
            fence: None,
            spread: false,
            routing: None,
            offset: None,
            epoch: None,
            timestamp: protocol::timestamp(),
            native: OnceLock::new(),
            socketio: [OnceLock::new(), OnceLock::new()],
            socketio_open: [OnceLock::new(), OnceLock::new()],
            compact: OnceLock::new(),
        }
    }

    /// A publication from a parsed envelope; the event defaults to the topic.
    pub(super) fn from_envelope(
        topic: Arc<str>,
        env: protocol::ParsedEnvelope,
        received_at: Instant,
    ) -> Self {
        let event: Arc<str> = match env.event {
            Some(e) if *e != *topic => Arc::from(e),
            _ => topic.clone(),
        };
        let mut p = Publication::new(topic, event, env.data, received_at);
        p.fence = env.fence;
        p.spread = env.routing.spread;
        if !env.routing.is_empty() {
            p.routing = Some(Box::new(Routed::new(&p.topic, &env.routing)));
        }
        if let Some((offset, epoch)) = env.position {
            p.offset = Some(offset);
            p.epoch = Some(Arc::from(epoch));
        }
        p
    }

    /// The Socket.IO EVENT in an Engine.IO MESSAGE, `42["event",data]`
    /// (with `positions` and an offset: `42["event",data,{"topic","offset"}]`),
    /// serialized on first use and then shared by every such socket.
    pub fn socketio_frame(&self, positions: bool) -> &Utf8Bytes {
        let with = positions && self.offset.is_some();
        self.socketio[usize::from(with)].get_or_init(|| {
            let mut frame = self.build_socketio(with, 1);
            frame.push(']');
            frame.into()
        })
    }

    /// `42["event",data` (with `with`: `,{"topic","offset"}` after `data`),
    /// with room for `spare` more bytes.
    fn build_socketio(&self, with: bool, spare: usize) -> String {
        let mut frame =
            String::with_capacity(self.data.get().len() + self.event.len() + 48 + spare);
        frame.push_str("42[");
        frame.push_str(&serde_json::to_string(&*self.event).expect("strings serialize"));
        let data = self.data.get().trim();
        match (
            self.spread,
            data.strip_prefix('[').and_then(|d| d.strip_suffix(']')),
        ) {
            // The emit's arguments, each its own (none for `null` or `[]`).
            (true, _) if data == "null" => {}
            (true, Some(args)) => {
                if !args.trim().is_empty() {
                    frame.push(',');
                    frame.push_str(args);
                }
            }
            _ => {
                frame.push(',');
                frame.push_str(data);
            }
        }
        if let (true, Some(offset)) = (with, self.offset) {
            frame.push_str(",{\"topic\":");
            frame.push_str(&serde_json::to_string(&*self.topic).expect("strings serialize"));
            frame.push_str(&format!(",\"offset\":{offset}}}"));
        }
        frame
    }

    /// [`Publication::socketio_frame`] without its closing `]`
    /// (`42["event",data` or `42["event",data,{"topic","offset"}`):
    /// serialized on first use and shared; each socket with connection state
    /// recovery appends `,"<its positions>"]` (a copy of this plus a few
    /// bytes, never a second serialization of `data`).
    pub fn socketio_open_frame(&self, positions: bool) -> &str {
        let with = positions && self.offset.is_some();
        self.socketio_open[usize::from(with)]
            .get_or_init(|| self.build_socketio(with, 0).into_boxed_str())
    }

    /// The native compact event frame (`[topic_id,data,offset?,name?]`, see
    /// [`protocol::compact_event_frame`]), serialized on first use and then
    /// shared by every compact subscriber. All of them get the same
    /// `topic_id` (the topic's number on this node); should one ever differ
    /// (the topic left the node and came back while this publication was on
    /// its way), its frame is built for it alone.
    pub fn compact_frame(&self, topic_id: u32) -> Utf8Bytes {
        let build = || -> Utf8Bytes {
            protocol::compact_event_frame(
                topic_id,
                &self.topic,
                &self.event,
                &self.data,
                self.offset,
            )
            .into()
        };
        let (id, frame) = self.compact.get_or_init(|| (topic_id, build()));
        if *id == topic_id {
            frame.clone()
        } else {
            build()
        }
    }

    /// The native-protocol `event` frame, serialized on first use and then
    /// shared by every native subscriber.
    pub fn native_frame(&self) -> &Utf8Bytes {
        self.native.get_or_init(|| {
            protocol::event_frame(
                &self.topic,
                &self.event,
                &self.data,
                self.offset,
                &self.timestamp,
            )
            .into()
        })
    }
}

/// A publication's [`protocol::Routing`], ready for the fan-out.
#[derive(Debug, Default)]
pub struct Routed {
    /// The connection ids of `except` entries that are client ids (16 hex
    /// digits, as every client id is: the connection id in hex).
    pub except_ids: Vec<ConnId>,
    /// Every `except` entry, as a topic.
    pub except_topics: Vec<Arc<str>>,
    /// The rooms of the same emit listed before this publication's topic.
    pub earlier_rooms: Vec<Arc<str>>,
}

impl Routed {
    fn new(topic: &str, routing: &protocol::Routing) -> Self {
        let except_ids = routing
            .except
            .iter()
            .filter_map(|e| client_conn_id(e))
            .collect();
        let except_topics = routing
            .except
            .iter()
            .map(|e| Arc::from(e.as_str()))
            .collect();
        // A topic missing from its own `rooms` excludes nobody by them.
        let at = routing.rooms.iter().position(|r| r == topic).unwrap_or(0);
        let earlier_rooms = routing.rooms[..at]
            .iter()
            .map(|r| Arc::from(r.as_str()))
            .collect();
        Routed {
            except_ids,
            except_topics,
            earlier_rooms,
        }
    }
}

/// The connection id a client id names (`format!("{id:016x}")`, native and
/// Socket.IO alike), if `client` is one.
pub fn client_conn_id(client: &str) -> Option<ConnId> {
    (client.len() == 16
        && client
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| u64::from_str_radix(client, 16).ok())
    .flatten()
}

/// A stored history entry as a publication (`None` if it does not parse,
/// which the history function's own checks rule out).
pub(super) fn stored_publication(topic: &str, stored: &Stored) -> Option<Publication> {
    let env = protocol::parse_envelope(&stored.payload).ok()?;
    Some(Publication::from_envelope(
        Arc::from(topic),
        env,
        Instant::now(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::testing::*;

    #[test]
    fn spread_data_is_a_socketio_argument_list() {
        let frame = |data: &str, spread: bool| {
            let mut p =
                Publication::new("t".into(), "e".into(), Arc::from(raw(data)), Instant::now());
            p.spread = spread;
            p.socketio_frame(false).to_string()
        };
        assert_eq!(frame("[1,{\"a\":2}]", true), r#"42["e",1,{"a":2}]"#);
        assert_eq!(frame("null", true), r#"42["e"]"#);
        assert_eq!(frame("[]", true), r#"42["e"]"#);
        assert_eq!(frame("[1,2]", false), r#"42["e",[1,2]]"#);
        assert_eq!(frame("7", true), r#"42["e",7]"#);
    }

    #[test]
    fn native_frame_is_serialized_once_and_shared() {
        let p = Publication::new("a".into(), "a".into(), Arc::from(raw("2")), Instant::now());
        let f1 = p.native_frame().clone();
        let f2 = p.native_frame().clone();
        assert_eq!(f1.as_str().as_ptr(), f2.as_str().as_ptr());
    }
}
