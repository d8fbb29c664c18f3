//! smtp-lb: SMTP load balancing for outbound email.
//!
//! # Layout
//! - [`dataplane`]: the only module that talks to the kernel (aya): load,
//!   attach, pin, read and write maps of the XDP balancer.
//! - [`cli`]: the `smtp-lb` command line (subcommands and their options).
//! - [`relay`]: the delivery engine (SMTP ingress, spool, queues, delivery).
//!
//! The binary in `main.rs` only parses arguments, sets up tracing and calls
//! into this library.

pub mod cli;
pub mod dataplane;
pub mod relay;
