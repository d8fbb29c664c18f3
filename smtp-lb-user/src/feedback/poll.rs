//! One poll of a relay: `GET /metrics` on its metrics listener, bounded in
//! time and answer size (a relay is a peer like any other), read for its
//! queue depth and its recipient outcomes.
use std::net::SocketAddr;

use super::{config::FeedbackConfig, policy::Reading};
use crate::admin::{client::Client, scrape};

/// The relay's queue depth gauge.
const QUEUE: &str = "smtp_lb_relay_queue_messages";
/// Its recipient outcomes, by `domain` and `status`.
const OUTCOMES: &str = "smtp_lb_relay_recipients_total";

/// Polls the relay whose metrics listener is `addr`. Blocking: run it off
/// the runtime threads.
pub fn poll(addr: SocketAddr, cfg: &FeedbackConfig) -> Result<Reading, String> {
    let client = Client::new(addr, None).with_limits(cfg.timeout, cfg.max_page_bytes);
    let answer = client
        .get(&["metrics"], &[])
        .map_err(|e| format!("{e:#}"))?;
    if !answer.ok() {
        return Err(format!("GET http://{addr}/metrics: HTTP {}", answer.status));
    }
    read(&answer.body).ok_or_else(|| format!("http://{addr}/metrics has no `{QUEUE}`"))
}

/// The reading in a metrics page; `None` without a queue depth.
pub fn read(page: &str) -> Option<Reading> {
    #[expect(clippy::cast_sign_loss, reason = "scrape keeps finite values >= 0")]
    let queue = scrape::value(page, QUEUE)? as u64;
    let (mut deferred, mut outcomes) = (0u64, 0u64);
    for (labels, v) in scrape::samples(page, OUTCOMES) {
        #[expect(clippy::cast_sign_loss, reason = "scrape keeps finite values >= 0")]
        let v = v as u64;
        outcomes = outcomes.saturating_add(v);
        if labels.get("status").is_some_and(|s| s == "deferred") {
            deferred = deferred.saturating_add(v);
        }
    }
    Some(Reading {
        queue,
        deferred,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_and_outcomes_are_read_from_a_relay_page() {
        let page = "# TYPE smtp_lb_relay_queue_messages gauge\n\
            smtp_lb_relay_queue_messages 42\n\
            smtp_lb_relay_recipients_total{domain=\"gmail.com\",status=\"delivered\"} 12\n\
            smtp_lb_relay_recipients_total{domain=\"gmail.com\",status=\"deferred\"} 3\n\
            smtp_lb_relay_recipients_total{domain=\"x.org\",status=\"deferred\"} 2\n\
            smtp_lb_relay_recipients_total{domain=\"x.org\",status=\"bounced\"} 1\n";
        assert_eq!(
            read(page),
            Some(Reading {
                queue: 42,
                deferred: 5,
                outcomes: 18
            })
        );
        assert_eq!(
            read("smtp_lb_relay_recipients_total{status=\"deferred\"} 3\n"),
            None
        );
    }
}
