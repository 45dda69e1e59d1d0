//! Per-topic history: offsets, epochs, the one atomic append-and-publish, and
//! range reads for recovery and gap repair.
//!
//! A publication on a history topic (`HISTORY_TOPICS`) gets the next offset
//! of its topic (1, 2, 3, … with no holes) and the topic's epoch, is appended
//! to the topic's bounded history and published to the backplane **in one
//! step** ([`History::publish`]): in Redis one function call
//! (`FCALL switchboard_publish`), in memory one lock. Stored and published
//! bytes are the same envelope, so history and pub/sub never disagree.
//!
//! The epoch is a string that changes whenever a topic's history is lost
//! (Redis restarted empty, keys expired, a new embedded process): an offset
//! means something only together with its epoch. It begins with the time it
//! was created (`<ms since the Unix epoch, base 36>.<random>`).
//!
//! Reads write nothing: a topic that has no epoch yet (never published, or
//! its history expired) is read as a **pending** epoch, `~<ms, base 36>`, the
//! time of the read, with top 0, and no key or entry is created for it. The
//! first publication creates the real epoch. A position in a pending epoch
//! stands for the same offset of the first real epoch created after it
//! ([`Range::continues`]), so a subscriber that joined before the first
//! publication still recovers it, and a live one takes it as the next.
//!
//! What to do with offsets on the receiving side is pure logic here too:
//! [`Sequence`] is a node's "last offset delivered" per topic (gap
//! detection), [`Seam`] filters what a recovering subscriber may still
//! receive (no duplicate, nothing out of order at the seam between replay and
//! live publications). The hub does the I/O around them.

pub mod coalesce;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::future::BoxFuture;

/// The deepest nesting of `data` the Redis function accepts: the node's own
/// rule for every source.
pub use crate::protocol::MAX_DATA_DEPTH as MAX_DEPTH;

/// Where a topic's history stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// One stored publication: its offset and the envelope exactly as published
/// (with `offset` and `epoch`).
#[derive(Debug, Clone)]
pub struct Stored {
    pub offset: u64,
    pub payload: Bytes,
}

/// A read of a topic's history.
#[derive(Debug, Clone)]
pub struct Range {
    /// The topic's epoch, or a pending one ([`pending_epoch`]) when the topic
    /// has none yet.
    pub epoch: Arc<str>,
    /// The topic's current top offset (0 before its first publication).
    pub top: u64,
    /// Stored publications after the requested offset, oldest first, at most
    /// the requested number; trimmed or expired ones are simply absent.
    pub entries: Vec<Stored>,
    /// Pending epochs of a time before this (ms since the Unix epoch) stand
    /// for nothing: the history may have lost a whole epoch since (the
    /// embedded node's process start; 0 when unknown).
    pub floor: u64,
    /// `HISTORY_TTL_MS`: how long an epoch lives at least once created.
    pub ttl: Duration,
}

impl Range {
    pub fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    /// Whether a position in `epoch` is a position in this range's epoch:
    /// the same epoch, or a pending one of a read made before this epoch was
    /// created (or before this pending read), less than `HISTORY_TTL_MS`
    /// before. Within that time no other epoch can have been created and
    /// expired in between (an epoch lives at least the TTL), so nothing the
    /// holder of the pending position could have missed exists elsewhere;
    /// past it the position is not trusted (not recovered, never a silent
    /// loss).
    pub fn continues(&self, epoch: &str) -> bool {
        *self.epoch == *epoch || continues_into(epoch, &self.epoch, self.floor, self.ttl)
    }
}

/// Whether a position in the pending epoch `pending` is one of `epoch`
/// ([`Range::continues`]): `epoch` (or a later pending read) was created at
/// or after the pending read, less than `ttl` after it, and the pending read
/// is not older than `floor`.
pub fn continues_into(pending: &str, epoch: &str, floor: u64, ttl: Duration) -> bool {
    let (Some(pending), Some(created)) = (pending_time(pending), epoch_time(epoch)) else {
        return false;
    };
    let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    pending >= floor && pending <= created && created - pending < ttl
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("history unavailable: {0}")]
    Unavailable(String),
    /// The publication was refused (bad envelope); the text says why.
    #[error("{0}")]
    Refused(String),
}

