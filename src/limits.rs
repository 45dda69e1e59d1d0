//! What one client address, one user or one connection may make a node
//! hold, whatever transport it comes by: connections per address
//! (`MAX_CONNECTIONS_PER_ADDRESS`, the address behind `TRUSTED_PROXIES`
//! from `X-Forwarded-For`), connections per user (`MAX_CONNECTIONS_PER_USER`),
//! the token bucket of a connection's rates, and the refusals of every limit (these, `MAX_CONNECTIONS`,
//! `MAX_TOPICS_PER_NODE`, the message and subscribe rates): one metric
//! (`switchboard_limit_refusals_total{limit}`) and a log line that is itself
//! rate limited, so a flood of refusals cannot flood the log.
//!
//! Transports take a [`Seat`] at admission (before the upgrade where they
//! can) and keep it for the connection's life; dropping it gives it back.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::config::{Cidr, Config, RateLimit};
use crate::metrics as m;

/// A limit that refused something (the metric's `limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `MAX_CONNECTIONS`.
    ConnectionsPerNode,
    /// `MAX_CONNECTIONS_PER_ADDRESS`.
    ConnectionsPerAddress,
    /// `MAX_CONNECTIONS_PER_USER`.
    ConnectionsPerUser,
    /// `MAX_TOPICS_PER_NODE`.
    TopicsPerNode,
    /// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT`.
    SubscribeRate,
    /// `WEBSOCKET_MAX_SUBSCRIPTIONS`.
    SubscriptionsPerConnection,
    /// `WEBSOCKET_RATE_LIMIT`: the connection is closed.
    MessageRate,
}

impl Limit {
    const ALL: [Limit; 7] = [
        Limit::ConnectionsPerNode,
        Limit::ConnectionsPerAddress,
        Limit::ConnectionsPerUser,
        Limit::TopicsPerNode,
        Limit::SubscribeRate,
        Limit::SubscriptionsPerConnection,
        Limit::MessageRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::ConnectionsPerNode => m::limit::CONNECTIONS_PER_NODE,
            Limit::ConnectionsPerAddress => m::limit::CONNECTIONS_PER_ADDRESS,
            Limit::ConnectionsPerUser => m::limit::CONNECTIONS_PER_USER,
            Limit::TopicsPerNode => m::limit::TOPICS_PER_NODE,
            Limit::SubscribeRate => m::limit::SUBSCRIBE_RATE,
            Limit::SubscriptionsPerConnection => m::limit::SUBSCRIPTIONS_PER_CONNECTION,
            Limit::MessageRate => m::limit::MESSAGE_RATE,
        }
    }

    fn index(self) -> usize {
        Limit::ALL.iter().position(|l| *l == self).unwrap_or(0)
    }
}

/// How often each limit may log a refusal; the ones in between are counted
/// and reported with the next line.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts a refusal by `limit` and logs it, at most once per [`LOG_EVERY`]
/// per limit (`detail` must not name an unbounded number of things the
/// operator cannot act on; it is only in the log).
pub fn refused(limit: Limit, detail: &str) {
    metrics::counter!(m::LIMIT_REFUSALS, "limit" => limit.label()).increment(1);
    static LOGS: OnceLock<[(AtomicU64, AtomicU64); Limit::ALL.len()]> = OnceLock::new();
    static START: OnceLock<Instant> = OnceLock::new();
    let logs = LOGS.get_or_init(Default::default);
    let (last, suppressed) = &logs[limit.index()];
    let every = LOG_EVERY.as_millis() as u64;
    // Offset by one period, so the very first refusal is logged.
    let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + every;
    let then = last.load(Ordering::Relaxed);
    if now.saturating_sub(then) >= every
        && last
            .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            limit = limit.label(),
            suppressed,
            "refused by a limit: {detail} (further refusals of this limit within 10 s are only counted)"
        );
    } else {
        suppressed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts and logs a subscribe refused by `WEBSOCKET_SUBSCRIBE_RATE_LIMIT`;
/// the client's error text and its code (`subscribe_rate_limited`), as
/// [`crate::gateway::subscribe_refused`] gives them for the hub's refusals.
pub fn subscribe_rate_refusal(node: &crate::node::Node, topic: &str) -> (String, &'static str) {
    refused(Limit::SubscribeRate, "a connection subscribes too fast");
    let (rate, burst) = node
        .config()
        .subscribe_rate_limit
        .map_or((0.0, 0.0), |l| (l.per_second, l.burst));
    (
        format!(
            "subscribe rate limit of {rate} per second (burst {burst}, WEBSOCKET_SUBSCRIBE_RATE_LIMIT) exceeded: \"{topic}\" was not subscribed; try again later"
        ),
        "subscribe_rate_limited",
    )
}

/// How the frame a websocket reader is about to act on reached it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// It was already there when the reader asked for it: the client is
    /// ahead of the node.
    Waiting,
    /// The reader waited `after` for it and was woken `at`, when it came.
    Woke { at: Instant, after: Duration },
}

