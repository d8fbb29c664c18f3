//! Reply-driven automation: rules that match a provider's replies by code,
//! enhanced code and text, and act on the (source, provider) pair that got
//! them — suspend it, cut its rate, or bounce instead of retrying.
//!
//! A rule fires on its first match, or with a `threshold` of `"N/window"`
//! when it has matched N times within the window (a sliding window per
//! pair, so one noisy source does not trip the rule for the others). Rules
//! of a provider's section are tried first, then the shipped defaults
//! ([`shipped`]) unless the section sets `default_rules = false`. The first
//! rule that fires wins.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    str::FromStr,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::throttle::Rate;
use crate::smtp::reply::Reply;

/// What a rule does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// No new connection or message for the pair until the time is up.
    Suspend(Duration),
    /// The pair's message rate is at most `rate` until the time is up.
    CutRate { rate: Rate, duration: Duration },
    /// The recipients bounce now (a DSN) instead of being retried.
    Bounce,
}

/// `N/window`: fire when a rule matched N times within the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub count: u32,
    pub window: Duration,
}

impl FromStr for Threshold {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad threshold {s:?}: expected N/window, e.g. \"5/10min\"");
        let (n, w) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("bad threshold {s:?}: the count must be at least 1"));
        }
        let window = crate::config::duration::parse(w).map_err(|_| bad())?;
        if window.is_zero() {
            return Err(format!("bad threshold {s:?}: the window must not be zero"));
        }
        Ok(Self { count, window })
    }
}

/// One `[[provider.rule]]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Reply code, e.g. `421`.
    pub code: Option<u16>,
    /// Enhanced status code or its prefix, e.g. `"4.7.28"` or `"5.7"`.
    pub enhanced: Option<String>,
    /// Text the reply contains (case-insensitive), e.g. `"TSS04"`.
    pub text: Option<String>,
    /// `suspend`, `cut_rate` or `bounce`.
    pub action: ActionKind,
    /// How long a suspension or rate cut lasts.
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// The rate during a `cut_rate`.
    pub rate: Option<Rate>,
    /// `"N/window"`; none = fire on the first match.
    pub threshold: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Suspend,
    CutRate,
    Bounce,
}

/// A checked rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    code: Option<u16>,
    enhanced: Option<String>,
    text: Option<String>,
    pub action: Action,
    threshold: Option<Threshold>,
}

impl Rule {
    /// Checks a rule as written: at least one matcher, and what its action needs.
    pub fn from_config(c: &RuleConfig) -> Result<Self, String> {
        if c.code.is_none() && c.enhanced.is_none() && c.text.is_none() {
            return Err("a rule needs at least one of code, enhanced, text".into());
        }
        if let Some(code) = c.code
            && !(200..=599).contains(&code)
        {
            return Err(format!("code {code} is not an SMTP reply code"));
        }
        if let Some(e) = &c.enhanced
            && !valid_enhanced_prefix(e)
        {
            return Err(format!(
                "enhanced {e:?} is not an enhanced status code or prefix (e.g. \"4.7.28\", \"5.7\")"
            ));
        }
        let action = match c.action {
            ActionKind::Suspend => {
                Action::Suspend(c.duration.ok_or("action suspend needs a duration")?)
            }
            ActionKind::CutRate => Action::CutRate {
                rate: c.rate.ok_or("action cut_rate needs a rate")?,
                duration: c.duration.ok_or("action cut_rate needs a duration")?,
            },
            ActionKind::Bounce => {
                if c.duration.is_some() || c.rate.is_some() {
                    return Err("action bounce takes no duration or rate".into());
                }
                Action::Bounce
            }
        };
        if matches!(c.action, ActionKind::Suspend) && c.rate.is_some() {
            return Err("action suspend takes no rate".into());
        }
        let threshold = c.threshold.as_deref().map(str::parse).transpose()?;
        Ok(Self {
            code: c.code,
            enhanced: c.enhanced.clone(),
            text: c.text.as_ref().map(|t| t.to_ascii_lowercase()),
            action,
            threshold,
        })
    }

