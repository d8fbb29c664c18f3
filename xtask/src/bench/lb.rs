//! `bench lb`: SMTP sessions through the lab three ways in one run — the
//! client straight to one relay (the floor), through `HAProxy` 2.6 in TCP mode
//! (`balance leastconn`) on the LB node, and through smtp-lb's XDP data plane
//! — reporting sessions/s and the CPU each balancer adds over the direct
//! path (whole machine, from /proc/stat), with ratios.
use std::{process::Stdio, time::Duration};

use anyhow::{Context, bail};
use smtp_lb_tests::topology::{DsrLab, LB, VIP, wait_for};

use super::Report;
use crate::build::Artifacts;

/// Sessions per measured run, and interleaved rounds per path (the median
/// of each counts, so one noisy round on a shared machine does not).
const SESSIONS: usize = 4000;
const ROUNDS: usize = 5;
const PARALLEL: usize = 20;

/// Busy CPU time of the whole machine, in seconds (`/proc/stat`, `USER_HZ` = 100).
fn busy_cpu_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(busy as f64 / 100.0)
}

/// One run: (sessions/s, busy CPU seconds per 1000 sessions).
fn measure(dsr: &DsrLab, target: &str) -> anyhow::Result<(f64, f64)> {
    let cpu0 = busy_cpu_s()?;
    let started = std::time::Instant::now();
    let mut cmd = dsr.lab.command("client", "smtp-source");
    cmd.args([
        "-s",
        &PARALLEL.to_string(),
        "-m",
        &SESSIONS.to_string(),
        "-f",
        "app@lab.example",
        "-t",
        "user@isp.example",
        target,
    ]);
    let out = cmd.output().context("run smtp-source")?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = busy_cpu_s()? - cpu0;
    if !out.status.success() {
        bail!(
            "smtp-source to {target} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((SESSIONS as f64 / secs, cpu / SESSIONS as f64 * 1000.0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(artifacts: &Artifacts) -> anyhow::Result<Report> {
    for (k, v) in crate::build::env(artifacts) {
        // SAFETY: set before the harness spawns anything.
        unsafe { std::env::set_var(k, v) };
    }
    let mut dsr = DsrLab::new(3);
    let cfg = dsr.config(&[1, 1, 1], "");
    dsr.start_lb(&cfg, &[]);

    // HAProxy on the LB node's own address, in TCP mode, to the same relays.
    let mut haproxy_cfg = format!(
        "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend smtp\n  bind {LB}:25\n  default_backend relays\nbackend relays\n  balance leastconn\n"
    );
    for r in &dsr.relays {
        haproxy_cfg += &format!("  server {} {}:25\n", r.name, r.addr);
    }
    let path = dsr.work.join("haproxy.cfg");
    std::fs::write(&path, haproxy_cfg)?;
    let mut cmd = dsr.lab.command("lb", "haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    dsr.lab.spawn("lb", cmd);
    wait_for("HAProxy listening", Duration::from_secs(10), || {
        dsr.lab
            .try_run(
                "client",
                &["timeout", "1", "bash", "-c", &format!("</dev/tcp/{LB}/25")],
            )
            .status
            .success()
    });

    let targets = [
        ("direct", format!("{}:25", dsr.relays[0].addr)),
        ("haproxy", format!("{LB}:25")),
        ("smtplb", format!("{VIP}:25")),
    ];
    // Warm every path once, then interleave the rounds so drift hits all alike.
    for (_, t) in &targets {
        measure(&dsr, t)?;
    }
    let mut sps = [const { Vec::new() }; 3];
    let mut cpu = [const { Vec::new() }; 3];
    for _ in 0..ROUNDS {
        for (i, (_, t)) in targets.iter().enumerate() {
            let (s, c) = measure(&dsr, t)?;
            sps[i].push(s);
            cpu[i].push(c);
        }
    }
    let [direct, haproxy, smtplb] = sps.map(median);
    let [cpu_direct, cpu_haproxy, cpu_smtplb] = cpu.map(median);
    let (added_haproxy, added_smtplb) = (cpu_haproxy - cpu_direct, cpu_smtplb - cpu_direct);
    let mut r = Report::default();
    r.add("direct_sps", direct, "sessions/s")
        .add("haproxy_sps", haproxy, "sessions/s")
        .add("smtplb_sps", smtplb, "sessions/s")
        .add("direct_cpu_s_per_1k", cpu_direct, "CPU s / 1000 sessions")
        .add(
            "haproxy_added_cpu_s_per_1k",
            added_haproxy,
            "CPU s / 1000 sessions",
        )
        .add(
            "smtplb_added_cpu_s_per_1k",
            added_smtplb,
            "CPU s / 1000 sessions",
        )
        .add("sps_ratio_vs_haproxy", smtplb / haproxy, "x")
        .add(
            "added_cpu_ratio_vs_haproxy",
            added_smtplb / added_haproxy,
            "x",
        )
        .add("sps_ratio_vs_direct", smtplb / direct, "x");
    Ok(r)
}
