//! Egress (issue 6): sources (a local IP address and its HELO name), pools
//! of sources chosen by smooth weighted round robin, the rules that pick a
//! pool for a message, and IP warmup caps per (source, provider).
//!
//! ```toml
//! [egress]
//! default_pool = "main"
//! warmup_day = "24h"                 # length of a warmup "day" (shorter in tests)
//!
//! [[egress.source]]
//! name = "ip1"
//! address = "198.51.100.21"
//! helo = "mta1.example.net"
//! warmup_start = "2026-11-01"        # or "now"; absent = warm
//!
//! [[egress.pool]]
//! name = "main"
//! sources = [{ name = "ip1", weight = 2 }, { name = "ip2" }]
//!
//! [[egress.select]]                  # first match wins
//! sender_domain = "news.example.com"
//! pool = "marketing"
//!
//! [egress.warmup.google]             # provider (or "default"): caps by warmup day
//! daily = [50, 100, 500]
//! hourly = [5, 10, 50]
//! overflow = "spill"                 # or "wait"
//! ```
//!
//! Without `[egress]` there is one implicit pool of one source:
//! `delivery.source_ip` (or the kernel's choice) with `delivery.helo_name`.
mod config;
mod source;
#[cfg(test)]
mod tests;
mod warmup;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure};
use tracing::warn;

use self::warmup::parse_date;
pub use self::{
    config::{
        EgressConfig, Overflow, PoolConfig, PoolMember, SelectConfig, SourceConfig, WarmupSchedule,
    },
    source::{Source, SourceId},
    warmup::{Warmup, WarmupProgress},
};
use super::policy::provider::Providers;

#[derive(Debug)]
struct Pool {
    name: String,
    members: Vec<SourceId>,
    weights: Vec<i64>,
    current: Mutex<Vec<i64>>,
}

#[derive(Debug)]
enum Matcher {
    Sender(String),
    SenderDomain(String),
    Tenant(String),
}

/// What [`Egress::pick`] decided for one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    Source(SourceId),
    /// Every candidate is over its warmup cap; try again after the delay
    /// (on this source when the overflow policy is `wait`).
    Wait {
        source: Option<SourceId>,
        after: Duration,
    },
    /// Every source of the pool is out (unplumbed).
    NoSource,
}

/// Sources, pools, selectors and warmup state.
#[derive(Debug)]
pub struct Egress {
    pub sources: Vec<Source>,
    pools: Vec<Pool>,
    default_pool: usize,
    selects: Vec<(Matcher, usize)>,
    pub tenant_header: Option<String>,
    recheck: Duration,
    pub warmup: Warmup,
}

impl Egress {
    /// Builds the egress from `[egress]`, or the implicit one-source pool of
    /// `implicit_source` (the kernel's choice when `None`) saying `default_helo`.
    pub fn from_config(
        e: Option<&EgressConfig>,
        default_helo: &str,
        implicit_source: Option<IpAddr>,
        providers: &Providers,
    ) -> anyhow::Result<Self> {
        let Some(e) = e else {
            return Ok(Self {
                sources: vec![Source {
                    name: "default".to_owned(),
                    address: implicit_source,
                    helo: default_helo.to_owned(),
                    warmup_start: None,
                    unplumbed_until: Mutex::new(None),
                }],
                pools: vec![Pool::new("default".to_owned(), vec![0], vec![1])],
                default_pool: 0,
                selects: Vec::new(),
                tenant_header: None,
                recheck: EgressConfig::default_recheck(),
                warmup: Warmup::new(Duration::from_hours(24), BTreeMap::new()),
            });
        };
        Self::build(e, default_helo, providers, SystemTime::now())
    }

