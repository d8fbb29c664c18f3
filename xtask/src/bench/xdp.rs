//! `bench xdp`: mean ns per packet through `BPF_PROG_TEST_RUN`, for the
//! balancer on each kind of packet and for an empty program (the floor),
//! all in one run; every figure is also given as a ratio to the floor.
//!
//! - `nonvip`: TCP to a port no service uses (the common case on an LB node).
//! - `syn`: a SYN to the VIP: service lookup, Maglev slot, flow table write, L2 rewrite.
//! - `syn_p2c`: a SYN to a service with `p2c = true` (its own loaded
//!   copy) whose two candidate slots name different backends: a second
//!   slot and both backends' live flows summed over the CPUs before the
//!   flow table write (a flow whose candidates agree skips the sums).
//! - `established`: an ACK of a tracked flow: service lookup, flow table hit, L2 rewrite.
//! - `moved`: an ACK of a flow a table change moved whose `FLOW_TABLE` way is
//!   gone (taken by another flow): flow table miss, `MOVED_FLOWS` hit, L2 rewrite.
//! - `icmp`: "fragmentation needed" quoting a tracked flow, sent to its relay.
//! - `least_port_filter`, `least_l2dsr`: the least a balancer can do on a
//!   non-VIP packet and on a balanced one (`probe_l2_dsr`: parse and port;
//!   then both MACs rewritten, the relay by source port, no state, no
//!   counters), so the targets can be read against what this machine allows.
//!
//! Then where the nanoseconds go: the cost probes (`smtp-lb-ebpf` feature
//! `probes`, an object of their own that never ships), each one map
//! operation the balancer does (or could do instead) on a key read from the
//! packet, as ns above reading that key alone. They bound what any packet
//! path built on these maps can reach on this machine: a flow table hit and
//! insert, a miss in `MOVED_FLOWS`, and the kernel maps measured before the
//! flow table replaced the `CONNTRACK` LRU (its hit and insert, a 12-byte
//! IPv4-only key, a plain or per-CPU hash, per-CPU LRU lists).
use anyhow::Context as _;
use std::{net::Ipv4Addr, path::Path};

use aya::maps::Array;
use smtp_lb_common::{FlowSet, flow_hash, maps, programs, ring_slot, second_hash};
use smtp_lb_tests::{
    packet::{PacketBuilder, path_mtu_error, tcp},
    xdp::{Verdict, XdpHarness},
};
use smtp_lb_user::{
    balance::plan::flow_key,
    config::lb::LbConfig,
    dataplane::{apply_config, flows},
};

use super::{Report, median};

/// Repeats per measurement: enough that the mean is stable.
const REPEAT: u32 = 1_000_000;
/// Loads of the objects, each with its own maps (see [`run`]).
const LOADS: usize = 3;
/// Rounds per load; each subject is measured once per round, after the
/// floor, its programs loaded again first (see [`run`]).
const ROUNDS: usize = 7;

/// Three relays; `relay1_weight` 0 drains the first.
fn config(relay1_weight: u32, p2c: bool) -> anyhow::Result<LbConfig> {
    let mut text =
        format!("[[services]]\nvip = \"203.0.113.10\"\nports = [25, 587, 465]\np2c = {p2c}\n");
    for (i, weight) in [relay1_weight, 1, 1].into_iter().enumerate() {
        text += &format!(
            "[[services.backends]]\nname = \"relay{n}\"\naddress = \"198.51.100.{a}\"\nmac = \"02:00:00:00:00:0{a}\"\nweight = {weight}\n",
            n = i + 1,
            a = i + 3
        );
    }
    Ok(LbConfig::parse(&text)?)
}

fn ns(xdp: &mut XdpHarness, prog: &str, pkt: &[u8]) -> f64 {
    xdp.run_repeat(prog, pkt, REPEAT).cpu_ns
}

/// One round's ns per packet, by column: the floor (the empty program),
/// the balancer's subjects, then `probe_l2_dsr`'s two.
type Round = [f64; COLUMNS];
const FLOOR: usize = 0;
const NONVIP: usize = 1;
const SYN: usize = 2;
const ESTABLISHED: usize = 3;
const MOVED: usize = 4;
const ICMP: usize = 5;
const SYN_P2C: usize = 6;
const LEAST_PORT_FILTER: usize = 7;
const LEAST_L2DSR: usize = 8;
const COLUMNS: usize = 9;

/// The least an L2 DSR balancer does (a probe; see `run`).
const L2DSR: &str = "probe_l2_dsr";

