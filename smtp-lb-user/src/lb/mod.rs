//! The balancer daemon's control loop: health-checks every relay on every
//! port it serves (each port in its own dialect: plain SMTP, `STARTTLS`,
//! implicit TLS), turns health per port, warmup, drains and operator
//! weights into effective weights per VIP × port,
//! programs the data plane with the result, reloads its configuration on
//! SIGHUP or request, and answers the admin API.
//!
//! All state lives in one [`Node`] behind a mutex; the data plane is only
//! written from [`Node::reconcile`], and only what changed since the last
//! write, so a steady state costs no map writes and a weight change
//! rewrites one table. Nothing here panics while the node is locked: every
//! failure is an error that leaves the running configuration serving.
//!
//! The node is generic over the [`Dataplane`]: the kernel's in production,
//! an in-memory fake in the unit tests below.

mod api;
pub mod dashboard;
mod listener;
pub mod metrics;
pub mod state;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{debug, error, info, warn};

use crate::{
    admin::http,
    announce::{self, Announcer},
    balance::{
        plan::Plan,
        weights::{self, Mode, Runtime},
    },
    config::lb::LbConfig,
    dataplane::{self, Dataplane, XdpDataplane},
    feedback::{self, Gate, Reading, RelayFeedback},
    health::{self, Check, Health, Outcome, Tracker, Transition},
};

/// How often warmup ramps are re-evaluated (a table rebuild happens only
/// when a ramp reaches its next step).
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How often, with power of two choices on (`p2c`), the flows sent to their
/// second candidate are copied where no flood can evict them and the live
/// flow counts are reset from `FLOW_TABLE` (one walk of it).
const FLOW_SYNC_EVERY: Duration = Duration::from_secs(5);

/// One relay, by address (its identity across services).
#[derive(Clone)]
pub struct Relay {
    /// Its names in the configuration (normally one).
    pub names: BTreeSet<String>,
    pub runtime: Runtime,
    /// One per check the configuration asks of it (one per balanced port
    /// and dialect): a relay can be up on one port and down on another.
    pub trackers: BTreeMap<Check, Tracker>,
}

impl Relay {
    /// Its health on all its ports taken together: the worst of its checks
    /// (down, then full, then up), so one broken port shows.
    pub fn health(&self) -> Health {
        let rank = |h: Health| match h {
            Health::Up => 0,
            Health::Full => 1,
            Health::Down => 2,
        };
        self.trackers
            .values()
            .map(Tracker::health)
            .max_by_key(|h| rank(*h))
            .unwrap_or(Health::Down)
    }

    /// Its share of configured weight on all its ports taken together, in
    /// thousandths: the smallest of its checks' (0 when one is down).
    pub fn share(&self, now: SystemTime, cfg: &crate::balance::warmup::WarmupConfig) -> u32 {
        self.trackers
            .keys()
            .map(|c| self.runtime.share(*c, now, cfg))
            .min()
            .unwrap_or(0)
    }
}

/// The outcome of the last reload.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadOutcome {
    pub at_unix: u64,
    /// `None` on success; else why the new configuration was refused.
    pub error: Option<String>,
}

/// A service's fail-safe state, for the admin API and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Failsafe {
    /// How its table is chosen now.
    pub mode: Option<Mode>,
    /// Times it entered panic since the daemon started.
    pub panics: u64,
    /// Times every relay it had alive was full, since the daemon started.
    pub all_full: u64,
}

/// Everything the daemon knows.
pub struct Node<D = XdpDataplane> {
    pub cfg: LbConfig,
    pub config_path: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub iface: String,
    dp: D,
    pub relays: BTreeMap<IpAddr, Relay>,
    /// The effective configuration last written to the maps, and the plan
    /// written for it (`None` after a failed write: the next one is full).
    applied: Option<(LbConfig, Plan)>,
    /// Per service id, the relays it had alive when last not in panic.
    last_good: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Per service id.
    pub failsafe: BTreeMap<String, Failsafe>,
    pub last_reload: Option<ReloadOutcome>,
    pub started: SystemTime,
    /// Bumped when the set of relays or the health settings change, so the
    /// control loop restarts the probes.
    probe_generation: u64,
    pub metrics: metrics::Metrics,
    /// Per relay address, what its feedback says (`[feedback]` enabled).
    pub feedback: BTreeMap<IpAddr, RelayFeedback>,
    /// Per service id, its admission (`[feedback.admission]`).
    pub admission: BTreeMap<String, Gate>,
    /// Per data-plane service id, whether the admission map refuses its new
    /// connections, as last written (`None`: write every entry next time).
    admission_written: Option<BTreeMap<u32, bool>>,
    /// The wall clock (warmup ramps); a test sets its own.
    clock: Box<dyn Fn() -> SystemTime + Send>,
    /// `ctl node drain`: the VIPs are withdrawn from the routers while the
    /// relays keep serving the sessions already here.
    pub node_drained: bool,
    /// Where the node publishes whether its VIPs should be announced
    /// (`[announce]`; `None` when off).
    announce_tx: Option<watch::Sender<announce::Want>>,
}

