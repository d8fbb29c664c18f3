//! `smtp-lb ctl`: the operator's view. Balancer commands talk to the
//! daemon's admin API (loopback, bearer token); `stats` reads the pinned
//! maps directly and works without the daemon.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use smtp_lb_common::DEFAULT_PIN_DIR;

use crate::{admin::http, dataplane::read_stats};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The balancer's admin API.
    #[arg(long, global = true, default_value = "127.0.0.1:9700")]
    pub admin: SocketAddr,
    /// File with the admin bearer token (the daemon creates it).
    #[arg(long, global = true, default_value = "/var/lib/smtp-lb/admin.token")]
    pub token_file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Data-plane counters from the pinned maps (works without the daemon).
    Stats {
        /// bpffs directory the balancer pinned its maps in.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The daemon: interface, config, last reload, global counters.
    Status,
    /// Relays with health, weights, warmup, flows.
    Backends,
    /// Stop new flows to a relay (weight 0); existing ones finish.
    Drain {
        /// Backend name (or address).
        name: String,
    },
    /// Undo a drain.
    Undrain { name: String },
    /// Set a relay's weight until the configured weight changes; `config` restores it.
    Weight { name: String, weight: String },
    /// Which relay a new connection from CLIENT:CPORT to VIP:PORT goes to, and
    /// whether such a flow is tracked.
    Where {
        /// VIP:PORT, like 203.0.113.10:25.
        service: SocketAddr,
        /// CLIENT:PORT, like 198.51.100.1:40000.
        client: SocketAddr,
    },
    /// Re-read and apply the configuration file.
    Reload,
    /// The relay: queues by destination, show, retry, bounce, delete (via the relay's admin listener).
    Relay(super::relay::CtlOptions),
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "main hands over the parsed options"
)]
pub fn run(opts: Options) -> anyhow::Result<()> {
    match &opts.command {
        Command::Stats { pin_dir } => stats(pin_dir, opts.json),
        Command::Status => show(&opts, &call(&opts, "GET", "/status")?),
        Command::Backends => backends(&opts, &call(&opts, "GET", "/backends")?),
        Command::Drain { name } => ok(
            &opts,
            &call(&opts, "POST", &format!("/backends/{name}/drain"))?,
        ),
        Command::Undrain { name } => ok(
            &opts,
            &call(&opts, "POST", &format!("/backends/{name}/undrain"))?,
        ),
        Command::Weight { name, weight } => ok(
            &opts,
            &call(
                &opts,
                "POST",
                &format!("/backends/{name}/weight?value={weight}"),
            )?,
        ),
        Command::Where { service, client } => {
            let path = format!(
                "/where?vip={}&port={}&client={}&cport={}",
                service.ip(),
                service.port(),
                client.ip(),
                client.port()
            );
            show(&opts, &call(&opts, "GET", &path)?)
        }
        Command::Reload => ok(&opts, &call(&opts, "POST", "/reload")?),
        Command::Relay(relay) => super::relay::ctl(relay),
    }
}

/// Calls the admin API; a non-2xx answer becomes an error with its message.
fn call(opts: &Options, method: &str, path: &str) -> anyhow::Result<Value> {
    let token = std::fs::read_to_string(&opts.token_file).with_context(|| {
        format!(
            "read the admin token {} (pass --token-file)",
            opts.token_file.display()
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt
        .block_on(http::request(
            opts.admin,
            method,
            path,
            Some(token.trim()),
            None,
        ))
        .with_context(|| format!("admin API at {} (is `smtp-lb lb` running?)", opts.admin))?;
    let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    if !(200..300).contains(&status) {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        bail!("{msg} (HTTP {status})");
    }
    Ok(value)
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "every ctl printer has the same signature"
)]
fn ok(opts: &Options, v: &Value) -> anyhow::Result<()> {
    if opts.json {
        println!("{v}");
    } else {
        println!("ok");
    }
    Ok(())
}

/// Status and `where` answers: JSON either way (pretty unless `--json`).
fn show(opts: &Options, v: &Value) -> anyhow::Result<()> {
    if opts.json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "every ctl printer has the same signature"
)]
fn backends(opts: &Options, v: &Value) -> anyhow::Result<()> {
    if opts.json {
        println!("{v}");
        return Ok(());
    }
    println!(
        "{:<12} {:<26} {:<6} {:>6} {:>9} {:>7} {:<8} {:>9} {:>9}  last check",
        "NAME",
        "ADDRESS",
        "HEALTH",
        "WEIGHT",
        "EFFECTIVE",
        "SHARE",
        "DRAINED",
        "NEW FLOWS",
        "TRACKED"
    );
    for b in v.as_array().into_iter().flatten() {
        let names: Vec<&str> = b["names"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let weight = b["weight_override"]
            .as_u64()
            .map_or_else(|| b["configured_weight"].to_string(), |w| format!("{w}*"));
        let last = b["health_history"].get(0).map_or_else(String::new, |h| {
            h["error"]
                .as_str()
                .map_or_else(|| format!("ok {}ms", h["took_ms"]), str::to_owned)
        });
        println!(
            "{:<12} {:<26} {:<6} {:>6} {:>9} {:>6.1}% {:<8} {:>9} {:>9}  {}",
            names.join(","),
            b["address"].as_str().unwrap_or_default(),
            b["health"].as_str().unwrap_or_default(),
            weight,
            b["effective_weight"],
            b["share_permille"].as_f64().unwrap_or(0.0) / 10.0,
            b["drained"],
            b["new_flows"],
            b["live_flows"],
            last
        );
    }
    Ok(())
}

fn stats(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let snap = read_stats(pin_dir)?;
    if json {
        println!("{}", serde_json::to_string(&snap)?);
        return Ok(());
    }
    for (k, v) in &snap.global {
        println!("{k:<18} {v:>14}");
    }
    if !snap.services.is_empty() {
        println!(
            "\n{:<4} {:<40} {:>12} {:>14} {:>10} {:>10}",
            "ID", "SERVICE", "PACKETS", "BYTES", "NEW FLOWS", "NO BACKEND"
        );
        for s in &snap.services {
            let svc = SocketAddr::new(s.vip, s.port).to_string();
            println!(
                "{:<4} {:<40} {:>12} {:>14} {:>10} {:>10}",
                s.id, svc, s.packets, s.bytes, s.new_flows, s.no_backend
            );
        }
    }
    if !snap.backends.is_empty() {
        println!(
            "\n{:<4} {:<40} {:<6} {:>12} {:>14} {:>10}",
            "ID", "BACKEND", "VALID", "PACKETS", "BYTES", "NEW FLOWS"
        );
        for b in &snap.backends {
            println!(
                "{:<4} {:<40} {:<6} {:>12} {:>14} {:>10}",
                b.id, b.address, b.valid, b.packets, b.bytes, b.new_flows
            );
        }
    }
    Ok(())
}
