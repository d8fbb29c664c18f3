//! `cargo xtask build`: the eBPF object first, then `smtp-lb` embedding it.
use std::path::PathBuf;

use anyhow::Context;

use crate::{
    setup,
    util::{cargo, run_cmd, workspace_root},
};

#[derive(Debug, clap::Args)]
pub struct Options {}

/// What a build produced.
pub struct Artifacts {
    /// The eBPF object (ELF with BTF).
    pub ebpf_object: PathBuf,
    /// The `smtp-lb` binary.
    pub binary: PathBuf,
}

pub fn run(_opts: &Options) -> anyhow::Result<Artifacts> {
    // A production node gets the toolchain and bpftool, never the test peers.
    setup::ensure(setup::Role::Production, false)?;
    let ebpf_object = build_ebpf()?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--package",
        "smtp-lb-user",
        "--bin",
        "smtp-lb",
    ])
    .env("SMTP_LB_EBPF_OBJ", &ebpf_object);
    run_cmd(&mut cmd)?;
    Ok(Artifacts {
        ebpf_object,
        binary: workspace_root().join("target/release/smtp-lb"),
    })
}

/// Builds `smtp-lb-ebpf` with nightly for `bpfel-unknown-none`; its own
/// target dir keeps nightly artifacts apart from the stable ones.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    build_ebpf_variant("ebpf", &[])
}

/// The object with the cost probes `bench xdp` measures (feature `probes`),
/// in a target dir of its own so it never replaces the shipped object.
pub fn build_ebpf_probes() -> anyhow::Result<PathBuf> {
    build_ebpf_variant("ebpf-probes", &["--features", "probes"])
}

fn build_ebpf_variant(dir: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
    let target_dir = workspace_root().join("target").join(dir);
    let mut cmd = cargo();
    cmd.args([
        "+nightly",
        "build",
        "--package",
        "smtp-lb-ebpf",
        "--release",
    ])
    .args(extra)
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    // debuginfo=2 + --btf: bpf-linker emits BTF, so maps have named fields.
    .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    run_cmd(&mut cmd).context(
        "building the eBPF crate (nightly + bpf-linker; `cargo xtask setup` installs them)",
    )?;
    Ok(target_dir.join("bpfel-unknown-none/release/smtp-lb"))
}

/// Environment every later cargo invocation needs so it embeds the same object.
pub fn env(artifacts: &Artifacts) -> [(&'static str, PathBuf); 2] {
    [
        ("SMTP_LB_EBPF_OBJ", artifacts.ebpf_object.clone()),
        ("SMTP_LB_BIN", artifacts.binary.clone()),
    ]
}