impl<D: Dataplane> Node<D> {
    /// Builds the node from `cfg` and the state saved by a previous run,
    /// and programs the data plane. A relay the previous run had up stays up
    /// (a restart must not empty the tables); a new one starts down.
    pub fn new(
        dp: D,
        cfg: LbConfig,
        saved: &state::State,
        config_path: Option<PathBuf>,
        pin_dir: PathBuf,
        iface: String,
    ) -> Self {
        let mut node = Self {
            cfg,
            config_path,
            pin_dir,
            iface,
            dp,
            relays: BTreeMap::new(),
            applied: None,
            last_good: saved.last_good.clone(),
            failsafe: BTreeMap::new(),
            last_reload: None,
            started: SystemTime::now(),
            probe_generation: 0,
            metrics: metrics::Metrics::new(),
            feedback: BTreeMap::new(),
            admission: BTreeMap::new(),
            admission_written: None,
            clock: Box::new(SystemTime::now),
            node_drained: saved.node_drained,
            announce_tx: None,
        };
        node.sync_relays(|addr| saved.backends.get(&addr).map(|s| s.runtime.clone()));
        node
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// First programming of the maps. Checks the saved state does not know
    /// (new relays, new ports) get one probe round first, so a fresh
    /// balancer starts with the relays that answer (instead of none, or all
    /// of them).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let fresh: Vec<(IpAddr, Check)> = self
            .relays
            .iter()
            .flat_map(|(a, r)| {
                r.trackers
                    .keys()
                    .filter(|c| !r.runtime.checks.contains_key(c))
                    .map(|c| (*a, *c))
            })
            .collect();
        let cfg = self.cfg.health.clone();
        let mut round = JoinSet::new();
        for (addr, check) in fresh {
            let cfg = cfg.clone();
            round.spawn(async move {
                let result =
                    health::probe(SocketAddr::new(addr, check.port), check.tls, &cfg).await;
                (addr, check, result)
            });
        }
        let now = self.now();
        while let Some(Ok((addr, check, result))) = round.join_next().await {
            let Some(relay) = self.relays.get_mut(&addr) else {
                continue;
            };
            let (health, outcome) = match result {
                Ok(_) => (Health::Up, Outcome::Passed),
                Err(e) if e.is_full() => (Health::Full, Outcome::Full(e.to_string())),
                Err(e) => (Health::Down, Outcome::Failed(e.to_string())),
            };
            let mut tracker = Tracker::new(cfg.rise, cfg.fall, health);
            match &outcome {
                Outcome::Passed => info!(relay = %addr, %check, "relay up at start"),
                Outcome::Full(e) => warn!(relay = %addr, %check, error = %e, "relay full at start"),
                Outcome::Failed(e) => {
                    warn!(relay = %addr, %check, error = %e, "relay down at start");
                }
            }
            tracker.record(outcome, Duration::ZERO);
            relay.trackers.insert(check, tracker);
            if health == Health::Down {
                relay.runtime.set_health(check, Health::Down);
            } else {
                relay.runtime.came_up(check, now, &self.cfg.warmup);
                relay.runtime.set_health(check, health);
            }
        }
        self.reconcile()
    }

    /// The data plane.
    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// Advances the flow table's clock (`FLOW_CLOCK`), by which confirmed
    /// flows that went silent give their ways up.
    pub fn tick_clock(&mut self) -> anyhow::Result<()> {
        self.dp
            .set_clock(dataplane::flows::clock_now())
            .context("advance the flow table's clock")?;
        Ok(())
    }

    /// The data plane, to attach it.
    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Makes `relays` match the configuration: new addresses get `initial`
    /// (or [`Runtime::added`]), removed ones are dropped, names refreshed,
    /// and each relay gets a tracker per check its services ask of it. A
    /// check starts in the health it was saved with (a restart must not
    /// empty the tables), else down: it must pass `rise` probes.
    fn sync_relays(&mut self, initial: impl Fn(IpAddr) -> Option<Runtime>) {
        let mut wanted: BTreeMap<IpAddr, (BTreeSet<String>, BTreeSet<Check>)> = BTreeMap::new();
        for svc in &self.cfg.services {
            let checks: Vec<Check> = svc
                .ports
                .iter()
                .map(|p| svc.check(*p, &self.cfg.health))
                .collect();
            for b in &svc.backends {
                let (names, c) = wanted.entry(b.address).or_default();
                names.insert(b.name.clone());
                c.extend(&checks);
            }
        }
        self.relays.retain(|addr, _| wanted.contains_key(addr));
        let (rise, fall) = (self.cfg.health.rise, self.cfg.health.fall);
        for (addr, (names, checks)) in wanted {
            let relay = self.relays.entry(addr).or_insert_with(|| Relay {
                names: BTreeSet::new(),
                runtime: initial(addr).unwrap_or_else(Runtime::added),
                trackers: BTreeMap::new(),
            });
            relay.names = names;
            let rt = &mut relay.runtime;
            relay.trackers.retain(|c, _| checks.contains(c));
            rt.checks.retain(|c, _| checks.contains(c));
            for check in checks {
                if let Some(legacy) = rt.legacy_health
                    && !rt.checks.contains_key(&check)
                {
                    rt.set_health(check, legacy);
                }
                let health = rt.health(check);
                relay
                    .trackers
                    .entry(check)
                    .or_insert_with(|| Tracker::new(rise, fall, health));
            }
            rt.legacy_health = None;
        }
        self.sync_feedback();
        self.probe_generation += 1;
    }

