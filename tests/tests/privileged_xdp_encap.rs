//! Packet fixtures for the forwarding that needs the kernel's routing state:
//! IPIP / IP6IP6 (next hop from `bpf_fib_lookup`), L2 DSR redirected through
//! the devmap to another interface, and the relay-side decap program.
//!
//! `BPF_PROG_TEST_RUN` runs the program in the calling thread's network
//! namespace (its loopback is the ingress device), so each test moves its
//! thread into the "lb" host of a lab, where the routes and neighbours are
//! set up. Nothing is transmitted: test runs only return the verdict.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
};

use aya::maps::PerCpuArray;
use smtp_lb_common::{
    DecapStats, FlowKey, GlobalStats, PROTO_TCP, encap_hash, flow_hash, maps, programs,
};
use smtp_lb_tests::{
    lab::Lab,
    packet::{
        CLIENT_MAC, LB_MAC, PacketBuilder, fold, icmp_error, ipip, ipv4_checksum_ok, ones_sum,
        path_mtu_error, tcp,
    },
    topology::mac_str,
    xdp::{Verdict, XdpHarness, changed},
};
use smtp_lb_user::{
    balance::plan::addr_words,
    config::lb::LbConfig,
    dataplane::{DecapAllow, apply_config, write_decap_allow},
};

const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// A lab with an "lb" (forwarding on) and a "relay" on one segment, and the
/// calling thread moved into the lb's namespace.
fn enter_lb() -> (Lab, [u8; 6], [u8; 6]) {
    let mut lab = Lab::new();
    lab.host("lb", &["198.51.100.2/24", "2001:db8::2/64"]);
    lab.host("relay", &["198.51.100.3/24", "2001:db8::3/64"]);
    lab.sh(
        "lb",
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv4.conf.lo.forwarding=1",
    );
    let relay_mac = lab.get("relay").mac;
    let lb_mac = lab.get("lb").mac;
    lab.sh(
        "lb",
        &format!(
            "ip neigh replace 198.51.100.3 lladdr {m} dev eth0 nud permanent && \
             ip neigh replace 2001:db8::3 lladdr {m} dev eth0 nud permanent",
            m = mac_str(relay_mac)
        ),
    );
    let ns = std::fs::File::open(format!("/var/run/netns/{}", lab.get("lb").netns)).unwrap();
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    (lab, lb_mac, relay_mac)
}

fn config(forwarding: &str, v4: &str, v6: &str, extra: &str) -> LbConfig {
    LbConfig::parse(&format!(
        r#"
        [[services]]
        vip = "{VIP4}"
        ports = [25]
        table_size = 1009
        [[services.backends]]
        name = "relay"
        address = "{v4}"
        forwarding = "{forwarding}"
        {extra}
        [[services]]
        vip = "{VIP6}"
        ports = [25]
        table_size = 1009
        [[services.backends]]
        name = "relay6"
        address = "{v6}"
        forwarding = "{forwarding}"
        {extra}
        "#
    ))
    .unwrap()
}

/// Decap's allow-list as a relay behind these balancers runs it: the
/// default encapsulation source prefixes, the two VIPs.
fn allow_lbs(h: &mut XdpHarness) {
    let allow = DecapAllow {
        sources: vec![
            ("172.16.0.0".parse().unwrap(), 16),
            ("fd00:736d:7470::".parse().unwrap(), 96),
        ],
        vips: vec![(VIP4.into(), 32), (VIP6.into(), 128)],
    };
    write_decap_allow(h.ebpf_mut(), &allow).unwrap();
}

fn decap_stats(h: &mut XdpHarness) -> DecapStats {
    let map = h.ebpf_mut().map(maps::DECAP_STATS).unwrap();
    let a: PerCpuArray<_, DecapStats> = PerCpuArray::try_from(map).unwrap();
    a.get(&0, 0)
        .unwrap()
        .iter()
        .fold(DecapStats::default(), |mut s, x| {
            s.add(x);
            s
        })
}

