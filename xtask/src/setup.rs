//! `cargo xtask setup`: installs what the workflows need, in two sets.
//! Idempotent; prints nothing when all is present.
//!
//! - [`Role::Production`]: what a production LB node needs to build and run
//!   the balancer (`cargo xtask build`, `build-and-load`): the eBPF toolchain
//!   (nightly `rust-src`, `bpf-linker`) and `bpftool` to inspect the pinned maps.
//! - [`Role::Lab`]: that, plus the real peers the lab, the tests and the
//!   benchmarks run (Postfix, swaks, dnsmasq, Redis, `HAProxy`, dkimpy, …).
//!   Never installed on a production node.
use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{describe, require_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only what a production LB node needs (the set `build-and-load` installs).
    #[arg(long)]
    production: bool,
    /// List every item of the set and whether it is present; install nothing.
    #[arg(long)]
    dry_run: bool,
    /// Say what is checked even when nothing needs installing.
    #[arg(long)]
    verbose: bool,
}

/// Which machine a workflow prepares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An LB node: build and run the balancer, nothing else.
    Production,
    /// A development or CI machine: the lab, the tests and the benchmarks too.
    Lab,
}

/// bpf-linker 0.10 links with the Rust toolchain's own LLVM; newer ones need a
/// system LLVM >= 21 that Debian 12 lacks.
const BPF_LINKER_VERSION: &str = "0.10.0";

/// cargo-fuzz, which builds and runs the libFuzzer targets of `cargo xtask fuzz`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// (command that must exist, Debian package that provides it) on every node:
/// `bpftool` to inspect the pinned maps, bird2 for `[announce]` (the balancer
/// runs `bird` to announce the VIP over BGP to an ECMP router; docs/lb.md).
const PRODUCTION_PACKAGES: &[(&str, &str)] = &[("bpftool", "bpftool"), ("bird", "bird2")];

/// (command that must exist, Debian package that provides it): the lab's
/// plumbing and the real peers of the lab, the tests and the benchmarks.
const LAB_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
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
    // `lab --keep` prints a socat forward that brings the dashboard to this host.
    ("socat", "socat"),
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

/// One Debian package of a set: what must be present, and the package.
struct Package {
    /// `command X`, `perl module X` or `python module X`.
    check: String,
    /// The Debian package that provides it.
    deb: &'static str,
    /// Whether `name` is present.
    present: fn(&str) -> bool,
    name: &'static str,
}

/// The Debian packages of `role`'s set, in install order.
fn packages_of(role: Role) -> Vec<Package> {
    let cmd = |(name, package): &(&'static str, &'static str)| Package {
        check: format!("command {name}"),
        deb: package,
        present: on_path,
        name,
    };
    let mut set: Vec<Package> = PRODUCTION_PACKAGES.iter().map(cmd).collect();
    if role == Role::Lab {
        set.extend(LAB_PACKAGES.iter().map(cmd));
        set.extend(PERL_MODULES.iter().map(|(name, package)| Package {
            check: format!("perl module {name}"),
            deb: package,
            present: perl_module_present,
            name,
        }));
        set.extend(PYTHON_MODULES.iter().map(|(name, package)| Package {
            check: format!("python module {name}"),
            deb: package,
            present: python_module_present,
            name,
        }));
    }
    set
}

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
    let role = if opts.production {
        Role::Production
    } else {
        Role::Lab
    };
    if opts.dry_run {
        dry_run(role);
        return Ok(());
    }
    ensure(role, opts.verbose)
}

/// What every other workflow calls first: `build` with
/// [`Role::Production`], the lab, tests and benchmarks with [`Role::Lab`].
pub fn ensure(role: Role, verbose: bool) -> anyhow::Result<()> {
    rust_src(verbose)?;
    bpf_linker(verbose)?;
    packages(role, verbose)?;
    Ok(())
}

/// Prints the set, one item a line, and whether each is present.
fn dry_run(role: Role) {
    let state = |present: bool| if present { "present" } else { "missing" };
    match role {
        Role::Production => println!(
            "the production set (what `cargo xtask build` and `build-and-load` install); nothing installed:"
        ),
        Role::Lab => println!(
            "the lab set (what `cargo xtask lab`, `test` and `bench` install); nothing installed:"
        ),
    }
    println!(
        "  rustup toolchain nightly + component rust-src  {}",
        state(nightly_rust_src_present())
    );
    println!(
        "  cargo install bpf-linker@{BPF_LINKER_VERSION}  {}",
        state(bpf_linker_present())
    );
    for p in packages_of(role) {
        println!(
            "  Debian package {:<22} ({}) {}",
            p.deb,
            p.check,
            state((p.present)(p.name))
        );
    }
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

fn nightly_rust_src_present() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_ok_and(|out| out.lines().any(|l| l.starts_with("rust-src")))
}

/// The nightly toolchain: it builds the eBPF crate and the fuzz targets.
fn nightly() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        install(
            "the nightly toolchain (builds the eBPF crate and the fuzz targets)",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    Ok(())
}

fn rust_src(verbose: bool) -> anyhow::Result<()> {
    nightly()?;
    if nightly_rust_src_present() {
        if verbose {
            eprintln!("setup: nightly rust-src present");
        }
        return Ok(());
    }
    install(
        "nightly rust-src",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

/// What `cargo xtask fuzz` needs: the nightly toolchain and cargo-fuzz.
pub fn ensure_fuzz() -> anyhow::Result<()> {
    nightly()?;
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION));
    if present {
        return Ok(());
    }
    install(
        &format!("cargo-fuzz {CARGO_FUZZ_VERSION}"),
        Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]),
    )
}

fn bpf_linker_present() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
}

fn bpf_linker(verbose: bool) -> anyhow::Result<()> {
    if bpf_linker_present() {
        if verbose {
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

fn packages(role: Role, verbose: bool) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = packages_of(role)
        .iter()
        .filter(|p| !(p.present)(p.name))
        .map(|p| p.deb)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        if verbose {
            eprintln!("setup: Debian packages of the {role:?} set present");
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
    // Likewise Debian's own bird.service: the balancer runs its own `bird`
    // with its own config and control socket (`[announce]`).
    if missing.contains(&"bird2") {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "bird.service"])
            .output();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Role, packages_of};

    /// The real peers of the lab and the tests (issue 13): none may reach a
    /// production node through `build-and-load`.
    const TEST_PEERS: &[&str] = &[
        "postfix",
        "swaks",
        "dnsmasq-base",
        "redis-server",
        "haproxy",
        "python3-dkim",
        "python3-nacl",
        "python3-dnspython",
        "libnet-ssleay-perl",
        "libio-socket-ssl-perl",
        "openssl",
    ];

    fn set(role: Role) -> Vec<&'static str> {
        packages_of(role).iter().map(|p| p.deb).collect()
    }

    #[test]
    fn the_production_set_holds_bpftool_bird2_and_no_test_peer() {
        let production = set(Role::Production);
        assert_eq!(production, ["bpftool", "bird2"]);
        for peer in TEST_PEERS {
            assert!(!production.contains(peer), "{peer} in the production set");
        }
    }

    #[test]
    fn the_lab_set_holds_the_production_set_and_every_test_peer() {
        let lab = set(Role::Lab);
        for p in set(Role::Production).iter().chain(TEST_PEERS) {
            assert!(lab.contains(p), "{p} missing from the lab set");
        }
    }
}
