//! python-socketio's external emitters: what `socketio.RedisManager(url,
//! write_only=True)` (and `AsyncRedisManager`, and a Flask-SocketIO app
//! with `message_queue=`) publish on their channel (default `socketio`).
//!
//! JSON since python-socketio 5.14: `{"method": "emit", "event", "data",
//! "namespace", "room", "skip_sid", "callback", "host_id", "binary"?}`, and
//! `enter_room` / `leave_room` / `disconnect` with a `sid`. Since 5.15.1
//! `data` is the list of arguments; before, the bare value (`None`: no
//! argument). `binary` came in 5.14.2, so it does not tell the two apart:
//! a `data` that is not a list can only be a bare value, a list is read as
//! 5.15.1's arguments (a 5.14.2 - 5.15.0 publisher's list value is
//! ambiguous: docs/migration.md asks for 5.15.1). Older releases pickled:
//! refused.

use serde_json::Value;

use super::{Action, Emit, Refusal, RoomCommand};

/// Decodes one message of the python-socketio channel.
pub fn decode(payload: &[u8]) -> Result<Action, Refusal> {
    if payload.first() == Some(&0x80) {
        return Err(Refusal::refused(
            "a pickled message (python-socketio before 5.14): upgrade python-socketio on the publishing side, newer releases publish JSON",
        ));
    }
    let msg: Value = super::parse_json(payload)?;
    let Value::Object(msg) = msg else {
        return Err(Refusal::malformed("not a JSON object"));
    };
    let method = msg
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::malformed("no \"method\": not a python-socketio message"))?;
    match msg.get("namespace") {
        None | Some(Value::Null) => {}
        Some(Value::String(ns)) if ns == "/" => {}
        Some(other) => {
            return Err(Refusal::refused(format!(
                "namespace {} cannot be served: Switchboard serves the default namespace \"/\" only",
                super::short(other)
            )));
        }
    }
    match method {
        "emit" => emit(&msg),
        "enter_room" | "leave_room" => {
            let sid = sid(&msg)?;
            let room = msg
                .get("room")
                .and_then(Value::as_str)
                .ok_or_else(|| Refusal::malformed(format!("{method} without a \"room\" string")))?;
            let command = if method == "enter_room" {
                RoomCommand::Join(vec![room.to_string()])
            } else {
                RoomCommand::Leave(vec![room.to_string()])
            };
            Ok(Action::Rooms {
                clients: vec![sid],
                command,
            })
        }
        "disconnect" => Ok(Action::Rooms {
            clients: vec![sid(&msg)?],
            command: RoomCommand::Disconnect,
        }),
        "close_room" => Err(Refusal::refused(
            "close_room cannot be served: unsubscribe each client with leave_room (or POST /api/unsubscribe)",
        )),
        "callback" => Err(Refusal::refused(
            "acknowledgement callbacks cannot be served",
        )),
        other => Err(Refusal::refused(format!(
            "method {} is not known",
            super::short(&Value::String(other.to_string()))
        ))),
    }
}

fn sid(msg: &serde_json::Map<String, Value>) -> Result<String, Refusal> {
    msg.get("sid")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| Refusal::malformed("no \"sid\" string"))
}

fn emit(msg: &serde_json::Map<String, Value>) -> Result<Action, Refusal> {
    let event = msg
        .get("event")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::malformed("emit without an \"event\" string"))?;
    if msg.get("binary").and_then(Value::as_bool) == Some(true) {
        return Err(Refusal::refused(
            "binary attachments cannot be served (send base64 in JSON instead)",
        ));
    }
    if !matches!(msg.get("callback"), None | Some(Value::Null)) {
        return Err(Refusal::refused(
            "acknowledgement callbacks cannot be served",
        ));
    }
    let data = msg.get("data").cloned().unwrap_or(Value::Null);
    let (data, spread) = match data {
        // 5.15.1 and later: the list of arguments, of which a
        // python-socketio server drops a lone `None` (`emit(event)`).
        Value::Array(args) if msg.contains_key("binary") => {
            if args == [Value::Null] {
                Emit::args(vec![])
            } else {
                Emit::args(args)
            }
        }
        // Before: the bare value; `None` is no argument, as the reference
        // server sends it.
        Value::Null => Emit::args(vec![]),
        value => (value, false),
    };
    let rooms = names(msg.get("room"), "room")?;
    let except = names(msg.get("skip_sid"), "skip_sid")?;
    Ok(Action::Emit(Emit {
        rooms,
        event: event.to_string(),
        data,
        except,
        spread,
    }))
}

