//! Runs the real `smtp-lb relay` binary for a test: a config written to a
//! temporary directory (spool, delivery log and stderr live there too),
//! free ports on 127.0.0.1, kill on drop.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use smtp_lb_user::admin::client::Client;

use crate::{
    env::smtp_lb_bin,
    tmp::{ChildGuard, TempDir, free_port, wait_for, wait_listening},
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
    pub retry_min: String,
    pub retry_max: String,
    pub max_age: String,
    pub relay_networks: Vec<String>,
    /// Also listen as a submission server (AUTH after STARTTLS).
    pub submission: bool,
    /// Generate a certificate and offer STARTTLS.
    pub tls: bool,
    pub users: Vec<(String, String)>,
    pub max_message_size: u64,
    pub max_connections: usize,
    pub command_timeout: String,
    pub data_timeout: String,
    pub write_timeout: String,
    pub connections_per_destination: usize,
    /// Egress source address for delivery (`delivery.source_ip`).
    pub source_ip: Option<String>,
    /// Use an existing spool directory instead of a fresh one.
    pub spool_dir: Option<PathBuf>,
    /// Contents of a shaping file (written next to the config).
    pub shaping: Option<String>,
    /// Raw TOML tables appended to the end of the config (`[cluster]`,
    /// `[[dkim]]`, `[egress]`, …) for features without a field here.
    pub extra_toml: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            nameservers: Vec::new(),
            mx_port: 25,
            retry_min: "200ms".into(),
            retry_max: "1s".into(),
            max_age: "1h".into(),
            relay_networks: vec!["127.0.0.0/8".into()],
            submission: false,
            tls: false,
            users: Vec::new(),
            max_message_size: 10 * 1024 * 1024,
            max_connections: 200,
            command_timeout: "30s".into(),
            data_timeout: "30s".into(),
            write_timeout: "10s".into(),
            connections_per_destination: 8,
            source_ip: None,
            spool_dir: None,
            shaping: None,
            extra_toml: String::new(),
        }
    }
}

pub struct Relay {
    pub dir: TempDir,
    pub smtp: SocketAddr,
    pub submission: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The metrics listener (`/metrics`, `/healthz`, `/readyz`, no token).
    pub metrics: SocketAddr,
    pub config_path: PathBuf,
    child: ChildGuard,
    starts: u32,
}

fn q(s: &str) -> String {
    format!("{s:?}")
}

impl Relay {
    pub fn start(cfg: &RelayConfig) -> Self {
        let dir = TempDir::new("relay");
        let smtp: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let submission: Option<SocketAddr> =
            cfg.submission.then(|| ([127, 0, 0, 1], free_port()).into());
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let spool = cfg.spool_dir.clone().unwrap_or_else(|| dir.join("spool"));
        let mut t = String::new();
        let _ = writeln!(t, "hostname = \"relay.test\"");
        let _ = writeln!(t, "spool_dir = {}", q(&spool.display().to_string()));
        let _ = writeln!(
            t,
            "delivery_log = {}",
            q(&dir.join("delivery.log").display().to_string())
        );
        let _ = writeln!(t, "admin = \"{admin}\"");
        let _ = writeln!(t, "metrics = \"{metrics}\"");
        if let Some(shaping) = &cfg.shaping {
            let path = dir.join("shaping.toml");
            std::fs::write(&path, shaping).expect("write shaping file");
            let _ = writeln!(t, "shaping = {}", q(&path.display().to_string()));
        }
        let nets: Vec<String> = cfg.relay_networks.iter().map(|n| q(n)).collect();
        let _ = writeln!(t, "relay_networks = [{}]", nets.join(", "));
        let _ = writeln!(t, "[[listener]]\naddress = \"{smtp}\"");
        if let Some(s) = submission {
            let _ = writeln!(t, "[[listener]]\naddress = \"{s}\"\nsubmission = true");
        }
        for (name, password) in &cfg.users {
            let _ = writeln!(
                t,
                "[[user]]\nname = {}\npassword = {}",
                q(name),
                q(password)
            );
        }
        if cfg.tls {
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            let ok = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                ])
                .args(["-days", "1", "-subj", "/CN=relay.test", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stderr(Stdio::null())
                .status()
                .expect("run openssl");
            assert!(ok.success(), "openssl req failed");
            let _ = writeln!(
                t,
                "[tls]\ncert = {}\nkey = {}",
                q(&cert.display().to_string()),
                q(&key.display().to_string())
            );
        }
        let _ = writeln!(
            t,
            "[limits]\nmax_message_size = {}\nmax_connections = {}",
            cfg.max_message_size, cfg.max_connections
        );
        let _ = writeln!(
            t,
            "[timeouts]\ncommand = {}\ndata = {}\nwrite = {}\nshutdown_grace = \"5s\"",
            q(&cfg.command_timeout),
            q(&cfg.data_timeout),
            q(&cfg.write_timeout)
        );
        let _ = writeln!(
            t,
            "[delivery]\nport = {}\nconnections_per_destination = {}",
            cfg.mx_port, cfg.connections_per_destination
        );
        if let Some(ip) = &cfg.source_ip {
            let _ = writeln!(t, "source_ip = {}", q(ip));
        }
        let _ = writeln!(
            t,
            "[delivery.timeouts]\nconnect = \"2s\"\ngreeting = \"10s\""
        );
        let _ = writeln!(
            t,
            "[retry]\nmin = {}\nmax = {}\nmax_age = {}",
            q(&cfg.retry_min),
            q(&cfg.retry_max),
            q(&cfg.max_age)
        );
        let ns: Vec<String> = cfg.nameservers.iter().map(|n| q(n)).collect();
        let _ = writeln!(
            t,
            "[dns]\nnameservers = [{}]\ntimeout = \"2s\"",
            ns.join(", ")
        );
        let _ = writeln!(t, "[routes]");
        for (d, hop) in &cfg.routes {
            let _ = writeln!(t, "{} = {}", q(d), q(hop));
        }
        t.push_str(&cfg.extra_toml);
        let config_path = dir.join("relay.toml");
        std::fs::write(&config_path, t).expect("write relay config");
        let mut relay = Self {
            dir,
            smtp,
            submission,
            admin,
            metrics,
            config_path,
            child: ChildGuard(None),
            starts: 0,
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
            .env("SMTP_LB_LOG", "info,smtp_lb_user::relay=debug")
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
        wait_listening(self.smtp, Duration::from_secs(10));
        wait_listening(self.admin, Duration::from_secs(10));
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
        self.dir.join("spool")
    }
}