/// A topic's history. Implementations: [`memory::MemoryHistory`] (one
/// embedded node) and [`redis::RedisHistory`].
pub trait History: Send + Sync + 'static {
    /// Appends `envelope` (a JSON object with `data`, without `offset` or
    /// `epoch`) to `topic`'s history and publishes it, stamped with its offset
    /// and the epoch, on the backplane, atomically.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        envelope: String,
    ) -> BoxFuture<'a, Result<Position, HistoryError>>;

    /// The topic's epoch and top, and up to `limit` stored publications with
    /// an offset above `since`. Writes nothing for a topic without an epoch
    /// (its range has a pending epoch and top 0); keeps an existing epoch
    /// alive while the topic is read.
    fn read<'a>(
        &'a self,
        topic: &'a str,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Range, HistoryError>>;

    /// Like [`History::read`], with the newest stored publication only.
    fn latest<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Range, HistoryError>>;
}

/// Inserts `"offset":N,"epoch":"E",` at the start of a JSON object.
pub fn stamp(envelope: &str, offset: u64, epoch: &str) -> String {
    let body = envelope.trim_start().strip_prefix('{').unwrap_or(envelope);
    format!("{{\"offset\":{offset},\"epoch\":\"{epoch}\",{body}")
}

const BASE36: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

fn base36(n: u64) -> String {
    let mut s = String::new();
    push_base36(&mut s, n);
    s
}

/// Appends `n` in base 36 (`0-9a-z`), without allocating: the form of
/// epochs here, of SSE event ids and of Socket.IO recovery tokens.
pub fn push_base36(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 13];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = BASE36[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&buf[i..]).expect("ASCII digits"));
}

fn parse_base36(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 12 {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'z' => b - b'a' + 10,
            _ => return None,
        };
        Some(n * 36 + u64::from(d))
    })
}

/// Milliseconds since the Unix epoch, by this process's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new epoch created at `ms`: `<ms, base 36>.<4 random [0-9a-z]>` (the same
/// form as the Redis function's).
pub fn new_epoch(ms: u64) -> Arc<str> {
    let random: String = (0..4)
        .map(|_| BASE36[rand::random_range(0..BASE36.len())] as char)
        .collect();
    Arc::from(format!("{}.{random}", base36(ms)))
}

/// The pending epoch of a read at `ms` of a topic that has no epoch.
pub fn pending_epoch(ms: u64) -> Arc<str> {
    Arc::from(format!("~{}", base36(ms)))
}

/// Whether `epoch` is a pending one (the topic had no epoch when it was read).
pub fn is_pending(epoch: &str) -> bool {
    epoch.starts_with('~')
}

/// The time of a pending epoch.
pub fn pending_time(epoch: &str) -> Option<u64> {
    parse_base36(epoch.strip_prefix('~')?)
}

/// When an epoch was created, or the time of a pending one; `None` for an
/// epoch of an older form (created before epochs carried their time).
pub fn epoch_time(epoch: &str) -> Option<u64> {
    match epoch.split_once('.') {
        Some((ms, _)) => parse_base36(ms),
        None => pending_time(epoch),
    }
}

// === sequencing ===

/// What a node does with a publication of a history topic, given the last
/// offset it delivered on that topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// At or below what was delivered: drop it.
    Duplicate,
    /// The next one: deliver it.
    Next,
    /// Offsets `from..=to` were never received: repair them from history
    /// (then deliver this one).
    Missing { from: u64, to: u64 },
    /// The topic's epoch changed (its history was lost): offsets `1..=to` of
    /// the new epoch were never received; what the node had not received of
    /// the old epoch is lost and unknown.
    Reset { previous: Arc<str>, to: u64 },
}

/// A node's last delivered offset of one topic.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub epoch: Arc<str>,
    pub last: u64,
}

