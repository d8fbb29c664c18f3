//! A private Postfix instance for tests and benchmarks: its own
//! `config_directory`, queue and data directories under a temporary
//! directory, `smtpd` on a loopback port of our choosing. Used as the
//! destination MX (virtual mailboxes in a Maildir, no chroot) and as the
//! reference relay in `cargo xtask bench relay` (as Debian ships it:
//! packaged `master.cf`, chrooted services).
use std::{fmt::Write as _, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use crate::tmp::{TempDir, free_port, wait_listening};

/// Where an instance's `smtpd` listens: an address (`0.0.0.0:465`: every
/// interface) and, on a lab host, its network namespace.
#[derive(Clone, Copy, Debug)]
pub struct At<'a> {
    pub listen: SocketAddr,
    pub netns: Option<&'a str>,
}

/// main.cf lines naming a throwaway certificate and key made in `dir`.
fn tls_files(dir: &std::path::Path) -> String {
    let (cert, key) = crate::tmp::self_signed_cert(dir, "pf", "mx.test");
    format!(
        "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_received_header = yes\n",
        cert.display(),
        key.display()
    )
}

/// Waits until `addr` accepts TCP inside network namespace `ns`.
fn wait_listening_in(ns: &str, addr: SocketAddr, timeout: Duration) {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ok = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .args(["--", "timeout", "1", "bash", "-c"])
            .arg(format!("</dev/tcp/{}/{}", target.ip(), target.port()))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "postfix did not listen on {addr} in {ns} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Postfix {
    pub dir: TempDir,
    pub addr: SocketAddr,
    config: PathBuf,
}

/// Files of the Debian package: its `master.cf`, the `main.cf` parts its
/// installer assembles, and the helper its service unit runs before start.
const DEBIAN_MASTER_CF: &str = "/usr/share/postfix/master.cf.dist";
const DEBIAN_MAIN_CF: &str = "/usr/share/postfix/main.cf.debian";
const DEBIAN_MAIN_CF_TLS: &str = "/usr/share/postfix/main.cf.tls";
const CONFIGURE_INSTANCE: &str = "/usr/lib/postfix/configure-instance.sh";

/// The `master.cf` service name of an `smtpd` listening on `addr`
/// (unspecified: every interface, by port alone).
fn service(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.port().to_string()
    } else {
        addr.to_string()
    }
}

