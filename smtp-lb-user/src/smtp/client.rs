//! The delivery client: one SMTP connection to a destination host (RFC 5321
//! §3, §4.1; PIPELINING RFC 2920; SIZE RFC 1870; STARTTLS RFC 3207).
//!
//! The egress source is an explicit argument of [`Client::connect`]: the
//! socket is bound to it before `connect`, so source pools (issue 6) only
//! choose the address.
use std::{
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::ServerName;
use tokio::{
    io::AsyncWriteExt,
    net::TcpSocket,
    time::{Instant, timeout},
};

use serde::{Deserialize, Serialize};

use super::{
    reply::{Limits, ReadError, Reply, ReplyError, ReplyReader},
    stream::Stream,
};

/// The phase name of the TLS handshake, in errors and logs.
const TLS_HANDSHAKE: &str = "TLS handshake";

/// Message data is written in blocks of this size, each within
/// [`ClientTimeouts::data_block`].
const DATA_BLOCK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot bind to source {source_ip}: {error}")]
    Bind { source_ip: IpAddr, error: io::Error },
    #[error("connect to {addr}: {error}")]
    Connect { addr: SocketAddr, error: io::Error },
    #[error("timed out after {after:?} waiting for {phase}")]
    TimedOut {
        phase: &'static str,
        after: Duration,
    },
    #[error("attempt budget of {budget:?} spent waiting for {phase}")]
    OverBudget {
        phase: &'static str,
        budget: Duration,
    },
    #[error("{phase}: {error}")]
    Io {
        phase: &'static str,
        error: io::Error,
    },
    #[error("{phase}: {error}")]
    Protocol {
        phase: &'static str,
        error: ReplyError,
    },
    #[error("{phase} rejected: {reply}")]
    Rejected { phase: &'static str, reply: Reply },
}

impl ClientError {
    /// The source address is not configured on this host (a source to suspend).
    pub fn is_unplumbed(&self) -> bool {
        matches!(self, Self::Bind { error, .. } if error.kind() == io::ErrorKind::AddrNotAvailable)
    }

    /// The TLS handshake after `STARTTLS` failed (the plaintext session
    /// before it worked): a destination to try again without TLS.
    pub fn is_tls_handshake(&self) -> bool {
        matches!(
            self,
            Self::Io {
                phase: TLS_HANDSHAKE,
                ..
            } | Self::TimedOut {
                phase: TLS_HANDSHAKE,
                ..
            }
        )
    }

    /// The reply to log and act on: the server's own, or a local `4.4.x`.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Rejected { reply, .. } => reply.clone(),
            Self::Connect { .. } | Self::Bind { .. } => {
                Reply::local(451, "4.4.1", self.to_string())
            }
            Self::TimedOut { .. }
            | Self::OverBudget { .. }
            | Self::Io { .. }
            | Self::Protocol { .. } => Reply::local(451, "4.4.2", self.to_string()),
        }
    }
}

/// Client timeouts, one per SMTP phase (RFC 5321 §4.5.3.2 gives the
/// minimums for the phases of a transaction), and a budget for the whole.
///
/// Connecting and the TLS handshake are not in the RFC: their defaults are
/// short, so a dead MX host costs seconds, not minutes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTimeouts {
    /// TCP connect.
    #[serde(default = "ClientTimeouts::default_connect", with = "humantime_serde")]
    pub connect: Duration,
    /// The server's `220` greeting (RFC: 5 minutes).
    #[serde(default = "ClientTimeouts::default_5m", with = "humantime_serde")]
    pub greeting: Duration,
    /// The reply to `EHLO`/`HELO`.
    #[serde(default = "ClientTimeouts::default_5m", with = "humantime_serde")]
    pub ehlo: Duration,
    /// The reply to `STARTTLS`, and the TLS handshake after it.
    #[serde(default = "ClientTimeouts::default_starttls", with = "humantime_serde")]
    pub starttls: Duration,
    /// The reply to `MAIL` (RFC: 5 minutes).
    #[serde(default = "ClientTimeouts::default_5m", with = "humantime_serde")]
    pub mail_from: Duration,
    /// The reply to each `RCPT` (RFC: 5 minutes).
    #[serde(default = "ClientTimeouts::default_5m", with = "humantime_serde")]
    pub rcpt_to: Duration,
    /// The `354` to `DATA` (RFC: 2 minutes).
    #[serde(default = "ClientTimeouts::default_2m", with = "humantime_serde")]
    pub data: Duration,
    /// Each block of message data written (RFC: 3 minutes).
    #[serde(default = "ClientTimeouts::default_3m", with = "humantime_serde")]
    pub data_block: Duration,
    /// The reply to the final dot (RFC: 10 minutes).
    #[serde(default = "ClientTimeouts::default_10m", with = "humantime_serde")]
    pub data_done: Duration,
    /// Everything one attempt may take: from connect to the reply to the
    /// final dot of the first message, or one later transaction on a
    /// reused connection. A peer that answers each phase just in time
    /// (one byte a second) is cut off here.
    #[serde(default = "ClientTimeouts::default_budget", with = "humantime_serde")]
    pub budget: Duration,
}

