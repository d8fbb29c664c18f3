//! The lab's story, shared by `cargo xtask lab` (which prints it) and the
//! privileged tests (which assert on it): real SMTP clients send to the VIP;
//! the XDP balancer spreads the sessions over three relays by weight (2:1:1)
//! with direct server return; each relay runs `smtp-lb relay`, spools the
//! mail durably, finds each recipient domain's MX through the lab's DNS
//! (dnsmasq) and delivers to that "ISP" (Postfix `smtp-sink` for Outlook and
//! Yahoo, the harness's scriptable fake MX for Gmail).
//!
//! ```text
//! client 198.51.100.1 ─┐            ┌─ gmail  MX 198.51.100.21 (gmail-smtp-in.l.google.com)
//! lb     198.51.100.2 ─┼── br0 ─────┼─ outlook MX 198.51.100.22 (…protection.outlook.com)
//! relay1..3 .11-.13  ──┘            ├─ yahoo  MX 198.51.100.23 (mta5.am0.yahoodns.net)
//!   VIP 203.0.113.10 on lo          └─ dns 198.51.100.53 (dnsmasq: MX and A records)
//! ```
//! The names exist only in the lab's dnsmasq; nothing leaves the namespaces.
//!
//! The story ([`Plan::story`]) has phases, all with real processes:
//! 1. *steady*: Postfix `smtp-source` sends half the sessions; the relays
//!    take them by weight.
//! 2. A paced client sends the other half over [`LOAD_FOR`]; at [`KILL_AT`]
//!    relay2's `smtp-lb relay` is killed (SIGKILL): the balancer's health
//!    checks take it out within [`health_bound`], after which no session
//!    fails; the mail it had accepted waits in its spool.
//! 3. At [`RESTART_AT`] it starts again on the same spool, delivers what it
//!    held, and rejoins through the balancer's slow start ([`REJOIN`]).
//! 4. From [`THROTTLE_AT`] the Gmail MX answers `421 4.7.28` for
//!    [`THROTTLE_FOR`]; the relays suspend Gmail by rule (the shipped rule
//!    says 1 h; the lab's shaping file makes it [`GMAIL_SUSPEND`]) while
//!    Outlook and Yahoo keep their pace; Gmail's mail is delivered after.
//! 5. The client re-sends what failed while relay2 died, as an MTA would;
//!    then every accepted message must be at its ISP: none lost.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    env,
    fake_mx::FakeMx,
    load::{Load, Pace, Session},
    relay,
    topology::{CLIENT, DsrLab, LB, VIP, wait_for},
};

/// Relay weights in the story.
pub const WEIGHTS: [u32; 3] = [2, 1, 1];

/// The lab's ISPs: (recipient domain, MX host name, MX address).
pub const ISPS: [(&str, &str, &str); 3] = [
    ("gmail.com", "gmail-smtp-in.l.google.com", "198.51.100.21"),
    (
        "outlook.com",
        "outlook-com.olc.protection.outlook.com",
        "198.51.100.22",
    ),
    ("yahoo.com", "mta5.am0.yahoodns.net", "198.51.100.23"),
];
const DNS: &str = "198.51.100.53";
/// Where each relay's metrics listener and the balancer's (with the dashboard) listen.
const RELAY_METRICS_PORT: u16 = 9702;
const LB_METRICS_PORT: u16 = 9701;

/// The balancer's health checks in the lab: every `HEALTH_INTERVAL`, out
/// after `FALL` failures, back after `RISE` successes.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
const FALL: u32 = 2;
const RISE: u32 = 2;
/// Per-phase timeouts of one health check (connect, greeting, EHLO).
const PROBE_TIMEOUTS: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_millis(300),
    Duration::from_millis(300),
];

/// The longest a dead relay can keep getting new sessions: `FALL` checks,
/// each taking at most the interval plus every phase's timeout.
pub fn health_bound() -> Duration {
    (HEALTH_INTERVAL + PROBE_TIMEOUTS.iter().sum::<Duration>()) * FALL
}