    /// Keeps feedback state to the configured relays; with `[feedback]` off
    /// every relay has its full share and every service admits.
    fn sync_feedback(&mut self) {
        let fb = &self.cfg.feedback;
        if fb.enabled {
            self.feedback.retain(|a, _| self.relays.contains_key(a));
        } else {
            self.feedback.clear();
        }
        if !fb.enabled || fb.admission.is_none() {
            self.admission.clear();
        }
        for (addr, relay) in &mut self.relays {
            relay.runtime.feedback = self
                .feedback
                .get(addr)
                .map_or(feedback::policy::FULL, |f| f.share);
        }
    }

    /// Writes the effective configuration to the maps if it changed, and
    /// saves the state. A failed write forgets what the maps hold, so the
    /// next reconcile writes everything again.
    pub fn reconcile(&mut self) -> anyhow::Result<()> {
        self.publish_announcement();
        let runtime: BTreeMap<IpAddr, Runtime> = self
            .relays
            .iter()
            .map(|(a, r)| (*a, r.runtime.clone()))
            .collect();
        let effective = weights::effective(
            &self.cfg,
            &runtime,
            &self.cfg.warmup,
            &self.last_good,
            self.now(),
        );
        let good_changed = self.track_failsafe(&effective.services);
        if self
            .applied
            .as_ref()
            .is_some_and(|(c, _)| *c == effective.cfg)
        {
            if good_changed {
                self.save();
            }
            return self.write_admission();
        }
        let previous = self.applied.take().map(|(_, plan)| plan);
        if previous.is_none() {
            self.admission_written = None;
        }
        let applied = dataplane::apply(&mut self.dp, &effective.cfg, previous.as_ref())
            .context("program the data plane")?;
        for svc in &effective.cfg.services {
            let weights: Vec<String> = svc
                .backends
                .iter()
                .map(|b| format!("{}={}", b.name, b.weight))
                .collect();
            info!(service = %svc.label(), weights = %weights.join(" "), removed = applied.removed_backends, "tables updated");
        }
        self.applied = Some((effective.cfg, applied.plan));
        self.save();
        self.write_admission()
    }

    /// Writes each data-plane service's admission flag where it differs
    /// from what the map holds (every one after a start or a failed write:
    /// a pinned map may hold a previous run's flags).
    fn write_admission(&mut self) -> anyhow::Result<()> {
        let Some((_, plan)) = &self.applied else {
            return Ok(());
        };
        let wanted: BTreeMap<u32, bool> = plan
            .services
            .iter()
            .map(|s| {
                let closed = self
                    .admission
                    .get(&weights::service_id(s.vip, s.port))
                    .is_some_and(|g| g.closed);
                (s.id, closed)
            })
            .collect();
        let written = self.admission_written.take();
        for (id, closed) in &wanted {
            if written.as_ref().and_then(|w| w.get(id)) != Some(closed) {
                self.dp
                    .set_admission(*id, *closed)
                    .context("write the admission map")?;
            }
        }
        // Ids no service uses any more admit (a recycled id starts open).
        for id in written.iter().flat_map(BTreeMap::keys) {
            if !wanted.contains_key(id) {
                self.dp
                    .set_admission(*id, false)
                    .context("write the admission map")?;
            }
        }
        self.admission_written = Some(wanted);
        Ok(())
    }