impl ClientTimeouts {
    fn default_connect() -> Duration {
        Duration::from_secs(10)
    }
    fn default_starttls() -> Duration {
        Duration::from_secs(30)
    }
    fn default_2m() -> Duration {
        Duration::from_mins(2)
    }
    fn default_3m() -> Duration {
        Duration::from_mins(3)
    }
    fn default_5m() -> Duration {
        Duration::from_mins(5)
    }
    fn default_10m() -> Duration {
        Duration::from_mins(10)
    }
    fn default_budget() -> Duration {
        Duration::from_mins(15)
    }
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            connect: Self::default_connect(),
            greeting: Self::default_5m(),
            ehlo: Self::default_5m(),
            starttls: Self::default_starttls(),
            mail_from: Self::default_5m(),
            rcpt_to: Self::default_5m(),
            data: Self::default_2m(),
            data_block: Self::default_3m(),
            data_done: Self::default_10m(),
            budget: Self::default_budget(),
        }
    }
}

/// Whether a session upgrades with `STARTTLS`.
pub enum Tls {
    /// Plain text only.
    Off,
    /// When offered (Postfix `smtp_tls_security_level = may`).
    May(Arc<rustls::ClientConfig>),
    /// Always: a server without `STARTTLS` gets no mail (level `encrypt`).
    Required(Arc<rustls::ClientConfig>),
}

/// What the server offered in its EHLO reply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub pipelining: bool,
    pub starttls: bool,
    pub eightbitmime: bool,
    /// `SIZE n`; `Some(0)` means "no fixed limit".
    pub size: Option<u64>,
}

impl Caps {
    fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Self::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("PIPELINING") => caps.pipelining = true,
                Some("STARTTLS") => caps.starttls = true,
                Some("8BITMIME") => caps.eightbitmime = true,
                Some("SIZE") => {
                    caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                _ => {}
            }
        }
        caps
    }
}

/// Replies of one transaction: one per recipient, and the reply to the data.
#[derive(Debug)]
pub struct Transaction {
    pub rcpt_replies: Vec<Reply>,
    /// `None` when no recipient was accepted (no data was sent).
    pub data_reply: Option<Reply>,
}

impl Transaction {
    /// The outcome for recipient `i`: its RCPT reply if refused, else the data reply.
    pub fn outcome(&self, i: usize) -> &Reply {
        let r = &self.rcpt_replies[i];
        if r.is_positive() {
            self.data_reply.as_ref().unwrap_or(r)
        } else {
            r
        }
    }
}

/// An open SMTP session with a destination host.
pub struct Client {
    stream: Stream,
    replies: ReplyReader,
    pub caps: Caps,
    /// The host name (MX) this connection is for.
    pub host: String,
    pub addr: SocketAddr,
    /// The bound local address.
    pub local: Option<SocketAddr>,
    timeouts: ClientTimeouts,
    /// When the current attempt's [`ClientTimeouts::budget`] is spent.
    deadline: Instant,
    pub messages_sent: usize,
}

