//! HTTP hooks to the application back end (`PROXY_*_URL`): the back end
//! decides who connects, who subscribes to or publishes on the topics it
//! covers, and answers RPCs.
//!
//! Every call is one `POST` with a JSON body, answered by exactly one of
//! `{"result": …}`, `{"error": {"code", "message"}}` or
//! `{"disconnect": {"code": 4000..4999, "reason"}}`. A call costs its caller
//! one bounded wait and nobody else anything: it has `PROXY_TIMEOUT_MS` to
//! be answered in full, at most `PROXY_MAX_INFLIGHT` calls are in flight per
//! node (past that a call is refused at once, never queued), and anything
//! but a well-formed answer — a timeout, a refused connection, a non-2xx
//! status, invalid JSON, an oversized body — becomes
//! [`HookError::Unavailable`] with a sentence naming the hook.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{HookGrant, Identity};
use crate::config::{Config, HooksConfig};
use crate::metrics as m;
use crate::protocol;

/// `transport` values sent to the back end.
pub mod transport {
    /// The native protocol (`WEBSOCKET_PATH`).
    pub const WEBSOCKET: &str = "websocket";
    /// Socket.IO, either transport.
    pub const SOCKETIO: &str = "socketio";
    /// Server-Sent Events (`/sse`).
    pub const SSE: &str = "sse";
    /// The WebSocket proxy (`WEBSOCKET_PATH/proxy/{name}`); the request
    /// also names the route.
    pub const PROXY: &str = "proxy";
}

/// One of the hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Subscribe,
    Publish,
    Rpc,
}

impl Hook {
    /// The hook's name, in messages and as the `hook` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect => m::hook::CONNECT,
            Hook::Subscribe => m::hook::SUBSCRIBE,
            Hook::Publish => m::hook::PUBLISH,
            Hook::Rpc => m::hook::RPC,
        }
    }
}

/// Why a hook call did not end in `result`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The back end answered `error`: its message goes to the client.
    #[error("{message}")]
    Refused { code: i64, message: String },
    /// The back end answered `disconnect`: the client is refused (connect)
    /// or its connection is closed with `code` (4000–4999).
    #[error("{reason}")]
    Disconnect { code: u16, reason: String },
    /// No usable answer (timeout, unreachable, non-2xx, garbage, in-flight
    /// limit); the sentence names the hook and never the back end's URL.
    #[error("{0}")]
    Unavailable(String),
}

/// What a gateway tells a client whose subscription or publication was not
/// allowed. Built in one place ([`Hooks::authorize_subscribe`],
/// [`Hooks::authorize_publish`]) for every transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// Not allowed: by the identity, or by the back end's `error` answer
    /// (native code `forbidden`, Socket.IO ack `ok: false`).
    #[error("{0}")]
    Forbidden(String),
    /// The back end could not decide (native code `unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// The back end answered `disconnect`: the client is told `reason`,
    /// then the connection is closed with `code`.
    #[error("{reason}")]
    Disconnect { code: u16, reason: String },
}

impl Denial {
    /// The protocol's error code for it (native `error`, Socket.IO
    /// `error` event): a `disconnect` is a refusal before the close.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::Forbidden(_) | Denial::Disconnect { .. } => "forbidden",
            Denial::Unavailable(_) => "unavailable",
        }
    }
}

impl From<HookError> for Denial {
    fn from(e: HookError) -> Self {
        match e {
            HookError::Refused { message, .. } => Denial::Forbidden(message),
            HookError::Disconnect { code, reason } => Denial::Disconnect { code, reason },
            HookError::Unavailable(why) => Denial::Unavailable(why),
        }
    }
}

/// How a subscription or publication is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    Forbidden,
    /// The hook covers the topic and the identity does not name it.
    AskHook,
}

/// The client on whose behalf a hook is called.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The connection's outward id (native: 16 hex digits; Socket.IO: its sid).
    pub client: &'a str,
    /// [`transport::WEBSOCKET`] or [`transport::SOCKETIO`].
    pub transport: &'static str,
    pub user: &'a str,
    pub info: Option<&'a RawValue>,
}

