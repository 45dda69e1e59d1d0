//! Client-facing transports. Each is a way into the hub; none fans out by
//! itself.

pub mod admission;
pub mod engineio;
pub mod ingress;
pub mod outbox;
pub mod polling;
pub mod recovery;
pub mod sio;
pub mod sse;
pub mod sse_conn;
pub mod ws;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::Origins;
use crate::hub::HubError;
use crate::node::Node;

/// What a native or SSE client is told when the hub refuses its
/// subscription to `topic`: the error's text and code. A node at
/// `MAX_TOPICS_PER_NODE` says so (`topic_limit`: retrying soon will not
/// help); anything else is Redis being away (`unavailable`: retry), logged
/// here since the client's answer does not carry the cause.
pub fn subscribe_refused(topic: &str, err: &HubError) -> (String, &'static str) {
    let text = match err {
        HubError::TopicLimit(_) => format!("could not subscribe to \"{topic}\": {err}"),
        HubError::Backplane(_) | HubError::History(_) => {
            tracing::warn!(topic, cause = %err, "subscribe failed");
            format!("could not subscribe to \"{topic}\": the backplane is unavailable, try again")
        }
    };
    (text, err.code())
}

/// Refuses WebSocket and Socket.IO handshakes whose `Origin` is not on
/// `CORS_ALLOWED_ORIGINS` (403). CORS headers do not protect WebSockets, so
/// this check is the only thing that stops a foreign page from connecting
/// with the user's cookies. A request without `Origin` comes from a
/// non-browser client and passes unless `ORIGIN_ALLOW_MISSING=false`.
pub async fn check_origin(State(node): State<Node>, req: Request, next: Next) -> Response {
    match origin_refused(&node, &req) {
        Some(refusal) => refusal,
        None => next.run(req).await,
    }
}

/// The 403 answer when `req`'s `Origin` is not allowed.
fn origin_refused(node: &Node, req: &Request) -> Option<Response> {
    let config = node.config();
    if let Origins::List(_) = &config.cors_allowed_origins {
        let verdict = match req.headers().get(header::ORIGIN) {
            None => config
                .origin_allow_missing
                .then_some(())
                .ok_or("missing Origin header"),
            Some(origin) => match origin.to_str() {
                Ok(o) if config.cors_allowed_origins.allows(o.trim_end_matches('/')) => Ok(()),
                _ => Err("Origin is not allowed"),
            },
        };
        if let Err(why) = verdict {
            return Some(
                (
                    StatusCode::FORBIDDEN,
                    axum::Json(json!({"success": false, "error": why, "code": "forbidden_origin"})),
                )
                    .into_response(),
            );
        }
    }
    None
}

/// Socket.IO at `/socket.io/` (our Engine.IO server, `engineio.rs`), in
/// front of the router: its long-polls stay open longer than the HTTP
/// request timeout allows. [`check_origin`] applies to every request of it.
pub async fn socketio_guard(State(node): State<Node>, req: Request, next: Next) -> Response {
    if req.uri().path().trim_end_matches('/') != "/socket.io" {
        return next.run(req).await;
    }
    if let Some(refusal) = origin_refused(&node, &req) {
        return refusal;
    }
    engineio::serve(node, req).await
}
