//! The small Redis helper: builds fred clients the one right way (reconnect
//! policy, timeouts, large pub/sub buffer) and names every key and channel.
//!
//! Besides `backplane/redis.rs` and `election/redis.rs`, only this module
//! imports fred; the node registry and the device store reach Redis through
//! [`Redis`].

use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

/// Keys and channels under one prefix (`REDIS_PREFIX`, default `switchboard`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// `{prefix}:t:` — the start of every topic channel.
    pub fn topic_prefix(&self) -> String {
        format!("{}:t:", self.prefix)
    }

    /// `{prefix}:t:{topic}` — where publishers `PUBLISH`.
    pub fn topic(&self, topic: &str) -> String {
        format!("{}:t:{topic}", self.prefix)
    }

    pub fn leader(&self) -> String {
        format!("{}:leader", self.prefix)
    }

    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    pub fn device(&self) -> String {
        format!("{}:device", self.prefix)
    }

    pub fn node(&self, id: &str) -> String {
        format!("{}:node:{id}", self.prefix)
    }

    pub fn node_pattern(&self) -> String {
        format!("{}:node:*", self.prefix)
    }

    /// The key prefix itself (`REDIS_PREFIX`), passed to the history functions.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Device commands for the leader.
    pub fn commands(&self) -> String {
        format!("{}:cmd", self.prefix)
    }

    /// Replies to device commands forwarded by node `id`.
    pub fn replies(&self, id: &str) -> String {
        format!("{}:reply:{id}", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: unexpected reply: {0}")]
    Reply(String),
}

/// How long a plain command may take before it counts as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The CA certificate(s) that sign the Redis server's TLS certificate, for
/// `rediss://` URLs (`REDIS_CA_FILE`); set once at start-up.
static CA_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Trusts the PEM certificates in `path` (besides the system roots) for
/// `rediss://` connections made after this call.
pub fn set_ca_file(path: std::path::PathBuf) {
    let _ = CA_FILE.set(path);
}

fn tls_with_ca(path: &std::path::Path) -> Result<fred::types::config::TlsConfig, RedisError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let tls_err = |m: String| RedisError::Reply(format!("REDIS_CA_FILE: {m}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs_or_empty() {
        let _ = roots.add(cert);
    }
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| tls_err(e.to_string()))?;
    let mut n = 0;
    for cert in certs {
        roots
            .add(cert.map_err(|e| tls_err(e.to_string()))?)
            .map_err(|e| tls_err(e.to_string()))?;
        n += 1;
    }
    if n == 0 {
        return Err(tls_err("no PEM certificate in the file".into()));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(fred::types::config::TlsConnector::from(config).into())
}

/// The system roots, when any can be read: the CA file is what matters.
fn rustls_native_certs_or_empty() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}

/// Builds a fred config from `url`, with reconnection forever (fred does not
/// reconnect by default) and bounded command and connect timeouts.
///
/// `pubsub_capacity` sizes fred's notification channels: every client has
/// several and each preallocates its capacity, so only the backplane's
/// subscriber, which must absorb bursts, gets a large one.
fn builder(url: &str, pubsub_capacity: usize) -> Result<Builder, RedisError> {
    let mut config = Config::from_url(url)?;
    if url.starts_with("rediss://")
        && let Some(path) = CA_FILE.get()
    {
        config.tls = Some(tls_with_ca(path)?);
    }
    let mut builder = Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 1;
            // Without this a half-open connection is never noticed.
            c.unresponsive.max_timeout = Some(Duration::from_secs(3));
            c.unresponsive.interval = Duration::from_millis(500);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = COMMAND_TIMEOUT;
            // fred drops pub/sub messages when this broadcast lags (32 by default).
            p.broadcast_channel_capacity = pubsub_capacity;
        });
    Ok(builder)
}

/// A Lua script, run with EVALSHA (loaded on NOSCRIPT).
pub struct LuaScript(Script);

impl LuaScript {
    pub fn new(lua: &'static str) -> Self {
        Self(Script::from_lua(lua))
    }
}

