//! Loading the balancer, attaching it to an interface, pinning it.
//!
//! Maps are opened from (or created at) `<pin_dir>/<MAP>` so a restarted
//! daemon reuses the same maps and the flows they track.
use std::{
    borrow::Cow,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError, MapInfo},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use smtp_lb_common::{CONNTRACK_SIZE, Counters, Flow, FlowKey, FlowSet, maps, programs};
use thiserror::Error;

use super::{EBPF_OBJECT, flows, pins::ensure_bpffs, walk};

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// In the driver (fastest; needs driver support, e.g. veth, mlx5, ice, i40e).
    #[default]
    Native,
    /// Generic XDP in the network stack: works on every interface, slower.
    Skb,
}

/// Why the data plane could not be set up. Each message names the cause and,
/// where there is one, the fix.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The binary embeds the empty stub instead of the eBPF object.
    #[error("this smtp-lb was built without its eBPF object; build it with `cargo xtask build`")]
    NoObject,
    /// Loading BPF programs needs privileges.
    #[error("loading XDP needs root (CAP_BPF and CAP_NET_ADMIN); run as root or with sudo")]
    NotRoot,
    /// The interface does not exist.
    #[error("interface `{iface}` does not exist; see `ip link` for the interface names")]
    NoInterface { iface: String },
    /// The driver has no native XDP.
    #[error("interface `{iface}` does not support native XDP ({reason}); try --mode skb")]
    NativeUnsupported { iface: String, reason: String },
    /// The bpffs pin directory could not be prepared.
    #[error("cannot use pin directory {}: {source}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The object could not be loaded into the kernel.
    #[error("failed to load the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map is missing or unusable.
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// Pinning failed.
    #[error("pin {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

/// What to load and where to pin it.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory for the maps, the program and (optionally) the link.
    pub pin_dir: PathBuf,
}

/// The loaded balancer. Dropping it detaches the program unless the link
/// was pinned with [`Dataplane::keep_attached`].
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attached: Option<(String, aya::programs::xdp::XdpLinkId)>,
    adopted: bool,
    took_over: bool,
}

/// Counter maps pinned by an older build that this one cannot share: a
/// `COUNTERS` of another layout (a release that added a counter), or the
/// three maps of the builds before it. They are unpinned so fresh ones are
/// made: the counters restart, the flow maps (and the flows they hold) are
/// kept. The bases go with the counters they were taken from.
fn drop_outgrown_counters(pin_dir: &Path) {
    let unpin = |name: &str| {
        let path = pin_dir.join(name);
        if path.exists()
            && let Err(e) = std::fs::remove_file(&path)
        {
            tracing::warn!(map = name, error = %e, "cannot unpin outgrown counters");
        }
    };
    match MapInfo::from_pin(pin_dir.join(maps::COUNTERS)) {
        Ok(info) if info.value_size() as usize == size_of::<Counters>() => {}
        Ok(info) => {
            tracing::warn!(
                map = maps::COUNTERS,
                pinned = info.value_size(),
                now = size_of::<Counters>(),
                "pinned counters have another layout; replaced, they restart from 0"
            );
            unpin(maps::COUNTERS);
            unpin(maps::COUNTER_BASES);
        }
        Err(_) => unpin(maps::COUNTER_BASES),
    }
    for name in maps::OBSOLETE_COUNTERS {
        if pin_dir.join(name).exists() {
            tracing::info!(
                map = name,
                now = maps::COUNTERS,
                "an older build's counters unpinned; the counters restart from 0"
            );
            unpin(name);
        }
    }
}

/// A balancer of an earlier build tracked flows in `CONNTRACK`, an LRU hash
/// of [`FlowKey`] → [`Flow`]. On adopting its pins, its flows are written
/// into the new `FLOW_TABLE` (unconfirmed, as after a SYN: their next
/// packet confirms them; a set with no room keeps what it has and the flow
/// follows `MOVED_FLOWS` or the table) and the old pin is removed. The old
/// program holds its own reference to the old map until it is swapped out;
/// flows it starts meanwhile are tracked again at their next packet.
fn carry_over_conntrack(pin_dir: &Path, ebpf: &mut Ebpf) {
    let path = pin_dir.join(maps::CONNTRACK);
    if !path.exists() {
        return;
    }
    let carried = (|| -> Result<(usize, usize), MapError> {
        let old = Map::LruHashMap(MapData::from_pin(&path)?);
        let tracked: Vec<(FlowKey, Flow)> = walk::entries(&old, 2 * CONNTRACK_SIZE as usize)?;
        let map = ebpf
            .map_mut(maps::FLOW_TABLE)
            .ok_or_else(|| MapError::InvalidName {
                name: maps::FLOW_TABLE.to_owned(),
            })?;
        let mut table: Array<_, FlowSet> = Array::try_from(map)?;
        let now = flows::clock_now();
        let mut kept = 0;
        for (key, flow) in &tracked {
            kept += usize::from(flows::insert(&mut table, key, flow, now)?);
        }
        Ok((tracked.len(), kept))
    })();
    match carried {
        Ok((found, kept)) => {
            tracing::info!(
                found,
                kept,
                "flows of the previous build's CONNTRACK carried into FLOW_TABLE"
            );
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, "cannot unpin the previous build's CONNTRACK");
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            "cannot carry the previous build's CONNTRACK flows over; they are tracked again at their next packet"
        ),
    }
}