/// What the outer header carries of the flow `src:sport → dst:dport`.
fn hash(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> u32 {
    let (s, family) = addr_words(src);
    let (d, _) = addr_words(dst);
    encap_hash(flow_hash(
        &FlowKey {
            src: s,
            dst: d,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: PROTO_TCP,
            family,
            _pad: [0; 2],
        },
        false,
    ))
}

#[test]
#[expect(
    clippy::many_single_char_names,
    reason = "h, o, d: harness, output, decapped"
)]
fn ipip_and_ip6ip6_push_the_outer_header_and_decap_strips_it() {
    let (_lab, lb_mac, relay_mac) = enter_lb();
    let mut h = XdpHarness::load();
    apply_config(
        h.ebpf_mut(),
        &config("ipip", "198.51.100.3", "2001:db8::3", ""),
    )
    .unwrap();
    allow_lbs(&mut h);

    // IPv4 in IPv4.
    let inner = PacketBuilder::tcp(CLIENT4, 40000, VIP4, 25, tcp::SYN)
        .payload(b"x")
        .build();
    let out = h.run(programs::BALANCER, &inner);
    assert_eq!(
        out.verdict,
        Verdict::Redirect,
        "next hop is out eth0, not lo"
    );
    let o = &out.output;
    assert_eq!(o.len(), inner.len() + 20);
    assert_eq!(&o[0..6], &relay_mac, "dst MAC from the FIB's neighbour");
    assert_eq!(&o[6..12], &lb_mac, "src MAC of the egress interface");
    assert_eq!(&o[12..14], &[0x08, 0x00]);
    let hsh = hash(CLIENT4.into(), 40000, VIP4.into(), 25);
    let mut outer = vec![0x45, 0];
    outer.extend(((inner.len() - 14 + 20) as u16).to_be_bytes());
    outer.extend([
        0,
        0,
        0,
        0,
        64,
        4,
        0,
        0,
        172,
        16,
        (hsh >> 8) as u8,
        hsh as u8,
        198,
        51,
        100,
        3,
    ]);
    let csum = fold(ones_sum(&outer));
    outer[10..12].copy_from_slice(&csum.to_be_bytes());
    assert_eq!(&o[14..34], &outer[..], "outer IPv4 header");
    assert!(ipv4_checksum_ok(o, 14));
    assert_eq!(&o[34..], &inner[14..], "inner packet untouched");

    let d = h.run(programs::DECAP, o);
    assert_eq!(d.verdict, Verdict::Pass);
    let mut want = inner.clone();
    want[0..6].copy_from_slice(&relay_mac);
    want[6..12].copy_from_slice(&lb_mac);
    assert_eq!(d.output, want, "decap restores the client's packet");

    // IPv6 in IPv6.
    let inner = PacketBuilder::tcp(CLIENT6, 40000, VIP6, 25, tcp::SYN)
        .payload(b"x")
        .build();
    let out = h.run(programs::BALANCER, &inner);
    assert_eq!(out.verdict, Verdict::Redirect);
    let o = &out.output;
    assert_eq!(o.len(), inner.len() + 40);
    assert_eq!(&o[0..6], &relay_mac);
    assert_eq!(&o[12..14], &[0x86, 0xdd]);
    let hsh = hash(CLIENT6.into(), 40000, VIP6.into(), 25);
    let vtf = (6u32 << 28) | (hsh & 0xfffff);
    assert_eq!(
        &o[14..18],
        &vtf.to_be_bytes(),
        "version 6, flow label = flow hash"
    );
    assert_eq!(
        &o[18..20],
        &((inner.len() - 14) as u16).to_be_bytes(),
        "payload = inner packet"
    );
    assert_eq!(o[20], 41, "next header IPv6");
    assert_eq!(o[21], 64);
    let mut src = Ipv6Addr::new(0xfd00, 0x736d, 0x7470, 0, 0, 0, 0, 0).octets();
    src[12..16].copy_from_slice(&hsh.to_be_bytes());
    assert_eq!(&o[22..38], &src);
    assert_eq!(
        &o[38..54],
        &"2001:db8::3".parse::<Ipv6Addr>().unwrap().octets()
    );
    assert_eq!(&o[54..], &inner[14..]);
    let d = h.run(programs::DECAP, o);
    assert_eq!(d.verdict, Verdict::Pass);
    let mut want = inner.clone();
    want[0..6].copy_from_slice(&relay_mac);
    want[6..12].copy_from_slice(&lb_mac);
    assert_eq!(d.output, want);

    // Different flows, different outer sources (RSS entropy at the relay).
    let a = h.run(
        programs::BALANCER,
        &PacketBuilder::tcp(CLIENT4, 1, VIP4, 25, tcp::SYN).build(),
    );
    let b = h.run(
        programs::BALANCER,
        &PacketBuilder::tcp(CLIENT4, 2, VIP4, 25, tcp::SYN).build(),
    );
    assert_ne!(&a.output[26..30], &b.output[26..30]);
}

