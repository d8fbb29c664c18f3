//! `smtp-lb check-config FILE`: validates a balancer config, a relay config
//! or a shaping file without touching anything (like `haproxy -c`); exit
//! status 0 when the daemon would accept it. Errors read
//! `FILE:LINE: FIELD: problem`, as the balancer's own do.
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

use crate::{
    config::lb::LbConfig,
    relay::{
        self,
        dkim::Signers,
        policy::{
            limiter::Limiters,
            shaping::{Shaper, ShapingConfig},
        },
    },
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The file to check.
    pub file: PathBuf,
    /// What the file is; by default it is told from its content (`[[services]]`:
    /// balancer, `spool_dir` or `[[listener]]`: relay, provider sections: shaping).
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// `smtp-lb lb --config`.
    Lb,
    /// `smtp-lb relay --config`.
    Relay,
    /// A relay's `shaping` file.
    Shaping,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let path = &opts.file;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let kind = match opts.kind {
        Some(k) => k,
        None => detect(&text).map_err(|e| located(path, &text, &e))?,
    };
    let summary = match kind {
        Kind::Lb => check_lb(path)?,
        Kind::Relay => check_relay(path).map_err(|e| located(path, &text, &e))?,
        Kind::Shaping => check_shaping(&text).map_err(|e| located(path, &text, &e))?,
    };
    println!("{}: ok ({summary})", path.display());
    Ok(())
}

/// Tells the kind by the top-level keys each kind alone has.
fn detect(text: &str) -> anyhow::Result<Kind> {
    let table: toml::Table = toml::from_str(text)?;
    let has = |keys: &[&str]| keys.iter().any(|k| table.contains_key(*k));
    if has(&["listener", "spool_dir"]) {
        Ok(Kind::Relay)
    } else if has(&["services", "pin_dir", "state_dir", "health", "warmup"]) {
        Ok(Kind::Lb)
    } else if !table.is_empty() && table.values().all(toml::Value::is_table) {
        Ok(Kind::Shaping)
    } else {
        Err(anyhow!(
            "cannot tell what this file configures; pass --kind lb, relay or shaping"
        ))
    }
}

fn check_lb(path: &Path) -> anyhow::Result<String> {
    let cfg = LbConfig::load(path)?;
    let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    let ports: usize = cfg.services.iter().map(|s| s.ports.len()).sum();
    Ok(format!(
        "balancer: {} services on {ports} ports, {backends} backends; health every {:?}, out after {:?} at most",
        cfg.services.len(),
        cfg.health.interval,
        cfg.services
            .iter()
            .flat_map(|s| s.ports.iter().map(|p| s.check(*p, &cfg.health).tls))
            .map(|tls| cfg.health.detection_bound(tls))
            .max()
            .unwrap_or_default()
    ))
}

/// Everything the relay checks at start that needs no network: the file,
/// its shaping file, egress sources against shaping overrides, DKIM keys.
fn check_relay(path: &Path) -> anyhow::Result<String> {
    let cfg = relay::Config::load(path)?;
    let shaper = Shaper::load(cfg.shaping.as_deref(), &Limiters::local())?;
    relay::egress_for(&cfg, &shaper)?;
    Signers::load(&cfg.dkim)?;
    Ok(format!(
        "relay: {} listeners, spool {}, shaping {}, {} DKIM keys",
        cfg.listeners.len(),
        cfg.spool_dir.display(),
        cfg.shaping
            .as_deref()
            .map_or_else(|| "none".to_owned(), |p| p.display().to_string()),
        cfg.dkim.len()
    ))
}

