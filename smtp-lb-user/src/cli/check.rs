//! `smtp-lb check-config FILE`: validates a configuration without touching
//! anything (like `haproxy -c`); exit status 0 when it would be accepted.
use std::path::PathBuf;

use crate::config::lb::LbConfig;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The balancer configuration file to check.
    pub file: PathBuf,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let cfg = LbConfig::load(&opts.file)?;
    let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    let ports: usize = cfg.services.iter().map(|s| s.ports.len()).sum();
    println!(
        "{}: ok ({} services on {ports} ports, {backends} backends; health every {:?}, out after {:?} at most)",
        opts.file.display(),
        cfg.services.len(),
        cfg.health.interval,
        cfg.services
            .iter()
            .flat_map(|s| s.ports.iter().map(|p| s.check(*p, &cfg.health).tls))
            .map(|tls| cfg.health.detection_bound(tls))
            .max()
            .unwrap_or_default()
    );
    Ok(())
}
