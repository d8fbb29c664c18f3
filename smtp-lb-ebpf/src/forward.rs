//! Sending a packet to its backend, both direct server return: L2 (rewrite
//! MACs) or IPIP / IP6IP6 (push an outer header, next hop from the FIB).
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use smtp_lb_common::{AF_INET, AF_INET6, Backend, LbConfig};

use crate::{
    counters::Stats,
    maps::{LB_CONFIG, TX_PORTS},
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN,
        Ipv4Hdr, Ipv6Hdr, VLAN_HLEN, ptr_at_mut, read,
    },
    too_big,
};

/// `bpf_fib_lookup` return codes (include/uapi/linux/bpf.h).
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED`: over the route's MTU (in `mtu_result`).
const FIB_FRAG_NEEDED: i64 = 8;

/// L2 DSR: the frame keeps its IP packet; the destination MAC becomes the
/// relay's and the source the LB's. Out the same interface with `XDP_TX`,
/// or through the devmap when the backend sits behind another interface.
#[inline(always)]
pub fn l2(ctx: &XdpContext, b: &Backend, stats: &mut Stats) -> u32 {
    // The two MACs as six 16-bit words: word moves, not byte moves.
    let Some(eth) = ptr_at_mut::<[u16; 6]>(ctx, 0) else {
        stats.pass_truncated += 1;
        return xdp_action::XDP_PASS;
    };
    let words = |m: &[u8; 6]| {
        [
            u16::from_ne_bytes([m[0], m[1]]),
            u16::from_ne_bytes([m[2], m[3]]),
            u16::from_ne_bytes([m[4], m[5]]),
        ]
    };
    let dst = words(&b.mac);
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        let e = &mut *eth;
        if b.src_mac == [0; 6] {
            // One-arm: the LB's own MAC, which the frame was addressed to.
            e[3] = e[0];
            e[4] = e[1];
            e[5] = e[2];
        } else {
            let src = words(&b.src_mac);
            e[3] = src[0];
            e[4] = src[1];
            e[5] = src[2];
        }
        e[0] = dst[0];
        e[1] = dst[1];
        e[2] = dst[2];
    }
    if b.ifindex != 0 && b.ifindex != ctx.ingress_ifindex() as u32 {
        return match TX_PORTS.redirect(b.ifindex, 0) {
            Ok(action) => {
                stats.redirect += 1;
                action
            }
            Err(_) => {
                stats.drop_encap += 1;
                xdp_action::XDP_DROP
            }
        };
    }
    stats.tx += 1;
    xdp_action::XDP_TX
}

/// What the encapsulation needs to know about the inner packet.
pub struct Inner {
    /// Where the IP header starts (14, or 18 behind a VLAN tag).
    pub l3: usize,
    /// Its length in bytes (IPv4 total length; IPv6 40 + payload length).
    pub ip_len: u16,
    /// IPv4 TOS / IPv6 traffic class, carried to the outer header.
    pub tos: u8,
    /// Whether an ICMP error may answer it when it is too big for the
    /// tunnel: TCP with DF set (IPv6: always), never an ICMP error itself.
    pub answer_too_big: bool,
}

/// IPIP (IPv4 backend) or IP6IP6 (IPv6 backend) to the relay's address,
/// whose own decap program strips the outer header. The outer source carries
/// the flow hash so the relay's NIC spreads flows over its queues (RSS).
///
/// The route to the relay is looked up before anything is written: a packet
/// that would exceed its MTU once encapsulated is answered with ICMP
/// ([`too_big`]), as a router on the path would, instead of vanishing.
#[inline(always)]
pub fn encap(ctx: &XdpContext, b: &Backend, inner: &Inner, hash: u32, stats: &mut Stats) -> u32 {
    let cfg = LB_CONFIG.get(0).copied().unwrap_or_default();
    let outer = if b.family == AF_INET {
        outer_ipv4(b, inner, hash, &cfg)
    } else if b.family == AF_INET6 {
        outer_ipv6(b, inner, hash, &cfg)
    } else {
        None
    };
    let Some(outer) = outer else {
        stats.drop_encap += 1;
        return xdp_action::XDP_DROP;
    };
    let mut fib = fib_lookup(ctx, &outer);
    if fib.rc == FIB_FRAG_NEEDED {
        // SAFETY: the kernel wrote the route's MTU into the union's output member.
        let mtu = unsafe { fib.params.__bindgen_anon_1.mtu_result };
        return too_big::answer(ctx, inner, mtu.saturating_sub(outer.hlen), stats);
    }
    if fib.rc != FIB_SUCCESS && fib.rc != FIB_NO_NEIGH {
        stats.drop_encap += 1;
        return xdp_action::XDP_DROP;
    }
    if push(ctx, inner, &outer).is_none() {
        stats.drop_encap += 1;
        return xdp_action::XDP_DROP;
    }
    if fib.rc == FIB_NO_NEIGH {
        // The stack resolves the neighbour and forwards the packet.
        stats.pass_no_neigh += 1;
        return xdp_action::XDP_PASS;
    }
    next_hop(ctx, &mut fib.params, stats)
}

/// The outer header to push: family, addresses, its own and the total length.
pub struct Outer {
    family: u8,
    src: [u32; 4],
    dst: [u32; 4],
    tot_len: u16,
    /// The outer header's length: what the tunnel takes from the route's MTU.
    hlen: u16,
}

#[inline(always)]
fn outer_ipv4(b: &Backend, inner: &Inner, hash: u32, cfg: &LbConfig) -> Option<Outer> {
    let tot_len = inner.ip_len.checked_add(IPV4_HLEN as u16)?;
    let src = ((u32::from_be(cfg.encap_src_v4) & 0xffff_0000) | (hash & 0xffff)).to_be();
    Some(Outer {
        family: AF_INET,
        src: [src, 0, 0, 0],
        dst: b.addr,
        tot_len,
        hlen: IPV4_HLEN as u16,
    })
}

#[inline(always)]
fn outer_ipv6(b: &Backend, inner: &Inner, hash: u32, cfg: &LbConfig) -> Option<Outer> {
    let mut src = cfg.encap_src_v6;
    src[3] = hash.to_be();
    Some(Outer {
        family: AF_INET6,
        src,
        dst: b.addr,
        tot_len: inner.ip_len.checked_add(IPV6_HLEN as u16)?,
        hlen: IPV6_HLEN as u16,
    })
}

/// Moves the L2 header (with its VLAN tag, if any) `grow` bytes towards the
/// new packet start, after the head has grown by `grow`.
#[inline(always)]
fn grow_head(ctx: &XdpContext, l3: usize, grow: usize, ether_type: u16) -> Option<()> {
    // SAFETY: a helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let old: EthHdr = read(ctx, grow)?;
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    if l3 == ETH_HLEN + VLAN_HLEN {
        let tag: [u8; 4] = read(ctx, grow + ETH_HLEN)?;
        let new_tag = ptr_at_mut::<[u8; 4]>(ctx, ETH_HLEN)?;
        let inner_type = ptr_at_mut::<u16>(ctx, ETH_HLEN + 2)?;
        // SAFETY: all three pointers were bounds checked.
        unsafe {
            *eth = old;
            *new_tag = tag;
            (*inner_type) = ether_type.to_be();
        }
    } else {
        // SAFETY: bounds checked.
        unsafe {
            *eth = old;
            (*eth).proto = ether_type.to_be();
        }
    }
    Some(())
}

/// Grows the head and writes the outer header `o` in front of the inner packet.
#[inline(always)]
fn push(ctx: &XdpContext, inner: &Inner, o: &Outer) -> Option<()> {
    let l3 = inner.l3;
    if o.family == AF_INET {
        grow_head(ctx, l3, IPV4_HLEN, ETH_P_IP)?;
        let hdr = Ipv4Hdr::new(inner.tos, o.tot_len, IPPROTO_IPIP, o.src[0], o.dst[0]);
        let p = ptr_at_mut::<Ipv4Hdr>(ctx, l3)?;
        // SAFETY: bounds checked.
        unsafe { p.write(hdr) };
    } else {
        grow_head(ctx, l3, IPV6_HLEN, ETH_P_IPV6)?;
        let hdr = Ipv6Hdr {
            // Version 6, the inner traffic class, the flow hash as flow label.
            ver_tc_flow: ((6 << 28)
                | (u32::from(inner.tos) << 20)
                | (u32::from_be(o.src[3]) & 0x000f_ffff))
                .to_be(),
            payload_len: inner.ip_len.to_be(),
            next_header: IPPROTO_IPV6,
            hop_limit: 64,
            src: o.src,
            dst: o.dst,
        };
        let p = ptr_at_mut::<Ipv6Hdr>(ctx, l3)?;
        // SAFETY: bounds checked.
        unsafe { p.write(hdr) };
    }
    Some(())
}

/// A FIB lookup's parameters (its result written back in) and return code.
struct Fib {
    params: FibParams,
    rc: i64,
}

/// The route to the outer destination, with the kernel's MTU check: the
/// outer packet's length is given, so an oversized one is `FIB_FRAG_NEEDED`.
#[inline(always)]
fn fib_lookup(ctx: &XdpContext, outer: &Outer) -> Fib {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = outer.family;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_1.tot_len = outer.tot_len;
    if outer.family == AF_INET {
        p.__bindgen_anon_3.ipv4_src = outer.src[0];
        p.__bindgen_anon_4.ipv4_dst = outer.dst[0];
    } else {
        p.__bindgen_anon_3.ipv6_src = outer.src;
        p.__bindgen_anon_4.ipv6_dst = outer.dst;
    }
    // SAFETY: helper call with a valid params struct of the right size.
    let rc =
        unsafe { bpf_fib_lookup(ctx.ctx.cast(), &raw mut p, size_of::<FibParams>() as i32, 0) };
    Fib { params: p, rc }
}

/// Fills the MACs from the FIB result and sends: `XDP_TX` when the next hop
/// is out the interface the packet came in on, else a redirect.
#[inline(always)]
fn next_hop(ctx: &XdpContext, p: &mut FibParams, stats: &mut Stats) -> u32 {
    let Some(eth) = ptr_at_mut::<EthHdr>(ctx, 0) else {
        stats.drop_encap += 1;
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds checked.
    unsafe {
        (*eth).src = p.smac;
        (*eth).dst = p.dmac;
    }
    if p.ifindex == ctx.ingress_ifindex() as u32 {
        stats.tx += 1;
        return xdp_action::XDP_TX;
    }
    stats.redirect += 1;
    // SAFETY: helper call.
    unsafe { bpf_redirect(p.ifindex, 0) as u32 }
}
