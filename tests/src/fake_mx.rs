//! One scriptable fake MX for relay tests: a destination that fails on cue
//! and records what it saw, so delivery is asserted from the receiving side.
//!
//! Behaviour (all changeable while it runs):
//! - magic recipients, as in the tests of `KumoMTA`: `reject@…` always gets
//!   `550 5.1.1`; `tempfail-once@…` gets `451` on its first RCPT, `250` after;
//! - a scripted reply per command verb instead of the default
//!   ([`FakeMx::set_reply`]; `"DATA"` is the reply to the end of the data;
//!   `"GREETING"` the banner); a `421` also closes the session;
//! - a delay before the reply to a verb ([`FakeMx::set_delay`]; `"DATA"`
//!   holds the message before its `250`, keeping the connection busy);
//! - dropping the connection without a reply on a verb ([`FakeMx::drop_on`]);
//! - Gmail's `421 4.7.28` to `MAIL` from one client address only;
//! - a [`Hostile`] mode: a server that is broken or malicious on purpose
//!   (endless replies, silence, a reset, a failing TLS handshake).
//!
//! Recorded: sessions and their client addresses, sessions open at once
//! (overall and per client address), each accepted message (envelope, data,
//! client address, `EHLO` argument, time), RCPT attempts per address, and
//! when and to whom each scripted `MAIL` refusal was sent.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Gmail's answer to a sender it considers too fast.
pub const GMAIL_THROTTLE: &str =
    "421 4.7.28 Our system has detected an unusual rate of unsolicited mail";

/// A message as the fake MX accepted it.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub rcpts: Vec<String>,
    /// The data, dot-unstuffed, without the final `.`.
    pub data: String,
}

/// Who sent an accepted message, and when.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub peer: IpAddr,
    pub ehlo: String,
    pub at: Instant,
}

/// How a hostile server misbehaves, for every new session while set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// `220-xxxx…` greeting lines, forever.
    EndlessGreeting,
    /// One greeting line that never ends (no CRLF), forever.
    EndlessLine,
    /// The greeting one byte a second, then the same for every reply.
    Trickle,
    /// Accepts the connection and never says a word.
    Silent,
    /// A normal session until `DATA`, which never gets an answer.
    SilentAtData,
    /// Resets the connection (RST) in the middle of the message data.
    ResetInData,
    /// Offers `STARTTLS`, says `220`, then sends garbage instead of a TLS
    /// handshake; a session without `STARTTLS` works.
    BrokenTls,
    /// A 10,000-line reply to `EHLO`.
    HugeEhlo,
}

#[derive(Default)]
struct Script {
    replies: HashMap<String, String>,
    delays: HashMap<String, Duration>,
    drop_on: Option<String>,
    throttle_peer: Option<IpAddr>,
    hostile: Option<Hostile>,
}

#[derive(Default)]
struct State {
    script: Script,
    sessions: usize,
    peers: Vec<IpAddr>,
    open: usize,
    max_open: usize,
    /// Sessions open now and at most, per client address.
    open_by_peer: HashMap<IpAddr, (usize, usize)>,
    received: Vec<Received>,
    deliveries: Vec<Delivery>,
    attempts: HashMap<String, u32>,
    /// Each scripted `MAIL` refusal: the client it went to, and when.
    throttled: Vec<(IpAddr, Instant)>,
}

/// Where a [`FakeMx`] listens and what it starts with.
pub struct Builder {
    ip: IpAddr,
    port: u16,
    script: Script,
}

impl Builder {
    /// Listen on `ip` (in the calling thread's network namespace).
    #[must_use]
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip = ip;
        self
    }

    /// Listen on `addr`, e.g. port 25 of a lab MX host (from a thread in
    /// its network namespace).
    #[must_use]
    pub fn addr(self, addr: SocketAddr) -> Self {
        self.ip(addr.ip()).port(addr.port())
    }

    /// Listen on `port` (0 = any).
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Start with a delay before the reply to `verb` (see the module docs).
    #[must_use]
    pub fn delay(mut self, verb: &str, d: Duration) -> Self {
        self.script.delays.insert(verb.to_ascii_uppercase(), d);
        self
    }

    /// Start hostile (see [`Hostile`]).
    #[must_use]
    pub fn hostile(mut self, h: Hostile) -> Self {
        self.script.hostile = Some(h);
        self
    }

    /// Start with `reply` to `verb` (see the module docs).
    #[must_use]
    pub fn reply(mut self, verb: &str, reply: &str) -> Self {
        self.script
            .replies
            .insert(verb.to_ascii_uppercase(), reply.to_owned());
        self
    }

    pub fn start(self) -> FakeMx {
        let listener = TcpListener::bind((self.ip, self.port))
            .unwrap_or_else(|e| panic!("bind fake MX on {}:{}: {e}", self.ip, self.port));
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            script: self.script,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            loop {
                // Wait for a connection or the stop flag: stopping needs no
                // wake-up connection, which from another network namespace
                // than the listener's could leave the machine.
                let mut ready = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the listener outlives the call.
                let n = unsafe { libc::poll(&raw mut ready, 1, 50) };
                if sp.load(Ordering::Relaxed) {
                    return;
                }
                if n <= 0 {
                    continue;
                }
                if let Ok((c, _)) = listener.accept() {
                    let st = st.clone();
                    std::thread::spawn(move || serve(c, &st));
                }
            }
        });
        FakeMx {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }
}

