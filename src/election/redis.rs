//! Leader lease on Redis with a fencing epoch.
//!
//! - acquire: `SET {prefix}:leader <token> NX PX <ttl>` and, only if that
//!   succeeded, `INCR {prefix}:epoch`, in one script. The epoch is also
//!   raised above every epoch this node has seen, so a Redis that restarted
//!   empty never hands out an old epoch again. That is also how a lost
//!   lease shows: the previous leader may not know yet (it finds out at its
//!   next renew, up to a third of a lease later) and may still act, so a
//!   lease taken from a Redis that forgot the epoch acts only one lease
//!   after it was taken, when any earlier leader's own deadline has passed.
//! - renew every TTL/3: compare-and-`PEXPIRE`.
//! - release on shutdown: compare-and-`DEL`.
//!
//! Every lease command runs under a hard timeout. A leader keeps a local
//! deadline, `sent_at + ttl − margin`, where `sent_at` is a monotonic instant
//! taken *before* the last successful renew was sent; when no renew succeeds
//! by then it steps down at once, before Redis can expire the key and let
//! another node in.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Election, Fence, Leadership};
use crate::redis::{Keys, LuaScript, Redis};

/// Returns the epoch (0: not taken), negative when Redis had forgotten
/// an epoch this node saw (the lease may have been lost, not released).
const ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local e = redis.call('INCR', KEYS[2])
  local floor = tonumber(ARGV[3])
  if e <= floor then
    e = floor + 1
    redis.call('SET', KEYS[2], e)
    return -e
  end
  return e
end
return 0
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// How often a follower tries to take a free lease: often, so that a
/// released lease is taken over well within a second.
const FOLLOWER_POLL: Duration = Duration::from_millis(200);

pub struct RedisElection {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Redis,
    keys: Keys,
    token: String,
    ttl: Duration,
    state: watch::Sender<Leadership>,
    /// Open from a successful acquire until the local deadline (moved by
    /// every renew); closed before the step-down is announced or the lease
    /// released.
    fence: Fence,
    /// The highest epoch this node has seen anywhere (its own leases, device
    /// state written by others).
    max_seen: AtomicU64,
    stop: CancellationToken,
    stopped: Notify,
    scripts: Scripts,
}

struct Scripts {
    acquire: LuaScript,
    renew: LuaScript,
    release: LuaScript,
}

impl RedisElection {
    pub fn start(redis: Redis, keys: Keys, node_id: &str, ttl: Duration) -> Self {
        let inner = Arc::new(Inner {
            redis,
            keys,
            token: format!("{node_id}#{:08x}", rand::random::<u32>()),
            ttl,
            state: watch::Sender::new(Leadership::default()),
            fence: Fence::default(),
            max_seen: AtomicU64::new(0),
            stop: CancellationToken::new(),
            stopped: Notify::new(),
            scripts: Scripts {
                acquire: LuaScript::new(ACQUIRE),
                renew: LuaScript::new(RENEW),
                release: LuaScript::new(RELEASE),
            },
        });
        tokio::spawn(run(inner.clone()));
        Self { inner }
    }

    /// Records an epoch seen elsewhere (for example on persisted device
    /// state), so the next lease this node takes is numbered above it.
    pub fn observe_epoch(&self, epoch: u64) {
        self.inner.max_seen.fetch_max(epoch, Ordering::AcqRel);
    }
}

impl Inner {
    fn lease_timeout(&self) -> Duration {
        (self.ttl / 4).min(Duration::from_secs(2))
    }

    fn set(&self, leadership: Leadership) {
        let changed = self.state.send_if_modified(|cur| {
            let changed = *cur != leadership;
            *cur = leadership;
            changed
        });
        if changed {
            if leadership.leader {
                tracing::info!(epoch = leadership.epoch, "became leader");
            } else {
                tracing::info!(epoch = leadership.epoch, "no longer leader");
            }
        }
    }

    /// The new lease's epoch, and whether Redis had forgotten the epoch.
    async fn acquire(&self) -> Option<(u64, bool)> {
        let floor = self.max_seen.load(Ordering::Acquire);
        let res: Result<i64, _> = self
            .redis
            .eval(
                &self.scripts.acquire,
                vec![self.keys.leader(), self.keys.epoch()],
                vec![
                    self.token.clone(),
                    self.ttl.as_millis().to_string(),
                    floor.to_string(),
                ],
                self.lease_timeout(),
            )
            .await;
        match res {
            Ok(0) => None,
            Ok(epoch) => Some((epoch.unsigned_abs(), epoch < 0)),
            Err(e) => {
                tracing::debug!(cause = %e, "lease acquire failed");
                None
            }
        }
    }

