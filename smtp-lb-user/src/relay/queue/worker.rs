//! The delivery loop of one ready queue: take a connection slot, open a
//! session through the [`Dispatcher`](super::Dispatcher), send jobs of one
//! domain over it, settle each attempt.
use std::{sync::Arc, time::Instant};

use tracing::{debug, warn};

use super::{
    Queue,
    dispatch::Session,
    message::Job,
    outcome::{self, Action},
    ready::{Next, PairKey, ReadyJob, Wake, destination},
    settle::AttemptContext,
};
use crate::{
    relay::{
        policy::{limiter::ConnectionPermit, shaping::PairShaper},
        route::Host,
    },
    smtp::{client::ClientError, reply::Reply},
};

/// An open session, and whether it may wait idle for more mail.
struct Connection {
    session: Box<dyn Session>,
    may_park: bool,
}

/// How connecting to a destination ended.
enum Connect {
    Open(Box<dyn Session>),
    /// The source is not configured on this host and the pool has others:
    /// the jobs were routed again.
    Rerouted,
    /// Every host failed (the last error stands for all).
    Failed(ClientError),
}

impl Queue {
    /// Delivers the jobs of one (source, provider): one connection at a
    /// time, reused for following jobs to the same destination.
    pub(super) async fn worker(self: Arc<Self>, key: PairKey) {
        let source = &self.egress.sources[key.0];
        let labels = (key.1.clone(), source.name.clone());
        while let Some(ReadyJob {
            job: first,
            hosts,
            dest,
        }) = self
            .ready
            .pop(&key, self.destination_connections, self.stopping())
        {
            let started = Instant::now();
            // Taken per connection (and per message below), so a reloaded
            // shaping file applies without waiting for this worker to end.
            let shaper = self.shaper().for_pair(&source.name, source.address, &key.1);
            // Held for the whole connection; dropped when the worker leaves it.
            let slots = shaper.connection();
            tokio::pin!(slots);
            let permits = tokio::select! {
                biased;
                slots = &mut slots => slots,
                () = std::future::ready(()) => {
                    // Every slot is taken: an idle connection gives its up.
                    self.ready.evict_parked(&key);
                    slots.await
                }
            };
            self.ready.connecting_done(&key);
            self.metrics.throttled(&labels, started.elapsed());
            // An idle connection would keep its cluster lease while another
            // relay's mail waits for it (Redis cannot ask this relay to give
            // way), so a connection holding one leaves when it runs dry.
            let may_park = !permits.iter().flatten().any(ConnectionPermit::is_shared);
            match self.connect(&key, &hosts, first).await {
                (Connect::Open(session), Some(first)) => {
                    let conn = Connection { session, may_park };
                    self.deliver(&key, &labels, &shaper, &hosts, conn, first)
                        .await;
                }
                (Connect::Failed(err), Some(first)) => {
                    // Every host failed: the destination is down for all its queued jobs.
                    let reply = err.reply();
                    let action = if reply.is_permanent() {
                        Action::Bounce
                    } else {
                        Action::Reply
                    };
                    let ctx = AttemptContext {
                        mx: hosts.last().map(|h| h.name.clone()),
                        ip: hosts
                            .last()
                            .and_then(|h| h.addrs.last())
                            .map(std::net::SocketAddr::ip),
                        source: source.address,
                        provider: Some(labels.clone()),
                        started,
                    };
                    let domain = first.domain.clone();
                    for job in std::iter::once(first).chain(self.ready.drain(&key, Some(&domain))) {
                        self.finish_all(job, &reply, &ctx, action).await;
                    }
                }
                _ => {}
            }
            self.ready.release(&key, &dest);
        }
    }

    /// Tries each address of each host in order. An unplumbed source is
    /// suspended; if its pool has other sources, `first` and every job of
    /// `key` are routed again (and `first` is not given back).
    async fn connect(
        self: &Arc<Self>,
        key: &PairKey,
        hosts: &[Host],
        first: Job,
    ) -> (Connect, Option<Job>) {
        let source = &self.egress.sources[key.0];
        let mut last_err = None;
        for host in hosts {
            for addr in &host.addrs {
                let tried = Instant::now();
                let attempt = self.dispatcher.connect(host, *addr, source).await;
                self.metrics.connect_attempt(
                    &key.1,
                    tried.elapsed(),
                    attempt.as_ref().map(|s| s.is_tls()),
                );
                match attempt {
                    Ok(s) => return (Connect::Open(s), Some(first)),
                    Err(e) if e.is_unplumbed() => {
                        // The source, not the destination, is broken: its
                        // jobs go to other sources without an attempt.
                        let tenant = first.msg.headers.get().and_then(|h| h.tenant.as_deref());
                        let pool = self.egress.pool_for(&first.msg.sender, tenant);
                        self.egress.suspend_unplumbed(key.0, pool, &e);
                        if self.egress.has_usable(pool) {
                            for job in std::iter::once(first).chain(self.ready.drain(key, None)) {
                                self.push_ready(job);
                            }
                            return (Connect::Rerouted, None);
                        }
                        return (Connect::Failed(e), Some(first));
                    }
                    Err(e) => {
                        debug!(domain = first.domain, host = host.name, %addr, error = %e, "connection attempt failed");
                        last_err = Some(e);
                    }
                }
            }
        }
        (
            Connect::Failed(last_err.expect("at least one attempt")),
            Some(first),
        )
    }

