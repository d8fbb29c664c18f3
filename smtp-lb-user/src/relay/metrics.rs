//! Relay counters, rendered as Prometheus text on the admin listener.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use super::{egress::WarmupProgress, policy::cluster::ClusterStats};

#[derive(Default)]
pub struct Metrics {
    /// Messages accepted with `250` after being spooled (DSNs included).
    pub accepted: AtomicU64,
    /// Transactions refused because the spool failed (`451`).
    pub spool_errors: AtomicU64,
    /// Corrupt spool segments found at start-up.
    pub spool_corrupt: AtomicU64,
    /// Messages signed with DKIM at ingress.
    pub dkim_signed: AtomicU64,
    /// Messages whose DKIM signing failed (spooled unsigned).
    pub dkim_errors: AtomicU64,
    pub ingress_connections_total: AtomicU64,
    pub ingress_connections_active: AtomicI64,
    /// Connections refused over the connection limit.
    pub ingress_connections_refused: AtomicU64,
    /// The cluster's counters (owned by `policy::cluster`).
    pub cluster: Arc<ClusterStats>,
    /// (domain, status) → recipients.
    by_domain: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// (provider, source, status, enhanced code) → recipients.
    by_pair: Mutex<BTreeMap<PairOutcome, u64>>,
    /// (provider, source) → connections open now, seconds waited for shaping.
    pair_gauges: Mutex<BTreeMap<(String, String), PairGauges>>,
}

