//! The relay against real peers on 127.0.0.1: `smtp-source` and `swaks`
//! submit; Postfix `smtp-sink`, a real Postfix (found through dnsmasq MX
//! records) and a scriptable sink receive.
use std::{process::Command, time::Duration};

use smtp_lb_tests::{
    dns::Dnsmasq,
    fake_mx::FakeMx,
    postfix::Postfix,
    relay::{Relay, RelayConfig},
    sink::SmtpSink,
    smtp::{RawSmtp, swaks},
    tmp::{TempDir, wait_for},
};

const WAIT: Duration = Duration::from_secs(30);

fn route_all_to(addr: std::net::SocketAddr) -> RelayConfig {
    RelayConfig {
        routes: vec![("*".into(), addr.to_string())],
        ..RelayConfig::default()
    }
}

#[test]
fn smtp_source_and_swaks_submit_and_smtp_sink_receives_all() {
    let sink = SmtpSink::start();
    let relay = Relay::start(&route_all_to(sink.addr));
    let server = relay.smtp.to_string();
    let out = Command::new("smtp-source")
        .args([
            "-s",
            "5",
            "-m",
            "100",
            "-f",
            "sender@src.test",
            "-t",
            "rcpt@dst.test",
            &server,
        ])
        .output()
        .expect("run smtp-source");
    assert!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, t) = swaks(&[
        "--server",
        &server,
        "--from",
        "a@src.test",
        "--to",
        "plain@dst.test",
        "--h-Subject",
        "plain",
    ]);
    assert!(ok, "swaks plain: {t}");
    assert!(t.contains("250 2.0.0 Ok: queued as"), "{t}");
    let (ok, t) = swaks(&[
        "--server",
        &server,
        "--pipeline",
        "--from",
        "a@src.test",
        "--to",
        "p1@dst.test,p2@dst.test",
        "--h-Subject",
        "piped",
    ]);
    assert!(ok, "swaks --pipeline: {t}");
    // swaks only pipelines when the server offered PIPELINING.
    assert!(t.contains("PIPELINING"), "{t}");
    // smtp-sink writes each dump file while receiving: wait until all are complete
    // (every one ends with its body: smtp-source's "La de da…" or swaks' default text).
    let msgs = wait_for("102 complete messages at smtp-sink", WAIT, || {
        let m = sink.messages();
        (m.len() >= 102
            && m.iter()
                .all(|x| x.contains("La de da") || x.contains("This is a test mailing")))
        .then_some(m)
    });
    assert_eq!(msgs.len(), 102);
    let piped = msgs
        .iter()
        .find(|m| m.contains("Subject: piped"))
        .expect("pipelined message delivered");
    assert!(
        piped.contains("<p1@dst.test>") && piped.contains("<p2@dst.test>"),
        "two recipients, one transaction: {piped}"
    );
    assert!(
        msgs.iter().all(|m| m.contains("by relay.test (smtp-lb)")),
        "every message carries our Received header"
    );
    // One delivery-log line per recipient (written just after the sink's 250).
    wait_for("103 delivered log lines", WAIT, || {
        (relay
            .log()
            .iter()
            .filter(|v| v["status"] == "delivered")
            .count()
            == 103)
            .then_some(())
    });
    assert_eq!(relay.metric("smtp_lb_relay_messages_accepted_total"), 102);
}

