//! DATA: reading the message (framed by [`crate::smtp::data`]: only
//! `<CRLF>.<CRLF>` ends it), signing, spooling, and the reply that makes the
//! relay responsible for it.
use std::{collections::HashSet, sync::atomic::Ordering};

use tracing::{debug, error, warn};

use crate::{
    relay::{
        dkim::{self},
        dsn::rfc5322_date,
        queue::QueuedMessage,
    },
    smtp::data::DataReader,
};

use super::session::{Data, End, Session};

impl Session {
    pub(super) async fn read_data(&mut self) -> Result<Data, End> {
        let mut reader = DataReader::new(self.shared.max_size);
        let mut body = self.shared.queue.spool().incoming();
        let mut spool_error = None;
        loop {
            let (used, end) = reader.read(&self.rbuf[self.rpos..], |b| {
                if spool_error.is_none() {
                    body.extend(b);
                }
            });
            self.rpos += used;
            if end {
                return Ok(Data {
                    body,
                    spool_error,
                    refusal: reader.refusal(),
                });
            }
            if spool_error.is_none()
                && let Err(e) = body.spill_if_full().await
            {
                spool_error = Some(e);
            }
            self.fill(self.shared.data_timeout, "data", false).await?;
        }
    }

    /// The `DKIM-Signature` header for `message` when a key covers its
    /// `From:` domain, else `""`. A signing failure is logged and counted,
    /// and the message goes on unsigned: refusing it would only move the
    /// problem to the client. `None` only if the signing task panicked (the
    /// caller answers `451`).
    pub(super) async fn dkim_header(&self, id: u64, message: Vec<u8>) -> Option<String> {
        let signers = self.shared.dkim.clone();
        // Hashing a large body and an RSA signature are CPU work: keep them
        // off the session tasks' threads.
        let Ok(outcome) = tokio::task::spawn_blocking(move || signers.sign(&message)).await else {
            error!(id = format_args!("{id:016x}"), "DKIM signing task panicked");
            return None;
        };
        Some(match outcome {
            dkim::Outcome::Signed { header, domain } => {
                debug!(id = format_args!("{id:016x}"), domain, "DKIM signed");
                self.shared
                    .metrics
                    .dkim_signed
                    .fetch_add(1, Ordering::Relaxed);
                header
            }
            dkim::Outcome::NoKey => String::new(),
            dkim::Outcome::Failed(e) => {
                warn!(id = format_args!("{id:016x}"), error = %e, "DKIM signing failed; sending unsigned");
                self.shared
                    .metrics
                    .dkim_errors
                    .fetch_add(1, Ordering::Relaxed);
                String::new()
            }
        })
    }

    pub(super) async fn finish_data(&mut self, data: Data) {
        let sender = self.mail.take().unwrap_or_default();
        let rcpts = std::mem::take(&mut self.rcpts);
        if let Some(refusal) = data.refusal {
            self.error(refusal.reply());
            return;
        }
        if let Some(e) = data.spool_error {
            self.spool_failed(&e);
            return;
        }
        let with = match (self.esmtp, self.stream.is_tls(), self.authed.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let for_clause = if rcpts.len() == 1 {
            format!("\r\n\tfor <{}>", rcpts[0])
        } else {
            String::new()
        };
        let queue = &self.shared.queue;
        let id = queue.spool().allocate_id();
        let received = format!(
            "Received: from {} ({})\r\n\tby {} (smtp-lb) with {with} id {id:016x}{for_clause};\r\n\t{}\r\n",
            self.helo.as_deref().unwrap_or("unknown"),
            self.peer.ip(),
            self.shared.hostname,
            rfc5322_date(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64
            ),
        );
        // Signing needs the whole message at once: only then is it in memory.
        let mut head = received.into_bytes();
        if !self.shared.dkim.is_empty() {
            let mut whole = head.clone();
            match data.body.to_vec().await {
                Ok(b) => whole.extend_from_slice(&b),
                Err(e) => {
                    error!(peer = %self.peer, error = %e, "message not accepted: spooled body unreadable");
                    self.reply("451 4.3.0 Error: queue file write error");
                    return;
                }
            }
            let Some(header) = self.dkim_header(id, whole).await else {
                self.reply("451 4.3.0 Error: local error in processing");
                return;
            };
            head.splice(0..0, header.into_bytes());
        }
        let size = head.len() as u64 + data.body.len();
        let section = data
            .body
            .header_section()
            .map(|b| [head.as_slice(), b].concat());
        match queue
            .spool()
            .store_incoming(id, &sender, &rcpts, &head, data.body)
            .await
        {
            Ok(received_ms) => {
                self.shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                queue.log().received(&format!("{id:016x}"), self.peer);
                let mut msg =
                    QueuedMessage::new(id, sender, rcpts, received_ms, size, HashSet::default());
                if let Some(section) = &section {
                    msg = msg.with_header_section(section, queue.tenant_header());
                }
                queue.submit(msg);
                let r = format!("250 2.0.0 Ok: queued as {id:016x}");
                self.reply(&r);
            }
            Err(e) => self.spool_failed(&e),
        }
    }

    /// The spool could not take the message: `451`, logged and counted.
    fn spool_failed(&mut self, e: &dyn std::fmt::Display) {
        self.shared
            .metrics
            .spool_errors
            .fetch_add(1, Ordering::Relaxed);
        error!(peer = %self.peer, error = %e, "message not accepted: spool write failed");
        self.reply("451 4.3.0 Error: queue file write error");
    }
}