/// The relay that is killed and restarted (relay2, weight 1).
pub const VICTIM: usize = 1;
/// The timeline of the paced client, from its start.
pub const KILL_AT: Duration = Duration::from_secs(5);
pub const RESTART_AT: Duration = Duration::from_secs(10);
pub const THROTTLE_AT: Duration = Duration::from_secs(17);
pub const THROTTLE_FOR: Duration = Duration::from_secs(4);
pub const LOAD_FOR: Duration = Duration::from_secs(24);
/// How long a relay suspends Gmail after its `421 4.7.28` in the lab.
pub const GMAIL_SUSPEND: Duration = Duration::from_secs(5);
/// The balancer's slow start for a relay back from a failure.
pub const REJOIN: Duration = Duration::from_secs(6);
const REJOIN_START_PERCENT: u32 = 10;
const REJOIN_STEPS: u32 = 3;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// SMTP sessions the clients send in all.
    pub sessions: usize,
    /// The whole story; `false`: only the steady phase.
    pub story: bool,
}

/// What the run reports while it goes.
pub enum Event<'a> {
    /// A step happened (one line).
    Step(&'a str),
    /// Live progress: `done` of `total` in `phase`.
    Progress {
        phase: &'a str,
        done: usize,
        total: usize,
    },
    /// Everything is measured and the lab still runs; `commands` poke it.
    /// The lab is torn down when the callback returns.
    Ready {
        outcome: &'a Outcome,
        commands: &'a [String],
    },
}

/// One phase of the run, by when its sessions started.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: String,
    /// On the paced client's clock (the steady phase is before 0).
    pub from: f64,
    pub to: f64,
    /// Sessions started in it, and how many got no `250`.
    pub sessions: usize,
    pub failed: usize,
    /// Sessions each relay took (by relay order).
    pub per_relay: Vec<usize>,
    /// Messages each ISP received in it (by [`ISPS`] order).
    pub delivered: Vec<usize>,
}

/// One ISP's view.
#[derive(Clone, Debug)]
pub struct Isp {
    pub domain: String,
    /// Messages to it the relays accepted (`250` to the client).
    pub accepted: usize,
    /// Messages its MX received.
    pub delivered: usize,
}

/// What the run saw.
#[derive(Debug)]
pub struct Outcome {
    /// SMTP sessions of the steady phase (each got `250` for its message).
    pub sessions: usize,
    pub elapsed: Duration,
    /// Per relay: name, sessions the XDP program sent it (new flows), and
    /// messages it delivered (by the ISPs' view of who connected).
    pub per_relay: Vec<(String, u64, usize)>,
    /// Messages each ISP received.
    pub per_isp: Vec<(String, usize)>,
    /// Time from the first session to the last message at an ISP.
    pub end_to_end: Duration,
    /// The XDP program's global counters.
    pub counters: BTreeMap<String, u64>,
    /// `ctl backends --json` after the run.
    pub backends: serde_json::Value,
    /// The story's figures (`None` for the steady phase alone).
    pub story: Option<Story>,
}

/// The figures of the whole story.
#[derive(Debug)]
pub struct Story {
    pub phases: Vec<Phase>,
    pub isps: Vec<Isp>,
    /// Accepted messages that never reached their ISP (must be 0), and
    /// messages an ISP got more often than they were accepted.
    pub lost: usize,
    pub duplicated: usize,
    /// Sessions that failed after relay2 died: within the health bound, and
    /// after it (must be 0); sessions relay2 took after the bound until its
    /// restart (must be 0).
    pub failed_within_bound: usize,
    pub failed_after_bound: usize,
    pub victim_after_bound: usize,
    /// Sessions the client re-sent at the end, and how many got `250`.
    pub resent: usize,
    pub resent_accepted: usize,
    /// relay2's health and share of its weight (‰) as the balancer
    /// reported it after the restart: (time, health, share).
    pub rejoin: Vec<(f64, String, u64)>,
    /// `421 4.7.28` replies the Gmail MX gave, when the first and last went
    /// out, and Gmail messages relays delivered within `GMAIL_SUSPEND` after
    /// their own first `421` (must be 0: the suspension holds).
    pub gmail_421: usize,
    pub gmail_421_span: Option<(f64, f64)>,
    pub gmail_during_suspension: usize,
    /// `smtp-lb ctl backends` at the end, and each relay's `smtp-lb ctl
    /// relay queue` while Gmail was suspended (with the time) and at the end.
    pub backends_text: String,
    pub queues_while_suspended: Option<(f64, Vec<(String, String)>)>,
    pub relay_queues: Vec<(String, String)>,
}

/// An ISP's MX: Postfix `smtp-sink` dumping to a directory, or the fake MX.
enum Mx {
    Sink(PathBuf),
    Fake(FakeMx),
}

/// One message at an ISP: which relay address sent it, and when.
struct Arrival {
    peer: String,
    at: f64,
}

