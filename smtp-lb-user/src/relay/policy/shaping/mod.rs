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
//! Rates are GCRA (generic cell rate algorithm): each message reserves the
//! next theoretical arrival time under a lock and then waits for it outside
//! the lock, so any number of connections share one rate and no rate forces
//! concurrency 1 (see [`super::throttle`]).
//!
//! [`config`] parses the file; this module holds the runtime state.
mod config;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

pub use config::{Limits, ShapingConfig};

use super::{
    limiter::{ConnectionLimiter, ConnectionPermit, Limiters, RateLimiter},
    provider::{self, Providers},
    rules::{Action, RuleBook},
    throttle::Gcra,
};
use crate::smtp::reply::Reply;

#[derive(Debug)]
pub struct ProviderShaper {
    /// The provider, or `provider@source` for a pair (also its limiter key).
    pub name: String,
    /// The provider whose rules apply.
    provider: String,
    connections: Option<ConnectionLimiter>,
    pub max_messages_per_connection: Option<usize>,
    pub max_recipients_per_message: Option<usize>,
    message_rate: Option<RateLimiter>,
    connection_rate: Option<RateLimiter>,
    rules: Arc<RuleBook>,
    suspended_until: Mutex<Option<Instant>>,
    /// A `cut_rate` in force: the lower rate and when it ends.
    rate_cut: Mutex<Option<(Arc<Gcra>, Instant)>>,
    /// Suspensions so far (metrics).
    pub suspensions: AtomicU64,
}

/// What the caller does after a reply the rules acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Carry on.
    Continue,
    /// The provider is suspended: close the connection, defer the rest.
    Suspended,
    /// Bounce the recipients that got this reply instead of retrying.
    Bounce,
}

impl ProviderShaper {
    fn new(
        provider: &str,
        name: &str,
        l: &Limits,
        rules: Arc<RuleBook>,
        limiters: &Limiters,
    ) -> Self {
        Self {
            name: name.to_owned(),
            provider: provider.to_owned(),
            connections: l.connection_limit.map(|n| limiters.connections(name, n)),
            max_messages_per_connection: l.max_messages_per_connection,
            max_recipients_per_message: l.max_recipients_per_message,
            message_rate: l
                .message_rate
                .map(|r| limiters.rate("message_rate", name, r)),
            connection_rate: l
                .connection_rate
                .map(|r| limiters.rate("connection_rate", name, r)),
            rules,
            suspended_until: Mutex::new(None),
            rate_cut: Mutex::new(None),
            suspensions: AtomicU64::new(0),
        }
    }

    /// No new connection or message until `until` (counted once while in
    /// force: replies on connections already open extend it, not count it).
    pub fn suspend(&self, until: Instant) {
        let mut s = self.suspended_until.lock().expect("suspend lock");
        if s.is_none_or(|t| t <= Instant::now()) {
            self.suspensions.fetch_add(1, Ordering::Relaxed);
        }
        *s = Some(s.map_or(until, |t| t.max(until)));
    }

    /// When a suspension ends, if one is in force.
    pub fn suspended_until(&self) -> Option<Instant> {
        self.suspended_until
            .lock()
            .expect("suspend lock")
            .filter(|t| *t > Instant::now())
    }

    /// Runs the reply through the provider's rules and applies what fires.
    pub fn on_reply(&self, reply: &Reply, source: Option<IpAddr>) -> Verdict {
        if reply.is_positive() {
            return Verdict::Continue;
        }
        let now = Instant::now();
        match self.rules.on_reply(&self.provider, source, reply, now) {
            None => Verdict::Continue,
            Some(Action::Suspend(d)) => {
                self.suspend(now + d);
                tracing::warn!(provider = self.name, ?source, duration = ?d, %reply, "rule fired: suspended");
                Verdict::Suspended
            }
            Some(Action::CutRate { rate, duration }) => {
                *self.rate_cut.lock().expect("rate cut lock") =
                    Some((Arc::new(Gcra::new(rate)), now + duration));
                tracing::warn!(provider = self.name, ?source, ?rate, ?duration, %reply, "rule fired: rate cut");
                Verdict::Continue
            }
            Some(Action::Bounce) => Verdict::Bounce,
        }
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
    pub async fn connection(&self) -> Option<ConnectionPermit> {
        self.wait_unsuspended().await;
        let permit = match &self.connections {
            Some(c) => Some(c.acquire().await),
            None => None,
        };
        if let Some(g) = &self.connection_rate {
            g.acquire().await;
        }
        permit
    }

    /// Waits for the message rate (and a rate cut while one is in force).
    pub async fn message(&self) {
        self.wait_unsuspended().await;
        if let Some(g) = &self.message_rate {
            g.acquire().await;
        }
        let cut = {
            let mut cut = self.rate_cut.lock().expect("rate cut lock");
            if cut
                .as_ref()
                .is_some_and(|(_, until)| *until <= Instant::now())
            {
                *cut = None;
            }
            cut.as_ref().map(|(g, _)| g.clone())
        };
        if let Some(g) = cut {
            g.acquire().await;
        }
    }
}

/// The limits one connection obeys: its provider's, shared by every
/// source, and its (source, provider) pair's, which also holds the pair's
/// suspension and rate cuts.
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

