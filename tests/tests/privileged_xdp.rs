//! Packet fixtures through the real balancer (`BPF_PROG_TEST_RUN`): each
//! asserts the verdict, the output bytes and the counter the packet ended in.
//! The expected backend comes from the user-space plan (the same Maglev
//! table the maps hold) and the shared `flow_hash`, so these fixtures also
//! prove the kernel and user space agree on where a flow goes.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::Array;
use smtp_lb_common::{
    FLOW_IDLE_SECS, Flow, FlowKey, FlowSet, GlobalStats, NO_BACKEND, PROTO_TCP, SERVICE_STICKY,
    maps, programs::BALANCER,
};
use smtp_lb_tests::{
    packet::{CLIENT_MAC, LB_MAC, PacketBuilder, arp_request, path_mtu_error, tcp},
    xdp::{Outcome, Verdict, XdpHarness, changed},
};
use smtp_lb_user::{
    balance::plan::{Plan, addr_words, service_key},
    config::lb::LbConfig,
    dataplane::{MapWriter, apply_config, counters, flows},
};

const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Three relays on the segment (a fourth with `relay4`); `weights` let
/// fixtures change the table.
fn config(weights: [u32; 3], relay4: bool) -> LbConfig {
    let mut text = String::new();
    for (vip, addrs, addr4) in [
        (
            "203.0.113.10",
            ["198.51.100.3", "198.51.100.4", "198.51.100.5"],
            "198.51.100.6",
        ),
        (
            "2001:db8::10",
            ["2001:db8::3", "2001:db8::4", "2001:db8::5"],
            "2001:db8::6",
        ),
    ] {
        text +=
            &format!("[[services]]\nvip = \"{vip}\"\nports = [25, 587, 465]\ntable_size = 1009\n");
        for (i, addr) in addrs.iter().enumerate() {
            text += &format!(
                "[[services.backends]]\nname = \"relay{}\"\naddress = \"{addr}\"\nmac = \"02:00:00:00:00:0{}\"\nweight = {}\n",
                i + 1,
                i + 3,
                weights[i]
            );
        }
        if relay4 {
            text += &format!(
                "[[services.backends]]\nname = \"relay4\"\naddress = \"{addr4}\"\nmac = \"02:00:00:00:00:06\"\n"
            );
        }
    }
    LbConfig::parse(&text).unwrap_or_else(|e| panic!("fixture config: {e}"))
}

struct Fixture {
    h: XdpHarness,
    plan: Plan,
}

impl Fixture {
    fn new(cfg: &LbConfig) -> Self {
        let mut h = XdpHarness::load();
        let plan = apply_config(h.ebpf_mut(), cfg).expect("apply config").plan;
        Self { h, plan }
    }

    fn apply(&mut self, cfg: &LbConfig) {
        self.plan = apply_config(self.h.ebpf_mut(), cfg)
            .expect("apply config")
            .plan;
    }

    fn run(&mut self, pkt: &[u8]) -> Outcome {
        self.h.run(BALANCER, pkt)
    }

    fn stats(&mut self) -> GlobalStats {
        counters(self.h.ebpf_mut()).expect("counters").global
    }

    /// Runs `pkt` and returns the outcome and which counters changed.
    fn run_counted(&mut self, pkt: &[u8]) -> (Outcome, Vec<(&'static str, u64)>) {
        let before = self.stats();
        let out = self.run(pkt);
        let after = self.stats();
        (out, changed(&before.fields(), &after.fields()))
    }

    /// The MAC of the backend Maglev picks for a new flow `src:sport → dst:dport`.
    fn expected_mac(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<[u8; 6]> {
        let key = flow_key(src, sport, dst, dport);
        let skey = service_key(dst, dport);
        let svc = self.plan.services.iter().find(|s| s.key == skey)?;
        let hash = smtp_lb_common::flow_hash(&key, svc.flags & SERVICE_STICKY != 0);
        let id = svc.ring[smtp_lb_common::ring_slot(hash, svc.ring_size) as usize];
        if id == NO_BACKEND {
            return None;
        }
        let b = self.plan.backends.iter().find(|b| b.id == id)?;
        Some(b.value.mac)
    }
}

fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    let (s, family) = addr_words(src);
    let (d, _) = addr_words(dst);
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

/// `input` with the MACs an L2 DSR rewrite produces.
fn rewritten(input: &[u8], backend_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&backend_mac);
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

fn assert_tx_to(f: &mut Fixture, pkt: &[u8], mac: [u8; 6], what: &str) {
    let out = f.run(pkt);
    assert_eq!(out.verdict, Verdict::Tx, "{what}");
    assert_eq!(out.output, rewritten(pkt, mac), "{what}: output bytes");
}

fn assert_counted(delta: &[(&str, u64)], name: &str, what: &str) {
    assert!(
        delta.contains(&(name, 1)),
        "{what}: expected `{name}` to count, got {delta:?}"
    );
}

#[test]
fn syn_to_each_vip_port_goes_to_its_maglev_backend() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let mut seen = std::collections::BTreeSet::new();
    for (src, dst) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4)),
        (CLIENT6.into(), VIP6.into()),
    ] {
        for dport in [25, 587, 465] {
            for sport in [40000u16, 40001, 40002, 51515, 61000] {
                let pkt = PacketBuilder::tcp(src, sport, dst, dport, tcp::SYN).build();
                let mac = f.expected_mac(src, sport, dst, dport).expect("a backend");
                seen.insert(mac);
                let (out, delta) = f.run_counted(&pkt);
                assert_eq!(
                    out.verdict,
                    Verdict::Tx,
                    "SYN {src}:{sport} → {dst}:{dport}"
                );
                assert_eq!(
                    out.output,
                    rewritten(&pkt, mac),
                    "SYN {src}:{sport} → {dst}:{dport}"
                );
                assert_eq!(delta, vec![("tx", 1)], "a SYN is no LRU miss");
            }
        }
    }
    assert_eq!(seen.len(), 3, "30 flows reach all three relays");
}

