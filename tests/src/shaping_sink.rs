//! A counting SMTP sink for shaping tests: it records how many sessions are
//! open at once (current and maximum) and when each message was accepted,
//! so limits are asserted from the receiving side. Each `DATA` can be held
//! for a while to keep connections busy. Each accepted message records the
//! client's address and its `EHLO` argument, so egress sources (issue 6)
//! are checked from the receiving side too.
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

#[derive(Default)]
struct State {
    open: usize,
    max_open: usize,
    sessions: usize,
    accepted: Vec<Instant>,
    /// A reply to `MAIL` instead of `250` (a `421` also closes the session).
    mail_reply: Option<String>,
    /// Answer `MAIL` with `421 4.7.28` only to this client address.
    throttle_peer: Option<IpAddr>,
    /// When each scripted `MAIL` reply was sent, and to whom.
    throttled: Vec<(IpAddr, Instant)>,
    /// Per accepted message: client address, `EHLO` argument, when.
    deliveries: Vec<Delivery>,
    /// Sessions open now and at most, per client address.
    open_by_peer: HashMap<IpAddr, (usize, usize)>,
}

/// One accepted message as the sink saw it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub peer: IpAddr,
    pub ehlo: String,
    pub at: Instant,
}

pub struct ShapingSink {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ShapingSink {
    /// On 127.0.0.1, any port; `data_delay` before each `250` to `DATA`.
    pub fn start(data_delay: Duration) -> Self {
        Self::start_at("127.0.0.1".parse().expect("ip"), data_delay)
    }

    /// On `ip`, any port (in the calling thread's network namespace).
    pub fn start_at(ip: IpAddr, data_delay: Duration) -> Self {
        Self::start_on(SocketAddr::new(ip, 0), data_delay)
    }

    /// On `addr` (e.g. port 25 of a lab MX host, from a thread in its namespace).
    pub fn start_on(addr: SocketAddr, data_delay: Duration) -> Self {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind sink on {addr}: {e}"));
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
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
                    std::thread::spawn(move || {
                        let peer = c.peer_addr().map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
                        {
                            let mut s = st.lock().expect("sink lock");
                            s.open += 1;
                            s.sessions += 1;
                            s.max_open = s.max_open.max(s.open);
                            let p = s.open_by_peer.entry(peer).or_default();
                            p.0 += 1;
                            p.1 = p.1.max(p.0);
                        }
                        // A session that got QUIT stopped counting before its 221.
                        if !matches!(session(c, peer, &st, data_delay), Ok(true)) {
                            close(&st, peer);
                        }
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

    /// Most sessions open at once so far.
    pub fn max_open(&self) -> usize {
        self.state.lock().expect("sink lock").max_open
    }

    /// Sessions so far.
    pub fn sessions(&self) -> usize {
        self.state.lock().expect("sink lock").sessions
    }

    /// When each message was accepted, in order.
    pub fn accepted(&self) -> Vec<Instant> {
        self.state.lock().expect("sink lock").accepted.clone()
    }

    /// Start or stop answering `MAIL` with Gmail's `421 4.7.28`.
    pub fn set_throttle(&self, on: bool) {
        self.set_mail_reply(on.then_some(GMAIL_THROTTLE));
    }

    /// Answer `MAIL` with `reply` (e.g. `"451 4.7.0 [TSS04] deferred"`) until unset.
    pub fn set_mail_reply(&self, reply: Option<&str>) {
        self.state.lock().expect("sink lock").mail_reply = reply.map(str::to_owned);
    }

    /// Answer `MAIL` with `421 4.7.28` to one client address only (or nobody).
    pub fn set_throttle_from(&self, peer: Option<IpAddr>) {
        self.state.lock().expect("sink lock").throttle_peer = peer;
    }

    /// When each scripted `MAIL` reply was sent.
    pub fn throttled(&self) -> Vec<Instant> {
        self.throttled_from().into_iter().map(|(_, t)| t).collect()
    }

    /// Each scripted `MAIL` reply: the client it went to, and when.
    pub fn throttled_from(&self) -> Vec<(IpAddr, Instant)> {
        self.state.lock().expect("sink lock").throttled.clone()
    }

    /// Every accepted message: client address, `EHLO` argument, time.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().expect("sink lock").deliveries.clone()
    }

    /// Most sessions open at once from one client address.
    pub fn max_open_from(&self, peer: IpAddr) -> usize {
        self.state
            .lock()
            .expect("sink lock")
            .open_by_peer
            .get(&peer)
            .map_or(0, |p| p.1)
    }

    pub fn count(&self) -> usize {
        self.state.lock().expect("sink lock").accepted.len()
    }

    /// Messages per second between the first and the last accepted one
    /// (`n − 1` intervals over their span).
    pub fn rate(&self) -> f64 {
        rate_of(&self.accepted())
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

impl Drop for ShapingSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn close(state: &Mutex<State>, peer: IpAddr) {
    let mut s = state.lock().expect("sink lock");
    s.open -= 1;
    s.open_by_peer.entry(peer).or_default().0 -= 1;
}

/// One SMTP session; `Ok(true)` when it ended by `QUIT` (already counted closed).
fn session(
    conn: TcpStream,
    peer: IpAddr,
    state: &Mutex<State>,
    data_delay: Duration,
) -> std::io::Result<bool> {
    conn.set_read_timeout(Some(Duration::from_mins(1)))?;
    conn.set_nodelay(true)?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    w.write_all(b"220 shaping-sink ESMTP\r\n")?;
    let mut line = String::new();
    let mut in_mail = false;
    let mut ehlo = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            line[4..].trim().clone_into(&mut ehlo);
            b"250-shaping-sink\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
        } else if let Some(scripted) = upper
            .starts_with("MAIL")
            .then(|| {
                let mut st = state.lock().expect("sink lock");
                let r = st.mail_reply.clone().or_else(|| {
                    (st.throttle_peer == Some(peer)).then(|| GMAIL_THROTTLE.to_owned())
                });
                if r.is_some() {
                    st.throttled.push((peer, Instant::now()));
                }
                r
            })
            .flatten()
        {
            w.write_all(format!("{scripted}\r\n").as_bytes())?;
            if scripted.starts_with("421") {
                return Ok(false);
            }
            in_mail = false;
            continue;
        } else if upper.starts_with("MAIL") {
            in_mail = true;
            b"250 2.1.0 Ok\r\n"
        } else if (upper.starts_with("RCPT") || upper.starts_with("DATA")) && !in_mail {
            // The pipelined rest of a transaction whose MAIL was refused.
            b"503 5.5.1 Error: need MAIL command\r\n"
        } else if upper.starts_with("DATA") {
            in_mail = false;
            w.write_all(b"354 go ahead\r\n")?;
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(false);
                }
                if line == ".\r\n" {
                    break;
                }
            }
            if !data_delay.is_zero() {
                std::thread::sleep(data_delay);
            }
            let now = Instant::now();
            let mut st = state.lock().expect("sink lock");
            st.accepted.push(now);
            st.deliveries.push(Delivery {
                peer,
                ehlo: ehlo.clone(),
                at: now,
            });
            b"250 2.0.0 Ok: queued\r\n"
        } else if upper.starts_with("QUIT") {
            // Counted closed before the 221: the client may open its next
            // connection the moment it reads it.
            close(state, peer);
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(true);
        } else {
            b"250 2.0.0 Ok\r\n"
        };
        w.write_all(reply)?;
    }
}
