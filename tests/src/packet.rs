//! A small packet builder for fixtures: Ethernet (+ one 802.1Q tag), IPv4
//! (with options and fragment fields), IPv6 (with an optional extension
//! header), TCP and UDP, with correct checksums.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

/// TCP flag bits.
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A layer-4 header to put after the IP header.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// Raw bytes under an arbitrary protocol number (ICMP, …).
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

/// One packet under construction.
#[derive(Clone, Debug)]
pub struct PacketBuilder {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (padded to 4 bytes by the builder).
    pub ipv4_options: Vec<u8>,
    /// IPv4 flags/fragment-offset field (host order), e.g. `0x2000` = MF.
    pub ipv4_frag: u16,
    /// IPv6: insert an extension header of this type (e.g. 0 = hop-by-hop).
    pub ipv6_ext: Option<u8>,
    pub ttl: u8,
}

/// Client MAC used by default in fixtures.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// LB MAC used by default in fixtures.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

impl PacketBuilder {
    /// A TCP segment from `src:sport` to `dst:dport` with `flags`.
    pub fn tcp(
        src: impl Into<IpAddr>,
        sport: u16,
        dst: impl Into<IpAddr>,
        dport: u16,
        flags: u8,
    ) -> Self {
        Self::new(
            src.into(),
            dst.into(),
            L4::Tcp {
                sport,
                dport,
                flags,
                seq: 1,
            },
        )
    }

    /// A UDP datagram.
    pub fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Self::new(src.into(), dst.into(), L4::Udp { sport, dport })
    }

    /// An ICMP echo request (`ICMPv4` or `ICMPv6` by address family).
    pub fn icmp_echo(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Self {
        let (src, dst) = (src.into(), dst.into());
        let (proto, kind) = if src.is_ipv4() {
            (IPPROTO_ICMP, 8)
        } else {
            (IPPROTO_ICMPV6, 128)
        };
        Self::new(
            src,
            dst,
            L4::Raw {
                proto,
                bytes: vec![kind, 0, 0, 0, 0, 1, 0, 1],
            },
        )
    }

    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "source and destination must be the same family"
        );
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            vlan: None,
            src,
            dst,
            l4,
            payload: Vec::new(),
            ipv4_options: Vec::new(),
            ipv4_frag: 0,
            ipv6_ext: None,
            ttl: 64,
        }
    }

    #[must_use]
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    #[must_use]
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    #[must_use]
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    #[must_use]
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        self.ipv4_options = options.to_vec();
        self
    }

    /// Sets the IPv4 fragment fields: more-fragments flag and offset (in 8-byte units).
    #[must_use]
    pub fn fragment(mut self, more: bool, offset: u16) -> Self {
        self.ipv4_frag = (if more { 0x2000 } else { 0 }) | (offset & 0x1fff);
        self
    }

    #[must_use]
    pub fn ipv6_ext(mut self, next_header: u8) -> Self {
        self.ipv6_ext = Some(next_header);
        self
    }

    /// The layer-4 header and payload, with the checksum filled in.
    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let (proto, mut bytes, csum_at) = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
            } => {
                let mut h = Vec::with_capacity(20);
                h.extend(sport.to_be_bytes());
                h.extend(dport.to_be_bytes());
                h.extend(seq.to_be_bytes());
                h.extend(0u32.to_be_bytes()); // ack
                h.push(5 << 4); // data offset
                h.push(*flags);
                h.extend(64240u16.to_be_bytes()); // window
                h.extend([0, 0, 0, 0]); // checksum, urgent
                (IPPROTO_TCP, h, Some(16))
            }
            L4::Udp { sport, dport } => {
                let len = (8 + self.payload.len()) as u16;
                let mut h = Vec::with_capacity(8);
                h.extend(sport.to_be_bytes());
                h.extend(dport.to_be_bytes());
                h.extend(len.to_be_bytes());
                h.extend([0, 0]);
                (IPPROTO_UDP, h, Some(6))
            }
            L4::Raw { proto, bytes } => (*proto, bytes.clone(), None),
        };
        bytes.extend(&self.payload);
        if let Some(at) = csum_at {
            let sum = pseudo_header_sum(self.src, self.dst, proto, bytes.len()) + ones_sum(&bytes);
            bytes[at..at + 2].copy_from_slice(&fold(sum).to_be_bytes());
        }
        (proto, bytes)
    }

    /// The finished frame.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend(self.dst_mac);
        out.extend(self.src_mac);
        if let Some(id) = self.vlan {
            out.extend(ETH_P_8021Q.to_be_bytes());
            out.extend((id & 0x0fff).to_be_bytes());
        }
        let (proto, l4) = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                out.extend(ETH_P_IP.to_be_bytes());
                out.extend(self.ipv4_header(src, dst, proto, l4.len()));
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                out.extend(ETH_P_IPV6.to_be_bytes());
                out.extend(self.ipv6_header(src, dst, proto, l4.len()));
            }
            _ => unreachable!("checked in new"),
        }
        out.extend(l4);
        out
    }

    fn ipv4_header(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> Vec<u8> {
        let mut options = self.ipv4_options.clone();
        options.resize(options.len().div_ceil(4) * 4, 0);
        let ihl = 5 + options.len() / 4;
        let total = (ihl * 4 + l4_len) as u16;
        let mut h = vec![(4 << 4) | ihl as u8, 0];
        h.extend(total.to_be_bytes());
        h.extend(0x1234u16.to_be_bytes()); // id
        h.extend(self.ipv4_frag.to_be_bytes());
        h.extend([self.ttl, proto, 0, 0]);
        h.extend(src.octets());
        h.extend(dst.octets());
        h.extend(options);
        let csum = fold(ones_sum(&h));
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h
    }

    fn ipv6_header(&self, src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4_len: usize) -> Vec<u8> {
        let ext_len = if self.ipv6_ext.is_some() { 8 } else { 0 };
        let mut h = vec![0x60, 0, 0, 0];
        h.extend(((l4_len + ext_len) as u16).to_be_bytes());
        h.push(self.ipv6_ext.unwrap_or(proto));
        h.push(self.ttl);
        h.extend(src.octets());
        h.extend(dst.octets());
        if self.ipv6_ext.is_some() {
            // Minimal 8-byte extension header: next header, length 0, padding.
            h.extend([proto, 0, 1, 4, 0, 0, 0, 0]);
        }
        h
    }
}

