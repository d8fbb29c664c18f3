//! `smtp-lb decap`: on a relay, strip the IPIP / IP6IP6 headers the balancer
//! pushes (this kernel, like many, has no ipip/ip6tnl module loaded; the
//! program needs none). Runs until signalled; detaches on exit.
use std::time::Duration;

use tracing::info;

use crate::{
    dataplane::{AttachMode, Decap, DecapAllow},
    relay::config::Cidr,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The relay's interface that receives encapsulated traffic.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = AttachMode::Native)]
    pub mode: AttachMode,
    /// Outer source (address or prefix) allowed to tunnel to this relay: the
    /// LB nodes' encapsulation sources, whose low bits carry the flow hash —
    /// `encap_source_v4` as a /16, `encap_source_v6` as a /96. Repeatable;
    /// tunnels from anywhere else are dropped (counted `dropped_source`).
    #[arg(long = "allow-source", required = true, value_parser = Cidr::parse)]
    pub sources: Vec<Cidr>,
    /// VIP (address or prefix) a tunnelled packet may be addressed to.
    /// Repeatable; others are dropped (counted `dropped_vip`).
    #[arg(long = "vip", required = true, value_parser = Cidr::parse)]
    pub vips: Vec<Cidr>,
    /// Log the counters (`dropped_source`, `dropped_vip` …) this often when
    /// they changed, and once on exit (0 = on exit only).
    #[arg(long, default_value = "60s", value_parser = crate::config::duration::parse)]
    pub stats_interval: Duration,
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let prefixes = |list: &[Cidr]| list.iter().map(|c| (c.addr(), c.prefix())).collect();
    let allow = DecapAllow {
        sources: prefixes(&opts.sources),
        vips: prefixes(&opts.vips),
    };
    let decap = Decap::attach(&opts.iface, opts.mode, &allow)?;
    info!(iface = %opts.iface, mode = ?opts.mode, sources = ?allow.sources, vips = ?allow.vips, "decap attached");
    crate::systemd::ready();
    let log = |s: &smtp_lb_common::DecapStats| {
        info!(
            decapsulated = s.decapsulated,
            passed = s.passed,
            dropped = s.dropped,
            dropped_source = s.dropped_source,
            dropped_vip = s.dropped_vip,
            "decap counters"
        );
    };
    let mut ticker =
        (!opts.stats_interval.is_zero()).then(|| tokio::time::interval(opts.stats_interval));
    let mut last = smtp_lb_common::DecapStats::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => {
                let now = decap.stats()?;
                if now != last {
                    log(&now);
                    last = now;
                }
            }
        }
    }
    log(&decap.stats()?);
    crate::systemd::stopping();
    drop(decap);
    info!("decap detached");
    Ok(())
}
