//! How long a fan-out slice may hold a publication so that its topic's next
//! ones go out with it: the batching that adapts to load by itself.
//!
//! Every hand-out of a publication to a connection costs that connection's
//! writer one wake-up and one `write(2)`, a few µs each whatever the frame
//! size (docs/benchmarks.md, the probe rows). Handing several publications of
//! a topic out together puts them into one write per connection. That saves
//! CPU only where the writes are many, and costs latency everywhere, so:
//!
//! - A slice measures its **demand**: the writes per second it would cause
//!   with every publication handed out at once (each publication counts its
//!   topic's subscribers in this slice). It is taken from what arrives, not
//!   from what was handed out, so batching does not feed back into it.
//! - Up to [`BUDGET`] writes per second the slice is not busy: every
//!   publication goes at once (the latency of no batching at all).
//! - Above it, the slice asks each topic for `ceil(demand / BUDGET)`
//!   publications per hand-out (twice the budget: pairs, …), which brings its
//!   writes back to about the budget. A publication waits until its topic has
//!   that many pending, or until the time that many would take at the
//!   topic's own rate (its mean interval, with some slack for jitter).
//! - The budget shrinks as the machine's CPUs get contended: the demand is
//!   weighed by `1 + 5 × contention`, the contention being the part above
//!   0.4 of the pressure, the share of time that runnable threads waited
//!   for a CPU ([`Pressure`]); below 0.4 that share is wake-up bursts on a
//!   machine with CPU to spare. A write is then
//!   taken from somebody else's CPU time and a publication's latency is
//!   mostly that wait, so a busy slice goes from pairs to threes or fours,
//!   which lowers both (measured, docs/benchmarks.md). A slice under half
//!   the budget (16,000 writes/s; the `moderate` shape is 12,500) is never
//!   held, whatever the pressure.
//! - Only topics that are a real part of the load are held: one whose own
//!   writes are under an eighth of the budget (few subscribers here, or
//!   rare) goes at once even in a busy slice, since holding it saves little.
//! - No publication ever waits longer than the ceiling
//!   (`WEBSOCKET_FLUSH_INTERVAL_MS`), and a topic too slow to gather two
//!   publications within it is never held. A ceiling of zero turns batching
//!   off.
//!
//! The slice hands out everything pending at once (the first deadline or
//! the last topic to reach its count decides), in the dispatcher's order,
//! which is what keeps each connection's order across its topics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Item;
use super::pressure::Pressure;

/// Writes per second a slice may cause before it batches. A write of a small
/// frame costs 3.5–5 µs of CPU on the benchmark's machine (its kernel part
/// included), so this is about a seventh of a core per slice; the hub has
/// one slice per worker thread. Measured shapes (2 nodes, 2 slices each):
/// 100 subscribers × 500/s is 12,500 per slice (never held), 1,000 × 200/s
/// is 50,000 (pairs), 5,000 × 100/s is 125,000 (fours, capped by the
/// ceiling).
pub const BUDGET: f64 = 32_000.0;

/// How much the machine's CPU contention weighs on the demand: a slice's
/// demand counts `1 + CONTENTION_WEIGHT × contention` times, the contention
/// being the pressure's part above [`CONTENTION_FLOOR`]. On saturated
/// 2-vCPU machines (the `fanout` shape, pressure 0.5–0.8) that is 1.5–3,
/// about the `1 + 2 × pressure` measured there before the floor (threes
/// and fours: server CPU per delivery 4.4–4.8 µs against 4.7–6.1 with
/// `1 + pressure`, the Socket.IO p99 29–35 ms against 30–91;
/// docs/benchmarks.md). When threads queue for a CPU, a publication's
/// latency is mostly that queue, which fewer writes shorten.
const CONTENTION_WEIGHT: f64 = 5.0;

/// The pressure below which the machine counts as uncontended. Wake-up
/// bursts alone read 0.16–0.33 on 2-vCPU machines a quarter to a third
/// busy (the `fanout` shape at defaults), where the time a publication
/// takes is the batch's hold, not a CPU queue: weighing that pressure took
/// the shape from pairs to threes and fours, and its p99 from under half
/// socketioxide's to 0.6–0.9× (docs/benchmarks.md, the thirteenth VM).
const CONTENTION_FLOOR: f64 = 0.4;

/// The contention a CPU pressure `share` (0–1) stands for.
fn contention(share: f64) -> f64 {
    (share - CONTENTION_FLOOR).max(0.0)
}

/// How often the demand is re-estimated.
const WINDOW: Duration = Duration::from_millis(100);

