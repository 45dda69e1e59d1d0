//! One client connection's way out: a bounded queue of ready-made text
//! frames and the writer task that drains it onto the socket.
//!
//! Shared by the native protocol (`ws.rs`) and the Socket.IO websocket
//! transport (`engineio.rs`): both hand the writer frames serialized once per
//! publication, and both close the same way (what explains the close first,
//! then the Close frame; `Lingering` drains the rest). When the queue is full
//! the connection is closed with 1013 (the slow-consumer policy, see
//! `docs/protocol.md`) and the fan-out moves on without waiting.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::lock::Mutex as AsyncMutex;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::sync::Notify;

use crate::config::Config;
use crate::gateway::admission::READ_BUFFER;
use crate::hub::{ConnId, Delivery};
use crate::limits::Arrival;
use crate::metrics as m;
use crate::node::Node;

/// Close codes this gateway sends. 1000–1015 are standard; see
/// `docs/protocol.md` for which ones mean "reconnect".
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    /// The peer was silent for two heartbeat intervals.
    pub const HEARTBEAT_TIMEOUT: u16 = 1011;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The token expired without a `refresh` (application range 3000–3999).
    pub const TOKEN_EXPIRED: u16 = 3000;
    /// Never sent: marks a close the client started. Its answer is the
    /// Close frame tungstenite queued when it read the client's (the
    /// client's code echoed, RFC 6455 §5.5.1), which only a flush sends:
    /// after the peer's Close tungstenite refuses every other frame. 1005 is
    /// the code that may never appear on the wire, so it cannot collide.
    pub const BY_CLIENT: u16 = 1005;

    /// Whether a close with `code` drops what is still queued rather than
    /// sending it first: when the queue is the problem (slow consumer), the
    /// peer is gone (heartbeat) or the client closed (no data frame may
    /// follow its Close). The websocket writer and the long-polling
    /// session's last poll both go by it.
    pub const fn drops_queued(code: u16) -> bool {
        matches!(code, TRY_AGAIN_LATER | HEARTBEAT_TIMEOUT | BY_CLIENT)
    }
}

/// Upgrades a client connection with the buffer sizes and limits every
/// client connection uses (`READ_BUFFER`, `WRITE_BUFFER`,
/// `WEBSOCKET_MAX_PAYLOAD`) and runs `session` on it, counted among the
/// node's sessions so that the drain waits for it.
pub fn upgrade<F, Fut>(node: &Node, ws: WebSocketUpgrade, session: F) -> Response
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max = node.config().max_payload;
    let guard = node.sessions().token();
    let node = node.clone();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max.saturating_mul(2).max(1 << 20))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // The session moves to the readers' runtime (`ingress`) and the
            // upgrade's own task ends. Chained, not awaited in an `async`
            // block: the block would hold the session future twice (its
            // capture and its await), and every connection's task would pay
            // for the copy.
            node.ingress()
                .spawn(session(socket).map(move |()| drop(guard)));
            std::future::ready(())
        })
}

/// How long one flush to a client may take; past it the connection is
/// dropped as dead.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes batch up to 4 KiB before a `send`.
const WRITE_BUFFER: usize = 4 * 1024;

/// Asks the writer to close the connection with a code. The first request wins.
pub struct CloseSignal {
    code: AtomicU16,
    notify: Notify,
    /// The Close frame's reason text when the closer gave one (the back
    /// end's `POST /api/disconnect`); set only by the winning request.
    reason: std::sync::OnceLock<Box<str>>,
}

impl CloseSignal {
    pub fn request(&self, code: u16) -> bool {
        let first = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.notify.notify_waiters();
        }
        first
    }

    /// Like [`CloseSignal::request`], with the Close frame's reason text
    /// (cut to the 123 bytes a Close frame can carry).
    pub fn request_with_reason(&self, code: u16, reason: &str) -> bool {
        let first = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            let mut end = reason.len().min(123);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            let _ = self.reason.set(reason[..end].into());
            self.notify.notify_waiters();
        }
        first
    }

    pub fn code(&self) -> u16 {
        self.code.load(Ordering::Acquire)
    }

    /// The reason given with [`CloseSignal::request_with_reason`].
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(|r| &**r)
    }

    /// Completes once a close has been requested (at once when it already
    /// was). Every waiter wakes: during an Engine.IO upgrade the long-polling
    /// driver may still be waiting when the websocket's writer starts to, and
    /// a single wake-up taken by the driver left the writer deaf to the
    /// client's Close (no answer, the client saw 1006 after 10 s).
    pub async fn requested(&self) {
        let notified = self.notify.notified();
        if self.code() != 0 {
            return;
        }
        notified.await;
    }
}

