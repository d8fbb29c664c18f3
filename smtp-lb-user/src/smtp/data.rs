//! The DATA framing, the server side (RFC 5321 §4.1.1.4, §4.5.2): message
//! lines up to `<CRLF>.<CRLF>`, dot-unstuffed, pure over bytes. Only that
//! sequence ends the message: a bare CR or LF, a NUL or an over-long line
//! refuses it (SMTP smuggling), and so does a body over the size limit.
//! [`DataReader`] reads what the session has buffered, so whatever the
//! client sends, the session holds at most one line of it unread.

use super::command::MAX_TEXT_LINE;

/// Why a message read by [`DataReader`] is refused; when several apply,
/// the greatest wins (the order of the variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    LongLine,
    Nul,
    BareLineEnd,
    TooBig,
}

impl Refusal {
    /// The reply to the final `.`.
    pub fn reply(self) -> &'static str {
        match self {
            Self::TooBig => "552 5.3.4 Error: message too large",
            Self::BareLineEnd => {
                "554 5.6.0 Error: bare <CR> or <LF> in message data (only <CR><LF> allowed)"
            }
            Self::Nul => "554 5.6.0 Error: NUL character in message data",
            Self::LongLine => "554 5.6.0 Error: message line longer than 1000 octets",
        }
    }
}

/// Reads one message's DATA, line by line, across any split of the input.
#[derive(Clone, Debug)]
pub struct DataReader {
    max_size: u64,
    /// Octets handed to the body so far.
    len: u64,
    /// The previous line ended in CRLF (so a `.` line may end the message).
    prev_crlf: bool,
    /// The rest of an over-long line is being skipped.
    skipping: bool,
    /// The last octet skipped was a CR (its LF comes in the next read).
    skipped_cr: bool,
    refusal: Option<Refusal>,
}

impl DataReader {
    /// A reader for a message of at most `max_size` octets (as spooled:
    /// unstuffed, lines ending in CRLF).
    pub fn new(max_size: u64) -> Self {
        Self {
            max_size,
            len: 0,
            prev_crlf: true,
            skipping: false,
            skipped_cr: false,
            refusal: None,
        }
    }

    /// Reads the complete lines at the front of `buf`, handing each, unstuffed
    /// and with its CRLF, to `body` while the message is acceptable. Returns
    /// the octets used and whether the end-of-data line was among them. An
    /// unfinished line is left unused while it fits in [`MAX_TEXT_LINE`];
    /// a longer one is used up (skipped) and refuses the message.
    pub fn read(&mut self, buf: &[u8], mut body: impl FnMut(&[u8])) -> (usize, bool) {
        let mut pos = 0;
        while let Some(i) = buf[pos..].iter().position(|&b| b == b'\n') {
            let line = &buf[pos..=pos + i];
            pos += i + 1;
            let crlf = match line.len() {
                1 => self.skipping && self.skipped_cr,
                n => line[n - 2] == b'\r',
            };
            // A long line is refused for its length alone, as when it was
            // skipped in parts: the reply must not depend on how it arrived.
            if std::mem::take(&mut self.skipping) || too_long(line) {
                self.refuse(Refusal::LongLine);
                self.prev_crlf = crlf;
                continue;
            }
            let content = &line[..line.len() - if crlf { 2 } else { 1 }];
            if crlf && self.prev_crlf && content == b"." {
                return (pos, true);
            }
            self.prev_crlf = crlf;
            if !crlf || content.contains(&b'\r') {
                self.refuse(Refusal::BareLineEnd);
            }
            if content.contains(&0) {
                self.refuse(Refusal::Nul);
            }
            let content = content.strip_prefix(b".").unwrap_or(content);
            if self.len + content.len() as u64 + 2 > self.max_size {
                self.refuse(Refusal::TooBig);
            }
            if self.refusal.is_none() {
                body(content);
                body(b"\r\n");
                self.len += content.len() as u64 + 2;
            }
        }
        // The unfinished line is already too long, whatever follows.
        if buf.len() - pos > MAX_TEXT_LINE {
            self.refuse(Refusal::LongLine);
            self.skipping = true;
            self.skipped_cr = buf.ends_with(b"\r");
            pos = buf.len();
        }
        (pos, false)
    }

    /// Why the message is refused, if it is.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    fn refuse(&mut self, why: Refusal) {
        self.refusal = self.refusal.max(Some(why));
    }
}

