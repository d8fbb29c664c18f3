//! `cargo xtask package`: the Debian package. The release binary (eBPF
//! embedded, from `cargo xtask build`), systemd units, default configs,
//! logrotate snippet, man pages and shell completions generated from the
//! real clap definition, the Prometheus rules and Grafana dashboard — staged
//! under `target/package/` and built with `dpkg-deb` (every Debian system
//! has it; no packaging tool to install).
//!
//! `--check` then proves the package on this machine: `dpkg -i`,
//! `smtp-lb --version`, `man smtp-lb`, `systemd-analyze verify` on the
//! installed units, `check-config` on the installed configs, `dpkg --purge`.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail, ensure};
use clap::CommandFactory;
use clap_complete::Shell;
use smtp_lb_user::cli::Cli;

use crate::{
    build,
    util::{describe, run_cmd, workspace_root},
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Then install the package here, check what it installed, and purge it.
    #[arg(long)]
    check: bool,
}

const NAME: &str = "smtp-lb";
/// The units, from `deploy/systemd/`.
const UNITS: &[&str] = &[
    "smtp-lb-lb@.service",
    "smtp-lb-relay.service",
    "smtp-lb-decap@.service",
];
/// (source under `deploy/`, installed path, conffile).
const FILES: &[(&str, &str, bool)] = &[
    ("etc/lb.toml", "etc/smtp-lb/lb.toml", true),
    ("etc/relay.toml", "etc/smtp-lb/relay.toml", true),
    ("etc/shaping.toml", "etc/smtp-lb/shaping.toml", true),
    ("etc/default", "etc/default/smtp-lb", true),
    ("logrotate/smtp-lb", "etc/logrotate.d/smtp-lb", true),
    (
        "prometheus/smtp-lb.rules.yml",
        "usr/share/smtp-lb/prometheus/smtp-lb.rules.yml",
        false,
    ),
    (
        "prometheus/prometheus.yml",
        "usr/share/smtp-lb/prometheus/prometheus.yml",
        false,
    ),
    (
        "grafana/smtp-lb.json",
        "usr/share/smtp-lb/grafana/smtp-lb.json",
        false,
    ),
];

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let artifacts = build::run(&build::Options {})?;
    let deb = build_deb(&artifacts.binary)?;
    println!("package: {}", deb.display());
    if opts.check {
        check(&deb)?;
    }
    Ok(())
}

