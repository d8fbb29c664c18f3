//! The balancer daemon under continuous SMTP load in the lab (three relays
//! running Postfix `smtp-sink`, a load generator in the client namespace
//! that records every session and which relay served it):
//! - a killed relay leaves the table within the health-check bound, no
//!   session goes to it afterwards, sessions on the others never fail;
//!   restarted, it comes back through its warmup ramp;
//! - a drained relay gets no new sessions while its in-flight ones finish;
//! - restarting the daemon mid-load breaks no session;
//! - a bad config on reload is refused with its line, traffic unaffected.
use std::{net::SocketAddr, thread, time::Duration};

use smtp_lb_tests::{
    load::{Load, Session},
    relay,
    topology::{DsrLab, VIP, wait_for},
};

fn target() -> SocketAddr {
    format!("{VIP}:25").parse().unwrap()
}

fn client_netns(dsr: &DsrLab) -> String {
    dsr.lab.get("client").netns.clone()
}

fn health_of(dsr: &DsrLab, name: &str) -> String {
    dsr.backend_row(name)["health"].as_str().unwrap().to_owned()
}

fn live_flows(dsr: &DsrLab, name: &str) -> u64 {
    dsr.backend_row(name)["live_flows"].as_u64().unwrap()
}

fn share(sessions: &[&Session], relay: &str) -> f64 {
    let n = sessions
        .iter()
        .filter(|s| s.relay.as_deref() == Some(relay))
        .count();
    n as f64 / sessions.len().max(1) as f64
}

fn failures(sessions: &[Session]) -> Vec<&Session> {
    sessions.iter().filter(|s| s.error.is_some()).collect()
}

#[test]
fn a_killed_relay_leaves_within_the_bound_and_returns_through_warmup() {
    let mut dsr = DsrLab::new(3);
    // Health: 200 ms interval, fall 2, connect 200 ms + greeting 300 ms +
    // EHLO 300 ms: a dead relay is out within 0.4 + 0.8 = 1.2 s.
    // Warmup compressed: a recovering relay ramps 10 % → 100 % in 6 s, 3 steps.
    let cfg = dsr.config(
        &[1, 1, 1],
        "[warmup]\nduration = \"0s\"\nrejoin = \"6s\"\nstart_percent = 10\nsteps = 3\n",
    );
    dsr.start_lb(&cfg, &[]);
    let bound = Duration::from_millis(1200);
    let load = Load::start(&client_netns(&dsr), target(), 6, Duration::ZERO);
    thread::sleep(Duration::from_secs(1));

    let t_kill = load.now();
    dsr.kill_sink(1);
    wait_for("relay2 down", Duration::from_secs(10), || {
        health_of(&dsr, "relay2") == "down"
    });
    let t_down = load.now();
    let flows_at_down = dsr.new_flows()[1];
    eprintln!(
        "relay2 left the table {:?} after it died (bound {bound:?})",
        t_down.checked_sub(t_kill).unwrap()
    );
    // ctl is polled, so allow its own latency on top of the bound.
    assert!(
        t_down.checked_sub(t_kill).unwrap() <= bound + Duration::from_millis(600),
        "took {:?}",
        t_down.checked_sub(t_kill).unwrap()
    );
    thread::sleep(Duration::from_secs(1));

    let flows_before_restart = dsr.new_flows()[1];
    dsr.start_sink(1);
    wait_for("relay2 up", Duration::from_secs(10), || {
        health_of(&dsr, "relay2") == "up"
    });
    let t_up = load.now();
    thread::sleep(Duration::from_secs(8));
    let sessions = load.stop();

    let on = |relay: &str| {
        sessions
            .iter()
            .filter(|s| s.relay.as_deref() == Some(relay))
            .count()
    };
    let others_failed = sessions
        .iter()
        .filter(|s| s.error.is_some() && matches!(s.relay.as_deref(), Some("relay1" | "relay3")))
        .count();
    eprintln!(
        "{} sessions: relay1 {}, relay2 {}, relay3 {}; failed {}",
        sessions.len(),
        on("relay1"),
        on("relay2"),
        on("relay3"),
        failures(&sessions).len()
    );
    assert_eq!(others_failed, 0, "a session on a healthy relay failed");
    assert!(
        on("relay1") > 100 && on("relay3") > 100,
        "the healthy relays kept serving"
    );
    // Failures only around the death: sessions in flight on relay2, or sent
    // to it before the balancer took it out.
    for f in failures(&sessions) {
        assert!(
            f.start + Duration::from_millis(100) >= t_kill && f.start <= t_down,
            "a session failed outside the window: {f:?}"
        );
    }
    // Once out of the table, the data plane sent relay2 no new flow until it was back.
    assert_eq!(
        flows_before_restart, flows_at_down,
        "XDP sent new flows to relay2 while it was out of the table"
    );

    // Back through warmup: its share of new sessions rises along the ramp.
    let window = |from: f64, to: f64| -> Vec<&Session> {
        sessions
            .iter()
            .filter(|s| {
                let t = s.start.as_secs_f64() - t_up.as_secs_f64();
                t >= from && t < to && s.error.is_none()
            })
            .collect()
    };
    let (first, last, after) = (
        share(&window(0.0, 1.5), "relay2"),
        share(&window(4.5, 5.8), "relay2"),
        share(&window(6.5, 8.0), "relay2"),
    );
    eprintln!(
        "relay2 share after recovery: first step {first:.3}, last step {last:.3}, after the ramp {after:.3}"
    );
    // Weights 1:1:1; at 10 % relay2 gets 0.1/2.1 ≈ 5 %, at 70 % ≈ 26 %, then 33 %.
    assert!(first < 0.12, "first step share {first:.3}");
    assert!(
        last > first + 0.08,
        "share did not rise: {first:.3} → {last:.3}"
    );
    assert!((after - 1.0 / 3.0).abs() < 0.08, "full share {after:.3}");
}

