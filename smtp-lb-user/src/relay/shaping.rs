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
    sync::{Arc, Mutex},
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

/// Effective limits of one provider (its section over `[default]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections to the provider (all its domains together).
    pub connection_limit: Option<usize>,
    /// Messages over one connection before it is closed.
    pub max_messages_per_connection: Option<usize>,
    /// Messages to the provider, over all its connections.
    pub message_rate: Option<Rate>,
    /// New connections to the provider.
    pub connection_rate: Option<Rate>,
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
        }
    }
}

/// One section of the shaping file as written; unset limits inherit from `[default]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    connection_limit: Option<usize>,
    max_messages_per_connection: Option<usize>,
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
}

impl Section {
    fn limits(&self) -> Limits {
        Limits {
            connection_limit: self.connection_limit,
            max_messages_per_connection: self.max_messages_per_connection,
            message_rate: self.message_rate,
            connection_rate: self.connection_rate,
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
            if sec.connection_limit == Some(0) || sec.max_messages_per_connection == Some(0) {
                bail!(
                    "{}[{name}]: limits must be at least 1",
                    at_line(header(name))
                );
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
    pub name: String,
    connections: Option<ConnectionLimiter>,
    pub max_messages_per_connection: Option<usize>,
    message_rate: Option<RateLimiter>,
    connection_rate: Option<RateLimiter>,
    rules: Arc<RuleBook>,
    suspended_until: Mutex<Option<Instant>>,
    /// A `cut_rate` in force: the lower rate and when it ends.
    rate_cut: Mutex<Option<(Arc<Gcra>, Instant)>>,
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
    fn new(name: &str, l: &Limits, rules: Arc<RuleBook>, limiters: &Limiters) -> Self {
        Self {
            name: name.to_owned(),
            connections: l.connection_limit.map(|n| limiters.connections(name, n)),
            max_messages_per_connection: l.max_messages_per_connection,
            message_rate: l
                .message_rate
                .map(|r| limiters.rate("message_rate", name, r)),
            connection_rate: l
                .connection_rate
                .map(|r| limiters.rate("connection_rate", name, r)),
            rules,
            suspended_until: Mutex::new(None),
            rate_cut: Mutex::new(None),
        }
    }

    /// Runs the reply through the provider's rules and applies what fires.
    pub fn on_reply(&self, reply: &Reply, source: Option<IpAddr>) -> Verdict {
        if reply.is_positive() {
            return Verdict::Continue;
        }
        let now = Instant::now();
        match self.rules.on_reply(&self.name, source, reply, now) {
            None => Verdict::Continue,
            Some(Action::Suspend(d)) => {
                *self.suspended_until.lock().expect("suspend lock") = Some(now + d);
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

/// Providers and their shapers.
#[derive(Debug)]
pub struct Shaper {
    providers: Providers,
    shapers: HashMap<String, Arc<ProviderShaper>>,
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
        }
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
