//! Monitoring against the running lab: a real Prometheus scrapes the
//! balancer's and the relays' metrics listeners and its query results match
//! the daemons' own counters; the shipped alert rules run in it; every
//! Grafana panel's query evaluates; and the balancer's dashboard page, opened
//! in headless Chromium, shows every relay with its state while its figures
//! move with the traffic.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    env::{deploy, require_root, workspace_root},
    monitoring::{ISPS, LB_METRICS, MonitoredLab, relay_metrics},
    topology::wait_for,
};
use smtp_lb_user::lb::dashboard::recipients_by_domain;

fn finish(clients: Vec<Child>) {
    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "smtp-source failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Each relay's own delivered count per domain, from its metrics page.
fn relays_delivered(lab: &MonitoredLab) -> BTreeMap<String, u64> {
    let mut sum = BTreeMap::new();
    for r in &lab.dsr.relays {
        let (code, page) = lab.get(
            &r.name,
            &format!("http://{}/metrics", relay_metrics(&r.addr)),
        );
        assert_eq!(code, 200, "{}'s /metrics", r.name);
        for ((domain, status), n) in recipients_by_domain(&page) {
            if status == "delivered" {
                *sum.entry(domain).or_default() += n;
            }
        }
    }
    sum
}

#[test]
fn prometheus_scrapes_both_daemons_and_its_queries_match_their_counters() {
    require_root();
    let mut lab = MonitoredLab::start();
    lab.start_prometheus();
    wait_for(
        "Prometheus scraping all four targets",
        Duration::from_secs(30),
        || {
            let t = lab.targets();
            let active = t["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            active.len() == 4 && active.iter().all(|t| t["health"] == "up")
        },
    );

    let per_isp = 60;
    finish(lab.send(per_isp, 5));
    let total = per_isp * ISPS.len();
    wait_for("every message at its ISP", Duration::from_mins(1), || {
        lab.received().iter().sum::<usize>() >= total
    });

    // Sessions per relay: the balancer's pinned counters (ctl stats) and
    // what Prometheus scraped from its metrics listener.
    let flows = lab.dsr.new_flows();
    assert!(flows.iter().sum::<u64>() >= total as u64, "{flows:?}");
    assert!(
        flows.iter().all(|f| *f > 0),
        "every relay took sessions: {flows:?}"
    );
    let expected: BTreeMap<String, f64> = lab
        .dsr
        .relays
        .iter()
        .zip(&flows)
        .map(|(r, f)| (r.name.clone(), *f as f64))
        .collect();
    let scraped = |lab: &MonitoredLab| -> BTreeMap<String, f64> {
        lab.query("smtp_lb_balancer_backend_new_flows_total")
            .unwrap()
            .into_iter()
            .map(|(m, v)| (m["backend"].as_str().unwrap_or_default().to_owned(), v))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = scraped(&lab);
    while seen != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        seen = scraped(&lab);
    }
    assert_eq!(
        seen, expected,
        "sessions per relay: Prometheus vs the balancer's counters"
    );

    // Messages per ISP: Prometheus' sum over the relays, each relay's own
    // counters, and what the ISPs' MX hosts received.
    let own = relays_delivered(&lab);
    let received = lab.received();
    for ((domain, _), n) in ISPS.iter().zip(&received) {
        assert_eq!(
            own.get(*domain).copied(),
            Some(*n as u64),
            "{domain}: relays vs ISP"
        );
    }
    #[expect(clippy::cast_sign_loss, reason = "sums of counters")]
    let per_domain = |lab: &MonitoredLab| -> BTreeMap<String, u64> {
        lab.query(r#"sum by (domain) (smtp_lb_relay_recipients_total{status="delivered"})"#)
            .unwrap()
            .into_iter()
            .map(|(m, v)| {
                (
                    m["domain"].as_str().unwrap_or_default().to_owned(),
                    v as u64,
                )
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = per_domain(&lab);
    while seen != own && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        seen = per_domain(&lab);
    }
    assert_eq!(
        seen, own,
        "messages per ISP: Prometheus vs the relays' counters"
    );
    eprintln!("sessions per relay {expected:?}; delivered per ISP {own:?}");

    // The shipped rules run here; every Grafana panel's query evaluates, and
    // the throughput panels have data.
    let (_, rules) = lab.get("prometheus", "http://198.51.100.60:9090/api/v1/rules");
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let loaded: usize = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(loaded, 11, "the shipped alert rules are loaded");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/smtp-lb.json")).unwrap())
            .unwrap();
    // Every panel's query, with whether it returned data.
    let panels_with_data = |lab: &MonitoredLab| -> BTreeMap<String, bool> {
        let mut with_data = BTreeMap::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$lb", ".*")
                    .replace("$relay", ".*");
                let result = lab
                    .query(&expr)
                    .unwrap_or_else(|e| panic!("panel {:?}: {e}", panel["title"]));
                with_data.insert(
                    panel["title"].as_str().unwrap().to_owned(),
                    !result.is_empty(),
                );
            }
        }
        with_data
    };
    let throughput = [
        "Relays up",
        "Sessions/s per relay",
        "Deliveries/s per provider",
        "Queue",
    ];
    // A `rate` needs two samples of its series: one scrape after a series
    // first appears, the panel is still empty (seen once in CI).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut with_data = panels_with_data(&lab);
    while !throughput.iter().all(|t| with_data.get(*t) == Some(&true)) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(500));
        with_data = panels_with_data(&lab);
    }
    for title in throughput {
        assert_eq!(
            with_data.get(title),
            Some(&true),
            "panel {title} has data: {with_data:?}"
        );
    }

    // A relay killed: its scrape target goes down and the rules see it.
    let victim = lab.dsr.relays[2].name.clone();
    lab.kill_relay(2);
    wait_for(
        &format!("SmtpLbTargetDown and SmtpLbRelayDown pending for {victim}"),
        Duration::from_secs(30),
        || {
            let alerts = lab.query("ALERTS").unwrap();
            let has = |name: &str| alerts.iter().any(|(m, _)| m["alertname"] == name);
            has("SmtpLbTargetDown") && has("SmtpLbRelayDown")
        },
    );
}

/// Headless Chromium (Debian's), as root, with nothing but the page to load.
fn chromium(lab: &MonitoredLab, profile: &std::path::Path, args: &[&str]) -> String {
    let mut cmd = lab.dsr.lab.command("lb", "chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=4000",
        "--window-size=1400,820",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(format!("http://{LB_METRICS}/dashboard"));
    let out = cmd.output().expect("run chromium (package chromium)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// From a DOM dump: per relay row, its state and total sessions.
fn relay_rows(dom: &str) -> BTreeMap<String, (String, u64)> {
    let mut rows = BTreeMap::new();
    for part in dom.split("<tr data-relay=\"").skip(1) {
        let row = part.split("</tr>").next().unwrap_or_default();
        let name = row.split('"').next().unwrap_or_default().to_owned();
        let state = row
            .split("data-state=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_default()
            .to_owned();
        let total = row
            .split("sessions-total\">")
            .nth(1)
            .and_then(|s| s.split('<').next())
            .map(|s| s.replace(',', ""))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        rows.insert(name, (state, total));
    }
    rows
}

#[test]
fn dashboard_in_chromium_shows_every_relay_and_figures_that_move() {
    require_root();
    let lab = MonitoredLab::start();
    let profile = lab.dsr.work.join("chromium-profile");
    // Traffic through the VIP while the page is looked at.
    let clients = lab.send(100_000, 2);
    wait_for("sessions flowing", Duration::from_secs(20), || {
        lab.received().iter().sum::<usize>() >= 30
    });

    let first = chromium(&lab, &profile, &["--dump-dom"]);
    let before = relay_rows(&first);
    std::thread::sleep(Duration::from_secs(3));
    let second = chromium(&lab, &profile, &["--dump-dom"]);
    let after = relay_rows(&second);
    let shot: PathBuf = workspace_root().join("target/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &lab,
        &profile,
        &[&format!("--screenshot={}", shot.display())],
    );
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }

    let names: Vec<&str> = lab.dsr.relays.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        before.keys().map(String::as_str).collect::<Vec<_>>(),
        names,
        "every relay has a row:\n{first}"
    );
    for name in &names {
        let (state0, total0) = &before[*name];
        let (state1, total1) = &after[*name];
        assert_eq!(state0, "up", "{name}'s state on the page");
        assert_eq!(state1, "up", "{name}'s state on the page");
        assert!(*total0 > 0, "{name} shows sessions: {before:?}");
        assert!(
            total1 > total0,
            "{name}'s sessions grew between the dumps: {before:?} → {after:?}"
        );
    }
    // The ISP section is there (relays listed in [dashboard]) with every domain.
    for (domain, _) in ISPS {
        assert!(
            second.contains(&format!("data-domain=\"{domain}\"")),
            "{domain} row:\n{second}"
        );
    }
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    eprintln!(
        "dashboard: {before:?} → {after:?}; screenshot {}",
        shot.canonicalize().unwrap().display()
    );
}