#[test]
fn a_drained_relay_gets_no_new_sessions_while_its_open_ones_finish() {
    let mut dsr = DsrLab::new(3);
    let cfg = dsr.config(&[1, 1, 1], "");
    dsr.start_lb(&cfg, &[]);
    // Long sessions: each holds 1 s after MAIL FROM.
    let load = Load::start(&client_netns(&dsr), target(), 12, Duration::from_secs(1));
    thread::sleep(Duration::from_millis(2500));
    // 12 sessions from random ports over three relays: at a given instant
    // relay1 may hold none (≈ 1 % of runs), and the drain must meet some.
    wait_for(
        "sessions live on relay1 before the drain",
        Duration::from_secs(10),
        || live_flows(&dsr, "relay1") > 0,
    );
    let t_drain = load.now();
    dsr.ctl(&["drain", "relay1"]);
    let t_applied = load.now();
    let flows_at_drain = dsr.new_flows()[0];
    let live_at_drain = live_flows(&dsr, "relay1");
    thread::sleep(Duration::from_secs(3));
    let flows_after = dsr.new_flows()[0];
    let sessions = load.stop();
    // ctl shows the drained relay's live flows falling to zero as its sessions end.
    eprintln!("relay1 live flows: {live_at_drain} at the drain");
    assert!(
        live_at_drain > 0,
        "sessions were live on relay1 when it was drained"
    );
    wait_for(
        "relay1's live flows to reach 0",
        Duration::from_secs(10),
        || live_flows(&dsr, "relay1") == 0,
    );

    assert!(
        failures(&sessions).is_empty(),
        "sessions failed: {:?}",
        failures(&sessions)
    );
    let in_flight = sessions
        .iter()
        .filter(|s| s.relay.as_deref() == Some("relay1") && s.start < t_drain && s.end > t_applied)
        .count();
    let new_after = sessions
        .iter()
        .filter(|s| s.relay.as_deref() == Some("relay1") && s.start > t_applied)
        .count();
    eprintln!(
        "relay1: {in_flight} sessions in flight across the drain completed; {new_after} new ones after it"
    );
    assert!(
        in_flight > 0,
        "the test needs sessions open on relay1 when it is drained"
    );
    assert_eq!(new_after, 0, "relay1 received new sessions after the drain");
    assert_eq!(
        flows_after, flows_at_drain,
        "XDP sent new flows to the drained relay"
    );
    let backends = dsr.ctl(&["backends"]);
    let relay1 = &backends.as_array().unwrap()[0];
    assert_eq!(relay1["drained"], true);
    assert_eq!(relay1["effective_weight"], 0);

    dsr.ctl(&["undrain", "relay1"]);
    dsr.send(60, 6);
    assert!(
        dsr.new_flows()[0] > flows_after,
        "undrained relay1 takes new flows again"
    );
}