/// Slack on a topic's expected interval before a held batch gives up
/// waiting for its next publication.
const SLACK: f64 = 1.5;

/// Weight of the newest interval in a topic's mean interval.
const ALPHA: f64 = 0.25;

/// Topics not seen for this long are forgotten.
const FORGET: Duration = Duration::from_secs(10);

/// What the slice may do with one arriving item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hold {
    /// Items of this topic to gather before handing out (1: at once).
    pub want: u32,
    /// The latest moment it may be handed out.
    pub until: Instant,
}

/// One slice's view of its load (see the module docs).
pub struct Pacer {
    ceiling: Duration,
    window_start: Instant,
    window_writes: u64,
    /// Smoothed demand, writes per second.
    demand: f64,
    topics: HashMap<Arc<str>, Pace>,
    pruned_at: Instant,
    pressure: Arc<Pressure>,
    /// The contention `pressure` stands for, read once per window.
    contention: f64,
}

/// One topic as this slice sees it.
struct Pace {
    last: Instant,
    /// Mean interval between its publications, seconds.
    interval: f64,
    /// Its subscribers in this slice at the last hand-out.
    subscribers: usize,
}

impl Pacer {
    pub fn new(ceiling: Duration, pressure: Arc<Pressure>, now: Instant) -> Self {
        Self {
            ceiling,
            window_start: now,
            window_writes: 0,
            demand: 0.0,
            topics: HashMap::new(),
            pruned_at: now,
            pressure,
            contention: 0.0,
        }
    }

    /// The demand last estimated, writes per second.
    #[cfg(test)]
    pub fn demand(&self) -> f64 {
        self.demand
    }

    /// Records an item arriving at `now` and says how long it may be held.
    pub fn arrive(&mut self, item: &Item, now: Instant) -> Hold {
        let at_once = Hold {
            want: 1,
            until: now,
        };
        if self.ceiling.is_zero() {
            return at_once;
        }
        let Item::Pub(p) = item else {
            // A gap is announced at once.
            return at_once;
        };
        self.roll(now);
        let pace = match self.topics.get_mut(&*p.topic) {
            Some(pace) => {
                let dt = now.saturating_duration_since(pace.last).as_secs_f64();
                pace.interval = ALPHA * dt + (1.0 - ALPHA) * pace.interval;
                pace.last = now;
                pace
            }
            None => self.topics.entry(p.topic.clone()).or_insert(Pace {
                last: now,
                // Unknown rate: treated as quiet until it shows otherwise.
                interval: self.ceiling.as_secs_f64() * 4.0,
                subscribers: 0,
            }),
        };
        self.window_writes += pace.subscribers as u64;
        if self.demand < BUDGET / 2.0 {
            return at_once;
        }
        let busy = self.demand * (1.0 + CONTENTION_WEIGHT * self.contention) / BUDGET;
        if busy <= 1.0 {
            return at_once;
        }
        let interval = pace.interval.max(1e-6);
        if (pace.subscribers as f64) / interval < BUDGET / 8.0 {
            return at_once;
        }
        // As many as the ceiling can gather at this topic's rate, at most.
        let gatherable = 1.0 + (self.ceiling.as_secs_f64() / interval + 1e-6).floor();
        let want = busy.ceil().min(gatherable).min(u32::MAX as f64) as u32;
        if want <= 1 {
            return at_once;
        }
        let wait = Duration::from_secs_f64(f64::from(want - 1) * interval * SLACK);
        Hold {
            want,
            until: now + wait.min(self.ceiling),
        }
    }

    /// `topic` was just handed to `subscribers` connections of this slice.
    pub fn handed(&mut self, topic: &str, subscribers: usize) {
        if let Some(pace) = self.topics.get_mut(topic) {
            pace.subscribers = subscribers;
        }
    }

    /// Closes the demand window when it is over; now and then forgets
    /// topics that went quiet.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < WINDOW {
            return;
        }
        let rate = self.window_writes as f64 / elapsed.as_secs_f64();
        // After a long quiet spell the old estimate says nothing.
        self.demand = if elapsed >= WINDOW * 10 {
            rate
        } else {
            0.5 * self.demand + 0.5 * rate
        };
        self.window_start = now;
        self.window_writes = 0;
        self.contention = contention(self.pressure.share());
        if now.saturating_duration_since(self.pruned_at) >= FORGET {
            self.topics
                .retain(|_, pace| now.saturating_duration_since(pace.last) < FORGET);
            self.pruned_at = now;
        }
    }
}

