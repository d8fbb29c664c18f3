//! DKIM signing and `relay check-identity` against real peers on 127.0.0.1:
//! keys made by `openssl`, the published keys and SPF/DMARC/PTR records
//! served by dnsmasq, mail submitted by swaks and `smtp-source`, delivered to
//! a capturing sink, and verified by python dkimpy (an independent verifier
//! that looks the key up in DNS itself).
use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    dkimpy,
    dns::Dnsmasq,
    env::smtp_lb_bin,
    relay::{Relay, RelayConfig},
    sink::ScriptSink,
    tmp::{TempDir, free_port, wait_for},
};

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn base64(bytes: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(["base64", "-A"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl base64");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write");
    let out = child.wait_with_output().expect("openssl base64");
    String::from_utf8(out.stdout)
        .expect("ascii")
        .trim()
        .to_owned()
}

/// A private key file (mode 0600) and its DNS `p=` value.
struct Key {
    path: PathBuf,
    p: String,
    k: &'static str,
}

/// RSA-2048; `pkcs1` writes the traditional `BEGIN RSA PRIVATE KEY` form,
/// otherwise PKCS#8. `p=` is the `SubjectPublicKeyInfo`, as usually published.
fn rsa_key(dir: &Path, name: &str, pkcs1: bool) -> Key {
    let path = dir.join(format!("{name}.pem"));
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path));
    if pkcs1 {
        run(Command::new("openssl")
            .args(["rsa", "-traditional", "-in"])
            .arg(&path)
            .arg("-out")
            .arg(&path));
        let pem = std::fs::read_to_string(&path).expect("read key");
        assert!(pem.contains("BEGIN RSA PRIVATE KEY"), "not PKCS#1: {pem}");
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let spki = run(Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&path));
    Key {
        path,
        p: base64(&spki),
        k: "rsa",
    }
}

/// Ed25519 (PKCS#8, as `openssl genpkey` writes it); `p=` is the raw 32-byte
/// public key (RFC 8463 §4.2), the last 32 bytes of its SPKI.
fn ed25519_key(dir: &Path, name: &str) -> Key {
    let path = dir.join(format!("{name}.pem"));
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let spki = run(Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&path));
    Key {
        path,
        p: base64(&spki[spki.len() - 32..]),
        k: "ed25519",
    }
}

/// dnsmasq `--txt-record` for a DKIM key; TXT strings hold at most 255
/// octets, so the key is split into several (receivers concatenate them).
/// On dnsmasq's command line each comma starts a string; quotes would be kept.
fn dkim_txt(name: &str, key: &Key) -> String {
    let text = format!("v=DKIM1; k={}; p={}", key.k, key.p);
    let chunks: Vec<String> = text
        .as_bytes()
        .chunks(200)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", chunks.join(","))
}

fn dkim_toml(domain: &str, selector: &str, key: &Path) -> String {
    format!(
        "\n[[dkim]]\ndomain = {domain:?}\nselector = {selector:?}\nkey = {:?}\n",
        key.display().to_string()
    )
}

fn swaks(relay: SocketAddr, from: &str, to: &str, subject: &str, body: &str) {
    run(Command::new("swaks")
        .args(["--server", "127.0.0.1", "--port", &relay.port().to_string()])
        .args(["--from", from, "--to", to])
        .args(["--header", &format!("Subject: {subject}")])
        .args(["--body", body])
        .stdout(Stdio::null()));
}

fn has_signature(message: &str) -> bool {
    message
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
}

