//! The infrastructure both daemons share for talking to operators: one HTTP
//! server (admin APIs with a bearer token, metrics listeners without), one
//! HTTP client (`ctl`, tests), one Prometheus exposition.

pub mod client;
pub mod http;
pub mod monitor;
pub mod prom;
pub mod scrape;