impl Arrival {
    /// The reader was idle until now for something other than a frame (a
    /// control-API command): counted as a wait for the client.
    pub fn idle() -> Self {
        Arrival::Woke {
            at: Instant::now(),
            after: Duration::MAX,
        }
    }
}

/// The longest wait of a reader that is not yet a pause of the client's
/// (capped further at half the interval between two frames at the rate).
/// A reader waits that briefly when its connection's writer holds the
/// socket at the moment it reads (the two halves share a lock) or while the
/// rest of a frame is on its way: traced under load at 3–700 µs with
/// hundreds of the client's frames waiting behind. A client cannot gather
/// credit from such waits, since one this short refills less than the one
/// token its frame takes.
const NOT_A_PAUSE: Duration = Duration::from_millis(5);

/// A per-connection rate (`WEBSOCKET_RATE_LIMIT`,
/// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT`), owned by the connection's reader, so
/// no locking; every transport's sessions keep theirs.
///
/// It charges a client for the rate it sends at, not for the node's own
/// delays. A websocket reader reads a frame only once it has answered the
/// one before, and an answer may wait on Redis, so a client sending at
/// exactly the rate finds the frames it sent meanwhile read as a burst.
/// The reader says how each frame reached it ([`Arrival`],
/// [`TokenBucket::pace`]): time the node spent elsewhere while the client's
/// frames waited refills at the rate without the burst's cap; the cap
/// applies again where the reader waited for the client, as of the moment
/// the client's frame woke it. A refill never adds more than the rate times
/// the time passed, so over its whole life a client still gets at most one
/// burst plus the rate times its age; only the burst's shape changes.
/// Readers that cannot tell (long-polling, SSE) only `take`, which never
/// goes past the cap.
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        Self::new_at(limit, Instant::now())
    }

    fn new_at(limit: RateLimit, now: Instant) -> Self {
        TokenBucket {
            limit,
            tokens: limit.burst,
            at: now,
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token; false when the client is over its rate.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    /// A websocket reader is about to act on a frame that reached it as
    /// `arrival` says. Where it waited for the client, whatever the node's
    /// busy time added beyond the burst goes, as of the moment the frame
    /// woke the reader; the time since then (the reader waiting for a CPU)
    /// and a frame that was already waiting count as the node's time, not
    /// the client's pause.
    pub fn pace(&mut self, arrival: Arrival) {
        self.pace_at(arrival, Instant::now());
    }

    fn pace_at(&mut self, arrival: Arrival, now: Instant) {
        if let Arrival::Woke { at, after } = arrival
            && after >= self.pause()
        {
            self.caught_up_at(at.min(now));
        }
        self.behind_at(now);
    }

    /// The shortest wait that counts as the client's pause.
    fn pause(&self) -> Duration {
        Duration::try_from_secs_f64(0.5 / self.limit.per_second)
            .map_or(NOT_A_PAUSE, |half| half.min(NOT_A_PAUSE))
    }

    fn take_at(&mut self, now: Instant) -> bool {
        self.refill(now, false);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn behind_at(&mut self, now: Instant) {
        self.refill(now, true);
    }

    fn caught_up_at(&mut self, now: Instant) {
        self.refill(now, false);
        self.tokens = self.tokens.min(self.limit.burst);
    }

    /// Adds the rate times the time since the last call; up to the burst
    /// unless `uncapped`, and never taking away what is there.
    fn refill(&mut self, now: Instant, uncapped: bool) {
        let added = now.saturating_duration_since(self.at).as_secs_f64() * self.limit.per_second;
        self.tokens = if uncapped {
            self.tokens + added
        } else {
            self.tokens.max((self.tokens + added).min(self.limit.burst))
        };
        self.at = self.at.max(now);
    }
}

/// A connection refused by a connection limit; the text is what the
/// client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// `MAX_CONNECTIONS`: unlike the others a 503, since another node may
    /// have room.
    #[error("this node is at its limit of {0} connections; try another node or later")]
    Node(usize),
    #[error(
        "too many connections from this address: at most {0} per address (MAX_CONNECTIONS_PER_ADDRESS); close some or try again later"
    )]
    Address(usize),
    #[error(
        "too many connections for this user: at most {0} per user (MAX_CONNECTIONS_PER_USER); close some or try again later"
    )]
    User(usize),
}

