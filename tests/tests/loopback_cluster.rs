//! Cluster limits (`[cluster]`, issue 6) against real peers on 127.0.0.1:
//! two `smtp-lb relay` processes sharing one `redis-server`, dnsmasq
//! resolving `mx.google.com` to loopback, `smtp-source` submitting, and a
//! counting sink measuring concurrency and delivery times on its side.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    dns::Dnsmasq,
    fake_mx::{FakeMx, rate_of},
    redis::RedisServer,
    relay::{Relay, RelayConfig},
    smtp::smtp_source,
    tmp::{free_port, wait_for},
};

const WARNING: &str = "redis unreachable";
const BACK: &str = "redis reachable again";

/// A relay routing `gmail.test` to the sink (provider `google`), sharing limits through `redis_url`.
fn relay(dns: &Dnsmasq, sink: &FakeMx, shaping: &str, cluster: &str) -> Relay {
    Relay::start(&RelayConfig {
        routes: vec![(
            "gmail.test".into(),
            format!("mx.google.com:{}", sink.addr.port()),
        )],
        nameservers: vec![dns.addr.to_string()],
        connections_per_destination: 16,
        shaping: Some(shaping.to_owned()),
        extra_toml: format!("[cluster]\n{cluster}"),
        ..RelayConfig::default()
    })
}

fn cluster(url: &str) -> String {
    format!("redis = \"{url}\"\n")
}

/// Submits `n` to each relay at once.
fn submit_both(a: &Relay, b: &Relay, n: usize) {
    let (sa, sb) = (a.smtp, b.smtp);
    std::thread::scope(|s| {
        s.spawn(|| smtp_source(sa, "u@gmail.test", n, 10));
        s.spawn(|| smtp_source(sb, "u@gmail.test", n, 10));
    });
}

fn wait_count(sink: &FakeMx, n: usize, timeout: Duration) {
    wait_for(&format!("{n} messages at the sink"), timeout, || {
        (sink.count() >= n).then_some(())
    });
}

fn delivered(r: &Relay) -> u64 {
    r.metric("smtp_lb_relay_recipients_total{domain=\"gmail.test\",status=\"delivered\"}")
}

#[test]
fn two_relays_share_connection_limit_4_at_the_sink() {
    let redis = RedisServer::start();
    // Each DATA takes 150 ms at the sink, so 2 × 16 workers keep every slot busy.
    let sink = FakeMx::builder()
        .delay("DATA", Duration::from_millis(150))
        .start();
    let dns = Dnsmasq::loopback_hosts(&["mx.google.com"]);
    let shaping = "[google]\nconnection_limit = 4\nmax_messages_per_connection = 10\n";
    let a = relay(&dns, &sink, shaping, &cluster(&redis.url()));
    let b = relay(&dns, &sink, shaping, &cluster(&redis.url()));
    submit_both(&a, &b, 100);
    wait_count(&sink, 200, Duration::from_secs(40));
    let max = sink.max_open();
    eprintln!(
        "shared connection_limit 4: max concurrent at the sink {max}, sessions {}, delivered by a/b {}/{}",
        sink.sessions(),
        delivered(&a),
        delivered(&b)
    );
    assert_eq!(max, 4, "max concurrent connections at the sink (not 8)");
    assert_eq!((delivered(&a), delivered(&b)), (100, 100));
}

#[test]
fn two_relays_share_message_rate_600_per_min_within_2_percent() {
    let redis = RedisServer::start();
    let sink = FakeMx::start();
    let dns = Dnsmasq::loopback_hosts(&["mx.google.com"]);
    let shaping = "[google]\nconnection_limit = 4\nmessage_rate = \"600/min\"\n";
    let a = relay(&dns, &sink, shaping, &cluster(&redis.url()));
    let b = relay(&dns, &sink, shaping, &cluster(&redis.url()));
    let n = 120;
    submit_both(&a, &b, n);
    wait_count(&sink, 2 * n, Duration::from_mins(1));
    let t = sink.accepted();
    let rate = rate_of(&t) * 60.0;
    let span = t[t.len() - 1].duration_since(t[0]);
    let err = (rate - 600.0).abs() / 600.0 * 100.0;
    eprintln!(
        "shared message_rate 600/min: {} messages over {span:?} = {rate:.1}/min (error {err:.2} %), delivered by a/b {}/{}",
        t.len(),
        delivered(&a),
        delivered(&b)
    );
    assert!(span >= Duration::from_secs(20), "window {span:?}");
    assert!(err <= 2.0, "combined rate {rate:.1}/min is not 600 ± 2 %");
    assert_eq!((delivered(&a), delivered(&b)), (n as u64, n as u64));
}

