//! Signed webhooks: events POSTed to `WEBHOOK_URL` in batches.
//!
//! One ordered queue per node, bounded by `WEBHOOK_QUEUE_SIZE` (a full
//! queue drops the new event, counts it as `overflow` and logs at most once
//! per 10 s). One batch is in flight at a time, so the receiver sees this
//! node's events in the order they happened; a batch holds at most
//! `WEBHOOK_BATCH_MAX` events and waits at most `WEBHOOK_BATCH_MS` for them
//! after its first one. A batch that is not answered 2xx within
//! `WEBHOOK_TIMEOUT_MS` is sent again, identical byte for byte, with
//! exponential backoff (100 ms doubling to 10 s, jittered) until
//! `WEBHOOK_RETRY_MS` has passed since its first attempt; then its events
//! are dropped and counted as `expired`. Delivery is at least once.
//!
//! Body: `{"timeMs": <ms>, "events": [...]}`; header
//! `X-Switchboard-Signature: sha256=<hex HMAC-SHA256 of the raw body>`.
//! Event types are an open set: each is a JSON object with `type`
//! (`client_connected`, `client_disconnected`, `topic_occupied`,
//! `topic_vacated`, `client_event`; issue 20 adds presence events).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::Notify;

use super::{NODE_HEADER, SIGNATURE_HEADER, signature};
use crate::clients::ClientInfo;
use crate::config::WebhookConfig;
use crate::metrics as m;

/// First retry delay; it doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// At most one "queue full" log line per this interval.
const OVERFLOW_LOG_EVERY: Duration = Duration::from_secs(10);

/// The `client_disconnected` reason of a dead node's clients (the reaper's;
/// the other reasons are the close reasons of `metrics::reason`).
pub const NODE_LOST: &str = "node_lost";

/// Event `type` values this crate sends (the `type` label of the metric).
pub mod kind {
    pub const CLIENT_CONNECTED: &str = "client_connected";
    pub const CLIENT_DISCONNECTED: &str = "client_disconnected";
    pub const TOPIC_OCCUPIED: &str = "topic_occupied";
    pub const TOPIC_VACATED: &str = "topic_vacated";
    pub const CLIENT_EVENT: &str = "client_event";
    /// A user's first connection joined a presence topic (`presence`).
    pub const MEMBER_ADDED: &str = "member_added";
    /// A user's last connection left a presence topic.
    pub const MEMBER_REMOVED: &str = "member_removed";
}

/// One webhook event, serialized once when it is made.
#[derive(Debug, Clone)]
pub struct Event {
    /// The `type` field; a fixed string so that it can label metrics.
    kind: &'static str,
    json: String,
    /// A client whose record may go once this event is sent
    /// ([`Bookkeeping::after_send`]).
    forget: Option<Arc<str>>,
}

impl Event {
    /// An event of type `kind` with `fields` (a JSON object; `type` is added).
    pub fn new(kind: &'static str, mut fields: serde_json::Map<String, serde_json::Value>) -> Self {
        fields.insert("type".into(), kind.into());
        Event {
            kind,
            json: serde_json::Value::Object(fields).to_string(),
            forget: None,
        }
    }

    /// This event, and once it is sent (or given up), `client`'s record
    /// may be deleted.
    pub fn forgetting(mut self, client: Arc<str>) -> Self {
        self.forget = Some(client);
        self
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn json(&self) -> &str {
        &self.json
    }

    pub fn client_connected(client: &ClientInfo, node: &str) -> Self {
        Self::object(
            kind::CLIENT_CONNECTED,
            json!({
                "client": &*client.id,
                "user": &*client.user,
                "transport": client.transport,
                "node": node,
                "info": client.info.as_deref(),
            }),
        )
    }

    pub fn client_disconnected(client: &str, user: &str, node: &str, reason: &str) -> Self {
        Self::object(
            kind::CLIENT_DISCONNECTED,
            json!({"client": client, "user": user, "node": node, "reason": reason}),
        )
    }

    /// `seq` orders one topic's transitions (they may come from different
    /// nodes, so arrive in another order).
    pub fn topic_occupied(topic: &str, seq: u64) -> Self {
        Self::object(kind::TOPIC_OCCUPIED, json!({"topic": topic, "seq": seq}))
    }

    pub fn topic_vacated(topic: &str, seq: u64) -> Self {
        Self::object(kind::TOPIC_VACATED, json!({"topic": topic, "seq": seq}))
    }

    /// A client's publication on a `WEBHOOK_CLIENT_EVENT_TOPICS` topic;
    /// `data` goes out byte for byte.
    pub fn client_event(
        topic: &str,
        event: &str,
        data: &RawValue,
        client: &str,
        user: &str,
    ) -> Self {
        #[derive(serde::Serialize)]
        struct ClientEvent<'a> {
            #[serde(rename = "type")]
            ty: &'static str,
            topic: &'a str,
            event: &'a str,
            data: &'a RawValue,
            client: &'a str,
            user: &'a str,
        }
        let json = serde_json::to_string(&ClientEvent {
            ty: kind::CLIENT_EVENT,
            topic,
            event,
            data,
            client,
            user,
        })
        .expect("events serialize");
        Event {
            kind: kind::CLIENT_EVENT,
            json,
            forget: None,
        }
    }

