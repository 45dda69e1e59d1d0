//! HTTP endpoints: health and readiness, publish, admin, metrics; and the
//! project's error format (`ApiError`), used by every handler.
//!
//! Successful JSON answers use the envelope the seed tools expect:
//! `{"success":true,"data":…,"meta":{"timestamp","requestId"}}`, except the
//! probes and `/api/health`, whose flat shape monitoring tools read. Errors are
//! `{"success":false,"error":"<sentence>","code":"<code>"}`; 5xx bodies stay
//! generic and the detail goes to the log.

use std::time::Duration;

use axum::Json as AxumJson;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::hub::PublishError;
use crate::node::Node;
use crate::protocol::{self, TOPIC_PATTERN};

/// An error as the HTTP client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// A limit per client address or per user (429).
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    GatewayTimeout(String),
    /// Detail for the log only; the client gets a generic sentence.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            ApiError::GatewayTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(detail, "internal error");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let mut res = (
            status,
            AxumJson(json!({"success": false, "error": message, "code": code})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

/// `axum::Json` whose rejection is an [`ApiError`], so a bad body gets the
/// project's error format with the reason (`missing field \`topic\``).
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match AxumJson::<T>::from_request(req, state).await {
            Ok(AxumJson(v)) => Ok(Json(v)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(
                ApiError::TooLarge("request body is larger than HTTP_BODY_LIMIT allows".into()),
            ),
            Err(rejection) => Err(ApiError::BadRequest(rejection_text(&rejection))),
        }
    }
}

/// A path parameter (`{topic}`, `{*topic}`, `{session}`, …), percent-decoded,
/// whose rejection is an [`ApiError`]: a path that is not UTF-8 once
/// decoded (`/sse/%FF`) gets the project's JSON error, not axum's plain text.
pub struct PathText(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(text)) => Ok(PathText(text)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "the path could not be read: {}",
                rejection.body_text()
            ))),
        }
    }
}

fn rejection_text(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "expected a JSON body with Content-Type: application/json".into()
        }
        // serde_json stops at 128 levels: anything that deep is past
        // MAX_DATA_DEPTH as well, and gets the same sentence.
        other if other.body_text().contains("recursion limit exceeded") => {
            protocol::TOO_DEEP.into()
        }
        other => other.body_text(),
    }
}

/// Wraps `data` in the success envelope.
pub fn envelope(data: Value) -> AxumJson<Value> {
    AxumJson(json!({
        "success": true,
        "data": data,
        "meta": {"timestamp": protocol::timestamp(), "requestId": request_id()},
    }))
}

fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

// === health ===

/// `GET /healthz`: alive while the process runs.
pub async fn healthz() -> AxumJson<Value> {
    AxumJson(json!({"status": "alive"}))
}

