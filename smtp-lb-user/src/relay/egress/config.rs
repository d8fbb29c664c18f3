//! `[egress]` in the relay config (see the module docs of [`super`]).
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

/// `[egress]` in the relay config.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Pool of messages no `[[egress.select]]` matches.
    pub default_pool: String,
    /// Header naming the tenant, for `tenant` selectors.
    #[serde(default)]
    pub tenant_header: Option<String>,
    /// Length of one warmup day (an hour is 1/24 of it).
    #[serde(default = "EgressConfig::default_day", with = "humantime_serde")]
    pub warmup_day: Duration,
    /// How long a source whose address is not on this host stays out of its pools.
    #[serde(default = "EgressConfig::default_recheck", with = "humantime_serde")]
    pub unplumbed_recheck: Duration,
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    #[serde(default, rename = "select")]
    pub selects: Vec<SelectConfig>,
    /// Warmup schedule per provider (`default` for the rest).
    #[serde(default)]
    pub warmup: BTreeMap<String, WarmupSchedule>,
}

impl EgressConfig {
    fn default_day() -> Duration {
        Duration::from_hours(24)
    }
    pub(super) fn default_recheck() -> Duration {
        Duration::from_mins(1)
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub address: IpAddr,
    /// `EHLO` name; defaults to `delivery.helo_name`, then `hostname`.
    #[serde(default)]
    pub helo: Option<String>,
    /// First day of warmup: `YYYY-MM-DD` (UTC) or `now` (relay start).
    #[serde(default)]
    pub warmup_start: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub sources: Vec<PoolMember>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub name: String,
    #[serde(default = "PoolMember::default_weight")]
    pub weight: u32,
}

impl PoolMember {
    fn default_weight() -> u32 {
        1
    }
}

/// Exactly one of `sender`, `sender_domain`, `tenant`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub sender_domain: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    pub pool: String,
}

/// Caps on warmup day `k` (0 = the day of `warmup_start`) are `daily[k]`
/// and `hourly[k]`; past the end of `daily` the source is warm.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupSchedule {
    pub daily: Vec<u64>,
    #[serde(default)]
    pub hourly: Vec<u64>,
    #[serde(default)]
    pub overflow: Overflow,
}

/// What happens to a message over a cold source's cap.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Another source of the pool with room takes it.
    #[default]
    Spill,
    /// It waits for the next hour or day of the same source.
    Wait,
}
