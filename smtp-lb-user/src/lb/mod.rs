//! The balancer daemon's control loop: health-checks every relay, turns
//! health, warmup, drains and operator weights into effective weights,
//! programs the data plane with the result, reloads its configuration on
//! SIGHUP or request, and answers the admin API.
//!
//! All state lives in one [`Node`] behind a mutex; the data plane is only
//! written from [`Node::reconcile`], and only when the effective
//! configuration changed, so a steady state costs no map writes.

mod api;
pub mod dashboard;
mod listener;
pub mod metrics;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{error, info, warn};

use crate::{
    admin::http,
    balance::weights::{self, Runtime},
    config::lb::LbConfig,
    dataplane::Dataplane,
    health::{self, Health, Tracker, Transition},
};

/// How often warmup ramps are re-evaluated (a table rebuild happens only
/// when a ramp reaches its next step).
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// One relay, by address (its identity across services).
pub struct Relay {
    /// Its names in the configuration (normally one).
    pub names: BTreeSet<String>,
    pub runtime: Runtime,
    pub tracker: Tracker,
}

/// The outcome of the last reload.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadOutcome {
    pub at_unix: u64,
    /// `None` on success; else why the new configuration was refused.
    pub error: Option<String>,
}

/// Everything the daemon knows.
pub struct Node {
    pub cfg: LbConfig,
    pub config_path: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub iface: String,
    dp: Dataplane,
    pub relays: BTreeMap<IpAddr, Relay>,
    /// The effective configuration last written to the maps.
    applied: Option<LbConfig>,
    pub last_reload: Option<ReloadOutcome>,
    pub started: SystemTime,
    /// Bumped when the set of relays or the health settings change, so the
    /// control loop restarts the probes.
    probe_generation: u64,
    pub metrics: metrics::Metrics,
}