/// `GET /readyz`: 200 only when the backplane is connected and the node is
/// not draining.
pub async fn readyz(State(node): State<Node>) -> Response {
    match node.not_ready_reason() {
        None => AxumJson(json!({"status": "ready"})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            AxumJson(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response(),
    }
}

/// `GET /api/health`
pub async fn health(State(node): State<Node>) -> AxumJson<Value> {
    let leadership = node.leadership();
    let status = node.backplane_status();
    let hub = node.hub();
    let mut body = json!({
        "status": if node.not_ready_reason().is_none() { "ok" } else { "degraded" },
        "node": node.config().node_id,
        "leader": leadership.leader,
        "epoch": leadership.epoch,
        "backplane": hub.backplane().kind(),
        "backplaneConnected": status.is_connected(),
        "connections": node.connections(),
        "topics": hub.topic_count(),
        "subscriptions": hub.subscription_count(),
        "uptimeSeconds": node.uptime().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
        "timestamp": protocol::timestamp(),
    });
    if let Some(reason) = node.not_ready_reason() {
        body["reason"] = json!(reason);
    }
    // Only the leader drives the device; a failing driver does not make the
    // node unready (it still serves its clients).
    if let Some(driver) = node.device().driver_health() {
        body["driver"] = json!(driver);
    }
    if let Ok(Ok(nodes)) = tokio::time::timeout(Duration::from_millis(500), node.cluster()).await {
        body["nodes"] = json!(nodes);
    }
    AxumJson(body)
}

/// `GET /admin/websocket/stats`: cluster-wide figures from the node registry.
pub async fn stats(State(node): State<Node>) -> Result<AxumJson<Value>, ApiError> {
    let nodes = tokio::time::timeout(Duration::from_secs(3), node.cluster())
        .await
        .map_err(|_| ApiError::Unavailable("node registry did not answer in time".into()))?
        .map_err(|e| ApiError::Unavailable(format!("node registry unavailable: {e}")))?;
    let leader = nodes.iter().filter(|n| n.leader).max_by_key(|n| n.epoch);
    let (leader_id, epoch) = match leader {
        Some(l) => (json!(l.id), l.epoch),
        None => (
            Value::Null,
            nodes.iter().map(|n| n.epoch).max().unwrap_or(0),
        ),
    };
    Ok(envelope(json!({
        "enabled": node.config().websocket_enabled,
        "connectedClients": nodes.iter().map(|n| n.connected_clients).sum::<usize>(),
        "proxyConnections": nodes.iter().map(|n| n.proxy_connections).sum::<usize>(),
        "leader": leader_id,
        "epoch": epoch,
        "nodes": nodes.iter().map(|n| json!({
            "id": n.id,
            "leader": n.leader,
            "connectedClients": n.connected_clients,
            "proxyConnections": n.proxy_connections,
            "topics": n.topics,
            "subscriptions": n.subscriptions,
            "version": n.version,
            "startedAt": n.started_at,
        })).collect::<Vec<_>>(),
    })))
}

// === publish ===

#[derive(Deserialize)]
pub struct PublishBody {
    topic: String,
    #[serde(default)]
    event: Option<String>,
    data: Box<RawValue>,
}

/// `POST /api/publish`: 202 once the backplane accepted the publication.
pub async fn publish(
    State(node): State<Node>,
    Json(body): Json<PublishBody>,
) -> Result<Response, ApiError> {
    if !protocol::valid_topic(&body.topic) {
        return Err(ApiError::BadRequest(format!(
            "invalid topic \"{}\": must match {TOPIC_PATTERN}",
            body.topic.chars().take(140).collect::<String>()
        )));
    }
    if body.topic == crate::device::state::TOPIC {
        return Err(ApiError::BadRequest(
            "topic \"device\" carries device state: change it with /api/switch, /api/config, /api/carousel or /api/settings".into(),
        ));
    }
    if body.topic == crate::device::frame::TOPIC {
        return Err(ApiError::BadRequest(
            crate::device::frame::PUBLISH_REFUSAL.into(),
        ));
    }
    if protocol::json_depth_exceeds(body.data.get(), protocol::MAX_DATA_DEPTH) {
        return Err(ApiError::BadRequest(protocol::TOO_DEEP.into()));
    }
    let event = body.event.unwrap_or_else(|| body.topic.clone());
    if !protocol::valid_topic(&event) {
        return Err(ApiError::BadRequest(format!(
            "invalid event \"{}\": must match {TOPIC_PATTERN}",
            event.chars().take(140).collect::<String>()
        )));
    }
    let position = node
        .hub()
        .publish(&body.topic, &event, &body.data)
        .await
        .map_err(|e| match e {
            PublishError::Refused(why) => {
                ApiError::BadRequest(format!("publication not accepted: {why}"))
            }
            PublishError::Unavailable(why) => {
                ApiError::Unavailable(format!("publication not accepted: {why}"))
            }
        })?;
    let mut data = json!({"topic": body.topic, "event": event});
    if let Some(p) = position {
        data["offset"] = json!(p.offset);
        data["epoch"] = json!(&*p.epoch);
    }
    Ok((StatusCode::ACCEPTED, envelope(data)).into_response())
}

/// Whether the request's client token may read `topic` (as for subscribing):
/// a valid topic name, a valid token, and the topic allowed. A topic left
/// to the subscribe hook cannot be decided here (there is no connection to
/// ask about): `instead` says how to read it then.
fn may_read(
    node: &Node,
    headers: &HeaderMap,
    query: Option<&str>,
    topic: &str,
    instead: &str,
) -> Result<(), ApiError> {
    if !protocol::valid_topic(topic) {
        return Err(ApiError::BadRequest(format!(
            "invalid topic \"{}\": must match {TOPIC_PATTERN}",
            topic.chars().take(140).collect::<String>()
        )));
    }
    let token = crate::auth::token_from(headers, query);
    let identity = node
        .config()
        .auth
        .authenticate(token.as_deref())
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    match node.hooks().subscribe_access(&identity, topic) {
        crate::backend::Access::Allowed => Ok(()),
        crate::backend::Access::Forbidden => Err(ApiError::Forbidden(format!(
            "not allowed to read \"{topic}\""
        ))),
        crate::backend::Access::AskHook => Err(ApiError::Forbidden(format!(
            "\"{topic}\" is decided by the subscribe hook (PROXY_SUBSCRIBE_TOPICS): read {instead}"
        ))),
    }
}

/// `GET /api/history/{topic}?since=N&limit=M`: stored publications of a
/// history topic after offset `since` (default 0), at most `limit` (default
/// 100, at most `HISTORY_SIZE`). Needs read permission on the topic (a
/// client token, as for subscribing).
pub async fn history(
    State(node): State<Node>,
    PathText(topic): PathText,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<AxumJson<Value>, ApiError> {
    may_read(
        &node,
        &headers,
        query.as_deref(),
        &topic,
        "it through a subscription with `since`",
    )?;
    if !node.hub().is_history(&topic) {
        return Err(ApiError::NotFound(format!(
            "\"{topic}\" keeps no history (HISTORY_TOPICS)"
        )));
    }
    let mut since = 0u64;
    let mut limit = 100usize;
    for (key, value) in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match key {
            "since" => {
                since = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!("since={value} is not an offset (an integer ≥ 0)"))
                })?
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=node.hub().history_size()).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "limit={value} must be an integer from 1 to {} (HISTORY_SIZE)",
                            node.hub().history_size()
                        ))
                    })?
            }
            _ => {}
        }
    }
    let range = node
        .hub()
        .history()
        .read(&topic, since, limit)
        .await
        .map_err(|e| ApiError::Unavailable(format!("history unavailable: {e}")))?;
    let publications: Vec<Value> = range
        .entries
        .iter()
        .filter_map(|stored| {
            let env = protocol::parse_envelope(&stored.payload).ok()?;
            Some(json!({
                "offset": stored.offset,
                "event": env.event.unwrap_or_else(|| topic.clone()),
                "data": serde_json::from_str::<Value>(env.data.get()).ok()?,
            }))
        })
        .collect();
    Ok(envelope(json!({
        "topic": topic,
        "epoch": &*range.epoch,
        "offset": range.top,
        "publications": publications,
    })))
}

