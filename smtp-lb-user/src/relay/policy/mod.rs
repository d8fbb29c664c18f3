//! Delivery policy: how fast and how much each provider may be sent, and
//! what its replies mean. Built bottom up: [`throttle`] (rates, GCRA) and
//! [`provider`] (MX hosts → providers) are leaves; [`cluster`] shares
//! limits through Redis; [`limiter`] gives local-or-shared limiters;
//! [`rules`] reads replies; [`shaping`] ties them into per-provider and
//! per-(source, provider) shapers.
pub mod cluster;
pub mod limiter;
pub mod provider;
pub mod rules;
pub mod shaping;
pub mod throttle;
