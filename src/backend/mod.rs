//! The application back end: what Switchboard asks it (`hooks`: connect,
//! subscribe, publish and RPC calls over HTTP, each bounded by
//! `PROXY_TIMEOUT_MS` and `PROXY_MAX_INFLIGHT`). This module knows no
//! transport: the gateways turn its answers into frames, events and close
//! codes. See `docs/backend.md`.

pub mod hooks;

pub use hooks::{Access, Caller, Denial, HookError, Hooks};