fn build_deb(binary: &Path) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let deploy = root.join("deploy");
    let version = env!("CARGO_PKG_VERSION");
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .context("dpkg --print-architecture")?
            .stdout,
    )?
    .trim()
    .to_owned();
    let stage = root.join(format!("target/package/{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }

    // The binary, without its debug info (the embedded eBPF object is data
    // and keeps its BTF).
    let bin = stage.join("usr/bin/smtp-lb");
    mkdir(bin.parent().unwrap())?;
    run_cmd(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&bin),
    )?;
    chmod(&bin, 0o755)?;

    for unit in UNITS {
        copy(
            &deploy.join("systemd").join(unit),
            &stage.join("lib/systemd/system").join(unit),
        )?;
    }
    let mut conffiles = String::new();
    for (from, to, conffile) in FILES {
        copy(&deploy.join(from), &stage.join(to))?;
        if *conffile {
            conffiles += &format!("/{to}\n");
        }
    }
    man_pages(&stage.join("usr/share/man/man1"))?;
    completions(&stage)?;
    let doc = stage.join("usr/share/doc").join(NAME);
    copy(&root.join("README.md"), &doc.join("README.md"))?;
    for entry in fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            copy(&path, &doc.join(path.file_name().unwrap()))?;
        }
    }
    fs::write(
        doc.join("copyright"),
        format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: smtp-lb\n\nFiles: *\nLicense: {}\n",
            env!("CARGO_PKG_LICENSE")
        ),
    )?;

    let debian = stage.join("DEBIAN");
    mkdir(&debian)?;
    fs::write(debian.join("conffiles"), conffiles)?;
    fs::write(
        debian.join("control"),
        control(version, &arch, &glibc_needed(&bin)?, installed_kib(&stage)?),
    )?;
    for (script, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        fs::write(debian.join(script), text)?;
        chmod(&debian.join(script), 0o755)?;
    }

    let deb = root.join(format!("target/package/{NAME}_{version}_{arch}.deb"));
    run_cmd(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

fn control(version: &str, arch: &str, glibc: &str, kib: u64) -> String {
    format!(
        "Package: {NAME}
Version: {version}
Architecture: {arch}
Maintainer: smtp-lb developers <smtp-lb@localhost>
Installed-Size: {kib}
Depends: libc6 (>= {glibc}), adduser
Recommends: logrotate, bird2
Suggests: prometheus
Section: net
Priority: optional
Homepage: {}
Description: XDP SMTP load balancer and outbound delivery engine
 smtp-lb spreads SMTP connections for a VIP over relay nodes in the kernel
 (XDP, Maglev, direct server return) with a control plane that health-checks
 relays the SMTP way, and ships the relay itself: durable spool, per-ISP
 queues and shaping, egress IP pools, DKIM.
 .
 Units: smtp-lb-lb@IFACE (balancer), smtp-lb-relay, smtp-lb-decap@IFACE.
 None is enabled on install: edit /etc/smtp-lb/ first.
",
        env!("CARGO_PKG_REPOSITORY")
    )
}

const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # The relay runs as its own system user (the balancer and decap need
    # CAP_BPF and run as root with only the capabilities they use).
    if ! getent passwd smtp-lb >/dev/null; then
        adduser --system --group --quiet --no-create-home \
            --home /var/lib/smtp-lb-relay smtp-lb
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    # The balancer runs with --keep-pinned: stopping it leaves XDP attached
    # (see /usr/share/doc/smtp-lb/lb.md to remove it for good).
    systemctl stop 'smtp-lb-relay.service' 'smtp-lb-decap@*.service' \
        'smtp-lb-lb@*.service' >/dev/null 2>&1 || true
fi
exit 0
"#;

/// The spool (`/var/lib/smtp-lb-relay`) survives a purge: it may hold mail
/// that was accepted with `250`.
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf /var/log/smtp-lb
    if getent passwd smtp-lb >/dev/null && command -v deluser >/dev/null; then
        deluser --system --quiet smtp-lb || true
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
exit 0
"#;

/// Man pages for `smtp-lb` and every subcommand (`smtp-lb-lb.1` …), gzipped.
fn man_pages(dir: &Path) -> anyhow::Result<()> {
    mkdir(dir)?;
    clap_mangen::generate_to(Cli::command(), dir).context("generate man pages")?;
    for entry in fs::read_dir(dir)? {
        let page = entry?.path();
        // -n: no name or time stamp inside, so the package is reproducible.
        run_cmd(Command::new("gzip").args(["-9nf"]).arg(&page))?;
    }
    Ok(())
}

fn completions(stage: &Path) -> anyhow::Result<()> {
    for (shell, path) in [
        (Shell::Bash, "usr/share/bash-completion/completions/smtp-lb"),
        (Shell::Zsh, "usr/share/zsh/vendor-completions/_smtp-lb"),
        (
            Shell::Fish,
            "usr/share/fish/vendor_completions.d/smtp-lb.fish",
        ),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), NAME, &mut out);
        let path = stage.join(path);
        mkdir(path.parent().unwrap())?;
        fs::write(&path, out)?;
    }
    Ok(())
}

/// The newest `GLIBC_x.y` symbol version the binary links against.
fn glibc_needed(bin: &Path) -> anyhow::Result<String> {
    let out = Command::new("objdump").arg("-T").arg(bin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Vec<u32> = v
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some((parts, v.to_owned()))
        })
        .max()
        .map(|(_, v)| v)
        .context("no GLIBC symbol versions in the binary")
}

