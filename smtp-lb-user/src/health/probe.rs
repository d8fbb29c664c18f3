//! One SMTP health probe of one relay port, in that port's dialect.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use super::{HealthCheckConfig, Tls};
use crate::smtp::reply::{Limits, ReadError, Reply, ReplyError, ReplyReader};

/// The step of a probe that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Connect,
    /// The TLS handshake of implicit TLS (465), before the greeting.
    Handshake,
    Greeting,
    Ehlo,
    Starttls,
    Quit,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Handshake => "TLS handshake",
            Self::Greeting => "greeting",
            Self::Ehlo => "EHLO",
            Self::Starttls => "STARTTLS",
            Self::Quit => "QUIT",
        })
    }
}

/// Why a relay failed its probe.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("{phase}: timed out after {after:?}")]
    TimedOut { phase: Phase, after: Duration },
    #[error("{phase}: {source}")]
    Io {
        phase: Phase,
        #[source]
        source: std::io::Error,
    },
    /// The relay answered, but not with what a working relay answers.
    #[error("{phase}: relay answered {code} {text}")]
    Rejected {
        phase: Phase,
        code: u16,
        text: String,
    },
    #[error("{phase}: malformed reply {line:?}")]
    Malformed { phase: Phase, line: String },
    #[error("STARTTLS: relay does not offer it in its EHLO reply")]
    NoStarttls,
    /// The TLS handshake failed (after `STARTTLS`, or first thing on an
    /// implicit-TLS port).
    #[error("{phase}: handshake failed: {source}")]
    Tls {
        phase: Phase,
        #[source]
        source: std::io::Error,
    },
}

impl ProbeError {
    /// The relay greeted with `421`: alive but at capacity (or closing).
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            Self::Rejected {
                phase: Phase::Greeting,
                code: 421,
                ..
            }
        )
    }
}

/// Reads one reply within [`Limits::PROBE`] (512-octet lines, 100 lines).
async fn read_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    replies: &mut ReplyReader,
    phase: Phase,
) -> Result<Reply, ProbeError> {
    replies.read(s).await.map_err(|e| match e {
        ReadError::Io(source) => ProbeError::Io { phase, source },
        ReadError::Closed => ProbeError::Io {
            phase,
            source: std::io::ErrorKind::UnexpectedEof.into(),
        },
        ReadError::Reply(ReplyError::Malformed(line)) => ProbeError::Malformed { phase, line },
        ReadError::Reply(e) => ProbeError::Malformed {
            phase,
            line: e.to_string(),
        },
    })
}

async fn step<T>(
    phase: Phase,
    limit: Duration,
    f: impl Future<Output = Result<T, ProbeError>>,
) -> Result<T, ProbeError> {
    timeout(limit, f).await.map_err(|_| ProbeError::TimedOut {
        phase,
        after: limit,
    })?
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    replies: &mut ReplyReader,
    line: &str,
    phase: Phase,
) -> Result<Reply, ProbeError> {
    s.write_all(line.as_bytes())
        .await
        .map_err(|source| ProbeError::Io { phase, source })?;
    s.flush()
        .await
        .map_err(|source| ProbeError::Io { phase, source })?;
    read_reply(s, replies, phase).await
}

fn expect(reply: Reply, code: u16, phase: Phase) -> Result<Reply, ProbeError> {
    if reply.code == code {
        Ok(reply)
    } else {
        Err(ProbeError::Rejected {
            phase,
            code: reply.code,
            text: last_line(&reply),
        })
    }
}

/// Probes the relay port at `addr` in dialect `tls`. Returns how long it took.
pub async fn probe(
    addr: SocketAddr,
    tls: Tls,
    cfg: &HealthCheckConfig,
) -> Result<Duration, ProbeError> {
    let started = Instant::now();
    let t = &cfg.timeouts;
    let tcp = step(Phase::Connect, t.connect, async {
        TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Io {
                phase: Phase::Connect,
                source,
            })
    })
    .await?;
    let _ = tcp.set_nodelay(true);
    let ehlo = format!("EHLO {}\r\n", cfg.helo_name);
    let mut replies = ReplyReader::new(Limits::PROBE);
    if tls == Tls::Implicit {
        let mut s = step(
            Phase::Handshake,
            t.handshake,
            handshake(tcp, addr, Phase::Handshake),
        )
        .await?;
        greet(&mut s, &mut replies, &ehlo, cfg).await?;
        quit(&mut s, &mut replies, t.quit).await;
        return Ok(started.elapsed());
    }
    let mut s = tcp;
    let caps = greet(&mut s, &mut replies, &ehlo, cfg).await?;
    if tls == Tls::Starttls {
        if !caps
            .lines
            .iter()
            .any(|l| l.eq_ignore_ascii_case("STARTTLS"))
        {
            return Err(ProbeError::NoStarttls);
        }
        let mut tls = step(Phase::Starttls, t.starttls, async {
            expect(
                command(&mut s, &mut replies, "STARTTLS\r\n", Phase::Starttls).await?,
                220,
                Phase::Starttls,
            )?;
            // Bytes sent in the clear before the handshake are not replies.
            replies.clear();
            let mut tls = handshake(s, addr, Phase::Starttls).await?;
            expect(
                command(&mut tls, &mut replies, &ehlo, Phase::Starttls).await?,
                250,
                Phase::Starttls,
            )?;
            Ok(tls)
        })
        .await?;
        quit(&mut tls, &mut replies, t.quit).await;
    } else {
        quit(&mut s, &mut replies, t.quit).await;
    }
    Ok(started.elapsed())
}

/// The greeting (`220`; `421` and `554` mean full and down) and `EHLO`;
/// returns the `EHLO` reply (its capabilities).
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    replies: &mut ReplyReader,
    ehlo: &str,
    cfg: &HealthCheckConfig,
) -> Result<Reply, ProbeError> {
    let t = &cfg.timeouts;
    step(Phase::Greeting, t.greeting, async {
        expect(
            read_reply(s, replies, Phase::Greeting).await?,
            220,
            Phase::Greeting,
        )
    })
    .await?;
    step(Phase::Ehlo, t.ehlo, async {
        expect(
            command(s, replies, ehlo, Phase::Ehlo).await?,
            250,
            Phase::Ehlo,
        )
    })
    .await
}

/// A TLS client handshake on `tcp` (certificate not verified).
async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    phase: Phase,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProbeError> {
    tls_connector()
        .connect(server_name(addr), tcp)
        .await
        .map_err(|source| ProbeError::Tls { phase, source })
}

/// Says goodbye. A relay that does not answer `QUIT` in time still passed:
/// it took mail up to here, and the connection is closed either way.
async fn quit<S: AsyncWrite + AsyncRead + Unpin>(
    s: &mut S,
    replies: &mut ReplyReader,
    limit: Duration,
) {
    let _ = timeout(limit, command(s, replies, "QUIT\r\n", Phase::Quit)).await;
    let _ = s.shutdown().await;
}

/// The last line as the relay sent it (enhanced code included), for errors.
fn last_line(reply: &Reply) -> String {
    let text = reply.lines.last().map_or("", String::as_str);
    match reply.enhanced {
        Some(e) => format!("{e} {text}").trim_end().to_owned(),
        None => text.to_owned(),
    }
}

fn server_name(addr: SocketAddr) -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(addr.ip().into())
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    use std::sync::OnceLock;
    static CONNECTOR: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| tokio_rustls::TlsConnector::from(crate::tls::opportunistic_tls()))
        .clone()
}
