//! `bench maglev`: Maglev table build time for M = 65537 with N = 10, 100 and
//! 1000 backends (target: < 2 ms at N = 100), and the table's measured
//! quality at N = 100: balance (max slots / mean slots) and disruption (share
//! of slots that change owner when one backend is removed).
use std::time::Instant;

use smtp_lb_user::balance::maglev::{Entry, build, slot_counts};

use super::Report;

const M: u32 = 65537;

fn entries(names: &[String]) -> Vec<Entry<'_>> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| Entry {
            name,
            weight: 1,
            id: i as u32,
        })
        .collect()
}

/// Median wall time of `runs` builds, in ms.
fn build_ms(n: usize, runs: usize) -> f64 {
    let names: Vec<String> = (0..n).map(|i| format!("relay-{i:04}")).collect();
    let e = entries(&names);
    let _ = build(&e, M); // warm up
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let table = build(&e, M);
            let dt = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(table);
            dt
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub fn run() -> Report {
    let mut report = Report::default();
    report
        .add("build_ms_n10", build_ms(10, 21), "ms")
        .add("build_ms_n100", build_ms(100, 21), "ms (target < 2)")
        .add("build_ms_n1000", build_ms(1000, 11), "ms");
    let names: Vec<String> = (0..100).map(|i| format!("relay-{i:04}")).collect();
    let all = entries(&names);
    let before = build(&all, M);
    let rest: Vec<_> = all.iter().copied().filter(|e| e.id != 42).collect();
    let after = build(&rest, M);
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let counts = slot_counts(&before, 100);
    let max = *counts.iter().max().unwrap_or(&0) as f64;
    report
        .add(
            "disruption_pct_n100",
            100.0 * moved as f64 / f64::from(M),
            "% (ideal 1.0, limit 2.0)",
        )
        .add(
            "max_over_avg_n100",
            max / (f64::from(M) / 100.0),
            "(limit 1.01)",
        );
    report
}
