//! `cargo xtask lab`: the main job. Sets up, builds, then plays the lab story
//! (see `smtp_lb_tests::scenario`) with live progress, and prints a report:
//! per phase, per relay, per ISP, the XDP counters, and what `smtp-lb ctl
//! backends` and `smtp-lb ctl relay queue` said. Fails when a message the
//! relays accepted did not reach its ISP.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::ensure;
use indicatif::{ProgressBar, ProgressStyle};
use smtp_lb_tests::scenario::{
    self, Event, GMAIL_SUSPEND, ISPS, KILL_AT, Outcome, Plan, Story, health_bound,
};

use crate::{build, setup, util::require_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// SMTP sessions the clients send: half in the steady phase, half
    /// through the kill, the rejoin and Gmail's deferral.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Leave the lab running after the report for exploring (prints the
    /// commands to poke it); Ctrl-C tears it down.
    #[arg(long)]
    keep: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("`cargo xtask lab`")?;
    ensure!(
        opts.sessions >= 30,
        "--sessions {} is too few for the story; give at least 30",
        opts.sessions
    );
    setup::ensure(setup::Role::Lab, false)?;
    let artifacts = build::run(&build::Options {})?;
    for (k, v) in build::env(&artifacts) {
        // SAFETY: single-threaded at this point; the harness reads these later.
        unsafe { std::env::set_var(k, v) };
    }
    if std::env::var_os("SMTP_LB_LOG").is_none() {
        // The story reports what the daemons' warnings would (a relay down,
        // a rule fired); set SMTP_LB_LOG to see their logs too.
        // SAFETY: as above.
        unsafe { std::env::set_var("SMTP_LB_LOG", "error") };
    }
    let bar = ProgressBar::no_length().with_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg:<32} [{bar:30}] {pos}/{len}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let say = |bar: &ProgressBar, line: &str| bar.suspend(|| println!("lab: {line}"));
    let mut verdict = Ok(());
    let outcome = scenario::run(
        Plan {
            sessions: opts.sessions,
            story: true,
        },
        &mut |event| match event {
            Event::Step(line) => say(&bar, line),
            Event::Progress { phase, done, total } => {
                bar.set_message(phase.to_owned());
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
            Event::Ready { outcome, commands } => {
                bar.finish_and_clear();
                verdict = report(outcome);
                if opts.keep {
                    println!("\nThe lab stays up for exploring (Ctrl-C tears it down):");
                    for c in commands {
                        println!("  {c}");
                    }
                    wait_for_interrupt();
                }
            }
        },
    );
    let story = outcome.story.as_ref().expect("the story ran");
    println!(
        "\n{} messages accepted, {} delivered to the ISPs, {} lost; lab torn down.",
        story.isps.iter().map(|i| i.accepted).sum::<usize>(),
        story.isps.iter().map(|i| i.delivered).sum::<usize>(),
        story.lost
    );
    verdict
}

