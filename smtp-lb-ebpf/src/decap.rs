//! The relay side: strips the IPIP / IP6IP6 outer header the balancer pushed,
//! so the relay's stack sees the client's packet to the VIP (held on `lo`).
//! This kernel has no ipip/ip6tnl modules, and with this program a relay
//! needs none; like Katran's decap, it runs before the stack.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext,
};

use crate::{
    maps::DECAP_STATS,
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN,
        Ipv4Hdr, Ipv6Hdr, VLAN_HLEN, ptr_at_mut, read,
    },
};

/// Runs the decap program on one packet.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(stats) = DECAP_STATS.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's slot.
    let stats = unsafe { &mut *stats };
    match try_decap(ctx) {
        Some(true) => {
            stats.decapsulated += 1;
            xdp_action::XDP_PASS
        }
        Some(false) => {
            stats.passed += 1;
            xdp_action::XDP_PASS
        }
        None => {
            stats.dropped += 1;
            xdp_action::XDP_DROP
        }
    }
}

/// `Some(true)`: stripped; `Some(false)`: not ours, untouched; `None`: an
/// encapsulated packet too broken to deliver.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Option<bool> {
    let Some((l3, ether_type)) = crate::parse::ethernet(ctx) else {
        return Some(false);
    };
    let (outer_len, inner) = match ether_type {
        ETH_P_IP => {
            let Some(ip) = read::<Ipv4Hdr>(ctx, l3) else {
                return Some(false);
            };
            let inner = match ip.proto {
                IPPROTO_IPIP => ETH_P_IP,
                IPPROTO_IPV6 => ETH_P_IPV6,
                _ => return Some(false),
            };
            // Outer options or fragments: the balancer never sends them.
            if ip.ver_ihl != 0x45 || u16::from_be(ip.frag_off) & 0x3fff != 0 {
                return None;
            }
            (IPV4_HLEN, inner)
        }
        ETH_P_IPV6 => {
            let Some(ip) = read::<Ipv6Hdr>(ctx, l3) else {
                return Some(false);
            };
            let inner = match ip.next_header {
                IPPROTO_IPIP => ETH_P_IP,
                IPPROTO_IPV6 => ETH_P_IPV6,
                _ => return Some(false),
            };
            (IPV6_HLEN, inner)
        }
        _ => return Some(false),
    };
    // The inner header must be there before anything moves.
    read::<u8>(ctx, l3 + outer_len)?;
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
    Some(true)
}
