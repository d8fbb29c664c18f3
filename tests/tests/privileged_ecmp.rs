//! ECMP scale-out (issue 14): several LB nodes, each running `smtp-lb lb`
//! with `[announce]` (its own bird 2 announcing the VIP over BGP), behind a
//! router namespace running bird 2 with ECMP (`merge paths`, L4 hash).
//! Real bird, real kernels, Postfix `smtp-source` and `smtp-sink`.
//!
//! Run with `cargo xtask test --tier privileged -- ecmp`.
use std::{
    net::SocketAddr,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    load::{Load, Session},
    topology::{EcmpLab, HOLD_TIME, VIP},
};

fn vip25() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 25)
}

/// Starts every node and waits until the router sends the VIP to all of them.
fn all_up(lab: &mut EcmpLab) -> Duration {
    let started = Instant::now();
    for i in 0..lab.nodes.len() {
        lab.start(i);
    }
    let all: Vec<usize> = (0..lab.nodes.len()).collect();
    lab.wait_next_hops(&all, Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the router never had one next hop per node ({:?}): {:?}",
                lab.addrs(&all),
                lab.next_hops()
            )
        });
    started.elapsed()
}

/// Sessions that failed, as `start..end: error` lines.
fn failures<'a>(sessions: impl IntoIterator<Item = &'a Session>) -> Vec<String> {
    sessions
        .into_iter()
        .filter(|s| s.error.is_some() || !s.accepted)
        .map(|s| format!("{:?}..{:?}: {:?}", s.start, s.end, s.error))
        .collect()
}

