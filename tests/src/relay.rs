//! Runs the real `smtp-lb relay` binary for a test: a config written to a
//! temporary directory (spool, delivery log and stderr live there too),
//! free ports on 127.0.0.1, kill on drop.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use smtp_lb_user::{
    admin::client::Client,
    relay::config::{Config, ListenerConfig, ListenerTls, TlsConfig, UserConfig},
};

use crate::{
    env::smtp_lb_bin,
    tmp::{ChildGuard, TempDir, free_port, self_signed_cert, wait_for},
};

/// What a test can vary; `Default` is a plain relay for 127.0.0.0/8.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Static routes: domain (or `*`) → `host:port`.
    pub routes: Vec<(String, String)>,
    /// DNS servers (`ip:port`); empty = system resolver.
    pub nameservers: Vec<String>,
    /// Port used for MX delivery.
    pub mx_port: u16,
    /// The SMTP listener's port on 127.0.0.1 (none: a free one).
    pub smtp_port: Option<u16>,
    pub retry_min: String,
    pub retry_max: String,
    pub max_age: String,
    pub relay_networks: Vec<String>,
    /// Also listen as a submission server (AUTH after STARTTLS).
    pub submission: bool,
    /// Generate a certificate and offer STARTTLS.
    pub tls: bool,
    /// Also listen with implicit TLS (port 465 style; implies `tls`).
    pub implicit_tls: bool,
    pub users: Vec<(String, String)>,
    pub max_message_size: u64,
    pub max_connections: usize,
    pub command_timeout: String,
    pub data_timeout: String,
    pub write_timeout: String,
    pub connections_per_destination: usize,
    /// `delivery.connection_idle` (none: the relay's default).
    pub connection_idle: Option<String>,
    /// Egress source address for delivery (`delivery.source_ip`).
    pub source_ip: Option<String>,
    /// Use an existing spool directory instead of a fresh one.
    pub spool_dir: Option<PathBuf>,
    /// Contents of a shaping file (written next to the config).
    pub shaping: Option<String>,
    /// TOML merged over the config (`[cluster]`, `[[dkim]]`, `[egress]`, …)
    /// for features without a field here.
    pub extra_toml: String,
    /// `SMTP_LB_LOG` (none: `info` plus the relay's `debug` lines, which
    /// tests read; a benchmark runs the production default, `info`).
    pub log_filter: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            nameservers: Vec::new(),
            mx_port: 25,
            smtp_port: None,
            retry_min: "200ms".into(),
            retry_max: "1s".into(),
            max_age: "1h".into(),
            relay_networks: vec!["127.0.0.0/8".into()],
            submission: false,
            tls: false,
            implicit_tls: false,
            users: Vec::new(),
            max_message_size: 10 * 1024 * 1024,
            max_connections: 200,
            command_timeout: "30s".into(),
            data_timeout: "30s".into(),
            write_timeout: "10s".into(),
            connections_per_destination: 8,
            connection_idle: None,
            source_ip: None,
            spool_dir: None,
            shaping: None,
            extra_toml: String::new(),
            log_filter: None,
        }
    }
}

pub struct Relay {
    pub dir: TempDir,
    pub smtp: SocketAddr,
    pub submission: Option<SocketAddr>,
    /// The implicit-TLS listener, with `implicit_tls`.
    pub implicit: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The metrics listener (`/metrics`, `/healthz`, `/readyz`, no token).
    pub metrics: SocketAddr,
    pub config_path: PathBuf,
    /// The spool directory (`RelayConfig::spool_dir` or `<dir>/spool`).
    spool: PathBuf,
    child: ChildGuard,
    starts: u32,
    log_filter: String,
}

/// A duration in the relay config's own grammar (`"200ms"`, `"1h"`).
fn duration(s: &str) -> Duration {
    humantime_serde::deserialize(toml::Value::String(s.to_owned()))
        .unwrap_or_else(|e| panic!("duration {s:?}: {e}"))
}