    /// Sends `job`, then further jobs of its domain, over one session, until
    /// the queue has none, the session's message budget is spent, a reply
    /// suspends the pair, or the session breaks.
    async fn deliver(
        self: &Arc<Self>,
        key: &PairKey,
        labels: &(String, String),
        shaper: &PairShaper,
        hosts: &Arc<Vec<Host>>,
        conn: Connection,
        mut job: Job,
    ) {
        let Connection {
            mut session,
            may_park,
        } = conn;
        let source = &self.egress.sources[key.0];
        let domain = job.domain.clone();
        let per_connection = shaper
            .max_messages_per_connection()
            .map_or(self.per_connection, |m| m.min(self.per_connection));
        self.connection_count(labels, &domain, true);
        loop {
            let ctx = AttemptContext {
                mx: Some(session.host().to_owned()),
                ip: Some(session.addr().ip()),
                source: session.local().map(|a| a.ip()),
                provider: Some(labels.clone()),
                started: Instant::now(),
            };
            let body = match self.spool.read_body(job.msg.id).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(id = %job.msg.hex_id(), error = %e, "cannot read spooled body");
                    let reply =
                        Reply::local(451, "4.3.0", format!("cannot read spooled message: {e}"));
                    self.finish_all(job, &reply, &ctx, Action::Reply).await;
                    session.quit().await;
                    break;
                }
            };
            if let Some(max) = shaper.max_recipients_per_message()
                && job.rcpts.len() > max
            {
                // The rest goes first in line: the next transaction on this connection.
                let rest = job.rcpts.split_off(max);
                let rest = job.with_rcpts(rest);
                self.ready.push_front(
                    key,
                    ReadyJob {
                        job: rest,
                        hosts: hosts.clone(),
                        dest: destination(hosts),
                    },
                );
            }
            let rcpts = job.addresses();
            let waited = Instant::now();
            let pair = self.shaper().for_pair(&source.name, source.address, &key.1);
            pair.message().await;
            self.metrics.throttled(labels, waited.elapsed());
            let sending = Instant::now();
            let sent = session.send(&job.msg.sender, &rcpts, &body).await;
            self.metrics.transaction(&key.1, sending.elapsed());
            match sent {
                Ok(tx) => {
                    let results: Vec<(u32, Reply)> = job
                        .rcpts
                        .iter()
                        .enumerate()
                        .map(|(k, &i)| (i, tx.outcome(k).clone()))
                        .collect();
                    let (action, suspend) = outcome::after_transaction(
                        results.iter().map(|(_, r)| pair.on_reply(r, ctx.source)),
                    );
                    self.finish(job, results, &ctx, action).await;
                    if suspend {
                        session.quit().await;
                        break;
                    }
                }
                Err(e) => {
                    // The session is unusable: no QUIT.
                    let reply = e.reply();
                    let (action, _) =
                        outcome::after_transaction([pair.on_reply(&reply, ctx.source)]);
                    self.finish_all(job, &reply, &ctx, action).await;
                    break;
                }
            }
            let next = if session.messages_sent() < per_connection {
                self.next_job(key, &domain, may_park).await
            } else {
                None
            };
            let Some(next) = next else {
                session.quit().await;
                break;
            };
            job = next.job;
        }
        self.connection_count(labels, &domain, false);
    }

    /// The next job for an open connection to `domain`: one queued now,
    /// or one pushed while the connection waits parked for up to
    /// `connection_idle` (Postfix's connection cache) when `may_park`.
    async fn next_job(&self, key: &PairKey, domain: &str, may_park: bool) -> Option<ReadyJob> {
        let next = self.ready.next_or_park(
            key,
            domain,
            may_park && !self.connection_idle.is_zero(),
            self.destination_connections,
            self.pair_connections,
            self.stopping(),
        );
        let wake = match next {
            Next::Job(job) => return Some(job),
            Next::Leave => return None,
            Next::Parked(mut parked) => {
                match tokio::time::timeout(self.connection_idle, &mut parked.wake).await {
                    Ok(Ok(wake)) => Some(wake),
                    // Idle time over: whatever was handed over meanwhile is still ours.
                    _ => self.ready.unpark(key, domain, parked),
                }
            }
        };
        match wake {
            Some(Wake::Job(job)) => Some(job),
            Some(Wake::Leave) | None => None,
        }
    }
}
