//! Power of two choices for new flows (`p2c = true` on a service).
//!
//! Fixtures through the real balancer (`BPF_PROG_TEST_RUN`): the SYN goes
//! to whichever of its two table entries has fewer live flows, summed over
//! every CPU; a tie goes to Maglev's; the counts follow SYN and FIN/RST;
//! a tracked flow keeps the relay it was given, also once a flood evicts
//! its entry (user space keeps it in `MOVED_FLOWS`). Each expected backend
//! comes from the user-space plan and the shared hashes.
//!
//! Lab (`slow_relay_gets_fewer_sessions_with_p2c`): three relays running
//! Postfix `smtp-sink`, one of them slow to answer `DATA`; `smtp-source`
//! through the VIP with pure Maglev, then with `p2c`, in the same run. The
//! slow relay's share of sessions falls and sessions/s do not.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use aya::maps::{Array, PerCpuArray, PerCpuValues};
use smtp_lb_common::{
    Flow, FlowKey, FlowSet, PROTO_TCP, maps, programs::BALANCER, ring_slot, second_hash,
};
use smtp_lb_tests::{
    env,
    packet::{LB_MAC, PacketBuilder, tcp},
    topology::{DsrLab, wait_for},
    xdp::{Verdict, XdpHarness},
};
use smtp_lb_user::{
    balance::plan::{Plan, addr_words, service_key},
    config::lb::LbConfig,
    dataplane::{MapWriter, apply_config, flows},
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn config(p2c: bool) -> LbConfig {
    let mut text =
        format!("[[services]]\nvip = \"{VIP}\"\nports = [25]\ntable_size = 1009\np2c = {p2c}\n");
    for i in 3..=5 {
        text += &format!(
            "[[services.backends]]\nname = \"relay{i}\"\naddress = \"198.51.100.{i}\"\nmac = \"02:00:00:00:00:0{i}\"\n"
        );
    }
    LbConfig::parse(&text).unwrap_or_else(|e| panic!("fixture config: {e}"))
}

struct Fixture {
    h: XdpHarness,
    plan: Plan,
    cpus: usize,
}

/// A flow's two candidates: backend ids at its Maglev slot and its second slot.
struct Candidates {
    sport: u16,
    maglev: u32,
    second: u32,
}

impl Fixture {
    fn new(p2c: bool) -> Self {
        let mut h = XdpHarness::load();
        let plan = apply_config(h.ebpf_mut(), &config(p2c))
            .expect("apply config")
            .plan;
        let cpus = aya::util::nr_cpus().expect("nr_cpus");
        Self { h, plan, cpus }
    }

    /// The first flow from `from` on whose two candidates differ.
    fn candidates(&self, from: u16) -> Candidates {
        let svc = self
            .plan
            .services
            .iter()
            .find(|s| s.key == service_key(VIP.into(), 25))
            .expect("service");
        (from..from + 1000)
            .find_map(|sport| {
                let hash = smtp_lb_common::flow_hash(&key(sport), false);
                let maglev = svc.ring[ring_slot(hash, svc.ring_size) as usize];
                let second = svc.ring[ring_slot(second_hash(hash), svc.ring_size) as usize];
                (maglev != second).then_some(Candidates {
                    sport,
                    maglev,
                    second,
                })
            })
            .expect("a flow whose candidates differ")
    }

    fn mac(&self, id: u32) -> [u8; 6] {
        self.plan
            .backends
            .iter()
            .find(|b| b.id == id)
            .expect("planned backend")
            .value
            .mac
    }

    /// Sets backend `id`'s live-flow count per CPU.
    fn set_counts(&mut self, id: u32, per_cpu: &[i64]) {
        let mut values = vec![0i64; self.cpus];
        values[..per_cpu.len()].copy_from_slice(per_cpu);
        let mut map: PerCpuArray<_, i64> =
            PerCpuArray::try_from(self.h.ebpf_mut().map_mut(maps::FLOW_COUNTS).unwrap()).unwrap();
        map.set(id, PerCpuValues::try_from(values).unwrap(), 0)
            .unwrap();
    }

    /// Backend `id`'s live-flow count summed over CPUs.
    fn count(&mut self, id: u32) -> i64 {
        let map: PerCpuArray<_, i64> =
            PerCpuArray::try_from(self.h.ebpf_mut().map(maps::FLOW_COUNTS).unwrap()).unwrap();
        map.get(&id, 0).unwrap().iter().sum()
    }

    /// Sends `flags` for flow `sport`; returns the MAC it was sent to.
    fn send(&mut self, sport: u16, flags: u8) -> [u8; 6] {
        let pkt = PacketBuilder::tcp(CLIENT, sport, VIP, 25, flags).build();
        let out = self.h.run(BALANCER, &pkt);
        assert_eq!(out.verdict, Verdict::Tx, "flow {sport} flags {flags:#x}");
        assert_eq!(out.output[6..12], LB_MAC);
        out.output[0..6].try_into().unwrap()
    }

    fn tracked(&mut self, sport: u16) -> Option<Flow> {
        let table: Array<_, FlowSet> =
            Array::try_from(self.h.ebpf_mut().map(maps::FLOW_TABLE).unwrap()).unwrap();
        flows::find(&table, &key(sport)).unwrap()
    }

    /// Empties the flow's `FLOW_TABLE` way, as a new flow taking it would.
    fn forget(&mut self, sport: u16) {
        let mut table: Array<_, FlowSet> =
            Array::try_from(self.h.ebpf_mut().map_mut(maps::FLOW_TABLE).unwrap()).unwrap();
        assert!(flows::remove(&mut table, &key(sport)).unwrap(), "tracked");
    }
}

fn key(sport: u16) -> FlowKey {
    let (s, family) = addr_words(CLIENT.into());
    let (d, _) = addr_words(IpAddr::V4(VIP));
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: 25u16.to_be(),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

/// Runs the rest of the test on CPU 0, so `BPF_PROG_TEST_RUN` runs there and
/// counts written on CPU 1 are only seen by a program that sums over CPUs.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pin to CPU 0"
        );
    }
}

