//! The live dashboard on the balancer's metrics listener: `GET /dashboard`
//! (one page, embedded in the binary: no script from anywhere else) and
//! `GET /dashboard/state.json` (read-only): every relay with its state,
//! weight, warmup share, live flows and sessions per second; and, for relays
//! whose backend entry names their metrics listener (`metrics = "ADDR:PORT"`),
//! delivery and deferral rates per recipient domain, read from their
//! `/metrics`.
//!
//! A sampler reads the per-backend new-flow counters every second and the
//! relays' metrics every few seconds into short rings, so the page has
//! rates and a minute of history on its first load. It holds the node only
//! weakly: it stops when the daemon does and never delays its shutdown.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant, SystemTime},
};

use axum::{Json, Router, http::header, response::IntoResponse, routing::get};
use serde_json::{Value, json};
use tracing::debug;

use super::{Node, lock};
use crate::{
    admin::{client::Client, http::blocking, scrape},
    dataplane::{Dataplane, read_stats},
};

/// Sampling period of the new-flow counters.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The relays' `/metrics` are read this often (each is a whole page).
const RELAYS_EVERY: Duration = Duration::from_secs(3);
/// Samples kept: a minute of history.
const KEEP: usize = 61;
/// Rates are averaged over this window (at least two samples).
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// The relays' counters move in steps of [`RELAYS_EVERY`]: a longer window.
const ISP_RATE_WINDOW: Duration = Duration::from_secs(10);
/// A relay that does not answer this fast is shown as not answering.
const RELAY_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest metrics page read from a relay.
const RELAY_MAX_PAGE: u64 = 8 * 1024 * 1024;

const PAGE: &str = include_str!("dashboard.html");

/// What the sampler keeps for the page.
#[derive(Default)]
struct Samples {
    /// New flows per relay address (sessions).
    sessions: Series<IpAddr>,
    /// Recipients per (domain, status), summed over the relays that answered.
    recipients: Series<(String, String)>,
    relays_configured: usize,
    relays_answering: usize,
}

type Shared<D> = Arc<Mutex<Node<D>>>;

/// `/dashboard` and `/dashboard/state.json`; starts the sampler.
pub fn router<D: Dataplane + Send + 'static>(node: Shared<D>) -> Router {
    let samples = Arc::new(Mutex::new(Samples::default()));
    tokio::spawn(sample(Arc::downgrade(&node), samples.clone()));
    Router::new()
        .route(
            "/dashboard",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                        // The page loads nothing from elsewhere; say so to the browser.
                        (
                            header::CONTENT_SECURITY_POLICY,
                            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
                        ),
                    ],
                    PAGE,
                )
            }),
        )
        .route(
            "/dashboard/state.json",
            get(move || {
                let (node, samples) = (node.clone(), samples.clone());
                async move {
                    match blocking(move || state(&node, &samples)).await {
                        Ok(v) => Json(v).into_response(),
                        Err(e) => e,
                    }
                }
            }),
        )
}

/// Samples until the node is gone. Map reads and HTTP run off the runtime
/// threads; the node is locked only to copy what to read.
async fn sample<D: Send + 'static>(node: Weak<Mutex<Node<D>>>, samples: Arc<Mutex<Samples>>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut relays_due = Instant::now();
    loop {
        tick.tick().await;
        let Some(shared) = node.upgrade() else { return };
        let (pin_dir, relay_metrics) = {
            let n = lock(&shared);
            (n.pin_dir.clone(), n.cfg.dashboard.relay_metrics.clone())
        };
        drop(shared);
        let fetch_relays = Instant::now() >= relays_due;
        if fetch_relays {
            relays_due = Instant::now() + RELAYS_EVERY;
        }
        let samples = samples.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let now = Instant::now();
            let sessions: BTreeMap<IpAddr, u64> = read_stats(&pin_dir)
                .map(|s| {
                    s.backends
                        .iter()
                        .map(|b| (b.address, b.new_flows))
                        .collect()
                })
                .unwrap_or_default();
            lock(&samples).sessions.push(now, sessions);
            if fetch_relays {
                let pages = relay_pages(&relay_metrics);
                let answering = pages.len();
                let mut sum = BTreeMap::new();
                for page in pages {
                    for (k, v) in recipients_by_domain(&page) {
                        *sum.entry(k).or_default() += v;
                    }
                }
                let mut s = lock(&samples);
                s.relays_configured = relay_metrics.len();
                s.relays_answering = answering;
                // Only a complete sum is a counter: a relay that did not
                // answer would look like a reset.
                if answering == relay_metrics.len() && answering > 0 {
                    s.recipients.push(Instant::now(), sum);
                }
            }
        })
        .await;
    }
}