#[test]
fn tracked_flow_keeps_its_backend_after_the_table_changes() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    // Find flows that start on relay1 (id of 198.51.100.3), v4 and v6.
    for (src, dst) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4)),
        (CLIENT6.into(), VIP6.into()),
    ] {
        let relay1 = [2, 0, 0, 0, 0, 3];
        let sport = (30000..40000)
            .find(|p| f.expected_mac(src, *p, dst, 25) == Some(relay1))
            .unwrap();
        let syn = PacketBuilder::tcp(src, sport, dst, 25, tcp::SYN).build();
        assert_tx_to(&mut f, &syn, relay1, "SYN");

        // Drain relay1 (weight 0) and add a fourth relay: the table changes.
        f.apply(&config([0, 1, 1], true));
        assert_ne!(
            f.expected_mac(src, sport, dst, 25),
            Some(relay1),
            "the table moved this flow"
        );
        for flags in [tcp::ACK, tcp::ACK | tcp::PSH, tcp::FIN | tcp::ACK, tcp::RST] {
            let pkt = PacketBuilder::tcp(src, sport, dst, 25, flags)
                .payload(b"EHLO x\r\n")
                .build();
            let (out, delta) = f.run_counted(&pkt);
            assert_eq!(out.verdict, Verdict::Tx);
            assert_eq!(
                out.output,
                rewritten(&pkt, relay1),
                "flags {flags:#x} stay on relay1"
            );
            assert_eq!(delta, vec![("tx", 1)]);
        }
        f.apply(&config([1, 1, 1], false));
    }
}

#[test]
fn weight_zero_backend_gets_no_new_flows_but_keeps_existing_ones() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let relay2 = [2, 0, 0, 0, 0, 4];
    let src = IpAddr::V4(CLIENT4);
    let dst = IpAddr::V4(VIP4);
    let sport = (30000..40000)
        .find(|p| f.expected_mac(src, *p, dst, 587) == Some(relay2))
        .unwrap();
    assert_tx_to(
        &mut f,
        &PacketBuilder::tcp(src, sport, dst, 587, tcp::SYN).build(),
        relay2,
        "SYN",
    );
    f.apply(&config([1, 0, 1], false));
    for p in 20000..20400 {
        let out = f.run(&PacketBuilder::tcp(src, p, dst, 587, tcp::SYN).build());
        assert_eq!(out.verdict, Verdict::Tx);
        assert_ne!(
            &out.output[0..6],
            &relay2,
            "new flow {p} on a weight-0 relay"
        );
    }
    let ack = PacketBuilder::tcp(src, sport, dst, 587, tcp::ACK).build();
    assert_tx_to(
        &mut f,
        &ack,
        relay2,
        "existing flow stays on the weight-0 relay",
    );
}

#[test]
fn a_service_whose_admission_is_closed_drops_new_syns_and_keeps_its_flows() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let src = IpAddr::V4(CLIENT4);
    let dst = IpAddr::V4(VIP4);
    let syn = |p| PacketBuilder::tcp(src, p, dst, 25, tcp::SYN).build();
    let admitted = f.expected_mac(src, 40000, dst, 25).unwrap();
    assert_tx_to(&mut f, &syn(40000), admitted, "SYN while admission is open");
    let id = f
        .plan
        .services
        .iter()
        .find(|s| s.vip == dst && s.port == 25)
        .unwrap()
        .id;
    f.h.ebpf_mut().set_admission(id, true).unwrap();
    let (out, delta) = f.run_counted(&syn(40001));
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(delta, [("drop_admission", 1)]);
    // The flow admitted before: its retransmitted SYN and its ACKs go on.
    assert_tx_to(
        &mut f,
        &syn(40000),
        admitted,
        "retransmitted SYN of a tracked flow",
    );
    let ack = PacketBuilder::tcp(src, 40000, dst, 25, tcp::ACK).build();
    assert_tx_to(&mut f, &ack, admitted, "ACK of a tracked flow");
    // Other VIP × ports admit.
    let other = f.run(&PacketBuilder::tcp(src, 40001, dst, 587, tcp::SYN).build());
    assert_eq!(other.verdict, Verdict::Tx);
    f.h.ebpf_mut().set_admission(id, false).unwrap();
    let mac = f.expected_mac(src, 40001, dst, 25).unwrap();
    assert_tx_to(&mut f, &syn(40001), mac, "SYN once admission is open again");
}

#[test]
fn flow_of_a_removed_backend_rehashes_and_unknown_flows_count_lru_misses() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let relay3 = [2, 0, 0, 0, 0, 5];
    let src = IpAddr::V4(CLIENT4);
    let dst = IpAddr::V4(VIP4);
    let sport = (30000..40000)
        .find(|p| f.expected_mac(src, *p, dst, 25) == Some(relay3))
        .unwrap();
    assert_tx_to(
        &mut f,
        &PacketBuilder::tcp(src, sport, dst, 25, tcp::SYN).build(),
        relay3,
        "SYN",
    );
    // Remove relay3 from both services.
    let text = config([1, 1, 1], false);
    let mut cfg = text.clone();
    for s in &mut cfg.services {
        s.backends.retain(|b| b.name != "relay3");
    }
    f.apply(&cfg);
    let ack = PacketBuilder::tcp(src, sport, dst, 25, tcp::ACK).build();
    let mac = f.expected_mac(src, sport, dst, 25).unwrap();
    assert_ne!(mac, relay3);
    let (out, delta) = f.run_counted(&ack);
    assert_eq!(out.output, rewritten(&ack, mac));
    assert_counted(&delta, "rehash", "removed backend");
    // The re-hashed flow is tracked again: no more re-hash.
    let (_, delta) = f.run_counted(&ack);
    assert_eq!(delta, vec![("tx", 1)]);

    // A mid-flow packet nobody tracked (LB restart, eviction) lands where the table says.
    let ack = PacketBuilder::tcp(src, 45678, dst, 25, tcp::ACK).build();
    let mac = f.expected_mac(src, 45678, dst, 25).unwrap();
    let (out, delta) = f.run_counted(&ack);
    assert_eq!(out.verdict, Verdict::Tx);
    assert_eq!(out.output, rewritten(&ack, mac));
    assert_counted(&delta, "lru_miss", "untracked ACK");
}