/// `GET /api/presence/{topic}` (who: client id → `{user, info}`) and
/// `GET /api/presence/{topic}/stats` (`clients`, `users`): read permission
/// on the topic as for history. A topic whose name ends in `/stats` is
/// read with `…/stats/stats` (its list: not available by REST).
pub async fn presence(
    State(node): State<Node>,
    PathText(path): PathText,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (topic, stats) = match path.strip_suffix("/stats") {
        Some(t) => (t.to_string(), true),
        None => (path, false),
    };
    may_read(
        &node,
        &headers,
        query.as_deref(),
        &topic,
        "its presence through a connection",
    )?;
    let failed = |e: crate::presence::PresenceError| match e {
        crate::presence::PresenceError::NotKept(_) => ApiError::NotFound(e.to_string()),
        crate::presence::PresenceError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
    };
    if stats {
        let s = node.presence().stats(&topic).await.map_err(failed)?;
        return Ok(
            envelope(json!({"topic": topic, "clients": s.clients, "users": s.users}))
                .into_response(),
        );
    }
    let list = node.presence().list(&topic).await.map_err(failed)?;
    let clients: Box<serde_json::value::RawValue> =
        serde_json::value::RawValue::from_string(crate::presence::clients_json(&list))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(envelope(json!({"topic": topic, "clients": clients})).into_response())
}

