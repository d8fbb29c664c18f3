//! The lab's main story end to end: real SMTP sessions from a client
//! namespace through the LB node's XDP program to a relay's sink.
use smtp_lb_tests::scenario;

#[test]
fn smtp_sessions_through_the_lb_are_seen_by_xdp_and_delivered() {
    let out = scenario::smtp_through_lb(200, &mut |line| eprintln!("{line}"));
    assert_eq!(out.sessions, 200);
    assert_eq!(
        out.delivered, 200,
        "every session's message reached the relay's sink"
    );
    let c = |k: &str| {
        out.counters
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no counter {k}: {:?}", out.counters))
    };
    // No service is configured in this story yet, so the LB node's program
    // passes the sessions to the kernel, which forwards them; each session
    // is at least SYN, ACK, data and FIN segments.
    assert!(
        c("pass_non_vip") >= 4 * 200,
        "XDP saw {} non-VIP packets for 200 sessions",
        c("pass_non_vip")
    );
}
