//! `bench xdp`: mean ns per packet through `BPF_PROG_TEST_RUN`, for the
//! balancer on each kind of packet and for an empty program (the floor),
//! all in one run; every figure is also given as a ratio to the floor.
use std::net::Ipv4Addr;

use smtp_lb_common::programs;
use smtp_lb_tests::{
    packet::{PacketBuilder, tcp},
    xdp::XdpHarness,
};

use super::Report;
use crate::build::Artifacts;

/// Repeats per measurement: enough that the kernel's mean is stable.
const REPEAT: u32 = 1_000_000;

#[expect(
    clippy::unnecessary_wraps,
    reason = "every bench has the same signature"
)]
pub fn run(artifacts: &Artifacts) -> anyhow::Result<Report> {
    // SAFETY: setting a variable before any thread reads the environment.
    unsafe { std::env::set_var("SMTP_LB_EBPF_OBJ", &artifacts.ebpf_object) };
    let mut xdp = XdpHarness::load();
    let client = Ipv4Addr::new(198, 51, 100, 1);
    let nonvip =
        PacketBuilder::tcp(client, 40000, Ipv4Addr::new(198, 51, 100, 9), 80, tcp::ACK).build();

    // Interleave floor and subject runs so drift hits both alike.
    let mut floor = Vec::new();
    let mut pass = Vec::new();
    for _ in 0..3 {
        floor.push(
            xdp.run_repeat(programs::PASS, &nonvip, REPEAT)
                .mean
                .as_secs_f64()
                * 1e9,
        );
        pass.push(
            xdp.run_repeat(programs::BALANCER, &nonvip, REPEAT)
                .mean
                .as_secs_f64()
                * 1e9,
        );
    }
    let (floor_ns, nonvip_ns) = (median(&mut floor), median(&mut pass));
    let mut report = Report::default();
    report
        .add("floor_ns", floor_ns, "ns")
        .add("nonvip_ns", nonvip_ns, "ns");
    report.add("nonvip_ratio", nonvip_ns / floor_ns, "x floor");
    Ok(report)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
