//! The publisher: `PUBLISH {prefix}:t:{topic} {"event":…,"data":{"seq","ts","pad"}}`
//! spoken in RESP over one blocking TCP connection (the publisher contract),
//! on its own thread so that its timing does not depend on the generator.
//! For history topics it publishes with
//! `FCALL switchboard_publish 1 <topic> <envelope> <prefix>` instead (the
//! history contract, `src/history/redis.rs`) and checks that the offsets it
//! gets back are consecutive.
//!
//! Every event due by now is written in one pipelined batch and the batch's
//! replies are read before the next one: at a fixed rate that is one event
//! per write; as fast as possible it is [`MAX_BATCH`] per write.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::now_us;

/// Commands in flight at most (as-fast-as-possible mode).
const MAX_BATCH: u64 = 128;

pub struct Plan {
    pub redis: SocketAddr,
    pub channel: String,
    /// `Some((topic, prefix))`: publish with `FCALL switchboard_publish`.
    pub history: Option<(String, String)>,
    pub event: String,
    pub events: u64,
    /// Events per second; 0 = as fast as possible.
    pub rate: f64,
    pub pad: usize,
}

#[derive(Serialize, Default, Clone)]
pub struct PublishReport {
    pub events: u64,
    pub errors: u64,
    pub first_us: u64,
    pub last_us: u64,
    pub seconds: f64,
    pub rate: f64,
    /// The most a fixed-rate schedule fell behind, ms.
    pub max_behind_ms: f64,
    /// Subscribed Redis clients per PUBLISH reply (the nodes that listen).
    pub receivers_min: i64,
    pub receivers_max: i64,
    /// History: the offsets `switchboard_publish` assigned (first, last) and
    /// the epoch; a reply whose offset did not follow the previous one counts
    /// as an error.
    pub first_offset: u64,
    pub last_offset: u64,
    pub epoch: String,
}

pub fn run(plan: &Plan) -> anyhow::Result<PublishReport> {
    let stream = TcpStream::connect_timeout(&plan.redis, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let pad = "x".repeat(plan.pad);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut line = String::new();
    let mut payload = String::with_capacity(plan.pad + 128);
    let mut r = PublishReport {
        receivers_min: i64::MAX,
        receivers_max: i64::MIN,
        ..Default::default()
    };
    let start = Instant::now();
    let mut seq = 0u64;
    r.first_us = now_us();
    while seq < plan.events {
        let due = if plan.rate > 0.0 {
            let elapsed = start.elapsed().as_secs_f64();
            let due_total = ((elapsed * plan.rate).floor() as u64 + 1).min(plan.events);
            if due_total <= seq {
                let next = Duration::from_secs_f64(seq as f64 / plan.rate);
                std::thread::sleep(next.saturating_sub(start.elapsed()));
                continue;
            }
            let behind = elapsed - seq as f64 / plan.rate;
            r.max_behind_ms = r.max_behind_ms.max(behind * 1000.0);
            due_total - seq
        } else {
            (plan.events - seq).min(MAX_BATCH)
        };
        buf.clear();
        let ts = now_us();
        for s in seq..seq + due {
            payload.clear();
            write!(
                payload,
                r#"{{"event":"{}","data":{{"seq":{s},"ts":{ts},"pad":"{pad}"}}}}"#,
                plan.event
            )?;
            match &plan.history {
                None => write!(
                    buf,
                    "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{}\r\n${}\r\n{}\r\n",
                    plan.channel.len(),
                    plan.channel,
                    payload.len(),
                    payload
                )?,
                Some((topic, prefix)) => write!(
                    buf,
                    "*6\r\n$5\r\nFCALL\r\n$19\r\nswitchboard_publish\r\n$1\r\n1\r\n\
                     ${}\r\n{}\r\n${}\r\n{}\r\n${}\r\n{}\r\n",
                    topic.len(),
                    topic,
                    payload.len(),
                    payload,
                    prefix.len(),
                    prefix
                )?,
            }
        }
        writer.write_all(&buf)?;
        for _ in 0..due {
            let reply = read_reply(&mut reader, &mut line)?;
            match (&plan.history, reply) {
                (None, Reply::Int(n)) => {
                    r.receivers_min = r.receivers_min.min(n);
                    r.receivers_max = r.receivers_max.max(n);
                }
                (Some(_), Reply::Position(offset, epoch)) => {
                    if r.last_offset == 0 {
                        r.first_offset = offset;
                        r.epoch = epoch;
                    } else if offset != r.last_offset + 1 || epoch != r.epoch {
                        r.errors += 1;
                    }
                    r.last_offset = offset;
                }
                (_, Reply::Error(e)) => {
                    if r.errors == 0 {
                        eprintln!("switchboard-bench: Redis refused a publication: {e}");
                    }
                    r.errors += 1;
                }
                _ => r.errors += 1,
            }
        }
        seq += due;
    }
    r.last_us = now_us();
    r.events = seq;
    r.seconds = start.elapsed().as_secs_f64();
    r.rate = if r.seconds > 0.0 {
        seq as f64 / r.seconds
    } else {
        0.0
    };
    if seq == 0 || plan.history.is_some() {
        r.receivers_min = 0;
        r.receivers_max = 0;
    }
    Ok(r)
}

/// The replies this publisher expects.
enum Reply {
    /// `PUBLISH`: the number of subscribed clients that got it.
    Int(i64),
    /// `FCALL switchboard_publish`: `[offset, epoch]`.
    Position(u64, String),
    Error(String),
    Other,
}

fn read_reply(reader: &mut impl BufRead, line: &mut String) -> anyhow::Result<Reply> {
    let mut next = |line: &mut String| -> anyhow::Result<()> {
        line.clear();
        if reader.read_line(line)? == 0 {
            anyhow::bail!("Redis closed the connection");
        }
        Ok(())
    };
    next(line)?;
    let head = line.trim_end().to_string();
    Ok(match head.as_bytes().first() {
        Some(b':') => head[1..].parse().map_or(Reply::Other, Reply::Int),
        Some(b'-') => Reply::Error(head[1..].to_string()),
        Some(b'*') if head == "*2" => {
            next(line)?;
            let offset = line
                .trim_end()
                .strip_prefix(':')
                .and_then(|v| v.parse().ok());
            next(line)?; // `$<len>`
            next(line)?;
            let epoch = line.trim_end().to_string();
            offset.map_or(Reply::Other, |o| Reply::Position(o, epoch))
        }
        _ => Reply::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(text: &str) -> Vec<Reply> {
        let mut reader = BufReader::new(text.as_bytes());
        let mut line = String::new();
        let mut out = Vec::new();
        while let Ok(r) = read_reply(&mut reader, &mut line) {
            out.push(r);
        }
        out
    }

    #[test]
    fn publish_and_fcall_replies() {
        let r = replies(
            ":2\r\n*2\r\n:17\r\n$4\r\nk3x9\r\n-ERR topic 'x' is not a history topic\r\n+OK\r\n",
        );
        assert!(matches!(r[0], Reply::Int(2)));
        assert!(matches!(&r[1], Reply::Position(17, e) if e == "k3x9"));
        assert!(matches!(&r[2], Reply::Error(e) if e.starts_with("ERR topic")));
        assert!(matches!(r[3], Reply::Other));
        assert_eq!(r.len(), 4);
    }
}
