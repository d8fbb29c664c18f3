//! SMTP ingress: accept loop with a connection limit, and one session per
//! connection (RFC 5321 server side, PIPELINING RFC 2920, SIZE RFC 1870,
//! 8BITMIME RFC 6152, ENHANCEDSTATUSCODES RFC 2034, STARTTLS RFC 3207,
//! AUTH RFC 4954).
//!
//! Only `<CRLF>.<CRLF>` ends the data; a bare CR or LF anywhere in the
//! data makes the whole message refused once the real end arrives, so
//! nothing "smuggled" after a `<LF>.<LF>` is ever read as commands
//! (CVE-2023-51764 class).
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use base64::Engine as _;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, watch},
    time::timeout,
};
use tracing::{debug, error, info, warn};

use super::{
    config::{Cidr, Config},
    dkim::{self, Signers},
    dsn::rfc5322_date,
    metrics::Metrics,
    proto::{Command, MAX_COMMAND_LINE, MAX_TEXT_LINE, parse_command},
    queue::{Queue, QueuedMessage},
    stream::Stream,
};

/// What every session shares.
pub struct Shared {
    hostname: String,
    max_size: u64,
    max_recipients: usize,
    max_errors: u32,
    command_timeout: Duration,
    data_timeout: Duration,
    write_timeout: Duration,
    tls_timeout: Duration,
    networks: Vec<Cidr>,
    users: HashMap<String, String>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: Arc<Semaphore>,
    dkim: Arc<Signers>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
}