#[test]
fn a_killed_node_is_withdrawn_within_the_hold_time_and_rejoins_without_breaking_sessions() {
    let mut lab = EcmpLab::new(3, 2);
    let up_after = all_up(&mut lab);
    eprintln!(
        "ecmp: 3 nodes announced, router has 3 next hops {:?} after {up_after:?}",
        lab.next_hops()
    );

    // The router spreads new sessions over every node (L4 hash).
    let before: Vec<u64> = (0..3).map(|i| lab.new_flows(i)).collect();
    lab.dsr.send(300, 10);
    let spread: Vec<u64> = (0..3).map(|i| lab.new_flows(i) - before[i]).collect();
    eprintln!("ecmp: 300 smtp-source sessions by node: {spread:?}");
    assert!(
        spread.iter().all(|n| *n > 0),
        "a node got no session: {spread:?}"
    );
    assert_eq!(
        spread.iter().sum::<u64>(),
        300,
        "sessions by node: {spread:?}"
    );

    // Load across the kill: a client recording every session (each holds
    // 300 ms after MAIL FROM, so some are in flight on the victim), and
    // Postfix smtp-source beside it.
    let netns = lab.dsr.lab.get("client").netns.clone();
    let delivered_before: usize = lab.dsr.delivered().iter().sum();
    let load = Load::start(&netns, vip25(), 6, Duration::from_millis(300));
    let source = lab
        .dsr
        .smtp_source(100_000, 4, "user@isp.example")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start smtp-source");
    thread::sleep(Duration::from_secs(2));

    let victim = 1;
    let killed_at = load.now();
    lab.kill(victim);
    let withdrawn = lab
        .wait_next_hops(&[0, 2], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the killed node's route stayed: {:?}", lab.next_hops()));
    let withdrawn_at = killed_at + withdrawn;
    eprintln!(
        "ecmp: lb2's daemon SIGKILLed at {killed_at:?}; its route was gone from the router after {withdrawn:?} (hold time {HOLD_TIME:?})"
    );
    assert!(
        withdrawn <= HOLD_TIME,
        "the route of the killed node went after {withdrawn:?}, beyond the hold time {HOLD_TIME:?}"
    );

    thread::sleep(Duration::from_secs(3));
    let restarted_at = load.now();
    lab.start(victim);
    let rejoined = lab
        .wait_next_hops(&[0, 1, 2], Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the restarted node never came back: {:?}", lab.next_hops()));
    eprintln!(
        "ecmp: lb2 restarted at {restarted_at:?}; back in the router's table after {rejoined:?}"
    );
    let flows_at_rejoin = lab.new_flows(victim);
    thread::sleep(Duration::from_secs(3));
    let sessions = load.stop();
    let _ = nix_kill(source.id());
    let source = source.wait_with_output().expect("smtp-source");
    let victim_took = lab.new_flows(victim) - flows_at_rejoin;
    let accepted = sessions.iter().filter(|s| s.accepted).count();
    let delivered: usize = lab.dsr.delivered().iter().sum::<usize>() - delivered_before;

    let in_window = |s: &&Session| s.end >= killed_at && s.start < withdrawn_at;
    let around_kill: Vec<&Session> = sessions.iter().filter(in_window).collect();
    let after_withdrawal: Vec<&Session> = sessions
        .iter()
        .filter(|s| s.start >= withdrawn_at)
        .collect();
    let after_restart: Vec<&Session> = sessions.iter().filter(|s| s.end >= restarted_at).collect();
    let source_errors: Vec<String> = String::from_utf8_lossy(&source.stderr)
        .lines()
        .filter(|l| l.contains("warning") || l.contains("fatal"))
        .map(str::to_owned)
        .collect();
    eprintln!(
        "ecmp: client sessions: {} in all; {} in flight between the kill and the withdrawal, {} of them broken; \
         {} started after the withdrawal, {} broken; {} ran after the restart, {} broken; \
         lb2 took {victim_took} new sessions after rejoining",
        sessions.len(),
        around_kill.len(),
        failures(around_kill.iter().copied()).len(),
        after_withdrawal.len(),
        failures(after_withdrawal.iter().copied()).len(),
        after_restart.len(),
        failures(after_restart.iter().copied()).len(),
    );
    eprintln!(
        "ecmp: smtp-source across the kill: about {} sessions (messages at the sinks beyond the client's {accepted}), {} error lines: {source_errors:?}",
        delivered.saturating_sub(accepted),
        source_errors.len()
    );
    assert!(!after_withdrawal.is_empty() && !after_restart.is_empty());
    assert_eq!(
        failures(after_withdrawal.iter().copied()),
        Vec::<String>::new(),
        "sessions started after the withdrawal failed"
    );
    assert_eq!(
        failures(after_restart.iter().copied()),
        Vec::<String>::new(),
        "sessions broke when the node rejoined"
    );
    assert!(
        source_errors.is_empty(),
        "smtp-source sessions broke: {source_errors:?}"
    );
    assert!(victim_took > 0, "the rejoined node took no new session");
    assert!(
        lab.metrics(victim).contains(
            "smtp_lb_balancer_vip_announce_changes_total{action=\"announce\",reason=\"healthy\"} 1"
        ),
        "the restarted node did not count its announcement"
    );
}

#[test]
fn a_drained_node_is_withdrawn_while_its_sessions_complete() {
    let mut lab = EcmpLab::new(2, 2);
    all_up(&mut lab);
    let netns = lab.dsr.lab.get("client").netns.clone();
    // Long sessions (1.5 s after MAIL FROM): many are on lb2 when it drains.
    let load = Load::start(&netns, vip25(), 8, Duration::from_millis(1500));
    thread::sleep(Duration::from_secs(3));
    let drained = lab.nodes[1].0.clone();
    let flows_before = lab.new_flows(1);
    assert!(flows_before > 0, "lb2 took no session before the drain");
    let drained_at = load.now();
    lab.dsr.ctl_on(&drained, &["node", "drain"]);
    let withdrawn = lab
        .wait_next_hops(&[0], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the drained node's route stayed: {:?}", lab.next_hops()));
    eprintln!(
        "ecmp: `ctl node drain` on lb2; its route was gone from the router after {withdrawn:?}"
    );
    thread::sleep(Duration::from_millis(500));
    let flows_after_withdrawal = lab.new_flows(1);
    thread::sleep(Duration::from_secs(3));
    let sessions = load.stop();
    let flows_end = lab.new_flows(1);

    let in_flight: Vec<&Session> = sessions
        .iter()
        .filter(|s| s.start < drained_at && s.end > drained_at)
        .collect();
    eprintln!(
        "ecmp: {} sessions, {} in flight at the drain, {} failed; lb2 new flows: {flows_before} before, {flows_end} at the end",
        sessions.len(),
        in_flight.len(),
        failures(&sessions).len()
    );
    assert!(
        in_flight.len() >= 4,
        "too few sessions in flight at the drain: {}",
        in_flight.len()
    );
    assert_eq!(
        failures(&sessions),
        Vec::<String>::new(),
        "sessions failed across the drain"
    );
    assert_eq!(
        flows_end, flows_after_withdrawal,
        "the drained node still took new sessions after its withdrawal"
    );
    let status = lab.dsr.ctl_on(&drained, &["status"]);
    assert_eq!(status["node"]["drained"], true, "{status}");
    assert_eq!(
        status["node"]["announce"]["reason"], "node_drained",
        "{status}"
    );
    assert!(
        lab.metrics(1).contains(
            "smtp_lb_balancer_vip_announce_changes_total{action=\"withdraw\",reason=\"node_drained\"} 1"
        ),
        "the drain was not counted"
    );

    // Undrain: announced again.
    lab.dsr.ctl_on(&drained, &["node", "undrain"]);
    let back = lab
        .wait_next_hops(&[0, 1], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the undrained node never came back: {:?}", lab.next_hops()));
    eprintln!("ecmp: `ctl node undrain`: back in the router's table after {back:?}");
}

/// SIGTERM to a process this test started.
fn nix_kill(pid: u32) -> i32 {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid.cast_signed(), libc::SIGTERM) }
}

#[test]
fn every_node_withdraws_while_no_relay_is_up_and_announces_again_when_one_is() {
    let mut lab = EcmpLab::new(2, 1);
    all_up(&mut lab);
    lab.dsr.kill_sink(0);
    // Health checks take it down within 2 × (200 ms + 800 ms of timeouts).
    let withdrawn = lab
        .wait_next_hops(&[], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("routes stayed with no relay up: {:?}", lab.next_hops()));
    eprintln!("ecmp: the only relay's sink killed; both nodes withdrawn after {withdrawn:?}");
    let status = lab.dsr.ctl_on(&lab.nodes[0].0, &["status"]);
    assert_eq!(
        status["node"]["announce"]["reason"], "no_relay_up",
        "{status}"
    );
    for i in 0..2 {
        assert!(
            lab.metrics(i).contains(
                "smtp_lb_balancer_vip_announce_changes_total{action=\"withdraw\",reason=\"no_relay_up\"} 1"
            ),
            "node {i} did not count its withdrawal"
        );
    }
    lab.dsr.start_sink(0);
    let back = lab
        .wait_next_hops(&[0, 1], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("routes never came back: {:?}", lab.next_hops()));
    eprintln!("ecmp: the relay back; both nodes announced again after {back:?}");
    lab.dsr.send(20, 4);
}

#[test]
fn a_silent_node_is_withdrawn_after_the_hold_time() {
    let mut lab = EcmpLab::new(2, 1);
    all_up(&mut lab);
    // bird frozen (SIGSTOP): no keepalive and no Cease, as from a node
    // whose machine or link is gone; only the router's hold timer notices.
    let daemon = lab.pids[1].expect("lb2 running");
    let out = lab
        .dsr
        .lab
        .run("lb2", &["pgrep", "-P", &daemon.to_string(), "bird"]);
    let bird: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("lb2's daemon has one bird child");
    // SAFETY: kill(2) on a process of this test's lab.
    unsafe { libc::kill(bird, libc::SIGSTOP) };
    let withdrawn = lab
        .wait_next_hops(&[0], HOLD_TIME * 3)
        .unwrap_or_else(|| panic!("the silent node's route stayed: {:?}", lab.next_hops()));
    // SAFETY: as above.
    unsafe { libc::kill(bird, libc::SIGCONT) };
    eprintln!(
        "ecmp: lb2's bird frozen; its route left the router after {withdrawn:?} (hold time {HOLD_TIME:?})"
    );
    assert!(
        withdrawn <= HOLD_TIME + Duration::from_secs(1),
        "withdrawn after {withdrawn:?}, beyond the hold time {HOLD_TIME:?} (+1 s of timer granularity)"
    );
    lab.dsr.send(20, 4);
}

#[test]
fn a_reload_turns_the_announcement_off_and_on_and_changes_its_session() {
    let mut lab = EcmpLab::new(2, 1);
    all_up(&mut lab);
    let with = lab.config(1);
    let without = with.replace("enabled = true", "enabled = false");
    lab.reload(1, &without);
    // The control loop applies [announce] from a reload within its 1 s tick.
    let off = lab
        .wait_next_hops(&[0], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("[announce] off, route stayed: {:?}", lab.next_hops()));
    assert!(
        lab.metrics(1).contains(
            "smtp_lb_balancer_vip_announce_changes_total{action=\"withdraw\",reason=\"stopping\"} 1"
        ),
        "the withdrawal was not counted as stopping"
    );
    lab.reload(1, &with);
    let on = lab
        .wait_next_hops(&[0, 1], Duration::from_secs(15))
        .unwrap_or_else(|| panic!("[announce] on again, no route: {:?}", lab.next_hops()));
    eprintln!(
        "ecmp: reload with [announce] off: withdrawn after {off:?}; on again: announced after {on:?}"
    );

    // A changed session setting while on: bird's config rewritten and
    // applied (`configure`); bird restarts that session, so the node is
    // withdrawn for a moment and must come back.
    lab.reload(1, &with.replace("hold_time = \"3s\"", "hold_time = \"4s\""));
    let conf = lab.dsr.state_dir("lb2").join("bird/bird.conf");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&conf)
        .unwrap_or_default()
        .contains("hold time 4;")
    {
        assert!(Instant::now() < deadline, "bird.conf was not rewritten");
        thread::sleep(Duration::from_millis(50));
    }
    let back = lab
        .wait_next_hops(&[0, 1], Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no route after the reconfiguration: {:?}", lab.next_hops()));
    eprintln!(
        "ecmp: hold_time changed by reload: bird reconfigured, the route back {back:?} after"
    );
}
