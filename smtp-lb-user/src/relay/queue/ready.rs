//! Ready queues: one per (egress source, provider), each with a count of
//! the workers draining it and of the connections each destination holds.
//!
//! A worker takes the first job whose destination (the MX host set) has
//! fewer than its limit of connections, and holds that destination's slot
//! until its connection ends: a dead or slow destination ties up at most
//! its own slots, and the queue's other workers serve the others.
//!
//! A worker whose connection has nothing more to send parks it for a
//! while (Postfix's connection cache): a job pushed for its domain then
//! goes straight to it, over the open connection, rather than to a new
//! worker with a new connection.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use tokio::sync::oneshot;

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

/// What a parked worker is woken with.
pub enum Wake {
    /// The next job for its domain: send it over the parked connection.
    Job(ReadyJob),
    /// Close the connection: another destination needs the worker, or the
    /// queue is stopping.
    Leave,
}

/// What [`ReadyQueues::next_or_park`] gives a worker with an open
/// connection and nothing to send.
pub enum Next {
    Job(ReadyJob),
    /// Parked: wait on this, then [`ReadyQueues::unpark`] whatever came.
    Parked(Parked),
    Leave,
}

/// A parked worker's ticket: its wake-up, and its place for
/// [`ReadyQueues::unpark`].
pub struct Parked {
    pub wake: oneshot::Receiver<Wake>,
    id: u64,
}

#[derive(Default)]
struct ReadyQueue {
    jobs: VecDeque<ReadyJob>,
    active: usize,
    /// Connections (workers) per destination.
    busy: HashMap<Arc<str>, usize>,
    /// Workers with a job, waiting for a connection slot (shaping).
    connecting: usize,
    /// Workers with an idle connection, per domain, longest idle first.
    parked: HashMap<String, VecDeque<(u64, oneshot::Sender<Wake>)>>,
    next_park: u64,
}

impl ReadyQueue {
    /// Wakes the longest idle worker parked for `domain` with `wake`;
    /// gives `wake` back when there is none.
    fn hand_to_parked(&mut self, domain: &str, mut wake: Wake) -> Result<(), Wake> {
        let Some(parked) = self.parked.get_mut(domain) else {
            return Err(wake);
        };
        let handed = loop {
            let Some((_, tx)) = parked.pop_front() else {
                break Err(wake);
            };
            match tx.send(wake) {
                Ok(()) => break Ok(()),
                // Its worker is gone (the runtime is shutting down).
                Err(back) => wake = back,
            }
        };
        if parked.is_empty() {
            self.parked.remove(domain);
        }
        handed
    }

    /// Asks one parked worker, of any domain, to close its connection.
    fn evict_one(&mut self) {
        let idle: Vec<String> = self.parked.keys().cloned().collect();
        for domain in idle {
            if self.hand_to_parked(&domain, Wake::Leave).is_ok() {
                return;
            }
        }
    }

    /// Whether a queued job waits for a worker that the queue may not
    /// start (`max_workers` reached) while its destination has a free slot.
    fn starved(&self, per_destination: usize, max_workers: usize) -> bool {
        self.active >= max_workers
            && self
                .jobs
                .iter()
                .any(|r| self.busy.get(&r.dest).copied().unwrap_or(0) < per_destination)
    }
}

/// Every ready queue, under one lock.
#[derive(Default)]
pub struct ReadyQueues {
    queues: Mutex<HashMap<PairKey, ReadyQueue>>,
}

impl ReadyQueues {
    /// Appends a job; `true` when the queue has fewer than `max_workers`
    /// workers and the caller must start one (counted here already).
    /// A worker parked for the job's domain takes it over its open
    /// connection instead. With `max_workers` busy, one parked for another
    /// domain is asked to close its connection and take it.
    pub fn push(
        &self,
        key: &PairKey,
        job: ReadyJob,
        per_destination: usize,
        max_workers: usize,
    ) -> bool {
        let mut ready = self.queues.lock().expect("queue lock");
        let q = ready.entry(key.clone()).or_default();
        let domain = job.job.domain.clone();
        let Err(Wake::Job(job)) = q.hand_to_parked(&domain, Wake::Job(job)) else {
            return false;
        };
        q.jobs.push_back(job);
        if q.active < max_workers {
            q.active += 1;
            return true;
        }
        if q.starved(per_destination, max_workers) {
            q.evict_one();
        }
        false
    }