    fn object(kind: &'static str, value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::Object(fields) => Self::new(kind, fields),
            _ => unreachable!("events are objects"),
        }
    }
}

/// The occupancy ledger's part in sending: a client's record must be in
/// Redis before its `client_connected` can reach the back end (or a node
/// killed right after would leave no trace of it for the reaper), and may
/// go only once its `client_disconnected` was (or a node killed or drained
/// with it still queued would leave no trace of the disconnection).
pub trait Bookkeeping: Send + Sync {
    /// Before each batch: writes what the batch announces. Also once the
    /// queue is empty, for what was changed without a batch to carry it
    /// (the deletion of a record whose event the full queue dropped).
    fn before_send(&self) -> BoxFuture<'_, ()>;
    /// After a batch was answered 2xx or given up: the records of the
    /// clients it said were gone ([`Event::forgetting`]) may be deleted.
    fn after_send(&self, forget: Vec<Arc<str>>) -> BoxFuture<'_, ()>;
}

/// Cheap-to-clone handle to this node's webhook queue and sender.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    config: WebhookConfig,
    node: String,
    http: reqwest::Client,
    /// std Mutex: pushes and takes only, never held across `.await`.
    queue: Mutex<Queue>,
    /// Wakes the sender when the queue turns non-empty.
    wake: Notify,
    /// Wakes the sender early when a full batch is waiting.
    full: Notify,
    /// Wakes `flush` when the queue and the batch in flight are done.
    idle: Notify,
    bookkeeping: OnceLock<Arc<dyn Bookkeeping>>,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    /// The types of the batch being sent: they count against the queue's
    /// size until it is answered, and as `abandoned` if a drain ends first.
    in_flight: Vec<&'static str>,
    /// The JSON bytes of `events` and of the batch in flight.
    bytes: usize,
    /// The in-flight batch's share of `bytes`.
    in_flight_bytes: usize,
    overflowed: u64,
    overflow_logged: Option<Instant>,
}

impl Queue {
    fn pending(&self) -> usize {
        self.events.len() + self.in_flight.len()
    }
}

/// What a node's queue holds at most in event JSON, whatever
/// `WEBHOOK_QUEUE_SIZE` says: most events are about 200 bytes, but a
/// `client_event` carries its publication's data (up to
/// `WEBSOCKET_MAX_PAYLOAD`), and a receiver that is down must not make a
/// node hold them without bound.
pub const QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// A batch stops growing past this much event JSON (it always takes one
/// event): a receiver gets bodies of a sane size, retried whole.
pub const BATCH_BYTES: usize = 1024 * 1024;

impl Webhooks {
    /// Starts the sender for `config`; events name `node` as their sender.
    pub fn start(config: WebhookConfig, node: &str) -> Webhooks {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the batch, and its signature, to
            // wherever the answer points: a 3xx is a failed delivery,
            // retried like a 5xx, and the log says why.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("the HTTP client builds");
        let hooks = Webhooks {
            inner: Arc::new(Inner {
                config,
                node: node.to_string(),
                http,
                queue: Mutex::new(Queue::default()),
                wake: Notify::new(),
                full: Notify::new(),
                idle: Notify::new(),
                bookkeeping: OnceLock::new(),
            }),
        };
        tokio::spawn(hooks.clone().send_loop());
        hooks
    }

    /// Sets what runs before and after each batch (once).
    pub fn set_bookkeeping(&self, hook: Arc<dyn Bookkeeping>) {
        let _ = self.inner.bookkeeping.set(hook);
    }

    pub fn config(&self) -> &WebhookConfig {
        &self.inner.config
    }

