//! `cargo xtask setup`: installs the toolchain pieces and Debian packages the
//! build, lab and tests need. Idempotent; prints nothing when all is present.
use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{describe, require_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Say what is checked even when nothing needs installing.
    #[arg(long)]
    verbose: bool,
}

/// bpf-linker 0.10 links with the Rust toolchain's own LLVM; newer ones need a
/// system LLVM >= 21 that Debian 12 lacks.
const BPF_LINKER_VERSION: &str = "0.10.0";

/// (command that must exist, Debian package that provides it).
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("smtp-sink", "postfix"),
    ("smtp-source", "postfix"),
    ("postfix", "postfix"),
    ("swaks", "swaks"),
    ("dnsmasq", "dnsmasq-base"),
    ("redis-server", "redis-server"),
    ("haproxy", "haproxy"),
    ("ps", "procps"),
    ("ping", "iputils-ping"),
    // The relay tests make throwaway TLS certificates with it.
    ("openssl", "openssl"),
    // The monitoring tests: `promtool` checks and unit-tests the shipped alert
    // rules, a real Prometheus scrapes the lab, headless Chromium opens the
    // dashboard; `package --check` dry-runs the shipped logrotate snippet.
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("chromium", "chromium"),
    ("logrotate", "logrotate"),
    // Queries Prometheus' HTTP API and the metrics listeners inside the lab.
    ("curl", "curl"),
];

/// (Perl module that must load, Debian package that provides it): swaks
/// needs these for STARTTLS in the relay's interop tests.
const PERL_MODULES: &[(&str, &str)] = &[
    ("Net::SSLeay", "libnet-ssleay-perl"),
    ("IO::Socket::SSL", "libio-socket-ssl-perl"),
];

/// (Python module that must import in Debian's `/usr/bin/python3`, Debian
/// package that provides it): dkimpy is the independent DKIM verifier of the
/// relay's DKIM tests; it needs `PyNaCl` for Ed25519 and dnspython for DNS.
const PYTHON_MODULES: &[(&str, &str)] = &[
    ("dkim", "python3-dkim"),
    ("nacl.signing", "python3-nacl"),
    ("dns.resolver", "python3-dnspython"),
];

fn python_module_present(module: &str) -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn perl_module_present(module: &str) -> bool {
    Command::new("perl")
        .args([&format!("-M{module}"), "-e1"])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    ensure(opts)
}

/// What every other workflow calls first.
pub fn ensure(opts: &Options) -> anyhow::Result<()> {
    rust_src(opts)?;
    bpf_linker(opts)?;
    packages(opts)?;
    Ok(())
}

pub fn quiet() -> Options {
    Options { verbose: false }
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn install(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("setup: installing {what}: {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!(
            "could not install {what}: `{}` failed ({status})",
            describe(cmd)
        );
    }
    Ok(())
}

fn rust_src(opts: &Options) -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        install(
            "the nightly toolchain (builds the eBPF crate)",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        if opts.verbose {
            eprintln!("setup: nightly rust-src present");
        }
        return Ok(());
    }
    install(
        "nightly rust-src",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

fn bpf_linker(opts: &Options) -> anyhow::Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        if opts.verbose {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        }
        return Ok(());
    }
    install(
        &format!("bpf-linker {BPF_LINKER_VERSION}"),
        Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]),
    )
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(cmd).is_file())
    })
}

fn packages(opts: &Options) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.extend(
        PERL_MODULES
            .iter()
            .filter(|(m, _)| !perl_module_present(m))
            .map(|(_, pkg)| *pkg),
    );
    missing.extend(
        PYTHON_MODULES
            .iter()
            .filter(|(m, _)| !python_module_present(m))
            .map(|(_, pkg)| *pkg),
    );
    missing.dedup();
    if missing.is_empty() {
        if opts.verbose {
            eprintln!("setup: Debian packages present");
        }
        return Ok(());
    }
    require_root("installing Debian packages")?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd
    };
    install("the Debian package index", &mut apt(&["update", "-q"]))?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    install(&missing.join(" "), &mut apt(&args))?;
    // Installing postfix starts it on port 25 of the host; nothing here uses
    // that instance, and a host MTA is not ours to run.
    let _ = Command::new("postfix").arg("stop").output();
    Ok(())
}