/// One connection's send queue, bounded in frames and in bytes.
///
/// A `VecDeque` under a std `Mutex` (held for a push or a swap, never across
/// `.await`) rather than a channel: it allocates nothing until used and
/// gives its memory back after a burst, and the writer takes everything
/// queued in one swap and is woken only when the queue turns non-empty.
struct Queue {
    inner: Mutex<Queued>,
    waker: AtomicWaker,
    max_frames: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Utf8Bytes>,
    bytes: usize,
    closed: bool,
    /// A frame did not fit: nothing later is queued either. Later frames
    /// would be behind a hole the client cannot see (an SSE id, a
    /// Socket.IO recovery offset would claim what was dropped), and the
    /// slow-consumer close may have lost to a close requested before it
    /// (a drain, a token expiry) that still sends what is queued.
    overflowed: bool,
    /// The task holding the writer's wake-ups ([`Outbox::hold_wakes`]).
    held_by: Option<tokio::task::Id>,
    /// A frame was queued by that task while it held them: the writer is
    /// woken when the hold ends, or at once by the next push of any other
    /// task.
    wake_owed: bool,
    /// Frames were taken to be written and are not on the socket yet (by
    /// the writer, or by a reader at the end of its hold): nobody else takes
    /// any until they are, so that frames reach the socket in queue order.
    writing: bool,
    /// A reader's write stopped short of the socket (its buffer was full):
    /// the writer flushes for it.
    flush_owed: bool,
}

impl Queued {
    /// Moves every queued frame into `batch` (which must be empty): the
    /// queue is then empty, and owes the writer no wake-up for them.
    fn move_into(&mut self, batch: &mut VecDeque<Utf8Bytes>) {
        std::mem::swap(&mut self.frames, batch);
        self.bytes = 0;
        self.wake_owed = false;
    }
}

impl Queue {
    fn push(&self, frame: Utf8Bytes) -> Delivery {
        let len = frame.len();
        let mut q = self.inner.lock().unwrap();
        if q.closed {
            return Delivery::Closed;
        }
        // A single frame larger than the byte bound still goes to an empty queue.
        if q.overflowed
            || q.frames.len() >= self.max_frames
            || (q.bytes > 0 && q.bytes + len > self.max_bytes)
        {
            q.overflowed = true;
            return Delivery::Overflow;
        }
        let wake = q.frames.is_empty() || q.wake_owed;
        let defer = q.held_by.is_some() && q.held_by == tokio::task::try_id();
        q.frames.push_back(frame);
        q.bytes += len;
        q.wake_owed = wake && defer;
        drop(q);
        if wake && !defer {
            self.waker.wake();
        }
        Delivery::Queued
    }

    /// For the writer: like [`Queue::poll_take`], but waits while a
    /// reader writes, and is also ready (with nothing taken) when a reader
    /// left a flush to it. Until [`Queue::written`], nobody else writes.
    fn poll_take_to_write(
        &self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<Utf8Bytes>,
    ) -> Poll<()> {
        self.waker.register(cx.waker());
        let mut q = self.inner.lock().unwrap();
        if q.writing || (q.frames.is_empty() && !q.flush_owed) {
            return Poll::Pending;
        }
        q.move_into(batch);
        q.flush_owed = false;
        q.writing = true;
        Poll::Ready(())
    }

    /// What [`Queue::poll_take_to_write`] took is on the socket.
    fn written(&self) {
        self.inner.lock().unwrap().writing = false;
    }

    /// Moves everything queued into `batch` (which must be empty).
    fn take(&self, batch: &mut VecDeque<Utf8Bytes>) -> bool {
        let mut q = self.inner.lock().unwrap();
        if q.frames.is_empty() {
            return false;
        }
        q.move_into(batch);
        true
    }

    fn poll_take(&self, cx: &mut Context<'_>, batch: &mut VecDeque<Utf8Bytes>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.take(batch) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// A reader's write at the end of its hold ([`Outbox::release`]), with
    /// the queue's lock `q` (the writer idle, the queue open) and the sink.
    /// True when the writer is owed a wake-up: for what the socket did not
    /// take, or for a flush it could not finish.
    fn write_held<S: Sink<Message> + Unpin>(
        &self,
        mut q: std::sync::MutexGuard<'_, Queued>,
        mut sink: futures_util::lock::MutexGuard<'_, S>,
    ) -> bool {
        q.writing = true;
        let mut batch = VecDeque::new();
        q.move_into(&mut batch);
        drop(q);
        let flushed = write_now(&mut *sink, &mut batch);
        // The sink is let go only once what it did not take is back in the
        // queue: a closing writer takes the sink before the queue
        // ([`write_queued`]), so it finds those frames there, in order,
        // rather than losing them.
        let mut q = self.inner.lock().unwrap();
        drop(sink);
        q.writing = false;
        if !batch.is_empty() && !q.closed {
            // The socket's buffer was full: the rest goes first.
            q.bytes += batch.iter().map(|f| f.len()).sum::<usize>();
            batch.append(&mut q.frames);
            q.frames = batch;
        } else if q.frames.is_empty() && batch.capacity() <= 64 {
            q.frames = batch;
        }
        q.flush_owed |= !flushed;
        !q.frames.is_empty() || q.flush_owed
    }

    /// No more frames are accepted; what is queued is dropped.
    fn close(&self) {
        let mut q = self.inner.lock().unwrap();
        q.closed = true;
        q.frames = VecDeque::new();
        q.wake_owed = false;
    }
}

/// A websocket's sending half, shared by its writer and, at the end of a
/// hold, its reader ([`Outbox::hold_wakes`]). An async lock, as the writer
/// keeps it across its writes; the reader only ever tries it, and never
/// keeps it across an `.await`.
type SharedSink = AsyncMutex<SplitSink<WebSocket, Message>>;

/// The producer side of one connection: its queue and its close signal.
pub struct Outbox {
    queue: Queue,
    /// Set when a [`Writer`] starts (never for long-polling or SSE).
    sink: std::sync::OnceLock<Arc<SharedSink>>,
    pub close: CloseSignal,
    /// The `transport` label of its metrics.
    transport: &'static str,
}

impl Outbox {
    /// An empty outbox bounded by `WEBSOCKET_CLIENT_QUEUE_MESSAGES` and
    /// `WEBSOCKET_CLIENT_QUEUE_BYTES`.
    pub fn new(config: &Config, transport: &'static str) -> Self {
        Outbox {
            queue: Queue {
                inner: Mutex::new(Queued::default()),
                waker: AtomicWaker::new(),
                max_frames: config.client_queue_messages,
                max_bytes: config.client_queue_bytes,
            },
            sink: std::sync::OnceLock::new(),
            close: CloseSignal {
                code: AtomicU16::new(0),
                notify: Notify::new(),
                reason: std::sync::OnceLock::new(),
            },
            transport,
        }
    }