/// What the connect hook is told about a new connection.
#[derive(Debug, Clone, Copy)]
pub struct Hello<'a> {
    pub client: &'a str,
    pub transport: &'static str,
    pub remote: Option<SocketAddr>,
    /// The handshake's headers; only those named in `PROXY_HEADERS` are sent.
    pub headers: &'a HeaderMap,
    /// Native `?data=`, Socket.IO `auth.data`.
    pub data: Option<&'a RawValue>,
    /// The proxy route a proxied client asks for; `None` elsewhere.
    pub route: Option<&'a str>,
}

// === wire ===

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectRequest<'a> {
    client: &'a str,
    transport: &'a str,
    remote_addr: Option<String>,
    headers: BTreeMap<&'a str, String>,
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
}

#[derive(Serialize)]
struct SubscribeRequest<'a> {
    client: &'a str,
    user: &'a str,
    topic: &'a str,
    transport: &'a str,
    info: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct PublishRequest<'a> {
    client: &'a str,
    user: &'a str,
    topic: &'a str,
    event: &'a str,
    transport: &'a str,
    info: Option<&'a RawValue>,
    data: &'a RawValue,
}

#[derive(Serialize)]
struct RpcRequest<'a> {
    client: &'a str,
    user: &'a str,
    transport: &'a str,
    info: Option<&'a RawValue>,
    method: &'a str,
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct DisconnectBody {
    code: u16,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectResult {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct DataResult {
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

// === impl Hooks ===

/// The hooks of one node. Cheap to clone.
#[derive(Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

struct Inner {
    /// One pooled client (keep-alive) for every hook.
    http: reqwest::Client,
    config: HooksConfig,
    inflight: Arc<Semaphore>,
    /// Largest answer body read (`WEBSOCKET_MAX_PAYLOAD`): the answer may
    /// travel on to a client.
    max_answer: usize,
    /// When the last failure was logged (ms since `started`): at most one
    /// warning per 10 s, so a dead back end does not flood the log.
    last_warning: AtomicU64,
    started: Instant,
    /// `NODE_ID`, sent as `X-Switchboard-Node`.
    node: String,
}

/// RPC calls one connection may have in flight at once. Every hook of a
/// node shares `PROXY_MAX_INFLIGHT`, and an RPC holds its slot for up to
/// `PROXY_TIMEOUT_MS`: without this one client calling a slow method at
/// its message rate could take every slot and leave the node's connects,
/// subscribes and publishes refused as busy.
pub const RPC_PER_CONNECTION: usize = 64;

/// A connection's RPC calls in flight, under [`RPC_PER_CONNECTION`].
#[derive(Debug, Default)]
pub struct RpcSlots(Arc<AtomicUsize>);

/// One call's place in its connection's [`RpcSlots`], given back when
/// dropped (with the call's answer, or when its task ends).
#[derive(Debug)]
pub struct RpcSlot(Arc<AtomicUsize>);

impl RpcSlots {
    /// A place for one more call, or `unavailable` at once.
    pub fn take(&self) -> Result<RpcSlot, HookError> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < RPC_PER_CONNECTION).then_some(n + 1)
            })
            .map(|_| RpcSlot(self.0.clone()))
            .map_err(|_| {
                HookError::Unavailable(format!(
                    "this connection already has {RPC_PER_CONNECTION} rpc calls in flight; wait for an answer before sending more"
                ))
            })
    }
}

impl Drop for RpcSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the HTTP client for the back end hooks could not be built: {0}")]
pub struct BuildError(String);

