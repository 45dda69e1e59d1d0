//! The publisher: `PUBLISH {prefix}:t:{topic} {"event":…,"data":{"seq","ts","pad"}}`
//! spoken in RESP over one blocking TCP connection (the publisher contract),
//! on its own thread so that its timing does not depend on the generator.
//! For history topics it publishes with
//! `FCALL switchboard_publish 1 <topic> <envelope> <prefix>` instead (the
//! history contract, `src/history/redis.rs`) and checks that the offsets it
//! gets back are consecutive (per topic).
//!
//! With several topics, event `j` goes to topic `j % N` with `seq` `j / N`.
//! On a Redis Cluster (`--redis-cluster`) the publisher reads the slot layout
//! with `CLUSTER SLOTS` from the seed, opens one connection per primary and
//! sends each topic's `SPUBLISH {prefix}:t:{<topic>}` (literal braces: the
//! topic is the hash tag) or `FCALL` to the primary owning the topic's slot.
//!
//! Every event due by now is written in one pipelined batch and the batch's
//! replies are read before the next one: at a fixed rate that is one event
//! per write; as fast as possible it is [`MAX_BATCH`] per write.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::now_us;

/// Commands in flight at most (as-fast-as-possible mode).
const MAX_BATCH: u64 = 128;

pub struct Plan {
    /// The Redis to publish on; on a cluster, the seed to read the slot
    /// layout from.
    pub redis: SocketAddr,
    /// A Redis Cluster: `SPUBLISH {prefix}:t:{<topic>}` (or `FCALL`) on the
    /// primary that owns the topic's slot, one connection per primary.
    pub cluster: bool,
    pub prefix: String,
    /// Event `j` goes to `topics[j % len]` with `seq` `j / len`.
    pub topics: Vec<String>,
    /// Publish with `FCALL switchboard_publish 1 <topic> <envelope> <prefix>`.
    pub history: bool,
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
    /// History: the offsets `switchboard_publish` assigned to the first
    /// topic (first, last) and its epoch; a reply whose offset did not follow
    /// the previous one of its topic counts as an error.
    pub first_offset: u64,
    pub last_offset: u64,
    pub epoch: String,
    /// Where the events went: one entry per Redis connection (the single
    /// Redis, or each cluster primary), with its address, topics, events.
    pub shards: Vec<ShardLoad>,
}

#[derive(Serialize, Default, Clone)]
pub struct ShardLoad {
    pub addr: String,
    pub topics: usize,
    pub events: u64,
}

/// One pipelined RESP connection.
struct Link {
    addr: SocketAddr,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    buf: Vec<u8>,
    /// Topic index of each command in flight, in order.
    pending: Vec<usize>,
    events: u64,
}

impl Link {
    fn open(addr: SocketAddr) -> anyhow::Result<Link> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to Redis at {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Link {
            addr,
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            buf: Vec::with_capacity(64 * 1024),
            pending: Vec::new(),
            events: 0,
        })
    }
}

/// Opens the connections and gives each topic the index of its connection.
fn connect(plan: &Plan) -> anyhow::Result<(Vec<Link>, Vec<usize>)> {
    if !plan.cluster {
        return Ok((vec![Link::open(plan.redis)?], vec![0; plan.topics.len()]));
    }
    let slots = cluster_slots(plan.redis)?;
    let mut links: Vec<Link> = Vec::new();
    let mut route = Vec::with_capacity(plan.topics.len());
    for topic in &plan.topics {
        let slot = key_slot(topic.as_bytes());
        let addr = slots
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .map(|(_, _, a)| *a)
            .with_context(|| format!("no primary owns slot {slot} (topic {topic})"))?;
        let i = match links.iter().position(|l| l.addr == addr) {
            Some(i) => i,
            None => {
                links.push(Link::open(addr)?);
                links.len() - 1
            }
        };
        route.push(i);
    }
    Ok((links, route))
}

