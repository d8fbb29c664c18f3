//! `smtp-lb ctl`: the operator's view.
use std::path::PathBuf;

use smtp_lb_common::DEFAULT_PIN_DIR;

use super::{NotImplemented, Unimplemented};
use crate::dataplane::read_stats;

#[derive(Debug, clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Data-plane counters (global by reason, per service, per backend), read
    /// from the pinned maps (works without the daemon).
    Stats {
        /// bpffs directory the balancer pinned its maps in.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Backends per service with state, weights and flow counts.
    Backends(Unimplemented),
    /// Stop new flows to a backend; existing ones finish.
    Drain(Unimplemented),
    /// Which backend a new connection from a client would go to.
    Where(Unimplemented),
    /// Re-read and apply the configuration.
    Reload(Unimplemented),
    /// The relay: queues by destination, show, retry, bounce, delete (via its admin listener).
    Relay(super::relay::CtlOptions),
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    match opts.command {
        Command::Stats { pin_dir, json } => {
            let snap = read_stats(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string(&snap)?);
            } else {
                for (k, v) in &snap.global {
                    println!("{k:<18} {v:>14}");
                }
                println!("\n{:<4} {:<28} {:>12} {:>14} {:>10} {:>10}", "id", "service", "packets", "bytes", "new_flows", "no_backend");
                for r in &snap.services {
                    let svc = std::net::SocketAddr::new(r.vip, r.port).to_string();
                    println!("{:<4} {svc:<28} {:>12} {:>14} {:>10} {:>10}", r.id, r.packets, r.bytes, r.new_flows, r.no_backend);
                }
                println!("\n{:<4} {:<28} {:>12} {:>14} {:>10}", "id", "backend", "packets", "bytes", "new_flows");
                for r in &snap.backends {
                    let name = if r.valid { r.address.to_string() } else { format!("{} (removed)", r.address) };
                    println!("{:<4} {name:<28} {:>12} {:>14} {:>10}", r.id, r.packets, r.bytes, r.new_flows);
                }
            }
            Ok(())
        }
        Command::Backends(_) => Err(NotImplemented("ctl backends").into()),
        Command::Drain(_) => Err(NotImplemented("ctl drain").into()),
        Command::Where(_) => Err(NotImplemented("ctl where").into()),
        Command::Reload(_) => Err(NotImplemented("ctl reload").into()),
        Command::Relay(opts) => super::relay::ctl(&opts),
    }
}
