//! Egress pools, warmup and per-source shaping (issue 6) with real peers in
//! a network namespace: the source addresses are plumbed on the `mta`
//! host's `eth0`, and the relay, dnsmasq, `smtp-source` and the counting
//! sink all run inside it (the whole test body runs on a thread that
//! entered the namespace). The sink records each message's client address
//! and `EHLO` name, so every claim is checked from the receiving side.
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    dns::Dnsmasq,
    lab::Lab,
    relay::{Relay, RelayConfig},
    shaping_sink::ShapingSink,
    smtp::smtp_source,
    tmp::wait_for,
};

const SINK_IP: &str = "198.51.100.50";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Runs `body` inside a fresh lab host whose `eth0` holds `addrs` and the sink's address.
fn in_lab<T: Send + 'static>(addrs: &[&str], body: impl FnOnce() -> T + Send + 'static) -> T {
    let mut lab = Lab::new();
    let mut all: Vec<String> = addrs.iter().map(|a| format!("{a}/24")).collect();
    all.push(format!("{SINK_IP}/24"));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    lab.host("mta", &all);
    lab.in_netns("mta", body)
}

fn source(name: &str, addr: &str, extra: &str) -> String {
    format!(
        "[[egress.source]]\nname = \"{name}\"\naddress = \"{addr}\"\nhelo = \"{name}.mta.test\"\n{extra}\n"
    )
}

fn relay(sink: &ShapingSink, egress: &str, shaping: Option<&str>, dns: Option<&Dnsmasq>) -> Relay {
    let hop = match dns {
        Some(_) => format!("mx.google.com:{}", sink.addr.port()),
        None => sink.addr.to_string(),
    };
    Relay::start(&RelayConfig {
        routes: vec![("*".into(), hop)],
        nameservers: dns.map(|d| vec![d.addr.to_string()]).unwrap_or_default(),
        shaping: shaping.map(str::to_owned),
        extra_toml: egress.to_owned(),
        ..RelayConfig::default()
    })
}

fn wait_count(sink: &ShapingSink, n: usize, timeout: Duration) {
    wait_for(&format!("{n} messages at the sink"), timeout, || {
        (sink.count() >= n).then_some(())
    });
}

fn by_peer(sink: &ShapingSink) -> HashMap<IpAddr, usize> {
    let mut m = HashMap::new();
    for d in sink.deliveries() {
        *m.entry(d.peer).or_default() += 1;
    }
    m
}

#[test]
fn a_2_1_1_pool_spreads_messages_by_weight_with_each_sources_helo() {
    in_lab(&["198.51.100.21", "198.51.100.22", "198.51.100.23"], || {
        let sink = ShapingSink::start_at(ip(SINK_IP), Duration::ZERO);
        let egress = format!(
            "[egress]\ndefault_pool = \"main\"\n{}{}{}\
             [[egress.pool]]\nname = \"main\"\nsources = [{{ name = \"a\", weight = 2 }}, {{ name = \"b\" }}, {{ name = \"c\" }}]\n",
            source("a", "198.51.100.21", ""),
            source("b", "198.51.100.22", ""),
            source("c", "198.51.100.23", ""),
        );
        let relay = relay(&sink, &egress, None, None);
        let n = 400;
        smtp_source(relay.smtp, "u@gmail.test", n, 10);
        wait_count(&sink, n, Duration::from_mins(1));
        let counts = by_peer(&sink);
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let pct = |a: &str| *counts.get(&ip(a)).unwrap_or(&0) as f64 * 100.0 / n as f64;
        let shares = [
            pct("198.51.100.21"),
            pct("198.51.100.22"),
            pct("198.51.100.23"),
        ];
        eprintln!("2:1:1 pool over {n} messages: shares at the sink {shares:?} %");
        for (share, want) in shares.into_iter().zip([50.0, 25.0, 25.0]) {
            assert!((share - want).abs() <= 3.0, "{shares:?}");
        }
        for d in sink.deliveries() {
            let want = match d.peer.to_string().as_str() {
                "198.51.100.21" => "a.mta.test",
                "198.51.100.22" => "b.mta.test",
                "198.51.100.23" => "c.mta.test",
                other => panic!("message from unexpected source {other}"),
            };
            assert_eq!(d.ehlo, want, "EHLO from {}", d.peer);
        }
        let a = relay.metric(
            "smtp_lb_relay_egress_recipients_total{provider=\"default\",source=\"a\",status=\"delivered\",code=\"2.0.0\"}",
        );
        assert_eq!(a as usize, counts[&ip("198.51.100.21")], "metric by source");
    });
}

