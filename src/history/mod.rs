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
//! The epoch is a random string that changes whenever a topic's history is
//! lost (Redis restarted empty, keys expired, a new embedded process): an
//! offset means something only together with its epoch.
//!
//! What to do with offsets on the receiving side is pure logic here too:
//! [`Sequence`] is a node's "last offset delivered" per topic (gap
//! detection), [`Seam`] filters what a recovering subscriber may still
//! receive (no duplicate, nothing out of order at the seam between replay and
//! live publications). The hub does the I/O around them.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

/// The deepest nesting of arrays and objects a publication's `data` may have
/// on the history path; the same rule is checked by the Redis function.
pub const MAX_DEPTH: usize = 64;

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
    pub epoch: Arc<str>,
    /// The topic's current top offset (0 before its first publication).
    pub top: u64,
    /// Stored publications after the requested offset, oldest first, at most
    /// the requested number; trimmed or expired ones are simply absent.
    pub entries: Vec<Stored>,
}

impl Range {
    pub fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
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
    /// an offset above `since`. Gives a topic its epoch on first use (so a
    /// subscriber learns the epoch the first publication will carry) and
    /// keeps the epoch alive while the topic is read.
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

/// A new epoch: 8 random characters from `[0-9a-z]`.
pub fn new_epoch() -> Arc<str> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let s: String = (0..8)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    Arc::from(s)
}

/// Whether `raw` JSON nests arrays/objects deeper than `max` levels (a
/// scalar is depth 0, `[1]` depth 1). Scans bytes, never recurses.
pub fn deeper_than(raw: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for b in raw.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
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

impl Seam {
    /// Whether publication `offset` of `epoch` goes to the subscriber.
    pub fn admit(&mut self, epoch: &Arc<str>, offset: u64) -> bool {
        if *epoch == self.epoch && offset > self.threshold {
            self.threshold = offset;
            true
        } else {
            false
        }
    }

    /// The part of `gap` the subscriber must be told about, if any.
    pub fn admit_gap(&mut self, gap: &GapRange) -> Option<GapRange> {
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
/// of the same epoch, `None` when it is not recoverable.
pub fn recover<'r>(since_offset: u64, since_epoch: &str, range: &'r Range) -> Option<&'r [Stored]> {
    if *range.epoch != *since_epoch || since_offset > range.top {
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
    fn depth_counts_nesting_outside_strings() {
        assert!(!deeper_than("1", 0));
        assert!(deeper_than("[1]", 0));
        assert!(!deeper_than(r#"{"a":[1,{"b":2}]}"#, 3));
        assert!(deeper_than(r#"{"a":[1,{"b":2}]}"#, 2));
        assert!(!deeper_than(r#"["[[[[\"]]]]"]"#, 1));
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(deeper_than(&deep, MAX_DEPTH));
        assert!(!deeper_than(&deep[1..deep.len() - 1], MAX_DEPTH));
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

        #[test]
        fn depth_scan_agrees_with_serde(depth in 0usize..100, wrap_string in any::<bool>()) {
            let mut s = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            if wrap_string { s = format!("{{\"k\":\"[[[\",\"v\":{s}}}"); }
            let real = depth + usize::from(wrap_string);
            prop_assert_eq!(deeper_than(&s, MAX_DEPTH), real > MAX_DEPTH);
        }
    }
}