#[test]
fn ipip_without_neighbour_passes_and_without_route_drops() {
    let (_lab, _, _) = enter_lb();
    let mut h = XdpHarness::load();
    // 198.51.100.77 is on-link but unresolved; 192.0.2.1 has no route.
    apply_config(
        h.ebpf_mut(),
        &config("ipip", "198.51.100.77", "2001:db8::77", ""),
    )
    .unwrap();
    let out = h.run(
        programs::BALANCER,
        &PacketBuilder::tcp(CLIENT4, 1, VIP4, 25, tcp::SYN).build(),
    );
    assert_eq!(
        out.verdict,
        Verdict::Pass,
        "the stack resolves the neighbour"
    );
    apply_config(
        h.ebpf_mut(),
        &config("ipip", "192.0.2.1", "2001:db8:99::1", ""),
    )
    .unwrap();
    for pkt in [
        PacketBuilder::tcp(CLIENT4, 1, VIP4, 25, tcp::SYN).build(),
        PacketBuilder::tcp(CLIENT6, 1, VIP6, 25, tcp::SYN).build(),
    ] {
        let out = h.run(programs::BALANCER, &pkt);
        assert_eq!(out.verdict, Verdict::Drop, "no route: counted drop_encap");
    }
}

#[test]
fn l2_backend_behind_another_interface_is_redirected_through_the_devmap() {
    let (_lab, lb_mac, relay_mac) = enter_lb();
    let mut h = XdpHarness::load();
    let extra = format!("mac = \"{}\"\ninterface = \"eth0\"", mac_str(relay_mac));
    apply_config(
        h.ebpf_mut(),
        &config("l2", "198.51.100.3", "2001:db8::3", &extra),
    )
    .unwrap();
    for pkt in [
        PacketBuilder::tcp(CLIENT4, 1, VIP4, 25, tcp::SYN).build(),
        PacketBuilder::tcp(CLIENT6, 1, VIP6, 25, tcp::SYN).build(),
    ] {
        let out = h.run(programs::BALANCER, &pkt);
        assert_eq!(out.verdict, Verdict::Redirect);
        let mut want = pkt.clone();
        want[0..6].copy_from_slice(&relay_mac);
        want[6..12].copy_from_slice(&lb_mac);
        assert_eq!(out.output, want, "src MAC is the egress interface's");
    }
}

