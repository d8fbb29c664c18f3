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
    /// `xdp` only: compare the balancer with this eBPF object (an earlier
    /// build's `target/ebpf/bpfel-unknown-none/release/smtp-lb`, copied
    /// aside), paired round by round; writes `xdp-against.json`.
    #[arg(long, value_name = "OBJECT")]
    against: Option<std::path::PathBuf>,
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
    if opts.against.is_some() && !matches!(opts.name, Name::Xdp) {
        anyhow::bail!("--against applies to `bench xdp` only");
    }
    let (name, report) = match (opts.name, &opts.against) {
        (Name::Xdp, Some(against)) => {
            anyhow::ensure!(
                against.is_file(),
                "--against {}: no such file",
                against.display()
            );
            (
                "xdp-against",
                xdp::run_against(&build::build_ebpf()?, against, &build::build_ebpf_probes()?)?,
            )
        }
        (Name::Xdp, None) => (
            "xdp",
            xdp::run(&build::build_ebpf()?, &build::build_ebpf_probes()?)?,
        ),
        (Name::Maglev, _) => ("maglev", maglev::run()),
        (Name::Lb, _) => (
            "lb",
            lb::run(
                &build::run(&build::Options {})?,
                &build::build_ebpf_probes()?,
            )?,
        ),
        (Name::Relay, _) => ("relay", relay::run(&build::run(&build::Options {})?)?),
        (Name::Shaping, _) => ("shaping", shaping::run(&build::run(&build::Options {})?)?),
    };
    report.print(name);
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, report.to_json()).with_context(|| format!("write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
