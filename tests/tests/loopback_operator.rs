//! What an operator's tools rely on: `check-config` for every kind of file
//! (errors as `FILE:LINE: FIELD: problem`), the shipped default configs,
//! systemd readiness (`READY=1` once the listeners accept), JSON log lines,
//! and the delivery log reopened on SIGUSR1 without losing a line.
use std::{
    collections::HashSet,
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use smtp_lb_tests::{
    env::{deploy, smtp_lb_bin},
    lab::signal,
    relay::{Relay, RelayConfig},
    sink::SmtpSink,
    smtp::smtp_source,
    tmp::{ChildGuard, TempDir, wait_for},
};

fn smtp_lb(args: &[&str]) -> Output {
    Command::new(smtp_lb_bin())
        .args(args)
        .output()
        .expect("run smtp-lb (built by `cargo xtask build`)")
}

/// Runs `check-config` on `text` written to a file; (success, output line).
fn check(text: &str, kind: Option<&str>) -> (bool, String) {
    let dir = TempDir::new("check-config");
    let path = dir.join("file.toml");
    std::fs::write(&path, text).unwrap();
    let mut args = vec!["check-config", path.to_str().unwrap()];
    if let Some(k) = kind {
        args.extend(["--kind", k]);
    }
    let out = smtp_lb(&args);
    let text = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .replace(path.to_str().unwrap(), "FILE");
    (out.status.success(), text.trim().to_owned())
}

#[test]
fn shipped_default_configs_pass_check_config() {
    let lb = smtp_lb(&["check-config", deploy("etc/lb.toml").to_str().unwrap()]);
    assert!(
        lb.status.success(),
        "{}",
        String::from_utf8_lossy(&lb.stderr)
    );
    assert!(String::from_utf8_lossy(&lb.stdout).contains("ok (balancer: 1 services on 3 ports"));
    let shaping = smtp_lb(&["check-config", deploy("etc/shaping.toml").to_str().unwrap()]);
    assert!(
        shaping.status.success(),
        "{}",
        String::from_utf8_lossy(&shaping.stderr)
    );
    assert!(String::from_utf8_lossy(&shaping.stdout).contains("ok (shaping:"));
    // The relay config names /etc/smtp-lb/shaping.toml: point it at the shipped one.
    let relay = std::fs::read_to_string(deploy("etc/relay.toml"))
        .unwrap()
        .replace(
            "/etc/smtp-lb/shaping.toml",
            deploy("etc/shaping.toml").to_str().unwrap(),
        );
    let (ok, out) = check(&relay, None);
    assert!(ok, "{out}");
    assert!(out.starts_with("FILE: ok (relay: 1 listeners"), "{out}");
}

#[test]
fn relay_config_errors_name_file_line_and_field() {
    let base = "spool_dir = \"/tmp/spool\"\n[[listener]]\naddress = \"127.0.0.1:2525\"\n";
    let (ok, out) = check(
        &format!("{base}[[listener]]\naddress = \"127.0.0.1:2526\"\nsubmision = true\n"),
        None,
    );
    assert!(!ok);
    assert!(
        out.starts_with("smtp-lb: FILE:6: listener[1].submision: unknown field `submision`"),
        "{out}"
    );
    let (ok, out) = check(
        &format!("{base}[limits]\nmax_connections = \"many\"\n"),
        None,
    );
    assert!(!ok);
    assert!(
        out.starts_with("smtp-lb: FILE:5: limits.max_connections: invalid type: string \"many\""),
        "{out}"
    );
    let (ok, out) = check(&format!("{base}[retry]\nmin = \"5 fortnights\"\n"), None);
    assert!(!ok);
    assert!(out.starts_with("smtp-lb: FILE:5: retry.min: "), "{out}");
}

#[test]
fn shaping_file_errors_name_file_line_and_field() {
    let (ok, out) = check(
        "[default]\nconnection_limit = 5\n\n[google]\nmessage_rate = \"10/fortnight\"\n",
        None,
    );
    assert!(!ok);
    assert!(
        out.starts_with("smtp-lb: FILE:5: google.message_rate: bad rate \"10/fortnight\""),
        "{out}"
    );
    let (ok, out) = check(
        "[default]\nconnection_limit = 5\n\n[gogle]\nconnection_limit = 2\n",
        None,
    );
    assert!(!ok);
    assert!(
        out.starts_with("smtp-lb: FILE:4: unknown provider section [gogle]"),
        "{out}"
    );
    let (ok, out) = check("[google]\nconection_limit = 2\n", None);
    assert!(!ok);
    assert!(
        out.starts_with("smtp-lb: FILE:2: google.conection_limit: unknown field `conection_limit`"),
        "{out}"
    );
}

#[test]
fn kind_is_told_from_content_or_given() {
    // A file with only provider sections reads as shaping; --kind says otherwise.
    let (ok, out) = check("[google]\nconnection_limit = 2\n", None);
    assert!(ok, "{out}");
    assert!(out.contains("ok (shaping: [default] + [google])"), "{out}");
    let (ok, out) = check("[google]\nconnection_limit = 2\n", Some("lb"));
    assert!(!ok);
    assert!(out.contains("unknown field `google`"), "{out}");
    let (ok, out) = check("hostname = \"x\"\n", None);
    assert!(!ok);
    assert!(out.contains("pass --kind lb, relay or shaping"), "{out}");
    // A balancer file keeps the balancer's own line+field errors.
    let (ok, out) = check(
        "[[services]]\nvip = \"203.0.113.10\"\nports = [25]\ntable_size = 65536\n[[services.backends]]\nname = \"r1\"\naddress = \"198.51.100.11\"\nmac = \"02:00:00:00:00:11\"\n",
        None,
    );
    assert!(!ok);
    assert!(out.contains("FILE:4: services[0]"), "{out}");
}

/// A relay started on `cfg`'s config, by hand: with `args` and `NOTIFY_SOCKET`.
fn spawn_relay(config: &Path, args: &[&str], notify: &Path, stderr: &Path) -> ChildGuard {
    let child = Command::new(smtp_lb_bin())
        .args(args)
        .args(["relay", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", notify)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .expect("spawn smtp-lb relay");
    ChildGuard(Some(child))
}

#[test]
fn relay_notifies_systemd_once_listening_and_logs_json_lines() {
    let sink = SmtpSink::start();
    // The harness writes the config; this test runs the relay itself.
    let mut harness = Relay::start(&RelayConfig {
        routes: vec![("*".into(), sink.addr.to_string())],
        ..RelayConfig::default()
    });
    assert!(harness.terminate());
    let dir = TempDir::new("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let stderr = dir.join("stderr.log");
    let child = spawn_relay(
        &harness.config_path,
        &["--log-format", "json"],
        &socket_path,
        &stderr,
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 15 s");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "READY=1");
    // Ready means ready: the SMTP listener accepts at once.
    std::net::TcpStream::connect(harness.smtp).expect("SMTP listener bound before READY=1");
    smtp_source(harness.smtp, "rcpt@dst.test", 3, 1);
    wait_for("3 deliveries", Duration::from_secs(15), || {
        (sink.count() >= 3).then_some(())
    });
    signal(child.pid(), libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "STOPPING=1");
    wait_for(
        "the relay to log its shutdown",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&stderr)
                .unwrap()
                .contains("shutting down")
                .then_some(())
        },
    );

    let text = std::fs::read_to_string(&stderr).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for l in &lines {
        assert!(
            l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(),
            "{l}"
        );
    }
    let listener = lines
        .iter()
        .find(|l| l["message"] == "SMTP listener ready")
        .unwrap_or_else(|| panic!("no listener line: {text}"));
    // Fields are top-level keys, as a log shipper wants them.
    assert_eq!(listener["address"], harness.smtp.to_string());
    assert_eq!(listener["level"], "INFO");
}

#[test]
fn delivery_log_reopens_on_sigusr1_and_loses_no_line() {
    let sink = SmtpSink::start();
    let relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), sink.addr.to_string())],
        ..RelayConfig::default()
    });
    let log = relay.dir.join("delivery.log");
    let rotated = relay.dir.join("delivery.log.1");
    smtp_source(relay.smtp, "rcpt@dst.test", 50, 2);
    relay.wait_log_count("delivered", 50, Duration::from_secs(30));

    // As logrotate does: rename, then signal — while mail keeps flowing.
    let sender = std::thread::spawn({
        let smtp = relay.smtp;
        move || smtp_source(smtp, "rcpt@dst.test", 300, 4)
    });
    wait_for(
        "deliveries of the second batch",
        Duration::from_secs(30),
        || (sink.count() >= 60).then_some(()),
    );
    std::fs::rename(&log, &rotated).unwrap();
    signal(relay.pid(), libc::SIGUSR1);
    wait_for("a new delivery log", Duration::from_secs(10), || {
        log.exists().then_some(())
    });
    sender.join().unwrap();
    wait_for("350 messages at the sink", Duration::from_mins(1), || {
        (sink.count() >= 350).then_some(())
    });
    let read = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line ({e}): {l}")))
            .collect()
    };
    let (old, new) = wait_for(
        "350 delivered lines in both files",
        Duration::from_secs(15),
        || {
            let (old, new) = (read(&rotated), read(&log));
            (old.len() + new.len() >= 350).then_some((old, new))
        },
    );
    assert!(
        old.len() >= 60,
        "the rotated file keeps what was written before: {}",
        old.len()
    );
    assert!(!new.is_empty(), "nothing went to the reopened file");
    let ids: HashSet<String> = old
        .iter()
        .chain(&new)
        .filter(|l| l["status"] == "delivered")
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        old.len() + new.len(),
        350,
        "one line per delivery, none twice"
    );
    assert_eq!(ids.len(), 350, "every delivered message has its line");
    assert!(relay.stderr().contains("delivery log reopened"));
}