    /// Queues a frame, or applies the slow-consumer policy when full.
    pub fn push(&self, frame: Utf8Bytes) -> Delivery {
        match self.queue.push(frame) {
            Delivery::Overflow => self.overflow(),
            other => other,
        }
    }

    /// Until the guard goes (or is paused), what the calling task pushes
    /// does not wake the writer; at the guard's end the answers go out in
    /// one write: the holder's own, on its thread, when the writer is idle
    /// and the socket takes them without waiting, else the writer's, woken
    /// once. The reader holds them while it answers the frames a client
    /// sent together. Why: the writer runs on the main runtime, at the
    /// deliveries' priority, and under the abuse scenario (clients sending
    /// a `subscribe` and an `unsubscribe` in one segment fifty times a
    /// second) its wake-ups and `send(2)`s for those answers were most of
    /// that runtime's CPU: 1.3 sends per pair, each answer woken across
    /// runtimes (docs/benchmarks.md, Abuse). Written by the reader they
    /// cost the readers' niced thread instead, and no wake-up. Other
    /// tasks' pushes (deliveries, an RPC's answer) are never held: one
    /// queued behind a held frame wakes the writer itself. Outside a tokio
    /// task nothing is held.
    pub fn hold_wakes(&self) -> WakeHold<'_> {
        let hold = WakeHold(self);
        hold.resume();
        hold
    }

    /// Moves everything queued into `batch` (which must be empty): for a
    /// consumer other than the [`Writer`] (Engine.IO long-polling).
    pub fn take(&self, batch: &mut VecDeque<Utf8Bytes>) -> bool {
        self.queue.take(batch)
    }

    /// Waits until something is queued, then moves it into `batch`.
    pub async fn next_batch(&self, batch: &mut VecDeque<Utf8Bytes>) {
        std::future::poll_fn(|cx| self.queue.poll_take(cx, batch)).await
    }

    /// [`Outbox::next_batch`] for a consumer that is itself polled (the
    /// SSE response body): ready once something was moved into `batch`.
    pub fn poll_take(&self, cx: &mut Context<'_>, batch: &mut VecDeque<Utf8Bytes>) -> Poll<()> {
        self.queue.poll_take(cx, batch)
    }

    /// Wakes the consumer waiting in [`Outbox::poll_take`] (to look at the
    /// close signal when nothing new is queued).
    pub fn wake(&self) {
        self.queue.waker.wake();
    }

    /// Accepts no more frames and drops what is queued.
    pub fn close_queue(&self) {
        self.queue.close();
    }

    /// Ends a hold: what the holder queued is written here when the writer
    /// is idle, no close is under way and the socket takes it at once;
    /// otherwise (or for what the socket left) the writer is woken.
    fn release(&self) {
        let mut q = self.queue.inner.lock().unwrap();
        q.held_by = None;
        if !std::mem::take(&mut q.wake_owed) {
            return;
        }
        let sink = match self.sink.get() {
            Some(sink) if !q.writing && !q.closed && self.close.code() == 0 => sink.try_lock(),
            _ => None,
        };
        let Some(sink) = sink else {
            drop(q);
            self.queue.waker.wake();
            return;
        };
        if self.queue.write_held(q, sink) {
            self.queue.waker.wake();
        }
    }

    fn overflow(&self) -> Delivery {
        if self.close.request(close::TRY_AGAIN_LATER) {
            metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS, "transport" => self.transport)
                .increment(1);
        }
        Delivery::Overflow
    }
}

/// See [`Outbox::hold_wakes`].
pub struct WakeHold<'a>(&'a Outbox);

impl WakeHold<'_> {
    /// Wakes the writer for what is held and holds nothing more until
    /// [`WakeHold::resume`]: before the holder waits for something (a
    /// hook, Redis), so that earlier answers are not kept waiting with it.
    pub fn pause(&self) {
        self.0.release();
    }

    /// Holds the calling task's wake-ups again.
    pub fn resume(&self) {
        self.0.queue.inner.lock().unwrap().held_by = tokio::task::try_id();
    }

    /// Runs `answer` with the wake-ups held while it runs; whenever it has
    /// to wait (a hook, Redis) they are paused first, so the answers
    /// already queued go out without waiting with it, and held again when
    /// it goes on: the answer it pushes after the wait is the holder's to
    /// write as well.
    pub async fn run<F: Future>(&self, answer: F) -> F::Output {
        let mut answer = std::pin::pin!(answer);
        let mut paused = false;
        std::future::poll_fn(|cx| {
            if std::mem::take(&mut paused) {
                self.resume();
            }
            let poll = answer.as_mut().poll(cx);
            if poll.is_pending() {
                self.pause();
                paused = true;
            }
            poll
        })
        .await
    }
}

