//! The application back end: what Switchboard asks it (`hooks`: connect,
//! subscribe, publish and RPC calls over HTTP, each bounded by
//! `PROXY_TIMEOUT_MS` and `PROXY_MAX_INFLIGHT`) and what it tells it
//! (`webhooks`: signed, batched, retried event deliveries). This module
//! knows no transport: the gateways turn its answers into frames, events
//! and close codes, and the gateway and the control module hand it events.
//! See `docs/backend.md`.

pub mod hooks;
pub mod webhooks;

pub use hooks::{Access, Caller, Denial, HookError, Hooks};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header that signs a request to the back end: a webhook batch with
/// `WEBHOOK_SECRET`, a hook call with `PROXY_SECRET`.
pub const SIGNATURE_HEADER: &str = "X-Switchboard-Signature";
/// The sending node's id, for the receiver's logs.
pub const NODE_HEADER: &str = "X-Switchboard-Node";

/// `sha256=<hex HMAC-SHA256 of body with secret>`, the signature header's value.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
