//! Shaping (issue 6) against real peers on 127.0.0.1: the relay binary,
//! dnsmasq resolving provider MX host names (`mx.google.com`, …) to
//! loopback, `smtp-source` submitting, and counting sinks that measure
//! concurrency and delivery times from the receiving side.
use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    dns::Dnsmasq,
    relay::{Relay, RelayConfig},
    shaping_sink::{ShapingSink, rate_of},
    tmp::wait_for,
};

/// dnsmasq answering A records for the given MX host names with 127.0.0.1.
fn dns(hosts: &[&str]) -> Dnsmasq {
    let mut args = vec!["--local=/com/test/".to_owned()];
    args.extend(hosts.iter().map(|h| format!("--host-record={h},127.0.0.1")));
    Dnsmasq::start(&args)
}

fn relay(dns: &Dnsmasq, routes: &[(&str, String)], shaping: &str, per_dest: usize) -> Relay {
    Relay::start(&RelayConfig {
        routes: routes
            .iter()
            .map(|(d, h)| ((*d).to_owned(), h.clone()))
            .collect(),
        nameservers: vec![dns.addr.to_string()],
        connections_per_destination: per_dest,
        shaping: Some(shaping.to_owned()),
        ..RelayConfig::default()
    })
}

fn hop(name: &str, sink: &ShapingSink) -> String {
    format!("{name}:{}", sink.addr.port())
}

