//! A load generator for lab tests: threads that enter a lab host's network
//! namespace (`setns` affects only the calling thread) and run complete
//! SMTP sessions against an address, recording for each session when it
//! ran, whether it completed, and which relay served it (each relay's sink
//! greets with its own name, `smtp-sink -h NAME`). A [`Pace`] turns it
//! into an open-loop client: a fixed number of sessions started at a fixed
//! interval, recipients taken in turn.
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// One SMTP session's outcome.
#[derive(Clone, Debug)]
pub struct Session {
    /// When it started and ended, from the load's start.
    pub start: Duration,
    pub end: Duration,
    /// The relay named in the greeting (`None` when there was none).
    pub relay: Option<String>,
    /// The recipient of its message.
    pub rcpt: String,
    /// The message got `250` after its data: the relay holds it now.
    pub accepted: bool,
    /// `None` when the message was accepted and the session closed cleanly.
    pub error: Option<String>,
}

/// An open-loop load: `total` sessions, the n-th started `n × interval`
/// after the start (as soon after as a worker is free), to `rcpts` in turn,
/// each pausing `hold` after `MAIL FROM` (an application composing).
#[derive(Clone, Debug)]
pub struct Pace {
    pub total: usize,
    pub interval: Duration,
    pub rcpts: Vec<String>,
    pub hold: Duration,
}

/// A running load; [`Load::stop`] ends it and returns every session.
pub struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    sessions: Arc<Mutex<Vec<Session>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `workers` threads in network namespace `netns`, each running
    /// sessions back to back to `target`; each session pauses `hold` after
    /// `MAIL FROM` (a long-lived session, for drains and restarts).
    pub fn start(netns: &str, target: SocketAddr, workers: usize, hold: Duration) -> Self {
        Self::spawn(netns, target, workers, hold, None)
    }

    /// Starts `workers` threads in `netns` that run `pace`'s sessions to
    /// `target`; [`Load::finish`] waits for the last one.
    pub fn paced(netns: &str, target: SocketAddr, workers: usize, pace: Pace) -> Self {
        let hold = pace.hold;
        Self::spawn(netns, target, workers, hold, Some(pace))
    }

    fn spawn(
        netns: &str,
        target: SocketAddr,
        workers: usize,
        hold: Duration,
        pace: Option<Pace>,
    ) -> Self {
        let started = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let pace = Arc::new(pace);
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..workers)
            .map(|_| {
                let (stop, sessions, netns) = (stop.clone(), sessions.clone(), netns.to_owned());
                let (next, pace) = (next.clone(), pace.clone());
                thread::spawn(move || {
                    let ns = File::open(format!("/var/run/netns/{netns}")).expect("open netns");
                    // SAFETY: setns on this thread only, with a valid fd.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        rc,
                        0,
                        "setns into {netns}: {}",
                        std::io::Error::last_os_error()
                    );
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let rcpt = match &*pace {
                            None => "user@isp.example",
                            Some(p) if n >= p.total => break,
                            Some(p) => {
                                let at =
                                    started + p.interval * u32::try_from(n).unwrap_or(u32::MAX);
                                thread::sleep(at.saturating_duration_since(Instant::now()));
                                &p.rcpts[n % p.rcpts.len()]
                            }
                        };
                        let start = started.elapsed();
                        let (relay, accepted, error) = session(target, hold, rcpt);
                        let record = Session {
                            start,
                            end: started.elapsed(),
                            relay,
                            rcpt: rcpt.to_owned(),
                            accepted,
                            error,
                        };
                        sessions.lock().unwrap().push(record);
                    }
                })
            })
            .collect();
        Self {
            started,
            stop,
            sessions,
            threads,
        }
    }

    /// Time since the load started (the clock of [`Session`]).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sessions recorded so far.
    pub fn snapshot(&self) -> Vec<Session> {
        self.sessions.lock().unwrap().clone()
    }

    /// Stops the workers (each finishes its session) and returns every session.
    pub fn stop(self) -> Vec<Session> {
        self.stop.store(true, Ordering::Relaxed);
        self.finish()
    }

    /// Waits until a paced load has run all its sessions; returns them.
    pub fn finish(self) -> Vec<Session> {
        for t in self.threads {
            t.join().expect("load worker panicked");
        }
        Arc::try_unwrap(self.sessions)
            .expect("workers are gone")
            .into_inner()
            .unwrap()
    }
}

/// One SMTP transaction. Returns the greeting's relay name, whether the
/// message got its `250`, and the error.
fn session(
    target: SocketAddr,
    hold: Duration,
    rcpt: &str,
) -> (Option<String>, bool, Option<String>) {
    let mut relay = None;
    let mut accepted = false;
    let result = (|| -> Result<(), String> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut w = stream.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(stream);
        let expect = |r: &mut BufReader<TcpStream>, code: &str| -> Result<String, String> {
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).map_err(|e| format!("read: {e}"))? == 0 {
                    return Err(format!("closed while waiting for {code}"));
                }
                if !line.starts_with(code) {
                    return Err(format!("wanted {code}, got {}", line.trim_end()));
                }
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Ok(line);
                }
            }
        };
        let greeting = expect(&mut r, "220")?;
        relay = greeting.split_whitespace().nth(1).map(str::to_owned);
        let mut send = |line: &str| {
            w.write_all(line.as_bytes())
                .map_err(|e| format!("write: {e}"))
        };
        send("EHLO load.lab.example\r\n")?;
        expect(&mut r, "250")?;
        send("MAIL FROM:<load@lab.example>\r\n")?;
        expect(&mut r, "250")?;
        thread::sleep(hold);
        send(&format!("RCPT TO:<{rcpt}>\r\n"))?;
        expect(&mut r, "250")?;
        send("DATA\r\n")?;
        expect(&mut r, "354")?;
        send("Subject: load\r\n\r\nhello\r\n.\r\n")?;
        expect(&mut r, "250")?;
        accepted = true;
        send("QUIT\r\n")?;
        expect(&mut r, "221")?;
        Ok(())
    })();
    (relay, accepted, result.err())
}
