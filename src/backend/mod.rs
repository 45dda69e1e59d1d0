//! The application back end: what Switchboard tells it (signed webhooks).
//!
//! Knows no transport: the gateway and the control module hand it events.

pub mod webhooks;