/// `promtool` from Debian's `prometheus` (the test set of `xtask setup`).
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .expect("run promtool (package prometheus; `cargo xtask setup` installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn shipped_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "smtp-lb.rules.yml"]);
    assert!(check.contains("SUCCESS: 10 rules found"), "{check}");
    let test = promtool(&["test", "rules", "smtp-lb.rules.test.yml"]);
    assert!(test.contains("SUCCESS"), "{test}");
    // Every alert the rules define has a unit test.
    let rules = std::fs::read_to_string(deploy("prometheus/smtp-lb.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy("prometheus/smtp-lb.rules.test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "alert {alert} has no test that expects it to fire"
        );
    }
}

/// Every `smtp_lb_*` name in `text` (histogram series as their family).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("smtp_lb_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn rules_and_dashboard_use_only_metrics_the_daemons_export() {
    let doc = std::fs::read_to_string(deploy("../docs/metrics.md")).unwrap();
    let exported: HashSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    assert!(exported.len() > 30, "docs/metrics.md lists the metrics");
    for file in [
        "prometheus/smtp-lb.rules.yml",
        "prometheus/smtp-lb.rules.test.yml",
        "grafana/smtp-lb.json",
    ] {
        let used = metric_names(&std::fs::read_to_string(deploy(file)).unwrap());
        assert!(!used.is_empty(), "{file}");
        let unknown: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics no daemon exports: {unknown:?}"
        );
    }
}