/// An ICMP error (`ICMPv6` for IPv6 addresses) from `router` to `to`:
/// `kind`, `code`, `rest` (the 4 bytes after the checksum: the next-hop MTU
/// of "fragmentation needed", the MTU of "packet too big"), then `quoted`,
/// the start of the IP packet the error is about. Checksum filled in.
pub fn icmp_error(
    router: IpAddr,
    to: IpAddr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> PacketBuilder {
    let mut bytes = vec![kind, code, 0, 0];
    bytes.extend(rest.to_be_bytes());
    bytes.extend(quoted);
    let (proto, sum) = if router.is_ipv4() {
        (IPPROTO_ICMP, ones_sum(&bytes))
    } else {
        let pseudo = pseudo_header_sum(router, to, IPPROTO_ICMPV6, bytes.len());
        (IPPROTO_ICMPV6, pseudo + ones_sum(&bytes))
    };
    bytes[2..4].copy_from_slice(&fold(sum).to_be_bytes());
    PacketBuilder::new(router, to, L4::Raw { proto, bytes })
}

/// The error a router on the way sends when it cannot forward the relay's
/// reply `dst:dport → src:sport` (DSR: it leaves from the VIP): ICMP
/// "fragmentation needed" (next-hop MTU 1400) quoting the IPv4 header and 8
/// bytes, or `ICMPv6` "packet too big" (MTU 1280) quoting what fits in 1280.
pub fn path_mtu_error(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    let reply = PacketBuilder::tcp(dst, dport, src, sport, tcp::ACK | tcp::PSH)
        .payload(&[b'x'; 1440])
        .build();
    if src.is_ipv4() {
        let router = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254));
        icmp_error(router, dst, 3, 4, 1400, &reply[14..14 + 28]).build()
    } else {
        let router = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1));
        icmp_error(router, dst, 2, 0, 1280, &reply[14..14 + 1280 - 48]).build()
    }
}

/// `frame`'s IP packet in an outer IP header from `src` to `dst` (protocol
/// 4 for an IPv4 inner packet, 41 for IPv6), as a balancer tunnels it.
pub fn ipip(src: IpAddr, dst: IpAddr, frame: &[u8]) -> Vec<u8> {
    let proto = if frame[12..14] == ETH_P_IP.to_be_bytes() {
        4
    } else {
        41
    };
    let mut b = PacketBuilder::udp(src, 1, dst, 1);
    b.l4 = L4::Raw {
        proto,
        bytes: frame[14..].to_vec(),
    };
    b.build()
}

/// An ARP request from `sender` for `target`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(42);
    out.extend([0xff; 6]);
    out.extend(CLIENT_MAC);
    out.extend(ETH_P_ARP.to_be_bytes());
    out.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend(CLIENT_MAC);
    out.extend(sender.octets());
    out.extend([0; 6]);
    out.extend(target.octets());
    out
}

/// One's-complement sum of 16-bit words (RFC 1071), not yet folded.
pub fn ones_sum(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a 32-bit sum into the 16-bit one's-complement checksum.
pub fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend([0, proto]);
            p.extend((len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend((len as u32).to_be_bytes());
            p.extend([0, 0, 0, proto]);
        }
        _ => unreachable!(),
    }
    ones_sum(&p)
}

/// True when the IPv4 header checksum of the frame (at `l3` bytes in) verifies.
pub fn ipv4_checksum_ok(frame: &[u8], l3: usize) -> bool {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    fold(ones_sum(&frame[l3..l3 + ihl])) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p = PacketBuilder::tcp(
            Ipv4Addr::new(198, 51, 100, 1),
            40000,
            Ipv4Addr::new(203, 0, 113, 10),
            25,
            tcp::SYN,
        )
        .ipv4_options(&[1, 1, 1])
        .build();
        assert!(ipv4_checksum_ok(&p, 14));
        assert_eq!(p[14] & 0x0f, 6, "3 option bytes pad to one 32-bit word");
    }

    #[test]
    fn vlan_tag_shifts_the_ip_header() {
        let p = PacketBuilder::tcp(
            Ipv4Addr::new(198, 51, 100, 1),
            1,
            Ipv4Addr::new(203, 0, 113, 10),
            25,
            tcp::SYN,
        )
        .vlan(7)
        .build();
        assert_eq!(&p[12..16], &[0x81, 0x00, 0x00, 0x07]);
        assert_eq!(&p[16..18], &[0x08, 0x00]);
        assert!(ipv4_checksum_ok(&p, 18));
    }

    #[test]
    fn tcp_checksum_verifies_with_pseudo_header() {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let dst = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
        let p = PacketBuilder::tcp(src, 40000, dst, 587, tcp::SYN)
            .payload(b"x")
            .build();
        let l4 = &p[14 + 40..];
        let sum = pseudo_header_sum(src.into(), dst.into(), IPPROTO_TCP, l4.len()) + ones_sum(l4);
        assert_eq!(fold(sum), 0);
    }
}
