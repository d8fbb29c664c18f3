//! How the queue reaches a destination (`KumoMTA`'s `QueueDispatcher`): a
//! [`Dispatcher`] opens a [`Session`] to one address of one host from one
//! egress source; a session sends transactions and quits. The queue's
//! workers, connection limits and shaping are generic over it: the SMTP
//! client is one implementation, a scripted one in unit tests another.
use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use super::super::{config::DeliveryConfig, egress::Source, route::Host};
use crate::smtp::client::{Client, ClientError, ClientTimeouts, Transaction};

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

/// Delivery over SMTP (opportunistic STARTTLS when `tls` is given).
pub struct SmtpDispatcher {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub timeouts: ClientTimeouts,
}

impl SmtpDispatcher {
    /// As `[delivery]` says: STARTTLS when offered (if enabled), its timeouts.
    pub fn new(d: &DeliveryConfig) -> Self {
        Self {
            tls: d.starttls.then(crate::tls::opportunistic_tls),
            timeouts: d.timeouts.clone(),
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
            let client = Client::connect(
                &host.name,
                addr,
                source.address,
                &source.helo,
                self.tls.as_ref(),
                &self.timeouts,
            )
            .await?;
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