/// The paced client's clock: its start as both kinds of time.
#[derive(Clone, Copy)]
struct Clock(Instant, SystemTime);

impl Clock {
    fn now() -> Self {
        Self(Instant::now(), SystemTime::now())
    }
    fn of_instant(self, t: Instant) -> f64 {
        if t >= self.0 {
            t.duration_since(self.0).as_secs_f64()
        } else {
            -self.0.duration_since(t).as_secs_f64()
        }
    }
    fn of_system(self, t: SystemTime) -> f64 {
        match t.duration_since(self.1) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }
}

impl Mx {
    fn count(&self) -> usize {
        match self {
            Self::Sink(dir) => std::fs::read_dir(dir).map_or(0, Iterator::count),
            Self::Fake(sink) => sink.count(),
        }
    }

    fn arrivals(&self, clock: Clock) -> Vec<Arrival> {
        match self {
            Self::Sink(dir) => std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let peer = text
                        .lines()
                        .find_map(|l| l.strip_prefix("X-Client-Addr:"))
                        .unwrap_or_default()
                        .trim()
                        .to_owned();
                    let at = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .map_or(f64::NAN, |t| clock.of_system(t));
                    Arrival { peer, at }
                })
                .collect(),
            Self::Fake(sink) => sink
                .deliveries()
                .into_iter()
                .map(|d| Arrival {
                    peer: d.peer.to_string(),
                    at: clock.of_instant(d.at),
                })
                .collect(),
        }
    }
}

fn isp_name(domain: &str) -> &str {
    domain.split('.').next().unwrap_or(domain)
}

/// The steady phase alone (the shape of the first lab tests).
pub fn smtp_through_lb(sessions: usize, say: &mut dyn FnMut(&str)) -> Outcome {
    run(
        Plan {
            sessions,
            story: false,
        },
        &mut |e| {
            if let Event::Step(line) = e {
                say(line);
            }
        },
    )
}

/// The relay's config in the lab, and its shaping file.
fn relay_config(dsr: &DsrLab, name: &str) -> PathBuf {
    let dir = dsr.work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let shaping = dir.join("shaping.toml");
    std::fs::write(
        &shaping,
        format!(
            "# Gmail's 421 4.7.28 suspends it for {GMAIL_SUSPEND:?} here (the shipped rule: 1h).\n\
             [[google.rule]]\ncode = 421\nenhanced = \"4.7.28\"\naction = \"suspend\"\nduration = \"{}s\"\n",
            GMAIL_SUSPEND.as_secs()
        ),
    )
    .unwrap();
    let mut cfg = relay::lab_config(name, &dir);
    cfg.delivery_log = Some(dir.join("delivery.jsonl"));
    cfg.metrics = Some(([0, 0, 0, 0], RELAY_METRICS_PORT).into());
    cfg.shaping = Some(shaping);
    cfg.dns.nameservers = vec![format!("{DNS}:53")];
    let path = dir.join("relay.toml");
    relay::write_config(&cfg, &path);
    path
}

/// Starts relay `i`'s `smtp-lb relay` and waits until it answers on :25.
fn start_relay(dsr: &DsrLab, i: usize) -> u32 {
    let r = &dsr.relays[i];
    let mut relay = dsr.lab.command(&r.name, env::smtp_lb_bin());
    relay
        .arg("relay")
        .arg("--config")
        .arg(relay_config(dsr, &r.name))
        .env("SMTP_LB_LOG", "error");
    let pid = dsr.lab.spawn(&r.name, relay);
    dsr.wait_listening(i, "smtp-lb relay", Duration::from_secs(20));
    pid
}