/// Open connections per client address and per user on this node.
#[derive(Debug)]
pub struct Limits {
    per_node: Option<usize>,
    per_address: Option<usize>,
    per_user: Option<usize>,
    /// Connections holding a place under `MAX_CONNECTIONS`, from their
    /// admission (before a token check or a connect hook call) to their end,
    /// so that handshakes in flight count and many at once cannot overshoot.
    seated: AtomicUsize,
    trusted: Vec<Cidr>,
    /// std Mutex: held only to count, never across `.await`.
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    addresses: HashMap<IpAddr, usize>,
    users: HashMap<Arc<str>, usize>,
}

#[derive(Debug)]
enum Key {
    Node,
    Address(IpAddr),
    User(Arc<str>),
}

/// One connection's place under a per-address or per-user limit, given
/// back when dropped.
#[derive(Debug)]
pub struct Seat {
    limits: Arc<Limits>,
    key: Key,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Key::Node = self.key {
            self.limits.seated.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut counts = self.limits.counts.lock().unwrap();
        match &self.key {
            Key::Node => {}
            Key::Address(ip) => release(&mut counts.addresses, ip),
            Key::User(user) => release(&mut counts.users, user),
        }
    }
}

/// One fewer; the entry goes with the last one (the maps hold only what is open).
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    match map.get_mut(key) {
        Some(n) if *n > 1 => *n -= 1,
        _ => {
            map.remove(key);
        }
    }
}

impl Limits {
    pub fn new(config: &Config) -> Arc<Self> {
        Arc::new(Limits {
            per_node: config.max_connections,
            per_address: config.max_connections_per_address,
            per_user: config.max_connections_per_user,
            trusted: config.trusted_proxies.clone(),
            counts: Mutex::new(Counts::default()),
            seated: AtomicUsize::new(0),
        })
    }