/// The relay config of lab host `name` (`hostname = "<name>.lab.example"`):
/// SMTP on `0.0.0.0:25` relaying for the lab network, spool in `dir/spool`,
/// admin API on loopback, retries after 1–5 s. Adjust fields, then
/// [`write_config`].
pub fn lab_config(name: &str, dir: &std::path::Path) -> Config {
    let mut c: Config =
        toml::from_str("spool_dir = \"\"\nlistener = []").expect("the relay config's defaults");
    c.hostname = format!("{name}.lab.example");
    c.spool_dir = dir.join("spool");
    c.relay_networks = vec!["198.51.100.0/24".into()];
    c.admin = Some(([127, 0, 0, 1], 8025).into());
    c.listeners.push(ListenerConfig {
        address: ([0, 0, 0, 0], 25).into(),
        submission: false,
        tls: ListenerTls::Starttls,
    });
    c.retry.min = Duration::from_secs(1);
    c.retry.max = Duration::from_secs(5);
    c
}

/// Writes `c` to `path` as the real config type serialises (no second schema).
pub fn write_config(c: &Config, path: &std::path::Path) {
    let table = toml::Table::try_from(c).expect("serialise the relay config");
    let text = toml::to_string(&table).expect("serialise the relay config");
    std::fs::write(path, text).expect("write the relay config");
}