    fn matches(&self, reply: &Reply) -> bool {
        self.code.is_none_or(|c| c == reply.code)
            && self.enhanced.as_deref().is_none_or(|want| {
                reply.enhanced.is_some_and(|e| {
                    let got = e.to_string();
                    got == want || got.starts_with(&format!("{want}."))
                })
            })
            && self
                .text
                .as_deref()
                .is_none_or(|t| reply.text().to_ascii_lowercase().contains(t))
    }
}

fn valid_enhanced_prefix(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    (1..=3).contains(&parts.len())
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The rules shipped for the big providers (their documented deferral
/// replies); `default_rules = false` in a section turns them off.
pub fn shipped(provider: &str) -> Vec<Rule> {
    let rule = |code, enhanced: Option<&str>, text: Option<&str>, action| Rule {
        code,
        enhanced: enhanced.map(str::to_owned),
        text: text.map(str::to_ascii_lowercase),
        action,
        threshold: None,
    };
    match provider {
        // "421-4.7.28 … unusual rate of unsolicited mail originating from your IP".
        "google" => vec![rule(
            Some(421),
            Some("4.7.28"),
            None,
            Action::Suspend(Duration::from_hours(1)),
        )],
        // "421 4.7.0 [TSS04] Messages from … temporarily deferred due to unexpected volume or user complaints".
        "yahoo" => vec![rule(
            None,
            None,
            Some("TSS04"),
            Action::Suspend(Duration::from_hours(1)),
        )],
        // "… part of their network is on our block list (S3150)": the IP is listed; stop using it there.
        "microsoft" => vec![rule(
            None,
            None,
            Some("S3150"),
            Action::Suspend(Duration::from_hours(4)),
        )],
        _ => Vec::new(),
    }
}

/// (provider, source, rule index): what a threshold counts matches for.
type HitKey = (String, Option<IpAddr>, usize);

/// Every provider's rules, and the recent matches of threshold rules.
#[derive(Debug, Default)]
pub struct RuleBook {
    rules: HashMap<String, Vec<Rule>>,
    /// (provider, source, rule index) → times it matched within its window.
    hits: Mutex<HashMap<HitKey, VecDeque<Instant>>>,
}

impl RuleBook {
    pub fn new(rules: HashMap<String, Vec<Rule>>) -> Self {
        Self {
            rules,
            hits: Mutex::default(),
        }
    }

    /// The action `reply` from `provider` to `source` triggers at `now`, if any.
    pub fn on_reply(
        &self,
        provider: &str,
        source: Option<IpAddr>,
        reply: &Reply,
        now: Instant,
    ) -> Option<Action> {
        let rules = self.rules.get(provider)?;
        for (i, rule) in rules.iter().enumerate() {
            if !rule.matches(reply) {
                continue;
            }
            let Some(t) = rule.threshold else {
                return Some(rule.action);
            };
            let mut hits = self.hits.lock().expect("rule hits lock");
            let seen = hits.entry((provider.to_owned(), source, i)).or_default();
            while seen
                .front()
                .is_some_and(|&at| now.duration_since(at) >= t.window)
            {
                seen.pop_front();
            }
            seen.push_back(now);
            if seen.len() >= t.count as usize {
                seen.clear();
                return Some(rule.action);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> Result<Rule, String> {
        let c: RuleConfig = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Rule::from_config(&c)
    }

    fn book(provider: &str, rules: Vec<Rule>) -> RuleBook {
        RuleBook::new(HashMap::from([(provider.to_owned(), rules)]))
    }

    #[test]
    fn matchers_combine_code_enhanced_prefix_and_text() {
        let r =
            rule("code = 421\nenhanced = \"4.7\"\ntext = \"unusual RATE\"\naction = \"bounce\"")
                .unwrap();
        assert!(r.matches(&Reply::local(
            421,
            "4.7.28",
            "Our system has detected an unusual rate"
        )));
        assert!(
            !r.matches(&Reply::local(450, "4.7.28", "unusual rate")),
            "code"
        );
        assert!(
            !r.matches(&Reply::local(421, "4.2.1", "unusual rate")),
            "enhanced"
        );
        assert!(
            !r.matches(&Reply::local(421, "4.70.1", "unusual rate")),
            "prefix on a label boundary"
        );
        assert!(
            !r.matches(&Reply::local(421, "4.7.28", "try later")),
            "text"
        );
    }

    #[test]
    fn bad_rules_are_refused_saying_why() {
        for (text, want) in [
            ("action = \"bounce\"", "at least one of"),
            ("code = 42\naction = \"bounce\"", "not an SMTP reply code"),
            ("enhanced = \"4.x\"\naction = \"bounce\"", "enhanced"),
            ("code = 421\naction = \"suspend\"", "needs a duration"),
            (
                "code = 421\naction = \"cut_rate\"\nduration = \"1h\"",
                "needs a rate",
            ),
            (
                "code = 421\naction = \"bounce\"\nduration = \"1h\"",
                "takes no duration",
            ),
            (
                "code = 421\naction = \"bounce\"\nthreshold = \"5\"",
                "bad threshold",
            ),
            (
                "code = 421\naction = \"bounce\"\nthreshold = \"0/1min\"",
                "at least 1",
            ),
            ("code = 421\naction = \"pause\"", "unknown variant"),
        ] {
            let e = rule(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn shipped_rules_catch_each_providers_documented_deferral() {
        let b = RuleBook::new(
            ["google", "yahoo", "microsoft"]
                .map(|p| (p.to_owned(), shipped(p)))
                .into(),
        );
        let now = Instant::now();
        let gmail = Reply::local(
            421,
            "4.7.28",
            "Our system has detected an unusual rate of unsolicited mail",
        );
        assert_eq!(
            b.on_reply("google", None, &gmail, now),
            Some(Action::Suspend(Duration::from_hours(1)))
        );
        let yahoo = Reply::local(
            421,
            "4.7.0",
            "[TSS04] Messages from 192.0.2.1 temporarily deferred",
        );
        assert!(matches!(
            b.on_reply("yahoo", None, &yahoo, now),
            Some(Action::Suspend(_))
        ));
        let ms = Reply::local(
            550,
            "5.7.1",
            "Part of their network is on our block list (S3150)",
        );
        assert!(matches!(
            b.on_reply("microsoft", None, &ms, now),
            Some(Action::Suspend(_))
        ));
        assert_eq!(
            b.on_reply("yahoo", None, &gmail, now),
            None,
            "rules are per provider"
        );
        assert_eq!(b.on_reply("default", None, &gmail, now), None);
    }

    #[test]
    fn a_threshold_fires_on_the_nth_match_within_the_window_per_source() {
        let b = book(
            "google",
            vec![
                rule(
                    "code = 451\naction = \"suspend\"\nduration = \"5m\"\nthreshold = \"3/10min\"",
                )
                .unwrap(),
            ],
        );
        let r = Reply::local(451, "4.3.0", "try again");
        let (a, c): (Option<IpAddr>, Option<IpAddr>) =
            (Some([192, 0, 2, 1].into()), Some([192, 0, 2, 2].into()));
        let t0 = Instant::now();
        let at = |m: u64| t0 + Duration::from_mins(m);
        assert_eq!(b.on_reply("google", a, &r, at(0)), None);
        assert_eq!(b.on_reply("google", a, &r, at(1)), None);
        assert_eq!(
            b.on_reply("google", c, &r, at(2)),
            None,
            "another source counts apart"
        );
        assert!(
            b.on_reply("google", a, &r, at(3)).is_some(),
            "third within 10 min"
        );
        // The count restarts after firing, and old matches slide out of the window.
        assert_eq!(b.on_reply("google", a, &r, at(4)), None);
        assert_eq!(b.on_reply("google", a, &r, at(5)), None);
        assert_eq!(
            b.on_reply("google", a, &r, at(16)),
            None,
            "4 and 5 slid out"
        );
    }
}