#[test]
fn non_vip_traffic_passes_untouched() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let other4 = Ipv4Addr::new(198, 51, 100, 9);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("ARP", arp_request(CLIENT4, VIP4), "pass_non_ip"),
        (
            "ICMP to VIP",
            PacketBuilder::icmp_echo(CLIENT4, VIP4).build(),
            "pass_non_vip",
        ),
        (
            "ICMPv6 to VIP",
            PacketBuilder::icmp_echo(CLIENT6, VIP6).build(),
            "pass_non_vip",
        ),
        (
            "UDP to VIP:25",
            PacketBuilder::udp(CLIENT4, 5353, VIP4, 25).build(),
            "pass_non_vip",
        ),
        (
            "TCP to VIP:80",
            PacketBuilder::tcp(CLIENT4, 40000, VIP4, 80, tcp::SYN).build(),
            "pass_non_vip",
        ),
        (
            "TCP to VIP6:80",
            PacketBuilder::tcp(CLIENT6, 40000, VIP6, 80, tcp::SYN).build(),
            "pass_non_vip",
        ),
        (
            "TCP to other:25",
            PacketBuilder::tcp(CLIENT4, 40000, other4, 25, tcp::SYN).build(),
            "pass_non_vip",
        ),
        (
            "options to other",
            PacketBuilder::tcp(CLIENT4, 1, other4, 25, tcp::SYN)
                .ipv4_options(&[1, 1, 1, 1])
                .build(),
            "pass_non_vip",
        ),
        (
            "fragment to other",
            PacketBuilder::tcp(CLIENT4, 1, other4, 25, tcp::ACK)
                .fragment(true, 0)
                .build(),
            "pass_non_vip",
        ),
        (
            "v6 ext to other",
            PacketBuilder::tcp(CLIENT6, 1, Ipv6Addr::LOCALHOST, 25, tcp::SYN)
                .ipv6_ext(0)
                .build(),
            "pass_non_vip",
        ),
    ];
    for (what, pkt, counter) in cases {
        let (out, delta) = f.run_counted(&pkt);
        assert_eq!(out.verdict, Verdict::Pass, "{what}");
        assert_eq!(out.output, pkt, "{what}: bytes unchanged");
        assert_eq!(delta, vec![(counter, 1)], "{what}");
    }
}

#[test]
fn vip_options_fragments_and_extension_headers_are_counted_drops() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let syn = || PacketBuilder::tcp(CLIENT4, 40000, VIP4, 25, tcp::SYN);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "IPv4 options",
            syn().ipv4_options(&[1, 1, 1, 1]).build(),
            "drop_ipv4_options",
        ),
        ("MF set", syn().fragment(true, 0).build(), "drop_fragment"),
        (
            "offset",
            syn().fragment(false, 100).build(),
            "drop_fragment",
        ),
        (
            "MF and offset",
            syn().fragment(true, 8).build(),
            "drop_fragment",
        ),
        (
            "hop-by-hop",
            PacketBuilder::tcp(CLIENT6, 1, VIP6, 25, tcp::SYN)
                .ipv6_ext(0)
                .build(),
            "drop_ipv6_ext",
        ),
        (
            "routing",
            PacketBuilder::tcp(CLIENT6, 1, VIP6, 25, tcp::SYN)
                .ipv6_ext(43)
                .build(),
            "drop_ipv6_ext",
        ),
        (
            "fragment hdr",
            PacketBuilder::tcp(CLIENT6, 1, VIP6, 25, tcp::SYN)
                .ipv6_ext(44)
                .build(),
            "drop_ipv6_ext",
        ),
        (
            "dest options",
            PacketBuilder::tcp(CLIENT6, 1, VIP6, 25, tcp::SYN)
                .ipv6_ext(60)
                .build(),
            "drop_ipv6_ext",
        ),
    ];
    for (what, pkt, counter) in cases {
        let (out, delta) = f.run_counted(&pkt);
        assert_eq!(out.verdict, Verdict::Drop, "{what}");
        assert_eq!(delta, vec![(counter, 1)], "{what}");
    }
}

/// Sum of the terminal counters: every packet ends in exactly one.
fn terminal(s: &GlobalStats) -> u64 {
    s.fields()
        .iter()
        .filter(|(n, _)| {
            !matches!(
                *n,
                "lru_miss" | "rehash" | "moved_hit" | "icmp_to_flow" | "flow_table_full"
            )
        })
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn truncated_at_every_boundary_is_counted_and_never_forwarded() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let frames = [
        PacketBuilder::tcp(CLIENT4, 40000, VIP4, 25, tcp::SYN)
            .payload(b"x")
            .build(),
        PacketBuilder::tcp(CLIENT6, 40000, VIP6, 25, tcp::SYN)
            .payload(b"x")
            .build(),
        PacketBuilder::tcp(CLIENT4, 40000, VIP4, 25, tcp::ACK)
            .vlan(7)
            .payload(b"x")
            .build(),
        PacketBuilder::tcp(CLIENT6, 40000, VIP6, 465, tcp::ACK)
            .vlan(7)
            .payload(b"x")
            .build(),
    ];
    for full in frames {
        // test_run needs at least an Ethernet header.
        for len in 14..full.len() {
            let pkt = &full[..len];
            let before = f.stats();
            let (out, delta) = f.run_counted(pkt);
            let after = f.stats();
            assert_eq!(
                terminal(&after) - terminal(&before),
                1,
                "len {len}: {delta:?}"
            );
            assert!(
                matches!(out.verdict, Verdict::Pass | Verdict::Drop),
                "len {len}: truncated frame forwarded ({:?})",
                out.verdict
            );
            if out.verdict == Verdict::Pass {
                assert_eq!(out.output, pkt, "len {len}: passed bytes unchanged");
                assert!(
                    delta
                        .iter()
                        .any(|(n, _)| *n == "pass_truncated" || *n == "pass_non_ip"),
                    "len {len}: {delta:?}"
                );
            } else {
                assert_eq!(delta, vec![("drop_malformed", 1)], "len {len}");
            }
        }
    }
}