/// Each relay's metrics page, read in parallel; those that fail are left out.
fn relay_pages(addrs: &[SocketAddr]) -> Vec<String> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = addrs
            .iter()
            .map(|addr| {
                scope.spawn(move || {
                    let client =
                        Client::new(*addr, None).with_limits(RELAY_TIMEOUT, RELAY_MAX_PAGE);
                    match client.get(&["metrics"], &[]) {
                        Ok(a) if a.ok() => Some(a.body),
                        Ok(a) => {
                            debug!(relay = %addr, status = a.status, "relay metrics not read");
                            None
                        }
                        Err(e) => {
                            debug!(relay = %addr, error = %format!("{e:#}"), "relay metrics not read");
                            None
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    })
}

/// The page's state: the balancer's view of each relay (the same rows as
/// `ctl backends`) with rates from the samples, and the per-ISP figures.
fn state<D: Dataplane>(node: &Shared<D>, samples: &Mutex<Samples>) -> Value {
    let (rows, iface, services) = {
        let n = lock(node);
        (
            super::api::backend_rows(&n),
            n.iface.clone(),
            n.cfg.services.len(),
        )
    };
    let s = lock(samples);
    let relays: Vec<Value> = rows
        .iter()
        .map(|r| {
            let addr: Option<IpAddr> = r["address"].as_str().and_then(|a| a.parse().ok());
            let up = r["health"] == "up";
            let share = r["share_permille"].as_f64().unwrap_or(0.0) / 1000.0;
            let state = if !up {
                "down"
            } else if r["drained"] == true {
                "drained"
            } else if share < 1.0 {
                "warming"
            } else {
                "up"
            };
            let sessions = addr
                .and_then(|a| s.sessions.last(&a))
                .or(r["new_flows"].as_u64());
            json!({
                "name": r["names"][0],
                "address": r["address"],
                "state": state,
                "weight": r["weight_override"].as_u64().or(r["configured_weight"].as_u64()),
                "weight_override": r["weight_override"],
                "share": share,
                "live_flows": r["live_flows"],
                "sessions": sessions,
                "sessions_per_sec": addr.and_then(|a| s.sessions.rate(&a, RATE_WINDOW)),
                "sessions_history": addr.map(|a| s.sessions.history(&a)).unwrap_or_default(),
            })
        })
        .collect();
    let domains: BTreeSet<String> = s.recipients.keys().into_iter().map(|(d, _)| d).collect();
    let key = |d: &str, status: &str| (d.to_owned(), status.to_owned());
    let domains: Vec<Value> = domains
        .iter()
        .map(|d| {
            json!({
                "domain": d,
                "delivered": s.recipients.last(&key(d, "delivered")).unwrap_or(0),
                "deferred": s.recipients.last(&key(d, "deferred")).unwrap_or(0),
                "bounced": s.recipients.last(&key(d, "bounced")).unwrap_or(0),
                "delivered_per_sec": s.recipients.rate(&key(d, "delivered"), ISP_RATE_WINDOW),
                "deferred_per_sec": s.recipients.rate(&key(d, "deferred"), ISP_RATE_WINDOW),
            })
        })
        .collect();
    json!({
        "now_unix": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
        "node": { "interface": iface, "services": services },
        "relays": relays,
        "isps": {
            "relays_configured": s.relays_configured,
            "relays_answering": s.relays_answering,
            "domains": domains,
        },
    })
}

/// Counters sampled over time, keyed by `K`.
#[derive(Debug)]
pub struct Series<K> {
    samples: VecDeque<(Instant, BTreeMap<K, u64>)>,
}

impl<K: Ord + Clone> Default for Series<K> {
    fn default() -> Self {
        Self {
            samples: VecDeque::with_capacity(KEEP),
        }
    }
}

impl<K: Ord + Clone> Series<K> {
    pub fn push(&mut self, at: Instant, counters: BTreeMap<K, u64>) {
        if self.samples.len() == KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back((at, counters));
    }

    /// The newest value of `key`.
    pub fn last(&self, key: &K) -> Option<u64> {
        self.samples.back().and_then(|(_, c)| c.get(key).copied())
    }

    /// Per second over the newest `window` (from the newest sample at or
    /// before its start); `None` with fewer than two samples. A counter
    /// that went down (a reset) counts from zero.
    pub fn rate(&self, key: &K, window: Duration) -> Option<f64> {
        let (t1, c1) = self.samples.back()?;
        let (t0, c0) = self
            .samples
            .iter()
            .rev()
            .skip(1)
            .find(|(t, _)| t1.duration_since(*t) >= window)
            .or_else(|| self.samples.front().filter(|(t, _)| t < t1))?;
        let secs = t1.duration_since(*t0).as_secs_f64();
        let (a, b) = (
            c0.get(key).copied().unwrap_or(0),
            c1.get(key).copied().unwrap_or(0),
        );
        Some(increase(a, b) as f64 / secs)
    }

    /// Per-second rate between consecutive samples, oldest first.
    pub fn history(&self, key: &K) -> Vec<f64> {
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|((t0, c0), (t1, c1))| {
                let (a, b) = (
                    c0.get(key).copied().unwrap_or(0),
                    c1.get(key).copied().unwrap_or(0),
                );
                let secs = t1.duration_since(*t0).as_secs_f64().max(1e-3);
                increase(a, b) as f64 / secs
            })
            .collect()
    }

    pub fn keys(&self) -> BTreeSet<K> {
        self.samples
            .back()
            .map(|(_, c)| c.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// How much a counter grew from `a` to `b`; after a reset (a restarted
/// relay), from zero.
fn increase(a: u64, b: u64) -> u64 {
    if b >= a { b - a } else { b }
}

/// `smtp_lb_relay_recipients_total` of one relay's metrics page, by
/// (domain, status). Other lines, and lines that do not parse, are skipped:
/// a relay's page is input like any other.
pub fn recipients_by_domain(page: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for (labels, value) in scrape::samples(page, "smtp_lb_relay_recipients_total") {
        if let (Some(domain), Some(status)) = (labels.get("domain"), labels.get("status")) {
            #[expect(clippy::cast_sign_loss, reason = "scrape keeps finite values >= 0")]
            let value = value as u64;
            *out.entry((domain.clone(), status.clone())).or_default() += value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, secs: u64) -> Instant {
        base + Duration::from_secs(secs)
    }

    #[test]
    fn rates_come_from_the_window_and_history_from_each_step() {
        let t = Instant::now();
        let mut s = Series::<&str>::default();
        assert_eq!(s.rate(&"r1", RATE_WINDOW), None);
        for (i, v) in [0u64, 10, 30, 60, 100, 150, 210].into_iter().enumerate() {
            s.push(at(t, i as u64), BTreeMap::from([("r1", v)]));
        }
        // Over the last 5 s: 210 - 10 = 200 → 40/s.
        assert_eq!(s.rate(&"r1", RATE_WINDOW), Some(40.0));
        assert_eq!(s.history(&"r1"), vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        assert_eq!(s.last(&"r1"), Some(210));
        // A key that appears later counts from zero; a reset counts from zero.
        s.push(at(t, 7), BTreeMap::from([("r1", 5), ("r2", 4)]));
        assert_eq!(s.history(&"r1").last(), Some(&5.0));
        assert_eq!(s.history(&"r2").last(), Some(&4.0));
    }

    #[test]
    fn the_ring_keeps_a_minute() {
        let t = Instant::now();
        let mut s = Series::<u8>::default();
        for i in 0..200 {
            s.push(at(t, i), BTreeMap::from([(1, i * 2)]));
        }
        assert_eq!(s.history(&1).len(), KEEP - 1);
        assert_eq!(s.rate(&1, RATE_WINDOW), Some(2.0));
    }

    #[test]
    fn a_rate_needs_two_samples_even_within_the_window() {
        let t = Instant::now();
        let mut s = Series::<u8>::default();
        s.push(t, BTreeMap::from([(1, 5)]));
        assert_eq!(s.rate(&1, RATE_WINDOW), None);
        s.push(at(t, 2), BTreeMap::from([(1, 9)]));
        assert_eq!(s.rate(&1, RATE_WINDOW), Some(2.0));
    }

    #[test]
    fn recipients_are_read_by_domain_and_status_from_a_metrics_page() {
        let page = "# HELP smtp_lb_relay_recipients_total x\n# TYPE smtp_lb_relay_recipients_total counter\n\
            smtp_lb_relay_recipients_total{domain=\"gmail.com\",status=\"delivered\"} 12\n\
            smtp_lb_relay_recipients_total{status=\"deferred\",domain=\"gmail.com\"} 3 1700000000000\n\
            smtp_lb_relay_recipients_total{domain=\"we\\\"ird\",status=\"bounced\"} 1.0\n\
            smtp_lb_relay_recipients_total{domain=\"x\",status=\"delivered\"} NaN\n\
            smtp_lb_relay_recipients_total{domain=\"x\",status=\"delivered\"} -4\n\
            smtp_lb_relay_recipients_total{domain=\"broken\n\
            smtp_lb_relay_queue_messages 7\n";
        let r = recipients_by_domain(page);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[&("gmail.com".into(), "delivered".into())], 12);
        assert_eq!(r[&("gmail.com".into(), "deferred".into())], 3);
        assert_eq!(r[&("we\"ird".into(), "bounced".into())], 1);
    }
}
