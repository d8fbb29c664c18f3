//! The weights the daemon programs: the configured weight of each relay,
//! times its warmup share, zero when it is drained or down. Pure.
//!
//! Zero keeps the relay in the data plane (its tracked flows finish) but
//! gives it no Maglev slot, so no new connection reaches it.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::warmup::{self, WarmupConfig};
use crate::{config::lb::LbConfig, health::Health};

/// A warmup ramp in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ramp {
    /// When it started (seconds since the Unix epoch).
    pub started_unix: u64,
    /// How long it lasts.
    pub length_secs: u64,
}

impl Ramp {
    pub fn starting(now: SystemTime, length: Duration) -> Self {
        Self {
            started_unix: unix(now),
            length_secs: length.as_secs(),
        }
    }

    /// Share of full weight at `now`, in thousandths.
    pub fn share(&self, now: SystemTime, cfg: &WarmupConfig) -> u32 {
        let age = Duration::from_secs(unix(now).saturating_sub(self.started_unix));
        warmup::share_permille(age, Duration::from_secs(self.length_secs), cfg)
    }
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the daemon knows about a relay beyond its configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub health: Health,
    /// The reputation ramp: starts the first time the relay comes up.
    pub ramp: Option<Ramp>,
    /// The slow start after a health failure (shorter; the smaller share wins).
    #[serde(default)]
    pub rejoin: Option<Ramp>,
    /// The relay has not been up since it was added: its first `up` starts
    /// the reputation ramp.
    #[serde(default)]
    pub never_up: bool,
    /// Operator's drain: no new flows.
    pub drained: bool,
    /// Operator's weight, replacing the configured one until the next reload
    /// that changes this relay's configured weight.
    pub weight_override: Option<u32>,
}

impl Runtime {
    /// The multiplier for this relay's configured weight, in thousandths.
    pub fn share(&self, now: SystemTime, cfg: &WarmupConfig) -> u32 {
        if self.drained || self.health == Health::Down {
            return 0;
        }
        let ramp = self.ramp.map_or(warmup::FULL, |r| r.share(now, cfg));
        let rejoin = self.rejoin.map_or(warmup::FULL, |r| r.share(now, cfg));
        ramp.min(rejoin)
    }

    /// A relay just added to the configuration: down until it passes its
    /// checks, then ramping.
    pub fn added() -> Self {
        Self {
            health: Health::Down,
            ramp: None,
            rejoin: None,
            never_up: true,
            drained: false,
            weight_override: None,
        }
    }

    /// Marks the relay up at `now` and starts the ramp that applies.
    pub fn came_up(&mut self, now: SystemTime, cfg: &WarmupConfig) {
        self.health = Health::Up;
        if std::mem::take(&mut self.never_up) {
            self.ramp = (!cfg.duration.is_zero()).then(|| Ramp::starting(now, cfg.duration));
        } else {
            self.rejoin = (!cfg.rejoin.is_zero()).then(|| Ramp::starting(now, cfg.rejoin));
        }
    }
}

