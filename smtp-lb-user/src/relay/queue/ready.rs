//! Ready queues: one per (egress source, provider), each with a count of
//! the workers draining it.
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
}

#[derive(Default)]
struct ReadyQueue {
    jobs: VecDeque<ReadyJob>,
    active: usize,
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

    /// The next job of `key` (the first one to `domain` when given);
    /// `None` without `domain` also retires the calling worker (in the same
    /// critical section, so no job is left without a worker). A stopping
    /// queue hands out nothing.
    pub fn pop(&self, key: &PairKey, domain: Option<&str>, stopping: bool) -> Option<ReadyJob> {
        let mut ready = self.queues.lock().expect("queue lock");
        let q = ready.get_mut(key)?;
        let job = if stopping {
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