impl Hooks {
    pub fn new(config: &Config) -> Result<Hooks, BuildError> {
        let hooks = &config.hooks;
        let http = reqwest::Client::builder()
            .connect_timeout(hooks.timeout)
            // A redirect would carry the call, and its signature, to
            // wherever the answer points; a back end answers in place.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError(e.to_string()))?;
        Ok(Hooks {
            inner: Arc::new(Inner {
                http,
                inflight: Arc::new(Semaphore::new(hooks.max_inflight)),
                config: hooks.clone(),
                max_answer: config.max_payload,
                last_warning: AtomicU64::new(0),
                started: Instant::now(),
                node: config.node_id.clone(),
            }),
        })
    }

    pub fn connect_enabled(&self) -> bool {
        self.inner.config.connect_url.is_some()
    }

    pub fn rpc_enabled(&self) -> bool {
        self.inner.config.rpc_url.is_some()
    }

    /// Whether the subscribe hook decides on `topic`.
    pub fn covers_subscribe(&self, topic: &str) -> bool {
        let c = &self.inner.config;
        c.subscribe_url.is_some() && c.subscribe_topics.iter().any(|p| p.matches(topic))
    }

    /// Whether the publish hook decides on `topic`.
    pub fn covers_publish(&self, topic: &str) -> bool {
        let c = &self.inner.config;
        c.publish_url.is_some() && c.publish_topics.iter().any(|p| p.matches(topic))
    }

    /// Subscribing (and reading: `request`, `GET /api/history`): on a topic
    /// the subscribe hook covers only an identity that names the topic
    /// skips the hook (one allowing "any topic" because tokens are off or
    /// it has no `topics` does not); elsewhere the identity decides.
    pub fn subscribe_access(&self, identity: &Identity, topic: &str) -> Access {
        if self.covers_subscribe(topic) {
            if identity.explicitly_allows(topic) {
                Access::Allowed
            } else {
                Access::AskHook
            }
        } else if identity.may_subscribe(topic) {
            Access::Allowed
        } else {
            Access::Forbidden
        }
    }

    /// Whether a `refresh` from `old` to `new` ends the subscription to
    /// `topic`: only a permission the old identity itself gave and the new
    /// one no longer gives. A subscription that the subscribe hook or the
    /// control API granted was never the token's to take back, so a
    /// routine refresh (the same claims, a later `exp`) keeps it.
    pub fn revoked(&self, old: &Identity, new: &Identity, topic: &str) -> bool {
        if self.covers_subscribe(topic) {
            old.explicitly_allows(topic) && !new.explicitly_allows(topic)
        } else {
            old.may_subscribe(topic) && !new.may_subscribe(topic)
        }
    }

    /// Publishing from a client: a `publish` permission allows it; else the
    /// publish hook decides on the topics it covers; else it is forbidden.
    pub fn publish_access(&self, identity: &Identity, topic: &str) -> Access {
        if identity.may_publish(topic) {
            Access::Allowed
        } else if self.covers_publish(topic) {
            Access::AskHook
        } else {
            Access::Forbidden
        }
    }

    /// The whole subscribe decision for every transport: the identity, then
    /// (when it covers the topic) the subscribe hook with the client's
    /// subscribe `data`.
    pub async fn authorize_subscribe(
        &self,
        caller: Caller<'_>,
        identity: &Identity,
        topic: &str,
        data: Option<&RawValue>,
    ) -> Result<(), Denial> {
        match self.subscribe_access(identity, topic) {
            Access::Allowed => Ok(()),
            Access::Forbidden => Err(Denial::Forbidden(format!(
                "not allowed to subscribe to \"{topic}\""
            ))),
            Access::AskHook => Ok(self.subscribe(caller, topic, data).await?),
        }
    }

    /// The whole publish decision for every transport: `Ok(Some(data))`
    /// when the publish hook replaced the data.
    pub async fn authorize_publish(
        &self,
        caller: Caller<'_>,
        identity: &Identity,
        topic: &str,
        event: &str,
        data: &RawValue,
    ) -> Result<Option<Box<RawValue>>, Denial> {
        match self.publish_access(identity, topic) {
            Access::Allowed => Ok(None),
            Access::Forbidden => Err(Denial::Forbidden(format!(
                "not allowed to publish to \"{topic}\""
            ))),
            Access::AskHook => Ok(self.publish(caller, topic, event, data).await?),
        }
    }

