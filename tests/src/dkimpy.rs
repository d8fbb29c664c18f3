//! python dkimpy (Debian `python3-dkim`) as an independent DKIM verifier:
//! it looks the selector's key up through dnspython at a DNS server of the
//! test's choosing (dnsmasq on loopback), never the system resolver.
use std::{net::SocketAddr, process::Command};

use crate::tmp::TempDir;

/// Debian's interpreter, where `cargo xtask setup` installed the modules
/// (a `python3` earlier on `PATH`, e.g. pyenv, would not have them).
const PYTHON: &str = "/usr/bin/python3";

const VERIFY: &str = r#"
import sys, dkim, dns.resolver
server, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = dns.resolver.Resolver(configure=False)
r.nameservers = [server]
r.port = port
def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    try:
        answer = r.resolve(name, "TXT", lifetime=timeout)
    except Exception:
        return None
    for rr in answer:
        return b"".join(rr.strings)
    return None
d = dkim.DKIM(open(path, "rb").read())
try:
    ok = d.verify(dnsfunc=txt)
except dkim.DKIMException as e:  # e.g. "body hash mismatch": a failed verification
    print(e, file=sys.stderr)
    ok = False
fields = d.signature_fields or {}
print(("PASS" if ok else "FAIL"),
      fields.get(b"d", b"-").decode(),
      fields.get(b"s", b"-").decode(),
      fields.get(b"a", b"-").decode())
"#;

/// What dkimpy said about the first `DKIM-Signature` of a message.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub pass: bool,
    /// `d=`, `s=`, `a=` of the signature it checked (`-` when absent).
    pub domain: String,
    pub selector: String,
    pub algorithm: String,
}

/// Verifies `message` (exact bytes as received) with dkimpy.
pub fn verify(message: &[u8], dns: SocketAddr) -> Verdict {
    let dir = TempDir::new("dkimpy");
    let path = dir.join("message.eml");
    std::fs::write(&path, message).expect("write message");
    let out = Command::new(PYTHON)
        .args(["-c", VERIFY])
        .arg(dns.ip().to_string())
        .arg(dns.port().to_string())
        .arg(&path)
        .output()
        .expect("run /usr/bin/python3 (cargo xtask setup installs python3-dkim)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dkimpy crashed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(f.len(), 4, "unexpected dkimpy output: {stdout}");
    Verdict {
        pass: f[0] == "PASS",
        domain: f[1].to_owned(),
        selector: f[2].to_owned(),
        algorithm: f[3].to_owned(),
    }
}
