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
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{config::Config, provider::Providers};

/// `[egress]` in the relay config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Pool of messages no `[[egress.select]]` matches.
    pub default_pool: String,
    /// Header naming the tenant, for `tenant` selectors.
    #[serde(default)]
    pub tenant_header: Option<String>,
    /// Length of one warmup day (an hour is 1/24 of it).
    #[serde(default = "EgressConfig::default_day", with = "humantime_serde")]
    pub warmup_day: Duration,
    /// How long a source whose address is not on this host stays out of its pools.
    #[serde(default = "EgressConfig::default_recheck", with = "humantime_serde")]
    pub unplumbed_recheck: Duration,
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    #[serde(default, rename = "select")]
    pub selects: Vec<SelectConfig>,
    /// Warmup schedule per provider (`default` for the rest).
    #[serde(default)]
    pub warmup: BTreeMap<String, WarmupSchedule>,
}

impl EgressConfig {
    fn default_day() -> Duration {
        Duration::from_hours(24)
    }
    fn default_recheck() -> Duration {
        Duration::from_mins(1)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub address: IpAddr,
    /// `EHLO` name; defaults to `delivery.helo_name`, then `hostname`.
    #[serde(default)]
    pub helo: Option<String>,
    /// First day of warmup: `YYYY-MM-DD` (UTC) or `now` (relay start).
    #[serde(default)]
    pub warmup_start: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub sources: Vec<PoolMember>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub name: String,
    #[serde(default = "PoolMember::default_weight")]
    pub weight: u32,
}

impl PoolMember {
    fn default_weight() -> u32 {
        1
    }
}

/// Exactly one of `sender`, `sender_domain`, `tenant`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub sender_domain: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    pub pool: String,
}

/// Caps on warmup day `k` (0 = the day of `warmup_start`) are `daily[k]`
/// and `hourly[k]`; past the end of `daily` the source is warm.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupSchedule {
    pub daily: Vec<u64>,
    #[serde(default)]
    pub hourly: Vec<u64>,
    #[serde(default)]
    pub overflow: Overflow,
}

/// What happens to a message over a cold source's cap.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Another source of the pool with room takes it.
    #[default]
    Spill,
    /// It waits for the next hour or day of the same source.
    Wait,
}

/// Index of a source in [`Egress`].
pub type SourceId = usize;

