//! The spool over a relay's life: retry state that survives a restart, and
//! compaction that gives back the space of delivered mail while a deferred
//! message stays. Real processes: the relay binary, `smtp-source`,
//! `smtp-sink`, `swaks`, and the fake MX for the deferring destination.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    fake_mx::FakeMx,
    relay::{Relay, RelayConfig},
    sink::CountingSink,
    smtp::{smtp_source, swaks},
    tmp::wait_for,
};

const WAIT: Duration = Duration::from_mins(1);

/// Sends one message to `rcpt` with swaks; returns its queue id.
fn submit(relay: &Relay, rcpt: &str) -> String {
    let (ok, t) = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--from",
        "a@src.test",
        "--to",
        rcpt,
    ]);
    assert!(ok, "swaks: {t}");
    t.split("queued as ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue id in {t}"))
        .to_owned()
}

fn spool_bytes(relay: &Relay) -> u64 {
    segment_bytes(&relay.spool_dir())
}

/// Bytes in a spool directory's segment files.
fn segment_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("spool dir")
        .filter_map(|e| {
            let e = e.ok()?;
            (e.path().extension()? == "seg").then(|| e.metadata().map_or(0, |m| m.len()))
        })
        .sum()
}

fn attempts_of(relay: &Relay, id: &str) -> u64 {
    let (status, body) = relay.admin("GET", &format!("/queue/{id}"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["attempts"].as_u64().expect("attempts")
}

#[test]
fn a_deferred_message_keeps_its_attempt_count_and_next_time_across_a_restart() {
    let mx = FakeMx::builder()
        .reply("DATA", "451 4.7.1 try again later")
        .start();
    let mut relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), mx.addr.to_string())],
        retry_min: "8s".into(),
        retry_max: "8s".into(),
        extra_toml: "[retry]\njitter = 0.0\n".into(),
        ..RelayConfig::default()
    });
    let id = submit(&relay, "r@defer.test");
    let first = relay.wait_log("the first deferral", WAIT, |l| {
        l["status"] == "deferred" && l["attempt"] == 1
    });
    let deferred_at = Instant::now();
    // The delivery log line comes first, the state update right after.
    wait_for("attempts = 1", WAIT, || {
        (attempts_of(&relay, &id) == 1).then_some(())
    });
    assert_eq!(mx.attempts("r@defer.test"), 1);
    relay.restart();
    // Recovered with its count, and not tried again before it was due
    // (without the retry state it would be attempt 0, due at once).
    assert_eq!(attempts_of(&relay, &id), 1);
    std::thread::sleep(Duration::from_secs(4).saturating_sub(deferred_at.elapsed()));
    assert_eq!(
        mx.attempts("r@defer.test"),
        1,
        "retried before its time after the restart"
    );
    mx.set_reply("DATA", None);
    let second = relay.wait_log("the second attempt", WAIT, |l| {
        l["status"] == "delivered" && l["attempt"] == 2
    });
    let gap = second["ts"].as_f64().unwrap() - first["ts"].as_f64().unwrap();
    println!("second attempt {gap:.2}s after the first (retry.min 8s, restart in between)");
    assert!(gap >= 7.5, "{gap}");
    assert_eq!(mx.attempts("r@defer.test"), 2);
}

#[test]
fn compaction_leaves_under_one_mib_beside_a_deferred_message_after_ten_thousand_delivered() {
    let sink = CountingSink::start();
    let mx = FakeMx::builder()
        .reply("DATA", "451 4.7.1 try again later")
        .start();
    let mut relay = Relay::start(&RelayConfig {
        routes: vec![
            ("defer.test".into(), mx.addr.to_string()),
            ("*".into(), sink.addr.to_string()),
        ],
        retry_min: "1h".into(),
        retry_max: "1h".into(),
        extra_toml: "[spool]\ncompact_interval = \"1s\"\n".into(),
        ..RelayConfig::default()
    });
    let id = submit(&relay, "r@defer.test");
    relay.wait_log("the deferral", WAIT, |l| l["status"] == "deferred");
    let started = Instant::now();
    // The spool's size, sampled while the mail flows.
    let spool = relay.spool_dir();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(segment_bytes(&spool));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    smtp_source(relay.smtp, "r@dst.test", 10_000, 20);
    relay.wait_log_count("delivered", 10_000, Duration::from_mins(5));
    println!(
        "10,000 messages accepted and delivered in {:?}",
        started.elapsed()
    );
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let t = Instant::now();
    let left = wait_for("the spool compacted", WAIT, || {
        let b = spool_bytes(&relay);
        (b < 1024 * 1024).then_some(b)
    });
    println!(
        "spool: peak {peak} bytes while 10,000 messages flowed, {left} bytes {:?} after the last delivery",
        t.elapsed()
    );
    assert!(
        peak > 1024 * 1024,
        "the spool must have held over 1 MiB to show compaction: {peak}"
    );
    relay.wait_stderr("spool segment compacted", WAIT);
    // The deferred message is still there, also after a restart.
    relay.restart();
    assert_eq!(attempts_of(&relay, &id), 1);
    let (_, body) = relay.admin("GET", "/queue");
    assert!(
        body.contains("\"messages\":1"),
        "only the deferred one: {body}"
    );
    assert!(spool_bytes(&relay) < 1024 * 1024);
}
