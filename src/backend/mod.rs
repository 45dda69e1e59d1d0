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