/// (provider, source, status, enhanced code).
type PairOutcome = (String, String, &'static str, String);

#[derive(Default)]
struct PairGauges {
    connections: i64,
    throttle_secs: f64,
}

/// Egress state sampled when `/metrics` is served.
#[derive(Default)]
pub struct EgressSample {
    /// (provider, source, jobs waiting in the ready queue).
    pub ready: Vec<(String, String, usize)>,
    /// (provider, source, suspensions so far, suspended now).
    pub suspensions: Vec<(String, String, u64, bool)>,
    /// (source, unplumbed now).
    pub unplumbed: Vec<(String, bool)>,
    pub warmup: Vec<WarmupProgress>,
}

fn esc(s: &str) -> String {
    s.replace(['"', '\\', '\n'], "_")
}

impl Metrics {
    /// Counts one recipient outcome (`delivered`, `deferred`, `bounced`, `expired`).
    pub fn count(&self, domain: &str, status: &'static str) {
        *self
            .by_domain
            .lock()
            .expect("metrics lock")
            .entry((domain.to_owned(), status))
            .or_default() += 1;
    }

    /// Counts one recipient outcome per (provider, source, enhanced code).
    pub fn count_pair(&self, provider: &str, source: &str, status: &'static str, code: String) {
        *self
            .by_pair
            .lock()
            .expect("metrics lock")
            .entry((provider.to_owned(), source.to_owned(), status, code))
            .or_default() += 1;
    }

    /// A delivery connection of (provider, source) opened or closed.
    pub fn connection(&self, pair: &(String, String), open: bool) {
        let mut g = self.pair_gauges.lock().expect("metrics lock");
        g.entry(pair.clone()).or_default().connections += if open { 1 } else { -1 };
    }

    /// Time a (provider, source) connection or message waited for its limits.
    pub fn throttled(&self, pair: &(String, String), waited: std::time::Duration) {
        if waited.is_zero() {
            return;
        }
        let mut g = self.pair_gauges.lock().expect("metrics lock");
        g.entry(pair.clone()).or_default().throttle_secs += waited.as_secs_f64();
    }

    /// The egress series (issue 6), appended to [`Self::render`].
    pub fn render_egress(&self, e: &EgressSample) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        };
        head(
            &mut out,
            "smtp_lb_relay_delivery_total",
            "Recipient outcomes by provider, egress source and enhanced status code.",
            "counter",
        );
        for ((p, s, status, code), n) in self.by_pair.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "smtp_lb_relay_delivery_total{{provider=\"{}\",source=\"{}\",status=\"{status}\",code=\"{}\"}} {n}",
                esc(p),
                esc(s),
                esc(code)
            );
        }
        let gauges = self.pair_gauges.lock().expect("metrics lock");
        head(
            &mut out,
            "smtp_lb_relay_connections",
            "Delivery connections open now by provider and egress source.",
            "gauge",
        );
        for ((p, s), g) in gauges.iter() {
            let _ = writeln!(
                out,
                "smtp_lb_relay_connections{{provider=\"{}\",source=\"{}\"}} {}",
                esc(p),
                esc(s),
                g.connections
            );
        }
        head(
            &mut out,
            "smtp_lb_relay_throttle_seconds_total",
            "Seconds connections and messages waited for shaping limits.",
            "counter",
        );
        for ((p, s), g) in gauges.iter() {
            let _ = writeln!(
                out,
                "smtp_lb_relay_throttle_seconds_total{{provider=\"{}\",source=\"{}\"}} {:.3}",
                esc(p),
                esc(s),
                g.throttle_secs
            );
        }
        drop(gauges);
        head(
            &mut out,
            "smtp_lb_relay_ready_jobs",
            "Jobs waiting in the ready queue of (egress source, provider).",
            "gauge",
        );
        for (p, s, n) in &e.ready {
            let _ = writeln!(
                out,
                "smtp_lb_relay_ready_jobs{{provider=\"{}\",source=\"{}\"}} {n}",
                esc(p),
                esc(s)
            );
        }
        head(
            &mut out,
            "smtp_lb_relay_suspensions_total",
            "Suspensions of (provider, egress source) by 421 4.7.28.",
            "counter",
        );
        for (p, s, n, _) in &e.suspensions {
            let _ = writeln!(
                out,
                "smtp_lb_relay_suspensions_total{{provider=\"{}\",source=\"{}\"}} {n}",
                esc(p),
                esc(s)
            );
        }
        head(
            &mut out,
            "smtp_lb_relay_suspended",
            "1 while (provider, egress source) is suspended.",
            "gauge",
        );
        for (p, s, _, now) in &e.suspensions {
            let _ = writeln!(
                out,
                "smtp_lb_relay_suspended{{provider=\"{}\",source=\"{}\"}} {}",
                esc(p),
                esc(s),
                u8::from(*now)
            );
        }
        head(
            &mut out,
            "smtp_lb_relay_source_unplumbed",
            "1 while an egress source is out of its pools because its address is not on this host.",
            "gauge",
        );
        for (s, now) in &e.unplumbed {
            let _ = writeln!(
                out,
                "smtp_lb_relay_source_unplumbed{{source=\"{}\"}} {}",
                esc(s),
                u8::from(*now)
            );
        }
        head(
            &mut out,
            "smtp_lb_relay_warmup_sent",
            "Messages a warming source sent to a provider in the current warmup day.",
            "gauge",
        );
        for w in &e.warmup {
            let _ = writeln!(
                out,
                "smtp_lb_relay_warmup_sent{{provider=\"{}\",source=\"{}\"}} {}",
                esc(&w.provider),
                esc(&w.source),
                w.sent_day
            );
        }
        head(
            &mut out,
            "smtp_lb_relay_warmup_cap",
            "Daily cap of a warming source for a provider on its current warmup day.",
            "gauge",
        );
        for w in &e.warmup {
            let _ = writeln!(
                out,
                "smtp_lb_relay_warmup_cap{{provider=\"{}\",source=\"{}\"}} {}",
                esc(&w.provider),
                esc(&w.source),
                w.daily_cap
            );
        }
        out
    }

    /// Total over all domains for one status.
    pub fn total(&self, status: &str) -> u64 {
        self.by_domain
            .lock()
            .expect("metrics lock")
            .iter()
            .filter(|((_, s), _)| *s == status)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn render(&self, queue_depth: usize, oldest_secs: u64) -> String {
        let mut out = String::new();
        let c = |out: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        };
        c(
            &mut out,
            "smtp_lb_relay_accepted_total",
            "Messages accepted after spooling.",
            "counter",
            self.accepted.load(Ordering::Relaxed).to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_spool_errors_total",
            "Transactions refused with 451 because the spool failed.",
            "counter",
            self.spool_errors.load(Ordering::Relaxed).to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_dkim_signed_total",
            "Messages signed with DKIM at ingress.",
            "counter",
            self.dkim_signed.load(Ordering::Relaxed).to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_dkim_errors_total",
            "Messages whose DKIM signing failed; they were spooled unsigned.",
            "counter",
            self.dkim_errors.load(Ordering::Relaxed).to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_spool_corrupt_segments",
            "Corrupt spool segments found at start-up.",
            "gauge",
            self.spool_corrupt.load(Ordering::Relaxed).to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_ingress_connections_total",
            "Ingress connections accepted.",
            "counter",
            self.ingress_connections_total
                .load(Ordering::Relaxed)
                .to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_ingress_connections",
            "Ingress connections open now.",
            "gauge",
            self.ingress_connections_active
                .load(Ordering::Relaxed)
                .to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_ingress_connections_refused_total",
            "Ingress connections refused over the limit.",
            "counter",
            self.ingress_connections_refused
                .load(Ordering::Relaxed)
                .to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_queue_messages",
            "Messages in the queue.",
            "gauge",
            queue_depth.to_string(),
        );
        c(
            &mut out,
            "smtp_lb_relay_queue_oldest_seconds",
            "Age of the oldest queued message.",
            "gauge",
            oldest_secs.to_string(),
        );
        if self.cluster.configured.load(Ordering::Relaxed) {
            c(
                &mut out,
                "smtp_lb_relay_cluster_redis_up",
                "1 while the cluster's Redis answers (shared limits), 0 while limits are local.",
                "gauge",
                u8::from(self.cluster.redis_up.load(Ordering::Relaxed)).to_string(),
            );
            c(
                &mut out,
                "smtp_lb_relay_cluster_outages_total",
                "Times the cluster's Redis was lost.",
                "counter",
                self.cluster.outages.load(Ordering::Relaxed).to_string(),
            );
            c(
                &mut out,
                "smtp_lb_relay_cluster_local_decisions_total",
                "Limit operations decided locally because Redis was down.",
                "counter",
                self.cluster.local.load(Ordering::Relaxed).to_string(),
            );
        }
        let _ = write!(
            out,
            "# HELP smtp_lb_relay_recipients_total Recipient outcomes by destination domain.\n# TYPE smtp_lb_relay_recipients_total counter\n"
        );
        for ((domain, status), n) in self.by_domain.lock().expect("metrics lock").iter() {
            let domain = domain.replace(['"', '\\', '\n'], "_");
            let _ = writeln!(
                out,
                "smtp_lb_relay_recipients_total{{domain=\"{domain}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}
