//! Queues: every live message, the scheduled queue (waiting for a retry),
//! and one ready queue per (egress source, provider) with its delivery workers.
//!
//! A message is split into jobs, one per recipient domain. A job is routed
//! (MX hosts, provider, egress source) into the ready queue of its (source,
//! provider), where a worker (at most `connections_per_destination` per
//! queue) takes it; a worker holds one connection and keeps taking jobs of
//! its domain over it (connection reuse), waiting `connection_idle` for the
//! next one before it closes the connection. Temporary failures go to the
//! scheduled queue with an exponential backoff; permanent ones and expired
//! ones become a DSN to the sender.
//!
//! Shaping (issue 6) sits between the ready queue and the [`Dispatcher`]:
//! the worker takes one of the provider's connection slots
//! (`connection_limit`, shared by every domain the provider hosts) and waits
//! for its `connection_rate`, then for its `message_rate` before each
//! message. Each provider has its own slots and rate clocks, so a limited
//! provider's workers wait without delaying any other provider's.
//!
//! # Layout
//! - [`message`]: messages and jobs; [`ready`]: the ready queues;
//!   [`scheduler`]: the scheduled queue.
//! - [`dispatch`]: the [`Dispatcher`] seam and its SMTP implementation;
//!   [`worker`]: the delivery loop over it.
//! - [`outcome`]: the pure decision after an attempt; [`settle`] applies it
//!   (log, metrics, DSN, retry).
//! - [`control`]: the operator's view and actions (`ctl relay …`).
//! - `tests`: the delivery loop through a scripted [`Dispatcher`], no socket.
mod control;
pub mod dispatch;
mod message;
pub mod outcome;
mod ready;
mod scheduler;
mod settle;
#[cfg(test)]
mod tests;
mod worker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

pub use self::{
    control::{DomainSummary, MessageView},
    dispatch::{Dispatcher, Session, SmtpDispatcher},
    message::{Job, QueuedMessage},
};
use self::{
    message::HeaderFacts,
    outcome::{Action, RetrySchedule},
    ready::{PairKey, ReadyJob, ReadyQueues},
    scheduler::Scheduled,
    settle::AttemptContext,
};
use super::{
    config::Config,
    egress::{Egress, Pick},
    log::DeliveryLog,
    metrics::Metrics,
    policy::shaping::{Shaper, ShapingConfig},
    route::{Host, RouteError, Router},
    spool::{MsgId, Spool},
};
use crate::smtp::{command::domain_of, reply::Reply};

pub struct Queue {
    spool: Spool,
    router: Router,
    log: DeliveryLog,
    pub metrics: Arc<Metrics>,
    dispatcher: Box<dyn Dispatcher>,
    retry: RetrySchedule,
    hostname: String,
    destination_connections: usize,
    pair_connections: usize,
    per_connection: usize,
    /// How long a connection with nothing to send waits for its next message.
    connection_idle: Duration,
    hop_limit: usize,
    /// Replaced whole by [`Self::reload_shaping`]; a worker keeps the one it started with.
    shaper: RwLock<Arc<Shaper>>,
    shaping_path: Option<std::path::PathBuf>,
    egress: Egress,
    messages: Mutex<HashMap<MsgId, Arc<QueuedMessage>>>,
    ready: ReadyQueues,
    /// Open delivery connections per destination domain.
    connections: Mutex<HashMap<String, usize>>,
    scheduled: Scheduled,
    wake: Notify,
    stopping: AtomicBool,
}

