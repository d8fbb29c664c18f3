//! The `smtp-lb` command line: every subcommand documents itself, and a
//! subcommand that is not implemented says so and fails instead of
//! pretending.
use std::process::Command;

use smtp_lb_tests::env::smtp_lb_bin;

fn smtp_lb(args: &[&str]) -> std::process::Output {
    Command::new(smtp_lb_bin())
        .args(args)
        .output()
        .expect("run smtp-lb (built by `cargo xtask build`)")
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        &["lb"][..],
        &["relay"],
        &["ctl"],
        &["ctl", "stats"],
        &["check-config"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let out = smtp_lb(&args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Usage:"),
            "{args:?} help has no usage line:\n{text}"
        );
    }
}

#[test]
fn lb_on_a_missing_interface_names_the_interface_in_one_line() {
    let out = smtp_lb(&[
        "lb",
        "--iface",
        "no-such-if0",
        "--pin-dir",
        "/sys/fs/bpf/slb-cli-test-unused",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    // Without root the loader stops earlier, with a line that names that cause instead.
    assert!(
        last.contains("`no-such-if0` does not exist") || last.contains("needs root"),
        "unexpected error: {err}"
    );
}

#[test]
fn ctl_stats_without_a_running_balancer_fails_clearly() {
    let out = smtp_lb(&["ctl", "stats", "--pin-dir", "/nonexistent/smtp-lb"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("COUNTERS"), "error should name the map: {err}");
}

#[test]
fn ctl_with_several_admins_runs_on_each_and_names_those_that_failed() {
    let token = std::env::temp_dir().join(format!("slb-cli-token-{}", std::process::id()));
    std::fs::write(&token, "t0ken\n").unwrap();
    // Nothing listens on these loopback ports: both calls fail, each named.
    let out = smtp_lb(&[
        "ctl",
        "--admin",
        "127.0.0.1:1,127.0.0.1:2",
        "--token-file",
        token.to_str().unwrap(),
        "node",
        "drain",
    ]);
    let _ = std::fs::remove_file(&token);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("== 127.0.0.1:1") && stdout.contains("== 127.0.0.1:2"),
        "each target is named before its answer: {stdout}"
    );
    assert!(
        err.contains("smtp-lb: 127.0.0.1:1: ") && err.contains("smtp-lb: 127.0.0.1:2: "),
        "{err}"
    );
    assert!(
        err.contains("failed on 2 of 2 balancers: 127.0.0.1:1, 127.0.0.1:2"),
        "{err}"
    );
}
