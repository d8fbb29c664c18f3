//! Providers: MX host names roll up into providers by suffix rules, so all
//! domains hosted at one mailbox provider share its limits (issue 6).
//!
//! A rule matches a host equal to its suffix or ending in `.suffix` (label
//! boundary: `evilgoogle.com` is not `google.com`); the longest matching
//! suffix wins. Hosts no rule matches belong to [`DEFAULT`].

/// The provider of hosts no rule matches.
pub const DEFAULT: &str = "default";

/// Shipped rules: (suffix, provider).
const SHIPPED: &[(&str, &str)] = &[
    ("google.com", "google"),
    ("googlemail.com", "google"),
    ("outlook.com", "microsoft"),
    ("protection.outlook.com", "microsoft"),
    ("hotmail.com", "microsoft"),
    ("yahoodns.net", "yahoo"),
    ("icloud.com", "apple"),
    ("me.com", "apple"),
];

/// Suffix rules, longest first.
#[derive(Clone, Debug)]
pub struct Providers {
    rules: Vec<(String, String)>,
}

impl Default for Providers {
    fn default() -> Self {
        let mut rules: Vec<(String, String)> = SHIPPED
            .iter()
            .map(|(s, p)| ((*s).to_owned(), (*p).to_owned()))
            .collect();
        rules.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Self { rules }
    }
}

impl Providers {
    /// Adds a rule; a suffix another provider already claims is refused
    /// (the same host cannot belong to two providers).
    pub fn add(&mut self, suffix: &str, provider: &str) -> Result<(), String> {
        let suffix = suffix.trim_end_matches('.').to_ascii_lowercase();
        if suffix.is_empty() || suffix.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("{suffix:?} is not a host name suffix"));
        }
        match self.rules.iter().find(|(s, _)| *s == suffix) {
            Some((_, p)) if p == provider => return Ok(()),
            Some((_, p)) => return Err(format!("{suffix:?} already belongs to provider {p}")),
            None => {}
        }
        self.rules.push((suffix, provider.to_owned()));
        self.rules
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(())
    }

    /// Every provider name the rules know, plus [`DEFAULT`].
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.rules.iter().map(|(_, p)| p.as_str()).collect();
        v.push(DEFAULT);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The provider of an MX host name (case and a trailing dot ignored).
    pub fn classify(&self, host: &str) -> &str {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        for (suffix, provider) in &self.rules {
            if host == *suffix
                || host
                    .strip_suffix(suffix.as_str())
                    .is_some_and(|rest| rest.ends_with('.'))
            {
                return provider;
            }
        }
        DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_rules_roll_mx_hosts_up_into_providers() {
        let p = Providers::default();
        for (host, want) in [
            ("gmail-smtp-in.l.google.com", "google"),
            ("alt1.gmail-smtp-in.l.google.com.", "google"),
            ("ASPMX.L.GOOGLE.COM", "google"),
            ("mx1.googlemail.com", "google"),
            ("google.com", "google"),
            ("example-com.mail.protection.outlook.com", "microsoft"),
            ("outlook-com.olc.protection.outlook.com", "microsoft"),
            ("mx1.hotmail.com", "microsoft"),
            ("mta5.am0.yahoodns.net", "yahoo"),
            ("mx01.mail.icloud.com", "apple"),
            ("mx.me.com", "apple"),
            ("mx.example.org", "default"),
            ("evilgoogle.com", "default"),
            ("google.com.evil.test", "default"),
            ("notme.com", "default"),
            ("", "default"),
        ] {
            assert_eq!(p.classify(host), want, "{host}");
        }
    }

    #[test]
    fn names_are_the_providers_and_default() {
        assert_eq!(
            Providers::default().names(),
            ["apple", "default", "google", "microsoft", "yahoo"]
        );
    }
}
