//! Hostile and broken clients: each input gets the right reply or a
//! disconnect, nothing malformed is delivered, and the daemon keeps serving
//! other clients (checked after every case with a clean transaction).
use std::{
    fmt::Write as _,
    io::Write,
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use smtp_lb_tests::{
    relay::{Relay, RelayConfig},
    sink::ScriptSink,
    smtp::RawSmtp,
    tmp::{TempDir, wait_for},
};

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    sink: ScriptSink,
    relay: Relay,
}

fn fixture(tweak: impl FnOnce(&mut RelayConfig)) -> Fixture {
    let sink = ScriptSink::start();
    let mut cfg = RelayConfig {
        routes: vec![("*".into(), sink.addr.to_string())],
        ..RelayConfig::default()
    };
    tweak(&mut cfg);
    let relay = Relay::start(&cfg);
    Fixture { sink, relay }
}

impl Fixture {
    fn session(&self) -> RawSmtp {
        let mut c = RawSmtp::connect(self.relay.smtp);
        assert_eq!(c.cmd("EHLO client.test").code, 250);
        c
    }

    /// A clean transaction on a fresh connection still works, and is delivered.
    fn still_serving(&self, tag: &str) {
        let mut c = self.session();
        let subject = format!("still serving {tag}");
        let r = c.transaction(
            "s@src.test",
            &["r@dst.test"],
            format!("Subject: {subject}\r\n\r\nok\r\n.\r\n").as_bytes(),
        );
        assert_eq!(r.code, 250, "{r:?}");
        wait_for("the clean message", WAIT, || {
            self.sink
                .received()
                .into_iter()
                .find(|m| m.data.contains(&subject))
        });
    }

    /// Sends DATA with `data` (which must end the data itself) and returns the final reply.
    fn data(&self, data: &[u8]) -> (RawSmtp, u16, String) {
        let mut c = self.session();
        assert_eq!(c.cmd("MAIL FROM:<s@src.test>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<r@dst.test>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(data);
        let r = c.reply().expect("reply to data");
        (c, r.code, r.text)
    }

    fn delivered_containing(&self, needle: &str) -> usize {
        self.sink
            .received()
            .iter()
            .filter(|m| m.data.contains(needle))
            .count()
    }
}

#[test]
fn bare_lf_in_data_is_refused() {
    let f = fixture(|_| {});
    let (_c, code, text) = f.data(b"Subject: bare-lf\r\n\r\nline\nmore\r\n.\r\n");
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("5.6.0") && text.contains("bare"), "{text}");
    f.still_serving("bare lf");
    assert_eq!(f.delivered_containing("bare-lf"), 0);
}

#[test]
fn bare_cr_in_data_is_refused() {
    let f = fixture(|_| {});
    let (_c, code, text) = f.data(b"Subject: bare-cr\r\n\r\nline\rmore\r\n.\r\n");
    assert_eq!(code, 554, "{text}");
    f.still_serving("bare cr");
    assert_eq!(f.delivered_containing("bare-cr"), 0);
}

#[test]
fn lf_dot_lf_does_not_end_data_so_nothing_is_smuggled() {
    let f = fixture(|_| {});
    // The classic smuggling payload: <LF>.<LF> then a second transaction.
    let payload = b"Subject: outer\r\n\r\nouter body\n.\nMAIL FROM:<evil@src.test>\r\nRCPT TO:<victim@dst.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n";
    let (mut c, code, text) = f.data(payload);
    assert_eq!(code, 554, "the whole thing is one refused message: {text}");
    // No further replies are pending: the "smuggled" commands were data.
    assert_eq!(c.cmd("NOOP").code, 250);
    assert_eq!(c.cmd("QUIT").code, 221);
    f.still_serving("smuggling");
    assert_eq!(f.delivered_containing("smuggled"), 0);
    assert_eq!(f.delivered_containing("outer"), 0);
    assert_eq!(f.sink.attempts("victim@dst.test"), 0);
}

#[test]
fn text_line_over_1000_octets_is_refused_and_1000_is_accepted() {
    let f = fixture(|_| {});
    let ok_line = "a".repeat(998); // + CRLF = 1000
    let (_c, code, text) =
        f.data(format!("Subject: len-1000\r\n\r\n{ok_line}\r\n.\r\n").as_bytes());
    assert_eq!(code, 250, "{text}");
    let long_line = "b".repeat(999); // + CRLF = 1001
    let (_c, code, text) =
        f.data(format!("Subject: len-1001\r\n\r\n{long_line}\r\n.\r\n").as_bytes());
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("1000"), "{text}");
    f.still_serving("long line");
    assert_eq!(f.delivered_containing("len-1001"), 0);
    assert_eq!(f.delivered_containing("len-1000"), 1);
}

