//! `smtp-lb lb`: load, attach and pin the balancer, then serve until signalled.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use smtp_lb_common::DEFAULT_PIN_DIR;
use tracing::info;

use crate::dataplane::{AttachMode, Dataplane, LoadOptions, check_interface, read_global_stats};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Interface that receives the VIP traffic.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = AttachMode::Native)]
    pub mode: AttachMode,
    /// Configuration file (VIPs, backends, health checks).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// bpffs directory for the pinned maps (and the link with --keep-pinned).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// On exit, leave the program attached and everything pinned (for a
    /// restart that must not interrupt traffic).
    #[arg(long)]
    pub keep_pinned: bool,
    /// Log the global counters this often (0 = never).
    #[arg(long, default_value = "10s", value_parser = parse_secs)]
    pub stats_interval: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("`{s}` is not a number of seconds like `10s`"))
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if let Some(config) = &opts.config {
        bail!(
            "--config {}: config files are not supported by this build yet",
            config.display()
        );
    }
    check_interface(&opts.iface)?;
    let mut dp = Dataplane::load(&LoadOptions {
        pin_dir: opts.pin_dir.clone(),
    })?;
    if let Err(err) = dp.attach(&opts.iface, opts.mode) {
        dp.discard();
        return Err(err.into());
    }
    info!(iface = %opts.iface, mode = ?opts.mode, pin_dir = %opts.pin_dir.display(), "balancer attached");

    let mut ticker =
        (!opts.stats_interval.is_zero()).then(|| tokio::time::interval(opts.stats_interval));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => {
                let s = read_global_stats(&opts.pin_dir)?;
                info!(tx = s.tx, redirect = s.redirect, pass_non_vip = s.pass_non_vip, drop_no_backend = s.drop_no_backend, lru_miss = s.lru_miss, "counters");
            }
        }
    }
    if opts.keep_pinned {
        let link = dp.keep_attached()?;
        info!(link = %link.display(), "left attached and pinned");
    } else {
        dp.unpin_all()
            .with_context(|| format!("remove pins under {}", opts.pin_dir.display()))?;
        info!("detached and unpinned");
    }
    Ok(())
}
