//! `smtp-lb lb` loads, attaches and pins the real program on a lab
//! interface, the pinned maps are readable by `bpftool` with field names,
//! and it detaches and unpins on SIGTERM unless told to keep them. Bad
//! input gets one line naming the cause and the fix.
use std::{
    process::{Command, Output},
    time::Duration,
};

use smtp_lb_tests::{env::smtp_lb_bin, lab::Lab, topology::wait_for};

fn xdp_attached(lab: &Lab, host: &str) -> bool {
    let out = lab.run(host, &["ip", "link", "show", "eth0"]);
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

fn last_stderr_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn loads_pins_with_btf_and_cleans_up_on_sigterm() {
    let mut lab = Lab::new();
    lab.host("lb", &["198.51.100.2/24"]);
    let pin_dir = lab.pin_dir();
    let mut cmd = lab.command("lb", smtp_lb_bin());
    cmd.args(["lb", "--iface", "eth0", "--mode", "native", "--pin-dir"])
        .arg(&pin_dir);
    let pid = lab.spawn("lb", cmd);
    let stats = pin_dir.join("COUNTERS");
    wait_for("the pinned stats map", Duration::from_secs(10), || {
        stats.exists()
    });
    wait_for("the XDP attachment", Duration::from_secs(5), || {
        xdp_attached(&lab, "lb")
    });

    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&stats)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    for field in [
        "\"tx\"",
        "\"pass_non_vip\"",
        "\"drop_no_backend\"",
        "\"lru_miss\"",
        "\"services\"",
        "\"backends\"",
        "\"new_flows\"",
    ] {
        assert!(
            text.contains(field),
            "bpftool shows no BTF field {field}:\n{text}"
        );
    }

    assert!(
        lab.stop(pid, Duration::from_secs(5)),
        "smtp-lb lb exits by itself on SIGTERM"
    );
    assert!(
        !xdp_attached(&lab, "lb"),
        "program still attached after exit"
    );
    assert!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );
}

#[test]
fn counters_pinned_with_an_older_layout_are_replaced_not_refused() {
    let mut lab = Lab::new();
    lab.host("lb", &["198.51.100.2/24"]);
    let pin_dir = lab.pin_dir();
    std::fs::create_dir_all(&pin_dir).unwrap();
    // What older builds left pinned: counters of another layout (16 × 8
    // bytes), and the global counters of the builds before `COUNTERS`.
    for name in ["COUNTERS", "GLOBAL_STATS"] {
        let old = Command::new("bpftool")
            .args(["map", "create"])
            .arg(pin_dir.join(name))
            .args(["type", "percpu_array", "key", "4", "value", "128"])
            .args(["entries", "1", "name", name])
            .output()
            .unwrap();
        assert!(
            old.status.success(),
            "{}",
            String::from_utf8_lossy(&old.stderr)
        );
    }
    let value_size = |name: &str| {
        let out = Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(pin_dir.join(name))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let size = text.split_whitespace().skip_while(|w| *w != "value").nth(1);
        size.unwrap_or_else(|| panic!("no value size in {text}"))
            .trim_end_matches('B')
            .to_owned()
    };
    assert_eq!(value_size("COUNTERS"), "128");
    let mut cmd = lab.command("lb", smtp_lb_bin());
    cmd.args(["lb", "--iface", "eth0", "--mode", "skb", "--pin-dir"])
        .arg(&pin_dir);
    let pid = lab.spawn("lb", cmd);
    wait_for("the XDP attachment", Duration::from_secs(10), || {
        xdp_attached(&lab, "lb")
    });
    assert_eq!(
        value_size("COUNTERS"),
        size_of::<smtp_lb_common::Counters>().to_string(),
        "replaced by the current layout"
    );
    assert!(
        !pin_dir.join("GLOBAL_STATS").exists(),
        "an older build's counters are unpinned"
    );
    assert!(lab.stop(pid, Duration::from_secs(5)));
}

#[test]
fn keep_pinned_leaves_the_program_attached() {
    let mut lab = Lab::new();
    lab.host("lb", &["198.51.100.2/24"]);
    let pin_dir = lab.pin_dir();
    let mut cmd = lab.command("lb", smtp_lb_bin());
    cmd.args([
        "lb",
        "--iface",
        "eth0",
        "--mode",
        "skb",
        "--keep-pinned",
        "--pin-dir",
    ])
    .arg(&pin_dir);
    let pid = lab.spawn("lb", cmd);
    wait_for("the XDP attachment", Duration::from_secs(10), || {
        xdp_attached(&lab, "lb")
    });
    assert!(lab.stop(pid, Duration::from_secs(5)));
    assert!(
        xdp_attached(&lab, "lb"),
        "--keep-pinned must leave the program attached"
    );
    assert!(pin_dir.join("link").exists() && pin_dir.join("COUNTERS").exists());
    // Removing the link pin is how an operator detaches it for good.
    std::fs::remove_file(pin_dir.join("link")).unwrap();
    wait_for(
        "detach after unpinning the link",
        Duration::from_secs(5),
        || !xdp_attached(&lab, "lb"),
    );
}

#[test]
fn native_mode_where_unsupported_says_try_skb_and_leaves_nothing() {
    let mut lab = Lab::new();
    lab.host("lb", &["198.51.100.2/24"]);
    let pin_dir = lab.pin_dir();
    // Loopback has no native XDP.
    let out = lab
        .command("lb", smtp_lb_bin())
        .args(["lb", "--iface", "lo", "--mode", "native", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = last_stderr_line(&out);
    assert!(
        line.contains("native XDP") && line.contains("try --mode skb"),
        "got: {line}"
    );
    assert!(
        !pin_dir.exists(),
        "a failed start left pins in {}",
        pin_dir.display()
    );
}

#[test]
fn missing_interface_and_missing_root_each_get_one_clear_line() {
    let out = Command::new(smtp_lb_bin())
        .args(["lb", "--iface", "nosuch0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = last_stderr_line(&out);
    assert!(
        line.contains("`nosuch0` does not exist") && line.contains("ip link"),
        "got: {line}"
    );

    let lab = {
        let mut lab = Lab::new();
        lab.host("lb", &["198.51.100.2/24"]);
        lab
    };
    let out = lab
        .command("lb", "setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(smtp_lb_bin())
        .args(["lb", "--iface", "eth0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = last_stderr_line(&out);
    assert!(
        line.contains("needs root") && line.contains("sudo"),
        "got: {line}"
    );
}
