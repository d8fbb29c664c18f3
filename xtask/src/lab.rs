//! `cargo xtask lab`: the main job. Sets up, builds, then runs the lab story
//! (see `smtp_lb_tests::scenario`) and prints what happened.
use crate::{build, util::require_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// SMTP sessions the client sends.
    #[arg(long, default_value_t = 500)]
    sessions: u32,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("`cargo xtask lab`")?;
    let artifacts = build::run(&build::Options {})?;
    for (k, v) in build::env(&artifacts) {
        // SAFETY: single-threaded at this point; the harness reads these later.
        unsafe { std::env::set_var(k, v) };
    }
    let outcome = smtp_lb_tests::scenario::smtp_through_lb(opts.sessions, &mut |line| {
        println!("lab: {line}");
    });
    println!("\nXDP counters on the LB node (summed over CPUs):");
    for (name, value) in &outcome.counters {
        println!("  {name:<12} {value:>10}");
    }
    println!(
        "\n{} SMTP sessions sent, {} messages received by the relay; lab torn down.",
        outcome.sessions, outcome.delivered
    );
    Ok(())
}
