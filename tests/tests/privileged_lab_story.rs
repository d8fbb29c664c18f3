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
