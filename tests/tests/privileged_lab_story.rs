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
    // Each smtp-source session opens one TCP connection to port 25.
    assert!(
        c("smtp_syn") >= 200,
        "XDP saw {} SMTP SYNs for 200 sessions",
        c("smtp_syn")
    );
    assert!(
        c("smtp_tcp") > c("smtp_syn"),
        "XDP saw the rest of each session too"
    );
    assert!(c("packets") >= c("smtp_tcp"));
}
