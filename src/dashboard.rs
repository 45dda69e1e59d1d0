//! The live dashboard served by every node at `/`, and `GET /api/frame`.
//!
//! The page, its script, style sheet and icon, and the official JavaScript
//! client (`clients/js/switchboard.js`) are compiled into the binary: the page
//! works offline and never asks anything of another host. The strict
//! `Content-Security-Policy` on the page says so to the browser too.
//! `DASHBOARD_ENABLED=false` removes every route here except `/api/frame`,
//! which is part of the REST API.

use axum::Json as AxumJson;
use axum::Router;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::api::envelope;
use crate::device::frame::{HEIGHT, WIDTH};
use crate::device::render;
use crate::node::Node;

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const STYLE_CSS: &str = include_str!("../dashboard/style.css");
const FAVICON_SVG: &str = include_str!("../dashboard/favicon.svg");
const CLIENT_JS: &str = include_str!("../clients/js/switchboard.js");

/// Only this node: scripts, styles, images, fetches and WebSockets.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page and its assets (mounted only when `DASHBOARD_ENABLED`).
pub fn routes() -> Router<Node> {
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route(
            "/assets/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/assets/switchboard.js",
            get(|| asset("text/javascript; charset=utf-8", CLIENT_JS)),
        )
        .route(
            "/assets/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE_CSS)),
        )
        .route(
            "/assets/favicon.svg",
            get(|| asset("image/svg+xml", FAVICON_SVG)),
        )
        // Browsers that ignore `<link rel=icon>` still ask for this.
        .route("/favicon.ico", get(|| asset("image/svg+xml", FAVICON_SVG)))
        .route("/api/dashboard", get(settings))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, content_type),
            // Assets change with the binary; a restart must not show stale code.
            (CACHE_CONTROL, "no-cache"),
            (CONTENT_SECURITY_POLICY, CSP),
        ],
        body,
    )
        .into_response()
}

/// `GET /api/dashboard`: what the page needs to know before connecting:
/// where the WebSocket endpoint is and which tokens it must ask for.
async fn settings(State(node): State<Node>) -> AxumJson<Value> {
    let config = node.config();
    envelope(json!({
        "node": config.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "websocketPath": config.websocket_enabled.then_some(&config.websocket_path),
        "clientToken": config.auth.enabled(),
        "apiToken": config.api_token.is_some(),
        "adminToken": config.admin_token.is_some(),
        "adminOnThisPort": config.admin_port.is_none(),
        // Topics whose inspector entry shows who is there (`PRESENCE_TOPICS`).
        "presenceTopics": config.presence.topics.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
    }))
}

/// `GET /api/frame`: the board for this node's copy of the device state, in
/// the current frame slot (the frame the leader sends in that slot, from any
/// node). `pixels` is the RGB bytes row by row, as hex (`WIDTH * HEIGHT * 6`
/// characters); `t` the slot's start in Unix milliseconds.
pub async fn frame(State(node): State<Node>) -> AxumJson<Value> {
    let state = node.device().state();
    let t = render::frame_time(render::now_ms(), node.config().device_fps);
    let frame = render::render(&state, t);
    envelope(json!({
        "width": WIDTH,
        "height": HEIGHT,
        "app": state.current_app,
        "brightness": state.settings.brightness,
        "epoch": state.epoch,
        "t": t,
        "litPixels": frame.lit(),
        "pixels": frame.hex(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_self_contained() {
        // No request of the page may leave the node.
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for needle in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(needle), "{name} mentions {needle}");
            }
        }
    }
}
