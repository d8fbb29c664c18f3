//! Relay feedback and admission under back-pressure, end to end: the real
//! XDP balancer, three real `smtp-lb relay`s with their metrics listeners,
//! Postfix `smtp-sink` as the ISPs — one of them answering `RCPT` with a
//! 4xx (`smtp-sink -r RCPT`) to play an ISP that defers — and a client
//! running SMTP sessions through the VIP, all in namespaces the lab
//! creates and removes (also when a test fails).
//!
//! - A relay whose ISP defers builds a queue: the balancer lowers its share
//!   to the floor within one poll, it gets fewer new sessions, and when the
//!   ISP accepts again it gets its share back (the weights over time are
//!   printed).
//! - When every relay's queue is over the high-water mark, new SYNs to the
//!   VIP are dropped in XDP and counted, an SMTP session opened before goes
//!   on to `250`, admission returns when the queues drain, and every
//!   message a relay accepted reaches the ISP.
use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;
use smtp_lb_tests::{
    load::{Load, Pace},
    monitoring::{MonitoredLab, RELAY_METRICS_PORT, Setup, relay_metrics, spawn_sink},
    smtp::RawSmtp,
    topology::{VIP, wait_for},
};
use smtp_lb_user::feedback::{Reading, poll};

/// The deferring ISP's MX.
const DEFER_MX: &str = "198.51.100.24";
/// The domain the load sends to (`user@isp.example`).
const DOMAIN: &str = "isp.example";

// Feedback settings of these tests (see `FEEDBACK`).
const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
const WINDOW: Duration = Duration::from_secs(5);
const RISE: u32 = 3;
const QUEUE_LOW: u64 = 20;
const QUEUE_HIGH: u64 = 60;
const MIN_OUTCOMES: u64 = 5;
const FLOOR: u64 = 200;
/// The relays' longest retry interval (`relay::lab_config`: 1–5 s).
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Time the observer itself needs to see a change (a `ctl` call and a
/// metrics read inside the namespaces, on a loaded machine).
const OBSERVE: Duration = Duration::from_secs(2);

fn feedback(admission: &str) -> String {
    format!(
        "[feedback]\nenabled = true\nport = {port}\ninterval = \"{i}ms\"\ntimeout = \"{t}ms\"\n\
         queue_low = {QUEUE_LOW}\nqueue_high = {QUEUE_HIGH}\ndeferral_low_percent = 10\ndeferral_high_percent = 50\n\
         window = \"{w}s\"\nmin_outcomes = {MIN_OUTCOMES}\nfloor_percent = {floor}\nstep_percent = 10\n\
         hysteresis_percent = 10\nrise = {RISE}\n{admission}",
        port = RELAY_METRICS_PORT,
        i = INTERVAL.as_millis(),
        t = TIMEOUT.as_millis(),
        w = WINDOW.as_secs(),
        floor = FLOOR / 10,
    )
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 25)
}

/// Relay `name`'s own metrics, read as the balancer reads them.
fn relay_reading(m: &MonitoredLab, name: &str) -> Option<Reading> {
    let addr = &m.dsr.relays.iter().find(|r| r.name == name)?.addr;
    let (status, page) = m.get(name, &format!("http://{}/metrics", relay_metrics(addr)));
    (status == 200).then(|| poll::read(&page)).flatten()
}

/// One relay metric's value (a counter or gauge without labels).
fn relay_metric(m: &MonitoredLab, name: &str, metric: &str) -> u64 {
    let addr = &m.dsr.relays.iter().find(|r| r.name == name).unwrap().addr;
    let (_, page) = m.get(name, &format!("http://{}/metrics", relay_metrics(addr)));
    let v = smtp_lb_user::admin::scrape::value(&page, metric)
        .unwrap_or_else(|| panic!("{metric} on {name}: {page}"));
    #[expect(clippy::cast_sign_loss, reason = "scrape keeps finite values >= 0")]
    let v = v as u64;
    v
}

/// Waits until every relay's queue is empty; then the messages the relays
/// accepted (each one's `smtp_lb_relay_messages_accepted_total`, summed).
fn accepted_once_drained(m: &MonitoredLab) -> u64 {
    let relays = ["relay1", "relay2", "relay3"];
    wait_for("every relay's queue empty", Duration::from_mins(1), || {
        relays
            .iter()
            .all(|n| relay_reading(m, n).is_some_and(|r| r.queue == 0))
    });
    relays
        .iter()
        .map(|n| relay_metric(m, n, "smtp_lb_relay_messages_accepted_total"))
        .sum()
}

