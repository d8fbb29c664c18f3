//! Ingress against clients that hold on to what they get: a TLS client
//! that pipelines and never reads, many connections from one address,
//! sessions that never end; twenty large messages at once (memory per
//! session is bounded); and the implicit-TLS (465) listener with swaks.
//! Real processes: the relay binary and `swaks`; the client that never
//! reads is written here with rustls (`openssl s_client` stops sending
//! once its own output backs up, so it never blocks the relay's writes).
use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;

use smtp_lb_tests::{
    fake_mx::FakeMx,
    relay::{Relay, RelayConfig},
    smtp::{RawSmtp, smtp_source_with, swaks},
    tmp::wait_for,
};

const WAIT: Duration = Duration::from_secs(20);

/// Connects and returns the first reply line the server sends (empty on EOF or timeout).
fn first_line(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()
}

/// A client that says EHLO, STARTTLS, then pipelines `NOOP`s over TLS
/// forever and never reads a byte of the replies. Its thread ends when the
/// relay drops the connection; `gone` tells when.
struct NeverReads {
    gone: Arc<AtomicBool>,
}

impl NeverReads {
    fn start(addr: std::net::SocketAddr) -> Self {
        let mut c = RawSmtp::connect(addr);
        assert_eq!(c.cmd("EHLO hostile.test").code, 250);
        assert_eq!(c.cmd("STARTTLS").code, 220);
        let mut sock = c.stream;
        let mut tls = rustls::ClientConnection::new(
            smtp_lb_user::tls::opportunistic_tls(),
            ServerName::try_from("relay.test").expect("name"),
        )
        .expect("TLS client");
        while tls.is_handshaking() {
            tls.complete_io(&mut sock).expect("TLS handshake");
        }
        let gone = Arc::new(AtomicBool::new(false));
        let flag = gone.clone();
        std::thread::spawn(move || {
            let block = "NOOP\r\n".repeat(10_000);
            // Only ever writes: no read_tls, so the replies pile up.
            loop {
                if tls.writer().write_all(block.as_bytes()).is_err() {
                    break;
                }
                let mut failed = false;
                while tls.wants_write() {
                    if tls.write_tls(&mut sock).is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break;
                }
            }
            flag.store(true, Ordering::Relaxed);
        });
        Self { gone }
    }

    fn alive(&self) -> bool {
        !self.gone.load(Ordering::Relaxed)
    }
}

#[test]
fn tls_client_that_pipelines_and_never_reads_loses_its_slot_within_the_write_timeout() {
    let sink = FakeMx::start();
    let relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), sink.addr.to_string())],
        tls: true,
        max_connections: 2,
        write_timeout: "2s".into(),
        ..RelayConfig::default()
    });
    let hostile = [NeverReads::start(relay.smtp), NeverReads::start(relay.smtp)];
    // Both slots are taken: a third client is turned away.
    let full = wait_for("both slots taken", WAIT, || {
        let l = first_line(relay.smtp);
        l.starts_with("421").then_some(Instant::now())
    });
    assert!(
        hostile.iter().all(NeverReads::alive),
        "the hostile clients hold their connections"
    );
    // The writes to the two clients block, time out after 2 s, and the
    // slots are freed without waiting on a TLS goodbye they would never read.
    let served = wait_for("a slot freed", WAIT, || {
        let l = first_line(relay.smtp);
        l.starts_with("220").then_some(Instant::now())
    });
    let freed_after = served - full;
    println!("slot freed {freed_after:?} after the relay was full (write timeout 2s)");
    assert!(
        freed_after < Duration::from_millis(3500),
        "slot freed after {freed_after:?}"
    );
    // It was the relay that ended them, on its write timeout.
    wait_for("both sessions ended on the write timeout", WAIT, || {
        let n = relay
            .stderr()
            .lines()
            .filter(|l| l.contains("session timed out") && l.contains("\"write\""))
            .count();
        (n == 2).then_some(())
    });
    // With max_connections = 2, a new client is served in full.
    let mut c = RawSmtp::connect(relay.smtp);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    let r = c.transaction(
        "s@src.test",
        &["r@dst.test"],
        b"Subject: after the hostile clients\r\n\r\nok\r\n.\r\n",
    );
    assert_eq!(r.code, 250, "{r:?}");
    wait_for("the message delivered", WAIT, || {
        sink.received()
            .into_iter()
            .find(|m| m.data.contains("after the hostile clients"))
    });
}

