//! The spool's record decoder (`parse_record`, as recovery at start-up runs
//! it over a segment). Input octets with an even first octet are a segment
//! as found on disk; with an odd one, the second octet is a record kind and
//! the rest its payload, framed with a valid header and CRC (so the fuzzer
//! reaches the payload decoding behind the CRC). Checked: no panic; a
//! decoded record lies inside the segment, its body inside the record; and
//! encoding what was decoded gives it back (the same octets when the
//! lengths agree: a record is read as it was written).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smtp_lb_user::relay::spool::fuzzing::{
    ALL, HEADER, Parsed, done_record, message_record, parse_record, record, retry_record,
};

fuzz_target!(|input: &[u8]| {
    let [mode, rest @ ..] = input else {
        return;
    };
    if mode & 1 == 0 {
        segment(rest);
    } else if let [kind, payload @ ..] = rest {
        segment(&record(*kind, payload));
    }
});

/// Walks a segment as recovery does: record after record, resynchronising
/// one octet on after anything unreadable.
fn segment(data: &[u8]) {
    let mut pos = 0;
    while pos < data.len() {
        let Some((parsed, next)) = parse_record(data, pos) else {
            pos += 1;
            continue;
        };
        assert!(
            pos + HEADER <= next && next <= data.len(),
            "record at {pos} ends at {next}, segment is {}",
            data.len()
        );
        let original = &data[pos..next];
        let encoded = match &parsed {
            Parsed::Message {
                id,
                received_ms,
                sender,
                rcpts,
                body_offset,
                body_len,
            } => {
                let (start, len) = (*body_offset as usize, *body_len as usize);
                assert!(
                    pos + HEADER <= start && start + len == next,
                    "body {start}+{len} outside the record {pos}..{next}"
                );
                message_record(*id, *received_ms, sender, rcpts, &data[start..next]).0
            }
            Parsed::Done { id, rcpts } => done_record(*id, rcpts, rcpts.as_slice() == [ALL]),
            Parsed::Retry { id, retry } => retry_record(*id, *retry),
        };
        // Decoded again at the same place: body offsets count from the
        // segment's start.
        let moved = [&data[..pos], encoded.as_slice()].concat();
        let (again, end) = parse_record(&moved, pos).expect("an encoded record parses");
        assert_eq!(end, moved.len());
        assert_eq!(again, parsed, "decoded, encoded and decoded again differs");
        if encoded.len() == original.len() {
            assert!(encoded == original, "same length, other octets");
        }
        pos = next;
    }
}
