//! Header layouts and bounds-checked packet access. Every read and write goes
//! through [`ptr_at`] / [`ptr_at_mut`], which the verifier can follow: the
//! access is proven to lie inside the packet before it happens.
use aya_ebpf::programs::XdpContext;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMP / ICMPv6 header: type, code, checksum, 4 bytes of type-specific data.
pub const ICMP_HLEN: usize = 8;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub proto: u16,
}

/// IPv4 header without options. Multi-byte fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

impl Ipv4Hdr {
    /// A header the program writes itself: no options, not a fragment, TTL
    /// 64, id 0, checksum filled in. Addresses in network byte order.
    #[inline(always)]
    pub fn new(tos: u8, tot_len: u16, proto: u8, src: u32, dst: u32) -> Self {
        let (s, d) = (u32::from_be(src), u32::from_be(dst));
        let words = [
            0x4500 | u16::from(tos),
            tot_len,
            0,
            0,
            (64 << 8) | u16::from(proto),
            0,
            (s >> 16) as u16,
            s as u16,
            (d >> 16) as u16,
            d as u16,
        ];
        Self {
            ver_ihl: 0x45,
            tos,
            tot_len: tot_len.to_be(),
            id: 0,
            frag_off: 0,
            ttl: 64,
            proto,
            check: crate::csum::ipv4_header(&words).to_be(),
            src,
            dst,
        }
    }
}

/// IPv6 fixed header. Multi-byte fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// The first 16 bytes of a TCP header: all the balancer reads.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// Data offset in the high nibble.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
}

/// A pointer to a `T` at `offset` bytes into the packet, or `None` when the
/// packet is too short to hold it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Like [`ptr_at`], for writing.
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(<*const T>::cast_mut)
}

/// Reads a `T` (copied out of the packet; unused fields are optimised away).
///
/// A plain (aligned) read on purpose: `read_unaligned` compiles to one BPF
/// load per byte (300+ instructions for the headers here), while packet
/// loads of any alignment are fine for the verifier (no
/// `BPF_F_STRICT_ALIGNMENT`) and for the JIT on every architecture with
/// efficient unaligned access (x86-64, arm64). IP headers sit at offset 14
/// (2-byte aligned), as in every XDP program.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at proved the bytes are inside the packet.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read() })
}

/// The destination port (network order) of the TCP header at `l4`, whose
/// first 16 bytes are checked to be in the packet. Only the port is read:
/// the port filter decides for most traffic, and values read before its map
/// lookup would be kept across it (spilled) on every packet. What a VIP
/// port's packet needs is read after it.
#[inline(always)]
pub fn tcp_dport(ctx: &XdpContext, l4: usize) -> Option<u16> {
    let tcp = ptr_at::<TcpHdr>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { (*tcp).dport })
}

/// The Ethernet layer: where the network header starts and its ethertype
/// (host order), after at most one 802.1Q / 802.1ad tag.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<(usize, u16)> {
    let proto = u16::from_be(read::<u16>(ctx, 12)?);
    // Untagged IPv4, most of what an LB node sees, decides on one compare.
    if proto == ETH_P_IP {
        Some((ETH_HLEN, proto))
    } else if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let inner = u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?);
        Some((ETH_HLEN + VLAN_HLEN, inner))
    } else {
        Some((ETH_HLEN, proto))
    }
}

/// IPv6 next-header values that are extension headers (RFC 8200 §4, plus
/// ESP/AH, mobility, HIP, shim6 and the experimental values).
#[inline(always)]
pub fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}
