//! How the queue reaches a destination (`KumoMTA`'s `QueueDispatcher`): a
//! [`Dispatcher`] opens a [`Session`] to one address of one host from one
//! egress source; a session sends transactions and quits. The queue's
//! workers, connection limits and shaping are generic over it: the SMTP
//! client is one implementation, a scripted one in unit tests another.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::warn;

use super::super::{config::DeliveryConfig, egress::Source, route::Host};
use crate::smtp::client::{Client, ClientError, ClientTimeouts, Tls, Transaction};

/// A boxed future, so both traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens sessions to destination hosts.
pub trait Dispatcher: Send + Sync {
    /// Connects to `addr` of `host` from `source`, ready for a transaction.
    fn connect<'a>(
        &'a self,
        host: &'a Host,
        addr: SocketAddr,
        source: &'a Source,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, ClientError>>;
}

/// An open session with a destination host.
pub trait Session: Send {
    /// The host name (MX) this session is with.
    fn host(&self) -> &str;
    /// The peer's address.
    fn addr(&self) -> SocketAddr;
    /// The local (egress) address, once bound.
    fn local(&self) -> Option<SocketAddr>;
    /// Messages the host has acknowledged over this session.
    fn messages_sent(&self) -> usize;
    /// The session runs over TLS.
    fn is_tls(&self) -> bool;
    /// One transaction: replies the host gave (they may be refusals); an
    /// `Err` means the session is unusable.
    fn send<'a>(
        &'a mut self,
        sender: &'a str,
        rcpts: &'a [String],
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<Transaction, ClientError>>;
    /// Ends the session politely.
    fn quit(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Delivery over SMTP: STARTTLS when offered (opportunistic) or always
/// (hosts that require it). A host whose TLS handshake fails is tried again
/// at once in plain text, and gets plain text for a while after (Postfix
/// at level `may`), unless it requires TLS.
pub struct SmtpDispatcher {
    tls: Option<Arc<rustls::ClientConfig>>,
    timeouts: ClientTimeouts,
    require_tls: Vec<String>,
    plaintext_for: Duration,
    /// Hosts (name, port) in plain text until then, after a failed handshake.
    plaintext_until: Mutex<HashMap<(String, u16), Instant>>,
    /// Called once per fallback to plain text (the caller counts it).
    on_fallback: Box<dyn Fn() + Send + Sync>,
}

impl SmtpDispatcher {
    /// As `[delivery]` says: STARTTLS (if enabled), hosts that require it,
    /// the fallback period, the timeouts.
    pub fn new(d: &DeliveryConfig, on_fallback: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            tls: d.starttls.then(crate::tls::opportunistic_tls),
            timeouts: d.timeouts.clone(),
            require_tls: d
                .require_tls
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            plaintext_for: d.plaintext_fallback,
            plaintext_until: Mutex::new(HashMap::new()),
            on_fallback,
        }
    }

    /// Whether `host` is listed in `require_tls` (by name, or by a `.suffix`).
    fn requires_tls(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.require_tls.iter().any(|r| {
            if r.starts_with('.') {
                host.ends_with(r.as_str())
            } else {
                host == *r
            }
        })
    }

    /// Plain text for `host` at `port` for the fallback period.
    fn remember_plaintext(&self, host: &str, port: u16) {
        let mut plain = self.plaintext_until.lock().expect("fallback lock");
        let now = Instant::now();
        if plain.len() >= 10_000 {
            // Bounded: hosts whose period is over go first.
            plain.retain(|_, until| *until > now);
        }
        plain.insert((host.to_owned(), port), now + self.plaintext_for);
    }

    /// The TLS mode for a session with `host` at `port` now.
    fn tls_for(&self, host: &str, port: u16) -> Tls {
        let Some(config) = &self.tls else {
            return Tls::Off;
        };
        if self.requires_tls(host) {
            return Tls::Required(config.clone());
        }
        let mut plain = self.plaintext_until.lock().expect("fallback lock");
        let key = (host.to_owned(), port);
        match plain.get(&key) {
            Some(until) if *until > Instant::now() => Tls::Off,
            Some(_) => {
                plain.remove(&key);
                Tls::May(config.clone())
            }
            None => Tls::May(config.clone()),
        }
    }
}

impl Dispatcher for SmtpDispatcher {
    fn connect<'a>(
        &'a self,
        host: &'a Host,
        addr: SocketAddr,
        source: &'a Source,
    ) -> BoxFuture<'a, Result<Box<dyn Session>, ClientError>> {
        Box::pin(async move {
            let tls = self.tls_for(&host.name, addr.port());
            let connect = |tls| {
                Client::connect(
                    &host.name,
                    addr,
                    source.address,
                    &source.helo,
                    tls,
                    &self.timeouts,
                )
            };
            let client = match connect(&tls).await {
                Err(e) if e.is_tls_handshake() && matches!(tls, Tls::May(_)) => {
                    warn!(host = host.name, %addr, error = %e, plaintext_for = ?self.plaintext_for,
                        "TLS handshake failed; delivering in plain text");
                    (self.on_fallback)();
                    self.remember_plaintext(&host.name, addr.port());
                    connect(&Tls::Off).await?
                }
                other => other?,
            };
            Ok(Box::new(client) as Box<dyn Session>)
        })
    }
}

impl Session for Client {
    fn host(&self) -> &str {
        &self.host
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn local(&self) -> Option<SocketAddr> {
        self.local
    }

    fn messages_sent(&self) -> usize {
        self.messages_sent
    }

    fn is_tls(&self) -> bool {
        Client::is_tls(self)
    }

    fn send<'a>(
        &'a mut self,
        sender: &'a str,
        rcpts: &'a [String],
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<Transaction, ClientError>> {
        Box::pin(Client::send(self, sender, rcpts, body))
    }

    fn quit(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(Client::quit(*self))
    }
}
