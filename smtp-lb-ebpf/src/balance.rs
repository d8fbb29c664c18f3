//! The balancer's packet path: parse, find the service, choose the backend,
//! forward, count. Every packet ends in exactly one terminal counter of
//! [`smtp_lb_common::GlobalStats`] (a `pass_*`, a `drop_*`, `tx` or `redirect`).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use smtp_lb_common::{
    AF_INET, AF_INET6, FlowKey, MODE_IPIP, PROTO_TCP, SERVICE_STICKY, encap_hash, flow_hash,
};

use crate::{
    admission,
    counters::Stats,
    forward::{self, Inner},
    icmp,
    parse::{
        ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN,
        Ipv4Hdr, Ipv6Hdr, TCP_ACK, TCP_FIN, TCP_HLEN, TCP_RST, TCP_SYN, TcpHdr, ethernet,
        is_ipv6_ext, ptr_at, read, tcp_dport,
    },
    select::{self, Choice, Lookup, ServiceRef},
    too_big,
};

/// Runs the balancer on one packet.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(mut stats) = Stats::this_cpu() else {
        return xdp_action::XDP_PASS;
    };
    let stats = &mut stats;
    let Some((l3, ether_type)) = ethernet(ctx) else {
        stats.pass_truncated += 1;
        return xdp_action::XDP_PASS;
    };
    match ether_type {
        ETH_P_IP => ipv4(ctx, l3, stats),
        ETH_P_IPV6 => ipv6(ctx, l3, stats),
        _ => {
            stats.pass_non_ip += 1;
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
pub fn pass_truncated(stats: &mut Stats) -> u32 {
    stats.pass_truncated += 1;
    xdp_action::XDP_PASS
}

#[inline(always)]
pub fn pass_non_vip(stats: &mut Stats) -> u32 {
    stats.pass_non_vip += 1;
    xdp_action::XDP_PASS
}

/// What the program refuses, by reason.
#[derive(Clone, Copy)]
pub enum Refuse {
    Ipv4Options,
    Fragment,
    Ipv6Ext,
    Malformed,
}

/// Drops a packet the balancer refuses, counted by reason.
#[inline(always)]
pub fn drop(stats: &mut Stats, why: Refuse) -> u32 {
    match why {
        Refuse::Ipv4Options => stats.drop_ipv4_options += 1,
        Refuse::Fragment => stats.drop_fragment += 1,
        Refuse::Ipv6Ext => stats.drop_ipv6_ext += 1,
        Refuse::Malformed => stats.drop_malformed += 1,
    }
    xdp_action::XDP_DROP
}

/// A packet the fast path cannot take (no ports to look the service up by):
/// dropped when its destination is a VIP address, passed otherwise.
#[inline(always)]
fn slow_path(dst: [u32; 4], family: u8, why: Refuse, stats: &mut Stats) -> u32 {
    if select::is_vip_addr(&select::vip_marker(dst, family)) {
        drop(stats, why)
    } else {
        pass_non_vip(stats)
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize, stats: &mut Stats) -> u32 {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return pass_truncated(stats);
    };
    // SAFETY: bounds checked by ptr_at.
    let (proto, ver_ihl, frag_off) = unsafe { ((*ip).proto, (*ip).ver_ihl, (*ip).frag_off) };
    // The common case first, tested on three fields: plain TCP (no options,
    // not a fragment), whose port decides before anything else is read.
    if proto == IPPROTO_TCP && ver_ihl == 0x45 && frag_off & FRAGMENT_BITS == 0 {
        return ipv4_tcp(ctx, l3, stats);
    }
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { ip.read() };
    if proto != IPPROTO_TCP {
        if proto == IPPROTO_ICMP && ver_ihl == 0x45 && frag_off & FRAGMENT_BITS == 0 {
            return icmp::v4(ctx, l3, &ip, stats);
        }
        return pass_non_vip(stats);
    }
    let dst = [ip.dst, 0, 0, 0];
    let why = if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        Refuse::Malformed
    } else if ver_ihl != 0x45 {
        Refuse::Ipv4Options
    } else {
        // MF flag or a fragment offset: a fragment (the first one has ports
        // but the rest do not, so none of them can be balanced consistently).
        Refuse::Fragment
    };
    slow_path(dst, AF_INET, why, stats)
}

/// MF and the fragment offset of `frag_off`, as it sits in the packet
/// (network order): nonzero for any fragment.
const FRAGMENT_BITS: u16 = 0x3fffu16.to_be();

#[inline(always)]
fn ipv4_tcp(ctx: &XdpContext, l3: usize, stats: &mut Stats) -> u32 {
    let l4 = l3 + IPV4_HLEN;
    let Some(dport) = tcp_dport(ctx, l4) else {
        return pass_truncated(stats);
    };
    let Some(port_hint) = select::vip_port(dport) else {
        return pass_non_vip(stats);
    };
    // Read only now, past the port filter: what other traffic never needs
    // (see `tcp_dport`). The bounds are the ones checked above.
    let (Some(ip), Some(tcp)) = (read::<Ipv4Hdr>(ctx, l3), read::<TcpHdr>(ctx, l4)) else {
        return pass_truncated(stats);
    };
    let key = FlowKey {
        src: [ip.src, 0, 0, 0],
        dst: [ip.dst, 0, 0, 0],
        sport: tcp.sport,
        dport: tcp.dport,
        proto: PROTO_TCP,
        family: AF_INET,
        _pad: [0; 2],
    };
    // The flow's entry first: it names the service's slot.
    let lookup = Lookup::new(&key, is_syn(&tcp));
    let hint = lookup.service_slot().unwrap_or(port_hint);
    let Some(svc) = select::service(&key, hint) else {
        return pass_non_vip(stats);
    };
    let ip_len = u16::from_be(ip.tot_len);
    let frame_ip_len = ctx.data_end() - ctx.data() - l3;
    if usize::from(ip_len) < IPV4_HLEN + TCP_HLEN || usize::from(ip_len) > frame_ip_len {
        return drop(stats, Refuse::Malformed);
    }
    let inner = Inner {
        l3,
        ip_len,
        tos: ip.tos,
        answer_too_big: u16::from_be(ip.frag_off) & too_big::IP_DF != 0,
    };
    balance(ctx, &key, lookup, svc, &tcp, &inner, stats)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize, stats: &mut Stats) -> u32 {
    let Some(ip) = read::<Ipv6Hdr>(ctx, l3) else {
        return pass_truncated(stats);
    };
    if ip.next_header != IPPROTO_TCP {
        if ip.next_header == IPPROTO_ICMPV6 {
            return icmp::v6(ctx, l3, &ip, stats);
        }
        if is_ipv6_ext(ip.next_header) {
            return slow_path(ip.dst, AF_INET6, Refuse::Ipv6Ext, stats);
        }
        return pass_non_vip(stats);
    }
    let l4 = l3 + IPV6_HLEN;
    let Some(dport) = tcp_dport(ctx, l4) else {
        return pass_truncated(stats);
    };
    let Some(port_hint) = select::vip_port(dport) else {
        return pass_non_vip(stats);
    };
    let Some(tcp) = read::<TcpHdr>(ctx, l4) else {
        return pass_truncated(stats);
    };
    let key = FlowKey {
        src: ip.src,
        dst: ip.dst,
        sport: tcp.sport,
        dport: tcp.dport,
        proto: PROTO_TCP,
        family: AF_INET6,
        _pad: [0; 2],
    };
    // The flow's entry first: it names the service's slot.
    let lookup = Lookup::new(&key, is_syn(&tcp));
    let hint = lookup.service_slot().unwrap_or(port_hint);
    let Some(svc) = select::service(&key, hint) else {
        return pass_non_vip(stats);
    };
    let payload = u16::from_be(ip.payload_len);
    let frame_ip_len = ctx.data_end() - ctx.data() - l3;
    if ip.ver_tc_flow.to_ne_bytes()[0] >> 4 != 6
        || usize::from(payload) < TCP_HLEN
        || usize::from(payload) + IPV6_HLEN > frame_ip_len
    {
        return drop(stats, Refuse::Malformed);
    }
    let tc = (u32::from_be(ip.ver_tc_flow) >> 20) as u8;
    let inner = Inner {
        l3,
        ip_len: payload + IPV6_HLEN as u16,
        tos: tc,
        answer_too_big: true,
    };
    balance(ctx, &key, lookup, svc, &tcp, &inner, stats)
}

/// The service is known: choose the backend, count, forward.
#[inline(always)]
fn balance(
    ctx: &XdpContext,
    key: &FlowKey,
    lookup: Lookup,
    (svc, slot): (ServiceRef, u32),
    tcp: &TcpHdr,
    inner: &Inner,
    stats: &mut Stats,
) -> u32 {
    if tcp.doff >> 4 < 5 {
        return drop(stats, Refuse::Malformed);
    }
    let syn = is_syn(tcp);
    if syn && admission::refuses(key, &svc) {
        stats.drop_admission += 1;
        return xdp_action::XDP_DROP;
    }
    let closing = tcp.flags & (TCP_FIN | TCP_RST) != 0;
    let choice = select::choose(key, lookup, (&svc, slot), syn, closing, stats);
    send(ctx, choice, key, &svc, inner, syn, stats)
}

/// A SYN without ACK: a new flow.
#[inline(always)]
fn is_syn(tcp: &TcpHdr) -> bool {
    tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Counts the packet for its service and backend and forwards it there
/// (`None`: no backend can take it, a counted drop).
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    choice: Option<Choice>,
    key: &FlowKey,
    svc: &ServiceRef,
    inner: &Inner,
    new_flow: bool,
    stats: &mut Stats,
) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let Some(choice) = choice else {
        stats.drop_no_backend += 1;
        stats.service(svc.id).no_backend += 1;
        return xdp_action::XDP_DROP;
    };
    let new_flow = u64::from(new_flow);
    let s = stats.service(svc.id);
    s.packets += 1;
    s.bytes += bytes;
    s.new_flows += new_flow;
    let b = stats.backend(choice.id);
    b.packets += 1;
    b.bytes += bytes;
    b.new_flows += new_flow;
    if choice.backend.mode == MODE_IPIP {
        // The outer source carries a hash of the flow (RSS entropy at the relay).
        let hash = encap_hash(flow_hash(key, svc.flags & SERVICE_STICKY != 0));
        forward::encap(ctx, choice.backend, inner, hash, stats)
    } else {
        forward::l2(ctx, choice.backend, stats)
    }
}