#[test]
fn one_address_gets_at_most_its_share_of_connections() {
    let sink = FakeMx::start();
    let relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), sink.addr.to_string())],
        extra_toml: "[limits]\nmax_connections_per_client = 2\n".into(),
        ..RelayConfig::default()
    });
    let a = RawSmtp::connect(relay.smtp);
    let _b = RawSmtp::connect(relay.smtp);
    let third = first_line(relay.smtp);
    assert!(
        third.starts_with("421 4.7.0") && third.contains("too many connections from 127.0.0.1"),
        "{third}"
    );
    // Another address is not affected.
    let (ok, t) = swaks(&[
        "--server",
        &relay.smtp.to_string(),
        "--local-interface",
        "127.0.0.2",
        "--from",
        "a@src.test",
        "--to",
        "r@dst.test",
        "--h-Subject",
        "from another address",
    ]);
    assert!(ok && t.contains("250 2.0.0 Ok: queued as"), "{t}");
    // A closed connection gives its slot back.
    drop(a);
    wait_for("the address's slot back", WAIT, || {
        first_line(relay.smtp).starts_with("220").then_some(())
    });
    wait_for("the other address's message delivered", WAIT, || {
        sink.received()
            .into_iter()
            .find(|m| m.data.contains("from another address"))
    });
}

#[test]
fn a_session_longer_than_the_maximum_is_ended_with_421() {
    let relay = Relay::start(&RelayConfig {
        extra_toml: "[timeouts]\nsession = \"2s\"\n".into(),
        ..RelayConfig::default()
    });
    let start = Instant::now();
    let mut c = RawSmtp::connect(relay.smtp);
    assert_eq!(c.cmd("EHLO client.test").code, 250);
    // A busy client: a command every 300 ms, never idle long enough for
    // the command timeout (30 s).
    let last = loop {
        std::thread::sleep(Duration::from_millis(300));
        let r = c.cmd("NOOP");
        if r.code != 250 {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never ended");
    };
    let after = start.elapsed();
    assert_eq!(last.code, 421, "{last:?}");
    assert!(last.text.contains("maximum session time"), "{last:?}");
    assert!(c.closed(), "closed after the 421");
    println!("session ended after {after:?} (maximum 2s)");
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_secs(4),
        "{after:?}"
    );
}

#[test]
fn implicit_tls_listener_takes_mail_from_swaks_tlsc() {
    let sink = FakeMx::start();
    let relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), sink.addr.to_string())],
        implicit_tls: true,
        ..RelayConfig::default()
    });
    let port465 = relay.implicit.expect("implicit listener");
    let (ok, t) = swaks(&[
        "--tlsc",
        "--server",
        &port465.to_string(),
        "--from",
        "a@src.test",
        "--to",
        "r@dst.test",
        "--h-Subject",
        "over implicit TLS",
    ]);
    assert!(ok, "swaks --tlsc: {t}");
    assert!(t.contains("250 2.0.0 Ok: queued as"), "{t}");
    // TLS from the first byte: no STARTTLS offered inside it.
    assert!(!t.contains("250-STARTTLS"), "{t}");
    let m = wait_for("the message delivered", WAIT, || {
        sink.received()
            .into_iter()
            .find(|m| m.data.contains("over implicit TLS"))
    });
    assert!(m.data.contains("with ESMTPS id"), "{}", m.data);
    // A plaintext client gets no SMTP greeting on that port.
    let plain = first_line(port465);
    assert!(!plain.starts_with("220"), "{plain}");
}

/// The relay's peak resident memory so far (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[test]
fn twenty_concurrent_20_mib_messages_keep_the_relay_under_200_mib() {
    // Nothing listens at the destination: every message is deferred at
    // connect, so what is measured is ingress and the spool.
    let closed = smtp_lb_tests::tmp::free_port();
    let relay = Relay::start(&RelayConfig {
        routes: vec![("*".into(), format!("127.0.0.1:{closed}"))],
        max_message_size: 25 * 1024 * 1024,
        retry_min: "1h".into(),
        retry_max: "1h".into(),
        ..RelayConfig::default()
    });
    let before = peak_rss(relay.pid());
    let started = Instant::now();
    let length = (20 * 1024 * 1024).to_string();
    smtp_source_with(relay.smtp, "r@dst.test", 20, 20, &["-l", &length]);
    let took = started.elapsed();
    relay.wait_log_count("deferred", 20, WAIT);
    let peak = peak_rss(relay.pid());
    let spooled: u64 = std::fs::read_dir(relay.spool_dir())
        .expect("spool dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
        .sum();
    assert!(
        spooled >= 400 * 1024 * 1024,
        "all 400 MiB spooled: {spooled}"
    );
    println!(
        "20 × 20 MiB accepted in {took:?}; relay RSS peak {} MiB (at start {} MiB)",
        peak >> 20,
        before >> 20
    );
    assert!(peak < 200 * 1024 * 1024, "RSS peak {} MiB", peak >> 20);
}