#[test]
fn decap_passes_other_traffic_untouched_and_drops_broken_tunnels() {
    let mut h = XdpHarness::load();
    // The client's address may tunnel here, so the broken tunnels below are
    // refused for being broken, not for their source.
    let allow = DecapAllow {
        sources: vec![(CLIENT4.into(), 32)],
        vips: vec![(VIP4.into(), 32)],
    };
    write_decap_allow(h.ebpf_mut(), &allow).unwrap();
    for pkt in [
        PacketBuilder::tcp(CLIENT4, 1, VIP4, 25, tcp::SYN).build(),
        PacketBuilder::tcp(CLIENT6, 1, VIP6, 25, tcp::SYN).build(),
        PacketBuilder::udp(CLIENT4, 1, VIP4, 53).build(),
    ] {
        let out = h.run(programs::DECAP, &pkt);
        assert_eq!(out.verdict, Verdict::Pass);
        assert_eq!(out.output, pkt);
    }
    // IPIP with outer options, and an outer header with nothing inside.
    let mut p = PacketBuilder::icmp_echo(CLIENT4, VIP4)
        .ipv4_options(&[1, 1, 1, 1])
        .build();
    p[14 + 9] = 4;
    assert_eq!(h.run(programs::DECAP, &p).verdict, Verdict::Drop);
    let mut p = PacketBuilder::icmp_echo(CLIENT4, VIP4).build();
    p[14 + 9] = 4;
    p.truncate(34);
    assert_eq!(h.run(programs::DECAP, &p).verdict, Verdict::Drop);
    assert_eq!(decap_stats(&mut h).dropped, 2, "both counted as broken");
}

#[test]
fn decap_opens_only_tunnels_from_the_lb_nodes_to_a_vip() {
    let mut h = XdpHarness::load();
    allow_lbs(&mut h);
    let lb4: IpAddr = "172.16.12.34".parse().unwrap();
    let lb6: IpAddr = "fd00:736d:7470::1234:5678".parse().unwrap();
    let relay4: IpAddr = "198.51.100.3".parse().unwrap();
    let relay6: IpAddr = "2001:db8::3".parse().unwrap();
    let to_vip4 = PacketBuilder::tcp(CLIENT4, 40000, VIP4, 25, tcp::SYN).build();
    let to_vip6 = PacketBuilder::tcp(CLIENT6, 40000, VIP6, 25, tcp::SYN).build();
    let other4 = Ipv4Addr::new(198, 51, 100, 3);
    let other6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
    let to_other4 = PacketBuilder::tcp(CLIENT4, 40000, other4, 22, tcp::SYN).build();
    let to_other6 = PacketBuilder::tcp(CLIENT6, 40000, other6, 22, tcp::SYN).build();
    let spoofer4: IpAddr = "192.0.2.66".parse().unwrap();
    let spoofer6: IpAddr = "2001:db8:66::1".parse().unwrap();
    // (what, tunnel, counter, the inner packet when it is delivered)
    let cases = [
        (
            "v4 from an LB to the VIP",
            ipip(lb4, relay4, &to_vip4),
            "decapsulated",
            Some(&to_vip4),
        ),
        (
            "v6 from an LB to the VIP",
            ipip(lb6, relay6, &to_vip6),
            "decapsulated",
            Some(&to_vip6),
        ),
        (
            "6in4 from an LB",
            ipip(lb4, relay4, &to_vip6),
            "decapsulated",
            Some(&to_vip6),
        ),
        (
            "v4 from elsewhere",
            ipip(spoofer4, relay4, &to_vip4),
            "dropped_source",
            None,
        ),
        (
            "v6 from elsewhere",
            ipip(spoofer6, relay6, &to_vip6),
            "dropped_source",
            None,
        ),
        (
            "v4 from an LB to a non-VIP",
            ipip(lb4, relay4, &to_other4),
            "dropped_vip",
            None,
        ),
        (
            "v6 from an LB to a non-VIP",
            ipip(lb6, relay6, &to_other6),
            "dropped_vip",
            None,
        ),
    ];
    for (what, pkt, counter, inner) in cases {
        let before = decap_stats(&mut h);
        let out = h.run(programs::DECAP, &pkt);
        let after = decap_stats(&mut h);
        let delta = changed(&before.fields(), &after.fields());
        assert_eq!(delta, vec![(counter, 1)], "{what}");
        if let Some(inner) = inner {
            assert_eq!(out.verdict, Verdict::Pass, "{what}");
            assert_eq!(&out.output[14..], &inner[14..], "{what}: the inner packet");
        } else {
            assert_eq!(out.verdict, Verdict::Drop, "{what}");
        }
    }
}

