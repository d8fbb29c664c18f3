//! Queues: every live message, the scheduled queue (waiting for a retry),
//! and one ready queue per destination with its delivery workers.
//!
//! A message is split into jobs, one per recipient domain. A job waits in
//! its domain's ready queue until a worker (at most
//! `connections_per_destination` per domain) takes it; a worker holds one
//! connection and keeps taking jobs of its domain over it (connection
//! reuse). Temporary failures go to the scheduled queue with an exponential
//! backoff; permanent ones and expired ones become a DSN to the sender.
//!
//! Shaping (issue 6) sits between the ready queue and [`Client::connect`]:
//! once a worker has resolved its domain, the first MX host names the
//! provider, and the worker takes one of the provider's connection slots
//! (`connection_limit`, shared by every domain the provider hosts) and waits
//! for its `connection_rate`, then for its `message_rate` before each
//! message. Each provider has its own slots and rate clocks, so a limited
//! provider's workers wait without delaying any other provider's.
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    hash::{BuildHasher, Hasher},
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{
    client::{Client, ClientError},
    config::{Config, RetryConfig},
    dsn,
    egress::{Egress, Pick, SourceId},
    log::{Attempt, DeliveryLog},
    metrics::{EgressSample, Metrics},
    proto::{Reply, domain_of},
    route::Host,
    route::{RouteError, Router},
    shaping::{Shaper, Verdict},
    spool::{Location, MsgId, Spool},
};

/// A message the relay is responsible for.
pub struct QueuedMessage {
    pub id: MsgId,
    pub sender: String,
    pub rcpts: Vec<String>,
    pub received_ms: u64,
    pub location: Location,
    state: Mutex<MessageState>,
    /// The tenant header's value, read from the spool on first need.
    tenant: tokio::sync::OnceCell<Option<String>>,
}

#[derive(Default)]
struct MessageState {
    /// Recipients delivered or bounced.
    done: HashSet<u32>,
    /// Last temporary error, for `ctl show`.
    last_error: Option<String>,
    attempts: u32,
}

impl QueuedMessage {
    pub fn new(
        id: MsgId,
        sender: String,
        rcpts: Vec<String>,
        received_ms: u64,
        location: Location,
        done: HashSet<u32>,
    ) -> Self {
        Self {
            id,
            sender,
            rcpts,
            received_ms,
            location,
            state: Mutex::new(MessageState {
                done,
                ..Default::default()
            }),
            tenant: tokio::sync::OnceCell::new(),
        }
    }

    fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Duration::from_millis(now.saturating_sub(self.received_ms))
    }
}

/// Some recipients of one message, all in one domain.
pub struct Job {
    msg: Arc<QueuedMessage>,
    domain: String,
    rcpts: Vec<u32>,
    attempts: u32,
    /// The egress source a job waiting for its warmup window is bound to.
    pinned: Option<SourceId>,
}

/// A routed job: its destination's hosts travel with it.
struct ReadyJob {
    job: Job,
    hosts: Arc<Vec<Host>>,
}

/// A ready queue's key: (egress source, provider).
type PairKey = (SourceId, String);

#[derive(Default)]
struct ReadyQueue {
    jobs: VecDeque<ReadyJob>,
    active: usize,
}

/// What a finished attempt looked like, for the log.
struct AttemptContext {
    mx: Option<String>,
    ip: Option<IpAddr>,
    source: Option<IpAddr>,
    /// (provider, source name) once routed, for metrics.
    provider: Option<(String, String)>,
    started: Instant,
}

impl AttemptContext {
    /// An outcome decided here, before any connection (route error, operator bounce).
    fn local(provider: Option<(String, String)>) -> Self {
        Self {
            mx: None,
            ip: None,
            source: None,
            provider,
            started: Instant::now(),
        }
    }
}

/// Summary of one destination for `ctl relay queue`.
#[derive(Debug, Default, Serialize)]
pub struct DomainSummary {
    pub ready: usize,
    pub scheduled: usize,
    pub connections: usize,
}

#[derive(Debug, Serialize)]
pub struct MessageView {
    pub id: String,
    pub sender: String,
    pub rcpts: Vec<String>,
    pub done: Vec<u32>,
    pub age_secs: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub size: u64,
}