// === admin ===

/// `POST /admin/events/{name}`: publishes a configured mock event once.
pub async fn trigger_event(
    State(node): State<Node>,
    PathText(name): PathText,
) -> Result<Response, ApiError> {
    let Some(event) = node.mock_event(&name) else {
        return Err(ApiError::NotFound(format!(
            "no mock event named \"{}\" is configured",
            name.chars().take(140).collect::<String>()
        )));
    };
    node.hub()
        .publish(&event.name, &event.name, &event.data)
        .await
        .map_err(|e| ApiError::Unavailable(format!("publication not accepted: {e}")))?;
    Ok((StatusCode::ACCEPTED, envelope(json!({"event": event.name}))).into_response())
}

/// `GET /metrics` in Prometheus text format.
pub async fn metrics(State(node): State<Node>) -> Response {
    match node.metrics() {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => {
            ApiError::NotFound("metrics are not enabled in this process".into()).into_response()
        }
    }
}

// === endpoint tokens ===

/// `API_TOKEN` on commands and publishing, when configured.
pub async fn require_api_token(
    State(node): State<Node>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    check_token(node.config().api_token.as_ref(), "API", req, next).await
}

/// `ADMIN_TOKEN` on `/admin/*`, when configured.
pub async fn require_admin_token(
    State(node): State<Node>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    check_token(node.config().admin_token.as_ref(), "admin", req, next).await
}

async fn check_token(
    expected: Option<&crate::auth::Secret>,
    kind: &str,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(expected) = expected {
        let ok = crate::auth::bearer(req.headers()).is_some_and(|t| expected.matches(&t));
        if !ok {
            return ApiError::Unauthorized(format!(
                "this endpoint needs the {kind} token as Authorization: Bearer <token>"
            ))
            .into_response();
        }
    }
    next.run(req).await
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// A known path with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("this endpoint does not take that method".into())
}

// === device ===

use crate::device::CommandError;

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Invalid(m) => ApiError::BadRequest(m),
            CommandError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

/// Validates on this node, has the leader apply it, answers with the state
/// after it was persisted.
async fn device_command(node: &Node, kind: &str, body: &Value) -> Result<Response, ApiError> {
    let command = node.device().parse(kind, body)?;
    let state = node.device().submit(command).await?;
    Ok(envelope(state.to_json()).into_response())
}

/// `POST /api/switch {"app"}`
pub async fn switch(
    State(node): State<Node>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    device_command(&node, "switch", &body).await
}

/// `POST /api/config {"app"?, "config"}`
pub async fn config(
    State(node): State<Node>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    device_command(&node, "config", &body).await
}

/// `POST /api/carousel {"enabled", "apps"}`
pub async fn carousel(
    State(node): State<Node>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    device_command(&node, "carousel", &body).await
}

/// `POST /api/settings {"brightness"}`
pub async fn settings(
    State(node): State<Node>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    device_command(&node, "settings", &body).await
}

/// `GET /api/state`: this node's cached copy; no Redis round trip.
pub async fn state(State(node): State<Node>) -> AxumJson<Value> {
    let mut data = node.device().state().to_json();
    if let Some(driver) = node.device().driver_health() {
        data["driver"] = json!(driver);
    }
    envelope(data)
}

/// `GET /api/apps`
pub async fn apps(State(node): State<Node>) -> AxumJson<Value> {
    envelope(node.device().state().event("apps_list"))
}

// === control ===

/// `POST /api/subscribe` and `/api/unsubscribe`: `{"client"|"user", "topic"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlTopicBody {
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    user: Option<String>,
    topic: String,
}