    /// The connect hook: the identity's grant, or why the client is refused.
    pub async fn connect(&self, hello: Hello<'_>) -> Result<HookGrant, HookError> {
        let url = self.url(Hook::Connect)?;
        let mut headers = BTreeMap::new();
        for name in &self.inner.config.headers {
            let values: Vec<&str> = hello
                .headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if !values.is_empty() {
                headers.insert(name.as_str(), values.join(", "));
            }
        }
        let body = to_body(&ConnectRequest {
            client: hello.client,
            transport: hello.transport,
            remote_addr: hello.remote.map(|a| a.to_string()),
            headers,
            data: hello.data,
            route: hello.route,
        });
        let permit = self.permit(Hook::Connect)?;
        self.post(Hook::Connect, url, body, permit, |result| {
            if !is_object(result) {
                return Err("its result must be an object {\"user\", …}".into());
            }
            let r: ConnectResult = serde_json::from_str(result.get()).map_err(|e| {
                format!(
                    "its result must be {{\"user\", \"topics\"?, \"publish\"?, \"expiresAt\"?, \"info\"?}}: {e}"
                )
            })?;
            Ok(HookGrant {
                user: r.user,
                topics: r.topics,
                publish: r.publish,
                expires_at: r.expires_at,
                info: r.info.filter(|i| i.get() != "null").map(Arc::from),
            })
        })
        .await
    }

    /// The subscribe hook: `Ok` when the back end answered `result`.
    pub async fn subscribe(
        &self,
        caller: Caller<'_>,
        topic: &str,
        data: Option<&RawValue>,
    ) -> Result<(), HookError> {
        let url = self.url(Hook::Subscribe)?;
        let body = to_body(&SubscribeRequest {
            client: caller.client,
            user: caller.user,
            topic,
            transport: caller.transport,
            info: caller.info,
            data,
        });
        let permit = self.permit(Hook::Subscribe)?;
        self.post(Hook::Subscribe, url, body, permit, |_| Ok(()))
            .await
    }

    /// The publish hook: `Ok(Some(data))` replaces what is published.
    pub async fn publish(
        &self,
        caller: Caller<'_>,
        topic: &str,
        event: &str,
        data: &RawValue,
    ) -> Result<Option<Box<RawValue>>, HookError> {
        let url = self.url(Hook::Publish)?;
        let body = to_body(&PublishRequest {
            client: caller.client,
            user: caller.user,
            topic,
            event,
            transport: caller.transport,
            info: caller.info,
            data,
        });
        let permit = self.permit(Hook::Publish)?;
        self.post(Hook::Publish, url, body, permit, data_of).await
    }

