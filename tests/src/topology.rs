//! The standard one-arm L2 DSR lab: a client, an LB node and N relays on
//! one bridge; the VIP on every relay's `lo`; Postfix `smtp-sink` on every
//! relay (all addresses, so the balancer's health checks reach it on the
//! relay's own address too), each dumping what it receives; `smtp-lb lb`
//! on the LB node with a config this module writes.
//!
//! ```text
//! client 198.51.100.1 ─┐
//! lb     198.51.100.2 ─┼─ br0      VIP 203.0.113.10 on each relay's lo
//! relayN 198.51.100.1N ┘
//! ```
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{env, lab::Lab};

pub const VIP: &str = "203.0.113.10";
pub const CLIENT: &str = "198.51.100.1";
pub const LB: &str = "198.51.100.2";

/// One relay host.
pub struct Relay {
    pub name: String,
    pub addr: String,
    /// Where its sink dumps messages.
    pub dump: PathBuf,
    /// The running sink, if any.
    pub sink: Option<u32>,
}

/// A running DSR lab.
pub struct DsrLab {
    pub lab: Lab,
    pub relays: Vec<Relay>,
    /// Scratch directory: configs, dumps, the balancer's state.
    pub work: PathBuf,
    /// The balancer's pin directory.
    pub pin_dir: PathBuf,
    pub config_path: PathBuf,
    /// The running `smtp-lb lb`, if any.
    pub lb: Option<u32>,
}

/// Polls `ok` every 50 ms; panics after `timeout` naming `what`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `02:00:00:00:00:11`, as configs write MACs.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Attaches the pass-through program to `host`'s bridge port, so the
/// native `XDP_TX` frames that host sends are received (DESIGN.md: veth).
pub fn pass_on_switch_port(lab: &Lab, host: &str) {
    let dir = lab.pin_dir().join(format!("pass-{host}"));
    let out = Command::new("bpftool")
        .args(["prog", "loadall"])
        .arg(env::ebpf_object())
        .arg(&dir)
        .args(["type", "xdp"])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool prog loadall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prog = dir.join("smtp_lb_pass");
    let port = lab.get(host).port.clone();
    lab.run_on_switch(&[
        "bpftool",
        "net",
        "attach",
        "xdpdrv",
        "pinned",
        prog.to_str().unwrap(),
        "dev",
        &port,
    ]);
}

impl DsrLab {
    /// Builds the topology with `relays` relays, each running a sink.
    pub fn new(relays: usize) -> Self {
        let mut this = Self::bare(relays);
        for i in 0..relays {
            this.start_sink(i);
        }
        this
    }