/// `smtp-source`: `n` messages to `rcpt` over `sessions` parallel sessions.
fn submit(relay: SocketAddr, rcpt: &str, n: usize, sessions: usize) {
    let out = Command::new("smtp-source")
        .args(["-s", &sessions.to_string(), "-m", &n.to_string()])
        .args(["-f", "sender@src.test", "-t", rcpt])
        .arg(relay.to_string())
        .output()
        .expect("run smtp-source (package postfix)");
    assert!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_count(sink: &ShapingSink, n: usize, timeout: Duration) {
    wait_for(&format!("{n} messages at the sink"), timeout, || {
        (sink.count() >= n).then_some(())
    });
}

#[test]
fn connection_limit_caps_concurrency_at_the_sink_and_is_reached_under_load() {
    // Each DATA takes 150 ms at the sink, so 16 workers keep every slot busy.
    let sink = ShapingSink::start(Duration::from_millis(150));
    let dns = dns(&["mx.google.com"]);
    let relay = relay(
        &dns,
        &[("gmail.test", hop("mx.google.com", &sink))],
        "[default]\nconnection_limit = 50\n\n[google]\nconnection_limit = 4\nmax_messages_per_connection = 10\n",
        16,
    );
    submit(relay.smtp, "u@gmail.test", 120, 10);
    wait_count(&sink, 120, Duration::from_secs(30));
    let max = sink.max_open();
    eprintln!(
        "connection_limit 4: max concurrent at the sink {max}, sessions {}",
        sink.sessions()
    );
    assert_eq!(max, 4, "max concurrent connections at the sink");
    // max_messages_per_connection = 10: at least 12 sessions for 120 messages.
    assert!(sink.sessions() >= 12, "sessions {}", sink.sessions());
}

#[test]
fn message_rate_600_per_min_is_delivered_within_2_percent_over_several_connections() {
    let sink = ShapingSink::start(Duration::ZERO);
    let dns = dns(&["mx.google.com"]);
    let relay = relay(
        &dns,
        &[("gmail.test", hop("mx.google.com", &sink))],
        "[google]\nconnection_limit = 4\nmessage_rate = \"600/min\"\n",
        8,
    );
    let n = 250;
    submit(relay.smtp, "u@gmail.test", n, 10);
    wait_count(&sink, n, Duration::from_mins(1));
    let t = sink.accepted();
    let rate = rate_of(&t) * 60.0;
    let span = t[t.len() - 1].duration_since(t[0]);
    let err = (rate - 600.0).abs() / 600.0 * 100.0;
    eprintln!(
        "message_rate 600/min: {n} messages over {span:?} = {rate:.1}/min (error {err:.2} %), max concurrent {}",
        sink.max_open()
    );
    assert!(err <= 2.0, "rate {rate:.1}/min is not 600 ± 2 %");
    assert!(sink.max_open() > 1, "several connections share the rate");
}

#[test]
fn a_rate_limited_provider_does_not_slow_an_unlimited_one() {
    // The unlimited provider is bounded by the sink (20 ms per DATA, 4
    // connections), which makes its unshaped rate stable enough to compare.
    let fast = ShapingSink::start(Duration::from_millis(20));
    let slow = ShapingSink::start(Duration::ZERO);
    let dns = dns(&["mx.example.net", "mx.google.com"]);
    let relay = relay(
        &dns,
        &[
            ("other.test", hop("mx.example.net", &fast)),
            ("gmail.test", hop("mx.google.com", &slow)),
        ],
        "[google]\nconnection_limit = 2\nmessage_rate = \"60/min\"\n",
        4,
    );
    let n = 300;
    // Unshaped baseline: the unlimited provider alone.
    submit(relay.smtp, "u@other.test", n, 10);
    wait_count(&fast, n, Duration::from_secs(30));
    let baseline = rate_of(&fast.accepted());
    // Now with a backlog at the limited provider.
    submit(relay.smtp, "u@gmail.test", 100, 10);
    let before = Instant::now();
    submit(relay.smtp, "u@other.test", n, 10);
    wait_count(&fast, 2 * n, Duration::from_secs(30));
    let during: Vec<Instant> = fast.accepted()[n..].to_vec();
    let shared = rate_of(&during);
    let slow_in_window = slow
        .accepted()
        .iter()
        .filter(|t| **t >= before && **t <= during[during.len() - 1])
        .count();
    let ratio = shared / baseline;
    eprintln!(
        "isolation: unlimited provider alone {baseline:.1}/s, while google is limited {shared:.1}/s (ratio {ratio:.3}); google delivered {slow_in_window} in that window, {} so far",
        slow.count()
    );
    assert!(ratio >= 0.95, "isolation ratio {ratio:.3}");
    assert!(slow.count() < 100, "google was really limited");
}

#[test]
fn a_421_4_7_28_suspends_the_provider_for_suspend_for_and_delivery_resumes() {
    let sink = ShapingSink::start(Duration::ZERO);
    let other = ShapingSink::start(Duration::ZERO);
    let dns = dns(&["mx.google.com", "mx.example.net"]);
    let relay = relay(
        &dns,
        &[
            ("gmail.test", hop("mx.google.com", &sink)),
            ("other.test", hop("mx.example.net", &other)),
        ],
        "[google]\nsuspend_for = \"3s\"\n",
        4,
    );
    sink.set_throttle(true);
    submit(relay.smtp, "u@gmail.test", 20, 4);
    wait_for("a 421 4.7.28 sent", Duration::from_secs(10), || {
        (!sink.throttled().is_empty()).then_some(())
    });
    let first = sink.throttled()[0];
    // During the suspension other providers are delivered as usual.
    submit(relay.smtp, "u@other.test", 50, 4);
    wait_count(&other, 50, Duration::from_secs(10));
    assert!(
        other.accepted()[49] < first + Duration::from_secs(3),
        "other provider delivered during the suspension"
    );
    sink.set_throttle(false);
    wait_count(&sink, 20, Duration::from_secs(20));
    let throttled = sink.throttled();
    let resumed = sink.accepted()[0];
    let gap = resumed.duration_since(first);
    eprintln!(
        "suspension: {} x 421 4.7.28 within {:?} of the first, first delivery {gap:?} after it",
        throttled.len(),
        throttled[throttled.len() - 1].duration_since(first)
    );
    assert!(gap >= Duration::from_secs(3), "resumed after {gap:?}");
    assert!(gap < Duration::from_secs(8), "resumed after {gap:?}");
    // Only the connections already past the gate when the first 421 came meet it.
    assert!(
        throttled[throttled.len() - 1].duration_since(first) < Duration::from_secs(1),
        "no new attempt while suspended"
    );
}
