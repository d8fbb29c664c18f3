//! The ingress command parser (`smtp::command::parse_command`) on any line:
//! it never panics, accepts only what its grammar allows, and what it
//! accepts survives a round trip through its canonical wire form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtp_lb_user::smtp::command::{Command, MAX_PATH, Param, parse_command};

fuzz_target!(|line: &[u8]| {
    let Ok(cmd) = parse_command(line) else {
        return;
    };
    assert!(
        line.iter()
            .all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80),
        "accepted a line with a control or non-ASCII octet: {line:?}"
    );
    match &cmd {
        Command::Ehlo(name) | Command::Helo(name) => {
            assert!(!name.is_empty() && !name.contains(' '), "{cmd:?}");
        }
        Command::Mail { from: path, params } | Command::Rcpt { to: path, params } => {
            assert!(path.len() <= MAX_PATH, "{cmd:?}");
            assert!(
                !path
                    .bytes()
                    .any(|b| b <= b' ' || b == b'<' || b == b'>' || b == 0x7f),
                "{cmd:?}"
            );
            assert!(
                !matches!(cmd, Command::Rcpt { .. }) || !path.is_empty(),
                "{cmd:?}"
            );
            for p in params {
                assert!(!p.keyword.contains(' '), "{cmd:?}");
                assert_eq!(p.keyword, p.keyword.to_ascii_uppercase());
            }
        }
        Command::Auth { mechanism, .. } => {
            assert!(!mechanism.is_empty(), "{cmd:?}");
        }
        _ => {}
    }
    let wire = render(&cmd);
    assert_eq!(
        parse_command(wire.as_bytes()).as_ref(),
        Ok(&cmd),
        "{line:?} parsed as {cmd:?}, whose wire form {wire:?} does not parse back"
    );
});

/// The canonical wire form of a command, without CRLF.
fn render(cmd: &Command) -> String {
    let params = |ps: &[Param]| {
        ps.iter()
            .map(|p| match &p.value {
                Some(v) => format!(" {}={v}", p.keyword),
                None => format!(" {}", p.keyword),
            })
            .collect::<String>()
    };
    match cmd {
        Command::Ehlo(n) => format!("EHLO {n}"),
        Command::Helo(n) => format!("HELO {n}"),
        Command::Mail { from, params: ps } => format!("MAIL FROM:<{from}>{}", params(ps)),
        Command::Rcpt { to, params: ps } => format!("RCPT TO:<{to}>{}", params(ps)),
        Command::Data => "DATA".into(),
        Command::Rset => "RSET".into(),
        Command::Noop => "NOOP".into(),
        Command::Quit => "QUIT".into(),
        Command::Vrfy => "VRFY".into(),
        Command::Help => "HELP".into(),
        Command::StartTls => "STARTTLS".into(),
        Command::Auth {
            mechanism,
            initial: None,
        } => format!("AUTH {mechanism}"),
        Command::Auth {
            mechanism,
            initial: Some(i),
        } => format!("AUTH {mechanism} {i}"),
    }
}
