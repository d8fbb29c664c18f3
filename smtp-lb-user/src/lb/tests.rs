//! The control loop against the in-memory data plane: each operator action,
//! health change and warmup step, and the exact map writes it must cause.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use smtp_lb_common::MAX_BACKENDS;

use super::{Node, state};
use crate::{
    balance::{
        maglev,
        weights::{Mode, Runtime},
    },
    config::lb::LbConfig,
    dataplane::{
        Dataplane,
        fake::{Fake, Write, slots},
    },
    health::{Check, Health, Outcome, Tls},
};

const VIP: &str = "203.0.113.10";
const TABLE: u32 = 1009;

/// Three relays on VIP:25, rise 2, fall 2, no warmup.
const CFG: &str = r#"
state_dir = "STATE"
[health]
rise = 2
fall = 2
[warmup]
duration = "0s"
rejoin = "0s"

[[services]]
name = "mx"
vip = "203.0.113.10"
ports = [25]
table_size = 1009

[[services.backends]]
name = "relay1"
address = "198.51.100.11"
mac = "02:00:00:00:00:11"

[[services.backends]]
name = "relay2"
address = "198.51.100.12"
mac = "02:00:00:00:00:12"

[[services.backends]]
name = "relay3"
address = "198.51.100.13"
mac = "02:00:00:00:00:13"
"#;

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

fn relay(i: u8) -> IpAddr {
    IpAddr::from([198, 51, 100, 10 + i])
}

/// The check of port 25 (plain SMTP, the default).
const SMTP: Check = Check {
    port: 25,
    tls: Tls::None,
};

/// A node on the fake data plane with its own state directory and clock.
struct Lab {
    node: Node<Fake>,
    dir: Dir,
    clock: Arc<Mutex<SystemTime>>,
}

/// A lab's directory, removed when the lab is dropped.
struct Dir(PathBuf);

impl std::ops::Deref for Dir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lab {
    fn config_path(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }

    /// Writes `text` as the config file (STATE → the state directory).
    fn write_config(&self, text: &str) {
        let state = self.dir.join("state");
        std::fs::write(
            self.config_path(),
            text.replace("STATE", state.to_str().unwrap()),
        )
        .unwrap();
    }

    fn dp(&mut self) -> &mut Fake {
        &mut self.node.dp
    }

    fn take(&mut self) -> Vec<Write> {
        self.node.dp.take()
    }

    fn at(&self, secs: u64) {
        *self.clock.lock().unwrap() = t0() + Duration::from_secs(secs);
    }

    fn probe(&mut self, i: u8, outcome: &Outcome, times: usize) {
        self.probe_check(i, SMTP, outcome, times);
    }

    fn probe_check(&mut self, i: u8, check: Check, outcome: &Outcome, times: usize) {
        for _ in 0..times {
            self.node
                .on_probe(relay(i), check, outcome.clone(), Duration::from_millis(1))
                .unwrap();
        }
    }

    /// Slots per id in the table Maglev builds for these (relay, weight).
    fn expect(&self, weights: &[(u8, u32)]) -> BTreeMap<u32, usize> {
        let names: Vec<String> = weights.iter().map(|(i, _)| format!("relay{i}")).collect();
        let entries: Vec<maglev::Entry<'_>> = weights
            .iter()
            .zip(&names)
            .map(|((i, w), name)| maglev::Entry {
                name,
                weight: *w,
                id: self.node.dp.id_of(relay(*i)).unwrap(),
            })
            .collect();
        slots(&maglev::build(&entries, TABLE))
    }

    fn service(&self, port: u16, weights: &[(u8, u32)]) -> Write {
        let id = self
            .node
            .applied
            .as_ref()
            .unwrap()
            .1
            .services
            .iter()
            .find(|s| s.port == port)
            .unwrap()
            .id;
        Write::Service {
            vip: vip(),
            port,
            id,
            slots: self.expect(weights),
        }
    }

    fn mode(&self, service: &str) -> (Option<Mode>, u64, u64) {
        let f = self.node.failsafe[service].clone();
        (f.mode, f.panics, f.all_full)
    }
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_hours(500_000)
}