/// A client for commands (not pub/sub subscriptions).
///
/// Every command fails fast while the connection is down: fred would
/// otherwise keep it queued and send it after Redis returns, long after the
/// caller was told it failed (a publish answered 503 would still be
/// delivered, a device command applied twice).
#[derive(Clone)]
pub struct Redis {
    client: Client,
    options: Options,
}

impl Redis {
    /// Connects in the background: a node starts (not ready) while Redis is down.
    pub fn connect(url: &str) -> Result<Redis, RedisError> {
        let client = builder(url, 32)?.build()?;
        client.connect();
        let options = Options {
            fail_fast: true,
            timeout: Some(COMMAND_TIMEOUT),
            max_attempts: Some(1),
            ..Default::default()
        };
        Ok(Redis { client, options })
    }

    /// The client with fail-fast options, for every command.
    fn c(&self) -> fred::clients::WithOptions<Client> {
        self.client.with_options(&self.options)
    }

    /// Waits up to `timeout` for the first connection.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.client.wait_for_connect()).await,
            Ok(Ok(()))
        )
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        within(COMMAND_TIMEOUT, self.c().ping::<String>(None)).await?;
        Ok(())
    }

    pub async fn publish(&self, channel: &str, payload: bytes::Bytes) -> Result<i64, RedisError> {
        within(COMMAND_TIMEOUT, self.c().publish(channel, payload)).await
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, RedisError> {
        within(COMMAND_TIMEOUT, self.c().get(key)).await
    }

    pub async fn set_px(&self, key: &str, value: &str, ttl: Duration) -> Result<(), RedisError> {
        let ms = ttl.as_millis() as i64;
        within(
            COMMAND_TIMEOUT,
            self.c()
                .set::<(), _, _>(key, value, Some(Expiration::PX(ms)), None, false),
        )
        .await
    }

    pub async fn del(&self, key: &str) -> Result<(), RedisError> {
        within(COMMAND_TIMEOUT, self.c().del::<i64, _>(key)).await?;
        Ok(())
    }

    /// Every key matching `pattern` (SCAN, never KEYS) with its value.
    pub async fn scan_values(&self, pattern: &str) -> Result<Vec<String>, RedisError> {
        let mut cursor = "0".to_string();
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, batch): (String, Vec<String>) = within(
                COMMAND_TIMEOUT,
                self.c().custom(
                    fred::cmd!("SCAN"),
                    vec![
                        cursor.clone(),
                        "MATCH".into(),
                        pattern.into(),
                        "COUNT".into(),
                        "500".into(),
                    ],
                ),
            )
            .await?;
            keys.extend(batch);
            if next == "0" {
                break;
            }
            cursor = next;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = within(COMMAND_TIMEOUT, self.c().mget(keys)).await?;
        Ok(values.into_iter().flatten().collect())
    }

    /// Runs a Lua script (EVALSHA, loading it on NOSCRIPT) under `timeout`:
    /// fred's own command timeout did not apply to EVALSHA while Redis was down.
    pub async fn eval<R: FromValue>(
        &self,
        script: &LuaScript,
        keys: Vec<String>,
        args: Vec<String>,
        timeout: Duration,
    ) -> Result<R, RedisError> {
        let mut argv: Vec<String> = Vec::with_capacity(2 + keys.len() + args.len());
        argv.push(script.0.sha1().to_string());
        argv.push(keys.len().to_string());
        argv.extend(keys);
        argv.extend(args);
        let client = self.c();
        let evalsha = || client.custom(fred::cmd!("EVALSHA"), argv.clone());
        match within(timeout, evalsha()).await {
            Err(RedisError::Redis(e)) if e.details().starts_with("NOSCRIPT") => {
                within(timeout, script.0.load(&self.client)).await?;
                within(timeout, evalsha()).await
            }
            other => other,
        }
    }
}

