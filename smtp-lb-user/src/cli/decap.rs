//! `smtp-lb decap`: on a relay, strip the IPIP / IP6IP6 headers the balancer
//! pushes (this kernel, like many, has no ipip/ip6tnl module loaded; the
//! program needs none). Runs until signalled; detaches on exit.
use tracing::info;

use crate::dataplane::{AttachMode, Decap};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The relay's interface that receives encapsulated traffic.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = AttachMode::Native)]
    pub mode: AttachMode,
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let decap = Decap::attach(&opts.iface, opts.mode)?;
    info!(iface = %opts.iface, mode = ?opts.mode, "decap attached");
    crate::systemd::ready();
    shutdown.await;
    crate::systemd::stopping();
    drop(decap);
    info!("decap detached");
    Ok(())
}