/// `smtp-lb ctl ARGS` as an operator types it on `host`, its output as printed.
fn ctl_text(dsr: &DsrLab, host: &str, args: &[&str]) -> String {
    let mut cmd = dsr.lab.command(host, env::smtp_lb_bin());
    cmd.arg("ctl").args(args);
    let out = cmd.output().expect("run smtp-lb ctl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// Each relay's `smtp-lb ctl relay queue`, as printed.
fn relay_queues(dsr: &DsrLab) -> Vec<(String, String)> {
    dsr.relays
        .iter()
        .map(|r| {
            let token = relay_token(dsr, &r.name);
            let token = token.to_str().expect("a UTF-8 lab path");
            let args = ["relay", "--relay-token-file", token, "queue"];
            (r.name.clone(), ctl_text(dsr, &r.name, &args))
        })
        .collect()
}

/// The relay's admin token file (`<spool_dir>/admin.token`, the default).
fn relay_token(dsr: &DsrLab, name: &str) -> PathBuf {
    dsr.work.join(name).join("spool/admin.token")
}

/// Builds the lab, starts DNS, ISPs, relays and the balancer, and plays
/// `plan`. `on` receives the steps and live progress.
pub fn run(plan: Plan, on: &mut dyn FnMut(Event)) -> Outcome {
    let mut say = |line: &str| on(Event::Step(line));
    let mut dsr = DsrLab::bare(3);
    say(&format!(
        "lab {}: client {CLIENT}, lb {LB}, relay1-3 198.51.100.11-13, 3 ISP MX hosts and a DNS server on one bridge",
        dsr.lab.id()
    ));

    // DNS and the ISPs: Gmail's MX is the scriptable fake, the others smtp-sink.
    let mut dnsmasq = format!(
        "--no-daemon --no-resolv --no-hosts --bind-interfaces --listen-address={DNS} --port=53 --user=root --log-facility=-"
    );
    let mut mxs = Vec::new();
    for (domain, mx, addr) in ISPS {
        let host = format!("{}-mx", isp_name(domain));
        dsr.lab.host(&host, &[&format!("{addr}/24")]);
        dnsmasq += &format!(" --mx-host={domain},{mx},10 --host-record={mx},{addr}");
        if domain == "gmail.com" {
            let at: SocketAddr = format!("{addr}:25").parse().unwrap();
            mxs.push(Mx::Fake(
                dsr.lab
                    .in_netns(&host, move || FakeMx::builder().addr(at).start()),
            ));
            continue;
        }
        let dir = dsr.work.join(&host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut sink = dsr.lab.command(&host, "smtp-sink");
        sink.args(["-u", "nobody", "-h", mx, "-d"])
            .arg(dir.join("m"))
            .args(["0.0.0.0:25", "1024"]);
        sink.stdout(Stdio::null()).stderr(Stdio::null());
        dsr.lab.spawn(&host, sink);
        mxs.push(Mx::Sink(dir));
    }
    dsr.lab.host("dns", &[&format!("{DNS}/24")]);
    let mut dns = dsr.lab.command("dns", "dnsmasq");
    dns.args(dnsmasq.split_whitespace())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    dsr.lab.spawn("dns", dns);
    say(
        "ISPs: gmail.com (the harness's scriptable MX), outlook.com and yahoo.com (Postfix smtp-sink); dnsmasq serves their MX records",
    );

    let mut relay_pids: Vec<u32> = (0..dsr.relays.len())
        .map(|i| start_relay(&dsr, i))
        .collect();
    say(&format!(
        "relays: smtp-lb relay on :25 — durable spool, MX routing through the lab DNS, Gmail's 421 4.7.28 suspends Gmail for {}s (shaping file)",
        GMAIL_SUSPEND.as_secs()
    ));

    let [connect, greeting, ehlo] = PROBE_TIMEOUTS.map(|d| d.as_millis());
    let relay_metrics: Vec<String> = dsr
        .relays
        .iter()
        .map(|r| format!("\"{}:{RELAY_METRICS_PORT}\"", r.addr))
        .collect();
    let config = dsr.config(
        &WEIGHTS,
        &format!(
            "[metrics]\nlisten = \"0.0.0.0:{LB_METRICS_PORT}\"\n\n[dashboard]\nrelay_metrics = [{}]\n\n\
             [health]\ninterval = \"{}ms\"\nrise = {RISE}\nfall = {FALL}\n\n\
             [health.timeouts]\nconnect = \"{connect}ms\"\ngreeting = \"{greeting}ms\"\nehlo = \"{ehlo}ms\"\n\n\
             [warmup]\nduration = \"0s\"\nrejoin = \"{}s\"\nstart_percent = {REJOIN_START_PERCENT}\nsteps = {REJOIN_STEPS}\n",
            relay_metrics.join(", "),
            HEALTH_INTERVAL.as_millis(),
            REJOIN.as_secs()
        ),
    );
    dsr.start_lb(&config, &[]);
    say(&format!(
        "lb: smtp-lb lb attached in native XDP mode; relays health-checked over SMTP every {}ms (out after {FALL} failures: within {:.1}s); weights {WEIGHTS:?}; maps pinned in {}",
        HEALTH_INTERVAL.as_millis(),
        health_bound().as_secs_f64(),
        dsr.pin_dir.display()
    ));

    // Phase 1, steady: Postfix smtp-source, split over the three domains.
    let steady_total = if plan.story {
        plan.sessions / 2
    } else {
        plan.sessions
    };
    let per_domain = steady_total / ISPS.len();
    let sessions = per_domain * ISPS.len();
    say(&format!(
        "steady: smtp-source sends {sessions} sessions to {VIP}:25, {per_domain} each to user@gmail.com, user@outlook.com, user@yahoo.com"
    ));
    let started = Instant::now();
    let mut clients: Vec<(String, Child)> = ISPS
        .iter()
        .map(|(domain, ..)| {
            let mut cmd = dsr.smtp_source(per_domain, 10, &format!("user@{domain}"));
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            (
                (*domain).to_owned(),
                cmd.spawn().expect("start smtp-source"),
            )
        })
        .collect();
    let total = || mxs.iter().map(Mx::count).sum::<usize>();
    while clients
        .iter_mut()
        .any(|(_, c)| c.try_wait().unwrap().is_none())
    {
        on(Event::Progress {
            phase: "steady: messages at the ISPs",
            done: total(),
            total: sessions,
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    for (domain, child) in clients {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "smtp-source to {domain} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let elapsed = started.elapsed();
    let mut say = |line: &str| on(Event::Step(line));
    say(&format!(
        "steady: {sessions} sessions accepted (250) in {:.2}s ({:.0}/s)",
        elapsed.as_secs_f64(),
        sessions as f64 / elapsed.as_secs_f64()
    ));
    wait_for("every message at an ISP", Duration::from_mins(1), || {
        total() >= sessions
    });
    let end_to_end = started.elapsed();
    let steady_flows = dsr.new_flows();
    let weight_sum = f64::from(WEIGHTS.iter().sum::<u32>());
    for ((r, f), w) in dsr.relays.iter().zip(&steady_flows).zip(WEIGHTS) {
        say(&format!(
            "steady: {} took {f} sessions ({:.1}% — weight share {:.1}%)",
            r.name,
            100.0 * *f as f64 / sessions as f64,
            100.0 * f64::from(w) / weight_sum
        ));
    }
    say(&format!(
        "steady: every message reached its ISP {:.2}s after the first session started",
        end_to_end.as_secs_f64()
    ));

    let story = plan.story.then(|| {
        play(
            &mut dsr,
            &mxs,
            &mut relay_pids,
            plan.sessions - sessions,
            (sessions, &steady_flows),
            on,
        )
    });

    // What each relay delivered, by the ISPs' view of who connected.
    let clock = Clock::now();
    let mut delivered_by = BTreeMap::<String, usize>::new();
    for mx in &mxs {
        for a in mx.arrivals(clock) {
            *delivered_by.entry(a.peer).or_default() += 1;
        }
    }
    let flows = dsr.new_flows();
    let per_relay = dsr
        .relays
        .iter()
        .zip(&flows)
        .map(|(r, f)| {
            (
                r.name.clone(),
                *f,
                delivered_by.get(&r.addr).copied().unwrap_or(0),
            )
        })
        .collect();
    let per_isp = ISPS
        .iter()
        .zip(&mxs)
        .map(|((d, ..), mx)| ((*d).to_owned(), mx.count()))
        .collect();
    let stats = dsr.stats();
    let counters = stats["global"]
        .as_object()
        .expect("global counters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    let backends = dsr.ctl(&["backends"]);
    let token = dsr.work.join("state/admin.token");
    let ns = |h: &str| dsr.lab.get(h).netns.clone();
    let bin = env::smtp_lb_bin();
    let commands = vec![
        format!(
            "nsenter --net=/var/run/netns/{} {} ctl backends --token-file {}",
            ns("lb"),
            bin.display(),
            token.display()
        ),
        format!(
            "{} ctl stats --pin-dir {}",
            bin.display(),
            dsr.pin_dir.display()
        ),
        format!(
            "nsenter --net=/var/run/netns/{} {} ctl relay --relay-token-file {} queue     # relay1; relay2, relay3 alike",
            ns("relay1"),
            bin.display(),
            relay_token(&dsr, "relay1").display()
        ),
        format!(
            "nsenter --net=/var/run/netns/{} curl -s http://127.0.0.1:{RELAY_METRICS_PORT}/metrics     # relay1's metrics listener",
            ns("relay1"),
        ),
        format!(
            "nsenter --net=/var/run/netns/{} curl -s http://127.0.0.1:{LB_METRICS_PORT}/metrics     # the balancer's; /healthz, /readyz alike",
            ns("lb"),
        ),
        format!(
            "socat TCP-LISTEN:{LB_METRICS_PORT},bind=127.0.0.1,reuseaddr,fork EXEC:'nsenter --net=/var/run/netns/{} socat STDIO TCP\\:127.0.0.1\\:{LB_METRICS_PORT}' &     # then open http://127.0.0.1:{LB_METRICS_PORT}/dashboard here",
            ns("lb"),
        ),
        format!(
            "nsenter --net=/var/run/netns/{} swaks --server {VIP} --from app@lab.example --to user@yahoo.com",
            ns("client")
        ),
        format!(
            "bpftool map lookup pinned {}/FLOW_TABLE key 0 0 0 0     # one set of tracked flows (65,536 sets: `ctl where` names a flow's)",
            dsr.pin_dir.display()
        ),
    ];
    let outcome = Outcome {
        sessions,
        elapsed,
        per_relay,
        per_isp,
        end_to_end,
        counters,
        backends,
        story,
    };
    on(Event::Ready {
        outcome: &outcome,
        commands: &commands,
    });
    assert!(
        dsr.lab.stop(dsr.lb.take().unwrap(), Duration::from_secs(5)),
        "smtp-lb lb exits cleanly on SIGTERM"
    );
    on(Event::Step(
        "lb: smtp-lb lb stopped: program detached, pins removed; tearing the lab down",
    ));
    outcome
}

/// Phases 2–5 of the story (see the module docs): `total` paced sessions.
/// `steady` holds the steady phase's sessions and new flows per relay.
fn play(
    dsr: &mut DsrLab,
    mxs: &[Mx],
    relay_pids: &mut [u32],
    total: usize,
    steady: (usize, &[u64]),
    on: &mut dyn FnMut(Event),
) -> Story {
    let Mx::Fake(gmail) = &mxs[0] else {
        unreachable!("Gmail's MX is the fake one")
    };
    let victim = dsr.relays[VICTIM].name.clone();
    let rcpts: Vec<String> = ISPS.iter().map(|(d, ..)| format!("user@{d}")).collect();
    let target: SocketAddr = format!("{VIP}:25").parse().unwrap();
    let client_ns = dsr.lab.get("client").netns.clone();
    // smtp-source succeeded: each of its sessions got its 250.
    let accepted_before = steady.0 / ISPS.len();
    on(Event::Step(&format!(
        "story: a client sends {total} more sessions over {}s; {victim} is killed at {}s and restarted at {}s; Gmail's MX says 421 4.7.28 from {}s for {}s",
        LOAD_FOR.as_secs(),
        KILL_AT.as_secs(),
        RESTART_AT.as_secs(),
        THROTTLE_AT.as_secs(),
        THROTTLE_FOR.as_secs()
    )));
    let clock = Clock::now();
    let load = Load::paced(
        &client_ns,
        target,
        16,
        Pace {
            total,
            interval: LOAD_FOR / u32::try_from(total.max(1)).unwrap_or(u32::MAX),
            rcpts: rcpts.clone(),
            // Sessions that last a while, so some are in flight at the kill.
            hold: Duration::from_millis(300),
        },
    );
    let phase_names = [
        "before the kill".to_owned(),
        format!("{victim} down"),
        format!("{victim} rejoining"),
        "Gmail says 421 4.7.28".to_owned(),
        "Gmail accepts again".to_owned(),
    ];
    let last_phase = phase_names.len() - 1;
    let bounds = [
        Duration::ZERO,
        KILL_AT,
        RESTART_AT,
        THROTTLE_AT,
        THROTTLE_AT + THROTTLE_FOR,
        LOAD_FOR,
    ];
    let (mut killed, mut restarted, mut throttling, mut unthrottled) = (false, false, false, false);
    let mut rejoin = Vec::new();
    let mut queues_while_suspended = None;
    let mut last_sample = Duration::ZERO;
    loop {
        let now = load.now();
        let done = load.snapshot().len();
        if done >= total {
            break;
        }
        let phase = bounds
            .windows(2)
            .position(|w| now < w[1])
            .unwrap_or(last_phase);
        on(Event::Progress {
            phase: &phase_names[phase],
            done,
            total,
        });
        if !killed && now >= KILL_AT {
            killed = true;
            dsr.lab.kill(relay_pids[VICTIM]);
            on(Event::Step(&format!(
                "t={:.1}s {victim}: smtp-lb relay killed (SIGKILL); what it accepted waits in its spool",
                load.now().as_secs_f64()
            )));
        }
        if !restarted && now >= RESTART_AT {
            restarted = true;
            relay_pids[VICTIM] = start_relay(dsr, VICTIM);
            on(Event::Step(&format!(
                "t={:.1}s {victim}: smtp-lb relay restarted on the same spool",
                load.now().as_secs_f64()
            )));
        }
        if restarted && rejoin.len() < 40 && now >= last_sample + Duration::from_millis(500) {
            last_sample = now;
            let b = dsr.ctl(&["backends"]);
            if let Some(row) = b
                .as_array()
                .into_iter()
                .flatten()
                .find(|row| row["address"] == dsr.relays[VICTIM].addr.as_str())
            {
                rejoin.push((
                    now.as_secs_f64(),
                    row["health"].as_str().unwrap_or_default().to_owned(),
                    row["share_permille"].as_u64().unwrap_or(0),
                ));
            }
        }
        if !throttling && now >= THROTTLE_AT {
            throttling = true;
            gmail.set_throttle(true);
            on(Event::Step(&format!(
                "t={:.1}s gmail MX: answers MAIL with 421 4.7.28 for {}s",
                load.now().as_secs_f64(),
                THROTTLE_FOR.as_secs()
            )));
        }
        if throttling && queues_while_suspended.is_none() && now >= THROTTLE_AT + THROTTLE_FOR / 2 {
            queues_while_suspended = Some((now.as_secs_f64(), relay_queues(dsr)));
        }
        if throttling && !unthrottled && now >= THROTTLE_AT + THROTTLE_FOR {
            unthrottled = true;
            gmail.set_throttle(false);
            on(Event::Step(&format!(
                "t={:.1}s gmail MX: accepts mail again",
                load.now().as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    gmail.set_throttle(false);
    let sessions = load.finish();

    // Phase 5: the client re-sends what got no 250, as an MTA would.
    let failed: Vec<&Session> = sessions.iter().filter(|s| !s.accepted).collect();
    let resend = if failed.is_empty() {
        Vec::new()
    } else {
        on(Event::Step(&format!(
            "client: re-sends the {} sessions that got no 250",
            failed.len()
        )));
        Load::paced(
            &client_ns,
            target,
            4,
            Pace {
                total: failed.len(),
                interval: Duration::from_millis(10),
                rcpts: failed.iter().map(|s| s.rcpt.clone()).collect(),
                hold: Duration::ZERO,
            },
        )
        .finish()
    };

    // Every accepted message must reach its ISP.
    let isps: Vec<Isp> = ISPS
        .iter()
        .map(|(domain, ..)| Isp {
            domain: (*domain).to_owned(),
            accepted: accepted_before
                + sessions
                    .iter()
                    .chain(&resend)
                    .filter(|s| s.accepted && s.rcpt.ends_with(&format!("@{domain}")))
                    .count(),
            delivered: 0,
        })
        .collect();
    let want: usize = isps.iter().map(|i| i.accepted).sum();
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        let done: usize = mxs.iter().map(Mx::count).sum();
        on(Event::Progress {
            phase: "delivering what the relays hold",
            done,
            total: want,
        });
        if isps.iter().zip(mxs).all(|(i, mx)| mx.count() >= i.accepted) || Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let isps: Vec<Isp> = isps
        .into_iter()
        .zip(mxs)
        .map(|(i, mx)| Isp {
            delivered: mx.count(),
            ..i
        })
        .collect();
    let lost = isps
        .iter()
        .map(|i| i.accepted.saturating_sub(i.delivered))
        .sum();
    let duplicated = isps
        .iter()
        .map(|i| i.delivered.saturating_sub(i.accepted))
        .sum();
    on(Event::Step(&format!(
        "t={:.1}s every ISP has its mail: {} accepted, {} delivered, {lost} lost",
        clock.of_instant(Instant::now()),
        want,
        isps.iter().map(|i| i.delivered).sum::<usize>()
    )));

    // Phases: the client's sessions by start time, the ISPs' arrivals.
    let arrivals: Vec<Vec<Arrival>> = mxs.iter().map(|mx| mx.arrivals(clock)).collect();
    let relay_of = |s: &Session| {
        s.relay.as_deref().and_then(|g| {
            dsr.relays
                .iter()
                .position(|r| g.split('.').next() == Some(r.name.as_str()))
        })
    };
    let end = arrivals
        .iter()
        .flatten()
        .map(|a| a.at)
        .fold(LOAD_FOR.as_secs_f64(), f64::max);
    let delivered_in = |from: f64, to: f64| -> Vec<usize> {
        arrivals
            .iter()
            .map(|a| a.iter().filter(|a| a.at >= from && a.at < to).count())
            .collect()
    };
    let mut phases = vec![Phase {
        name: "steady (smtp-source)".into(),
        from: f64::NEG_INFINITY,
        to: 0.0,
        sessions: steady.0,
        failed: 0,
        per_relay: steady.1.iter().map(|f| *f as usize).collect(),
        delivered: delivered_in(f64::NEG_INFINITY, 0.0),
    }];
    for (i, name) in phase_names.iter().enumerate() {
        let (from, to) = (bounds[i].as_secs_f64(), bounds[i + 1].as_secs_f64());
        // The last phase also holds the few sessions that started late.
        let here: Vec<&Session> = sessions
            .iter()
            .filter(|s| {
                let t = s.start.as_secs_f64();
                t >= from && (t < to || i == last_phase)
            })
            .collect();
        let mut per_relay = vec![0; dsr.relays.len()];
        for s in &here {
            if let Some(r) = relay_of(s) {
                per_relay[r] += 1;
            }
        }
        phases.push(Phase {
            name: name.clone(),
            from,
            to,
            sessions: here.len(),
            failed: here.iter().filter(|s| !s.accepted).count(),
            per_relay,
            delivered: delivered_in(from, to),
        });
    }
    let mut per_relay = vec![0; dsr.relays.len()];
    for s in &resend {
        if let Some(r) = relay_of(s) {
            per_relay[r] += 1;
        }
    }
    phases.push(Phase {
        name: "after: re-sent, spooled".into(),
        from: LOAD_FOR.as_secs_f64(),
        to: end + 0.001,
        sessions: resend.len(),
        failed: resend.iter().filter(|s| !s.accepted).count(),
        per_relay,
        delivered: delivered_in(LOAD_FOR.as_secs_f64(), end + 0.001),
    });

    let bound = (KILL_AT + health_bound()).as_secs_f64();
    let in_window = |s: &&Session, from: f64, to: f64| {
        let t = s.start.as_secs_f64();
        t >= from && t < to
    };
    let failed_within_bound = sessions
        .iter()
        .filter(|s| !s.accepted && in_window(s, KILL_AT.as_secs_f64() - 1.0, bound))
        .count();
    let failed_after_bound = sessions
        .iter()
        .filter(|s| !s.accepted && s.start.as_secs_f64() >= bound)
        .count();
    let victim_after_bound = sessions
        .iter()
        .filter(|s| in_window(s, bound, RESTART_AT.as_secs_f64()) && relay_of(s) == Some(VICTIM))
        .count();
    let throttled = gmail.throttled_from();
    let gmail_421_span = throttled
        .first()
        .zip(throttled.last())
        .map(|((_, a), (_, b))| (clock.of_instant(*a), clock.of_instant(*b)));
    // Per relay: Gmail messages it delivered within the suspension that
    // its first 421 started.
    let gmail_during_suspension = dsr
        .relays
        .iter()
        .filter_map(|r| {
            let first = throttled
                .iter()
                .find(|(peer, _)| peer.to_string() == r.addr)
                .map(|(_, t)| clock.of_instant(*t))?;
            Some(
                arrivals[0]
                    .iter()
                    .filter(|a| {
                        a.peer == r.addr
                            && a.at > first
                            && a.at < first + GMAIL_SUSPEND.as_secs_f64()
                    })
                    .count(),
            )
        })
        .sum();
    let backends_text = ctl_text(
        dsr,
        "lb",
        &[
            "backends",
            "--token-file",
            dsr.work.join("state/admin.token").to_str().unwrap(),
        ],
    );
    Story {
        phases,
        isps,
        lost,
        duplicated,
        failed_within_bound,
        failed_after_bound,
        victim_after_bound,
        resent: resend.len(),
        resent_accepted: resend.iter().filter(|s| s.accepted).count(),
        rejoin,
        gmail_421: throttled.len(),
        gmail_421_span,
        gmail_during_suspension,
        backends_text,
        queues_while_suspended,
        relay_queues: relay_queues(dsr),
    }
}
