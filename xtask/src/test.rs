//! `cargo xtask test`: set up, build, then run the three test tiers with the
//! normal cargo test output:
//! 1. unit: pure logic next to the code (`--lib --bins` of every crate);
//! 2. loopback: `tests/tests/loopback_*.rs`, real peers on 127.0.0.1;
//! 3. privileged: `tests/tests/privileged_*.rs`, namespaces, XDP, bpffs.
use anyhow::bail;

use crate::{
    build, setup,
    util::{cargo, require_root, run_cmd},
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Run only this tier.
    #[arg(long, value_enum)]
    tier: Option<Tier>,
    /// Passed to the test binaries (a name filter, `--nocapture`, …).
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Tier {
    Unit,
    Loopback,
    Privileged,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("`cargo xtask test` (its privileged tier)")?;
    setup::ensure(setup::Role::Lab, false)?;
    let artifacts = build::run(&build::Options {})?;
    let mut failed = Vec::new();
    for tier in [Tier::Unit, Tier::Loopback, Tier::Privileged] {
        if opts.tier.is_some_and(|t| t != tier) {
            continue;
        }
        println!("\n=== tier: {tier:?} ===");
        let mut cmd = cargo();
        // Every test binary runs even when an earlier one failed.
        cmd.args(["test", "--release", "--no-fail-fast"]);
        match tier {
            Tier::Unit => cmd.args([
                "--workspace",
                "--exclude",
                "smtp-lb-ebpf",
                "--lib",
                "--bins",
            ]),
            Tier::Loopback => cmd.args(["--package", "smtp-lb-tests", "--test", "loopback_*"]),
            Tier::Privileged => cmd.args(["--package", "smtp-lb-tests", "--test", "privileged_*"]),
        };
        cmd.envs(build::env(&artifacts));
        if !opts.args.is_empty() {
            cmd.arg("--").args(&opts.args);
        }
        if let Err(err) = run_cmd(&mut cmd) {
            eprintln!("tier {tier:?} failed: {err:#}");
            failed.push(tier);
        }
    }
    if !failed.is_empty() {
        bail!("failed tiers: {failed:?}");
    }
    println!("\nall tiers passed");
    Ok(())
}
