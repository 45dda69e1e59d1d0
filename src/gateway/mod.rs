//! Client-facing transports. Each is a way into the hub; none fans out by
//! itself.

pub mod admission;
pub mod engineio;
pub mod outbox;
pub mod sio;
pub mod socketio;
pub mod ws;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::Origins;
use crate::node::Node;

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

/// In front of the Socket.IO layer (which wraps the whole router rather
/// than being a route): [`check_origin`], and request headers copied out of
/// hyper's connection read buffer. socketioxide keeps each socket's
/// handshake headers for its whole life, and header values are slices of
/// that 16 KiB buffer, so without the copy every socket pins one.
pub async fn socketio_guard(State(node): State<Node>, mut req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/socket.io") {
        return next.run(req).await;
    }
    for value in req.headers_mut().values_mut() {
        if let Ok(owned) = axum::http::HeaderValue::from_bytes(value.as_bytes()) {
            *value = owned;
        }
    }
    if let Ok(uri) = req.uri().to_string().parse() {
        *req.uri_mut() = uri;
    }
    if let Some(refusal) = origin_refused(&node, &req) {
        return refusal;
    }
    // Sockets that open on the websocket transport are ours (engineio.rs);
    // long-polling and upgrades from it go to socketioxide.
    if engineio::opens_websocket(&req) {
        return engineio::upgrade(node, req).await;
    }
    next.run(req).await
}
