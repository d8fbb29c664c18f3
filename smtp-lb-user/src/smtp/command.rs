//! SMTP command grammar, the server side (RFC 5321 §4.1): the ingress
//! command parser, pure over bytes, unit- and property-tested without sockets.

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
pub const MAX_TEXT_LINE: usize = 1000;
/// RFC 5321 §4.5.3.1.3: a path is at most 256 octets.
pub const MAX_PATH: usize = 256;

/// One ESMTP command from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// `MAIL FROM:<path> params`; the empty string is the null sender `<>`.
    Mail {
        from: String,
        params: Vec<Param>,
    },
    Rcpt {
        to: String,
        params: Vec<Param>,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    /// `AUTH mechanism [initial-response]`.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

/// An ESMTP parameter (`SIZE=1000`, `BODY=8BITMIME`); the keyword is upper-cased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub keyword: String,
    pub value: Option<String>,
}

/// Why a command line was refused; each maps to one reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("500 5.5.2 Error: command not recognized")]
    Unknown,
    #[error("501 5.5.4 Syntax error in parameters or arguments")]
    Syntax,
    #[error("501 5.1.7 Bad address syntax")]
    BadAddress,
    #[error("500 5.5.2 Error: NUL or non-ASCII control character in command")]
    Control,
}

impl CommandError {
    /// The full reply text for this error, without CRLF.
    pub fn reply(&self) -> String {
        self.to_string()
    }
}

/// Parses one command line, without its CRLF.
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    if line
        .iter()
        .any(|&b| b == 0 || b == b'\r' || b == b'\n' || b >= 0x80)
    {
        return Err(CommandError::Control);
    }
    // Checked above: only ASCII.
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Control)?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], line[i + 1..].trim()),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |c: Command| {
        if rest.is_empty() {
            Ok(c)
        } else {
            Err(CommandError::Syntax)
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            if rest.is_empty() || rest.contains(' ') {
                return Err(CommandError::Syntax);
            }
            Ok(if verb == "EHLO" {
                Command::Ehlo(rest.to_owned())
            } else {
                Command::Helo(rest.to_owned())
            })
        }
        "MAIL" => {
            let (from, params) = parse_path_args(rest, "FROM:")?;
            Ok(Command::Mail { from, params })
        }
        "RCPT" => {
            let (to, params) = parse_path_args(rest, "TO:")?;
            if to.is_empty() {
                return Err(CommandError::BadAddress);
            }
            Ok(Command::Rcpt { to, params })
        }
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        "NOOP" => Ok(Command::Noop),
        "VRFY" => Ok(Command::Vrfy),
        "HELP" => Ok(Command::Help),
        "AUTH" => {
            let mut it = rest.split(' ').filter(|s| !s.is_empty());
            let mechanism = it.next().ok_or(CommandError::Syntax)?.to_ascii_uppercase();
            let initial = it.next().map(str::to_owned);
            if it.next().is_some() {
                return Err(CommandError::Syntax);
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(CommandError::Unknown),
    }
}

/// `FROM:<path> params` (a space after the colon is tolerated, as Postfix does).
fn parse_path_args(rest: &str, prefix: &str) -> Result<(String, Vec<Param>), CommandError> {
    if rest.len() < prefix.len() || !rest[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return Err(CommandError::Syntax);
    }
    let rest = rest[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<').ok_or(CommandError::BadAddress)?;
    let end = rest.find('>').ok_or(CommandError::BadAddress)?;
    let path = &rest[..end];
    let after = &rest[end + 1..];
    if !after.is_empty() && !after.starts_with(' ') {
        return Err(CommandError::Syntax);
    }
    // RFC 5321 §4.1.2: an optional source route "@a,@b:" is accepted and ignored.
    let path = match path.find(':') {
        Some(i) if path.starts_with('@') => &path[i + 1..],
        _ => path,
    };
    // A mailbox starts with its local part; one that still starts with '@'
    // would be read as a source route by the next hop, to another mailbox.
    if path.len() > MAX_PATH || path.starts_with('@') || (!path.is_empty() && !valid_mailbox(path))
    {
        return Err(CommandError::BadAddress);
    }
    let params = after
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Param {
                keyword: k.to_ascii_uppercase(),
                value: Some(v.to_owned()),
            },
            None => Param {
                keyword: p.to_ascii_uppercase(),
                value: None,
            },
        })
        .collect();
    Ok((path.to_owned(), params))
}