#[test]
fn an_unplumbed_source_is_suspended_once_and_the_pool_delivers_everything() {
    in_lab(&["198.51.100.21", "198.51.100.22", "198.51.100.23"], || {
        let sink = ShapingSink::start_at(ip(SINK_IP), Duration::ZERO);
        // d's address 198.51.100.24 is on no interface.
        let egress = format!(
            "[egress]\ndefault_pool = \"main\"\n{}{}{}{}\
             [[egress.pool]]\nname = \"main\"\nsources = [{{ name = \"a\", weight = 2 }}, {{ name = \"b\" }}, {{ name = \"c\" }}, {{ name = \"d\" }}]\n",
            source("a", "198.51.100.21", ""),
            source("b", "198.51.100.22", ""),
            source("c", "198.51.100.23", ""),
            source("d", "198.51.100.24", ""),
        );
        let relay = relay(&sink, &egress, None, None);
        let n = 200;
        smtp_source(relay.smtp, "u@gmail.test", n, 10);
        wait_count(&sink, n, Duration::from_mins(1));
        std::thread::sleep(Duration::from_millis(300));
        let counts = by_peer(&sink);
        eprintln!("pool with unplumbed d: {counts:?}");
        assert_eq!(sink.count(), n, "every message delivered once");
        assert!(!counts.contains_key(&ip("198.51.100.24")));
        let stderr = relay.stderr();
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("egress source is not configured on this host"))
            .collect();
        assert_eq!(lines.len(), 1, "one log line: {lines:#?}");
        // Field names and values (the log may carry colour codes between them).
        for word in [
            "source",
            "\"d\"",
            "address",
            "198.51.100.24",
            "pool",
            "\"main\"",
        ] {
            assert!(lines[0].contains(word), "{word} not in {}", lines[0]);
        }
        assert_eq!(
            relay.metric("smtp_lb_relay_egress_source_unplumbed{source=\"d\"}"),
            1
        );
        let deferred = relay
            .log()
            .into_iter()
            .filter(|v| v["status"] != "delivered")
            .count();
        assert_eq!(deferred, 0, "re-routing is not a delivery attempt");
        let (_, sources) = relay.admin("GET", "/sources");
        let v: serde_json::Value = serde_json::from_str(&sources).expect("json");
        assert!(
            v["sources"][3]["unplumbed_secs"].as_u64().unwrap() > 0,
            "{v}"
        );
    });
}

/// Cold source `a` (cap `caps` per warmup day of `day`), warm `b`, weights 1:1.
fn warmup_relay(sink: &ShapingSink, caps: &str, overflow: &str, day: &str) -> Relay {
    let egress = format!(
        "[egress]\ndefault_pool = \"main\"\nwarmup_day = \"{day}\"\n{}{}\
         [[egress.pool]]\nname = \"main\"\nsources = [{{ name = \"a\" }}, {{ name = \"b\" }}]\n\
         [egress.warmup.default]\ndaily = {caps}\noverflow = \"{overflow}\"\n",
        source("a", "198.51.100.21", "warmup_start = \"now\""),
        source("b", "198.51.100.22", ""),
    );
    relay(sink, &egress, None, None)
}

#[test]
fn warmup_spill_caps_a_cold_source_per_day_and_the_excess_goes_to_a_warm_one() {
    in_lab(&["198.51.100.21", "198.51.100.22"], || {
        let sink = ShapingSink::start_at(ip(SINK_IP), Duration::ZERO);
        let day = Duration::from_secs(6);
        let t0 = Instant::now();
        let relay = warmup_relay(&sink, "[10, 15]", "spill", "6s");
        smtp_source(relay.smtp, "u@gmail.test", 40, 10);
        wait_count(&sink, 40, Duration::from_secs(5));
        assert!(t0.elapsed() < day, "day 0 batch took too long");
        let cold = ip("198.51.100.21");
        let day0 = by_peer(&sink);
        let progress = relay.admin("GET", "/sources").1;
        eprintln!("day 0: {day0:?}; ctl sources: {progress}");
        assert_eq!(day0[&cold], 10, "day-0 cap of the cold source");
        assert_eq!(day0[&ip("198.51.100.22")], 30, "the excess spilled");
        assert!(progress.contains("\"daily_cap\":10") && progress.contains("\"sent_day\":10"));
        assert_eq!(
            relay.metric(
                "smtp_lb_relay_egress_warmup_sent_messages{provider=\"default\",source=\"a\"}"
            ),
            10
        );
        // Day 1 (cap 15) starts 6 s after the relay did.
        let wait =
            (t0 + day + Duration::from_millis(500)).saturating_duration_since(Instant::now());
        std::thread::sleep(wait);
        smtp_source(relay.smtp, "u@gmail.test", 40, 10);
        wait_count(&sink, 80, Duration::from_secs(5));
        assert!(t0.elapsed() < day * 2, "day 1 batch took too long");
        let total = by_peer(&sink);
        eprintln!("after day 1: {total:?}");
        assert_eq!(total[&cold] - 10, 15, "day-1 cap of the cold source");
        assert_eq!(sink.count(), 80);
    });
}