/// Up on 25, 587 and 465 in their default dialects (what a relay saved
/// up on every port holds; checks no service asks for are dropped).
fn up() -> Runtime {
    let mut rt = Runtime {
        never_up: false,
        ..Runtime::added()
    };
    for port in [25, 587, 465] {
        rt.set_health(Check::default_for(port, false), Health::Up);
    }
    rt
}

/// The backend writes of relays 1–3, ids 0–2.
fn three_backends() -> [Write; 3] {
    [1, 2, 3].map(|i| Write::Backend {
        id: u32::from(i) - 1,
        address: relay(i),
    })
}

/// A node from `text` whose relays `up` were up in the saved state (the
/// others are new), after its first reconcile, with the writes taken.
fn lab_with(name: &str, text: &str, up_relays: &[u8]) -> Lab {
    let dir = std::env::temp_dir().join(format!("slb-lb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(
        &path,
        text.replace("STATE", dir.join("state").to_str().unwrap()),
    )
    .unwrap();
    let mut saved = state::State::default();
    for i in up_relays {
        saved.backends.insert(
            relay(*i),
            state::Saved {
                name: format!("relay{i}"),
                runtime: up(),
            },
        );
    }
    let clock = Arc::new(Mutex::new(t0()));
    let mut node = Node::new(
        Fake::default(),
        LbConfig::load(&path).unwrap(),
        &saved,
        Some(path),
        dir.join("pins"),
        "eth0".into(),
    );
    let shared = clock.clone();
    node.clock = Box::new(move || *shared.lock().unwrap());
    node.reconcile().unwrap();
    Lab {
        node,
        dir: Dir(dir),
        clock,
    }
}

fn lab(name: &str) -> Lab {
    let mut lab = lab_with(name, CFG, &[1, 2, 3]);
    lab.take();
    lab
}

#[test]
fn the_first_reconcile_writes_node_backends_table_vip_and_port_in_that_order() {
    let mut lab = lab_with("first", CFG, &[1, 2, 3]);
    let writes = lab.take();
    assert_eq!(
        writes,
        [
            vec![Write::Node],
            three_backends().to_vec(),
            vec![
                lab.service(25, &[(1, 1000), (2, 1000), (3, 1000)]),
                Write::Vip(vip()),
                Write::Port {
                    port: 25,
                    balanced: true
                },
            ]
        ]
        .concat()
    );
    lab.node.reconcile().unwrap();
    assert_eq!(lab.take(), [], "a steady state writes nothing");
}

#[test]
fn drain_rewrites_the_table_without_the_relay_and_undrain_restores_it() {
    let mut lab = lab("drain");
    let before = lab.dp().ring(vip(), 25).unwrap().to_vec();
    lab.node.set_drained("relay1", true).unwrap();
    assert_eq!(lab.take(), [lab.service(25, &[(2, 1000), (3, 1000)])]);
    assert_eq!(
        lab.dp().backend(0),
        Some((relay(1), true)),
        "its flows continue"
    );
    lab.node.set_drained("relay1", false).unwrap();
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 1000), (3, 1000)])]
    );
    assert_eq!(
        lab.dp().ring(vip(), 25).unwrap(),
        before,
        "the same table again"
    );
    assert_eq!(
        lab.node.set_drained("nosuch", true),
        Err("no backend named `nosuch`".into())
    );
    assert_eq!(lab.take(), []);
}

#[test]
fn a_weight_change_rewrites_only_the_table_of_its_port() {
    // Per-port relay sets on one VIP: 25 → relay1-2, 587 → relay3.
    let text = CFG.replace(
        "[[services.backends]]\nname = \"relay3\"",
        "[[services]]\nname = \"submission\"\nvip = \"203.0.113.10\"\nports = [587]\ntable_size = 1009\n\n[[services.backends]]\nname = \"relay3\"",
    );
    let mut lab = lab_with("weight", &text, &[1, 2, 3]);
    let first = lab.take();
    assert!(first.contains(&lab.service(25, &[(1, 1000), (2, 1000)])));
    assert!(first.contains(&lab.service(587, &[(3, 1000)])));
    lab.node.set_weight("relay2", Some(3)).unwrap();
    assert_eq!(lab.take(), [lab.service(25, &[(1, 1000), (2, 3000)])]);
    lab.node.set_weight("relay2", None).unwrap();
    assert_eq!(lab.take(), [lab.service(25, &[(1, 1000), (2, 1000)])]);
    assert!(lab.node.set_weight("relay2", Some(2_000_000)).is_err());
    assert_eq!(lab.take(), []);
}

