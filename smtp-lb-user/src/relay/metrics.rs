//! Relay counters, rendered as Prometheus text on the admin listener.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

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
    /// (domain, status) → recipients.
    by_domain: Mutex<BTreeMap<(String, &'static str), u64>>,
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
