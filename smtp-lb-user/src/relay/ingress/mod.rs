//! SMTP ingress: accept loop with a connection limit, and one session per
//! connection (RFC 5321 server side, PIPELINING RFC 2920, SIZE RFC 1870,
//! 8BITMIME RFC 6152, ENHANCEDSTATUSCODES RFC 2034, STARTTLS RFC 3207,
//! AUTH RFC 4954), and implicit-TLS listeners (port 465, RFC 8314 §3.3).
//!
//! Every client is bounded: a connection slot out of `max_connections`, at
//! most `max_connections_per_client` of them per address, a deadline on
//! every read, write and TLS handshake or shutdown, and a maximum session
//! duration.
//!
//! Only `<CRLF>.<CRLF>` ends the data; a bare CR or LF anywhere in the
//! data makes the whole message refused once the real end arrives, so
//! nothing "smuggled" after a `<LF>.<LF>` is ever read as commands
//! (CVE-2023-51764 class).
mod auth;
mod data;
mod session;
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::TcpListener,
    sync::{Semaphore, mpsc, watch},
    time::timeout,
};
use tracing::{debug, error};

use crate::relay::{
    config::{Cidr, Config, ListenerTls},
    dkim::Signers,
    metrics::Metrics,
    queue::Queue,
};

use self::session::{End, Session};

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
    session_timeout: Duration,
    per_client: usize,
    /// Open connections per client address.
    clients: Mutex<HashMap<IpAddr, usize>>,
    networks: Vec<Cidr>,
    users: HashMap<String, String>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: Arc<Semaphore>,
    dkim: Arc<Signers>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
}

fn load_tls(cfg: &crate::relay::config::TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
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
            session_timeout: cfg.timeouts.session,
            per_client: cfg.limits.max_connections_per_client,
            clients: Mutex::new(HashMap::new()),
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

/// A client address's share of the connection slots; released on drop.
struct ClientSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl ClientSlot {
    /// Takes one of `ip`'s slots; `None` when it has `per_client` already.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        // An IPv4 client on a dual-stack socket is one client either way.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        let mut clients = shared.clients.lock().expect("ingress clients lock");
        let n = clients.entry(ip).or_default();
        if shared.per_client > 0 && *n >= shared.per_client {
            return None;
        }
        *n += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self.shared.clients.lock().expect("ingress clients lock");
        if let Some(n) = clients.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over a limit with `421` and closes it, off the
/// accept loop and bounded by the write timeout.
fn refuse(shared: &Shared, mut socket: tokio::net::TcpStream, reply: String) {
    shared
        .metrics
        .ingress_connections_refused
        .fetch_add(1, Ordering::Relaxed);
    let t = shared.write_timeout;
    tokio::spawn(async move {
        let _ = timeout(t, socket.write_all(reply.as_bytes())).await;
    });
}

/// Accepts connections until `shutdown` flips; every session holds a clone
/// of `done` so the caller can wait for all of them (mini-redis pattern).
pub async fn serve(
    listener: TcpListener,
    submission: bool,
    tls: ListenerTls,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (socket, peer) = match accepted {
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
            refuse(
                &shared,
                socket,
                "421 4.7.0 Error: too many connections\r\n".to_owned(),
            );
            continue;
        };
        let Some(slot) = ClientSlot::take(&shared, peer.ip()) else {
            debug!(%peer, "refused: too many connections from this address");
            refuse(
                &shared,
                socket,
                format!(
                    "421 4.7.0 Error: too many connections from {}\r\n",
                    peer.ip()
                ),
            );
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
            let end = if tls == ListenerTls::Implicit {
                session.implicit_tls().await
            } else {
                Ok(())
            };
            let end = match end {
                Ok(()) => session.run().await,
                Err(e) => Err(e),
            };
            let close = match end {
                Ok(()) | Err(End::Closed) => true,
                Err(End::Timeout(phase)) => {
                    debug!(%peer, phase, "session timed out");
                    // A client that does not read gets no goodbye: a TLS
                    // close_notify would only wait on it again.
                    phase != "write"
                }
                Err(End::Io(e)) => {
                    debug!(%peer, error = %e, "session i/o error");
                    false
                }
            };
            if close {
                let _ = timeout(shared.write_timeout, session.stream.shutdown()).await;
            }
            shared
                .metrics
                .ingress_connections_active
                .fetch_sub(1, Ordering::Relaxed);
            drop(slot);
            drop(permit);
            drop(done);
        });
    }
}
