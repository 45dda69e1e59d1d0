//! Django Channels group sends through `channels_redis`'s
//! `RedisPubSubChannelLayer`: `group_send(group, message)` publishes the
//! msgpack of `message` on `{prefix}__group__{group}`. The message's `type`
//! is the event; the rest of the dict is the data. (The default, core
//! layer keeps messages in sorted sets that consumers pop: nothing to
//! overhear; see docs/migration.md.)

use serde_json::Value;

use super::{Action, Emit, Refusal};

/// Decodes one group message of group `group`.
pub fn decode(group: &str, payload: &[u8]) -> Result<Action, Refusal> {
    let msg = super::msgpack::decode(payload, crate::protocol::MAX_DATA_DEPTH + 1)
        .map_err(Refusal::from_msgpack)?;
    let Value::Object(mut msg) = msg else {
        return Err(Refusal::malformed("not a message dict"));
    };
    let Some(Value::String(event)) = msg.remove("type") else {
        return Err(Refusal::malformed("the message has no \"type\" string"));
    };
    // The layer's own bookkeeping, should a version add any.
    msg.retain(|k, _| !k.starts_with("__asgi"));
    Ok(Action::Emit(Emit {
        rooms: vec![group.to_string()],
        event,
        data: Value::Object(msg),
        except: vec![],
        spread: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::Outcome;
    use serde_json::json;

    #[test]
    fn a_group_send_is_an_event_on_the_group() {
        // msgpack.packb({"type": "status_update", "value": 7})
        let bytes = b"\x82\xa4type\xadstatus_update\xa5value\x07";
        let Action::Emit(e) = decode("feature_42", bytes).unwrap() else {
            panic!()
        };
        assert_eq!(e.rooms, ["feature_42"]);
        assert_eq!(e.event, "status_update");
        assert_eq!(e.data, json!({"value": 7}));
        assert_eq!(
            decode("g", b"\x81\xa5value\x07").unwrap_err().outcome,
            Outcome::Malformed
        );
        assert_eq!(
            decode("g", b"\x81\xa4type\xc4\x01x").unwrap_err().outcome,
            Outcome::Refused
        );
        assert_eq!(
            decode("g", &[0x91; 20_000]).unwrap_err().outcome,
            Outcome::Invalid
        );
    }
}
