//! Traffic shaping per provider (issue 6): a TOML file with a `[default]`
//! section and one section per provider (see [`super::provider`]):
//!
//! ```toml
//! [default]
//! connection_limit = 20
//!
//! [google]
//! connection_limit = 5
//! max_messages_per_connection = 100
//! message_rate = "600/min"
//! connection_rate = "10/s"
//! ```
//!
//! A provider section inherits every key it does not set from `[default]`.
//!
//! Per-source overrides (`[google.sources."198.51.100.21"]`, or by source
//! name) take the same keys and apply to that (source, provider) pair in
//! addition to the provider-wide limits; `[default.sources.X]` applies to
//! every provider without its own entry for X. Suspension lives per pair.
//! Rates are GCRA (generic cell rate algorithm): each message reserves the
//! next theoretical arrival time under a lock and then waits for it outside
//! the lock, so any number of connections share one rate and no rate forces
//! concurrency 1.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::provider::{self, Providers};

/// `N/unit`: `"600/min"`, `"10/s"`, `"5000/h"`, `"100000/d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The spacing between two events at this rate.
    pub fn interval(self) -> Duration {
        self.per / self.count
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("bad rate {s:?}: expected N/unit with unit s, min, h or d, e.g. \"600/min\"")
        };
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("bad rate {s:?}: the count must be at least 1"));
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_mins(1),
            "h" | "hour" => Duration::from_hours(1),
            "d" | "day" => Duration::from_hours(24),
            _ => return Err(bad()),
        };
        Ok(Self { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One section of the shaping file; unset keys inherit from `[default]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent connections to the provider (all its domains together).
    pub connection_limit: Option<usize>,
    /// Messages over one connection before it is closed.
    pub max_messages_per_connection: Option<usize>,
    /// Messages to the provider, over all its connections.
    pub message_rate: Option<Rate>,
    /// New connections to the provider.
    pub connection_rate: Option<Rate>,
    /// A `421 4.7.28` from the provider suspends it for this long.
    #[serde(default, with = "humantime_serde")]
    pub suspend_for: Option<Duration>,
    /// Per-source overrides, by egress source name or address.
    #[serde(default)]
    pub sources: BTreeMap<String, Limits>,
}

impl Limits {
    fn or(&self, base: &Self) -> Self {
        Self {
            connection_limit: self.connection_limit.or(base.connection_limit),
            max_messages_per_connection: self
                .max_messages_per_connection
                .or(base.max_messages_per_connection),
            message_rate: self.message_rate.or(base.message_rate),
            connection_rate: self.connection_rate.or(base.connection_rate),
            suspend_for: self.suspend_for.or(base.suspend_for),
            sources: base
                .sources
                .iter()
                .chain(&self.sources)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// The parsed file: effective limits per provider (defaults applied).
#[derive(Clone, Debug, Default)]
pub struct ShapingConfig {
    pub default: Limits,
    pub providers: BTreeMap<String, Limits>,
}

impl ShapingConfig {
    pub fn load(path: &Path, providers: &Providers) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read shaping file {}", path.display()))?;
        Self::parse(&text, providers).with_context(|| format!("shaping file {}", path.display()))
    }

    /// Unknown keys and bad rates are refused with their line (the toml
    /// error says it); an unknown provider section by name and line.
    pub fn parse(text: &str, providers: &Providers) -> anyhow::Result<Self> {
        let mut sections: BTreeMap<String, Limits> = toml::from_str(text)?;
        let known = providers.names();
        for name in sections.keys() {
            if !known.contains(&name.as_str()) {
                let line = text
                    .lines()
                    .position(|l| {
                        let l = l.trim();
                        l == format!("[{name}]") || l == format!("[\"{name}\"]")
                    })
                    .map_or_else(String::new, |i| format!(" at line {}", i + 1));
                bail!(
                    "unknown provider section [{name}]{line}; known providers: {}",
                    known.join(", ")
                );
            }
        }
        for (name, l) in &sections {
            if l.connection_limit == Some(0) || l.max_messages_per_connection == Some(0) {
                bail!("[{name}]: limits must be at least 1");
            }
            for (src, o) in &l.sources {
                if o.connection_limit == Some(0) || o.max_messages_per_connection == Some(0) {
                    bail!("[{name}.sources.{src:?}]: limits must be at least 1");
                }
                if !o.sources.is_empty() {
                    bail!("[{name}.sources.{src:?}]: a source override has no sources of its own");
                }
            }
        }
        let default = sections.remove(provider::DEFAULT).unwrap_or_default();
        let providers = sections
            .into_iter()
            .map(|(k, v)| (k, v.or(&default)))
            .collect();
        Ok(Self { default, providers })
    }

    /// The effective limits of one provider.
    pub fn limits(&self, provider: &str) -> &Limits {
        self.providers.get(provider).unwrap_or(&self.default)
    }
}

/// GCRA with no burst: events are spaced by `interval` exactly, whoever asks.
#[derive(Debug)]
pub struct Gcra {
    interval: Duration,
    /// Theoretical arrival time of the next event.
    tat: Mutex<Option<Instant>>,
}

impl Gcra {
    pub fn new(rate: Rate) -> Self {
        Self {
            interval: rate.interval(),
            tat: Mutex::new(None),
        }
    }

    /// Reserves the next slot at `now` and returns how long to wait for it.
    pub fn reserve_at(&self, now: Instant) -> Duration {
        let mut tat = self.tat.lock().expect("gcra lock");
        let slot = tat.map_or(now, |t| t.max(now));
        *tat = Some(slot + self.interval);
        slot - now
    }

    /// Waits for a slot.
    pub async fn acquire(&self) {
        let wait = self.reserve_at(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Runtime state of one provider's limits, shared by all its connections.
#[derive(Debug)]
pub struct ProviderShaper {
    pub name: String,
    connections: Option<Arc<Semaphore>>,
    pub max_messages_per_connection: Option<usize>,
    message_rate: Option<Gcra>,
    connection_rate: Option<Gcra>,
    suspend_for: Option<Duration>,
    suspended_until: Mutex<Option<Instant>>,
    /// Suspensions by a `421 4.7.28` so far (metrics).
    pub suspensions: std::sync::atomic::AtomicU64,
    /// A temporary lower message rate set by [`Self::cut_rate`].
    rate_cut: Mutex<Option<(Arc<Gcra>, Instant)>>,
    base_rate: Option<Rate>,
}

impl ProviderShaper {
    fn new(name: &str, l: &Limits) -> Self {
        Self {
            name: name.to_owned(),
            connections: l.connection_limit.map(|n| Arc::new(Semaphore::new(n))),
            max_messages_per_connection: l.max_messages_per_connection,
            message_rate: l.message_rate.map(Gcra::new),
            connection_rate: l.connection_rate.map(Gcra::new),
            suspend_for: l.suspend_for,
            suspended_until: Mutex::new(None),
            rate_cut: Mutex::new(None),
            suspensions: std::sync::atomic::AtomicU64::new(0),
            base_rate: l.message_rate,
        }
    }

    /// No new connection or message until `until`.
    pub fn suspend(&self, until: Instant) {
        *self.suspended_until.lock().expect("suspend lock") = Some(until);
    }

    /// When a suspension ends, if one is in force.
    pub fn suspended_until(&self) -> Option<Instant> {
        self.suspended_until
            .lock()
            .expect("suspend lock")
            .filter(|t| *t > Instant::now())
    }

    /// Multiplies the message rate by `factor` (0–1) until `until`; no-op
    /// without a `message_rate`.
    pub fn cut_rate(&self, factor: f64, until: Instant) {
        let Some(r) = self.base_rate else { return };
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a clamped, rounded count"
        )]
        let count = (f64::from(r.count) * factor.clamp(0.0, 1.0))
            .round()
            .max(1.0) as u32;
        let g = Arc::new(Gcra::new(Rate { count, per: r.per }));
        *self.rate_cut.lock().expect("rate cut lock") = Some((g, until));
    }

    /// Whether `reply` suspends this provider (`421 4.7.28`, Gmail's "unusual
    /// rate"); if so, it is suspended from now for `suspend_for`.
    pub fn on_reply(&self, reply: &super::proto::Reply) -> bool {
        let Some(d) = self.suspend_for else {
            return false;
        };
        let hit = reply.code == 421
            && (reply
                .enhanced
                .is_some_and(|e| (e.class, e.subject, e.detail) == (4, 7, 28))
                || reply.text().contains("4.7.28"));
        if hit {
            *self.suspended_until.lock().expect("suspend lock") = Some(Instant::now() + d);
            tracing::warn!(provider = self.name, duration = ?d, "provider suspended after 421 4.7.28");
        }
        if hit {
            self.suspensions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        hit
    }

    async fn wait_unsuspended(&self) {
        loop {
            let until = *self.suspended_until.lock().expect("suspend lock");
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t.into()).await,
                _ => return,
            }
        }
    }

    /// Waits for a connection slot (held until the permit drops) and for the
    /// connection rate.
    pub async fn connection(&self) -> Option<OwnedSemaphorePermit> {
        self.wait_unsuspended().await;
        let permit = match &self.connections {
            Some(s) => Some(
                s.clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed"),
            ),
            None => None,
        };
        if let Some(g) = &self.connection_rate {
            g.acquire().await;
        }
        permit
    }

    /// Waits for the message rate.
    pub async fn message(&self) {
        self.wait_unsuspended().await;
        let cut = self
            .rate_cut
            .lock()
            .expect("rate cut lock")
            .as_ref()
            .filter(|(_, until)| *until > Instant::now())
            .map(|(g, _)| g.clone());
        if let Some(g) = cut {
            g.acquire().await;
        } else if let Some(g) = &self.message_rate {
            g.acquire().await;
        }
    }
}

/// The limits one connection obeys: its provider's, shared by every
/// source, and its (source, provider) pair's, which also holds the pair's
/// suspension.
#[derive(Clone, Debug)]
pub struct PairShaper {
    pub provider: Arc<ProviderShaper>,
    pub pair: Arc<ProviderShaper>,
}

impl PairShaper {
    pub fn max_messages_per_connection(&self) -> Option<usize> {
        match (
            self.pair.max_messages_per_connection,
            self.provider.max_messages_per_connection,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The pair's slot first, so a source at its own limit holds no provider slot.
    pub async fn connection(&self) -> [Option<OwnedSemaphorePermit>; 2] {
        let pair = self.pair.connection().await;
        [pair, self.provider.connection().await]
    }

    pub async fn message(&self) {
        self.pair.message().await;
        self.provider.message().await;
    }

    /// A `421 4.7.28` suspends this pair (see [`ProviderShaper::on_reply`]).
    pub fn on_reply(&self, reply: &super::proto::Reply) -> bool {
        self.pair.on_reply(reply)
    }
}

/// Providers and their shapers.
#[derive(Debug)]
pub struct Shaper {
    providers: Providers,
    shapers: HashMap<String, Arc<ProviderShaper>>,
    cfg: ShapingConfig,
    /// (source name, provider) → the pair's shaper, made on first use.
    pairs: Mutex<HashMap<(String, String), Arc<ProviderShaper>>>,
}

impl Shaper {
    pub fn new(providers: Providers, cfg: &ShapingConfig) -> Self {
        let shapers = providers
            .names()
            .into_iter()
            .map(|n| {
                (
                    n.to_owned(),
                    Arc::new(ProviderShaper::new(n, cfg.limits(n))),
                )
            })
            .collect();
        Self {
            providers,
            shapers,
            cfg: cfg.clone(),
            pairs: Mutex::new(HashMap::new()),
        }
    }

    /// Loads the file when there is one; no file means no limits.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let providers = Providers::default();
        let cfg = match path {
            Some(p) => ShapingConfig::load(p, &providers)?,
            None => ShapingConfig::default(),
        };
        Ok(Self::new(providers, &cfg))
    }

    /// The provider that hosts `mx_host`.
    pub fn provider_of(&self, mx_host: &str) -> String {
        self.providers.classify(mx_host).to_owned()
    }

    /// Every (provider section, source key) with an override, for checking
    /// the keys against the egress sources.
    pub fn override_keys(&self) -> Vec<(&str, &str)> {
        std::iter::once((provider::DEFAULT, &self.cfg.default))
            .chain(self.cfg.providers.iter().map(|(p, l)| (p.as_str(), l)))
            .flat_map(|(p, l)| l.sources.keys().map(move |k| (p, k.as_str())))
            .collect()
    }

    /// The shapers of one (egress source, provider) pair: the override is
    /// found by the source's name, then by its address.
    pub fn for_pair(&self, source: &str, address: Option<IpAddr>, provider: &str) -> PairShaper {
        let provider_shaper = self
            .shapers
            .get(provider)
            .or_else(|| self.shapers.get(provider::DEFAULT))
            .expect("default shaper exists")
            .clone();
        let pair = self
            .pairs
            .lock()
            .expect("pairs lock")
            .entry((source.to_owned(), provider.to_owned()))
            .or_insert_with(|| {
                let l = self.cfg.limits(provider);
                let mut o = l
                    .sources
                    .get(source)
                    .or_else(|| address.and_then(|a| l.sources.get(&a.to_string())))
                    .cloned()
                    .unwrap_or_default();
                o.suspend_for = o.suspend_for.or(l.suspend_for);
                Arc::new(ProviderShaper::new(&format!("{provider} via {source}"), &o))
            })
            .clone();
        PairShaper {
            provider: provider_shaper,
            pair,
        }
    }

    /// Every pair in use: (source, provider, shaper).
    pub fn pairs(&self) -> Vec<(String, String, Arc<ProviderShaper>)> {
        self.pairs
            .lock()
            .expect("pairs lock")
            .iter()
            .map(|((s, p), v)| (s.clone(), p.clone(), v.clone()))
            .collect()
    }

    /// The shaper of the provider that hosts `mx_host`.
    pub fn for_host(&self, mx_host: &str) -> Arc<ProviderShaper> {
        let p = self.providers.classify(mx_host);
        self.shapers
            .get(p)
            .or_else(|| self.shapers.get(provider::DEFAULT))
            .expect("default shaper exists")
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<ShapingConfig> {
        ShapingConfig::parse(s, &Providers::default())
    }

    #[test]
    fn rates_parse_in_every_unit_and_bad_ones_are_refused() {
        assert_eq!(
            "600/min".parse::<Rate>().unwrap(),
            Rate {
                count: 600,
                per: Duration::from_mins(1)
            }
        );
        assert_eq!(
            "10/s".parse::<Rate>().unwrap().interval(),
            Duration::from_millis(100)
        );
        assert_eq!(
            "3600/h".parse::<Rate>().unwrap().interval(),
            Duration::from_secs(1)
        );
        assert_eq!("1/d".parse::<Rate>().unwrap().per, Duration::from_hours(24));
        for bad in ["600", "x/min", "0/s", "10/fortnight", "-1/s", "/s", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn provider_sections_inherit_from_default() {
        let c = parse(
            "[default]\nconnection_limit = 20\nmessage_rate = \"100/s\"\n\n[google]\nconnection_limit = 5\nmax_messages_per_connection = 100\nconnection_rate = \"10/s\"\n",
        )
        .unwrap();
        let g = c.limits("google");
        assert_eq!(g.connection_limit, Some(5));
        assert_eq!(g.max_messages_per_connection, Some(100));
        assert_eq!(g.message_rate, Some("100/s".parse().unwrap()));
        assert_eq!(g.connection_rate, Some("10/s".parse().unwrap()));
        assert_eq!(c.limits("yahoo").connection_limit, Some(20));
        assert_eq!(c.limits("yahoo").connection_rate, None);
        assert_eq!(parse("").unwrap().limits("google"), &Limits::default());
    }

    #[test]
    fn bad_files_are_refused_naming_the_line_or_section() {
        let e = format!(
            "{:#}",
            parse("[default]\nconnection_limit = 2\n\n[google]\nconection_limit = 5\n")
                .unwrap_err()
        );
        assert!(e.contains("line 5") && e.contains("conection_limit"), "{e}");
        let e = format!(
            "{:#}",
            parse("[google]\nconnection_limit = 5\nmessage_rate = \"600/fortnight\"\n")
                .unwrap_err()
        );
        assert!(e.contains("line 3") && e.contains("600/fortnight"), "{e}");
        let e = format!(
            "{:#}",
            parse("[google]\n[gmial]\nconnection_limit = 1\n").unwrap_err()
        );
        assert!(e.contains("[gmial]") && e.contains("line 2"), "{e}");
        let e = format!(
            "{:#}",
            parse("[apple]\nconnection_limit = 0\n").unwrap_err()
        );
        assert!(e.contains("[apple]"), "{e}");
    }

    #[test]
    fn gcra_spaces_reservations_by_the_interval_from_many_callers() {
        let g = Gcra::new("10/s".parse().unwrap());
        let t0 = Instant::now();
        // Five callers at once get slots 0, 100, …, 400 ms out.
        let waits: Vec<_> = (0..5).map(|_| g.reserve_at(t0)).collect();
        assert_eq!(
            waits,
            (0..5)
                .map(|i| Duration::from_millis(100 * i))
                .collect::<Vec<_>>()
        );
        // After an idle gap there is no burst credit: the next slot is now.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(g.reserve_at(later), Duration::ZERO);
        assert_eq!(g.reserve_at(later), Duration::from_millis(100));
    }

    #[test]
    fn only_421_4_7_28_suspends_a_provider_with_suspend_for() {
        use super::super::proto::Reply;
        let cfg = parse("[google]\nsuspend_for = \"3s\"\n").unwrap();
        assert_eq!(
            cfg.limits("google").suspend_for,
            Some(Duration::from_secs(3))
        );
        let s = Shaper::new(Providers::default(), &cfg);
        let g = s.for_host("mx.google.com");
        assert!(!g.on_reply(&Reply::local(421, "4.7.0", "busy")));
        assert!(!g.on_reply(&Reply::local(451, "4.7.28", "x")));
        assert!(g.on_reply(&Reply::local(421, "4.7.28", "unusual rate")));
        assert!(
            !s.for_host("mx.example.org")
                .on_reply(&Reply::local(421, "4.7.28", "x"))
        );
    }

    #[test]
    fn source_overrides_apply_per_pair_by_name_or_address_and_suspend_per_pair() {
        use super::super::proto::Reply;
        let cfg = parse(
            "[default.sources.ip9]\nconnection_limit = 7\n\n[google]\nconnection_limit = 10\nsuspend_for = \"1m\"\n\n[google.sources.\"198.51.100.22\"]\nconnection_limit = 1\nmessage_rate = \"60/min\"\n",
        )
        .unwrap();
        let shaper = Shaper::new(Providers::default(), &cfg);
        let addr = |a: &str| Some(a.parse().unwrap());
        let ip2 = shaper.for_pair("ip2", addr("198.51.100.22"), "google");
        assert_eq!(ip2.provider.name, "google");
        assert!(ip2.pair.connections.is_some() && ip2.pair.message_rate.is_some());
        let ip1 = shaper.for_pair("ip1", addr("198.51.100.21"), "google");
        assert!(ip1.pair.connections.is_none(), "no override for ip1");
        // [default.sources] reaches providers without their own entry.
        let ip9 = shaper.for_pair("ip9", None, "yahoo");
        assert_eq!(
            ip9.pair.connections.as_ref().unwrap().available_permits(),
            7
        );
        let mut keys = shaper.override_keys();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                ("default", "ip9"),
                ("google", "198.51.100.22"),
                ("google", "ip9")
            ]
        );
        // 421 4.7.28 suspends the pair, not the provider or the other source.
        assert!(ip2.on_reply(&Reply::local(421, "4.7.28", "unusual rate")));
        assert!(ip2.pair.suspended_until().is_some());
        assert!(ip1.pair.suspended_until().is_none() && ip2.provider.suspended_until().is_none());
        assert!(Arc::ptr_eq(
            &shaper.for_pair("ip2", None, "google").pair,
            &ip2.pair
        ));
        let e = format!(
            "{:#}",
            parse("[google.sources.x.sources.y]\nconnection_limit = 1\n").unwrap_err()
        );
        assert!(e.contains("[google.sources.\"x\"]"), "{e}");
    }

    #[tokio::test]
    async fn cut_rate_slows_messages_until_it_expires() {
        let cfg = parse("[google]\nmessage_rate = \"20/s\"\n").unwrap();
        let g = Shaper::new(Providers::default(), &cfg).for_host("mx.google.com");
        let timed = async |n| {
            let t = Instant::now();
            for _ in 0..n {
                g.message().await;
            }
            t.elapsed()
        };
        // 50 ms spacing: 4 messages take ≥ 150 ms; cut to half: ≥ 300 ms.
        let plain = timed(4).await;
        g.cut_rate(0.5, Instant::now() + Duration::from_secs(5));
        let cut = timed(4).await;
        assert!(plain < Duration::from_millis(260), "{plain:?}");
        assert!(cut >= Duration::from_millis(300), "{cut:?}");
    }

    #[tokio::test]
    async fn connection_limit_caps_permits_per_provider_only() {
        let cfg = parse("[google]\nconnection_limit = 2\n").unwrap();
        let s = Shaper::new(Providers::default(), &cfg);
        let g = s.for_host("mx.google.com");
        let a = g.connection().await;
        let b = g.connection().await;
        assert!(a.is_some() && b.is_some());
        let third = tokio::time::timeout(Duration::from_millis(50), g.connection()).await;
        assert!(third.is_err(), "a third google connection waits");
        let other = s.for_host("mx.example.org");
        assert_eq!(other.name, "default");
        assert!(other.connection().await.is_none(), "default: unlimited");
        drop(a);
        assert!(g.connection().await.is_some());
    }
}