impl Queue {
    /// A queue that delivers through `dispatcher`.
    #[expect(
        clippy::too_many_arguments,
        reason = "the queue's parts, each built elsewhere"
    )]
    pub fn new(
        cfg: &Config,
        spool: Spool,
        router: Router,
        log: DeliveryLog,
        metrics: Arc<Metrics>,
        shaper: Shaper,
        egress: Egress,
        dispatcher: Box<dyn Dispatcher>,
    ) -> Arc<Self> {
        let d = &cfg.delivery;
        Arc::new(Self {
            spool,
            router,
            log,
            metrics,
            dispatcher,
            retry: RetrySchedule::new(&cfg.retry),
            hostname: cfg.hostname.clone(),
            destination_connections: d.connections_per_destination.max(1),
            pair_connections: d.connections_per_queue.max(1),
            per_connection: d.messages_per_connection.max(1),
            connection_idle: d.connection_idle,
            hop_limit: d.hop_limit,
            shaper: RwLock::new(Arc::new(shaper)),
            shaping_path: cfg.shaping.clone(),
            egress,
            messages: Mutex::new(HashMap::new()),
            ready: ReadyQueues::default(),
            connections: Mutex::new(HashMap::new()),
            scheduled: Scheduled::default(),
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
        })
    }

    fn shaper(&self) -> Arc<Shaper> {
        self.shaper.read().expect("shaper lock").clone()
    }

    /// Reads the shaping file again and swaps it in: new connections obey
    /// the new limits and rules at once, connections already open finish
    /// under the old ones, suspensions in force carry over. A bad file is
    /// refused (line and field named) and the running one keeps serving.
    pub fn reload_shaping(&self) -> anyhow::Result<()> {
        let Some(path) = &self.shaping_path else {
            anyhow::bail!("no shaping file is configured (relay config `shaping`)");
        };
        let cfg = ShapingConfig::load(path)?;
        let old = self.shaper();
        let new = Shaper::reloaded(&cfg, &old);
        self.egress.check_override_keys(new.override_keys())?;
        *self.shaper.write().expect("shaper lock") = Arc::new(new);
        tracing::info!(file = %path.display(), "shaping file reloaded");
        Ok(())
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The header that names a message's tenant, if one is configured.
    pub fn tenant_header(&self) -> Option<&str> {
        self.egress.tenant_header.as_deref()
    }

    /// The delivery log, which also keeps recent messages for `/trace`.
    pub fn log(&self) -> &DeliveryLog {
        &self.log
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Takes responsibility for a spooled message and queues its pending recipients.
    pub fn submit(self: &Arc<Self>, msg: QueuedMessage) {
        let msg = Arc::new(msg);
        self.messages
            .lock()
            .expect("queue lock")
            .insert(msg.id, msg.clone());
        let (done, attempts) = {
            let st = msg.state.lock().expect("msg lock");
            (st.done.clone(), st.attempts)
        };
        // Recovered with a retry pending: not before it was due.
        let wait = msg.resume_at_ms.map_or(Duration::ZERO, |at| {
            Duration::from_millis(at.saturating_sub(super::spool::now_ms()))
        });
        let mut by_domain: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, r) in msg.rcpts.iter().enumerate() {
            let i = i as u32;
            if !done.contains(&i) {
                by_domain.entry(domain_of(r)).or_default().push(i);
            }
        }
        for (domain, rcpts) in by_domain {
            let job = Job {
                msg: msg.clone(),
                domain,
                rcpts,
                attempts,
                pinned: None,
            };
            if wait.is_zero() {
                self.push_ready(job);
            } else {
                self.schedule(job, wait);
            }
        }
    }

    /// Routes a job (MX lookup, provider, egress source) and queues it in
    /// the ready queue of its (source, provider).
    fn push_ready(self: &Arc<Self>, job: Job) {
        tokio::spawn(self.clone().route(job));
    }

    async fn route(self: Arc<Self>, mut job: Job) {
        let msg = job.msg.clone();
        let headers = msg
            .headers
            .get_or_init(|| async {
                let body = self.spool.read_body(msg.id).await;
                body.map(|b| HeaderFacts::read(&b, self.egress.tenant_header.as_deref()))
                    .unwrap_or_default()
            })
            .await;
        if headers.hops > self.hop_limit {
            let reply = Reply::local(
                554,
                "5.4.6",
                format!(
                    "too many hops: {} Received: headers, the limit is {} (a mail loop)",
                    headers.hops, self.hop_limit
                ),
            );
            self.finish_all(job, &reply, &AttemptContext::local(None), Action::Bounce)
                .await;
            return;
        }
        let hosts = match self.router.resolve(&job.domain).await {
            Ok(h) => Arc::new(h),
            Err(e) => {
                let action = if matches!(e, RouteError::Permanent(_)) {
                    Action::Bounce
                } else {
                    Action::Reply
                };
                let reply = e.reply().clone();
                self.finish_all(job, &reply, &AttemptContext::local(None), action)
                    .await;
                return;
            }
        };
        let tenant = headers.tenant.as_deref();
        let shaper = self.shaper();
        let provider = shaper.provider_of(hosts.first().map_or("", |h| h.name.as_str()));
        let pool = self.egress.pool_for(&job.msg.sender, tenant);
        match self.egress.pick(pool, &provider, job.pinned.take()) {
            Pick::Source(source) => self.enqueue((source, provider), job, hosts),
            Pick::Wait { source, after } => {
                // Over a warmup cap: not an attempt, just later.
                job.pinned = source;
                self.schedule(job, after);
            }
            Pick::NoSource => {
                let reply = Reply::local(
                    451,
                    "4.4.1",
                    format!(
                        "no egress source of pool {:?} is usable on this host",
                        self.egress.pool_name(pool)
                    ),
                );
                let ctx = AttemptContext::local(Some((provider, "none".to_owned())));
                self.finish_all(job, &reply, &ctx, Action::Reply).await;
            }
        }
    }

    fn enqueue(self: &Arc<Self>, key: PairKey, job: Job, hosts: Arc<Vec<Host>>) {
        let dest = ready::destination(&hosts);
        if self.ready.push(
            &key,
            ReadyJob { job, hosts, dest },
            self.destination_connections,
            self.pair_connections,
        ) {
            tokio::spawn(self.clone().worker(key));
        }
    }

    /// Counts a delivery connection opening or closing.
    fn connection_count(&self, labels: &(String, String), domain: &str, open: bool) {
        self.metrics.connection(labels, open);
        let mut c = self.connections.lock().expect("queue lock");
        let n = c.entry(domain.to_owned()).or_default();
        if open {
            *n += 1;
        } else {
            *n -= 1;
            if *n == 0 {
                c.remove(domain);
            }
        }
    }

    fn schedule(&self, job: Job, delay: Duration) {
        self.scheduled.insert(job, delay);
        self.wake.notify_one();
    }

    /// Moves due jobs from the scheduled queue to the ready queues until stopped.
    pub async fn run_scheduler(self: Arc<Self>) {
        while !self.stopping() {
            let (due, next) = self.scheduled.take_due(Instant::now());
            for job in due {
                self.push_ready(job);
            }
            let sleep = next.map_or(Duration::from_hours(1), |t| {
                t.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Stops taking jobs; in-flight deliveries finish on their own.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.ready.unpark_all();
        self.wake.notify_one();
    }
}