    fn build(
        e: &EgressConfig,
        default_helo: &str,
        providers: &Providers,
        now: SystemTime,
    ) -> anyhow::Result<Self> {
        let mut sources = Vec::new();
        let mut by_name = HashMap::new();
        for (i, s) in e.sources.iter().enumerate() {
            let at = format!("[[egress.source]] #{} ({:?})", i + 1, s.name);
            ensure!(!s.name.is_empty(), "{at}: name is empty");
            ensure!(
                by_name.insert(s.name.clone(), i).is_none(),
                "{at}: duplicate source name"
            );
            ensure!(
                !e.sources[..i].iter().any(|o| o.address == s.address),
                "{at}: address {} is already used by another source",
                s.address
            );
            let warmup_start = match s.warmup_start.as_deref() {
                None => None,
                Some("now") => Some(now),
                Some(d) => {
                    Some(parse_date(d).map_err(|m| anyhow::anyhow!("{at}: warmup_start: {m}"))?)
                }
            };
            sources.push(Source {
                name: s.name.clone(),
                address: Some(s.address),
                helo: s.helo.clone().unwrap_or_else(|| default_helo.to_owned()),
                warmup_start,
                unplumbed_until: Mutex::new(None),
            });
        }
        let mut pools: Vec<Pool> = Vec::new();
        for (i, p) in e.pools.iter().enumerate() {
            let at = format!("[[egress.pool]] #{} ({:?})", i + 1, p.name);
            ensure!(
                !pools.iter().any(|o| o.name == p.name),
                "{at}: duplicate pool name"
            );
            ensure!(!p.sources.is_empty(), "{at}: sources is empty");
            let mut members = Vec::new();
            let mut weights = Vec::new();
            for (k, m) in p.sources.iter().enumerate() {
                let Some(&id) = by_name.get(&m.name) else {
                    bail!("{at}: sources[{k}]: unknown source {:?}", m.name);
                };
                ensure!(
                    m.weight > 0,
                    "{at}: sources[{k}] ({:?}): weight must be at least 1",
                    m.name
                );
                ensure!(
                    !members.contains(&id),
                    "{at}: sources[{k}]: {:?} is listed twice",
                    m.name
                );
                members.push(id);
                weights.push(i64::from(m.weight));
            }
            pools.push(Pool::new(p.name.clone(), members, weights));
        }
        let pool_id = |name: &str, at: &str| {
            pools
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| anyhow::anyhow!("{at}: unknown pool {name:?}"))
        };
        let default_pool = pool_id(&e.default_pool, "[egress] default_pool")?;
        let mut selects = Vec::new();
        for (i, s) in e.selects.iter().enumerate() {
            let at = format!("[[egress.select]] #{}", i + 1);
            let m = match (&s.sender, &s.sender_domain, &s.tenant) {
                (Some(v), None, None) => Matcher::Sender(v.to_ascii_lowercase()),
                (None, Some(v), None) => Matcher::SenderDomain(v.to_ascii_lowercase()),
                (None, None, Some(v)) => {
                    ensure!(
                        e.tenant_header.is_some(),
                        "{at}: tenant needs [egress] tenant_header"
                    );
                    Matcher::Tenant(v.clone())
                }
                _ => bail!("{at}: needs exactly one of sender, sender_domain, tenant"),
            };
            selects.push((m, pool_id(&s.pool, &format!("{at}: pool"))?));
        }
        let known = providers.names();
        for (p, w) in &e.warmup {
            let at = format!("[egress.warmup.{p}]");
            ensure!(
                known.contains(&p.as_str()),
                "{at}: unknown provider; known providers: {}",
                known.join(", ")
            );
            ensure!(!w.daily.is_empty(), "{at}: daily is empty");
            ensure!(
                w.hourly.len() <= w.daily.len(),
                "{at}: hourly has more days than daily"
            );
        }
        ensure!(
            e.warmup_day >= Duration::from_millis(24),
            "[egress] warmup_day: too short"
        );
        Ok(Self {
            sources,
            pools,
            default_pool,
            selects,
            tenant_header: e.tenant_header.clone(),
            recheck: e.unplumbed_recheck,
            warmup: Warmup::new(e.warmup_day, e.warmup.clone()),
        })
    }

    /// Refuses per-source shaping overrides that name no source (by name or address).
    pub fn check_override_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> anyhow::Result<()> {
        for (provider, key) in keys {
            ensure!(
                self.sources
                    .iter()
                    .any(|s| s.name == key || s.address.is_some_and(|a| a.to_string() == key)),
                "shaping file: [{provider}.sources.{key:?}]: no egress source has this name or address"
            );
        }
        Ok(())
    }

    /// The pool of a message: the first selector that matches, else the default.
    pub fn pool_for(&self, sender: &str, tenant: Option<&str>) -> usize {
        let sender = sender.to_ascii_lowercase();
        let domain = sender.rsplit_once('@').map_or("", |(_, d)| d);
        self.selects
            .iter()
            .find(|(m, _)| match m {
                Matcher::Sender(s) => *s == sender,
                Matcher::SenderDomain(d) => d == domain,
                Matcher::Tenant(t) => tenant == Some(t.as_str()),
            })
            .map_or(self.default_pool, |(_, p)| *p)
    }

    pub fn pool_name(&self, pool: usize) -> &str {
        &self.pools[pool].name
    }

    /// Pools that contain a source, by name.
    pub fn pools_of(&self, source: SourceId) -> Vec<&str> {
        self.pools
            .iter()
            .filter(|p| p.members.contains(&source))
            .map(|p| p.name.as_str())
            .collect()
    }

    fn unplumbed(&self, s: SourceId, now: Instant) -> bool {
        self.sources[s]
            .unplumbed_until
            .lock()
            .expect("egress lock")
            .is_some_and(|t| t > now)
    }

    /// Whether some source of `pool` is in service (not unplumbed).
    pub fn has_usable(&self, pool: usize) -> bool {
        let now = Instant::now();
        self.pools[pool]
            .members
            .iter()
            .any(|&s| !self.unplumbed(s, now))
    }

    /// Seconds until an unplumbed source is tried again (0 = in use).
    pub fn unplumbed_for(&self, s: SourceId) -> Duration {
        self.sources[s]
            .unplumbed_until
            .lock()
            .expect("egress lock")
            .map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            })
    }

    /// Takes a source whose address is not on this host out of its pools
    /// for `unplumbed_recheck`; logs once per suspension.
    pub fn suspend_unplumbed(&self, s: SourceId, pool: usize, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut until = self.sources[s].unplumbed_until.lock().expect("egress lock");
        if until.is_some_and(|t| t > now) {
            return;
        }
        *until = Some(now + self.recheck);
        let src = &self.sources[s];
        warn!(
            source = src.name,
            address = %src.address.map_or_else(|| "any".to_owned(), |a| a.to_string()),
            pool = self.pools[pool].name,
            retry_in = ?self.recheck,
            %error,
            "egress source is not configured on this host; suspended, its pool carries on without it"
        );
    }

    /// Chooses the source for one message to `provider` from `pool`:
    /// smooth weighted round robin over the sources in service, skipping
    /// (spill) or waiting for (wait) sources over their warmup caps.
    /// `pinned` is the source a waiting message is bound to.
    pub fn pick(&self, pool: usize, provider: &str, pinned: Option<SourceId>) -> Pick {
        let now = Instant::now();
        let wall = SystemTime::now();
        let overflow = self.warmup.overflow(provider);
        let p = &self.pools[pool];
        if let Some(s) = pinned.filter(|&s| !self.unplumbed(s, now) && p.members.contains(&s)) {
            return match self
                .warmup
                .take(s, self.sources[s].warmup_start, provider, wall)
            {
                Ok(()) => Pick::Source(s),
                Err(after) => Pick::Wait {
                    source: Some(s),
                    after,
                },
            };
        }
        let mut capped: HashSet<SourceId> = HashSet::new();
        let mut soonest: Option<Duration> = None;
        loop {
            let chosen = {
                let mut current = p.current.lock().expect("egress lock");
                smooth_wrr(&p.weights, &mut current, |k| {
                    let s = p.members[k];
                    !capped.contains(&s) && !self.unplumbed(s, now)
                })
            };
            let Some(k) = chosen else {
                return soonest.map_or(Pick::NoSource, |after| Pick::Wait {
                    source: None,
                    after,
                });
            };
            let s = p.members[k];
            match self
                .warmup
                .take(s, self.sources[s].warmup_start, provider, wall)
            {
                Ok(()) => return Pick::Source(s),
                Err(after) if overflow == Overflow::Wait => {
                    return Pick::Wait {
                        source: Some(s),
                        after,
                    };
                }
                Err(after) => {
                    capped.insert(s);
                    soonest = Some(soonest.map_or(after, |d| d.min(after)));
                }
            }
        }
    }
}

impl Pool {
    fn new(name: String, members: Vec<SourceId>, weights: Vec<i64>) -> Self {
        let n = members.len();
        Self {
            name,
            members,
            weights,
            current: Mutex::new(vec![0; n]),
        }
    }
}

/// Smooth weighted round robin (as in nginx): every eligible member gains
/// its weight, the largest wins and pays back the eligible total, so 2:1:1
/// comes out as a, b, c, a rather than a, a, b, c.
pub fn smooth_wrr(
    weights: &[i64],
    current: &mut [i64],
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut total = 0;
    let mut best: Option<usize> = None;
    for k in 0..weights.len() {
        if !eligible(k) {
            continue;
        }
        current[k] += weights[k];
        total += weights[k];
        if best.is_none_or(|b| current[k] > current[b]) {
            best = Some(k);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}
