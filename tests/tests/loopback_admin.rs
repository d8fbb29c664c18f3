//! The relay's admin API and metrics listener, on the real daemon: the
//! admin API needs the token and bounds what a client can send (401, 400,
//! 413), the metrics listener answers without one, `/readyz` follows the
//! relay's life, and a non-loopback admin address needs an explicit opt-in.
//! (The balancer's admin API gets the same checks in `privileged_lb_daemon`.)
use std::{process::Command, time::Duration};

use smtp_lb_tests::{
    env::smtp_lb_bin,
    relay::{Relay, RelayConfig},
    smtp::RawSmtp,
    tmp::{TempDir, free_port, raw_http, wait_for},
};

fn status(answer: &str) -> &str {
    answer.split_whitespace().nth(1).unwrap_or("none")
}

#[test]
fn the_relay_admin_api_needs_the_token_and_refuses_bad_requests() {
    let relay = Relay::start(&RelayConfig::default());
    let token = std::fs::read_to_string(relay.admin_token_file()).unwrap();
    let mode = std::fs::metadata(relay.admin_token_file()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600,
        "the token is private"
    );
    let authorized = format!("GET /queue HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n");
    let chunked = format!(
        "POST /reload HTTP/1.1\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        100_000,
        "x".repeat(100_000)
    );
    for (request, expected) in [
        (&b"GET /queue HTTP/1.1\r\n\r\n"[..], "401"),
        (&b"GET /metrics HTTP/1.1\r\n\r\n"[..], "401"),
        (
            b"POST /queue/retry HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n",
            "401",
        ),
        (b"garbage\r\n\r\n", "400"),
        (b"\x00\x01\x02\r\n\r\n", "400"),
        (
            b"GET /queue HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            "413",
        ),
        (chunked.as_bytes(), "413"),
        (authorized.as_bytes(), "200"),
    ] {
        let answer = raw_http(relay.admin, request);
        assert_eq!(
            status(&answer),
            expected,
            "{:?} → {answer}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        );
    }
    // A client that connects and says nothing does not block others.
    let _idle = std::net::TcpStream::connect(relay.admin).unwrap();
    let (code, body) = relay.admin("GET", "/queue");
    assert_eq!(code, 200, "{body}");
    let (code, body) = relay.admin("GET", "/queue/not-hex");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not a message id"), "{body}");
    let (code, body) = relay.admin("GET", "/queue/00000000000000ff");
    assert_eq!(code, 404, "{body}");
}

#[test]
fn the_metrics_listener_answers_without_a_token_and_readyz_follows_the_relay() {
    let relay = Relay::start(&RelayConfig::default());
    let get = |path: &str| {
        raw_http(
            relay.metrics,
            format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(),
        )
    };
    let page = get("/metrics");
    assert_eq!(status(&page), "200", "{page}");
    assert!(
        page.contains("smtp_lb_relay_build_info{version=")
            && page.contains("smtp_lb_relay_queue_messages 0")
            && page.ends_with("# EOF\n"),
        "{page}"
    );
    assert_eq!(status(&get("/healthz")), "200");
    let ready = get("/readyz");
    assert_eq!(status(&ready), "200", "{ready}");
    // Only the read-only routes: the queue API is not there.
    assert_eq!(status(&get("/queue")), "404");
    // A stop with a transaction open: not ready while it finishes.
    let mut smtp = RawSmtp::connect(relay.smtp);
    assert_eq!(smtp.cmd("EHLO client.test").code, 250);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(libc::pid_t::try_from(relay.pid()).unwrap(), libc::SIGTERM) };
    let answer = wait_for("/readyz to say 503", Duration::from_secs(5), || {
        let a = get("/readyz");
        (status(&a) == "503").then_some(a)
    });
    assert!(answer.contains("shutting down"), "{answer}");
    assert_eq!(status(&get("/healthz")), "200", "alive while draining");
}

#[test]
fn a_non_loopback_admin_address_needs_an_explicit_opt_in() {
    let dir = TempDir::new("relay-admin-remote");
    // Refused before anything binds (the opt-in itself is a unit test of the config).
    let path = dir.join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "spool_dir = {:?}\nadmin = \"0.0.0.0:{}\"\n[[listener]]\naddress = \"127.0.0.1:{}\"\n",
            dir.join("spool").display().to_string(),
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let out = Command::new(smtp_lb_bin())
        .args(["relay", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {err}");
    assert!(
        err.contains("admin: 0.0.0.0:") && err.contains("admin_allow_remote"),
        "{err}"
    );
}
