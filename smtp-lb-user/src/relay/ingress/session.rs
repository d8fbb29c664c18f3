//! One SMTP server session: reading lines, the command loop, EHLO and
//! STARTTLS. AUTH and DATA are methods of the same `Session`, in `auth.rs`
//! and `data.rs` beside this file.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    time::timeout,
};

use crate::{
    relay::spool::Incoming,
    smtp::{
        command::{Command, MAX_COMMAND_LINE, parse_command},
        data::Refusal,
        stream::Stream,
    },
};

use super::Shared;

/// Room made for each read from the client.
const READ_CHUNK: usize = 16 * 1024;

/// Why a session ended.
pub(super) enum End {
    Closed,
    Timeout(&'static str),
    Io(std::io::Error),
}

pub(super) enum Line {
    Ok(Vec<u8>),
    TooLong,
    BareLf,
}

/// Result of reading DATA.
pub(super) struct Data {
    /// Streamed towards the spool: at most a bounded part is in memory.
    pub(super) body: Incoming,
    /// The body could not be written out (disk full, I/O error).
    pub(super) spool_error: Option<std::io::Error>,
    pub(super) refusal: Option<Refusal>,
}

pub(super) struct Session {
    pub(super) stream: Stream,
    pub(super) rbuf: Vec<u8>,
    pub(super) rpos: usize,
    pub(super) wbuf: Vec<u8>,
    pub(super) peer: SocketAddr,
    pub(super) submission: bool,
    pub(super) shared: Arc<Shared>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) helo: Option<String>,
    pub(super) esmtp: bool,
    pub(super) authed: Option<String>,
    pub(super) mail: Option<String>,
    pub(super) rcpts: Vec<String>,
    pub(super) errors: u32,
    pub(super) discarding: bool,
    /// When the session must end (`timeouts.session`), checked at every read.
    pub(super) deadline: Instant,
}

