//! The balancer's metrics (names in docs/metrics.md): counters the control
//! loop bumps (health checks, transitions, reloads) and, at scrape time, the
//! data plane's counters from the pinned maps and each relay's state.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::Node;
use crate::{
    admin::prom::{self, Sampled, Text},
    balance::weights::Mode,
    dataplane::{Dataplane, Snapshot},
    health::{self, Health, Transition},
};

pub struct Metrics {
    health_checks: Family<BackendResult, Counter>,
    health_duration: Family<Backend, Histogram, fn() -> Histogram>,
    transitions: Family<BackendTo, Counter>,
    reloads: Family<Outcome, Counter>,
    feedback_polls: Family<BackendResult, Counter>,
    feedback_changes: Family<BackendDirection, Counter>,
    admission_closures: Family<Service, Counter>,
    /// The VIP announcement's series (`[announce]`).
    pub announce: crate::announce::Metrics,
    sample: Arc<Mutex<Sample>>,
    /// One render at a time, so two scrapes cannot mix their samples.
    rendering: Mutex<()>,
    registry: Registry,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Backend {
    backend: Text,
    address: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendResult {
    backend: Text,
    address: Text,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendTo {
    backend: Text,
    address: Text,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendDirection {
    backend: Text,
    address: Text,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendFlows {
    backend: Text,
    address: Text,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[expect(clippy::struct_field_names, reason = "the label is called `service`")]
struct Service {
    service: Text,
    vip: Text,
    port: u16,
}

/// A configured service (all its ports): the fail-safe series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceName {
    service: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Verdict {
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Event {
    event: &'static str,
}

/// One relay as sampled.
struct RelayRow {
    labels: Backend,
    up: bool,
    full: bool,
    drained: bool,
    weight: u32,
    share_permille: u32,
    /// (live, closing) conntrack entries; `None` when the maps are unreadable.
    flows: Option<(u64, u64)>,
    /// With `[feedback]`: (share in thousandths, last queue depth, deferred
    /// thousandths over the window).
    feedback: Option<(u32, Option<u64>, Option<u32>)>,
}

/// What a scrape reads from the node and the maps.
#[derive(Default)]
struct Sample {
    started: f64,
    stats: Option<Snapshot>,
    /// Relay address → labels, for the per-backend map rows.
    names: BTreeMap<IpAddr, Backend>,
    relays: Vec<RelayRow>,
    /// (service labels, backends with an effective weight above 0).
    services: Vec<(Service, usize)>,
    /// Per configured service: its fail-safe state.
    failsafe: Vec<(ServiceName, super::Failsafe)>,
    /// With `[feedback.admission]`: per VIP × port, 1 while closed.
    admission: Vec<(Service, i64)>,
    last_reload_ok: bool,
}

impl std::fmt::Debug for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sample").finish_non_exhaustive()
    }
}

/// Health-check times: 1 ms … ~16 s.
fn check_times() -> Histogram {
    prom::histogram(0.001, 2.0, 15)
}

fn backend(names: &std::collections::BTreeSet<String>, address: IpAddr) -> Backend {
    Backend {
        backend: names.iter().next().cloned().unwrap_or_default().into(),
        address: address.to_string().into(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("smtp_lb_balancer");
        let health_checks = Family::default();
        registry.register(
            "health_checks",
            "SMTP health checks of a relay by result (ok, failed)",
            health_checks.clone(),
        );
        let health_duration = Family::new_with_constructor(check_times as fn() -> Histogram);
        registry.register_with_unit(
            "health_check_duration",
            "Time of an SMTP health check: connect, greeting, EHLO (STARTTLS), QUIT",
            Unit::Seconds,
            health_duration.clone(),
        );
        let transitions = Family::default();
        registry.register(
            "health_transitions",
            "Relay state changes by health checks (to up, to down)",
            transitions.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP, ctl reload) by result (applied, refused)",
            reloads.clone(),
        );
        let feedback_polls = Family::default();
        registry.register(
            "backend_feedback_polls",
            "Polls of a relay's metrics for feedback, by result (ok, failed)",
            feedback_polls.clone(),
        );
        let feedback_changes = Family::default();
        registry.register(
            "backend_feedback_changes",
            "Changes of a relay's feedback share, by direction (down, up)",
            feedback_changes.clone(),
        );
        let admission_closures = Family::default();
        registry.register(
            "service_admission_closures",
            "Times a service closed admission: every relay over its queue high-water mark",
            admission_closures.clone(),
        );
        let announce = crate::announce::Metrics::register(&mut registry);
        let sample = Arc::new(Mutex::new(Sample::default()));
        registry.register_collector(Box::new(Sampler(sample.clone())));
        Self {
            health_checks,
            health_duration,
            transitions,
            reloads,
            feedback_polls,
            feedback_changes,
            admission_closures,
            announce,
            sample,
            rendering: Mutex::new(()),
            registry,
        }
    }

    /// One health check of the relay at `address` (named `names`).
    pub fn probe(
        &self,
        names: &std::collections::BTreeSet<String>,
        address: IpAddr,
        outcome: &health::Outcome,
        took: Duration,
    ) {
        let b = backend(names, address);
        self.health_duration
            .get_or_create(&b)
            .observe(took.as_secs_f64());
        self.health_checks
            .get_or_create(&BackendResult {
                backend: b.backend,
                address: b.address,
                result: match outcome {
                    health::Outcome::Passed => "ok",
                    health::Outcome::Full(_) => "full",
                    health::Outcome::Failed(_) => "failed",
                },
            })
            .inc();
    }

    /// The relay at `address` changed health.
    pub fn transition(
        &self,
        names: &std::collections::BTreeSet<String>,
        address: IpAddr,
        to: Transition,
    ) {
        let b = backend(names, address);
        self.transitions
            .get_or_create(&BackendTo {
                backend: b.backend,
                address: b.address,
                to: match to {
                    Transition::WentUp => "up",
                    Transition::WentFull => "full",
                    Transition::WentDown => "down",
                },
            })
            .inc();
    }

    /// A feedback poll of the relay at `address` succeeded (`true`) or failed.
    pub fn feedback_poll(
        &self,
        names: &std::collections::BTreeSet<String>,
        address: IpAddr,
        ok: bool,
    ) {
        let b = backend(names, address);
        self.feedback_polls
            .get_or_create(&BackendResult {
                backend: b.backend,
                address: b.address,
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// The feedback share of the relay at `address` went up (`true`) or down.
    pub fn feedback_change(
        &self,
        names: &std::collections::BTreeSet<String>,
        address: IpAddr,
        up: bool,
    ) {
        let b = backend(names, address);
        self.feedback_changes
            .get_or_create(&BackendDirection {
                backend: b.backend,
                address: b.address,
                direction: if up { "up" } else { "down" },
            })
            .inc();
    }

    /// A service's admission closed (`true`) or opened.
    pub fn admission_change(&self, service: &str, vip: IpAddr, port: u16, closed: bool) {
        if closed {
            self.admission_closures
                .get_or_create(&Service {
                    service: service.into(),
                    vip: vip.to_string().into(),
                    port,
                })
                .inc();
        }
    }

    /// A reload was applied (`true`) or refused.
    pub fn reload(&self, applied: bool) {
        self.reloads
            .get_or_create(&Outcome {
                result: if applied { "applied" } else { "refused" },
            })
            .inc();
    }

    /// The whole page: counters, the maps' counters and every relay's state now.
    pub fn render<D: Dataplane>(&self, node: &Node<D>) -> String {
        let _one = self.rendering.lock().expect("metrics lock");
        let now = SystemTime::now();
        let stats = node.dataplane().stats().ok();
        let flows = node.dataplane().flows().ok();
        let ids: BTreeMap<IpAddr, u32> = stats
            .iter()
            .flat_map(|s| &s.backends)
            .map(|b| (b.address, b.id))
            .collect();
        let relays = node
            .relays
            .iter()
            .map(|(addr, r)| {
                let configured = node.configured_weight(*addr);
                RelayRow {
                    labels: backend(&r.names, *addr),
                    up: r.health() == Health::Up,
                    full: r.health() == Health::Full,
                    drained: r.runtime.drained,
                    weight: r.runtime.weight_override.unwrap_or(configured),
                    share_permille: r.share(now, &node.cfg.warmup),
                    flows: flows.as_ref().map(|f| {
                        ids.get(addr)
                            .and_then(|id| f.get(id))
                            .map_or((0, 0), |(live, all)| (*live, all - live))
                    }),
                    feedback: node.cfg.feedback.enabled.then(|| {
                        let fb = node.feedback.get(addr);
                        (
                            r.runtime.feedback,
                            fb.and_then(|f| f.last).map(|l| l.queue),
                            fb.and_then(|f| f.deferral),
                        )
                    }),
                }
            })
            .collect();
        let services = node
            .applied()
            .map(|applied| {
                applied
                    .services
                    .iter()
                    .flat_map(|s| {
                        let up = s.backends.iter().filter(|b| b.weight > 0).count();
                        s.ports.iter().map(move |port| {
                            (
                                Service {
                                    service: s.label().into(),
                                    vip: s.vip.to_string().into(),
                                    port: *port,
                                },
                                up,
                            )
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        *self.sample.lock().expect("metrics lock") = Sample {
            started: node
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            stats,
            names: node
                .relays
                .iter()
                .map(|(a, r)| (*a, backend(&r.names, *a)))
                .collect(),
            relays,
            services,
            failsafe: node
                .failsafe_by_name()
                .into_iter()
                .map(|(name, f)| {
                    (
                        ServiceName {
                            service: name.into(),
                        },
                        f,
                    )
                })
                .collect(),
            admission: if node.cfg.feedback.enabled && node.cfg.feedback.admission.is_some() {
                node.cfg
                    .services
                    .iter()
                    .flat_map(|s| s.ports.iter().map(move |p| (s, *p)))
                    .map(|(s, port)| {
                        let closed = node
                            .admission
                            .get(&crate::balance::weights::service_id(s.vip, port))
                            .is_some_and(|g| g.closed);
                        (
                            Service {
                                service: s.label().into(),
                                vip: s.vip.to_string().into(),
                                port,
                            },
                            i64::from(closed),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
            last_reload_ok: node.last_reload.as_ref().is_none_or(|r| r.error.is_none()),
        };
        prom::render(&self.registry)
    }
}

/// `drop_no_backend` → (`drop`, `no_backend`); `tx` → (`tx`, `forwarded`).
fn verdict(field: &'static str) -> Option<Verdict> {
    let (verdict, reason) = match field {
        "tx" | "redirect" => (field, "forwarded"),
        f => {
            if let Some(r) = f.strip_prefix("pass_") {
                ("pass", r)
            } else {
                ("drop", f.strip_prefix("drop_")?)
            }
        }
    };
    Some(Verdict { verdict, reason })
}

/// Writes the [`Sample`] taken by [`Metrics::render`].
#[derive(Debug)]
struct Sampler(Arc<Mutex<Sample>>);

impl Collector for Sampler {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        type Get = fn(&crate::dataplane::ServiceRow) -> u64;
        type GetB = fn(&crate::dataplane::BackendRow) -> u64;
        let s = self.0.lock().map_err(|_| std::fmt::Error)?;
        let mut out = Sampled::new(&mut encoder);
        out.identity(s.started)?;
        if let Some(st) = &s.stats {
            out.counters(
                "xdp_packets",
                "Packets by what the XDP program did (verdict) and why (reason).",
                None,
                st.global
                    .iter()
                    .filter_map(|(k, v)| verdict(k).map(|l| (l, *v))),
            )?;
            out.counters(
                "xdp_events",
                "Events on the way: lru_miss (no tracked entry for a non-SYN), rehash (backend removed), flow_table_full (a new flow found no way to take: untracked).",
                None,
                st.global
                    .iter()
                    .filter(|(k, _)| verdict(k).is_none())
                    .map(|(k, v)| (Event { event: k }, *v)),
            )?;
            let service = |vip: IpAddr, port: u16| {
                let name = s
                    .services
                    .iter()
                    .find(|(l, _)| *l.vip.0 == *vip.to_string() && l.port == port)
                    .map_or_else(|| vip.to_string(), |(l, _)| l.service.0.to_string());
                Service {
                    service: name.into(),
                    vip: vip.to_string().into(),
                    port,
                }
            };
            for (name, help, unit, get) in [
                (
                    "service_packets",
                    "Packets forwarded for a service.",
                    None,
                    (|r| r.packets) as Get,
                ),
                (
                    "service",
                    "Bytes forwarded for a service (frames as received).",
                    Some(Unit::Bytes),
                    |r| r.bytes,
                ),
                (
                    "service_new_flows",
                    "New connections (SYNs) balanced for a service.",
                    None,
                    |r| r.new_flows,
                ),
                (
                    "service_no_backend_packets",
                    "Packets dropped because no backend could take them.",
                    None,
                    |r| r.no_backend,
                ),
            ] {
                out.counters(
                    name,
                    help,
                    unit.as_ref(),
                    st.services.iter().map(|r| (service(r.vip, r.port), get(r))),
                )?;
            }
            for (name, help, unit, get) in [
                (
                    "backend_packets",
                    "Packets forwarded to a relay.",
                    None,
                    (|r| r.packets) as GetB,
                ),
                (
                    "backend",
                    "Bytes forwarded to a relay (frames as received).",
                    Some(Unit::Bytes),
                    |r| r.bytes,
                ),
                (
                    "backend_new_flows",
                    "New connections sent to a relay.",
                    None,
                    |r| r.new_flows,
                ),
            ] {
                out.counters(
                    name,
                    help,
                    unit.as_ref(),
                    st.backends
                        .iter()
                        .filter_map(|r| s.names.get(&r.address).map(|l| (l.clone(), get(r)))),
                )?;
            }
        }
        out.gauges(
            "service_backends_available",
            "Backends with an effective weight above 0 in a service's table.",
            None,
            s.services.iter().map(|(l, n)| (l.clone(), *n)),
        )?;
        out.gauges(
            "backend_flows",
            "Conntrack entries pinned to a relay: live, or closing (client sent FIN/RST).",
            None,
            s.relays
                .iter()
                .filter_map(|r| r.flows.map(|f| (r, f)))
                .flat_map(|(r, (live, closing))| {
                    [("live", live), ("closing", closing)].map(|(state, n)| {
                        (
                            BackendFlows {
                                backend: r.labels.backend.clone(),
                                address: r.labels.address.clone(),
                                state,
                            },
                            n,
                        )
                    })
                }),
        )?;
        out.gauges(
            "backend_up",
            "1 while the relay passes its health checks.",
            None,
            s.relays.iter().map(|r| (r.labels.clone(), i64::from(r.up))),
        )?;
        out.gauges(
            "backend_full",
            "1 while the relay is alive but full: it greets health checks with 421.",
            None,
            s.relays
                .iter()
                .map(|r| (r.labels.clone(), i64::from(r.full))),
        )?;
        out.gauges(
            "backend_drained",
            "1 while the relay is drained by the operator.",
            None,
            s.relays
                .iter()
                .map(|r| (r.labels.clone(), i64::from(r.drained))),
        )?;
        out.gauges(
            "backend_weight",
            "Weight in force before warmup: the operator's, else the configured one.",
            None,
            s.relays
                .iter()
                .map(|r| (r.labels.clone(), i64::from(r.weight))),
        )?;
        out.gauges(
            "backend_weight_share",
            "Share of that weight in effect, 0..1 (warmup; 0 when down or drained).",
            None,
            s.relays
                .iter()
                .map(|r| (r.labels.clone(), f64::from(r.share_permille) / 1000.0)),
        )?;
        out.gauges(
            "service_in_panic",
            "1 while too few relays are alive and the service keeps its last good relays.",
            None,
            s.failsafe
                .iter()
                .map(|(l, f)| (l.clone(), i64::from(f.mode == Some(Mode::Panic)))),
        )?;
        out.counters(
            "service_panic",
            "Times the service entered panic (too few relays alive).",
            None,
            s.failsafe.iter().map(|(l, f)| (l.clone(), f.panics)),
        )?;
        out.gauges(
            "service_all_full",
            "1 while every relay alive is full (421) and the full ones take new connections.",
            None,
            s.failsafe
                .iter()
                .map(|(l, f)| (l.clone(), i64::from(f.mode == Some(Mode::Full)))),
        )?;
        out.counters(
            "service_all_full_episodes",
            "Times every relay alive of the service became full.",
            None,
            s.failsafe.iter().map(|(l, f)| (l.clone(), f.all_full)),
        )?;
        let feedback = || s.relays.iter().filter_map(|r| r.feedback.map(|f| (r, f)));
        out.gauges(
            "backend_feedback_share",
            "Share of its weight a relay's feedback (queue depth, deferrals) leaves it, 0..1.",
            None,
            feedback().map(|(r, (share, ..))| (r.labels.clone(), f64::from(share) / 1000.0)),
        )?;
        out.gauges(
            "backend_queue_messages",
            "Messages in a relay's queue at its last feedback poll.",
            None,
            feedback().filter_map(|(r, (_, q, _))| q.map(|q| (r.labels.clone(), q as f64))),
        )?;
        out.gauges(
            "backend_deferral_ratio",
            "Share of a relay's delivery outcomes deferred over the feedback window, 0..1.",
            None,
            feedback()
                .filter_map(|(r, (.., d))| d.map(|d| (r.labels.clone(), f64::from(d) / 1000.0))),
        )?;
        out.gauges(
            "service_admission_closed",
            "1 while new connections to a service are refused (every relay over its queue high-water mark).",
            None,
            s.admission.iter().cloned(),
        )?;
        out.gauge(
            "config_last_reload_successful",
            "0 after a refused reload until one is applied, else 1.",
            None,
            i64::from(s.last_reload_ok),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_counters_split_into_verdict_and_reason() {
        let v = |f| verdict(f).map(|v| (v.verdict, v.reason));
        assert_eq!(v("tx"), Some(("tx", "forwarded")));
        assert_eq!(v("redirect"), Some(("redirect", "forwarded")));
        assert_eq!(v("pass_non_vip"), Some(("pass", "non_vip")));
        assert_eq!(v("drop_no_backend"), Some(("drop", "no_backend")));
        assert_eq!(v("drop_admission"), Some(("drop", "admission")));
        assert_eq!(v("lru_miss"), None);
        assert_eq!(v("rehash"), None);
    }
}
