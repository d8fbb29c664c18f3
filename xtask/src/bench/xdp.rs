//! `bench xdp`: mean ns per packet through `BPF_PROG_TEST_RUN`, for the
//! balancer on each kind of packet and for an empty program (the floor),
//! all in one run; every figure is also given as a ratio to the floor.
//!
//! - `nonvip`: TCP to a port no service uses (the common case on an LB node).
//! - `syn`: a SYN to the VIP: service lookup, Maglev slot, conntrack write, L2 rewrite.
//! - `established`: an ACK of a tracked flow: service lookup, conntrack hit, L2 rewrite.
use std::net::Ipv4Addr;

use smtp_lb_common::programs;
use smtp_lb_tests::{
    packet::{PacketBuilder, tcp},
    xdp::{Verdict, XdpHarness},
};
use smtp_lb_user::{config::lb::LbConfig, dataplane::apply_config};

use super::Report;
use crate::build::Artifacts;

/// Repeats per measurement: enough that the kernel's mean is stable.
const REPEAT: u32 = 1_000_000;
/// Rounds; each subject is measured once per round, interleaved with the
/// floor, and the median round is reported.
const ROUNDS: usize = 5;

const CONFIG: &str = r#"
[[services]]
vip = "203.0.113.10"
ports = [25, 587, 465]
[[services.backends]]
name = "relay1"
address = "198.51.100.3"
mac = "02:00:00:00:00:03"
[[services.backends]]
name = "relay2"
address = "198.51.100.4"
mac = "02:00:00:00:00:04"
[[services.backends]]
name = "relay3"
address = "198.51.100.5"
mac = "02:00:00:00:00:05"
"#;

fn ns(xdp: &mut XdpHarness, prog: &str, pkt: &[u8]) -> f64 {
    xdp.run_repeat(prog, pkt, REPEAT).mean.as_secs_f64() * 1e9
}

pub fn run(artifacts: &Artifacts) -> anyhow::Result<Report> {
    // SAFETY: setting a variable before any thread reads the environment.
    unsafe { std::env::set_var("SMTP_LB_EBPF_OBJ", &artifacts.ebpf_object) };
    let mut xdp = XdpHarness::load();
    let cfg = LbConfig::parse(CONFIG)?;
    apply_config(xdp.ebpf_mut(), &cfg)?;
    let client = Ipv4Addr::new(198, 51, 100, 1);
    let vip = Ipv4Addr::new(203, 0, 113, 10);
    let nonvip =
        PacketBuilder::tcp(client, 40000, Ipv4Addr::new(198, 51, 100, 9), 80, tcp::ACK).build();
    let syn = PacketBuilder::tcp(client, 40001, vip, 25, tcp::SYN).build();
    let ack = PacketBuilder::tcp(client, 40002, vip, 25, tcp::ACK).build();
    // Track the established flow first, and check every subject does what it should.
    let track = PacketBuilder::tcp(client, 40002, vip, 25, tcp::SYN).build();
    anyhow::ensure!(xdp.run(programs::BALANCER, &track).verdict == Verdict::Tx);
    anyhow::ensure!(xdp.run(programs::BALANCER, &nonvip).verdict == Verdict::Pass);
    anyhow::ensure!(xdp.run(programs::BALANCER, &syn).verdict == Verdict::Tx);
    anyhow::ensure!(xdp.run(programs::BALANCER, &ack).verdict == Verdict::Tx);

    // Interleave floor and subject runs so drift hits both alike.
    let mut rounds: Vec<[f64; 4]> = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push([
            ns(&mut xdp, programs::PASS, &nonvip),
            ns(&mut xdp, programs::BALANCER, &nonvip),
            ns(&mut xdp, programs::BALANCER, &syn),
            ns(&mut xdp, programs::BALANCER, &ack),
        ]);
    }
    let col = |i: usize| median(&mut rounds.iter().map(|r| r[i]).collect::<Vec<_>>());
    let (floor_ns, nonvip_ns, syn_ns, established_ns) = (col(0), col(1), col(2), col(3));
    let mut report = Report::default();
    report
        .add("floor_ns", floor_ns, "ns")
        .add("nonvip_ns", nonvip_ns, "ns")
        .add("syn_ns", syn_ns, "ns")
        .add("established_ns", established_ns, "ns")
        .add(
            "nonvip_ratio",
            nonvip_ns / floor_ns,
            "x floor (target <= 1.2)",
        )
        .add("syn_ratio", syn_ns / floor_ns, "x floor (target <= 3.0)")
        .add(
            "established_ratio",
            established_ns / floor_ns,
            "x floor (target <= 2.0)",
        );
    Ok(report)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
