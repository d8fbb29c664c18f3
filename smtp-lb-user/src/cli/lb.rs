//! `smtp-lb lb`: load, attach and pin the balancer, then serve until signalled.
use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use smtp_lb_common::DEFAULT_PIN_DIR;
use tracing::info;

use crate::{
    config::lb::LbConfig,
    dataplane::{AttachMode, LoadOptions, XdpDataplane, check_interface, read_global_stats},
    lb::{self, Node},
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Interface that receives the VIP traffic.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = AttachMode::Native)]
    pub mode: AttachMode,
    /// Configuration file (services, backends); see `config::lb`. It is
    /// validated before anything is loaded.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// bpffs directory for the pinned maps (and the link with --keep-pinned);
    /// default: the config's `pin_dir`, else /sys/fs/bpf/smtp-lb.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// On exit, leave the program attached and everything pinned (for a
    /// restart that must not interrupt traffic).
    #[arg(long)]
    pub keep_pinned: bool,
    /// Log the global counters this often (0 = never).
    #[arg(long, default_value = "10s", value_parser = crate::config::duration::parse)]
    pub stats_interval: Duration,
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // The config is read and validated before anything touches the kernel.
    let config = opts.config.as_deref().map(LbConfig::load).transpose()?;
    let pin_dir = opts
        .pin_dir
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.pin_dir.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
    check_interface(&opts.iface)?;
    let mut dp = XdpDataplane::load(&LoadOptions {
        pin_dir: pin_dir.clone(),
    })?;
    // Maps first, then attach: the program never sees traffic with empty tables.
    let mut dp = if let Some(cfg) = config {
        let saved = match lb::state::load(&cfg.state_dir) {
            Ok(saved) => saved,
            Err(err) => {
                dp.discard();
                return Err(err).with_context(|| format!("state in {}", cfg.state_dir.display()));
            }
        };
        let mut node = Node::new(
            dp,
            cfg,
            &saved,
            opts.config.clone(),
            pin_dir.clone(),
            opts.iface.clone(),
        );
        if let Err(err) = node.start().await {
            node.into_dataplane().discard();
            return Err(err);
        }
        let iface = opts.iface.clone();
        if let Err(err) = node.dataplane_mut().attach(&iface, opts.mode) {
            node.into_dataplane().discard();
            return Err(err.into());
        }
        info!(iface = %opts.iface, mode = ?opts.mode, pin_dir = %pin_dir.display(), "balancer attached");
        lb::run(node, shutdown).await?.into_dataplane()
    } else {
        if let Err(err) = dp.attach(&opts.iface, opts.mode) {
            dp.discard();
            return Err(err.into());
        }
        info!(iface = %opts.iface, mode = ?opts.mode, pin_dir = %pin_dir.display(), "balancer attached (no config: every packet passes)");
        crate::systemd::ready();
        log_counters(&pin_dir, opts.stats_interval, shutdown).await?;
        dp
    };
    if opts.keep_pinned {
        let link = dp.keep_attached()?;
        info!(link = %link.display(), "left attached and pinned");
    } else {
        dp.unpin_all()
            .with_context(|| format!("remove pins under {}", pin_dir.display()))?;
        info!("detached and unpinned");
    }
    Ok(())
}

/// Without a config there is no control loop: log the counters until shutdown.
async fn log_counters(
    pin_dir: &std::path::Path,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut ticker = (!every.is_zero()).then(|| tokio::time::interval(every));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => {
                let s = read_global_stats(pin_dir)?;
                info!(tx = s.tx, redirect = s.redirect, pass_non_vip = s.pass_non_vip, drop_no_backend = s.drop_no_backend, lru_miss = s.lru_miss, "counters");
            }
        }
    }
}