    /// Starts an RPC: takes its in-flight slot and builds its request now
    /// (so a full node refuses at once), and returns the call to await or
    /// spawn. It resolves to the back end's `data` (`null` when absent).
    pub fn rpc(
        &self,
        caller: Caller<'_>,
        method: &str,
        data: &RawValue,
    ) -> Result<impl Future<Output = Result<Box<RawValue>, HookError>> + Send + 'static, HookError>
    {
        let url = self.url(Hook::Rpc)?.to_string();
        let body = to_body(&RpcRequest {
            client: caller.client,
            user: caller.user,
            transport: caller.transport,
            info: caller.info,
            method,
            data,
        });
        let permit = self.permit(Hook::Rpc)?;
        let hooks = self.clone();
        Ok(async move {
            let data = hooks.post(Hook::Rpc, &url, body, permit, data_of).await?;
            Ok(data.unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON")))
        })
    }

    // --- the call ---

    fn url(&self, hook: Hook) -> Result<&str, HookError> {
        let c = &self.inner.config;
        let url = match hook {
            Hook::Connect => &c.connect_url,
            Hook::Subscribe => &c.subscribe_url,
            Hook::Publish => &c.publish_url,
            Hook::Rpc => &c.rpc_url,
        };
        url.as_deref().ok_or_else(|| {
            HookError::Unavailable(format!(
                "the {} hook is not configured on this node",
                hook.name()
            ))
        })
    }

    /// An in-flight slot, or a refusal at once (never a queue).
    fn permit(&self, hook: Hook) -> Result<OwnedSemaphorePermit, HookError> {
        self.inner.inflight.clone().try_acquire_owned().map_err(|_| {
            self.count(hook, m::hook_outcome::OVERLOADED, None);
            HookError::Unavailable(format!(
                "the application back end is busy: {} calls are already in flight on this node (the {} hook was not called); try again",
                self.inner.config.max_inflight,
                hook.name()
            ))
        })
    }

    /// POSTs `body` to `url` and reads the answer's `result` with `shape`
    /// (whose `Err` is a sentence on what the result should have been).
    async fn post<T>(
        &self,
        hook: Hook,
        url: &str,
        body: Vec<u8>,
        _permit: OwnedSemaphorePermit,
        shape: impl FnOnce(&RawValue) -> Result<T, String>,
    ) -> Result<T, HookError> {
        let start = Instant::now();
        let timeout = self.inner.config.timeout;
        let timestamp = crate::auth::unix_ms().to_string();
        let signed =
            self.inner.config.secret.as_ref().map(|secret| {
                super::timed_signature(secret.expose().as_bytes(), &timestamp, &body)
            });
        let exchange = async {
            let mut request = self
                .inner
                .http
                .post(url)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .header(super::NODE_HEADER, &self.inner.node)
                .header(super::TIMESTAMP_HEADER, &timestamp);
            if let Some(signature) = &signed {
                request = request.header(super::SIGNATURE_HEADER, signature);
            }
            let mut res = request.body(body).send().await?;
            let status = res.status();
            if !status.is_success() {
                return Err(Failure::Status(status.as_u16()));
            }
            let mut answer = Vec::new();
            while let Some(chunk) = res.chunk().await? {
                if answer.len() + chunk.len() > self.inner.max_answer {
                    return Err(Failure::TooBig);
                }
                answer.extend_from_slice(&chunk);
            }
            Ok(answer)
        };
        let outcome = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(answer)) => self
                .answer(hook, &answer)
                .and_then(|result| shape(&result).map_err(|why| self.bad(hook, why))),
            Ok(Err(failure)) => Err(self.failure(hook, failure)),
            Err(_) => {
                self.warn(hook, "no answer in time");
                Err((
                    m::hook_outcome::TIMEOUT,
                    HookError::Unavailable(format!(
                        "the application back end did not answer the {} hook within {} ms",
                        hook.name(),
                        timeout.as_millis()
                    )),
                ))
            }
        };
        let label = match &outcome {
            Ok(_) => m::hook_outcome::OK,
            Err((label, _)) => label,
        };
        self.count(hook, label, Some(start.elapsed()));
        outcome.map_err(|(_, e)| e)
    }

    /// Reads an answer body: its `result`, or the outcome label and error.
    fn answer(
        &self,
        hook: Hook,
        answer: &[u8],
    ) -> Result<Box<RawValue>, (&'static str, HookError)> {
        if protocol::json_depth_exceeds(answer, protocol::MAX_DATA_DEPTH + 3) {
            return Err(self.bad(hook, "its answer is nested too deeply".into()));
        }
        let text = std::str::from_utf8(answer)
            .map_err(|_| self.bad(hook, "its answer is not UTF-8 text".into()))?;
        let fields: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text)
            .map_err(|e| self.bad(hook, format!("its answer is not a JSON object: {e}")))?;
        let present = |k: &str| fields.get(k).filter(|v| v.get() != "null");
        match (present("result"), present("error"), present("disconnect")) {
            (Some(result), None, None) => Ok(result.clone()),
            (None, Some(error), None) => {
                let e: ErrorBody = serde_json::from_str(error.get()).map_err(|e| {
                    self.bad(
                        hook,
                        format!("its error must be {{\"code\": <int>, \"message\": \"…\"}}: {e}"),
                    )
                })?;
                let message = e.message.filter(|m| !m.is_empty()).unwrap_or_else(|| {
                    format!("refused by the application back end ({} hook)", hook.name())
                });
                Err((
                    m::hook_outcome::ERROR,
                    HookError::Refused {
                        code: e.code,
                        message,
                    },
                ))
            }
            (None, None, Some(d)) => {
                let d: DisconnectBody = serde_json::from_str(d.get())
                    .ok()
                    .filter(|d: &DisconnectBody| (4000..=4999).contains(&d.code))
                    .ok_or_else(|| {
                        self.bad(
                            hook,
                            "its disconnect must be {\"code\": <4000..4999>, \"reason\": \"…\"}"
                                .into(),
                        )
                    })?;
                let reason = d
                    .reason
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "disconnected by the application back end".into());
                Err((
                    m::hook_outcome::DISCONNECT,
                    HookError::Disconnect {
                        code: d.code,
                        reason,
                    },
                ))
            }
            _ => Err(self.bad(
                hook,
                "its answer must have exactly one of \"result\", \"error\" or \"disconnect\""
                    .into(),
            )),
        }
    }

    fn bad(&self, hook: Hook, why: String) -> (&'static str, HookError) {
        self.warn(hook, &why);
        (
            m::hook_outcome::BAD_ANSWER,
            HookError::Unavailable(format!(
                "the application back end answered the {} hook with something unusable: {why}",
                hook.name()
            )),
        )
    }

    fn failure(&self, hook: Hook, failure: Failure) -> (&'static str, HookError) {
        let name = hook.name();
        match failure {
            Failure::Status(status) => {
                self.warn(hook, &format!("HTTP {status}"));
                (
                    m::hook_outcome::BAD_STATUS,
                    HookError::Unavailable(format!(
                        "the application back end answered the {name} hook with HTTP {status}"
                    )),
                )
            }
            Failure::TooBig => self.bad(
                hook,
                format!("its answer is larger than {} bytes", self.inner.max_answer),
            ),
            Failure::Send(e) => {
                // The detail (with the URL) goes to the log, not to clients.
                self.warn(hook, &format!("{e:#}"));
                let why = if e.is_connect() {
                    "it refused the connection or could not be found"
                } else {
                    "the connection failed"
                };
                (
                    m::hook_outcome::UNREACHABLE,
                    HookError::Unavailable(format!(
                        "the application back end could not be reached for the {name} hook: {why}"
                    )),
                )
            }
        }
    }

    fn count(&self, hook: Hook, outcome: &'static str, took: Option<Duration>) {
        metrics::counter!(m::PROXY_REQUESTS, "hook" => hook.name(), "outcome" => outcome)
            .increment(1);
        if let Some(took) = took {
            metrics::histogram!(m::PROXY_DURATION, "hook" => hook.name())
                .record(took.as_secs_f64());
        }
    }

    /// Logs a failed call, at most once per 10 s (the metric counts them all).
    fn warn(&self, hook: Hook, cause: &str) {
        let now = self.inner.started.elapsed().as_millis() as u64 + 10_000;
        let last = self.inner.last_warning.load(Ordering::Relaxed);
        if now >= last + 10_000
            && self
                .inner
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                hook = hook.name(),
                cause,
                "application back end hook call failed"
            );
        }
    }
}