/// At most this many frames a client sent together are answered under one
/// hold before the reader looks at its other duties again.
const READY_FRAMES: usize = 16;

/// A client's frame as the socket's stream yields it (`None`: the end).
pub type Frame = Option<Result<Message, axum::Error>>;

/// What one hold answers: the frame that woke the reader, then those
/// already read behind it, up to [`READY_FRAMES`] in all. Each comes with
/// how it reached the reader, which the rate limit needs
/// ([`crate::limits::TokenBucket::pace`]).
pub struct ReadyFrames {
    first: Option<(Frame, Arrival)>,
    left: usize,
}

impl ReadyFrames {
    pub fn after(first: (Frame, Arrival)) -> Self {
        Self {
            first: Some(first),
            left: READY_FRAMES,
        }
    }

    /// The next frame to answer; never waits for one.
    pub fn next(&mut self, stream: &mut SplitStream<WebSocket>) -> Option<(Frame, Arrival)> {
        self.left = self.left.checked_sub(1)?;
        match self.first.take() {
            Some(first) => Some(first),
            None => stream
                .next()
                .now_or_never()
                .map(|frame| (frame, Arrival::Waiting)),
        }
    }
}

/// The stream's next frame and how it reached the reader: there at once,
/// or after a wait, woken when; as cancel-safe as `StreamExt::next`, for a
/// reader's `select!`.
///
/// The wake is stamped by a waker around the task's, because the moment
/// the reader is polled again can be much later on a node short of CPU, and
/// that delay is the node's, not a pause of the client's. A wait may also
/// end within microseconds with the client's frames there all along: the
/// connection's writer held the socket (the halves share a lock).
pub async fn next_frame<S: Stream + Unpin>(stream: &mut S) -> (Option<S::Item>, Arrival) {
    let mut waited: Option<(Instant, Arc<WakeStamp>)> = None;
    let frame = std::future::poll_fn(|cx| {
        let stamp = Arc::new(WakeStamp {
            task: cx.waker().clone(),
            woke: Mutex::new(None),
        });
        let waker = Waker::from(stamp.clone());
        let polled = stream.poll_next_unpin(&mut Context::from_waker(&waker));
        if polled.is_pending() {
            let since = waited.take().map_or_else(Instant::now, |(since, _)| since);
            waited = Some((since, stamp));
        }
        polled
    })
    .await;
    let arrival = match waited {
        None => Arrival::Waiting,
        Some((since, stamp)) => {
            // Woken by something else (another branch of the `select!`):
            // as of now.
            let at = stamp.woke.lock().unwrap().unwrap_or_else(Instant::now);
            Arrival::Woke {
                at,
                after: at.saturating_duration_since(since),
            }
        }
    };
    (frame, arrival)
}

/// The waker a waiting reader leaves with its socket: notes when it was
/// first woken, then wakes the reader's task.
struct WakeStamp {
    task: Waker,
    woke: Mutex<Option<Instant>>,
}

impl Wake for WakeStamp {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.lock().unwrap().get_or_insert_with(Instant::now);
        self.task.wake_by_ref();
    }
}

impl Drop for WakeHold<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Puts `batch` on the socket as far as it goes without waiting; true when
/// all of it was written and flushed. What the socket did not take stays in
/// `batch`; a flush it could not finish is the writer's (false).
fn write_now<S: Sink<Message> + Unpin>(sink: &mut S, batch: &mut VecDeque<Utf8Bytes>) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut sink = Pin::new(sink);
    while !batch.is_empty() {
        if !matches!(sink.as_mut().poll_ready(&mut cx), Poll::Ready(Ok(()))) {
            return false;
        }
        let frame = batch.pop_front().expect("not empty");
        if sink.as_mut().start_send(Message::Text(frame)).is_err() {
            return false;
        }
    }
    matches!(sink.poll_flush(&mut cx), Poll::Ready(Ok(())))
}

/// How a connection proves the peer is alive.
#[derive(Debug, Clone, Copy)]
pub enum Heartbeat {
    /// WebSocket pings every `interval`; silent for two intervals: close 1011.
    Ping { interval: Duration },
    /// Engine.IO: a `2` text frame every `interval`, to be answered (`3`,
    /// or anything else) within `timeout`; else close 1011.
    EngineIo {
        interval: Duration,
        timeout: Duration,
    },
}

impl Heartbeat {
    fn interval(&self) -> Duration {
        match self {
            Heartbeat::Ping { interval } | Heartbeat::EngineIo { interval, .. } => *interval,
        }
    }

    /// How long the peer may stay silent.
    fn silence(&self) -> Duration {
        match self {
            Heartbeat::Ping { interval } => *interval * 2,
            Heartbeat::EngineIo { interval, timeout } => *interval + *timeout,
        }
    }

    fn probe(&self) -> Message {
        match self {
            Heartbeat::Ping { .. } => Message::Ping(Default::default()),
            Heartbeat::EngineIo { .. } => Message::Text(Utf8Bytes::from_static("2")),
        }
    }
}

