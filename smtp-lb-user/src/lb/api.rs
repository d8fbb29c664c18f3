//! The balancer's admin API, served on loopback with a bearer token.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/status` | daemon, interface, config file, last reload, global counters |
//! | GET | `/backends` | per relay: health, weights, warmup, history, counters, flows |
//! | GET | `/where?vip=A&port=P&client=C&cport=Q` | where a new SYN goes; tracked flow |
//! | GET | `/metrics` | Prometheus text |
//! | POST | `/backends/NAME/drain`, `/undrain` | drain: weight 0, flows continue |
//! | POST | `/backends/NAME/weight?value=N` (`value=config` clears) | operator weight |
//! | POST | `/reload` | re-read the config file; 422 with the reason if refused |
use std::{
    collections::BTreeMap,
    fs,
    io::Read,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::Context;
use serde_json::{Value, json};

use super::Node;
use crate::{
    admin::{
        http::{Handler, Request, Response},
        prom::Exposition,
    },
    balance::weights::{Mode, service_id, unix},
    dataplane::Dataplane,
    health::Health,
};

/// The token in `file`, created (random, mode 0600) when missing.
pub fn token(file: &Path) -> anyhow::Result<String> {
    if let Ok(t) = fs::read_to_string(file) {
        let t = t.trim().to_owned();
        anyhow::ensure!(
            !t.is_empty(),
            "admin token file {} is empty",
            file.display()
        );
        return Ok(t);
    }
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    let t = bytes.iter().fold(String::with_capacity(48), |mut t, b| {
        use std::fmt::Write;
        let _ = write!(t, "{b:02x}");
        t
    });
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, t.as_bytes()))
        .with_context(|| format!("write admin token {}", file.display()))?;
    fs::set_permissions(file, fs::Permissions::from_mode(0o600))?;
    Ok(t)
}

pub fn handler<D: Dataplane + Send + 'static>(node: Arc<Mutex<Node<D>>>, token: String) -> Handler {
    Arc::new(move |req: Request| {
        if !req.authorized(&token) {
            return Response::error(
                401,
                "missing or wrong bearer token (see the admin token file)",
            );
        }
        let mut node = node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        route(&mut node, &req)
    })
}

pub(super) fn route<D: Dataplane>(node: &mut Node<D>, req: &Request) -> Response {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["status"]) => status(node),
        ("GET", ["backends"]) => backends(node),
        ("GET", ["where"]) => where_(node, req),
        ("GET", ["metrics"]) => metrics(node),
        ("POST", ["backends", name, "drain"]) => done(node.set_drained(name, true)),
        ("POST", ["backends", name, "undrain"]) => done(node.set_drained(name, false)),
        ("POST", ["backends", name, "weight"]) => {
            match req.query.get("value").map(String::as_str) {
                Some("config") => done(node.set_weight(name, None)),
                Some(v) => match v.parse() {
                    Ok(w) => done(node.set_weight(name, Some(w))),
                    Err(_) => Response::error(400, format!("weight `{v}` is not a number")),
                },
                None => Response::error(
                    400,
                    "give ?value=N, or ?value=config to use the configured weight",
                ),
            }
        }
        ("POST", ["reload"]) => match node.reload() {
            Ok(()) => Response::json(200, &json!({ "ok": true })),
            Err(e) => Response::error(422, e),
        },
        (_, ["status" | "backends" | "where" | "metrics" | "reload"] | ["backends", _, _]) => {
            Response::error(
                405,
                format!("{} is not allowed on {}", req.method, req.path),
            )
        }
        _ => Response::error(404, format!("no such endpoint {}", req.path)),
    }
}

fn done(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => Response::json(200, &json!({ "ok": true })),
        Err(e) if e.starts_with("no backend") => Response::error(404, e),
        Err(e) => Response::error(400, e),
    }
}

fn status<D: Dataplane>(node: &Node<D>) -> Response {
    let counters = node.dataplane().stats().map(|s| {
        s.global
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
    });
    Response::json(
        200,
        &json!({
            "iface": node.iface,
            "pin_dir": node.pin_dir,
            "config": node.config_path,
            "started_unix": unix(node.started),
            "last_reload": node.last_reload,
            "services": node.cfg.services.iter().flat_map(|s| s.ports.iter().map(move |p| (s, *p))).map(|(s, port)| {
                let fs = node.failsafe.get(&service_id(s.vip, port)).cloned().unwrap_or_default();
                json!({"name": s.label(), "vip": s.vip, "port": port, "check": s.check(port, &node.cfg.health), "mode": fs.mode, "panics": fs.panics, "all_full": fs.all_full})
            }).collect::<Vec<_>>(),
            "counters": counters.map_or_else(|e| json!({"error": e.to_string()}), Value::Object),
        }),
    )
}

/// Per relay address: everything an operator asks about.
fn backend_rows<D: Dataplane>(node: &Node<D>) -> Vec<Value> {
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
            let configured = node
                .cfg
                .services
                .iter()
                .flat_map(|s| &s.backends)
                .find(|b| b.address == *addr)
                .map_or(0, |b| b.weight);
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

fn backends<D: Dataplane>(node: &Node<D>) -> Response {
    Response::json(200, &Value::Array(backend_rows(node)))
}

fn where_<D: Dataplane>(node: &Node<D>, req: &Request) -> Response {
    let get = |k: &str| req.query.get(k).ok_or_else(|| format!("missing ?{k}="));
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
        Err(e) => return Response::error(400, e),
    };
    let name = |a: IpAddr| {
        node.relays
            .get(&a)
            .and_then(|r| r.names.iter().next().cloned())
    };
    match node.dataplane().where_to(vip, port, client, cport) {
        Ok(Some(w)) => Response::json(
            200,
            &json!({
                "service": format!("{vip}:{port}"),
                "new_flow": w.new_flow.map(|(_, a)| json!({"backend": name(a), "address": a})),
                "tracked": w.tracked.map(|(_, a)| json!({"backend": name(a), "address": a})),
                "hash": w.hash,
                "slot": w.slot,
            }),
        ),
        Ok(None) => Response::error(404, format!("{vip}:{port} is not a configured service")),
        Err(e) => Response::error(500, e.to_string()),
    }
}

