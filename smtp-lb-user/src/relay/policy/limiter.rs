//! Limiters named by a string key (a provider today, `provider@source`
//! later), local to this relay or shared by the cluster through Redis.
//!
//! A shared limiter always keeps its local twin: when Redis is down the
//! same limit is enforced by this relay alone (so a cluster of N relays
//! sends at most N times the limit, never unlimited).
use std::{
    hash::{BuildHasher, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};

use super::{
    cluster::Cluster,
    throttle::{Gcra, Rate},
};

/// Builds limiters: local ones, or shared ones when `[cluster]` is set.
#[derive(Clone, Debug, Default)]
pub struct Limiters {
    cluster: Option<Arc<Cluster>>,
}

impl Limiters {
    pub fn local() -> Self {
        Self::default()
    }

    pub fn shared(cluster: Arc<Cluster>) -> Self {
        Self {
            cluster: Some(cluster),
        }
    }

    /// A rate; `kind` and `key` name it in Redis (`prefix:kind:key`).
    pub fn rate(&self, kind: &str, key: &str, rate: Rate) -> RateLimiter {
        RateLimiter {
            interval: rate.interval(),
            local: Gcra::new(rate),
            shared: self.cluster.as_ref().map(|c| (c.clone(), c.key(kind, key))),
        }
    }

    /// A cap on concurrent connections.
    pub fn connections(&self, key: &str, limit: usize) -> ConnectionLimiter {
        ConnectionLimiter {
            limit,
            local: Arc::new(Semaphore::new(limit)),
            shared: self
                .cluster
                .as_ref()
                .map(|c| (c.clone(), c.key("connections", key))),
        }
    }
}

/// GCRA without burst: events spaced by the rate's interval, whoever asks.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    local: Gcra,
    shared: Option<(Arc<Cluster>, String)>,
}

impl RateLimiter {
    /// Waits for the next slot: the cluster's, or this relay's when Redis is down.
    pub async fn acquire(&self) {
        let shared = match &self.shared {
            Some((c, key)) => c.gcra(key, self.interval).await,
            None => None,
        };
        let wait = shared.unwrap_or_else(|| self.local.reserve_at(Instant::now()));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// At most `limit` connections open at once, in this relay and, when
/// shared, in the whole cluster.
#[derive(Debug)]
pub struct ConnectionLimiter {
    limit: usize,
    /// Always taken first: this relay alone never exceeds the limit, with or without Redis.
    local: Arc<Semaphore>,
    shared: Option<(Arc<Cluster>, String)>,
}

/// One open connection's slot; released on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    _local: OwnedSemaphorePermit,
    lease: Option<Lease>,
}

impl ConnectionPermit {
    /// Whether the slot is the cluster's (a Redis lease), which another relay
    /// may be waiting for.
    pub fn is_shared(&self) -> bool {
        self.lease.is_some()
    }
}

impl ConnectionLimiter {
    /// Waits for a slot. With a cluster, the local slot is taken first,
    /// then a lease is polled for with a short jittered backoff; if Redis
    /// is down the local slot is enough (the lease registers itself once
    /// Redis is back, so open connections count from then on).
    pub async fn acquire(&self) -> ConnectionPermit {
        let local = self
            .local
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let lease = match &self.shared {
            None => None,
            Some((cluster, key)) => {
                let holder = cluster.holder();
                while cluster.lease_acquire(key, &holder, self.limit).await == Some(false) {
                    tokio::time::sleep(backoff()).await;
                }
                Some(Lease::hold(cluster.clone(), key.clone(), holder))
            }
        };
        ConnectionPermit {
            _local: local,
            lease,
        }
    }
}

/// 10–40 ms, so waiting relays do not poll Redis in lockstep.
fn backoff() -> Duration {
    let r = std::hash::RandomState::new().build_hasher().finish();
    Duration::from_millis(10 + r % 31)
}

/// A held lease: refreshed in the background, removed on drop.
#[derive(Debug)]
struct Lease {
    cluster: Arc<Cluster>,
    key: String,
    holder: String,
    refresher: JoinHandle<()>,
}

impl Lease {
    fn hold(cluster: Arc<Cluster>, key: String, holder: String) -> Self {
        let (c, k, h) = (cluster.clone(), key.clone(), holder.clone());
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(c.lease / 3).await;
                c.lease_refresh(&k, &h).await;
            }
        });
        Self {
            cluster,
            key,
            holder,
            refresher,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.refresher.abort();
        let (c, k, h) = (
            self.cluster.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.holder),
        );
        // Outside a runtime (shutdown) the lease simply expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { c.lease_release(&k, &h).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_in_its_window() {
        for _ in 0..200 {
            let b = backoff();
            assert!((10..=40).contains(&b.as_millis()), "{b:?}");
        }
    }

    /// A cluster whose Redis is not there: every limit must still hold locally.
    async fn unreachable() -> Limiters {
        let cfg = super::super::cluster::unreachable_config();
        Limiters::shared(Cluster::start(&cfg, Arc::default()).await.unwrap())
    }

    #[tokio::test]
    async fn without_redis_the_connection_limit_holds_locally() {
        for limiters in [Limiters::local(), unreachable().await] {
            let l = limiters.connections("google", 2);
            let a = l.acquire().await;
            let _b = l.acquire().await;
            let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
            assert!(third.is_err(), "a third connection waits");
            drop(a);
            let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
            assert!(third.is_ok(), "and gets the released slot");
        }
    }

    #[tokio::test]
    async fn without_redis_the_rate_holds_locally() {
        for limiters in [Limiters::local(), unreachable().await] {
            let r = limiters.rate("message_rate", "google", "20/s".parse().unwrap());
            let t0 = Instant::now();
            for _ in 0..5 {
                r.acquire().await;
            }
            // Slots at 0, 50, …, 200 ms.
            let took = t0.elapsed();
            assert!(took >= Duration::from_millis(195), "{took:?}");
            assert!(took < Duration::from_millis(400), "{took:?}");
        }
    }
}