/// When a connection's peer was last heard from: the reader marks it on
/// every frame, the writer's heartbeat closes a peer silent for too long.
#[derive(Clone)]
pub struct Liveness {
    started: Instant,
    /// Milliseconds after `started`.
    last_seen: Arc<AtomicU64>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            last_seen: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The peer sent something just now.
    pub fn heard(&self) {
        self.last_seen
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn silent_for(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_seen.load(Ordering::Relaxed)))
    }
}

/// The consumer side of one connection: writes through the socket's sink,
/// which the reader borrows only at the end of a hold, when this writer has
/// nothing taken ([`Outbox::hold_wakes`]).
pub struct Writer {
    sink: Arc<SharedSink>,
    outbox: Arc<Outbox>,
    node: Node,
    id: ConnId,
    liveness: Liveness,
    heartbeat: Heartbeat,
}

impl Writer {
    /// Starts connection `id`'s writer task on `sink`, draining `outbox`;
    /// the reader marks the returned [`Liveness`] whenever the peer speaks.
    pub fn spawn(
        sink: SplitSink<WebSocket, Message>,
        outbox: &Arc<Outbox>,
        node: &Node,
        id: ConnId,
        heartbeat: Heartbeat,
    ) -> (tokio::task::JoinHandle<()>, Liveness) {
        let liveness = Liveness::new();
        let sink = Arc::new(AsyncMutex::new(sink));
        // One writer per outbox: an Engine.IO session upgrades once.
        let _ = outbox.sink.set(sink.clone());
        let writer = Writer {
            sink,
            outbox: outbox.clone(),
            node: node.clone(),
            id,
            liveness: liveness.clone(),
            heartbeat,
        };
        (node.ingress().spawn_writer(write_loop(writer)), liveness)
    }
}

/// What woke the writer, in the order it looks.
enum Turn {
    /// A close was requested (`CloseSignal`).
    Close,
    /// The node's drain began.
    Shutdown,
    /// This connection's point of the drain window came.
    Drained,
    /// Frames were moved into the batch.
    Batch,
    /// The heartbeat is due.
    Tick,
}

/// Writes what the outbox queues until a close is requested, the node
/// shuts down (at this connection's point of the drain window) or the peer
/// goes silent; then the queued explanation and the Close frame.
///
/// Woken once per batch under load, so each turn looks at as little as it
/// can. The close signal and the node's shutdown are futures registered
/// once with this task's waker (which never changes) and afterwards only
/// looked at through their flags: polling them again would take a lock each
/// turn, the shutdown's shared by every connection of the node (a measured
/// share of the fan-out's CPU). The heartbeat's timer is polled only when
/// its deadline has passed, or to arm it again after it fired.
async fn write_loop(mut w: Writer) {
    let config = w.node.config().clone();
    let heartbeat = w.heartbeat.interval();
    // Boxed (as an `Interval` would): a timer inline would grow every
    // connection's task.
    let mut tick = Box::pin(tokio::time::sleep_until(
        tokio::time::Instant::now() + heartbeat,
    ));
    let mut tick_armed = false;
    let shutdown = w.node.shutdown_token();
    // Armed on shutdown: each connection closes at its own point in the drain
    // window so that clients do not all reconnect in one burst. Boxed, and
    // only then: every idle connection's task stays smaller by a timer.
    let mut close_at: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Created once, not per loop turn: registering a waiter costs a lock.
    let outbox = w.outbox.clone();
    // Checks the code first: a close may have been asked for before this
    // writer started (during an Engine.IO upgrade).
    let close_requested = outbox.close.requested();
    let shutdown_started = shutdown.cancelled();
    tokio::pin!(close_requested, shutdown_started);
    let mut registered = false;
    let mut draining = false;
    let mut batch = VecDeque::new();

    let code = loop {
        let turn = std::future::poll_fn(|cx| {
            if !registered {
                registered = true;
                if close_requested.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Turn::Close);
                }
                if shutdown_started.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Turn::Shutdown);
                }
            }
            // `request` sets the code before it notifies.
            if outbox.close.code() != 0 {
                return Poll::Ready(Turn::Close);
            }
            // The node marks itself draining before it cancels the token.
            if !draining && w.node.is_draining() && shutdown_started.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Turn::Shutdown);
            }
            if let Some(sleep) = close_at.as_mut()
                && sleep.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Turn::Drained);
            }
            if outbox.queue.poll_take_to_write(cx, &mut batch).is_ready() {
                return Poll::Ready(Turn::Batch);
            }
            if (!tick_armed || tokio::time::Instant::now() >= tick.deadline())
                && tick.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Turn::Tick);
            }
            tick_armed = true;
            Poll::Pending
        })
        .await;
        match turn {
            Turn::Close => break w.outbox.close.code(),
            Turn::Shutdown => {
                draining = true;
                let window = config.shutdown_drain.as_millis() as u64;
                let offset = if window == 0 { 0 } else { w.id % window };
                close_at = Some(Box::pin(tokio::time::sleep(Duration::from_millis(offset))));
            }
            Turn::Drained => {
                w.outbox.close.request(config.shutdown_close_code);
                break w.outbox.close.code();
            }
            Turn::Batch => {
                let written = write_batch(&mut w, &mut batch).await;
                outbox.queue.written();
                if !written {
                    outbox.queue.close();
                    Box::pin(flush_close_answer(&mut w)).await;
                    return;
                }
            }
            Turn::Tick => {
                tick.as_mut().reset(tokio::time::Instant::now() + heartbeat);
                tick_armed = false;
                if w.liveness.silent_for() > w.heartbeat.silence() {
                    w.outbox.close.request(close::HEARTBEAT_TIMEOUT);
                    break w.outbox.close.code();
                }
                // Boxed: a ping every heartbeat interval, its timer is not
                // worth a place in every connection's task.
                let probe = w.heartbeat.probe();
                let ping = Box::pin(tokio::time::timeout(WRITE_TIMEOUT, async {
                    w.sink.lock().await.send(probe).await
                }));
                if !matches!(ping.await, Ok(Ok(()))) {
                    Box::pin(flush_close_answer(&mut w)).await;
                    return;
                }
            }
        }
    };
    Box::pin(close_connection(&mut w, code, &mut batch)).await;
}