#[test]
fn real_postfix_as_mx_found_via_dnsmasq_receives_identical_body_over_starttls() {
    let certs = TempDir::new("pf-tls");
    let postfix = Postfix::destination_tls("dest.test", certs.path());
    // mx0 (preferred) is dead: the relay must fall through to mx1.
    let dns = Dnsmasq::start(&[
        "--local=/test/".into(),
        "--mx-host=dest.test,mx0.dest.test,5".into(),
        "--mx-host=dest.test,mx1.dest.test,10".into(),
        "--host-record=mx0.dest.test,127.0.0.2".into(),
        "--host-record=mx1.dest.test,127.0.0.1".into(),
    ]);
    let relay = Relay::start(&RelayConfig {
        nameservers: vec![dns.addr.to_string()],
        mx_port: postfix.addr.port(),
        ..RelayConfig::default()
    });
    let body = "Subject: byte for byte\r\nFrom: <a@src.test>\r\nTo: <user@dest.test>\r\nMessage-ID: <cmp-1@src.test>\r\n\r\nline one\r\n.leading dot survives stuffing\r\n..two dots\r\n  indented\t tab\r\n\r\n8-bit: caf\u{e9} \u{2603}\r\nlast line\r\n";
    let tmp = TempDir::new("body");
    let file = tmp.join("msg.eml");
    // swaks sends the file, then CRLF . CRLF: leave the last CRLF to it.
    std::fs::write(&file, body.strip_suffix("\r\n").unwrap()).unwrap();
    let (ok, t) = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--from",
        "a@src.test",
        "--to",
        "user@dest.test",
        "--data",
        &file.display().to_string(),
    ]);
    assert!(ok, "swaks: {t}");
    let delivered = wait_for("delivery into Postfix's maildir", WAIT, || {
        postfix.delivered().into_iter().next()
    });
    // Postfix stores mail with LF line ends: compare the body and the
    // original headers after the headers Postfix and we prepended.
    let sent = body.replace("\r\n", "\n");
    let (sent_head, sent_body) = sent.split_once("\n\n").unwrap();
    let (got_head, got_body) = delivered.split_once("\n\n").expect("headers and body");
    assert_eq!(got_body, sent_body, "body changed in transit");
    // Postfix may append a missing Date: header; ours must be there, intact and in order.
    assert!(
        got_head.contains(sent_head),
        "original headers must follow the trace headers:\n{got_head}"
    );
    assert!(got_head.contains("by relay.test (smtp-lb)"));
    // Postfix's own Received header: the relay upgraded with STARTTLS (opportunistic).
    let postfix_received = got_head.split("Received: ").nth(1).unwrap_or_default();
    assert!(
        postfix_received.contains("with ESMTPS"),
        "delivery was not over TLS:\n{got_head}\n{}",
        postfix.maillog()
    );
    let entry = relay.wait_log("delivered log line", WAIT, |v| v["status"] == "delivered");
    assert_eq!(entry["mx"], "mx1.dest.test");
    assert_eq!(entry["ip"], "127.0.0.1");
    assert_eq!(entry["queue"], "dest.test");
    assert_eq!(entry["code"], 250);
}