#[test]
fn restarting_the_daemon_mid_load_breaks_no_session() {
    let mut dsr = DsrLab::new(3);
    let cfg = dsr.config(&[1, 1, 1], "");
    let first = dsr.start_lb(&cfg, &["--keep-pinned"]);
    let load = Load::start(&client_netns(&dsr), target(), 8, Duration::from_millis(200));
    thread::sleep(Duration::from_secs(1));
    let t_stop = load.now();
    assert!(
        dsr.lab.stop(first, Duration::from_secs(5)),
        "the daemon exits on SIGTERM"
    );
    thread::sleep(Duration::from_millis(500)); // no daemon at all for a while
    dsr.start_lb(&cfg, &["--keep-pinned"]);
    let t_back = load.now();
    thread::sleep(Duration::from_secs(1));
    let sessions = load.stop();
    let across = sessions
        .iter()
        .filter(|s| s.start < t_back && s.end > t_stop)
        .count();
    eprintln!(
        "{} sessions, {across} of them across the restart",
        sessions.len()
    );
    assert!(
        failures(&sessions).is_empty(),
        "sessions failed: {:?}",
        failures(&sessions)
    );
    assert!(across > 0);
    let status = dsr.ctl(&["status"]);
    assert_eq!(status["counters"]["drop_no_backend"], 0);
    for name in ["relay1", "relay2", "relay3"] {
        assert_eq!(
            health_of(&dsr, name),
            "up",
            "the restarted daemon kept {name} up"
        );
    }
}

#[test]
fn a_bad_config_on_reload_is_refused_by_line_and_traffic_continues() {
    let mut dsr = DsrLab::new(3);
    let good = dsr.config(&[1, 1, 1], "");
    dsr.start_lb(&good, &[]);
    let load = Load::start(&client_netns(&dsr), target(), 4, Duration::ZERO);
    thread::sleep(Duration::from_millis(500));

    // A typo in a backend's field.
    let bad = good.replacen("weight = 1", "weigth = 1", 1);
    let line = bad.lines().position(|l| l.starts_with("weigth")).unwrap() + 1;
    std::fs::write(&dsr.config_path, &bad).unwrap();
    let out = dsr.ctl_raw(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad config must be refused");
    assert!(
        err.contains(&format!("line {line}")) && err.contains("weigth"),
        "error names the line and field: {err}"
    );
    assert!(err.contains("lb.toml"), "error names the file: {err}");

    // SIGHUP takes the same path.
    dsr.lab
        .run("lb", &["kill", "-HUP", &dsr.lb.unwrap().to_string()]);
    wait_for("the SIGHUP reload", Duration::from_secs(5), || {
        dsr.ctl(&["status"])["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("weigth"))
    });
    thread::sleep(Duration::from_millis(500));

    // A good change is applied.
    std::fs::write(&dsr.config_path, dsr.config(&[1, 1, 3], "")).unwrap();
    dsr.ctl(&["reload"]);
    let backends = dsr.ctl(&["backends"]);
    assert_eq!(backends[2]["configured_weight"], 3);
    thread::sleep(Duration::from_millis(500));
    let sessions = load.stop();
    assert!(
        failures(&sessions).is_empty(),
        "sessions failed: {:?}",
        failures(&sessions)
    );
    assert!(sessions.len() > 100);
}

/// Sends raw bytes to the admin API inside the LB node; returns the answer.
fn admin_raw(dsr: &DsrLab, request: &'static [u8]) -> String {
    dsr.lab.in_netns("lb", move || {
        smtp_lb_tests::tmp::raw_http("127.0.0.1:9700".parse().unwrap(), request)
    })
}

#[test]
fn the_admin_api_refuses_bad_requests_with_4xx_and_keeps_serving() {
    let mut dsr = DsrLab::new(1);
    let cfg = dsr.config(&[1], "");
    dsr.start_lb(&cfg, &[]);
    let mode = std::fs::metadata(dsr.work.join("state/admin.token")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600,
        "the token is private"
    );
    for (request, status) in [
        (&b"GET /backends HTTP/1.1\r\n\r\n"[..], "401"),
        (
            b"GET /backends HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n",
            "401",
        ),
        (b"garbage\r\n\r\n", "400"),
        (
            b"GET /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            "413",
        ),
        (b"\x00\x01\x02\r\n\r\n", "400"),
    ] {
        let answer = admin_raw(&dsr, request);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?} → {answer}"
        );
    }
    for (args, fragment) in [
        (&["drain", "nosuch"][..], "no backend named `nosuch`"),
        (&["weight", "relay1", "lots"], "not a number"),
        (&["weight", "relay1", "2000000"], "at most"),
    ] {
        let out = dsr.ctl_raw(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(fragment),
            "ctl {args:?}: {err}"
        );
    }
    // A client that connects and says nothing does not block others.
    let _idle = dsr.lab.in_netns("lb", || {
        std::net::TcpStream::connect("127.0.0.1:9700").unwrap()
    });
    assert_eq!(
        dsr.ctl(&["backends"])[0]["health"],
        "up",
        "the daemon still answers"
    );
}

