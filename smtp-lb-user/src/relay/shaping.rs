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
//! concurrency 1.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Deserialize;

use super::{
    limiter::{ConnectionLimiter, ConnectionPermit, Limiters, RateLimiter},
    proto::Reply,
    provider::{self, Providers},
    rules::{self, Action, Rule, RuleBook, RuleConfig},
};

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

/// Effective limits of one provider (its section over `[default]`), or
/// one source's override as written (`[google.sources."198.51.100.21"]`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent connections to the provider (all its domains together).
    pub connection_limit: Option<usize>,
    /// Messages over one connection before it is closed.
    pub max_messages_per_connection: Option<usize>,
    /// Recipients in one transaction; more are sent as further transactions.
    pub max_recipients_per_message: Option<usize>,
    /// Messages to the provider, over all its connections.
    pub message_rate: Option<Rate>,
    /// New connections to the provider.
    pub connection_rate: Option<Rate>,
    /// Per-source overrides, by egress source name or address (never
    /// nested: an override is parsed without this field).
    #[serde(skip)]
    pub sources: BTreeMap<String, Limits>,
}

impl Limits {
    fn or(&self, base: &Self) -> Self {
        Self {
            connection_limit: self.connection_limit.or(base.connection_limit),
            max_messages_per_connection: self
                .max_messages_per_connection
                .or(base.max_messages_per_connection),
            max_recipients_per_message: self
                .max_recipients_per_message
                .or(base.max_recipients_per_message),
            message_rate: self.message_rate.or(base.message_rate),
            connection_rate: self.connection_rate.or(base.connection_rate),
            sources: base
                .sources
                .iter()
                .chain(&self.sources)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// One section of the shaping file as written; unset limits inherit from `[default]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    connection_limit: Option<usize>,
    max_messages_per_connection: Option<usize>,
    max_recipients_per_message: Option<usize>,
    message_rate: Option<Rate>,
    connection_rate: Option<Rate>,
    /// MX host suffixes that belong to this provider (besides the shipped ones).
    #[serde(default)]
    mx_suffixes: Vec<String>,
    /// Reply-driven rules (`[[provider.rule]]`), tried before the shipped ones.
    #[serde(default, rename = "rule")]
    rules: Vec<RuleConfig>,
    /// Whether the shipped rules of this provider apply (default true).
    default_rules: Option<bool>,
    /// Per-source overrides (`[provider.sources."IP"]` or by source name).
    #[serde(default)]
    sources: BTreeMap<String, Limits>,
}

impl Section {
    fn limits(&self) -> Limits {
        Limits {
            connection_limit: self.connection_limit,
            max_messages_per_connection: self.max_messages_per_connection,
            max_recipients_per_message: self.max_recipients_per_message,
            message_rate: self.message_rate,
            connection_rate: self.connection_rate,
            sources: self.sources.clone(),
        }
    }
}

/// The parsed file: provider rules, effective limits and reply rules per provider.
#[derive(Clone, Debug, Default)]
pub struct ShapingConfig {
    pub providers: Providers,
    pub default: Limits,
    pub limits: BTreeMap<String, Limits>,
    pub rules: HashMap<String, Vec<Rule>>,
}

/// 1-based number of the first line at or after `from` (0-based) that satisfies `pred`.
fn line_where(text: &str, from: usize, pred: impl Fn(&str) -> bool) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from)
        .find(|(_, l)| pred(l.trim()))
        .map(|(i, _)| i + 1)
}

fn at_line(line: Option<usize>) -> String {
    line.map_or_else(String::new, |n| format!("line {n}: "))
}