#[test]
fn icmp_errors_quoting_a_flow_are_encapsulated_to_its_relay() {
    let (_lab, _lb_mac, relay_mac) = enter_lb();
    let mut h = XdpHarness::load();
    apply_config(
        h.ebpf_mut(),
        &config("ipip", "198.51.100.3", "2001:db8::3", ""),
    )
    .unwrap();
    allow_lbs(&mut h);
    for (src, dst, relay) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), "198.51.100.3"),
        (CLIENT6.into(), VIP6.into(), "2001:db8::3"),
    ] {
        let err = path_mtu_error(src, 40000, dst, 25);
        let out = h.run(programs::BALANCER, &err);
        assert_eq!(out.verdict, Verdict::Redirect, "{src}");
        let o = &out.output;
        assert_eq!(&o[0..6], &relay_mac);
        let relay: IpAddr = relay.parse().unwrap();
        if let IpAddr::V4(r) = relay {
            assert_eq!(o.len(), err.len() + 20);
            assert_eq!(o[23], 4, "IPIP");
            assert_eq!(&o[30..34], &r.octets());
            assert!(ipv4_checksum_ok(o, 14));
            assert_eq!(&o[34..], &err[14..], "the error, untouched, inside");
        } else if let IpAddr::V6(r) = relay {
            assert_eq!(o.len(), err.len() + 40);
            assert_eq!(o[20], 41, "IP6IP6");
            assert_eq!(&o[38..54], &r.octets());
            assert_eq!(&o[54..], &err[14..], "the error, untouched, inside");
        }
        let d = h.run(programs::DECAP, o);
        assert_eq!(d.verdict, Verdict::Pass);
        assert_eq!(
            &d.output[14..],
            &err[14..],
            "the relay's stack gets the error"
        );
    }
}

fn global_stats(h: &mut XdpHarness) -> GlobalStats {
    smtp_lb_user::dataplane::counters(h.ebpf_mut())
        .expect("counters")
        .global
}