#[test]
fn syn_goes_to_the_candidate_with_fewer_live_flows_summed_over_cpus() {
    let mut f = Fixture::new(true);
    assert!(f.cpus >= 2, "needs two CPUs to check the sum over CPUs");
    pin_to_cpu0();
    let c = f.candidates(40000);
    // Maglev's candidate is busier, but only on CPU 1: this CPU alone would
    // call it idle and keep it.
    f.set_counts(c.maglev, &[0, 5]);
    f.set_counts(c.second, &[3, 0]);
    let second_mac = f.mac(c.second);
    assert_eq!(
        f.send(c.sport, tcp::SYN),
        second_mac,
        "the less loaded wins"
    );
    assert_eq!(f.tracked(c.sport).map(|t| t.backend), Some(c.second));
    assert_eq!(f.count(c.second), 4, "the new flow is counted on it");
    assert_eq!(f.count(c.maglev), 5);

    // The other way round: the second is busier on CPU 1 only.
    let d = f.candidates(c.sport + 1);
    f.set_counts(d.maglev, &[3, 0]);
    f.set_counts(d.second, &[0, 5]);
    let maglev_mac = f.mac(d.maglev);
    assert_eq!(
        f.send(d.sport, tcp::SYN),
        maglev_mac,
        "Maglev's is less loaded"
    );
}

#[test]
fn ties_go_to_maglevs_candidate() {
    let mut f = Fixture::new(true);
    let mut sport = 40000;
    for n in [0, 1, 7, 1000] {
        let c = f.candidates(sport);
        sport = c.sport + 1;
        f.set_counts(c.maglev, &[n]);
        f.set_counts(c.second, &[n]);
        let mac = f.mac(c.maglev);
        assert_eq!(f.send(c.sport, tcp::SYN), mac, "tie at {n} live flows");
    }
}