fn metrics<D: Dataplane>(node: &Node<D>) -> Response {
    let mut e = Exposition::default();
    if let Ok(s) = node.dataplane().stats() {
        e.family(
            "smtplb_xdp_packets_total",
            "counter",
            "Packets by what the XDP program did with them.",
        );
        for (reason, v) in &s.global {
            e.sample("smtplb_xdp_packets_total", &[("reason", reason)], *v as f64);
        }
        for (name, help, get) in [
            (
                "smtplb_service_packets_total",
                "Packets to a service.",
                (|r: &crate::dataplane::ServiceRow| r.packets) as fn(&_) -> u64,
            ),
            ("smtplb_service_bytes_total", "Bytes to a service.", |r| {
                r.bytes
            }),
            (
                "smtplb_service_new_flows_total",
                "New connections to a service.",
                |r| r.new_flows,
            ),
            (
                "smtplb_service_no_backend_total",
                "SYNs dropped: no backend could take them.",
                |r| r.no_backend,
            ),
        ] {
            e.family(name, "counter", help);
            for r in &s.services {
                let svc = format!("{}:{}", r.vip, r.port);
                e.sample(name, &[("service", &svc)], get(r) as f64);
            }
        }
        for (name, help, get) in [
            (
                "smtplb_backend_packets_total",
                "Packets forwarded to a relay.",
                (|r: &crate::dataplane::BackendRow| r.packets) as fn(&_) -> u64,
            ),
            (
                "smtplb_backend_bytes_total",
                "Bytes forwarded to a relay.",
                |r| r.bytes,
            ),
            (
                "smtplb_backend_new_flows_total",
                "New connections sent to a relay.",
                |r| r.new_flows,
            ),
        ] {
            e.family(name, "counter", help);
            for r in &s.backends {
                let backend = node
                    .relays
                    .get(&r.address)
                    .and_then(|x| x.names.iter().next().cloned())
                    .unwrap_or_default();
                let addr = r.address.to_string();
                e.sample(
                    name,
                    &[("backend", &backend), ("address", &addr)],
                    get(r) as f64,
                );
            }
        }
    }
    let now = SystemTime::now();
    e.family(
        "smtplb_backend_up",
        "gauge",
        "1 when the relay passes its health checks.",
    );
    for (addr, r) in &node.relays {
        let (b, a) = (
            r.names.iter().next().cloned().unwrap_or_default(),
            addr.to_string(),
        );
        e.sample(
            "smtplb_backend_up",
            &[("backend", &b), ("address", &a)],
            f64::from(u8::from(r.health() == Health::Up)),
        );
    }
    e.family(
        "smtplb_backend_weight_share",
        "gauge",
        "Share of the configured weight in effect (warmup, drain, health), 0..1.",
    );
    for (addr, r) in &node.relays {
        let (b, a) = (
            r.names.iter().next().cloned().unwrap_or_default(),
            addr.to_string(),
        );
        e.sample(
            "smtplb_backend_weight_share",
            &[("backend", &b), ("address", &a)],
            f64::from(r.share(now, &node.cfg.warmup)) / 1000.0,
        );
    }
    failsafe_metrics(node, &mut e);
    e.family(
        "smtplb_config_reload_failed",
        "gauge",
        "1 when the last reload was refused.",
    );
    e.sample(
        "smtplb_config_reload_failed",
        &[],
        f64::from(u8::from(
            node.last_reload.as_ref().is_some_and(|r| r.error.is_some()),
        )),
    );
    Response {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        body: e.finish(),
    }
}

/// Per configured service (label `service`: its name): the fail-safes.
fn failsafe_metrics<D>(node: &Node<D>, e: &mut Exposition) {
    // Per service name, its ports taken together: in panic (or all full)
    // when one of them is, counting every port's episodes.
    let mut rows: BTreeMap<String, super::Failsafe> = BTreeMap::new();
    for s in &node.cfg.services {
        let row = rows.entry(s.label()).or_default();
        for port in &s.ports {
            let f = node
                .failsafe
                .get(&service_id(s.vip, *port))
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
    for (name, kind, help, get) in [
        (
            "smtplb_service_panic",
            "gauge",
            "1 while too few relays are alive and the service keeps its last good relays.",
            (|f: &super::Failsafe| f64::from(u8::from(f.mode == Some(Mode::Panic))))
                as fn(&super::Failsafe) -> f64,
        ),
        (
            "smtplb_service_panic_total",
            "counter",
            "Times the service entered panic (too few relays alive).",
            |f| f.panics as f64,
        ),
        (
            "smtplb_service_all_full",
            "gauge",
            "1 while every relay alive is full (421) and the full ones take new connections.",
            |f| f64::from(u8::from(f.mode == Some(Mode::Full))),
        ),
    ] {
        e.family(name, kind, help);
        for (service, f) in &rows {
            e.sample(name, &[("service", service)], get(f));
        }
    }
}
