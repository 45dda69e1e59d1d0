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
/// When a hook call was made (Unix ms), covered by its signature: a webhook
/// batch carries its time in the body (`timeMs`), a hook body has none.
pub const TIMESTAMP_HEADER: &str = "X-Switchboard-Timestamp";

/// `sha256=<hex HMAC-SHA256 of body with secret>`, the signature header's value.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    mac(secret, &[body])
}

/// A hook call's signature: over `<timestamp>.<body>`, so that a recorded
/// call cannot be sent again later with a new time.
pub fn timed_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    mac(secret, &[timestamp.as_bytes(), b".", body])
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_signature_covers_its_timestamp_and_body() {
        let signed = timed_signature(b"key", "1795312380000", b"{}");
        assert_eq!(signed, signature(b"key", b"1795312380000.{}"));
        assert_ne!(signed, timed_signature(b"key", "1795312380001", b"{}"));
    }
}