impl Client {
    /// Connects (bound to `source` if given), reads the greeting, says EHLO
    /// (HELO if EHLO is refused) and upgrades with STARTTLS as `tls` says.
    pub async fn connect(
        host: &str,
        addr: SocketAddr,
        source: Option<IpAddr>,
        helo: &str,
        tls: &Tls,
        timeouts: &ClientTimeouts,
    ) -> Result<Self, ClientError> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|error| ClientError::Connect { addr, error })?;
        let deadline = Instant::now() + timeouts.budget;
        if let Some(source_ip) = source {
            socket
                .bind(SocketAddr::new(source_ip, 0))
                .map_err(|error| ClientError::Bind { source_ip, error })?;
        }
        let tcp = within(
            deadline,
            timeouts,
            "connect",
            timeouts.connect,
            socket.connect(addr),
        )
        .await?
        .map_err(|error| ClientError::Connect { addr, error })?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let mut client = Self {
            stream: Stream::Plain(tcp),
            replies: ReplyReader::new(Limits::CLIENT),
            caps: Caps::default(),
            host: host.to_owned(),
            addr,
            local,
            timeouts: timeouts.clone(),
            deadline,
            messages_sent: 0,
        };
        let greeting = client.read_reply("greeting", timeouts.greeting).await?;
        if !greeting.is_positive() {
            return Err(ClientError::Rejected {
                phase: "greeting",
                reply: greeting,
            });
        }
        client.hello(helo).await?;
        let (Tls::May(config) | Tls::Required(config)) = tls else {
            return Ok(client);
        };
        let required = matches!(tls, Tls::Required(_));
        if client.caps.starttls {
            client
                .write(b"STARTTLS\r\n", "STARTTLS", timeouts.starttls)
                .await?;
            let reply = client.read_reply("STARTTLS", timeouts.starttls).await?;
            if reply.code == 220 {
                let tcp = client.stream.take_plain().expect("plain before STARTTLS");
                let name = ServerName::try_from(host.trim_end_matches('.').to_owned())
                    .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()));
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls_stream = within(
                    deadline,
                    timeouts,
                    TLS_HANDSHAKE,
                    timeouts.starttls,
                    connector.connect(name, tcp),
                )
                .await?
                .map_err(|error| ClientError::Io {
                    phase: TLS_HANDSHAKE,
                    error,
                })?;
                client.stream = Stream::ClientTls(Box::new(tls_stream));
                client.replies.clear();
                client.hello(helo).await?;
            } else if required {
                return Err(ClientError::Rejected {
                    phase: "STARTTLS",
                    reply,
                });
            }
        } else if required {
            return Err(ClientError::Rejected {
                phase: "EHLO",
                reply: Reply::local(
                    451,
                    "4.7.4",
                    format!("TLS is required for {host} and it does not offer STARTTLS"),
                ),
            });
        }
        Ok(client)
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    async fn hello(&mut self, helo: &str) -> Result<(), ClientError> {
        let t = self.timeouts.ehlo;
        self.write(format!("EHLO {helo}\r\n").as_bytes(), "EHLO", t)
            .await?;
        let reply = self.read_reply("EHLO", t).await?;
        if reply.is_positive() {
            self.caps = Caps::from_ehlo(&reply);
            return Ok(());
        }
        self.write(format!("HELO {helo}\r\n").as_bytes(), "HELO", t)
            .await?;
        let reply = self.read_reply("HELO", t).await?;
        if !reply.is_positive() {
            return Err(ClientError::Rejected {
                phase: "HELO",
                reply,
            });
        }
        self.caps = Caps::default();
        Ok(())
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        phase: &'static str,
        after: Duration,
    ) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        within(self.deadline, &self.timeouts, phase, after, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await?
        .map_err(|error| ClientError::Io { phase, error })
    }

    async fn read_reply(
        &mut self,
        phase: &'static str,
        after: Duration,
    ) -> Result<Reply, ClientError> {
        within(
            self.deadline,
            &self.timeouts,
            phase,
            after,
            self.replies.read(&mut self.stream),
        )
        .await?
        .map_err(|e| match e {
            ReadError::Io(error) => ClientError::Io { phase, error },
            ReadError::Closed => ClientError::Io {
                phase,
                error: io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()),
            },
            ReadError::Reply(error) => ClientError::Protocol { phase, error },
        })
    }

    /// Sends one message to several recipients. Replies the server gave are
    /// returned (they may be refusals); an `Err` means the connection is unusable.
    pub async fn send(
        &mut self,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> Result<Transaction, ClientError> {
        let t = self.timeouts.clone();
        if self.messages_sent > 0 {
            // A reused connection: this transaction gets a budget of its own.
            self.deadline = Instant::now() + t.budget;
        }
        let mut mail = format!("MAIL FROM:<{sender}>");
        if self.caps.size.is_some() {
            let _ = write!(mail, " SIZE={}", body.len());
        }
        if self.caps.eightbitmime && body.iter().any(|b| *b >= 0x80) {
            mail.push_str(" BODY=8BITMIME");
        }
        mail.push_str("\r\n");
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        let accepted;
        if self.caps.pipelining {
            // RFC 2920 §3.1: MAIL, RCPT… and DATA may go in one write.
            let mut batch = mail.into_bytes();
            for r in rcpts {
                batch.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.write(&batch, "MAIL FROM", t.mail_from).await?;
            let mail_reply = self.read_reply("MAIL FROM", t.mail_from).await?;
            if mail_reply.code == 421 {
                // The server is closing (RFC 5321 §3.8): the pipelined replies
                // will never come; keep this one (e.g. Gmail's 421 4.7.28).
                return Err(ClientError::Rejected {
                    phase: "MAIL FROM",
                    reply: mail_reply,
                });
            }
            for _ in rcpts {
                let r = self.read_reply("RCPT TO", t.rcpt_to).await?;
                rcpt_replies.push(if mail_reply.is_positive() {
                    r
                } else {
                    mail_reply.clone()
                });
            }
            accepted = rcpt_replies.iter().any(Reply::is_positive);
            let data = self.read_reply("DATA", t.data).await?;
            if data.code != 354 {
                if accepted {
                    // Every accepted recipient gets the DATA refusal.
                    for r in &mut rcpt_replies {
                        if r.is_positive() {
                            *r = data.clone();
                        }
                    }
                }
                self.rset().await?;
                return Ok(Transaction {
                    rcpt_replies,
                    data_reply: None,
                });
            }
            if !accepted {
                // 354 without recipients: finish the empty message and forget it.
                self.write(b".\r\n", "DATA", t.data_done).await?;
                let _ = self.read_reply("end of data", t.data_done).await?;
                return Ok(Transaction {
                    rcpt_replies,
                    data_reply: None,
                });
            }
        } else {
            self.write(mail.as_bytes(), "MAIL FROM", t.mail_from)
                .await?;
            let mail_reply = self.read_reply("MAIL FROM", t.mail_from).await?;
            if !mail_reply.is_positive() {
                self.rset().await?;
                return Ok(Transaction {
                    rcpt_replies: vec![mail_reply; rcpts.len()],
                    data_reply: None,
                });
            }
            for r in rcpts {
                self.write(
                    format!("RCPT TO:<{r}>\r\n").as_bytes(),
                    "RCPT TO",
                    t.rcpt_to,
                )
                .await?;
                rcpt_replies.push(self.read_reply("RCPT TO", t.rcpt_to).await?);
            }
            if !rcpt_replies.iter().any(Reply::is_positive) {
                self.rset().await?;
                return Ok(Transaction {
                    rcpt_replies,
                    data_reply: None,
                });
            }
            self.write(b"DATA\r\n", "DATA", t.data).await?;
            let data = self.read_reply("DATA", t.data).await?;
            if data.code != 354 {
                for r in &mut rcpt_replies {
                    if r.is_positive() {
                        *r = data.clone();
                    }
                }
                self.rset().await?;
                return Ok(Transaction {
                    rcpt_replies,
                    data_reply: None,
                });
            }
        }
        let stuffed = dot_stuff(body);
        for block in stuffed.chunks(DATA_BLOCK) {
            self.write(block, "data block", t.data_block).await?;
        }
        let reply = self.read_reply("end of data", t.data_done).await?;
        self.messages_sent += 1;
        Ok(Transaction {
            rcpt_replies,
            data_reply: Some(reply),
        })
    }

    async fn rset(&mut self) -> Result<(), ClientError> {
        self.write(b"RSET\r\n", "RSET", self.timeouts.mail_from)
            .await?;
        self.read_reply("RSET", self.timeouts.mail_from)
            .await
            .map(drop)
    }

    /// Ends the session politely; errors are irrelevant by now.
    pub async fn quit(mut self) {
        // QUIT has its own few seconds, whatever is left of the budget.
        self.deadline = Instant::now() + Duration::from_secs(5);
        if self
            .write(b"QUIT\r\n", "QUIT", Duration::from_secs(5))
            .await
            .is_ok()
        {
            let _ = self.read_reply("QUIT", Duration::from_secs(5)).await;
        }
        let _ = self.stream.shutdown().await;
    }
}

/// Runs `fut` within `after` and within what is left until `deadline`;
/// which of the two ran out is in the error.
async fn within<T>(
    deadline: Instant,
    timeouts: &ClientTimeouts,
    phase: &'static str,
    after: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, ClientError> {
    let left = deadline.saturating_duration_since(Instant::now());
    timeout(after.min(left), fut).await.map_err(|_| {
        if left < after {
            ClientError::OverBudget {
                phase,
                budget: timeouts.budget,
            }
        } else {
            ClientError::TimedOut { phase, after }
        }
    })
}

/// RFC 5321 §4.5.2: a line starting with "." gets one more; the message ends
/// with CRLF, then `.` CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    // Copied a run at a time: only a line that starts with a dot needs one more.
    let mut copied = 0;
    let line_starts = std::iter::once(0).chain(memchr::memchr_iter(b'\n', body).map(|i| i + 1));
    for at in line_starts {
        if body.get(at) == Some(&b'.') {
            out.extend_from_slice(&body[copied..at]);
            out.push(b'.');
            copied = at;
        }
    }
    out.extend_from_slice(&body[copied..]);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_terminates() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(dot_stuff(b"."), b"..\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b"\r\n.\r\n");
        assert_eq!(dot_stuff(b"a\n.\n.b"), b"a\n..\n..b\r\n.\r\n");
    }
}