impl Sequence {
    /// Judges publication `offset` of `epoch` and moves the sequence past it
    /// (after a `Missing`/`Reset`, the caller repairs what it can; the
    /// sequence already stands at `offset`).
    pub fn advance(&mut self, epoch: &Arc<str>, offset: u64) -> Verdict {
        if is_pending(&self.epoch) && !is_pending(epoch) {
            // The topic's first epoch after a pending read: this node was
            // subscribed since, so it continues from offset 0.
            self.epoch = epoch.clone();
            self.last = 0;
        }
        if *epoch != self.epoch {
            let previous = std::mem::replace(&mut self.epoch, epoch.clone());
            self.last = offset;
            return Verdict::Reset {
                previous,
                to: offset.saturating_sub(1),
            };
        }
        if offset <= self.last {
            return Verdict::Duplicate;
        }
        let from = self.last + 1;
        self.last = offset;
        if offset == from {
            Verdict::Next
        } else {
            Verdict::Missing {
                from,
                to: offset - 1,
            }
        }
    }
}

/// What one subscriber may still receive once it was told `epoch` and
/// `threshold` (its `subscribed` offset, or the last replayed one): only
/// newer offsets of the same epoch, and gaps that concern them.
#[derive(Debug, Clone)]
pub struct Seam {
    pub epoch: Arc<str>,
    pub threshold: u64,
}

/// A gap as the seam sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapRange {
    pub from: u64,
    pub to: u64,
    pub epoch: Arc<str>,
    pub previous_epoch: Option<Arc<str>>,
}

impl GapRange {
    /// What a subscriber that stood at `since_offset` of `since_epoch` and
    /// could not be replayed to `offset` of `epoch` lost: the offsets after
    /// its position when `same_epoch`, else the new epoch from 1 (a reset).
    /// `None` when that is nothing.
    pub fn missed(
        since_epoch: &str,
        since_offset: u64,
        epoch: &Arc<str>,
        offset: u64,
        same_epoch: bool,
    ) -> Option<GapRange> {
        let gap = if same_epoch {
            GapRange {
                from: since_offset + 1,
                to: offset,
                epoch: epoch.clone(),
                previous_epoch: None,
            }
        } else {
            GapRange {
                from: 1,
                to: offset,
                epoch: epoch.clone(),
                previous_epoch: Some(since_epoch.into()),
            }
        };
        (gap.from <= gap.to || gap.previous_epoch.is_some()).then_some(gap)
    }
}

impl Seam {
    /// Whether publication `offset` of `epoch` goes to the subscriber.
    pub fn admit(&mut self, epoch: &Arc<str>, offset: u64) -> bool {
        if is_pending(&self.epoch) && !is_pending(epoch) {
            // Subscribed before the topic had an epoch: the first real one
            // starts at offset 1 for this subscriber.
            self.epoch = epoch.clone();
            self.threshold = 0;
        }
        if *epoch == self.epoch && offset > self.threshold {
            self.threshold = offset;
            true
        } else {
            false
        }
    }

    /// The part of `gap` the subscriber must be told about, if any.
    pub fn admit_gap(&mut self, gap: &GapRange) -> Option<GapRange> {
        if is_pending(&self.epoch) && !is_pending(&gap.epoch) {
            // Offsets of the first real epoch lost: a plain gap of it, from
            // offset 1 (whatever epoch the node had before, the subscriber
            // never had a position in it).
            self.epoch = gap.epoch.clone();
            self.threshold = 0;
        }
        if gap.epoch != self.epoch {
            // A reset: the subscriber moves to the new epoch with it.
            self.epoch = gap.epoch.clone();
            self.threshold = gap.to;
            return Some(gap.clone());
        }
        if gap.to <= self.threshold {
            return None;
        }
        let from = gap.from.max(self.threshold + 1);
        self.threshold = gap.to;
        Some(GapRange {
            from,
            to: gap.to,
            epoch: gap.epoch.clone(),
            previous_epoch: None,
        })
    }
}