impl Session {
    pub(super) fn new(
        socket: TcpStream,
        peer: SocketAddr,
        submission: bool,
        shared: Arc<Shared>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            stream: Stream::Plain(socket),
            rbuf: Vec::with_capacity(READ_CHUNK),
            rpos: 0,
            wbuf: Vec::with_capacity(1024),
            peer,
            submission,
            shutdown,
            helo: None,
            esmtp: false,
            authed: None,
            mail: None,
            rcpts: Vec::new(),
            errors: 0,
            discarding: false,
            deadline: Instant::now() + shared.session_timeout,
            shared,
        }
    }

    pub(super) fn reply(&mut self, text: &str) {
        self.wbuf.extend_from_slice(text.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
    }

    /// An error reply; too many of them end the session.
    pub(super) fn error(&mut self, text: &str) -> bool {
        self.reply(text);
        self.errors += 1;
        if self.errors >= self.shared.max_errors {
            self.reply("421 4.7.0 Error: too many errors");
            return true;
        }
        false
    }

    pub(super) async fn flush(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let t = self.shared.write_timeout;
        timeout(t, self.stream.write_all(&self.wbuf))
            .await
            .map_err(|_| End::Timeout("write"))?
            .map_err(End::Io)?;
        timeout(t, self.stream.flush())
            .await
            .map_err(|_| End::Timeout("write"))?
            .map_err(End::Io)?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads more input; replies are flushed first (RFC 2920 §3.2: the
    /// server flushes when it would otherwise wait for input).
    pub(super) async fn fill(
        &mut self,
        t: Duration,
        phase: &'static str,
        interruptible: bool,
    ) -> Result<(), End> {
        self.flush().await?;
        if self.rpos > 0 && self.rpos * 2 >= self.rbuf.len() {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.reply("421 4.4.2 Error: maximum session time exceeded");
            let _ = self.flush().await;
            return Err(End::Timeout("session"));
        }
        // Into spare capacity: zeroing 16 KiB before each read cost more
        // than parsing what it brought.
        self.rbuf.reserve(READ_CHUNK);
        let read = async { timeout(t.min(left), self.stream.read_buf(&mut self.rbuf)).await };
        let n = if interruptible {
            let mut shutdown = self.shutdown.clone();
            let r = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => None,
                r = read => Some(r),
            };
            if let Some(r) = r {
                r
            } else {
                self.reply("421 4.3.2 Service shutting down, closing transmission channel");
                self.flush().await?;
                return Err(End::Closed);
            }
        } else {
            read.await
        };
        let n = match n {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(End::Io(e)),
            Err(_) => {
                let (text, phase) = if t < left {
                    ("421 4.4.2 Error: timeout exceeded", phase)
                } else {
                    ("421 4.4.2 Error: maximum session time exceeded", "session")
                };
                self.reply(text);
                let _ = self.flush().await;
                return Err(End::Timeout(phase));
            }
        };
        if n == 0 {
            return Err(End::Closed);
        }
        Ok(())
    }

    pub(super) async fn next_line(&mut self) -> Result<Line, End> {
        loop {
            if let Some(i) = self.rbuf[self.rpos..].iter().position(|&b| b == b'\n') {
                let raw = &self.rbuf[self.rpos..self.rpos + i];
                self.rpos += i + 1;
                if std::mem::take(&mut self.discarding) || raw.len() + 1 > MAX_COMMAND_LINE {
                    return Ok(Line::TooLong);
                }
                return Ok(match raw.strip_suffix(b"\r") {
                    Some(line) => Line::Ok(line.to_vec()),
                    None => Line::BareLf,
                });
            }
            if self.rbuf.len() - self.rpos > MAX_COMMAND_LINE {
                self.discarding = true;
                self.rpos = self.rbuf.len();
            }
            // A session with a transaction open finishes it before shutdown.
            let interruptible = self.mail.is_none();
            self.fill(self.shared.command_timeout, "command", interruptible)
                .await?;
        }
    }

    pub(super) async fn run(&mut self) -> Result<(), End> {
        let greeting = format!("220 {} ESMTP smtp-lb", self.shared.hostname);
        self.reply(&greeting);
        loop {
            let line = match self.next_line().await? {
                Line::Ok(l) => l,
                Line::TooLong => {
                    if self.error("500 5.5.2 Error: line too long") {
                        break;
                    }
                    continue;
                }
                Line::BareLf => {
                    if self.error("500 5.5.2 Error: bare <LF> received") {
                        break;
                    }
                    continue;
                }
            };
            let cmd = match parse_command(&line) {
                Ok(c) => c,
                Err(e) => {
                    if self.error(&e.reply()) {
                        break;
                    }
                    continue;
                }
            };
            if !self.command(cmd).await? {
                break;
            }
        }
        self.flush().await
    }

    pub(super) fn reset(&mut self) {
        self.mail = None;
        self.rcpts.clear();
    }

    pub(super) fn ehlo_reply(&self, name: &str) -> String {
        let mut lines = vec![
            format!("{} Hello {name}", self.shared.hostname),
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.shared.max_size),
            "8BITMIME".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
        ];
        if self.shared.tls.is_some() && !self.stream.is_tls() {
            lines.push("STARTTLS".to_owned());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_owned());
        }
        let n = lines.len();
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i + 1 == n { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    pub(super) fn auth_offered(&self) -> bool {
        self.submission
            && self.stream.is_tls()
            && !self.shared.users.is_empty()
            && self.authed.is_none()
    }

    /// Handles one command; `Ok(false)` ends the session.
    pub(super) async fn command(&mut self, cmd: Command) -> Result<bool, End> {
        match cmd {
            Command::Ehlo(name) => {
                self.reset();
                let r = self.ehlo_reply(&name);
                self.reply(&r);
                self.helo = Some(name);
                self.esmtp = true;
            }
            Command::Helo(name) => {
                self.reset();
                let r = format!("250 {}", self.shared.hostname);
                self.reply(&r);
                self.helo = Some(name);
                self.esmtp = false;
            }
            Command::Mail { from, params } => {
                if self.helo.is_none() {
                    return Ok(!self.error("503 5.5.1 Error: send HELO/EHLO first"));
                }
                if self.mail.is_some() {
                    return Ok(!self.error("503 5.5.1 Error: nested MAIL command"));
                }
                if self.submission && self.authed.is_none() {
                    return Ok(!self.error("530 5.7.0 Authentication required"));
                }
                for p in &params {
                    match (p.keyword.as_str(), p.value.as_deref()) {
                        ("SIZE", Some(v)) => match v.parse::<u64>() {
                            Ok(n) if n > self.shared.max_size => {
                                return Ok(
                                    !self.error("552 5.3.4 Message size exceeds fixed limit")
                                );
                            }
                            Ok(_) => {}
                            Err(_) => return Ok(!self.error("501 5.5.4 Bad SIZE parameter")),
                        },
                        ("BODY", Some(v))
                            if v.eq_ignore_ascii_case("8BITMIME")
                                || v.eq_ignore_ascii_case("7BIT") => {}
                        ("AUTH", _) => {}
                        _ => return Ok(!self.error("555 5.5.4 Unsupported MAIL parameter")),
                    }
                }
                self.mail = Some(from);
                self.reply("250 2.1.0 Ok");
            }
            Command::Rcpt { to, params } => {
                if self.mail.is_none() {
                    return Ok(!self.error("503 5.5.1 Error: need MAIL command"));
                }
                if !params.is_empty() {
                    return Ok(!self.error("555 5.5.4 Unsupported RCPT parameter"));
                }
                if self.rcpts.len() >= self.shared.max_recipients {
                    self.reply("452 4.5.3 Error: too many recipients");
                    return Ok(true);
                }
                let allowed = self.authed.is_some()
                    || (!self.submission
                        && self
                            .shared
                            .networks
                            .iter()
                            .any(|n| n.contains(self.peer.ip())));
                if !allowed {
                    return Ok(!self.error("554 5.7.1 Relay access denied"));
                }
                self.rcpts.push(to);
                self.reply("250 2.1.5 Ok");
            }
            Command::Data => {
                if self.mail.is_none() {
                    return Ok(!self.error("503 5.5.1 Error: need MAIL command"));
                }
                if self.rcpts.is_empty() {
                    return Ok(!self.error("554 5.5.1 Error: no valid recipients"));
                }
                self.reply("354 End data with <CR><LF>.<CR><LF>");
                let data = self.read_data().await?;
                self.finish_data(data).await;
            }
            Command::Rset => {
                self.reset();
                self.reply("250 2.0.0 Ok");
            }
            Command::Noop => self.reply("250 2.0.0 Ok"),
            Command::Quit => {
                self.reply("221 2.0.0 Bye");
                return Ok(false);
            }
            Command::Vrfy => self.reply("252 2.0.0 Cannot VRFY user, but will accept message"),
            Command::Help => self.reply("214 2.0.0 See RFC 5321"),
            Command::StartTls => return self.starttls().await,
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial).await?,
        }
        Ok(true)
    }

    pub(super) async fn starttls(&mut self) -> Result<bool, End> {
        let Some(acceptor) = self.shared.tls.clone() else {
            return Ok(!self.error("454 4.7.0 TLS not available"));
        };
        if self.stream.is_tls() {
            return Ok(!self.error("503 5.5.1 Error: TLS already active"));
        }
        if self.rpos < self.rbuf.len() {
            // RFC 3207 §4.2 and CVE-2011-0411: plaintext sent after STARTTLS
            // must never be read as if it came over TLS.
            self.reply("554 5.5.1 Error: command pipelining after STARTTLS");
            return Ok(false);
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.flush().await?;
        self.handshake(acceptor).await?;
        // RFC 3207 §4.2: forget everything learned before TLS.
        self.rbuf.clear();
        self.rpos = 0;
        self.helo = None;
        self.esmtp = false;
        self.reset();
        Ok(true)
    }

    /// On an implicit-TLS listener: the handshake before the greeting.
    pub(super) async fn implicit_tls(&mut self) -> Result<(), End> {
        let acceptor = self.shared.tls.clone().ok_or(End::Closed)?;
        self.handshake(acceptor).await
    }

    /// The server side of a TLS handshake, bounded by `timeouts.tls_handshake`.
    async fn handshake(&mut self, acceptor: tokio_rustls::TlsAcceptor) -> Result<(), End> {
        let tcp = self.stream.take_plain().ok_or(End::Closed)?;
        let tls = timeout(self.shared.tls_timeout, acceptor.accept(tcp)).await;
        self.shared.metrics.tls("ingress", matches!(tls, Ok(Ok(_))));
        let tls = tls
            .map_err(|_| End::Timeout("TLS handshake"))?
            .map_err(End::Io)?;
        self.stream = Stream::ServerTls(Box::new(tls));
        Ok(())
    }
}