#[test]
fn bogus_ihl_and_lengths_are_counted_drops() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let good = PacketBuilder::tcp(CLIENT4, 40000, VIP4, 25, tcp::SYN)
        .payload(b"hello")
        .build();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for ihl in [0u8, 4] {
        let mut p = good.clone();
        p[14] = 0x40 | ihl;
        cases.push(("ihl", p));
    }
    // ihl above 5 claims options (none follow): refused as options.
    for ihl in [6u8, 15] {
        let mut p = good.clone();
        p[14] = 0x40 | ihl;
        let (out, delta) = f.run_counted(&p);
        assert_eq!(out.verdict, Verdict::Drop, "ihl {ihl}");
        assert_eq!(delta, vec![("drop_ipv4_options", 1)], "ihl {ihl}");
    }
    let mut p = good.clone();
    p[14] = 0x65; // version 6 in an IPv4 ethertype
    cases.push(("version", p));
    for tot_len in [0u16, 20, 39, (good.len() - 14 + 1) as u16, 0xffff] {
        let mut p = good.clone();
        p[16..18].copy_from_slice(&tot_len.to_be_bytes());
        cases.push(("tot_len", p));
    }
    let mut p = good.clone();
    p[14 + 20 + 12] = 0x40; // TCP data offset 4
    cases.push(("doff", p));
    let good6 = PacketBuilder::tcp(CLIENT6, 40000, VIP6, 25, tcp::SYN)
        .payload(b"hello")
        .build();
    for plen in [0u16, 19, (good6.len() - 54 + 1) as u16] {
        let mut p = good6.clone();
        p[18..20].copy_from_slice(&plen.to_be_bytes());
        cases.push(("payload_len", p));
    }
    for (what, pkt) in cases {
        let (out, delta) = f.run_counted(&pkt);
        assert_eq!(out.verdict, Verdict::Drop, "{what} {:02x?}", &pkt[14..20]);
        assert_eq!(delta, vec![("drop_malformed", 1)], "{what}");
    }
}

#[test]
fn vlan_tagged_syn_keeps_its_tag() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    for (src, dst) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4)),
        (CLIENT6.into(), VIP6.into()),
    ] {
        let pkt = PacketBuilder::tcp(src, 40000, dst, 25, tcp::SYN)
            .vlan(100)
            .build();
        let mac = f.expected_mac(src, 40000, dst, 25).unwrap();
        assert_tx_to(&mut f, &pkt, mac, "VLAN");
        assert_eq!(&pkt[12..16], &[0x81, 0, 0, 100]);
    }
}

#[test]
fn no_backend_with_weight_is_a_counted_drop() {
    let mut f = Fixture::new(&config([0, 0, 0], false));
    for (src, dst) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4)),
        (CLIENT6.into(), VIP6.into()),
    ] {
        for flags in [tcp::SYN, tcp::ACK] {
            let pkt = PacketBuilder::tcp(src, 40000, dst, 25, flags).build();
            let (out, delta) = f.run_counted(&pkt);
            assert_eq!(out.verdict, Verdict::Drop);
            assert!(delta.contains(&("drop_no_backend", 1)), "{delta:?}");
        }
    }
}

#[test]
fn sticky_service_sends_every_port_of_a_client_to_one_relay() {
    let mut cfg = config([1, 1, 1], false);
    for s in &mut cfg.services {
        s.sticky = true;
    }
    let mut f = Fixture::new(&cfg);
    let first = f.run(&PacketBuilder::tcp(CLIENT4, 1000, VIP4, 25, tcp::SYN).build());
    for sport in 1001..1100 {
        let out = f.run(&PacketBuilder::tcp(CLIENT4, sport, VIP4, 25, tcp::SYN).build());
        assert_eq!(&out.output[0..6], &first.output[0..6]);
    }
    let _ = CLIENT_MAC;
}

#[test]
fn table_size_change_and_removed_services_switch_whole_tables() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let src = IpAddr::V4(CLIENT4);
    let dst = IpAddr::V4(VIP4);
    // Twice, so both tables of each service get the new size in turn.
    for m in [1013, 1019] {
        let mut cfg = config([1, 1, 1], false);
        for s in &mut cfg.services {
            s.table_size = m;
        }
        f.apply(&cfg);
        for sport in 20000..20200 {
            let pkt = PacketBuilder::tcp(src, sport, dst, 465, tcp::SYN).build();
            let mac = f.expected_mac(src, sport, dst, 465).unwrap();
            assert_tx_to(&mut f, &pkt, mac, &format!("M={m} sport {sport}"));
        }
    }
    // Port 465 leaves the config: its traffic is no longer balanced.
    let mut cfg = config([1, 1, 1], false);
    for s in &mut cfg.services {
        s.ports.retain(|p| *p != 465);
    }
    f.apply(&cfg);
    let pkt = PacketBuilder::tcp(src, 20000, dst, 465, tcp::SYN).build();
    let (out, delta) = f.run_counted(&pkt);
    assert_eq!(out.verdict, Verdict::Pass);
    assert_eq!(out.output, pkt);
    assert_eq!(delta, vec![("pass_non_vip", 1)]);
    let pkt = PacketBuilder::tcp(src, 20000, dst, 587, tcp::SYN).build();
    assert_eq!(f.run(&pkt).verdict, Verdict::Tx, "587 still balanced");
}