#[test]
fn each_relay_is_checked_only_on_the_ports_its_services_balance() {
    let text = CFG.replace(
        "[[services.backends]]\nname = \"relay3\"",
        "[[services]]\nname = \"submission\"\nvip = \"203.0.113.10\"\nports = [587, 465]\ntable_size = 1009\n[services.checks.587]\ntls = \"starttls\"\n\n[[services.backends]]\nname = \"relay3\"",
    );
    let lab = lab_with("checks", &text, &[1, 2, 3]);
    let checks = |i: u8| -> Vec<String> {
        lab.node.relays[&relay(i)]
            .trackers
            .keys()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(checks(1), ["25/none"]);
    assert_eq!(checks(2), ["25/none"]);
    assert_eq!(checks(3), ["465/implicit", "587/starttls"]);
}

#[test]
fn a_relay_down_on_one_port_leaves_only_that_ports_table() {
    let text = CFG.replace("ports = [25]", "ports = [25, 465]");
    let mut lab = lab_with("port-down", &text, &[1, 2, 3]);
    let first = lab.take();
    let all = [(1, 1000), (2, 1000), (3, 1000)];
    assert!(first.contains(&lab.service(25, &all)));
    assert!(first.contains(&lab.service(465, &all)));
    let smtps = Check::default_for(465, false);
    assert_eq!(smtps.tls, Tls::Implicit);
    let broken =
        Outcome::Failed("TLS handshake: handshake failed: received corrupt message".into());
    lab.probe_check(2, smtps, &broken, 2);
    assert_eq!(
        lab.take(),
        [lab.service(465, &[(1, 1000), (3, 1000)])],
        "465 loses relay2; 25 is not written"
    );
    let r2 = &lab.node.relays[&relay(2)];
    assert_eq!(r2.runtime.health(SMTP), Health::Up);
    assert_eq!(r2.runtime.health(smtps), Health::Down);
    assert_eq!(r2.health(), Health::Down, "the worst port shows");
    // Port 25 failing too takes relay2 out of 25; 465 coming back puts it
    // back in 465 only.
    lab.probe(2, &Outcome::Failed("connect: refused".into()), 2);
    assert_eq!(lab.take(), [lab.service(25, &[(1, 1000), (3, 1000)])]);
    lab.probe_check(2, smtps, &Outcome::Passed, 2);
    assert_eq!(lab.take(), [lab.service(465, &all)]);
}

#[test]
fn a_state_file_from_before_per_port_checks_restarts_with_the_relays_that_were_up() {
    let dir = std::env::temp_dir().join(format!("slb-lb-legacy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let legacy = r#"{"backends": {
        "198.51.100.11": {"name": "relay1", "runtime": {"health": "up", "ramp": null, "rejoin": null, "never_up": false, "drained": false, "weight_override": null}},
        "198.51.100.12": {"name": "relay2", "runtime": {"health": "down", "ramp": null, "rejoin": null, "never_up": false, "drained": false, "weight_override": null}}
    }}"#;
    std::fs::write(dir.join("lb-state.json"), legacy).unwrap();
    let saved = state::load(&dir).unwrap();
    let text = CFG
        .replace("ports = [25]", "ports = [25, 465]")
        .replace("STATE", dir.to_str().unwrap());
    let mut node = Node::new(
        Fake::default(),
        LbConfig::parse(&text).unwrap(),
        &saved,
        None,
        dir.join("pins"),
        "eth0".into(),
    );
    node.reconcile().unwrap();
    let id1 = node.dp.id_of(relay(1)).unwrap();
    for port in [25, 465] {
        let ring = node.dp.ring(vip(), port).unwrap();
        assert!(
            ring.iter().all(|&id| id == id1),
            "port {port}: relay1 was up, relay2 down, relay3 new"
        );
    }
    // Saved again in the new form, one health per check.
    let again = state::load(&dir).unwrap();
    let rt = &again.backends[&relay(1)].runtime;
    assert_eq!(rt.health(Check::default_for(465, false)), Health::Up);
    assert_eq!(rt.legacy_health, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_accepted_reload_writes_the_diff_and_keeps_ids() {
    let mut lab = lab("reload");
    // relay3 leaves, relay4 joins (new: down until it passes its checks).
    lab.write_config(
        &CFG.replace("relay3", "relay4")
            .replace(".13", ".14")
            .replace(":13", ":14"),
    );
    lab.node.reload().unwrap();
    assert_eq!(
        lab.take(),
        [
            Write::Backend {
                id: 3,
                address: relay(4)
            },
            lab.service(25, &[(1, 1000), (2, 1000)]),
            Write::RetireBackend { id: 2 },
        ]
    );
    assert_eq!(lab.dp().id_of(relay(1)), Some(0), "ids stay with addresses");
    lab.probe(4, &Outcome::Passed, 2);
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 1000), (4, 1000)])]
    );
    assert!(lab.node.last_reload.as_ref().unwrap().error.is_none());
}

