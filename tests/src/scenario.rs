//! The lab's story, shared by `cargo xtask lab` (which prints it) and the
//! privileged tests (which assert on it): real SMTP clients send to the VIP;
//! the XDP balancer spreads the sessions over three relays by weight (2:1:1)
//! with direct server return; each relay runs `smtp-lb relay`, spools the
//! mail durably, finds each recipient domain's MX through the lab's DNS
//! (dnsmasq) and delivers to that "ISP" (Postfix `smtp-sink`).
//!
//! ```text
//! client 198.51.100.1 ─┐            ┌─ gmail  MX 198.51.100.21 (gmail-smtp-in.l.google.com)
//! lb     198.51.100.2 ─┼── br0 ─────┼─ outlook MX 198.51.100.22 (…protection.outlook.com)
//! relay1..3 .11-.13  ──┘            ├─ yahoo  MX 198.51.100.23 (mta5.am0.yahoodns.net)
//!   VIP 203.0.113.10 on lo          └─ dns 198.51.100.53 (dnsmasq: MX and A records)
//! ```
//! The names exist only in the lab's dnsmasq; nothing leaves the namespaces.
use std::{
    collections::BTreeMap,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{
    env,
    topology::{CLIENT, DsrLab, VIP, wait_for},
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

/// What the run saw.
#[derive(Debug)]
pub struct Outcome {
    /// SMTP sessions the clients completed (each got `250` for its message).
    pub sessions: usize,
    pub elapsed: Duration,
    /// Messages each relay accepted from the clients (by the XDP counters'
    /// new flows) and delivered to the ISPs (by the ISP sinks' view).
    pub per_relay: Vec<(String, u64, usize)>,
    /// Messages each ISP received.
    pub per_isp: Vec<(String, usize)>,
    /// Time from the first session to the last message at an ISP.
    pub end_to_end: Duration,
    /// The XDP program's global counters.
    pub counters: BTreeMap<String, u64>,
    /// `ctl backends` as the balancer reported it after the run.
    pub backends: serde_json::Value,
}

fn dumps(dsr: &DsrLab, isp: &str) -> std::path::PathBuf {
    dsr.work.join(format!("{isp}-mx"))
}

/// Builds the lab, starts DNS, ISPs, relays and the balancer, sends
/// `sessions` SMTP sessions (split over the three ISPs' domains) and
/// follows the mail to the ISPs. `say` receives one line per step.
pub fn smtp_through_lb(sessions: usize, say: &mut dyn FnMut(&str)) -> Outcome {
    let mut dsr = DsrLab::bare(3);
    say(&format!(
        "lab {}: client {CLIENT}, lb 198.51.100.2, relay1-3 198.51.100.11-13, 3 ISP MX hosts and a DNS server on one bridge",
        dsr.lab.id()
    ));

    // DNS: the ISPs' MX records.
    let mut dnsmasq = format!(
        "--no-daemon --no-resolv --no-hosts --bind-interfaces --listen-address={DNS} --port=53 --user=root --log-facility=-"
    );
    for (i, (domain, mx, addr)) in ISPS.iter().enumerate() {
        let isp = domain.split('.').next().unwrap();
        dsr.lab.host(&format!("{isp}-mx"), &[&format!("{addr}/24")]);
        dnsmasq += &format!(" --mx-host={domain},{mx},10 --host-record={mx},{addr}");
        let dir = dumps(&dsr, isp);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut sink = dsr.lab.command(&format!("{isp}-mx"), "smtp-sink");
        sink.args(["-u", "nobody", "-h", mx, "-d"])
            .arg(dir.join("m"))
            .args(["0.0.0.0:25", "1024"]);
        sink.stdout(Stdio::null()).stderr(Stdio::null());
        dsr.lab.spawn(&format!("{isp}-mx"), sink);
        let _ = i;
    }
    dsr.lab.host("dns", &[&format!("{DNS}/24")]);
    let mut dns = dsr.lab.command("dns", "dnsmasq");
    dns.args(dnsmasq.split_whitespace())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    dsr.lab.spawn("dns", dns);
    say(
        "ISPs: gmail.com, outlook.com, yahoo.com each have an MX host running Postfix smtp-sink; dnsmasq serves their MX records",
    );

    // Relays: smtp-lb relay on :25 (the VIP and their own address).
    for r in &dsr.relays {
        let dir = dsr.work.join(&r.name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = format!(
            "hostname = \"{name}.lab.example\"\nspool_dir = \"{spool}\"\nrelay_networks = [\"198.51.100.0/24\"]\n\
             delivery_log = \"{log}\"\nadmin = \"127.0.0.1:8025\"\n\n[[listener]]\naddress = \"0.0.0.0:25\"\n\n\
             [dns]\nnameservers = [\"{DNS}:53\"]\n\n[retry]\nmin = \"1s\"\nmax = \"5s\"\n",
            name = r.name,
            spool = dir.join("spool").display(),
            log = dir.join("delivery.jsonl").display(),
        );
        let path = dir.join("relay.toml");
        std::fs::write(&path, cfg).unwrap();
        let mut relay = dsr.lab.command(&r.name, env::smtp_lb_bin());
        relay
            .arg("relay")
            .arg("--config")
            .arg(&path)
            .env("SMTP_LB_LOG", "warn");
        dsr.lab.spawn(&r.name, relay);
    }
    for r in &dsr.relays {
        let (name, addr) = (r.name.clone(), r.addr.clone());
        wait_for(
            &format!("{name}'s smtp-lb relay"),
            Duration::from_secs(20),
            || {
                dsr.lab
                    .try_run(
                        &name,
                        &[
                            "timeout",
                            "1",
                            "bash",
                            "-c",
                            &format!("</dev/tcp/{addr}/25"),
                        ],
                    )
                    .status
                    .success()
            },
        );
    }
    say(
        "relays: smtp-lb relay on :25 — durable spool, MX routing through the lab DNS, delivery to the ISPs",
    );

    let config = dsr.config(&WEIGHTS, "");
    dsr.start_lb(&config, &[]);
    say(&format!(
        "lb: smtp-lb lb attached in native XDP mode; relays health-checked over SMTP; weights {WEIGHTS:?}; maps pinned in {}",
        dsr.pin_dir.display()
    ));

    let per_domain = sessions / ISPS.len();
    let sessions = per_domain * ISPS.len();
    say(&format!(
        "client: smtp-source sends {sessions} sessions to {VIP}:25, {per_domain} each to user@gmail.com, user@outlook.com, user@yahoo.com"
    ));
    let started = Instant::now();
    let clients: Vec<(String, Child)> = ISPS
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
    for (domain, child) in clients {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "smtp-source to {domain} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let elapsed = started.elapsed();
    say(&format!(
        "client: {sessions} sessions accepted (250) in {:.2}s ({:.0}/s)",
        elapsed.as_secs_f64(),
        sessions as f64 / elapsed.as_secs_f64()
    ));

    let count = |dir: &std::path::Path| std::fs::read_dir(dir).map_or(0, Iterator::count);
    let total = || {
        ISPS.iter()
            .map(|(d, ..)| count(&dumps(&dsr, d.split('.').next().unwrap())))
            .sum::<usize>()
    };
    wait_for("every message at an ISP", Duration::from_mins(1), || {
        total() >= sessions
    });
    let end_to_end = started.elapsed();
    let per_isp: Vec<(String, usize)> = ISPS
        .iter()
        .map(|(d, ..)| {
            (
                (*d).to_owned(),
                count(&dumps(&dsr, d.split('.').next().unwrap())),
            )
        })
        .collect();
    // Which relay delivered each message: the ISP sink records its client.
    let mut delivered_by = BTreeMap::<String, usize>::new();
    for (d, ..) in ISPS {
        for e in std::fs::read_dir(dumps(&dsr, d.split('.').next().unwrap())).unwrap() {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.starts_with("X-Client-Addr:")) {
                *delivered_by
                    .entry(l.trim_start_matches("X-Client-Addr:").trim().to_owned())
                    .or_default() += 1;
            }
        }
    }
    let flows = dsr.new_flows();
    let per_relay: Vec<(String, u64, usize)> = dsr
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
    let weight_sum = f64::from(WEIGHTS.iter().sum::<u32>());
    for ((name, accepted, delivered), w) in per_relay.iter().zip(WEIGHTS) {
        say(&format!(
            "{name}: took {accepted} sessions ({:.1}% — weight share {:.1}%), delivered {delivered} messages to the ISPs",
            100.0 * *accepted as f64 / sessions as f64,
            100.0 * f64::from(w) / weight_sum
        ));
    }
    for (isp, n) in &per_isp {
        say(&format!("{isp}: its MX received {n} messages"));
    }
    say(&format!(
        "every message reached its ISP {:.2}s after the first session started",
        end_to_end.as_secs_f64()
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
        elapsed,
        per_relay,
        per_isp,
        end_to_end,
        counters,
        backends,
    }
}