/// Why an exchange with the back end did not give an answer body.
enum Failure {
    Send(reqwest::Error),
    Status(u16),
    TooBig,
}

impl From<reqwest::Error> for Failure {
    /// Without the URL: the error's text reaches logs and clients, and the
    /// URL may carry a password.
    fn from(e: reqwest::Error) -> Failure {
        Failure::Send(e.without_url())
    }
}

/// The optional `data` of a publish or RPC `result`.
fn data_of(result: &RawValue) -> Result<Option<Box<RawValue>>, String> {
    if !is_object(result) {
        return Err("its result must be an object {\"data\"?: …}".into());
    }
    let r: DataResult = serde_json::from_str(result.get())
        .map_err(|e| format!("its result must be an object {{\"data\"?: …}}: {e}"))?;
    match r.data {
        Some(d) if protocol::json_depth_exceeds(d.get(), protocol::MAX_DATA_DEPTH) => {
            Err(format!("its data: {}", protocol::TOO_DEEP))
        }
        other => Ok(other),
    }
}

/// serde reads a struct from an array too; a result must be an object.
fn is_object(v: &RawValue) -> bool {
    v.get().trim_start().starts_with('{')
}

fn to_body<T: Serialize>(request: &T) -> Vec<u8> {
    serde_json::to_vec(request).expect("hook requests always serialize")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::auth::{Authenticator, HookGrant, KeySource, Pattern, Secret};

    fn hooks(pairs: &[(&str, &str)]) -> Hooks {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Hooks::new(&Config::from_source(&map).unwrap()).unwrap()
    }

    #[test]
    fn who_decides_a_subscription() {
        let open = Authenticator::open().authenticate(None).unwrap();
        let h = hooks(&[
            ("PROXY_SUBSCRIBE_URL", "http://127.0.0.1:1/s"),
            ("PROXY_SUBSCRIBE_TOPICS", "room.*"),
        ]);
        // "Any topic" because tokens are off does not skip the hook.
        assert_eq!(h.subscribe_access(&open, "room.1"), Access::AskHook);
        assert_eq!(h.subscribe_access(&open, "news"), Access::Allowed);
        let auth = Authenticator::new(
            KeySource::Secret(&Secret::new("k".into())),
            None,
            None,
            vec![Pattern::new("room.lobby")],
        )
        .unwrap();
        let named = auth
            .from_hook(HookGrant {
                topics: Some(vec!["room.1".into()]),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(h.subscribe_access(&named, "room.1"), Access::Allowed);
        assert_eq!(h.subscribe_access(&named, "room.2"), Access::AskHook);
        // Public topics are named too; uncovered topics follow the identity.
        assert_eq!(h.subscribe_access(&named, "room.lobby"), Access::Allowed);
        assert_eq!(h.subscribe_access(&named, "news"), Access::Forbidden);
        // Without the URL the patterns mean nothing.
        let off = hooks(&[("PROXY_SUBSCRIBE_TOPICS", "room.*")]);
        assert_eq!(off.subscribe_access(&open, "room.1"), Access::Allowed);
    }

    #[test]
    fn who_decides_a_publication() {
        let auth = Authenticator::open();
        let writer = auth
            .from_hook(HookGrant {
                publish: Some(vec!["chat.own".into()]),
                ..Default::default()
            })
            .unwrap();
        let h = hooks(&[
            ("PROXY_PUBLISH_URL", "http://127.0.0.1:1/p"),
            ("PROXY_PUBLISH_TOPICS", "chat.*"),
        ]);
        assert_eq!(h.publish_access(&writer, "chat.own"), Access::Allowed);
        assert_eq!(h.publish_access(&writer, "chat.x"), Access::AskHook);
        assert_eq!(h.publish_access(&writer, "news"), Access::Forbidden);
        assert_eq!(
            hooks(&[]).publish_access(&writer, "chat.x"),
            Access::Forbidden
        );
    }

    #[test]
    fn result_data() {
        let raw = |s: &str| RawValue::from_string(s.into()).unwrap();
        assert!(data_of(&raw("{}")).unwrap().is_none());
        assert!(data_of(&raw(r#"{"data":null}"#)).unwrap().is_none());
        assert_eq!(
            data_of(&raw(r#"{"data":[1]}"#)).unwrap().unwrap().get(),
            "[1]"
        );
        assert!(data_of(&raw("[1]")).is_err());
        let deep = format!(r#"{{"data":{}{}}}"#, "[".repeat(65), "]".repeat(65));
        assert!(
            data_of(&raw(&deep))
                .unwrap_err()
                .contains("nested too deeply")
        );
    }
}