/// `extra` over `base`, table by table (a key in both: `extra`'s wins).
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl Relay {
    pub fn start(cfg: &RelayConfig) -> Self {
        let dir = TempDir::new("relay");
        let smtp: SocketAddr = ([127, 0, 0, 1], cfg.smtp_port.unwrap_or_else(free_port)).into();
        let submission: Option<SocketAddr> =
            cfg.submission.then(|| ([127, 0, 0, 1], free_port()).into());
        let implicit: Option<SocketAddr> = cfg
            .implicit_tls
            .then(|| ([127, 0, 0, 1], free_port()).into());
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let spool = cfg.spool_dir.clone().unwrap_or_else(|| dir.join("spool"));
        let mut c: Config =
            toml::from_str("spool_dir = \"\"\nlistener = []").expect("the relay config's defaults");
        c.hostname = "relay.test".into();
        c.spool_dir.clone_from(&spool);
        c.delivery_log = Some(dir.join("delivery.log"));
        c.admin = Some(admin);
        c.metrics = Some(metrics);
        if let Some(shaping) = &cfg.shaping {
            let path = dir.join("shaping.toml");
            std::fs::write(&path, shaping).expect("write shaping file");
            c.shaping = Some(path);
        }
        c.relay_networks.clone_from(&cfg.relay_networks);
        c.listeners.push(ListenerConfig {
            address: smtp,
            submission: false,
            tls: ListenerTls::Starttls,
        });
        if let Some(address) = submission {
            c.listeners.push(ListenerConfig {
                address,
                submission: true,
                tls: ListenerTls::Starttls,
            });
        }
        if let Some(address) = implicit {
            c.listeners.push(ListenerConfig {
                address,
                submission: false,
                tls: ListenerTls::Implicit,
            });
        }
        c.users = cfg
            .users
            .iter()
            .map(|(name, password)| UserConfig {
                name: name.clone(),
                password: password.clone(),
            })
            .collect();
        if cfg.tls || cfg.implicit_tls {
            let (cert, key) = self_signed_cert(dir.path(), "relay", "relay.test");
            c.tls = Some(TlsConfig { cert, key });
        }
        c.limits.max_message_size = cfg.max_message_size;
        c.limits.max_connections = cfg.max_connections;
        c.timeouts.command = duration(&cfg.command_timeout);
        c.timeouts.data = duration(&cfg.data_timeout);
        c.timeouts.write = duration(&cfg.write_timeout);
        c.timeouts.shutdown_grace = Duration::from_secs(5);
        c.delivery.port = cfg.mx_port;
        c.delivery.connections_per_destination = cfg.connections_per_destination;
        if let Some(idle) = &cfg.connection_idle {
            c.delivery.connection_idle = duration(idle);
        }
        c.delivery.source_ip = cfg
            .source_ip
            .as_ref()
            .map(|ip| ip.parse().expect("source_ip"));
        c.delivery.timeouts.connect = Duration::from_secs(2);
        c.delivery.timeouts.greeting = Duration::from_secs(10);
        c.retry.min = duration(&cfg.retry_min);
        c.retry.max = duration(&cfg.retry_max);
        c.retry.max_age = duration(&cfg.max_age);
        c.dns.nameservers.clone_from(&cfg.nameservers);
        c.dns.timeout = Some(Duration::from_secs(2));
        c.routes = cfg.routes.iter().cloned().collect();
        let mut table = toml::Table::try_from(&c).expect("serialise the relay config");
        let extra: toml::Table = toml::from_str(&cfg.extra_toml).expect("extra_toml is TOML");
        merge(&mut table, extra);
        let t = toml::to_string(&table).expect("write the relay config");
        let config_path = dir.join("relay.toml");
        std::fs::write(&config_path, t).expect("write relay config");
        let mut relay = Self {
            dir,
            smtp,
            submission,
            implicit,
            admin,
            metrics,
            config_path,
            spool,
            child: ChildGuard(None),
            starts: 0,
            log_filter: cfg
                .log_filter
                .clone()
                .unwrap_or_else(|| "info,smtp_lb_user::relay=debug".to_owned()),
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stderr.log"))
            .expect("open relay stderr log");
        let child = Command::new(smtp_lb_bin())
            .args(["relay", "--config"])
            .arg(&self.config_path)
            .env("SMTP_LB_LOG", &self.log_filter)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawn {} relay: {e} (build it: cargo build --release -p smtp-lb-user)",
                    smtp_lb_bin().display()
                )
            });
        self.child = ChildGuard(Some(child));
        // Up to 20 s: a loaded CI machine starts processes slowly. A relay
        // that does not come up says why in its stderr.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for addr in [self.smtp, self.admin] {
            while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the relay is not listening on {addr} after 20s; its stderr:\n{}",
                    self.stderr()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The relay notices the probe above closing a moment later; until then
        // it holds a connection slot a test with tight limits would miss.
        // (Best effort: a test's own clients may already be connecting.)
        let settle = std::time::Instant::now() + Duration::from_secs(5);
        while self.metric("smtp_lb_relay_ingress_connections_open") > 0
            && std::time::Instant::now() < settle
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        self.child.kill();
    }

    /// Starts the same configuration again (same spool, same ports).
    pub fn restart(&mut self) {
        self.child.kill();
        self.spawn();
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.0.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(
                libc::pid_t::try_from(c.id()).expect("pid fits pid_t"),
                libc::SIGTERM,
            )
        };
        c.wait().is_ok_and(|s| s.success())
    }

    /// The relay's stderr (tracing output) so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Waits until the delivery log has `n` lines with `status`; returns how many.
    pub fn wait_log_count(&self, status: &str, n: usize, timeout: Duration) -> usize {
        wait_for(
            &format!("{n} {status} in the delivery log"),
            timeout,
            || {
                let c = self.log().iter().filter(|l| l["status"] == status).count();
                (c >= n).then_some(c)
            },
        )
    }

    /// Waits until the relay's stderr contains `text`.
    pub fn wait_stderr(&self, text: &str, timeout: Duration) {
        wait_for(&format!("{text:?} in the relay's stderr"), timeout, || {
            self.stderr().contains(text).then_some(())
        });
    }

    /// Every delivery-log line so far.
    pub fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("delivery.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the delivery log has a line matching `f`, and returns it.
    pub fn wait_log(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, timeout, || self.log().into_iter().find(|v| f(v)))
    }

    /// One request to the admin API, with the relay's token: (status, body).
    pub fn admin(&self, method: &str, path: &str) -> (u16, String) {
        let client = Client::with_token_file(self.admin, &self.admin_token_file())
            .expect("the relay wrote its admin token");
        let a = client
            .raw(method, path, None)
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        (a.status, a.body)
    }

    /// The token file the relay created (`<spool_dir>/admin.token`).
    pub fn admin_token_file(&self) -> PathBuf {
        self.spool_dir().join("admin.token")
    }

    /// The value of an unlabelled metric, or of a labelled one given as
    /// `name{labels}`; 0 when the page does not have it.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.admin("GET", "/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.spool.clone()
    }
}
