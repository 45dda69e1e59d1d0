//! What runs only on the leader: the device (its driver, the show that
//! streams frames, the carousel), the mock-event timers and the compat
//! consumer. Duties start when this node gains the lease and are cancelled
//! the moment it loses it;
//! a node that shuts down stops them and waits for them before it gives the
//! lease up ([`Leader::stop`]), so its last frame is on the wire before
//! another node can take over.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MockEvent;
use crate::device::Device;
use crate::election::Leadership;
use crate::hub::Hub;
use crate::metrics as m;

/// Everything the leader duties need.
pub struct Duties {
    pub hub: Hub,
    pub mock_events: Vec<MockEvent>,
    /// The device driver and carousel; `None` in tests of the timers alone.
    pub device: Option<Device>,
    /// The drop-in sources' consumer (`COMPAT_*`): on the leader only, so
    /// that each emit becomes one publication, not one per node.
    pub compat: Option<std::sync::Arc<crate::compat::Compat>>,
}

/// The task that starts and stops the duties.
pub struct Leader {
    /// Ends the task (and with it the duties) for good.
    stop: CancellationToken,
    /// Every duty task of every term.
    duties: TaskTracker,
    task: tokio::task::JoinHandle<()>,
}

impl Leader {
    /// Stops the duties for good and waits up to `within` for them to end.
    pub async fn stop(self, within: Duration) {
        self.stop.cancel();
        let _ = self.task.await;
        self.duties.close();
        if tokio::time::timeout(within, self.duties.wait())
            .await
            .is_err()
        {
            tracing::warn!("leader duties still running after {within:?}");
        }
    }
}

/// Runs `duties` whenever `leadership` says this node leads, until `stop`
/// (or [`Leader::stop`]).
pub fn spawn(
    duties: Duties,
    mut leadership: watch::Receiver<Leadership>,
    stop: CancellationToken,
) -> Leader {
    let stop = stop.child_token();
    let tracker = TaskTracker::new();
    let (loop_stop, tasks) = (stop.clone(), tracker.clone());
    let task = tokio::spawn(async move {
        // The duties running, and the epoch they run for: the watch keeps
        // only its latest value, so a term lost and won again between two
        // looks shows as the same `leader: true` with a newer epoch, and the
        // old term's duties (fenced out by now) must give way.
        let mut running: Option<(CancellationToken, u64)> = None;
        loop {
            let now = *leadership.borrow_and_update();
            metrics::gauge!(m::LEADER).set(if now.leader { 1.0 } else { 0.0 });
            metrics::gauge!(m::LEADER_EPOCH).set(now.epoch as f64);
            let stale = running
                .as_ref()
                .is_some_and(|(_, epoch)| !now.leader || *epoch != now.epoch);
            if stale {
                tracing::info!(epoch = now.epoch, "leader duties stopped");
                running.take().expect("running").0.cancel();
            }
            if now.leader && running.is_none() {
                tracing::info!(epoch = now.epoch, "leader duties started");
                let token = loop_stop.child_token();
                start(&duties, now.epoch, &token, &tasks);
                running = Some((token, now.epoch));
            }
            tokio::select! {
                changed = leadership.changed() => if changed.is_err() { break },
                _ = loop_stop.cancelled() => break,
            }
        }
        if let Some((token, _)) = running {
            token.cancel();
        }
    });
    Leader {
        stop,
        duties: tracker,
        task,
    }
}

fn start(duties: &Duties, epoch: u64, token: &CancellationToken, tasks: &TaskTracker) {
    if let Some(compat) = duties.compat.clone() {
        tasks.spawn(compat.run(token.clone()));
    }
    if let Some(device) = duties.device.clone() {
        let token = token.clone();
        tasks.spawn(async move { device.lead(epoch, token).await });
    }
    for event in &duties.mock_events {
        if let Some(interval) = event.interval {
            tasks.spawn(mock_timer(
                duties.hub.clone(),
                event.clone(),
                interval,
                token.clone(),
            ));
        }
    }
}

/// Publishes one mock event every `interval` through the backplane.
async fn mock_timer(hub: Hub, event: MockEvent, interval: Duration, token: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = hub.publish(&event.name, &event.name, &event.data).await {
            tracing::debug!(event = %event.name, cause = %e, "mock event not published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Delivery, Publication, Subscriber};
    use serde_json::value::RawValue;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Subscriber for Count {
        fn deliver(&self, _: &Publication) -> Delivery {
            self.0.fetch_add(1, Ordering::Relaxed);
            Delivery::Queued
        }
        fn gap(&self, _: &str, _: &crate::history::GapRange) -> Delivery {
            Delivery::Queued
        }
        fn transport(&self) -> &'static str {
            "test"
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timers_run_only_while_leading() {
        let (hub, rx) = crate::hub::testing::hub(&[]);
        hub.spawn_dispatcher(rx);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        hub.subscribe("tick", 1, count.clone(), None, Box::new(|_| {}))
            .await
            .unwrap();
        let (lead_tx, lead_rx) = watch::channel(Leadership::default());
        let stop = CancellationToken::new();
        let duties = Duties {
            hub: hub.clone(),
            mock_events: vec![MockEvent {
                name: "tick".into(),
                interval: Some(Duration::from_millis(100)),
                data: RawValue::from_string("{}".into()).unwrap(),
            }],
            device: None,
            compat: None,
        };
        let leader = spawn(duties, lead_rx, stop.clone());

        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "not leader yet");

        lead_tx
            .send(Leadership {
                leader: true,
                epoch: 1,
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1_050)).await;
        let led = count.0.load(Ordering::Relaxed);
        assert!((9..=11).contains(&led), "{led} ticks in 1 s at 100 ms");

        lead_tx
            .send(Leadership {
                leader: false,
                epoch: 1,
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let after = count.0.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            after,
            "stopped on losing the lease"
        );
        leader.stop(Duration::from_secs(1)).await;
    }

    /// The watch keeps only its latest value: a term lost and won again
    /// between two looks is the same `leader: true` with a newer epoch. The
    /// old term's device duty, fenced out, must give way to the new one, or
    /// no command is applied until the next change.
    #[tokio::test]
    async fn a_new_epoch_restarts_the_duties() {
        use crate::device::state::{Command, DeviceState};
        use crate::device::store::{DeviceStore, MemoryStore};
        let (hub, rx) = crate::hub::testing::hub(&[]);
        hub.spawn_dispatcher(rx);
        let store = Arc::new(MemoryStore::default());
        let (device, _queue) = crate::device::tests::testing_device(store.clone());
        let (lead_tx, lead_rx) = watch::channel(Leadership {
            leader: true,
            epoch: 1,
        });
        let duties = Duties {
            hub,
            mock_events: Vec::new(),
            device: Some(device.clone()),
            compat: None,
        };
        let leader = spawn(duties, lead_rx, CancellationToken::new());
        let dim = |brightness| Command::Settings { brightness };
        assert_eq!(
            device.submit(dim(10)).await.unwrap().settings.brightness,
            10
        );
        // Another term saved meanwhile (epoch 2), and this node won again
        // with epoch 3 before its leader loop looked.
        let mut other = DeviceState::initial(&["clock".into(), "stars".into()]);
        other.epoch = 2;
        store.save(&other, 2).await.unwrap();
        lead_tx
            .send(Leadership {
                leader: true,
                epoch: 3,
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let state = device
            .submit(dim(30))
            .await
            .expect("applied by the new term");
        assert_eq!((state.settings.brightness, state.epoch), (30, 3));
        leader.stop(Duration::from_secs(1)).await;
    }
}
