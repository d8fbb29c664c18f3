//! The relay side: strips the IPIP / IP6IP6 outer header the balancer pushed,
//! so the relay's stack sees the client's packet to the VIP (held on `lo`).
//! This kernel has no ipip/ip6tnl modules, and with this program a relay
//! needs none; like Katran's decap, it runs before the stack.
//!
//! A tunnel is a way past the relay's filters with any inner source, so only
//! tunnels from the LB nodes' encapsulation sources to a VIP are opened
//! (`DECAP_ALLOW`); every other encapsulated packet is dropped and counted.
use aya_ebpf::{
    bindings::xdp_action, btf_maps::lpm_trie::Key, helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use smtp_lb_common::{
    AF_INET, AF_INET6, DECAP_LIST_SOURCE, DECAP_LIST_VIP, DECAP_PREFIX_HEADER_BITS, DecapPrefix,
};

use crate::{
    maps::{DECAP_ALLOW, DECAP_STATS},
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN,
        Ipv4Hdr, Ipv6Hdr, VLAN_HLEN, ptr_at_mut, read,
    },
};

/// What became of a packet.
enum Outcome {
    /// Stripped: the stack gets the inner packet.
    Decapsulated,
    /// Not a tunnel: untouched.
    NotOurs,
    /// A tunnel too broken to deliver (truncated, outer options, fragment).
    Broken,
    /// A tunnel from a source not on the allow-list.
    Source,
    /// A tunnel to an inner destination that is not an allowed VIP.
    Vip,
}

/// Runs the decap program on one packet.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(stats) = DECAP_STATS.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's slot.
    let stats = unsafe { &mut *stats };
    let (counter, verdict) = match try_decap(ctx) {
        Outcome::Decapsulated => (&mut stats.decapsulated, xdp_action::XDP_PASS),
        Outcome::NotOurs => (&mut stats.passed, xdp_action::XDP_PASS),
        Outcome::Broken => (&mut stats.dropped, xdp_action::XDP_DROP),
        Outcome::Source => (&mut stats.dropped_source, xdp_action::XDP_DROP),
        Outcome::Vip => (&mut stats.dropped_vip, xdp_action::XDP_DROP),
    };
    *counter += 1;
    verdict
}

/// Whether `addr` of `family` is on allow-list `list`.
#[inline(always)]
fn allowed(list: u8, family: u8, addr: [u8; 16]) -> bool {
    let bits = if family == AF_INET { 32 } else { 128 };
    let key = Key::new(
        DECAP_PREFIX_HEADER_BITS + bits,
        DecapPrefix {
            list,
            family,
            _pad: [0; 2],
            addr,
        },
    );
    DECAP_ALLOW.get(&key).is_some()
}

#[inline(always)]
fn v4_bytes(addr: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    let b = addr.to_ne_bytes();
    out[0] = b[0];
    out[1] = b[1];
    out[2] = b[2];
    out[3] = b[3];
    out
}

#[inline(always)]
fn v6_bytes(addr: [u32; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size, any bits are valid.
    unsafe { core::mem::transmute(addr) }
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Outcome {
    let Some((l3, ether_type)) = crate::parse::ethernet(ctx) else {
        return Outcome::NotOurs;
    };
    let (outer_len, inner, src) = match ether_type {
        ETH_P_IP => {
            let Some(ip) = read::<Ipv4Hdr>(ctx, l3) else {
                return Outcome::NotOurs;
            };
            let inner = match ip.proto {
                IPPROTO_IPIP => ETH_P_IP,
                IPPROTO_IPV6 => ETH_P_IPV6,
                _ => return Outcome::NotOurs,
            };
            // Outer options or fragments: the balancer never sends them.
            if ip.ver_ihl != 0x45 || u16::from_be(ip.frag_off) & 0x3fff != 0 {
                return Outcome::Broken;
            }
            (IPV4_HLEN, inner, (AF_INET, v4_bytes(ip.src)))
        }
        ETH_P_IPV6 => {
            let Some(ip) = read::<Ipv6Hdr>(ctx, l3) else {
                return Outcome::NotOurs;
            };
            let inner = match ip.next_header {
                IPPROTO_IPIP => ETH_P_IP,
                IPPROTO_IPV6 => ETH_P_IPV6,
                _ => return Outcome::NotOurs,
            };
            (IPV6_HLEN, inner, (AF_INET6, v6_bytes(ip.src)))
        }
        _ => return Outcome::NotOurs,
    };
    if !allowed(DECAP_LIST_SOURCE, src.0, src.1) {
        return Outcome::Source;
    }
    // The inner header must be there, to a VIP, before anything moves.
    let dst = if inner == ETH_P_IP {
        read::<Ipv4Hdr>(ctx, l3 + outer_len).map(|ip| (AF_INET, v4_bytes(ip.dst)))
    } else {
        read::<Ipv6Hdr>(ctx, l3 + outer_len).map(|ip| (AF_INET6, v6_bytes(ip.dst)))
    };
    let Some((family, dst)) = dst else {
        return Outcome::Broken;
    };
    if !allowed(DECAP_LIST_VIP, family, dst) {
        return Outcome::Vip;
    }
    match strip(ctx, l3, outer_len, inner) {
        Some(()) => Outcome::Decapsulated,
        None => Outcome::Broken,
    }
}

/// Removes the `outer_len` bytes of outer header at `l3`, keeping the
/// Ethernet header (and VLAN tag) with ethertype `inner`.
#[inline(always)]
fn strip(ctx: &XdpContext, l3: usize, outer_len: usize, inner: u16) -> Option<()> {
    let eth: EthHdr = read(ctx, 0)?;
    let tag: Option<[u8; 4]> = if l3 == ETH_HLEN + VLAN_HLEN {
        Some(read(ctx, ETH_HLEN)?)
    } else {
        None
    };
    // SAFETY: helper call on our own context; shrinking by less than the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return None;
    }
    let new_eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked.
    unsafe { *new_eth = eth };
    if let Some(tag) = tag {
        let t = ptr_at_mut::<[u8; 4]>(ctx, ETH_HLEN)?;
        let ty = ptr_at_mut::<u16>(ctx, ETH_HLEN + 2)?;
        // SAFETY: bounds checked.
        unsafe {
            *t = tag;
            *ty = inner.to_be();
        }
    } else {
        // SAFETY: bounds checked.
        unsafe { (*new_eth).proto = inner.to_be() };
    }
    Some(())
}