fn load_tls(cfg: &super::config::TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("read certificate {}", cfg.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse certificate {}", cfg.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("read key {}", cfg.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Shared {
    pub fn new(cfg: &Config, queue: Arc<Queue>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        Ok(Self {
            hostname: cfg.hostname.clone(),
            max_size: cfg.limits.max_message_size,
            max_recipients: cfg.limits.max_recipients.max(100),
            max_errors: cfg.limits.max_errors,
            command_timeout: cfg.timeouts.command,
            data_timeout: cfg.timeouts.data,
            write_timeout: cfg.timeouts.write,
            tls_timeout: cfg.timeouts.tls_handshake,
            networks: cfg
                .relay_networks
                .iter()
                .map(|n| Cidr::parse(n))
                .collect::<anyhow::Result<_>>()?,
            users: cfg
                .users
                .iter()
                .map(|u| (u.name.clone(), u.password.clone()))
                .collect(),
            tls: cfg.tls.as_ref().map(load_tls).transpose()?,
            limit: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            dkim: Arc::new(Signers::load(&cfg.dkim)?),
            queue,
            metrics,
        })
    }
}

/// Accepts connections until `shutdown` flips; every session holds a clone
/// of `done` so the caller can wait for all of them (mini-redis pattern).
pub async fn serve(
    listener: TcpListener,
    submission: bool,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (mut socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                error!(cause = %e, "failed to accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        shared
            .metrics
            .ingress_connections_total
            .fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
            shared
                .metrics
                .ingress_connections_refused
                .fetch_add(1, Ordering::Relaxed);
            let _ = timeout(
                Duration::from_secs(1),
                socket.write_all(b"421 4.7.0 Error: too many connections\r\n"),
            )
            .await;
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let done = done.clone();
        tokio::spawn(async move {
            shared
                .metrics
                .ingress_connections_active
                .fetch_add(1, Ordering::Relaxed);
            let mut session = Session::new(socket, peer, submission, shared.clone(), shutdown);
            match session.run().await {
                Ok(()) | Err(End::Closed) => {}
                Err(End::Timeout(phase)) => debug!(%peer, phase, "session timed out"),
                Err(End::Io(e)) => debug!(%peer, error = %e, "session i/o error"),
            }
            let _ = session.stream.shutdown().await;
            shared
                .metrics
                .ingress_connections_active
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
            drop(done);
        });
    }
}

/// Why a session ended.
enum End {
    Closed,
    Timeout(&'static str),
    Io(std::io::Error),
}

enum Line {
    Ok(Vec<u8>),
    TooLong,
    BareLf,
}

/// Result of reading DATA.
#[derive(Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent reasons to refuse one message"
)]
struct Data {
    body: Vec<u8>,
    bare: bool,
    nul: bool,
    long_line: bool,
    too_big: bool,
}

struct Session {
    stream: Stream,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    peer: SocketAddr,
    submission: bool,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    helo: Option<String>,
    esmtp: bool,
    authed: Option<String>,
    mail: Option<String>,
    rcpts: Vec<String>,
    errors: u32,
    discarding: bool,
}

impl Session {
    fn new(
        socket: TcpStream,
        peer: SocketAddr,
        submission: bool,
        shared: Arc<Shared>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            stream: Stream::Plain(socket),
            rbuf: Vec::with_capacity(8192),
            rpos: 0,
            wbuf: Vec::with_capacity(1024),
            peer,
            submission,
            shared,
            shutdown,
            helo: None,
            esmtp: false,
            authed: None,
            mail: None,
            rcpts: Vec::new(),
            errors: 0,
            discarding: false,
        }
    }

    fn reply(&mut self, text: &str) {
        self.wbuf.extend_from_slice(text.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
    }

    /// An error reply; too many of them end the session.
    fn error(&mut self, text: &str) -> bool {
        self.reply(text);
        self.errors += 1;
        if self.errors >= self.shared.max_errors {
            self.reply("421 4.7.0 Error: too many errors");
            return true;
        }
        false
    }

    async fn flush(&mut self) -> Result<(), End> {
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
    async fn fill(
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
        let old = self.rbuf.len();
        self.rbuf.resize(old + 16 * 1024, 0);
        let read = async { timeout(t, self.stream.read(&mut self.rbuf[old..])).await };
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
                self.rbuf.truncate(old);
                self.reply("421 4.3.2 Service shutting down, closing transmission channel");
                self.flush().await?;
                return Err(End::Closed);
            }
        } else {
            read.await
        };
        let n = match n {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                self.rbuf.truncate(old);
                return Err(End::Io(e));
            }
            Err(_) => {
                self.rbuf.truncate(old);
                self.reply("421 4.4.2 Error: timeout exceeded");
                let _ = self.flush().await;
                return Err(End::Timeout(phase));
            }
        };
        self.rbuf.truncate(old + n);
        if n == 0 {
            return Err(End::Closed);
        }
        Ok(())
    }

    async fn next_line(&mut self) -> Result<Line, End> {
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

    async fn run(&mut self) -> Result<(), End> {
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

    fn reset(&mut self) {
        self.mail = None;
        self.rcpts.clear();
    }

    fn ehlo_reply(&self, name: &str) -> String {
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

    fn auth_offered(&self) -> bool {
        self.submission
            && self.stream.is_tls()
            && !self.shared.users.is_empty()
            && self.authed.is_none()
    }

    /// Handles one command; `Ok(false)` ends the session.
    async fn command(&mut self, cmd: Command) -> Result<bool, End> {
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

    async fn starttls(&mut self) -> Result<bool, End> {
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
        let tcp = self.stream.take_plain().ok_or(End::Closed)?;
        let tls = timeout(self.shared.tls_timeout, acceptor.accept(tcp)).await;
        self.shared.metrics.tls("ingress", matches!(tls, Ok(Ok(_))));
        let tls = tls
            .map_err(|_| End::Timeout("TLS handshake"))?
            .map_err(End::Io)?;
        self.stream = Stream::ServerTls(Box::new(tls));
        // RFC 3207 §4.2: forget everything learned before TLS.
        self.rbuf.clear();
        self.rpos = 0;
        self.helo = None;
        self.esmtp = false;
        self.reset();
        Ok(true)
    }

    async fn auth_line(&mut self) -> Result<Option<Vec<u8>>, End> {
        self.flush().await?;
        match self.next_line().await? {
            Line::Ok(l) if l != b"*" => {
                Ok(base64::engine::general_purpose::STANDARD.decode(&l).ok())
            }
            _ => Ok(None),
        }
    }

    async fn auth(&mut self, mechanism: &str, initial: Option<String>) -> Result<(), End> {
        if !self.submission || self.shared.users.is_empty() {
            self.error("503 5.5.1 Error: authentication not enabled");
            return Ok(());
        }
        if !self.stream.is_tls() {
            self.error("530 5.7.0 Must issue a STARTTLS command first");
            return Ok(());
        }
        if self.authed.is_some() || self.mail.is_some() {
            self.error("503 5.5.1 Error: already authenticated or in a transaction");
            return Ok(());
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let creds = match mechanism {
            "PLAIN" => {
                let raw = match initial {
                    Some(i) if i == "=" => Some(Vec::new()),
                    Some(i) => b64.decode(i.as_bytes()).ok(),
                    None => {
                        self.reply("334 ");
                        self.auth_line().await?
                    }
                };
                raw.and_then(|r| {
                    let mut parts = r.split(|&b| b == 0);
                    let _authz = parts.next()?;
                    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
                    Some((user, pass))
                })
            }
            "LOGIN" => {
                let user = if let Some(i) = initial {
                    b64.decode(i.as_bytes()).ok()
                } else {
                    self.reply("334 VXNlcm5hbWU6");
                    self.auth_line().await?
                };
                match user {
                    Some(user) => {
                        self.reply("334 UGFzc3dvcmQ6");
                        self.auth_line().await?.and_then(|pass| {
                            Some((String::from_utf8(user).ok()?, String::from_utf8(pass).ok()?))
                        })
                    }
                    None => None,
                }
            }
            _ => {
                self.error("504 5.5.4 Unrecognized authentication type");
                return Ok(());
            }
        };
        match creds {
            Some((user, pass)) if self.shared.users.get(&user).is_some_and(|p| *p == pass) => {
                info!(peer = %self.peer, user, "authenticated");
                self.authed = Some(user);
                self.reply("235 2.7.0 Authentication successful");
            }
            _ => {
                warn!(peer = %self.peer, "authentication failed");
                self.error("535 5.7.8 Error: authentication failed");
            }
        }
        Ok(())
    }

    async fn read_data(&mut self) -> Result<Data, End> {
        let max = usize::try_from(self.shared.max_size).unwrap_or(usize::MAX);
        let mut d = Data::default();
        let mut prev_crlf = true;
        let mut in_long = false;
        loop {
            while let Some(i) = self.rbuf[self.rpos..].iter().position(|&b| b == b'\n') {
                let line = &self.rbuf[self.rpos..=self.rpos + i];
                self.rpos += i + 1;
                let crlf = line.len() >= 2 && line[line.len() - 2] == b'\r';
                if std::mem::take(&mut in_long) {
                    d.long_line = true;
                    prev_crlf = crlf;
                    continue;
                }
                let content = &line[..line.len() - if crlf { 2 } else { 1 }];
                if crlf && prev_crlf && content == b"." {
                    return Ok(d);
                }
                prev_crlf = crlf;
                d.bare |= !crlf || content.contains(&b'\r');
                d.nul |= content.contains(&0);
                d.long_line |= line.len() > MAX_TEXT_LINE;
                let content = content.strip_prefix(b".").unwrap_or(content);
                if d.body.len() + content.len() + 2 > max {
                    d.too_big = true;
                }
                if !(d.bare || d.nul || d.long_line || d.too_big) {
                    d.body.extend_from_slice(content);
                    d.body.extend_from_slice(b"\r\n");
                }
            }
            if self.rbuf.len() - self.rpos > MAX_TEXT_LINE {
                in_long = true;
                self.rpos = self.rbuf.len();
            }
            self.fill(self.shared.data_timeout, "data", false).await?;
        }
    }

    /// Prepends a `DKIM-Signature` when a key covers the `From:` domain. A
    /// signing failure is logged and counted, and the message goes on
    /// unsigned: refusing it would only move the problem to the client.
    /// `None` only if the signing task panicked (the caller answers `451`).
    async fn dkim_sign(&self, id: u64, message: Vec<u8>) -> Option<Vec<u8>> {
        if self.shared.dkim.is_empty() {
            return Some(message);
        }
        let signers = self.shared.dkim.clone();
        // Hashing a large body and an RSA signature are CPU work: keep them
        // off the session tasks' threads.
        let signed = tokio::task::spawn_blocking(move || {
            let outcome = signers.sign(&message);
            (outcome, message)
        })
        .await;
        let Ok((outcome, message)) = signed else {
            error!(id = format_args!("{id:016x}"), "DKIM signing task panicked");
            return None;
        };
        Some(match outcome {
            dkim::Outcome::Signed { header, domain } => {
                debug!(id = format_args!("{id:016x}"), domain, "DKIM signed");
                self.shared
                    .metrics
                    .dkim_signed
                    .fetch_add(1, Ordering::Relaxed);
                let mut out = Vec::with_capacity(header.len() + message.len());
                out.extend_from_slice(header.as_bytes());
                out.extend_from_slice(&message);
                out
            }
            dkim::Outcome::NoKey => message,
            dkim::Outcome::Failed(e) => {
                warn!(id = format_args!("{id:016x}"), error = %e, "DKIM signing failed; sending unsigned");
                self.shared
                    .metrics
                    .dkim_errors
                    .fetch_add(1, Ordering::Relaxed);
                message
            }
        })
    }

    async fn finish_data(&mut self, data: Data) {
        let sender = self.mail.take().unwrap_or_default();
        let rcpts = std::mem::take(&mut self.rcpts);
        if data.too_big {
            self.error("552 5.3.4 Error: message too large");
            return;
        }
        if data.bare {
            self.error(
                "554 5.6.0 Error: bare <CR> or <LF> in message data (only <CR><LF> allowed)",
            );
            return;
        }
        if data.nul {
            self.error("554 5.6.0 Error: NUL character in message data");
            return;
        }
        if data.long_line {
            self.error("554 5.6.0 Error: message line longer than 1000 octets");
            return;
        }
        let with = match (self.esmtp, self.stream.is_tls(), self.authed.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let for_clause = if rcpts.len() == 1 {
            format!("\r\n\tfor <{}>", rcpts[0])
        } else {
            String::new()
        };
        let queue = &self.shared.queue;
        let id = queue.spool().allocate_id();
        let received = format!(
            "Received: from {} ({})\r\n\tby {} (smtp-lb) with {with} id {id:016x}{for_clause};\r\n\t{}\r\n",
            self.helo.as_deref().unwrap_or("unknown"),
            self.peer.ip(),
            self.shared.hostname,
            rfc5322_date(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64
            ),
        );
        let mut body = Vec::with_capacity(received.len() + data.body.len());
        body.extend_from_slice(received.as_bytes());
        body.extend_from_slice(&data.body);
        drop(data);
        let Some(body) = self.dkim_sign(id, body).await else {
            self.reply("451 4.3.0 Error: local error in processing");
            return;
        };
        match queue.spool().store(id, &sender, &rcpts, &body).await {
            Ok((id, received_ms, location)) => {
                drop(body);
                self.shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                queue.submit(QueuedMessage::new(
                    id,
                    sender,
                    rcpts,
                    received_ms,
                    location,
                    HashSet::default(),
                ));
                let r = format!("250 2.0.0 Ok: queued as {id:016x}");
                self.reply(&r);
            }
            Err(e) => {
                self.shared
                    .metrics
                    .spool_errors
                    .fetch_add(1, Ordering::Relaxed);
                error!(peer = %self.peer, error = %e, "message not accepted: spool write failed");
                self.reply("451 4.3.0 Error: queue file write error");
            }
        }
    }
}
