//! The operator's view of the queue and its actions (`smtp-lb ctl relay …`
//! through the admin API): depth, per-domain summary, one message, egress
//! sources; retry, bounce and delete.
use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use serde::Serialize;

use super::{Queue, outcome::Action, settle::AttemptContext};
use crate::{
    relay::{egress::SourceId, metrics::EgressSample, spool::MsgId},
    smtp::reply::Reply,
};

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

impl Queue {
    /// Live messages and the age of the oldest, in seconds.
    pub fn depth(&self) -> (usize, u64) {
        let m = self.messages.lock().expect("queue lock");
        let oldest = m.values().map(|q| q.age().as_secs()).max().unwrap_or(0);
        (m.len(), oldest)
    }

    pub fn summary(&self) -> BTreeMap<String, DomainSummary> {
        let mut out: BTreeMap<String, DomainSummary> = BTreeMap::new();
        self.ready.for_each(|_, jobs| {
            for job in jobs {
                out.entry(job.domain.clone()).or_default().ready += 1;
            }
        });
        for (d, n) in self.connections.lock().expect("queue lock").iter() {
            out.entry(d.clone()).or_default().connections += n;
        }
        self.scheduled.for_each(|job| {
            out.entry(job.domain.clone()).or_default().scheduled += 1;
        });
        out
    }

    /// Prometheus text: the relay's counters and the egress series.
    pub fn render_metrics(&self) -> String {
        let (depth, oldest) = self.depth();
        self.metrics.render(depth, oldest, self.egress_sample())
    }

    fn egress_sample(&self) -> EgressSample {
        let name = |s: SourceId| self.egress.sources[s].name.clone();
        let mut ready: Vec<(String, String, usize)> = Vec::new();
        self.ready.for_each(|(s, p), jobs| {
            ready.push((p.clone(), name(*s), jobs.count()));
        });
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
            id: msg.hex_id(),
            sender: msg.sender.clone(),
            rcpts: msg.rcpts.clone(),
            done,
            age_secs: msg.age().as_secs(),
            attempts: st.attempts,
            last_error: st.last_error.clone(),
            size: msg.size,
        })
    }

    /// `ctl relay retry`: scheduled jobs go to their ready queues now.
    pub fn retry_now(self: &Arc<Self>, id: Option<MsgId>) -> usize {
        let jobs = self.scheduled.take(id);
        let n = jobs.len();
        for job in jobs {
            self.push_ready(job);
        }
        n
    }

    /// `ctl relay bounce`: pending recipients of a scheduled message fail now, with a DSN.
    pub async fn bounce_now(self: &Arc<Self>, id: MsgId) -> usize {
        let jobs = self.scheduled.take(Some(id));
        let n = jobs.len();
        let ctx = AttemptContext::local(None);
        let reply = Reply::local(550, "5.0.0", "message bounced by the operator");
        for job in jobs {
            self.finish_all(job, &reply, &ctx, Action::Bounce).await;
        }
        n
    }

    /// `ctl relay delete`: a scheduled message is dropped without a DSN.
    pub fn delete(&self, id: MsgId) -> usize {
        let jobs = self.scheduled.take(Some(id));
        let n = jobs.len();
        for job in jobs {
            self.mark_done(&job.msg, &job.rcpts);
        }
        n
    }
}
