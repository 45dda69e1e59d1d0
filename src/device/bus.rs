//! How a command reaches the leader when this node is not the leader.
//!
//! Redis mode: the command is published on `{prefix}:cmd` with an id and the
//! sender's node id; the leader applies it and publishes the outcome on
//! `{prefix}:reply:{sender}`. The sender waits up to `COMMAND_TIMEOUT_MS`;
//! silence means no leader (503). Embedded mode has no other node to ask.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::state::{Command, DeviceState};
use super::{CommandError, Request};
use crate::election::Leadership;
use crate::redis::{Keys, Redis, RedisError};
use crate::waiters::Waiters;

pub trait CommandBus: Send + Sync + 'static {
    /// Sends `command` to the leader on another node and waits for the outcome.
    fn forward(
        &self,
        command: Command,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<DeviceState, CommandError>>;
}

/// Embedded mode: this node always leads, so nothing is ever forwarded.
pub struct NoBus;

impl CommandBus for NoBus {
    fn forward(&self, _: Command, _: Duration) -> BoxFuture<'_, Result<DeviceState, CommandError>> {
        Box::pin(async {
            Err(CommandError::Unavailable(
                "no leader is available to apply the command; try again".into(),
            ))
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    id: String,
    from: String,
    command: Command,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    id: String,
    #[serde(default)]
    state: Option<DeviceState>,
    #[serde(default)]
    invalid: Option<String>,
    #[serde(default)]
    unavailable: Option<String>,
}

type Waiter = oneshot::Sender<Result<DeviceState, CommandError>>;

pub struct RedisBus {
    redis: Redis,
    keys: Keys,
    node_id: String,
    pending: Waiters<Waiter>,
}

impl RedisBus {
    /// Listens for commands (applied when this node leads) and for replies
    /// to this node's own forwarded commands. `local` is the leader duty's
    /// queue and `COMMAND_TIMEOUT_MS`, how long the sender of a forwarded
    /// command waits for it.
    pub fn start(
        listeners: &crate::redis::Listeners,
        redis: Redis,
        keys: Keys,
        node_id: String,
        leadership: watch::Receiver<Leadership>,
        local: (mpsc::Sender<Request>, Duration),
        stop: CancellationToken,
    ) -> Result<Arc<Self>, RedisError> {
        let cmd_channel = keys.commands();
        let reply_channel = keys.replies(&node_id);
        let channels = vec![cmd_channel.clone(), reply_channel];
        let mut rx = listeners.listen("device commands", channels, stop)?;
        let bus = Arc::new(RedisBus {
            redis,
            keys,
            node_id,
            pending: Waiters::default(),
        });
        let b = bus.clone();
        tokio::spawn(async move {
            while let Some((channel, payload)) = rx.recv().await {
                if channel == cmd_channel {
                    if leadership.borrow().leader {
                        b.serve(&payload, &local.0, local.1).await;
                    }
                } else if let Ok(reply) = serde_json::from_slice::<Reply>(&payload) {
                    let waiter = b.pending.take(&reply.id);
                    if let Some(tx) = waiter {
                        let res = match (reply.state, reply.invalid, reply.unavailable) {
                            (Some(s), _, _) => Ok(s),
                            (_, Some(e), _) => Err(CommandError::Invalid(e)),
                            (_, _, e) => Err(CommandError::Unavailable(e.unwrap_or_else(|| {
                                "the leader could not apply the command".into()
                            }))),
                        };
                        let _ = tx.send(res);
                    }
                }
            }
        });
        Ok(bus)
    }

    /// On the leader: hands a forwarded command to the leader duty and
    /// publishes the outcome to the sender.
    async fn serve(&self, payload: &[u8], local: &mpsc::Sender<Request>, timeout: Duration) {
        let Ok(env) = serde_json::from_slice::<Envelope>(payload) else {
            tracing::warn!("unreadable forwarded command ignored");
            return;
        };
        let (tx, rx) = oneshot::channel();
        if local
            .try_send(Request {
                command: env.command,
                reply: tx,
                deadline: std::time::Instant::now() + timeout,
            })
            .is_err()
        {
            return;
        }
        let redis = self.redis.clone();
        let channel = self.keys.replies(&env.from);
        tokio::spawn(async move {
            let mut reply = Reply {
                id: env.id,
                state: None,
                invalid: None,
                unavailable: None,
            };
            match rx.await {
                Ok(Ok(s)) => reply.state = Some(s),
                Ok(Err(CommandError::Invalid(e))) => reply.invalid = Some(e),
                Ok(Err(CommandError::Unavailable(e))) => reply.unavailable = Some(e),
                Err(_) => return,
            }
            let json = serde_json::to_string(&reply).expect("reply serializes");
            if let Err(e) = redis.publish(&channel, json.into()).await {
                tracing::warn!(cause = %e, "command reply not published");
            }
        });
    }
}

impl CommandBus for RedisBus {
    fn forward(
        &self,
        command: Command,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<DeviceState, CommandError>> {
        Box::pin(async move {
            let id = format!("{:016x}", rand::random::<u64>());
            let (tx, rx) = oneshot::channel();
            let _waiting = self.pending.wait(id.clone(), tx);
            let env = Envelope {
                id,
                from: self.node_id.clone(),
                command,
            };
            let json = serde_json::to_string(&env).expect("command serializes");
            let sent = self.redis.publish(&self.keys.commands(), json.into()).await;
            match sent {
                Err(e) => Err(CommandError::Unavailable(format!(
                    "command not delivered to the leader: {e}"
                ))),
                Ok(_) => match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(res)) => res,
                    _ => Err(CommandError::Unavailable(format!(
                        "no leader answered within {} ms; try again",
                        timeout.as_millis()
                    ))),
                },
            }
        })
    }
}