/// The cost probes (`smtp-lb-ebpf` feature `probes`), each one map operation
/// on a key read from the packet; reported as ns above `probe_key40` (the
/// same packet read with no map operation).
const PROBES: &[&str] = &[
    "probe_key40",
    "probe_stats",
    "probe_table_lookup",
    "probe_table_insert",
    "probe_table_hash",
    "probe_flow_hash",
    "probe_maglev_slot",
    "probe_service_slot",
    "probe_ct_lookup",
    "probe_ct_update",
    "probe_moved_miss",
    "probe_lru12_lookup",
    "probe_lru12_update",
    "probe_hash40_lookup",
    "probe_hash40_update",
    "probe_pcpu_update",
    "probe_lru_pcpu_lists_update",
];

/// Measures the balancer in `ebpf_object` (only the object is needed, not
/// the binary) and the probes in `probes_object`.
///
/// Each figure is a median over [`LOADS`] loads of the object (each with
/// maps of its own) × [`ROUNDS`] rounds, the programs loaded again before
/// every round: where the kernel puts a program's code (the JIT picks a
/// random offset) and its maps moved one path by up to 2 ns between two
/// loads of the same object, more than most changes worth measuring. A
/// ratio is the median of the ratios within each round, whose floor and
/// subject ran back to back: this VM's speed drifts by a fifth within
/// minutes (the empty program: 22 or 27 ns), and a ratio of two medians
/// would mix the two.
pub fn run(ebpf_object: &Path, probes_object: &Path) -> anyhow::Result<Report> {
    let mut loads = (0..LOADS)
        .map(|_| Loaded::new(ebpf_object, probes_object))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut rounds: Vec<Round> = Vec::new();
    for _ in 0..ROUNDS {
        for load in &mut loads {
            rounds.push(load.measure());
        }
    }
    let syn = loads[0].syn.clone();
    drop(loads);
    let col = |i: usize| median(&rounds.iter().map(|r| r[i]).collect::<Vec<_>>());
    let ratio = |i: usize| median(&rounds.iter().map(|r| r[i] / r[FLOOR]).collect::<Vec<_>>());
    let probes = measure_probes(probes_object, &syn)?;
    let (floor_ns, nonvip_ns, syn_ns) = (col(FLOOR), col(NONVIP), col(SYN));
    let (established_ns, moved_ns) = (col(ESTABLISHED), col(MOVED));
    let (icmp_ns, syn_p2c_ns) = (col(ICMP), col(SYN_P2C));
    let mut report = Report::default();
    report
        .add("floor_ns", floor_ns, "ns")
        .add("nonvip_ns", nonvip_ns, "ns")
        .add("syn_ns", syn_ns, "ns")
        .add("syn_p2c_ns", syn_p2c_ns, "ns")
        .add("established_ns", established_ns, "ns")
        .add("moved_ns", moved_ns, "ns")
        .add("icmp_ns", icmp_ns, "ns")
        .add("nonvip_ratio", ratio(NONVIP), "x floor (target <= 1.2)")
        .add("syn_ratio", ratio(SYN), "x floor (target <= 3.0)")
        .add("syn_p2c_ratio", ratio(SYN_P2C), "x floor")
        .add("syn_p2c_over_syn", syn_p2c_ns / syn_ns, "x syn (p2c off)")
        .add(
            "established_ratio",
            ratio(ESTABLISHED),
            "x floor (target <= 2.0)",
        )
        .add("moved_ratio", ratio(MOVED), "x floor")
        .add("icmp_ratio", ratio(ICMP), "x floor")
        .add(
            "least_port_filter_ratio",
            ratio(LEAST_PORT_FILTER),
            "x floor (probe_l2_dsr, non-VIP: parse, port)",
        )
        .add(
            "least_l2dsr_ratio",
            ratio(LEAST_L2DSR),
            "x floor (probe_l2_dsr, port 25: + MACs, stateless)",
        );
    let base = probes[0];
    for (name, ns) in PROBES.iter().zip(&probes).skip(1) {
        report.add(&format!("{name}_ns"), ns - base, "ns above probe_key40");
    }
    report.add("probe_key40_ns", base, "ns");
    Ok(report)
}

/// The balancer's subjects an A/B compares: column of a [`Round`], name.
const SUBJECTS: [(usize, &str); 6] = [
    (NONVIP, "nonvip"),
    (SYN, "syn"),
    (SYN_P2C, "syn_p2c"),
    (ESTABLISHED, "established"),
    (MOVED, "moved"),
    (ICMP, "icmp"),
];

