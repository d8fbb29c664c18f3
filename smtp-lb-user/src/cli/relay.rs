//! `smtp-lb relay` and `smtp-lb ctl relay …`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context;

use crate::relay::{self, Config};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Options {
    /// Relay configuration file (TOML); see docs/relay.md.
    #[arg(long, short, required = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<RelayCommand>,
}

#[derive(Debug, clap::Subcommand)]
pub enum RelayCommand {
    /// Check the sending identity in DNS: PTR/HELO of each egress source, SPF,
    /// the DKIM selector key, DMARC. Exit status 1 when any line fails.
    CheckIdentity(CheckIdentityOptions),
}

#[derive(Debug, clap::Args)]
pub struct CheckIdentityOptions {
    /// Relay configuration file (TOML); its `[dns]` servers are asked.
    #[arg(long, short)]
    pub config: PathBuf,
    /// One JSON object per check instead of text lines.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    match (opts.command, opts.config) {
        (Some(RelayCommand::CheckIdentity(o)), _) => check_identity(&o).await,
        (None, Some(config)) => relay::run(Config::load(&config)?, shutdown).await,
        (None, None) => anyhow::bail!("--config is required"),
    }
}

async fn check_identity(opts: &CheckIdentityOptions) -> anyhow::Result<()> {
    let cfg = Config::load(&opts.config)?;
    let checks = super::identity::run(&cfg).await?;
    for c in &checks {
        if opts.json {
            println!("{}", serde_json::to_string(c)?);
        } else {
            println!("{c}");
        }
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    anyhow::ensure!(
        failed == 0,
        "check-identity: {failed} of {} checks failed",
        checks.len()
    );
    Ok(())
}

/// `smtp-lb ctl relay`: the relay's queues, through its admin listener.
#[derive(Debug, clap::Args)]
pub struct CtlOptions {
    /// The relay's admin listener (`admin` in its config).
    #[arg(long, default_value = "127.0.0.1:8025", env = "SMTP_LB_RELAY_ADMIN")]
    pub relay_admin: SocketAddr,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Queue summary by destination domain.
    Queue,
    /// One message: envelope, attempts, last error.
    Show { id: String },
    /// Retry now: one message, or every scheduled one.
    Retry { id: Option<String> },
    /// Bounce a message's pending recipients now (DSN to the sender).
    Bounce { id: String },
    /// Delete a message without a DSN.
    Delete { id: String },
    /// Prometheus metrics, as served.
    Metrics,
    /// Egress sources: pools, unplumbed state, ready jobs, suspensions, warmup progress.
    Sources,
    /// Reload the shaping file (as SIGHUP does); a bad file is refused and the running one stays.
    Reload,
}

fn http(admin: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .with_context(|| format!("connect to relay admin listener {admin}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn ctl(opts: &CtlOptions) -> anyhow::Result<()> {
    let (method, path) = match &opts.command {
        CtlCommand::Queue => ("GET", "/queue".to_owned()),
        CtlCommand::Show { id } => ("GET", format!("/queue/{id}")),
        CtlCommand::Retry { id: None } => ("POST", "/queue/retry".to_owned()),
        CtlCommand::Retry { id: Some(id) } => ("POST", format!("/queue/{id}/retry")),
        CtlCommand::Bounce { id } => ("POST", format!("/queue/{id}/bounce")),
        CtlCommand::Delete { id } => ("POST", format!("/queue/{id}/delete")),
        CtlCommand::Metrics => ("GET", "/metrics".to_owned()),
        CtlCommand::Sources => ("GET", "/sources".to_owned()),
        CtlCommand::Reload => ("POST", "/reload".to_owned()),
    };
    let (status, body) = http(opts.relay_admin, method, &path)?;
    anyhow::ensure!(status == 200, "relay answered {status}: {}", body.trim());
    println!("{}", body.trim_end());
    Ok(())
}
