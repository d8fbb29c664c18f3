//! The relay side: loads only the decap program and attaches it.

use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::Xdp,
};
use smtp_lb_common::{
    AF_INET, AF_INET6, DECAP_LIST_SOURCE, DECAP_LIST_VIP, DECAP_PREFIX_HEADER_BITS, DecapPrefix,
    DecapStats, maps, programs,
};

use super::{AttachMode, EBPF_OBJECT, LoadError};

/// The decap program attached to a relay's interface; detached on drop.
pub struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    /// Its counters (`DECAP_STATS`), summed over CPUs.
    pub fn stats(&self) -> Result<DecapStats, LoadError> {
        let name = maps::DECAP_STATS;
        let err = |source| LoadError::Map { name, source };
        let map = self.ebpf.map(name).ok_or_else(|| {
            err(aya::maps::MapError::InvalidName {
                name: name.to_owned(),
            })
        })?;
        let array: PerCpuArray<_, DecapStats> = PerCpuArray::try_from(map).map_err(err)?;
        let per_cpu = array.get(&0, 0).map_err(err)?;
        Ok(per_cpu.iter().fold(DecapStats::default(), |mut sum, s| {
            sum.add(s);
            sum
        }))
    }

    /// Loads the decap program (the balancer's big maps shrunk to one entry:
    /// a relay does not need them), writes its allow-list and attaches it to `iface`.
    pub fn attach(iface: &str, mode: AttachMode, allow: &DecapAllow) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LoadError::NotRoot);
        }
        let mut loader = EbpfLoader::new();
        for name in [
            maps::RINGS,
            maps::FLOW_TABLE,
            maps::MOVED_FLOWS,
            maps::VIP_PORTS,
            maps::BACKENDS,
        ] {
            loader.map_max_entries(name, 1);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        write_decap_allow(&mut ebpf, allow)?;
        let prog: &mut Xdp = ebpf
            .program_mut(programs::DECAP)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::Program {
                name: programs::DECAP,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
        prog.load().map_err(|source| LoadError::Program {
            name: programs::DECAP,
            source,
        })?;
        let flags = match mode {
            AttachMode::Native => aya::programs::XdpMode::Driver,
            AttachMode::Skb => aya::programs::XdpMode::Skb,
        };
        prog.attach(iface, flags)
            .map_err(|source| LoadError::Program {
                name: programs::DECAP,
                source,
            })?;
        Ok(Self { ebpf })
    }
}

/// Which tunnels decap opens, as prefixes (address, length in bits).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecapAllow {
    /// Outer sources: the LB nodes' encapsulation sources.
    pub sources: Vec<(IpAddr, u8)>,
    /// Inner destinations: the VIPs.
    pub vips: Vec<(IpAddr, u8)>,
}

/// Writes `allow` into the decap program's `DECAP_ALLOW` trie of `ebpf`.
pub fn write_decap_allow(ebpf: &mut Ebpf, allow: &DecapAllow) -> Result<(), LoadError> {
    let name = maps::DECAP_ALLOW;
    let err = |source| LoadError::Map { name, source };
    let map = ebpf.map_mut(name).ok_or_else(|| {
        err(aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        })
    })?;
    let mut trie: LpmTrie<_, DecapPrefix, u32> = LpmTrie::try_from(map).map_err(err)?;
    for (list, prefixes) in [
        (DECAP_LIST_SOURCE, &allow.sources),
        (DECAP_LIST_VIP, &allow.vips),
    ] {
        for (addr, len) in prefixes {
            let (family, bytes) = match addr {
                IpAddr::V4(a) => {
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&a.octets());
                    (AF_INET, b)
                }
                IpAddr::V6(a) => (AF_INET6, a.octets()),
            };
            let data = DecapPrefix {
                list,
                family,
                _pad: [0; 2],
                addr: bytes,
            };
            let key = Key::new(DECAP_PREFIX_HEADER_BITS + u32::from(*len), data);
            trie.insert(&key, 1, 0).map_err(err)?;
        }
    }
    Ok(())
}
