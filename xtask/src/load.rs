//! `cargo xtask build-and-load`: build, then hand over to `smtp-lb lb`.
use std::{os::unix::process::CommandExt, path::PathBuf, process::Command};

use anyhow::bail;

use crate::build;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Interface to attach the balancer to.
    #[arg(long)]
    iface: String,
    /// XDP attach mode: native (in the driver) or skb (generic, works everywhere).
    #[arg(long, default_value = "native", value_parser = ["native", "skb"])]
    mode: String,
    /// Balancer configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// bpffs directory for the pins.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Leave the program attached and pinned on exit.
    #[arg(long)]
    keep_pinned: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let artifacts = build::run(&build::Options {})?;
    let mut cmd = Command::new(&artifacts.binary);
    cmd.args(["lb", "--iface", &opts.iface, "--mode", &opts.mode]);
    if let Some(c) = &opts.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(p) = &opts.pin_dir {
        cmd.arg("--pin-dir").arg(p);
    }
    if opts.keep_pinned {
        cmd.arg("--keep-pinned");
    }
    // exec: Ctrl-C then reaches smtp-lb directly, which detaches cleanly.
    let err = cmd.exec();
    bail!("failed to exec {}: {err}", artifacts.binary.display())
}
