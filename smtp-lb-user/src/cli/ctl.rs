//! `smtp-lb ctl`: the operator's view. Balancer commands talk to the
//! daemon's admin API (loopback, bearer token); `stats` reads the pinned
//! maps directly and works without the daemon.
//!
//! `--admin` may be given several times (or comma-separated): the command
//! then runs on each balancer in turn — one drain, weight or reload for
//! every LB node behind the same ECMP router (their admin APIs listen on
//! loopback; reach them through SSH forwards) — and fails if any failed.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::bail;
use serde_json::Value;
use smtp_lb_common::DEFAULT_PIN_DIR;

use super::table::{self, cell};
use crate::{admin::client::Client, dataplane::read_stats};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The balancer's admin API; repeat (or separate with commas) to run
    /// the command on several balancers in turn.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:9700",
        value_delimiter = ','
    )]
    pub admin: Vec<SocketAddr>,
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
    /// This LB node as the ECMP routers see it (`[announce]`).
    #[command(subcommand)]
    Node(NodeCommand),
    /// The relay: queues by destination, show, retry, bounce, delete (via the relay's admin listener).
    Relay(super::relay::CtlOptions),
    /// Follow one client connection (`CLIENT_IP:PORT`) or message id: its
    /// relay, the messages the session submitted, each one's provider
    /// queue, egress source and delivery replies.
    Trace(super::trace::Options),
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Withdraw the VIPs from the routers: new sessions go to the other
    /// nodes, sessions already here complete.
    Drain,
    /// Announce the VIPs again (while the node is healthy).
    Undrain,
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "main hands over the parsed options"
)]
pub fn run(opts: Options) -> anyhow::Result<()> {
    match &opts.command {
        Command::Stats { pin_dir } => return stats(pin_dir, opts.json),
        Command::Relay(relay) => return super::relay::ctl(relay, opts.json),
        Command::Trace(trace) => {
            return super::trace::run(trace, &relay_names(&opts), opts.json);
        }
        _ => {}
    }
    let many = opts.admin.len() > 1;
    let mut failed = Vec::new();
    for admin in &opts.admin {
        if many && !opts.json {
            println!("== {admin}");
        }
        if let Err(e) = run_on(&opts, *admin) {
            if !many {
                return Err(e);
            }
            eprintln!("smtp-lb: {admin}: {e:#}");
            failed.push(admin.to_string());
        }
    }
    if !failed.is_empty() {
        bail!(
            "failed on {} of {} balancers: {}",
            failed.len(),
            opts.admin.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Runs the command on the balancer whose admin API is `admin`.
fn run_on(opts: &Options, admin: SocketAddr) -> anyhow::Result<()> {
    let call = |method: &str, segments: &[&str], query: &[(&str, &str)]| {
        call(opts, admin, method, segments, query)
    };
    let post = |segments: &[&str], query: &[(&str, &str)]| call("POST", segments, query);
    match &opts.command {
        Command::Stats { .. } | Command::Relay(_) | Command::Trace(_) => {
            unreachable!("handled by run")
        }
        Command::Status => show(opts, &call("GET", &["status"], &[])?),
        Command::Backends => backends(opts, &call("GET", &["backends"], &[])?),
        Command::Drain { name } => ok(opts, &post(&["backends", name, "drain"], &[])?),
        Command::Undrain { name } => ok(opts, &post(&["backends", name, "undrain"], &[])?),
        Command::Weight { name, weight } => ok(
            opts,
            &post(&["backends", name, "weight"], &[("value", weight)])?,
        ),
        Command::Where { service, client } => {
            let values = [
                service.ip().to_string(),
                service.port().to_string(),
                client.ip().to_string(),
                client.port().to_string(),
            ];
            let query = [
                ("vip", values[0].as_str()),
                ("port", &values[1]),
                ("client", &values[2]),
                ("cport", &values[3]),
            ];
            show(opts, &call("GET", &["where"], &query)?)
        }
        Command::Reload => ok(opts, &post(&["reload"], &[])?),
        Command::Node(NodeCommand::Drain) => ok(opts, &post(&["node", "drain"], &[])?),
        Command::Node(NodeCommand::Undrain) => ok(opts, &post(&["node", "undrain"], &[])?),
    }
}

/// The relays' names by address, from the daemon (empty when it does not
/// answer: `ctl trace` works from the pinned maps alone, naming addresses).
fn relay_names(opts: &Options) -> BTreeMap<IpAddr, String> {
    let Some(&admin) = opts.admin.first() else {
        return BTreeMap::new();
    };
    let Ok(v) = call(opts, admin, "GET", &["backends"], &[]) else {
        return BTreeMap::new();
    };
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let addr = b["address"].as_str()?.parse().ok()?;
            Some((addr, b["names"][0].as_str()?.to_owned()))
        })
        .collect()
}

/// Calls the admin API; a non-2xx answer becomes an error with its message.
fn call(
    opts: &Options,
    admin: SocketAddr,
    method: &str,
    segments: &[&str],
    query: &[(&str, &str)],
) -> anyhow::Result<Value> {
    let client = Client::with_token_file(admin, &opts.token_file)?;
    let answer = match method {
        "POST" => client.post(segments, query),
        _ => client.get(segments, query),
    }
    .map_err(|e| e.context(format!("admin API at {admin} (is `smtp-lb lb` running?)")))?;
    if !answer.ok() {
        bail!("{} (HTTP {})", answer.message(), answer.status);
    }
    Ok(answer.json())
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

/// Each port's last health check, `PORT: ok 3ms` or `PORT: <error>`; `-` before the first.
fn last_checks(backend: &Value) -> String {
    let checks: Vec<String> = backend["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let h = c["history"].get(0)?;
            let result = h["error"]
                .as_str()
                .map_or_else(|| format!("ok {}ms", cell(&h["took_ms"])), str::to_owned);
            Some(format!("{}: {result}", cell(&c["port"])))
        })
        .collect();
    if checks.is_empty() {
        "-".to_owned()
    } else {
        checks.join(", ")
    }
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
    let mut t = table::new(
        &[
            "NAME",
            "ADDRESS",
            "HEALTH",
            "WEIGHT",
            "EFFECTIVE",
            "SHARE",
            "DRAINED",
            "FEEDBACK",
            "NEW FLOWS",
            "LIVE",
            "LAST CHECK",
        ],
        &["WEIGHT", "EFFECTIVE", "SHARE", "NEW FLOWS", "LIVE"],
    );
    for b in v.as_array().into_iter().flatten() {
        let weight = b["weight_override"]
            .as_u64()
            .map_or_else(|| cell(&b["configured_weight"]), |w| format!("{w}*"));
        let last = last_checks(b);
        let share = b["share_permille"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |p| format!("{:.1}%", p / 10.0));
        let fb = &b["feedback"];
        let feedback = fb["share_permille"].as_f64().map_or_else(
            || "-".to_owned(),
            |p| {
                let deferred = fb["deferral_permille"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |d| format!("{:.0}%", d / 10.0));
                format!("{:.0}% q={} def={deferred}", p / 10.0, cell(&fb["queue"]))
            },
        );
        t.add_row([
            cell(&b["names"]),
            cell(&b["address"]),
            cell(&b["health"]),
            weight,
            cell(&b["effective_weight"]),
            share,
            cell(&b["drained"]),
            feedback,
            cell(&b["new_flows"]),
            cell(&b["live_flows"]),
            last,
        ]);
    }
    table::print(&t);
    Ok(())
}

fn stats(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let snap = read_stats(pin_dir)?;
    if json {
        println!("{}", serde_json::to_string(&snap)?);
        return Ok(());
    }
    let mut t = table::new(&["COUNTER", "VALUE"], &["VALUE"]);
    for (k, v) in &snap.global {
        t.add_row([(*k).to_owned(), v.to_string()]);
    }
    table::print(&t);
    if !snap.services.is_empty() {
        let mut t = table::new(
            &[
                "ID",
                "SERVICE",
                "PACKETS",
                "BYTES",
                "NEW FLOWS",
                "NO BACKEND",
            ],
            &["ID", "PACKETS", "BYTES", "NEW FLOWS", "NO BACKEND"],
        );
        for s in &snap.services {
            t.add_row([
                s.id.to_string(),
                SocketAddr::new(s.vip, s.port).to_string(),
                s.packets.to_string(),
                s.bytes.to_string(),
                s.new_flows.to_string(),
                s.no_backend.to_string(),
            ]);
        }
        println!();
        table::print(&t);
    }
    if !snap.backends.is_empty() {
        let mut t = table::new(
            &["ID", "BACKEND", "VALID", "PACKETS", "BYTES", "NEW FLOWS"],
            &["ID", "PACKETS", "BYTES", "NEW FLOWS"],
        );
        for b in &snap.backends {
            t.add_row([
                b.id.to_string(),
                b.address.to_string(),
                if b.valid { "yes" } else { "no" }.to_owned(),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.new_flows.to_string(),
            ]);
        }
        println!();
        table::print(&t);
    }
    Ok(())
}
