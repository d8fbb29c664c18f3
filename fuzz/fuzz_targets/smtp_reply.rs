//! The one reply reader (`smtp::reply::ReplyReader`) on anything a server
//! may send, split into reads anywhere. The first two input octets choose
//! the limits and how the rest is cut into reads. Checked: no panic; replies
//! within the limits; the buffer never holds more than two lines' worth
//! after a read is parsed; and reading in pieces gives exactly what reading
//! it whole gives (the incremental parser is the parser).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtp_lb_user::smtp::{
    Reply,
    reply::{Limits, ReplyError, ReplyReader},
};

fuzz_target!(|input: &[u8]| {
    let &[shape, split, ref wire @ ..] = input else {
        return;
    };
    let limits = match shape % 3 {
        0 => Limits::CLIENT,
        1 => Limits::PROBE,
        // Small limits, so the fuzzer reaches every bound with short inputs.
        _ => Limits {
            max_line: 4 + usize::from(shape >> 2),
            max_lines: 1 + usize::from(split >> 5),
            max_bytes: usize::from(shape),
        },
    };
    let whole = outcomes(limits, wire, wire.len().max(1));
    let pieces = outcomes(limits, wire, 1 + usize::from(split & 0x1f));
    assert_eq!(whole, pieces, "reading in pieces changed the outcome");
});

/// Feeds `wire` in reads of `chunk` octets, collecting replies up to the
/// first error, and checks the limits on the way.
fn outcomes(limits: Limits, wire: &[u8], chunk: usize) -> Vec<Result<Reply, ReplyError>> {
    let mut reader = ReplyReader::new(limits);
    let mut out = Vec::new();
    for read in wire.chunks(chunk) {
        reader.feed(read);
        loop {
            match reader.next_reply() {
                Ok(Some(reply)) => {
                    check(limits, &reply);
                    out.push(Ok(reply));
                }
                Ok(None) => {
                    assert!(
                        reader.buffered() <= 2 * limits.max_line,
                        "holds {} octets with lines of at most {}",
                        reader.buffered(),
                        limits.max_line
                    );
                    break;
                }
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

fn check(limits: Limits, reply: &Reply) {
    assert!((200..600).contains(&reply.code), "{reply:?}");
    assert!(
        !reply.lines.is_empty() && reply.lines.len() <= limits.max_lines,
        "{reply:?}"
    );
    let text: usize = reply.lines.iter().map(String::len).sum();
    assert!(text <= limits.max_bytes, "{text} octets of text: {reply:?}");
    if let Some(e) = reply.enhanced {
        assert_eq!(u16::from(e.class), reply.code / 100, "{reply:?}");
    }
}
