//! Where the leader persists the device state, fenced by its epoch: a write
//! from a leader whose epoch is older than the newest one is refused by the
//! store itself (a Lua script in Redis), not by hope.

use std::sync::Mutex;

use futures_util::future::BoxFuture;

use crate::redis::{Keys, LuaScript, Redis, RedisError};

use super::state::DeviceState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("write refused: epoch {epoch} is older than the newest leader's")]
    Fenced { epoch: u64 },
    #[error("device store unavailable: {0}")]
    Unavailable(String),
}

pub trait DeviceStore: Send + Sync + 'static {
    fn load(&self) -> BoxFuture<'_, Result<Option<DeviceState>, StoreError>>;
    /// Persists `state` as written by the leader of `epoch`.
    fn save<'a>(
        &'a self,
        state: &'a DeviceState,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Embedded mode: the state lives in this process.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<Option<DeviceState>>,
}

impl DeviceStore for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<DeviceState>, StoreError>> {
        let s = self.state.lock().unwrap().clone();
        Box::pin(async move { Ok(s) })
    }

    fn save<'a>(
        &'a self,
        state: &'a DeviceState,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut cur = self.state.lock().unwrap();
        let res = match cur.as_ref() {
            Some(c) if c.epoch > epoch => Err(StoreError::Fenced { epoch }),
            _ => {
                *cur = Some(state.clone());
                Ok(())
            }
        };
        Box::pin(async move { res })
    }
}

const SAVE: &str = r#"
local e = tonumber(ARGV[2])
local newest = tonumber(redis.call('GET', KEYS[2]) or '0')
if e < newest then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, d = pcall(cjson.decode, cur)
  if ok and type(d) == 'table' and tonumber(d.epoch) and tonumber(d.epoch) > e then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#;

/// `{prefix}:device`, checked against `{prefix}:epoch` and the epoch stored
/// with the state.
pub struct RedisStore {
    redis: Redis,
    keys: Keys,
    script: LuaScript,
}

impl RedisStore {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            script: LuaScript::new(SAVE),
        }
    }
}

impl DeviceStore for RedisStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<DeviceState>, StoreError>> {
        Box::pin(async move {
            let raw = self
                .redis
                .get(&self.keys.device())
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok(raw.and_then(|r| match serde_json::from_str(&r) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(cause = %e, "persisted device state is unreadable; ignoring it");
                    None
                }
            }))
        })
    }

    fn save<'a>(
        &'a self,
        state: &'a DeviceState,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let json = serde_json::to_string(state).expect("device state serializes");
            let n: i64 = self
                .redis
                .eval(
                    &self.script,
                    vec![self.keys.device(), self.keys.epoch()],
                    vec![json, epoch.to_string()],
                    crate::redis::COMMAND_TIMEOUT,
                )
                .await
                .map_err(|e: RedisError| StoreError::Unavailable(e.to_string()))?;
            if n == 1 {
                Ok(())
            } else {
                Err(StoreError::Fenced { epoch })
            }
        })
    }
}