pub struct Queue {
    spool: Spool,
    router: Router,
    log: DeliveryLog,
    pub metrics: Arc<Metrics>,
    tls: Option<Arc<rustls::ClientConfig>>,
    retry: RetrySchedule,
    hostname: String,
    per_destination: usize,
    per_connection: usize,
    /// Replaced whole by [`Self::reload_shaping`]; a worker keeps the one it started with.
    shaper: RwLock<Arc<Shaper>>,
    shaping_path: Option<std::path::PathBuf>,
    egress: Egress,
    timeouts: super::config::ClientTimeouts,
    messages: Mutex<HashMap<MsgId, Arc<QueuedMessage>>>,
    ready: Mutex<HashMap<PairKey, ReadyQueue>>,
    /// Open delivery connections per destination domain.
    connections: Mutex<HashMap<String, usize>>,
    scheduled: Mutex<BTreeMap<(Instant, u64), Job>>,
    seq: AtomicU64,
    wake: Notify,
    stopping: AtomicBool,
}

struct RetrySchedule {
    min: Duration,
    max: Duration,
    max_age: Duration,
    jitter: f64,
}

impl RetrySchedule {
    fn new(c: &RetryConfig) -> Self {
        Self {
            min: c.min,
            max: c.max,
            max_age: c.max_age,
            jitter: c.jitter.clamp(0.0, 1.0),
        }
    }

    /// `min · 2^attempt`, capped at `max`, spread by ±jitter.
    fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let r = std::hash::RandomState::new().build_hasher().finish();
        #[expect(
            clippy::cast_precision_loss,
            reason = "a random fraction needs no precision"
        )]
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 + self.jitter * (unit * 2.0 - 1.0))
    }
}