fn installed_kib(stage: &Path) -> anyhow::Result<u64> {
    fn walk(p: &Path) -> std::io::Result<u64> {
        let meta = fs::symlink_metadata(p)?;
        if meta.is_dir() {
            fs::read_dir(p)?.try_fold(0, |sum, e| Ok(sum + walk(&e?.path())?))
        } else {
            Ok(meta.len())
        }
    }
    Ok(walk(stage)?.div_ceil(1024))
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    mkdir(to.parent().unwrap())?;
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    chmod(to, 0o644)
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Installs the package, checks what it installed, and purges it (also
/// when a check fails).
fn check(deb: &Path) -> anyhow::Result<()> {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", NAME])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("installed"));
    ensure!(
        !installed,
        "{NAME} is already installed here; `dpkg --purge {NAME}` first (--check installs and purges it)"
    );
    step("dpkg -i", Command::new("dpkg").arg("-i").arg(deb))?;
    let result = installed_checks();
    step("dpkg --purge", Command::new("dpkg").args(["--purge", NAME]))?;
    ensure!(
        !Path::new("/usr/bin/smtp-lb").exists() && !Path::new("/etc/smtp-lb").exists(),
        "files left behind after dpkg --purge"
    );
    result?;
    println!("package: check passed (installed, verified, purged)");
    Ok(())
}

fn installed_checks() -> anyhow::Result<()> {
    let version = step(
        "smtp-lb --version",
        Command::new("/usr/bin/smtp-lb").arg("--version"),
    )?;
    ensure!(
        version.trim() == format!("smtp-lb {}", env!("CARGO_PKG_VERSION")),
        "unexpected version line: {version}"
    );
    // `man` renders through groff: no warnings, and the page has its sections.
    let page = step(
        "man smtp-lb",
        Command::new("man")
            .args(["--warnings", "-P", "cat", "smtp-lb"])
            .env("MANWIDTH", "80"),
    )?;
    for section in ["NAME", "SYNOPSIS", "SUBCOMMANDS", "smtp-lb-relay(1)"] {
        ensure!(page.contains(section), "man smtp-lb lacks {section}");
    }
    step(
        "man smtp-lb-relay",
        Command::new("man").args(["-P", "cat", "smtp-lb-relay"]),
    )?;
    let units: Vec<String> = UNITS
        .iter()
        .map(|u| format!("/lib/systemd/system/{}", u.replace("@.", "@eth0.")))
        .collect();
    // Template units are verified as an instance; verify reads them from
    // the unit path, so each name resolves to the installed file.
    verify_units(&units)?;
    for (kind, file) in [
        ("lb", "/etc/smtp-lb/lb.toml"),
        ("shaping", "/etc/smtp-lb/shaping.toml"),
        ("relay", "/etc/smtp-lb/relay.toml"),
    ] {
        step(
            &format!("check-config {file}"),
            Command::new("/usr/bin/smtp-lb").args(["check-config", "--kind", kind, file]),
        )?;
    }
    let bash = fs::read_to_string("/usr/share/bash-completion/completions/smtp-lb")?;
    ensure!(
        bash.contains("check-config") && bash.contains("--log-format"),
        "bash completion lacks subcommands or options"
    );
    if Command::new("logrotate").arg("--version").output().is_ok() {
        step(
            "logrotate --debug /etc/logrotate.d/smtp-lb",
            Command::new("logrotate").args(["--debug", "/etc/logrotate.d/smtp-lb"]),
        )?;
    }
    Ok(())
}

/// `systemd-analyze verify` exits 0 on some problems (unknown keys are
/// only warned about): any diagnostic about our units is a failure.
fn verify_units(units: &[String]) -> anyhow::Result<()> {
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify").args(units);
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{}`", describe(&cmd)))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("$ {}\n{}", describe(&cmd), stderr.trim_end());
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("smtp-lb")).collect();
    if !out.status.success() || !ours.is_empty() {
        bail!("systemd-analyze verify: {}", ours.join("; "));
    }
    Ok(())
}

/// Runs one check, printing the command and its output for the record.
fn step(what: &str, cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{}`", describe(cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown: Vec<&str> = stdout.lines().take(12).collect();
    println!("$ {}\n{}", describe(cmd), shown.join("\n"));
    if !stderr.trim().is_empty() {
        println!("{}", stderr.trim_end());
    }
    ensure!(out.status.success(), "{what} failed ({})", out.status);
    Ok(stdout)
}
