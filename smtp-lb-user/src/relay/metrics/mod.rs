//! The relay's metrics (names in docs/metrics.md): the counters the
//! subsystems bump, and one registry that renders them with the values
//! sampled at scrape time (queue depth, egress state, cluster).
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{egress::WarmupProgress, policy::cluster::ClusterStats};
use crate::admin::prom::{self, Bounded, Sampled, Text};
use crate::smtp::client::ClientError;

/// Recipient domains with a label of their own; later ones count as `other`.
const DOMAIN_LABELS: usize = 100;
/// Distinct reply codes with a label of their own.
const CODE_LABELS: usize = 200;

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
    recipients: Family<DomainOutcome, Counter>,
    egress_recipients: Family<PairOutcome, Counter>,
    egress_connections: Family<Pair, Gauge>,
    throttle_wait: Family<Pair, Counter<f64, AtomicU64>>,
    tls: Family<TlsOutcome, Counter>,
    tls_fallbacks: Counter,
    handshake: Family<Provider, Histogram, fn() -> Histogram>,
    transaction: Family<Provider, Histogram, fn() -> Histogram>,
    delivery_delay: Family<Provider, Histogram, fn() -> Histogram>,
    domains: Bounded,
    codes: Bounded,
    /// Values sampled when `/metrics` is served, read by the registry's collector.
    sample: Arc<Mutex<Sample>>,
    /// One render at a time, so two scrapes cannot mix their samples.
    rendering: Mutex<()>,
    registry: Registry,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainOutcome {
    domain: Text,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairOutcome {
    provider: Text,
    source: Text,
    status: &'static str,
    code: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pair {
    provider: Text,
    source: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Provider {
    provider: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsOutcome {
    direction: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
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

/// Everything rendered from values rather than from counters.
#[derive(Default)]
struct Sample {
    started: f64,
    ingress_total: u64,
    ingress_open: i64,
    ingress_refused: u64,
    accepted: u64,
    spool_errors: u64,
    spool_corrupt: u64,
    dkim_signed: u64,
    dkim_errors: u64,
    queue_messages: usize,
    queue_oldest_secs: u64,
    /// (redis up, outages, local decisions) with `[cluster]`.
    cluster: Option<(bool, u64, u64)>,
    egress: EgressSample,
}

/// Histogram of SMTP exchange times: 5 ms … ~82 s.
fn smtp_times() -> Histogram {
    prom::histogram(0.005, 2.0, 15)
}

/// Histogram of queueing delays: 1 s … ~6 days.
fn queue_delays() -> Histogram {
    prom::histogram(1.0, 3.0, 13)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("smtp_lb_relay");
        let recipients = Family::default();
        registry.register(
            "recipients",
            "Recipient outcomes by destination domain (the first 100 domains, then `other`)",
            recipients.clone(),
        );
        let egress_recipients = Family::default();
        registry.register(
            "egress_recipients",
            "Recipient outcomes by provider, egress source and enhanced status code",
            egress_recipients.clone(),
        );
        let egress_connections = Family::default();
        registry.register(
            "egress_connections_open",
            "Delivery connections open now by provider and egress source",
            egress_connections.clone(),
        );
        let throttle_wait = Family::default();
        registry.register_with_unit(
            "egress_throttle_wait",
            "Time connections and messages waited for shaping limits",
            Unit::Seconds,
            throttle_wait.clone(),
        );
        let tls = Family::default();
        registry.register(
            "tls_handshakes",
            "STARTTLS handshakes by direction (ingress, egress) and result (ok, failed)",
            tls.clone(),
        );
        let tls_fallbacks = Counter::default();
        registry.register(
            "egress_tls_fallbacks",
            "Delivery connections made again in plain text after a failed TLS handshake",
            tls_fallbacks.clone(),
        );
        let handshake = Family::new_with_constructor(smtp_times as fn() -> Histogram);
        registry.register_with_unit(
            "egress_handshake",
            "Time to open a delivery connection: connect, greeting, EHLO, STARTTLS",
            Unit::Seconds,
            handshake.clone(),
        );
        let transaction = Family::new_with_constructor(smtp_times as fn() -> Histogram);
        registry.register_with_unit(
            "egress_transaction",
            "Time of one SMTP transaction, MAIL FROM to the reply after the final dot",
            Unit::Seconds,
            transaction.clone(),
        );
        let delivery_delay = Family::new_with_constructor(queue_delays as fn() -> Histogram);
        registry.register_with_unit(
            "delivery_delay",
            "Time from spooling to delivery, per delivered recipient",
            Unit::Seconds,
            delivery_delay.clone(),
        );
        let sample = Arc::new(Mutex::new(Sample {
            started: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            ..Sample::default()
        }));
        registry.register_collector(Box::new(Sampler(sample.clone())));
        Self {
            accepted: AtomicU64::new(0),
            spool_errors: AtomicU64::new(0),
            spool_corrupt: AtomicU64::new(0),
            dkim_signed: AtomicU64::new(0),
            dkim_errors: AtomicU64::new(0),
            ingress_connections_total: AtomicU64::new(0),
            ingress_connections_active: AtomicI64::new(0),
            ingress_connections_refused: AtomicU64::new(0),
            cluster: Arc::default(),
            recipients,
            egress_recipients,
            egress_connections,
            throttle_wait,
            tls,
            tls_fallbacks,
            handshake,
            transaction,
            delivery_delay,
            domains: Bounded::new(DOMAIN_LABELS),
            codes: Bounded::new(CODE_LABELS),
            sample,
            rendering: Mutex::new(()),
            registry,
        }
    }

    /// Counts one recipient outcome (`delivered`, `deferred`, `bounced`, `expired`).
    pub fn count(&self, domain: &str, status: &'static str) {
        self.recipients
            .get_or_create(&DomainOutcome {
                domain: self.domains.label(domain),
                status,
            })
            .inc();
    }

    /// Recipients counted with `status`, over all domains (read from the
    /// page, as a scraper would).
    #[cfg(test)]
    pub fn total(&self, status: &str) -> u64 {
        let tag = format!("status=\"{status}\"}} ");
        self.render(0, 0, EgressSample::default())
            .lines()
            .filter(|l| l.starts_with("smtp_lb_relay_recipients_total{"))
            .filter_map(|l| l.split_once(&tag)?.1.parse::<u64>().ok())
            .sum()
    }

    /// Counts one recipient outcome per (provider, source, enhanced code).
    pub fn count_pair(&self, provider: &str, source: &str, status: &'static str, code: &str) {
        self.egress_recipients
            .get_or_create(&PairOutcome {
                provider: provider.into(),
                source: source.into(),
                status,
                code: self.codes.label(code),
            })
            .inc();
    }

    /// A recipient of `provider` delivered `age` after it was spooled.
    pub fn delivered_after(&self, provider: &str, age: Duration) {
        self.delivery_delay
            .get_or_create(&Provider {
                provider: provider.into(),
            })
            .observe(age.as_secs_f64());
    }

    /// A delivery connection of (provider, source) opened or closed.
    pub fn connection(&self, pair: &(String, String), open: bool) {
        let g = self.egress_connections.get_or_create(&Pair {
            provider: pair.0.as_str().into(),
            source: pair.1.as_str().into(),
        });
        if open {
            g.inc();
        } else {
            g.dec();
        }
    }

    /// Time a (provider, source) connection or message waited for its limits.
    pub fn throttled(&self, pair: &(String, String), waited: Duration) {
        if waited.is_zero() {
            return;
        }
        self.throttle_wait
            .get_or_create(&Pair {
                provider: pair.0.as_str().into(),
                source: pair.1.as_str().into(),
            })
            .inc_by(waited.as_secs_f64());
    }

    /// A STARTTLS handshake with a client (`ingress`) or an MX (`egress`).
    pub fn tls(&self, direction: &'static str, ok: bool) {
        self.tls
            .get_or_create(&TlsOutcome {
                direction,
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// A failed TLS handshake with an MX, and the plain-text connection made instead.
    pub fn tls_fallback(&self) {
        self.tls("egress", false);
        self.tls_fallbacks.inc();
    }

    /// One attempt to open a delivery connection to `provider`, which took
    /// `took`: `Ok(tls)` opened (TLS in use or not), or why it failed.
    pub fn connect_attempt(
        &self,
        provider: &str,
        took: Duration,
        attempt: Result<bool, &ClientError>,
    ) {
        match attempt {
            Ok(tls) => {
                self.handshake
                    .get_or_create(&Provider {
                        provider: provider.into(),
                    })
                    .observe(took.as_secs_f64());
                if tls {
                    self.tls("egress", true);
                }
            }
            Err(
                ClientError::TimedOut {
                    phase: "TLS handshake",
                    ..
                }
                | ClientError::Io {
                    phase: "TLS handshake",
                    ..
                },
            ) => self.tls("egress", false),
            Err(_) => {}
        }
    }

    /// One SMTP transaction to `provider` took `took`.
    pub fn transaction(&self, provider: &str, took: Duration) {
        self.transaction
            .get_or_create(&Provider {
                provider: provider.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// The whole page: counters, and the values sampled now.
    pub fn render(&self, queue_depth: usize, oldest_secs: u64, egress: EgressSample) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _one = self.rendering.lock().expect("metrics lock");
        let mut s = self.sample.lock().expect("metrics lock");
        s.ingress_total = load(&self.ingress_connections_total);
        s.ingress_open = self.ingress_connections_active.load(Ordering::Relaxed);
        s.ingress_refused = load(&self.ingress_connections_refused);
        s.accepted = load(&self.accepted);
        s.spool_errors = load(&self.spool_errors);
        s.spool_corrupt = load(&self.spool_corrupt);
        s.dkim_signed = load(&self.dkim_signed);
        s.dkim_errors = load(&self.dkim_errors);
        s.queue_messages = queue_depth;
        s.queue_oldest_secs = oldest_secs;
        s.cluster = self.cluster.configured.load(Ordering::Relaxed).then(|| {
            (
                self.cluster.redis_up.load(Ordering::Relaxed),
                load(&self.cluster.outages),
                load(&self.cluster.local),
            )
        });
        s.egress = egress;
        drop(s);
        prom::render(&self.registry)
    }
}

/// Writes the [`Sample`] taken by [`Metrics::render`].
#[derive(Debug)]
struct Sampler(Arc<Mutex<Sample>>);

impl std::fmt::Debug for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sample").finish_non_exhaustive()
    }
}

impl Collector for Sampler {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.lock().map_err(|_| std::fmt::Error)?;
        let mut out = Sampled::new(&mut encoder);
        out.identity(s.started)?;
        out.counter(
            "ingress_connections",
            "SMTP connections accepted.",
            s.ingress_total,
        )?;
        out.gauge(
            "ingress_connections_open",
            "SMTP connections open now.",
            None,
            s.ingress_open,
        )?;
        out.counter(
            "ingress_connections_refused",
            "SMTP connections refused over the connection limit.",
            s.ingress_refused,
        )?;
        out.counter(
            "messages_accepted",
            "Messages spooled and acknowledged with 250, plus the DSNs the relay generated.",
            s.accepted,
        )?;
        out.counter(
            "spool_write_errors",
            "Transactions refused with 451 because the spool write failed.",
            s.spool_errors,
        )?;
        out.gauge(
            "spool_corrupt_segments",
            "Corrupt spool segments found at start-up.",
            None,
            s.spool_corrupt,
        )?;
        out.counters(
            "dkim_signatures",
            "DKIM signing at ingress: signed, or failed (spooled unsigned).",
            None,
            [
                (Outcome { result: "signed" }, s.dkim_signed),
                (Outcome { result: "failed" }, s.dkim_errors),
            ],
        )?;
        out.gauge(
            "queue_messages",
            "Messages in the queue.",
            None,
            s.queue_messages,
        )?;
        out.gauge(
            "queue_oldest_message_age",
            "Age of the oldest queued message (0 when empty).",
            Some(&Unit::Seconds),
            s.queue_oldest_secs,
        )?;
        if let Some((up, outages, local)) = s.cluster {
            out.gauge(
                "cluster_redis_up",
                "1 while the cluster's Redis answers (shared limits), 0 while limits are local.",
                None,
                i64::from(up),
            )?;
            out.counter(
                "cluster_outages",
                "Times the cluster's Redis was lost.",
                outages,
            )?;
            out.counter(
                "cluster_local_decisions",
                "Limit operations decided locally because Redis was down.",
                local,
            )?;
        }
        let pair = |p: &str, s: &str| Pair {
            provider: p.into(),
            source: s.into(),
        };
        let e = &s.egress;
        out.gauges(
            "egress_ready_jobs",
            "Jobs waiting in the ready queue of (egress source, provider).",
            None,
            e.ready.iter().map(|(p, s, n)| (pair(p, s), *n)),
        )?;
        out.counters(
            "egress_suspensions",
            "Suspensions of (provider, egress source) by reply rules.",
            None,
            e.suspensions.iter().map(|(p, s, n, _)| (pair(p, s), *n)),
        )?;
        out.gauges(
            "egress_suspended",
            "1 while (provider, egress source) is suspended.",
            None,
            e.suspensions
                .iter()
                .map(|(p, s, _, now)| (pair(p, s), i64::from(*now))),
        )?;
        out.gauges(
            "egress_source_unplumbed",
            "1 while an egress source is out of its pools because its address is not on this host.",
            None,
            e.unplumbed.iter().map(|(s, now)| {
                (
                    Source {
                        source: s.as_str().into(),
                    },
                    i64::from(*now),
                )
            }),
        )?;
        // Keyed so a pair is written once even if sampled twice.
        let warm: BTreeMap<(&str, &str), (u64, u64)> = e
            .warmup
            .iter()
            .map(|w| {
                (
                    (w.provider.as_str(), w.source.as_str()),
                    (w.sent_day, w.daily_cap),
                )
            })
            .collect();
        out.gauges(
            "egress_warmup_sent_messages",
            "Messages a warming source sent to a provider on its current warmup day.",
            None,
            warm.iter().map(|((p, s), (sent, _))| (pair(p, s), *sent)),
        )?;
        out.gauges(
            "egress_warmup_cap_messages",
            "Daily cap of a warming source for a provider on its current warmup day.",
            None,
            warm.iter().map(|((p, s), (_, cap))| (pair(p, s), *cap)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
