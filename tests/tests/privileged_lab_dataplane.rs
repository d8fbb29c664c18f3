//! End to end through the XDP balancer with real TCP: three relays running
//! Postfix `smtp-sink` behind the VIP, `smtp-source` on a client opening
//! hundreds of SMTP sessions. Every session must complete, the spread per
//! relay must match the weights (2:1:1) within a few percent, and every
//! relay must see the client's own address (direct server return).
//!
//! - `l2_dsr`: client, LB and relays on one segment; the LB rewrites MACs
//!   and sends with native `XDP_TX`.
//! - `ipip`: the relays sit in another subnet behind a router; the LB pushes
//!   IPIP / IP6IP6 (next hop from the kernel FIB) and each relay runs
//!   `smtp-lb decap`.
//!
//! Both run IPv4 and IPv6 through the same balancer.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use smtp_lb_tests::{
    env,
    lab::Lab,
    topology::{ipip_router, mac_str, pass_on_switch_port, wait_for},
};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::10";
/// SMTP sessions per address family.
const SESSIONS: usize = 1000;
const WEIGHTS: [u32; 3] = [2, 1, 1];
/// Allowed deviation of each relay's share from its weight's share, in
/// percentage points (binomial noise at 1000 sessions is ≈ 1.6 points).
const TOLERANCE_PTS: f64 = 6.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    L2,
    Ipip,
}

struct Relay {
    name: String,
    v4: String,
    v6: String,
}

