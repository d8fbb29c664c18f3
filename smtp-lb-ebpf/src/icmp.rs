//! ICMP errors about balanced flows. With direct server return the relay's
//! packets leave from the VIP, so a router that cannot forward one (needs
//! fragmentation, packet too big, unreachable) answers the VIP — and the VIP
//! routes to the balancer, not to the relay whose socket needs to hear it.
//! The error quotes the relay's packet (VIP:port → client:port); swapped,
//! that is the flow's key, and the error goes to the relay that owns the
//! flow, like the flow's own packets (L2 or IPIP). Path-MTU discovery then
//! works through the balancer instead of black-holing large replies.
use aya_ebpf::programs::XdpContext;
use smtp_lb_common::{AF_INET, AF_INET6, FlowKey, PROTO_TCP};

use crate::{
    balance::{self, Refuse},
    counters::Stats,
    forward::Inner,
    parse::{ICMP_HLEN, IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, read},
    select,
};

/// ICMP destination unreachable (fragmentation needed is its code 4).
const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv6 destination unreachable and packet too big.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// An ICMPv4 packet (outer header without options, not a fragment).
#[inline(always)]
pub fn v4(ctx: &XdpContext, l3: usize, ip: &Ipv4Hdr, stats: &mut Stats) -> u32 {
    let at = l3 + IPV4_HLEN;
    let Some(kind) = read::<u8>(ctx, at) else {
        return balance::pass_truncated(stats);
    };
    if kind != ICMP_DEST_UNREACH {
        return balance::pass_non_vip(stats);
    }
    let Some(quoted) = read::<Ipv4Hdr>(ctx, at + ICMP_HLEN) else {
        return balance::pass_truncated(stats);
    };
    if quoted.ver_ihl != 0x45 || quoted.proto != IPPROTO_TCP {
        return balance::pass_non_vip(stats);
    }
    // RFC 792: the error carries the first 8 bytes of the quoted datagram's data.
    let Some(ports) = read::<[u16; 2]>(ctx, at + ICMP_HLEN + IPV4_HLEN) else {
        return balance::pass_truncated(stats);
    };
    let key = FlowKey {
        src: [quoted.dst, 0, 0, 0],
        dst: [quoted.src, 0, 0, 0],
        sport: ports[1],
        dport: ports[0],
        proto: PROTO_TCP,
        family: AF_INET,
        _pad: [0; 2],
    };
    let ip_len = u16::from_be(ip.tot_len);
    let min = IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + 8;
    to_owner(ctx, &key, l3, ip_len, ip.tos, min, stats)
}

/// An ICMPv6 packet.
#[inline(always)]
pub fn v6(ctx: &XdpContext, l3: usize, ip: &Ipv6Hdr, stats: &mut Stats) -> u32 {
    let at = l3 + IPV6_HLEN;
    let Some(kind) = read::<u8>(ctx, at) else {
        return balance::pass_truncated(stats);
    };
    if kind != ICMPV6_PACKET_TOO_BIG && kind != ICMPV6_DEST_UNREACH {
        return balance::pass_non_vip(stats);
    }
    let Some(quoted) = read::<Ipv6Hdr>(ctx, at + ICMP_HLEN) else {
        return balance::pass_truncated(stats);
    };
    if quoted.next_header != IPPROTO_TCP {
        return balance::pass_non_vip(stats);
    }
    let Some(ports) = read::<[u16; 2]>(ctx, at + ICMP_HLEN + IPV6_HLEN) else {
        return balance::pass_truncated(stats);
    };
    let key = FlowKey {
        src: quoted.dst,
        dst: quoted.src,
        sport: ports[1],
        dport: ports[0],
        proto: PROTO_TCP,
        family: AF_INET6,
        _pad: [0; 2],
    };
    let ip_len = u16::from_be(ip.payload_len).wrapping_add(IPV6_HLEN as u16);
    let tc = (u32::from_be(ip.ver_tc_flow) >> 20) as u8;
    let min = IPV6_HLEN + ICMP_HLEN + IPV6_HLEN + 8;
    to_owner(ctx, &key, l3, ip_len, tc, min, stats)
}

/// Sends the error to the relay that owns flow `key`, when `key` is a flow
/// of some service; otherwise it is the node's own and passes.
#[inline(always)]
fn to_owner(
    ctx: &XdpContext,
    key: &FlowKey,
    l3: usize,
    ip_len: u16,
    tos: u8,
    min_len: usize,
    stats: &mut Stats,
) -> u32 {
    let Some(port_hint) = select::vip_port(key.dport) else {
        return balance::pass_non_vip(stats);
    };
    let Some((svc, _)) = select::service(key, port_hint) else {
        return balance::pass_non_vip(stats);
    };
    // The length the header claims: at least what was read, at most the frame.
    let frame_ip_len = ctx.data_end() - ctx.data() - l3;
    if usize::from(ip_len) < min_len || usize::from(ip_len) > frame_ip_len {
        return balance::drop(stats, Refuse::Malformed);
    }
    stats.icmp_to_flow += 1;
    let choice = select::owner(key, &svc, stats);
    // An ICMP error is never answered with one (RFC 1122 §3.2.2).
    let inner = Inner {
        l3,
        ip_len,
        tos,
        answer_too_big: false,
    };
    balance::send(ctx, choice, key, &svc, &inner, false, stats)
}