impl Dataplane {
    /// Loads the embedded object, re-using maps already pinned in `pin_dir`.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LoadError::NotRoot);
        }
        ensure_bpffs(&opts.pin_dir).map_err(|source| LoadError::PinDir {
            path: opts.pin_dir.clone(),
            source,
        })?;
        drop_outgrown_counters(&opts.pin_dir);
        // Maps already pinned there belong to a running (or restarting) balancer.
        let adopted = maps::ALL
            .iter()
            .any(|name| opts.pin_dir.join(name).exists());
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_pin_path(name, Cow::Owned(opts.pin_dir.join(name)));
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        carry_over_conntrack(&opts.pin_dir, &mut ebpf);
        let mut dp = Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            attached: None,
            adopted,
            took_over: false,
        };
        let prog_loaded = balancer(&mut dp.ebpf).and_then(|prog| {
            prog.load().map_err(|source| LoadError::Program {
                name: programs::BALANCER,
                source,
            })
        });
        if let Err(err) = prog_loaded {
            dp.discard();
            return Err(err);
        }
        Ok(dp)
    }

    /// Attaches the balancer to `iface`.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), LoadError> {
        check_interface(iface)?;
        if self.link_pin().exists() {
            return self.take_over(iface);
        }
        let flags = match mode {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
        };
        let prog = balancer(&mut self.ebpf)?;
        let id = prog.attach(iface, flags).map_err(|source| match mode {
            AttachMode::Native => LoadError::NativeUnsupported {
                iface: iface.to_owned(),
                reason: error_chain(&source),
            },
            AttachMode::Skb => LoadError::Program {
                name: programs::BALANCER,
                source,
            },
        })?;
        self.attached = Some((iface.to_owned(), id));
        Ok(())
    }

    /// Where the attachment is pinned by `--keep-pinned`.
    fn link_pin(&self) -> PathBuf {
        self.pin_dir.join("link")
    }

    /// A previous balancer left its attachment pinned: swap this program in
    /// with `bpf_link_update` (atomic: no packet sees the interface without
    /// a program), keeping the maps it already shares. This is the hitless
    /// restart and upgrade path.
    fn take_over(&mut self, iface: &str) -> Result<(), LoadError> {
        let path = self.link_pin();
        let io_err = |e: String| LoadError::Program {
            name: programs::BALANCER,
            source: aya::programs::ProgramError::IOError(io::Error::other(e)),
        };
        let pinned = PinnedLink::from_pin(&path)
            .map_err(|e| io_err(format!("open pinned link {}: {e}", path.display())))?;
        let link = aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned)).map_err(|e| {
            io_err(format!(
                "pinned link {} is not an XDP link: {e}",
                path.display()
            ))
        })?;
        let prog = balancer(&mut self.ebpf)?;
        let id = prog
            .attach_to_link(link)
            .map_err(|source| LoadError::Program {
                name: programs::BALANCER,
                source,
            })?;
        self.attached = Some((iface.to_owned(), id));
        self.took_over = true;
        Ok(())
    }

    /// Whether [`Dataplane::attach`] took over a pinned attachment.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Pins the attachment itself, so the program stays on the interface
    /// after this process exits. Returns the link's pin path.
    pub fn keep_attached(&mut self) -> Result<PathBuf, LoadError> {
        let Some((_, id)) = self.attached.take() else {
            return Err(LoadError::Program {
                name: programs::BALANCER,
                source: aya::programs::ProgramError::NotAttached,
            });
        };
        let prog = balancer(&mut self.ebpf)?;
        let link = prog.take_link(id).map_err(|source| LoadError::Program {
            name: programs::BALANCER,
            source,
        })?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| LoadError::Program {
                name: programs::BALANCER,
                source: aya::programs::ProgramError::IOError(io::Error::other(e.to_string())),
            })?;
        let path = self.link_pin();
        if path.exists() {
            // Taken over from a pinned link: the pin still holds it.
            return Ok(path);
        }
        let _: PinnedLink = fd_link.pin(&path).map_err(|source| LoadError::Pin {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Whether the maps were adopted from an earlier balancer rather than created.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// After a failed start: removes the pins this instance created, and
    /// leaves adopted ones (they serve the running traffic) alone.
    pub fn discard(&self) {
        if !self.adopted {
            let _ = self.unpin_all();
        }
    }

    /// Removes the pinned maps (the program is detached when `self` drops).
    /// Use on a clean shutdown that should leave nothing behind.
    pub fn unpin_all(&self) -> io::Result<()> {
        // The link pin of a taken-over attachment: with it gone (and this
        // process's fd closed on exit) the program detaches.
        for name in maps::ALL.iter().copied().chain(["link"]) {
            match std::fs::remove_file(self.pin_dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_dir(&self.pin_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn balancer(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let missing = || LoadError::Program {
        name: programs::BALANCER,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    };
    ebpf.program_mut(programs::BALANCER)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|_| missing())
}

/// `a: b: c` for an error and its sources, for messages that must fit one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// The index of `iface`, or [`LoadError::NoInterface`]. Called before
/// anything is loaded so a typo costs nothing.
pub fn check_interface(iface: &str) -> Result<u32, LoadError> {
    let missing = || LoadError::NoInterface {
        iface: iface.to_owned(),
    };
    let c = std::ffi::CString::new(iface).map_err(|_| missing())?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 { Err(missing()) } else { Ok(idx) }
}

/// The map writes go to the loaded object's maps.
impl super::MapWriter for Dataplane {
    fn existing(&mut self) -> Result<crate::balance::plan::Existing, super::ApplyError> {
        self.ebpf.existing()
    }
    fn set_node(
        &mut self,
        encap_v4: std::net::Ipv4Addr,
        encap_v6: std::net::Ipv6Addr,
    ) -> Result<(), super::ApplyError> {
        self.ebpf.set_node(encap_v4, encap_v6)
    }
    fn set_backend(
        &mut self,
        backend: &crate::balance::plan::PlannedBackend,
    ) -> Result<(), super::ApplyError> {
        self.ebpf.set_backend(backend)
    }
    fn set_service(
        &mut self,
        service: &crate::balance::plan::PlannedService,
    ) -> Result<(), super::ApplyError> {
        self.ebpf.set_service(service)
    }
    fn set_vip(&mut self, marker: &smtp_lb_common::ServiceKey) -> Result<(), super::ApplyError> {
        self.ebpf.set_vip(marker)
    }
    fn set_port(&mut self, port: u16, balanced: bool) -> Result<(), super::ApplyError> {
        self.ebpf.set_port(port, balanced)
    }
    fn remove_service(
        &mut self,
        key: &smtp_lb_common::ServiceKey,
    ) -> Result<(), super::ApplyError> {
        self.ebpf.remove_service(key)
    }
    fn retire_backend(&mut self, id: u32) -> Result<(), super::ApplyError> {
        self.ebpf.retire_backend(id)
    }
    fn keep_moved_flows(
        &mut self,
        plan: &crate::balance::plan::Plan,
    ) -> Result<super::MovedFlows, super::ApplyError> {
        self.ebpf.keep_moved_flows(plan)
    }
    fn set_clock(&mut self, secs: u32) -> Result<(), super::ApplyError> {
        self.ebpf.set_clock(secs)
    }
    fn set_admission(&mut self, id: u32, refuse: bool) -> Result<(), super::ApplyError> {
        self.ebpf.set_admission(id, refuse)
    }
}

/// Reads come from the pinned maps, as `ctl stats` reads them.
impl super::Dataplane for Dataplane {
    fn stats(&self) -> Result<super::Snapshot, LoadError> {
        super::read_stats(&self.pin_dir)
    }
    fn flows(&self) -> Result<std::collections::BTreeMap<u32, (u64, u64)>, LoadError> {
        super::tracked_flows(&self.pin_dir)
    }
    fn where_to(
        &self,
        vip: std::net::IpAddr,
        port: u16,
        client: std::net::IpAddr,
        cport: u16,
    ) -> Result<Option<super::Where>, LoadError> {
        super::where_to(&self.pin_dir, vip, port, client, cport)
    }
}