impl Node {
    /// Builds the node from `cfg` and the state saved by a previous run,
    /// and programs the data plane. A relay the previous run had up stays up
    /// (a restart must not empty the tables); a new one starts down.
    pub fn new(
        dp: Dataplane,
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
            last_reload: None,
            started: SystemTime::now(),
            probe_generation: 0,
            metrics: metrics::Metrics::new(),
        };
        node.sync_relays(|addr| saved.backends.get(&addr).map(|s| s.runtime.clone()));
        node
    }

    /// First programming of the maps. Relays the saved state does not know
    /// get one probe round first, so a fresh balancer starts with the relays
    /// that answer (instead of none, or all of them).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let fresh: Vec<IpAddr> = self
            .relays
            .iter()
            .filter(|(_, r)| r.runtime.never_up && r.runtime.health == Health::Down)
            .map(|(a, _)| *a)
            .collect();
        let cfg = self.cfg.health.clone();
        let mut round = JoinSet::new();
        for addr in fresh {
            let cfg = cfg.clone();
            round.spawn(async move {
                (
                    addr,
                    health::probe(SocketAddr::new(addr, cfg.port), &cfg).await,
                )
            });
        }
        let now = SystemTime::now();
        while let Some(Ok((addr, result))) = round.join_next().await {
            let relay = self.relays.get_mut(&addr).expect("probed relays are known");
            match result {
                Ok(took) => {
                    relay.tracker = Tracker::new(cfg.rise, cfg.fall, Health::Up);
                    relay.tracker.record(None, took);
                    relay.runtime.came_up(now, &self.cfg.warmup);
                    info!(relay = %addr, "relay up at start");
                }
                Err(e) => {
                    relay.tracker.record(Some(e.to_string()), Duration::ZERO);
                    warn!(relay = %addr, error = %e, "relay down at start");
                }
            }
        }
        self.reconcile()
    }

    /// Attaches the program (or takes over a pinned attachment).
    pub fn attach(
        &mut self,
        mode: crate::dataplane::AttachMode,
    ) -> Result<(), crate::dataplane::LoadError> {
        self.dp.attach(&self.iface, mode)
    }

    /// Makes `relays` match the configuration: new addresses get `initial`
    /// (or [`Runtime::added`]), removed ones are dropped, names refreshed.
    fn sync_relays(&mut self, initial: impl Fn(IpAddr) -> Option<Runtime>) {
        let mut wanted: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for svc in &self.cfg.services {
            for b in &svc.backends {
                wanted.entry(b.address).or_default().insert(b.name.clone());
            }
        }
        self.relays.retain(|addr, _| wanted.contains_key(addr));
        let (rise, fall) = (self.cfg.health.rise, self.cfg.health.fall);
        for (addr, names) in wanted {
            let relay = self.relays.entry(addr).or_insert_with(|| {
                let runtime = initial(addr).unwrap_or_else(Runtime::added);
                let tracker = Tracker::new(rise, fall, runtime.health);
                Relay {
                    names: BTreeSet::new(),
                    runtime,
                    tracker,
                }
            });
            relay.names = names;
        }
        self.probe_generation += 1;
    }

    /// Writes the effective configuration to the maps if it changed, and
    /// saves the state.
    pub fn reconcile(&mut self) -> anyhow::Result<()> {
        let runtime: BTreeMap<IpAddr, Runtime> = self
            .relays
            .iter()
            .map(|(a, r)| (*a, r.runtime.clone()))
            .collect();
        let effective =
            weights::effective(&self.cfg, &runtime, &self.cfg.warmup, SystemTime::now());
        if self.applied.as_ref() == Some(&effective) {
            return Ok(());
        }
        let applied = self
            .dp
            .apply(&effective)
            .context("program the data plane")?;
        for svc in &effective.services {
            let weights: Vec<String> = svc
                .backends
                .iter()
                .map(|b| format!("{}={}", b.name, b.weight))
                .collect();
            info!(service = %svc.label(), weights = %weights.join(" "), removed = applied.removed_backends, "tables updated");
        }
        self.applied = Some(effective);
        self.save();
        Ok(())
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
        };
        if let Err(e) = state::save(&self.cfg.state_dir, &saved) {
            error!(dir = %self.cfg.state_dir.display(), error = %e, "cannot save state; warmup progress may be lost on restart");
        }
    }

    /// Records a probe result and applies a resulting up/down change.
    pub fn on_probe(
        &mut self,
        addr: IpAddr,
        result: Result<Duration, String>,
        took: Duration,
    ) -> anyhow::Result<()> {
        let Some(relay) = self.relays.get_mut(&addr) else {
            return Ok(());
        };
        let error = result.err();
        let transition = relay.tracker.record(error.clone(), took);
        self.metrics
            .probe(&relay.names, addr, error.is_none(), took);
        if let Some(t) = transition {
            self.metrics
                .transition(&relay.names, addr, t == Transition::WentUp);
        }
        match transition {
            Some(Transition::WentUp) => {
                relay.runtime.came_up(SystemTime::now(), &self.cfg.warmup);
                info!(relay = %addr, names = ?relay.names, "relay up: passed its health checks");
            }
            Some(Transition::WentDown) => {
                relay.runtime.health = Health::Down;
                warn!(relay = %addr, names = ?relay.names, error = error.as_deref().unwrap_or(""), "relay down: no new connections");
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
        self.sync_relays(|_| None);
        if let Err(e) = self.reconcile() {
            // Put the old configuration back; the maps still hold it.
            self.cfg = previous;
            self.sync_relays(|_| None);
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
            self.relays
                .get_mut(&addr)
                .expect("by_name returns known relays")
                .runtime
                .drained = drained;
        }
        info!(backend = name, drained, "drain state changed");
        self.reconcile().map_err(|e| format!("{e:#}"))
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
            self.relays
                .get_mut(&addr)
                .expect("by_name returns known relays")
                .runtime
                .weight_override = weight;
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

    /// The effective configuration in the maps.
    pub fn applied(&self) -> Option<&LbConfig> {
        self.applied.as_ref()
    }

    pub fn into_dataplane(self) -> Dataplane {
        self.dp
    }
}

/// A probe result on its way to the control loop.
struct ProbeResult {
    generation: u64,
    addr: IpAddr,
    result: Result<Duration, String>,
    took: Duration,
}

fn spawn_probes(node: &Node, tx: &mpsc::Sender<ProbeResult>) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for addr in node.relays.keys().copied() {
        let cfg = node.cfg.health.clone();
        let tx = tx.clone();
        let generation = node.probe_generation;
        set.spawn(async move {
            let mut tick = tokio::time::interval(cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let started = std::time::Instant::now();
                let result = health::probe(SocketAddr::new(addr, cfg.port), &cfg)
                    .await
                    .map_err(|e| e.to_string());
                let msg = ProbeResult {
                    generation,
                    addr,
                    result,
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

/// Runs the control loop until `shutdown` resolves; returns the node (and
/// with it the data plane) for the caller to detach or keep pinned.
pub async fn run(node: Node, shutdown: impl Future<Output = ()>) -> anyhow::Result<Node> {
    let node = Arc::new(Mutex::new(node));
    let (admin_addr, metrics_addr, token) = {
        let n = node.lock().unwrap();
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

    let (tx, mut rx) = mpsc::channel(256);
    let mut generation = node.lock().unwrap().probe_generation;
    let mut probes = spawn_probes(&node.lock().unwrap(), &tx);
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::pin!(shutdown);
    crate::systemd::ready();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(msg) = rx.recv() => {
                let mut n = node.lock().unwrap();
                if msg.generation == n.probe_generation
                    && let Err(e) = n.on_probe(msg.addr, msg.result, msg.took)
                {
                    error!(error = %format!("{e:#}"), "cannot apply a health change");
                }
            }
            _ = tick.tick() => {
                if let Err(e) = node.lock().unwrap().reconcile() {
                    error!(error = %format!("{e:#}"), "cannot apply warmup progress");
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                let _ = node.lock().unwrap().reload();
            }
        }
        let current = node.lock().unwrap().probe_generation;
        if current != generation {
            generation = current;
            probes.abort_all();
            probes = spawn_probes(&node.lock().unwrap(), &tx);
        }
    }
    crate::systemd::stopping();
    probes.abort_all();
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

/// How long shutdown waits for handlers still running on the blocking pool
/// (a reload, a conntrack walk) to let go of the node.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

async fn release(mut node: Arc<Mutex<Node>>) -> anyhow::Result<Node> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match Arc::try_unwrap(node) {
            Ok(m) => {
                return Ok(m
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner));
            }
            Err(shared) if std::time::Instant::now() < deadline => {
                node = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => anyhow::bail!("an admin request still holds the node after {RELEASE_WAIT:?}"),
        }
    }
}

/// Path of the state directory's token file (for `ctl`).
pub fn default_token_file(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.token")
}