fn check_shaping(text: &str) -> anyhow::Result<String> {
    let cfg = ShapingConfig::parse(text)?;
    let names = cfg.limits.keys().cloned().collect::<Vec<_>>();
    Ok(format!(
        "shaping: [default]{}{}",
        if names.is_empty() { "" } else { " + " },
        names
            .iter()
            .map(|n| format!("[{n}]"))
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// Rewrites an error about `text` as `FILE:LINE: FIELD: problem`: a TOML
/// error gets its line from its span and its field from the table and key
/// written there; a checker's `line N: …` keeps its own field.
fn located(path: &Path, text: &str, err: &anyhow::Error) -> anyhow::Error {
    let file = path.display();
    if let Some(e) = err
        .chain()
        .find_map(|e| e.downcast_ref::<toml::de::Error>())
    {
        let problem = e.message().trim().replace('\n', " ");
        return match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                anyhow!("{file}:{line}: {}: {problem}", field_at(text, line))
            }
            None => anyhow!("{file}: {problem}"),
        };
    }
    let msg = format!("{err:#}");
    // The shaping checker says `line N: [section] field: problem`.
    if let Some(pos) = msg.find("line ")
        && let Some((n, rest)) = msg[pos + 5..].split_once(": ")
        && let Ok(n) = n.parse::<usize>()
    {
        return anyhow!("{file}:{n}: {rest}");
    }
    anyhow!("{file}: {msg}")
}

/// The dotted path of what line `line` (1-based) writes: the table it is in
/// (`listener[1]` for the second `[[listener]]`) and its key.
fn field_at(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut table = String::new();
    for l in lines.iter().take(line) {
        let t = l.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            let name = name.0.trim();
            let index = lines
                .iter()
                .take(line)
                .filter(|x| {
                    x.trim().strip_prefix("[[").is_some_and(|r| {
                        r.starts_with(name) && r[name.len()..].trim_start().starts_with("]]")
                    })
                })
                .count()
                - 1;
            table = format!("{name}[{index}]");
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split_once(']')) {
            name.0.trim().clone_into(&mut table);
        }
    }
    // The key on the line, else the nearest one above it in the same table
    // (the line may continue a multi-line value).
    let key = lines[..line.min(lines.len())]
        .iter()
        .rev()
        .take_while(|l| !l.trim_start().starts_with('['))
        .find_map(|l| {
            let (k, _) = l.split_once('=')?;
            let k = k.trim();
            (!k.is_empty() && !k.starts_with('#')).then(|| k.trim_matches('"').to_owned())
        });
    match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (_, None) if !table.is_empty() => table,
        (_, None) => "(top level)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_by_their_own_keys() {
        assert_eq!(
            detect("spool_dir = \"/s\"\n[[listener]]\naddress = \"127.0.0.1:25\"\n").unwrap(),
            Kind::Relay
        );
        assert_eq!(
            detect("[[services]]\nvip = \"203.0.113.10\"\nports = [25]\n").unwrap(),
            Kind::Lb
        );
        assert_eq!(
            detect("[default]\nconnection_limit = 5\n[google]\nmessage_rate = \"10/s\"\n").unwrap(),
            Kind::Shaping
        );
        assert!(detect("").is_err());
        assert!(detect("hostname = \"x\"\n").is_err());
    }

    #[test]
    fn fields_are_named_by_table_index_and_key() {
        let text = "spool_dir = \"/s\"\n[[listener]]\naddress = \"a\"\n[[listener]]\naddress = \"b\"\nsubmision = true\n[limits]\nmax_errors = [\n  1,\n]\n";
        assert_eq!(field_at(text, 1), "spool_dir");
        assert_eq!(field_at(text, 3), "listener[0].address");
        assert_eq!(field_at(text, 6), "listener[1].submision");
        assert_eq!(field_at(text, 9), "limits.max_errors");
    }

    #[test]
    fn toml_errors_name_file_line_and_field() {
        let text =
            "spool_dir = \"/s\"\n[[listener]]\naddress = \"127.0.0.1:25\"\nsubmision = true\n";
        let err = toml::from_str::<relay::Config>(text).unwrap_err();
        let msg = located(Path::new("r.toml"), text, &err.into()).to_string();
        assert!(
            msg.starts_with("r.toml:4: listener[0].submision: unknown field `submision`"),
            "{msg}"
        );
    }

    #[test]
    fn shaping_errors_keep_their_line_and_section() {
        let text = "[default]\nconnection_limit = 5\n\n[gogle]\nconnection_limit = 1\n";
        let err = ShapingConfig::parse(text).unwrap_err();
        let msg = located(Path::new("s.toml"), text, &err).to_string();
        assert!(
            msg.starts_with("s.toml:4: unknown provider section [gogle]"),
            "{msg}"
        );
    }
}