/// The fake MX; stops on drop.
pub struct FakeMx {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeMx {
    /// On 127.0.0.1, any port, default behaviour.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// A fake MX to configure before it starts.
    pub fn builder() -> Builder {
        Builder {
            ip: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            script: Script::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake MX lock")
    }

    /// Answer `verb` with `reply` from now on (`None`: the default again).
    pub fn set_reply(&self, verb: &str, reply: Option<&str>) {
        let verb = verb.to_ascii_uppercase();
        let mut st = self.state();
        match reply {
            Some(r) => st.script.replies.insert(verb, r.to_owned()),
            None => st.script.replies.remove(&verb),
        };
    }

    /// Wait `d` before the reply to `verb` from now on (zero: no wait).
    pub fn set_delay(&self, verb: &str, d: Duration) {
        self.state()
            .script
            .delays
            .insert(verb.to_ascii_uppercase(), d);
    }

    /// Misbehave as `h` in new sessions from now on (`None`: behave).
    pub fn set_hostile(&self, h: Option<Hostile>) {
        self.state().script.hostile = h;
    }

    /// Close the connection without a reply when `verb` arrives (`None`: never).
    pub fn drop_on(&self, verb: Option<&str>) {
        self.state().script.drop_on = verb.map(str::to_ascii_uppercase);
    }

    /// Start or stop answering `MAIL` with Gmail's `421 4.7.28`.
    pub fn set_throttle(&self, on: bool) {
        self.set_mail_reply(on.then_some(GMAIL_THROTTLE));
    }

    /// Answer `MAIL` with `reply` (e.g. `"451 4.7.0 [TSS04] deferred"`) until unset.
    pub fn set_mail_reply(&self, reply: Option<&str>) {
        self.set_reply("MAIL", reply);
    }

    /// Answer `MAIL` with `421 4.7.28` to one client address only (or nobody).
    pub fn set_throttle_from(&self, peer: Option<IpAddr>) {
        self.state().script.throttle_peer = peer;
    }

    /// Every accepted message, in order.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// Sessions (connections) so far.
    pub fn sessions(&self) -> usize {
        self.state().sessions
    }

    /// Client addresses of the sessions so far.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.state().peers.clone()
    }

    /// RCPT attempts seen for an address.
    pub fn attempts(&self, rcpt: &str) -> u32 {
        self.state().attempts.get(rcpt).copied().unwrap_or(0)
    }

    /// Most sessions open at once so far.
    pub fn max_open(&self) -> usize {
        self.state().max_open
    }

    /// Most sessions open at once from one client address.
    pub fn max_open_from(&self, peer: IpAddr) -> usize {
        self.state().open_by_peer.get(&peer).map_or(0, |p| p.1)
    }

    /// When each message was accepted, in order.
    pub fn accepted(&self) -> Vec<Instant> {
        self.state().deliveries.iter().map(|d| d.at).collect()
    }

    /// Every accepted message: client address, `EHLO` argument, time.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state().deliveries.clone()
    }

    /// When each scripted `MAIL` refusal was sent.
    pub fn throttled(&self) -> Vec<Instant> {
        self.throttled_from().into_iter().map(|(_, t)| t).collect()
    }

    /// Each scripted `MAIL` refusal: the client it went to, and when.
    pub fn throttled_from(&self) -> Vec<(IpAddr, Instant)> {
        self.state().throttled.clone()
    }

    /// Messages accepted so far.
    pub fn count(&self) -> usize {
        self.state().deliveries.len()
    }

