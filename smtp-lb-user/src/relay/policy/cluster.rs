//! The Redis that relays share their limits through (`[cluster]`): one
//! multiplexed connection, the Lua scripts that make each limit decision
//! atomic, and the up/down state.
//!
//! Losing Redis never lifts a limit: a failed or slow command marks Redis
//! down (one warning per outage), every call answers `None` at once and the
//! caller enforces the same limit locally (`policy::limiter`), while a
//! background task reconnects and logs when Redis is back. Clocks come from
//! Redis `TIME`, so relays with skewed clocks still share one schedule.
use std::{
    hash::{BuildHasher, Hasher},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use redis::{FromRedisValue, Script, aio::MultiplexedConnection};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// `[cluster]` in the relay config.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port[/db]` shared by every relay of the cluster.
    pub redis: String,
    /// Prefix of every key the relay writes (several clusters can share one Redis).
    #[serde(default = "ClusterConfig::default_key_prefix")]
    pub key_prefix: String,
    /// Longest wait for one Redis command (and for connecting) before the
    /// relay falls back to local limits.
    #[serde(default = "ClusterConfig::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Lifetime of a connection lease; holders refresh it every third of
    /// that, so a crashed relay's connections stop counting after it.
    #[serde(default = "ClusterConfig::default_lease", with = "humantime_serde")]
    pub lease: Duration,
}

impl ClusterConfig {
    fn default_key_prefix() -> String {
        "smtp-lb".to_owned()
    }
    fn default_timeout() -> Duration {
        Duration::from_millis(250)
    }
    fn default_lease() -> Duration {
        Duration::from_secs(5)
    }
}

/// How often a down Redis is tried again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// GCRA without burst on the Redis clock. KEYS[1] holds the theoretical
/// arrival time (µs); ARGV[1] is the interval (µs). Reserves the next slot
/// and returns how many µs away it is. `%.0f` because Lua 5.1 would print
/// a µs timestamp in exponent notation.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = math.max(tonumber(redis.call('GET', KEYS[1])) or now, now)
local tat = slot + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', math.ceil((tat - now) / 1000) + 1000))
return slot - now
";

/// Connection leases: KEYS[1] is a ZSET holder → expiry (ms, Redis clock);
/// ARGV = holder, limit, lease ms. Drops expired leases, then admits the
/// holder if it already holds one or the set is below the limit (1), else 0.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[3])), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
";

/// Extends (or re-registers, after an outage) a lease unconditionally: the
/// connection is open, so it counts, and new holders wait until it closes.
const REFRESH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
";

const RELEASE: &str = "return redis.call('ZREM', KEYS[1], ARGV[1])";

/// The cluster's own counters; the metrics layer renders them.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// `[cluster]` is set (the cluster series are rendered).
    pub configured: AtomicBool,
    /// The cluster's Redis answers (limits shared) or not (limits local).
    pub redis_up: AtomicBool,
    /// Times the cluster's Redis was lost.
    pub outages: AtomicU64,
    /// Decisions taken locally because Redis did not answer.
    pub local: AtomicU64,
}

