//! What the native WebSocket gateway and the proxy share before and at an
//! upgrade: who is admitted, and the read buffer size. Both depend on this
//! module; neither depends on the other for it.

use axum::http::HeaderMap;

use crate::api::ApiError;
use crate::auth::{self, Identity};
use crate::node::Node;

/// tungstenite read buffer size. Every idle connection keeps its read
/// buffer allocated (CRATE-NOTES: ~5 KiB RSS at 4 KiB, ~2 KiB at 1 KiB), and
/// clients send little, so reads use 1 KiB chunks; a large frame only takes
/// more reads.
pub const READ_BUFFER: usize = 1024;

/// Checks the drain, the connection limit and the client's token before an
/// upgrade.
pub fn admit(node: &Node, headers: &HeaderMap, query: Option<&str>) -> Result<Identity, ApiError> {
    if node.is_draining() {
        return Err(ApiError::Unavailable("node is shutting down".into()));
    }
    if let Some(max) = node.config().max_connections
        && node.total_connections() >= max
    {
        return Err(ApiError::Unavailable(format!(
            "this node is at its limit of {max} connections; try another node or later"
        )));
    }
    let token = auth::token_from(headers, query);
    node.config()
        .auth
        .authenticate(token.as_deref())
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
}
