//! The SMTP wire, shared by both daemons and importing nothing of theirs:
//! command grammar and DATA framing (the relay's ingress), reply grammar and
//! the one reply reader (the relay's delivery client and the balancer's
//! health probe), the plain-or-TLS stream, and the delivery client.
pub mod client;
pub mod command;
pub mod data;
pub mod reply;
pub mod stream;

pub use reply::{EnhancedCode, Reply};