fn run_lab(mode: Mode) {
    env::require_root();
    let mut lab = Lab::new();
    let work = std::env::temp_dir().join(format!("{}-dataplane", lab.id()));
    std::fs::create_dir_all(&work).unwrap();

    lab.host("client", &["198.51.100.1/24", "2001:db8::1/64"]);
    lab.host("lb", &["198.51.100.2/24", "2001:db8::2/64"]);
    let mut relays = Vec::new();
    for i in 1..=3 {
        let name = format!("relay{i}");
        let (v4, v6) = match mode {
            Mode::L2 => (format!("198.51.100.1{i}"), format!("2001:db8::1{i}")),
            Mode::Ipip => (format!("192.0.2.1{i}"), format!("2001:db8:2::1{i}")),
        };
        lab.host(&name, &[&format!("{v4}/24"), &format!("{v6}/64")]);
        relays.push(Relay { name, v4, v6 });
    }
    if mode == Mode::Ipip {
        ipip_router(&mut lab);
        lab.sh("client", "ip route add 192.0.2.0/24 via 198.51.100.254 && ip -6 route add 2001:db8:2::/64 via 2001:db8::fe");
        // Tunnelled packets are 20/40 bytes longer: keep the client's below the path MTU.
        lab.sh("client", "ip link set eth0 mtu 1400");
    }
    // The client reaches the VIPs through the LB.
    lab.sh(
        "client",
        &format!(
            "ip route add {VIP4}/32 via 198.51.100.2 && ip -6 route add {VIP6}/128 via 2001:db8::2"
        ),
    );

    // Relays: VIP on lo, never answered for on the segment; smtp-sink on both VIPs.
    let mut dumps: BTreeMap<(String, &str), PathBuf> = BTreeMap::new();
    for r in &relays {
        let mut script = format!(
            "ip addr add {VIP4}/32 dev lo && ip addr add {VIP6}/128 dev lo nodad && \
             sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2"
        );
        if mode == Mode::Ipip {
            script += " && ip route add default via 192.0.2.254 && ip -6 route add default via 2001:db8:2::fe";
            // The decap hands the stack a packet to the VIP that arrived on eth0.
            script += " && sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0";
        }
        lab.sh(&r.name, &script);
        // The balancer health-checks each relay at its own address (EHLO, no mail).
        for listen in [format!("{}:25", r.v4), format!("[{}]:25", r.v6)] {
            let mut cmd = lab.command(&r.name, "smtp-sink");
            cmd.args(["-u", "nobody", &listen, "64"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            lab.spawn(&r.name, cmd);
        }
        for (fam, listen) in [("v4", format!("{VIP4}:25")), ("v6", format!("[{VIP6}]:25"))] {
            let dir = work.join(format!("{}-{fam}", r.name));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap();
            let mut cmd = lab.command(&r.name, "smtp-sink");
            cmd.args(["-u", "nobody", "-d"])
                .arg(dir.join("m"))
                .args([&listen, "1024"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            lab.spawn(&r.name, cmd);
            dumps.insert((r.name.clone(), fam), dir);
        }
        if mode == Mode::Ipip {
            let mut cmd = lab.command(&r.name, env::smtp_lb_bin());
            // Tunnels only from the LB's encapsulation sources (the default
            // prefixes, whose low bits carry the flow hash) to the VIPs.
            cmd.args(["decap", "--iface", "eth0", "--mode", "native"])
                .args(["--allow-source", "172.16.0.0/16"])
                .args(["--allow-source", "fd00:736d:7470::/96"])
                .args(["--vip", VIP4, "--vip", VIP6])
                .env("SMTP_LB_LOG", "warn");
            lab.spawn(&r.name, cmd);
            let name = r.name.clone();
            wait_for("decap attached", Duration::from_secs(20), || {
                String::from_utf8_lossy(&lab.run(&name, &["ip", "link", "show", "eth0"]).stdout)
                    .contains("xdp")
            });
        }
    }

    // The balancer. No warmup ramp: the spread must match the weights at once.
    let mut cfg = format!(
        "state_dir = \"{}\"\n[warmup]\nduration = \"0s\"\nrejoin = \"0s\"\n\n",
        work.join("state").display()
    );
    cfg += &format!("[[services]]\nname = \"mx\"\nvip = \"{VIP4}\"\nports = [25]\n");
    let backend = |cfg: &mut String, r: &Relay, addr: &str, w: u32| {
        let mac = mac_str(lab.get(&r.name).mac);
        *cfg += &format!(
            "[[services.backends]]\nname = \"{}\"\naddress = \"{addr}\"\nweight = {w}\n",
            r.name
        );
        match mode {
            Mode::L2 => *cfg += &format!("forwarding = \"l2\"\nmac = \"{mac}\"\n"),
            Mode::Ipip => *cfg += "forwarding = \"ipip\"\n",
        }
    };
    for (r, w) in relays.iter().zip(WEIGHTS) {
        backend(&mut cfg, r, &r.v4, w);
    }
    cfg += &format!("[[services]]\nname = \"mx6\"\nvip = \"{VIP6}\"\nports = [25]\n");
    for (r, w) in relays.iter().zip(WEIGHTS) {
        backend(&mut cfg, r, &r.v6, w);
    }
    let cfg_path = work.join("lb.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    // Every relay answers from the LB before it starts, so the health checks
    // find them all up at once (neighbours on every hop resolved).
    for r in &relays {
        for addr in [&r.v4, &r.v6] {
            // The first echo may be lost while neighbours resolve on each hop.
            let ok = (0..5).any(|_| {
                lab.try_run("lb", &["ping", "-c1", "-W1", addr])
                    .status
                    .success()
            });
            assert!(ok, "{mode:?}: LB cannot reach {} at {addr}", r.name);
        }
    }
    pass_on_switch_port(&lab, "lb");
    let pin_dir = lab.pin_dir().join("lb");
    let mut cmd = lab.command("lb", env::smtp_lb_bin());
    cmd.args([
        "lb",
        "--iface",
        "eth0",
        "--mode",
        "native",
        "--stats-interval",
        "0",
        "--config",
    ])
    .arg(&cfg_path)
    .arg("--pin-dir")
    .arg(&pin_dir);
    let lb_pid = lab.spawn("lb", cmd);
    wait_for("balancer attached", Duration::from_secs(30), || {
        String::from_utf8_lossy(&lab.run("lb", &["ip", "link", "show", "eth0"]).stdout)
            .contains("xdp")
    });
    // Relays start down and come up after `rise` probes each, not all at
    // once: sessions sent before the last one is up would go to the others
    // and skew the spread this test measures.
    let token = work.join("state").join("admin.token");
    let up = || {
        let out = lab.try_run(
            "lb",
            &[
                env::smtp_lb_bin().to_str().unwrap(),
                "ctl",
                "--json",
                "--token-file",
                token.to_str().unwrap(),
                "backends",
            ],
        );
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        json.as_array()
            .map_or(0, |b| b.iter().filter(|b| b["health"] == "up").count())
    };
    wait_for("every relay up", Duration::from_secs(30), || {
        up() == 2 * relays.len()
    });

    for (fam, target, client_addr) in [
        ("v4", format!("{VIP4}:25"), "198.51.100.1"),
        ("v6", format!("[{VIP6}]:25"), "2001:db8::1"),
    ] {
        let out = lab.try_run(
            "client",
            &[
                "timeout",
                "120",
                "smtp-source",
                "-s",
                "20",
                "-m",
                &SESSIONS.to_string(),
                "-f",
                "app@example.com",
                "-t",
                "user@example.net",
                &target,
            ],
        );
        assert!(
            out.status.success(),
            "{mode:?} {fam}: smtp-source failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every session's message reaches a relay's dump.
        let count = |dir: &Path| std::fs::read_dir(dir).unwrap().count();
        let total = || {
            relays
                .iter()
                .map(|r| count(&dumps[&(r.name.clone(), fam)]))
                .sum::<usize>()
        };
        wait_for("every message dumped", Duration::from_secs(10), || {
            total() >= SESSIONS
        });
        assert_eq!(
            total(),
            SESSIONS,
            "{mode:?} {fam}: every session completes once"
        );
        let weight_sum: u32 = WEIGHTS.iter().sum();
        let mut shares = Vec::new();
        for (r, w) in relays.iter().zip(WEIGHTS) {
            let dir = &dumps[&(r.name.clone(), fam)];
            let n = count(dir);
            let share = 100.0 * n as f64 / SESSIONS as f64;
            let want = 100.0 * f64::from(w) / f64::from(weight_sum);
            shares.push(format!("{}={n} ({share:.1}% vs {want:.1}%)", r.name));
            assert!(
                (share - want).abs() <= TOLERANCE_PTS,
                "{mode:?} {fam}: {} got {share:.1}% of sessions, weight says {want:.1}%",
                r.name
            );
            for e in std::fs::read_dir(dir).unwrap() {
                let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
                let line = text
                    .lines()
                    .find(|l| l.starts_with("X-Client-Addr:"))
                    .unwrap_or_else(|| panic!("no X-Client-Addr in dump: {text}"));
                assert_eq!(
                    line.trim_start_matches("X-Client-Addr:")
                        .trim()
                        .trim_start_matches("ipv6:"),
                    client_addr,
                    "{mode:?} {fam}: relay saw {line}"
                );
            }
        }
        eprintln!("{mode:?} {fam}: {SESSIONS} sessions: {}", shares.join(", "));
    }

    // The data plane's own counters agree: SYNs were balanced, nothing dropped.
    let stats = lab.try_run(
        "lb",
        &[
            env::smtp_lb_bin().to_str().unwrap(),
            "ctl",
            "stats",
            "--json",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&stats.stdout).into_owned();
    eprintln!("{mode:?} stats: {text}");
    assert!(
        stats.status.success(),
        "ctl stats: {}",
        String::from_utf8_lossy(&stats.stderr)
    );
    assert!(text.contains("\"drop_no_backend\":0"), "{text}");
    assert!(
        lab.stop(lb_pid, Duration::from_secs(5)),
        "smtp-lb lb exits on SIGTERM"
    );
    assert!(
        !pin_dir.join("SERVICES").exists(),
        "pins removed on a clean exit"
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn l2_dsr_spreads_real_smtp_sessions_by_weight() {
    run_lab(Mode::L2);
}

#[test]
fn ipip_with_decap_spreads_real_smtp_sessions_by_weight() {
    run_lab(Mode::Ipip);
}