    /// Takes one round of feedback polls (relay address → reading or
    /// error) at `now`: moves shares and admission, logs each change with
    /// its reason, and writes what changed to the data plane.
    pub fn on_feedback(
        &mut self,
        polls: Vec<(IpAddr, Result<Reading, String>)>,
        now: Instant,
    ) -> anyhow::Result<()> {
        let cfg = self.cfg.feedback.clone();
        if !cfg.enabled {
            return Ok(());
        }
        for (addr, polled) in polls {
            let Some(relay) = self.relays.get_mut(&addr) else {
                continue;
            };
            self.metrics
                .feedback_poll(&relay.names, addr, polled.is_ok());
            if let Err(e) = &polled {
                warn!(relay = %addr, names = ?relay.names, error = %e, "feedback: cannot read the relay's metrics");
            }
            let fb = self.feedback.entry(addr).or_default();
            let Some(change) = fb.update(&cfg, now, polled) else {
                continue;
            };
            relay.runtime.feedback = change.to;
            self.metrics
                .feedback_change(&relay.names, addr, change.to > change.from);
            let (from, to) = (
                format!("{}%", f64::from(change.from) / 10.0),
                format!("{}%", f64::from(change.to) / 10.0),
            );
            if change.to < change.from {
                warn!(relay = %addr, names = ?relay.names, %from, %to, reason = %change.reason, "feedback: relay share lowered");
            } else {
                info!(relay = %addr, names = ?relay.names, %from, %to, reason = %change.reason, "feedback: relay share raised");
            }
        }
        if let Some(adm) = cfg.admission {
            self.update_admission(&adm);
        }
        self.reconcile()
    }