#[test]
fn where_names_the_relay_a_new_connection_reaches() {
    let mut dsr = DsrLab::new(3);
    let cfg = dsr.config(&[2, 1, 1], "");
    dsr.start_lb(&cfg, &[]);
    let client = smtp_lb_tests::topology::CLIENT;
    for cport in [40001u16, 40002, 41234, 50000, 55555, 60001, 61000, 62000] {
        let answer = dsr.ctl(&["where", &format!("{VIP}:25"), &format!("{client}:{cport}")]);
        let predicted = answer["new_flow"]["backend"]
            .as_str()
            .expect("a backend for a new flow")
            .to_owned();
        // Connect from exactly that port and see who greets.
        let greeted = dsr.lab.in_netns("client", move || {
            use std::io::{BufRead, BufReader};
            let sock = connect_from(client, cport);
            let mut line = String::new();
            BufReader::new(sock).read_line(&mut line).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned()
        });
        assert_eq!(
            greeted, predicted,
            "client port {cport}: ctl where said {predicted}, {greeted} answered"
        );
        let tracked = dsr.ctl(&["where", &format!("{VIP}:25"), &format!("{client}:{cport}")]);
        assert_eq!(
            tracked["tracked"]["backend"],
            predicted.as_str(),
            "the flow is now tracked on its relay"
        );
    }
}

/// A TCP connection from `client:cport` to the VIP (bound before connect).
fn connect_from(client: &str, cport: u16) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let local: std::net::SocketAddrV4 = format!("{client}:{cport}").parse().unwrap();
    let remote: std::net::SocketAddrV4 = format!("{VIP}:25").parse().unwrap();
    // SAFETY: plain socket calls on a fresh fd we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let to_sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let l = to_sa(local);
        assert_eq!(
            libc::bind(
                fd,
                (&raw const l).cast(),
                size_of::<libc::sockaddr_in>() as u32
            ),
            0,
            "bind {local}"
        );
        let r = to_sa(remote);
        assert_eq!(
            libc::connect(
                fd,
                (&raw const r).cast(),
                size_of::<libc::sockaddr_in>() as u32
            ),
            0,
            "connect {remote}"
        );
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// Starts the real relay (`smtp-lb relay`) on each relay host of `dsr`, at
/// most `max_connections` sessions each (one more is greeted with `421`),
/// delivering everything to an `smtp-sink` on the relay host itself.
fn start_relays(dsr: &mut DsrLab, max_connections: usize) {
    for r in &dsr.relays {
        let dir = dsr.work.join(format!("{}-relay", r.name));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = relay::lab_config(&r.name, &dir);
        cfg.limits.max_connections = max_connections;
        cfg.routes = [("*".to_owned(), "127.0.0.1:2525".to_owned())].into();
        let path = dir.join("relay.toml");
        relay::write_config(&cfg, &path);
        let mut sink = dsr.lab.command(&r.name, "smtp-sink");
        sink.args(["-u", "nobody", "127.0.0.1:2525", "64"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        dsr.lab.spawn(&r.name, sink);
        let mut relay = dsr.lab.command(&r.name, smtp_lb_tests::env::smtp_lb_bin());
        relay
            .arg("relay")
            .arg("--config")
            .arg(&path)
            .env("SMTP_LB_LOG", "error");
        dsr.lab.spawn(&r.name, relay);
    }
    for i in 0..dsr.relays.len() {
        dsr.wait_listening(i, "smtp-lb relay", Duration::from_secs(20));
    }
}

#[test]
fn when_every_relay_is_full_sessions_keep_being_accepted_and_none_is_dropped_at_the_lb() {
    let mut dsr = DsrLab::bare(3);
    // Two sessions per relay; a third is greeted with 421 (full).
    start_relays(&mut dsr, 2);
    let cfg = dsr.config(&[1, 1, 1], "");
    dsr.start_lb(&cfg, &[]);
    wait_for("every relay up", Duration::from_secs(10), || {
        ["relay1", "relay2", "relay3"]
            .iter()
            .all(|r| health_of(&dsr, r) == "up")
    });
    // Twelve clients holding their sessions 2 s for six slots: every relay
    // stays full, so its health checks are greeted with 421 too.
    let load = Load::start(&client_netns(&dsr), target(), 12, Duration::from_secs(2));
    let mut source = dsr.smtp_source(100_000, 4, "user@isp.example");
    source
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut source = source.spawn().expect("run smtp-source");
    wait_for("every relay full", Duration::from_secs(15), || {
        ["relay1", "relay2", "relay3"]
            .iter()
            .all(|r| health_of(&dsr, r) == "full")
    });
    let t_full = load.now();
    let mut all_full_seen = 0;
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(500));
        let backends = dsr.ctl(&["backends"]);
        if backends
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["health"] == "full")
        {
            all_full_seen += 1;
        }
    }
    let t_end = load.now();
    let status = dsr.ctl(&["status"]);
    let _ = source.kill();
    let _ = source.wait();
    let sessions = load.stop();
    let accepted = sessions
        .iter()
        .filter(|s| s.error.is_none() && s.end > t_full && s.end <= t_end)
        .count();
    let greeted_full = sessions
        .iter()
        .filter(|s| s.error.as_deref().is_some_and(|e| e.contains("421")))
        .count();
    eprintln!(
        "10 s with every relay full ({all_full_seen}/20 samples all full): {accepted} sessions accepted, {greeted_full} greeted 421; status {status}"
    );
    assert!(
        all_full_seen >= 10,
        "the relays were not full for most of the 10 s"
    );
    assert!(greeted_full > 0, "the relays turned clients away with 421");
    assert!(
        accepted >= 20,
        "sessions were accepted as slots freed up: {accepted}"
    );
    assert_eq!(
        status["counters"]["drop_no_backend"], 0,
        "no SYN was dropped at the balancer"
    );
    assert!(status["services"][0]["all_full"].as_u64().unwrap() >= 1);
}