impl ShapingConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read shaping file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("shaping file {}", path.display()))
    }

    /// Unknown keys and bad rates are refused with their line (the toml
    /// error says it); semantic errors (an unknown provider, a suffix
    /// claimed by two providers, a bad rule) name their line too.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut sections: BTreeMap<String, Section> = toml::from_str(text)?;
        let header = |name: &str| {
            line_where(text, 0, |l| {
                l == format!("[{name}]") || l == format!("[\"{name}\"]")
            })
        };
        let mut providers = Providers::default();
        let default = sections.remove(provider::DEFAULT).unwrap_or_default();
        if !default.mx_suffixes.is_empty() {
            bail!(
                "{}[default]: mx_suffixes belong to a provider section",
                at_line(header(provider::DEFAULT))
            );
        }
        for (name, sec) in &sections {
            let from = header(name).unwrap_or(0);
            for suffix in &sec.mx_suffixes {
                let line = line_where(text, from, |l| l.contains(&format!("\"{suffix}\"")));
                providers
                    .add(suffix, name)
                    .map_err(|e| anyhow::anyhow!("{}[{name}] mx_suffixes: {e}", at_line(line)))?;
            }
        }
        let known = providers.names();
        for name in sections.keys() {
            if !known.contains(&name.as_str()) {
                bail!(
                    "{}unknown provider section [{name}]; known providers: {} (a new provider needs mx_suffixes)",
                    at_line(header(name)),
                    known.join(", ")
                );
            }
        }
        for (name, sec) in
            std::iter::once((&provider::DEFAULT.to_owned(), &default)).chain(&sections)
        {
            if [
                sec.connection_limit,
                sec.max_messages_per_connection,
                sec.max_recipients_per_message,
            ]
            .contains(&Some(0))
            {
                bail!(
                    "{}[{name}]: limits must be at least 1",
                    at_line(header(name))
                );
            }
            for (src, o) in &sec.sources {
                if [
                    o.connection_limit,
                    o.max_messages_per_connection,
                    o.max_recipients_per_message,
                ]
                .contains(&Some(0))
                {
                    bail!("[{name}.sources.{src:?}]: limits must be at least 1");
                }
            }
        }
        let checked = |name: &str, sec: &Section| -> anyhow::Result<Vec<Rule>> {
            let mut from = 0;
            sec.rules
                .iter()
                .map(|c| {
                    let line = line_where(text, from, |l| l == format!("[[{name}.rule]]"));
                    from = line.unwrap_or(from);
                    Rule::from_config(c)
                        .map_err(|e| anyhow::anyhow!("{}[[{name}.rule]]: {e}", at_line(line)))
                })
                .collect()
        };
        let default_rules = checked(provider::DEFAULT, &default)?;
        let mut rules = HashMap::new();
        for name in known {
            let sec = sections.get(name);
            let mut r = sec
                .map(|s| checked(name, s))
                .transpose()?
                .unwrap_or_default();
            r.extend(default_rules.iter().cloned());
            if sec.and_then(|s| s.default_rules).unwrap_or(true) {
                r.extend(rules::shipped(name));
            }
            rules.insert(name.to_owned(), r);
        }
        let limits = sections
            .iter()
            .map(|(k, v)| (k.clone(), v.limits().or(&default.limits())))
            .collect();
        Ok(Self {
            providers,
            default: default.limits(),
            limits,
            rules,
        })
    }

    /// The effective limits of one provider.
    pub fn limits(&self, provider: &str) -> &Limits {
        self.limits.get(provider).unwrap_or(&self.default)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<ShapingConfig> {
        ShapingConfig::parse(s)
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
    fn rules_suspend_cut_or_bounce_and_shipped_ones_can_be_turned_off() {
        let cfg = parse(concat!(
            "[google]\n",
            "[[google.rule]]\ncode = 452\ntext = \"over quota\"\naction = \"bounce\"\n",
            "[[google.rule]]\ncode = 451\naction = \"cut_rate\"\nrate = \"1/min\"\nduration = \"1h\"\n",
            "[yahoo]\ndefault_rules = false\n",
        ))
        .unwrap();
        let s = Shaper::new(&cfg, &Limiters::local());
        let g = s.for_host("mx.google.com");
        assert_eq!(
            g.on_reply(&Reply::local(250, "2.0.0", "ok"), None),
            Verdict::Continue
        );
        assert_eq!(
            g.on_reply(&Reply::local(452, "4.2.2", "Over quota"), None),
            Verdict::Bounce
        );
        assert_eq!(
            g.on_reply(&Reply::local(451, "4.3.0", "later"), None),
            Verdict::Continue
        );
        assert!(g.rate_cut.lock().unwrap().is_some(), "cut_rate in force");
        // The shipped Gmail rule still applies after the section's own rules.
        assert_eq!(
            g.on_reply(&Reply::local(421, "4.7.28", "unusual rate"), None),
            Verdict::Suspended
        );
        assert!(g.suspended_until.lock().unwrap().is_some());
        let y = s.for_host("mta5.am0.yahoodns.net");
        assert_eq!(
            y.on_reply(&Reply::local(421, "4.7.0", "[TSS04] deferred"), None),
            Verdict::Continue
        );
        let other = s.for_host("mx.example.org");
        assert_eq!(
            other.on_reply(&Reply::local(421, "4.7.28", "x"), None),
            Verdict::Continue
        );
    }

    #[test]
    fn new_providers_come_with_mx_suffixes_and_a_suffix_claimed_twice_is_refused() {
        let cfg =
            parse("[acme]\nmx_suffixes = [\"mx.acme.test\"]\nconnection_limit = 3\n").unwrap();
        let s = Shaper::new(&cfg, &Limiters::local());
        assert_eq!(s.for_host("in1.mx.acme.test").name, "acme");
        assert_eq!(cfg.limits("acme").connection_limit, Some(3));
        let e = format!(
            "{:#}",
            parse("[acme]\nmx_suffixes = [\"acme.test\"]\n\n[zeta]\nconnection_limit = 1\nmx_suffixes = [\"google.com\"]\n")
                .unwrap_err()
        );
        assert!(
            e.contains("line 6") && e.contains("google.com") && e.contains("google"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse("[a1]\nmx_suffixes = [\"x.test\"]\n[b2]\nmx_suffixes = [\"X.test.\"]\n")
                .unwrap_err()
        );
        assert!(e.contains("line 4") && e.contains("a1"), "{e}");
        let e = format!(
            "{:#}",
            parse("[default]\nmx_suffixes = [\"x.test\"]\n").unwrap_err()
        );
        assert!(e.contains("line 1"), "{e}");
        let e = format!(
            "{:#}",
            parse("[google]\n[[google.rule]]\ncode = 421\naction = \"suspend\"\n").unwrap_err()
        );
        assert!(
            e.contains("line 2") && e.contains("needs a duration"),
            "{e}"
        );
    }

    #[test]
    fn source_overrides_apply_per_pair_by_name_or_address_and_rules_act_per_pair() {
        let cfg = parse(concat!(
            "[default.sources.ip9]\nconnection_limit = 7\n\n",
            "[google]\nconnection_limit = 10\n",
            "[[google.rule]]\ncode = 421\nenhanced = \"4.7.28\"\naction = \"suspend\"\nduration = \"1m\"\n",
            "[google.sources.\"198.51.100.22\"]\nconnection_limit = 1\nmessage_rate = \"60/min\"\n",
        ))
        .unwrap();
        let shaper = Shaper::new(&cfg, &Limiters::local());
        let addr = |a: &str| Some(a.parse().unwrap());
        let ip2 = shaper.for_pair("ip2", addr("198.51.100.22"), "google");
        assert_eq!(ip2.provider.name, "google");
        assert_eq!(ip2.pair.name, "google@ip2");
        assert!(ip2.pair.connections.is_some() && ip2.pair.message_rate.is_some());
        let ip1 = shaper.for_pair("ip1", addr("198.51.100.21"), "google");
        assert!(ip1.pair.connections.is_none(), "no override for ip1");
        // [default.sources] reaches providers without their own entry.
        let ip9 = shaper.for_pair("ip9", None, "yahoo");
        assert!(ip9.pair.connections.is_some());
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
        // A rule suspends the pair, not the provider or the other source.
        let r = Reply::local(421, "4.7.28", "unusual rate");
        assert_eq!(ip2.on_reply(&r, addr("198.51.100.22")), Verdict::Suspended);
        assert!(ip2.pair.suspended_until().is_some());
        assert_eq!(ip2.pair.suspensions.load(Ordering::Relaxed), 1);
        assert!(ip1.pair.suspended_until().is_none() && ip2.provider.suspended_until().is_none());
        assert!(Arc::ptr_eq(
            &shaper.for_pair("ip2", None, "google").pair,
            &ip2.pair
        ));
        let e = format!(
            "{:#}",
            parse("[google.sources.x]\nconnection_limit = 1\nsources = {}\n").unwrap_err()
        );
        assert!(e.contains("line 3") && e.contains("sources"), "{e}");
    }

    #[tokio::test]
    async fn connection_limit_caps_permits_per_provider_only() {
        let cfg = parse("[google]\nconnection_limit = 2\n").unwrap();
        let s = Shaper::new(&cfg, &Limiters::local());
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
