//! `cargo xtask test`: set up, build, then run the three test tiers with the
//! normal cargo test output:
//! 1. unit: pure logic next to the code (`--lib --bins` of every crate);
//! 2. loopback: `tests/tests/loopback_*.rs`, real peers on 127.0.0.1;
//! 3. privileged: `tests/tests/privileged_*.rs`, namespaces, XDP, bpffs.
//!
//! A failing run ends with the list of failed tests, where a truncated log
//! still shows them.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{
    build, setup,
    util::{cargo, describe, require_root},
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
    let mut failed_tests = Vec::new();
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
        if let Err(err) = run_tests(&mut cmd, &mut failed_tests) {
            eprintln!("tier {tier:?} failed: {err:#}");
            failed.push(tier);
        }
    }
    if !failed.is_empty() {
        // Repeated at the end, where a truncated log still shows it.
        println!("\nfailed tests:");
        for test in &failed_tests {
            println!("  {test}");
        }
        bail!("failed tiers: {failed:?}");
    }
    println!("\nall tiers passed");
    Ok(())
}

/// Runs `cmd` (a `cargo test`), echoing its output and noting each failed
/// test as `binary: test name`. Cargo names each binary on stderr and the
/// tests report on stdout, so both go through one pipe, in order.
fn run_tests(cmd: &mut Command, failed: &mut Vec<String>) -> anyhow::Result<()> {
    let (reader, writer) = std::io::pipe()?;
    let mut child = cmd
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    // Our copies of the write end are gone with `cmd`'s: EOF when cargo exits.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut binary = String::new();
    for line in BufReader::new(reader).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        println!("{line}");
        let _ = std::io::stdout().flush();
        if let Some(running) = line.trim_start().strip_prefix("Running ") {
            running
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .clone_into(&mut binary);
        } else if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|t| t.strip_suffix(" ... FAILED"))
        {
            failed.push(format!("{binary}: {test}"));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}
