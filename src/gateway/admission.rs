//! What the native WebSocket gateway, Socket.IO, SSE and the proxy share before
//! and at an upgrade: who is admitted, and the read buffer size. All depend
//! on this module; none depends on another for it.

use std::net::SocketAddr;

use axum::http::HeaderMap;
use serde_json::value::RawValue;

use crate::api::ApiError;
use crate::auth::Identity;
use crate::backend::hooks::Hello;
use crate::backend::{Denial, HookError};
use crate::limits::{LimitError, Seat};
use crate::node::Node;
use crate::protocol;

/// tungstenite read buffer size. Every idle connection keeps its read
/// buffer allocated (CRATE-NOTES: ~5 KiB RSS at 4 KiB, ~2 KiB at 1 KiB), and
/// clients send little, so reads use 1 KiB chunks; a large frame only takes
/// more reads.
pub const READ_BUFFER: usize = 1024;

/// A connection's places under the connection limits: `MAX_CONNECTIONS`,
/// `MAX_CONNECTIONS_PER_ADDRESS` and `MAX_CONNECTIONS_PER_USER`, held for
/// its whole life and given back when dropped. Every transport takes them
/// at admission: [`Seats::admit`] first (cheap, before a token check or a
/// connect hook call), then [`Seats::user`] once the user is known.
#[derive(Debug, Default)]
pub struct Seats {
    _node: Option<Seat>,
    _address: Option<Seat>,
    _user: Option<Seat>,
}

impl Seats {
    /// The drain, then a place on the node (`MAX_CONNECTIONS`), then one
    /// for the client address of a request that came from `remote` with
    /// `headers` (`X-Forwarded-For` believed only from `TRUSTED_PROXIES`).
    /// A draining or full node refuses with 503 before anything else is
    /// checked; an address at its limit with 429.
    pub fn admit(
        node: &Node,
        remote: Option<SocketAddr>,
        headers: &HeaderMap,
    ) -> Result<Seats, ApiError> {
        if node.is_draining() {
            return Err(ApiError::Unavailable("node is shutting down".into()));
        }
        let limits = node.limits();
        let seat = limits.node_seat()?;
        let address = limits.client_address(remote, headers);
        Ok(Seats {
            _node: seat,
            _address: limits.address_seat(address)?,
            _user: None,
        })
    }

    /// Adds the seat of `identity`'s user (anonymous: none). Refused with
    /// 429; the text is the client's error.
    pub fn user(&mut self, node: &Node, identity: &Identity) -> Result<(), LimitError> {
        self._user = node.limits().user_seat(identity.user())?;
        Ok(())
    }
}

/// Why a client was not admitted; each transport words it its own way
/// (native: an HTTP status before the upgrade; Socket.IO: `connect_error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A bad or missing token, or the connect hook's `error` (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The connect hook's `disconnect` (403).
    #[error("{0}")]
    Forbidden(String),
    /// The connect hook could not decide (503: try again).
    #[error("{0}")]
    Unavailable(String),
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Unauthorized(m) => ApiError::Unauthorized(m),
            Refusal::Forbidden(m) => ApiError::Forbidden(m),
            Refusal::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

/// A connection limit at a handshake: per address or per user 429, the
/// node's 503 (another node may have room); the text is the client's error.
impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::Node(_) => ApiError::Unavailable(e.to_string()),
            _ => ApiError::TooManyRequests(e.to_string()),
        }
    }
}

/// A topic of a handshake (`/ws/{topic}`, an SSE stream's) the identity or
/// the subscribe hook refused: 403, or 503 when the hook could not decide.
impl From<Denial> for ApiError {
    fn from(denial: Denial) -> Self {
        match denial {
            Denial::Forbidden(why) | Denial::Disconnect { reason: why, .. } => {
                ApiError::Forbidden(why)
            }
            Denial::Unavailable(why) => ApiError::Unavailable(why),
        }
    }
}

