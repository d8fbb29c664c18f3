//! SMTP reply grammar and the one reply reader (RFC 5321 §4.2; enhanced
//! status codes RFC 3463), shared by the relay's delivery client and the
//! balancer's health probe.
//!
//! [`ReplyReader`] is incremental: each line is parsed once, when its line
//! feed arrives, and the search for the next line feed resumes where the
//! last read stopped, so a peer that trickles a reply byte by byte costs
//! linear time. Its [`Limits`] bound what one reply may cost: the length of
//! a line, the number of lines and the text kept; bytes of finished lines
//! are dropped as the reply grows, so the buffer holds at most a line and
//! a read's worth.

use std::{fmt, io};

use tokio::io::{AsyncRead, AsyncReadExt};

/// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF;
/// real servers exceed it, so the client is lenient up to this.
pub const MAX_REPLY_LINE: usize = 4096;

/// A server reply: code, optional enhanced status code, and its text lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    /// Text of each line, without the code, separator, or enhanced code.
    pub lines: Vec<String>,
}

/// RFC 3463 `class.subject.detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl EnhancedCode {
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let class: u8 = it.next()?.parse().ok()?;
        let subject: u16 = it.next()?.parse().ok()?;
        let detail: u16 = it.next()?.parse().ok()?;
        if it.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some(Self {
            class,
            subject,
            detail,
        })
    }
}

impl Reply {
    /// A reply made locally (for errors that never reached a server).
    pub fn local(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: EnhancedCode::parse(enhanced),
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// All lines joined with a space.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        write!(f, " {}", self.text())
    }
}

/// Why bytes from a server are not a reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    #[error("reply line longer than {0} octets")]
    TooLong(usize),
    #[error("multi-line reply changed its code from {0} to {1}")]
    CodeChanged(u16, u16),
    #[error("reply longer than {0} lines")]
    TooManyLines(usize),
    #[error("reply text longer than {0} octets")]
    TooLarge(usize),
}

/// What one reply may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest line in octets, counting its CR but not its LF.
    pub max_line: usize,
    /// Most lines in one (multi-line) reply.
    pub max_lines: usize,
    /// Most octets of text kept for one reply (all its lines together).
    pub max_bytes: usize,
}

impl Limits {
    /// The delivery client: lenient on line length (real MXs exceed 512),
    /// bounded in lines and text (an EHLO reply has a few dozen short lines).
    pub const CLIENT: Self = Self {
        max_line: MAX_REPLY_LINE,
        max_lines: 1000,
        max_bytes: 64 * 1024,
    };
    /// The health probe: RFC 5321's 512 octets of text (plus CR), at most 100 lines.
    pub const PROBE: Self = Self {
        max_line: 514,
        max_lines: 100,
        max_bytes: 100 * 514,
    };
}

/// Why a reply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("connection closed by server")]
    Closed,
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

/// Reads replies from a byte stream, one line at a time (see the module docs).
#[derive(Debug)]
pub struct ReplyReader {
    limits: Limits,
    /// Bytes received and not yet part of a returned reply.
    buf: Vec<u8>,
    /// Where the current line starts in `buf`.
    line_start: usize,
    /// How far `buf` has been searched for the current line's feed.
    scanned: usize,
    /// The reply being assembled from the complete lines so far.
    code: Option<u16>,
    enhanced: Option<EnhancedCode>,
    lines: Vec<String>,
    /// Octets of text in `lines`.
    text_len: usize,
}

impl ReplyReader {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::with_capacity(4096),
            line_start: 0,
            scanned: 0,
            code: None,
            enhanced: None,
            lines: Vec::new(),
            text_len: 0,
        }
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Forgets everything buffered (after STARTTLS, bytes sent in the clear
    /// before the handshake must not be read as if protected by it).
    pub fn clear(&mut self) {
        *self = Self::new(self.limits);
    }

    /// Bytes fed and not yet used by a returned reply.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete reply from what was fed, or `None` if more bytes are
    /// needed. Lines may end in CRLF or bare LF (a lenient client).
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(nl) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                if self.scanned - self.line_start > self.limits.max_line {
                    return Err(ReplyError::TooLong(self.limits.max_line));
                }
                return Ok(None);
            };
            let end = self.scanned + nl;
            self.scanned = end + 1;
            if end - self.line_start > self.limits.max_line {
                return Err(ReplyError::TooLong(self.limits.max_line));
            }
            let raw = &self.buf[self.line_start..end];
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = String::from_utf8_lossy(raw).into_owned();
            self.line_start = self.scanned;
            let last = self.line(line)?;
            // Drop finished lines once they outweigh a line, so an endless
            // multi-line reply never grows the buffer (amortised linear).
            if last || self.line_start > self.limits.max_line {
                self.buf.drain(..self.line_start);
                self.scanned -= self.line_start;
                self.line_start = 0;
            }
            if last {
                self.text_len = 0;
                return Ok(Some(Reply {
                    code: self.code.take().expect("a line was parsed"),
                    enhanced: self.enhanced.take(),
                    lines: std::mem::take(&mut self.lines),
                }));
            }
        }
    }

    /// Adds one complete line to the reply; `true` when it was the last.
    fn line(&mut self, line: String) -> Result<bool, ReplyError> {
        let b = line.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&b[0]) {
            return Err(ReplyError::Malformed(line));
        }
        let this: u16 = line[..3]
            .parse()
            .map_err(|_| ReplyError::Malformed(line.clone()))?;
        if let Some(c) = self.code
            && c != this
        {
            return Err(ReplyError::CodeChanged(c, this));
        }
        self.code = Some(this);
        let (last, text) = match b.get(3) {
            None => (true, ""),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(ReplyError::Malformed(line)),
        };
        if !last && self.lines.len() + 1 >= self.limits.max_lines {
            return Err(ReplyError::TooManyLines(self.limits.max_lines));
        }
        // The enhanced code is taken from the first line and stripped from all.
        let text = match text.split_once(' ').map_or((text, ""), |(a, b)| (a, b)) {
            (first, rest)
                if EnhancedCode::parse(first).is_some_and(|e| u16::from(e.class) == this / 100) =>
            {
                self.enhanced = self.enhanced.or(EnhancedCode::parse(first));
                rest
            }
            _ => text,
        };
        self.text_len += text.len();
        if self.text_len > self.limits.max_bytes {
            return Err(ReplyError::TooLarge(self.limits.max_bytes));
        }
        self.lines.push(text.to_owned());
        Ok(last)
    }

    /// Reads from `r` until one reply is complete.
    pub async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Reply, ReadError> {
        loop {
            if let Some(reply) = self.next_reply()? {
                return Ok(reply);
            }
            let mut chunk = [0u8; 4096];
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            self.feed(&chunk[..n]);
        }
    }
}

