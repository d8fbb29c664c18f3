//! Settles an attempt: [`outcome::classify`] decides each recipient; this
//! applies it (delivery log, metrics, done records, DSN, rescheduling).
use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tracing::warn;

use super::{
    Queue,
    message::{Job, QueuedMessage},
    outcome::{self, Action, Outcome},
};
use crate::{
    relay::{dsn, log::Attempt, spool::now_ms},
    smtp::reply::Reply,
};

/// What a finished attempt looked like, for the log.
pub struct AttemptContext {
    pub mx: Option<String>,
    pub ip: Option<IpAddr>,
    pub source: Option<IpAddr>,
    /// (provider, source name) once routed, for metrics.
    pub provider: Option<(String, String)>,
    pub started: Instant,
}

impl AttemptContext {
    /// An outcome decided here, before any connection (route error, operator bounce).
    pub fn local(provider: Option<(String, String)>) -> Self {
        Self {
            mx: None,
            ip: None,
            source: None,
            provider,
            started: Instant::now(),
        }
    }
}

impl Queue {
    /// Settles every recipient of `job` with the same `reply`.
    pub(super) async fn finish_all(
        self: &Arc<Self>,
        job: Job,
        reply: &Reply,
        ctx: &AttemptContext,
        action: Action,
    ) {
        let results = job.rcpts.iter().map(|&i| (i, reply.clone())).collect();
        self.finish(job, results, ctx, action).await;
    }

    /// Applies the outcome of one attempt to a job: log every recipient,
    /// then mark delivered ones done, schedule temporary failures, bounce
    /// permanent and expired ones.
    pub(super) async fn finish(
        self: &Arc<Self>,
        job: Job,
        results: Vec<(u32, Reply)>,
        ctx: &AttemptContext,
        action: Action,
    ) {
        let msg = &job.msg;
        let duration = ctx.started.elapsed();
        let age = msg.age();
        let unit = outcome::random_unit();
        let mut done = Vec::new();
        let mut retry = Vec::new();
        let mut retry_after = Duration::ZERO;
        let mut bounce = Vec::new();
        for (i, reply) in results {
            let o = outcome::classify(&reply, action, age, &self.retry, job.attempts, unit);
            let status = o.status();
            match o {
                Outcome::Delivered => done.push(i),
                Outcome::Retry { after } => {
                    retry.push(i);
                    retry_after = after;
                    msg.state.lock().expect("msg lock").last_error = Some(reply.to_string());
                }
                Outcome::Bounced(r) | Outcome::Expired(r) => bounce.push((i, r)),
            }
            self.metrics.count(&job.domain, status);
            if let Some((provider, source)) = &ctx.provider {
                if status == "delivered" {
                    self.metrics.delivered_after(provider, age);
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
                id: &msg.hex_id(),
                queue: &job.domain,
                provider: ctx.provider.as_ref().map(|(p, _)| p.as_str()),
                source: ctx.provider.as_ref().map(|(_, s)| s.as_str()),
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
        }
        if !bounce.is_empty() {
            if msg.sender.is_empty() {
                warn!(id = %msg.hex_id(), "undeliverable message with null sender: no DSN (RFC 5321 §6.1)");
            } else if !self.bounce(msg, &bounce).await {
                // Keep the recipients pending rather than lose the bounce.
                retry.extend(bounce.drain(..).map(|(i, _)| i));
                retry_after = self.retry.delay_at(job.attempts, unit);
            }
            done.extend(bounce.iter().map(|(i, _)| *i));
        }
        self.mark_done(msg, &done);
        if !retry.is_empty() {
            msg.state.lock().expect("msg lock").attempts = job.attempts + 1;
            // Persisted, so a restart resumes the schedule rather than retry at once.
            self.spool.record_retry(
                msg.id,
                job.attempts + 1,
                now_ms().saturating_add(retry_after.as_millis() as u64),
            );
            self.schedule(
                Job {
                    msg: job.msg.clone(),
                    domain: job.domain,
                    rcpts: retry,
                    attempts: job.attempts + 1,
                    pinned: None,
                },
                retry_after,
            );
        }
    }

    /// Spools and queues a DSN to the sender for the `failed` recipients;
    /// `false` if it could not be spooled.
    async fn bounce(self: &Arc<Self>, msg: &QueuedMessage, failed: &[(u32, Reply)]) -> bool {
        let original = self.spool.read_body(msg.id).await.unwrap_or_default();
        let failures: Vec<(&str, &Reply)> = failed
            .iter()
            .map(|(i, r)| (msg.rcpts[*i as usize].as_str(), r))
            .collect();
        let report = dsn::build(
            &self.hostname,
            &dsn::Envelope {
                id: msg.id,
                sender: &msg.sender,
                received_ms: msg.received_ms,
            },
            dsn::headers_of(&original),
            &failures,
            now_ms(),
        );
        let id = self.spool.allocate_id();
        let stored = self
            .spool
            .store(id, "", std::slice::from_ref(&msg.sender), &report)
            .await;
        match stored {
            Ok(received_ms) => {
                self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                self.submit(QueuedMessage::new(
                    id,
                    String::new(),
                    vec![msg.sender.clone()],
                    received_ms,
                    report.len() as u64,
                    HashSet::new(),
                ));
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot spool DSN; will try again");
                false
            }
        }
    }

    pub(super) fn mark_done(&self, msg: &Arc<QueuedMessage>, rcpts: &[u32]) {
        if rcpts.is_empty() {
            return;
        }
        let all = {
            let mut st = msg.state.lock().expect("msg lock");
            st.done.extend(rcpts);
            st.done.len() >= msg.rcpts.len()
        };
        self.spool.mark_done(msg.id, rcpts, all);
        if all {
            self.messages.lock().expect("queue lock").remove(&msg.id);
        }
    }
}
