//! `smtp-lb relay check-identity`: is the DNS of this relay's sending
//! identity what receivers check? One PASS/FAIL line per check:
//! - forward-confirmed reverse DNS of every egress source (PTR of the IP is
//!   the HELO name, and the HELO name's A/AAAA include the IP);
//! - SPF (RFC 7208, evaluated by `mail-auth`) of every sending domain passes
//!   for every source IP;
//! - the DKIM key in DNS verifies a probe signed with the key file;
//! - a DMARC record (RFC 7489) exists and parses.
use std::{fmt, net::IpAddr, path::PathBuf};

use hickory_resolver::proto::rr::RData;
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, SpfResult,
    common::{cache::NoCache, headers::HeaderWriter as _},
    dkim::DkimSigner,
    dmarc::Dmarc,
    spf::verify::SpfParameters,
};
use serde::Serialize;

use crate::relay::{
    config::Config,
    dkim::{self, Entry},
    route,
};

/// One way out: the address mail leaves from and the name it says in `EHLO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub ip: IpAddr,
    pub helo: String,
}

/// One DKIM key to compare with DNS.
#[derive(Clone, Debug)]
pub struct DkimKeyRef {
    pub domain: String,
    pub selector: String,
    pub key: PathBuf,
}

/// Everything the check looks at, taken from the config by [`inputs`].
#[derive(Clone, Debug, Default)]
pub struct IdentityInputs {
    pub sources: Vec<Source>,
    /// Domains mail is sent as (SPF and DMARC are checked for each), with
    /// the sources each may leave from (its pool's).
    pub domains: Vec<(String, Vec<Source>)>,
    pub dkim: Vec<DkimKeyRef>,
}

/// Which pool a sending domain's mail leaves from (`None`: no pools).
type PoolOf = Box<dyn Fn(&str) -> Option<String>>;

/// The one place that knows where identities live in the config: the
/// `[[egress.source]]`s (or `delivery.source_ip` with `delivery.helo_name`
/// or `hostname`), and as sending domains the `[[dkim]]` domains and the
/// `sender_domain`s of `[[egress.select]]`, each with its pool's sources
/// (the default pool's unless a select names another).
pub fn inputs(cfg: &Config) -> IdentityInputs {
    let default_helo = cfg
        .delivery
        .helo_name
        .clone()
        .unwrap_or_else(|| cfg.hostname.clone());
    let norm = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
    let mut domains: Vec<String> = Vec::new();
    let mut add = |d: String| {
        if !domains.contains(&d) {
            domains.push(d);
        }
    };
    cfg.dkim.iter().for_each(|d| add(norm(&d.domain)));
    let (sources, pool_of): (Vec<(String, Source)>, PoolOf) = match &cfg.egress {
        Some(e) => {
            e.selects
                .iter()
                .filter_map(|s| s.sender_domain.as_deref())
                .for_each(|d| add(norm(d)));
            let sources = e
                .sources
                .iter()
                .map(|s| {
                    let helo = s.helo.clone().unwrap_or_else(|| default_helo.clone());
                    (
                        s.name.clone(),
                        Source {
                            ip: s.address,
                            helo,
                        },
                    )
                })
                .collect();
            let selects: Vec<(String, String)> = e
                .selects
                .iter()
                .filter_map(|s| Some((norm(s.sender_domain.as_deref()?), s.pool.clone())))
                .collect();
            let default_pool = e.default_pool.clone();
            (
                sources,
                Box::new(move |d: &str| {
                    Some(
                        selects
                            .iter()
                            .find(|(sd, _)| sd == d)
                            .map_or_else(|| default_pool.clone(), |(_, p)| p.clone()),
                    )
                }),
            )
        }
        None => (
            cfg.delivery
                .source_ip
                .map(|ip| {
                    (
                        String::new(),
                        Source {
                            ip,
                            helo: default_helo.clone(),
                        },
                    )
                })
                .into_iter()
                .collect(),
            Box::new(|_: &str| None),
        ),
    };
    let members = |pool: Option<String>| -> Vec<Source> {
        let names: Option<Vec<&str>> = pool.and_then(|p| {
            cfg.egress.as_ref().and_then(|e| {
                e.pools
                    .iter()
                    .find(|x| x.name == p)
                    .map(|x| x.sources.iter().map(|m| m.name.as_str()).collect())
            })
        });
        sources
            .iter()
            .filter(|(n, _)| names.as_ref().is_none_or(|ns| ns.contains(&n.as_str())))
            .map(|(_, s)| s.clone())
            .collect()
    };
    let domains = domains
        .into_iter()
        .map(|d| {
            let srcs = members(pool_of(&d));
            (d, srcs)
        })
        .collect();
    let dkim = cfg
        .dkim
        .iter()
        .map(|d| DkimKeyRef {
            domain: norm(&d.domain),
            selector: d.selector.clone(),
            key: d.key.clone(),
        })
        .collect();
    IdentityInputs {
        sources: sources.into_iter().map(|(_, s)| s).collect(),
        domains,
        dkim,
    }
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// `ptr`, `a`, `spf`, `dkim`, `dmarc`, `sources`.
    pub check: &'static str,
    /// What was checked: an IP, a name, `domain from ip`, `selector._domainkey.domain`.
    pub subject: String,
    pub pass: bool,
    /// What was found, short.
    pub reason: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  {:<6} {}: {}",
            if self.pass { "PASS" } else { "FAIL" },
            self.check,
            self.subject,
            self.reason
        )
    }
}