#[test]
fn tempfail_then_success_is_retried_and_delivered() {
    let sink = FakeMx::start();
    let relay = Relay::start(&route_all_to(sink.addr));
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    let r = c.transaction(
        "s@src.test",
        &["tempfail-once@dst.test"],
        b"Subject: retry me\r\n\r\nhi\r\n.\r\n",
    );
    assert_eq!(r.code, 250, "{r:?}");
    let got = wait_for("retried delivery", WAIT, || {
        sink.received()
            .into_iter()
            .find(|m| m.data.contains("retry me"))
    });
    assert_eq!(got.rcpts, vec!["tempfail-once@dst.test"]);
    assert_eq!(sink.attempts("tempfail-once@dst.test"), 2);
    let log = wait_for("two log lines", WAIT, || {
        let l = relay.log();
        (l.len() >= 2).then_some(l)
    });
    let statuses: Vec<_> = log
        .iter()
        .map(|v| {
            (
                v["status"].as_str().unwrap().to_owned(),
                v["code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        vec![("deferred".into(), 451), ("delivered".into(), 250)]
    );
    assert_eq!(log[0]["enhanced"], "4.2.0");
    assert_eq!(log[1]["attempt"], 2);
}

#[test]
fn permanent_failure_bounces_with_rfc3464_dsn_to_sender_and_none_for_null_sender() {
    let sink = FakeMx::start();
    let relay = Relay::start(&route_all_to(sink.addr));
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    let r = c.transaction(
        "sender@src.test",
        &["reject@dst.test", "ok@dst.test"],
        b"Subject: half bad\r\n\r\nhi\r\n.\r\n",
    );
    assert_eq!(r.code, 250);
    // A null-sender message that fails must not produce a DSN.
    let r = c.transaction(
        "",
        &["reject@dst.test"],
        b"Subject: bounce of a bounce\r\n\r\nhi\r\n.\r\n",
    );
    assert_eq!(r.code, 250);
    let dsn = wait_for("DSN at the sender", WAIT, || {
        sink.received()
            .into_iter()
            .find(|m| m.rcpts == ["sender@src.test"])
    });
    assert_eq!(dsn.from, "", "DSNs use the null sender");
    for needle in [
        "Content-Type: multipart/report; report-type=delivery-status",
        "Content-Type: message/delivery-status",
        "Reporting-MTA: dns; relay.test",
        "Final-Recipient: rfc822; reject@dst.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1",
        "Subject: half bad",
    ] {
        assert!(
            dsn.data.contains(needle),
            "DSN lacks {needle:?}:\n{}",
            dsn.data
        );
    }
    assert!(
        !dsn.data.contains("Final-Recipient: rfc822; ok@dst.test"),
        "delivered recipient is not in the DSN"
    );
    wait_for("both failures logged", WAIT, || {
        (relay
            .log()
            .iter()
            .filter(|v| v["status"] == "bounced")
            .count()
            == 2)
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let dsns = sink
        .received()
        .into_iter()
        .filter(|m| m.from.is_empty())
        .count();
    assert_eq!(dsns, 1, "exactly one DSN: none for the null-sender message");
}

#[test]
fn null_mx_and_unknown_domain_bounce_with_the_right_status() {
    let sink = FakeMx::start();
    let dns = Dnsmasq::start(&[
        "--local=/test/".into(),
        // RFC 7505 null MX: preference 0, exchange "." (hex RDATA 0000 00).
        "--dns-rr=nullmx.test,15,000000".into(),
    ]);
    let relay = Relay::start(&RelayConfig {
        nameservers: vec![dns.addr.to_string()],
        routes: vec![("src.test".into(), sink.addr.to_string())],
        ..RelayConfig::default()
    });
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    assert_eq!(
        c.transaction(
            "s@src.test",
            &["u@nullmx.test"],
            b"Subject: to null mx\r\n\r\nx\r\n.\r\n"
        )
        .code,
        250
    );
    assert_eq!(
        c.transaction(
            "s@src.test",
            &["u@unknown.test"],
            b"Subject: to nowhere\r\n\r\nx\r\n.\r\n"
        )
        .code,
        250
    );
    let reports = wait_for("two DSNs", WAIT, || {
        let d: Vec<_> = sink
            .received()
            .into_iter()
            .filter(|m| m.from.is_empty())
            .collect();
        (d.len() == 2).then_some(d)
    });
    let null = reports
        .iter()
        .find(|d| d.data.contains("u@nullmx.test"))
        .expect("DSN for null MX");
    assert!(null.data.contains("Status: 5.1.10"), "{}", null.data);
    assert!(null.data.contains("556 5.1.10"), "{}", null.data);
    let unknown = reports
        .iter()
        .find(|d| d.data.contains("u@unknown.test"))
        .expect("DSN for unknown domain");
    assert!(unknown.data.contains("Status: 5.1.2"), "{}", unknown.data);
    // The delivery log is written by a thread of its own: a line may land after the DSN.
    wait_for("both bounces logged with their status", WAIT, || {
        let log = relay.log();
        let bounced = |queue: &str, enhanced: &str| {
            log.iter().any(|v| {
                v["queue"] == queue && v["status"] == "bounced" && v["enhanced"] == enhanced
            })
        };
        (bounced("nullmx.test", "5.1.10") && bounced("unknown.test", "5.1.2")).then_some(())
    });
}

#[test]
fn starttls_and_auth_on_submission_with_swaks() {
    let sink = SmtpSink::start();
    let relay = Relay::start(&RelayConfig {
        tls: true,
        submission: true,
        users: vec![("alice".into(), "s3cret".into())],
        relay_networks: vec![],
        ..route_all_to(sink.addr)
    });
    let sub = relay.submission.unwrap().to_string();
    let smtp = relay.smtp.to_string();
    // Port 25 style listener: STARTTLS, no AUTH; our network list is empty, so relaying is refused.
    let (ok, t) = swaks(&[
        "--server",
        &smtp,
        "-tls",
        "--from",
        "a@src.test",
        "--to",
        "x@dst.test",
    ]);
    assert!(
        !ok && t.contains("554 5.7.1 Relay access denied"),
        "not an open relay: {t}"
    );
    assert!(t.contains("TLS started"), "{t}");
    // Submission without TLS: AUTH is not even offered.
    let (ok, t) = swaks(&[
        "--server",
        &sub,
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "s3cret",
        "--from",
        "a@src.test",
        "--to",
        "x@dst.test",
    ]);
    assert!(!ok, "AUTH without TLS must fail: {t}");
    // Submission without AUTH: refused at MAIL.
    let (ok, t) = swaks(&[
        "--server",
        &sub,
        "-tls",
        "--from",
        "a@src.test",
        "--to",
        "x@dst.test",
    ]);
    assert!(!ok && t.contains("530 5.7.0"), "{t}");
    // Wrong password.
    let (ok, t) = swaks(&[
        "--server",
        &sub,
        "-tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "nope",
        "--from",
        "a@src.test",
        "--to",
        "x@dst.test",
    ]);
    assert!(!ok && t.contains("535 5.7.8"), "{t}");
    for mech in ["PLAIN", "LOGIN"] {
        let (ok, t) = swaks(&[
            "--server",
            &sub,
            "-tls",
            "--auth",
            mech,
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
            "--from",
            "a@src.test",
            "--to",
            &format!("{mech}@dst.test"),
            "--h-Subject",
            mech,
        ]);
        assert!(ok, "AUTH {mech} over STARTTLS: {t}");
        assert!(
            t.contains("235 2.7.0") && t.contains("250 2.0.0 Ok: queued as"),
            "{t}"
        );
    }
    // smtp-sink writes its dump files while receiving: wait for complete ones.
    let msgs = wait_for("two authenticated messages", WAIT, || {
        let m = sink.messages();
        (m.len() == 2
            && m.iter()
                .all(|x| x.contains("La de da") || x.contains("This is a test mailing")))
        .then_some(m)
    });
    assert!(
        msgs.iter().all(|m| m.contains("with ESMTPSA")),
        "Received says TLS + AUTH"
    );
}

/// `smtp-lb ctl relay ARGS` with the relay's admin address and token; `--json`.
fn ctl(relay: &Relay, args: &[&str]) -> (bool, String) {
    ctl_as(relay, &[&["--json"], args].concat())
}

fn ctl_as(relay: &Relay, args: &[&str]) -> (bool, String) {
    let out = Command::new(smtp_lb_tests::env::smtp_lb_bin())
        .args(["ctl", "relay", "--relay-admin", &relay.admin.to_string()])
        .arg("--relay-token-file")
        .arg(relay.admin_token_file())
        .args(args)
        .output()
        .expect("run smtp-lb ctl relay");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn ctl_relay_shows_retries_bounces_and_deletes_queued_messages_and_metrics_count_them() {
    let sink = FakeMx::start();
    // dead.test goes nowhere (a closed port) and retries only after an hour.
    let relay = Relay::start(&RelayConfig {
        routes: vec![
            ("dead.test".into(), "127.0.0.1:1".into()),
            ("*".into(), sink.addr.to_string()),
        ],
        retry_min: "1h".into(),
        retry_max: "1h".into(),
        ..RelayConfig::default()
    });
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = c.transaction(
            "s@src.test",
            &[&format!("u{i}@dead.test")],
            format!("Subject: queued {i}\r\n\r\nx\r\n.\r\n").as_bytes(),
        );
        assert_eq!(r.code, 250);
        ids.push(r.text.split("queued as ").nth(1).unwrap().trim().to_owned());
    }
    wait_for("three deferrals", WAIT, || {
        (relay
            .log()
            .iter()
            .filter(|v| v["status"] == "deferred")
            .count()
            == 3)
            .then_some(())
    });
    let (ok, out) = ctl(&relay, &["queue"]);
    assert!(ok, "{out}");
    let q: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(q["messages"], 3);
    assert_eq!(q["domains"]["dead.test"]["scheduled"], 3);
    // The table: one row per domain, no `null`.
    let (ok, out) = ctl_as(&relay, &["queue"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("3 messages"), "{out}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.trim_start().starts_with("dead.test"))
        .unwrap_or_else(|| panic!("no dead.test row: {out}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, ["dead.test", "0", "3", "0"], "{out}");
    assert!(!out.contains("null"), "{out}");
    let (ok, out) = ctl(&relay, &["show", &ids[0]]);
    assert!(ok, "{out}");
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["rcpts"][0], "u0@dead.test");
    assert_eq!(m["attempts"], 1);
    assert!(m["last_error"].as_str().unwrap().contains("4.4.1"), "{m}");
    // retry now: a second attempt happens at once (and defers again).
    let (ok, out) = ctl(&relay, &["retry", &ids[0]]);
    assert!(ok && out.contains("\"jobs\":1"), "{out}");
    wait_for("the second attempt", WAIT, || {
        relay
            .log()
            .iter()
            .any(|v| v["rcpt"] == "u0@dead.test" && v["attempt"] == 2)
            .then_some(())
    });
    // bounce: DSN to the sender, message gone.
    let (ok, out) = ctl(&relay, &["bounce", &ids[1]]);
    assert!(ok, "{out}");
    let dsn = wait_for("the operator's bounce", WAIT, || {
        sink.received().into_iter().find(|m| m.from.is_empty())
    });
    assert!(
        dsn.data.contains("Final-Recipient: rfc822; u1@dead.test")
            && dsn.data.contains("bounced by the operator")
    );
    // delete: gone without a DSN.
    let (ok, out) = ctl(&relay, &["delete", &ids[2]]);
    assert!(ok, "{out}");
    let (ok, _) = ctl(&relay, &["show", &ids[2]]);
    assert!(!ok, "deleted message is gone");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.received().iter().filter(|m| m.from.is_empty()).count(),
        1,
        "no DSN for a deleted message"
    );
    let (ok, metrics) = ctl(&relay, &["metrics"]);
    assert!(ok);
    assert!(
        metrics
            .contains("smtp_lb_relay_recipients_total{domain=\"dead.test\",status=\"deferred\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("smtp_lb_relay_recipients_total{domain=\"dead.test\",status=\"bounced\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("smtp_lb_relay_recipients_total{domain=\"src.test\",status=\"delivered\"} 1"),
        "{metrics}"
    );
    assert_eq!(relay.metric("smtp_lb_relay_queue_messages"), 1);
    assert_eq!(
        relay.metric("smtp_lb_relay_messages_accepted_total"),
        4,
        "three messages and one DSN"
    );
}

#[test]
fn sigterm_lets_the_transaction_in_flight_finish() {
    let sink = FakeMx::start();
    let mut relay = Relay::start(&route_all_to(sink.addr));
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    assert_eq!(c.cmd("MAIL FROM:<s@src.test>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<r@dst.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let pid = relay.pid();
    let term = std::thread::spawn(move || {
        // SAFETY: kill(2) on the relay child's pid.
        unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGTERM) };
    });
    term.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // An idle session opened now would be refused; ours is mid-DATA and may finish.
    c.send(b"second half\r\n.\r\n");
    let r = c.reply().expect("reply to the end of data after SIGTERM");
    assert_eq!(r.code, 250, "{r:?}");
    let r = c.cmd("NOOP");
    assert_eq!(
        r.code, 421,
        "after its transaction the session is closed: {r:?}"
    );
    assert!(relay.terminate(), "clean exit after SIGTERM");
    assert!(relay.stderr().contains("shutting down"));
    // The accepted message is in the spool: a restart delivers it.
    relay.restart();
    wait_for("delivery after restart", WAIT, || {
        sink.received()
            .into_iter()
            .find(|m| m.data.contains("second half"))
    });
}

#[test]
fn one_connection_carries_many_messages_to_the_same_destination() {
    let sink = FakeMx::start();
    let relay = Relay::start(&RelayConfig {
        connections_per_destination: 1,
        ..route_all_to(sink.addr)
    });
    let server = relay.smtp.to_string();
    let out = Command::new("smtp-source")
        .args([
            "-s",
            "4",
            "-m",
            "40",
            "-f",
            "s@src.test",
            "-t",
            "r@dst.test",
            &server,
        ])
        .output()
        .expect("run smtp-source");
    assert!(out.status.success());
    wait_for("40 messages", WAIT, || {
        (sink.received().len() == 40).then_some(())
    });
    let sessions = sink.sessions();
    assert!(
        sessions < 40,
        "connections are reused: {sessions} sessions for 40 messages"
    );
    eprintln!("connection reuse: 40 messages over {sessions} connections");
}

#[test]
fn delivery_binds_the_egress_source_and_an_unplumbed_source_defers() {
    let sink = FakeMx::start();
    let relay = Relay::start(&RelayConfig {
        source_ip: Some("127.0.0.2".into()),
        ..route_all_to(sink.addr)
    });
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    let r = c.transaction(
        "s@src.test",
        &["r@dst.test"],
        b"Subject: egress\r\n\r\nx\r\n.\r\n",
    );
    assert_eq!(r.code, 250);
    wait_for("delivery", WAIT, || sink.received().into_iter().next());
    assert_eq!(
        sink.peers(),
        vec!["127.0.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    let entry = relay.wait_log("delivered", WAIT, |v| v["status"] == "delivered");
    assert_eq!(entry["source_ip"], "127.0.0.2");

    // 192.0.2.1 (TEST-NET-1) is not an address of this host: bind fails, the message waits.
    let relay = Relay::start(&RelayConfig {
        source_ip: Some("192.0.2.1".into()),
        ..route_all_to(sink.addr)
    });
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    let r = c.transaction(
        "s@src.test",
        &["r@dst.test"],
        b"Subject: unplumbed\r\n\r\nx\r\n.\r\n",
    );
    assert_eq!(r.code, 250);
    let entry = relay.wait_log("deferral", WAIT, |v| v["status"] == "deferred");
    assert_eq!(entry["enhanced"], "4.4.1");
    assert!(
        entry["text"]
            .as_str()
            .unwrap()
            .contains("cannot bind to source 192.0.2.1"),
        "{entry}"
    );
    assert!(
        relay
            .stderr()
            .contains("egress source is not configured on this host")
    );
}
