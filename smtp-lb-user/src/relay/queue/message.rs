//! The messages the relay is responsible for, and the jobs they split into
//! (one per recipient domain).
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::super::{
    egress::SourceId,
    spool::{MsgId, RetryState},
};

/// A message the relay is responsible for.
pub struct QueuedMessage {
    pub id: MsgId,
    pub sender: String,
    pub rcpts: Vec<String>,
    pub received_ms: u64,
    /// Body size in bytes.
    pub size: u64,
    /// When a message recovered from the spool was due for its next attempt (Unix ms).
    pub(super) resume_at_ms: Option<u64>,
    pub(super) state: Mutex<MessageState>,
    /// What routing needs from the header section: from ingress, or read
    /// from the spool on first need.
    pub(super) headers: tokio::sync::OnceCell<HeaderFacts>,
}

/// What routing needs from a message's header section.
#[derive(Debug, Default)]
pub(super) struct HeaderFacts {
    /// The tenant header's value (when one is configured).
    pub(super) tenant: Option<String>,
    /// `Received:` headers: the hops the message has made.
    pub(super) hops: usize,
}

impl HeaderFacts {
    pub(super) fn read(message: &[u8], tenant_header: Option<&str>) -> Self {
        Self {
            tenant: tenant_header.and_then(|h| header_value(message, h)),
            hops: hop_count(message),
        }
    }
}

#[derive(Default)]
pub(super) struct MessageState {
    /// Recipients delivered or bounced.
    pub(super) done: HashSet<u32>,
    /// Last temporary error, for `ctl show`.
    pub(super) last_error: Option<String>,
    pub(super) attempts: u32,
}

impl QueuedMessage {
    pub fn new(
        id: MsgId,
        sender: String,
        rcpts: Vec<String>,
        received_ms: u64,
        size: u64,
        done: HashSet<u32>,
    ) -> Self {
        Self {
            id,
            sender,
            rcpts,
            received_ms,
            size,
            resume_at_ms: None,
            state: Mutex::new(MessageState {
                done,
                ..Default::default()
            }),
            headers: tokio::sync::OnceCell::new(),
        }
    }

    /// A message just received, whose header section is `head`: routing
    /// need not read it back from the spool.
    pub fn with_header_section(self, head: &[u8], tenant_header: Option<&str>) -> Self {
        let _ = self.headers.set(HeaderFacts::read(head, tenant_header));
        self
    }

    /// A message recovered from the spool resumes its retry schedule:
    /// its attempt count, and its next attempt not before it was due.
    pub fn resume(mut self, retry: Option<RetryState>) -> Self {
        if let Some(r) = retry {
            self.state.get_mut().expect("msg lock").attempts = r.attempts;
            self.resume_at_ms = Some(r.next_ms);
        }
        self
    }

    pub(super) fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Duration::from_millis(now.saturating_sub(self.received_ms))
    }

    /// The queue id as operators see it.
    pub(super) fn hex_id(&self) -> String {
        format!("{:016x}", self.id)
    }
}

/// Some recipients of one message, all in one domain.
pub struct Job {
    pub(super) msg: Arc<QueuedMessage>,
    pub(super) domain: String,
    pub(super) rcpts: Vec<u32>,
    pub(super) attempts: u32,
    /// The egress source a job waiting for its warmup window is bound to.
    pub(super) pinned: Option<SourceId>,
}

impl Job {
    /// The same message's other recipients `rcpts`, at the same attempt.
    pub(super) fn with_rcpts(&self, rcpts: Vec<u32>) -> Self {
        Self {
            msg: self.msg.clone(),
            domain: self.domain.clone(),
            rcpts,
            attempts: self.attempts,
            pinned: self.pinned,
        }
    }

    /// The recipients' addresses.
    pub(super) fn addresses(&self) -> Vec<String> {
        self.rcpts
            .iter()
            .map(|&i| self.msg.rcpts[i as usize].clone())
            .collect()
    }
}

/// A message's header section (up to the empty line).
fn header_section(message: &[u8]) -> std::borrow::Cow<'_, str> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    String::from_utf8_lossy(&message[..end])
}

/// `Received:` headers in a message's header section (RFC 5321 §6.3: a
/// loop shows as ever more of them).
fn hop_count(message: &[u8]) -> usize {
    header_section(message)
        .split("\r\n")
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case("received"))
        })
        .count()
}

/// The value of header `name` in a message's header section (unfolded, trimmed).
fn header_value(message: &[u8], name: &str) -> Option<String> {
    let head = header_section(message);
    let mut value: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(v) = value.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((n, v)) = line.split_once(':')
            && n.trim().eq_ignore_ascii_case(name)
        {
            value = Some(v.trim().to_owned());
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_count_received_headers_of_the_header_section_only() {
        let m = b"Received: from a\r\n\tby b\r\nreceived: x\r\nX-Received: no\r\nSubject: s\r\n\r\nReceived: body\r\n";
        assert_eq!(hop_count(m), 2);
        assert_eq!(hop_count(b"Subject: s\r\n\r\n"), 0);
    }

    #[test]
    fn tenant_header_is_found_unfolded_and_only_in_the_header_section() {
        let m = b"Subject: x\r\nx-tenant: acme\r\n corp\r\nTo: y\r\n\r\nX-Tenant: body\r\n";
        assert_eq!(header_value(m, "X-Tenant").as_deref(), Some("acme corp"));
        assert_eq!(
            header_value(b"Subject: x\r\n\r\nX-Tenant: b\r\n", "X-Tenant"),
            None
        );
    }
}