    /// This node's id, as events name it.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Queues `event`; when the queue is full (`WEBHOOK_QUEUE_SIZE` events
    /// or [`QUEUE_BYTES`]) it is dropped and counted, and `false` says so.
    pub fn emit(&self, event: Event) -> bool {
        let mut q = self.inner.queue.lock().unwrap();
        if q.pending() >= self.inner.config.queue_size || q.bytes + event.json.len() > QUEUE_BYTES {
            q.overflowed += 1;
            let log = q
                .overflow_logged
                .is_none_or(|at| at.elapsed() >= OVERFLOW_LOG_EVERY);
            let dropped = q.overflowed;
            if log {
                q.overflow_logged = Some(Instant::now());
                q.overflowed = 0;
            }
            drop(q);
            metrics::counter!(m::WEBHOOK_EVENTS, "type" => event.kind, "outcome" => m::webhook::OVERFLOW)
                .increment(1);
            if log {
                tracing::warn!(
                    dropped,
                    size = self.inner.config.queue_size,
                    bytes = QUEUE_BYTES,
                    "webhook queue full (WEBHOOK_QUEUE_SIZE events or its byte bound): events dropped"
                );
            }
            return false;
        }
        q.bytes += event.json.len();
        q.events.push_back(event);
        let len = q.events.len();
        let pending = q.pending();
        drop(q);
        metrics::gauge!(m::WEBHOOK_QUEUE).set(pending as f64);
        if len == 1 {
            self.inner.wake.notify_one();
        }
        if len >= self.inner.config.batch_max {
            self.inner.full.notify_one();
        }
        true
    }

    /// Events queued or in flight.
    pub fn pending(&self) -> usize {
        self.inner.queue.lock().unwrap().pending()
    }