#[test]
fn losing_redis_degrades_to_local_limits_and_loses_nothing() {
    let mut redis = RedisServer::start();
    // 20 ms per DATA keeps connections busy without bounding the rate.
    let sink = FakeMx::builder()
        .delay("DATA", Duration::from_millis(20))
        .start();
    let dns = Dnsmasq::loopback_hosts(&["mx.google.com"]);
    let (limit, per_min) = (3, 600.0);
    let shaping = format!(
        "[google]\nconnection_limit = {limit}\nmessage_rate = \"{per_min}/min\"\nmax_messages_per_connection = 20\n"
    );
    let a = relay(&dns, &sink, &shaping, &cluster(&redis.url()));
    let b = relay(&dns, &sink, &shaping, &cluster(&redis.url()));
    let n = 150;
    submit_both(&a, &b, n);
    wait_count(&sink, 60, Duration::from_secs(20));
    let shared_max = sink.max_open();
    let shared_rate = rate_of(&sink.accepted()) * 60.0;
    redis.kill();
    let killed = Instant::now();
    wait_count(&sink, 2 * n, Duration::from_mins(1));
    // Settle: nothing more may arrive (no duplicates).
    std::thread::sleep(Duration::from_millis(500));
    let t = sink.accepted();
    let after: Vec<Instant> = t
        .iter()
        .copied()
        .filter(|x| *x >= killed + Duration::from_secs(1) && *x <= killed + Duration::from_secs(9))
        .collect();
    let local_rate = rate_of(&after) * 60.0;
    let max = sink.max_open();
    eprintln!(
        "redis lost: before {shared_rate:.1}/min, max concurrent {shared_max}; after {local_rate:.1}/min over {} messages, max concurrent {max}; total {}",
        after.len(),
        t.len()
    );
    assert!(shared_max <= limit, "shared limit before the kill");
    for r in [&a, &b] {
        let warnings = r.stderr().matches(WARNING).count();
        assert_eq!(warnings, 1, "one warning per outage:\n{}", r.stderr());
        assert_eq!(r.metric("smtp_lb_relay_cluster_redis_up"), 0);
        assert_eq!(r.metric("smtp_lb_relay_cluster_outages_total"), 1);
        assert!(r.metric("smtp_lb_relay_cluster_local_decisions_total") > 0);
    }
    assert!(after.len() >= 100, "kept delivering after the kill");
    assert!(max <= 2 * limit, "max concurrency {max} > 2 × {limit}");
    assert!(
        local_rate <= 2.0 * per_min * 1.02,
        "rate {local_rate:.1}/min > 2 × {per_min}/min + 2 %"
    );
    assert_eq!(t.len(), 2 * n, "every message delivered exactly once");
    assert_eq!((delivered(&a), delivered(&b)), (n as u64, n as u64));
}

#[test]
fn a_relay_started_without_redis_limits_locally_and_shares_once_redis_is_up() {
    let port = free_port();
    let sink = FakeMx::builder()
        .delay("DATA", Duration::from_millis(100))
        .start();
    let dns = Dnsmasq::loopback_hosts(&["mx.google.com"]);
    let shaping = "[google]\nconnection_limit = 2\nmessage_rate = \"6000/min\"\n";
    let a = relay(
        &dns,
        &sink,
        shaping,
        &format!(
            "{}key_prefix = \"t4\"\n",
            cluster(&format!("redis://127.0.0.1:{port}"))
        ),
    );
    wait_for("the outage warning", Duration::from_secs(5), || {
        a.stderr().contains(WARNING).then_some(())
    });
    assert_eq!(a.metric("smtp_lb_relay_cluster_redis_up"), 0);
    smtp_source(a.smtp, "u@gmail.test", 20, 10);
    wait_count(&sink, 20, Duration::from_secs(20));
    assert_eq!(
        sink.max_open(),
        2,
        "local connection limit while Redis is away"
    );

    let redis = RedisServer::start_on(port);
    wait_for("redis_up = 1", Duration::from_secs(5), || {
        (a.metric("smtp_lb_relay_cluster_redis_up") == 1).then_some(())
    });
    assert!(a.stderr().contains(BACK), "{}", a.stderr());
    smtp_source(a.smtp, "u@gmail.test", 5, 10);
    wait_count(&sink, 25, Duration::from_secs(20));
    let keys = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--scan", "--pattern", "t4:*"])
        .output()
        .expect("run redis-cli");
    let keys = String::from_utf8_lossy(&keys.stdout);
    eprintln!("keys after redis came back: {keys:?}");
    assert!(keys.contains("t4:message_rate:google"), "{keys}");
    drop(redis);
}

#[test]
fn a_crashed_relays_connection_leases_expire_within_the_lease() {
    let redis = RedisServer::start();
    // Sessions are held 3 s in DATA, so the killed relay dies holding both slots.
    let hold = Duration::from_secs(3);
    let sink = FakeMx::builder().delay("DATA", hold).start();
    // The second relay delivers to its own sink (same provider, same
    // leases) so its sessions are told apart from the dead relay's.
    let sink_b = FakeMx::builder().delay("DATA", hold).start();
    let dns = Dnsmasq::loopback_hosts(&["mx.google.com"]);
    let shaping = "[google]\nconnection_limit = 2\n";
    let conf = format!("{}lease = \"2s\"\n", cluster(&redis.url()));
    let mut a = relay(&dns, &sink, shaping, &conf);
    let b = relay(&dns, &sink_b, shaping, &conf);
    smtp_source(a.smtp, "u@gmail.test", 4, 10);
    wait_for(
        "the first relay holding both slots",
        Duration::from_secs(10),
        || (sink.max_open() == 2).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(300));
    a.kill9();
    let killed = Instant::now();
    smtp_source(b.smtp, "u@gmail.test", 2, 10);
    wait_count(&sink_b, 1, Duration::from_secs(15));
    // B's first session starts `hold` before its first acceptance.
    let waited = sink_b.accepted()[0]
        .duration_since(killed)
        .saturating_sub(hold);
    eprintln!(
        "after kill -9 of the holder, the other relay connected after {waited:?} (lease 2 s)"
    );
    // Leases are refreshed every lease/3, so 1.3–2 s of them were left.
    assert!(
        waited >= Duration::from_millis(1200),
        "{waited:?}: the leases were not held"
    );
    assert!(
        waited <= Duration::from_secs(3),
        "{waited:?}: the leases outlived the lease time"
    );
}
