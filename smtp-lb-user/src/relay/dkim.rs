//! DKIM signing (RFC 6376; Ed25519 per RFC 8463) with per-domain keys from
//! files, done once at ingress before the message is spooled: the spool then
//! holds exactly the bytes that are sent, and retries never sign again.
//!
//! Relaxed/relaxed canonicalization, RSA-SHA256 or Ed25519-SHA256 (chosen by
//! the key). The signing domain is picked by the `From:` header domain (the
//! DMARC alignment identity): the most specific `[[dkim]]` domain equal to it
//! or a parent of it. Signing itself is `mail-auth`.
use std::{
    fmt,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use mail_auth::{
    AuthenticatedMessage,
    common::{
        crypto::{DkimKey, Ed25519Key, RsaKey, Sha256},
        headers::HeaderWriter as _,
    },
    dkim::DkimSigner,
};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};

/// One `[[dkim]]` entry of the relay config.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// Signs mail whose `From:` domain is this domain or a subdomain of it (`d=`).
    pub domain: String,
    /// Selector (`s=`): the key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key: RSA (PKCS#1 or PKCS#8, 2048–4096 bits) or Ed25519
    /// (PKCS#8). Must not be readable by group or others.
    pub key: PathBuf,
    /// Header fields to sign (`h=`); those absent from a message are skipped.
    #[serde(default = "DkimConfig::default_headers")]
    pub headers: Vec<String>,
}

/// Header fields signed by default: the ones a reader sees and trusts, plus
/// the MIME structure (RFC 6376 §5.4.1 recommends this kind of set).
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

impl DkimConfig {
    fn default_headers() -> Vec<String> {
        DEFAULT_HEADERS.iter().map(|&h| h.to_owned()).collect()
    }
}

/// Why a `[[dkim]]` entry cannot be used; the relay refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{entry}: key file {}: {source}", path.display())]
    Read {
        entry: Entry,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{entry}: key file {} is readable by group or others (mode {mode:04o}); `chmod 600` it",
        path.display()
    )]
    Permissions {
        entry: Entry,
        path: PathBuf,
        mode: u32,
    },
    #[error("{entry}: key file {}: {reason}", path.display())]
    Format {
        entry: Entry,
        path: PathBuf,
        reason: String,
    },
    #[error("{entry}: {reason}")]
    Config { entry: Entry, reason: String },
}

/// Names a `[[dkim]]` entry in errors: position and what it is for.
#[derive(Clone, Debug)]
pub struct Entry {
    pub index: usize,
    pub domain: String,
    pub selector: String,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[[dkim]] entry {} (domain {:?}, selector {:?})",
            self.index + 1,
            self.domain,
            self.selector
        )
    }
}

/// A key file's permission bits are acceptable when nobody but the owner can
/// read or write it.
#[expect(
    clippy::verbose_bit_mask,
    reason = "permission bits read best as the octal mask"
)]
pub fn mode_is_private(mode: u32) -> bool {
    mode & 0o077 == 0
}

/// A private key usable for DKIM, with its public half in the form published
/// in DNS (`p=`): DER `RSAPublicKey` for RSA, the raw 32 bytes for Ed25519.
pub struct LoadedKey {
    pub key: DkimKey,
    pub public: Vec<u8>,
}

impl LoadedKey {
    pub fn algorithm(&self) -> &'static str {
        match self.key {
            DkimKey::Rsa(_) => "rsa",
            DkimKey::Ed25519(_) => "ed25519",
        }
    }
}

/// Parses a PEM private key: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
pub fn parse_key(pem: &[u8]) -> Result<LoadedKey, String> {
    let der =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key ({e})"))?;
    match der {
        PrivateKeyDer::Pkcs1(_) => {
            let rsa = RsaKey::<Sha256>::from_key_der(der)
                .map_err(|e| format!("unusable RSA key ({e}); RSA keys must be 2048–4096 bits"))?;
            let public = rsa.public_key();
            Ok(LoadedKey {
                key: DkimKey::Rsa(rsa),
                public,
            })
        }
        PrivateKeyDer::Pkcs8(ref p8) => {
            // OpenSSL writes Ed25519 keys as PKCS#8 v1 (no public key inside),
            // which only the "maybe unchecked" parser accepts.
            if let Ok(ed) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
                let public = ed.public_key();
                return Ok(LoadedKey {
                    key: DkimKey::Ed25519(ed),
                    public,
                });
            }
            let rsa = RsaKey::<Sha256>::from_key_der(der.clone_key()).map_err(|e| {
                format!(
                    "PKCS#8 key is neither Ed25519 nor a usable RSA key ({e}); RSA keys must be 2048–4096 bits"
                )
            })?;
            let public = rsa.public_key();
            Ok(LoadedKey {
                key: DkimKey::Rsa(rsa),
                public,
            })
        }
        _ => Err("unsupported key type (SEC1 EC key?); use RSA or Ed25519".to_owned()),
    }
}

