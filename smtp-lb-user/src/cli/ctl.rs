//! `smtp-lb ctl`: the operator's view.
use std::path::PathBuf;

use smtp_lb_common::DEFAULT_PIN_DIR;

use super::{NotImplemented, Unimplemented};
use crate::dataplane::read_global_stats;

#[derive(Debug, clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Global data-plane counters, read from the pinned maps (works without the daemon).
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
    /// Relay queues by destination.
    Queues(Unimplemented),
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    match opts.command {
        Command::Stats { pin_dir, json } => {
            let s = read_global_stats(&pin_dir)?;
            let rows = s.fields();
            if json {
                let map: serde_json::Map<_, _> = rows
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).into()))
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (k, v) in rows {
                    println!("{k:<18} {v:>14}");
                }
            }
            Ok(())
        }
        Command::Backends(_) => Err(NotImplemented("ctl backends").into()),
        Command::Drain(_) => Err(NotImplemented("ctl drain").into()),
        Command::Where(_) => Err(NotImplemented("ctl where").into()),
        Command::Reload(_) => Err(NotImplemented("ctl reload").into()),
        Command::Queues(_) => Err(NotImplemented("ctl queues").into()),
    }
}