#[test]
fn icmp_errors_quoting_a_flow_reach_the_relay_that_owns_it() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let relay1 = [2, 0, 0, 0, 0, 3];
    for (src, dst) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4)),
        (CLIENT6.into(), VIP6.into()),
    ] {
        // A tracked flow on relay1, then a drain: only its entry knows relay1.
        let sport = (30000..40000)
            .find(|p| f.expected_mac(src, *p, dst, 587) == Some(relay1))
            .unwrap();
        assert_tx_to(
            &mut f,
            &PacketBuilder::tcp(src, sport, dst, 587, tcp::SYN).build(),
            relay1,
            "SYN",
        );
        f.apply(&config([0, 1, 1], false));
        assert_ne!(f.expected_mac(src, sport, dst, 587), Some(relay1));
        let err = path_mtu_error(src, sport, dst, 587);
        let (out, delta) = f.run_counted(&err);
        assert_eq!(out.verdict, Verdict::Tx, "{src}: error to the flow's relay");
        assert_eq!(out.output, rewritten(&err, relay1), "{src}: bytes");
        assert_eq!(delta, vec![("tx", 1), ("icmp_to_flow", 1)], "{src}");

        // An untracked flow: where the table sends it, and no entry is made
        // (anyone can send an ICMP error).
        let err = path_mtu_error(src, 45678, dst, 25);
        let mac = f.expected_mac(src, 45678, dst, 25).unwrap();
        let (out, delta) = f.run_counted(&err);
        assert_eq!(out.output, rewritten(&err, mac), "{src}: untracked");
        assert_eq!(delta, vec![("tx", 1), ("icmp_to_flow", 1)], "{src}");
        let key = flow_key(src, 45678, dst, 25);
        assert!(!tracked_in(&mut f, maps::FLOW_TABLE, &key));

        // Errors about the node's own traffic, other ports, or other
        // messages pass untouched.
        let other = if src.is_ipv4() {
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2))
        } else {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2))
        };
        let echo = if src.is_ipv4() {
            PacketBuilder::icmp_echo(CLIENT4, VIP4).build()
        } else {
            PacketBuilder::icmp_echo(CLIENT6, VIP6).build()
        };
        for (what, pkt) in [
            ("node's own flow", path_mtu_error(src, 40000, other, 25)),
            ("other port", path_mtu_error(src, 40000, dst, 80)),
            ("echo", echo),
        ] {
            let (out, delta) = f.run_counted(&pkt);
            assert_eq!(out.verdict, Verdict::Pass, "{src}: {what}");
            assert_eq!(out.output, pkt, "{src}: {what}");
            assert_eq!(delta, vec![("pass_non_vip", 1)], "{src}: {what}");
        }
        // Cut short: never forwarded.
        let err = path_mtu_error(src, sport, dst, 587);
        let l4 = if src.is_ipv4() { 34 } else { 54 };
        for len in l4..l4 + 8 + if src.is_ipv4() { 24 } else { 44 } {
            let out = f.run(&err[..len]);
            assert_eq!(out.verdict, Verdict::Pass, "{src}: cut at {len}");
        }
        let mut bogus = err.clone();
        if src.is_ipv4() {
            bogus[16..18].copy_from_slice(&40u16.to_be_bytes());
        } else {
            bogus[18..20].copy_from_slice(&8u16.to_be_bytes());
        }
        let (out, delta) = f.run_counted(&bogus);
        assert_eq!(out.verdict, Verdict::Drop, "{src}: length below the quote");
        assert_eq!(delta, vec![("drop_malformed", 1)]);
        f.apply(&config([1, 1, 1], false));
    }
}

/// Spoofed tuples in each flood: over 10× `CONNTRACK_SIZE` (the flow table's ways).
const FLOOD: u32 = 3_000_000;

