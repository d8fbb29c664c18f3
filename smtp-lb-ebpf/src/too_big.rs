//! Packets the tunnel cannot carry. IPIP / IP6IP6 add 20 / 40 bytes; a
//! client packet that fits its own path but not the route to the relay once
//! encapsulated would vanish (`XDP_TX` of an oversized frame is dropped by
//! the driver), and the client would retransmit it forever: a path-MTU black
//! hole. A router answers such a packet with ICMP, so the balancer does too,
//! as Katran does: the packet itself becomes the error, in place, and goes
//! back out the interface it came in on (`XDP_TX`).
//!
//! ```text
//! in:  [eth][IP client → VIP][TCP …]                        (ip_len > MTU − tunnel header)
//! out: [eth swapped][IP VIP → client][ICMP too big, MTU][quote: first bytes of the packet]
//! ```
//!
//! The error comes from the VIP (the address the client sent to), with the
//! MTU the tunnel leaves. Only TCP with DF (IPv6: always) is answered; an
//! ICMP error is never answered with one (RFC 1122 §3.2.2), and IPv4
//! without DF would need fragmenting, which XDP cannot do: those are
//! dropped and counted. Each answer is smaller than the packet it answers,
//! so a spoofed flood reflects less than it sends.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use crate::{
    counters::Stats,
    csum,
    forward::Inner,
    parse::{
        ETH_HLEN, ETH_P_IPV6, EthHdr, ICMP_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HLEN,
        IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, VLAN_HLEN, ptr_at, ptr_at_mut, read,
    },
};

/// Bytes of the offending packet quoted after the ICMP header: its IP header
/// and what follows (the TCP header and then some), enough for the client's
/// stack (and stateful firewalls on the way) to match the error to its socket.
pub const QUOTE_V4: usize = 64;
pub const QUOTE_V6: usize = 128;
/// ICMP "destination unreachable", code "fragmentation needed".
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// `ICMPv6` "packet too big".
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// Smallest MTU each family allows (RFC 791, RFC 8200): a route that leaves
/// less inside the tunnel cannot be fixed by the client.
const MIN_MTU_V4: u16 = 68;
const MIN_MTU_V6: u16 = 1280;
/// IPv4 DF flag in `frag_off`, host order.
pub const IP_DF: u16 = 0x4000;
/// TOS of ICMP errors (precedence "internetwork control"), as Linux sends them.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;

/// Answers the packet described by `inner`, which would exceed the route's
/// MTU once encapsulated; `mtu` is what the route leaves inside the tunnel.
#[inline(always)]
pub fn answer(ctx: &XdpContext, inner: &Inner, mtu: u16, stats: &mut Stats) -> u32 {
    let ipv6 = read::<u16>(ctx, inner.l3 - 2) == Some(ETH_P_IPV6.to_be());
    let built = if !inner.answer_too_big {
        None
    } else if ipv6 {
        v6(ctx, inner, mtu)
    } else {
        v4(ctx, inner, mtu)
    };
    if built.is_none() {
        stats.drop_too_big += 1;
        return xdp_action::XDP_DROP;
    }
    stats.tx_too_big += 1;
    xdp_action::XDP_TX
}

/// Makes room for `hlen` bytes of new headers between the L2 header and the
/// packet, of which the first `quote` bytes are kept: after this the frame is
/// `[L2][hlen bytes to fill][quote]`, its MACs swapped (back where it came from).
#[inline(always)]
fn reshape(ctx: &XdpContext, l3: usize, hlen: usize, quote: usize) -> Option<()> {
    let len = ctx.data_end() - ctx.data();
    let keep = l3 + quote;
    if len < keep {
        return None;
    }
    // SAFETY: helper calls on our own context; the tail shrinks by less than
    // the packet, the head grows into the headroom XDP guarantees (256).
    unsafe {
        if bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) != 0
            || bpf_xdp_adjust_head(ctx.ctx, -(hlen as i32)) != 0
        {
            return None;
        }
    }
    let old: EthHdr = read(ctx, hlen)?;
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked.
    unsafe {
        (*eth).dst = old.src;
        (*eth).src = old.dst;
        (*eth).proto = old.proto;
    }
    if l3 == ETH_HLEN + VLAN_HLEN {
        let tag: [u8; 4] = read(ctx, hlen + ETH_HLEN)?;
        let t = ptr_at_mut::<[u8; 4]>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked.
        unsafe { *t = tag };
    }
    Some(())
}

