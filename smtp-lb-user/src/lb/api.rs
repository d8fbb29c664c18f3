//! The balancer's admin API, served on loopback with a bearer token.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/status` | daemon, interface, config file, last reload, global counters |
//! | GET | `/backends` | per relay: health, weights, warmup, history, counters, flows |
//! | GET | `/where?vip=A&port=P&client=C&cport=Q` | where a new SYN goes; tracked flow |
//! | GET | `/metrics` | Prometheus text (also on the metrics listener, without a token) |
//! | POST | `/backends/NAME/drain`, `/undrain` | drain: weight 0, flows continue |
//! | POST | `/backends/NAME/weight?value=N` (`value=config` clears) | operator weight |
//! | POST | `/reload` | re-read the config file; 422 with the reason if refused |
//! | POST | `/node/drain`, `/node/undrain` | withdraw the VIPs from the routers (`[announce]`), or announce them again |
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{
    Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use super::Node;
use crate::{
    admin::{
        http::{blocking, error, json},
        prom,
    },
    balance::weights::{service_id, unix},
    dataplane::Dataplane,
};

type Shared<D> = Arc<Mutex<Node<D>>>;
type Params = Query<BTreeMap<String, String>>;

/// The admin API's routes (the caller adds the token and serves them).
pub fn router<D: Dataplane + Send + 'static>(node: Shared<D>) -> Router {
    Router::new()
        .route(
            "/status",
            get(|State(n): State<Shared<D>>| with(n, |n| json(status(n)))),
        )
        .route(
            "/backends",
            get(|State(n): State<Shared<D>>| with(n, |n| json(Value::Array(backend_rows(n))))),
        )
        .route(
            "/where",
            get(|State(n): State<Shared<D>>, Query(q): Params| with(n, move |n| where_(n, &q))),
        )
        .route(
            "/metrics",
            get(|State(n): State<Shared<D>>| with(n, |n| metrics_page(n))),
        )
        .route(
            "/backends/{name}/drain",
            post(|State(n): State<Shared<D>>, Path(name): Path<String>| {
                with(n, move |n| done(n.set_drained(&name, true)))
            }),
        )
        .route(
            "/backends/{name}/undrain",
            post(|State(n): State<Shared<D>>, Path(name): Path<String>| {
                with(n, move |n| done(n.set_drained(&name, false)))
            }),
        )
        .route(
            "/backends/{name}/weight",
            post(
                |State(n): State<Shared<D>>, Path(name): Path<String>, Query(q): Params| {
                    with(n, move |n| {
                        weight(n, &name, q.get("value").map(String::as_str))
                    })
                },
            ),
        )
        .route(
            "/node/drain",
            post(|State(n): State<Shared<D>>| with(n, |n| done(n.set_node_drained(true)))),
        )
        .route(
            "/node/undrain",
            post(|State(n): State<Shared<D>>| with(n, |n| done(n.set_node_drained(false)))),
        )
        .route(
            "/reload",
            post(|State(n): State<Shared<D>>| {
                with(n, |n| match n.reload() {
                    Ok(()) => json(json!({ "ok": true })),
                    Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
                })
            }),
        )
        .with_state(node)
}

/// Runs `f` on the locked node off the runtime threads (map reads and
/// writes are syscalls; the control loop holds the same lock).
async fn with<D: Dataplane + Send + 'static>(
    node: Shared<D>,
    f: impl FnOnce(&mut Node<D>) -> Response + Send + 'static,
) -> Response {
    blocking(move || f(&mut super::lock(&node)))
        .await
        .unwrap_or_else(|e| e)
}

fn weight<D: Dataplane>(node: &mut Node<D>, name: &str, value: Option<&str>) -> Response {
    match value {
        Some("config") => done(node.set_weight(name, None)),
        Some(v) => match v.parse() {
            Ok(w) => done(node.set_weight(name, Some(w))),
            Err(_) => error(
                StatusCode::BAD_REQUEST,
                format!("weight `{v}` is not a number"),
            ),
        },
        None => error(
            StatusCode::BAD_REQUEST,
            "give ?value=N, or ?value=config to use the configured weight",
        ),
    }
}

