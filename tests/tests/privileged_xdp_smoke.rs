//! The real eBPF object runs under `BPF_PROG_TEST_RUN` and leaves traffic
//! that is not for a VIP untouched.
use std::net::Ipv4Addr;

use smtp_lb_common::programs;
use smtp_lb_tests::{
    packet::{PacketBuilder, arp_request, tcp},
    xdp::{Verdict, XdpHarness},
};

#[test]
fn arp_passes_unchanged() {
    let mut xdp = XdpHarness::load();
    let arp = arp_request(
        Ipv4Addr::new(198, 51, 100, 1),
        Ipv4Addr::new(198, 51, 100, 2),
    );
    let out = xdp.run(programs::BALANCER, &arp);
    assert_eq!(out.verdict, Verdict::Pass);
    assert_eq!(out.output, arp, "ARP must leave the program byte for byte");
}

#[test]
fn the_floor_program_passes_everything() {
    let mut xdp = XdpHarness::load();
    let syn = PacketBuilder::tcp(
        Ipv4Addr::new(198, 51, 100, 1),
        40000,
        Ipv4Addr::new(203, 0, 113, 10),
        25,
        tcp::SYN,
    )
    .build();
    let out = xdp.run(programs::PASS, &syn);
    assert_eq!(out.verdict, Verdict::Pass);
    assert_eq!(out.output, syn);
}
