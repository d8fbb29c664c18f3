//! Postfix's `smtp-sink` as a destination for relay tests (a real peer):
//! dumping each transaction, or only counting (the far end of benchmarks).
//! The scriptable destination is [`crate::fake_mx`].
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::tmp::{ChildGuard, TempDir, free_port, wait_listening};

/// Postfix `smtp-sink` on 127.0.0.1, dumping each transaction to a file.
pub struct SmtpSink {
    pub addr: SocketAddr,
    dir: TempDir,
    _child: ChildGuard,
}

impl SmtpSink {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra `smtp-sink` options (e.g. `["-r", "RCPT"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = TempDir::new("smtp-sink");
        std::fs::create_dir_all(dir.join("dump")).expect("mkdir dump");
        // smtp-sink drops to `nobody` before writing its files.
        Command::new("chmod")
            .args(["777"])
            .arg(dir.join("dump"))
            .status()
            .expect("chmod");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let template = format!("{}/%M.", dir.join("dump").display());
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody", "-d", &template])
            .args(extra)
            .arg(addr.to_string())
            .arg("1000")
            .spawn()
            .expect("spawn smtp-sink (package postfix)");
        wait_listening(addr, Duration::from_secs(5));
        Self {
            addr,
            dir,
            _child: ChildGuard(Some(child)),
        }
    }

    /// Every dumped transaction: `X-…` envelope lines, then the message.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.join("dump"))
            .expect("read dump dir")
            .flatten()
        {
            if let Ok(b) = std::fs::read(e.path()) {
                out.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
        out
    }

    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.join("dump")).map_or(0, Iterator::count)
    }

    pub fn dump_dir(&self) -> PathBuf {
        self.dir.join("dump")
    }
}

/// Postfix `smtp-sink -c` that only counts messages (no dump files): the
/// far end of benchmarks.
pub struct CountingSink {
    pub addr: SocketAddr,
    count: Arc<std::sync::atomic::AtomicU64>,
    _child: ChildGuard,
}

impl CountingSink {
    pub fn start() -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut child = Command::new("smtp-sink")
            .args(["-u", "nobody", "-c"])
            .arg(addr.to_string())
            .arg("1000")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn smtp-sink (package postfix)");
        let mut out = child.stdout.take().expect("stdout");
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = count.clone();
        // Lines look like "sess=3 quit=3 mesg=4\r"; keep the latest mesg=.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut tail = String::new();
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    return;
                }
                tail.push_str(&String::from_utf8_lossy(&buf[..n]));
                if let Some(i) = tail.rfind('\r') {
                    if let Some(v) = tail[..i]
                        .rsplit('\r')
                        .next()
                        .and_then(|l| l.split("mesg=").nth(1))
                        .and_then(|v| v.trim().parse().ok())
                    {
                        c.store(v, Ordering::Relaxed);
                    }
                    tail.drain(..=i);
                }
            }
        });
        wait_listening(addr, Duration::from_secs(5));
        Self {
            addr,
            count,
            _child: ChildGuard(Some(child)),
        }
    }

    /// Messages received so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}
