//! Just enough MessagePack to read what `@socket.io/redis-emitter`
//! (notepack) and `channels_redis` (msgpack-python) publish, as JSON values.
//!
//! Our own reader, not a crate: it must make of each value what the system
//! a publisher migrates from would have sent its clients (NaN and infinities
//! `null`, as `JSON.stringify` writes them; a number, boolean or nil map key
//! the string Python's `json.dumps` makes of it, as a Channels consumer's
//! `send_json` would), refuse what cannot become JSON (binary, unknown
//! extension types, array or map keys) with a sentence, stop at a depth limit
//! before recursing further (a 20,000-level message costs nothing), and never
//! trust a length prefix for an allocation.

use serde_json::{Map, Number, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    #[error("not MessagePack: it ends in the middle of a value")]
    Truncated,
    #[error("not MessagePack: {0} bytes follow the first value")]
    Trailing(usize),
    #[error("not MessagePack: byte 0x{0:02x} starts no value")]
    BadByte(u8),
    #[error("nested deeper than {0} levels of arrays and maps")]
    TooDeep(usize),
    #[error("binary data cannot be served (only JSON-like values)")]
    Binary,
    #[error("a MessagePack extension (type {0}) cannot be served")]
    Extension(i8),
    #[error("a map key that is an array or a map cannot be served")]
    KeyNotString,
    #[error("a string is not UTF-8")]
    NotUtf8,
}

/// Decodes one MessagePack value (the whole of `bytes`) into JSON, nesting
/// at most `max_depth` levels of arrays and maps.
pub fn decode(bytes: &[u8], max_depth: usize) -> Result<Value, MsgpackError> {
    let mut r = Reader { bytes, at: 0 };
    let v = r.value(0, max_depth)?;
    match bytes.len() - r.at {
        0 => Ok(v),
        n => Err(MsgpackError::Trailing(n)),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// JavaScript's `Date.prototype.toISOString()` of `ms` from the Unix epoch
/// (before it: negative), for the years it writes with four digits (0000 to
/// 9999).
fn iso_time(ms: i64) -> Option<String> {
    const YEAR_0: i64 = -62_167_219_200_000;
    const YEAR_10000: i64 = 253_402_300_800_000;
    if !(YEAR_0..YEAR_10000).contains(&ms) {
        return None;
    }
    let (year, month, day) = civil_from_days(ms.div_euclid(86_400_000));
    let t = ms.rem_euclid(86_400_000);
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3_600_000,
        t / 60_000 % 60,
        t / 1000 % 60,
        t % 1000
    ))
}