#[test]
fn a_refused_reload_names_line_and_field_and_the_running_config_keeps_serving() {
    let mut lab = lab("refused");
    let running = lab.node.cfg.clone();
    let ring = lab.dp().ring(vip(), 25).unwrap().to_vec();
    lab.write_config(&CFG.replace("name = \"relay2\"", "name = \"relay1\""));
    let err = lab.node.reload().unwrap_err();
    assert!(
        err.contains("lb.toml:22:")
            && err.contains("backends[1] (relay1).name")
            && err.contains("duplicate"),
        "{err}"
    );
    assert_eq!(lab.take(), [], "nothing written");
    assert_eq!(lab.node.cfg, running);
    assert_eq!(lab.dp().ring(vip(), 25).unwrap(), ring);
    assert_eq!(
        lab.node.last_reload.as_ref().unwrap().error.as_deref(),
        Some(err.as_str())
    );
}

#[test]
fn a_reload_whose_map_write_fails_puts_the_running_config_back_in_full() {
    let mut lab = lab("writefail");
    let running = lab.node.cfg.clone();
    let ring = lab.dp().ring(vip(), 25).unwrap().to_vec();
    lab.write_config(&CFG.replace("address = \"198.51.100.13\"", "address = \"198.51.100.23\""));
    lab.dp().fail_after = Some(0);
    let err = lab.node.reload().unwrap_err();
    assert!(err.contains("injected failure"), "{err}");
    assert_eq!(lab.node.cfg, running);
    // The failed write may have changed part of the maps: all of the
    // running configuration is written again.
    assert_eq!(
        lab.take(),
        [
            vec![Write::Node],
            three_backends().to_vec(),
            vec![lab.service(25, &[(1, 1000), (2, 1000), (3, 1000)])],
        ]
        .concat()
    );
    assert_eq!(lab.dp().ring(vip(), 25).unwrap(), ring);
    assert_eq!(lab.node.relays[&relay(3)].runtime.health(SMTP), Health::Up);
}

#[test]
fn a_health_flap_takes_the_relay_out_after_fall_and_back_after_rise() {
    let mut lab = lab("flap");
    let ring = lab.dp().ring(vip(), 25).unwrap().to_vec();
    let down = Outcome::Failed("connect: refused".into());
    lab.probe(2, &down, 1);
    assert_eq!(lab.take(), [], "one failure is not enough (fall 2)");
    lab.probe(2, &down, 1);
    assert_eq!(lab.take(), [lab.service(25, &[(1, 1000), (3, 1000)])]);
    lab.probe(2, &Outcome::Passed, 1);
    assert_eq!(lab.take(), [], "one pass is not enough (rise 2)");
    lab.probe(2, &Outcome::Passed, 1);
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 1000), (3, 1000)])]
    );
    assert_eq!(lab.dp().ring(vip(), 25).unwrap(), ring);
}

