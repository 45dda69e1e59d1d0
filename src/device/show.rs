//! The leader's show: every 1/`DEVICE_FPS` s it renders the board, puts the
//! frame on the wire through the driver (inside the election's fence), and
//! offers it to the live stream on topic `device.frame` when it differs from
//! the last one streamed.
//!
//! The wire gets every frame (LED controllers fall back to their own
//! effects when frames stop: WLED after a few seconds, E1.31 receivers after
//! 2.5 s); the stream gets only changes. Publishing a frame waits for the
//! backplane, so it runs in its own task behind a one-frame slot: when the
//! backplane is slower than the frame rate the newest frame replaces the
//! waiting one (counted in `switchboard_device_frames_skipped_total`), and
//! the wire never waits for Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Device;
use super::driver::{self, Driver, DriverError, DriverHealth, HEALTH_WINDOW};
use super::frame::{self, Frame, HEIGHT, WIDTH};
use super::render;
use super::state::DeviceState;
use crate::hub::Hub;
use crate::metrics as m;

/// Runs the show of the term `epoch` until `token` is cancelled or the
/// fence says the term is over. `states` carries the leader's state and
/// how many states the term has applied.
pub(super) async fn run(
    device: Device,
    epoch: u64,
    mut states: watch::Receiver<(DeviceState, u64)>,
    token: CancellationToken,
) {
    let inner = &device.inner;
    let fence = inner.election.fence();
    let fps = inner.fps;
    let mut driver = driver::make(&inner.driver, &inner.node_id);
    let mut tally = Tally::new(driver.as_ref(), fps);
    let (mut state, applied) = states.borrow_and_update().clone();
    driver.apply(&state);
    tally.applied = applied;
    let mut stream = Stream::spawn(inner.hub.clone(), epoch, token.clone());
    let mut ticks = ticker(fps);
    let mut streamed: Option<Frame> = None;
    // The last frame rendered: for which state (`applied`), and the slots
    // it stays the same for (from its slot until `render::stable_until`).
    let mut rendered: Option<(u64, std::ops::Range<i64>, Frame)> = None;
    tracing::info!(epoch, fps, driver = %driver.target().unwrap_or_else(|| driver.kind().into()), "show started");
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            _ = ticks.tick() => {}
        }
        if states.has_changed().unwrap_or(false) {
            let applied;
            (state, applied) = states.borrow_and_update().clone();
            driver.apply(&state);
            tally.applied = applied;
        }
        driver.prepare();
        let t = render::frame_time(render::now_ms(), fps);
        let frame = match &rendered {
            Some((applied, slots, frame)) if *applied == tally.applied && slots.contains(&t) => {
                frame.clone()
            }
            _ => {
                let frame = render::render(&state, t);
                let until = render::stable_until(&state, t);
                rendered = Some((tally.applied, t..until, frame.clone()));
                frame
            }
        };
        let Some(result) = fence.run(epoch, || driver.show(&frame)) else {
            tracing::info!(epoch, "leadership over: no more frames from this node");
            break;
        };
        tally.record(result);
        *inner.driver_health.lock().unwrap() = Some(tally.health(driver.as_ref()));
        if streamed.as_ref() != Some(&frame) {
            stream.offer(&frame, t, &state);
            streamed = Some(frame);
        }
    }
    if token.is_cancelled() {
        // Stopped by choice while still leading: last words on the wire.
        fence.run(epoch, || driver.finish());
    }
    stream.stop.cancel();
    *inner.driver_health.lock().unwrap() = None;
    metrics::gauge!(m::DRIVER_FAILING).set(0.0);
}

/// Ticks at the start of each frame slot of [`render::frame_time`], so
/// the frame rendered at a tick is the one any node renders for that slot.
fn ticker(fps: u32) -> tokio::time::Interval {
    let now = render::now_ms();
    let fps64 = i64::from(fps);
    let next_slot = ((now * fps64).div_euclid(1000) + 1) * 1000 / fps64 + 1;
    let delay = Duration::from_millis((next_slot - now).clamp(0, 1000) as u64);
    let mut ticks = tokio::time::interval_at(Instant::now() + delay, Duration::from_secs(1) / fps);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    ticks
}

// === driver health ===