/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its line
/// end, not counting the dot doubled for transparency.
fn too_long(line: &[u8]) -> bool {
    line.len() - usize::from(line.starts_with(b".")) > MAX_TEXT_LINE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `wire` whole; the body, the octets used and the refusal.
    fn read_all(wire: &[u8], max: u64) -> (Vec<u8>, usize, bool, Option<Refusal>) {
        let mut r = DataReader::new(max);
        let mut body = Vec::new();
        let (used, end) = r.read(wire, |b| body.extend_from_slice(b));
        (body, used, end, r.refusal())
    }

    #[test]
    fn dots_are_unstuffed_and_only_crlf_dot_crlf_ends() {
        let (body, used, end, refusal) = read_all(b"..a\r\nb.\r\n.\r\nnext", 1000);
        assert_eq!(body, b".a\r\nb.\r\n");
        assert_eq!((used, end, refusal), (12, true, None));
    }

    #[test]
    fn bare_lf_dot_does_not_end_the_message() {
        let (_, used, end, refusal) = read_all(b"a\n.\nb\r\n", 1000);
        assert_eq!((used, end), (7, false));
        assert_eq!(refusal, Some(Refusal::BareLineEnd));
    }

    #[test]
    fn an_endless_line_is_skipped_and_refused() {
        let mut r = DataReader::new(1 << 20);
        let (used, end) = r.read(&[b'x'; 4000], |_| panic!("no line is complete"));
        assert_eq!((used, end), (4000, false));
        let (used, end) = r.read(b"yy\r\n.\r\n", |_| panic!("the long line's end is skipped"));
        assert_eq!((used, end), (7, true));
        assert_eq!(r.refusal(), Some(Refusal::LongLine));
    }

    /// Caught by the `data_reader` fuzz target (round trip): a 1000-octet
    /// line that starts with a dot arrives as 1001 octets, and was refused.
    #[test]
    fn the_stuffed_dot_does_not_count_towards_the_line_limit() {
        let line = [b".".as_slice(), &[b'y'; 997], b"\r\n"].concat();
        assert_eq!(line.len(), MAX_TEXT_LINE);
        let wire = crate::smtp::client::dot_stuff(&line);
        let (body, used, end, refusal) = read_all(&wire, 1 << 20);
        assert_eq!((used, end, refusal), (wire.len(), true, None));
        assert_eq!(body, line);
        let wire = [b"..".as_slice(), &[b'y'; 998], b"\r\n.\r\n"].concat();
        assert_eq!(read_all(&wire, 1 << 20).3, Some(Refusal::LongLine));
    }

    /// Found by the `data_reader` fuzz target (whole against pieces): a long
    /// line with a NUL in it was refused for the NUL when it came in one
    /// read, for its length when it came in two.
    #[test]
    fn the_refusal_does_not_depend_on_how_the_input_is_split() {
        let wire = [
            &[b'x'; 566],
            [0u8; 20].as_slice(),
            &[b'x'; 515],
            b"\r\n.\r\n",
        ]
        .concat();
        let whole = read_all(&wire, 1 << 20);
        let mut r = DataReader::new(1 << 20);
        let (used, end) = r.read(&wire[..1050], |_| panic!("no line is complete"));
        assert_eq!((used, end), (1050, false));
        let (used, end) = r.read(&wire[1050..], |_| panic!("the long line's end is skipped"));
        assert_eq!(used + 1050, whole.1);
        assert!(end && whole.2);
        assert_eq!(r.refusal(), Some(Refusal::LongLine));
        assert_eq!(whole.3, Some(Refusal::LongLine));
    }

    /// Found by the `data_reader` fuzz target (whole against pieces): when
    /// the skipped part of a long line ended in its CR, the LF that came next
    /// counted as bare, so the `.` after it did not end the message and the
    /// session waited for more instead of refusing it.
    #[test]
    fn a_long_line_skipped_up_to_its_cr_still_ends_in_crlf() {
        let mut r = DataReader::new(1 << 20);
        let head = [&[b'x'; 1016], b"\r".as_slice()].concat();
        let (used, end) = r.read(&head, |_| panic!("no line is complete"));
        assert_eq!((used, end), (head.len(), false));
        let (used, end) = r.read(b"\n.\r\n", |_| panic!("the long line's end is skipped"));
        assert_eq!((used, end), (4, true));
        assert_eq!(r.refusal(), Some(Refusal::LongLine));
    }

    #[test]
    fn size_refusal_wins_over_the_others() {
        let (body, _, end, refusal) = read_all(b"a\0\r\nbbbbbbbb\r\n.\r\n", 8);
        assert!(end);
        assert!(body.is_empty());
        assert_eq!(refusal, Some(Refusal::TooBig));
    }
}
