//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs the cargo-fuzz targets of
//! `fuzz/` (libFuzzer), one or all in turn, N seconds each. Each starts from
//! its committed seeds (`fuzz/corpus/<target>/`) and what earlier runs found
//! (`fuzz/target/corpus/<target>/`, where new inputs go; not committed).
//! Prints each target's executions per second and coverage, and fails on the
//! first crash, naming the input libFuzzer saved (`fuzz/artifacts/<target>/`).
//!
//! Built without a sanitizer: the code under test is safe Rust, so what a
//! target can find is a panic (assertions, overflow, bounds), which the
//! build's debug assertions catch; `AddressSanitizer` would halve the rate.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::Stdio,
};

use anyhow::{Context, bail};

use crate::{
    setup,
    util::{cargo, describe, run_cmd, workspace_root},
};

/// The targets, in the order `cargo xtask fuzz` runs them (`fuzz/Cargo.toml`).
const TARGETS: &[&str] = &["smtp_command", "smtp_reply", "data_reader", "spool_record"];

#[derive(Debug, clap::Args)]
pub struct Options {
    /// One target (default: all, in turn).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

/// What libFuzzer reported at the end of one run.
#[derive(Debug, Default)]
struct Stats {
    execs: u64,
    execs_per_sec: u64,
    /// The last status line: `cov: … ft: … corp: N/size …`.
    status: String,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::ensure_fuzz()?;
    let root = workspace_root();
    let fuzz = root.join("fuzz");
    let targets: Vec<&str> = match &opts.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    let mut build = cargo();
    build.args(["+nightly", "fuzz", "build", "--sanitizer", "none"]);
    if let [one] = targets.as_slice() {
        build.arg(one);
    }
    run_cmd(&mut build).context("building the fuzz targets")?;
    let mut results = Vec::new();
    for target in targets {
        println!("\n=== fuzz {target}: {} s ===", opts.seconds);
        let stats = fuzz_one(&fuzz, target, opts.seconds)?;
        results.push((target, stats));
    }
    println!("\nfuzz: {} s per target, no crash", opts.seconds);
    for (target, s) in &results {
        println!(
            "  {target:<14} {:>12} execs  {:>8} execs/s  {}",
            s.execs, s.execs_per_sec, s.status
        );
    }
    Ok(())
}

/// Runs one target; its full libFuzzer log goes to `fuzz/target/<target>.log`,
/// the status lines to the terminal.
fn fuzz_one(fuzz: &Path, target: &str, seconds: u64) -> anyhow::Result<Stats> {
    let found = fuzz.join("target/corpus").join(target);
    fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
    let log_path = fuzz.join(format!("target/{target}.log"));
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = cargo();
    cmd.args(["+nightly", "fuzz", "run", "--sanitizer", "none", target])
        .arg(&found)
        .arg(fuzz.join("corpus").join(target))
        .args([
            "--".to_owned(),
            format!("-max_total_time={seconds}"),
            "-print_final_stats=1".to_owned(),
        ])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{}`", describe(&cmd)))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut stats = Stats::default();
    let mut artifact = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading libFuzzer's output")?;
        writeln!(log, "{line}")?;
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.execs = n.trim().parse().unwrap_or_default();
        } else if let Some(n) = line.strip_prefix("stat::average_exec_per_sec:") {
            stats.execs_per_sec = n.trim().parse().unwrap_or_default();
        } else if let Some(path) = line.split("Test unit written to ").nth(1) {
            artifact = Some(path.trim().to_owned());
        }
        if let Some(i) = line.find("cov: ") {
            line[i..].clone_into(&mut stats.status);
        }
        // Progress lines start with `#N`; show the periodic and final ones
        // and everything else (start-up, panics, crash reports).
        if !line.starts_with('#') || line.contains("pulse") || line.contains("DONE") {
            eprintln!("{line}");
        }
    }
    let exit = child.wait()?;
    if !exit.success() {
        let Some(artifact) = artifact else {
            bail!(
                "fuzz target {target} failed ({exit}); see {}",
                log_path.display()
            );
        };
        bail!(
            "fuzz target {target} crashed; the input is {artifact}, the log {}.\n\
             Reproduce: cargo +nightly fuzz run --sanitizer none {target} {artifact}\n\
             Then make it a unit test next to the code it broke.",
            log_path.display()
        );
    }
    println!(
        "{target}: {} execs in {seconds} s, {} execs/s; {}",
        stats.execs, stats.execs_per_sec, stats.status
    );
    Ok(stats)
}
