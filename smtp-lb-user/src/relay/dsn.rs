//! Delivery status notifications (RFC 3464, in a `multipart/report` RFC 6522)
//! for recipients that failed. They go to the envelope sender with a null
//! sender of their own, so a bounce never bounces (RFC 5321 §6.1).
use std::{
    fmt::Write as _,
    time::{Duration, UNIX_EPOCH},
};

use super::{proto::Reply, queue::QueuedMessage, spool::Spool};

/// Headers of the original message: everything before the first empty line.
fn headers_of(body: &[u8]) -> &[u8] {
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Builds the DSN message (headers and body, CRLF lines) for `failed`
/// recipients (index into `msg.rcpts`, final reply).
pub async fn build(
    hostname: &str,
    msg: &QueuedMessage,
    failed: &[(u32, Reply)],
    spool: &Spool,
) -> Vec<u8> {
    let original = spool.read_body(msg.location).await.unwrap_or_default();
    let boundary = format!("{:016x}.{}/{hostname}", msg.id, now_ms());
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
        sender = msg.sender,
        date = rfc5322_date(now_ms()),
        id = msg.id,
    );
    for (i, reply) in failed {
        let _ = write!(out, "<{}>: {}\r\n", msg.rcpts[*i as usize], reply);
    }
    let _ = write!(
        out,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Queue-ID: {id:016x}\r\n\
         Arrival-Date: {arrival}\r\n",
        id = msg.id,
        arrival = rfc5322_date(msg.received_ms),
    );
    for (i, reply) in failed {
        let status = reply
            .enhanced
            .map_or_else(|| format!("{}.0.0", reply.code / 100), |e| e.to_string());
        let _ = write!(
            out,
            "\r\nFinal-Recipient: rfc822; {rcpt}\r\n\
             Action: failed\r\n\
             Status: {status}\r\n\
             Diagnostic-Code: smtp; {reply}\r\n",
            rcpt = msg.rcpts[*i as usize],
        );
    }
    let _ = write!(
        out,
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    );
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(headers_of(&original));
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
}