/// The writer's last words: what was queued before the close (an `error`
/// explaining it, say) goes out first, unless the queue is the problem or
/// the client closed (no data frame may follow its Close); then the Close
/// frame. A function of its own, boxed by the caller: it runs once per
/// connection and its timers would otherwise sit in every idle task.
async fn close_connection(w: &mut Writer, code: u16, batch: &mut VecDeque<Utf8Bytes>) {
    let outbox = w.outbox.clone();
    if !close::drops_queued(code) {
        let pending = write_queued(&w.sink, &outbox.queue, batch);
        let _ = tokio::time::timeout(Duration::from_secs(1), pending).await;
    }
    outbox.queue.close();
    let reason = match code {
        close::TRY_AGAIN_LATER => "slow consumer: message queue full",
        close::TOO_BIG => "message too big",
        close::GOING_AWAY => "server going away",
        close::RESTART => "server restarting, reconnect",
        close::HEARTBEAT_TIMEOUT => "heartbeat timeout",
        close::POLICY => "policy violation",
        close::TOKEN_EXPIRED => "token expired",
        _ => w.outbox.close.reason().unwrap_or(""),
    };
    let finish = async {
        let mut sink = w.sink.lock().await;
        if code != close::BY_CLIENT {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = sink.send(frame).await;
        }
        // Flushes whatever tungstenite still holds: our Close, or its answer
        // to the client's Close when the client started (or both sides
        // started at once). Dropping the socket then half-closes it and
        // drains what the client still sends (`Lingering`).
        let _ = sink.close().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), finish).await;
}

/// After a failed write: a client whose Close arrived while a frame was
/// being written makes that write fail (no data frame may follow its
/// Close), and the answer tungstenite queued for it is only written by a
/// flush. Without this the client would see EOF and no Close frame. Bounded:
/// on a dead connection it fails or times out at once.
async fn flush_close_answer(w: &mut Writer) {
    let close = async { w.sink.lock().await.close().await };
    let _ = tokio::time::timeout(Duration::from_millis(500), close).await;
}

/// A closing writer's last data frames: what is queued. The sink first,
/// then the queue: a reader writing its answers at the end of a hold
/// ([`Queue::write_held`]) puts back what the socket did not take before it
/// lets the sink go, so nothing is taken out of order or left behind.
async fn write_queued<S: Sink<Message> + Unpin>(
    sink: &AsyncMutex<S>,
    queue: &Queue,
    batch: &mut VecDeque<Utf8Bytes>,
) -> Result<(), S::Error> {
    let mut sink = sink.lock().await;
    if queue.take(batch) {
        write_all(&mut *sink, batch).await?;
    }
    Ok(())
}

/// Feeds every frame of `batch` to the socket and flushes once.
async fn write_all<S: Sink<Message> + Unpin>(
    sink: &mut S,
    batch: &mut VecDeque<Utf8Bytes>,
) -> Result<(), S::Error> {
    for frame in batch.drain(..) {
        sink.feed(Message::Text(frame)).await?;
    }
    sink.flush().await
}