#[test]
fn warmup_rewrites_the_table_at_each_step_and_only_then() {
    let text = CFG.replace(
        "duration = \"0s\"",
        "duration = \"90s\"\nstart_percent = 10\nsteps = 3",
    );
    // relay3 is new: down until it passes its checks, then on the ramp.
    let mut lab = lab_with("warmup", &text, &[1, 2]);
    lab.take();
    lab.probe(3, &Outcome::Passed, 2);
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 1000), (3, 100)])]
    );
    for (secs, share) in [
        (20, None),
        (30, Some(400)),
        (59, None),
        (60, Some(700)),
        (89, None),
        (90, Some(1000)),
        (500, None),
    ] {
        lab.at(secs);
        lab.node.reconcile().unwrap();
        let want = share.map(|s| lab.service(25, &[(1, 1000), (2, 1000), (3, s)]));
        assert_eq!(lab.take(), Vec::from_iter(want), "at {secs}s");
    }
}

#[test]
fn when_every_relay_is_full_the_full_relays_take_new_flows() {
    let mut lab = lab("full");
    let all = lab.dp().ring(vip(), 25).unwrap().to_vec();
    let full = Outcome::Full("greeting: relay answered 421 too many connections".into());
    lab.probe(1, &full, 2);
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(2, 1000), (3, 1000)])],
        "no new flows while others have room"
    );
    lab.probe(2, &full, 2);
    assert_eq!(lab.take(), [lab.service(25, &[(3, 1000)])]);
    lab.probe(3, &full, 2);
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 1000), (3, 1000)])],
        "every relay full: they all take new flows as slots free up"
    );
    assert_eq!(lab.dp().ring(vip(), 25).unwrap(), all);
    assert_eq!(lab.mode("203.0.113.10:25"), (Some(Mode::Full), 0, 1));
    // Room again on relay1: only it takes new flows.
    lab.probe(1, &Outcome::Passed, 2);
    assert_eq!(lab.take(), [lab.service(25, &[(1, 1000)])]);
    assert_eq!(lab.mode("203.0.113.10:25"), (Some(Mode::Normal), 0, 1));
    // A full relay is alive: it keeps its backend entry (and its flows).
    assert_eq!(lab.dp().backend(1), Some((relay(2), true)));
}

#[test]
fn when_every_relay_is_down_the_last_good_table_stays_and_the_panic_is_counted() {
    let mut lab = lab("panic");
    let down = Outcome::Failed("connect: refused".into());
    lab.probe(1, &down, 2);
    lab.probe(2, &down, 2);
    assert_eq!(lab.take().len(), 2);
    let last_good = lab.dp().ring(vip(), 25).unwrap().to_vec();
    assert_eq!(slots(&last_good), lab.expect(&[(3, 1000)]));
    lab.probe(3, &down, 2);
    assert_eq!(lab.take(), [], "the last good table stays");
    assert_eq!(lab.mode("203.0.113.10:25"), (Some(Mode::Panic), 1, 0));
    let w = lab
        .dp()
        .where_to(vip(), 25, "192.0.2.7".parse().unwrap(), 40000)
        .unwrap()
        .unwrap();
    assert_eq!(
        w.new_flow,
        Some((2, relay(3))),
        "new flows still reach a relay"
    );
    // A restart in panic keeps the last good relays too.
    let saved = state::load(&lab.node.cfg.state_dir).unwrap();
    let mut again = Node::new(
        Fake::default(),
        lab.node.cfg.clone(),
        &saved,
        None,
        lab.dir.join("pins"),
        "eth0".into(),
    );
    again.reconcile().unwrap();
    assert_eq!(again.dp.ring(vip(), 25).unwrap(), last_good);
    // relay1 comes back: out of panic, the table follows the checks again.
    lab.probe(1, &Outcome::Passed, 2);
    assert_eq!(lab.take(), [lab.service(25, &[(1, 1000)])]);
    assert_eq!(lab.mode("203.0.113.10:25"), (Some(Mode::Normal), 1, 0));
}

