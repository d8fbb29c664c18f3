//! SMTP health probes against real and scripted relays on 127.0.0.1: a
//! relay passes only when it greets with 220 and accepts EHLO; 421/554
//! greetings, silence, refusals and rejected EHLO each fail at the right
//! phase, within that phase's timeout. Each dialect against a real peer:
//! plain SMTP, STARTTLS, and implicit TLS (a real Postfix with
//! `smtpd_tls_wrappermode`, as on 465), and implicit TLS against a port
//! whose TLS is broken.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use smtp_lb_tests::postfix::{At, Postfix};
use smtp_lb_user::health::{HealthCheckConfig, Phase, ProbeError, Tls, probe};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Postfix's smtp-sink on a free port; killed on drop.
struct Sink(Child, SocketAddr);

impl Sink {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody", &format!("127.0.0.1:{port}"), "16"])
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "smtp-sink did not start");
            thread::sleep(Duration::from_millis(20));
        }
        Self(child, addr)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relay that says `greeting`, then answers every command with `reply`
/// (`None`: stays silent), on its own thread.
fn scripted(greeting: Option<&'static str>, reply: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let Some(greeting) = greeting else {
                    thread::sleep(Duration::from_secs(10));
                    return;
                };
                let _ = conn.write_all(greeting.as_bytes());
                let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
                while let Some(Ok(_)) = lines.next() {
                    if conn.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn fast() -> HealthCheckConfig {
    let mut cfg = HealthCheckConfig::default();
    cfg.timeouts.greeting = Duration::from_millis(300);
    cfg.timeouts.ehlo = Duration::from_millis(300);
    cfg
}

#[tokio::test]
async fn a_real_postfix_sink_passes() {
    let sink = Sink::start();
    let took = probe(sink.1, Tls::None, &fast())
        .await
        .expect("smtp-sink is a healthy relay");
    assert!(took < Duration::from_secs(1));
}

#[tokio::test]
async fn greeting_421_or_554_means_down() {
    for (greeting, code) in [
        ("421 4.3.2 relay1 shutting down\r\n", 421),
        ("554 5.3.2 no service\r\n", 554),
    ] {
        let addr = scripted(Some(greeting), "250 ok\r\n");
        match probe(addr, Tls::None, &fast()).await {
            Err(ProbeError::Rejected {
                phase: Phase::Greeting,
                code: c,
                ..
            }) => assert_eq!(c, code),
            other => panic!("greeting {greeting:?}: expected a rejected greeting, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_relay_that_never_greets_fails_within_the_greeting_timeout() {
    let addr = scripted(None, "");
    let started = Instant::now();
    let err = probe(addr, Tls::None, &fast()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::TimedOut {
                phase: Phase::Greeting,
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn nothing_listening_fails_at_connect() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let err = probe(addr, Tls::None, &fast()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::Io {
                phase: Phase::Connect,
                ..
            }
        ),
        "got {err:?}"
    );
}

#[tokio::test]
async fn a_rejected_ehlo_means_down() {
    let addr = scripted(Some("220 relay ESMTP\r\n"), "554 5.7.1 go away\r\n");
    let err = probe(addr, Tls::None, &fast()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::Rejected {
                phase: Phase::Ehlo,
                code: 554,
                ..
            }
        ),
        "got {err:?}"
    );
}

#[tokio::test]
async fn garbage_instead_of_a_reply_is_malformed_not_a_crash() {
    let addr = scripted(Some("HTTP/1.1 400 Bad Request\r\n"), "");
    let err = probe(addr, Tls::None, &fast()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::Malformed {
                phase: Phase::Greeting,
                ..
            }
        ),
        "got {err:?}"
    );
}

#[tokio::test]
async fn starttls_required_but_not_offered_fails() {
    let sink = Sink::start();
    let err = probe(sink.1, Tls::Starttls, &fast()).await.unwrap_err();
    assert!(matches!(err, ProbeError::NoStarttls), "got {err:?}");
}

#[tokio::test]
async fn starttls_is_negotiated_with_a_real_tls_relay() {
    // The project's own relay with a generated certificate offers STARTTLS;
    // the probe upgrades, says EHLO again over TLS and passes.
    let relay = smtp_lb_tests::relay::Relay::start(&smtp_lb_tests::relay::RelayConfig {
        tls: true,
        ..Default::default()
    });
    let mut cfg = fast();
    cfg.timeouts.starttls = Duration::from_secs(3);
    let took = probe(relay.smtp, Tls::Starttls, &cfg)
        .await
        .expect("STARTTLS health check against a TLS relay");
    assert!(took < Duration::from_secs(3));
    // Without TLS offered, the same check fails at STARTTLS (see above);
    // with it and without asking, the plain check passes too.
    probe(relay.smtp, Tls::None, &fast())
        .await
        .expect("plain check");
}

#[tokio::test]
async fn implicit_tls_passes_against_a_real_postfix_in_wrapper_mode() {
    let dir = smtp_lb_tests::tmp::TempDir::new("probe-465");
    let at = At {
        listen: ([127, 0, 0, 1], smtp_lb_tests::tmp::free_port()).into(),
        netns: None,
    };
    let postfix = Postfix::destination_implicit_tls("lab.example", dir.path(), at);
    let mut cfg = fast();
    cfg.timeouts.handshake = Duration::from_secs(3);
    let took = probe(postfix.addr, Tls::Implicit, &cfg)
        .await
        .expect("implicit TLS check against Postfix with smtpd_tls_wrappermode");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // The same port spoken to in plain SMTP: Postfix waits for a
    // ClientHello and never greets, so the plain check times out.
    let err = probe(postfix.addr, Tls::None, &fast()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::TimedOut {
                phase: Phase::Greeting,
                ..
            }
        ),
        "got {err:?}"
    );
}

#[tokio::test]
async fn implicit_tls_against_a_plain_smtp_port_fails_at_the_handshake() {
    // A 465 whose TLS is broken: the relay greets in clear text.
    let sink = Sink::start();
    let err = probe(sink.1, Tls::Implicit, &fast()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::Tls {
                phase: Phase::Handshake,
                ..
            }
        ),
        "got {err:?}"
    );
}

#[tokio::test]
async fn an_implicit_tls_port_that_never_answers_the_handshake_fails_within_its_timeout() {
    let addr = scripted(None, "");
    let mut cfg = fast();
    cfg.timeouts.handshake = Duration::from_millis(300);
    let started = Instant::now();
    let err = probe(addr, Tls::Implicit, &cfg).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProbeError::TimedOut {
                phase: Phase::Handshake,
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}