    /// Follows each service's admission: closed while every relay that may
    /// take its new connections is at or over the high-water mark.
    fn update_admission(&mut self, adm: &feedback::AdmissionConfig) {
        for svc in &self.cfg.services {
            for &port in &svc.ports {
                let check = svc.check(port, &self.cfg.health);
                let depths: Vec<(String, Option<u64>)> = svc
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let rt = &self.relays.get(&b.address)?.runtime;
                        let takes = !rt.drained
                            && rt.weight_override.unwrap_or(b.weight) > 0
                            && rt.health(check) != Health::Down;
                        let depth = self
                            .feedback
                            .get(&b.address)
                            .and_then(RelayFeedback::queue_now);
                        takes.then(|| (b.name.clone(), depth))
                    })
                    .collect();
                let id = weights::service_id(svc.vip, port);
                let gate = self.admission.entry(id.clone()).or_default();
                let only: Vec<Option<u64>> = depths.iter().map(|(_, d)| *d).collect();
                let Some(closed) = gate.update(adm, &only) else {
                    continue;
                };
                let queues: Vec<String> = depths
                    .iter()
                    .map(|(n, d)| format!("{n}={}", d.map_or("?".into(), |d| d.to_string())))
                    .collect();
                self.metrics
                    .admission_change(&svc.label(), svc.vip, port, closed);
                if closed {
                    warn!(service = %id, queues = %queues.join(" "), high_water = adm.high_water, "admission closed: every relay's queue is over its high-water mark; new SYNs are dropped (senders retry), open sessions continue");
                } else {
                    info!(service = %id, queues = %queues.join(" "), low_water = adm.low_water, "admission open: a relay's queue drained below its low-water mark (or cannot be read)");
                }
            }
        }
        self.admission.retain(|id, _| {
            self.cfg.services.iter().any(|s| {
                s.ports
                    .iter()
                    .any(|p| weights::service_id(s.vip, *p) == *id)
            })
        });
    }

    /// With `p2c` on some service: a flow a SYN sent to its second candidate
    /// is one the table does not name, so it is kept in `MOVED_FLOWS` like a
    /// flow a table change moved (a flood that evicts its `CONNTRACK` entry
    /// cannot send it to Maglev's relay), and the live flow counts are reset
    /// from the walk (which takes back silent LRU evictions).
    pub fn sync_flows(&mut self) -> anyhow::Result<()> {
        let Some((cfg, plan)) = &self.applied else {
            return Ok(());
        };
        if !cfg.services.iter().any(|s| s.p2c) {
            return Ok(());
        }
        let moved = self
            .dp
            .keep_moved_flows(plan)
            .context("keep the flows power of two choices placed")?;
        debug!(
            scanned = moved.scanned,
            copied = moved.copied,
            pruned = moved.pruned,
            "flows synced"
        );
        Ok(())
    }

    /// Follows each service's fail-safe mode: logs and counts each change,
    /// and remembers the good relays of services not in panic. Returns
    /// whether a good set changed.
    fn track_failsafe(&mut self, states: &[weights::ServiceState]) -> bool {
        let mut changed = false;
        for st in states {
            let fs = self.failsafe.entry(st.id.clone()).or_default();
            let was = fs.mode.replace(st.mode);
            if st.mode != Mode::Panic && self.last_good.get(&st.id) != Some(&st.alive) {
                self.last_good.insert(st.id.clone(), st.alive.clone());
                changed = true;
            }
            if was == Some(st.mode) {
                continue;
            }
            match st.mode {
                Mode::Panic => {
                    fs.panics += 1;
                    let kept: Vec<String> = self
                        .last_good
                        .get(&st.id)
                        .into_iter()
                        .flatten()
                        .map(ToString::to_string)
                        .collect();
                    if kept.is_empty() {
                        error!(service = %st.id, "panic: no relay is alive and none ever was; new connections are dropped");
                    } else {
                        warn!(service = %st.id, kept = %kept.join(" "), threshold_percent = self.cfg.health.panic_threshold, "panic: too few relays alive; new connections keep going to the last good relays");
                    }
                }
                Mode::Full => {
                    fs.all_full += 1;
                    warn!(service = %st.id, "every relay alive is full (421): new connections go to the full relays, which take them as slots free up");
                }
                Mode::Normal if was.is_some() => {
                    info!(service = %st.id, "relays with room again: new connections follow the health checks");
                }
                Mode::Normal => {}
            }
        }
        self.failsafe
            .retain(|id, _| states.iter().any(|s| s.id == *id));
        self.last_good
            .retain(|id, _| states.iter().any(|s| s.id == *id));
        changed
    }

    fn save(&self) {
        let saved = state::State {
            backends: self
                .relays
                .iter()
                .map(|(a, r)| {
                    let name = r.names.iter().next().cloned().unwrap_or_default();
                    (
                        *a,
                        state::Saved {
                            name,
                            runtime: r.runtime.clone(),
                        },
                    )
                })
                .collect(),
            last_good: self.last_good.clone(),
            node_drained: self.node_drained,
        };
        if let Err(e) = state::save(&self.cfg.state_dir, &saved) {
            error!(dir = %self.cfg.state_dir.display(), error = %e, "cannot save state; warmup progress may be lost on restart");
        }
    }

    /// Records a probe result of one check and applies a resulting health
    /// change.
    pub fn on_probe(
        &mut self,
        addr: IpAddr,
        check: Check,
        outcome: Outcome,
        took: Duration,
    ) -> anyhow::Result<()> {
        let now = self.now();
        let Some(relay) = self.relays.get_mut(&addr) else {
            return Ok(());
        };
        let Some(tracker) = relay.trackers.get_mut(&check) else {
            return Ok(());
        };
        let error = match &outcome {
            Outcome::Passed => String::new(),
            Outcome::Full(e) | Outcome::Failed(e) => e.clone(),
        };
        let rt = &mut relay.runtime;
        let was = rt.health(check);
        self.metrics.probe(&relay.names, addr, &outcome, took);
        let transition = tracker.record(outcome, took);
        if let Some(t) = transition {
            self.metrics.transition(&relay.names, addr, t);
        }
        match transition {
            Some(Transition::WentUp) => {
                if was == Health::Full {
                    // It was alive all along: no slow start.
                    rt.set_health(check, Health::Up);
                } else {
                    rt.came_up(check, now, &self.cfg.warmup);
                }
                info!(relay = %addr, %check, names = ?relay.names, "relay up: passed its health checks");
            }
            Some(Transition::WentFull) => {
                if was == Health::Down {
                    rt.came_up(check, now, &self.cfg.warmup);
                }
                rt.set_health(check, Health::Full);
                warn!(relay = %addr, %check, names = ?relay.names, error = %error, "relay full: no new connections while another relay has room; its own continue");
            }
            Some(Transition::WentDown) => {
                rt.set_health(check, Health::Down);
                warn!(relay = %addr, %check, names = ?relay.names, error = %error, "relay down: no new connections");
            }
            None => return Ok(()),
        }
        self.reconcile()
    }

    /// Reads the configuration file again and applies it; on any error the
    /// running configuration stays.
    pub fn reload(&mut self) -> Result<(), String> {
        let outcome = self.try_reload();
        self.metrics.reload(outcome.is_ok());
        self.last_reload = Some(ReloadOutcome {
            at_unix: weights::unix(SystemTime::now()),
            error: outcome.as_ref().err().cloned(),
        });
        match &outcome {
            Ok(()) => info!("configuration reloaded"),
            Err(e) => error!(error = %e, "configuration refused; the running one stays"),
        }
        outcome
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let path = self
            .config_path
            .clone()
            .ok_or("no configuration file to reload (started without --config)")?;
        let new = LbConfig::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if new.pin_dir.is_some() && new.pin_dir != self.cfg.pin_dir {
            return Err("pin_dir cannot change on reload; restart the daemon".into());
        }
        // An operator weight lasts until the configured weight changes.
        for svc in &new.services {
            for b in &svc.backends {
                let old = self
                    .cfg
                    .services
                    .iter()
                    .flat_map(|s| &s.backends)
                    .find(|o| o.address == b.address);
                if let (Some(old), Some(relay)) = (old, self.relays.get_mut(&b.address))
                    && old.weight != b.weight
                {
                    relay.runtime.weight_override = None;
                }
            }
        }
        let previous = std::mem::replace(&mut self.cfg, new);
        let relays = self.relays.clone();
        self.sync_relays(|_| None);
        if let Err(e) = self.reconcile() {
            // Put the old configuration back and write it again in full:
            // the failed write may have changed part of the maps.
            self.cfg = previous;
            self.relays = relays;
            self.probe_generation += 1;
            if let Err(again) = self.reconcile() {
                error!(error = %format!("{again:#}"), "cannot write the running configuration back");
            }
            return Err(format!("{e:#}"));
        }
        Ok(())
    }

    /// Addresses of the relays called `name`.
    fn by_name(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let found: Vec<IpAddr> = self
            .relays
            .iter()
            .filter(|(a, r)| r.names.contains(name) || a.to_string() == name)
            .map(|(a, _)| *a)
            .collect();
        if found.is_empty() {
            Err(format!("no backend named `{name}`"))
        } else {
            Ok(found)
        }
    }

    /// Drain (`true`) or undrain a relay by name or address.
    pub fn set_drained(&mut self, name: &str, drained: bool) -> Result<(), String> {
        for addr in self.by_name(name)? {
            if let Some(relay) = self.relays.get_mut(&addr) {
                relay.runtime.drained = drained;
            }
        }
        info!(backend = name, drained, "drain state changed");
        self.reconcile().map_err(|e| format!("{e:#}"))
    }

    /// Whether the VIPs should be announced now, and why: the node runs
    /// (its data plane attached), is not drained, and a relay is up on one
    /// of its ports. A full relay (`421`) counts: it is alive and takes
    /// sessions as its slots free (the fail-safe sends them there).
    pub fn announcement(&self) -> announce::Want {
        use announce::{Reason, Want};
        let up = self
            .relays
            .values()
            .filter(|r| r.trackers.values().any(|t| t.health() != Health::Down))
            .count();
        let detail = format!("{up} of {} relays up", self.relays.len());
        if self.node_drained {
            Want {
                announce: false,
                reason: Reason::NodeDrained,
                detail: format!("drained by the operator (ctl node drain); {detail}"),
            }
        } else if up == 0 {
            Want {
                announce: false,
                reason: Reason::NoRelayUp,
                detail,
            }
        } else {
            Want {
                announce: true,
                reason: Reason::Healthy,
                detail,
            }
        }
    }

    /// Sends [`Node::announcement`] to the announcer when it changed.
    fn publish_announcement(&self) {
        if let Some(tx) = &self.announce_tx {
            let want = self.announcement();
            tx.send_if_modified(|w| {
                let changed = !w.same(&want);
                if changed {
                    *w = want;
                }
                changed
            });
        }
    }

    /// Connects (or with `None` disconnects) the announcer.
    pub fn set_announcer(&mut self, tx: Option<watch::Sender<announce::Want>>) {
        self.announce_tx = tx;
        self.publish_announcement();
    }

    /// `ctl node drain` (`true`) or `undrain`: withdraw the VIPs from the
    /// routers (new sessions go to the other nodes; those here continue), or
    /// announce them again. Kept across restarts.
    pub fn set_node_drained(&mut self, drained: bool) -> Result<(), String> {
        if drained && !self.cfg.announce.enabled {
            return Err(
                "[announce] is off in the config: this node announces nothing to drain".into(),
            );
        }
        self.node_drained = drained;
        info!(drained, "node drain state changed");
        self.save();
        self.publish_announcement();
        Ok(())
    }

    /// Sets (or with `None` clears) an operator weight.
    pub fn set_weight(&mut self, name: &str, weight: Option<u32>) -> Result<(), String> {
        if weight.is_some_and(|w| w > crate::config::lb::MAX_WEIGHT) {
            return Err(format!(
                "weight must be at most {}",
                crate::config::lb::MAX_WEIGHT
            ));
        }
        for addr in self.by_name(name)? {
            if let Some(relay) = self.relays.get_mut(&addr) {
                relay.runtime.weight_override = weight;
            }
        }
        info!(backend = name, ?weight, "operator weight changed");
        self.reconcile().map_err(|e| format!("{e:#}"))
    }

    /// The configured weight of the relay at `addr` (0 when not configured).
    pub fn configured_weight(&self, addr: IpAddr) -> u32 {
        self.cfg
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .find(|b| b.address == addr)
            .map_or(0, |b| b.weight)
    }

    /// Per service name, the fail-safe state of its ports taken together:
    /// in panic (else all full) when one of its ports is, episodes summed.
    pub fn failsafe_by_name(&self) -> BTreeMap<String, Failsafe> {
        let mut rows: BTreeMap<String, Failsafe> = BTreeMap::new();
        for s in &self.cfg.services {
            let row = rows.entry(s.label()).or_default();
            for port in &s.ports {
                let f = self
                    .failsafe
                    .get(&weights::service_id(s.vip, *port))
                    .cloned()
                    .unwrap_or_default();
                row.panics += f.panics;
                row.all_full += f.all_full;
                row.mode = match (row.mode, f.mode) {
                    (Some(Mode::Panic), _) | (_, Some(Mode::Panic)) => Some(Mode::Panic),
                    (Some(Mode::Full), _) | (_, Some(Mode::Full)) => Some(Mode::Full),
                    (a, b) => a.or(b),
                };
            }
        }
        rows
    }

    /// The effective configuration in the maps.
    pub fn applied(&self) -> Option<&LbConfig> {
        self.applied.as_ref().map(|(c, _)| c)
    }

    pub fn into_dataplane(self) -> D {
        self.dp
    }
}