/// `bench xdp --against OBJECT`: the balancer in `ebpf_object` against an
/// earlier build's object, paired. Both are loaded [`LOADS`] times; each
/// round measures every load, in an order that rotates, the programs
/// loaded again first; a difference is the median over the rounds of this
/// build's figure less the other's in the same round, so the VM's drift
/// and placement cancel as far as they can. Changes of 1-2 ns show only
/// this way (see docs/dataplane.md): two runs of plain `bench xdp` differ
/// by more.
pub fn run_against(
    ebpf_object: &Path,
    against: &Path,
    probes_object: &Path,
) -> anyhow::Result<Report> {
    let mut loads = Vec::new();
    for _ in 0..LOADS {
        loads.push((0, Loaded::new(ebpf_object, probes_object)?));
        loads.push((
            1,
            Loaded::new(against, probes_object).with_context(|| {
                format!(
                    "load and configure {}: this build's user space writes its maps, so it \
                     must have this build's maps (an object from before a map change cannot \
                     be compared this way)",
                    against.display()
                )
            })?,
        ));
    }
    let mut rows: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    let n = loads.len();
    for round in 0..ROUNDS * 2 {
        for step in 0..n {
            let (build, load) = &mut loads[(step + round) % n];
            rows[*build].push(load.measure());
        }
    }
    let mut report = Report::default();
    for (i, name) in SUBJECTS {
        let ratio = |r: &[Round]| median(&r.iter().map(|m| m[i] / m[FLOOR]).collect::<Vec<_>>());
        let diff: Vec<f64> = rows[0]
            .iter()
            .zip(&rows[1])
            .map(|(a, b)| a[i] - b[i])
            .collect();
        report
            .add(
                &format!("{name}_ratio"),
                ratio(&rows[0]),
                "x floor (this build)",
            )
            .add(
                &format!("{name}_ratio_against"),
                ratio(&rows[1]),
                "x floor (the other object)",
            )
            .add(
                &format!("{name}_minus_against_ns"),
                median(&diff),
                "ns (paired median; < 0: this build is faster)",
            );
    }
    Ok(report)
}

/// Median ns of each of [`PROBES`] over [`ROUNDS`] interleaved rounds. Each
/// update probe runs before its lookup, so the lookups are hits.
fn measure_probes(probes_object: &Path, pkt: &[u8]) -> anyhow::Result<Vec<f64>> {
    let mut xdp = XdpHarness::load_from(probes_object);
    for probe in PROBES {
        xdp.run(probe, pkt);
    }
    anyhow::ensure!(xdp.run("probe_ct_lookup", pkt).verdict == Verdict::Tx);
    anyhow::ensure!(xdp.run("probe_table_lookup", pkt).verdict == Verdict::Tx);
    let mut rounds: Vec<Vec<f64>> = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push(PROBES.iter().map(|p| ns(&mut xdp, p, pkt)).collect());
    }
    Ok((0..PROBES.len())
        .map(|i| median(&rounds.iter().map(|r| r[i]).collect::<Vec<_>>()))
        .collect())
}

/// One load of the balancer (plain and with `p2c`) and of the stateless
/// floor, its maps set up and every subject checked to do what it should.
struct Loaded {
    xdp: XdpHarness,
    p2c: XdpHarness,
    least: XdpHarness,
    nonvip: Vec<u8>,
    syn: Vec<u8>,
    syn_p2c: Vec<u8>,
    ack: Vec<u8>,
    moved: Vec<u8>,
    icmp: Vec<u8>,
}

