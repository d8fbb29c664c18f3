//! The lab as an operator's monitoring sees it: the balancer and three
//! `smtp-lb relay`s serving their metrics listeners on lab addresses, three
//! ISP MX hosts (Postfix `smtp-sink`, reached by static routes), and a real
//! Prometheus (Debian's) on a lab host of its own, scraping only those
//! addresses every second, its storage in the lab's scratch directory.
//! Everything lives in the lab's namespaces and goes with them.
//!
//! ```text
//! client .1 ── lb .2 (XDP, metrics :9701) ── relay1-3 .11-.13 (metrics :9702) ── gmail .21 outlook .22 yahoo .23
//!                                   prometheus .60 (:9090) scrapes lb and relays
//! ```
use std::{
    process::{Child, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    env, relay,
    topology::{DsrLab, wait_for},
};

/// Relay weights: 2:1:1.
pub const WEIGHTS: [u32; 3] = [2, 1, 1];
/// (recipient domain, its MX's lab address).
pub const ISPS: [(&str, &str); 3] = [
    ("gmail.com", "198.51.100.21"),
    ("outlook.com", "198.51.100.22"),
    ("yahoo.com", "198.51.100.23"),
];
/// The balancer's metrics listener (and dashboard).
pub const LB_METRICS: &str = "198.51.100.2:9701";
const RELAY_METRICS_PORT: u16 = 9702;
const PROMETHEUS: &str = "198.51.100.60:9090";

pub struct MonitoredLab {
    pub dsr: DsrLab,
    /// Each relay's `smtp-lb relay` process.
    relays: Vec<u32>,
    prometheus: bool,
}

/// A relay's metrics listener.
pub fn relay_metrics(addr: &str) -> String {
    format!("{addr}:{RELAY_METRICS_PORT}")
}

impl MonitoredLab {
    /// ISPs, relays and the balancer, all running; no traffic yet.
    pub fn start() -> Self {
        let mut dsr = DsrLab::bare(3);
        let mut routes = std::collections::HashMap::new();
        for (domain, addr) in ISPS {
            let isp = isp_name(domain);
            dsr.lab.host(&format!("{isp}-mx"), &[&format!("{addr}/24")]);
            let dir = dsr.work.join(format!("{isp}-mx"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap();
            let mut sink = dsr.lab.command(&format!("{isp}-mx"), "smtp-sink");
            sink.args(["-u", "nobody", "-d"])
                .arg(dir.join("m"))
                .args(["0.0.0.0:25", "1024"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            dsr.lab.spawn(&format!("{isp}-mx"), sink);
            routes.insert(domain.to_owned(), format!("{addr}:25"));
        }
        let mut relays = Vec::new();
        for r in &dsr.relays {
            let dir = dsr.work.join(&r.name);
            std::fs::create_dir_all(&dir).unwrap();
            let mut cfg = relay::lab_config(&r.name, &dir);
            cfg.metrics = Some(relay_metrics(&r.addr).parse().expect("a socket address"));
            cfg.routes.clone_from(&routes);
            let path = dir.join("relay.toml");
            relay::write_config(&cfg, &path);
            let mut relay = dsr.lab.command(&r.name, env::smtp_lb_bin());
            relay
                .arg("relay")
                .arg("--config")
                .arg(&path)
                .env("SMTP_LB_LOG", "warn");
            relays.push(dsr.lab.spawn(&r.name, relay));
        }
        let this = Self {
            dsr,
            relays,
            prometheus: false,
        };
        for r in &this.dsr.relays {
            let url = format!("http://{}/readyz", relay_metrics(&r.addr));
            wait_for(
                &format!("{}'s /readyz", r.name),
                Duration::from_secs(30),
                || this.get(&r.name, &url).0 == 200,
            );
        }
        let relay_metrics: Vec<String> = this
            .dsr
            .relays
            .iter()
            .map(|r| format!("{:?}", relay_metrics(&r.addr)))
            .collect();
        let config = this.dsr.config(
            &WEIGHTS,
            &format!(
                "[metrics]\nlisten = \"{LB_METRICS}\"\n\n[dashboard]\nrelay_metrics = [{}]\n",
                relay_metrics.join(", ")
            ),
        );
        let mut this = this;
        this.dsr.start_lb(&config, &[]);
        // Ready: attached and at least one relay up; wait for all three.
        wait_for(
            "every relay up at the balancer",
            Duration::from_secs(30),
            || {
                this.dsr
                    .ctl(&["backends"])
                    .as_array()
                    .is_some_and(|b| b.len() == 3 && b.iter().all(|r| r["health"] == "up"))
            },
        );
        this
    }

    /// Starts Prometheus on its own lab host, scraping the balancer and the
    /// relays every second, with the shipped alert rules loaded.
    pub fn start_prometheus(&mut self) {
        let dir = self.dsr.work.join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let relays: Vec<String> = self
            .dsr
            .relays
            .iter()
            .map(|r| format!("{:?}", relay_metrics(&r.addr)))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: smtp-lb-balancer\n    static_configs:\n      - targets: [{LB_METRICS:?}]\n\
             \x20 - job_name: smtp-lb-relay\n    static_configs:\n      - targets: [{}]\n",
            relays.join(", "),
            rules = env::deploy("prometheus/smtp-lb.rules.yml")
                .display()
                .to_string(),
        );
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, config).unwrap();
        let host = "prometheus";
        let address = PROMETHEUS.split(':').next().unwrap();
        self.dsr.lab.host(host, &[&format!("{address}/24")]);
        let mut cmd = self.dsr.lab.command(host, "prometheus");
        cmd.arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log file"),
            );
        self.dsr.lab.spawn(host, cmd);
        self.prometheus = true;
        wait_for("Prometheus ready", Duration::from_mins(1), || {
            self.get("prometheus", &format!("http://{PROMETHEUS}/-/ready"))
                .0
                == 200
        });
    }

    /// Kills relay `i`'s `smtp-lb relay` (SIGKILL: a crash).
    pub fn kill_relay(&mut self, i: usize) {
        self.dsr.lab.stop(self.relays[i], Duration::ZERO);
    }

    /// `GET url` from inside `host` (curl): (status, body); status 0 when
    /// nothing answered.
    pub fn get(&self, host: &str, url: &str) -> (u16, String) {
        let out = self.dsr.lab.try_run(
            host,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                url,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// A `PromQL` instant query through Prometheus' HTTP API: each series'
    /// labels and value.
    pub fn query(&self, expr: &str) -> Result<Vec<(Value, f64)>, String> {
        assert!(self.prometheus, "start_prometheus first");
        let out = self.dsr.lab.try_run(
            "prometheus",
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-G",
                &format!("http://{PROMETHEUS}/api/v1/query"),
                "--data-urlencode",
                &format!("query={expr}"),
            ],
        );
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "{expr}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        if v["status"] != "success" {
            return Err(format!("{expr}: {}", v["error"]));
        }
        Ok(v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), value)
            })
            .collect())
    }

    /// Prometheus' view of its targets (`/api/v1/targets`).
    pub fn targets(&self) -> Value {
        let (_, body) = self.get("prometheus", &format!("http://{PROMETHEUS}/api/v1/targets"));
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// Starts `per_isp` SMTP sessions to each ISP's domain through the VIP,
    /// `parallel` at a time per ISP; returns the running clients.
    pub fn send(&self, per_isp: usize, parallel: usize) -> Vec<Child> {
        ISPS.iter()
            .map(|(domain, _)| {
                let mut cmd = self
                    .dsr
                    .smtp_source(per_isp, parallel, &format!("user@{domain}"));
                cmd.stdout(Stdio::null()).stderr(Stdio::piped());
                cmd.spawn().expect("start smtp-source")
            })
            .collect()
    }

    /// Messages each ISP's MX received, by [`ISPS`] order.
    pub fn received(&self) -> Vec<usize> {
        ISPS.iter()
            .map(|(d, _)| {
                std::fs::read_dir(self.dsr.work.join(format!("{}-mx", isp_name(d))))
                    .map_or(0, Iterator::count)
            })
            .collect()
    }
}

fn isp_name(domain: &str) -> &str {
    domain.split('.').next().unwrap_or(domain)
}
