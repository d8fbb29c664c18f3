//! `cargo xtask lab`: the main job. Sets up, builds, then runs the lab story
//! (see `smtp_lb_tests::scenario`) and prints what happened.
use crate::{build, setup, util::require_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// SMTP sessions the client sends.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("`cargo xtask lab`")?;
    setup::ensure(setup::Role::Lab, false)?;
    let artifacts = build::run(&build::Options {})?;
    for (k, v) in build::env(&artifacts) {
        // SAFETY: single-threaded at this point; the harness reads these later.
        unsafe { std::env::set_var(k, v) };
    }
    let outcome = smtp_lb_tests::scenario::smtp_through_lb(opts.sessions, &mut |line| {
        println!("lab: {line}");
    });
    println!("\nXDP counters on the LB node (summed over CPUs):");
    for (name, value) in outcome.counters.iter().filter(|(_, v)| **v > 0) {
        println!("  {name:<18} {value:>10}");
    }
    println!("  (every other pass/drop reason: 0)");
    println!("\nrelays as the balancer saw them (`smtp-lb ctl backends`):");
    for b in outcome.backends.as_array().into_iter().flatten() {
        println!(
            "  {:<8} {:<14} health={} weight={} new_flows={} packets={}",
            b["names"][0].as_str().unwrap_or_default(),
            b["address"].as_str().unwrap_or_default(),
            b["health"].as_str().unwrap_or_default(),
            b["configured_weight"],
            b["new_flows"],
            b["packets"]
        );
    }
    println!(
        "\n{} SMTP sessions sent through the balancer, {} messages delivered to the ISPs; lab torn down.",
        outcome.sessions,
        outcome.per_isp.iter().map(|(_, n)| n).sum::<usize>()
    );
    Ok(())
}