/// A tracked flow to relay1, then relay1 drained (weight 0: the table no
/// longer names it), then [`FLOOD`] random spoofed tuples to the same VIP
/// port — each a SYN followed by an ACK (`syn_first`), or an ACK alone. The
/// flow's next packet must still reach relay1.
///
/// With SYN+ACK pairs the flow is established (it sent an ACK: confirmed),
/// and no new flow may take a confirmed way, so it must still be in
/// `FLOW_TABLE`; should it lose its way anyway (an LB restart without the
/// pinned table), the copy the table change made must still hold it. Lone
/// ACKs each take a free or unconfirmed way: there the flow is one whose
/// handshake is under way (only its SYN seen), the worst case for that
/// flood, and the flood must have taken its way: only the copy holds it.
fn tracked_flow_survives_a_spoofed_flood(src: IpAddr, dst: IpAddr, syn_first: bool) {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let relay1 = [2, 0, 0, 0, 0, 3];
    let sport = (30000..40000)
        .find(|p| f.expected_mac(src, *p, dst, 25) == Some(relay1))
        .unwrap();
    assert_tx_to(
        &mut f,
        &PacketBuilder::tcp(src, sport, dst, 25, tcp::SYN).build(),
        relay1,
        "SYN",
    );
    if syn_first {
        let ack = PacketBuilder::tcp(src, sport, dst, 25, tcp::ACK).build();
        assert_tx_to(&mut f, &ack, relay1, "handshake ACK");
    }
    let drained = apply_config(f.h.ebpf_mut(), &config([0, 1, 1], false)).expect("drain");
    f.plan = drained.plan;
    assert_ne!(
        f.expected_mac(src, sport, dst, 25),
        Some(relay1),
        "the drain moved this flow"
    );
    assert_eq!(drained.moved.copied, 1, "{:?}", drained.moved);
    let key = flow_key(src, sport, dst, 25);
    assert!(tracked_in(&mut f, maps::MOVED_FLOWS, &key));

    // The flood: random client addresses and ports, patched into one frame.
    let mut pkt = PacketBuilder::tcp(src, 1, dst, 25, tcp::SYN).build();
    let (addr_at, addr_len, sport_at) = if src.is_ipv4() {
        (26, 4, 34)
    } else {
        (22, 16, 54)
    };
    let flags_at = sport_at + 13;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(syn_first);
    let mut next = || {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let before = f.stats();
    for _ in 0..FLOOD {
        for chunk in pkt[addr_at..addr_at + addr_len].chunks_mut(8) {
            let r = next().to_ne_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        pkt[sport_at..sport_at + 2].copy_from_slice(&(next() as u16).to_ne_bytes());
        if syn_first {
            pkt[flags_at] = tcp::SYN;
            assert_eq!(f.run(&pkt).verdict, Verdict::Tx, "spoofed SYN");
        }
        pkt[flags_at] = tcp::ACK;
        assert_eq!(f.run(&pkt).verdict, Verdict::Tx, "spoofed ACK");
    }
    let after = f.stats();
    let sent = u64::from(FLOOD) * if syn_first { 2 } else { 1 };
    assert_eq!(after.tx - before.tx, sent, "every spoofed packet forwarded");
    if !syn_first {
        assert_eq!(after.lru_miss - before.lru_miss, u64::from(FLOOD));
    }
    let ack = PacketBuilder::tcp(src, sport, dst, 25, tcp::ACK)
        .payload(b"DATA\r\n")
        .build();
    if syn_first {
        assert!(
            tracked_in(&mut f, maps::FLOW_TABLE, &key),
            "the flood took the way of a confirmed flow"
        );
        let (out, delta) = f.run_counted(&ack);
        assert_eq!(out.output, rewritten(&ack, relay1), "still on relay1");
        assert_eq!(delta, vec![("tx", 1)]);
        forget(&mut f, &key);
    } else {
        assert!(
            !tracked_in(&mut f, maps::FLOW_TABLE, &key),
            "the flood took the way of the flow that had only sent its SYN"
        );
    }

    // The flow's next packet without its way: still relay1.
    let (out, delta) = f.run_counted(&ack);
    assert_eq!(out.verdict, Verdict::Tx);
    assert_eq!(out.output, rewritten(&ack, relay1), "still on relay1");
    assert_eq!(delta, vec![("tx", 1), ("moved_hit", 1)]);

    // relay1 back at full weight: the table sends the flow there again, so
    // the copy is no longer needed and goes.
    let walk = std::time::Instant::now();
    let restored = apply_config(f.h.ebpf_mut(), &config([1, 1, 1], false)).expect("restore");
    eprintln!(
        "apply with a full FLOW_TABLE ({} flows walked): {:?}",
        restored.moved.scanned,
        walk.elapsed()
    );
    assert_eq!(restored.moved.pruned, 1, "{:?}", restored.moved);
    assert!(!tracked_in(&mut f, maps::MOVED_FLOWS, &key));
}

/// Whether map `name` (`FLOW_TABLE` or `MOVED_FLOWS`) holds `key`. A
/// syscall lookup: it changes nothing, as a packet's would.
fn tracked_in(f: &mut Fixture, name: &str, key: &FlowKey) -> bool {
    let map = f.h.ebpf_mut().map(name).unwrap();
    if name == maps::FLOW_TABLE {
        let table: Array<_, FlowSet> = Array::try_from(map).unwrap();
        return flows::find(&table, key).unwrap().is_some();
    }
    let m: aya::maps::HashMap<_, FlowKey, Flow> = aya::maps::HashMap::try_from(map).unwrap();
    m.get(key, 0).is_ok()
}

/// Empties the way of `key`, as a new flow taking it (or a restart with an
/// empty table) would.
fn forget(f: &mut Fixture, key: &FlowKey) {
    let map = f.h.ebpf_mut().map_mut(maps::FLOW_TABLE).unwrap();
    let mut table: Array<_, FlowSet> = Array::try_from(map).unwrap();
    assert!(flows::remove(&mut table, key).unwrap(), "tracked");
}

#[test]
fn tracked_flow_survives_a_flood_of_spoofed_syn_ack_pairs_v4() {
    tracked_flow_survives_a_spoofed_flood(CLIENT4.into(), VIP4.into(), true);
}

#[test]
fn tracked_flow_survives_a_flood_of_spoofed_syn_ack_pairs_v6() {
    tracked_flow_survives_a_spoofed_flood(CLIENT6.into(), VIP6.into(), true);
}

#[test]
fn tracked_flow_survives_a_flood_of_spoofed_acks_v4() {
    tracked_flow_survives_a_spoofed_flood(CLIENT4.into(), VIP4.into(), false);
}

#[test]
fn tracked_flow_survives_a_flood_of_spoofed_acks_v6() {
    tracked_flow_survives_a_spoofed_flood(CLIENT6.into(), VIP6.into(), false);
}

/// `n` flows to VIP4:25 (from clients 198.51.100.x) that share one
/// `FLOW_TABLE` set: what a flood concentrated on one set looks like.
fn one_set(n: usize) -> Vec<(IpAddr, u16)> {
    let set = |c: IpAddr, p: u16| flows::set_of(&flow_key(c, p, VIP4.into(), 25));
    let first: IpAddr = CLIENT4.into();
    let target = set(first, 40000);
    let mut out = vec![(first, 40000)];
    'search: for x in 1..=254u8 {
        let client = IpAddr::V4(Ipv4Addr::new(198, 51, 100, x));
        for port in 1024..=65535u16 {
            if out.len() == n {
                break 'search;
            }
            if (client, port) != (first, 40000) && set(client, port) == target {
                out.push((client, port));
            }
        }
    }
    assert_eq!(out.len(), n, "flows in one set");
    out
}

impl Fixture {
    /// Sends `flags` of flow `client:port → VIP4:25`, asserts it reached the
    /// backend the table names and returns the counters that changed.
    fn flow(&mut self, (client, port): (IpAddr, u16), flags: u8) -> Vec<(&'static str, u64)> {
        let pkt = PacketBuilder::tcp(client, port, VIP4, 25, flags).build();
        let mac = self.expected_mac(client, port, VIP4.into(), 25).unwrap();
        let (out, delta) = self.run_counted(&pkt);
        assert_eq!(out.verdict, Verdict::Tx, "{client}:{port} flags {flags:#x}");
        assert_eq!(
            out.output,
            rewritten(&pkt, mac),
            "{client}:{port}: its relay"
        );
        delta
    }

    fn tracks(&mut self, (client, port): (IpAddr, u16)) -> bool {
        tracked_in(
            self,
            maps::FLOW_TABLE,
            &flow_key(client, port, VIP4.into(), 25),
        )
    }
}

#[test]
fn a_new_flow_never_takes_the_way_of_a_confirmed_flow() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let flows = one_set(5);
    // Four established flows (SYN, then ACK) fill the set's four ways.
    for &flow in &flows[..4] {
        assert_eq!(f.flow(flow, tcp::SYN), vec![("tx", 1)]);
        assert_eq!(f.flow(flow, tcp::ACK), vec![("tx", 1)]);
    }
    // A fifth flow's SYN finds no way it may take: forwarded by the table,
    // untracked, counted; and so is its ACK.
    assert_eq!(
        f.flow(flows[4], tcp::SYN),
        vec![("tx", 1), ("flow_table_full", 1)]
    );
    assert!(!f.tracks(flows[4]));
    assert_eq!(
        f.flow(flows[4], tcp::ACK),
        vec![("tx", 1), ("lru_miss", 1), ("flow_table_full", 1)]
    );
    for &flow in &flows[..4] {
        assert!(f.tracks(flow), "{flow:?} keeps its way");
    }
}

#[test]
fn a_new_flow_takes_the_way_of_an_unconfirmed_or_closing_flow() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let flows = one_set(6);
    for &flow in &flows[..3] {
        f.flow(flow, tcp::SYN);
        f.flow(flow, tcp::ACK);
    }
    // The fourth only sent its SYN (a handshake under way, or spoofed).
    f.flow(flows[3], tcp::SYN);
    assert_eq!(f.flow(flows[4], tcp::SYN), vec![("tx", 1)]);
    assert!(f.tracks(flows[4]), "took the unconfirmed way");
    assert!(!f.tracks(flows[3]));
    f.flow(flows[4], tcp::ACK);
    // The client of the first sends FIN: its way may go to a new flow.
    f.flow(flows[0], tcp::FIN | tcp::ACK);
    assert_eq!(f.flow(flows[5], tcp::SYN), vec![("tx", 1)]);
    assert!(f.tracks(flows[5]), "took the closing way");
    assert!(!f.tracks(flows[0]));
    for &flow in &[flows[1], flows[2], flows[4]] {
        assert!(f.tracks(flow), "{flow:?} keeps its way");
    }
}

