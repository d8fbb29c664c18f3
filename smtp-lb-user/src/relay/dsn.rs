//! Delivery status notifications (RFC 3464, in a `multipart/report` RFC 6522)
//! for recipients that failed. They go to the envelope sender with a null
//! sender of their own, so a bounce never bounces (RFC 5321 §6.1).
//!
//! [`build`] is pure: the envelope, the original headers and the failures
//! in, the message bytes out.
use std::fmt::Write as _;

use crate::smtp::reply::Reply;

/// The failed message as the DSN describes it.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// The queue id.
    pub id: u64,
    /// The envelope sender, to whom the DSN goes.
    pub sender: &'a str,
    pub received_ms: u64,
}

/// Headers of the original message: everything before the first empty line.
pub fn headers_of(body: &[u8]) -> &[u8] {
    body.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(body, |i| &body[..i + 2])
}

/// RFC 5322 date for a Unix time in milliseconds (always UTC).
#[expect(
    clippy::many_single_char_names,
    reason = "the names of the civil-from-days algorithm"
)]
#[expect(
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "days since 1970 and month indexes are small and positive"
)]
pub fn rfc5322_date(unix_ms: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = unix_ms / 1000;
    let days = secs / 86400;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil-from-days, Howard Hinnant's algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{}, {d:02} {} {y} {h:02}:{m:02}:{s:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(mo - 1) as usize]
    )
}

/// Builds the DSN message (headers and body, CRLF lines), written by
/// `hostname` at `now_ms`, for the `failures` (recipient, final reply) of
/// `envelope`, quoting the original message's `original_headers`.
pub fn build(
    hostname: &str,
    envelope: &Envelope<'_>,
    original_headers: &[u8],
    failures: &[(&str, &Reply)],
    now_ms: u64,
) -> Vec<u8> {
    let boundary = format!("{:016x}.{now_ms}/{hostname}", envelope.id);
    let mut out = String::new();
    let _ = write!(
        out,
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{sender}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <{id:016x}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at host {hostname}.\r\n\
         \r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         \r\n",
        sender = envelope.sender,
        date = rfc5322_date(now_ms),
        id = envelope.id,
    );
    for (rcpt, reply) in failures {
        let _ = write!(out, "<{rcpt}>: {reply}\r\n");
    }
    let _ = write!(
        out,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Queue-ID: {id:016x}\r\n\
         Arrival-Date: {arrival}\r\n",
        id = envelope.id,
        arrival = rfc5322_date(envelope.received_ms),
    );
    for (rcpt, reply) in failures {
        let status = reply
            .enhanced
            .map_or_else(|| format!("{}.0.0", reply.code / 100), |e| e.to_string());
        let _ = write!(
            out,
            "\r\nFinal-Recipient: rfc822; {rcpt}\r\n\
             Action: failed\r\n\
             Status: {status}\r\n\
             Diagnostic-Code: smtp; {reply}\r\n",
        );
    }
    let _ = write!(
        out,
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    );
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(original_headers);
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
    }

    #[test]
    fn headers_stop_at_blank_line() {
        assert_eq!(
            headers_of(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"),
            b"A: 1\r\nB: 2\r\n"
        );
    }

    fn sample() -> Vec<u8> {
        let failures = [
            (
                "a@gmail.example",
                &Reply::local(550, "5.1.1", "user unknown"),
            ),
            ("b@gmail.example", &Reply::local(554, "", "no such domain")),
        ];
        build(
            "relay.test",
            &Envelope {
                id: 0xabc,
                sender: "sender@example.com",
                received_ms: 1_700_000_000_000,
            },
            headers_of(b"Subject: hello\r\nFrom: <sender@example.com>\r\n\r\nsecret body\r\n"),
            &failures,
            1_700_000_060_000,
        )
    }

    #[test]
    fn dsn_goes_to_the_sender_as_a_delivery_status_report() {
        let m = String::from_utf8(sample()).unwrap();
        let boundary = "0000000000000abc.1700000060000/relay.test";
        for want in [
            "From: Mail Delivery System <MAILER-DAEMON@relay.test>\r\n",
            "To: <sender@example.com>\r\n",
            "Date: Tue, 14 Nov 2023 22:14:20 +0000\r\n",
            "Message-ID: <0000000000000abc.dsn@relay.test>\r\n",
            "Auto-Submitted: auto-replied\r\n",
            &format!("report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"),
            "<a@gmail.example>: 550 5.1.1 user unknown\r\n",
            "<b@gmail.example>: 554 no such domain\r\n",
            "Reporting-MTA: dns; relay.test\r\nX-Queue-ID: 0000000000000abc\r\nArrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n",
            "\r\nFinal-Recipient: rfc822; a@gmail.example\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 user unknown\r\n",
            // Without an enhanced code the status is the code's class.
            "\r\nFinal-Recipient: rfc822; b@gmail.example\r\nAction: failed\r\nStatus: 5.0.0\r\n",
        ] {
            assert!(m.contains(want), "{want:?} not in\n{m}");
        }
        // Three parts, then the closing boundary, and nothing after it.
        assert_eq!(m.matches(&format!("--{boundary}\r\n")).count(), 3);
        assert!(m.ends_with(&format!("\r\n--{boundary}--\r\n")));
    }

    #[test]
    fn dsn_quotes_the_original_headers_never_the_body() {
        let m = String::from_utf8(sample()).unwrap();
        assert!(m.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\nFrom: <sender@example.com>\r\n\r\n--"
        ));
        assert!(!m.contains("secret body"));
    }

    #[test]
    fn dsn_lines_all_end_in_crlf_and_it_is_deterministic() {
        let a = sample();
        assert_eq!(a, sample());
        for (i, &b) in a.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(a[i - 1], b'\r', "bare LF at {i}");
            }
        }
    }
}