    /// Messages per second between the first and the last accepted one
    /// (`n − 1` intervals over their span).
    pub fn rate(&self) -> f64 {
        rate_of(&self.accepted())
    }
}

impl Drop for FakeMx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Events per second over a sorted list of instants.
pub fn rate_of(t: &[Instant]) -> f64 {
    if t.len() < 2 {
        return 0.0;
    }
    let span = t[t.len() - 1].duration_since(t[0]).as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "counts are small")]
    let n = (t.len() - 1) as f64;
    n / span
}

/// One connection: counted open until it ends (a `QUIT` counts it closed
/// before the `221`: the client may open its next connection the moment it
/// reads it).
fn serve(conn: TcpStream, state: &Mutex<State>) {
    let peer = conn
        .peer_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    {
        let mut s = state.lock().expect("fake MX lock");
        s.sessions += 1;
        s.peers.push(peer);
        s.open += 1;
        s.max_open = s.max_open.max(s.open);
        let p = s.open_by_peer.entry(peer).or_default();
        p.0 += 1;
        p.1 = p.1.max(p.0);
    }
    if !matches!(session(conn, peer, state), Ok(true)) {
        close(state, peer);
    }
}

fn close(state: &Mutex<State>, peer: IpAddr) {
    let mut s = state.lock().expect("fake MX lock");
    s.open -= 1;
    s.open_by_peer.entry(peer).or_default().0 -= 1;
}

/// What the script says for `verb` from `peer`: a reply instead of the
/// default, a delay, or dropping the connection.
fn scripted(state: &Mutex<State>, verb: &str, peer: IpAddr) -> (Option<String>, Duration, bool) {
    let mut st = state.lock().expect("fake MX lock");
    let reply = st.script.replies.get(verb).cloned().or_else(|| {
        (verb == "MAIL" && st.script.throttle_peer == Some(peer)).then(|| GMAIL_THROTTLE.to_owned())
    });
    if verb == "MAIL" && reply.is_some() {
        st.throttled.push((peer, Instant::now()));
    }
    let delay = st.script.delays.get(verb).copied().unwrap_or_default();
    (reply, delay, st.script.drop_on.as_deref() == Some(verb))
}

/// Replies as written, or one byte a second ([`Hostile::Trickle`]).
struct Writer<'a> {
    conn: &'a mut TcpStream,
    trickle: bool,
}

impl Writer<'_> {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.trickle {
            return self.conn.write_all(bytes);
        }
        for b in bytes {
            self.conn.write_all(std::slice::from_ref(b))?;
            std::thread::sleep(Duration::from_secs(1));
        }
        Ok(())
    }
}

/// Writes `start`, then `chunk` over and over until the client gives up
/// (a write fails).
fn endless(mut conn: &TcpStream, start: &[u8], chunk: &[u8]) -> std::io::Result<bool> {
    conn.write_all(start)?;
    loop {
        conn.write_all(chunk)?;
    }
}

/// Says nothing; reads and drops whatever comes until the client closes.
fn silent(mut conn: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 4096];
    conn.set_read_timeout(Some(Duration::from_mins(10)))?;
    while std::io::Read::read(&mut conn, &mut buf)? > 0 {}
    Ok(false)
}

/// Closes with a reset (RST) instead of a FIN: `SO_LINGER` with a zero timeout.
fn reset(conn: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a valid `linger`.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            u32::try_from(size_of::<libc::linger>()).expect("small"),
        );
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// The address between `<` and `>`.
fn path_of(line: &str) -> Option<String> {
    line.split_once('<')
        .and_then(|(_, b)| b.split_once('>'))
        .map(|(a, _)| a.to_owned())
}

