//! Per-port relay sets and per-port health checks, end to end: real
//! namespaces, the real XDP program in native mode, real SMTP peers.
//!
//! One VIP, three balanced ports, each with its own relays and dialect:
//! - 25 → relay1, relay2 (plain SMTP checks);
//! - 587 → relay3 (checked with `STARTTLS` off, EHLO only);
//! - 465 → relay1, relay2, checked with implicit TLS: relay1 runs a real
//!   Postfix `smtpd` with `smtpd_tls_wrappermode = yes`; relay2's 465 has
//!   broken TLS (its `smtp-sink` there greets in clear text, a wrapper
//!   mode forgotten).
//!
//! Every relay also runs `smtp-sink` on 25 and 587, each port dumping into
//! its own directory, so a session balanced to the wrong relay set would be
//! accepted and counted, not just fail. `smtp-source` and `swaks` sessions
//! on each port must land only on that port's relays, relay2 must be down
//! on 465 and up on 25, and the 465 sessions must all reach relay1's
//! Postfix.
use std::{path::PathBuf, time::Duration};

use smtp_lb_tests::{
    postfix::{At, Postfix},
    topology::{DsrLab, VIP, count, wait_for},
};

/// `check` (`465/implicit`) of the relay called `name`, as `ctl backends` shows it.
fn check_row(dsr: &DsrLab, name: &str, check: &str) -> serde_json::Value {
    let b = dsr.backend_row(name);
    b["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["check"] == check))
        .unwrap_or_else(|| panic!("{name} has no check {check}: {b}"))
        .clone()
}

fn check_health(dsr: &DsrLab, name: &str, check: &str) -> Option<String> {
    check_row(dsr, name, check)["health"]
        .as_str()
        .map(str::to_owned)
}

/// The checks `ctl backends` lists for the relay called `name`.
fn checks_of(dsr: &DsrLab, name: &str) -> Vec<String> {
    dsr.backend_row(name)["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap().to_owned())
        .collect()
}

/// Runs `smtp-source` to VIP:`port`; panics unless every session succeeded.
fn send(dsr: &DsrLab, port: u16, sessions: usize) {
    let out = dsr
        .smtp_source_to(port, sessions, 10, "user@lab.example")
        .output()
        .expect("run smtp-source");
    assert!(
        out.status.success(),
        "smtp-source to {VIP}:{port}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn each_port_reaches_only_its_relays_and_465_is_checked_with_implicit_tls() {
    smtp_lb_tests::env::require_root();
    let mut dsr = DsrLab::new(3);
    // Sinks on 587 on every relay, each port with its own dump.
    let dump = |dsr: &DsrLab, i: usize, port: u16| -> PathBuf {
        dsr.work.join(format!("relay{}-{port}-dump", i + 1))
    };
    for i in 0..3 {
        let d = dump(&dsr, i, 587);
        dsr.spawn_sink(i, 587, &d);
    }
    // 465: relay1 a real Postfix in wrapper mode, relay2 clear text.
    let tls_dir = dsr.work.join("pf-465");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let relay1_ns = dsr.lab.get("relay1").netns.clone();
    let postfix = Postfix::destination_implicit_tls(
        "lab.example",
        &tls_dir,
        At {
            listen: ([0, 0, 0, 0], 465).into(),
            netns: Some(&relay1_ns),
        },
    );
    let broken_465 = dump(&dsr, 1, 465);
    dsr.spawn_sink(1, 465, &broken_465);

    let config = format!(
        "state_dir = \"{state}\"\n\
         [health]\ninterval = \"200ms\"\nrise = 2\nfall = 2\n\
         [health.timeouts]\nconnect = \"300ms\"\ngreeting = \"1s\"\nehlo = \"1s\"\nhandshake = \"1s\"\n\
         [warmup]\nduration = \"0s\"\nrejoin = \"0s\"\n\n\
         [[services]]\nname = \"mx\"\nvip = \"{VIP}\"\nports = [25]\n{r1}{r2}\n\
         [[services]]\nname = \"submission\"\nvip = \"{VIP}\"\nports = [587]\n{r3}\n\
         [[services]]\nname = \"submissions\"\nvip = \"{VIP}\"\nports = [465]\n{r1}{r2}",
        state = dsr.work.join("state").display(),
        r1 = dsr.backend(0, 1),
        r2 = dsr.backend(1, 1),
        r3 = dsr.backend(2, 1),
    );
    let check = std::process::Command::new(smtp_lb_tests::env::smtp_lb_bin())
        .arg("check-config")
        .arg({
            let p = dsr.work.join("check.toml");
            std::fs::write(&p, &config).unwrap();
            p
        })
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    dsr.start_lb(&config, &[]);

    // Each relay is checked on the ports it serves, in that port's dialect.
    assert_eq!(checks_of(&dsr, "relay1"), ["25/none", "465/implicit"]);
    assert_eq!(checks_of(&dsr, "relay2"), ["25/none", "465/implicit"]);
    assert_eq!(checks_of(&dsr, "relay3"), ["587/none"]);
    wait_for("relay1 up on 25 and 465", Duration::from_secs(15), || {
        check_health(&dsr, "relay1", "25/none").as_deref() == Some("up")
            && check_health(&dsr, "relay1", "465/implicit").as_deref() == Some("up")
    });
    wait_for("relay3 up on 587", Duration::from_secs(15), || {
        check_health(&dsr, "relay3", "587/none").as_deref() == Some("up")
    });
    // relay2: its 465 TLS is broken: down there, up on 25.
    wait_for(
        "relay2 up on 25 and down on 465",
        Duration::from_secs(15),
        || {
            check_health(&dsr, "relay2", "25/none").as_deref() == Some("up")
                && check_health(&dsr, "relay2", "465/implicit").as_deref() == Some("down")
        },
    );
    let relay2 = dsr.backend_row("relay2");
    let smtps = check_row(&dsr, "relay2", "465/implicit");
    let why = smtps["history"][0]["error"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("TLS handshake"),
        "relay2's 465 fails at the handshake: {smtps}"
    );
    assert_eq!(relay2["health"], "down", "a broken port shows on the relay");
    assert_eq!(
        relay2["effective_weights"]["25"], 1000,
        "relay2 keeps its weight on 25: {relay2}"
    );
    assert_eq!(relay2["effective_weights"]["465"], 0, "{relay2}");

    // Sessions on each port land only on that port's relays.
    let (n25, n587, n465) = (200, 100, 12);
    send(&dsr, 25, n25);
    send(&dsr, 587, n587);
    for i in 0..n465 {
        let out = dsr.lab.try_run(
            "client",
            &[
                "swaks",
                "--server",
                &format!("{VIP}:465"),
                "--tlsc",
                "--from",
                "app@lab.example",
                "--to",
                "user@lab.example",
                "--header",
                &format!("Subject: submissions {i}"),
                "--timeout",
                "10",
            ],
        );
        assert!(
            out.status.success(),
            "swaks session {i} to {VIP}:465 with implicit TLS: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let on_25: Vec<usize> = (0..3).map(|i| count(&dsr.relays[i].dump)).collect();
    let on_587: Vec<usize> = (0..3).map(|i| count(&dump(&dsr, i, 587))).collect();
    eprintln!("port 25 sessions per relay: {on_25:?}; port 587: {on_587:?}");
    assert_eq!(on_25[2], 0, "no port-25 session on relay3");
    assert_eq!(on_25[0] + on_25[1], n25, "every 25 session on relay1-2");
    assert!(
        on_25[0] > n25 / 4 && on_25[1] > n25 / 4,
        "25 spread over relay1-2: {on_25:?}"
    );
    assert_eq!(on_587, [0, 0, n587], "587 only on relay3");
    assert_eq!(count(&broken_465), 0, "nothing to relay2's broken 465");
    wait_for(
        "the 465 messages in relay1's Postfix mailbox",
        Duration::from_secs(30),
        || postfix.delivered().len() == n465,
    );
    // The data plane agrees: new flows per relay are exactly its sessions.
    let flows = dsr.new_flows();
    assert_eq!(
        flows,
        [(on_25[0] + n465) as u64, on_25[1] as u64, n587 as u64],
        "new flows per relay (25 + 465, 25, 587)"
    );
    let stats = dsr.stats();
    assert_eq!(
        stats["global"]["drop_no_backend"], 0,
        "no SYN found an empty table: {stats}"
    );
    drop(postfix);
}
