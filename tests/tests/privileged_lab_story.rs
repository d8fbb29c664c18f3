//! The lab's main story end to end (what `cargo xtask lab` prints): SMTP
//! clients → XDP balancer → three `smtp-lb relay` nodes → ISP MX hosts
//! found through the lab's DNS.
use smtp_lb_tests::scenario::{self, WEIGHTS};

#[test]
fn mail_goes_through_the_balancer_and_relays_to_every_isp() {
    let out = scenario::smtp_through_lb(300, &mut |line| eprintln!("{line}"));
    assert_eq!(out.sessions, 300);
    let accepted: u64 = out.per_relay.iter().map(|(_, a, _)| a).sum();
    let delivered: usize = out.per_relay.iter().map(|(.., d)| d).sum();
    assert_eq!(
        accepted, 300,
        "the balancer sent every session to a relay once"
    );
    assert_eq!(
        delivered, 300,
        "every message reached an ISP, each from the relay that took it"
    );
    for (isp, n) in &out.per_isp {
        assert_eq!(*n, 100, "{isp} received its 100 messages");
    }
    let weight_sum = f64::from(WEIGHTS.iter().sum::<u32>());
    for ((name, a, d), w) in out.per_relay.iter().zip(WEIGHTS) {
        let share = *a as f64 / 300.0;
        let want = f64::from(w) / weight_sum;
        assert!(
            (share - want).abs() < 0.1,
            "{name}: {share:.3} of sessions, weight says {want:.3}"
        );
        assert_eq!(*a as usize, *d, "{name} delivered what it accepted");
    }
    let c = |k: &str| {
        out.counters
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no counter {k}"))
    };
    assert!(
        c("tx") >= 4 * 300,
        "XDP forwarded {} packets for 300 sessions",
        c("tx")
    );
    assert_eq!(c("drop_no_backend"), 0);
    let backends = out
        .backends
        .as_array()
        .expect("ctl backends --json is a list");
    assert!(backends.iter().all(|b| b["health"] == "up"), "{backends:?}");
}

/// The whole story `cargo xtask lab` prints: a relay killed mid-run and
/// restarted, Gmail deferring; nothing accepted is lost.
#[test]
fn a_killed_relay_rejoins_and_gmail_defers_without_losing_mail() {
    let out = scenario::run(
        scenario::Plan {
            sessions: 400,
            story: true,
        },
        &mut |e| {
            if let scenario::Event::Step(line) = e {
                eprintln!("{line}");
            }
        },
    );
    let story = out.story.expect("the story ran");
    let steady = &story.phases[0];
    let weight_sum = f64::from(WEIGHTS.iter().sum::<u32>());
    for (n, w) in steady.per_relay.iter().zip(WEIGHTS) {
        let (share, want) = (
            *n as f64 / steady.sessions as f64,
            f64::from(w) / weight_sum,
        );
        assert!(
            (share - want).abs() < 0.1,
            "steady: {share:.3} of sessions, weight says {want:.3}"
        );
    }

    // The kill: no session lost once the health checks had their time.
    assert!(
        story.phases[2].sessions > 0,
        "sessions ran while relay2 was down"
    );
    assert_eq!(
        story.failed_after_bound, 0,
        "sessions failed after the health bound"
    );
    assert_eq!(
        story.victim_after_bound, 0,
        "relay2 took sessions while dead"
    );
    assert_eq!(
        story.resent_accepted, story.resent,
        "re-sent sessions failed"
    );

    // The rejoin: back up at a fraction of its weight, then at full weight.
    let up: Vec<u64> = story
        .rejoin
        .iter()
        .filter(|(_, h, _)| h == "up")
        .map(|(.., s)| *s)
        .collect();
    assert!(
        up.first().is_some_and(|s| *s < 1000),
        "no slow start: {:?}",
        story.rejoin
    );
    assert!(
        up.windows(2).all(|w| w[0] <= w[1]),
        "share fell while rejoining: {up:?}"
    );
    assert_eq!(
        up.last(),
        Some(&1000),
        "relay2 never reached full weight: {up:?}"
    );
    assert!(
        story.phases[3].per_relay[scenario::VICTIM] > 0,
        "relay2 took no session while rejoining"
    );

    // Gmail: deferred by rule, the others kept going, delivered after.
    assert!(story.gmail_421 > 0, "the Gmail MX never said 421");
    assert_eq!(
        story.gmail_during_suspension, 0,
        "a relay delivered to Gmail while suspended"
    );
    let deferring = &story.phases[4];
    assert!(
        deferring.delivered[1] + deferring.delivered[2] >= deferring.sessions * 2 / 3 * 7 / 10,
        "Outlook and Yahoo slowed while Gmail deferred: {deferring:?}"
    );

    // Nothing accepted is lost.
    for i in &story.isps {
        assert!(i.accepted > 0, "{i:?}");
        assert_eq!(
            i.delivered, i.accepted,
            "{} lost or duplicated mail",
            i.domain
        );
    }
    assert_eq!(story.lost, 0);
    let backends = out
        .backends
        .as_array()
        .expect("ctl backends --json is a list");
    assert!(backends.iter().all(|b| b["health"] == "up"), "{backends:?}");
}
