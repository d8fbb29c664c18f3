//! The scheduled queue: jobs waiting for a time (a retry, a warmup window),
//! in due order.
use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{super::spool::MsgId, message::Job};

#[derive(Default)]
pub struct Scheduled {
    jobs: Mutex<BTreeMap<(Instant, u64), Job>>,
    seq: AtomicU64,
}

impl Scheduled {
    pub fn insert(&self, job: Job, delay: Duration) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.jobs
            .lock()
            .expect("queue lock")
            .insert((Instant::now() + delay, seq), job);
    }

    /// Takes the jobs due at `now`; also returns when the next one is due.
    pub fn take_due(&self, now: Instant) -> (Vec<Job>, Option<Instant>) {
        let mut s = self.jobs.lock().expect("queue lock");
        let later = s.split_off(&(now, u64::MAX));
        let due = std::mem::replace(&mut *s, later);
        (
            due.into_values().collect(),
            s.keys().next().map(|(t, _)| *t),
        )
    }

    /// Takes the jobs of one message (or all).
    pub fn take(&self, id: Option<MsgId>) -> Vec<Job> {
        let mut s = self.jobs.lock().expect("queue lock");
        let keys: Vec<_> = s
            .iter()
            .filter(|(_, j)| id.is_none_or(|id| j.msg.id == id))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter().filter_map(|k| s.remove(&k)).collect()
    }

    /// Calls `f` with each scheduled job.
    pub fn for_each(&self, mut f: impl FnMut(&Job)) {
        self.jobs
            .lock()
            .expect("queue lock")
            .values()
            .for_each(&mut f);
    }
}
