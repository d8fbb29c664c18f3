//! The shaping file (TOML): a `[default]` section and one section per
//! provider, each inheriting what it does not set from `[default]`.
use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use anyhow::{Context, bail};
use serde::Deserialize;

use super::super::{
    provider::{self, Providers},
    rules::{self, Rule, RuleConfig},
    throttle::Rate,
};

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