#[test]
fn a_confirmed_flow_silent_for_the_idle_time_gives_its_way_up() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let flows = one_set(6);
    let t0 = 1_000;
    f.h.ebpf_mut().set_clock(t0).unwrap();
    for &flow in &flows[..4] {
        f.flow(flow, tcp::SYN);
        f.flow(flow, tcp::ACK);
    }
    // Silent exactly the idle time: not yet.
    f.h.ebpf_mut().set_clock(t0 + FLOW_IDLE_SECS).unwrap();
    assert_eq!(
        f.flow(flows[4], tcp::SYN),
        vec![("tx", 1), ("flow_table_full", 1)]
    );
    // The second flow speaks; a second later the others have been silent
    // longer than the idle time, and a new flow takes one of their ways.
    f.flow(flows[1], tcp::ACK);
    f.h.ebpf_mut().set_clock(t0 + FLOW_IDLE_SECS + 1).unwrap();
    assert_eq!(f.flow(flows[5], tcp::SYN), vec![("tx", 1)]);
    assert!(f.tracks(flows[5]), "took an idle way");
    assert!(f.tracks(flows[1]), "the flow that spoke keeps its way");
    let silent = [flows[0], flows[2], flows[3]];
    assert_eq!(silent.iter().filter(|&&flow| !f.tracks(flow)).count(), 1);
}

#[test]
fn a_torn_flow_entry_reads_as_a_miss_never_as_another_relay() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let flow = (IpAddr::V4(CLIENT4), 40000);
    f.flow(flow, tcp::SYN);
    f.flow(flow, tcp::ACK);
    // Half of another write: the way names another backend, its seal is
    // still the old one.
    let key = flow_key(flow.0, flow.1, VIP4.into(), 25);
    let own = f.expected_mac(flow.0, flow.1, VIP4.into(), 25).unwrap();
    let other = f
        .plan
        .backends
        .iter()
        .find(|b| b.value.mac != own && b.value.family == smtp_lb_common::AF_INET)
        .unwrap()
        .id;
    let map = f.h.ebpf_mut().map_mut(maps::FLOW_TABLE).unwrap();
    let mut table: Array<_, FlowSet> = Array::try_from(map).unwrap();
    let index = flows::set_of(&key);
    let mut set = table.get(&index, 0).unwrap();
    let way = set.ways.iter_mut().find(|w| w.key == key).unwrap();
    way.backend = other;
    table.set(index, set, 0).unwrap();
    // The packet misses and follows the table (its own relay), never `other`.
    assert_eq!(f.flow(flow, tcp::ACK), vec![("tx", 1), ("lru_miss", 1)]);
}

/// A daemon of a build before the flow table left `CONNTRACK` (an LRU hash of
/// `FlowKey` → `Flow`) pinned; the next daemon carries its flows into
/// `FLOW_TABLE` and unpins it.
#[test]
fn a_previous_builds_conntrack_is_carried_into_the_flow_table() {
    let lab = smtp_lb_tests::lab::Lab::new();
    let pin_dir = lab.pin_dir();
    let old = pin_dir.join(maps::CONNTRACK);
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    };
    let old_path = old.to_str().unwrap();
    bpftool(&[
        "map",
        "create",
        old_path,
        "type",
        "lru_hash",
        "key",
        "40",
        "value",
        "12",
        "entries",
        "1024",
        "name",
        "CONNTRACK",
    ]);
    let key = flow_key(CLIENT4.into(), 40000, VIP4.into(), 25);
    let flow = Flow {
        backend: 7,
        service: 1,
        flags: 0,
    };
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
    // SAFETY: both are `repr(C)` with explicit padding (aya::Pod).
    let (key_bytes, flow_bytes) = unsafe {
        (
            std::slice::from_raw_parts((&raw const key).cast::<u8>(), size_of::<FlowKey>()),
            std::slice::from_raw_parts((&raw const flow).cast::<u8>(), size_of::<Flow>()),
        )
    };
    let mut args = vec!["map", "update", "pinned", old_path, "key", "hex"];
    let (k, v) = (hex(key_bytes), hex(flow_bytes));
    args.extend(k.iter().map(String::as_str));
    args.extend(["value", "hex"]);
    args.extend(v.iter().map(String::as_str));
    bpftool(&args);

    let dp = smtp_lb_user::dataplane::XdpDataplane::load(&smtp_lb_user::dataplane::LoadOptions {
        pin_dir: pin_dir.clone(),
    })
    .expect("load over the old pins");
    assert!(!old.exists(), "the old CONNTRACK is unpinned");
    assert_eq!(
        smtp_lb_user::dataplane::tracked_flows(&pin_dir).unwrap(),
        std::collections::BTreeMap::from([(7, (1, 1))]),
        "its flow is in FLOW_TABLE"
    );
    drop(dp);
}

/// `VIP_PORTS[port]`: 0 unused, else 1 + the `SERVICE_INDEX` slot of the
/// service a new flow on the port is looked for first.
fn port_value(f: &mut Fixture, port: u16) -> u32 {
    let a: Array<_, u32> = Array::try_from(f.h.ebpf_mut().map(maps::VIP_PORTS).unwrap()).unwrap();
    a.get(&u32::from(port), 0).unwrap()
}

fn set_port_value(f: &mut Fixture, port: u16, value: u32) {
    let mut a: Array<_, u32> =
        Array::try_from(f.h.ebpf_mut().map_mut(maps::VIP_PORTS).unwrap()).unwrap();
    a.set(u32::from(port), value, 0).unwrap();
}

fn index_slot(f: &mut Fixture, at: u32) -> smtp_lb_common::ServiceSlot {
    let a: Array<_, smtp_lb_common::ServiceSlot> =
        Array::try_from(f.h.ebpf_mut().map(maps::SERVICE_INDEX).unwrap()).unwrap();
    a.get(&at, 0).unwrap()
}