/// The items a slice holds: per topic how many and how many it wants, and
/// the earliest deadline.
#[derive(Default)]
pub struct Held {
    topics: Vec<(Arc<str>, u32, u32)>,
    due: Option<Instant>,
}

impl Held {
    pub fn add(&mut self, topic: &Arc<str>, hold: Hold) {
        self.due = Some(self.due.map_or(hold.until, |d| d.min(hold.until)));
        match self.topics.iter_mut().find(|(t, _, _)| t == topic) {
            Some((_, count, want)) => {
                *count += 1;
                *want = hold.want;
            }
            None => self.topics.push((topic.clone(), 1, hold.want)),
        }
    }

    /// When the held items must go, if any are held.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Whether to hand out now: a deadline passed, or every held topic has
    /// gathered what it wanted.
    pub fn ready(&self, now: Instant) -> bool {
        self.due.is_some_and(|due| due <= now)
            || (!self.topics.is_empty() && self.topics.iter().all(|(_, n, want)| n >= want))
    }

    pub fn clear(&mut self) {
        self.topics.clear();
        self.due = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Publication;
    use serde_json::value::RawValue;

    fn item(topic: &str) -> Item {
        let data: Arc<RawValue> = Arc::from(RawValue::from_string("1".into()).unwrap());
        Item::Pub(Arc::new(Publication::new(
            topic.into(),
            topic.into(),
            data,
            std::time::Instant::now(),
        )))
    }

    /// Feeds `count` publications of `topic` every `every`, handing each
    /// out to `subscribers` (as the slice would after a hand-out), and
    /// returns the last hold.
    fn feed(
        pacer: &mut Pacer,
        now: &mut Instant,
        topic: &str,
        subscribers: usize,
        every: Duration,
        count: usize,
    ) -> Hold {
        let it = item(topic);
        let mut hold = None;
        for _ in 0..count {
            *now += every;
            hold = Some(pacer.arrive(&it, *now));
            pacer.handed(topic, subscribers);
        }
        hold.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn light_load_goes_at_once() {
        let start = Instant::now();
        let mut now = start;
        let mut pacer = Pacer::new(Duration::from_millis(20), Pressure::new(), start);
        // 25 subscribers at 500/s: 12,500 writes/s.
        let hold = feed(
            &mut pacer,
            &mut now,
            "t",
            25,
            Duration::from_millis(2),
            1000,
        );
        assert!(
            (pacer.demand() - 12_500.0).abs() < 500.0,
            "{}",
            pacer.demand()
        );
        assert_eq!(
            hold,
            Hold {
                want: 1,
                until: now
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_topic_goes_in_pairs_held_at_most_its_interval_with_slack() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(Duration::from_millis(20), Pressure::new(), now);
        // 250 subscribers at 200/s: 50,000 writes/s, about 1.6 budgets.
        let hold = feed(
            &mut pacer,
            &mut now,
            "t",
            250,
            Duration::from_millis(5),
            400,
        );
        assert_eq!(hold.want, 2);
        let waited = hold.until - now;
        assert!(
            waited > Duration::from_millis(7) && waited < Duration::from_millis(8),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cpu_pressure_makes_a_busy_slice_gather_more_and_holds_no_light_one() {
        // A fresh slice under `pressure`, fed `subscribers` × one every `ms`:
        // its last hold and how long that one may wait.
        let settle = |pressure: f64, subscribers: usize, ms: u64, count: usize| {
            let mut now = Instant::now();
            let mut pacer = Pacer::new(Duration::from_millis(20), Pressure::fixed(pressure), now);
            let every = Duration::from_millis(ms);
            let hold = feed(&mut pacer, &mut now, "t", subscribers, every, count);
            (hold.want, hold.until - now)
        };
        // The `fanout` shape's slice (250 × 200/s) on a saturated machine:
        // pressure 0.7, 50,000 × (1 + 5 × 0.3) is 3.9 budgets; four take
        // 15 ms at its rate, which with the slack passes the 20 ms ceiling.
        assert_eq!(settle(0.7, 250, 5, 400), (4, Duration::from_millis(20)));
        // Pressure 0.5: 50,000 × 1.5 is 2.3 budgets.
        assert_eq!(settle(0.5, 250, 5, 400).0, 3);
        // What wake-up bursts alone read on a machine a third busy, and
        // none at all: pairs.
        assert_eq!(settle(0.3, 250, 5, 400).0, 2);
        assert_eq!(settle(0.05, 250, 5, 400).0, 2);
        assert_eq!(settle(0.0, 250, 5, 400).0, 2);
        // The `moderate` shape's slice (25 × 500/s, 12,500 writes/s, under
        // half the budget) goes at once even when every moment some thread
        // waits for a CPU, where its weighed demand (× (1 + 5 × 0.6)) would
        // be 1.6 budgets.
        assert_eq!(settle(1.0, 25, 2, 1000).0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busier_slice_gathers_more_up_to_the_ceiling() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(Duration::from_millis(20), Pressure::new(), now);
        // 1,250 subscribers at 100/s: 125,000 writes/s wants fours, but
        // 20 ms gathers three publications at 100/s.
        let hold = feed(
            &mut pacer,
            &mut now,
            "t",
            1250,
            Duration::from_millis(10),
            300,
        );
        assert_eq!(hold.want, 3);
        assert_eq!(hold.until - now, Duration::from_millis(20), "the ceiling");
        // With a longer ceiling, four.
        let mut pacer = Pacer::new(Duration::from_millis(50), Pressure::new(), now);
        let hold = feed(
            &mut pacer,
            &mut now,
            "t",
            1250,
            Duration::from_millis(10),
            300,
        );
        assert_eq!(hold.want, 4);
        assert!(hold.until - now <= Duration::from_millis(46));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_or_thin_topic_in_a_busy_slice_is_not_held() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(Duration::from_millis(20), Pressure::new(), now);
        feed(
            &mut pacer,
            &mut now,
            "hot",
            1000,
            Duration::from_millis(5),
            400,
        );
        // A topic published every 100 ms cannot gather two within 20 ms.
        let mut hold = None;
        for _ in 0..20 {
            let h = feed(
                &mut pacer,
                &mut now,
                "hot",
                1000,
                Duration::from_millis(5),
                20,
            );
            assert!(h.want > 1);
            hold = Some(pacer.arrive(&item("cold"), now));
            pacer.handed("cold", 1000);
        }
        assert_eq!(hold.unwrap().want, 1);
        // Nor is a frequent topic with few subscribers here: 10 × 200/s is
        // 2,000 writes/s, too little to be worth a wait.
        let thin = item("thin");
        for _ in 0..50 {
            let h = feed(
                &mut pacer,
                &mut now,
                "hot",
                1000,
                Duration::from_millis(5),
                1,
            );
            assert!(h.want > 1);
            assert_eq!(pacer.arrive(&thin, now).want, 1);
            pacer.handed("thin", 10);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_quiet_spell_the_first_publication_goes_at_once() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(Duration::from_millis(20), Pressure::new(), now);
        let hold = feed(
            &mut pacer,
            &mut now,
            "t",
            250,
            Duration::from_millis(5),
            400,
        );
        assert_eq!(hold.want, 2);
        let hold = feed(&mut pacer, &mut now, "t", 250, Duration::from_secs(2), 1);
        assert_eq!(
            hold,
            Hold {
                want: 1,
                until: now
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ceiling_never_holds() {
        let mut now = Instant::now();
        let mut pacer = Pacer::new(Duration::ZERO, Pressure::fixed(1.0), now);
        let hold = feed(
            &mut pacer,
            &mut now,
            "t",
            5000,
            Duration::from_millis(1),
            1000,
        );
        assert_eq!(
            hold,
            Hold {
                want: 1,
                until: now
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn held_items_go_when_every_topic_has_its_count_or_the_first_deadline_passes() {
        let now = Instant::now();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut held = Held::default();
        let ms = Duration::from_millis;
        held.add(
            &a,
            Hold {
                want: 2,
                until: now + ms(8),
            },
        );
        assert!(!held.ready(now));
        held.add(
            &b,
            Hold {
                want: 2,
                until: now + ms(5),
            },
        );
        held.add(
            &a,
            Hold {
                want: 2,
                until: now + ms(9),
            },
        );
        assert!(!held.ready(now), "b still wants one more");
        assert_eq!(held.due(), Some(now + ms(5)));
        assert!(held.ready(now + ms(5)), "b's deadline");
        held.add(
            &b,
            Hold {
                want: 2,
                until: now + ms(6),
            },
        );
        assert!(held.ready(now), "both complete");
        held.clear();
        assert!(!held.ready(now + ms(100)));
        // An item that may not wait makes everything go.
        held.add(
            &a,
            Hold {
                want: 3,
                until: now + ms(8),
            },
        );
        held.add(
            &b,
            Hold {
                want: 1,
                until: now,
            },
        );
        assert!(held.ready(now));
    }
}
