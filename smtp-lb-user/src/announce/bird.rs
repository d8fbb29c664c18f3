//! bird 2 as the balancer's child: its configuration, the process (started
//! and restarted by a supervisor thread, stopped with the daemon), and its
//! control socket.
//!
//! The VIPs are one static protocol per address family (`vip4`, `vip6`)
//! holding `VIP/32 blackhole` (never exported to the kernel: bird here has
//! no kernel protocol), exported to each peer over BGP. Announcing is
//! `enable vip4`, withdrawing `disable vip4`, on a private control socket.
//!
//! bird gets `PR_SET_PDEATHSIG = SIGTERM`: when the daemon dies, even by
//! SIGKILL, the kernel sends bird SIGTERM and bird closes its sessions with
//! a BGP Cease, so routers withdraw the node's routes at once instead of
//! after the hold time. The death signal follows the *thread* that forked
//! the child, so bird is always started from the supervisor thread, which
//! lives as long as the announcer.
use std::{
    fmt::Write as _,
    io,
    net::IpAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};
use tracing::{error, info};

use super::AnnounceConfig;

/// Time for one control-socket exchange: connect, greeting, command, reply.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest reply read from bird (a `show protocols` of many peers).
const MAX_REPLY: usize = 64 * 1024;
/// Pause before restarting a bird that exited on its own.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How long bird gets to close its sessions on stop before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The static protocol holding the VIPs of one address family.
pub fn static_name(v4: bool) -> &'static str {
    if v4 { "vip4" } else { "vip6" }
}

/// bird's configuration for announcing `vips`; the static protocols start
/// enabled only when `announce`.
pub fn render(cfg: &AnnounceConfig, vips: &[IpAddr], announce: bool) -> String {
    let mut out = String::from(
        "# Written by `smtp-lb lb` from [announce] in its config; rewritten at every\n\
         # start and reload: edit lb.toml, not this file.\n\
         log stderr { info, remote, warning, error, auth, fatal, bug };\n",
    );
    if let Some(id) = cfg.router_id {
        let _ = writeln!(out, "router id {id};");
    }
    out += "protocol device { scan time 10; }\n";
    for v4 in [true, false] {
        let family: Vec<&IpAddr> = vips.iter().filter(|v| v.is_ipv4() == v4).collect();
        if family.is_empty() {
            continue;
        }
        let (name, channel, len) = (
            static_name(v4),
            if v4 { "ipv4" } else { "ipv6" },
            if v4 { 32 } else { 128 },
        );
        let _ = writeln!(out, "protocol static {name} {{");
        if !announce {
            out += "  disabled;\n";
        }
        let _ = writeln!(out, "  {channel};");
        for vip in family {
            let _ = writeln!(out, "  route {vip}/{len} blackhole;");
        }
        out += "}\n";
    }
    for (i, p) in cfg.peers.iter().enumerate() {
        let v4 = p.address.is_ipv4();
        let channel = if v4 { "ipv4" } else { "ipv6" };
        let _ = write!(
            out,
            "protocol bgp peer{i} {{\n  local as {};\n  neighbor {} as {};\n  \
             hold time {};\n  keepalive time {};\n  connect retry time 1;\n  \
             # A crashed node's routes must go at once, not stay as stale routes.\n  \
             graceful restart off;\n  {channel} {{ import none; export where proto = \"{}\"; }};\n}}\n",
            cfg.local_as,
            p.address,
            p.asn,
            cfg.hold_time.as_secs(),
            cfg.keepalive.as_secs(),
            static_name(v4),
        );
    }
    out
}

/// Why a control-socket exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("bird's control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bird did not answer on {} within {CONTROL_TIMEOUT:?}", path.display())]
    Timeout { path: PathBuf },
    #[error("bird refused `{command}`: {reply}")]
    Refused { command: String, reply: String },
    #[error("bird's reply was longer than {MAX_REPLY} bytes or not text")]
    Garbled,
}

/// The last line of a reply: four digits and a space (`0011 vip4: enabled`);
/// continuation lines have a `-` or start with a space.
fn reply_code(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    (b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b' ').then(|| &line[..4])
}

/// Reads one reply; `Ok((code, text))`.
async fn read_reply(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<(String, String), ControlError> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .await
            .map_err(|_| ControlError::Garbled)?;
        if n == 0 || text.len() + line.len() > MAX_REPLY {
            return Err(ControlError::Garbled);
        }
        text += &line;
        if let Some(code) = reply_code(&line) {
            return Ok((code.to_owned(), text.trim_end().to_owned()));
        }
    }
}

/// Sends one command on bird's control socket and returns its reply; a
/// reply code 8xxx/9xxx (runtime or syntax error) is an error.
pub async fn control(socket: &Path, command: &str) -> Result<String, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_owned(),
        source,
    };
    let exchange = async {
        let stream = UnixStream::connect(socket).await.map_err(io)?;
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        read_reply(&mut r).await?; // "0001 BIRD 2.0.12 ready."
        w.write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        let (code, text) = read_reply(&mut r).await?;
        if code.starts_with('8') || code.starts_with('9') {
            return Err(ControlError::Refused {
                command: command.to_owned(),
                reply: text,
            });
        }
        Ok(text)
    };
    tokio::time::timeout(CONTROL_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ControlError::Timeout {
                path: socket.to_owned(),
            })
        })
}

