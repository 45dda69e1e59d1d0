//! Node's `@socket.io/redis-emitter` (and any publisher of the Socket.IO
//! Redis adapter's format) under key `key` (default `socket.io`):
//!
//! - broadcasts: msgpack (notepack) `[uid, packet, opts]` on `key#/#` (no
//!   room or several) and `key#/#<room>#` (exactly one room), with
//!   `packet = {type: 2, data: [event, ...args], nsp: "/"}` and
//!   `opts = {rooms: [...], except: [...], flags: {...}}`;
//! - requests: JSON on `key-request#/#`: `socketsJoin` (type 2),
//!   `socketsLeave` (3), `disconnectSockets` (4), each with
//!   `opts = {rooms, except}` naming the sockets.

use serde_json::Value;

use super::{Action, Emit, Refusal, RoomCommand};
use crate::protocol::MAX_ROUTING;

/// MessagePack levels an emitter message may use around its arguments
/// (`[uid, {data: [event, arg]}]` puts an argument at level 3).
const WRAPPING: usize = 4;

/// The namespace a channel `key#<nsp>#…` or `key-request#<nsp>#` names.
pub fn namespace(rest: &str) -> &str {
    rest.split('#').next().unwrap_or("")
}

/// Decodes one broadcast (`key#/#…`).
pub fn decode_broadcast(payload: &[u8]) -> Result<Action, Refusal> {
    let msg = super::msgpack::decode(payload, crate::protocol::MAX_DATA_DEPTH + WRAPPING)
        .map_err(super::Refusal::from_msgpack)?;
    let Value::Array(mut parts) = msg else {
        return Err(Refusal::malformed("not a [uid, packet, opts] list"));
    };
    if parts.len() != 3 {
        return Err(Refusal::malformed(format!(
            "a list of {} items, not [uid, packet, opts]",
            parts.len()
        )));
    }
    let opts = parts.pop().expect("3");
    let packet = parts.pop().expect("3");
    let Value::Object(mut packet) = packet else {
        return Err(Refusal::malformed("the packet is not a map"));
    };
    let nsp = packet.get("nsp").and_then(Value::as_str).unwrap_or("/");
    if nsp != "/" {
        return Err(Refusal::refused(format!(
            "namespace {} cannot be served: Switchboard serves the default namespace \"/\" only",
            super::short(&Value::String(nsp.into()))
        )));
    }
    match packet.get("type").and_then(Value::as_u64) {
        Some(2) => {}
        Some(5) => {
            return Err(Refusal::refused(
                "binary attachments cannot be served (send base64 in JSON instead)",
            ));
        }
        _ => return Err(Refusal::malformed("the packet is not an EVENT (type 2)")),
    }
    if packet.get("id").is_some_and(|id| !id.is_null()) {
        return Err(Refusal::refused(
            "acknowledgement callbacks cannot be served",
        ));
    }
    let Some(Value::Array(data)) = packet.remove("data") else {
        return Err(Refusal::malformed("the packet has no data list"));
    };
    let mut data = data.into_iter();
    let Some(Value::String(event)) = data.next() else {
        return Err(Refusal::malformed(
            "the packet's data does not start with the event name",
        ));
    };
    let (data, spread) = Emit::args(data.collect());
    let (rooms, except) = match opts {
        Value::Object(opts) => (
            names(opts.get("rooms"), "rooms")?,
            names(opts.get("except"), "except")?,
        ),
        Value::Null => (vec![], vec![]),
        _ => return Err(Refusal::malformed("opts is not a map")),
    };
    Ok(Action::Emit(Emit {
        rooms,
        event,
        data,
        except,
        spread,
    }))
}

/// Decodes one request (`key-request#/#`).
pub fn decode_request(payload: &[u8]) -> Result<Action, Refusal> {
    let req = super::parse_json(payload)?;
    let Value::Object(req) = req else {
        return Err(Refusal::malformed("not a JSON object"));
    };
    let kind = req
        .get("type")
        .and_then(Value::as_u64)
        .ok_or_else(|| Refusal::malformed("no numeric \"type\""))?;
    let command = match kind {
        2 | 3 => {
            let rooms = names(req.get("rooms"), "rooms")?;
            if kind == 2 {
                RoomCommand::Join(rooms)
            } else {
                RoomCommand::Leave(rooms)
            }
        }
        4 => RoomCommand::Disconnect,
        other => {
            return Err(Refusal::refused(format!(
                "request type {other} is not served (only socketsJoin, socketsLeave and disconnectSockets)"
            )));
        }
    };
    let opts = req.get("opts").and_then(Value::as_object);
    let targets = names(opts.and_then(|o| o.get("rooms")), "opts.rooms")?;
    let except = names(opts.and_then(|o| o.get("except")), "opts.except")?;
    if targets.is_empty() {
        return Err(Refusal::refused(
            "a request for every socket cannot be served: name the sockets by id (emitter.in(sid))",
        ));
    }
    // Bounded before the `except` filter below, which compares each target
    // with each exception.
    if targets.len() > MAX_ROUTING || except.len() > MAX_ROUTING {
        return Err(Refusal::invalid(format!(
            "more than {MAX_ROUTING} sockets or exceptions in one request"
        )));
    }
    if let Some(room) = targets
        .iter()
        .chain(&except)
        .find(|r| crate::hub::client_conn_id(r).is_none())
    {
        return Err(Refusal::refused(format!(
            "sockets can be named by their id only, and {} is not a Switchboard client id",
            super::short(&Value::String(room.clone()))
        )));
    }
    let clients = targets
        .into_iter()
        .filter(|t| !except.contains(t))
        .collect();
    Ok(Action::Rooms { clients, command })
}

