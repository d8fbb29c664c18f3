//! Test harnesses for smtp-lb, shared by the test suites and by `cargo xtask`.
//!
//! # Layout
//! - [`lab`]: a topology of network namespaces, veth pairs and a bridge that
//!   tears itself down (on drop, on panic, and after a killed run).
//! - [`load`]: SMTP load from inside a lab host, per-session outcomes.
//! - [`xdp`]: loads the real eBPF object and runs it on crafted packets
//!   through `BPF_PROG_TEST_RUN`.
//! - [`packet`]: a small packet builder (Ethernet, 802.1Q, IPv4, IPv6, TCP, UDP).
//! - [`scenario`]: the lab story `cargo xtask lab` prints and tests assert on.
//! - [`topology`]: the standard L2 DSR lab (client, LB, relays with sinks).
//! - [`monitoring`]: that lab with `smtp-lb relay`s, ISPs and a real Prometheus.
//! - [`env`]: where the built artifacts are (set by `cargo xtask`).
//! - [`relay`], [`sink`], [`smtp`], [`dns`], [`postfix`], [`redis`], [`tmp`]: the
//!   relay under test and its real peers (smtp-sink, swaks, Postfix, dnsmasq, Redis).
//! - [`dkimpy`]: python dkimpy as the independent DKIM verifier.
//!
//! Suites live in `tests/`: `loopback_*` need real peers on 127.0.0.1 but no
//! privileges; `privileged_*` need root (namespaces, XDP, bpffs).
//! Helpers panic rather than return errors: a test failure should point at
//! the line that failed.

pub mod dkimpy;
pub mod dns;
pub mod env;
pub mod lab;
pub mod load;
pub mod monitoring;
pub mod packet;
pub mod postfix;
pub mod redis;
pub mod relay;
pub mod scenario;
pub mod shaping_sink;
pub mod sink;
pub mod smtp;
pub mod tmp;
pub mod topology;
pub mod xdp;
