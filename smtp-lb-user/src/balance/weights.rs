//! The weights the daemon programs: the configured weight of each relay,
//! times its warmup share, zero when it is drained, down or full. Pure.
//!
//! Zero keeps the relay in the data plane (its tracked flows finish) but
//! gives it no Maglev slot, so no new connection reaches it.
//!
//! Per service, when no relay has room the fail-safes take over ([`Mode`]):
//! if every relay that is alive is full, the full ones keep taking new
//! connections (each admits them as its slots free up, and greets the rest
//! with `421`, which senders retry); if too few are alive (the panic
//! threshold, or none at all), the service keeps its last good relays.
//! An empty table drops every SYN; neither case is worth that.
use std::{
    collections::{BTreeMap, BTreeSet},
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
        if self.drained || self.health != Health::Up {
            return 0;
        }
        self.ramp_share(now, cfg)
    }

    /// Its warmup share, whatever its health: the smaller of the two ramps.
    pub fn ramp_share(&self, now: SystemTime, cfg: &WarmupConfig) -> u32 {
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

/// How a service's table was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// New connections go to the relays that are up.
    Normal,
    /// No relay has room and some are full: the full ones take new
    /// connections as their slots free up.
    Full,
    /// Fewer relays are alive than the panic threshold allows (or none):
    /// new connections keep going to the service's last good relays.
    Panic,
}

/// One service's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// [`service_id`] of the service.
    pub id: String,
    pub mode: Mode,
    /// Relays alive (up or full) and not drained: the good set to keep
    /// while the service is not in panic.
    pub alive: BTreeSet<IpAddr>,
}

/// What [`effective`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    /// The configuration with effective weights.
    pub cfg: LbConfig,
    /// Per service, in configuration order.
    pub services: Vec<ServiceState>,
}

/// A service's identity across reloads: its VIP and ports.
pub fn service_id(svc: &crate::config::lb::ServiceConfig) -> String {
    let ports: Vec<String> = svc.ports.iter().map(u16::to_string).collect();
    match svc.vip {
        IpAddr::V4(v4) => format!("{v4}:{}", ports.join(",")),
        IpAddr::V6(v6) => format!("[{v6}]:{}", ports.join(",")),
    }
}

/// `cfg` with every backend's weight replaced by its effective weight
/// (configured or overridden weight × share in thousandths), and how each
/// service chose it. A relay missing from `runtime` keeps its full weight.
/// `last_good` holds, per [`service_id`], the relays a service had alive
/// the last time it was not in panic.
pub fn effective(
    cfg: &LbConfig,
    runtime: &BTreeMap<IpAddr, Runtime>,
    warmup: &WarmupConfig,
    last_good: &BTreeMap<String, BTreeSet<IpAddr>>,
    now: SystemTime,
) -> Effective {
    let mut out = cfg.clone();
    let threshold = u64::from(cfg.health.panic_threshold);
    let mut states = Vec::with_capacity(out.services.len());
    for svc in &mut out.services {
        let id = service_id(svc);
        // (base weight, health, ramp share) of each relay that may take
        // flows at all: not drained, weight above 0.
        let relays: Vec<(u64, Health, u32)> = svc
            .backends
            .iter()
            .map(|b| match runtime.get(&b.address) {
                Some(rt) if rt.drained => (0, rt.health, 0),
                Some(rt) => (
                    u64::from(rt.weight_override.unwrap_or(b.weight)),
                    rt.health,
                    rt.ramp_share(now, warmup),
                ),
                None => (u64::from(b.weight), Health::Up, warmup::FULL),
            })
            .collect();
        let weight_of = |h: &[Health]| -> u64 {
            relays
                .iter()
                .filter(|(w, health, _)| *w > 0 && h.contains(health))
                .map(|(w, ..)| w)
                .sum()
        };
        let total = weight_of(&[Health::Up, Health::Full, Health::Down]);
        let alive_weight = weight_of(&[Health::Up, Health::Full]);
        let alive: BTreeSet<IpAddr> = svc
            .backends
            .iter()
            .zip(&relays)
            .filter(|(_, (w, h, _))| *w > 0 && *h != Health::Down)
            .map(|(b, _)| b.address)
            .collect();
        let mode = if total > 0 && (alive_weight == 0 || alive_weight * 100 < threshold * total) {
            Mode::Panic
        } else if weight_of(&[Health::Up]) == 0 && alive_weight > 0 {
            Mode::Full
        } else {
            Mode::Normal
        };
        let kept = last_good.get(&id);
        for (b, (base, health, ramp)) in svc.backends.iter_mut().zip(&relays) {
            let takes = match mode {
                Mode::Normal => *health == Health::Up,
                Mode::Full => *health == Health::Full,
                Mode::Panic => kept.is_some_and(|k| k.contains(&b.address)),
            };
            // base ≤ MAX_WEIGHT and ramp ≤ 1000: the product fits a u32.
            b.weight = if takes {
                u32::try_from(base * u64::from(*ramp)).unwrap_or(u32::MAX)
            } else {
                0
            };
        }
        states.push(ServiceState { id, mode, alive });
    }
    Effective {
        cfg: out,
        services: states,
    }
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

    /// Effective weights now, default warmup, no last good relays.
    fn now_weights(cfg: &LbConfig, rt: &BTreeMap<IpAddr, Runtime>) -> Vec<u32> {
        let e = effective(
            cfg,
            rt,
            &WarmupConfig::default(),
            &BTreeMap::new(),
            SystemTime::now(),
        );
        weights(&e.cfg)
    }

    #[test]
    fn healthy_relays_keep_their_proportions() {
        let cfg = LbConfig::parse(CONFIG).unwrap();
        let rt = BTreeMap::from([
            ("198.51.100.3".parse().unwrap(), up()),
            ("198.51.100.4".parse().unwrap(), up()),
        ]);
        assert_eq!(now_weights(&cfg, &rt), [2000, 1000]);
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
        assert_eq!(now_weights(&cfg, &rt), [0, 0]);
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
        assert_eq!(
            weights(&effective(&cfg, &rt, &warm, &BTreeMap::new(), now).cfg),
            [1100, 1000]
        );
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
        assert_eq!(now_weights(&cfg, &rt), [5000, 1000]);
    }
}