/// Where bird's files live: `<state_dir>/bird/{bird.conf,bird.ctl}`.
#[derive(Clone, Debug)]
pub struct Paths {
    pub conf: PathBuf,
    pub socket: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("bird");
        Self {
            conf: dir.join("bird.conf"),
            socket: dir.join("bird.ctl"),
        }
    }

    /// Writes `text` as bird's configuration and has bird parse it
    /// (`bird -p`), so a config bird refuses is an error here, not a dead child.
    pub fn write_conf(&self, bird: &Path, text: &str) -> anyhow::Result<()> {
        let dir = self.conf.parent().expect("conf is in a directory");
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(&self.conf, text)
            .with_context(|| format!("write {}", self.conf.display()))?;
        let out = Command::new(bird)
            .arg("-p")
            .arg("-c")
            .arg(&self.conf)
            .output()
            .with_context(|| {
                format!(
                    "run {} (announce.bird; Debian package bird2)",
                    bird.display()
                )
            })?;
        if !out.status.success() {
            bail!(
                "bird refused {}: {}",
                self.conf.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// The supervisor of the bird child.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts bird (`-f`: foreground, our child) on `paths`, and restarts it
    /// after [`RESTART_DELAY`] whenever it exits while the supervisor runs.
    pub fn start(bird: PathBuf, paths: Paths, restarts: Counter) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicI32::new(0));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, pid) = (stop.clone(), pid.clone());
            thread::Builder::new()
                .name("bird-supervisor".into())
                .spawn(move || supervise(&bird, &paths, &stop, &pid, &restarts, &started_tx))
                .context("start the bird supervisor thread")?
        };
        // The first start's error is the caller's.
        match started_rx.recv() {
            Ok(Ok(child)) => info!(pid = child, "bird started"),
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => bail!("the bird supervisor thread ended"),
        }
        Ok(Self {
            stop,
            pid,
            thread: Some(thread),
        })
    }

    /// Stops bird (SIGTERM: it closes its sessions with a Cease; SIGKILL
    /// after [`STOP_GRACE`]) and the supervisor.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let pid = self.pid.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + STOP_GRACE;
        while !thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if !thread.is_finished() && pid > 0 {
            error!(pid, "bird did not stop within {STOP_GRACE:?}; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = thread.join();
        info!("bird stopped");
    }
}

fn supervise(
    bird: &Path,
    paths: &Paths,
    stop: &AtomicBool,
    pid: &AtomicI32,
    restarts: &Counter,
    started: &std::sync::mpsc::Sender<anyhow::Result<u32>>,
) {
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        let _ = std::fs::remove_file(&paths.socket);
        let parent = std::process::id().cast_signed();
        let mut cmd = Command::new(bird);
        cmd.arg("-f")
            .arg("-c")
            .arg(&paths.conf)
            .arg("-s")
            .arg(&paths.socket)
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Its own process group: a Ctrl-C meant for the daemon must
                // not reach bird before the daemon withdraws.
                libc::setpgid(0, 0);
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The daemon died between fork and prctl: nobody would
                // send the death signal.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!(
                    "start {} (announce.bird; Debian package bird2)",
                    bird.display()
                ));
                if first {
                    let _ = started.send(Err(e));
                    return;
                }
                error!(error = %format!("{e:#}"), "cannot restart bird; retrying");
                thread::sleep(RESTART_DELAY);
                continue;
            }
        };
        pid.store(child.id().cast_signed(), Ordering::SeqCst);
        if first {
            // Ready when its control socket is: the announcer talks to it next.
            let deadline = Instant::now() + STOP_GRACE;
            while std::os::unix::net::UnixStream::connect(&paths.socket).is_err()
                && Instant::now() < deadline
            {
                if let Ok(Some(status)) = child.try_wait() {
                    let _ = started.send(Err(anyhow::anyhow!(
                        "{} exited at start ({status}); its log is on stderr",
                        bird.display()
                    )));
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = started.send(Ok(child.id()));
            first = false;
        }
        let status = child.wait();
        pid.store(0, Ordering::SeqCst);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        restarts.inc();
        error!(status = ?status, "bird exited; the VIPs are withdrawn until it is back; restarting it");
        thread::sleep(RESTART_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announce::Peer;

    #[test]
    fn reply_lines_end_at_four_digits_and_a_space() {
        assert_eq!(reply_code("0001 BIRD 2.0.12 ready.\n"), Some("0001"));
        assert_eq!(reply_code("0011 vip4: enabled\n"), Some("0011"));
        assert_eq!(reply_code("2002-Name       Proto\n"), None);
        assert_eq!(reply_code(" continued\n"), None);
        assert_eq!(reply_code("8003 No such protocol\n"), Some("8003"));
    }

    #[test]
    fn config_announces_each_family_to_its_peers_and_starts_withdrawn() {
        let cfg = AnnounceConfig {
            enabled: true,
            local_as: 64513,
            router_id: Some("198.51.100.2".parse().unwrap()),
            peers: vec![
                Peer {
                    address: "198.51.100.254".parse().unwrap(),
                    asn: 64512,
                },
                Peer {
                    address: "2001:db8::fe".parse().unwrap(),
                    asn: 64512,
                },
            ],
            ..AnnounceConfig::default()
        };
        let vips = [
            "203.0.113.10".parse().unwrap(),
            "2001:db8:5::10".parse().unwrap(),
        ];
        let text = render(&cfg, &vips, false);
        assert!(text.contains("router id 198.51.100.2;"));
        assert!(text.contains(
            "protocol static vip4 {\n  disabled;\n  ipv4;\n  route 203.0.113.10/32 blackhole;"
        ));
        assert!(text.contains("route 2001:db8:5::10/128 blackhole;"));
        assert!(text.contains("neighbor 198.51.100.254 as 64512;"));
        assert!(text.contains("hold time 3;"));
        assert!(text.contains("graceful restart off;"));
        assert!(text.contains("ipv4 { import none; export where proto = \"vip4\"; };"));
        assert!(text.contains("ipv6 { import none; export where proto = \"vip6\"; };"));
        assert!(!render(&cfg, &vips, true).contains("disabled"));
    }
}
