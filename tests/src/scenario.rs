//! The lab's story, shared by `cargo xtask lab` (which prints it) and the
//! privileged tests (which assert on it).
//!
//! Topology (one L2 segment, documentation addresses):
//! ```text
//! client 198.51.100.1 ──┐
//! lb     198.51.100.2 ──┼── br0 (switch namespace)
//! relay1 198.51.100.3 ──┘   VIP 203.0.113.10 on relay1's lo
//! ```
//! The client routes the VIP via the LB node; the LB's XDP program sees
//! every SYN and segment of the SMTP sessions; relays answer the client
//! directly.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{env::smtp_lb_bin, lab::Lab};

pub const VIP: &str = "203.0.113.10";
pub const CLIENT: &str = "198.51.100.1";
pub const LB: &str = "198.51.100.2";
pub const RELAY1: &str = "198.51.100.3";

/// What the run saw.
#[derive(Debug)]
pub struct Outcome {
    /// SMTP sessions the client completed (smtp-source exit status 0).
    pub sessions: u32,
    /// Messages the relay's sink received (dump files).
    pub delivered: usize,
    pub elapsed: Duration,
    /// The XDP program's global counters (`smtp-lb ctl stats --json`).
    pub counters: BTreeMap<String, u64>,
}

/// Builds the topology, attaches the balancer on the LB node, sends
/// `sessions` SMTP sessions from the client to the VIP, and reads the
/// counters. `say` receives one line per step.
pub fn smtp_through_lb(sessions: u32, say: &mut dyn FnMut(&str)) -> Outcome {
    let mut lab = Lab::new();
    say(&format!(
        "lab {}: creating client, lb, relay1 on one bridge",
        lab.id()
    ));
    lab.host("client", &[&format!("{CLIENT}/24")]);
    lab.host("lb", &[&format!("{LB}/24")]);
    lab.host("relay1", &[&format!("{RELAY1}/24")]);

    lab.run(
        "client",
        &["ip", "route", "add", &format!("{VIP}/32"), "via", LB],
    );
    // The LB node forwards VIP traffic to the relay (the data plane will do
    // this in XDP; the kernel does it until then) without ICMP redirects.
    lab.run(
        "lb",
        &[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ],
    );
    lab.run(
        "lb",
        &["ip", "route", "add", &format!("{VIP}/32"), "via", RELAY1],
    );
    // The relay owns the VIP on lo and never answers ARP for it.
    lab.run(
        "relay1",
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    );
    lab.run(
        "relay1",
        &[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ],
    );

    let dump = tempdir(&lab, "sink");
    let mut sink = lab.command("relay1", "smtp-sink");
    sink.args(["-u", "nobody", "-d"])
        .arg(dump.join("%M."))
        .args(["0.0.0.0:25", "256"]);
    lab.spawn("relay1", sink);
    say("relay1: Postfix smtp-sink listening on :25 (VIP on lo)");

    let pin_dir = lab.pin_dir();
    let mut lb = lab.command("lb", smtp_lb_bin());
    lb.args([
        "lb",
        "--iface",
        "eth0",
        "--mode",
        "native",
        "--stats-interval",
        "0",
        "--pin-dir",
    ])
    .arg(&pin_dir);
    let lb_pid = lab.spawn("lb", lb);
    wait_for(Duration::from_secs(10), || {
        pin_dir.join("GLOBAL_STATS").exists()
    });
    wait_for(Duration::from_secs(5), || {
        String::from_utf8_lossy(&lab.run("lb", &["ip", "link", "show", "eth0"]).stdout)
            .contains("xdp")
    });
    say(&format!(
        "lb: smtp-lb lb attached (native XDP) to eth0, maps pinned in {}",
        pin_dir.display()
    ));
    wait_for(Duration::from_secs(10), || {
        lab.try_run(
            "client",
            &["timeout", "1", "bash", "-c", &format!("</dev/tcp/{VIP}/25")],
        )
        .status
        .success()
    });

    say(&format!(
        "client: smtp-source sending {sessions} sessions (20 in parallel) to {VIP}:25"
    ));
    let started = Instant::now();
    let out = lab.try_run(
        "client",
        &[
            "smtp-source",
            "-s",
            "20",
            "-m",
            &sessions.to_string(),
            "-f",
            "sender@lab.example",
            "-t",
            "rcpt@isp.example",
            &format!("{VIP}:25"),
        ],
    );
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "smtp-source failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(10), || {
        count_files(&dump) >= sessions as usize
    });
    let delivered = count_files(&dump);
    say(&format!(
        "client: {sessions} sessions completed in {:.2}s ({:.0}/s); relay1's sink received {delivered} messages",
        elapsed.as_secs_f64(),
        f64::from(sessions) / elapsed.as_secs_f64()
    ));

    let stats = Command::new(smtp_lb_bin())
        .args(["ctl", "stats", "--json", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(
        stats.status.success(),
        "ctl stats: {}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let counters = parse_counters(&String::from_utf8_lossy(&stats.stdout));
    assert!(
        lab.stop(lb_pid, Duration::from_secs(5)),
        "smtp-lb lb exits cleanly on SIGTERM"
    );
    say("lb: smtp-lb lb stopped: program detached, pins removed");
    Outcome {
        sessions,
        delivered,
        elapsed,
        counters,
    }
}

/// The global counters of `ctl stats --json`.
fn parse_counters(json: &str) -> BTreeMap<String, u64> {
    let v: serde_json::Value = serde_json::from_str(json).expect("ctl stats --json prints JSON");
    v["global"]
        .as_object()
        .expect("a `global` object")
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().expect("counters are numbers")))
        .collect()
}

fn tempdir(lab: &Lab, name: &str) -> PathBuf {
    let dir = lab.scratch_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    // smtp-sink drops privileges to nobody before writing dumps.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    dir
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

fn wait_for(timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?}");
        thread::sleep(Duration::from_millis(50));
    }
}
