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
use crate::{
    config::lb::{LbConfig, ServiceConfig},
    health::{Check, Health},
};

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

/// What the daemon knows about one of a relay's checks (one balanced port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckState {
    pub health: Health,
    /// The slow start after this check failed (shorter than the reputation
    /// ramp; the smaller share wins). Only this port's tables follow it.
    #[serde(default)]
    pub rejoin: Option<Ramp>,
}

/// What the daemon knows about a relay beyond its configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// Per check (port and dialect): its health and slow start. A relay can
    /// be up on 25 and down on 465.
    #[serde(default)]
    pub checks: BTreeMap<Check, CheckState>,
    /// One health for every port, as state files written before per-port
    /// checks hold it: the starting health of checks not saved yet, so an
    /// upgrade restarts with the relays that were up.
    #[serde(default, rename = "health", skip_serializing)]
    pub legacy_health: Option<Health>,
    /// The reputation ramp: starts the first time the relay comes up on any port.
    pub ramp: Option<Ramp>,
    /// The relay has not been up since it was added: its first `up` starts
    /// the reputation ramp.
    #[serde(default)]
    pub never_up: bool,
    /// Operator's drain: no new flows.
    pub drained: bool,
    /// Operator's weight, replacing the configured one until the next reload
    /// that changes this relay's configured weight.
    pub weight_override: Option<u32>,
    /// The share of its weight the relay's own feedback (queue depth,
    /// deferrals; `feedback/`) leaves it, in thousandths. Not saved: a
    /// restarted balancer reads the relays again within one poll.
    #[serde(skip, default = "full_share")]
    pub feedback: u32,
}

fn full_share() -> u32 {
    warmup::FULL
}

impl Runtime {
    /// Its health on `check`: down when never checked.
    pub fn health(&self, check: Check) -> Health {
        self.checks.get(&check).map_or(Health::Down, |c| c.health)
    }

    /// The multiplier for this relay's configured weight on the port of
    /// `check`, in thousandths.
    pub fn share(&self, check: Check, now: SystemTime, cfg: &WarmupConfig) -> u32 {
        if self.drained || self.health(check) != Health::Up {
            return 0;
        }
        self.ramp_share(check, now, cfg)
    }

    /// Its share on `check`, whatever its health: the smaller of the
    /// relay's reputation ramp and the check's slow start, times what its
    /// feedback leaves it.
    pub fn ramp_share(&self, check: Check, now: SystemTime, cfg: &WarmupConfig) -> u32 {
        let ramp = self.ramp.map_or(warmup::FULL, |r| r.share(now, cfg));
        let rejoin = self
            .checks
            .get(&check)
            .and_then(|c| c.rejoin)
            .map_or(warmup::FULL, |r| r.share(now, cfg));
        let warm = ramp.min(rejoin);
        // Both ≤ FULL; a relay with any share keeps at least a thousandth.
        (warm * self.feedback.min(warmup::FULL) / warmup::FULL).max(u32::from(warm > 0))
    }

    /// A relay just added to the configuration: down until it passes its
    /// checks, then ramping.
    pub fn added() -> Self {
        Self {
            checks: BTreeMap::new(),
            legacy_health: None,
            ramp: None,
            never_up: true,
            drained: false,
            weight_override: None,
            feedback: warmup::FULL,
        }
    }

    /// Sets the health of `check` (a change that starts no ramp).
    pub fn set_health(&mut self, check: Check, health: Health) {
        self.checks
            .entry(check)
            .or_insert(CheckState {
                health,
                rejoin: None,
            })
            .health = health;
    }