/// Parses one complete (possibly multi-line) reply from the front of `buf`
/// with the client's limits. Returns `Ok(None)` when more bytes are needed,
/// else the reply and the number of bytes it used.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut r = ReplyReader::new(Limits::CLIENT);
    r.feed(buf);
    Ok(r.next_reply()?
        .map(|reply| (reply, buf.len() - r.buffered())))
}

#[cfg(test)]
#[expect(clippy::format_push_string, reason = "building wire text in tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn multiline_reply_with_enhanced_code() {
        let (r, n) = parse_reply(b"250-mx.example\r\n250-PIPELINING\r\n250 2.0.0 SIZE 100\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(n, 52);
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, vec!["mx.example", "PIPELINING", "SIZE 100"]);
        let (r, _) = parse_reply(b"451 4.3.0 try later\r\n").unwrap().unwrap();
        assert_eq!(r.enhanced, EnhancedCode::parse("4.3.0"));
        assert_eq!(r.text(), "try later");
    }

    #[test]
    fn partial_reply_needs_more() {
        assert_eq!(parse_reply(b"250-a\r\n250 b"), Ok(None));
        assert!(parse_reply(b"250-a\r\n251 b\r\n").is_err());
    }

    #[test]
    fn reply_trickled_byte_by_byte_is_read_once() {
        let wire = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n220 next\r\n";
        let mut r = ReplyReader::new(Limits::CLIENT);
        let mut got = Vec::new();
        for b in wire {
            r.feed(std::slice::from_ref(b));
            while let Some(reply) = r.next_reply().unwrap() {
                got.push(reply);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].lines, vec!["mx.example", "PIPELINING", "SIZE 100"]);
        assert_eq!(got[1].code, 220);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn limits_bound_line_length_and_line_count() {
        let mut r = ReplyReader::new(Limits::PROBE);
        r.feed(&[b'2'; 600]);
        assert_eq!(r.next_reply(), Err(ReplyError::TooLong(514)));
        let mut r = ReplyReader::new(Limits::PROBE);
        r.feed(&b"250-x\r\n".repeat(100));
        assert_eq!(r.next_reply(), Err(ReplyError::TooManyLines(100)));
        let mut r = ReplyReader::new(Limits::PROBE);
        r.feed(&b"250-x\r\n".repeat(99));
        r.feed(b"250 last\r\n");
        assert_eq!(r.next_reply().unwrap().unwrap().lines.len(), 100);
        let mut r = ReplyReader::new(Limits::CLIENT);
        r.feed(
            &format!("250-{}\r\n", "x".repeat(4000))
                .repeat(17)
                .into_bytes(),
        );
        assert_eq!(r.next_reply(), Err(ReplyError::TooLarge(64 * 1024)));
    }

    #[test]
    fn an_endless_multiline_reply_never_grows_the_buffer() {
        let mut r = ReplyReader::new(Limits::CLIENT);
        let line = b"220-xxxxxxxxxxxxxxxx\r\n";
        let mut peak = 0;
        let err = loop {
            r.feed(&line.repeat(50));
            match r.next_reply() {
                Ok(None) => peak = peak.max(r.buffered()),
                Ok(Some(_)) => panic!("no reply ends"),
                Err(e) => break e,
            }
        };
        assert_eq!(err, ReplyError::TooManyLines(1000));
        assert!(
            peak <= MAX_REPLY_LINE + 50 * line.len(),
            "buffer peaked at {peak}"
        );
    }

    proptest! {
        // PROPTEST_CASES raises the count for a longer soak.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000),
            ..ProptestConfig::default()
        })]

        /// The reply parser never panics; a complete reply never claims more bytes than given.
        #[test]
        fn reply_parser_total(buf in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(Some((_, n))) = parse_reply(&buf) {
                prop_assert!(n <= buf.len());
            }
        }

        /// Replies produced from parts parse back to the same parts.
        #[test]
        fn reply_roundtrip(code in 200u16..600, lines in proptest::collection::vec("[ -~]{0,80}", 1..5)) {
            let mut wire = String::new();
            for (i, l) in lines.iter().enumerate() {
                let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                wire.push_str(&format!("{code}{sep}{l}\r\n"));
            }
            let (r, n) = parse_reply(wire.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(n, wire.len());
            prop_assert_eq!(r.code, code);
            prop_assert_eq!(r.lines.len(), lines.len());
        }
    }
}