#[test]
fn p2c_off_keeps_maglevs_candidate_however_loaded() {
    let mut f = Fixture::new(false);
    let c = f.candidates(40000);
    f.set_counts(c.maglev, &[1000]);
    f.set_counts(c.second, &[0]);
    let mac = f.mac(c.maglev);
    assert_eq!(f.send(c.sport, tcp::SYN), mac);
}

#[test]
fn live_flow_counts_follow_syn_and_the_first_fin_or_rst() {
    let mut f = Fixture::new(true);
    let c = f.candidates(40000);
    let id = c.maglev;
    f.set_counts(c.second, &[100]);
    f.set_counts(id, &[0]);
    f.send(c.sport, tcp::SYN);
    assert_eq!(f.count(id), 1, "SYN");
    f.send(c.sport, tcp::ACK);
    assert_eq!(f.count(id), 1, "an ACK changes nothing");
    f.send(c.sport, tcp::FIN | tcp::ACK);
    assert_eq!(f.count(id), 0, "the client's FIN ends it");
    f.send(c.sport, tcp::FIN | tcp::ACK);
    f.send(c.sport, tcp::RST);
    assert_eq!(
        f.count(id),
        0,
        "a retransmitted FIN, then RST: counted once"
    );

    let d = f.candidates(c.sport + 1);
    f.set_counts(d.second, &[100]);
    f.set_counts(d.maglev, &[0]);
    f.send(d.sport, tcp::SYN);
    f.send(d.sport, tcp::RST);
    assert_eq!(f.count(d.maglev), 0, "RST ends a flow too");
}

#[test]
fn a_flow_on_its_second_candidate_stays_there_also_after_an_eviction() {
    let mut f = Fixture::new(true);
    let c = f.candidates(40000);
    f.set_counts(c.maglev, &[10]);
    f.set_counts(c.second, &[0]);
    let second_mac = f.mac(c.second);
    assert_eq!(f.send(c.sport, tcp::SYN), second_mac);
    // Once the second is the busier one, the tracked flow still stays.
    f.set_counts(c.second, &[50]);
    assert_eq!(f.send(c.sport, tcp::ACK), second_mac, "tracked");

    // The periodic sync: the flow the table does not name is copied where
    // no packet can evict it, and the counts are reset from FLOW_TABLE.
    let plan = f.plan.clone();
    let moved = f.h.ebpf_mut().keep_moved_flows(&plan).expect("sync");
    assert_eq!(moved.copied, 1, "the flow on its second candidate is kept");
    assert_eq!(f.count(c.second), 1, "reset to the live flows tracked");
    assert_eq!(f.count(c.maglev), 0);

    // Its FLOW_TABLE way is taken: it still reaches its relay.
    f.forget(c.sport);
    assert_eq!(f.send(c.sport, tcp::ACK), second_mac, "MOVED_FLOWS hit");

    // Without the copy, an untracked packet re-hashes to Maglev's candidate
    // (documented: the window between a SYN and the next sync).
    let d = f.candidates(c.sport + 1);
    f.set_counts(d.maglev, &[10]);
    f.set_counts(d.second, &[0]);
    assert_eq!(f.send(d.sport, tcp::SYN), f.mac(d.second));
    f.forget(d.sport);
    let maglev_mac = f.mac(d.maglev);
    assert_eq!(f.send(d.sport, tcp::ACK), maglev_mac, "lru_miss re-hash");
}

/// Sessions per phase, and how many `smtp-source` keeps open at once.
const SESSIONS: usize = 300;
const PARALLEL: usize = 30;
/// Seconds the slow relay's sink waits before answering `DATA`.
const SLOW_DATA_SECS: &str = "1";

