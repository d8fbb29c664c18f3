//! Admin endpoints: a small HTTP/1.1 layer on loopback (bearer token) that
//! the daemons serve and `smtp-lb ctl` calls, and Prometheus text output.

pub mod http;
pub mod prom;