fn check(check: &'static str, subject: String, pass: bool, reason: String) -> Check {
    Check {
        check,
        subject,
        pass,
        reason,
    }
}

/// Lower-cased, without the root dot: how names are compared.
fn name(n: &str) -> String {
    n.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(n: &str) -> String {
    format!("{}.", n.trim_end_matches('.'))
}

/// Runs every check against the DNS of `[dns]`.
pub async fn run(cfg: &Config) -> anyhow::Result<Vec<Check>> {
    let auth = MessageAuthenticator(route::resolver(&cfg.dns)?);
    Ok(check_all(&auth, &inputs(cfg), &cfg.hostname).await)
}

pub async fn check_all(
    auth: &MessageAuthenticator,
    inputs: &IdentityInputs,
    hostname: &str,
) -> Vec<Check> {
    let mut out = Vec::new();
    if inputs.sources.is_empty() {
        out.push(check(
            "sources",
            "egress".into(),
            false,
            "no egress source IP configured (delivery.source_ip): nothing to check PTR and SPF against"
                .into(),
        ));
    }
    for s in &inputs.sources {
        out.push(ptr(auth, s).await);
        out.push(forward(auth, s).await);
    }
    for (d, sources) in &inputs.domains {
        for s in sources {
            out.push(spf(auth, d, s, hostname).await);
        }
    }
    for k in &inputs.dkim {
        out.push(dkim_key(auth, k).await);
    }
    for (d, _) in &inputs.domains {
        out.push(dmarc(auth, d).await);
    }
    out
}

async fn ptr(auth: &MessageAuthenticator, s: &Source) -> Check {
    let subject = s.ip.to_string();
    match auth.0.reverse_lookup(s.ip).await {
        Ok(lookup) => {
            let names: Vec<String> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::PTR(p) => Some(name(&p.0.to_ascii())),
                    _ => None,
                })
                .collect();
            let pass = names.contains(&name(&s.helo));
            let reason = if pass {
                format!("PTR {} matches the HELO name", s.helo)
            } else {
                format!(
                    "PTR is {} but the HELO name is {}",
                    if names.is_empty() {
                        "empty".to_owned()
                    } else {
                        names.join(", ")
                    },
                    s.helo
                )
            };
            check("ptr", subject, pass, reason)
        }
        Err(e) => check("ptr", subject, false, format!("no PTR record ({e})")),
    }
}

async fn forward(auth: &MessageAuthenticator, s: &Source) -> Check {
    let subject = s.helo.clone();
    match auth.0.lookup_ip(fqdn(&s.helo).as_str()).await {
        Ok(lookup) => {
            let ips: Vec<IpAddr> = lookup.iter().collect();
            let pass = ips.contains(&s.ip);
            let list = ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let reason = if pass {
                format!("A/AAAA include {}", s.ip)
            } else {
                format!("A/AAAA are [{list}], not {}", s.ip)
            };
            check("a", subject, pass, reason)
        }
        Err(e) => check("a", subject, false, format!("no A/AAAA record ({e})")),
    }
}

async fn spf(auth: &MessageAuthenticator, domain: &str, s: &Source, hostname: &str) -> Check {
    let subject = format!("{domain} from {}", s.ip);
    let sender = format!("postmaster@{domain}");
    let out = auth
        .check_host(SpfParameters::verify_mail_from(s.ip, &s.helo, hostname, &sender).into())
        .await;
    let result = out.result();
    let pass = result == SpfResult::Pass;
    let reason = if pass {
        format!("SPF pass for {}", s.ip)
    } else {
        format!(
            "SPF result {result} for {} (the record must authorize it)",
            s.ip
        )
    };
    check("spf", subject, pass, reason)
}