/// `cfg` with every backend's weight replaced by its effective weight
/// (configured or overridden weight × share in thousandths). A relay
/// missing from `runtime` keeps its full weight.
pub fn effective(
    cfg: &LbConfig,
    runtime: &BTreeMap<IpAddr, Runtime>,
    warmup: &WarmupConfig,
    now: SystemTime,
) -> LbConfig {
    let mut out = cfg.clone();
    for svc in &mut out.services {
        for b in &mut svc.backends {
            let (base, share) = match runtime.get(&b.address) {
                Some(rt) => (
                    rt.weight_override.unwrap_or(b.weight),
                    rt.share(now, warmup),
                ),
                None => (b.weight, warmup::FULL),
            };
            b.weight = base.saturating_mul(share);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        [[services]]
        vip = "203.0.113.10"
        ports = [25]
        [[services.backends]]
        name = "relay1"
        address = "198.51.100.3"
        mac = "02:00:00:00:00:03"
        weight = 2
        [[services.backends]]
        name = "relay2"
        address = "198.51.100.4"
        mac = "02:00:00:00:00:04"
    "#;

    fn up() -> Runtime {
        Runtime {
            health: Health::Up,
            ramp: None,
            rejoin: None,
            never_up: false,
            drained: false,
            weight_override: None,
        }
    }

    fn weights(cfg: &LbConfig) -> Vec<u32> {
        cfg.services[0].backends.iter().map(|b| b.weight).collect()
    }

    #[test]
    fn healthy_relays_keep_their_proportions() {
        let cfg = LbConfig::parse(CONFIG).unwrap();
        let rt = BTreeMap::from([
            ("198.51.100.3".parse().unwrap(), up()),
            ("198.51.100.4".parse().unwrap(), up()),
        ]);
        assert_eq!(
            weights(&effective(
                &cfg,
                &rt,
                &WarmupConfig::default(),
                SystemTime::now()
            )),
            [2000, 1000]
        );
    }

    #[test]
    fn down_or_drained_relays_get_weight_zero() {
        let cfg = LbConfig::parse(CONFIG).unwrap();
        let mut down = up();
        down.health = Health::Down;
        let mut drained = up();
        drained.drained = true;
        let rt = BTreeMap::from([
            ("198.51.100.3".parse().unwrap(), down),
            ("198.51.100.4".parse().unwrap(), drained),
        ]);
        assert_eq!(
            weights(&effective(
                &cfg,
                &rt,
                &WarmupConfig::default(),
                SystemTime::now()
            )),
            [0, 0]
        );
    }

    #[test]
    fn a_warming_relay_gets_its_ramp_share_of_its_weight() {
        let cfg = LbConfig::parse(CONFIG).unwrap();
        let now = SystemTime::now();
        let warm = WarmupConfig {
            duration: Duration::from_hours(10),
            start_percent: 10,
            steps: 10,
            ..Default::default()
        };
        let mut new = up();
        new.ramp = Some(Ramp::starting(
            now - Duration::from_hours(5),
            Duration::from_hours(10),
        ));
        let rt = BTreeMap::from([
            ("198.51.100.3".parse().unwrap(), new),
            ("198.51.100.4".parse().unwrap(), up()),
        ]);
        // 10 % + 5/10 of the remaining 90 % = 55 % of weight 2.
        assert_eq!(weights(&effective(&cfg, &rt, &warm, now)), [1100, 1000]);
    }

    #[test]
    fn first_up_starts_the_long_ramp_and_a_later_recovery_the_short_one() {
        let warm = WarmupConfig {
            duration: Duration::from_hours(100),
            rejoin: Duration::from_mins(10),
            start_percent: 10,
            steps: 10,
        };
        let t0 = SystemTime::now();
        let mut rt = Runtime::added();
        assert_eq!(
            rt.share(t0, &warm),
            0,
            "down until its first successful checks"
        );
        rt.came_up(t0, &warm);
        assert_eq!(rt.share(t0, &warm), 100);
        let t1 = t0 + Duration::from_hours(50);
        assert_eq!(rt.share(t1, &warm), 550);
        rt.health = Health::Down;
        rt.came_up(t1, &warm);
        assert_eq!(rt.share(t1, &warm), 100, "slow start after a failure");
        assert_eq!(
            rt.share(t1 + Duration::from_mins(10), &warm),
            550,
            "then back on the long ramp"
        );
    }

    #[test]
    fn an_operator_weight_replaces_the_configured_one() {
        let cfg = LbConfig::parse(CONFIG).unwrap();
        let mut o = up();
        o.weight_override = Some(5);
        let rt = BTreeMap::from([("198.51.100.3".parse().unwrap(), o)]);
        assert_eq!(
            weights(&effective(
                &cfg,
                &rt,
                &WarmupConfig::default(),
                SystemTime::now()
            )),
            [5000, 1000]
        );
    }
}