    /// Marks `check` up at `now` and starts the ramp that applies: the
    /// relay's reputation ramp on its first `up` on any port, else this
    /// check's slow start.
    pub fn came_up(&mut self, check: Check, now: SystemTime, cfg: &WarmupConfig) {
        self.set_health(check, Health::Up);
        if std::mem::take(&mut self.never_up) {
            self.ramp = (!cfg.duration.is_zero()).then(|| Ramp::starting(now, cfg.duration));
        } else if let Some(c) = self.checks.get_mut(&check) {
            c.rejoin = (!cfg.rejoin.is_zero()).then(|| Ramp::starting(now, cfg.rejoin));
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

/// One service's (VIP × port's) outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// [`service_id`] of the VIP and port.
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

/// A data-plane service's identity across reloads: its VIP and port.
pub fn service_id(vip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(vip, port).to_string()
}

/// `cfg` with every backend's weight replaced by its effective weight
/// (configured or overridden weight × share in thousandths), and how each
/// VIP × port chose it. Health is per port (each port has its own check),
/// so each port gets its own entry; ports that come out the same share one
/// (one Maglev build). A relay missing from `runtime` keeps its full weight.
/// `last_good` holds, per [`service_id`], the relays a port had alive the
/// last time it was not in panic.
pub fn effective(
    cfg: &LbConfig,
    runtime: &BTreeMap<IpAddr, Runtime>,
    warmup: &WarmupConfig,
    last_good: &BTreeMap<String, BTreeSet<IpAddr>>,
    now: SystemTime,
) -> Effective {
    let mut out = cfg.clone();
    out.services.clear();
    let threshold = u64::from(cfg.health.panic_threshold);
    let mut states = Vec::new();
    for svc in &cfg.services {
        let first = out.services.len();
        for &port in &svc.ports {
            let check = svc.check(port, &cfg.health);
            let (one, state) =
                port_weights(svc, port, check, runtime, warmup, last_good, threshold, now);
            match out.services[first..]
                .iter_mut()
                .find(|s| s.backends == one.backends)
            {
                Some(same) => same.ports.push(port),
                None => out.services.push(one),
            }
            states.push(state);
        }
    }
    Effective {
        cfg: out,
        services: states,
    }
}

/// One port of `svc`: its backends at their effective weights, and how
/// the port chose them.
#[expect(clippy::too_many_arguments, reason = "the inputs of one pure decision")]
fn port_weights(
    svc: &ServiceConfig,
    port: u16,
    check: Check,
    runtime: &BTreeMap<IpAddr, Runtime>,
    warmup: &WarmupConfig,
    last_good: &BTreeMap<String, BTreeSet<IpAddr>>,
    threshold: u64,
    now: SystemTime,
) -> (ServiceConfig, ServiceState) {
    let id = service_id(svc.vip, port);
    // (base weight, health, ramp share) of each relay that may take
    // flows at all: not drained, weight above 0.
    let relays: Vec<(u64, Health, u32)> = svc
        .backends
        .iter()
        .map(|b| match runtime.get(&b.address) {
            Some(rt) if rt.drained => (0, rt.health(check), 0),
            Some(rt) => (
                u64::from(rt.weight_override.unwrap_or(b.weight)),
                rt.health(check),
                rt.ramp_share(check, now, warmup),
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
    let mut one = svc.clone();
    one.ports = vec![port];
    for (b, (base, health, ramp)) in one.backends.iter_mut().zip(&relays) {
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
    (one, ServiceState { id, mode, alive })
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

    const SMTP: Check = Check {
        port: 25,
        tls: crate::health::Tls::None,
    };
    const SMTPS: Check = Check {
        port: 465,
        tls: crate::health::Tls::Implicit,
    };

    /// Up on 25 and 465.
    fn up() -> Runtime {
        let mut rt = Runtime {
            never_up: false,
            ..Runtime::added()
        };
        rt.set_health(SMTP, Health::Up);
        rt.set_health(SMTPS, Health::Up);
        rt
    }

    fn weights(cfg: &LbConfig) -> Vec<u32> {
        cfg.services[0].backends.iter().map(|b| b.weight).collect()
    }

    /// Effective configuration now, default warmup, no last good relays.
    fn now_effective(cfg: &LbConfig, rt: &BTreeMap<IpAddr, Runtime>) -> Effective {
        effective(
            cfg,
            rt,
            &WarmupConfig::default(),
            &BTreeMap::new(),
            SystemTime::now(),
        )
    }

    fn now_weights(cfg: &LbConfig, rt: &BTreeMap<IpAddr, Runtime>) -> Vec<u32> {
        weights(&now_effective(cfg, rt).cfg)
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
        down.set_health(SMTP, Health::Down);
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
            rt.share(SMTP, t0, &warm),
            0,
            "down until its first successful checks"
        );
        rt.came_up(SMTP, t0, &warm);
        assert_eq!(rt.share(SMTP, t0, &warm), 100);
        rt.came_up(SMTPS, t0, &warm);
        assert_eq!(
            rt.share(SMTPS, t0, &warm),
            100,
            "a second port joins the relay's ramp"
        );
        let t1 = t0 + Duration::from_hours(50);
        assert_eq!(rt.share(SMTP, t1, &warm), 550);
        rt.set_health(SMTPS, Health::Down);
        rt.came_up(SMTPS, t1, &warm);
        assert_eq!(
            rt.share(SMTPS, t1, &warm),
            100,
            "slow start after a failure"
        );
        assert_eq!(
            rt.share(SMTP, t1, &warm),
            550,
            "only on the port that failed"
        );
        assert_eq!(
            rt.share(SMTPS, t1 + Duration::from_mins(10), &warm),
            550,
            "then back on the long ramp"
        );
    }

    #[test]
    fn a_relay_down_on_one_port_keeps_its_weight_on_the_others() {
        let cfg = LbConfig::parse(&CONFIG.replace("[25]", "[25, 587, 465]")).unwrap();
        let mut broken_tls = up();
        broken_tls.set_health(SMTPS, Health::Down);
        let rt = BTreeMap::from([
            ("198.51.100.3".parse().unwrap(), broken_tls),
            ("198.51.100.4".parse().unwrap(), up()),
        ]);
        let e = now_effective(&cfg, &rt);
        // 587 was never checked on either relay: down, and no last good
        // relays yet, so its table is empty (panic with nothing to keep).
        let by_port: Vec<(Vec<u16>, Vec<u32>)> = e
            .cfg
            .services
            .iter()
            .map(|s| {
                (
                    s.ports.clone(),
                    s.backends.iter().map(|b| b.weight).collect(),
                )
            })
            .collect();
        assert_eq!(
            by_port,
            [
                (vec![25], vec![2000, 1000]),
                (vec![587], vec![0, 0]),
                (vec![465], vec![0, 1000]),
            ]
        );
        let ids: Vec<&str> = e.services.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            ["203.0.113.10:25", "203.0.113.10:587", "203.0.113.10:465"]
        );
        assert_eq!(e.services[2].mode, Mode::Normal);
        assert_eq!(e.services[1].mode, Mode::Panic);
    }

    #[test]
    fn ports_whose_tables_agree_share_one_entry() {
        let cfg = LbConfig::parse(&CONFIG.replace("[25]", "[25, 465]")).unwrap();
        let rt = BTreeMap::from([
            ("198.51.100.3".parse().unwrap(), up()),
            ("198.51.100.4".parse().unwrap(), up()),
        ]);
        let e = now_effective(&cfg, &rt);
        assert_eq!(e.cfg.services.len(), 1);
        assert_eq!(e.cfg.services[0].ports, [25, 465]);
        assert_eq!(e.services.len(), 2, "one state per port all the same");
    }

    #[test]
    fn feedback_multiplies_the_warmup_share() {
        let cfg = LbConfig::parse(CONFIG).unwrap();
        let now = SystemTime::now();
        let warm = WarmupConfig {
            duration: Duration::from_hours(10),
            start_percent: 50,
            steps: 0,
            ..Default::default()
        };
        let mut held_back = up();
        held_back.ramp = Some(Ramp::starting(now, Duration::from_hours(10)));
        held_back.feedback = 300;
        let mut drained = up();
        drained.feedback = 300;
        drained.drained = true;
        let rt = BTreeMap::from([
            ("198.51.100.3".parse().unwrap(), held_back),
            ("198.51.100.4".parse().unwrap(), drained),
        ]);
        // Weight 2 × 50 % warmup × 30 % feedback; a drain still wins.
        assert_eq!(
            weights(&effective(&cfg, &rt, &warm, &BTreeMap::new(), now).cfg),
            [300, 0]
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