/// Prints the report; fails when the story broke a promise.
fn report(outcome: &Outcome) -> anyhow::Result<()> {
    let story = outcome.story.as_ref().expect("the story ran");
    print_phases(outcome, story);

    println!("\nrelays (sessions: XDP new flows; delivered: as the ISPs saw them):");
    let taken: u64 = outcome.per_relay.iter().map(|(_, t, _)| t).sum();
    for (name, took, delivered) in &outcome.per_relay {
        println!(
            "  {name:<8} took {took:>5} sessions ({:>4.1}%)  delivered {delivered:>5} messages",
            100.0 * *took as f64 / taken.max(1) as f64
        );
    }

    println!("\nISPs:");
    for i in &story.isps {
        println!(
            "  {:<12} accepted {:>5}  delivered {:>5}",
            i.domain, i.accepted, i.delivered
        );
    }

    let victim = &outcome.per_relay[scenario::VICTIM].0;
    println!(
        "\nfailover: {victim} killed at {:.1}s; the health checks' bound is {:.1}s",
        KILL_AT.as_secs_f64(),
        health_bound().as_secs_f64()
    );
    println!(
        "  sessions that got no 250: {} up to the bound (in flight on {victim}, or sent to it before it was out), \
         {} after it; new sessions {victim} took after the bound until its restart: {}",
        story.failed_within_bound, story.failed_after_bound, story.victim_after_bound
    );
    println!(
        "  re-sent by the client (as an MTA retries): {}, accepted: {}",
        story.resent, story.resent_accepted
    );
    println!(
        "rejoin: {victim} as `smtp-lb ctl backends` reported it after the restart (t, health, share of its weight):"
    );
    let mut last = None;
    for (t, health, share) in &story.rejoin {
        if last != Some((health, share)) {
            println!("  t={t:>5.1}s  {health:<5} {:>5.1}%", *share as f64 / 10.0);
            last = Some((health, share));
        }
    }
    match story.gmail_421_span {
        Some((first, last)) => println!(
            "gmail: its MX answered 421 4.7.28 {} times (t={first:.1}–{last:.1}s); the relays suspended Gmail for {}s \
             (lab shaping file; the shipped rule: 1h) — Gmail messages a relay delivered within {}s of its own first 421: {}",
            story.gmail_421,
            GMAIL_SUSPEND.as_secs(),
            GMAIL_SUSPEND.as_secs(),
            story.gmail_during_suspension,
        ),
        None => println!(
            "gmail: its MX never had to answer 421 4.7.28 (no Gmail mail while it would have)"
        ),
    }

    println!("\nXDP counters on the LB node (summed over CPUs):");
    for (name, value) in outcome.counters.iter().filter(|(_, v)| **v > 0) {
        println!("  {name:<18} {value:>10}");
    }
    println!("  (every other pass/drop reason: 0)");

    println!("\n$ smtp-lb ctl backends");
    print_indented(&story.backends_text);
    if let Some((t, queues)) = &story.queues_while_suspended {
        for (relay, text) in queues {
            println!("\n$ smtp-lb ctl relay queue    # on {relay}, at t={t:.1}s (Gmail suspended)");
            print_indented(text);
        }
    }
    for (relay, text) in &story.relay_queues {
        println!("\n$ smtp-lb ctl relay queue    # on {relay}, at the end");
        print_indented(text);
    }

    ensure!(
        story.lost == 0,
        "{} accepted messages never reached their ISP",
        story.lost
    );
    ensure!(
        story.failed_after_bound == 0 && story.victim_after_bound == 0,
        "{victim} still got sessions after the health checks' bound"
    );
    ensure!(
        story.resent_accepted == story.resent,
        "re-sent sessions failed"
    );
    ensure!(
        story.gmail_during_suspension == 0,
        "relays delivered to Gmail while they had it suspended"
    );
    Ok(())
}

/// The phases as a table: sessions by relay, messages by ISP.
fn print_phases(outcome: &Outcome, story: &Story) {
    let relays: Vec<&str> = outcome.per_relay.iter().map(|(n, ..)| n.as_str()).collect();
    print!(
        "\nphases (t: the story's client clock; sessions by start, messages by arrival)\n  {:<24} {:>11} {:>8} {:>6}",
        "phase", "t (s)", "sessions", "failed"
    );
    for r in &relays {
        print!(" {r:>7}");
    }
    print!(" |");
    for (d, ..) in ISPS {
        print!(" {:>7}", d.split('.').next().unwrap_or(d));
    }
    println!();
    for p in &story.phases {
        let t = if p.from.is_finite() {
            format!("{:.1}–{:.1}", p.from, p.to)
        } else {
            "before 0".to_owned()
        };
        print!("  {:<24} {t:>11} {:>8} {:>6}", p.name, p.sessions, p.failed);
        for n in &p.per_relay {
            print!(" {n:>7}");
        }
        print!(" |");
        for n in &p.delivered {
            print!(" {n:>7}");
        }
        println!();
    }
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Blocks until SIGINT or SIGTERM, so the lab is torn down after either.
fn wait_for_interrupt() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    while !INTERRUPTED.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
}