/// Runs the balancer on `pkt`, with the counters it changed.
fn run_counted(
    h: &mut XdpHarness,
    pkt: &[u8],
) -> (smtp_lb_tests::xdp::Outcome, Vec<(&'static str, u64)>) {
    let before = global_stats(h);
    let out = h.run(programs::BALANCER, pkt);
    (out, changed(&before.fields(), &global_stats(h).fields()))
}

/// A client's TCP segment of `ip_len` bytes (IP header included) to the VIP,
/// IPv4 with DF set.
fn segment(src: IpAddr, dst: IpAddr, ip_len: usize) -> PacketBuilder {
    let hlen = if src.is_ipv4() { 20 } else { 40 };
    let mut b =
        PacketBuilder::tcp(src, 40000, dst, 25, tcp::ACK).payload(&vec![b'x'; ip_len - hlen - 20]);
    b.ipv4_frag = 0x4000;
    b
}

/// The ICMP error a router sends for `pkt` (as the fixture expects it, built
/// here independently of the program): from the VIP back to the client's MAC
/// and address, "fragmentation needed" / "packet too big" with `mtu`,
/// quoting the first 64 (IPv4) / 128 (IPv6) bytes of the IP packet; IPv4
/// header with TOS 0xc0 and id 0, as Linux sends ICMP errors.
fn too_big_reply(pkt: &[u8], l3: usize, vip: IpAddr, client: IpAddr, mtu: u32) -> Vec<u8> {
    let (kind, code, quote) = if vip.is_ipv4() {
        (3, 4, 64)
    } else {
        (2, 0, 128)
    };
    let mut b =
        icmp_error(vip, client, kind, code, mtu, &pkt[l3..l3 + quote]).macs(LB_MAC, CLIENT_MAC);
    if l3 == 18 {
        b = b.vlan(u16::from_be_bytes([pkt[14], pkt[15]]));
    }
    let mut want = b.build();
    if vip.is_ipv4() {
        want[l3 + 1] = 0xc0;
        want[l3 + 4..l3 + 6].copy_from_slice(&[0, 0]);
        want[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let csum = fold(ones_sum(&want[l3..l3 + 20]));
        want[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
    }
    want
}

#[test]
fn ipip_packets_over_the_route_mtu_are_answered_with_icmp_too_big() {
    let (lab, _lb_mac, relay_mac) = enter_lb();
    // The route to the relay carries 1400 bytes: 1380 inside IPIP, 1360
    // inside IP6IP6 ("lock": the FIB reports a route's own MTU only then).
    lab.sh(
        "lb",
        "ip route replace 198.51.100.3/32 dev eth0 mtu lock 1400 && \
         ip -6 route replace 2001:db8::3/128 dev eth0 mtu lock 1400",
    );
    let mut h = XdpHarness::load();
    apply_config(
        h.ebpf_mut(),
        &config("ipip", "198.51.100.3", "2001:db8::3", ""),
    )
    .unwrap();
    for (src, dst, fits) in [
        (IpAddr::V4(CLIENT4), IpAddr::V4(VIP4), 1380),
        (CLIENT6.into(), VIP6.into(), 1360),
    ] {
        // A tracked flow, then its segments: the largest that fits goes
        // through; one byte more comes back as the error, byte for byte.
        let syn = PacketBuilder::tcp(src, 40000, dst, 25, tcp::SYN).build();
        assert_eq!(h.run(programs::BALANCER, &syn).verdict, Verdict::Redirect);
        let pkt = segment(src, dst, fits).build();
        let (out, delta) = run_counted(&mut h, &pkt);
        assert_eq!(out.verdict, Verdict::Redirect, "{src}: {fits} bytes fit");
        assert_eq!(&out.output[0..6], &relay_mac);
        assert_eq!(delta, vec![("redirect", 1)], "{src}");

        for vlan in [None, Some(7)] {
            let mut b = segment(src, dst, fits + 1);
            if let Some(id) = vlan {
                b = b.vlan(id);
            }
            let pkt = b.build();
            let l3 = if vlan.is_some() { 18 } else { 14 };
            let (out, delta) = run_counted(&mut h, &pkt);
            assert_eq!(
                out.verdict,
                Verdict::Tx,
                "{src} {vlan:?}: back to the client"
            );
            let want = too_big_reply(&pkt, l3, dst, src, fits as u32);
            assert_eq!(
                out.output, want,
                "{src} {vlan:?}: the ICMP error, byte for byte"
            );
            if src.is_ipv4() {
                assert!(ipv4_checksum_ok(&out.output, l3));
            }
            assert_eq!(delta, vec![("tx_too_big", 1)], "{src} {vlan:?}");
        }
    }

    // IPv4 without DF may be fragmented, which XDP cannot do: a counted
    // drop, never an ICMP that the sender did not ask for.
    let mut b = segment(CLIENT4.into(), VIP4.into(), 1381);
    b.ipv4_frag = 0;
    let (out, delta) = run_counted(&mut h, &b.build());
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(delta, vec![("drop_too_big", 1)]);

    // An ICMP error about a flow, too big for the tunnel: never answered
    // with another error (RFC 1122), dropped and counted.
    let reply = PacketBuilder::tcp(VIP4, 25, CLIENT4, 40000, tcp::ACK)
        .payload(&[b'x'; 1400])
        .build();
    let err = icmp_error(
        Ipv4Addr::new(192, 0, 2, 254).into(),
        VIP4.into(),
        3,
        4,
        1280,
        &reply[14..14 + 1381 - 28],
    )
    .build();
    assert_eq!(err.len(), 14 + 1381);
    let (out, delta) = run_counted(&mut h, &err);
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(delta, vec![("drop_too_big", 1), ("icmp_to_flow", 1)]);

    // A route that leaves less than IPv6's minimum MTU inside the tunnel:
    // no client could obey the error, so none is sent.
    lab.sh(
        "lb",
        "ip -6 route replace 2001:db8::3/128 dev eth0 mtu lock 1300",
    );
    let (out, delta) = run_counted(&mut h, &segment(CLIENT6.into(), VIP6.into(), 1300).build());
    assert_eq!(out.verdict, Verdict::Drop);
    assert_eq!(delta, vec![("drop_too_big", 1)]);
}