/// `POST /api/disconnect`: `{"client"|"user", "code": 4000..4999, "reason"?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlDisconnectBody {
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    user: Option<String>,
    code: u16,
    #[serde(default)]
    reason: Option<String>,
}

/// Exactly one of `client` and `user`, neither empty.
fn control_target(
    client: Option<String>,
    user: Option<String>,
) -> Result<crate::clients::Target, ApiError> {
    use crate::clients::Target;
    match (client, user) {
        (Some(c), None) if !c.is_empty() && c.len() <= 128 => Ok(Target::Client(c)),
        (None, Some(u)) if !u.is_empty() && u.len() <= 1024 => Ok(Target::User(u)),
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give either \"client\" or \"user\", not both".into(),
        )),
        (None, None) => Err(ApiError::BadRequest(
            "give the connection as \"client\": \"<client id>\" or every connection of a user as \"user\": \"<user>\"".into(),
        )),
        (Some(_), None) => Err(ApiError::BadRequest(
            "\"client\" must be a client id (1 to 128 characters)".into(),
        )),
        (None, Some(_)) => Err(ApiError::BadRequest(
            "\"user\" must be a user id (1 to 1024 characters)".into(),
        )),
    }
}

fn control_topic(topic: &str) -> Result<(), ApiError> {
    if protocol::valid_topic(topic) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid topic \"{}\": must match {TOPIC_PATTERN}",
            topic.chars().take(140).collect::<String>()
        )))
    }
}

async fn run_control(
    node: &Node,
    target: crate::clients::Target,
    command: crate::clients::Command,
) -> Result<Response, ApiError> {
    let reached = node
        .control()
        .run(target, command)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let mut data = json!({"reached": reached.reached});
    if reached.busy > 0 {
        data["busy"] = json!(reached.busy);
    }
    if !reached.unanswered.is_empty() {
        data["unanswered"] = json!(reached.unanswered);
    }
    if reached.nodes_unknown {
        data["nodesUnknown"] = json!(true);
    }
    Ok(envelope(data).into_response())
}

/// `POST /api/subscribe`: a server-side subscription of a connection, or of
/// every connection of a user, on whichever nodes hold them.
pub async fn control_subscribe(
    State(node): State<Node>,
    Json(body): Json<ControlTopicBody>,
) -> Result<Response, ApiError> {
    let target = control_target(body.client, body.user)?;
    control_topic(&body.topic)?;
    let command = crate::clients::Command::Subscribe {
        topic: body.topic.into(),
    };
    run_control(&node, target, command).await
}

/// `POST /api/unsubscribe`: ends those subscriptions (`reason: "server"`).
pub async fn control_unsubscribe(
    State(node): State<Node>,
    Json(body): Json<ControlTopicBody>,
) -> Result<Response, ApiError> {
    let target = control_target(body.client, body.user)?;
    control_topic(&body.topic)?;
    let command = crate::clients::Command::Unsubscribe {
        topic: body.topic.into(),
    };
    run_control(&node, target, command).await
}

/// `POST /api/disconnect`: closes the connection(s) with `code`.
pub async fn control_disconnect(
    State(node): State<Node>,
    Json(body): Json<ControlDisconnectBody>,
) -> Result<Response, ApiError> {
    let target = control_target(body.client, body.user)?;
    if !(4000..=4999).contains(&body.code) {
        return Err(ApiError::BadRequest(format!(
            "code {} is not valid: use 4000-4499 (the client should reconnect) or 4500-4999 (it should not)",
            body.code
        )));
    }
    let reason = body.reason.unwrap_or_default();
    if reason.len() > 123 {
        return Err(ApiError::BadRequest(
            "reason is longer than the 123 bytes a WebSocket Close frame can carry".into(),
        ));
    }
    let command = crate::clients::Command::Disconnect {
        code: body.code,
        reason: reason.into(),
    };
    run_control(&node, target, command).await
}