fn done(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => json(json!({ "ok": true })),
        Err(e) if e.starts_with("no backend") => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

fn metrics_page<D: Dataplane>(node: &Node<D>) -> Response {
    (
        [(header::CONTENT_TYPE, prom::CONTENT_TYPE)],
        node.metrics.render(node),
    )
        .into_response()
}

fn status<D: Dataplane>(node: &Node<D>) -> Value {
    let counters = node.dataplane().stats().map(|s| {
        s.global
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
            "iface": node.iface,
            "pin_dir": node.pin_dir,
            "config": node.config_path,
            "started_unix": unix(node.started),
            "last_reload": node.last_reload,
            "node": {"drained": node.node_drained, "announce": node.cfg.announce.enabled.then(|| node.announcement())},
            "services": node.cfg.services.iter().flat_map(|s| s.ports.iter().map(move |p| (s, *p))).map(|(s, port)| {
                let fs = node.failsafe.get(&service_id(s.vip, port)).cloned().unwrap_or_default();
                let admission = node.cfg.feedback.admission.filter(|_| node.cfg.feedback.enabled).map(|_| {
                    if node.admission.get(&service_id(s.vip, port)).is_some_and(|g| g.closed) { "closed" } else { "open" }
                });
                json!({"name": s.label(), "vip": s.vip, "port": port, "check": s.check(port, &node.cfg.health), "mode": fs.mode, "panics": fs.panics, "all_full": fs.all_full, "admission": admission})
            }).collect::<Vec<_>>(),
            "counters": counters.map_or_else(|e| json!({"error": e.to_string()}), Value::Object),
    })
}

/// Per relay address: everything an operator asks about.
pub(super) fn backend_rows<D: Dataplane>(node: &Node<D>) -> Vec<Value> {
    let now = SystemTime::now();
    let stats = node.dataplane().stats().ok();
    let flows = node.dataplane().flows().unwrap_or_default();
    // Per relay, its effective weight on each balanced port.
    let mut effective: BTreeMap<IpAddr, BTreeMap<u16, u32>> = BTreeMap::new();
    for s in node.applied().iter().flat_map(|c| &c.services) {
        for b in &s.backends {
            for p in &s.ports {
                effective.entry(b.address).or_default().insert(*p, b.weight);
            }
        }
    }
    node.relays
        .iter()
        .map(|(addr, relay)| {
            let configured = node.configured_weight(*addr);
            let row = stats
                .as_ref()
                .and_then(|s| s.backends.iter().find(|b| b.address == *addr));
            let rt = &relay.runtime;
            let warmup = |r: Option<crate::balance::weights::Ramp>| {
                r.map(|r| {
                    json!({
                        "started_unix": r.started_unix,
                        "length_secs": r.length_secs,
                        "share_permille": r.share(now, &node.cfg.warmup),
                    })
                })
            };
            let checks: Vec<Value> = relay
                .trackers
                .iter()
                .map(|(check, t)| {
                    json!({
                        "check": check,
                        "port": check.port,
                        "tls": check.tls,
                        "health": t.health(),
                        "share_permille": rt.share(*check, now, &node.cfg.warmup),
                        "rejoin": warmup(rt.checks.get(check).and_then(|c| c.rejoin)),
                        "history": t.history().collect::<Vec<_>>(),
                    })
                })
                .collect();
            let feedback = node.cfg.feedback.enabled.then(|| {
                let fb = node.feedback.get(addr);
                json!({
                    "share_permille": rt.feedback,
                    "pressure_permille": fb.map(|f| f.pressure),
                    "queue": fb.and_then(|f| f.last).map(|l| l.queue),
                    "deferral_permille": fb.and_then(|f| f.deferral),
                    "reason": fb.and_then(|f| f.reason.clone()),
                    "failures": fb.map(|f| f.failures),
                    "error": fb.and_then(|f| f.error.clone()),
                })
            });
            json!({
                "names": relay.names,
                "address": addr,
                "health": relay.health(),
                "drained": rt.drained,
                "configured_weight": configured,
                "weight_override": rt.weight_override,
                "share_permille": relay.share(now, &node.cfg.warmup),
                "effective_weight": effective.get(addr).and_then(|w| w.values().max()),
                "effective_weights": effective.get(addr),
                "warmup": warmup(rt.ramp),
                "feedback": feedback,
                "never_up": rt.never_up,
                "checks": checks,
                "packets": row.map(|r| r.packets),
                "bytes": row.map(|r| r.bytes),
                "new_flows": row.map(|r| r.new_flows),
                "live_flows": row.map(|r| flows.get(&r.id).map_or(0, |f| f.0)),
                "tracked_flows": row.map(|r| flows.get(&r.id).map_or(0, |f| f.1)),
            })
        })
        .collect()
}

fn where_<D: Dataplane>(node: &Node<D>, query: &BTreeMap<String, String>) -> Response {
    let get = |k: &str| query.get(k).ok_or_else(|| format!("missing ?{k}="));
    let parsed = (|| -> Result<(IpAddr, u16, IpAddr, u16), String> {
        let vip = get("vip")?
            .parse()
            .map_err(|_| "vip is not an IP address".to_owned())?;
        let port = get("port")?
            .parse()
            .map_err(|_| "port is not 1-65535".to_owned())?;
        let client = get("client")?
            .parse()
            .map_err(|_| "client is not an IP address".to_owned())?;
        let cport = get("cport")?
            .parse()
            .map_err(|_| "cport is not 1-65535".to_owned())?;
        Ok((vip, port, client, cport))
    })();
    let (vip, port, client, cport) = match parsed {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let name = |a: IpAddr| {
        node.relays
            .get(&a)
            .and_then(|r| r.names.iter().next().cloned())
    };
    match node.dataplane().where_to(vip, port, client, cport) {
        Ok(Some(w)) => json(json!({
                "service": format!("{vip}:{port}"),
                "new_flow": w.new_flow.map(|(_, a)| json!({"backend": name(a), "address": a})),
                "tracked": w.tracked.map(|(_, a)| json!({"backend": name(a), "address": a})),
                "hash": w.hash,
                "slot": w.slot,
                "flow_set": w.flow_set,
        })),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("{vip}:{port} is not a configured service"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
