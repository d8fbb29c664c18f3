//! The DATA reader (`smtp::data::DataReader`), two ways, chosen by the
//! first input octet; the second says how the rest is cut into reads.
//! - Raw: any bytes from a client. No panic; the reader leaves at most one
//!   unfinished line (of at most `MAX_TEXT_LINE` octets) unread, and reading
//!   in pieces gives exactly what reading it whole gives: the same body, end
//!   and refusal, whatever the TCP segmentation.
//! - Round trip: a body, dot-stuffed as the delivery client sends it
//!   (`smtp::client::dot_stuff`). The reader ends exactly at its end; a body
//!   SMTP can carry (RFC 5321 §4.5.3.1.6: CRLF lines of at most 1000 octets,
//!   not counting the stuffed dot; no NUL) comes back unchanged, or refused
//!   as too big when one octet over the size limit; any other is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtp_lb_user::smtp::{
    client::dot_stuff,
    command::MAX_TEXT_LINE,
    data::{DataReader, Refusal},
};

fuzz_target!(|input: &[u8]| {
    let [mode, split, rest @ ..] = input else {
        return;
    };
    let chunk = 1 + usize::from(*split >> 1);
    if mode & 1 == 0 {
        let max = u64::from(*mode) * 64;
        let whole = read(rest, max, rest.len().max(1));
        let pieces = read(rest, max, chunk);
        assert_eq!(whole, pieces, "reading in pieces changed the outcome");
    } else {
        round_trip(rest, split & 1 == 1, chunk);
    }
});

/// What reading `wire` gave: the body, where the message ended, the refusal.
#[derive(Debug, PartialEq)]
struct Outcome {
    body: Vec<u8>,
    end: Option<usize>,
    refusal: Option<Refusal>,
}

/// Reads `wire` as a session does: each read appended to what is left
/// unread, then as much of that as the reader takes.
fn read(wire: &[u8], max: u64, chunk: usize) -> Outcome {
    let mut reader = DataReader::new(max);
    let mut body = Vec::new();
    let mut unread: Vec<u8> = Vec::new();
    let mut offset = 0;
    for piece in wire.chunks(chunk) {
        unread.extend_from_slice(piece);
        let (used, end) = reader.read(&unread, |b| body.extend_from_slice(b));
        assert!(used <= unread.len());
        offset += used;
        unread.drain(..used);
        if end {
            return Outcome {
                body,
                end: Some(offset),
                refusal: reader.refusal(),
            };
        }
        assert!(
            unread.len() <= MAX_TEXT_LINE && !unread.contains(&b'\n'),
            "left {} octets unread: {unread:?}",
            unread.len()
        );
    }
    Outcome {
        body,
        end: None,
        refusal: reader.refusal(),
    }
}

fn round_trip(body: &[u8], one_over: bool, chunk: usize) {
    let wire = dot_stuff(body);
    let mut canonical = body.to_vec();
    if !canonical.ends_with(b"\r\n") {
        canonical.extend_from_slice(b"\r\n");
    }
    let max = canonical.len() as u64 - u64::from(one_over);
    let got = read(&wire, max, chunk);
    assert_eq!(
        got.end,
        Some(wire.len()),
        "the message did not end at its end"
    );
    if !carriable(&canonical) {
        assert!(got.refusal.is_some(), "accepted a body SMTP cannot carry");
    } else if one_over {
        assert_eq!(got.refusal, Some(Refusal::TooBig));
    } else {
        assert_eq!(got.refusal, None);
        assert!(got.body == canonical, "the body changed on its way through");
    }
}

/// CRLF lines of at most 1000 octets with their CRLF, no bare CR or LF, no NUL.
fn carriable(body: &[u8]) -> bool {
    let mut rest = body;
    while !rest.is_empty() {
        let Some(i) = rest.windows(2).position(|w| w == b"\r\n") else {
            return false;
        };
        let line = &rest[..i];
        if i + 2 > MAX_TEXT_LINE || line.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return false;
        }
        rest = &rest[i + 2..];
    }
    true
}
