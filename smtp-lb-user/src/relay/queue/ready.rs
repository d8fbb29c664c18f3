//! Ready queues: one per (egress source, provider), each with a count of
//! the workers draining it and of the connections each destination holds.
//!
//! A worker takes the first job whose destination (the MX host set) has
//! fewer than its limit of connections, and holds that destination's slot
//! until its connection ends: a dead or slow destination ties up at most
//! its own slots, and the queue's other workers serve the others.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use super::{super::egress::SourceId, super::route::Host, message::Job};

/// A ready queue's key: (egress source, provider).
pub type PairKey = (SourceId, String);

/// A routed job: its destination's hosts travel with it.
pub struct ReadyJob {
    pub job: Job,
    pub hosts: Arc<Vec<Host>>,
    /// The destination's key, from [`destination`].
    pub dest: Arc<str>,
}

/// A destination's key: its hosts and ports in order (two domains with the
/// same MX hosts are one destination, as for Postfix).
pub fn destination(hosts: &[Host]) -> Arc<str> {
    let mut key = String::new();
    for h in hosts {
        let port = h.addrs.first().map_or(0, std::net::SocketAddr::port);
        if !key.is_empty() {
            key.push(',');
        }
        key.push_str(&format!("{}:{port}", h.name));
    }
    key.into()
}

#[derive(Default)]
struct ReadyQueue {
    jobs: VecDeque<ReadyJob>,
    active: usize,
    /// Connections (workers) per destination.
    busy: HashMap<Arc<str>, usize>,
}

/// Every ready queue, under one lock.
#[derive(Default)]
pub struct ReadyQueues {
    queues: Mutex<HashMap<PairKey, ReadyQueue>>,
}

impl ReadyQueues {
    /// Appends a job; `true` when the queue has fewer than `max_workers`
    /// workers and the caller must start one (counted here already).
    pub fn push(&self, key: &PairKey, job: ReadyJob, max_workers: usize) -> bool {
        let mut ready = self.queues.lock().expect("queue lock");
        let q = ready.entry(key.clone()).or_default();
        q.jobs.push_back(job);
        if q.active < max_workers {
            q.active += 1;
            true
        } else {
            false
        }
    }

    /// The next job of `key`: with `domain`, the first one to it (for the
    /// connection the caller holds); without, the first one whose
    /// destination has fewer than `per_destination` connections, whose slot
    /// the caller then holds until [`Self::release`]. `None` without
    /// `domain` also retires the calling worker (in the same critical
    /// section, so no job is left without a worker: a destination at its
    /// limit has workers that come back for it). A stopping queue hands out
    /// nothing.
    pub fn pop(
        &self,
        key: &PairKey,
        domain: Option<&str>,
        per_destination: usize,
        stopping: bool,
    ) -> Option<ReadyJob> {
        let mut ready = self.queues.lock().expect("queue lock");
        let q = ready.get_mut(key)?;
        let job = if stopping {
            None
        } else if let Some(d) = domain {
            let at = q.jobs.iter().position(|r| r.job.domain == d)?;
            q.jobs.remove(at)
        } else {
            let busy = &q.busy;
            let at = q
                .jobs
                .iter()
                .position(|r| busy.get(&r.dest).copied().unwrap_or(0) < per_destination);
            let job = at.and_then(|at| q.jobs.remove(at));
            if let Some(j) = &job {
                *q.busy.entry(j.dest.clone()).or_default() += 1;
            }
            job
        };
        if job.is_none() && domain.is_none() {
            q.active -= 1;
            if q.active == 0 && q.jobs.is_empty() {
                ready.remove(key);
            }
        }
        job
    }

    /// Gives back the destination slot a [`Self::pop`] without domain took.
    pub fn release(&self, key: &PairKey, dest: &Arc<str>) {
        let mut ready = self.queues.lock().expect("queue lock");
        if let Some(q) = ready.get_mut(key)
            && let Some(n) = q.busy.get_mut(dest)
        {
            *n -= 1;
            if *n == 0 {
                q.busy.remove(dest);
            }
        }
    }

    /// Puts a job at the head of `key`'s queue (the queue has a worker: the caller).
    pub fn push_front(&self, key: &PairKey, job: ReadyJob) {
        self.queues
            .lock()
            .expect("queue lock")
            .entry(key.clone())
            .or_default()
            .jobs
            .push_front(job);
    }

    /// Takes every job of `key`, or only those to `domain`.
    pub fn drain(&self, key: &PairKey, domain: Option<&str>) -> Vec<Job> {
        let mut ready = self.queues.lock().expect("queue lock");
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

    /// Calls `f` with each queue's key and its jobs.
    pub fn for_each(&self, mut f: impl FnMut(&PairKey, &mut dyn Iterator<Item = &Job>)) {
        for (k, q) in self.queues.lock().expect("queue lock").iter() {
            f(k, &mut q.jobs.iter().map(|r| &r.job));
        }
    }
}