/// The outcome of a subscriber's `since` against a read of the history:
/// `Some(entries)` to replay when the whole range after `since` is there and
/// of the same epoch (or a pending one it continues, [`Range::continues`]),
/// `None` when it is not recoverable.
pub fn recover<'r>(since_offset: u64, since_epoch: &str, range: &'r Range) -> Option<&'r [Stored]> {
    if !range.continues(since_epoch) || since_offset > range.top {
        return None;
    }
    let missing = range.top - since_offset;
    let entries = &range.entries[..];
    let contiguous = entries.len() as u64 == missing
        && entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.offset == since_offset + 1 + i as u64);
    contiguous.then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn e(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn stamping_puts_the_position_first() {
        assert_eq!(
            stamp(r#"{"v":1,"data":2}"#, 7, "ab"),
            r#"{"offset":7,"epoch":"ab","v":1,"data":2}"#
        );
        let parsed =
            crate::protocol::parse_envelope(stamp(r#" {"data":[1]}"#, 1, "x").as_bytes()).unwrap();
        assert_eq!(parsed.position, Some((1, "x".to_string())));
    }

    #[test]
    fn sequence_verdicts() {
        let mut s = Sequence {
            epoch: e("a"),
            last: 3,
        };
        assert_eq!(s.advance(&e("a"), 3), Verdict::Duplicate);
        assert_eq!(s.advance(&e("a"), 4), Verdict::Next);
        assert_eq!(s.advance(&e("a"), 7), Verdict::Missing { from: 5, to: 6 });
        assert_eq!(s.last, 7);
        assert_eq!(
            s.advance(&e("b"), 2),
            Verdict::Reset {
                previous: e("a"),
                to: 1
            }
        );
        assert_eq!(s.advance(&e("b"), 3), Verdict::Next);
    }

    fn range(epoch: &str, top: u64, offsets: &[u64]) -> Range {
        Range {
            floor: 0,
            ttl: Duration::from_secs(600),
            epoch: e(epoch),
            top,
            entries: offsets
                .iter()
                .map(|o| Stored {
                    offset: *o,
                    payload: Bytes::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn recovery_needs_the_whole_range_of_the_same_epoch() {
        assert_eq!(recover(2, "a", &range("a", 4, &[3, 4])).unwrap().len(), 2);
        assert_eq!(recover(4, "a", &range("a", 4, &[])).unwrap().len(), 0);
        assert!(
            recover(1, "a", &range("a", 4, &[3, 4])).is_none(),
            "trimmed"
        );
        assert!(recover(2, "b", &range("a", 4, &[3, 4])).is_none(), "epoch");
        assert!(recover(5, "a", &range("a", 4, &[])).is_none(), "ahead");
    }

    #[test]
    fn epochs_carry_their_time() {
        let real = new_epoch(1_700_000_000_123);
        assert_eq!(epoch_time(&real), Some(1_700_000_000_123));
        assert!(!is_pending(&real));
        let pending = pending_epoch(1_700_000_000_000);
        assert_eq!(&*pending, "~loyw3v28");
        assert_eq!(pending_time(&pending), Some(1_700_000_000_000));
        assert_eq!(epoch_time(&pending), Some(1_700_000_000_000));
        assert_eq!(pending_time("tb2k9w1qx4c"), None, "an older epoch");
        assert_eq!(epoch_time("tb2k9w1qx4c"), None);
        assert_eq!(pending_time("~"), None);
        assert_eq!(pending_time("~A"), None);
    }

    #[test]
    fn a_pending_position_continues_into_the_first_epoch_created_after_it() {
        let t = 1_700_000_000_000;
        let read = pending_epoch(t);
        let mut first = range("x", 3, &[1, 2, 3]);
        first.epoch = Arc::from(format!("{}.abcd", base36(t + 300_000)));
        // Subscribed 5 minutes before the first publication: everything.
        assert_eq!(recover(0, &read, &first).unwrap().len(), 3);
        // A live subscriber that saw offset 2 under its pending position.
        let mut rest = range("x", 3, &[3]);
        rest.epoch = first.epoch.clone();
        assert_eq!(recover(2, &read, &rest).unwrap().len(), 1);
        // The epoch is older than the read: another history, a gap.
        first.epoch = Arc::from(format!("{}.abcd", base36(t - 1)));
        assert!(recover(0, &read, &first).is_none());
        // Created a TTL or more after the read: an epoch may have come and
        // gone in between; not trusted.
        first.epoch = Arc::from(format!("{}.abcd", base36(t + 600_000)));
        assert!(recover(0, &read, &first).is_none());
        // Still no epoch: nothing to replay, recovered.
        let mut still = range("x", 0, &[]);
        still.epoch = pending_epoch(t + 1_000);
        assert_eq!(recover(0, &read, &still).unwrap().len(), 0);
        assert!(recover(1, &read, &still).is_none(), "ahead");
        // Issued before the history's floor (an embedded node restarted).
        still.floor = t + 1;
        assert!(recover(0, &read, &still).is_none());
    }

    #[test]
    fn the_first_epoch_after_a_pending_one_is_no_reset() {
        let real = new_epoch(2);
        let mut s = Sequence {
            epoch: pending_epoch(1),
            last: 0,
        };
        assert_eq!(s.advance(&real, 1), Verdict::Next);
        let mut s = Sequence {
            epoch: pending_epoch(1),
            last: 0,
        };
        assert_eq!(s.advance(&real, 3), Verdict::Missing { from: 1, to: 2 });
        let mut seam = Seam {
            epoch: pending_epoch(1),
            threshold: 0,
        };
        assert!(seam.admit(&real, 1));
        assert!(!seam.admit(&real, 1));
        assert!(seam.admit(&real, 2));
        let mut seam = Seam {
            epoch: pending_epoch(1),
            threshold: 0,
        };
        let gap = GapRange {
            from: 1,
            to: 2,
            epoch: real.clone(),
            previous_epoch: None,
        };
        assert_eq!(seam.admit_gap(&gap), Some(gap.clone()));
        assert!(seam.admit(&real, 3));
        // The node's reset to the first epoch is nothing to a pending
        // subscriber when nothing of it is lost.
        let mut seam = Seam {
            epoch: pending_epoch(1),
            threshold: 0,
        };
        let reset = GapRange {
            from: 1,
            to: 0,
            epoch: real.clone(),
            previous_epoch: Some(new_epoch(0)),
        };
        assert_eq!(seam.admit_gap(&reset), None);
        assert!(seam.admit(&real, 1));
    }

    /// One item a subscriber can be handed: a publication or a gap.
    #[derive(Debug, Clone)]
    enum Item {
        Pub(u64),
        Gap(u64, u64),
    }

    proptest! {
        /// Replay + held live items through the seam: every offset after
        /// `since` exactly once, in order, whatever the overlap between the
        /// replay and the held live publications.
        #[test]
        fn seam_merges_replay_and_live_without_gap_or_duplicate(
            since in 0u64..50,
            read_at in 0u64..50,
            live_start in 0u64..50,
            live_len in 0u64..50,
            lost in proptest::collection::vec(0u64..150, 0..5),
        ) {
            let epoch = e("a");
            let top = since + read_at;
            // Live publications received from `live_start`, some lost and announced by the node as gaps.
            let first_live = since + 1 + live_start.min(read_at);
            let last_live = top + live_len;
            let mut held = Vec::new();
            let mut o = first_live;
            while o <= last_live {
                if lost.contains(&o) && o > top {
                    let mut to = o;
                    while to < last_live && lost.contains(&(to + 1)) { to += 1; }
                    held.push(Item::Gap(o, to));
                    o = to + 1;
                } else {
                    held.push(Item::Pub(o));
                    o += 1;
                }
            }
            let r = range("a", top, &(since + 1..=top).collect::<Vec<_>>());
            let replay = recover(since, "a", &r).unwrap();
            let mut seam = Seam { epoch: epoch.clone(), threshold: since };
            let mut seen = Vec::new();
            for s in replay {
                prop_assert!(seam.admit(&epoch, s.offset));
                seen.push(s.offset);
            }
            for item in held {
                match item {
                    Item::Pub(o) => if seam.admit(&epoch, o) { seen.push(o) },
                    Item::Gap(f, t) => if let Some(g) = seam.admit_gap(&GapRange { from: f, to: t, epoch: epoch.clone(), previous_epoch: None }) {
                        seen.extend(g.from..=g.to);
                    },
                }
            }
            let expected: Vec<u64> = (since + 1..=last_live.max(top)).collect();
            prop_assert_eq!(seen, expected);
        }
    }
}