/// Adds the `N` 32-bit words at `offset` to a one's-complement sum (words as
/// they sit in the packet: the sum is byte-order independent, RFC 1071).
#[inline(always)]
fn sum_words<const N: usize>(ctx: &XdpContext, offset: usize, mut sum: u64) -> Option<u64> {
    let p = ptr_at::<[u32; N]>(ctx, offset)?;
    let mut i = 0;
    while i < N {
        // SAFETY: bounds checked for all N words.
        sum += u64::from(unsafe { (*p)[i] });
        i += 1;
    }
    Some(sum)
}

#[inline(always)]
fn v4(ctx: &XdpContext, inner: &Inner, mtu: u16) -> Option<()> {
    let l3 = inner.l3;
    if mtu < MIN_MTU_V4 || usize::from(inner.ip_len) < QUOTE_V4 {
        return None;
    }
    let hlen = IPV4_HLEN + ICMP_HLEN;
    reshape(ctx, l3, hlen, QUOTE_V4)?;
    let quoted: Ipv4Hdr = read(ctx, l3 + hlen)?;
    let tot_len = (hlen + QUOTE_V4) as u16;
    let ip = Ipv4Hdr::new(
        TOS_INTERNETWORK_CONTROL,
        tot_len,
        IPPROTO_ICMP,
        quoted.dst,
        quoted.src,
    );
    // Type, code, checksum 0, then "unused" and the next-hop MTU (RFC 1191).
    let mut icmp = [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, 0, 0];
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    let sum = sum_words::<{ QUOTE_V4 / 4 }>(ctx, l3 + hlen, header_sum(&icmp))?;
    icmp[2..4].copy_from_slice(&csum::fold64(sum).to_ne_bytes());
    let p = ptr_at_mut::<Ipv4Hdr>(ctx, l3)?;
    let q = ptr_at_mut::<[u8; ICMP_HLEN]>(ctx, l3 + IPV4_HLEN)?;
    // SAFETY: bounds checked.
    unsafe {
        p.write(ip);
        q.write(icmp);
    }
    Some(())
}

#[inline(always)]
fn v6(ctx: &XdpContext, inner: &Inner, mtu: u16) -> Option<()> {
    let l3 = inner.l3;
    if mtu < MIN_MTU_V6 || usize::from(inner.ip_len) < QUOTE_V6 {
        return None;
    }
    let hlen = IPV6_HLEN + ICMP_HLEN;
    reshape(ctx, l3, hlen, QUOTE_V6)?;
    let quoted: Ipv6Hdr = read(ctx, l3 + hlen)?;
    let payload = (ICMP_HLEN + QUOTE_V6) as u16;
    let ip = Ipv6Hdr {
        ver_tc_flow: (6u32 << 28).to_be(),
        payload_len: payload.to_be(),
        next_header: IPPROTO_ICMPV6,
        hop_limit: 64,
        src: quoted.dst,
        dst: quoted.src,
    };
    // Type, code, checksum 0, then the MTU (RFC 4443 §3.2).
    let mut icmp = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 0, 0];
    icmp[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
    // The pseudo-header: both addresses, the upper-layer length, next header.
    let mut sum = header_sum(&icmp);
    let mut i = 0;
    while i < 4 {
        sum += u64::from(ip.src[i]) + u64::from(ip.dst[i]);
        i += 1;
    }
    sum += u64::from(u32::from(payload).to_be()) + u64::from(u32::from(IPPROTO_ICMPV6).to_be());
    let sum = sum_words::<{ QUOTE_V6 / 4 }>(ctx, l3 + hlen, sum)?;
    icmp[2..4].copy_from_slice(&csum::fold64(sum).to_ne_bytes());
    let p = ptr_at_mut::<Ipv6Hdr>(ctx, l3)?;
    let q = ptr_at_mut::<[u8; ICMP_HLEN]>(ctx, l3 + IPV6_HLEN)?;
    // SAFETY: bounds checked.
    unsafe {
        p.write(ip);
        q.write(icmp);
    }
    Some(())
}

/// The sum of an 8-byte ICMP header's two words, as they will sit in the packet.
#[inline(always)]
fn header_sum(h: &[u8; ICMP_HLEN]) -> u64 {
    u64::from(u32::from_ne_bytes([h[0], h[1], h[2], h[3]]))
        + u64::from(u32::from_ne_bytes([h[4], h[5], h[6], h[7]]))
}