/// One SMTP session; `Ok(true)` when it ended by `QUIT` (already counted closed).
fn session(conn: TcpStream, peer: IpAddr, state: &Mutex<State>) -> std::io::Result<bool> {
    conn.set_read_timeout(Some(Duration::from_mins(1)))?;
    conn.set_nodelay(true)?;
    let hostile = state.lock().expect("fake MX lock").script.hostile;
    let mut w = conn.try_clone()?;
    let mut w = Writer {
        conn: &mut w,
        trickle: hostile == Some(Hostile::Trickle),
    };
    match hostile {
        Some(Hostile::EndlessGreeting) => {
            return endless(
                &conn,
                b"",
                &b"220-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n".repeat(256),
            );
        }
        Some(Hostile::EndlessLine) => return endless(&conn, b"220 ", &[b'x'; 16384]),
        Some(Hostile::Silent) => return silent(&conn),
        _ => {}
    }
    let mut r = BufReader::new(conn);
    let (greeting, _, _) = scripted(state, "GREETING", peer);
    let greeting = greeting.unwrap_or_else(|| "220 fake-mx ESMTP".to_owned());
    w.write_all(format!("{greeting}\r\n").as_bytes())?;
    if greeting.starts_with("421") || greeting.starts_with("554") {
        return Ok(false);
    }
    let (mut from, mut rcpts, mut in_mail) = (String::new(), Vec::<String>::new(), false);
    let mut ehlo = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let (script, delay, drop) = scripted(state, &verb, peer);
        if drop {
            return Ok(false);
        }
        match (hostile, verb.as_str()) {
            (Some(Hostile::SilentAtData), "DATA") => return silent(r.get_ref()),
            (Some(Hostile::HugeEhlo), "EHLO") => {
                let mut reply = b"250-fake-mx\r\n".to_vec();
                reply.extend_from_slice(&b"250-XHUGE padding line\r\n".repeat(9_998));
                reply.extend_from_slice(b"250 PIPELINING\r\n");
                w.write_all(&reply)?;
                continue;
            }
            (Some(Hostile::BrokenTls), "EHLO") => {
                line[4..].trim().clone_into(&mut ehlo);
                w.write_all(b"250-fake-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n")?;
                continue;
            }
            (Some(Hostile::BrokenTls), "STARTTLS") => {
                w.write_all(b"220 2.0.0 Ready to start TLS\r\n")?;
                w.write_all(b"this is not a TLS handshake\r\n")?;
                return Ok(false);
            }
            _ => {}
        }
        if verb != "DATA" {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            if let Some(reply) = script {
                w.write_all(format!("{reply}\r\n").as_bytes())?;
                if reply.starts_with("421") {
                    return Ok(false);
                }
                if verb == "MAIL" {
                    in_mail = false;
                }
                continue;
            }
        }
        let reply: String = match verb.as_str() {
            "EHLO" => {
                line[4..].trim().clone_into(&mut ehlo);
                "250-fake-mx\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250 ENHANCEDSTATUSCODES"
                    .into()
            }
            "HELO" | "NOOP" => "250 2.0.0 Ok".into(),
            "RSET" => {
                (in_mail, from) = (false, String::new());
                rcpts.clear();
                "250 2.0.0 Ok".into()
            }
            "MAIL" => {
                in_mail = true;
                from = path_of(&line).unwrap_or_default();
                rcpts.clear();
                "250 2.1.0 Ok".into()
            }
            // The pipelined rest of a transaction whose MAIL was refused.
            "RCPT" | "DATA" if !in_mail => "503 5.5.1 Error: need MAIL command".into(),
            "RCPT" => {
                let to = path_of(&line).unwrap_or_default();
                let n = {
                    let mut st = state.lock().expect("fake MX lock");
                    let n = st.attempts.entry(to.clone()).or_default();
                    *n += 1;
                    *n
                };
                match to.split('@').next().unwrap_or("") {
                    "reject" => {
                        "550 5.1.1 <reject>: Recipient address rejected: User unknown".into()
                    }
                    "tempfail-once" if n == 1 => "451 4.2.0 Try again later".into(),
                    _ => {
                        rcpts.push(to);
                        "250 2.1.5 Ok".into()
                    }
                }
            }
            "DATA" if rcpts.is_empty() => "554 5.5.1 Error: no valid recipients".into(),
            "DATA" => {
                in_mail = false;
                w.write_all(b"354 go ahead\r\n")?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 {
                        return Ok(false);
                    }
                    if hostile == Some(Hostile::ResetInData) {
                        reset(r.get_ref());
                        return Ok(false);
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                if let Some(reply) = script {
                    w.write_all(format!("{reply}\r\n").as_bytes())?;
                    if reply.starts_with("421") {
                        return Ok(false);
                    }
                    continue;
                }
                let now = Instant::now();
                let mut st = state.lock().expect("fake MX lock");
                st.deliveries.push(Delivery {
                    peer,
                    ehlo: ehlo.clone(),
                    at: now,
                });
                st.received.push(Received {
                    from: std::mem::take(&mut from),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                });
                "250 2.0.0 Ok: queued".into()
            }
            "QUIT" => {
                close(state, peer);
                w.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(true);
            }
            _ => "500 5.5.2 Error: command not recognized".into(),
        };
        w.write_all(reply.as_bytes())?;
        w.write_all(b"\r\n")?;
    }
}