/// Reads and checks one entry's key file.
pub fn load_key(entry: &Entry, path: &Path) -> Result<LoadedKey, KeyError> {
    let read = |source| KeyError::Read {
        entry: entry.clone(),
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o7777;
    if !mode_is_private(mode) {
        return Err(KeyError::Permissions {
            entry: entry.clone(),
            path: path.to_owned(),
            mode,
        });
    }
    let pem = std::fs::read(path).map_err(read)?;
    parse_key(&pem).map_err(|reason| KeyError::Format {
        entry: entry.clone(),
        path: path.to_owned(),
        reason,
    })
}

/// Every configured signing identity, ready to sign.
pub struct Signers {
    /// Longest domain first, so the most specific match wins.
    signers: Vec<Signer>,
}

struct Signer {
    domain: String,
    signer: DkimSigner<DkimKey, mail_auth::dkim::Done>,
}

/// What [`Signers::sign`] did with a message.
#[derive(Debug)]
pub enum Outcome {
    /// `DKIM-Signature` header to prepend, and the signing domain.
    Signed { header: String, domain: String },
    /// No `[[dkim]]` domain covers the `From:` domain (or there is no `From:`).
    NoKey,
    /// Signing failed; the message goes out unsigned.
    Failed(String),
}

/// Lower-cased, without a trailing dot: how domains are compared.
fn normalize(domain: &str) -> String {
    domain.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The index of the most specific entry of `domains` (normalized, longest
/// first) that is `from_domain` or one of its parents.
pub fn select<'a>(domains: impl IntoIterator<Item = &'a str>, from_domain: &str) -> Option<usize> {
    let from = normalize(from_domain);
    domains
        .into_iter()
        .position(|d| from == d || from.strip_suffix(d).is_some_and(|rest| rest.ends_with('.')))
}

/// The domain of the first address in the `From:` header, lower-cased.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = AuthenticatedMessage::parse(message)?;
    let (_, domain) = parsed.from().rsplit_once('@')?;
    let domain = normalize(domain);
    (!domain.is_empty()).then_some(domain)
}

impl Signers {
    /// Loads every `[[dkim]]` key; any bad entry is an error naming it.
    pub fn load(entries: &[DkimConfig]) -> Result<Self, KeyError> {
        let mut signers = Vec::with_capacity(entries.len());
        for (index, c) in entries.iter().enumerate() {
            let entry = Entry {
                index,
                domain: c.domain.clone(),
                selector: c.selector.clone(),
            };
            let config = |reason: &str| KeyError::Config {
                entry: entry.clone(),
                reason: reason.to_owned(),
            };
            let domain = normalize(&c.domain);
            if domain.is_empty() || domain.contains(['@', ' ', ';']) {
                return Err(config("domain must be a DNS name"));
            }
            if c.selector.is_empty() || c.selector.contains([' ', ';', '@']) {
                return Err(config("selector must be a DNS label"));
            }
            if !c.headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
                // RFC 6376 §5.4: the From header field MUST be signed.
                return Err(config("headers must include \"From\""));
            }
            if signers.iter().any(|s: &Signer| s.domain == domain) {
                return Err(config("a second key for the same domain"));
            }
            let key = load_key(&entry, &c.key)?.key;
            let signer = DkimSigner::from_key(key)
                .domain(domain.clone())
                .selector(c.selector.clone())
                .headers(c.headers.clone());
            signers.push(Signer { domain, signer });
        }
        signers.sort_by_key(|s| std::cmp::Reverse(s.domain.len()));
        Ok(Self { signers })
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// Signs `message` (header section, blank line, body; CRLF line ends)
    /// for its `From:` domain, if a key covers it.
    pub fn sign(&self, message: &[u8]) -> Outcome {
        if self.signers.is_empty() {
            return Outcome::NoKey;
        }
        let Some(from) = from_domain(message) else {
            return Outcome::NoKey;
        };
        let Some(i) = select(self.signers.iter().map(|s| s.domain.as_str()), &from) else {
            return Outcome::NoKey;
        };
        let s = &self.signers[i];
        match s.signer.sign(message) {
            Ok(sig) => Outcome::Signed {
                header: sig.to_header(),
                domain: s.domain.clone(),
            },
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_domain_wins() {
        let domains = ["mail.example.com", "example.com", "other.org"];
        assert_eq!(select(domains, "example.com"), Some(1));
        assert_eq!(select(domains, "Example.COM."), Some(1));
        assert_eq!(select(domains, "news.example.com"), Some(1));
        assert_eq!(select(domains, "a.mail.example.com"), Some(0));
        assert_eq!(select(domains, "mail.example.com"), Some(0));
        assert_eq!(select(domains, "other.org"), Some(2));
    }

    #[test]
    fn suffix_without_label_boundary_does_not_match() {
        assert_eq!(select(["example.com"], "badexample.com"), None);
        assert_eq!(select(["example.com"], "example.com.evil"), None);
        assert_eq!(select(["example.com"], "com"), None);
    }

    #[test]
    fn from_domain_is_the_header_not_the_display_name() {
        let m = b"Subject: x\r\nFrom: \"a@wrong.test\" <Bob@Sub.Example.COM>\r\n\r\nbody\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("sub.example.com"));
        let folded = b"From:\r\n  alice@example.org\r\nTo: b@c.d\r\n\r\n";
        assert_eq!(from_domain(folded).as_deref(), Some("example.org"));
        assert_eq!(from_domain(b"To: b@c.d\r\n\r\nno from\r\n"), None);
    }

    #[test]
    fn default_headers_sign_from_and_the_visible_fields() {
        let h = DkimConfig::default_headers();
        for must in ["From", "To", "Subject", "Date", "Message-ID"] {
            assert!(h.iter().any(|x| x == must), "{must} missing");
        }
        assert!(!h.iter().any(|x| x.eq_ignore_ascii_case("Received")));
    }

    #[test]
    fn only_owner_only_modes_are_private() {
        assert!(mode_is_private(0o600));
        assert!(mode_is_private(0o400));
        assert!(!mode_is_private(0o640));
        assert!(!mode_is_private(0o644));
        assert!(!mode_is_private(0o604));
    }

    #[test]
    fn garbage_and_unsupported_keys_are_refused() {
        assert!(parse_key(b"not a key").is_err());
        let ec = b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIJbvPJktyAhxHs/L8fyliF1yCOmuTz2f/dQCN8lrMLxEoAoGCCqGSM49\nAwEHoUQDQgAEA9rXjuZEyO3dyJGmwRqgQv1vwIi07zAyp1xFDhBWMuT2aLLDsIKR\nW4pzRADH6s88iJR6SGB23x4/IO+kkQEWoQ==\n-----END EC PRIVATE KEY-----\n";
        assert!(parse_key(ec).is_err());
    }

    #[test]
    fn ed25519_pkcs8_v1_key_parses_and_signs() {
        // `openssl genpkey -algorithm ed25519` output (PKCS#8 v1).
        let pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJscZexYQRHiCWRSZZvjEAwipIYpT2536kuNY3OPPBn+\n-----END PRIVATE KEY-----\n";
        let k = parse_key(pem).expect("ed25519 key");
        assert_eq!(k.algorithm(), "ed25519");
        assert_eq!(k.public.len(), 32);
        let signer = DkimSigner::from_key(k.key)
            .domain("example.com")
            .selector("s")
            .headers(["From"]);
        let sig = signer
            .sign(b"From: a@example.com\r\n\r\nhi\r\n")
            .expect("sign");
        let h = sig.to_header();
        assert!(h.starts_with("DKIM-Signature: "), "{h}");
        assert!(h.contains("a=ed25519-sha256"), "{h}");
        assert!(h.contains("c=relaxed/relaxed"), "{h}");
    }
}
