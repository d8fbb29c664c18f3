//! One SMTP health probe of one relay port, in that port's dialect.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
        BufReader,
    },
    net::TcpStream,
    time::timeout,
};

use super::{HealthCheckConfig, Tls};

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

/// A complete SMTP reply: the code and the text of its last line.
struct Reply {
    code: u16,
    text: String,
    lines: Vec<String>,
}

/// Longest reply line accepted (RFC 5321 §4.5.3.1.5: 512 octets).
const MAX_LINE: usize = 512;
/// Most lines in one multi-line reply before the probe gives up.
const MAX_LINES: usize = 100;

async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R, phase: Phase) -> Result<Reply, ProbeError> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = (&mut *r)
            .take(MAX_LINE as u64 + 2)
            .read_line(&mut line)
            .await
            .map_err(|source| ProbeError::Io { phase, source })?;
        if n == 0 {
            return Err(ProbeError::Io {
                phase,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        let malformed = || ProbeError::Malformed {
            phase,
            line: line.clone(),
        };
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(malformed)?;
        let sep = line.as_bytes().get(3).copied();
        let text = line.get(4..).unwrap_or_default().to_owned();
        lines.push(text.clone());
        match sep {
            None | Some(b' ') => return Ok(Reply { code, text, lines }),
            Some(b'-') if lines.len() < MAX_LINES => {}
            _ => return Err(malformed()),
        }
    }
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

async fn command<S: AsyncBufRead + AsyncWrite + Unpin>(
    s: &mut S,
    line: &str,
    phase: Phase,
) -> Result<Reply, ProbeError> {
    s.write_all(line.as_bytes())
        .await
        .map_err(|source| ProbeError::Io { phase, source })?;
    s.flush()
        .await
        .map_err(|source| ProbeError::Io { phase, source })?;
    read_reply(s, phase).await
}

fn expect(reply: Reply, code: u16, phase: Phase) -> Result<Reply, ProbeError> {
    if reply.code == code {
        Ok(reply)
    } else {
        Err(ProbeError::Rejected {
            phase,
            code: reply.code,
            text: reply.text,
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
    if tls == Tls::Implicit {
        let tls = step(
            Phase::Handshake,
            t.handshake,
            handshake(tcp, addr, Phase::Handshake),
        )
        .await?;
        let mut s = BufReader::new(tls);
        greet(&mut s, &ehlo, cfg).await?;
        quit(&mut s, t.quit).await;
        return Ok(started.elapsed());
    }
    let mut s = BufReader::new(tcp);
    let caps = greet(&mut s, &ehlo, cfg).await?;
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
                command(&mut s, "STARTTLS\r\n", Phase::Starttls).await?,
                220,
                Phase::Starttls,
            )?;
            let mut tls = BufReader::new(handshake(s.into_inner(), addr, Phase::Starttls).await?);
            expect(
                command(&mut tls, &ehlo, Phase::Starttls).await?,
                250,
                Phase::Starttls,
            )?;
            Ok(tls)
        })
        .await?;
        quit(&mut tls, t.quit).await;
    } else {
        quit(&mut s, t.quit).await;
    }
    Ok(started.elapsed())
}

/// The greeting (`220`; `421` and `554` mean full and down) and `EHLO`;
/// returns the `EHLO` reply (its capabilities).
async fn greet<S: AsyncBufRead + AsyncWrite + Unpin>(
    s: &mut S,
    ehlo: &str,
    cfg: &HealthCheckConfig,
) -> Result<Reply, ProbeError> {
    let t = &cfg.timeouts;
    step(Phase::Greeting, t.greeting, async {
        expect(read_reply(s, Phase::Greeting).await?, 220, Phase::Greeting)
    })
    .await?;
    step(Phase::Ehlo, t.ehlo, async {
        expect(command(s, ehlo, Phase::Ehlo).await?, 250, Phase::Ehlo)
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
async fn quit<S: AsyncBufRead + AsyncWrite + AsyncRead + Unpin>(s: &mut S, limit: Duration) {
    let _ = timeout(limit, command(s, "QUIT\r\n", Phase::Quit)).await;
    let _ = s.shutdown().await;
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