/// New flows to each VIP on port 25 (IPv4 and IPv6) go to their Maglev
/// backend whatever the port's guess.
fn assert_new_flows_balanced(f: &mut Fixture, vips: &[IpAddr], what: &str) {
    for &dst in vips {
        let src = if dst.is_ipv4() {
            IpAddr::V4(CLIENT4)
        } else {
            CLIENT6.into()
        };
        for sport in 30000..30050 {
            let pkt = PacketBuilder::tcp(src, sport, dst, 25, tcp::SYN).build();
            let mac = f.expected_mac(src, sport, dst, 25).unwrap();
            assert_tx_to(f, &pkt, mac, &format!("{what}: {dst} sport {sport}"));
        }
    }
}

#[test]
fn a_ports_guess_names_one_of_its_services_and_a_wrong_guess_only_costs_the_lookup() {
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let vips = [IpAddr::V4(VIP4), VIP6.into()];
    // Two services on port 25 (one per VIP): the guess is one of them.
    let guess = port_value(&mut f, 25);
    assert!(guess > 1, "port 25's value names a slot: {guess}");
    let slot = index_slot(&mut f, guess - 1);
    assert_eq!(
        u16::from_be(slot.key.port),
        25,
        "the guessed slot holds a port-25 service"
    );
    assert_new_flows_balanced(&mut f, &vips, "the daemon's guess");
    // What a build before the guess wrote (1: used, no slot), and a guess
    // naming another port's service: both still find the right service.
    for (value, what) in [(1, "value 1"), (port_value(&mut f, 587), "587's guess")] {
        set_port_value(&mut f, 25, value);
        assert_new_flows_balanced(&mut f, &vips, what);
    }
    // A service leaving takes its slot out of the guess; the port stays used.
    let mut f = Fixture::new(&config([1, 1, 1], false));
    let guess = port_value(&mut f, 25);
    let guessed = index_slot(&mut f, guess - 1).key;
    let mut cfg = config([1, 1, 1], false);
    cfg.services.retain(|s| service_key(s.vip, 25) != guessed);
    assert_eq!(cfg.services.len(), 1, "one VIP left");
    f.apply(&cfg);
    let after = port_value(&mut f, 25);
    assert!(
        after >= 1 && after != guess,
        "port 25 still used, not by the removed slot: {after}"
    );
    let left = [cfg.services[0].vip];
    assert_new_flows_balanced(&mut f, &left, "after the removal");
}

/// The fixture's counter, service and backend maps pinned where `ctl
/// stats` reads them (a bpffs directory of this test's own, removed on drop).
struct Pinned(std::path::PathBuf);

impl Pinned {
    fn new(f: &mut Fixture) -> Self {
        let dir = std::path::Path::new("/sys/fs/bpf")
            .join(format!("smtp-lb-test-counters-{}", std::process::id()));
        smtp_lb_user::dataplane::ensure_bpffs(&dir).expect("bpffs");
        std::fs::create_dir_all(&dir).expect("pin dir");
        let pinned = Self(dir);
        for name in [
            maps::COUNTERS,
            maps::COUNTER_BASES,
            maps::SERVICES,
            maps::BACKENDS,
        ] {
            let map = f.h.ebpf_mut().map(name).expect(name);
            map.pin(pinned.0.join(name)).expect("pin");
        }
        pinned
    }

    fn stats(&self) -> smtp_lb_user::dataplane::Snapshot {
        smtp_lb_user::dataplane::read_stats(&self.0).expect("read the pinned counters")
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One service, `203.0.113.<vip>:25`, with one relay.
fn one_service(vip: u8) -> LbConfig {
    LbConfig::parse(&format!(
        "[[services]]\nvip = \"203.0.113.{vip}\"\nports = [25]\ntable_size = 1009\n\
         [[services.backends]]\nname = \"relay1\"\naddress = \"198.51.100.3\"\nmac = \"02:00:00:00:00:03\"\n"
    ))
    .unwrap_or_else(|e| panic!("fixture config: {e}"))
}

#[test]
fn a_recycled_service_id_counts_from_zero_and_other_counters_keep_theirs() {
    let mut f = Fixture::new(&one_service(1));
    let pinned = Pinned::new(&mut f);
    let send = |f: &mut Fixture, vip: u8, n: u16| {
        let dst = IpAddr::V4(Ipv4Addr::new(203, 0, 113, vip));
        for sport in 30000..30000 + n {
            let pkt = PacketBuilder::tcp(IpAddr::V4(CLIENT4), sport, dst, 25, tcp::SYN).build();
            assert_eq!(f.run(&pkt).verdict, Verdict::Tx, "vip .{vip} sport {sport}");
        }
    };
    let raw_packets = |f: &mut Fixture, id: u32| {
        counters(f.h.ebpf_mut()).expect("counters").services[id as usize].packets
    };
    // Each config replaces the last service with a new one, until a new
    // service gets an id that has counted packets (there are 32 ids).
    send(&mut f, 1, 5);
    let mut forwarded = 5;
    let mut vip = 1;
    let (id, raw) = loop {
        vip += 1;
        f.apply(&one_service(vip));
        let id = f.plan.services[0].id;
        let raw = raw_packets(&mut f, id);
        if raw > 0 || u32::from(vip) > smtp_lb_common::MAX_SERVICES {
            break (id, raw);
        }
        send(&mut f, vip, 5);
        forwarded += 5;
    };
    assert!(raw > 0, "no service id was recycled in {vip} services");

    let snap = pinned.stats();
    assert_eq!(snap.services.len(), 1);
    let svc = &snap.services[0];
    assert_eq!(
        (svc.packets, svc.bytes, svc.new_flows),
        (0, 0, 0),
        "service .{vip} on recycled id {id} ({raw} packets before it) starts at 0: {svc:?}"
    );
    send(&mut f, vip, 3);
    forwarded += 3;
    let snap = pinned.stats();
    let svc = &snap.services[0];
    let syn_len = PacketBuilder::tcp(IpAddr::V4(CLIENT4), 1, IpAddr::V4(VIP4), 25, tcp::SYN)
        .build()
        .len() as u64;
    assert_eq!(
        (svc.packets, svc.bytes, svc.new_flows),
        (3, 3 * syn_len, 3),
        "{svc:?}"
    );
    // The relay was never recycled: it counts every service's packets.
    let relay = &snap.backends[0];
    assert_eq!(
        (relay.packets, relay.new_flows),
        (forwarded, forwarded),
        "{relay:?}"
    );
    assert_eq!(snap.global["tx"], forwarded);
}