    /// A place for one more connection under `MAX_CONNECTIONS` (unset:
    /// none is needed). Taken by a compare-and-swap, so handshakes that
    /// arrive together cannot all pass the check.
    pub fn node_seat(self: &Arc<Self>) -> Result<Option<Seat>, LimitError> {
        let Some(max) = self.per_node else {
            return Ok(None);
        };
        let taken = self
            .seated
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            refused(Limit::ConnectionsPerNode, "the node is full");
            return Err(LimitError::Node(max));
        }
        Ok(Some(Seat {
            limits: self.clone(),
            key: Key::Node,
        }))
    }

    /// The client's address: the peer's, or when the peer is a trusted
    /// proxy (`TRUSTED_PROXIES`) the nearest address in `X-Forwarded-For`
    /// that is not one (read from the right: entries further left are the
    /// client's own say and could be anything).
    pub fn client_address(
        &self,
        remote: Option<SocketAddr>,
        headers: &HeaderMap,
    ) -> Option<IpAddr> {
        let mut ip = canonical(remote?.ip());
        if !self.is_trusted(ip) {
            return Some(ip);
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            let Ok(hop) = hop.trim().parse::<IpAddr>() else {
                break; // Garbage: trust no further.
            };
            ip = canonical(hop);
            if !self.is_trusted(ip) {
                break;
            }
        }
        Some(ip)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// A seat for one more connection from `address` (`None`: unknown,
    /// in-process routers; not counted).
    pub fn address_seat(
        self: &Arc<Self>,
        address: Option<IpAddr>,
    ) -> Result<Option<Seat>, LimitError> {
        let (Some(max), Some(address)) = (self.per_address, address) else {
            return Ok(None);
        };
        let key = group(address);
        let mut counts = self.counts.lock().unwrap();
        let n = counts.addresses.entry(key).or_default();
        if *n >= max {
            drop(counts);
            refused(
                Limit::ConnectionsPerAddress,
                &format!("{key} has {max} connections"),
            );
            return Err(LimitError::Address(max));
        }
        *n += 1;
        Ok(Some(Seat {
            limits: self.clone(),
            key: Key::Address(key),
        }))
    }

    /// A seat for one more connection of `user` (`""`, anonymous: not
    /// counted per user; the address limit covers them).
    pub fn user_seat(self: &Arc<Self>, user: &str) -> Result<Option<Seat>, LimitError> {
        let Some(max) = self.per_user.filter(|_| !user.is_empty()) else {
            return Ok(None);
        };
        let mut counts = self.counts.lock().unwrap();
        if let Some(n) = counts.users.get_mut(user) {
            if *n >= max {
                drop(counts);
                refused(Limit::ConnectionsPerUser, "a user is at the limit");
                return Err(LimitError::User(max));
            }
            *n += 1;
        } else {
            counts.users.insert(Arc::from(user), 1);
        }
        Ok(Some(Seat {
            limits: self.clone(),
            key: Key::User(Arc::from(user)),
        }))
    }

    /// Addresses (IPv6: /64 networks) and users with open connections.
    pub fn tracked(&self) -> (usize, usize) {
        let counts = self.counts.lock().unwrap();
        (counts.addresses.len(), counts.users.len())
    }
}