#[test]
fn warmup_wait_holds_the_excess_for_the_next_day() {
    in_lab(&["198.51.100.21", "198.51.100.22"], || {
        let sink = ShapingSink::start_at(ip(SINK_IP), Duration::ZERO);
        let day = Duration::from_secs(4);
        let t0 = Instant::now();
        let relay = warmup_relay(&sink, "[10, 10]", "wait", "4s");
        smtp_source(relay.smtp, "u@gmail.test", 40, 10);
        wait_count(&sink, 40, Duration::from_secs(15));
        let cold = ip("198.51.100.21");
        let deliveries = sink.deliveries();
        let boundary = t0 + day;
        let a_day0 = deliveries
            .iter()
            .filter(|d| d.peer == cold && d.at < boundary)
            .count();
        let a_later = deliveries
            .iter()
            .filter(|d| d.peer == cold && d.at >= boundary)
            .count();
        let b = deliveries.iter().filter(|d| d.peer != cold).count();
        eprintln!("wait: cold source {a_day0} in day 0, {a_later} after; warm source {b}");
        assert_eq!((a_day0, a_later, b), (10, 10, 20));
        assert!(
            relay.log().iter().all(|v| v["status"] == "delivered"),
            "waiting is not a failed attempt"
        );
    });
}

#[test]
fn a_per_source_override_limits_that_sources_connections_at_the_sink() {
    in_lab(&["198.51.100.21", "198.51.100.22"], || {
        // 100 ms per DATA keeps connections busy.
        let sink = ShapingSink::start_at(ip(SINK_IP), Duration::from_millis(100));
        let dns = Dnsmasq::start(&[
            "--local=/com/test/".to_owned(),
            format!("--host-record=mx.google.com,{SINK_IP}"),
        ]);
        let egress = format!(
            "[egress]\ndefault_pool = \"main\"\n{}{}\
             [[egress.pool]]\nname = \"main\"\nsources = [{{ name = \"a\" }}, {{ name = \"b\" }}]\n",
            source("a", "198.51.100.21", ""),
            source("b", "198.51.100.22", ""),
        );
        let shaping = "[google]\nconnection_limit = 10\n\n[google.sources.\"198.51.100.22\"]\nconnection_limit = 1\n";
        let relay = relay(&sink, &egress, Some(shaping), Some(&dns));
        smtp_source(relay.smtp, "u@gmail.test", 80, 10);
        wait_count(&sink, 80, Duration::from_mins(1));
        let (a, b) = (
            sink.max_open_from(ip("198.51.100.21")),
            sink.max_open_from(ip("198.51.100.22")),
        );
        eprintln!("per-source connection_limit: max concurrent a={a} b={b}");
        assert_eq!(b, 1, "override for 198.51.100.22 holds");
        assert!(a > 1, "the other source is not limited by it ({a})");
        let counts = by_peer(&sink);
        assert_eq!(counts.values().sum::<usize>(), 80);
    });
}

#[test]
fn a_421_4_7_28_suspends_only_that_source_for_the_provider() {
    in_lab(&["198.51.100.21", "198.51.100.22"], || {
        let sink = ShapingSink::start_at(ip(SINK_IP), Duration::ZERO);
        let a = ip("198.51.100.21");
        sink.set_throttle_from(Some(a));
        let egress = format!(
            "[egress]\ndefault_pool = \"main\"\n{}{}\
             [[egress.pool]]\nname = \"main\"\nsources = [{{ name = \"a\" }}, {{ name = \"b\" }}]\n",
            source("a", "198.51.100.21", ""),
            source("b", "198.51.100.22", ""),
        );
        let relay = relay(
            &sink,
            &egress,
            Some(
                "[[default.rule]]\ncode = 421\nenhanced = \"4.7.28\"\naction = \"suspend\"\nduration = \"30s\"\n",
            ),
            None,
        );
        smtp_source(relay.smtp, "u@gmail.test", 40, 10);
        // b's half arrives while a is suspended.
        wait_count(&sink, 20, Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(1));
        let counts = by_peer(&sink);
        eprintln!(
            "421 to a only: delivered {counts:?}, 421s sent {}",
            sink.throttled().len()
        );
        assert_eq!(counts.get(&a), None, "nothing from the suspended pair");
        // b has its half, and deferred jobs of a that were routed to b on retry.
        assert!(counts[&ip("198.51.100.22")] >= 20);
        // Only a's connections already open when the first 421 came got one.
        let t = sink.throttled();
        assert!(
            t[t.len() - 1].duration_since(t[0]) < Duration::from_millis(500),
            "no new attempt from a while suspended"
        );
        assert_eq!(
            relay.metric(
                "smtp_lb_relay_egress_suspensions_total{provider=\"default\",source=\"a\"}"
            ),
            1
        );
        assert_eq!(
            relay.metric("smtp_lb_relay_egress_suspended{provider=\"default\",source=\"a\"}"),
            1
        );
        assert_eq!(
            relay.metric("smtp_lb_relay_egress_suspended{provider=\"default\",source=\"b\"}"),
            0
        );
    });
}
