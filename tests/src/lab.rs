//! A lab of network namespaces: every host is its own namespace with one
//! veth (`eth0`) plugged into a bridge that lives in a "switch" namespace.
//!
//! Nothing is created in the root namespace except the pin directory under
//! `/sys/fs/bpf`, so no lab traffic can leave the machine. Everything is torn
//! down when the [`Lab`] drops, including while a test panics; namespaces
//! left by a run that was killed (its pid is gone) are removed by the next
//! [`Lab::new`]. Names carry the creating pid and a counter, so labs in
//! parallel tests never collide.
//!
//! ```no_run
//! use smtp_lb_tests::lab::Lab;
//! let mut lab = Lab::new();
//! lab.host("client", &["198.51.100.1/24"]);
//! lab.host("relay", &["198.51.100.3/24"]);
//! lab.run("client", &["ping", "-c1", "198.51.100.3"]);
//! ```
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::env::require_root;

/// Prefix of every lab namespace and pin directory: `slb-<pid>-<n>-…`.
pub const PREFIX: &str = "slb-";

const BPFFS: &str = "/sys/fs/bpf";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// One host of the lab.
#[derive(Clone, Debug)]
pub struct Host {
    /// The host's name in the lab ("client", "lb", "relay1", …).
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// The addresses given on `eth0`, without prefix length.
    pub addrs: Vec<String>,
    /// `eth0`'s MAC address.
    pub mac: [u8; 6],
    /// The bridge port (in [`Lab::switch_netns`]) `eth0` is plugged into:
    /// where a pass-through XDP program goes so native `XDP_TX` frames from
    /// this host are received.
    pub port: String,
}

/// A running lab. Dropping it removes everything it created.
pub struct Lab {
    id: String,
    switch: String,
    hosts: BTreeMap<String, Host>,
    children: Mutex<Vec<(String, Child)>>,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// Creates the switch namespace with its bridge, after removing what
    /// killed runs left behind.
    pub fn new() -> Self {
        require_root();
        remove_stale();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{id}-sw");
        let lab = Self {
            id,
            switch,
            hosts: BTreeMap::new(),
            children: Mutex::new(Vec::new()),
        };
        ip(&["netns", "add", &lab.switch]);
        run_in(&lab.switch, &["ip", "link", "set", "lo", "up"]);
        // A switch, not a firewall: with `br_netfilter` (built into many
        // kernels) every bridged IP frame would also pass the namespace's
        // netfilter hooks, at a cost per crossing that no real switch adds.
        run_in(
            &lab.switch,
            &[
                "sh",
                "-c",
                "for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ -e \"$f\" ] && echo 0 > \"$f\"; done; true",
            ],
        );
        run_in(&lab.switch, &["ip", "link", "add", "br0", "type", "bridge"]);
        run_in(&lab.switch, &["ip", "link", "set", "br0", "up"]);
        lab
    }