/// The proleptic Gregorian date of a day number (0 = 1970-01-01), by
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgpackError> {
        let end = self.at.checked_add(n).ok_or(MsgpackError::Truncated)?;
        let s = self
            .bytes
            .get(self.at..end)
            .ok_or(MsgpackError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, MsgpackError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, MsgpackError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn value(&mut self, depth: usize, max: usize) -> Result<Value, MsgpackError> {
        let b = self.u8()?;
        Ok(match b {
            0x00..=0x7f => Value::from(b),
            0x80..=0x8f => return self.map(usize::from(b & 0x0f), depth, max),
            0x90..=0x9f => return self.array(usize::from(b & 0x0f), depth, max),
            0xa0..=0xbf => self.str(usize::from(b & 0x1f))?,
            0xc0 => Value::Null,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => return Err(MsgpackError::Binary),
            0xc7..=0xc9 => {
                let n = self.be(1 << (b - 0xc7))? as usize;
                return self.ext(n);
            }
            0xca => float(f64::from(f32::from_bits(self.be(4)? as u32)))?,
            0xcb => float(f64::from_bits(self.be(8)?))?,
            0xcc => Value::from(self.be(1)?),
            0xcd => Value::from(self.be(2)?),
            0xce => Value::from(self.be(4)?),
            0xcf => Value::from(self.be(8)?),
            0xd0 => Value::from(self.be(1)? as u8 as i8),
            0xd1 => Value::from(self.be(2)? as u16 as i16),
            0xd2 => Value::from(self.be(4)? as u32 as i32),
            0xd3 => Value::from(self.be(8)? as i64),
            0xd4..=0xd8 => return self.ext(1 << (b - 0xd4)),
            0xd9 => {
                let n = self.be(1)? as usize;
                self.str(n)?
            }
            0xda => {
                let n = self.be(2)? as usize;
                self.str(n)?
            }
            0xdb => {
                let n = self.be(4)? as usize;
                self.str(n)?
            }
            0xdc => {
                let n = self.be(2)? as usize;
                return self.array(n, depth, max);
            }
            0xdd => {
                let n = self.be(4)? as usize;
                return self.array(n, depth, max);
            }
            0xde => {
                let n = self.be(2)? as usize;
                return self.map(n, depth, max);
            }
            0xdf => {
                let n = self.be(4)? as usize;
                return self.map(n, depth, max);
            }
            0xe0..=0xff => Value::from(b as i8),
            0xc1 => return Err(MsgpackError::BadByte(b)),
        })
    }

    /// An extension of `n` data bytes. notepack writes JavaScript's
    /// `undefined` as the 1-byte extension 0 with data 0: that one is `null`
    /// (what `JSON.stringify` makes of it in an array). A `Date` is the
    /// MessagePack timestamp (type -1, in its 4-, 8- and 12-byte forms; older
    /// notepack wrote type 0 with 8 bytes of milliseconds): the string
    /// `toISOString()` gives, which is what a Socket.IO server's clients
    /// receive for it.
    fn ext(&mut self, n: usize) -> Result<Value, MsgpackError> {
        let kind = self.u8()? as i8;
        let data = self.take(n)?;
        let be = |b: &[u8]| b.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x));
        // Whole milliseconds, as a `Date` holds them; the 12-byte form's
        // seconds are signed (before 1970), its nanoseconds count forward.
        let ms = match (kind, data.len()) {
            (0, 1) if data == [0] => return Ok(Value::Null),
            (-1, 4) => Some(be(data) as i64 * 1000),
            (-1, 8) => {
                let v = be(data);
                Some(((v & 0x3_ffff_ffff) * 1000 + (v >> 34) / 1_000_000) as i64)
            }
            (-1, 12) => (be(&data[4..]) as i64)
                .checked_mul(1000)
                .and_then(|ms| ms.checked_add((be(&data[..4]) / 1_000_000) as i64)),
            (0, 8) => Some(be(data) as i64),
            _ => None,
        };
        match ms.and_then(iso_time) {
            Some(text) => Ok(Value::String(text)),
            None => Err(MsgpackError::Extension(kind)),
        }
    }

    fn str(&mut self, n: usize) -> Result<Value, MsgpackError> {
        let s = self.take(n)?;
        Ok(Value::String(
            std::str::from_utf8(s)
                .map_err(|_| MsgpackError::NotUtf8)?
                .to_string(),
        ))
    }

    fn array(&mut self, n: usize, depth: usize, max: usize) -> Result<Value, MsgpackError> {
        if depth >= max {
            return Err(MsgpackError::TooDeep(max));
        }
        // Every element takes at least one byte: a length beyond what is
        // left is a lie. Nor is one that fits an allocation: each nested
        // level could claim the rest of the message again.
        if n > self.bytes.len() - self.at {
            return Err(MsgpackError::Truncated);
        }
        let mut items = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            items.push(self.value(depth + 1, max)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize, max: usize) -> Result<Value, MsgpackError> {
        if depth >= max {
            return Err(MsgpackError::TooDeep(max));
        }
        if n > (self.bytes.len() - self.at) / 2 {
            return Err(MsgpackError::Truncated);
        }
        let mut map = Map::new();
        for _ in 0..n {
            // A float key keeps its own spelling (`7.0`, not the `7` a
            // float value becomes).
            let key_float = match self.bytes.get(self.at) {
                Some(0xca) => Some(4),
                Some(0xcb) => Some(8),
                _ => None,
            };
            if let Some(width) = key_float {
                self.at += 1;
                let bits = self.be(width)?;
                let f = match width {
                    4 => f64::from(f32::from_bits(bits as u32)),
                    _ => f64::from_bits(bits),
                };
                let v = self.value(depth + 1, max)?;
                map.insert(python_float(f), v);
                continue;
            }
            let k = match self.value(depth + 1, max)? {
                Value::String(k) => k,
                // What Python's `json.dumps` writes for such keys.
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null => "null".to_string(),
                Value::Array(_) | Value::Object(_) => return Err(MsgpackError::KeyNotString),
            };
            let v = self.value(depth + 1, max)?;
            map.insert(k, v);
        }
        Ok(Value::Object(map))
    }
}

