//! The shaping file and the runtime shapers, as a spec.
use std::time::Duration;

use super::*;

fn parse(s: &str) -> anyhow::Result<ShapingConfig> {
    ShapingConfig::parse(s)
}

#[test]
fn provider_sections_inherit_from_default() {
    let c = parse(
        "[default]\nconnection_limit = 20\nmessage_rate = \"100/s\"\n\n[google]\nconnection_limit = 5\nmax_messages_per_connection = 100\nconnection_rate = \"10/s\"\n",
    )
    .unwrap();
    let g = c.limits("google");
    assert_eq!(g.connection_limit, Some(5));
    assert_eq!(g.max_messages_per_connection, Some(100));
    assert_eq!(g.message_rate, Some("100/s".parse().unwrap()));
    assert_eq!(g.connection_rate, Some("10/s".parse().unwrap()));
    assert_eq!(c.limits("yahoo").connection_limit, Some(20));
    assert_eq!(c.limits("yahoo").connection_rate, None);
    assert_eq!(parse("").unwrap().limits("google"), &Limits::default());
}

#[test]
fn bad_files_are_refused_naming_the_line_or_section() {
    let e = format!(
        "{:#}",
        parse("[default]\nconnection_limit = 2\n\n[google]\nconection_limit = 5\n").unwrap_err()
    );
    assert!(e.contains("line 5") && e.contains("conection_limit"), "{e}");
    let e = format!(
        "{:#}",
        parse("[google]\nconnection_limit = 5\nmessage_rate = \"600/fortnight\"\n").unwrap_err()
    );
    assert!(e.contains("line 3") && e.contains("600/fortnight"), "{e}");
    let e = format!(
        "{:#}",
        parse("[google]\n[gmial]\nconnection_limit = 1\n").unwrap_err()
    );
    assert!(e.contains("[gmial]") && e.contains("line 2"), "{e}");
    let e = format!(
        "{:#}",
        parse("[apple]\nconnection_limit = 0\n").unwrap_err()
    );
    assert!(e.contains("[apple]"), "{e}");
}

#[test]
fn rules_suspend_cut_or_bounce_and_shipped_ones_can_be_turned_off() {
    let cfg = parse(concat!(
        "[google]\n",
        "[[google.rule]]\ncode = 452\ntext = \"over quota\"\naction = \"bounce\"\n",
        "[[google.rule]]\ncode = 451\naction = \"cut_rate\"\nrate = \"1/min\"\nduration = \"1h\"\n",
        "[yahoo]\ndefault_rules = false\n",
    ))
    .unwrap();
    let s = Shaper::new(&cfg, &Limiters::local());
    let g = s.for_host("mx.google.com");
    assert_eq!(
        g.on_reply(&Reply::local(250, "2.0.0", "ok"), None),
        Verdict::Continue
    );
    assert_eq!(
        g.on_reply(&Reply::local(452, "4.2.2", "Over quota"), None),
        Verdict::Bounce
    );
    assert_eq!(
        g.on_reply(&Reply::local(451, "4.3.0", "later"), None),
        Verdict::Continue
    );
    assert!(g.rate_cut.lock().unwrap().is_some(), "cut_rate in force");
    // The shipped Gmail rule still applies after the section's own rules.
    assert_eq!(
        g.on_reply(&Reply::local(421, "4.7.28", "unusual rate"), None),
        Verdict::Suspended
    );
    assert!(g.suspended_until.lock().unwrap().is_some());
    let y = s.for_host("mta5.am0.yahoodns.net");
    assert_eq!(
        y.on_reply(&Reply::local(421, "4.7.0", "[TSS04] deferred"), None),
        Verdict::Continue
    );
    let other = s.for_host("mx.example.org");
    assert_eq!(
        other.on_reply(&Reply::local(421, "4.7.28", "x"), None),
        Verdict::Continue
    );
}