    /// A worker given a job by [`Self::pop`] has to wait for a connection
    /// slot: one parked worker of `key` gives its slot up.
    pub fn evict_parked(&self, key: &PairKey) {
        if let Some(q) = self.queues.lock().expect("queue lock").get_mut(key) {
            q.evict_one();
        }
    }

    /// A worker given a job by [`Self::pop`] has its connection slot.
    pub fn connecting_done(&self, key: &PairKey) {
        if let Some(q) = self.queues.lock().expect("queue lock").get_mut(key) {
            q.connecting = q.connecting.saturating_sub(1);
        }
    }

    /// For a worker whose connection to `domain` has nothing to send: the
    /// next job to `domain`; else, if `park`, a ticket to wait for one;
    /// else (or when the queue is stopping, or another worker waits for a
    /// connection slot, or a job for another destination waits for a
    /// worker) leave.
    pub fn next_or_park(
        &self,
        key: &PairKey,
        domain: &str,
        park: bool,
        per_destination: usize,
        max_workers: usize,
        stopping: bool,
    ) -> Next {
        let mut ready = self.queues.lock().expect("queue lock");
        let Some(q) = ready.get_mut(key) else {
            return Next::Leave;
        };
        if stopping {
            return Next::Leave;
        }
        if let Some(at) = q.jobs.iter().position(|r| r.job.domain == domain) {
            return q.jobs.remove(at).map_or(Next::Leave, Next::Job);
        }
        if !park || q.connecting > 0 || q.starved(per_destination, max_workers) {
            return Next::Leave;
        }
        let (tx, wake) = oneshot::channel();
        let id = q.next_park;
        q.next_park += 1;
        q.parked
            .entry(domain.to_owned())
            .or_default()
            .push_back((id, tx));
        Next::Parked(Parked { wake, id })
    }

    /// A parked worker stops waiting (woken, or its idle time is over):
    /// what it was woken with, if anything. Under the lock, so a job handed
    /// to it at the last moment is still its to send.
    pub fn unpark(&self, key: &PairKey, domain: &str, mut parked: Parked) -> Option<Wake> {
        let mut ready = self.queues.lock().expect("queue lock");
        if let Some(q) = ready.get_mut(key)
            && let Some(list) = q.parked.get_mut(domain)
        {
            list.retain(|(id, _)| *id != parked.id);
            if list.is_empty() {
                q.parked.remove(domain);
            }
        }
        parked.wake.try_recv().ok()
    }

    /// Asks every parked worker to close its connection (the queue is stopping).
    pub fn unpark_all(&self) {
        let mut ready = self.queues.lock().expect("queue lock");
        for q in ready.values_mut() {
            for (_, tx) in q.parked.drain().flat_map(|(_, list)| list) {
                let _ = tx.send(Wake::Leave);
            }
        }
    }

    /// The next job of `key` for a worker without a connection: the first
    /// one whose destination has fewer than `per_destination` connections,
    /// whose slot the caller then holds until [`Self::release`] (and then
    /// waits for a connection slot, until [`Self::connecting_done`]). `None`
    /// also retires the calling worker (in the same critical section, so no
    /// job is left without a worker: a destination at its limit has
    /// workers that come back for it). A stopping queue hands out nothing.
    pub fn pop(&self, key: &PairKey, per_destination: usize, stopping: bool) -> Option<ReadyJob> {
        let mut ready = self.queues.lock().expect("queue lock");
        let q = ready.get_mut(key)?;
        let job = if stopping {
            None
        } else {
            let busy = &q.busy;
            let at = q
                .jobs
                .iter()
                .position(|r| busy.get(&r.dest).copied().unwrap_or(0) < per_destination);
            let job = at.and_then(|at| q.jobs.remove(at));
            if let Some(j) = &job {
                *q.busy.entry(j.dest.clone()).or_default() += 1;
                q.connecting += 1;
            }
            job
        };
        if job.is_none() {
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
