//! Announcing the VIPs over BGP to ECMP routers in front of several LB
//! nodes (`[announce]`, docs/lb.md "ECMP").
//!
//! The node announces its VIPs while it is healthy — its data plane
//! attached (the control loop runs only then) and at least one relay up —
//! and not drained by the operator (`ctl node drain`); it withdraws them
//! otherwise, and when the daemon stops or dies. bird 2 speaks BGP, as the
//! daemon's child ([`bird`]): the daemon enables or disables the static
//! protocol holding the VIPs on bird's private control socket, and the
//! kernel's parent-death signal stops bird (closing its sessions with a
//! Cease, so routers withdraw at once) when the daemon dies, even by SIGKILL.
//!
//! The [`Node`](crate::lb::Node) publishes what it wants ([`Want`]) on a
//! watch channel; the [`Announcer`] task applies it to bird, re-asserting it
//! every second (a restarted bird starts from its config file), and logs and
//! counts each announcement and withdrawal with its reason.
pub mod bird;
mod config;

use std::{net::IpAddr, path::Path, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

pub use self::config::{AnnounceConfig, Peer};

/// How often the wanted state is asserted to bird again.
const REASSERT_EVERY: Duration = Duration::from_secs(1);

/// Why the node announces or withdraws (a metric label, bounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Data plane attached and at least one relay up.
    Healthy,
    /// No relay passes its health checks.
    NoRelayUp,
    /// `ctl node drain`.
    NodeDrained,
    /// The daemon is stopping (or `[announce]` was turned off by a reload).
    Stopping,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::NoRelayUp => "no_relay_up",
            Self::NodeDrained => "node_drained",
            Self::Stopping => "stopping",
        }
    }
}

/// What the node wants routers to know.
#[derive(Clone, Debug, Serialize)]
pub struct Want {
    pub announce: bool,
    pub reason: Reason,
    /// For the log: "2 of 3 relays up", …
    pub detail: String,
}

impl Want {
    /// The same decision (detail aside).
    pub fn same(&self, other: &Self) -> bool {
        self.announce == other.announce && self.reason == other.reason
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Change {
    action: &'static str,
    reason: &'static str,
}

/// The announcement's series in the balancer's registry (docs/metrics.md).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    announced: Gauge,
    changes: Family<Change, Counter>,
    bird_restarts: Counter,
}

impl Metrics {
    /// Registers the series in `registry` (prefix `smtp_lb_balancer`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "vip_announced",
            "1 while this node announces its VIPs over BGP, 0 while withdrawn",
            m.announced.clone(),
        );
        registry.register(
            "vip_announce_changes",
            "VIP announcements and withdrawals applied to bird, by action and reason",
            m.changes.clone(),
        );
        registry.register(
            "bird_restarts",
            "Times bird exited on its own and was restarted",
            m.bird_restarts.clone(),
        );
        m
    }
}

/// The running announcement: the bird child and the task that drives it.
pub struct Announcer {
    cfg: AnnounceConfig,
    vips: Vec<IpAddr>,
    paths: bird::Paths,
    want: watch::Sender<Want>,
    task: JoinHandle<()>,
    bird: bird::Supervisor,
}

impl Announcer {
    /// Writes bird's config (the VIPs withdrawn unless `initial` announces),
    /// starts bird and the task that applies what the node wants.
    pub fn start(
        cfg: &AnnounceConfig,
        vips: Vec<IpAddr>,
        state_dir: &Path,
        metrics: &Metrics,
        initial: Want,
    ) -> anyhow::Result<Self> {
        let paths = bird::Paths::new(state_dir);
        paths.write_conf(&cfg.bird, &bird::render(cfg, &vips, false))?;
        let bird = bird::Supervisor::start(
            cfg.bird.clone(),
            paths.clone(),
            metrics.bird_restarts.clone(),
        )?;
        metrics.announced.set(0);
        let (want, rx) = watch::channel(initial);
        let task = tokio::spawn(drive(
            rx,
            paths.socket.clone(),
            vips.clone(),
            metrics.clone(),
        ));
        info!(peers = cfg.peers.len(), vips = ?vips, "announcing through bird: VIPs withdrawn until the node is healthy");
        Ok(Self {
            cfg: cfg.clone(),
            vips,
            paths,
            want,
            task,
            bird,
        })
    }