/// `null`, a string or a list of strings (python-socketio accepts all three
/// for `room`/`to` and `skip_sid`).
fn names(v: Option<&Value>, field: &str) -> Result<Vec<String>, Refusal> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Refusal::malformed(format!("\"{field}\" holds a non-string")))
            })
            .collect(),
        Some(_) => Err(Refusal::malformed(format!(
            "\"{field}\" is neither a string nor a list of strings"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::Outcome;
    use serde_json::json;

    fn emit_of(v: Value) -> Emit {
        match decode(v.to_string().as_bytes()).unwrap() {
            Action::Emit(e) => e,
            _ => panic!("not an emit"),
        }
    }

    #[test]
    fn emits_of_every_release_since_json() {
        // 5.15.1+: a list of arguments.
        let e = emit_of(
            json!({"method": "emit", "event": "news", "data": [{"n": 1}],
            "binary": false, "namespace": "/", "room": "r1", "skip_sid": null,
            "callback": null, "host_id": "x"}),
        );
        assert_eq!(e.rooms, ["r1"]);
        assert_eq!(e.data, json!({"n": 1}));
        assert!(e.except.is_empty());
        let e = emit_of(json!({"method": "emit", "event": "two", "data": [1, 2],
            "binary": false, "namespace": "/", "room": null, "skip_sid": ["a", "b"]}));
        assert!(e.rooms.is_empty());
        assert_eq!((e.data, e.spread), (json!([1, 2]), true));
        assert_eq!(e.except, ["a", "b"]);
        let e =
            emit_of(json!({"method": "emit", "event": "none", "data": [null], "binary": false}));
        assert_eq!((e.data, e.spread), (Value::Null, true));
        // 5.14 - 5.15.0: the bare value.
        let e = emit_of(json!({"method": "emit", "event": "old", "data": [1, 2],
            "namespace": "/", "room": ["x", "y"], "skip_sid": "s"}));
        assert_eq!(e.data, json!([1, 2]));
        assert_eq!(e.rooms, ["x", "y"]);
        assert_eq!(e.except, ["s"]);
        // 5.14.2 - 5.15.0 write `binary` with the bare value: a value that is
        // not a list is delivered, not refused.
        let e = emit_of(
            json!({"method": "emit", "event": "status", "data": {"ok": true},
            "binary": false, "namespace": "/", "room": "room1"}),
        );
        assert_eq!((e.data, e.spread), (json!({"ok": true}), false));
        // `None` before 5.15.1 (with or without `binary`): no argument.
        for v in [
            json!({"method": "emit", "event": "refresh", "data": null, "namespace": "/"}),
            json!({"method": "emit", "event": "refresh", "data": null, "binary": false}),
        ] {
            let e = emit_of(v);
            assert_eq!((e.data, e.spread), (Value::Null, true));
        }
    }

    #[test]
    fn rooms_and_disconnects_name_a_client() {
        let a = decode(
            br#"{"method":"enter_room","sid":"00000000000000ab","room":"r","namespace":"/"}"#,
        )
        .unwrap();
        assert_eq!(
            a,
            Action::Rooms {
                clients: vec!["00000000000000ab".into()],
                command: RoomCommand::Join(vec!["r".into()])
            }
        );
        let a = decode(br#"{"method":"disconnect","sid":"s","namespace":"/"}"#).unwrap();
        assert!(matches!(
            a,
            Action::Rooms {
                command: RoomCommand::Disconnect,
                ..
            }
        ));
    }

    #[test]
    fn refusals_say_why() {
        let refused = |v: &[u8]| decode(v).unwrap_err();
        let r = refused(b"\x80\x04\x95\x10\x00");
        assert_eq!(r.outcome, Outcome::Refused);
        assert!(r.why.contains("pickle"), "{}", r.why);
        let r = refused(br#"{"method":"emit","event":"e","data":[1],"namespace":"/chat"}"#);
        assert!(r.why.contains("namespace \"/chat\""), "{}", r.why);
        let r = refused(br#"{"method":"emit","event":"e","data":["x"],"binary":true}"#);
        assert!(r.why.contains("binary"), "{}", r.why);
        let r = refused(
            br#"{"method":"emit","event":"e","data":[1],"room":"r","callback":["r","/",1]}"#,
        );
        assert!(r.why.contains("callback"), "{}", r.why);
        assert_eq!(refused(b"{not json").outcome, Outcome::Malformed);
        assert_eq!(refused(b"[1]").outcome, Outcome::Malformed);
        assert_eq!(
            refused(br#"{"method":"emit","data":[1]}"#).outcome,
            Outcome::Malformed
        );
        assert_eq!(
            refused(br#"{"method":"emit","event":"e","room":7}"#).outcome,
            Outcome::Malformed
        );
        let deep = format!(
            "{{\"method\":\"emit\",\"event\":\"e\",\"data\":{}}}",
            "[".repeat(20_000)
        );
        assert_eq!(refused(deep.as_bytes()).outcome, Outcome::Invalid);
    }
}
