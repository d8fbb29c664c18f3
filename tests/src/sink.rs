//! Destination servers for relay tests: Postfix's `smtp-sink` (a real peer)
//! and a small scriptable sink that fails on cue (magic recipients, as in
//! the tests of `KumoMTA`): `tempfail-once@` gets `451` on its first RCPT and `250`
//! after; `reject@…` always gets `550 5.1.1`; every other recipient `250`.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
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

/// A message as the scriptable sink received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub rcpts: Vec<String>,
    pub data: String,
}

#[derive(Default)]
struct State {
    sessions: usize,
    peers: Vec<std::net::IpAddr>,
    received: Vec<Received>,
    attempts: HashMap<String, u32>,
}

/// The scriptable sink.
pub struct ScriptSink {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptSink {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// On a given 127.0.0.1 port (0 = any).
    pub fn start_on(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind sink");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(c) = conn {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        let _ = session(c, &st);
                    });
                }
            }
        });
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("sink lock").received.clone()
    }

    /// SMTP sessions (connections) so far.
    pub fn sessions(&self) -> usize {
        self.state.lock().expect("sink lock").sessions
    }

    /// Source addresses of the sessions so far.
    pub fn peers(&self) -> Vec<std::net::IpAddr> {
        self.state.lock().expect("sink lock").peers.clone()
    }

    /// RCPT attempts seen for an address.
    pub fn attempts(&self, rcpt: &str) -> u32 {
        self.state
            .lock()
            .expect("sink lock")
            .attempts
            .get(rcpt)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for ScriptSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn session(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    {
        let mut st = state.lock().expect("sink lock");
        st.sessions += 1;
        if let Ok(peer) = conn.peer_addr() {
            st.peers.push(peer.ip());
        }
    }
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    w.write_all(b"220 script-sink ESMTP\r\n")?;
    let (mut from, mut rcpts) = (None::<String>, Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        let arg = |l: &str| {
            l.split_once('<')
                .and_then(|(_, b)| b.split_once('>'))
                .map(|(a, _)| a.to_owned())
        };
        let reply: String = if upper.starts_with("EHLO") {
            "250-script-sink\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250 ENHANCEDSTATUSCODES"
                .into()
        } else if upper.starts_with("HELO")
            || upper.starts_with("RSET")
            || upper.starts_with("NOOP")
        {
            if upper.starts_with("RSET") {
                from = None;
                rcpts.clear();
            }
            "250 2.0.0 Ok".into()
        } else if upper.starts_with("MAIL FROM:") {
            from = arg(&line);
            "250 2.1.0 Ok".into()
        } else if upper.starts_with("RCPT TO:") {
            let to = arg(&line).unwrap_or_default();
            let n = {
                let mut st = state.lock().expect("sink lock");
                let n = st.attempts.entry(to.clone()).or_default();
                *n += 1;
                *n
            };
            let local = to.split('@').next().unwrap_or("");
            if local == "reject" {
                "550 5.1.1 <reject>: Recipient address rejected: User unknown".into()
            } else if local == "tempfail-once" && n == 1 {
                "451 4.2.0 Try again later".into()
            } else {
                rcpts.push(to);
                "250 2.1.5 Ok".into()
            }
        } else if upper.starts_with("DATA") {
            if rcpts.is_empty() {
                "554 5.5.1 Error: no valid recipients".into()
            } else {
                w.write_all(b"354 go ahead\r\n")?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                state.lock().expect("sink lock").received.push(Received {
                    from: from.take().unwrap_or_default(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                });
                "250 2.0.0 Ok: queued".into()
            }
        } else if upper.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else {
            "500 5.5.2 unrecognized".into()
        };
        w.write_all(reply.as_bytes())?;
        w.write_all(b"\r\n")?;
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