#[test]
fn below_the_panic_threshold_the_service_keeps_its_last_good_relays() {
    let text = CFG.replace("fall = 2", "fall = 2\npanic_threshold = 50");
    let mut lab = lab_with("threshold", &text, &[1, 2, 3]);
    lab.take();
    let down = Outcome::Failed("EHLO: timed out".into());
    lab.probe(1, &down, 2);
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(2, 1000), (3, 1000)])],
        "2 of 3 alive: 67 % ≥ 50 %"
    );
    lab.probe(2, &down, 2);
    assert_eq!(
        lab.take(),
        [],
        "1 of 3 alive: 33 % < 50 %, relay2 and relay3 keep their slots"
    );
    assert_eq!(lab.mode("203.0.113.10:25"), (Some(Mode::Panic), 1, 0));
    // A full relay is alive: with relay1 full, 2 of 3 are alive again.
    lab.probe(1, &Outcome::Full("greeting: 421".into()), 2);
    assert_eq!(lab.take(), [lab.service(25, &[(3, 1000)])]);
    assert_eq!(lab.mode("203.0.113.10:25"), (Some(Mode::Normal), 1, 0));
}

#[test]
fn two_thousand_backend_and_service_adds_and_removes_across_reloads_never_exhaust_ids() {
    let mut lab = lab("ids");
    for i in 0..2000u32 {
        let addr = IpAddr::from([198, 18, (i / 250) as u8, (i % 250) as u8 + 1]);
        let port = 10_000 + i;
        let text = format!(
            "state_dir = \"STATE\"\n[warmup]\nduration = \"0s\"\nrejoin = \"0s\"\n\
             [[services]]\nname = \"mx\"\nvip = \"{VIP}\"\nports = [25, {port}]\ntable_size = 1009\n\
             [[services.backends]]\nname = \"relay1\"\naddress = \"198.51.100.11\"\nmac = \"02:00:00:00:00:11\"\n\
             [[services.backends]]\nname = \"r{i}\"\naddress = \"{addr}\"\nmac = \"02:00:00:00:00:99\"\n"
        );
        lab.write_config(&text);
        lab.node
            .reload()
            .unwrap_or_else(|e| panic!("reload {i}: {e}"));
        let id = lab.dp().id_of(addr).expect("the new relay has an id");
        assert!(id < MAX_BACKENDS);
        assert_eq!(lab.dp().backend(id), Some((addr, true)));
        assert!(lab.dp().ring(vip(), u16::try_from(port).unwrap()).is_some());
    }
    assert_eq!(
        lab.dp().id_of(relay(1)),
        Some(0),
        "a kept relay keeps its id throughout"
    );
    let existing = crate::dataplane::MapWriter::existing(lab.dp()).unwrap();
    assert_eq!(existing.services.len(), 2);
    let valid: BTreeSet<IpAddr> = existing
        .backends
        .iter()
        .filter(|(_, id)| !existing.retired.contains(id))
        .map(|(a, _)| *a)
        .collect();
    assert_eq!(valid.len(), 2, "only the two configured relays are valid");
}

#[test]
fn a_table_change_ends_with_the_moved_flows_walk_and_a_steady_state_walks_nothing() {
    let mut lab = lab("moved-walk");
    assert_eq!(
        lab.dp().take_walks().len(),
        1,
        "the first reconcile walks once"
    );
    lab.node.reconcile().unwrap();
    assert!(lab.dp().take_walks().is_empty(), "nothing changed: no walk");
    lab.node.set_drained("relay3", true).unwrap();
    assert_eq!(lab.take(), [lab.service(25, &[(1, 1000), (2, 1000)])]);
    assert_eq!(
        lab.dp().take_walks(),
        [1],
        "one walk, after the table write"
    );
}

mod api {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    use super::*;