    /// `Some(true)` renewed, `Some(false)` lost, `None` no answer.
    async fn renew(&self) -> Option<bool> {
        let res: Result<i64, _> = self
            .redis
            .eval(
                &self.scripts.renew,
                vec![self.keys.leader()],
                vec![self.token.clone(), self.ttl.as_millis().to_string()],
                self.lease_timeout(),
            )
            .await;
        match res {
            Ok(n) => Some(n == 1),
            Err(e) => {
                tracing::warn!(cause = %e, "lease renew failed");
                None
            }
        }
    }

    async fn release(&self) {
        let res: Result<i64, _> = self
            .redis
            .eval(
                &self.scripts.release,
                vec![self.keys.leader()],
                vec![self.token.clone()],
                self.lease_timeout(),
            )
            .await;
        if let Err(e) = res {
            tracing::warn!(cause = %e, "lease release failed; it expires by itself");
        }
    }
}

async fn run(inner: Arc<Inner>) {
    let renew_every = inner.ttl / 3;
    // Margin for clock-rate differences and the time a renew takes to land.
    let margin = inner.ttl / 10;
    loop {
        // Follower: try to take the lease.
        let epoch = loop {
            let sent_at = Instant::now();
            if let Some((epoch, forgotten)) = inner.acquire().await {
                inner.max_seen.fetch_max(epoch, Ordering::AcqRel);
                break Some((epoch, sent_at, forgotten));
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOWER_POLL) => {}
                _ = inner.stop.cancelled() => break None,
            }
        };
        let Some((epoch, sent_at, forgotten)) = epoch else {
            break;
        };
        let mut deadline = sent_at + inner.ttl - margin;
        // Redis forgot the epoch (restarted empty, flushed, failed over to
        // a replica that missed writes): an earlier leader may still hold
        // an open fence until its own deadline, at most a lease after its
        // last renew, which was before this acquire. Act after that.
        let mut acts_at = forgotten.then(|| sent_at + inner.ttl);
        if acts_at.is_some() {
            tracing::warn!(
                epoch,
                "lease taken from a Redis that lost the previous epoch; acting in one lease, once any earlier leader has stopped"
            );
        } else {
            inner.fence.open(epoch, Some(deadline));
            inner.set(Leadership {
                leader: true,
                epoch,
            });
        }
        // Leader: renew until a renew says the lease is gone or the deadline passes.
        let mut next_renew = sent_at + renew_every;
        let resigned = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(epoch, "lease not renewed in time; stepping down");
                    break false;
                }
                _ = inner.stop.cancelled() => break true,
                _ = tokio::time::sleep_until(acts_at.unwrap_or(deadline)), if acts_at.is_some() => {
                    if Instant::now() >= deadline {
                        tracing::warn!(epoch, "lease not renewed in time; stepping down");
                        break false;
                    }
                    acts_at = None;
                    inner.fence.open(epoch, Some(deadline));
                    inner.set(Leadership {
                        leader: true,
                        epoch,
                    });
                }
                _ = tokio::time::sleep_until(next_renew) => {
                    let sent_at = Instant::now();
                    let renewed = tokio::select! {
                        r = inner.renew() => r,
                        _ = tokio::time::sleep_until(deadline) => {
                            tracing::warn!(epoch, "lease not renewed in time; stepping down");
                            break false;
                        }
                    };
                    match renewed {
                        Some(true) => {
                            deadline = sent_at + inner.ttl - margin;
                            if acts_at.is_none() {
                                inner.fence.open(epoch, Some(deadline));
                            }
                            next_renew = sent_at + renew_every;
                        }
                        Some(false) => {
                            tracing::warn!(epoch, "lease taken by another node");
                            break false;
                        }
                        // Retry soon; the deadline decides when to give up.
                        None => next_renew = Instant::now() + Duration::from_millis(100),
                    }
                }
            }
        };
        // No act of this term after this line, then tell the others.
        inner.fence.close();
        inner.set(Leadership {
            leader: false,
            epoch,
        });
        if resigned {
            inner.release().await;
            break;
        }
    }
    inner.stopped.notify_waiters();
}

impl Election for RedisElection {
    fn watch(&self) -> watch::Receiver<Leadership> {
        self.inner.state.subscribe()
    }

    fn current_leader(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let token = self
                .inner
                .redis
                .get(&self.inner.keys.leader())
                .await
                .ok()??;
            Some(
                token
                    .rsplit_once('#')
                    .map_or(token.clone(), |(id, _)| id.to_string()),
            )
        })
    }

    fn resign(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Stop duties first, then free the lease so another node takes over.
            let stopped = self.inner.stopped.notified();
            self.inner.stop.cancel();
            let was_leader = self.inner.state.borrow().leader;
            let _ = tokio::time::timeout(Duration::from_secs(3), stopped).await;
            if !was_leader {
                tracing::debug!("resigned as follower");
            }
        })
    }

    fn observe_epoch(&self, epoch: u64) {
        RedisElection::observe_epoch(self, epoch);
    }

    fn fence(&self) -> Fence {
        self.inner.fence.clone()
    }
}