    /// Waits until every queued event is sent (or given up) or `deadline`
    /// passes; what is still queued then is counted as `abandoned` and
    /// returned.
    pub async fn flush(&self, deadline: tokio::time::Instant) -> usize {
        loop {
            let idle = self.inner.idle.notified();
            if self.pending() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        let q = self.inner.queue.lock().unwrap();
        for kind in q.in_flight.iter().chain(q.events.iter().map(|e| &e.kind)) {
            metrics::counter!(m::WEBHOOK_EVENTS, "type" => *kind, "outcome" => m::webhook::ABANDONED)
                .increment(1);
        }
        let left = q.pending();
        if left > 0 {
            tracing::warn!(
                left,
                "webhook events not delivered before the end of the drain"
            );
        }
        left
    }

    async fn send_loop(self) {
        let config = self.inner.config.clone();
        loop {
            // Wait for a first event.
            loop {
                let wake = self.inner.wake.notified();
                if !self.inner.queue.lock().unwrap().events.is_empty() {
                    break;
                }
                wake.await;
            }
            // Give the batch up to WEBHOOK_BATCH_MS to fill.
            if !config.batch_wait.is_zero() {
                let full = self.inner.full.notified();
                let len = self.inner.queue.lock().unwrap().events.len();
                if len < config.batch_max {
                    let _ = tokio::time::timeout(config.batch_wait, full).await;
                }
            }
            let batch: Vec<Event> = {
                let mut q = self.inner.queue.lock().unwrap();
                let (mut n, mut bytes) = (0, 0);
                for e in q.events.iter().take(config.batch_max) {
                    if n > 0 && bytes + e.json.len() > BATCH_BYTES {
                        break;
                    }
                    n += 1;
                    bytes += e.json.len();
                }
                let batch: Vec<Event> = q.events.drain(..n).collect();
                q.in_flight = batch.iter().map(|e| e.kind).collect();
                q.in_flight_bytes = bytes;
                batch
            };
            if let Some(hook) = self.inner.bookkeeping.get() {
                hook.before_send().await;
            }
            self.deliver(&batch).await;
            if let Some(hook) = self.inner.bookkeeping.get() {
                let forget: Vec<Arc<str>> = batch.iter().filter_map(|e| e.forget.clone()).collect();
                if !forget.is_empty() {
                    hook.after_send(forget).await;
                }
            }
            let pending = {
                let mut q = self.inner.queue.lock().unwrap();
                q.in_flight.clear();
                q.bytes -= std::mem::take(&mut q.in_flight_bytes);
                q.pending()
            };
            metrics::gauge!(m::WEBHOOK_QUEUE).set(pending as f64);
            if pending == 0 {
                if let Some(hook) = self.inner.bookkeeping.get() {
                    hook.before_send().await;
                }
                self.inner.idle.notify_waiters();
            }
        }
    }

    /// Sends one batch until it is answered 2xx or `WEBHOOK_RETRY_MS` is over.
    async fn deliver(&self, batch: &[Event]) {
        let config = &self.inner.config;
        let mut body =
            String::with_capacity(64 + batch.iter().map(|e| e.json.len() + 1).sum::<usize>());
        body.push_str(&format!(
            r#"{{"timeMs":{},"events":["#,
            crate::auth::unix_ms()
        ));
        for (i, e) in batch.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&e.json);
        }
        body.push_str("]}");
        let signature = signature(config.secret.expose().as_bytes(), body.as_bytes());
        let body = bytes::Bytes::from(body);
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        let outcome = loop {
            attempt += 1;
            let failure = match self
                .inner
                .http
                .post(&config.url)
                .header("Content-Type", "application/json")
                .header(SIGNATURE_HEADER, &signature)
                .header(NODE_HEADER, &self.inner.node)
                .body(body.clone())
                .send()
                .await
            {
                Ok(res) if res.status().is_success() => break m::webhook::SENT,
                Ok(res) if res.status().is_redirection() => format!(
                    "answered HTTP {} (redirects are not followed: set WEBHOOK_URL to where it points)",
                    res.status().as_u16()
                ),
                Ok(res) => format!("answered HTTP {}", res.status().as_u16()),
                Err(e) if e.is_timeout() => format!(
                    "no answer within {} ms (WEBHOOK_TIMEOUT_MS)",
                    config.timeout.as_millis()
                ),
                // Without the URL: it may carry a password.
                Err(e) => format!("unreachable: {}", e.without_url()),
            };
            // The last wait is cut to the window's end, so the last attempt
            // is made at WEBHOOK_RETRY_MS, not up to one backoff before.
            let left = config.retry.saturating_sub(started.elapsed());
            let jittered = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5).min(left);
            if left.is_zero() {
                tracing::error!(
                    url = %crate::config::redact_url(&config.url),
                    events = batch.len(),
                    attempts = attempt,
                    cause = %failure,
                    "webhook batch dropped after WEBHOOK_RETRY_MS"
                );
                break m::webhook::EXPIRED;
            }
            if attempt == 1 {
                tracing::warn!(url = %crate::config::redact_url(&config.url), cause = %failure, "webhook batch not delivered; retrying");
            } else {
                tracing::debug!(url = %crate::config::redact_url(&config.url), attempt, cause = %failure, "webhook retry failed");
            }
            tokio::time::sleep(jittered).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        if outcome == m::webhook::SENT && attempt > 1 {
            tracing::info!(attempts = attempt, "webhook batch delivered after retries");
        }
        for e in batch {
            metrics::counter!(m::WEBHOOK_EVENTS, "type" => e.kind, "outcome" => outcome)
                .increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn events_carry_their_type_and_raw_data() {
        let data = RawValue::from_string(r#"{"a": [1,2]}"#.into()).unwrap();
        let e = Event::client_event("chat.1", "message", &data, "c1", "u1");
        assert_eq!(
            e.json(),
            r#"{"type":"client_event","topic":"chat.1","event":"message","data":{"a": [1,2]},"client":"c1","user":"u1"}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(Event::topic_vacated("t", 7).json()).unwrap();
        assert_eq!(v, json!({"type": "topic_vacated", "topic": "t", "seq": 7}));
    }

    /// Client events carry their data: a receiver that is down must not
    /// make the node hold WEBHOOK_QUEUE_SIZE of them whatever their size.
    #[tokio::test]
    async fn the_queue_holds_at_most_its_bytes_of_large_client_events() {
        let hooks = Webhooks::start(
            WebhookConfig {
                // Nothing listens there: every batch fails and is retried.
                url: "http://127.0.0.1:1/hooks".into(),
                secret: crate::auth::Secret::new("s".to_string()),
                retry: Duration::from_secs(600),
                batch_max: 100,
                batch_wait: Duration::ZERO,
                timeout: Duration::from_millis(200),
                queue_size: 100_000,
                client_event_topics: Vec::new(),
            },
            "n1",
        );
        let big = format!("\"{}\"", "x".repeat(1024 * 1024));
        let data = RawValue::from_string(big).unwrap();
        for _ in 0..100 {
            hooks.emit(Event::client_event("t", "e", &data, "c", "u"));
            tokio::task::yield_now().await;
        }
        let held = hooks.pending();
        assert!((60..=64).contains(&held), "{held} events of 1 MiB held");
        let q = hooks.inner.queue.lock().unwrap();
        assert!(q.bytes <= QUEUE_BYTES, "{}", q.bytes);
        // The batch in flight took one such event, not a hundred.
        assert!(q.in_flight.len() <= 1, "{}", q.in_flight.len());
    }
}