    /// This lab's unique id (also the prefix of its namespaces).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The switch namespace (holds the bridge and every host's peer port).
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }

    /// Runs `args` in the switch namespace, keeping the root mount namespace
    /// (so bpffs pins are visible); panics when it fails.
    pub fn run_on_switch(&self, args: &[&str]) -> Output {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.switch))
            .arg("--")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("start {args:?} on the switch: {e}"));
        assert!(
            out.status.success(),
            "{args:?} on the switch failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    /// Names of every namespace this lab created.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.switch.clone())
            .chain(self.hosts.values().map(|h| h.netns.clone()))
            .collect()
    }

    /// Adds a host with `eth0` on the bridge and the given addresses
    /// (CIDR, IPv4 or IPv6). TX checksum offload is turned off on `eth0`:
    /// with native XDP on veth, frames forwarded by `XDP_TX` would otherwise
    /// carry TCP checksums that were never filled in.
    pub fn host(&mut self, name: &str, addrs: &[&str]) -> &Host {
        assert!(
            !self.hosts.contains_key(name),
            "host `{name}` already exists"
        );
        let netns = format!("{}-{name}", self.id);
        let port = format!("p{}", self.hosts.len());
        ip(&["netns", "add", &netns]);
        run_in(&netns, &["ip", "link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            "name",
            "eth0",
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.switch,
        ]);
        run_in(
            &self.switch,
            &["ip", "link", "set", &port, "master", "br0", "up"],
        );
        // No duplicate address detection: IPv6 addresses are usable at once.
        run_in(
            &netns,
            &[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        );
        for addr in addrs {
            let mut args = vec!["ip", "addr", "add", addr, "dev", "eth0"];
            if addr.contains(':') {
                args.push("nodad");
            }
            run_in(&netns, &args);
        }
        run_in(&netns, &["ip", "link", "set", "eth0", "up"]);
        run_in(&netns, &["ethtool", "-K", "eth0", "tx", "off"]);
        let mac = read_mac(&run_in(&netns, &["cat", "/sys/class/net/eth0/address"]));
        let addrs = addrs
            .iter()
            .map(|a| a.split('/').next().unwrap().to_owned())
            .collect();
        self.hosts.insert(
            name.to_owned(),
            Host {
                name: name.to_owned(),
                netns,
                addrs,
                mac,
                port,
            },
        );
        &self.hosts[name]
    }

    /// The host called `name`.
    pub fn get(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("no host `{name}` in the lab"))
    }

    /// A command that runs inside `host`'s network namespace. It keeps the
    /// root mount namespace (`nsenter --net`), so bpffs pins under
    /// `/sys/fs/bpf` are the machine's own.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.get(host).netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `args` in `host` and returns its output; panics with the
    /// command's stderr when it fails.
    pub fn run(&self, host: &str, args: &[&str]) -> Output {
        let netns = self.get(host).netns.clone();
        run_in(&netns, args)
    }

    /// Runs a shell script in `host`.
    pub fn sh(&self, host: &str, script: &str) -> Output {
        self.run(host, &["sh", "-c", script])
    }

    /// Like [`Lab::run`] but returns the output whatever the exit status.
    pub fn try_run(&self, host: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(host, args[0]);
        cmd.args(&args[1..]);
        cmd.output()
            .unwrap_or_else(|e| panic!("start {args:?}: {e}"))
    }

    /// Starts a long-running process in `host`; it is stopped (SIGTERM, then
    /// SIGKILL) when the lab drops. Returns its pid.
    pub fn spawn(&self, host: &str, mut cmd: Command) -> u32 {
        let _ = host;
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?} in {host}: {e}"));
        let pid = child.id();
        self.children
            .lock()
            .unwrap()
            .push((format!("{cmd:?}"), child));
        pid
    }

    /// Stops the spawned process `pid` with SIGTERM and waits for it (up to
    /// `grace`, then SIGKILL). Returns whether it exited on its own.
    pub fn stop(&self, pid: u32, grace: Duration) -> bool {
        let mut children = self.children.lock().unwrap();
        let Some(at) = children.iter().position(|(_, c)| c.id() == pid) else {
            return false;
        };
        let (_, mut child) = children.remove(at);
        drop(children);
        terminate(&mut child, grace)
    }

    /// Kills the spawned process `pid` with SIGKILL (a crash: no cleanup of
    /// its own) and reaps it.
    pub fn kill(&self, pid: u32) {
        signal(pid, libc::SIGKILL);
        self.stop(pid, Duration::from_secs(5));
    }

    /// A directory for this lab's files (sink dumps, configs, spools);
    /// created on first use, removed on drop.
    pub fn scratch_dir(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(&self.id);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        dir
    }

    /// Runs `f` on a thread inside `host`'s network namespace (`setns`
    /// changes only the calling thread), for tests that open sockets there.
    pub fn in_netns<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/var/run/netns/{}", self.get(host).netns);
        thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: valid fd; affects this thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The bpffs directory this lab pins into, created on first use (with
    /// bpffs mounted on `/sys/fs/bpf` when a fresh machine has none, as
    /// `smtp-lb lb` does); removed on drop.
    pub fn pin_dir(&self) -> PathBuf {
        let dir = Path::new(BPFFS).join(&self.id);
        smtp_lb_user::dataplane::ensure_bpffs(&dir)
            .unwrap_or_else(|e| panic!("prepare the lab's pin dir {}: {e}", dir.display()));
        dir
    }
}

fn run_in(netns: &str, args: &[&str]) -> Output {
    {
        let out = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("start {args:?} in {netns}: {e}"));
        assert!(
            out.status.success(),
            "{args:?} in {netns} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let children = std::mem::take(
            &mut *self
                .children
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (_, mut child) in children {
            terminate(&mut child, Duration::from_secs(3));
        }
        for ns in self.namespaces() {
            delete_netns(&ns);
        }
        let _ = std::fs::remove_dir_all(Path::new(BPFFS).join(&self.id));
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.id));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. True if it exited by itself.
fn terminate(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Sends `sig` to `pid` (one of our own processes).
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we own; failure (already gone) is harmless.
    unsafe {
        libc::kill(pid.cast_signed(), sig);
    }
}

/// Kills whatever still runs in `netns`, then deletes it (which destroys
/// its veth, and with it the peer on the bridge).
fn delete_netns(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
        {
            signal(pid, libc::SIGKILL);
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", netns])
        .stderr(Stdio::null())
        .status();
}

/// The pid encoded in a lab name `slb-<pid>-…`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces, pin directories and scratch directories of labs
/// whose process is gone.
pub fn remove_stale() {
    for ns in list_netns() {
        if owner_pid(&ns).is_some_and(|pid| !alive(pid)) {
            delete_netns(&ns);
        }
    }
    for dir in [Path::new(BPFFS).to_owned(), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|pid| !alive(pid)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Every lab namespace on the machine (`slb-…`).
pub fn list_netns() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run `ip netns list`");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("start ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn read_mac(out: &Output) -> [u8; 6] {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut mac = [0u8; 6];
    for (i, part) in text.trim().split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).expect("MAC address in sysfs");
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_is_parsed_from_lab_names() {
        assert_eq!(owner_pid("slb-1234-0-client"), Some(1234));
        assert_eq!(owner_pid("slb-99-3-sw"), Some(99));
        assert_eq!(owner_pid("other-1234"), None);
        assert_eq!(owner_pid("slb-x-1"), None);
    }
}
