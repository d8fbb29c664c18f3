//! `bench relay`: `smtp-source` → relay → `smtp-sink`, end to end, with the
//! relay's spool durable, against Postfix configured as a relay to the same
//! kind of sink on the same machine (its queue on the same disk, default
//! durability), in one run. Also the relay's resident memory with 100k
//! messages queued for an unreachable destination.
//!
//! `SMTP_LB_BENCH_RELAY_MESSAGES` (default 10000) and
//! `SMTP_LB_BENCH_RELAY_SESSIONS` (default 20) size the runs;
//! `SMTP_LB_BENCH_RELAY_QUEUED` (default 100000) the memory run.
use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context;
use smtp_lb_tests::{
    postfix::Postfix,
    relay::{Relay, RelayConfig},
    sink::CountingSink,
};

use super::Report;
use crate::build::Artifacts;

#[expect(
    clippy::cast_precision_loss,
    reason = "message counts are far below 2^52"
)]
fn env_f64(n: usize) -> f64 {
    n as f64
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends `n` messages with `smtp-source` (one message per session, `sessions`
/// in parallel) and returns messages/s from the first connection until the
/// sink has received them all.
fn measure(
    server: SocketAddr,
    sink: &CountingSink,
    n: usize,
    sessions: usize,
) -> anyhow::Result<f64> {
    let base = sink.count();
    let start = Instant::now();
    let status = Command::new("smtp-source")
        .args([
            "-s",
            &sessions.to_string(),
            "-m",
            &n.to_string(),
            "-l",
            "2000",
        ])
        .args(["-f", "bench@src.test", "-t", "rcpt@dst.test"])
        .arg(server.to_string())
        .status()
        .context("run smtp-source (package postfix)")?;
    anyhow::ensure!(status.success(), "smtp-source failed against {server}");
    let submitted = start.elapsed();
    let deadline = Instant::now() + Duration::from_mins(10);
    while sink.count() < base + n as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} messages reached the sink",
            sink.count() - base
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = start.elapsed();
    println!("  {n} messages via {server}: submitted in {submitted:.2?}, delivered in {total:.2?}");
    Ok(env_f64(n) / total.as_secs_f64())
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("read /proc/PID/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

pub fn run(artifacts: &Artifacts) -> anyhow::Result<Report> {
    // SAFETY: set before any thread reads the environment.
    unsafe { std::env::set_var("SMTP_LB_BIN", &artifacts.binary) };
    let n = env_usize("SMTP_LB_BENCH_RELAY_MESSAGES", 10_000);
    let sessions = env_usize("SMTP_LB_BENCH_RELAY_SESSIONS", 20);
    let queued = env_usize("SMTP_LB_BENCH_RELAY_QUEUED", 100_000);

    println!("Postfix as a relay:");
    let postfix_mps = {
        let sink = CountingSink::start();
        let postfix = Postfix::relay_to(sink.addr);
        measure(postfix.addr, &sink, n, sessions)?
    };
    println!("smtp-lb relay:");
    let smtplb_mps = {
        let sink = CountingSink::start();
        let relay = Relay::start(&RelayConfig {
            routes: vec![("*".into(), sink.addr.to_string())],
            // Postfix's default_destination_concurrency_limit.
            connections_per_destination: 20,
            ..RelayConfig::default()
        });
        let mps = measure(relay.smtp, &sink, n, sessions)?;
        println!(
            "  relay RSS after the run: {:.1} MiB",
            rss_mib(relay.pid())?
        );
        mps
    };

    println!("smtp-lb relay with {queued} messages queued for an unreachable destination:");
    let rss = {
        let relay = Relay::start(&RelayConfig {
            // Port 1 on loopback: connection refused, every attempt defers.
            routes: vec![("*".into(), "127.0.0.1:1".into())],
            retry_min: "1h".into(),
            retry_max: "1h".into(),
            ..RelayConfig::default()
        });
        let start = Instant::now();
        let status = Command::new("smtp-source")
            .args([
                "-d",
                "-s",
                &sessions.to_string(),
                "-m",
                &queued.to_string(),
                "-l",
                "2000",
            ])
            .args(["-f", "bench@src.test", "-t", "rcpt@unreachable.test"])
            .arg(relay.smtp.to_string())
            .status()
            .context("run smtp-source")?;
        anyhow::ensure!(status.success(), "smtp-source failed");
        let accepted = relay.metric("smtp_lb_relay_messages_accepted_total");
        let (_, q) = relay.admin("GET", "/queue");
        println!(
            "  accepted {accepted} in {:.2?}; queue: {q}",
            start.elapsed()
        );
        anyhow::ensure!(
            accepted >= queued as u64,
            "only {accepted} of {queued} accepted"
        );
        std::thread::sleep(Duration::from_secs(1));
        rss_mib(relay.pid())?
    };

    let mut report = Report::default();
    report
        .add("messages", env_f64(n), "msg")
        .add("sessions", env_f64(sessions), "")
        .add("postfix_mps", postfix_mps, "msg/s")
        .add("smtplb_mps", smtplb_mps, "msg/s")
        .add("ratio_vs_postfix", smtplb_mps / postfix_mps, "x")
        .add("rss_mib_100k_queued", rss, "MiB");
    Ok(report)
}
