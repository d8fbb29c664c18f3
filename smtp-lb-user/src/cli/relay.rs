//! `smtp-lb relay` and `smtp-lb ctl relay …`.
use std::{net::SocketAddr, path::PathBuf};

use serde_json::Value;

use super::table::{self, cell};
use crate::{
    admin::client::Client,
    relay::{self, Config},
};

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
    let checks = relay::identity::run(&cfg).await?;
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

/// `smtp-lb ctl relay`: the relay's queues, through its admin API.
#[derive(Debug, clap::Args)]
pub struct CtlOptions {
    /// The relay's admin API (`admin` in its config).
    #[arg(long, default_value = "127.0.0.1:8025", env = "SMTP_LB_RELAY_ADMIN")]
    pub relay_admin: SocketAddr,
    /// File with the relay's admin token (`admin_token_file` in its config,
    /// default `<spool_dir>/admin.token`).
    #[arg(
        long,
        default_value = "/var/spool/smtp-lb/admin.token",
        env = "SMTP_LB_RELAY_TOKEN_FILE"
    )]
    pub relay_token_file: PathBuf,
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

/// Runs one `ctl relay` command; `json` prints the API's JSON as it came.
pub fn ctl(opts: &CtlOptions, json: bool) -> anyhow::Result<()> {
    let client = Client::with_token_file(opts.relay_admin, &opts.relay_token_file)?;
    let (post, segments): (bool, Vec<&str>) = match &opts.command {
        CtlCommand::Queue => (false, vec!["queue"]),
        CtlCommand::Show { id } => (false, vec!["queue", id]),
        CtlCommand::Retry { id: None } => (true, vec!["queue", "retry"]),
        CtlCommand::Retry { id: Some(id) } => (true, vec!["queue", id, "retry"]),
        CtlCommand::Bounce { id } => (true, vec!["queue", id, "bounce"]),
        CtlCommand::Delete { id } => (true, vec!["queue", id, "delete"]),
        CtlCommand::Metrics => (false, vec!["metrics"]),
        CtlCommand::Sources => (false, vec!["sources"]),
        CtlCommand::Reload => (true, vec!["reload"]),
    };
    let answer = if post {
        client.post(&segments, &[])
    } else {
        client.get(&segments, &[])
    }
    .map_err(|e| {
        e.context(format!(
            "relay admin API at {} (is `smtp-lb relay` running with `admin` set?)",
            opts.relay_admin
        ))
    })?;
    anyhow::ensure!(
        answer.ok(),
        "relay answered {}: {}",
        answer.status,
        answer.message()
    );
    if json || matches!(opts.command, CtlCommand::Metrics) {
        println!("{}", answer.body.trim_end());
        return Ok(());
    }
    let v = answer.json();
    match &opts.command {
        CtlCommand::Queue => queue(&v),
        CtlCommand::Sources => sources(&v),
        CtlCommand::Show { .. } => println!("{}", serde_json::to_string_pretty(&v)?),
        CtlCommand::Reload => println!("ok"),
        _ => println!("ok: {} jobs", cell(&v["jobs"])),
    }
    Ok(())
}

fn queue(v: &Value) {
    println!(
        "{} messages, oldest {}s",
        cell(&v["messages"]),
        cell(&v["oldest_secs"])
    );
    let mut t = table::new(
        &["DOMAIN", "READY", "SCHEDULED", "CONNECTIONS"],
        &["READY", "SCHEDULED", "CONNECTIONS"],
    );
    for (domain, d) in v["domains"].as_object().into_iter().flatten() {
        t.add_row([
            domain.clone(),
            cell(&d["ready"]),
            cell(&d["scheduled"]),
            cell(&d["connections"]),
        ]);
    }
    table::print(&t);
}

fn sources(v: &Value) {
    let mut t = table::new(
        &[
            "SOURCE",
            "ADDRESS",
            "HELO",
            "POOLS",
            "UNPLUMBED",
            "READY",
            "SUSPENDED",
            "WARMUP",
        ],
        &["UNPLUMBED"],
    );
    for s in v["sources"].as_array().into_iter().flatten() {
        let ready: Vec<String> = s["ready"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{}={}", cell(&r["provider"]), cell(&r["jobs"])))
            .collect();
        let warmup: Vec<String> = s["warmup"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                format!(
                    "{} day {}: {}/{}",
                    cell(&w["provider"]),
                    cell(&w["day"]),
                    cell(&w["sent_day"]),
                    cell(&w["daily_cap"])
                )
            })
            .collect();
        let or_dash = |v: Vec<String>| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(" ")
            }
        };
        t.add_row([
            cell(&s["name"]),
            cell(&s["address"]),
            cell(&s["helo"]),
            cell(&s["pools"]),
            format!("{}s", cell(&s["unplumbed_secs"])),
            or_dash(ready),
            or_dash(
                s["suspended"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(cell)
                    .collect(),
            ),
            or_dash(warmup),
        ]);
    }
    table::print(&t);
}
