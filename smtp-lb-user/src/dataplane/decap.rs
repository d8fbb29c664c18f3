//! The relay side: loads only the decap program and attaches it.

use aya::{Ebpf, EbpfLoader, programs::Xdp};
use smtp_lb_common::{maps, programs};

use super::{AttachMode, EBPF_OBJECT, LoadError};

/// The decap program attached to a relay's interface; detached on drop.
pub struct Decap {
    _ebpf: Ebpf,
}

impl Decap {
    /// Loads the decap program (the balancer's big maps shrunk to one entry:
    /// a relay does not need them) and attaches it to `iface`.
    pub fn attach(iface: &str, mode: AttachMode) -> Result<Self, LoadError> {
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
            maps::CONNTRACK,
            maps::VIP_PORTS,
            maps::BACKENDS,
            maps::BACKEND_STATS,
            maps::SERVICE_STATS,
        ] {
            loader.map_max_entries(name, 1);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
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
        Ok(Self { _ebpf: ebpf })
    }
}