struct Phase {
    per_relay: Vec<usize>,
    elapsed: Duration,
}

impl Phase {
    fn rate(&self) -> f64 {
        SESSIONS as f64 / self.elapsed.as_secs_f64()
    }

    fn share(&self, i: usize) -> f64 {
        100.0 * self.per_relay[i] as f64 / SESSIONS as f64
    }
}

/// `SESSIONS` sessions from the client through the VIP; each relay's share
/// counted from the messages its sink dumped.
fn phase(lab: &DsrLab, name: &str) -> Phase {
    let before = lab.delivered();
    let elapsed = lab.send(SESSIONS, PARALLEL);
    let got = || -> Vec<usize> {
        lab.delivered()
            .iter()
            .zip(&before)
            .map(|(n, b)| n - b)
            .collect()
    };
    wait_for("every message dumped", Duration::from_secs(10), || {
        got().iter().sum::<usize>() >= SESSIONS
    });
    let per_relay = got();
    assert_eq!(
        per_relay.iter().sum::<usize>(),
        SESSIONS,
        "{name}: every session completes once"
    );
    Phase { per_relay, elapsed }
}

#[test]
fn slow_relay_gets_fewer_sessions_with_p2c() {
    env::require_root();
    let mut lab = DsrLab::bare(3);
    for i in 0..3 {
        let dump = lab.relays[i].dump.clone();
        // Health checks only say EHLO: the slow relay passes them.
        let options: &[&str] = if i == 0 { &["-w", SLOW_DATA_SECS] } else { &[] };
        let pid = lab.spawn_sink_with(i, 25, &dump, options);
        lab.relays[i].sink = Some(pid);
    }
    let maglev_cfg = lab.config(&[1, 1, 1], "");
    lab.start_lb(&maglev_cfg, &[]);
    // Relays come up one by one (`rise` probes each): sessions sent before
    // the last is up would skew the Maglev share this test compares.
    wait_for("every relay up", Duration::from_secs(30), || {
        lab.ctl(&["backends"])
            .as_array()
            .map_or(0, |b| b.iter().filter(|b| b["health"] == "up").count())
            == lab.relays.len()
    });
    let maglev = phase(&lab, "maglev");

    // The same balancer, switched to power of two choices.
    let p2c_cfg = maglev_cfg.replacen("ports = [25]\n", "ports = [25]\np2c = true\n", 1);
    assert_ne!(p2c_cfg, maglev_cfg);
    std::fs::write(&lab.config_path, &p2c_cfg).unwrap();
    lab.ctl(&["reload"]);
    let p2c = phase(&lab, "p2c");

    let show = |p: &Phase| {
        let shares: Vec<String> = lab
            .relays
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{}={} ({:.1}%)", r.name, p.per_relay[i], p.share(i)))
            .collect();
        format!(
            "{SESSIONS} sessions in {:.2} s = {:.0}/s; {}",
            p.elapsed.as_secs_f64(),
            p.rate(),
            shares.join(" ")
        )
    };
    eprintln!(
        "slow relay: relay1 (its sink answers DATA after {SLOW_DATA_SECS} s), {PARALLEL} sessions at once"
    );
    eprintln!("maglev: {}", show(&maglev));
    eprintln!("p2c:    {}", show(&p2c));
    eprintln!(
        "relay1 share {:.1}% -> {:.1}%, sessions/s x{:.2}",
        maglev.share(0),
        p2c.share(0),
        p2c.rate() / maglev.rate()
    );
    assert!(
        p2c.share(0) + 5.0 <= maglev.share(0),
        "the slow relay's share falls by at least 5 points with p2c: {:.1}% -> {:.1}%",
        maglev.share(0),
        p2c.share(0)
    );
    assert!(
        p2c.rate() >= maglev.rate(),
        "sessions/s no lower with p2c: {:.0}/s vs {:.0}/s",
        p2c.rate(),
        maglev.rate()
    );
}