    /// Recipients per transaction: the lower of the pair's and the provider's.
    pub fn max_recipients_per_message(&self) -> Option<usize> {
        match (
            self.pair.max_recipients_per_message,
            self.provider.max_recipients_per_message,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The pair's slot first, so a source at its own limit holds no provider slot.
    pub async fn connection(&self) -> [Option<ConnectionPermit>; 2] {
        let pair = self.pair.connection().await;
        [pair, self.provider.connection().await]
    }

    pub async fn message(&self) {
        self.pair.message().await;
        self.provider.message().await;
    }

    /// Reply rules act on the pair (see [`ProviderShaper::on_reply`]).
    pub fn on_reply(&self, reply: &Reply, source: Option<IpAddr>) -> Verdict {
        self.pair.on_reply(reply, source)
    }
}

/// Providers and their shapers.
#[derive(Debug)]
pub struct Shaper {
    providers: Providers,
    shapers: HashMap<String, Arc<ProviderShaper>>,
    cfg: ShapingConfig,
    rules: Arc<RuleBook>,
    limiters: Limiters,
    /// (source name, provider) → the pair's shaper, made on first use.
    pairs: Mutex<HashMap<(String, String), Arc<ProviderShaper>>>,
    /// Suspensions in force when this shaper replaced another (reload):
    /// a pair made later starts suspended until then.
    carried: HashMap<(String, String), Instant>,
}

impl Shaper {
    pub fn new(cfg: &ShapingConfig, limiters: &Limiters) -> Self {
        let rules = Arc::new(RuleBook::new(cfg.rules.clone()));
        let shapers = cfg
            .providers
            .names()
            .into_iter()
            .map(|n| {
                (
                    n.to_owned(),
                    Arc::new(ProviderShaper::new(
                        n,
                        n,
                        cfg.limits(n),
                        rules.clone(),
                        limiters,
                    )),
                )
            })
            .collect();
        Self {
            providers: cfg.providers.clone(),
            shapers,
            cfg: cfg.clone(),
            rules,
            limiters: limiters.clone(),
            pairs: Mutex::new(HashMap::new()),
            carried: HashMap::new(),
        }
    }

    /// A shaper for a new file that keeps the suspensions `old` has in force,
    /// so a reload never lifts one early.
    pub fn reloaded(cfg: &ShapingConfig, old: &Self) -> Self {
        let mut new = Self::new(cfg, &old.limiters);
        new.carried = old
            .pairs()
            .into_iter()
            .filter_map(|(s, p, sh)| Some(((s, p), sh.suspended_until()?)))
            .chain(old.carried.iter().map(|(k, v)| (k.clone(), *v)))
            .filter(|(_, until)| *until > Instant::now())
            .collect();
        new
    }

    /// Provider rules (shipped and the file's `mx_suffixes`).
    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// The provider that hosts `mx_host`.
    pub fn provider_of(&self, mx_host: &str) -> String {
        self.providers.classify(mx_host).to_owned()
    }

    /// Every (provider section, source key) with an override, for checking
    /// the keys against the egress sources.
    pub fn override_keys(&self) -> Vec<(&str, &str)> {
        std::iter::once((provider::DEFAULT, &self.cfg.default))
            .chain(self.cfg.limits.iter().map(|(p, l)| (p.as_str(), l)))
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
                let o = l
                    .sources
                    .get(source)
                    .or_else(|| address.and_then(|a| l.sources.get(&a.to_string())))
                    .cloned()
                    .unwrap_or_default();
                let pair = ProviderShaper::new(
                    &provider_shaper.provider,
                    &format!("{provider}@{source}"),
                    &o,
                    self.rules.clone(),
                    &self.limiters,
                );
                if let Some(until) = self.carried.get(&(source.to_owned(), provider.to_owned())) {
                    *pair.suspended_until.lock().expect("suspend lock") = Some(*until);
                }
                Arc::new(pair)
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

    /// Loads the file when there is one; no file means no limits and the shipped rules.
    pub fn load(path: Option<&Path>, limiters: &Limiters) -> anyhow::Result<Self> {
        let cfg = match path {
            Some(p) => ShapingConfig::load(p)?,
            None => ShapingConfig::parse("")?,
        };
        Ok(Self::new(&cfg, limiters))
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
