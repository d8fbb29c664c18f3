//! `bench relay`: `smtp-source` → relay → `smtp-sink`, end to end, with the
//! relay's spool durable, against two peers measured in the same run:
//! Postfix as a relay to the same kind of sink on the same machine (as
//! Debian ships it: packaged `master.cf`, chroot, default durability, its
//! queue on the same disk), and the floor, `smtp-source` straight to
//! `smtp-sink` (one SMTP session per message where a relay has two). The
//! three paths run interleaved, round after round (raw, Postfix, relay,
//! raw, …), each against a fresh sink and a fresh instance, and each is
//! reported as the median of its rounds: on a shared machine one path's
//! figure moves by half between runs. Also the relay's resident memory
//! with 100k messages queued for an unreachable destination, and the spool
//! disk's flush time, which bounds the relay path where CPU does not, and
//! the relay's CPU time per message, which moves less with the machine's
//! load than any rate.
//!
//! `SMTP_LB_BENCH_RELAY_MESSAGES` (default 10000) and
//! `SMTP_LB_BENCH_RELAY_SESSIONS` (default 20) size each run,
//! `SMTP_LB_BENCH_RELAY_ROUNDS` (default 3) counts the rounds;
//! `SMTP_LB_BENCH_RELAY_QUEUED` (default 100000) sizes the memory run.
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
    tmp::TempDir,
};

use super::{Report, median};
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

/// The spool disk's group-commit cost: the median of 200 appends of one
/// 2 KB message record, each followed by `fdatasync`, in a file beside the
/// relay's spool (the same filesystem). Every `250` waits for one such
/// flush that began after its record was written, so with `sessions`
/// clients this, not CPU, bounds the relay path on a fast machine.
fn disk_flush_ms() -> anyhow::Result<f64> {
    use std::io::Write;
    let dir = TempDir::new("bench-flush");
    let mut file = std::fs::File::create(dir.join("flush")).context("create flush probe")?;
    let record = [b'x'; 2048];
    let mut ms = Vec::with_capacity(200);
    for _ in 0..200 {
        let start = Instant::now();
        file.write_all(&record)?;
        file.sync_data().context("fdatasync")?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(&ms))
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

/// CPU time (user + system) `pid` has used so far, in seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("read /proc/PID/stat")?;
    // After "pid (comm) ": state is field 3, utime 14, stime 15 (proc(5)).
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        let t: u64 = fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("utime/stime in /proc/PID/stat")?;
        Ok(t as f64)
    };
    // SAFETY: sysconf only reads a constant of the system.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / per_sec)
}

/// The ways a message goes from `smtp-source` to `smtp-sink`, in the order
/// each round runs them.
#[derive(Clone, Copy)]
enum Path {
    /// Straight to the sink: the floor.
    Raw,
    Postfix,
    Relay,
}

impl Path {
    const ALL: [Self; 3] = [Self::Raw, Self::Postfix, Self::Relay];

    /// The report's key for this path's median.
    fn key(self) -> &'static str {
        match self {
            Self::Raw => "raw_mps",
            Self::Postfix => "postfix_mps",
            Self::Relay => "smtplb_mps",
        }
    }

    /// One run against a fresh sink (and a fresh Postfix or relay): msg/s,
    /// and for the relay its CPU time per message in µs.
    fn measure(self, n: usize, sessions: usize) -> anyhow::Result<(f64, Option<f64>)> {
        let sink = CountingSink::start();
        match self {
            Self::Raw => Ok((measure(sink.addr, &sink, n, sessions)?, None)),
            Self::Postfix => {
                let postfix = Postfix::relay_to(sink.addr);
                Ok((measure(postfix.addr, &sink, n, sessions)?, None))
            }
            Self::Relay => {
                let relay = Relay::start(&RelayConfig {
                    routes: vec![("*".into(), sink.addr.to_string())],
                    // Postfix's default_destination_concurrency_limit.
                    connections_per_destination: 20,
                    // As it runs in production, not with the tests' debug lines.
                    log_filter: Some("info".into()),
                    ..RelayConfig::default()
                });
                let cpu_before = cpu_secs(relay.pid())?;
                let mps = measure(relay.smtp, &sink, n, sessions)?;
                let cpu_us = (cpu_secs(relay.pid())? - cpu_before) * 1e6 / env_f64(n);
                println!(
                    "  relay RSS after the run: {:.1} MiB; CPU per message {cpu_us:.0} µs",
                    rss_mib(relay.pid())?
                );
                Ok((mps, Some(cpu_us)))
            }
        }
    }
}

pub fn run(artifacts: &Artifacts) -> anyhow::Result<Report> {
    // SAFETY: set before any thread reads the environment.
    unsafe { std::env::set_var("SMTP_LB_BIN", &artifacts.binary) };
    let n = env_usize("SMTP_LB_BENCH_RELAY_MESSAGES", 10_000);
    let sessions = env_usize("SMTP_LB_BENCH_RELAY_SESSIONS", 20);
    let rounds = env_usize("SMTP_LB_BENCH_RELAY_ROUNDS", 3).max(1);
    let queued = env_usize("SMTP_LB_BENCH_RELAY_QUEUED", 100_000);

    let mut figures = [const { Vec::new() }; Path::ALL.len()];
    let mut relay_cpu_us = Vec::new();
    for round in 1..=rounds {
        for (path, figures) in Path::ALL.iter().zip(&mut figures) {
            println!("round {round}/{rounds}, {}:", path.key());
            let (mps, cpu_us) = path.measure(n, sessions)?;
            println!("  {mps:.1} msg/s");
            figures.push(mps);
            relay_cpu_us.extend(cpu_us);
        }
    }
    let [raw_mps, postfix_mps, smtplb_mps] = figures.each_ref().map(|f| median(f));
    let flush_ms = disk_flush_ms()?;
    println!("spool disk: append + fdatasync takes {flush_ms:.2} ms (median of 200)");

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
        .add("rounds", env_f64(rounds), "");
    for (path, figures) in Path::ALL.iter().zip(&figures) {
        for (round, mps) in figures.iter().enumerate() {
            report.add(&format!("{}_round{}", path.key(), round + 1), *mps, "msg/s");
        }
    }
    report
        .add("raw_mps", raw_mps, "msg/s")
        .add("postfix_mps", postfix_mps, "msg/s")
        .add("smtplb_mps", smtplb_mps, "msg/s")
        .add("ratio_vs_postfix", smtplb_mps / postfix_mps, "x")
        .add("ratio_vs_raw", smtplb_mps / raw_mps, "x")
        .add("disk_flush_ms", flush_ms, "ms")
        .add("relay_cpu_us_per_msg", median(&relay_cpu_us), "µs")
        .add("rss_mib_100k_queued", rss, "MiB");
    Ok(report)
}