    /// The channel the node publishes what it wants on.
    pub fn sender(&self) -> watch::Sender<Want> {
        self.want.clone()
    }

    /// Whether `cfg` and `vips` are what bird runs with.
    pub fn runs(&self, cfg: &AnnounceConfig, vips: &[IpAddr]) -> bool {
        self.cfg == *cfg && self.vips == vips
    }

    /// A reload changed the peers or the VIPs: rewrites bird's config and
    /// has bird apply it (`configure`; unchanged sessions stay up).
    pub async fn reconfigure(
        &mut self,
        cfg: &AnnounceConfig,
        vips: Vec<IpAddr>,
    ) -> anyhow::Result<()> {
        let announce = self.want.borrow().announce;
        self.paths
            .write_conf(&cfg.bird, &bird::render(cfg, &vips, announce))?;
        bird::control(&self.paths.socket, "configure").await?;
        info!(vips = ?vips, peers = cfg.peers.len(), "bird reconfigured");
        self.cfg = cfg.clone();
        self.vips = vips;
        Ok(())
    }

    /// Withdraws the VIPs (reason [`Reason::Stopping`]), then stops bird.
    pub async fn stop(self, detail: &str) {
        self.want.send_replace(Want {
            announce: false,
            reason: Reason::Stopping,
            detail: detail.to_owned(),
        });
        // The task applies it and ends when the sender is dropped; bounded
        // by the control socket's timeout.
        drop(self.want);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let bird = self.bird;
        let _ = tokio::task::spawn_blocking(move || bird.stop()).await;
    }
}

/// Applies each wanted state to bird, and again every [`REASSERT_EVERY`].
async fn drive(
    mut rx: watch::Receiver<Want>,
    socket: std::path::PathBuf,
    vips: Vec<IpAddr>,
    metrics: Metrics,
) {
    let families: Vec<bool> = [true, false]
        .into_iter()
        .filter(|v4| vips.iter().any(|v| v.is_ipv4() == *v4))
        .collect();
    let mut applied: Option<Want> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(REASSERT_EVERY);
    loop {
        let open = tokio::select! {
            changed = rx.changed() => changed.is_ok(),
            _ = tick.tick() => true,
        };
        let want = rx.borrow_and_update().clone();
        let verb = if want.announce { "enable" } else { "disable" };
        let mut result = Ok(());
        for v4 in &families {
            if let Err(e) =
                bird::control(&socket, &format!("{verb} {}", bird::static_name(*v4))).await
            {
                result = Err(e);
                break;
            }
        }
        match result {
            Ok(()) => {
                if failing {
                    info!("bird answers its control socket again");
                    failing = false;
                }
                if !applied.as_ref().is_some_and(|a| a.same(&want)) {
                    record(&want, applied.as_ref(), &metrics);
                    applied = Some(want.clone());
                }
            }
            Err(e) => {
                if !failing {
                    error!(error = %e, wanted = verb, "cannot tell bird; retrying every second");
                    failing = true;
                }
            }
        }
        // Stopping is the last word: once bird has it, the task is done.
        let stopped = want.reason == Reason::Stopping && !failing;
        if !open || stopped {
            return;
        }
    }
}

/// Logs and counts an applied change.
fn record(want: &Want, before: Option<&Want>, metrics: &Metrics) {
    let action = if want.announce {
        "announce"
    } else {
        "withdraw"
    };
    metrics.announced.set(i64::from(want.announce));
    // The first withdrawal at start is no change: bird starts withdrawn.
    if before.is_none() && !want.announce {
        info!(reason = want.reason.as_str(), detail = %want.detail, "VIPs not announced");
        return;
    }
    if before.is_some_and(|b| b.announce == want.announce) {
        info!(action, reason = want.reason.as_str(), detail = %want.detail, "announcement reason changed");
        return;
    }
    metrics
        .changes
        .get_or_create(&Change {
            action,
            reason: want.reason.as_str(),
        })
        .inc();
    if want.announce {
        info!(reason = want.reason.as_str(), detail = %want.detail, "VIPs announced to the routers");
    } else {
        warn!(reason = want.reason.as_str(), detail = %want.detail, "VIPs withdrawn from the routers");
    }
}