/// `local@domain` with printable, space-free characters; `postmaster` alone is
/// allowed for RCPT (RFC 5321 §4.5.1).
fn valid_mailbox(path: &str) -> bool {
    if path
        .bytes()
        .any(|b| b <= b' ' || b == b'<' || b == b'>' || b == 0x7f)
    {
        return false;
    }
    if path.eq_ignore_ascii_case("postmaster") {
        return true;
    }
    match path.rsplit_once('@') {
        Some((local, domain)) => !local.is_empty() && valid_domain(domain),
        None => false,
    }
}

fn valid_domain(domain: &str) -> bool {
    if let Some(lit) = domain.strip_prefix('[') {
        return lit.ends_with(']');
    }
    !domain.is_empty()
        && domain.len() <= 255
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The domain of an address, lower-cased (the routing key).
pub fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map_or_else(String::new, |(_, d)| d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn mail_from_with_params() {
        let c = parse_command(b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME").unwrap();
        assert_eq!(
            c,
            Command::Mail {
                from: "a@b.example".into(),
                params: vec![
                    Param {
                        keyword: "SIZE".into(),
                        value: Some("100".into())
                    },
                    Param {
                        keyword: "BODY".into(),
                        value: Some("8BITMIME".into())
                    }
                ]
            }
        );
    }

    #[test]
    fn null_sender_is_empty_and_null_rcpt_is_refused() {
        assert_eq!(
            parse_command(b"mail from: <>").unwrap(),
            Command::Mail {
                from: String::new(),
                params: vec![]
            }
        );
        assert_eq!(parse_command(b"RCPT TO:<>"), Err(CommandError::BadAddress));
    }

    #[test]
    fn nul_and_bare_cr_are_control_errors() {
        assert_eq!(parse_command(b"NOOP\0"), Err(CommandError::Control));
        assert_eq!(parse_command(b"NOOP\rMAIL"), Err(CommandError::Control));
    }

    #[test]
    fn source_route_is_ignored() {
        let c = parse_command(b"RCPT TO:<@relay.example:u@d.example>").unwrap();
        assert!(matches!(c, Command::Rcpt { to, .. } if to == "u@d.example"));
    }

    /// Found by the `smtp_command` fuzz target (round trip): after its route
    /// was stripped, `@:s@e.s@e.m` was accepted, and the next hop would strip
    /// `@:` again and deliver to `s@e.s@e.m`, a mailbox the relay never saw.
    #[test]
    fn a_mailbox_left_starting_with_at_after_the_route_is_refused() {
        assert_eq!(
            parse_command(b"RCPT TO:<@:@:s@e.s@e.m>"),
            Err(CommandError::BadAddress)
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<@a.example:@b.example:u@d.example>"),
            Err(CommandError::BadAddress)
        );
    }

    proptest! {
        // PROPTEST_CASES raises the count for a longer soak.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000),
            ..ProptestConfig::default()
        })]

        /// The command parser never panics, and what it accepts is ASCII without controls.
        #[test]
        fn command_parser_total(line in proptest::collection::vec(any::<u8>(), 0..600)) {
            if parse_command(&line).is_ok() {
                prop_assert!(line.iter().all(|&b| b != 0 && b != b'\r' && b != b'\n' && b < 0x80));
            }
        }

        /// Structured commands survive a round trip through their wire form.
        #[test]
        fn mail_roundtrip(local in "[a-z0-9.+_-]{1,20}", domain in "[a-z0-9-]{1,20}(\\.[a-z]{2,6}){1,3}", size in 0u64..1_000_000_000) {
            let line = format!("MAIL FROM:<{local}@{domain}> SIZE={size}");
            let c = parse_command(line.as_bytes()).unwrap();
            prop_assert_eq!(c, Command::Mail { from: format!("{local}@{domain}"), params: vec![Param { keyword: "SIZE".into(), value: Some(size.to_string()) }] });
        }
    }
}