/// Writes the whole batch and flushes once. Returns false when the
/// connection is unusable.
async fn write_batch(w: &mut Writer, batch: &mut VecDeque<Utf8Bytes>) -> bool {
    let work = async { write_all(&mut *w.sink.lock().await, batch).await };
    let ok = {
        let mut work = std::pin::pin!(work);
        // Most batches complete at once; only a write that has to wait arms
        // the timer (a timer-wheel entry per delivery showed up in profiles).
        let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(res) => res.is_ok(),
            Poll::Pending => {
                matches!(tokio::time::timeout(WRITE_TIMEOUT, work).await, Ok(Ok(())))
            }
        }
    };
    // Give back what a burst grew; an idle connection keeps almost nothing.
    if batch.capacity() > 64 {
        *batch = VecDeque::new();
    }
    ok
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    fn signal() -> CloseSignal {
        CloseSignal {
            code: AtomicU16::new(0),
            notify: Notify::new(),
            reason: std::sync::OnceLock::new(),
        }
    }

    /// The long-polling driver and the websocket's writer wait at once
    /// during an upgrade: a close must reach both, and a waiter that starts
    /// after it sees it at once.
    #[tokio::test]
    async fn a_close_wakes_every_waiter() {
        let signal = Arc::new(signal());
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let signal = signal.clone();
                tokio::spawn(async move { signal.requested().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(signal.request(close::BY_CLIENT));
        assert!(!signal.request(close::NORMAL), "the first request wins");
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), signal.requested())
            .await
            .expect("already requested");
        assert_eq!(signal.code(), close::BY_CLIENT);
    }

    /// A socket that takes `room` frames, then has to wait, and runs
    /// `when_full` the first time it does (what other tasks do while a
    /// reader's write is stuck); its flush waits while anything is
    /// unflushed and `flush_waits`.
    #[derive(Default)]
    struct Socket {
        room: usize,
        flush_waits: bool,
        sent: Vec<Message>,
        unflushed: usize,
        when_full: Option<Box<dyn FnOnce()>>,
    }

    impl Sink<Message> for Socket {
        type Error = std::io::Error;

        fn poll_ready(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            if self.room > 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some(when_full) = self.when_full.take() {
                when_full();
            }
            Poll::Pending
        }

        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.room -= 1;
            self.unflushed += 1;
            self.sent.push(item);
            Ok(())
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            if self.flush_waits && self.unflushed > 0 {
                return Poll::Pending;
            }
            self.unflushed = 0;
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.poll_flush(cx)
        }
    }

    fn queue() -> Queue {
        Queue {
            inner: Mutex::new(Queued::default()),
            waker: AtomicWaker::new(),
            max_frames: 100,
            max_bytes: 1 << 20,
        }
    }

    fn text(m: &Message) -> String {
        match m {
            Message::Text(t) => t.to_string(),
            other => panic!("{other:?}"),
        }
    }

    /// Once a frame did not fit, no later one is queued, even when another
    /// close (a drain's) won before the slow-consumer close and what is
    /// queued still goes out: a later frame would claim the dropped one.
    #[test]
    fn after_an_overflow_nothing_later_is_queued() {
        let queue = Queue {
            inner: Mutex::new(Queued::default()),
            waker: AtomicWaker::new(),
            max_frames: 100,
            max_bytes: 10,
        };
        assert_eq!(
            queue.push(Utf8Bytes::from_static("12345678")),
            Delivery::Queued
        );
        assert_eq!(
            queue.push(Utf8Bytes::from_static("large")),
            Delivery::Overflow
        );
        assert_eq!(queue.push(Utf8Bytes::from_static("s")), Delivery::Overflow);
        let mut batch = VecDeque::new();
        std::mem::swap(&mut queue.inner.lock().unwrap().frames, &mut batch);
        assert_eq!(
            batch.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
            ["12345678"]
        );
        assert_eq!(
            queue.push(Utf8Bytes::from_static("s")),
            Delivery::Overflow,
            "an empty queue too"
        );
    }

    /// The reader's write never waits and never loses a frame: what the
    /// socket does not take stays, in order, for the writer.
    #[test]
    fn a_write_that_would_wait_leaves_the_rest_in_order() {
        let frames =
            || -> VecDeque<Utf8Bytes> { ["a", "b", "c"].map(Utf8Bytes::from_static).into() };

        let mut socket = Socket {
            room: 10,
            ..Default::default()
        };
        let mut batch = frames();
        assert!(write_now(&mut socket, &mut batch));
        assert!(batch.is_empty());
        assert_eq!(
            socket.sent.iter().map(text).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );

        let mut socket = Socket {
            room: 2,
            ..Default::default()
        };
        let mut batch = frames();
        assert!(!write_now(&mut socket, &mut batch), "the socket was full");
        assert_eq!(socket.sent.iter().map(text).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(batch, [Utf8Bytes::from_static("c")], "the rest stays");

        let mut socket = Socket {
            room: 10,
            flush_waits: true,
            ..Default::default()
        };
        let mut batch = frames();
        assert!(
            !write_now(&mut socket, &mut batch),
            "the flush is the writer's"
        );
        assert!(batch.is_empty());
        assert_eq!(socket.sent.len(), 3);
    }

    /// A close asked for while a reader writes its answers, the socket full
    /// after two of three, finds the one left over in the queue ahead of a
    /// delivery queued meanwhile, and writes them in order, because the
    /// closing writer waits for the sink before it takes the queue (taking
    /// the queue first wrote `a b d` and left `c` behind). The reader's half,
    /// putting back what the socket left before it lets the sink go, matters
    /// only when the closer runs on another thread between those two steps,
    /// which a single-threaded test cannot place.
    #[test]
    fn a_close_during_a_readers_write_loses_and_reorders_nothing() {
        let frame = Utf8Bytes::from_static;
        let queue = Arc::new(queue());
        for f in ["a", "b", "c"] {
            queue.push(frame(f));
        }
        let sink = Rc::new(AsyncMutex::new(Socket {
            room: 2,
            ..Default::default()
        }));
        let closer = Rc::new(RefCell::new(Box::pin({
            let (sink, queue) = (sink.clone(), queue.clone());
            async move { write_queued(&sink, &queue, &mut VecDeque::new()).await }
        })));

        let mut held = sink.try_lock().expect("the writer is idle");
        held.when_full = Some(Box::new({
            let (closer, queue) = (closer.clone(), queue.clone());
            move || {
                queue.push(frame("d"));
                let mut closer = closer.borrow_mut();
                assert!(
                    closer.as_mut().now_or_never().is_none(),
                    "the closer waits for the sink"
                );
            }
        }));
        let q = queue.inner.lock().unwrap();
        assert!(queue.write_held(q, held), "the rest is the writer's");
        let mut socket = sink.try_lock().expect("let go");
        assert_eq!(socket.sent.len(), 2);
        socket.room = 10;
        drop(socket);

        let mut closer = closer.borrow_mut();
        closer
            .as_mut()
            .now_or_never()
            .expect("the sink is free")
            .unwrap();
        let socket = sink.try_lock().expect("let go");
        assert_eq!(
            socket.sent.iter().map(text).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
    }

    struct Wakes(std::sync::atomic::AtomicUsize);

    impl futures_util::task::ArcWake for Wakes {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A stream of what the test puts in, which wakes the reader's waker.
    #[derive(Default)]
    struct Inlet(Arc<Mutex<(VecDeque<u32>, Option<Waker>)>>);

    impl Inlet {
        fn put(&self, item: u32) {
            let mut inner = self.0.lock().unwrap();
            inner.0.push_back(item);
            if let Some(waker) = inner.1.take() {
                waker.wake();
            }
        }
    }

    impl Stream for Inlet {
        type Item = u32;

        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
            let mut inner = self.0.lock().unwrap();
            match inner.0.pop_front() {
                Some(item) => Poll::Ready(Some(item)),
                None => {
                    inner.1 = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    /// The rate limit learns when the client's frame woke a waiting reader,
    /// not when the reader next ran: that delay is the node's.
    #[test]
    fn next_frame_tells_when_the_frame_woke_the_reader() {
        let mut stream = Inlet::default();
        stream.put(1);
        let ready = next_frame(&mut stream).now_or_never();
        assert_eq!(ready, Some((Some(1), Arrival::Waiting)));

        let inlet = Inlet(stream.0.clone());
        let mut frame = Box::pin(next_frame(&mut stream));
        let mut cx = Context::from_waker(Waker::noop());
        let asked = Instant::now();
        assert!(frame.as_mut().poll(&mut cx).is_pending());
        std::thread::sleep(Duration::from_millis(20));
        inlet.put(2);
        let woke = Instant::now();
        // The reader runs 30 ms after the frame woke it.
        std::thread::sleep(Duration::from_millis(30));
        let Poll::Ready((Some(2), Arrival::Woke { at, after })) = frame.as_mut().poll(&mut cx)
        else {
            panic!("the frame was there");
        };
        assert!(
            at >= asked + Duration::from_millis(20) && at <= woke,
            "{at:?}"
        );
        assert!(after >= Duration::from_millis(20), "{after:?}");
        assert!(after <= woke - asked, "{after:?}");
    }

    /// The reader's answers to frames sent together cost the writer one
    /// wake-up; nobody else's frames wait for the reader.
    #[tokio::test]
    async fn a_hold_wakes_the_writer_once_and_never_delays_other_tasks() {
        // In a task of its own, as a reader is: a hold is per task.
        tokio::spawn(holding_reader()).await.unwrap();
    }

    async fn holding_reader() {
        let outbox = Arc::new(Outbox {
            queue: queue(),
            sink: std::sync::OnceLock::new(),
            close: signal(),
            transport: "ws",
        });
        let wakes = Arc::new(Wakes(Default::default()));
        let waker = futures_util::task::waker(wakes.clone());
        let woken = || wakes.0.load(Ordering::SeqCst);
        let frame = Utf8Bytes::from_static;
        let mut batch = VecDeque::new();

        // Held answers: one wake-up when the hold ends.
        outbox.queue.waker.register(&waker);
        let hold = outbox.hold_wakes();
        outbox.push(frame("subscribed"));
        outbox.push(frame("unsubscribed"));
        assert_eq!(woken(), 0);
        drop(hold);
        assert_eq!(woken(), 1);
        assert!(outbox.take(&mut batch));
        assert_eq!(batch.len(), 2);
        batch.clear();

        // A delivery from another task while the reader holds: at once.
        outbox.queue.waker.register(&waker);
        let hold = outbox.hold_wakes();
        outbox.push(frame("held"));
        let other = outbox.clone();
        tokio::spawn(async move { other.push(frame("delivery")) })
            .await
            .unwrap();
        assert_eq!(woken(), 2);
        outbox.queue.waker.register(&waker);
        drop(hold);
        assert_eq!(woken(), 2, "the delivery's wake-up paid for the held frame");
        assert!(outbox.take(&mut batch));
        assert_eq!(batch, [frame("held"), frame("delivery")]);
        batch.clear();

        // Paused before a wait: what is held goes; later pushes wake as usual
        // until the hold resumes.
        let hold = outbox.hold_wakes();
        outbox.push(frame("before the wait"));
        hold.pause();
        assert_eq!(woken(), 3);
        assert!(outbox.take(&mut batch));
        batch.clear();
        outbox.queue.waker.register(&waker);
        outbox.push(frame("after the wait"));
        assert_eq!(woken(), 4);
        assert!(outbox.take(&mut batch));
        batch.clear();
        outbox.queue.waker.register(&waker);
        hold.resume();
        outbox.push(frame("next frame's answer"));
        assert_eq!(woken(), 4);
        drop(hold);
        assert_eq!(woken(), 5);
    }
}