#[test]
fn rsa_and_ed25519_signatures_verify_with_dkimpy_and_tampering_fails() {
    let keys = TempDir::new("dkim-keys");
    let rsa = rsa_key(keys.path(), "rsa", true);
    let ed = ed25519_key(keys.path(), "ed");
    let dns = Dnsmasq::start(&[
        "--local=/test/".to_owned(),
        dkim_txt("s2026._domainkey.rsa.test", &rsa),
        dkim_txt("ed1._domainkey.ed.test", &ed),
    ]);
    let sink = ScriptSink::start();
    let relay = Relay::start(&RelayConfig {
        routes: vec![("dest.test".into(), sink.addr.to_string())],
        nameservers: vec![dns.addr.to_string()],
        extra_toml: dkim_toml("rsa.test", "s2026", &rsa.path)
            + &dkim_toml("ed.test", "ed1", &ed.path),
        ..RelayConfig::default()
    });

    // swaks for RSA (From in a subdomain of the signing domain), smtp-source
    // for Ed25519, swaks again for a domain without a key.
    swaks(
        relay.smtp,
        "alice@news.rsa.test",
        "u1@dest.test",
        "signed with rsa",
        "The quick brown fox.\nSecond line.",
    );
    run(Command::new("smtp-source")
        .args(["-m", "1", "-f", "bob@ed.test", "-t", "u2@dest.test"])
        .args(["-S", "signed with ed25519"])
        .arg(relay.smtp.to_string()));
    swaks(
        relay.smtp,
        "carol@plain.test",
        "u3@dest.test",
        "not signed",
        "No key for this domain.",
    );
    let received = wait_for("3 messages at the sink", Duration::from_secs(20), || {
        let r = sink.received();
        (r.len() >= 3).then_some(r)
    });
    let by_rcpt = |rcpt: &str| {
        received
            .iter()
            .find(|m| m.rcpts.iter().any(|r| r == rcpt))
            .unwrap_or_else(|| panic!("no message for {rcpt}"))
            .data
            .clone()
    };
    let (m_rsa, m_ed, m_plain) = (
        by_rcpt("u1@dest.test"),
        by_rcpt("u2@dest.test"),
        by_rcpt("u3@dest.test"),
    );

    let v = dkimpy::verify(m_rsa.as_bytes(), dns.addr);
    eprintln!("dkimpy on the RSA-signed message: {v:?}");
    assert_eq!(
        v,
        dkimpy::Verdict {
            pass: true,
            domain: "rsa.test".into(),
            selector: "s2026".into(),
            algorithm: "rsa-sha256".into()
        },
        "message:\n{m_rsa}"
    );
    let v = dkimpy::verify(m_ed.as_bytes(), dns.addr);
    eprintln!("dkimpy on the Ed25519-signed message: {v:?}");
    assert_eq!(
        v,
        dkimpy::Verdict {
            pass: true,
            domain: "ed.test".into(),
            selector: "ed1".into(),
            algorithm: "ed25519-sha256".into()
        },
        "message:\n{m_ed}"
    );

    // The same verifier refuses the messages once their body changes.
    for (what, m) in [("RSA", &m_rsa), ("Ed25519", &m_ed)] {
        let (head, body) = m.split_once("\r\n\r\n").expect("header/body split");
        let tampered = format!("{head}\r\n\r\n{body}P.S. added in transit\r\n");
        let v = dkimpy::verify(tampered.as_bytes(), dns.addr);
        eprintln!("dkimpy on the tampered {what} message: {v:?}");
        assert!(!v.pass, "tampered {what} message still verifies");
    }

    assert!(
        !has_signature(&m_plain),
        "unconfigured domain got signed:\n{m_plain}"
    );
    assert!(has_signature(&m_rsa) && has_signature(&m_ed));
    assert_eq!(
        relay.metric("smtp_lb_relay_dkim_signatures_total{result=\"signed\"}"),
        2
    );
    assert_eq!(
        relay.metric("smtp_lb_relay_dkim_signatures_total{result=\"failed\"}"),
        0
    );
}

