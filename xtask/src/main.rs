//! `cargo xtask`: the project's workflows, one module per subcommand.
mod bench;
mod build;
mod fuzz;
mod lab;
mod load;
mod package;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "smtp-lb developer workflows")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the lab and tests need (`--production`: only what an LB node needs); idempotent.
    Setup(setup::Options),
    /// Build the eBPF object and the `smtp-lb` binary that embeds it.
    Build(build::Options),
    /// Build, then load, attach and pin the balancer on an interface until Ctrl-C.
    BuildAndLoad(load::Options),
    /// Run the self-contained lab: namespaces, clients, balancer, relays, sinks.
    Lab(lab::Options),
    /// Set up, build, and run every test tier (unit, loopback, privileged).
    Test(test::Options),
    /// Run a benchmark; prints a table and writes target/bench/<name>.json.
    Bench(bench::Options),
    /// Run the fuzz targets (libFuzzer, nightly), one or all, N seconds each; fails on a crash.
    Fuzz(fuzz::Options),
    /// Build the Debian package (target/package/smtp-lb_VERSION_ARCH.deb); --check installs,
    /// verifies and purges it.
    Package(package::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(o) => setup::run(&o),
        Command::Build(o) => build::run(&o).map(|_| ()),
        Command::BuildAndLoad(o) => load::run(&o),
        Command::Lab(o) => lab::run(&o),
        Command::Test(o) => test::run(&o),
        Command::Bench(o) => bench::run(&o),
        Command::Fuzz(o) => fuzz::run(&o),
        Command::Package(o) => package::run(&o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}
