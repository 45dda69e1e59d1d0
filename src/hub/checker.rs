//! The checker: finds holes that no later publication reveals (after a
//! backplane restoration, and periodically) and hands them to the
//! dispatcher for repair.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Control, Hub};

/// How long a consistency check waits between reading a topic's top and
/// comparing it with what was delivered, so that publications still in
/// flight on the pub/sub connection are not taken for lost ones.
const CHECK_SETTLE: Duration = Duration::from_millis(500);

impl Hub {
    /// Keeps history topics honest: after every backplane reconnect, and every
    /// `HISTORY_TTL_MS / 3` (at most a minute), compares each subscribed
    /// history topic's top with what this node delivered and repairs the
    /// difference. The reads also keep the topics' epochs alive while they
    /// have subscribers.
    pub fn spawn_checker(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        let every = (self.inner.history_config.ttl / 3).min(Duration::from_secs(60));
        tokio::spawn(async move {
            let mut losses = hub.inner.backplane.losses();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = losses.changed() => {
                        if changed.is_err() { return; }
                        tracing::info!("backplane subscriptions restored: checking history topics for gaps");
                    }
                    _ = stop.cancelled() => return,
                }
                hub.check_all(&stop).await;
            }
        })
    }

    async fn check_all(&self, stop: &CancellationToken) {
        let mut pending: Vec<Arc<str>> = self
            .held_topics()
            .into_iter()
            .filter(|t| self.is_history(t))
            .collect();
        // Right after a reconnect the command connection may still be on its
        // way back: retry what could not be read for a while.
        for attempt in 0..20 {
            if pending.is_empty() {
                return;
            }
            if attempt > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(CHECK_SETTLE) => {}
                    _ = stop.cancelled() => return,
                }
            }
            let mut reads = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            for topic in pending {
                match self.inner.history.read(&topic, 0, 0).await {
                    Ok(range) => reads.push((topic, range)),
                    Err(e) => {
                        tracing::debug!(%topic, cause = %e, "history check read failed");
                        failed.push(topic);
                    }
                }
            }
            pending = failed;
            tokio::select! {
                _ = tokio::time::sleep(CHECK_SETTLE) => {}
                _ = stop.cancelled() => return,
            }
            for (topic, range) in reads {
                if self
                    .inner
                    .control
                    .send(Control::Check { topic, range })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        tracing::warn!(
            topics = pending.len(),
            "history check: topics could not be read; next check later"
        );
    }
}
