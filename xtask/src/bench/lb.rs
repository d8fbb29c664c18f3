//! `bench lb`: SMTP sessions through the lab four ways in one run — the
//! client straight to one relay (the floor), through `HAProxy` 2.6 in TCP
//! mode (`balance leastconn`) on a node of its own, through smtp-lb's XDP
//! data plane on the LB node, and through the least an XDP L2 DSR balancer
//! can do (`probe_l2_dsr`: stateless, three relays by source port) on a
//! third node with a second VIP — reporting sessions/s and the CPU each
//! balancer adds over the direct path (whole machine, from /proc/stat),
//! with ratios. The last is the floor of the path itself (veth, bridge,
//! native `XDP_TX` back through the bridge): what smtp-lb's own work costs
//! is the gap between it and smtp-lb.
use std::{fmt::Write as _, path::Path, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use smtp_lb_tests::topology::{DsrLab, VIP, pass_on_switch_port};

use super::{Report, median};
use crate::build::Artifacts;

/// Sessions per measured run, and interleaved rounds per path (the median
/// of each counts, so one noisy round on a shared machine does not; ratios
/// are medians of the ratios within each round).
const SESSIONS: usize = 6000;
const ROUNDS: usize = 7;
const PARALLEL: usize = 20;

/// `HAProxy`'s node, and the L2 DSR floor's node and VIP (on every relay's
/// `lo` beside smtp-lb's).
const HAPROXY: &str = "198.51.100.4";
const FLOOR: &str = "198.51.100.5";
const FLOOR_VIP: &str = "203.0.113.11";

/// Busy CPU time of the whole machine, in seconds (`/proc/stat`, `USER_HZ` =
/// 100): user, nice, system, irq and softirq; not idle, iowait, or steal
/// (time the hypervisor gave to other guests).
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
    // user nice system idle iowait irq softirq
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
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

pub fn run(artifacts: &Artifacts, probes_object: &Path) -> anyhow::Result<Report> {
    for (k, v) in crate::build::env(artifacts) {
        // SAFETY: set before the harness spawns anything.
        unsafe { std::env::set_var(k, v) };
    }
    // Sinks that keep nothing: writing each message to a file of one
    // directory costs more per session than any balancer here, and direct
    // sends all to one relay.
    let mut dsr = DsrLab::bare(3);
    for i in 0..dsr.relays.len() {
        let name = dsr.relays[i].name.clone();
        let mut cmd = dsr.lab.command(&name, "smtp-sink");
        cmd.args(["-u", "nobody", "-h", &name, "0.0.0.0:25", "1024"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        dsr.relays[i].sink = Some(dsr.lab.spawn(&name, cmd));
        dsr.wait_listening(i, "sink", Duration::from_secs(10));
    }
    let cfg = dsr.config(&[1, 1, 1], "");
    dsr.start_lb(&cfg, &[]);
    start_haproxy(&mut dsr)?;
    start_floor(&mut dsr, probes_object)?;

    let targets = [
        ("direct", format!("{}:25", dsr.relays[0].addr)),
        ("haproxy", format!("{HAPROXY}:25")),
        ("smtplb", format!("{VIP}:25")),
        ("l2dsr", format!("{FLOOR_VIP}:25")),
    ];
    // Warm every path once, then interleave the rounds so drift hits all alike.
    for (_, t) in &targets {
        measure(&dsr, t)?;
    }
    let mut sps = [const { Vec::new() }; 4];
    let mut cpu = [const { Vec::new() }; 4];
    for round in 0..ROUNDS {
        // Each round starts with another path, so none always runs first.
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let (s, c) = measure(&dsr, &targets[i].1)?;
            sps[i].push(s);
            cpu[i].push(c);
        }
        let mut line = format!("bench lb: round {}:", round + 1);
        for (i, (name, _)) in targets.iter().enumerate() {
            let (s, c) = (sps[i][round], cpu[i][round]);
            write!(line, " {name} {s:.0}/s {c:.3} CPU s/1k;")?;
        }
        eprintln!("{line}");
    }
    let [direct, haproxy, smtplb, l2dsr] = sps.each_ref().map(|v| median(v));
    let [cpu_direct, cpu_haproxy, cpu_smtplb, cpu_l2dsr] = cpu.each_ref().map(|v| median(v));
    let (added_haproxy, added_smtplb) = (cpu_haproxy - cpu_direct, cpu_smtplb - cpu_direct);
    let added_l2dsr = cpu_l2dsr - cpu_direct;
    // Ratios within each round (its paths ran seconds apart), then their
    // median: this VM's speed drifts over minutes, and a ratio of two
    // medians can pair rounds of different speeds.
    let [direct_i, haproxy_i, smtplb_i, l2dsr_i] = [0, 1, 2, 3];
    let sps_ratio = |a: usize, b: usize| {
        median(
            &(0..ROUNDS)
                .map(|r| sps[a][r] / sps[b][r])
                .collect::<Vec<_>>(),
        )
    };
    let cpu_ratio = |a: usize| {
        median(
            &(0..ROUNDS)
                .map(|r| (cpu[a][r] - cpu[direct_i][r]) / (cpu[haproxy_i][r] - cpu[direct_i][r]))
                .collect::<Vec<_>>(),
        )
    };
    let mut r = Report::default();
    r.add("direct_sps", direct, "sessions/s")
        .add("haproxy_sps", haproxy, "sessions/s")
        .add("smtplb_sps", smtplb, "sessions/s")
        .add("l2dsr_sps", l2dsr, "sessions/s (the path's floor)")
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
        .add(
            "l2dsr_added_cpu_s_per_1k",
            added_l2dsr,
            "CPU s / 1000 sessions",
        )
        .add("sps_ratio_vs_haproxy", sps_ratio(smtplb_i, haproxy_i), "x")
        .add("added_cpu_ratio_vs_haproxy", cpu_ratio(smtplb_i), "x")
        .add("sps_ratio_vs_direct", sps_ratio(smtplb_i, direct_i), "x")
        .add(
            "sps_ratio_vs_l2dsr",
            sps_ratio(smtplb_i, l2dsr_i),
            "x (1.0: no cost of its own)",
        )
        .add(
            "l2dsr_sps_ratio_vs_haproxy",
            sps_ratio(l2dsr_i, haproxy_i),
            "x",
        )
        .add(
            "l2dsr_sps_ratio_vs_direct",
            sps_ratio(l2dsr_i, direct_i),
            "x",
        )
        .add("l2dsr_added_cpu_ratio_vs_haproxy", cpu_ratio(l2dsr_i), "x");
    Ok(r)
}

/// `HAProxy` as its users run it: its own node (no XDP program on its
/// interface), TCP mode, the same relays.
fn start_haproxy(dsr: &mut DsrLab) -> anyhow::Result<()> {
    dsr.lab.host("haproxy", &[&format!("{HAPROXY}/24")]);
    let mut haproxy_cfg = format!(
        "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend smtp\n  bind {HAPROXY}:25\n  default_backend relays\nbackend relays\n  balance leastconn\n"
    );
    for r in &dsr.relays {
        haproxy_cfg += &format!("  server {} {}:25\n", r.name, r.addr);
    }
    let path = dsr.work.join("haproxy.cfg");
    std::fs::write(&path, haproxy_cfg)?;
    let mut cmd = dsr.lab.command("haproxy", "haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    dsr.lab.spawn("haproxy", cmd);
    dsr.wait_tcp("client", HAPROXY, 25, "HAProxy", Duration::from_secs(10));
    Ok(())
}

/// The floor: `probe_l2_dsr` in native mode on a node of its own, for
/// [`FLOOR_VIP`], which every relay also holds.
fn start_floor(dsr: &mut DsrLab, probes_object: &Path) -> anyhow::Result<()> {
    dsr.lab.host("l2dsr", &[&format!("{FLOOR}/24")]);
    pass_on_switch_port(&dsr.lab, "l2dsr");
    for r in &dsr.relays {
        dsr.lab
            .sh(&r.name, &format!("ip addr add {FLOOR_VIP}/32 dev lo"));
    }
    dsr.lab.sh(
        "client",
        &format!("ip route add {FLOOR_VIP}/32 via {FLOOR}"),
    );
    let prog_dir = dsr.lab.pin_dir().join("l2dsr");
    let map_dir = dsr.lab.pin_dir().join("l2dsr-maps");
    let bpftool = |args: &[&str]| -> anyhow::Result<()> {
        let out = dsr.lab.command("l2dsr", "bpftool").args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let (prog_dir, map_dir) = (prog_dir.to_str().unwrap(), map_dir.to_str().unwrap());
    let object = probes_object.to_str().context("probes object path")?;
    bpftool(&[
        "prog", "loadall", object, prog_dir, "type", "xdp", "pinmaps", map_dir,
    ])?;
    let mac_map = format!("{map_dir}/PROBE_DSR_MACS");
    let relay_macs = dsr
        .relays
        .iter()
        .map(|r| dsr.lab.get(&r.name).mac)
        .chain([dsr.lab.get("l2dsr").mac]);
    for (i, mac) in relay_macs.enumerate() {
        let mut args = vec!["map", "update", "pinned", &mac_map, "key"];
        let key = (i as u32).to_le_bytes().map(|b| b.to_string());
        let value = mac
            .iter()
            .chain(&[0, 0])
            .map(u8::to_string)
            .collect::<Vec<_>>();
        args.extend(key.iter().map(String::as_str));
        args.push("value");
        args.extend(value.iter().map(String::as_str));
        bpftool(&args)?;
    }
    let prog = format!("{prog_dir}/probe_l2_dsr");
    bpftool(&["net", "attach", "xdpdrv", "pinned", &prog, "dev", "eth0"])
}
