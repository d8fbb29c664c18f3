//! The lab's main story end to end (what `cargo xtask lab` prints): real
//! SMTP sessions through the XDP balancer to three relays.
use smtp_lb_tests::scenario::{self, WEIGHTS};

#[test]
fn sessions_are_spread_by_weight_and_relays_see_the_client() {
    let out = scenario::smtp_through_lb(400, &mut |line| eprintln!("{line}"));
    let total: usize = out.per_relay.iter().map(|(_, n)| n).sum();
    assert_eq!(
        total, 400,
        "every session's message reached exactly one relay"
    );
    assert_eq!(
        out.from_client_addr, 400,
        "every relay saw the client's own address"
    );
    let weight_sum = f64::from(WEIGHTS.iter().sum::<u32>());
    for ((name, n), w) in out.per_relay.iter().zip(WEIGHTS) {
        let share = *n as f64 / 400.0;
        let want = f64::from(w) / weight_sum;
        assert!(
            (share - want).abs() < 0.08,
            "{name}: {share:.3} of sessions, weight says {want:.3}"
        );
    }
    let c = |k: &str| {
        out.counters
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no counter {k}"))
    };
    assert!(
        c("tx") >= 4 * 400,
        "XDP forwarded {} packets for 400 sessions",
        c("tx")
    );
    assert_eq!(c("drop_no_backend"), 0);
    let backends = out
        .backends
        .as_array()
        .expect("ctl backends --json is a list");
    assert_eq!(backends.len(), 3);
    assert!(backends.iter().all(|b| b["health"] == "up"), "{backends:?}");
}