pub fn run(plan: &Plan) -> anyhow::Result<PublishReport> {
    anyhow::ensure!(!plan.topics.is_empty(), "no topic to publish on");
    let (mut links, route) = connect(plan)?;
    let channels: Vec<String> = plan
        .topics
        .iter()
        .map(|t| {
            if plan.cluster {
                format!("{}:t:{{{t}}}", plan.prefix)
            } else {
                format!("{}:t:{t}", plan.prefix)
            }
        })
        .collect();
    let verb = if plan.cluster { "SPUBLISH" } else { "PUBLISH" };
    let n = plan.topics.len() as u64;
    let pad = "x".repeat(plan.pad);
    let mut line = String::new();
    let mut payload = String::with_capacity(plan.pad + 128);
    let mut last_offset = vec![0u64; plan.topics.len()];
    let mut epochs = vec![String::new(); plan.topics.len()];
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
        let ts = now_us();
        for j in seq..seq + due {
            let k = (j % n) as usize;
            let s = j / n;
            payload.clear();
            write!(
                payload,
                r#"{{"event":"{}","data":{{"seq":{s},"ts":{ts},"pad":"{pad}"}}}}"#,
                plan.event
            )?;
            let link = &mut links[route[k]];
            link.pending.push(k);
            link.events += 1;
            let buf = &mut link.buf;
            if plan.history {
                let (topic, prefix) = (&plan.topics[k], &plan.prefix);
                write!(
                    buf,
                    "*6\r\n$5\r\nFCALL\r\n$19\r\nswitchboard_publish\r\n$1\r\n1\r\n\
                     ${}\r\n{}\r\n${}\r\n{}\r\n${}\r\n{}\r\n",
                    topic.len(),
                    topic,
                    payload.len(),
                    payload,
                    prefix.len(),
                    prefix
                )?;
            } else {
                let channel = &channels[k];
                write!(
                    buf,
                    "*3\r\n${}\r\n{verb}\r\n${}\r\n{}\r\n${}\r\n{}\r\n",
                    verb.len(),
                    channel.len(),
                    channel,
                    payload.len(),
                    payload
                )?;
            }
        }
        // Every connection's batch goes out before any reply is read, so
        // the shards work on their batches at the same time.
        for link in links.iter_mut().filter(|l| !l.buf.is_empty()) {
            link.writer.write_all(&link.buf)?;
            link.buf.clear();
        }
        for link in links.iter_mut() {
            for k in link.pending.drain(..) {
                let reply = read_reply(&mut link.reader, &mut line)?;
                match (plan.history, reply) {
                    (false, Reply::Int(n)) => {
                        r.receivers_min = r.receivers_min.min(n);
                        r.receivers_max = r.receivers_max.max(n);
                    }
                    (true, Reply::Position(offset, epoch)) => {
                        if last_offset[k] == 0 {
                            if k == 0 {
                                r.first_offset = offset;
                                r.epoch = epoch.clone();
                            }
                            epochs[k] = epoch;
                        } else if offset != last_offset[k] + 1 || epoch != epochs[k] {
                            r.errors += 1;
                        }
                        last_offset[k] = offset;
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
        }
        seq += due;
    }
    r.last_us = now_us();
    r.last_offset = last_offset[0];
    r.events = seq;
    r.seconds = start.elapsed().as_secs_f64();
    r.rate = crate::report::per_s(seq, r.seconds);
    if seq == 0 || plan.history {
        r.receivers_min = 0;
        r.receivers_max = 0;
    }
    r.shards = links
        .iter()
        .enumerate()
        .map(|(i, l)| ShardLoad {
            addr: l.addr.to_string(),
            topics: route.iter().filter(|&&x| x == i).count(),
            events: l.events,
        })
        .collect();
    Ok(r)
}

// === cluster ===

/// CRC16/XMODEM (polynomial 0x1021, initial 0), the checksum of Redis
/// Cluster's key slots.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key (or sharded channel): CRC16 of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the whole
/// key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

/// `CLUSTER SLOTS` from `seed`: (first slot, last slot, primary address).
fn cluster_slots(seed: SocketAddr) -> anyhow::Result<Vec<(u16, u16, SocketAddr)>> {
    let mut link = Link::open(seed)?;
    link.writer
        .write_all(b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n")?;
    let ranges = match read_value(&mut link.reader)? {
        Value::Array(ranges) => ranges,
        Value::Error(e) => bail!("CLUSTER SLOTS at {seed}: {e} (is it a cluster node?)"),
        other => bail!("CLUSTER SLOTS at {seed} answered {other:?}"),
    };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            bail!("CLUSTER SLOTS: unexpected entry {range:?}");
        };
        let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(primary))) =
            (items.first(), items.get(1), items.get(2))
        else {
            bail!("CLUSTER SLOTS: unexpected entry {items:?}");
        };
        let (Some(Value::Bulk(ip)), Some(Value::Int(port))) = (primary.first(), primary.get(1))
        else {
            bail!("CLUSTER SLOTS: unexpected node {primary:?}");
        };
        // An empty IP means "the address you reached me on".
        let ip = if ip.is_empty() {
            seed.ip()
        } else {
            String::from_utf8_lossy(ip).parse()?
        };
        out.push((*lo as u16, *hi as u16, SocketAddr::new(ip, *port as u16)));
    }
    anyhow::ensure!(
        !out.is_empty(),
        "CLUSTER SLOTS at {seed}: no slots assigned"
    );
    Ok(out)
}

/// A RESP2 value (for `CLUSTER SLOTS`; the publication replies use the
/// leaner [`read_reply`]).
#[derive(Debug)]
enum Value {
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    Nil,
    Error(String),
}

fn read_value(reader: &mut impl BufRead) -> anyhow::Result<Value> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("Redis closed the connection");
    }
    let head = line.trim_end();
    let (kind, rest) = head.split_at(1.min(head.len()));
    Ok(match kind {
        ":" => Value::Int(rest.parse()?),
        "+" => Value::Bulk(rest.as_bytes().to_vec()),
        "-" => Value::Error(rest.to_string()),
        "$" => {
            let len: i64 = rest.parse()?;
            if len < 0 {
                return Ok(Value::Nil);
            }
            let mut data = vec![0u8; len as usize + 2];
            reader.read_exact(&mut data)?;
            data.truncate(len as usize);
            Value::Bulk(data)
        }
        "*" => {
            let len: i64 = rest.parse()?;
            if len < 0 {
                return Ok(Value::Nil);
            }
            let mut items = Vec::with_capacity(len as usize);
            for _ in 0..len {
                items.push(read_value(reader)?);
            }
            Value::Array(items)
        }
        _ => bail!("unexpected RESP reply {head:?}"),
    })
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

    #[test]
    fn key_slots_match_redis() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // `CLUSTER KEYSLOT foo`
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        // The channel of a topic lands on the topic's slot (`FCALL` key).
        assert_eq!(key_slot(b"p:t:{bench-7}"), key_slot(b"bench-7"));
    }

    #[test]
    fn cluster_slots_reply_parses() {
        let text = "*2\r\n*3\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nab\r\n\
                    *3\r\n:5461\r\n:16383\r\n*2\r\n$0\r\n\r\n:7001\r\n";
        let v = read_value(&mut BufReader::new(text.as_bytes())).unwrap();
        let Value::Array(r) = v else { panic!() };
        assert_eq!(r.len(), 2);
        assert!(matches!(&r[1], Value::Array(i) if matches!(i[1], Value::Int(16383))));
    }
}