/// Counts a term's frames and failures for `/api/health` and the metrics,
/// and logs when the driver starts or stops failing (not every frame).
struct Tally {
    kind: &'static str,
    /// Registered once: the show counts every frame.
    frames_metric: metrics::Counter,
    errors_metric: metrics::Counter,
    target: Option<String>,
    applied: u64,
    frames: u64,
    errors: u64,
    last_error: Option<(Instant, String)>,
    failing: bool,
    window: Duration,
}

impl Tally {
    fn new(driver: &dyn Driver, fps: u32) -> Tally {
        metrics::gauge!(m::DRIVER_FAILING).set(0.0);
        Tally {
            kind: driver.kind(),
            frames_metric: metrics::counter!(m::DRIVER_FRAMES, "driver" => driver.kind()),
            errors_metric: metrics::counter!(m::DRIVER_ERRORS, "driver" => driver.kind()),
            target: driver.target(),
            applied: 0,
            frames: 0,
            errors: 0,
            last_error: None,
            failing: false,
            window: HEALTH_WINDOW.max(Duration::from_secs(1) * 5 / (2 * fps)),
        }
    }

    fn record(&mut self, result: Result<bool, DriverError>) {
        match result {
            Ok(true) => {
                self.frames += 1;
                self.frames_metric.increment(1);
            }
            Ok(false) => {}
            Err(e) => {
                self.errors += 1;
                self.errors_metric.increment(1);
                self.last_error = Some((Instant::now(), e.0));
            }
        }
        let failing = self.is_failing();
        if failing != self.failing {
            self.failing = failing;
            metrics::gauge!(m::DRIVER_FAILING).set(if failing { 1.0 } else { 0.0 });
            match &self.last_error {
                Some((_, e)) if failing => {
                    tracing::warn!(driver = self.kind, cause = %e, "driver cannot send frames; retrying");
                }
                _ => tracing::info!(driver = self.kind, "driver sends frames again"),
            }
        }
    }

    fn is_failing(&self) -> bool {
        self.last_error
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.window)
    }

    fn health(&self, driver: &dyn Driver) -> DriverHealth {
        let failing = self.is_failing();
        DriverHealth {
            driver: self.kind,
            target: self.target.clone(),
            ok: !failing,
            error: self
                .last_error
                .as_ref()
                .filter(|_| failing)
                .map(|(_, e)| e.clone()),
            applied: self.applied,
            frames: self.frames,
            errors: self.errors,
            lit_pixels: driver.lit_pixels(),
        }
    }
}

// === the live stream ===

/// The one-frame slot between the show and the task that publishes.
struct Stream {
    slot: watch::Sender<Option<Arc<str>>>,
    /// Set when a frame waits in the slot; a new offer that finds it set
    /// replaces a frame nobody published.
    waiting: Arc<AtomicBool>,
    seq: u64,
    epoch: u64,
    stop: CancellationToken,
}

impl Stream {
    fn spawn(hub: Hub, epoch: u64, stop: CancellationToken) -> Stream {
        let stop = stop.child_token();
        let (slot, mut rx) = watch::channel::<Option<Arc<str>>>(None);
        let waiting = Arc::new(AtomicBool::new(false));
        let (w, s) = (waiting.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = s.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let Some(json) = rx.borrow_and_update().clone() else {
                    continue;
                };
                w.store(false, Ordering::Release);
                let data = RawValue::from_string(json.to_string()).expect("JSON");
                match hub
                    .publish_fenced(frame::TOPIC, frame::EVENT, &data, Some(epoch))
                    .await
                {
                    Ok(_) => metrics::counter!(m::DEVICE_FRAMES_PUBLISHED).increment(1),
                    Err(e) => tracing::debug!(cause = %e, "frame not published"),
                }
            }
        });
        Stream {
            slot,
            waiting,
            seq: 0,
            epoch,
            stop,
        }
    }

    /// Puts `frame` (rendered for `t`) in the slot.
    fn offer(&mut self, frame: &Frame, t: i64, state: &DeviceState) {
        self.seq += 1;
        let mut obj = json!({
            "width": WIDTH,
            "height": HEIGHT,
            "t": t,
            "epoch": self.epoch,
            "seq": self.seq,
            "app": state.current_app,
            "brightness": state.settings.brightness,
        });
        frame.encode().write_into(&mut obj);
        if self.waiting.swap(true, Ordering::AcqRel) {
            metrics::counter!(m::DEVICE_FRAMES_SKIPPED).increment(1);
        }
        self.slot.send_replace(Some(Arc::from(obj.to_string())));
    }
}
