//! The lab's story, shared by `cargo xtask lab` (which prints it) and the
//! privileged tests (which assert on it): real SMTP sessions from a client
//! namespace to the VIP, spread by the XDP balancer over three relays by
//! weight (2:1:1), answered directly by the relays (DSR).
use std::{collections::BTreeMap, time::Duration};

use crate::topology::{CLIENT, DsrLab, VIP};

/// Relay weights in the story.
pub const WEIGHTS: [u32; 3] = [2, 1, 1];

/// What the run saw.
#[derive(Debug)]
pub struct Outcome {
    /// SMTP sessions the client completed.
    pub sessions: usize,
    /// Messages each relay's sink received.
    pub per_relay: Vec<(String, usize)>,
    /// Of those, how many carried the client's own address (DSR keeps it).
    pub from_client_addr: usize,
    pub elapsed: Duration,
    /// The XDP program's global counters.
    pub counters: BTreeMap<String, u64>,
    /// `ctl backends` as the daemon reported it after the run.
    pub backends: serde_json::Value,
}

/// Builds the lab, starts the balancer, sends `sessions` SMTP sessions, and
/// reads back what every party saw. `say` receives one line per step.
pub fn smtp_through_lb(sessions: usize, say: &mut dyn FnMut(&str)) -> Outcome {
    let mut dsr = DsrLab::new(3);
    say(&format!(
        "lab {}: client {CLIENT}, lb 198.51.100.2, relay1-3 198.51.100.11-13 on one bridge; VIP {VIP} on each relay's lo",
        dsr.lab.id()
    ));
    say("relays: Postfix smtp-sink on :25, dumping every message it receives");
    let config = dsr.config(&WEIGHTS, "");
    dsr.start_lb(&config, &[]);
    say(&format!(
        "lb: smtp-lb lb attached in native XDP mode, relays health-checked over SMTP, weights {WEIGHTS:?}, maps pinned in {}",
        dsr.pin_dir.display()
    ));

    say(&format!(
        "client: smtp-source sending {sessions} sessions (20 in parallel) to {VIP}:25"
    ));
    let elapsed = dsr.send(sessions, 20);
    crate::topology::wait_for("every message at a sink", Duration::from_secs(10), || {
        dsr.delivered().iter().sum::<usize>() >= sessions
    });
    let per_relay: Vec<(String, usize)> = dsr
        .relays
        .iter()
        .map(|r| r.name.clone())
        .zip(dsr.delivered())
        .collect();
    let from_client_addr = dsr
        .relays
        .iter()
        .flat_map(|r| std::fs::read_dir(&r.dump).unwrap())
        .filter(|e| {
            let text = std::fs::read_to_string(e.as_ref().unwrap().path()).unwrap_or_default();
            text.lines()
                .any(|l| l.starts_with("X-Client-Addr:") && l.trim_end().ends_with(CLIENT))
        })
        .count();
    let total: usize = per_relay.iter().map(|(_, n)| n).sum();
    say(&format!(
        "client: {sessions} sessions completed in {:.2}s ({:.0}/s)",
        elapsed.as_secs_f64(),
        sessions as f64 / elapsed.as_secs_f64()
    ));
    for ((name, n), w) in per_relay.iter().zip(WEIGHTS) {
        say(&format!(
            "{name}: {n} messages ({:.1}% — weight share {:.1}%)",
            100.0 * *n as f64 / total.max(1) as f64,
            100.0 * f64::from(w) / f64::from(WEIGHTS.iter().sum::<u32>())
        ));
    }
    say(&format!(
        "relays saw the client's own address {CLIENT} on {from_client_addr} of {total} messages (direct server return)"
    ));

    let stats = dsr.stats();
    let counters = stats["global"]
        .as_object()
        .expect("global counters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    let backends = dsr.ctl(&["backends"]);
    assert!(
        dsr.lab.stop(dsr.lb.take().unwrap(), Duration::from_secs(5)),
        "smtp-lb lb exits cleanly on SIGTERM"
    );
    say("lb: smtp-lb lb stopped: program detached, pins removed; tearing the lab down");
    Outcome {
        sessions,
        per_relay,
        from_client_addr,
        elapsed,
        counters,
        backends,
    }
}