    /// Sends `method path` through the admin API's router (as the server
    /// does, minus the token layer) and returns the lab with its node back,
    /// the status and the body.
    fn call(lab: Lab, method: &str, path: &str) -> (Lab, u16, String) {
        let Lab { node, dir, clock } = lab;
        let shared = Arc::new(Mutex::new(node));
        let router = super::super::api::router(shared.clone());
        let (status, body) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let request = Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::empty())
                    .unwrap();
                let r = router.oneshot(request).await.unwrap();
                let status = r.status().as_u16();
                let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
                (status, String::from_utf8(body.to_vec()).unwrap())
            });
        let node = Arc::try_unwrap(shared)
            .unwrap_or_else(|_| panic!("the router let go of the node"))
            .into_inner()
            .unwrap();
        (Lab { node, dir, clock }, status, body)
    }

    #[test]
    fn drain_through_the_admin_api_writes_the_table() {
        let lab = lab("api-drain");
        let (mut lab, status, body) = call(lab, "POST", "/backends/relay3/drain");
        assert_eq!(status, 200, "{body}");
        assert_eq!(lab.take(), [lab.service(25, &[(1, 1000), (2, 1000)])]);
        let (lab, status, body) = call(lab, "POST", "/backends/nosuch/drain");
        assert_eq!(status, 404, "{body}");
        let (mut lab, status, _) = call(lab, "POST", "/backends/relay1/weight?value=lots");
        assert_eq!(status, 400);
        assert_eq!(lab.take(), []);
    }

    #[test]
    fn a_refused_reload_through_the_admin_api_is_422_and_status_shows_modes() {
        let lab = lab("api-reload");
        lab.write_config("[[services]]\nvip = \"nope\"\n");
        let (mut lab, status, body) = call(lab, "POST", "/reload");
        assert_eq!(status, 422, "{body}");
        assert!(body.contains("lb.toml"), "{body}");
        assert_eq!(lab.take(), []);
        let (_lab, status, body) = call(lab, "GET", "/status");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["services"][0]["mode"], "normal");
        assert_eq!(v["services"][0]["panics"], 0);
    }
}

/// `CFG` with `[feedback]` on: queue 100 → 1100 takes a relay from full to
/// 20 %, rises after 2 readings; admission closes at 500 messages each.
fn with_feedback() -> String {
    CFG.replace(
        "[[services]]",
        "[feedback]\nenabled = true\nqueue_low = 100\nqueue_high = 1100\nrise = 2\n\
         [feedback.admission]\nhigh_water = 500\nlow_water = 200\n\n[[services]]",
    )
}

fn queues(q: [u64; 3]) -> Vec<(IpAddr, Result<crate::feedback::Reading, String>)> {
    (1..=3u8)
        .zip(q)
        .map(|(i, queue)| {
            (
                relay(i),
                Ok(crate::feedback::Reading {
                    queue,
                    deferred: 0,
                    outcomes: 0,
                }),
            )
        })
        .collect()
}

#[test]
fn feedback_lowers_a_relays_weight_in_its_table_and_gives_it_back_after_rise_readings() {
    let mut lab = lab_with("feedback", &with_feedback(), &[1, 2, 3]);
    lab.take();
    let t = std::time::Instant::now();
    let s = |i: u64| t + Duration::from_secs(i);
    lab.node.on_feedback(queues([0, 1100, 0]), s(0)).unwrap();
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 200), (3, 1000)])],
        "one table, relay2 at the floor"
    );
    assert_eq!(lab.node.relays[&relay(2)].runtime.feedback, 200);
    lab.node.on_feedback(queues([0, 1100, 0]), s(1)).unwrap();
    assert_eq!(lab.take(), [], "steady: no write");
    lab.node.on_feedback(queues([0, 0, 0]), s(2)).unwrap();
    assert_eq!(lab.take(), [], "one reading is not enough to rise");
    lab.node.on_feedback(queues([0, 0, 0]), s(3)).unwrap();
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 1000), (3, 1000)])]
    );
    // A drain still wins over feedback, and feedback survives it.
    lab.node.on_feedback(queues([0, 600, 0]), s(4)).unwrap();
    lab.node.set_drained("relay2", true).unwrap();
    lab.take();
    lab.node.set_drained("relay2", false).unwrap();
    assert_eq!(
        lab.take(),
        [lab.service(25, &[(1, 1000), (2, 600), (3, 1000)])]
    );
}