/// The shared Redis of a cluster of relays.
pub struct Cluster {
    client: redis::Client,
    /// `None` while Redis is down; the reconnect task fills it.
    conn: Mutex<Option<MultiplexedConnection>>,
    prefix: String,
    timeout: Duration,
    pub lease: Duration,
    /// Unique per process, so leases of different relays never collide.
    instance: String,
    holders: AtomicU64,
    stats: Arc<ClusterStats>,
    gcra: Script,
    acquire: Script,
    refresh: Script,
    release: Script,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects (or warns and starts local) and spawns the reconnect task.
    /// Only a malformed URL is an error.
    pub async fn start(cfg: &ClusterConfig, stats: Arc<ClusterStats>) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(cfg.redis.as_str())
            .with_context(|| format!("[cluster] redis = {:?}", cfg.redis))?;
        let random = std::hash::RandomState::new().build_hasher().finish();
        stats.configured.store(true, Ordering::Relaxed);
        // Counted as up until the first attempt says otherwise, so a failed
        // start logs the outage warning like any other.
        stats.redis_up.store(true, Ordering::Relaxed);
        let cluster = Arc::new(Self {
            client,
            conn: Mutex::new(None),
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            lease: cfg.lease.max(Duration::from_millis(300)),
            instance: format!("{}:{random:08x}", std::process::id()),
            holders: AtomicU64::new(0),
            stats,
            gcra: Script::new(GCRA),
            acquire: Script::new(ACQUIRE),
            refresh: Script::new(REFRESH),
            release: Script::new(RELEASE),
        });
        match cluster.connect().await {
            Ok(c) => {
                *cluster.conn.lock().expect("cluster lock") = Some(c);
                info!(redis = cfg.redis, "cluster limits shared through redis");
            }
            Err(e) => cluster.down(&e),
        }
        tokio::spawn(reconnect(Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let attempt = async {
            let mut c = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut c).await?;
            Ok::<_, redis::RedisError>(c)
        };
        match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), attempt).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".to_owned()),
        }
    }

    /// Forgets the connection; warns once per outage.
    fn down(&self, error: &str) {
        *self.conn.lock().expect("cluster lock") = None;
        if self.stats.redis_up.swap(false, Ordering::Relaxed) {
            self.stats.outages.fetch_add(1, Ordering::Relaxed);
            warn!(
                error,
                "redis unreachable: cluster limits are enforced locally by each relay until it is back"
            );
        }
    }

    /// The Redis key of one limiter: `prefix:kind:name`.
    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    /// A lease holder id unique in the cluster.
    pub fn holder(&self) -> String {
        format!(
            "{}:{}",
            self.instance,
            self.holders.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs one script; `None` when Redis is down, fails or is too slow.
    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[String],
    ) -> Option<T> {
        let conn = self.conn.lock().expect("cluster lock").clone();
        let Some(mut conn) = conn else {
            self.stats.local.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let mut call = script.prepare_invoke();
        call.key(key);
        for a in args {
            call.arg(a);
        }
        let error = match tokio::time::timeout(self.timeout, call.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.down(&error);
        self.stats.local.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Reserves the next slot of a shared rate; how long to wait for it.
    pub async fn gcra(&self, key: &str, interval: Duration) -> Option<Duration> {
        let us: u64 = self
            .eval(&self.gcra, key, &[interval.as_micros().to_string()])
            .await?;
        Some(Duration::from_micros(us))
    }

    /// Takes a connection lease if the cluster is below `limit`.
    pub async fn lease_acquire(&self, key: &str, holder: &str, limit: usize) -> Option<bool> {
        let ok: u8 = self
            .eval(
                &self.acquire,
                key,
                &[holder.to_owned(), limit.to_string(), self.lease_ms()],
            )
            .await?;
        Some(ok == 1)
    }

    pub async fn lease_refresh(&self, key: &str, holder: &str) {
        let _: Option<u8> = self
            .eval(&self.refresh, key, &[holder.to_owned(), self.lease_ms()])
            .await;
    }

    pub async fn lease_release(&self, key: &str, holder: &str) {
        let _: Option<u8> = self.eval(&self.release, key, &[holder.to_owned()]).await;
    }

    fn lease_ms(&self) -> String {
        self.lease.as_millis().to_string()
    }
}

/// Tries a down Redis again every second until the cluster is dropped.
async fn reconnect(cluster: Weak<Cluster>) {
    loop {
        tokio::time::sleep(RECONNECT_EVERY).await;
        let Some(c) = cluster.upgrade() else { return };
        if c.conn.lock().expect("cluster lock").is_some() {
            continue;
        }
        if let Ok(conn) = c.connect().await {
            *c.conn.lock().expect("cluster lock") = Some(conn);
            c.stats.redis_up.store(true, Ordering::Relaxed);
            info!("redis reachable again: cluster limits are shared again");
        }
    }
}

/// A `[cluster]` pointing at a loopback port nothing listens on (tests).
#[cfg(test)]
pub fn unreachable_config() -> ClusterConfig {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    toml::from_str(&format!("redis = \"redis://127.0.0.1:{port}\"\n")).expect("cluster config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: ClusterConfig = toml::from_str("redis = \"redis://127.0.0.1:6379\"\n").unwrap();
        assert_eq!(c.key_prefix, "smtp-lb");
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.lease, Duration::from_secs(5));
        let e = toml::from_str::<ClusterConfig>("redis = \"redis://x\"\nttimeout = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("ttimeout"), "{e}");
    }

    #[tokio::test]
    async fn a_malformed_url_is_refused_naming_the_key() {
        let cfg: ClusterConfig = toml::from_str("redis = \"http://nope\"\n").unwrap();
        let e = format!(
            "{:#}",
            Cluster::start(&cfg, Arc::default()).await.unwrap_err()
        );
        assert!(
            e.contains("[cluster] redis") && e.contains("http://nope"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_redis_answers_none_and_counts_one_outage() {
        let cfg = unreachable_config();
        let stats = Arc::new(ClusterStats::default());
        let c = Cluster::start(&cfg, stats.clone()).await.unwrap();
        assert_eq!(c.gcra("k", Duration::from_millis(100)).await, None);
        assert_eq!(c.lease_acquire("k", &c.holder(), 1).await, None);
        assert!(!stats.redis_up.load(Ordering::Relaxed));
        assert_eq!(stats.outages.load(Ordering::Relaxed), 1);
        assert_eq!(stats.local.load(Ordering::Relaxed), 2);
        assert_ne!(c.holder(), c.holder());
        assert_eq!(c.key("connections", "google"), "smtp-lb:connections:google");
    }
}