    /// Builds the topology with `relays` relay hosts and nothing running on
    /// them (the caller starts its own MTA).
    pub fn bare(relays: usize) -> Self {
        let mut lab = Lab::new();
        let work = lab.scratch_dir();
        lab.host("client", &[&format!("{CLIENT}/24")]);
        lab.host("lb", &[&format!("{LB}/24")]);
        let mut hosts = Vec::new();
        for i in 1..=relays {
            let name = format!("relay{i}");
            let addr = format!("198.51.100.{}", 10 + i);
            lab.host(&name, &[&format!("{addr}/24")]);
            lab.sh(
                &name,
                &format!(
                    "ip addr add {VIP}/32 dev lo && \
                     sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2"
                ),
            );
            let dump = work.join(format!("{name}-dump"));
            std::fs::create_dir_all(&dump).unwrap();
            // smtp-sink drops privileges to nobody before writing.
            std::fs::set_permissions(&dump, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap();
            hosts.push(Relay {
                name,
                addr,
                dump,
                sink: None,
            });
        }
        lab.sh("client", &format!("ip route add {VIP}/32 via {LB}"));
        let pin_dir = lab.pin_dir().join("lb");
        let config_path = work.join("lb.toml");
        let this = Self {
            lab,
            relays: hosts,
            work,
            pin_dir,
            config_path,
            lb: None,
        };
        pass_on_switch_port(&this.lab, "lb");
        this
    }

    /// Starts relay `i`'s sink on `0.0.0.0:25`.
    pub fn start_sink(&mut self, i: usize) {
        let dump = self.relays[i].dump.clone();
        let pid = self.spawn_sink(i, 25, &dump);
        self.relays[i].sink = Some(pid);
    }

    /// Starts a sink on relay `i` at `0.0.0.0:port` that dumps what it
    /// receives into `dump`; waits until it listens. Returns its pid.
    pub fn spawn_sink(&self, i: usize, port: u16, dump: &Path) -> u32 {
        self.spawn_sink_with(i, port, dump, &[])
    }

    /// [`DsrLab::spawn_sink`] with more `smtp-sink` options (`-w 1`: a
    /// relay slow to answer `DATA`).
    pub fn spawn_sink_with(&self, i: usize, port: u16, dump: &Path, options: &[&str]) -> u32 {
        let r = &self.relays[i];
        std::fs::create_dir_all(dump).unwrap();
        // smtp-sink drops privileges to nobody before writing.
        std::fs::set_permissions(dump, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut cmd = self.lab.command(&r.name, "smtp-sink");
        // -h: the sink greets with the relay's name, so clients can tell who answered.
        cmd.args(["-u", "nobody", "-h", &r.name, "-d"])
            .arg(dump.join("m"))
            .args(options)
            .args([&format!("0.0.0.0:{port}"), "1024"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let pid = self.lab.spawn(&r.name, cmd);
        self.wait_port(i, port, "sink", Duration::from_secs(10));
        pid
    }

    /// Waits until relay `i` accepts connections on its address, port 25;
    /// panics after `timeout` naming `what` listens there.
    pub fn wait_listening(&self, i: usize, what: &str, timeout: Duration) {
        self.wait_port(i, 25, what, timeout);
    }

    /// Waits until relay `i` accepts connections on its address at `port`;
    /// panics after `timeout` naming `what` listens there.
    pub fn wait_port(&self, i: usize, port: u16, what: &str, timeout: Duration) {
        let Relay { name, addr, .. } = &self.relays[i];
        self.wait_tcp(name, addr, port, &format!("{name}'s {what}"), timeout);
    }

    /// Waits until `addr:port` accepts connections from host `from`;
    /// panics after `timeout` naming `what` listens there.
    pub fn wait_tcp(&self, from: &str, addr: &str, port: u16, what: &str, timeout: Duration) {
        wait_for(&format!("{what} on {addr}:{port}"), timeout, || {
            self.lab
                .try_run(
                    from,
                    &[
                        "timeout",
                        "1",
                        "bash",
                        "-c",
                        &format!("</dev/tcp/{addr}/{port}"),
                    ],
                )
                .status
                .success()
        });
    }

    /// Kills relay `i`'s sink (SIGKILL: a crashed relay).
    pub fn kill_sink(&mut self, i: usize) {
        if let Some(pid) = self.relays[i].sink.take() {
            self.lab.stop(pid, Duration::ZERO);
        }
    }

    /// A balancer config: one service on VIP:25 with the relays at
    /// `weights` (L2 DSR), fast health checks, no warmup, state and admin
    /// token in the lab's scratch directory. `extra` holds whole tables
    /// (`[warmup]`, `[health]`, …) that replace the defaults here.
    pub fn config(&self, weights: &[u32], extra: &str) -> String {
        self.config_on("lb", weights, extra)
    }

    /// [`DsrLab::config`] for the LB node `host`, with its own state
    /// directory ([`DsrLab::state_dir`]).
    pub fn config_on(&self, host: &str, weights: &[u32], extra: &str) -> String {
        let defaults = [
            ("[health]", "interval = \"200ms\"\nrise = 2\nfall = 2"),
            (
                "[health.timeouts]",
                "connect = \"200ms\"\ngreeting = \"300ms\"\nehlo = \"300ms\"",
            ),
            ("[warmup]", "duration = \"0s\"\nrejoin = \"0s\""),
        ];
        let mut cfg = format!(
            "state_dir = \"{}\"\n\n{extra}\n",
            self.state_dir(host).display()
        );
        for (header, body) in defaults {
            if !extra.lines().any(|l| l.trim() == header) {
                let _ = write!(cfg, "{header}\n{body}\n\n");
            }
        }
        let _ = write!(
            cfg,
            "[[services]]\nname = \"mx\"\nvip = \"{VIP}\"\nports = [25]\n"
        );
        for (i, w) in weights.iter().enumerate() {
            cfg += &self.backend(i, *w);
        }
        cfg
    }

    /// Relay `i` as a `[[services.backends]]` entry (L2 DSR) at `weight`.
    pub fn backend(&self, i: usize, weight: u32) -> String {
        let r = &self.relays[i];
        let mac = mac_str(self.lab.get(&r.name).mac);
        format!(
            "\n[[services.backends]]\nname = \"{}\"\naddress = \"{}\"\nweight = {weight}\nforwarding = \"l2\"\nmac = \"{mac}\"\n",
            r.name, r.addr
        )
    }

    /// Writes `config` and starts `smtp-lb lb` with it; waits until the
    /// program is attached. Returns the daemon's pid.
    pub fn start_lb(&mut self, config: &str, extra_args: &[&str]) -> u32 {
        let pid = self.start_lb_on("lb", config, extra_args);
        self.lb = Some(pid);
        pid
    }

    /// The state directory of the LB node `host` (`lb`: `state`, others
    /// `state-<host>`): its admin token, saved state, bird's files.
    pub fn state_dir(&self, host: &str) -> PathBuf {
        self.work.join(if host == "lb" {
            "state".to_owned()
        } else {
            format!("state-{host}")
        })
    }

    /// The pin directory of the LB node `host`.
    pub fn pin_dir_on(&self, host: &str) -> PathBuf {
        if host == "lb" {
            self.pin_dir.clone()
        } else {
            self.lab.pin_dir().join(host)
        }
    }

    /// The config file of the LB node `host` (`lb`: [`DsrLab::config_path`],
    /// others `<host>.toml`).
    pub fn config_path_on(&self, host: &str) -> PathBuf {
        if host == "lb" {
            self.config_path.clone()
        } else {
            self.work.join(format!("{host}.toml"))
        }
    }

    /// Adds another LB node `host` at `addr` on the bridge, its switch port
    /// ready for native `XDP_TX` (as `lb`'s).
    pub fn add_lb(&mut self, host: &str, addr: &str) {
        self.lab.host(host, &[&format!("{addr}/24")]);
        pass_on_switch_port(&self.lab, host);
    }

    /// [`DsrLab::start_lb`] on the LB node `host` (config file
    /// `<host>.toml`, its own pin directory); does not set [`DsrLab::lb`].
    pub fn start_lb_on(&self, host: &str, config: &str, extra_args: &[&str]) -> u32 {
        let config_path = self.config_path_on(host);
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = self.lab.command(host, env::smtp_lb_bin());
        cmd.args([
            "lb",
            "--iface",
            "eth0",
            "--mode",
            "native",
            "--stats-interval",
            "0",
            "--config",
        ])
        .arg(&config_path)
        .arg("--pin-dir")
        .arg(self.pin_dir_on(host))
        .args(extra_args)
        .env(
            "SMTP_LB_LOG",
            std::env::var("SMTP_LB_LOG").unwrap_or_else(|_| "warn".into()),
        );
        let pid = self.lab.spawn(host, cmd);
        wait_for(
            &format!("{host}'s balancer admin API"),
            Duration::from_secs(30),
            || self.ctl_raw_on(host, &["status"]).status.success(),
        );
        pid
    }

    /// Runs `smtp-lb ctl ARGS --json` against the balancer; panics on failure.
    pub fn ctl(&self, args: &[&str]) -> serde_json::Value {
        self.ctl_on("lb", args)
    }

    /// [`DsrLab::ctl`] against the balancer on the LB node `host`.
    pub fn ctl_on(&self, host: &str, args: &[&str]) -> serde_json::Value {
        let out = self.ctl_raw_on(host, args);
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("ctl {args:?} printed no JSON ({e}): {text}"))
    }

    /// The `ctl backends` row of the relay called `name`.
    pub fn backend_row(&self, name: &str) -> serde_json::Value {
        let backends = self.ctl(&["backends"]);
        backends
            .as_array()
            .and_then(|rows| rows.iter().find(|b| b["names"][0] == name))
            .unwrap_or_else(|| panic!("no {name} in ctl backends: {backends}"))
            .clone()
    }

    /// `smtp-lb ctl ARGS --json`, whatever its outcome.
    pub fn ctl_raw(&self, args: &[&str]) -> Output {
        self.ctl_raw_on("lb", args)
    }

    /// [`DsrLab::ctl_raw`] against the balancer on the LB node `host`.
    pub fn ctl_raw_on(&self, host: &str, args: &[&str]) -> Output {
        let mut cmd = self.lab.command(host, env::smtp_lb_bin());
        cmd.arg("ctl")
            .args(args)
            .arg("--json")
            .arg("--token-file")
            .arg(self.state_dir(host).join("admin.token"));
        cmd.output().expect("run smtp-lb ctl")
    }

    /// The data plane's counters (`ctl stats --json`).
    pub fn stats(&self) -> serde_json::Value {
        ctl_stats(&self.pin_dir)
    }

    /// New flows the data plane sent to each relay (by relay order).
    pub fn new_flows(&self) -> Vec<u64> {
        let stats = self.stats();
        self.relays
            .iter()
            .map(|r| {
                stats["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|b| b["address"] == r.addr.as_str())
                    .and_then(|b| b["new_flows"].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// A `smtp-source` command on the client: `sessions` sessions,
    /// `parallel` at a time, one message each to `rcpt`, to VIP:25.
    pub fn smtp_source(&self, sessions: usize, parallel: usize, rcpt: &str) -> Command {
        self.smtp_source_to(25, sessions, parallel, rcpt)
    }

    /// [`DsrLab::smtp_source`] to VIP:`port`.
    pub fn smtp_source_to(
        &self,
        port: u16,
        sessions: usize,
        parallel: usize,
        rcpt: &str,
    ) -> Command {
        let mut cmd = self.lab.command("client", "smtp-source");
        cmd.args(["-s", &parallel.to_string(), "-m", &sessions.to_string()])
            .args(["-f", "app@lab.example", "-t", rcpt])
            .arg(format!("{VIP}:{port}"));
        cmd
    }

    /// Runs `smtp-source` to completion; panics if any session failed.
    pub fn send(&self, sessions: usize, parallel: usize) -> Duration {
        let started = Instant::now();
        let out = self
            .smtp_source(sessions, parallel, "user@isp.example")
            .output()
            .expect("run smtp-source");
        assert!(
            out.status.success(),
            "smtp-source failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    }

    /// Messages each relay's sink received so far.
    pub fn delivered(&self) -> Vec<usize> {
        self.relays.iter().map(|r| count(&r.dump)).collect()
    }
}

/// Files in a sink's dump directory: one per message received.
pub fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

/// The routed part of the IPIP lab: a "router" host forwarding between the
/// client segment (`198.51.100.0/24`, `2001:db8::/64`; it is `.254` / `::fe`)
/// and the relays' (`192.0.2.0/24`, `2001:db8:2::/64`; `.254` / `2::fe`), and the "lb"
/// host (which must exist) routing to the relays through it and forwarding,
/// which the kernel's FIB helper requires.
pub fn ipip_router(lab: &mut Lab) {
    lab.host(
        "router",
        &[
            "198.51.100.254/24",
            "192.0.2.254/24",
            "2001:db8::fe/64",
            "2001:db8:2::fe/64",
        ],
    );
    let forward = "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                   net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0";
    lab.sh("router", forward);
    lab.sh(
        "lb",
        &format!(
            "ip route add 192.0.2.0/24 via 198.51.100.254 && \
             ip -6 route add 2001:db8:2::/64 via 2001:db8::fe && {forward}"
        ),
    );
}

/// The counters of the data plane pinned in `pin_dir` (`ctl stats --json`).
pub fn ctl_stats(pin_dir: &Path) -> serde_json::Value {
    let out = Command::new(env::smtp_lb_bin())
        .args(["ctl", "stats", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run smtp-lb ctl stats");
    assert!(
        out.status.success(),
        "ctl stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl stats --json prints JSON")
}

/// The ECMP router's address, on the lab's one segment.
pub const ROUTER: &str = "198.51.100.254";
/// The router's AS and the LB nodes' (one AS for all nodes, so the router
/// sees equal paths and merges them).
pub const ROUTER_AS: u32 = 64512;
pub const NODE_AS: u32 = 64513;
/// The BGP hold time of the lab's sessions (the smallest BGP allows).
pub const HOLD_TIME: Duration = Duration::from_secs(3);

/// Several LB nodes behind an ECMP router (issue 14):
///
/// ```text
/// client 198.51.100.1  ─┐   VIP 203.0.113.10 via the router
/// router 198.51.100.254 ┤   bird2: BGP from every node, ECMP (merge paths), L4 hash
/// lb, lb2, lb3  .2–.4  ─┼─ br0   each: smtp-lb lb + XDP + its own bird announcing the VIP
/// relayN 198.51.100.1N ─┘   VIP on lo; replies go straight to the client (L2 DSR)
/// ```
///
/// Every node has the same relays and weights, so every node builds the
/// same Maglev tables: a flow the router moves to another node (one left,
/// one came back) reaches the same relay there.
pub struct EcmpLab {
    pub dsr: DsrLab,
    /// The LB nodes' host names and addresses.
    pub nodes: Vec<(String, String)>,
    /// Their running daemons (by node).
    pub pids: Vec<Option<u32>>,
}

impl EcmpLab {
    /// `nodes` LB nodes (at least 1), `relays` relays with sinks, and the
    /// router running bird with a BGP session to every node.
    pub fn new(nodes: usize, relays: usize) -> Self {
        let mut dsr = DsrLab::new(relays);
        let mut list = vec![("lb".to_owned(), LB.to_owned())];
        for i in 2..=nodes {
            let (host, addr) = (format!("lb{i}"), format!("198.51.100.{}", i + 1));
            dsr.add_lb(&host, &addr);
            list.push((host, addr));
        }
        dsr.lab.host("router", &[&format!("{ROUTER}/24")]);
        dsr.lab.sh(
            "router",
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 \
             net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0",
        );
        let mut conf = format!(
            "log \"{}\" all;\nrouter id {ROUTER};\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             template bgp node {{ local {ROUTER} as {ROUTER_AS}; hold time {}; keepalive time 1; \
             connect retry time 1; ipv4 {{ import all; export none; }}; }}\n",
            dsr.work.join("router-bird.log").display(),
            HOLD_TIME.as_secs()
        );
        for (host, addr) in &list {
            let _ = writeln!(
                conf,
                "protocol bgp {host} from node {{ neighbor {addr} as {NODE_AS}; }}"
            );
        }
        let conf_path = dsr.work.join("router-bird.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = dsr.lab.command("router", "bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf_path)
            .arg("-s")
            .arg(dsr.work.join("router-bird.ctl"));
        dsr.lab.spawn("router", cmd);
        dsr.lab
            .sh("client", &format!("ip route replace {VIP}/32 via {ROUTER}"));
        let pids = vec![None; list.len()];
        Self {
            dsr,
            nodes: list,
            pids,
        }
    }

    /// Node `i`'s config: every relay at weight 1 and `[announce]` to the router.
    pub fn config(&self, i: usize) -> String {
        let (host, addr) = &self.nodes[i];
        let announce = format!(
            "[announce]\nenabled = true\nlocal_as = {NODE_AS}\nrouter_id = \"{addr}\"\n\
             hold_time = \"{}s\"\nkeepalive = \"1s\"\n\n[[announce.peers]]\naddress = \"{ROUTER}\"\nas = {ROUTER_AS}\n",
            HOLD_TIME.as_secs()
        );
        let weights = vec![1; self.dsr.relays.len()];
        self.dsr.config_on(host, &weights, &announce)
    }

    /// Starts node `i`'s daemon (which starts its bird).
    pub fn start(&mut self, i: usize) {
        let pid = self.dsr.start_lb_on(&self.nodes[i].0, &self.config(i), &[]);
        self.pids[i] = Some(pid);
    }

    /// Writes `config` as node `i`'s config file and has it reload
    /// (`ctl reload`); panics when refused.
    pub fn reload(&self, i: usize, config: &str) {
        let host = &self.nodes[i].0;
        std::fs::write(self.dsr.config_path_on(host), config).unwrap();
        self.dsr.ctl_on(host, &["reload"]);
    }

    /// SIGKILLs node `i`'s daemon: no cleanup of its own.
    pub fn kill(&mut self, i: usize) {
        let pid = self.pids[i].take().expect("node running");
        self.dsr.lab.kill(pid);
    }

    /// The addresses the router's kernel sends the VIP to (sorted; empty
    /// without a route).
    pub fn next_hops(&self) -> Vec<String> {
        let out = self.dsr.lab.run(
            "router",
            &["ip", "-j", "route", "show", &format!("{VIP}/32")],
        );
        let routes: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let mut hops: Vec<String> = routes
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| {
                r["nexthops"].as_array().map_or_else(
                    || vec![r["gateway"].clone()],
                    |n| n.iter().map(|h| h["gateway"].clone()).collect(),
                )
            })
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect();
        hops.sort();
        hops
    }

    /// The addresses of nodes `which`, sorted (as [`EcmpLab::next_hops`]).
    pub fn addrs(&self, which: &[usize]) -> Vec<String> {
        let mut a: Vec<String> = which.iter().map(|i| self.nodes[*i].1.clone()).collect();
        a.sort();
        a
    }

    /// Polls the router every 10 ms until its next hops for the VIP are
    /// exactly nodes `which`; returns how long that took, or `None` after
    /// `timeout`.
    pub fn wait_next_hops(&self, which: &[usize], timeout: Duration) -> Option<Duration> {
        let want = self.addrs(which);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.next_hops() == want {
                return Some(start.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// New flows node `i`'s data plane sent to the relays so far.
    pub fn new_flows(&self, i: usize) -> u64 {
        let stats = ctl_stats(&self.dsr.pin_dir_on(&self.nodes[i].0));
        stats["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["new_flows"].as_u64())
            .sum()
    }

    /// Node `i`'s Prometheus page (its metrics listener, inside its namespace).
    pub fn metrics(&self, i: usize) -> String {
        let out = self.dsr.lab.run(
            &self.nodes[i].0,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:9701/metrics",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