/// Starts the relay binary on a config with one `[[dkim]]` entry and returns
/// its exit status and stderr; panics if it is still running after 10 s.
fn start_with_key(key: &Path) -> (bool, String) {
    let dir = TempDir::new("dkim-refuse");
    let mut t = String::new();
    let _ = writeln!(
        t,
        "spool_dir = {:?}",
        dir.join("spool").display().to_string()
    );
    let _ = writeln!(t, "[[listener]]\naddress = \"127.0.0.1:{}\"", free_port());
    t.push_str(&dkim_toml("example.test", "s1", key));
    let config = dir.join("relay.toml");
    std::fs::write(&config, t).expect("write config");
    let mut child = Command::new(smtp_lb_bin())
        .args(["relay", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn smtp-lb");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay started with key {}", key.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    (status.success(), err)
}

#[test]
fn start_up_refused_for_a_readable_key_and_for_a_garbage_key() {
    let keys = TempDir::new("dkim-bad-keys");
    let open = rsa_key(keys.path(), "open", false);
    std::fs::set_permissions(&open.path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (ok, err) = start_with_key(&open.path);
    eprintln!("0644 key: {}", err.trim());
    assert!(!ok, "relay exited successfully");
    assert!(
        err.contains(&open.path.display().to_string()),
        "file not named: {err}"
    );
    assert!(err.contains("[[dkim]] entry 1"), "entry not named: {err}");
    assert!(err.contains("readable by group or others"), "{err}");

    let garbage = keys.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (ok, err) = start_with_key(&garbage);
    eprintln!("garbage key: {}", err.trim());
    assert!(!ok, "relay exited successfully");
    assert!(
        err.contains(&garbage.display().to_string()),
        "file not named: {err}"
    );
    assert!(err.contains("[[dkim]] entry 1"), "entry not named: {err}");
}

/// A relay config for check-identity (nothing is started from it).
fn identity_config(dir: &TempDir, dns: &Dnsmasq, source: &str, helo: &str, dkim: &str) -> PathBuf {
    let path = dir.join(&format!("{helo}.toml"));
    let t = format!(
        "hostname = \"relay.test\"\nspool_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:2525\"\n\
         [delivery]\nsource_ip = {source:?}\nhelo_name = {helo:?}\n[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n{dkim}",
        dir.join("spool").display().to_string(),
        dns.addr
    );
    std::fs::write(&path, t).expect("write config");
    path
}

/// Runs `smtp-lb relay check-identity --json`: (exit ok, check → (subject, pass)).
fn check_identity(config: &Path) -> (bool, Vec<(String, String, bool)>) {
    let out = Command::new(smtp_lb_bin())
        .args(["relay", "check-identity", "--json", "--config"])
        .arg(config)
        .output()
        .expect("run smtp-lb relay check-identity");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            (
                v["check"].as_str().expect("check").to_owned(),
                v["subject"].as_str().expect("subject").to_owned(),
                v["pass"].as_bool().expect("pass"),
            )
        })
        .collect();
    (out.status.success(), lines)
}

#[test]
fn check_identity_passes_a_good_setup_and_fails_exactly_the_broken_lines() {
    let keys = TempDir::new("dkim-identity");
    let good_key = rsa_key(keys.path(), "good", false);
    let published_for_bad = ed25519_key(keys.path(), "published");
    let bad_key = ed25519_key(keys.path(), "bad");
    let dns = Dnsmasq::start(&[
        "--local=/test/".to_owned(),
        // Good: forward-confirmed reverse DNS (host-record gives A and PTR),
        // SPF through include: + ip4:, the key in DNS, a DMARC record.
        "--host-record=out1.good.test,192.0.2.7".to_owned(),
        "--txt-record=good.test,v=spf1 include:_spf.good.test -all".to_owned(),
        "--txt-record=_spf.good.test,v=spf1 ip4:192.0.2.0/28 -all".to_owned(),
        dkim_txt("s1._domainkey.good.test", &good_key),
        "--txt-record=_dmarc.good.test,v=DMARC1; p=reject; rua=mailto:dmarc@good.test".to_owned(),
        // Bad: the HELO name resolves to the IP but the PTR names another
        // host; SPF covers other networks only; the DNS key is another key;
        // no DMARC record.
        "--address=/out1.bad.test/192.0.2.8".to_owned(),
        "--ptr-record=8.2.0.192.in-addr.arpa,mail.elsewhere.test".to_owned(),
        "--txt-record=bad.test,v=spf1 ip4:198.51.100.0/24 mx -all".to_owned(),
        dkim_txt("s1._domainkey.bad.test", &published_for_bad),
    ]);
    let dir = TempDir::new("identity-configs");

    let good = identity_config(
        &dir,
        &dns,
        "192.0.2.7",
        "out1.good.test",
        &dkim_toml("good.test", "s1", &good_key.path),
    );
    let (ok, lines) = check_identity(&good);
    let kinds: Vec<&str> = lines.iter().map(|(c, _, _)| c.as_str()).collect();
    assert_eq!(kinds, ["ptr", "a", "spf", "dkim", "dmarc"]);
    assert!(lines.iter().all(|(_, _, pass)| *pass), "{lines:?}");
    assert!(ok, "exit status not 0 for an all-good setup");

    let bad = identity_config(
        &dir,
        &dns,
        "192.0.2.8",
        "out1.bad.test",
        &dkim_toml("bad.test", "s1", &bad_key.path),
    );
    let (ok, lines) = check_identity(&bad);
    let verdicts: Vec<(&str, bool)> = lines.iter().map(|(c, _, p)| (c.as_str(), *p)).collect();
    assert_eq!(
        verdicts,
        [
            ("ptr", false),
            ("a", true),
            ("spf", false),
            ("dkim", false),
            ("dmarc", false)
        ]
    );
    assert!(!ok, "exit status 0 although checks failed");
}
