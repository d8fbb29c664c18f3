//! `bench shaping`: one relay, three shaped "ISPs" at once (Google,
//! Microsoft, Yahoo, each a counting sink that records concurrency and
//! delivery times) and one unshaped destination on Postfix's `smtp-sink`,
//! all found through dnsmasq. It reports, from the sinks' side:
//! - each provider's delivered rate over a fixed window against its
//!   configured `message_rate` (`rate_error_pct_max` is the worst);
//! - the most concurrent connections a provider's sink saw over its
//!   `connection_limit` (`max_concurrency_over_limit`, 0 when never exceeded);
//! - the unshaped destination's rate while the others are throttled, and
//!   while Google is suspended by its `421 4.7.28` rule, each against its
//!   rate alone measured in the same run (`isolation_ratio_min` is the worst).
//!
//! `SMTP_LB_BENCH_SHAPING_SECS` (default 30) is the rate window.
use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::ensure;
use smtp_lb_tests::{
    dns::Dnsmasq,
    fake_mx::FakeMx,
    relay::{Relay, RelayConfig},
    sink::CountingSink,
    smtp::smtp_source,
    tmp::wait_for,
};

use super::Report;
use crate::build::{self, Artifacts};

/// A shaped provider in the run: its MX host, limits and sink.
struct Isp {
    name: &'static str,
    mx: &'static str,
    per_min: u32,
    limit: usize,
    sink: FakeMx,
}

/// Messages per second through the relay into the unshaped `smtp-sink`:
/// `n` messages from the start of their submission (delivery overlaps it)
/// until the sink has them all.
fn unshaped_rate(relay: &Relay, sink: &CountingSink, n: usize) -> f64 {
    let base = sink.count();
    let start = Instant::now();
    smtp_source(relay.smtp, "u@other.test", n, 10);
    let done = wait_for("all delivered", Duration::from_mins(2), || {
        (sink.count() >= base + n as u64).then(Instant::now)
    });
    #[expect(clippy::cast_precision_loss, reason = "counts are small")]
    let rate = n as f64 / done.duration_since(start).as_secs_f64();
    rate
}

pub fn run(artifacts: &Artifacts) -> anyhow::Result<Report> {
    for (k, v) in build::env(artifacts) {
        // SAFETY: single-threaded here; the test helpers read these paths.
        unsafe { std::env::set_var(k, v) };
    }
    let window = Duration::from_secs(
        std::env::var("SMTP_LB_BENCH_SHAPING_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    // Each DATA takes 50 ms at the shaped sinks, so their connection
    // limits are reached under the backlog.
    let isps = [
        ("google", "mx.google.com", 600, 4),
        ("microsoft", "mx.protection.outlook.com", 300, 2),
        ("yahoo", "mta5.am0.yahoodns.net", 1200, 3),
    ]
    .map(|(name, mx, per_min, limit)| Isp {
        name,
        mx,
        per_min,
        limit,
        sink: FakeMx::builder()
            .delay("DATA", Duration::from_millis(50))
            .start(),
    });
    let other = CountingSink::start();
    let mut hosts: Vec<&str> = isps.iter().map(|i| i.mx).collect();
    hosts.push("mx.example.net");
    let dns = Dnsmasq::loopback_hosts(&hosts);
    let mut shaping = String::new();
    let mut routes = vec![(
        "other.test".to_owned(),
        format!("mx.example.net:{}", other.addr.port()),
    )];
    for i in &isps {
        shaping.push_str(&format!(
            "[{}]\nconnection_limit = {}\nmessage_rate = \"{}/min\"\n",
            i.name, i.limit, i.per_min
        ));
        routes.push((
            format!("{}.test", i.name),
            format!("{}:{}", i.mx, i.sink.addr.port()),
        ));
    }
    shaping.push_str(
        "[[google.rule]]\ncode = 421\nenhanced = \"4.7.28\"\naction = \"suspend\"\nduration = \"5m\"\n",
    );
    let relay = Relay::start(&RelayConfig {
        routes,
        nameservers: vec![dns.addr.to_string()],
        connections_per_destination: 10,
        shaping: Some(shaping),
        ..RelayConfig::default()
    });

    let mut report = Report::default();
    let n_other = 3000;
    let alone = unshaped_rate(&relay, &other, n_other);
    report.add("unshaped_alone_msg_per_s", alone, "msg/s");

    // A backlog of a window and a half at every shaped provider.
    for i in &isps {
        let n = (i.per_min as usize * window.as_secs() as usize / 60) * 3 / 2 + 10;
        smtp_source(relay.smtp, &format!("u@{}.test", i.name), n, 10);
    }
    let throttled = unshaped_rate(&relay, &other, n_other);
    report.add("unshaped_while_throttled_msg_per_s", throttled, "msg/s");
    // Windows start at each provider's first delivery; wait them out.
    let first = wait_for("first shaped deliveries", Duration::from_secs(30), || {
        isps.iter()
            .map(|i| i.sink.accepted().first().copied())
            .collect::<Option<Vec<_>>>()
    });
    let last_start = first.iter().max().copied().unwrap_or_else(Instant::now);
    sleep((last_start + window + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
    let mut rate_error_max: f64 = 0.0;
    let mut over_max = 0usize;
    for (i, t0) in isps.iter().zip(&first) {
        let got = i
            .sink
            .accepted()
            .iter()
            .filter(|t| **t < *t0 + window)
            .count();
        let want = f64::from(i.per_min) * window.as_secs_f64() / 60.0;
        #[expect(clippy::cast_precision_loss, reason = "counts are small")]
        let err = (got as f64 - want).abs() / want * 100.0;
        report.add(
            &format!("{}_configured_per_min", i.name),
            f64::from(i.per_min),
            "/min",
        );
        #[expect(clippy::cast_precision_loss, reason = "counts are small")]
        let per_min = got as f64 * 60.0 / window.as_secs_f64();
        report.add(&format!("{}_delivered_per_min", i.name), per_min, "/min");
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        report.add(
            &format!("{}_max_concurrency", i.name),
            i.sink.max_open() as f64,
            "conns",
        );
        rate_error_max = rate_error_max.max(err);
        over_max = over_max.max(i.sink.max_open().saturating_sub(i.limit));
    }

    // Google starts answering 421 4.7.28 and is suspended by its rule.
    let google = &isps[0].sink;
    google.set_throttle(true);
    smtp_source(relay.smtp, "u@google.test", 20, 4);
    wait_for("a 421 4.7.28", Duration::from_secs(30), || {
        (!google.throttled().is_empty()).then_some(())
    });
    let suspended = unshaped_rate(&relay, &other, n_other);
    report.add("unshaped_while_suspended_msg_per_s", suspended, "msg/s");
    let after = google.throttled();
    ensure!(
        after[after.len() - 1].duration_since(after[0]) < Duration::from_secs(2),
        "google was not suspended: 421s kept coming"
    );

    report.add("rate_error_pct_max", rate_error_max, "%");
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    report.add("max_concurrency_over_limit", over_max as f64, "conns");
    report.add("isolation_ratio_throttled", throttled / alone, "×");
    report.add("isolation_ratio_suspended", suspended / alone, "×");
    report.add(
        "isolation_ratio_min",
        (throttled / alone).min(suspended / alone),
        "×",
    );
    Ok(report)
}