/// Python's `repr` of a float, as `json.dumps` writes a float dict key:
/// the shortest digits that read back, in exponent form (`1e+16`,
/// `1.5e-05`) below 1e-4 and from 1e16 on, else with a `.0` when whole.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e}'s exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let sign_e = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{sign_e}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let n = digits.len() as i32;
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point >= n {
        format!("{digits}{}.0", "0".repeat((point - n) as usize))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

fn float(f: f64) -> Result<Value, MsgpackError> {
    // Whole numbers stay integers, as JavaScript (and JSON.stringify) would
    // write them: notepack sends `7` as a float64 when it is not an int.
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        return Ok(Value::from(f as i64));
    }
    // NaN and the infinities: `null`, as JSON.stringify writes them.
    Ok(Number::from_f64(f).map_or(Value::Null, Value::Number))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_notepack_and_msgpack_python_write() {
        // ["emitter", {"type": 2, "data": ["ev", 1.5, -3, null], "nsp": "/"}, {"rooms": ["a"]}]
        let bytes = [
            0x93, 0xa7, b'e', b'm', b'i', b't', b't', b'e', b'r', 0x83, 0xa4, b't', b'y', b'p',
            b'e', 0x02, 0xa4, b'd', b'a', b't', b'a', 0x94, 0xa2, b'e', b'v', 0xcb, 0x3f, 0xf8, 0,
            0, 0, 0, 0, 0, 0xfd, 0xd4, 0x00, 0x00, 0xa3, b'n', b's', b'p', 0xa1, b'/', 0x81, 0xa5,
            b'r', b'o', b'o', b'm', b's', 0x91, 0xa1, b'a',
        ];
        assert_eq!(
            decode(&bytes, 8).unwrap(),
            json!(["emitter", {"type": 2, "data": ["ev", 1.5, -3, null], "nsp": "/"}, {"rooms": ["a"]}])
        );
        assert_eq!(decode(&[0xcd, 0x01, 0x00], 1).unwrap(), json!(256));
        assert_eq!(
            decode(&[0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 1).unwrap(),
            json!(-1)
        );
        assert_eq!(
            decode(&[0xcb, 0x40, 0x1c, 0, 0, 0, 0, 0, 0], 1).unwrap(),
            json!(7)
        );
    }

    /// Bytes notepack 3.0.1 (the emitter's encoder) wrote for `{at: date}`,
    /// and the string `JSON.stringify` gave for each date.
    #[test]
    fn dates_are_what_a_socketio_server_would_send() {
        let hex = |h: &str| -> Vec<u8> {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        };
        for (bytes, iso) in [
            ("81a26174d7ff1d5353006b166f17", "2026-12-07T08:32:23.123Z"),
            ("81a26174d6ff6b1676bc", "2026-12-07T09:05:00.000Z"),
            ("81a26174d7ff01ab3f03e4e6b080", "2500-01-01T00:00:00.007Z"),
            // Older notepack: extension 0, eight bytes of milliseconds.
            ("81a26174d700000001a24fa1f253", "2026-12-07T08:32:23.123Z"),
        ] {
            assert_eq!(
                decode(&hex(bytes), 4).unwrap(),
                json!({"at": iso}),
                "{bytes}"
            );
        }
        // A timestamp past what toISOString writes with four digits.
        let far = [0xc7, 12, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0];
        assert_eq!(decode(&far, 4), Err(MsgpackError::Extension(-1)));
        // Before 1970: the 12-byte form with negative seconds.
        // -14_182_940 s, 500 ms = 1969-07-20T20:17:40.500Z.
        let mut moon = vec![0xc7, 12, 0xff];
        moon.extend_from_slice(&500_000_000u32.to_be_bytes());
        moon.extend_from_slice(&(-14_182_940i64).to_be_bytes());
        assert_eq!(decode(&moon, 4).unwrap(), json!("1969-07-20T20:17:40.500Z"));
        // Seconds whose milliseconds overflow: refused, never wrapped.
        let mut huge = vec![0xc7, 12, 0xff, 0xff, 0xff, 0xff, 0xff];
        huge.extend_from_slice(&(u64::MAX / 1000).to_be_bytes());
        assert_eq!(decode(&huge, 4), Err(MsgpackError::Extension(-1)));
        assert_eq!(iso_time(0).unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_time(-1).unwrap(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            iso_time(-62_167_219_200_000).unwrap(),
            "0000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            iso_time(951_782_400_000).unwrap(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn refuses_what_json_cannot_carry_and_lies() {
        assert_eq!(decode(&[0xc4, 1, 0], 4), Err(MsgpackError::Binary));
        assert_eq!(decode(&[0xd4, 0x05, 0], 4), Err(MsgpackError::Extension(5)));
        // msgpack-python's int, bool and None keys: json.dumps's strings.
        assert_eq!(decode(&[0x81, 0x01, 0x01], 4).unwrap(), json!({"1": 1}));
        assert_eq!(
            decode(&[0x83, 0xc3, 0x01, 0xc0, 0x02, 0xff, 0x03], 4).unwrap(),
            json!({"true": 1, "null": 2, "-1": 3})
        );
        assert_eq!(
            decode(&[0x81, 0x90, 0x01], 4),
            Err(MsgpackError::KeyNotString)
        );
        // Float keys as json.dumps spells them ({7.0: 1}: "7.0").
        assert_eq!(
            decode(&[0x81, 0xcb, 0x40, 0x1c, 0, 0, 0, 0, 0, 0, 0x01], 4).unwrap(),
            json!({"7.0": 1})
        );
        for (f, python) in [
            (7.0, "7.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1.5, "1.5"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1e20, "1e+20"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (f64::NAN, "NaN"),
            (f64::from(0.1f32), "0.10000000149011612"),
        ] {
            assert_eq!(python_float(f), python, "{f}");
        }
        assert_eq!(
            decode(&[0xdd, 0xff, 0xff, 0xff, 0xff], 4),
            Err(MsgpackError::Truncated)
        );
        assert_eq!(
            decode(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'], 4),
            Err(MsgpackError::Truncated)
        );
        assert_eq!(decode(&[0xa2, 0xff, 0xfe], 4), Err(MsgpackError::NotUtf8));
        assert_eq!(decode(&[0xc0, 0xc0], 4), Err(MsgpackError::Trailing(1)));
        assert_eq!(decode(&[0xc1], 4), Err(MsgpackError::BadByte(0xc1)));
        // NaN and infinity: null, as JSON.stringify writes them.
        assert_eq!(
            decode(
                &[
                    0x92, 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0, 0xcb, 0x7f, 0xf0, 0, 0, 0, 0, 0, 0
                ],
                4
            )
            .unwrap(),
            json!([null, null])
        );
        assert_eq!(
            decode(b"{\"json\": 1}", 4).unwrap_err(),
            MsgpackError::Trailing(10)
        );
        let deep = vec![0x91; 20_000];
        assert_eq!(decode(&deep, 72), Err(MsgpackError::TooDeep(72)));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode(&bytes, 16);
        }
    }
}
