//! Crash safety: `kill -9` while `smtp-source` is sending, restart, and
//! count at the sink that every message that got a `250` was delivered at
//! least once; and a corrupt spool found at start-up is moved aside and
//! reported, never delivered in part.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use smtp_lb_tests::{
    fake_mx::FakeMx,
    relay::{Relay, RelayConfig},
    sink::SmtpSink,
    smtp::RawSmtp,
    tmp::{ChildGuard, free_port, wait_for},
};

/// Queue ids in `250 … queued as ID` lines of `smtp-source -v`.
fn queued_ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.split("queued as ").nth(1).map(|id| id.trim().to_owned()))
        .collect()
}

#[test]
fn kill_9_during_smtp_source_loses_no_accepted_message() {
    let sink = SmtpSink::start();
    let mut relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), sink.addr.to_string())],
        ..RelayConfig::default()
    });
    let total = 3000;
    let mut source = Command::new("smtp-source")
        .args([
            "-v",
            "-s",
            "8",
            "-m",
            &total.to_string(),
            "-f",
            "s@src.test",
            "-t",
            "r@dst.test",
        ])
        .arg(relay.smtp.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn smtp-source");
    let stderr = source.stderr.take().unwrap();
    let mut source = ChildGuard(Some(source));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if l.contains("queued as") || l.contains("fatal") {
                    lines.lock().unwrap().push(l);
                }
            }
        })
    };
    // Kill the relay mid-stream, with deliveries and acceptances in flight.
    wait_for("some accepted messages", Duration::from_secs(30), || {
        (queued_ids(&lines.lock().unwrap()).len() >= total / 3).then_some(())
    });
    relay.kill9();
    let accepted_at_kill = queued_ids(&lines.lock().unwrap()).len();
    // smtp-source gives up once the relay is gone.
    std::thread::sleep(Duration::from_millis(300));
    source.kill();
    reader.join().unwrap();
    let accepted = queued_ids(&lines.lock().unwrap());
    assert!(
        accepted.len() < total,
        "the kill must interrupt the run ({} of {total} accepted)",
        accepted.len()
    );
    let delivered_before_restart = sink.count();

    relay.restart();
    // Every accepted id must show up at the sink (our Received header carries it).
    let count_seen = || {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in sink.messages() {
            // Our Received header: "by relay.test (smtp-lb) with ESMTP id <id>".
            let ours = m.split("(smtp-lb) with ").nth(1).unwrap_or("");
            if let Some(id) = ours
                .split(" id ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
            {
                *seen.entry(id.trim_end_matches(';').to_owned()).or_default() += 1;
            }
        }
        seen
    };
    let started = std::time::Instant::now();
    let seen = loop {
        let seen = count_seen();
        let missing: Vec<_> = accepted
            .iter()
            .filter(|id| !seen.contains_key(*id))
            .collect();
        if missing.is_empty() {
            break seen;
        }
        assert!(
            started.elapsed() < Duration::from_mins(1),
            "{} of {} accepted messages never reached the sink, e.g. {:?}; relay log tail:\n{}",
            missing.len(),
            accepted.len(),
            &missing[..missing.len().min(5)],
            relay
                .stderr()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let unacknowledged = seen.keys().filter(|id| !accepted.contains(id)).count();
    eprintln!(
        "crash test: {} accepted (250) of {total} sent ({accepted_at_kill} when killed), {delivered_before_restart} delivered before restart, \
         {} distinct delivered, {duplicates} duplicates, {unacknowledged} delivered without a 250 reaching the client, lost 0",
        accepted.len(),
        seen.len()
    );
    assert!(
        relay.stderr().contains("recovered messages queued again")
            || delivered_before_restart >= accepted.len()
    );
}

#[test]
fn corrupt_spool_at_startup_is_moved_aside_reported_and_not_delivered() {
    // Deliveries go to a port where nothing listens yet, so messages stay spooled.
    let port = free_port();
    let mut relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), format!("127.0.0.1:{port}"))],
        retry_min: "1h".into(),
        retry_max: "1h".into(),
        ..RelayConfig::default()
    });
    let mut c = RawSmtp::connect(relay.smtp);
    c.cmd("EHLO client.test");
    for tag in ["KEEP-ONE", "CORRUPT-ME", "KEEP-TWO"] {
        let r = c.transaction(
            "s@src.test",
            &["r@dst.test"],
            format!("Subject: {tag}\r\n\r\n{tag} body\r\n.\r\n").as_bytes(),
        );
        assert_eq!(r.code, 250);
    }
    relay.kill9();
    // Damage the middle message on disk, and leave a torn record at the end.
    let seg = std::fs::read_dir(relay.spool_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read(p).is_ok_and(|d| d.windows(10).any(|w| w == b"CORRUPT-ME")))
        .expect("segment holding the messages");
    let mut data = std::fs::read(&seg).unwrap();
    let at = data
        .windows(15)
        .position(|w| w == b"CORRUPT-ME body")
        .unwrap();
    data[at] = b'X';
    let torn = data[..40].to_vec();
    data.extend_from_slice(&torn);
    std::fs::write(&seg, &data).unwrap();

    let sink = FakeMx::builder().port(port).start();
    relay.restart();
    // Each message was tried once before the kill (nothing listened) and
    // keeps its 1 h retry time across the restart: ask for the retry now.
    let (status, body) = relay.admin("POST", "/queue/retry");
    assert_eq!(status, 200, "{body}");
    let got = wait_for("the two intact messages", Duration::from_secs(20), || {
        let r = sink.received();
        (r.len() >= 2).then_some(r)
    });
    std::thread::sleep(Duration::from_millis(500));
    let got: Vec<_> = got.iter().map(|m| m.data.clone()).collect();
    assert_eq!(
        sink.received().len(),
        2,
        "exactly the intact messages: {got:?}"
    );
    assert!(
        got.iter().any(|d| d.contains("KEEP-ONE")) && got.iter().any(|d| d.contains("KEEP-TWO"))
    );
    assert!(
        !got.iter()
            .any(|d| d.contains("CORRUPT") || d.contains("XORRUPT")),
        "nothing from the damaged record"
    );
    let moved: Vec<_> = std::fs::read_dir(relay.spool_dir().join("corrupt"))
        .expect("corrupt/ exists")
        .flatten()
        .collect();
    assert_eq!(moved.len(), 1, "the damaged segment is kept for inspection");
    assert!(
        relay.stderr().contains("corrupt spool data"),
        "reported in the log"
    );
    assert_eq!(relay.metric("smtp_lb_relay_spool_corrupt_segments"), 1);
}