/// An IPv4 address in IPv6 form is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What one address limit counts: an IPv4 address, or an IPv6 /64 (one
/// subscriber line usually gets a whole /64, so counting single IPv6
/// addresses would limit nothing).
fn group(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;

    fn limits(env: &[(&str, &str)]) -> Arc<Limits> {
        let src: Map<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Limits::new(&Config::from_source(&src).unwrap())
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let l = limits(&[("TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")]);
        let proxy: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let other: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            l.client_address(Some(proxy), &headers("203.0.113.9")),
            Some(ip("203.0.113.9"))
        );
        // The client's own entries (left) are not believed past the first
        // untrusted hop from the right.
        assert_eq!(
            l.client_address(Some(proxy), &headers("1.1.1.1, 203.0.113.9, 10.0.0.1")),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            l.client_address(Some(other), &headers("203.0.113.9")),
            Some(ip("192.0.2.7")),
            "not from a trusted proxy"
        );
        assert_eq!(
            l.client_address(Some(proxy), &headers("junk, 203.0.113.9")),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            l.client_address(Some(proxy), &headers("junk")),
            Some(ip("10.1.2.3"))
        );
        assert_eq!(
            l.client_address(Some(proxy), &HeaderMap::new()),
            Some(ip("10.1.2.3"))
        );
    }

    #[test]
    fn seats_are_limited_per_address_and_per_user_and_given_back() {
        let l = limits(&[
            ("MAX_CONNECTIONS_PER_ADDRESS", "2"),
            ("MAX_CONNECTIONS_PER_USER", "1"),
        ]);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let one = l.address_seat(Some(a)).unwrap().unwrap();
        let _two = l.address_seat(Some(a)).unwrap().unwrap();
        assert_eq!(l.address_seat(Some(a)).unwrap_err(), LimitError::Address(2));
        assert!(
            l.address_seat(Some(b)).unwrap().is_some(),
            "another address"
        );
        drop(one);
        assert!(l.address_seat(Some(a)).unwrap().is_some(), "given back");
        // IPv6 counts per /64.
        let x: IpAddr = "2001:db8::1".parse().unwrap();
        let y: IpAddr = "2001:db8::2".parse().unwrap();
        let _x = l.address_seat(Some(x)).unwrap();
        let _y = l.address_seat(Some(y)).unwrap();
        assert!(
            l.address_seat(Some("2001:db8::3".parse().unwrap()))
                .is_err()
        );
        let u = l.user_seat("alice").unwrap().unwrap();
        assert_eq!(l.user_seat("alice").unwrap_err(), LimitError::User(1));
        assert!(l.user_seat("").unwrap().is_none(), "anonymous");
        drop(u);
        let _u = l.user_seat("alice").unwrap().unwrap();
        assert_eq!(l.tracked().1, 1);
    }

    fn bucket(per_second: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket::new_at(RateLimit { per_second, burst }, now)
    }

    /// How many of `n` frames, all found waiting at `at`, the bucket takes.
    fn queued_taken(b: &mut TokenBucket, at: Instant, n: usize) -> usize {
        (0..n)
            .filter(|_| {
                b.behind_at(at);
                b.take_at(at)
            })
            .count()
    }

    #[test]
    fn take_alone_keeps_the_classic_bucket() {
        let t0 = Instant::now();
        let mut b = bucket(10.0, 5.0, t0);
        assert_eq!((0..5).filter(|_| b.take_at(t0)).count(), 5);
        assert!(!b.take_at(t0), "past the burst");
        assert!(b.take_at(t0 + Duration::from_millis(100)), "one refilled");
        assert!(!b.take_at(t0 + Duration::from_millis(100)));
        // An hour idle refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| b.take_at(later)).count(), 5);
    }

    /// 100/s with a 2 s burst. The client sends frame i at i × 10 ms; the
    /// node reads frame 0 at once, then is busy 3 s with it (waiting on
    /// Redis) and reads each later frame as soon as it is both sent and the
    /// node is free: the first 300 were waiting for it. How many of the
    /// 1,000 frames are refused when the reader tells the bucket
    /// `arrival(i, read, waiting)` of frame i (`None`: nothing).
    fn refused_through_a_backlog(arrival: impl Fn(u32, Instant, bool) -> Option<Arrival>) -> usize {
        let t0 = Instant::now();
        let busy_until = t0 + Duration::from_secs(3);
        let mut b = bucket(100.0, 200.0, t0);
        (0..1000)
            .filter(|&i| {
                let sent = t0 + Duration::from_millis(10) * i;
                let read = if i == 0 { sent } else { sent.max(busy_until) };
                if let Some(a) = arrival(i, read, i > 0 && sent < busy_until) {
                    b.pace_at(a, read);
                }
                !b.take_at(read)
            })
            .count()
    }

    /// How a frame of that backlog reached the reader: waiting while the
    /// node was busy, else it woke the reader after a pause of the client's.
    fn as_it_came(read: Instant, waiting: bool) -> Arrival {
        match waiting {
            true => Arrival::Waiting,
            false => Arrival::Woke {
                at: read,
                after: Duration::from_millis(10),
            },
        }
    }

    #[test]
    fn a_client_at_the_rate_is_not_charged_for_the_nodes_delay() {
        // Unaware of the backlog, the bucket reads the 300 frames sent in
        // 3 s as a burst against a cap of 200, and refuses a third of them.
        assert_eq!(refused_through_a_backlog(|_, _, _| None), 100);
        assert_eq!(
            refused_through_a_backlog(|_, read, waiting| Some(as_it_came(read, waiting))),
            0
        );
    }

    #[test]
    fn a_client_over_the_rate_is_still_refused_while_the_node_is_behind() {
        // 200/s against 100/s, read through the same 3 s backlog.
        let t0 = Instant::now();
        let mut b = bucket(100.0, 200.0, t0);
        b.caught_up_at(t0);
        assert!(b.take_at(t0));
        // A burst and the rate times the 3 s: 499 more of the 599 queued.
        assert_eq!(queued_taken(&mut b, t0 + Duration::from_secs(3), 599), 499);
    }

    #[test]
    fn catching_up_caps_the_bucket_again() {
        let t0 = Instant::now();
        let mut b = bucket(100.0, 200.0, t0);
        b.caught_up_at(t0);
        assert!(b.take_at(t0));
        // The node was busy 10 s; one queued frame collects that time.
        let busy = t0 + Duration::from_secs(10);
        b.behind_at(busy);
        assert!(b.take_at(busy));
        // The reader then waits for the next frame, an hour later: the
        // 10 s of credit are gone, and the hour refills to the burst only.
        let later = busy + Duration::from_secs(3600);
        b.caught_up_at(later);
        assert_eq!(queued_taken(&mut b, later, 1000), 200);
    }

    /// [`refused_through_a_backlog`] with frame `odd` reported as
    /// `arrival`, the others as they came.
    fn refused_with(odd: u32, arrival: impl Fn(Instant) -> Arrival) -> usize {
        refused_through_a_backlog(|i, read, waiting| {
            Some(match i == odd {
                true => arrival(read),
                false => as_it_came(read, waiting),
            })
        })
    }

    #[test]
    fn a_brief_wait_amid_a_backlog_is_not_the_clients_pause() {
        // Frame 50 of the 300 waiting: its reader found the socket held by
        // the connection's writer and was woken 50 µs later.
        let brief = |at| Arrival::Woke {
            at,
            after: Duration::from_micros(50),
        };
        assert_eq!(refused_with(50, brief), 0);
        // Had the reader really waited (the client paused), what the
        // backlog earned would go: frames 50 to 300, all read at 3 s,
        // against a burst of 200.
        let paused = |at| Arrival::Woke {
            at,
            after: Duration::from_millis(20),
        };
        assert_eq!(refused_with(50, paused), 51);
    }

    #[test]
    fn the_time_a_woken_reader_waits_for_a_cpu_is_the_nodes() {
        // The reader caught up at 3 s, was woken by frame 300 then, and
        // not run for 3 s: 300 more frames came meanwhile.
        let t0 = Instant::now();
        let woke = t0 + Duration::from_secs(3);
        let ran = woke + Duration::from_secs(3);
        let mut b = bucket(100.0, 200.0, t0);
        b.pace_at(
            Arrival::Woke {
                at: woke,
                after: Duration::from_millis(10),
            },
            ran,
        );
        assert_eq!(queued_taken(&mut b, ran, 301), 301);
        // Counted from when it ran (as before the wake was known), a third
        // of them would be refused.
        let mut b = bucket(100.0, 200.0, t0);
        b.caught_up_at(ran);
        assert_eq!(queued_taken(&mut b, ran, 301), 200);
    }

    #[test]
    fn brief_waits_give_a_client_over_the_rate_no_credit() {
        // 250/s against 100/s: every frame wakes the reader 4 ms after it
        // asked, under the 5 ms that counts as a pause. Over 10 s the client
        // gets a burst and the rate times the time, as a classic bucket.
        let t0 = Instant::now();
        let mut b = bucket(100.0, 200.0, t0);
        let taken = (1..=2500u32)
            .filter(|&i| {
                let at = t0 + Duration::from_millis(4) * i;
                b.pace_at(
                    Arrival::Woke {
                        at,
                        after: Duration::from_millis(4),
                    },
                    at,
                );
                b.take_at(at)
            })
            .count();
        assert!((1199..=1201).contains(&taken), "{taken}");
    }
}