/// Signs a probe with the key file and verifies it the way a receiver does:
/// the selector's TXT record must hold the key file's public key.
async fn dkim_key(auth: &MessageAuthenticator, k: &DkimKeyRef) -> Check {
    let subject = format!("{}._domainkey.{}", k.selector, k.domain);
    let entry = Entry {
        index: 0,
        domain: k.domain.clone(),
        selector: k.selector.clone(),
    };
    let loaded = match dkim::load_key(&entry, &k.key) {
        Ok(l) => l,
        Err(e) => return check("dkim", subject, false, e.to_string()),
    };
    let algorithm = loaded.algorithm();
    let probe = format!(
        "From: postmaster@{d}\r\nTo: postmaster@{d}\r\nSubject: smtp-lb check-identity probe\r\n\r\nprobe\r\n",
        d = k.domain
    );
    let signed = DkimSigner::from_key(loaded.key)
        .domain(k.domain.clone())
        .selector(k.selector.clone())
        .headers(["From", "To", "Subject"])
        .sign(probe.as_bytes());
    let header = match signed {
        Ok(sig) => sig.to_header(),
        Err(e) => return check("dkim", subject, false, format!("cannot sign a probe: {e}")),
    };
    let message = format!("{header}{probe}");
    let Some(parsed) = AuthenticatedMessage::parse(message.as_bytes()) else {
        return check("dkim", subject, false, "probe does not parse".into());
    };
    let results = auth.verify_dkim(&parsed).await;
    let result = results.first().map_or(&DkimResult::None, |r| r.result());
    let (pass, reason) = match result {
        DkimResult::Pass => (
            true,
            format!(
                "DNS key matches the {algorithm} key file {}",
                k.key.display()
            ),
        ),
        DkimResult::Fail(mail_auth::Error::Crypto(_)) => (
            false,
            format!(
                "DNS key does not match the {algorithm} key file {}",
                k.key.display()
            ),
        ),
        DkimResult::Fail(e) | DkimResult::Neutral(e) | DkimResult::PermError(e) => {
            (false, format!("no usable DKIM key record: {e}"))
        }
        DkimResult::TempError(e) => (false, format!("DNS lookup failed: {e}")),
        DkimResult::None => (false, "no result".into()),
    };
    check("dkim", subject, pass, reason)
}

async fn dmarc(auth: &MessageAuthenticator, domain: &str) -> Check {
    let subject = format!("_dmarc.{domain}");
    match auth
        .txt_lookup::<Dmarc>(subject.clone(), None::<&NoCache<Box<str>, mail_auth::Txt>>)
        .await
    {
        Ok(d) => check(
            "dmarc",
            subject,
            true,
            format!("record present, p={:?}", d.p).to_ascii_lowercase(),
        ),
        Err(e) => check(
            "dmarc",
            subject,
            false,
            format!("no valid DMARC record ({e})"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        toml::from_str(toml).expect("config")
    }

    #[test]
    fn inputs_come_from_delivery_and_dkim() {
        let cfg = config(
            r#"
            hostname = "relay.example.net"
            spool_dir = "/tmp/x"
            [[listener]]
            address = "127.0.0.1:25"
            [delivery]
            source_ip = "192.0.2.7"
            [[dkim]]
            domain = "Example.com."
            selector = "s1"
            key = "/k1"
            [[dkim]]
            domain = "example.com"
            selector = "s2"
            key = "/k2"
            "#,
        );
        let i = inputs(&cfg);
        assert_eq!(
            i.sources,
            vec![Source {
                ip: "192.0.2.7".parse().unwrap(),
                helo: "relay.example.net".into()
            }]
        );
        assert_eq!(
            i.domains,
            vec![("example.com".to_owned(), i.sources.clone())]
        );
        assert_eq!(i.dkim.len(), 2);
    }

    #[test]
    fn egress_sources_and_each_domains_pool_are_the_inputs() {
        let cfg = config(
            r#"
            hostname = "relay.example.net"
            spool_dir = "/tmp/x"
            [[listener]]
            address = "127.0.0.1:25"
            [[dkim]]
            domain = "example.com"
            selector = "s1"
            key = "/k1"
            [egress]
            default_pool = "main"
            [[egress.source]]
            name = "a"
            address = "192.0.2.1"
            helo = "a.example.net"
            [[egress.source]]
            name = "b"
            address = "192.0.2.2"
            [[egress.source]]
            name = "c"
            address = "192.0.2.3"
            helo = "c.example.net"
            [[egress.pool]]
            name = "main"
            sources = [{ name = "a" }, { name = "b" }]
            [[egress.pool]]
            name = "news"
            sources = [{ name = "c" }]
            [[egress.select]]
            sender_domain = "News.example.com"
            pool = "news"
            "#,
        );
        let i = inputs(&cfg);
        let ips = |v: &[Source]| v.iter().map(|s| s.ip.to_string()).collect::<Vec<_>>();
        assert_eq!(ips(&i.sources), ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert_eq!(
            i.sources[1].helo, "relay.example.net",
            "helo defaults to hostname"
        );
        assert_eq!(i.domains.len(), 2);
        assert_eq!(i.domains[0].0, "example.com");
        assert_eq!(ips(&i.domains[0].1), ["192.0.2.1", "192.0.2.2"]);
        assert_eq!(i.domains[1].0, "news.example.com");
        assert_eq!(ips(&i.domains[1].1), ["192.0.2.3"]);
    }

    #[test]
    fn helo_name_overrides_hostname() {
        let cfg = config(
            r#"
            hostname = "relay.example.net"
            spool_dir = "/tmp/x"
            [[listener]]
            address = "127.0.0.1:25"
            [delivery]
            source_ip = "2001:db8::1"
            helo_name = "out1.example.net"
            "#,
        );
        assert_eq!(inputs(&cfg).sources[0].helo, "out1.example.net");
    }

    #[test]
    fn report_line_says_pass_or_fail_first() {
        let c = check("ptr", "192.0.2.7".into(), false, "PTR is empty".into());
        assert_eq!(c.to_string(), "FAIL  ptr    192.0.2.7: PTR is empty");
    }
}