/// Who a new client connection is: a client with a token (when tokens are
/// on) is checked as always; any other asks the connect hook when
/// `PROXY_CONNECT_URL` is set, and gets the identity its answer describes.
pub async fn identify(
    node: &Node,
    token: Option<&str>,
    hello: Hello<'_>,
) -> Result<Identity, Refusal> {
    let auth = &node.config().auth;
    if node.hooks().connect_enabled() && auth.wants_hook(token) {
        let grant = node.hooks().connect(hello).await.map_err(|e| match e {
            HookError::Refused { message, .. } => Refusal::Unauthorized(message),
            HookError::Disconnect { reason, .. } => Refusal::Forbidden(reason),
            HookError::Unavailable(why) => Refusal::Unavailable(why),
        })?;
        return auth
            .from_hook(grant)
            .map_err(|e| Refusal::Unauthorized(e.to_string()));
    }
    auth.authenticate(token)
        .map_err(|e| Refusal::Unauthorized(e.to_string()))
}

/// Where a handshake comes from, for [`identify_request`].
pub struct Origin<'a> {
    /// The connection's client id, as the hooks will know it.
    pub client: &'a str,
    /// `transport` of the connect hook's request.
    pub transport: &'static str,
    pub remote: Option<SocketAddr>,
    /// The proxy route asked for; `None` elsewhere.
    pub route: Option<&'a str>,
}

/// [`identify`] for an HTTP handshake (native WebSocket, SSE, the proxy):
/// the token from the query or `Authorization`, else the connect hook with
/// the request's headers and `?data=` (read, and refused with 400 when it
/// is not JSON, only when the hook is asked).
pub async fn identify_request(
    node: &Node,
    headers: &HeaderMap,
    query: Option<&str>,
    origin: Origin<'_>,
) -> Result<Identity, ApiError> {
    let token = crate::auth::token_from(headers, query);
    let asks_hook =
        node.hooks().connect_enabled() && node.config().auth.wants_hook(token.as_deref());
    let data = if asks_hook {
        connect_data(query).map_err(ApiError::BadRequest)?
    } else {
        None
    };
    let hello = Hello {
        client: origin.client,
        transport: origin.transport,
        remote: origin.remote,
        headers,
        data: data.as_deref(),
        route: origin.route,
    };
    Ok(identify(node, token.as_deref(), hello).await?)
}

/// The client's address, from the accept loop (absent for routers served
/// without `lib::serve`, such as in-process tests).
pub fn remote_addr(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// The native handshake's connect data: `?data=<URL-encoded JSON>`.
pub fn connect_data(query: Option<&str>) -> Result<Option<Box<RawValue>>, String> {
    let Some(raw) = query.and_then(|q| query_value(q, "data")) else {
        return Ok(None);
    };
    let bad = |why: &str| format!("the data query parameter must be URL-encoded JSON: {why}");
    let text = percent_decode(raw).ok_or_else(|| bad("invalid %-escape or not UTF-8"))?;
    if protocol::json_depth_exceeds(&text, protocol::MAX_DATA_DEPTH) {
        return Err(bad(protocol::TOO_DEEP));
    }
    let value: Box<RawValue> = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    Ok(Some(value))
}

/// The raw (still encoded) value of `name` in a query string.
pub(crate) fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// Decodes `%XX` escapes and `+` (a space in query strings).
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_data_from_the_query() {
        assert!(connect_data(None).unwrap().is_none());
        assert!(connect_data(Some("token=x")).unwrap().is_none());
        let d = connect_data(Some("token=x&data=%7B%22room%22%3A%22a+b%22%7D"))
            .unwrap()
            .unwrap();
        assert_eq!(d.get(), r#"{"room":"a b"}"#);
        assert_eq!(connect_data(Some("data=42")).unwrap().unwrap().get(), "42");
        for bad in ["data=%7B", "data=%ZZ", "data=%E2%28", "data="] {
            let err = connect_data(Some(bad)).unwrap_err();
            assert!(err.contains("must be URL-encoded JSON"), "{bad}: {err}");
        }
        // `metadata=` is not `data=`.
        assert!(connect_data(Some("metadata=1")).unwrap().is_none());
    }
}