#[test]
fn command_line_over_512_octets_is_refused_and_session_continues() {
    let f = fixture(|_| {});
    let mut c = f.session();
    let long = format!("MAIL FROM:<{}@src.test>", "x".repeat(600));
    let r = c.cmd(&long);
    assert_eq!(r.code, 500, "{r:?}");
    assert!(r.text.contains("too long"), "{r:?}");
    assert_eq!(c.cmd("NOOP").code, 250, "the session goes on");
    assert_eq!(
        c.cmd("MAIL FROM:<s@src.test>").code,
        250,
        "and no transaction was started by the long line"
    );
    f.still_serving("long command");
}

#[test]
fn oversize_message_is_refused_by_size_and_by_content() {
    let f = fixture(|c| c.max_message_size = 10_000);
    let mut c = f.session();
    let ehlo = c.cmd("EHLO again.test");
    assert!(ehlo.text.contains("SIZE 10000"), "{ehlo:?}");
    let r = c.cmd("MAIL FROM:<s@src.test> SIZE=20000");
    assert_eq!(r.code, 552, "declared size over the limit: {r:?}");
    let body: String = std::iter::repeat_n(format!("{}\r\n", "y".repeat(98)), 200).collect(); // 20,000 bytes
    let (_c, code, text) = f.data(format!("Subject: too-big\r\n\r\n{body}.\r\n").as_bytes());
    assert_eq!(code, 552, "{text}");
    assert!(text.contains("5.3.4"), "{text}");
    f.still_serving("oversize");
    assert_eq!(f.delivered_containing("too-big"), 0);
}

#[test]
fn two_hundred_pipelined_commands_in_one_write_get_two_hundred_replies() {
    let f = fixture(|_| {});
    let mut c = f.session();
    let mut batch = String::from("MAIL FROM:<s@src.test>\r\n");
    for i in 0..198 {
        let _ = write!(batch, "RCPT TO:<r{i}@dst.test>\r\n");
    }
    batch.push_str("DATA\r\n");
    c.send(batch.as_bytes());
    let mut codes = Vec::new();
    for _ in 0..200 {
        codes.push(c.reply().expect("a reply for every pipelined command").code);
    }
    assert!(codes[..199].iter().all(|&c| c == 250), "{codes:?}");
    assert_eq!(codes[199], 354);
    c.send(b"Subject: pipelined-200\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().unwrap().code, 250);
    let m = wait_for("the pipelined message", WAIT, || {
        f.sink
            .received()
            .into_iter()
            .find(|m| m.data.contains("pipelined-200"))
    });
    assert_eq!(m.rcpts.len(), 198);
    f.still_serving("pipelining");
}

#[test]
fn client_that_never_reads_is_dropped_and_others_are_served() {
    let f = fixture(|c| c.write_timeout = "1s".into());
    let mut stuck = TcpStream::connect(f.relay.smtp).unwrap();
    stuck
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Keep sending commands and never read a reply: once the socket buffers
    // are full the relay's writes block, it gives up after its write timeout
    // and closes, and our writes start failing.
    let writer = std::thread::spawn(move || {
        let chunk = "NOOP\r\n".repeat(10_000);
        let started = Instant::now();
        while started.elapsed() < Duration::from_mins(1) {
            if let Err(e) = stuck.write_all(chunk.as_bytes()) {
                return Some((e, started.elapsed()));
            }
        }
        None
    });
    // Meanwhile another client is served.
    let started = Instant::now();
    f.still_serving("while one client never reads");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (err, after) = writer
        .join()
        .unwrap()
        .expect("the relay must drop a client that never reads");
    eprintln!("non-reading client cut off after {after:?}: {err}");
    wait_for("the stuck session to be gone", WAIT, || {
        (f.relay.metric("smtp_lb_relay_ingress_connections_open") == 0).then_some(())
    });
    assert!(
        f.relay.stderr().contains("timed out") || f.relay.stderr().contains("write"),
        "{}",
        f.relay.stderr()
    );
}

#[test]
fn starttls_with_pipelined_plaintext_is_refused_and_disconnected() {
    let f = fixture(|c| c.tls = true);
    let mut c = f.session();
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@src.test>\r\n");
    let r = c.reply().expect("reply to STARTTLS");
    assert_eq!(r.code, 554, "no TLS when plaintext follows STARTTLS: {r:?}");
    assert!(c.reply().is_none(), "the injected command gets no reply");
    assert!(c.closed(), "the relay hung up");
    f.still_serving("starttls injection");
}

#[test]
fn nul_bytes_are_refused_in_commands_and_data() {
    let f = fixture(|_| {});
    let mut c = f.session();
    c.send(b"NO\0OP\r\n");
    let r = c.reply().unwrap();
    assert_eq!(r.code, 500, "{r:?}");
    c.send(b"MAIL FROM:<s\0@src.test>\r\n");
    assert_eq!(c.reply().unwrap().code, 500);
    assert_eq!(c.cmd("NOOP").code, 250);
    let (_c, code, text) = f.data(b"Subject: nul-in-data\r\n\r\na\0b\r\n.\r\n");
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("NUL"), "{text}");
    f.still_serving("nul");
    assert_eq!(f.delivered_containing("nul-in-data"), 0);
}