/// One element of a function's array reply: integers as their decimal text.
fn reply_bytes(v: Value) -> Result<bytes::Bytes, RedisError> {
    match v {
        Value::Integer(i) => Ok(bytes::Bytes::from(i.to_string())),
        Value::String(s) => Ok(s.into_inner()),
        Value::Bytes(b) => Ok(b),
        Value::Null => Ok(bytes::Bytes::new()),
        other => Err(RedisError::Reply(format!("{:?}", other.kind()))),
    }
}

impl Redis {
    /// `FCALL function 1 key args…` under the command timeout; the array
    /// reply as bytes.
    pub async fn fcall(
        &self,
        function: &str,
        key: &str,
        args: &[&str],
    ) -> Result<Vec<bytes::Bytes>, RedisError> {
        let mut argv: Vec<String> = Vec::with_capacity(3 + args.len());
        argv.push(function.to_string());
        argv.push("1".into());
        argv.push(key.to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        let reply: Value =
            within(COMMAND_TIMEOUT, self.c().custom(fred::cmd!("FCALL"), argv)).await?;
        match reply {
            Value::Array(items) => items.into_iter().map(reply_bytes).collect(),
            other => Err(RedisError::Reply(format!("{:?}", other.kind()))),
        }
    }

    /// `FUNCTION LOAD REPLACE code`.
    pub async fn function_load(&self, code: &str) -> Result<(), RedisError> {
        let _: Value = within(
            COMMAND_TIMEOUT,
            self.c().custom(
                fred::cmd!("FUNCTION"),
                vec!["LOAD".to_string(), "REPLACE".into(), code.to_string()],
            ),
        )
        .await?;
        Ok(())
    }

    /// Notified on every (re)connection of this client's connection, from now
    /// on; the first notification is immediate when it is connected already.
    pub fn connections(&self) -> tokio::sync::mpsc::Receiver<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut events = self.client.reconnect_rx();
        if self.client.is_connected() {
            let _ = tx.try_send(());
        }
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // A full channel already holds a pending notification.
                        if tx.is_closed() {
                            return;
                        }
                        let _ = tx.try_send(());
                    }
                    Err(_) => return,
                }
            }
        });
        rx
    }
}

/// Runs a fred future under a hard timeout.
pub async fn within<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(res) => res.map_err(RedisError::from),
        Err(_) => Err(RedisError::Timeout(timeout)),
    }
}

/// Listens on a fixed set of channels (device commands and replies) on a
/// connection of its own, re-subscribing after every reconnect. Messages
/// arrive as `(channel, payload)`.
pub fn listen(
    url: &str,
    channels: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<tokio::sync::mpsc::Receiver<(String, bytes::Bytes)>, RedisError> {
    let client = subscriber(url, 256)?;
    let mut messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    client.connect();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let c = client.clone();
    let stop2 = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = reconnects.recv() => match r {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // The first connection counts too: this is where we subscribe.
                        if let Err(e) = within(COMMAND_TIMEOUT, c.subscribe(channels.clone())).await {
                            tracing::warn!(cause = %e, "subscribing to control channels failed");
                        }
                    }
                    Err(_) => return,
                },
                _ = stop2.cancelled() => return,
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = messages.recv() => m,
                _ = stop.cancelled() => return,
            };
            match msg {
                Ok(m) => {
                    let payload = m.value.into_bytes().unwrap_or_default();
                    if tx.send((m.channel.to_string(), payload)).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "control channel receiver lagged");
                }
                Err(_) => return,
            }
        }
    });
    Ok(rx)
}

/// A dedicated subscriber connection, for `backplane/redis.rs`.
pub fn subscriber(
    url: &str,
    capacity: usize,
) -> Result<fred::clients::SubscriberClient, RedisError> {
    Ok(builder(url, capacity)?.build_subscriber_client()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let k = Keys::new("switchboard");
        assert_eq!(k.topic("news"), "switchboard:t:news");
        assert_eq!(k.leader(), "switchboard:leader");
        assert_eq!(k.epoch(), "switchboard:epoch");
        assert_eq!(k.device(), "switchboard:device");
        assert_eq!(k.node("a"), "switchboard:node:a");
    }
}
