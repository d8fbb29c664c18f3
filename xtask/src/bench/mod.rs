//! `cargo xtask bench <name>`: each benchmark is a module that measures its
//! subject and a peer (or floor) in the same run and returns a [`Report`];
//! this module prints it as a table and writes `target/bench/<name>.json`,
//! one flat JSON object of named numbers.
mod lb;
mod maglev;
mod relay;
mod report;
mod shaping;
mod xdp;

use anyhow::Context;
pub use report::{Report, median};

use crate::{build, setup, util::workspace_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Which benchmark to run.
    #[arg(value_enum)]
    name: Name,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Name {
    /// Per-packet cost of the XDP program via `BPF_PROG_TEST_RUN`, against an empty program.
    Xdp,
    /// Maglev table build time, balance and disruption.
    Maglev,
    /// End to end through the lab: direct, `HAProxy`, smtp-lb.
    Lb,
    /// smtp-source → relay → smtp-sink against Postfix as a relay and smtp-source → smtp-sink.
    Relay,
    /// Configured vs delivered rates per provider, and isolation.
    Shaping,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::ensure(setup::Role::Lab, false)?;
    let (name, report) = match opts.name {
        Name::Xdp => (
            "xdp",
            xdp::run(&build::build_ebpf()?, &build::build_ebpf_probes()?)?,
        ),
        Name::Maglev => ("maglev", maglev::run()),
        Name::Lb => (
            "lb",
            lb::run(
                &build::run(&build::Options {})?,
                &build::build_ebpf_probes()?,
            )?,
        ),
        Name::Relay => ("relay", relay::run(&build::run(&build::Options {})?)?),
        Name::Shaping => ("shaping", shaping::run(&build::run(&build::Options {})?)?),
    };
    report.print(name);
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, report.to_json()).with_context(|| format!("write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