/// One egress source.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    /// `None`: the kernel picks (implicit pool without `delivery.source_ip`).
    pub address: Option<IpAddr>,
    pub helo: String,
    warmup_start: Option<SystemTime>,
    unplumbed_until: Mutex<Option<Instant>>,
}

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
    /// Builds the egress from `[egress]`, or the implicit one-source pool.
    pub fn from_config(cfg: &Config, providers: &Providers) -> anyhow::Result<Self> {
        let default_helo = cfg
            .delivery
            .helo_name
            .clone()
            .unwrap_or_else(|| cfg.hostname.clone());
        let Some(e) = &cfg.egress else {
            return Ok(Self {
                sources: vec![Source {
                    name: "default".to_owned(),
                    address: cfg.delivery.source_ip,
                    helo: default_helo,
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
        Self::build(e, &default_helo, providers, SystemTime::now())
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

/// `YYYY-MM-DD` as midnight UTC.
fn parse_date(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("bad date {s:?}: expected YYYY-MM-DD or \"now\"");
    let mut it = s.trim().splitn(3, '-');
    let mut num = || {
        it.next()
            .and_then(|p| p.parse::<i64>().ok())
            .ok_or_else(bad)
    };
    let (y, m, d) = (num()?, num()?, num()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    // Days from civil (H. Hinnant's algorithm), proleptic Gregorian.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400).map_err(|_| bad())?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// The caps of warmup day `day`: (daily, hourly); `None` when warm.
pub fn caps_on(schedule: &WarmupSchedule, day: u64) -> Option<(u64, Option<u64>)> {
    let k = usize::try_from(day).ok()?;
    let daily = *schedule.daily.get(k)?;
    Some((daily, schedule.hourly.get(k).copied()))
}

/// Counts of one (source, provider) in its current windows.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    day: u64,
    hour: u64,
    sent_day: u64,
    sent_hour: u64,
}

/// Warmup progress of one (source, provider), for ctl and metrics.
#[derive(Debug, Serialize)]
pub struct WarmupProgress {
    pub source: String,
    pub provider: String,
    pub day: u64,
    pub sent_day: u64,
    pub daily_cap: u64,
    pub sent_hour: u64,
    pub hourly_cap: Option<u64>,
}

/// Volume caps for cold sources, counted per (source, provider) in day and
/// hour windows measured from the source's `warmup_start`.
#[derive(Debug)]
pub struct Warmup {
    day: Duration,
    schedules: BTreeMap<String, WarmupSchedule>,
    windows: Mutex<HashMap<(SourceId, String), Window>>,
}

impl Warmup {
    fn new(day: Duration, schedules: BTreeMap<String, WarmupSchedule>) -> Self {
        Self {
            day,
            schedules,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn schedule(&self, provider: &str) -> Option<&WarmupSchedule> {
        self.schedules
            .get(provider)
            .or_else(|| self.schedules.get(super::provider::DEFAULT))
    }

    fn overflow(&self, provider: &str) -> Overflow {
        self.schedule(provider)
            .map_or(Overflow::Spill, |s| s.overflow)
    }

    /// Which (day, hour) windows `elapsed` since the start falls in, and
    /// how long until the next hour window.
    fn windows_at(&self, elapsed: Duration) -> (u64, u64, Duration) {
        let hour = self.day / 24;
        let h = elapsed.as_nanos() / hour.as_nanos().max(1);
        let next_hour = hour * u32::try_from(h + 1).unwrap_or(u32::MAX);
        let h = u64::try_from(h).unwrap_or(u64::MAX);
        (h / 24, h, next_hour.saturating_sub(elapsed))
    }

    /// Counts one message for (source, provider) if it is under the caps of
    /// the current windows; otherwise returns how long until a window with room.
    fn take(
        &self,
        source: SourceId,
        start: Option<SystemTime>,
        provider: &str,
        now: SystemTime,
    ) -> Result<(), Duration> {
        let (Some(start), Some(schedule)) = (start, self.schedule(provider)) else {
            return Ok(());
        };
        let elapsed = now.duration_since(start).unwrap_or(Duration::ZERO);
        let (day, hour, to_next_hour) = self.windows_at(elapsed);
        let Some((daily, hourly)) = caps_on(schedule, day) else {
            return Ok(());
        };
        let mut windows = self.windows.lock().expect("warmup lock");
        let w = windows.entry((source, provider.to_owned())).or_default();
        if w.day != day {
            (w.day, w.sent_day) = (day, 0);
        }
        if w.hour != hour {
            (w.hour, w.sent_hour) = (hour, 0);
        }
        if w.sent_day >= daily {
            let hours_left = u32::try_from(23 - hour % 24).unwrap_or(0);
            return Err(to_next_hour + self.day / 24 * hours_left);
        }
        if hourly.is_some_and(|c| w.sent_hour >= c) {
            return Err(to_next_hour);
        }
        w.sent_day += 1;
        w.sent_hour += 1;
        Ok(())
    }

    /// Progress of every (source, provider) that has counted a message and is still cold.
    pub fn progress(&self, sources: &[Source], now: SystemTime) -> Vec<WarmupProgress> {
        let windows = self.windows.lock().expect("warmup lock");
        let mut out: Vec<WarmupProgress> = windows
            .iter()
            .filter_map(|((s, provider), w)| {
                let src = &sources[*s];
                let elapsed = now.duration_since(src.warmup_start?).unwrap_or_default();
                let (day, hour, _) = self.windows_at(elapsed);
                let (daily_cap, hourly_cap) = caps_on(self.schedule(provider)?, day)?;
                Some(WarmupProgress {
                    source: src.name.clone(),
                    provider: provider.clone(),
                    day,
                    sent_day: if w.day == day { w.sent_day } else { 0 },
                    daily_cap,
                    sent_hour: if w.hour == hour { w.sent_hour } else { 0 },
                    hourly_cap,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.source, &a.provider).cmp(&(&b.source, &b.provider)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(toml_text: &str) -> anyhow::Result<Egress> {
        let e: EgressConfig = toml::from_str(toml_text)?;
        Egress::build(&e, "relay.test", &Providers::default(), SystemTime::now())
    }

    const THREE: &str = "default_pool = \"main\"\n\
        [[source]]\nname = \"a\"\naddress = \"198.51.100.21\"\nhelo = \"a.test\"\n\
        [[source]]\nname = \"b\"\naddress = \"198.51.100.22\"\n\
        [[source]]\nname = \"c\"\naddress = \"198.51.100.23\"\n\
        [[pool]]\nname = \"main\"\nsources = [{ name = \"a\", weight = 2 }, { name = \"b\" }, { name = \"c\" }]\n";

    #[test]
    fn smooth_wrr_interleaves_2_1_1_and_keeps_proportions() {
        let w = [2, 1, 1];
        let mut cur = [0; 3];
        let seq: Vec<usize> = (0..8)
            .map(|_| smooth_wrr(&w, &mut cur, |_| true).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 2, 0, 0, 1, 2, 0]);
        let mut counts = [0; 3];
        let w = [5, 3, 1];
        let mut cur = [0; 3];
        for _ in 0..900 {
            counts[smooth_wrr(&w, &mut cur, |_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [500, 300, 100]);
        // An ineligible member is skipped; the rest keep their ratio.
        let mut counts = [0; 3];
        let mut cur = [0; 3];
        for _ in 0..300 {
            counts[smooth_wrr(&[2, 1, 1], &mut cur, |k| k != 1).unwrap()] += 1;
        }
        assert_eq!(counts, [200, 0, 100]);
        assert_eq!(smooth_wrr(&[1], &mut [0], |_| false), None);
    }

    #[test]
    fn pools_select_and_default_helo() {
        let e = egress(&format!(
            "{THREE}[[pool]]\nname = \"news\"\nsources = [{{ name = \"c\" }}]\n\
             [[select]]\nsender_domain = \"News.example.com\"\npool = \"news\"\n\
             [[select]]\nsender = \"ceo@example.com\"\npool = \"news\"\n"
        ))
        .unwrap();
        assert_eq!(e.pool_name(e.pool_for("x@news.example.com", None)), "news");
        assert_eq!(e.pool_name(e.pool_for("CEO@example.com", None)), "news");
        assert_eq!(e.pool_name(e.pool_for("other@example.com", None)), "main");
        let t = egress(&format!(
            "tenant_header = \"X-Tenant\"\n{THREE}[[pool]]\nname = \"acme\"\nsources = [{{ name = \"b\" }}]\n\
             [[select]]\ntenant = \"acme\"\npool = \"acme\"\n"
        ))
        .unwrap();
        assert_eq!(t.pool_name(t.pool_for("x@y", Some("acme"))), "acme");
        assert_eq!(t.pool_name(t.pool_for("x@y", Some("other"))), "main");
        assert_eq!(t.pool_name(t.pool_for("x@y", None)), "main");
        assert_eq!(e.sources[0].helo, "a.test");
        assert_eq!(e.sources[1].helo, "relay.test");
        let picks: Vec<Pick> = (0..4).map(|_| e.pick(0, "google", None)).collect();
        assert_eq!(
            picks,
            [
                Pick::Source(0),
                Pick::Source(1),
                Pick::Source(2),
                Pick::Source(0)
            ]
        );
    }

    #[test]
    fn bad_egress_configs_are_refused_naming_the_field() {
        let cases = [
            (
                THREE.replace("name = \"c\" }]", "name = \"x\" }]"),
                "sources[2]: unknown source \"x\"",
            ),
            (
                THREE.replace("weight = 2", "weight = 0"),
                "weight must be at least 1",
            ),
            (
                THREE.replace("default_pool = \"main\"", "default_pool = \"mian\""),
                "default_pool: unknown pool \"mian\"",
            ),
            (
                THREE.replace("name = \"b\"\naddress", "name = \"a\"\naddress"),
                "duplicate source name",
            ),
            (
                format!("{THREE}[[pool]]\nname = \"main\"\nsources = [{{ name = \"a\" }}]\n"),
                "[[egress.pool]] #2 (\"main\"): duplicate pool name",
            ),
            (
                format!("{THREE}[[select]]\npool = \"main\"\n"),
                "[[egress.select]] #1: needs exactly one of",
            ),
            (
                format!(
                    "{THREE}[[select]]\nsender = \"a@b\"\nsender_domain = \"b\"\npool = \"main\"\n"
                ),
                "[[egress.select]] #1: needs exactly one of",
            ),
            (
                format!("{THREE}[[select]]\nsender = \"a@b\"\npool = \"nope\"\n"),
                "[[egress.select]] #1: pool: unknown pool \"nope\"",
            ),
            (
                format!("{THREE}[warmup.gmail]\ndaily = [1]\n"),
                "[egress.warmup.gmail]: unknown provider",
            ),
            (
                THREE.replace("helo = \"a.test\"", "warmup_start = \"2026-13-01\""),
                "warmup_start: bad date",
            ),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", egress(&text).unwrap_err());
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn dates_are_midnight_utc() {
        let t = parse_date("2026-11-01").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_793_491_200
        );
        assert_eq!(parse_date("1970-01-01").unwrap(), UNIX_EPOCH);
        assert!(parse_date("2026-02").is_err());
    }

    #[test]
    fn warmup_caps_ramp_by_day_and_reset_each_window() {
        let day = Duration::from_secs(24);
        let sched = WarmupSchedule {
            daily: vec![3, 10],
            hourly: vec![2],
            overflow: Overflow::Spill,
        };
        assert_eq!(caps_on(&sched, 0), Some((3, Some(2))));
        assert_eq!(caps_on(&sched, 1), Some((10, None)));
        assert_eq!(caps_on(&sched, 2), None);
        let w = Warmup::new(day, BTreeMap::from([("google".to_owned(), sched)]));
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        // Hour 0 (1 s long): two, then wait for hour 1.
        assert_eq!(w.take(0, Some(t0), "google", at(0.1)), Ok(()));
        assert_eq!(w.take(0, Some(t0), "google", at(0.2)), Ok(()));
        let e = w.take(0, Some(t0), "google", at(0.25)).unwrap_err();
        assert!((e.as_secs_f64() - 0.75).abs() < 1e-6, "{e:?}");
        // Hour 1: one more reaches the daily 3; then wait for day 1 (at 24 s).
        assert_eq!(w.take(0, Some(t0), "google", at(1.5)), Ok(()));
        let e = w.take(0, Some(t0), "google", at(1.5)).unwrap_err();
        assert!((e.as_secs_f64() - 22.5).abs() < 1e-6, "{e:?}");
        // Other providers and warm sources are not capped.
        assert_eq!(w.take(0, Some(t0), "yahoo", at(1.5)), Ok(()));
        assert_eq!(w.take(1, None, "google", at(1.5)), Ok(()));
        // Day 1: 10 a day, no hourly cap.
        for _ in 0..10 {
            assert_eq!(w.take(0, Some(t0), "google", at(25.0)), Ok(()));
        }
        assert!(w.take(0, Some(t0), "google", at(25.0)).is_err());
        // Day 2: warm.
        assert_eq!(w.take(0, Some(t0), "google", at(49.0)), Ok(()));
    }

    #[test]
    fn spill_moves_over_cap_messages_to_warm_sources_and_wait_holds_them() {
        let cold = THREE.replace("helo = \"a.test\"", "warmup_start = \"now\"");
        let e = egress(&format!(
            "warmup_day = \"24h\"\n{cold}[warmup.default]\ndaily = [2]\n"
        ))
        .unwrap();
        let picks: Vec<Pick> = (0..8).map(|_| e.pick(0, "default", None)).collect();
        let on_a = picks.iter().filter(|p| **p == Pick::Source(0)).count();
        assert_eq!(on_a, 2, "{picks:?}");
        assert!(picks.iter().all(|p| matches!(p, Pick::Source(_))));
        let e = egress(&format!(
            "{cold}[warmup.default]\ndaily = [1]\noverflow = \"wait\"\n"
        ))
        .unwrap();
        assert_eq!(e.pick(0, "default", None), Pick::Source(0));
        assert_eq!(e.pick(0, "default", None), Pick::Source(1));
        assert_eq!(e.pick(0, "default", None), Pick::Source(2));
        assert!(matches!(
            e.pick(0, "default", None),
            Pick::Wait {
                source: Some(0),
                ..
            }
        ));
    }
}