/// The messages the sinks of `hosts` hold: (transactions, distinct
/// messages). A message is known by its relay's `Received` line (relay
/// name and queue id); SMTP delivers at least once, so an MX that took a
/// message whose `250` the relay never read gets it again on the retry.
fn sunk(m: &MonitoredLab, hosts: &[&str]) -> (usize, usize) {
    let mut files = 0;
    let mut ids = std::collections::BTreeSet::new();
    for host in hosts {
        for entry in std::fs::read_dir(m.dsr.work.join(host))
            .into_iter()
            .flatten()
        {
            let text = std::fs::read(entry.unwrap().path()).unwrap_or_default();
            // `smtp-sink -d` opens its dump before DATA: a transaction the
            // deferring sink refused (`-r RCPT`) leaves an empty file that
            // holds no message.
            if text.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&text);
            files += 1;
            let id = text
                .lines()
                .find(|l| l.contains("(smtp-lb) with"))
                .unwrap_or_else(|| panic!("no relay Received line in a message at {host}: {text}"));
            ids.insert(id.trim().to_owned());
        }
    }
    (files, ids.len())
}

/// One point of the timeline: what `ctl backends` says of each relay.
struct Point {
    t: Duration,
    /// Per relay: (feedback share ‰, queue the balancer read, effective weight, new flows).
    relays: Vec<(u64, Option<u64>, u64, u64)>,
}