#[test]
fn new_providers_come_with_mx_suffixes_and_a_suffix_claimed_twice_is_refused() {
    let cfg = parse("[acme]\nmx_suffixes = [\"mx.acme.test\"]\nconnection_limit = 3\n").unwrap();
    let s = Shaper::new(&cfg, &Limiters::local());
    assert_eq!(s.for_host("in1.mx.acme.test").name, "acme");
    assert_eq!(cfg.limits("acme").connection_limit, Some(3));
    let e = format!(
        "{:#}",
        parse("[acme]\nmx_suffixes = [\"acme.test\"]\n\n[zeta]\nconnection_limit = 1\nmx_suffixes = [\"google.com\"]\n")
            .unwrap_err()
    );
    assert!(
        e.contains("line 6") && e.contains("google.com") && e.contains("google"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        parse("[a1]\nmx_suffixes = [\"x.test\"]\n[b2]\nmx_suffixes = [\"X.test.\"]\n").unwrap_err()
    );
    assert!(e.contains("line 4") && e.contains("a1"), "{e}");
    let e = format!(
        "{:#}",
        parse("[default]\nmx_suffixes = [\"x.test\"]\n").unwrap_err()
    );
    assert!(e.contains("line 1"), "{e}");
    let e = format!(
        "{:#}",
        parse("[google]\n[[google.rule]]\ncode = 421\naction = \"suspend\"\n").unwrap_err()
    );
    assert!(
        e.contains("line 2") && e.contains("needs a duration"),
        "{e}"
    );
}

#[test]
fn source_overrides_apply_per_pair_by_name_or_address_and_rules_act_per_pair() {
    let cfg = parse(concat!(
        "[default.sources.ip9]\nconnection_limit = 7\n\n",
        "[google]\nconnection_limit = 10\n",
        "[[google.rule]]\ncode = 421\nenhanced = \"4.7.28\"\naction = \"suspend\"\nduration = \"1m\"\n",
        "[google.sources.\"198.51.100.22\"]\nconnection_limit = 1\nmessage_rate = \"60/min\"\n",
    ))
    .unwrap();
    let shaper = Shaper::new(&cfg, &Limiters::local());
    let addr = |a: &str| Some(a.parse().unwrap());
    let ip2 = shaper.for_pair("ip2", addr("198.51.100.22"), "google");
    assert_eq!(ip2.provider.name, "google");
    assert_eq!(ip2.pair.name, "google@ip2");
    assert!(ip2.pair.connections.is_some() && ip2.pair.message_rate.is_some());
    let ip1 = shaper.for_pair("ip1", addr("198.51.100.21"), "google");
    assert!(ip1.pair.connections.is_none(), "no override for ip1");
    // [default.sources] reaches providers without their own entry.
    let ip9 = shaper.for_pair("ip9", None, "yahoo");
    assert!(ip9.pair.connections.is_some());
    let mut keys = shaper.override_keys();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            ("default", "ip9"),
            ("google", "198.51.100.22"),
            ("google", "ip9")
        ]
    );
    // A rule suspends the pair, not the provider or the other source.
    let r = Reply::local(421, "4.7.28", "unusual rate");
    assert_eq!(ip2.on_reply(&r, addr("198.51.100.22")), Verdict::Suspended);
    assert!(ip2.pair.suspended_until().is_some());
    assert_eq!(ip2.pair.suspensions.load(Ordering::Relaxed), 1);
    assert!(ip1.pair.suspended_until().is_none() && ip2.provider.suspended_until().is_none());
    assert!(Arc::ptr_eq(
        &shaper.for_pair("ip2", None, "google").pair,
        &ip2.pair
    ));
    let e = format!(
        "{:#}",
        parse("[google.sources.x]\nconnection_limit = 1\nsources = {}\n").unwrap_err()
    );
    assert!(e.contains("line 3") && e.contains("sources"), "{e}");
}

#[tokio::test]
async fn connection_limit_caps_permits_per_provider_only() {
    let cfg = parse("[google]\nconnection_limit = 2\n").unwrap();
    let s = Shaper::new(&cfg, &Limiters::local());
    let g = s.for_host("mx.google.com");
    let a = g.connection().await;
    let b = g.connection().await;
    assert!(a.is_some() && b.is_some());
    let third = tokio::time::timeout(Duration::from_millis(50), g.connection()).await;
    assert!(third.is_err(), "a third google connection waits");
    let other = s.for_host("mx.example.org");
    assert_eq!(other.name, "default");
    assert!(other.connection().await.is_none(), "default: unlimited");
    drop(a);
    assert!(g.connection().await.is_some());
}
