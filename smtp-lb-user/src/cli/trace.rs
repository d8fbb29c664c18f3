//! `smtp-lb ctl trace`: one client connection followed from the balancer
//! to its relay and on to the providers. The flow's relay comes from the
//! pinned flow table (as `ctl where` reads it); the messages that session
//! submitted, with each attempt's provider queue, egress source and reply,
//! from that relay's admin API (`GET /trace`). With a message id instead,
//! every relay in the data plane is asked for it.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::Context;
use serde_json::{Value, json};
use smtp_lb_common::DEFAULT_PIN_DIR;

use super::table::{self, cell};
use crate::{
    admin::client::Client,
    dataplane::{client_flows, read_stats},
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The SMTP client's address and port (`198.51.100.7:40312`, `[2001:db8::7]:40312`),
    /// or a message id (16 hex digits, as the relay's `250 … queued as` names it).
    pub target: String,
    /// bpffs directory the balancer pinned its maps in.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Port of each relay's admin API on the relay's own address (its
    /// `admin`, served beyond loopback with `admin_allow_remote = true`).
    #[arg(long, default_value_t = 8025)]
    pub relay_admin_port: u16,
    /// File with the relays' admin token.
    #[arg(
        long,
        default_value = "/var/spool/smtp-lb/admin.token",
        env = "SMTP_LB_RELAY_TOKEN_FILE"
    )]
    pub relay_token_file: PathBuf,
}

/// Runs `ctl trace`; `names` are the relays' names by address (empty when
/// the balancer daemon did not answer).
pub fn run(opts: &Options, names: &BTreeMap<IpAddr, String>, json_out: bool) -> anyhow::Result<()> {
    let name = |a: IpAddr| names.get(&a).cloned().unwrap_or_else(|| a.to_string());
    let mut relays: Vec<IpAddr> = Vec::new();
    let mut out = json!({});
    let query: (&str, String) = if let Ok(client) = opts.target.parse::<SocketAddr>() {
        let flows = client_flows(&opts.pin_dir, client)
            .with_context(|| format!("read the flows from {}", opts.pin_dir.display()))?;
        anyhow::ensure!(
            !flows.is_empty(),
            "no tracked flow from {client} (never seen, or its flow table way went to a newer flow)"
        );
        let mut rows = Vec::new();
        for f in &flows {
            let state = match (f.closing, f.moved) {
                (false, false) => "open",
                (true, _) => "closing",
                (false, true) => "open (in MOVED_FLOWS)",
            };
            if !json_out {
                println!(
                    "flow {client} -> {}: relay {} ({}), {state}{}",
                    f.vip,
                    name(f.address),
                    f.address,
                    if f.valid { "" } else { ", relay removed" }
                );
            }
            rows.push(json!({
                "vip": f.vip, "relay": name(f.address), "address": f.address,
                "state": state, "valid": f.valid,
            }));
            if !relays.contains(&f.address) {
                relays.push(f.address);
            }
        }
        out["client"] = json!(client);
        out["flows"] = json!(rows);
        ("client", client.to_string())
    } else if opts.target.len() == 16 && u64::from_str_radix(&opts.target, 16).is_ok() {
        let stats = read_stats(&opts.pin_dir)
            .with_context(|| format!("read the relays from {}", opts.pin_dir.display()))?;
        relays = stats
            .backends
            .iter()
            .filter(|b| b.valid)
            .map(|b| b.address)
            .collect();
        out["id"] = json!(opts.target);
        ("id", opts.target.clone())
    } else {
        anyhow::bail!(
            "`{}` is neither CLIENT_IP:PORT nor a message id (16 hex digits)",
            opts.target
        );
    };

    let mut messages = Vec::new();
    for addr in relays {
        let admin = SocketAddr::new(addr, opts.relay_admin_port);
        let answer = Client::with_token_file(admin, &opts.relay_token_file)?
            .get(&["trace"], &[(query.0, &query.1)])
            .with_context(|| {
                format!(
                    "relay {} admin API at {admin} (`admin` on its own address, `admin_allow_remote = true`)",
                    name(addr)
                )
            })?;
        anyhow::ensure!(
            answer.ok(),
            "relay {} answered {}: {}",
            name(addr),
            answer.status,
            answer.message()
        );
        let v = answer.json();
        if v["truncated"] == json!(true) && !json_out {
            println!("relay {}: more messages than one answer lists", name(addr));
        }
        for m in v["messages"].as_array().into_iter().flatten() {
            if !json_out {
                print_message(&name(addr), m);
            }
            let mut m = m.clone();
            m["relay"] = json!(name(addr));
            messages.push(m);
        }
    }
    if json_out {
        out["messages"] = Value::Array(messages);
        println!("{out}");
    } else if messages.is_empty() {
        println!("no message from this session on its relay (none sent, or forgotten)");
    }
    Ok(())
}

fn print_message(relay: &str, m: &Value) {
    println!(
        "message {} on relay {relay}, from {}",
        cell(&m["id"]),
        cell(&m["client"])
    );
    let mut t = table::new(
        &[
            "  RCPT",
            "STATUS",
            "PROVIDER",
            "QUEUE",
            "SOURCE",
            "SOURCE IP",
            "MX",
            "TRY",
            "REPLY",
        ],
        &["TRY"],
    );
    for a in m["attempts"].as_array().into_iter().flatten() {
        let reply = match &a["enhanced"] {
            Value::String(e) => format!("{} {e} {}", cell(&a["code"]), cell(&a["text"])),
            _ => format!("{} {}", cell(&a["code"]), cell(&a["text"])),
        };
        t.add_row([
            format!("  {}", cell(&a["rcpt"])),
            cell(&a["status"]),
            cell(&a["provider"]),
            cell(&a["queue"]),
            cell(&a["source"]),
            cell(&a["source_ip"]),
            cell(&a["mx"]),
            cell(&a["attempt"]),
            reply,
        ]);
    }
    table::print(&t);
    if m["attempts"].as_array().is_none_or(Vec::is_empty) {
        println!("  (no delivery attempt yet)");
    }
}