fn observe(m: &MonitoredLab, started: Instant) -> Point {
    let rows = m.dsr.ctl(&["backends"]);
    let relays = ["relay1", "relay2", "relay3"]
        .iter()
        .map(|n| {
            let row = rows
                .as_array()
                .and_then(|r| r.iter().find(|b| b["names"][0] == *n))
                .cloned()
                .unwrap_or(Value::Null);
            (
                row["feedback"]["share_permille"].as_u64().unwrap_or(0),
                row["feedback"]["queue"].as_u64(),
                row["effective_weight"].as_u64().unwrap_or(0),
                row["new_flows"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    Point {
        t: started.elapsed(),
        relays,
    }
}

fn print_timeline(points: &[Point]) {
    println!(
        "t (s)   | relay1 share/queue/weight | relay2 share/queue/weight | relay3 share/queue/weight"
    );
    let mut last = None;
    for p in points {
        let row: Vec<String> = p
            .relays
            .iter()
            .map(|(s, q, w, _)| {
                format!(
                    "{:>5.1}% q={:<4} w={:<5}",
                    *s as f64 / 10.0,
                    q.map_or("-".into(), |q| q.to_string()),
                    w
                )
            })
            .collect();
        let line = row.join(" | ");
        // Print changes only (and the first and last point).
        if last.as_ref() != Some(&line) || std::ptr::eq(p, points.last().unwrap()) {
            println!("{:>7.1} | {line}", p.t.as_secs_f64());
            last = Some(line);
        }
    }
}

/// Share of new flows relay `i` took between two points.
fn flow_share(a: &Point, b: &Point, i: usize) -> f64 {
    let d: Vec<u64> = a
        .relays
        .iter()
        .zip(&b.relays)
        .map(|(x, y)| y.3.saturating_sub(x.3))
        .collect();
    let total: u64 = d.iter().sum();
    if total == 0 {
        0.0
    } else {
        d[i] as f64 / total as f64
    }
}

#[test]
fn a_relay_whose_isp_defers_loses_weight_and_gets_it_back() {
    let setup = Setup {
        lb_extra: feedback(""),
        routes: vec![(DOMAIN.into(), "198.51.100.22:25".into())],
        // relay2 (index 1) delivers isp.example to the deferring MX.
        relay_routes: vec![(1, DOMAIN.into(), format!("{DEFER_MX}:25"))],
    };
    let mut m = MonitoredLab::start_with(&setup);
    m.dsr.lab.host("defer-mx", &[&format!("{DEFER_MX}/24")]);
    let deferring = spawn_sink(&m.dsr, "defer-mx", &["-r", "RCPT"]);
    let started = Instant::now();
    let mut points = vec![observe(&m, started)];
    assert!(
        points[0].relays.iter().all(|r| r.0 == 1000),
        "every relay starts at its full share"
    );
    // A steady 40 sessions/s: a relay that delivers keeps its queue far
    // below queue_low (unpaced, the lab's relays hold 30–100 messages in
    // flight each, and that is their normal working depth, not a backlog).
    let load = Load::paced(
        &m.dsr.lab.get("client").netns,
        vip(),
        4,
        Pace {
            total: 40 * 300,
            interval: Duration::from_millis(25),
            rcpts: vec![format!("user@{DOMAIN}")],
            hold: Duration::ZERO,
        },
    );

    // relay2's queue and deferrals grow; the balancer must follow within
    // one poll of either reaching its high mark, as relay2 itself reports
    // them (deferrals: twice `min_outcomes` in the window, at least half of
    // the outcomes).
    let mut over_at = None;
    let mut readings: Vec<(Duration, Reading)> = Vec::new();
    let floor_at = loop {
        let p = observe(&m, started);
        let reading = relay_reading(&m, "relay2");
        if let Some(r) = reading {
            readings.push((p.t, r));
            let base = readings
                .iter()
                .find(|(t, _)| p.t.saturating_sub(*t) < WINDOW)
                .map_or(r, |(_, b)| *b);
            let (deferred, outcomes) = (r.deferred - base.deferred, r.outcomes - base.outcomes);
            let deferring = deferred >= 2 * MIN_OUTCOMES && deferred * 2 >= outcomes;
            if over_at.is_none() && (r.queue >= QUEUE_HIGH || deferring) {
                over_at = Some(p.t);
            }
        }
        let at_floor = p.relays[1].0 == FLOOR;
        let t = p.t;
        points.push(p);
        if at_floor {
            break t;
        }
        assert!(
            t < Duration::from_secs(90),
            "relay2 never reached the floor; its reading: {reading:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let over_at = over_at.unwrap_or(floor_at);
    let bound = INTERVAL + TIMEOUT + OBSERVE;
    assert!(
        floor_at.saturating_sub(over_at) <= bound,
        "relay2's queue or deferrals were over their high marks at {over_at:?}; its share reached the floor at {floor_at:?}, later than {bound:?}"
    );
    let low = points.last().unwrap();
    assert_eq!(
        (low.relays[0].0, low.relays[2].0),
        (1000, 1000),
        "the relays whose ISP accepts keep their share"
    );
    assert_eq!(low.relays[1].2, 200, "weight 1 × 20 % (thousandths)");

    // While it is held back it gets fewer new sessions (2:1:1 → 25 %; at
    // 20 % of its weight 0.2 / 3.2 ≈ 6 %).
    let before_low = points
        .iter()
        .rev()
        .find(|p| p.relays[1].0 == 1000)
        .unwrap_or(&points[0]);
    let share_full = flow_share(&points[0], before_low, 1);
    std::thread::sleep(Duration::from_secs(6));
    let held = observe(&m, started);
    let share_low = flow_share(points.last().unwrap(), &held, 1);
    points.push(held);
    assert!(
        share_low < 0.15,
        "relay2 took {:.1}% of new sessions at the floor ({:.1}% before)",
        share_low * 100.0,
        share_full * 100.0
    );

    // The ISP accepts again: relay2 delivers its queue and gets its share back.
    assert!(m.dsr.lab.stop(deferring, Duration::from_secs(2)));
    spawn_sink(&m.dsr, "defer-mx", &[]);
    let accepts_at = started.elapsed();
    let back_at = loop {
        let p = observe(&m, started);
        let full = p.relays[1].0 == 1000;
        let t = p.t;
        points.push(p);
        if full {
            break t;
        }
        assert!(
            t < accepts_at + Duration::from_secs(90),
            "relay2 never got its share back"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let sessions = load.stop();
    points.push(observe(&m, started));
    println!(
        "relay2: queue or deferrals over their high marks at {:.1}s, at the floor at {:.1}s; ISP accepting again at {:.1}s, full share at {:.1}s",
        over_at.as_secs_f64(),
        floor_at.as_secs_f64(),
        accepts_at.as_secs_f64(),
        back_at.as_secs_f64()
    );
    println!(
        "relay2's share of new sessions: {:.1}% at full share, {:.1}% at the floor",
        share_full * 100.0,
        share_low * 100.0
    );
    print_timeline(&points);
    let bound = RETRY_MAX + WINDOW + INTERVAL * (RISE + 1) + TIMEOUT + OBSERVE * 2;
    let took = back_at.saturating_sub(accepts_at);
    assert!(
        took <= bound,
        "full share {took:?} after the ISP accepted again; the bound is {bound:?}"
    );

    // Nothing lost: every message a relay accepted reaches an ISP.
    let accepted = accepted_once_drained(&m);
    let (transactions, delivered) = sunk(&m, &["outlook-mx", "defer-mx"]);
    let client_ok = sessions.iter().filter(|s| s.accepted).count();
    println!(
        "{client_ok} sessions got 250; the relays accepted {accepted}; the ISPs hold {delivered} distinct messages ({transactions} transactions)"
    );
    assert!(client_ok > 0);
    assert_eq!(
        delivered as u64, accepted,
        "a message the relays accepted is missing"
    );
    assert!(accepted >= client_ok as u64);
}

#[test]
fn when_every_relay_queue_is_over_high_water_new_syns_are_refused_and_admission_returns() {
    const HIGH: u64 = 15;
    const LOW: u64 = 3;
    let setup = Setup {
        lb_extra: feedback(&format!(
            "[feedback.admission]\nhigh_water = {HIGH}\nlow_water = {LOW}\n"
        )),
        routes: vec![(DOMAIN.into(), format!("{DEFER_MX}:25"))],
        relay_routes: Vec::new(),
    };
    let mut m = MonitoredLab::start_with(&setup);
    m.dsr.lab.host("defer-mx", &[&format!("{DEFER_MX}/24")]);
    let deferring = spawn_sink(&m.dsr, "defer-mx", &["-r", "RCPT"]);
    let client = m.dsr.lab.get("client").netns.clone();
    let admission = || m.dsr.ctl(&["status"])["services"][0]["admission"].clone();
    let refused = || m.dsr.stats()["global"]["drop_admission"].as_u64().unwrap();
    assert_eq!(admission(), "open");
    assert_eq!(refused(), 0);

    // A session opened now, before the queues fill: it must be able to
    // finish while admission is closed.
    let mut held = m.dsr.lab.in_netns("client", || RawSmtp::connect(vip()));
    assert_eq!(held.cmd("EHLO held.lab.example").code, 250);
    assert_eq!(held.cmd("MAIL FROM:<held@lab.example>").code, 250);

    let load = Load::start(&client, vip(), 3, Duration::ZERO);
    let started = Instant::now();
    wait_for("admission closed", Duration::from_secs(90), || {
        admission() == "closed"
    });
    let closed_at = started.elapsed();
    let queues: Vec<Option<u64>> = ["relay1", "relay2", "relay3"]
        .iter()
        .map(|n| relay_reading(&m, n).map(|r| r.queue))
        .collect();
    assert!(
        queues.iter().all(|q| q.is_some_and(|q| q >= HIGH)),
        "closed while a relay had room: {queues:?}"
    );

    // New SYNs are dropped (the client's connect times out) and counted.
    let before = refused();
    let connect = m.dsr.lab.in_netns("client", || {
        TcpStream::connect_timeout(&vip(), Duration::from_secs(3)).map(|_| ())
    });
    let err = connect.expect_err("a new connection while admission is closed");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(refused() > before, "the refused SYNs are counted");

    // The session opened before goes on to 250.
    assert_eq!(held.cmd(&format!("RCPT TO:<held@{DOMAIN}>")).code, 250);
    assert_eq!(held.cmd("DATA").code, 354);
    held.send(b"Subject: held\r\n\r\nopened before admission closed\r\n.\r\n");
    let r = held.reply().expect("reply to the end of data");
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(held.cmd("QUIT").code, 221);

    // The ISP accepts again: queues drain, admission returns.
    assert!(m.dsr.lab.stop(deferring, Duration::from_secs(2)));
    spawn_sink(&m.dsr, "defer-mx", &[]);
    let accepts_at = started.elapsed();
    wait_for("admission open again", Duration::from_mins(1), || {
        admission() == "open"
    });
    let open_at = started.elapsed();
    // New sessions complete again.
    std::thread::sleep(Duration::from_secs(3));
    let sessions = load.stop();
    let refused_total = refused();
    let after_open = sessions
        .iter()
        .filter(|s| s.start > open_at && s.accepted)
        .count();
    // Sessions whose connect timed out while admission was closed (the
    // load's clock starts with it, a moment before `started`).
    let failed_closed = sessions
        .iter()
        .filter(|s| {
            !s.accepted
                && s.error.as_deref().is_some_and(|e| e.starts_with("connect"))
                && s.end > closed_at
                && s.start < open_at
        })
        .count();
    println!(
        "admission closed at {:.1}s (queues {queues:?}), ISP accepting at {:.1}s, open at {:.1}s; \
         {refused_total} SYNs refused; {failed_closed} sessions refused while closed, {after_open} accepted after",
        closed_at.as_secs_f64(),
        accepts_at.as_secs_f64(),
        open_at.as_secs_f64()
    );
    assert!(
        after_open > 0,
        "no session completed after admission returned"
    );
    assert!(
        failed_closed > 0,
        "the load saw no connect refused while closed"
    );

    // No message lost: each the relays accepted is at the ISP.
    let accepted = accepted_once_drained(&m);
    let client_ok = sessions.iter().filter(|s| s.accepted).count() as u64 + 1;
    let (transactions, delivered) = sunk(&m, &["defer-mx"]);
    println!(
        "{client_ok} messages got 250 at the client; the relays accepted {accepted}; the ISP holds {delivered} distinct messages ({transactions} transactions)"
    );
    assert_eq!(
        delivered as u64, accepted,
        "a message the relays accepted is missing"
    );
    assert!(accepted >= client_ok);
}
