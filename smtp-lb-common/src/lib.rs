//! Types shared by the smtp-lb eBPF programs and user space.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size
//! assertion, so the kernel and user space agree on the layout without a
//! "must be kept in sync" comment. With the `user` feature each type also
//! implements `aya::Pod`.
#![no_std]

/// Default bpffs directory under which the daemon pins its maps and program.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/smtp-lb";

/// Names of the programs in the eBPF object, as user space looks them up.
pub mod programs {
    /// The XDP balancer attached to the LB node's interface.
    pub const BALANCER: &str = "smtp_lb";
    /// An XDP program that only returns `XDP_PASS`: the floor every
    /// per-packet cost is measured against, and the pass-through program a
    /// veth peer needs so native `XDP_TX` frames are received.
    pub const PASS: &str = "smtp_lb_pass";
}

/// Names of the maps in the eBPF object (also their pin file names).
/// BPF object names are limited to 15 characters (`BPF_OBJ_NAME_LEN`).
pub mod maps {
    /// `u32 (always 0)` → per-CPU [`crate::GlobalStats`].
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";

    /// Every map, so user space can pin (or re-open) each one by name.
    pub const ALL: &[&str] = &[GLOBAL_STATS];
}

/// Global per-CPU counters, one field per thing the program saw or did, so
/// `bpftool map dump` prints every reason by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GlobalStats {
    /// Every packet the program ran on.
    pub packets: u64,
    /// Frames that are not IPv4 or IPv6 (ARP, LLDP, …): passed.
    pub non_ip: u64,
    /// IPv4 packets.
    pub ipv4: u64,
    /// IPv6 packets.
    pub ipv6: u64,
    /// TCP segments to an SMTP port (25, 587, 465).
    pub smtp_tcp: u64,
    /// SYNs (without ACK) to an SMTP port: new SMTP connections.
    pub smtp_syn: u64,
    /// Frames too short for the headers they claim: passed untouched.
    pub truncated: u64,
}

const _: () = assert!(size_of::<GlobalStats>() == 56);

#[cfg(feature = "user")]
// SAFETY: `GlobalStats` is `repr(C)`, made only of `u64`s, with no padding.
unsafe impl aya::Pod for GlobalStats {}

/// TCP ports that carry SMTP: relay (25), submission (587), submissions (465).
pub const SMTP_PORTS: [u16; 3] = [25, 587, 465];