/// The Postfix services our test instances need, all unchrooted.
const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// Runs `cmd` to completion; panics with `what` and its output if it fails.
fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {what} (package postfix): {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn postfix_ids() -> (u32, u32) {
    let out = Command::new("id")
        .args(["-u", "postfix"])
        .output()
        .expect("id -u postfix");
    let uid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("postfix uid");
    let out = Command::new("id")
        .args(["-g", "postfix"])
        .output()
        .expect("id -g postfix");
    let gid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("postfix gid");
    (uid, gid)
}

impl Postfix {
    /// Destination MX for `domain`: every recipient lands in one Maildir.
    pub fn destination(domain: &str) -> Self {
        Self::destination_with(domain, "")
    }

    /// Destination MX with extra main.cf lines.
    pub fn destination_with(domain: &str, extra: &str) -> Self {
        let (uid, gid) = postfix_ids();
        Self::start(&format!(
            "mydestination =\nvirtual_mailbox_domains = {domain}\nvirtual_mailbox_base = {{DIR}}/mail\n\
             virtual_mailbox_maps = static:inbox/\nvirtual_uid_maps = static:{uid}\nvirtual_gid_maps = static:{gid}\n{extra}"
        ))
    }

    /// Destination MX that offers STARTTLS with a throwaway certificate made in `dir`.
    pub fn destination_tls(domain: &str, dir: &std::path::Path) -> Self {
        Self::destination_with(
            domain,
            &format!("smtpd_tls_security_level = may\n{}", tls_files(dir)),
        )
    }

    /// Destination MX speaking implicit TLS (`smtpd_tls_wrappermode`, as
    /// on port 465) with a throwaway certificate made in `dir`, listening
    /// on `at`.
    pub fn destination_implicit_tls(domain: &str, dir: &std::path::Path, at: At<'_>) -> Self {
        let (uid, gid) = postfix_ids();
        Self::start_at(
            &format!(
                "mydestination =\nvirtual_mailbox_domains = {domain}\nvirtual_mailbox_base = {{DIR}}/mail\n\
                 virtual_mailbox_maps = static:inbox/\nvirtual_uid_maps = static:{uid}\nvirtual_gid_maps = static:{gid}\n\
                 smtpd_tls_wrappermode = yes\nsmtpd_tls_security_level = encrypt\n{}",
                tls_files(dir)
            ),
            at,
        )
    }

    /// A relay that sends everything to `next_hop` (like the relay under
    /// test with a `*` route), run as Debian ships Postfix: the packaged
    /// `master.cf` (most services chrooted) and `main.cf` defaults, the
    /// chroot prepared by Debian's own start-up helper. Only what makes it
    /// a private instance on a free loopback port, and the relay route,
    /// are set.
    pub fn relay_to(next_hop: SocketAddr) -> Self {
        let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut main = String::new();
        for shipped in [DEBIAN_MAIN_CF, DEBIAN_MAIN_CF_TLS] {
            // The TLS part is absent when the package was built without it.
            if let Ok(text) = std::fs::read_to_string(shipped) {
                main.push_str(&text);
            }
        }
        let _ = write!(
            main,
            "mydestination =\nmynetworks = 127.0.0.0/8\nrelayhost = [{}]:{}\n",
            next_hop.ip(),
            next_hop.port()
        );
        let packaged = std::fs::read_to_string(DEBIAN_MASTER_CF)
            .unwrap_or_else(|e| panic!("read {DEBIAN_MASTER_CF} (package postfix): {e}"));
        // Only the smtpd listener moves: from port 25 to ours.
        let svc = service(listen);
        let master: String = packaged
            .lines()
            .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                ["smtp", "inet", private, unpriv, chroot, ..] => {
                    format!("{svc} inet {private} {unpriv} {chroot} - - smtpd\n")
                }
                _ => format!("{l}\n"),
            })
            .collect();
        assert!(
            master.contains(&format!("{svc} inet")),
            "no `smtp inet` service in {DEBIAN_MASTER_CF}"
        );
        Self::launch(
            &main,
            &master,
            At {
                listen,
                netns: None,
            },
        )
    }

    /// Starts an instance with `extra` main.cf lines (`{DIR}` is the
    /// instance directory) on a free loopback port.
    pub fn start(extra: &str) -> Self {
        Self::start_at(
            extra,
            At {
                listen: ([127, 0, 0, 1], free_port()).into(),
                netns: None,
            },
        )
    }

    /// Starts an instance with `extra` main.cf lines on `at`.
    pub fn start_at(extra: &str, at: At<'_>) -> Self {
        let main = format!(
            "compatibility_level = 3.6\nmynetworks = 127.0.0.0/8\n\
             smtputf8_enable = no\nalias_maps =\nalias_database =\nbiff = no\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             smtp_tls_security_level = none\n\
             default_process_limit = 100\n{extra}"
        );
        let master = format!("{} inet n - n - - smtpd\n{MASTER_CF}", service(at.listen));
        Self::launch(&main, &master, at)
    }

    /// Starts an instance from `main` (its `{DIR}` is the instance
    /// directory) and `master` on `at`. The lines that make it a private
    /// instance go last in main.cf, so they win; a chrooted `master` gets
    /// its chroot as Debian's start-up prepares it.
    fn launch(main: &str, master: &str, at: At<'_>) -> Self {
        let dir = TempDir::new("postfix");
        let d = dir.path().display().to_string();
        let (uid, gid) = postfix_ids();
        for sub in ["etc", "queue", "data", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        // Postfix runs its daemons as `postfix`: it must own data and mail.
        for sub in ["data", "mail"] {
            std::os::unix::fs::chown(dir.join(sub), Some(uid), Some(gid)).expect("chown");
        }
        let (addr, port) = (at.listen, at.listen.port());
        // An unspecified address listens on every interface (a lab host:
        // its own address and the VIP on lo).
        let interfaces = if addr.ip().is_unspecified() {
            "all".to_owned()
        } else {
            addr.ip().to_string()
        };
        let mut main = main.replace("{DIR}", &d);
        let _ = write!(
            main,
            "\nqueue_directory = {d}/queue\ndata_directory = {d}/data\n\
             mail_owner = postfix\nsetgid_group = postdrop\nmyhostname = postfix-{port}.test\n\
             inet_interfaces = {interfaces}\ninet_protocols = ipv4\n\
             maillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\n"
        );
        std::fs::write(dir.join("etc/main.cf"), main).expect("write main.cf");
        std::fs::write(dir.join("etc/master.cf"), master).expect("write master.cf");
        let config = dir.join("etc");
        // What Debian's postfix.service runs before `postfix start`: copies
        // resolver files, CA certificates and NSS libraries into the
        // chroot (the queue directory) when a service is chrooted.
        run_ok(
            Command::new(CONFIGURE_INSTANCE)
                .arg("-")
                .env("MAIL_CONFIG", &config),
            &format!("{CONFIGURE_INSTANCE} for {}", config.display()),
        );
        let mut start = match at.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .args(["--", "postfix"]);
                c
            }
            None => Command::new("postfix"),
        };
        run_ok(
            start.arg("-c").arg(&config).arg("start"),
            &format!(
                "postfix -c {} start (it reports to syslog only; run it under `script` to see why)",
                config.display()
            ),
        );
        match at.netns {
            Some(ns) => wait_listening_in(ns, addr, Duration::from_secs(15)),
            None => wait_listening(addr, Duration::from_secs(15)),
        }
        Self { dir, addr, config }
    }

    /// Files delivered to the Maildir (destination mode).
    pub fn delivered(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["mail/inbox/new", "mail/inbox/cur"] {
            if let Ok(rd) = std::fs::read_dir(self.dir.join(sub)) {
                for e in rd.flatten() {
                    if let Ok(b) = std::fs::read(e.path()) {
                        out.push(String::from_utf8_lossy(&b).into_owned());
                    }
                }
            }
        }
        out
    }

    /// Postfix's own log.
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Messages still in the queue (`postqueue -p` line count heuristic: queue ids).
    pub fn queue_len(&self) -> usize {
        let out = Command::new("postqueue")
            .arg("-c")
            .arg(&self.config)
            .arg("-j")
            .output();
        out.map_or(0, |o| String::from_utf8_lossy(&o.stdout).lines().count())
    }

    pub fn config_dir(&self) -> &PathBuf {
        &self.config
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.config)
            .arg("stop")
            .output();
        // master exits asynchronously; give it a moment before the directory goes.
        for _ in 0..50 {
            if !self.dir.join("queue/pid/master.pid").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.config)
            .arg("abort")
            .output();
    }
}