fn names(v: Option<&Value>, field: &str) -> Result<Vec<String>, Refusal> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Refusal::malformed(format!("\"{field}\" holds a non-string")))
            })
            .collect(),
        Some(_) => Err(Refusal::malformed(format!("\"{field}\" is not a list"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::Outcome;
    use serde_json::json;

    /// MessagePack of a JSON value (the test's own small encoder).
    pub(crate) fn pack(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        fn put(v: &Value, out: &mut Vec<u8>) {
            match v {
                Value::Null => out.push(0xc0),
                Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
                Value::Number(n) => {
                    out.push(0xd3);
                    out.extend(n.as_i64().unwrap().to_be_bytes());
                }
                Value::String(s) => {
                    out.push(0xdb);
                    out.extend((s.len() as u32).to_be_bytes());
                    out.extend(s.as_bytes());
                }
                Value::Array(a) => {
                    out.push(0xdd);
                    out.extend((a.len() as u32).to_be_bytes());
                    a.iter().for_each(|x| put(x, out));
                }
                Value::Object(m) => {
                    out.push(0xdf);
                    out.extend((m.len() as u32).to_be_bytes());
                    for (k, x) in m {
                        put(&Value::String(k.clone()), out);
                        put(x, out);
                    }
                }
            }
        }
        put(v, &mut out);
        out
    }

    #[test]
    fn broadcasts_become_emits() {
        let msg = json!(["emitter", {"type": 2, "data": ["score", {"a": 1}], "nsp": "/"},
            {"rooms": ["r1", "r2"], "except": ["r3"], "flags": {}}]);
        let Action::Emit(e) = decode_broadcast(&pack(&msg)).unwrap() else {
            panic!()
        };
        assert_eq!(
            (e.rooms, e.except),
            (vec!["r1".into(), "r2".into()], vec!["r3".into()])
        );
        assert_eq!((e.event.as_str(), e.data), ("score", json!({"a": 1})));
        let msg = json!(["emitter", {"type": 2, "data": ["two", 1, 2], "nsp": "/"}, {"rooms": []}]);
        let Action::Emit(e) = decode_broadcast(&pack(&msg)).unwrap() else {
            panic!()
        };
        assert_eq!(e.data, json!([1, 2]));
        assert!(e.rooms.is_empty());
    }

    #[test]
    fn requests_name_sockets_by_id() {
        let req = json!({"type": 2, "opts": {"rooms": ["00000000000000aa", "00000000000000bb"],
            "except": ["00000000000000bb"]}, "rooms": ["vip"]});
        assert_eq!(
            decode_request(req.to_string().as_bytes()).unwrap(),
            Action::Rooms {
                clients: vec!["00000000000000aa".into()],
                command: RoomCommand::Join(vec!["vip".into()])
            }
        );
        let all = json!({"type": 4, "opts": {"rooms": [], "except": []}, "close": false});
        assert_eq!(
            decode_request(all.to_string().as_bytes())
                .unwrap_err()
                .outcome,
            Outcome::Refused
        );
        let room = json!({"type": 3, "opts": {"rooms": ["lobby"]}, "rooms": ["x"]});
        assert_eq!(
            decode_request(room.to_string().as_bytes())
                .unwrap_err()
                .outcome,
            Outcome::Refused
        );
        let other = json!({"type": 6, "data": ["x"]});
        assert_eq!(
            decode_request(other.to_string().as_bytes())
                .unwrap_err()
                .outcome,
            Outcome::Refused
        );
    }

    #[test]
    fn refusals() {
        let nsp = json!(["e", {"type": 2, "data": ["x"], "nsp": "/admin"}, {}]);
        assert_eq!(
            decode_broadcast(&pack(&nsp)).unwrap_err().outcome,
            Outcome::Refused
        );
        let bin = json!(["e", {"type": 5, "data": ["x"], "nsp": "/"}, {}]);
        assert_eq!(
            decode_broadcast(&pack(&bin)).unwrap_err().outcome,
            Outcome::Refused
        );
        assert_eq!(
            decode_broadcast(b"{\"json\":1}").unwrap_err().outcome,
            Outcome::Malformed
        );
        assert_eq!(
            decode_broadcast(&pack(&json!([1, 2]))).unwrap_err().outcome,
            Outcome::Malformed
        );
        let deep = [
            vec![0x93, 0xa1, b'e', 0x83, 0xa4, b't', b'y', b'p', b'e', 0x02],
            vec![0x91; 20_000],
        ]
        .concat();
        assert_eq!(
            decode_broadcast(&deep).unwrap_err().outcome,
            Outcome::Invalid
        );
        assert_eq!(namespace("/#room#"), "/");
    }
}