#[test]
fn when_every_relay_dies_the_last_good_table_stays_and_the_panic_is_counted() {
    let mut dsr = DsrLab::new(3);
    let cfg = dsr.config(&[1, 1, 1], "");
    dsr.start_lb(&cfg, &[]);
    dsr.send(30, 3);
    let before = dsr.new_flows();
    for i in 0..3 {
        dsr.kill_sink(i);
    }
    wait_for("every relay down", Duration::from_secs(10), || {
        ["relay1", "relay2", "relay3"]
            .iter()
            .all(|r| health_of(&dsr, r) == "down")
    });
    let status = dsr.ctl(&["status"]);
    eprintln!("status with every relay down: {}", status["services"]);
    assert_eq!(status["services"][0]["mode"], "panic");
    assert_eq!(status["services"][0]["panics"], 1);
    // New connections still go to a relay (whose kernel refuses them: the
    // sink is dead), none is dropped at the balancer.
    let client = smtp_lb_tests::topology::CLIENT;
    let answer = dsr.ctl(&["where", &format!("{VIP}:25"), &format!("{client}:45000")]);
    assert!(
        answer["new_flow"]["backend"].is_string(),
        "a new flow still has a relay: {answer}"
    );
    for _ in 0..10 {
        let _ = dsr.lab.in_netns("client", || {
            std::net::TcpStream::connect_timeout(&target(), Duration::from_secs(1))
        });
    }
    let after: u64 = dsr.new_flows().iter().sum();
    assert!(
        after >= before.iter().sum::<u64>() + 10,
        "the SYNs reached relays: {before:?} → {after}"
    );
    assert_eq!(dsr.ctl(&["status"])["counters"]["drop_no_backend"], 0);
    // The metric counts it.
    let token = std::fs::read_to_string(dsr.work.join("state/admin.token")).unwrap();
    let metrics = dsr.lab.in_netns("lb", move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9700").expect("admin API reachable");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = format!(
            "GET /metrics HTTP/1.1\r\nAuthorization: Bearer {}\r\n\r\n",
            token.trim()
        );
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    assert!(
        metrics.contains("smtp_lb_balancer_service_panic_total{service=\"mx\"} 1")
            && metrics.contains("smtp_lb_balancer_service_in_panic{service=\"mx\"} 1"),
        "{metrics}"
    );
    // A relay back: out of panic, sessions complete again.
    dsr.start_sink(0);
    wait_for("relay1 up", Duration::from_secs(10), || {
        health_of(&dsr, "relay1") == "up"
    });
    assert_eq!(dsr.ctl(&["status"])["services"][0]["mode"], "normal");
    dsr.send(20, 2);
}