#[test]
fn admission_closes_when_every_relay_is_over_high_water_and_a_reload_without_feedback_opens_it() {
    let mut lab = lab_with("admission", &with_feedback(), &[1, 2, 3]);
    let id = lab.node.applied.as_ref().unwrap().1.services[0].id;
    assert_eq!(
        lab.dp().admission.get(&id),
        Some(&false),
        "written at start"
    );
    let t = std::time::Instant::now();
    let s = |i: u64| t + Duration::from_secs(i);
    lab.node.on_feedback(queues([600, 600, 400]), s(0)).unwrap();
    assert!(!lab.dp().admission[&id], "relay3 has room");
    lab.node.on_feedback(queues([600, 600, 500]), s(1)).unwrap();
    assert!(lab.dp().admission[&id]);
    // Hysteresis: 300 is under high water but not under low water.
    lab.node.on_feedback(queues([600, 600, 300]), s(2)).unwrap();
    assert!(lab.dp().admission[&id]);
    // A down relay takes no new flows: the others decide.
    lab.probe(3, &Outcome::Failed("refused".into()), 2);
    lab.node.on_feedback(queues([600, 600, 0]), s(3)).unwrap();
    assert!(lab.dp().admission[&id], "relay3 is down");
    lab.node.on_feedback(queues([600, 100, 0]), s(4)).unwrap();
    assert!(!lab.dp().admission[&id]);
    lab.node.on_feedback(queues([600, 600, 0]), s(5)).unwrap();
    assert!(lab.dp().admission[&id]);
    // Feedback turned off by a reload: every service admits, full shares.
    lab.write_config(CFG);
    lab.node.reload().unwrap();
    assert!(!lab.dp().admission[&id]);
    assert!(lab.node.relays.values().all(|r| r.runtime.feedback == 1000));
}

#[test]
fn a_bad_feedback_section_is_refused_with_its_line_and_field() {
    let mut lab = lab("feedback-bad");
    lab.write_config(&with_feedback().replace("low_water = 200", "low_water = 900"));
    let e = lab.node.reload().unwrap_err();
    assert!(
        e.contains("lb.toml:17: feedback.admission.low_water") && e.contains("below high_water"),
        "{e}"
    );
}

#[test]
fn the_node_is_announced_while_a_relay_is_alive_and_not_while_drained_or_all_down() {
    use crate::announce::Reason;
    let announce = "[announce]\nenabled = true\nlocal_as = 64513\n\
                    [[announce.peers]]\naddress = \"198.51.100.254\"\nas = 64512\n";
    let mut lab = lab_with("announce", &format!("{CFG}\n{announce}"), &[1, 2, 3]);
    let (tx, rx) = tokio::sync::watch::channel(lab.node.announcement());
    lab.node.set_announcer(Some(tx));
    let want = || rx.borrow().clone();
    assert!(want().announce, "{:?}", want());
    assert_eq!(want().reason, Reason::Healthy);
    let down = Outcome::Failed("connect: refused".into());
    for i in [1, 2] {
        lab.probe(i, &down, 2);
    }
    assert!(want().announce, "one relay left: {:?}", want());
    lab.probe(3, &Outcome::Full("421 busy".into()), 2);
    assert!(want().announce, "a full relay is alive: {:?}", want());
    lab.probe(3, &down, 2);
    assert!(!want().announce);
    assert_eq!(want().reason, Reason::NoRelayUp);
    lab.probe(1, &Outcome::Passed, 2);
    assert!(want().announce);
    lab.node.set_node_drained(true).unwrap();
    assert_eq!(want().reason, Reason::NodeDrained);
    assert!(!want().announce);
    // The drain survives a restart (state file).
    let saved = state::load(&lab.node.cfg.state_dir).unwrap();
    assert!(saved.node_drained);
    lab.node.set_node_drained(false).unwrap();
    assert!(want().announce);
}

#[test]
fn node_drain_is_refused_without_announce() {
    let mut lab = lab("no-announce");
    let e = lab.node.set_node_drained(true).unwrap_err();
    assert!(e.contains("[announce] is off"), "{e}");
}