impl Queue {
    pub fn new(
        cfg: &Config,
        spool: Spool,
        router: Router,
        log: DeliveryLog,
        metrics: Arc<Metrics>,
        shaper: Shaper,
        egress: Egress,
    ) -> Arc<Self> {
        let d = &cfg.delivery;
        Arc::new(Self {
            spool,
            router,
            log,
            metrics,
            tls: d.starttls.then(crate::tls::opportunistic_tls),
            retry: RetrySchedule::new(&cfg.retry),
            hostname: cfg.hostname.clone(),
            per_destination: d.connections_per_destination.max(1),
            per_connection: d.messages_per_connection.max(1),
            shaper: RwLock::new(Arc::new(shaper)),
            shaping_path: cfg.shaping.clone(),
            egress,
            timeouts: d.timeouts.clone(),
            messages: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            scheduled: Mutex::new(BTreeMap::new()),
            seq: AtomicU64::new(0),
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
        let cfg = super::shaping::ShapingConfig::load(path)?;
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

    /// Takes responsibility for a spooled message and queues its pending recipients.
    pub fn submit(self: &Arc<Self>, msg: QueuedMessage) {
        let msg = Arc::new(msg);
        self.messages
            .lock()
            .expect("queue lock")
            .insert(msg.id, msg.clone());
        let done = msg.state.lock().expect("msg lock").done.clone();
        let mut by_domain: HashMap<String, Vec<u32>> = HashMap::new();
        for (i, r) in msg.rcpts.iter().enumerate() {
            let i = i as u32;
            if !done.contains(&i) {
                by_domain.entry(domain_of(r)).or_default().push(i);
            }
        }
        for (domain, rcpts) in by_domain {
            self.push_ready(Job {
                msg: msg.clone(),
                domain,
                rcpts,
                attempts: 0,
                pinned: None,
            });
        }
    }

    /// Routes a job (MX lookup, provider, egress source) and queues it in
    /// the ready queue of its (source, provider).
    fn push_ready(self: &Arc<Self>, job: Job) {
        tokio::spawn(self.clone().route(job));
    }

    async fn route(self: Arc<Self>, mut job: Job) {
        let hosts = match self.router.resolve(&job.domain).await {
            Ok(h) => Arc::new(h),
            Err(e) => {
                let ctx = AttemptContext::local(None);
                let reply = e.reply().clone();
                let permanent = matches!(e, RouteError::Permanent(_));
                let results = job.rcpts.iter().map(|&i| (i, reply.clone())).collect();
                self.finish(job, results, &ctx, permanent).await;
                return;
            }
        };
        let shaper = self.shaper();
        let provider = shaper.provider_of(hosts.first().map_or("", |h| h.name.as_str()));
        let tenant = match &self.egress.tenant_header {
            Some(h) => job
                .msg
                .tenant
                .get_or_init(|| async {
                    let body = self.spool.read_body(job.msg.location).await.ok()?;
                    header_value(&body, h)
                })
                .await
                .as_deref(),
            None => None,
        };
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
                let results = job.rcpts.iter().map(|&i| (i, reply.clone())).collect();
                self.finish(job, results, &ctx, false).await;
            }
        }
    }

    fn enqueue(self: &Arc<Self>, key: PairKey, job: Job, hosts: Arc<Vec<Host>>) {
        let spawn = {
            let mut ready = self.ready.lock().expect("queue lock");
            let q = ready.entry(key.clone()).or_default();
            q.jobs.push_back(ReadyJob { job, hosts });
            if q.active < self.per_destination {
                q.active += 1;
                true
            } else {
                false
            }
        };
        if spawn {
            tokio::spawn(self.clone().worker(key));
        }
    }

    /// The next job of `key` (the first one to `domain` when given);
    /// `None` without `domain` also retires the calling worker (in the same
    /// critical section, so no job is left without a worker).
    fn pop(&self, key: &PairKey, domain: Option<&str>) -> Option<ReadyJob> {
        let mut ready = self.ready.lock().expect("queue lock");
        let q = ready.get_mut(key)?;
        let job = if self.stopping.load(Ordering::Relaxed) {
            None
        } else if let Some(d) = domain {
            let at = q.jobs.iter().position(|r| r.job.domain == d)?;
            q.jobs.remove(at)
        } else {
            q.jobs.pop_front()
        };
        if job.is_none() && domain.is_none() {
            q.active -= 1;
            if q.active == 0 && q.jobs.is_empty() {
                ready.remove(key);
            }
        }
        job
    }

    /// Puts a job at the head of `key`'s ready queue (the queue has a worker:
    /// the caller).
    fn push_front(&self, key: &PairKey, job: ReadyJob) {
        self.ready
            .lock()
            .expect("queue lock")
            .entry(key.clone())
            .or_default()
            .jobs
            .push_front(job);
    }

    /// Takes every ready job of `key`, or only those to `domain`.
    fn drain_ready(&self, key: &PairKey, domain: Option<&str>) -> Vec<Job> {
        let mut ready = self.ready.lock().expect("queue lock");
        let Some(q) = ready.get_mut(key) else {
            return Vec::new();
        };
        let (take, keep) = q
            .jobs
            .drain(..)
            .partition(|r| domain.is_none_or(|d| r.job.domain == d));
        q.jobs = keep;
        take.into_iter().map(|r| r.job).collect()
    }

    /// Delivers the jobs of one (source, provider): one connection at a
    /// time, reused for following jobs to the same destination.
    async fn worker(self: Arc<Self>, key: PairKey) {
        let (source_id, provider) = (key.0, key.1.as_str());
        let source = &self.egress.sources[source_id];
        let labels = (provider.to_owned(), source.name.clone());
        'connection: while let Some(ReadyJob { job: first, hosts }) = self.pop(&key, None) {
            let started = Instant::now();
            // Taken per connection (and per message below), so a reloaded
            // shaping file applies without waiting for this worker to end.
            let shaper = self
                .shaper()
                .for_pair(&source.name, source.address, provider);
            let domain = first.domain.clone();
            // Held for the whole connection; dropped when the worker leaves it.
            let _slots = shaper.connection().await;
            self.metrics.throttled(&labels, started.elapsed());
            let per_connection = shaper
                .max_messages_per_connection()
                .map_or(self.per_connection, |m| m.min(self.per_connection));
            let mut last_err: Option<ClientError> = None;
            let mut client = None;
            'hosts: for host in hosts.iter() {
                for addr in &host.addrs {
                    let tried = Instant::now();
                    let attempt = Client::connect(
                        &host.name,
                        *addr,
                        source.address,
                        &source.helo,
                        self.tls.as_ref(),
                        &self.timeouts,
                    )
                    .await;
                    self.metrics
                        .connect_attempt(provider, tried.elapsed(), &attempt);
                    match attempt {
                        Ok(c) => {
                            client = Some(c);
                            break 'hosts;
                        }
                        Err(e) if e.is_unplumbed() => {
                            // The source, not the destination, is broken: its
                            // jobs go to other sources without an attempt.
                            let tenant = first.msg.tenant.get().and_then(Option::as_deref);
                            let pool = self.egress.pool_for(&first.msg.sender, tenant);
                            self.egress.suspend_unplumbed(source_id, pool, &e);
                            if self.egress.has_usable(pool) {
                                for job in
                                    std::iter::once(first).chain(self.drain_ready(&key, None))
                                {
                                    self.push_ready(job);
                                }
                                continue 'connection;
                            }
                            last_err = Some(e);
                            break 'hosts;
                        }
                        Err(e) => {
                            debug!(domain, host = host.name, %addr, error = %e, "connection attempt failed");
                            last_err = Some(e);
                        }
                    }
                }
            }
            let Some(mut client) = client else {
                // Every host failed: the destination is down for all its queued jobs.
                let err = last_err.expect("at least one attempt");
                let reply = err.reply();
                let permanent = reply.is_permanent();
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
                for job in std::iter::once(first).chain(self.drain_ready(&key, Some(&domain))) {
                    let results = job.rcpts.iter().map(|&i| (i, reply.clone())).collect();
                    self.finish(job, results, &ctx, permanent).await;
                }
                continue;
            };
            self.connection_count(&labels, &domain, true);
            let mut job = first;
            loop {
                let started = Instant::now();
                let ctx = AttemptContext {
                    mx: Some(client.host.clone()),
                    ip: Some(client.addr.ip()),
                    source: client.local.map(|a| a.ip()),
                    provider: Some(labels.clone()),
                    started,
                };
                let body = match self.spool.read_body(job.msg.location).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(id = %format!("{:016x}", job.msg.id), error = %e, "cannot read spooled body");
                        let reply =
                            Reply::local(451, "4.3.0", format!("cannot read spooled message: {e}"));
                        let results = job.rcpts.iter().map(|&i| (i, reply.clone())).collect();
                        self.finish(job, results, &ctx, false).await;
                        client.quit().await;
                        self.connection_count(&labels, &domain, false);
                        continue 'connection;
                    }
                };
                if let Some(max) = shaper.max_recipients_per_message()
                    && job.rcpts.len() > max
                {
                    // The rest goes first in line: the next transaction on this connection.
                    let rest = Job {
                        msg: job.msg.clone(),
                        domain: job.domain.clone(),
                        rcpts: job.rcpts.split_off(max),
                        attempts: job.attempts,
                        pinned: job.pinned,
                    };
                    self.push_front(
                        &key,
                        ReadyJob {
                            job: rest,
                            hosts: hosts.clone(),
                        },
                    );
                }
                let rcpts: Vec<String> = job
                    .rcpts
                    .iter()
                    .map(|&i| job.msg.rcpts[i as usize].clone())
                    .collect();
                let waited = Instant::now();
                let shaper = self
                    .shaper()
                    .for_pair(&source.name, source.address, provider);
                shaper.message().await;
                self.metrics.throttled(&labels, waited.elapsed());
                let sending = Instant::now();
                let sent = client.send(&job.msg.sender, &rcpts, &body).await;
                self.metrics.transaction(provider, sending.elapsed());
                match sent {
                    Ok(tx) => {
                        let results: Vec<(u32, Reply)> = job
                            .rcpts
                            .iter()
                            .enumerate()
                            .map(|(k, &i)| (i, tx.outcome(k).clone()))
                            .collect();
                        let mut suspended = false;
                        let mut bounce = false;
                        for (_, r) in &results {
                            match shaper.on_reply(r, ctx.source) {
                                Verdict::Continue => {}
                                Verdict::Suspended => suspended = true,
                                Verdict::Bounce => bounce = true,
                            }
                        }
                        self.finish(job, results, &ctx, bounce).await;
                        if suspended {
                            client.quit().await;
                            self.connection_count(&labels, &domain, false);
                            continue 'connection;
                        }
                    }
                    Err(e) => {
                        let reply = e.reply();
                        let bounce = shaper.on_reply(&reply, ctx.source) == Verdict::Bounce;
                        let results = job.rcpts.iter().map(|&i| (i, reply.clone())).collect();
                        self.finish(job, results, &ctx, bounce).await;
                        self.connection_count(&labels, &domain, false);
                        continue 'connection;
                    }
                }
                let next = (client.messages_sent < per_connection)
                    .then(|| self.pop(&key, Some(&domain)))
                    .flatten();
                let Some(next) = next else {
                    client.quit().await;
                    self.connection_count(&labels, &domain, false);
                    continue 'connection;
                };
                job = next.job;
            }
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

    /// Applies the outcome of one attempt to a job: log every recipient,
    /// then mark delivered ones done, schedule temporary failures, bounce
    /// permanent ones. `force_permanent` bounces even 4xx (a route that can never work).
    async fn finish(
        self: &Arc<Self>,
        job: Job,
        results: Vec<(u32, Reply)>,
        ctx: &AttemptContext,
        force_permanent: bool,
    ) {
        let msg = &job.msg;
        let duration = ctx.started.elapsed();
        let expired = msg.age() >= self.retry.max_age;
        let mut done = Vec::new();
        let mut retry = Vec::new();
        let mut bounce = Vec::new();
        for (i, reply) in results {
            let status = if reply.is_positive() {
                done.push(i);
                "delivered"
            } else if reply.is_permanent() || force_permanent {
                bounce.push((i, reply.clone()));
                "bounced"
            } else if expired {
                let r = Reply::local(
                    reply.code,
                    "4.4.7",
                    format!(
                        "message expired after {:?}; last error: {reply}",
                        self.retry.max_age
                    ),
                );
                bounce.push((i, r));
                "expired"
            } else {
                retry.push(i);
                "deferred"
            };
            self.metrics.count(&job.domain, status);
            if let Some((provider, source)) = &ctx.provider {
                if status == "delivered" {
                    self.metrics.delivered_after(provider, msg.age());
                }
                self.metrics.count_pair(
                    provider,
                    source,
                    status,
                    &reply
                        .enhanced
                        .map_or_else(|| reply.code.to_string(), |e| e.to_string()),
                );
            }
            self.log.write(&Attempt {
                id: &format!("{:016x}", msg.id),
                queue: &job.domain,
                sender: &msg.sender,
                rcpt: &msg.rcpts[i as usize],
                status,
                mx: ctx.mx.as_deref(),
                ip: ctx.ip,
                source_ip: ctx.source,
                code: reply.code,
                enhanced: reply.enhanced.map(|e| e.to_string()),
                text: &reply.text(),
                duration_ms: duration.as_millis() as u64,
                attempt: job.attempts + 1,
            });
            if status == "deferred" {
                msg.state.lock().expect("msg lock").last_error = Some(reply.to_string());
            }
        }
        if !bounce.is_empty() {
            if msg.sender.is_empty() {
                warn!(id = %format!("{:016x}", msg.id), "undeliverable message with null sender: no DSN (RFC 5321 §6.1)");
            } else {
                let report = dsn::build(&self.hostname, msg, &bounce, &self.spool).await;
                match self
                    .spool
                    .store(
                        self.spool.allocate_id(),
                        "",
                        std::slice::from_ref(&msg.sender),
                        &report,
                    )
                    .await
                {
                    Ok((id, received_ms, location)) => {
                        self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                        self.submit(QueuedMessage::new(
                            id,
                            String::new(),
                            vec![msg.sender.clone()],
                            received_ms,
                            location,
                            HashSet::new(),
                        ));
                    }
                    Err(e) => {
                        // Keep the recipients pending rather than lose the bounce.
                        warn!(error = %e, "cannot spool DSN; will try again");
                        retry.extend(bounce.drain(..).map(|(i, _)| i));
                    }
                }
            }
            done.extend(bounce.iter().map(|(i, _)| *i));
        }
        self.mark_done(msg, &done);
        if !retry.is_empty() {
            let delay = self.retry.delay(job.attempts);
            msg.state.lock().expect("msg lock").attempts = job.attempts + 1;
            self.schedule(
                Job {
                    msg: job.msg.clone(),
                    domain: job.domain,
                    rcpts: retry,
                    attempts: job.attempts + 1,
                    pinned: None,
                },
                delay,
            );
        }
    }

    fn mark_done(&self, msg: &Arc<QueuedMessage>, rcpts: &[u32]) {
        if rcpts.is_empty() {
            return;
        }
        let all = {
            let mut st = msg.state.lock().expect("msg lock");
            st.done.extend(rcpts);
            st.done.len() >= msg.rcpts.len()
        };
        self.spool.mark_done(msg.id, &msg.location, rcpts, all);
        if all {
            self.messages.lock().expect("queue lock").remove(&msg.id);
        }
    }

    fn schedule(&self, job: Job, delay: Duration) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.scheduled
            .lock()
            .expect("queue lock")
            .insert((Instant::now() + delay, seq), job);
        self.wake.notify_one();
    }

    /// Moves due jobs from the scheduled queue to the ready queues until stopped.
    pub async fn run_scheduler(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Relaxed) {
            let now = Instant::now();
            let (due, next) = {
                let mut s = self.scheduled.lock().expect("queue lock");
                let later = s.split_off(&(now, u64::MAX));
                let due = std::mem::replace(&mut *s, later);
                (due, s.keys().next().map(|(t, _)| *t))
            };
            for (_, job) in due {
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
        self.wake.notify_one();
    }

    /// Live messages and the age of the oldest, in seconds.
    pub fn depth(&self) -> (usize, u64) {
        let m = self.messages.lock().expect("queue lock");
        let oldest = m.values().map(|q| q.age().as_secs()).max().unwrap_or(0);
        (m.len(), oldest)
    }

    pub fn summary(&self) -> BTreeMap<String, DomainSummary> {
        let mut out: BTreeMap<String, DomainSummary> = BTreeMap::new();
        for q in self.ready.lock().expect("queue lock").values() {
            for r in &q.jobs {
                out.entry(r.job.domain.clone()).or_default().ready += 1;
            }
        }
        for (d, n) in self.connections.lock().expect("queue lock").iter() {
            out.entry(d.clone()).or_default().connections += n;
        }
        for job in self.scheduled.lock().expect("queue lock").values() {
            out.entry(job.domain.clone()).or_default().scheduled += 1;
        }
        out
    }

    /// Prometheus text: the relay's counters and the egress series.
    pub fn render_metrics(&self) -> String {
        let (depth, oldest) = self.depth();
        self.metrics.render(depth, oldest, self.egress_sample())
    }

    fn egress_sample(&self) -> EgressSample {
        let name = |s: SourceId| self.egress.sources[s].name.clone();
        let mut ready: Vec<(String, String, usize)> = self
            .ready
            .lock()
            .expect("queue lock")
            .iter()
            .map(|((s, p), q)| (p.clone(), name(*s), q.jobs.len()))
            .collect();
        ready.sort();
        let mut suspensions: Vec<(String, String, u64, bool)> = self
            .shaper()
            .pairs()
            .into_iter()
            .map(|(s, p, sh)| {
                (
                    p,
                    s,
                    sh.suspensions.load(Ordering::Relaxed),
                    sh.suspended_until().is_some(),
                )
            })
            .collect();
        suspensions.sort();
        EgressSample {
            ready,
            suspensions,
            unplumbed: (0..self.egress.sources.len())
                .map(|s| (name(s), !self.egress.unplumbed_for(s).is_zero()))
                .collect(),
            warmup: self
                .egress
                .warmup
                .progress(&self.egress.sources, SystemTime::now()),
        }
    }

    /// `ctl relay sources`: every egress source, its pools, state and warmup.
    pub fn sources_view(&self) -> serde_json::Value {
        let sample = self.egress_sample();
        let sources: Vec<serde_json::Value> = self
            .egress
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({
                    "name": s.name,
                    "address": s.address,
                    "helo": s.helo,
                    "pools": self.egress.pools_of(i),
                    "unplumbed_secs": self.egress.unplumbed_for(i).as_secs(),
                    "ready": sample.ready.iter().filter(|r| r.1 == s.name)
                        .map(|(p, _, n)| serde_json::json!({"provider": p, "jobs": n}))
                        .collect::<Vec<_>>(),
                    "suspended": sample.suspensions.iter().filter(|r| r.1 == s.name && r.3)
                        .map(|r| r.0.clone()).collect::<Vec<_>>(),
                    "warmup": sample.warmup.iter().filter(|w| w.source == s.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({ "sources": sources })
    }

    pub fn show(&self, id: MsgId) -> Option<MessageView> {
        let msg = self
            .messages
            .lock()
            .expect("queue lock")
            .get(&id)
            .cloned()?;
        let st = msg.state.lock().expect("msg lock");
        let mut done: Vec<u32> = st.done.iter().copied().collect();
        done.sort_unstable();
        Some(MessageView {
            id: format!("{:016x}", msg.id),
            sender: msg.sender.clone(),
            rcpts: msg.rcpts.clone(),
            done,
            age_secs: msg.age().as_secs(),
            attempts: st.attempts,
            last_error: st.last_error.clone(),
            size: msg.location.body_len,
        })
    }

    /// Takes scheduled jobs of one message (or all) out of the scheduled queue.
    fn take_scheduled(&self, id: Option<MsgId>) -> Vec<Job> {
        let mut s = self.scheduled.lock().expect("queue lock");
        let keys: Vec<_> = s
            .iter()
            .filter(|(_, j)| id.is_none_or(|id| j.msg.id == id))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter().filter_map(|k| s.remove(&k)).collect()
    }

    /// `ctl relay retry`: scheduled jobs go to their ready queues now.
    pub fn retry_now(self: &Arc<Self>, id: Option<MsgId>) -> usize {
        let jobs = self.take_scheduled(id);
        let n = jobs.len();
        for job in jobs {
            self.push_ready(job);
        }
        n
    }

    /// `ctl relay bounce`: pending recipients of a scheduled message fail now, with a DSN.
    pub async fn bounce_now(self: &Arc<Self>, id: MsgId) -> usize {
        let jobs = self.take_scheduled(Some(id));
        let n = jobs.len();
        let ctx = AttemptContext::local(None);
        for job in jobs {
            let reply = Reply::local(550, "5.0.0", "message bounced by the operator");
            let results = job.rcpts.iter().map(|&i| (i, reply.clone())).collect();
            self.finish(job, results, &ctx, true).await;
        }
        n
    }

    /// `ctl relay delete`: a scheduled message is dropped without a DSN.
    pub fn delete(&self, id: MsgId) -> usize {
        let jobs = self.take_scheduled(Some(id));
        let n = jobs.len();
        for job in jobs {
            self.mark_done(&job.msg, &job.rcpts);
        }
        n
    }
}

/// The value of header `name` in a message's header section (unfolded, trimmed).
fn header_value(message: &[u8], name: &str) -> Option<String> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    let head = String::from_utf8_lossy(&message[..end]);
    let mut value: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(v) = value.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((n, v)) = line.split_once(':')
            && n.trim().eq_ignore_ascii_case(name)
        {
            value = Some(v.trim().to_owned());
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_header_is_found_unfolded_and_only_in_the_header_section() {
        let m = b"Subject: x\r\nx-tenant: acme\r\n corp\r\nTo: y\r\n\r\nX-Tenant: body\r\n";
        assert_eq!(header_value(m, "X-Tenant").as_deref(), Some("acme corp"));
        assert_eq!(
            header_value(b"Subject: x\r\n\r\nX-Tenant: b\r\n", "X-Tenant"),
            None
        );
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let s = RetrySchedule {
            min: Duration::from_secs(10),
            max: Duration::from_secs(100),
            max_age: Duration::MAX,
            jitter: 0.2,
        };
        for _ in 0..100 {
            let d0 = s.delay(0).as_secs_f64();
            let d2 = s.delay(2).as_secs_f64();
            let d9 = s.delay(9).as_secs_f64();
            assert!((8.0..=12.0).contains(&d0), "{d0}");
            assert!((32.0..=48.0).contains(&d2), "{d2}");
            assert!((80.0..=120.0).contains(&d9), "{d9}");
        }
    }
}