/// A probe result on its way to the control loop.
struct ProbeResult {
    generation: u64,
    addr: IpAddr,
    check: Check,
    outcome: Outcome,
    took: Duration,
}

/// One task per relay and check, each probing every `interval`.
fn spawn_probes<D>(node: &Node<D>, tx: &mpsc::Sender<ProbeResult>) -> JoinSet<()> {
    let mut set = JoinSet::new();
    let checks = node
        .relays
        .iter()
        .flat_map(|(a, r)| r.trackers.keys().map(|c| (*a, *c)));
    for (addr, check) in checks {
        let cfg = node.cfg.health.clone();
        let tx = tx.clone();
        let generation = node.probe_generation;
        set.spawn(async move {
            let mut tick = tokio::time::interval(cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let target = SocketAddr::new(addr, check.port);
            loop {
                tick.tick().await;
                let started = Instant::now();
                let outcome = match health::probe(target, check.tls, &cfg).await {
                    Ok(_) => Outcome::Passed,
                    Err(e) if e.is_full() => Outcome::Full(e.to_string()),
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                let msg = ProbeResult {
                    generation,
                    addr,
                    check,
                    outcome,
                    took: started.elapsed(),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
    set
}

/// Relays polled at once by the feedback task.
const POLL_THREADS: usize = 64;

/// One round of feedback polls, on its way to the control loop.
struct FeedbackRound {
    generation: u64,
    polls: Vec<(IpAddr, Result<Reading, String>)>,
}

/// With `[feedback]` enabled, one task that polls every relay each
/// `interval` (in parallel, each poll bounded by `timeout`, off the runtime
/// threads) and sends the round to the control loop.
fn spawn_feedback<D>(
    node: &Node<D>,
    tx: &mpsc::Sender<FeedbackRound>,
) -> Option<tokio::task::JoinHandle<()>> {
    let cfg = node.cfg.feedback.clone();
    if !cfg.enabled {
        return None;
    }
    let targets: Vec<IpAddr> = node.relays.keys().copied().collect();
    let generation = node.probe_generation;
    let tx = tx.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (c, t) = (cfg.clone(), targets.clone());
            let Ok(polls) = tokio::task::spawn_blocking(move || {
                // At most POLL_THREADS polls at once, so a large fleet costs
                // a bounded number of threads (a round then takes longer).
                t.chunks(POLL_THREADS)
                    .flat_map(|chunk| {
                        std::thread::scope(|scope| {
                            let handles: Vec<_> = chunk
                                .iter()
                                .map(|a| {
                                    let c = &c;
                                    let at = SocketAddr::new(*a, c.port);
                                    (*a, scope.spawn(move || feedback::poll::poll(at, c)))
                                })
                                .collect();
                            handles
                                .into_iter()
                                .map(|(a, h)| {
                                    (a, h.join().unwrap_or_else(|_| Err("poll panicked".into())))
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .await
            else {
                return;
            };
            if tx.send(FeedbackRound { generation, polls }).await.is_err() {
                return;
            }
        }
    }))
}

/// Runs the control loop until `shutdown` resolves; returns the node (and
/// with it the data plane) for the caller to detach or keep pinned.
pub async fn run<D: Dataplane + Send + 'static>(
    node: Node<D>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Node<D>> {
    let node = Arc::new(Mutex::new(node));
    let (admin_addr, metrics_addr, token) = {
        let n = lock(&node);
        (
            n.cfg.admin.listen,
            n.cfg.metrics.listen,
            http::token(&n.cfg.token_file())?,
        )
    };
    let admin_listener = http::bind(admin_addr, "admin API").await?;
    let metrics_listener = http::bind(metrics_addr, "metrics listener").await?;
    info!(listen = %admin_addr, "admin API listening");
    info!(listen = %metrics_addr, "metrics listener: /metrics /healthz /readyz");
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let servers = [
        tokio::spawn(http::serve(
            admin_listener,
            http::require_token(api::router(node.clone()), token),
            until_stopped(stopped.clone()),
        )),
        tokio::spawn(http::serve(
            metrics_listener,
            listener::router(&node),
            until_stopped(stopped),
        )),
    ];

    let mut announcer = None;
    sync_announcer(&node, &mut announcer).await?;

    let (tx, mut rx) = mpsc::channel(256);
    let mut generation = lock(&node).probe_generation;
    let mut probes = spawn_probes(&lock(&node), &tx);
    let (fb_tx, mut fb_rx) = mpsc::channel(4);
    let mut feedback = spawn_feedback(&lock(&node), &fb_tx);
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    let mut flow_sync = tokio::time::interval(FLOW_SYNC_EVERY);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::pin!(shutdown);
    crate::systemd::ready();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(msg) = rx.recv() => {
                let mut n = lock(&node);
                if msg.generation == n.probe_generation
                    && let Err(e) = n.on_probe(msg.addr, msg.check, msg.outcome, msg.took)
                {
                    error!(error = %format!("{e:#}"), "cannot apply a health change");
                }
            }
            Some(round) = fb_rx.recv() => {
                let mut n = lock(&node);
                if round.generation == n.probe_generation
                    && let Err(e) = n.on_feedback(round.polls, Instant::now())
                {
                    error!(error = %format!("{e:#}"), "cannot apply relay feedback");
                }
            }
            _ = tick.tick() => {
                let mut n = lock(&node);
                if let Err(e) = n.reconcile() {
                    error!(error = %format!("{e:#}"), "cannot apply warmup progress");
                }
                if let Err(e) = n.tick_clock() {
                    error!(error = %format!("{e:#}"), "cannot advance the flow table's clock");
                }
            }
            _ = flow_sync.tick() => {
                if let Err(e) = lock(&node).sync_flows() {
                    error!(error = %format!("{e:#}"), "cannot sync flow state");
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                let _ = lock(&node).reload();
            }
        }
        if let Err(e) = sync_announcer(&node, &mut announcer).await {
            error!(error = %format!("{e:#}"), "cannot apply [announce] from the reloaded configuration");
        }
        let current = lock(&node).probe_generation;
        if current != generation {
            generation = current;
            probes.abort_all();
            probes = spawn_probes(&lock(&node), &tx);
            if let Some(f) = feedback.take() {
                f.abort();
            }
            feedback = spawn_feedback(&lock(&node), &fb_tx);
        }
    }
    crate::systemd::stopping();
    // Withdraw first: routers move new sessions to the other nodes while
    // this one still forwards what reaches it.
    lock(&node).set_announcer(None);
    if let Some(a) = announcer {
        a.stop("the daemon is stopping").await;
    }
    probes.abort_all();
    if let Some(f) = feedback.take() {
        f.abort();
    }
    // The HTTP servers finish what is in flight (bounded) and drop their
    // handles on the node; an open admin connection must not keep the
    // caller from keeping the data plane pinned.
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
    drop(tx);
    release(node).await
}

/// Starts, reconfigures or stops the announcer so it follows the running
/// configuration's `[announce]` and VIPs (after a reload). Only the start
/// fails the caller: a daemon told to announce must not run silently.
async fn sync_announcer<D: Dataplane>(
    node: &Arc<Mutex<Node<D>>>,
    announcer: &mut Option<Announcer>,
) -> anyhow::Result<()> {
    let (cfg, vips, state_dir, metrics, want) = {
        let n = lock(node);
        (
            n.cfg.announce.clone(),
            n.cfg.vips(),
            n.cfg.state_dir.clone(),
            n.metrics.announce.clone(),
            n.announcement(),
        )
    };
    match announcer {
        Some(_) if !cfg.enabled => {
            lock(node).set_announcer(None);
            if let Some(a) = announcer.take() {
                a.stop("[announce] turned off by a reload").await;
            }
        }
        Some(a) if !a.runs(&cfg, &vips) => a.reconfigure(&cfg, vips).await?,
        None if cfg.enabled => {
            let a = Announcer::start(&cfg, vips, &state_dir, &metrics, want)
                .context("[announce]: start bird")?;
            lock(node).set_announcer(Some(a.sender()));
            *announcer = Some(a);
        }
        Some(_) | None => {}
    }
    Ok(())
}

/// How long shutdown waits for handlers still running on the blocking pool
/// (a reload, a conntrack walk) to let go of the node.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

async fn release<D>(mut node: Arc<Mutex<Node<D>>>) -> anyhow::Result<Node<D>> {
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        match Arc::try_unwrap(node) {
            Ok(m) => {
                return Ok(m
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner));
            }
            Err(shared) if Instant::now() < deadline => {
                node = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => anyhow::bail!("an admin request still holds the node after {RELEASE_WAIT:?}"),
        }
    }
}

/// Locks the node. A poisoned lock still holds a consistent node: nothing
/// panics while it is held, and each change is whole before it is made.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Path of the state directory's token file (for `ctl`).
pub fn default_token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.token")
}