impl Loaded {
    fn new(ebpf_object: &Path, probes_object: &Path) -> anyhow::Result<Self> {
        let mut xdp = XdpHarness::load_from(ebpf_object);
        apply_config(xdp.ebpf_mut(), &config(1, false)?)?;
        let mut p2c = XdpHarness::load_from(ebpf_object);
        let p2c_plan = apply_config(p2c.ebpf_mut(), &config(1, true)?)?.plan;
        let client = Ipv4Addr::new(198, 51, 100, 1);
        let vip = Ipv4Addr::new(203, 0, 113, 10);
        let nonvip =
            PacketBuilder::tcp(client, 40000, Ipv4Addr::new(198, 51, 100, 9), 80, tcp::ACK).build();
        let syn = PacketBuilder::tcp(client, 40001, vip, 25, tcp::SYN).build();
        let svc = (p2c_plan.services.iter().find(|s| s.port == 25))
            .ok_or_else(|| anyhow::anyhow!("no service on port 25"))?;
        let p2c_sport = (40001..41000)
            .find(|p| {
                let hash = flow_hash(&flow_key(vip.into(), 25, client.into(), *p), false);
                svc.ring[ring_slot(hash, svc.ring_size) as usize]
                    != svc.ring[ring_slot(second_hash(hash), svc.ring_size) as usize]
            })
            .ok_or_else(|| anyhow::anyhow!("no flow whose p2c candidates differ"))?;
        let syn_p2c = PacketBuilder::tcp(client, p2c_sport, vip, 25, tcp::SYN).build();
        let ack = PacketBuilder::tcp(client, 40002, vip, 25, tcp::ACK).build();
        // Track the established flow first, and check every subject does what it should.
        let track = PacketBuilder::tcp(client, 40002, vip, 25, tcp::SYN).build();
        anyhow::ensure!(xdp.run(programs::BALANCER, &track).verdict == Verdict::Tx);
        anyhow::ensure!(xdp.run(programs::BALANCER, &nonvip).verdict == Verdict::Pass);
        anyhow::ensure!(xdp.run(programs::BALANCER, &syn).verdict == Verdict::Tx);
        anyhow::ensure!(p2c.run(programs::BALANCER, &syn_p2c).verdict == Verdict::Tx);
        anyhow::ensure!(xdp.run(programs::BALANCER, &ack).verdict == Verdict::Tx);
        let icmp = path_mtu_error(client.into(), 40002, vip.into(), 25);
        anyhow::ensure!(xdp.run(programs::BALANCER, &icmp).verdict == Verdict::Tx);

        // A moved flow: tracked on the relay a drain then takes out of the
        // table, its FLOW_TABLE way taken as a full set under a flood can leave it.
        let moved_sport = (41000..42000)
            .find(|p| {
                let syn = PacketBuilder::tcp(client, *p, vip, 25, tcp::SYN).build();
                xdp.run(programs::BALANCER, &syn).output[0..6] == [2, 0, 0, 0, 0, 3]
            })
            .ok_or_else(|| anyhow::anyhow!("no flow on relay1"))?;
        apply_config(xdp.ebpf_mut(), &config(0, false)?)?;
        let moved = PacketBuilder::tcp(client, moved_sport, vip, 25, tcp::ACK).build();
        let mut table: Array<_, FlowSet> = Array::try_from(
            xdp.ebpf_mut()
                .map_mut(maps::FLOW_TABLE)
                .expect("FLOW_TABLE"),
        )?;
        let key = flow_key(vip.into(), 25, client.into(), moved_sport);
        anyhow::ensure!(flows::remove(&mut table, &key)?, "moved flow not tracked");
        let out = xdp.run(programs::BALANCER, &moved);
        anyhow::ensure!(out.verdict == Verdict::Tx && out.output[0..6] == [2, 0, 0, 0, 0, 3]);

        // The least any balancer does, from the probes object: `probe_l2_dsr`
        // reads Ethernet, IPv4 and TCP and checks the port (non-VIP traffic ends
        // there: the port filter's floor); to port 25 it rewrites both MACs and
        // sends by the source port, stateless (the balancing path's floor).
        let mut least = XdpHarness::load_from(probes_object);
        anyhow::ensure!(least.run(L2DSR, &nonvip).verdict == Verdict::Pass);
        anyhow::ensure!(least.run(L2DSR, &ack).verdict == Verdict::Tx);
        Ok(Self {
            xdp,
            p2c,
            least,
            nonvip,
            syn,
            syn_p2c,
            ack,
            moved,
            icmp,
        })
    }

    /// One round: the programs loaded again, then the floor and each subject.
    fn measure(&mut self) -> Round {
        for h in [&mut self.xdp, &mut self.p2c, &mut self.least] {
            h.reload_programs();
        }
        let xdp = &mut self.xdp;
        let mut r = [0.0; COLUMNS];
        r[FLOOR] = ns(xdp, programs::PASS, &self.nonvip);
        r[NONVIP] = ns(xdp, programs::BALANCER, &self.nonvip);
        r[SYN] = ns(xdp, programs::BALANCER, &self.syn);
        r[ESTABLISHED] = ns(xdp, programs::BALANCER, &self.ack);
        r[MOVED] = ns(xdp, programs::BALANCER, &self.moved);
        r[ICMP] = ns(xdp, programs::BALANCER, &self.icmp);
        r[SYN_P2C] = ns(&mut self.p2c, programs::BALANCER, &self.syn_p2c);
        r[LEAST_PORT_FILTER] = ns(&mut self.least, L2DSR, &self.nonvip);
        r[LEAST_L2DSR] = ns(&mut self.least, L2DSR, &self.ack);
        r
    }
}