#[test]
fn connection_limit_refuses_extra_clients_with_421() {
    let f = fixture(|c| c.max_connections = 3);
    let held: Vec<RawSmtp> = (0..3).map(|_| RawSmtp::connect(f.relay.smtp)).collect();
    let mut extra = TcpStream::connect(f.relay.smtp).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = std::io::Read::read(&mut extra, &mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("421 4.7.0"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(held);
    wait_for("slots to free", WAIT, || {
        (f.relay.metric("smtp_lb_relay_ingress_connections_open") == 0).then_some(())
    });
    f.still_serving("connection limit");
}

#[test]
fn idle_client_times_out_with_421() {
    let f = fixture(|c| c.command_timeout = "1s".into());
    let mut c = f.session();
    let r = c.reply().expect("a reply after the idle timeout");
    assert_eq!(r.code, 421, "{r:?}");
    assert!(c.closed());
    f.still_serving("idle timeout");
}

#[test]
fn open_relay_is_refused_for_unlisted_networks() {
    let f = fixture(|c| c.relay_networks = vec!["192.0.2.0/24".into()]);
    let mut c = f.session();
    assert_eq!(c.cmd("MAIL FROM:<s@src.test>").code, 250);
    let r = c.cmd("RCPT TO:<r@dst.test>");
    assert_eq!(r.code, 554, "{r:?}");
    assert!(r.text.contains("5.7.1"), "{r:?}");
}

/// Unmounts (lazily) on drop, after the relay using it is gone.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full spool (ENOSPC on a small tmpfs) answers 451, and recovers when space returns.
#[test]
fn unwritable_spool_answers_451_instead_of_accepting() {
    smtp_lb_tests::env::require_root();
    let tmp = TempDir::new("spool-tmpfs");
    let mnt = tmp.join("spool");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    let _unmount = Unmount(mnt.clone());
    // Deliveries fail (nothing listens), so the spool only fills.
    let f = fixture(|c| {
        c.spool_dir = Some(mnt.clone());
        c.routes = vec![("*".into(), "127.0.0.1:1".into())];
        c.retry_min = "1h".into();
        c.retry_max = "1h".into();
    });
    let body: String = std::iter::repeat_n(format!("{}\r\n", "f".repeat(98)), 400).collect(); // 40 kB
    let mut codes = Vec::new();
    for _ in 0..12 {
        let mut c = f.session();
        codes.push(
            c.transaction(
                "s@src.test",
                &["r@dst.test"],
                format!("Subject: fill\r\n\r\n{body}.\r\n").as_bytes(),
            )
            .code,
        );
    }
    assert!(codes.contains(&250), "{codes:?}");
    assert!(
        codes.contains(&451),
        "a full spool must answer 451: {codes:?}"
    );
    assert!(codes.iter().all(|c| *c == 250 || *c == 451), "{codes:?}");
    assert!(f.relay.metric("smtp_lb_relay_spool_write_errors_total") >= 1);
    // Still serving SMTP (NOOP), though it cannot accept mail while full.
    let mut c = f.session();
    assert_eq!(c.cmd("NOOP").code, 250);
}
