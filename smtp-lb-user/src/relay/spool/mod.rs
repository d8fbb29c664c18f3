//! The durable spool: an append-only log of segments with group commit.
//!
//! # Format
//! The spool directory holds segment files `NNNNNNNNNNNNNNNN.seg` (16 hex
//! digits, increasing), `corrupt/` for anything that failed to parse at
//! start-up, and `incoming/` for bodies being received ([`Incoming`]). A
//! segment is a sequence of records:
//!
//! ```text
//! magic  u32 LE  0x3152_4C53 ("SLR1")
//! kind   u8      1 = message, 2 = recipients done, 3 = retry state
//! len    u32 LE  payload length
//! crc    u32 LE  CRC-32 of kind, len and payload
//! payload
//! ```
//!
//! A message payload is `id u64, received_ms u64, sender (u16 len + bytes),
//! rcpt count u32, each rcpt (u16 len + bytes), body_len u64, body`. A done
//! payload is `id u64, count u32, rcpt indexes u32…` (count `u32::MAX` = all);
//! a retry payload `id u64, attempts u32, next attempt (Unix ms) u64`.
//!
//! # Durability
//! One writer thread owns the current segment. Ingress sends it message
//! records and waits; the thread takes every record queued at that moment,
//! writes them with one `write` and makes them durable with one `fdatasync`
//! (group commit: concurrent transactions share a sync), then answers all of
//! them. Only then does ingress reply `250`. A new segment is `fsync`ed with
//! its directory before the first record goes into it. The current segment
//! runs ahead of its records in zeros, so a sync flushes data, not the
//! file's size (see `ZERO_AHEAD`); a closed segment has them cut off. Done
//! records are not synced on their own: losing one after a crash means a
//! duplicate delivery, never a lost message (at-least-once).
//!
//! A done or retry record goes to the segment that holds its message; a
//! segment none of whose messages is live is deleted. The writer thread owns
//! the index of live messages (id → record) and compacts: a segment of at
//! least 1 MiB whose live records take at most a quarter of it has them
//! copied forward (with their done and retry state), synced, re-indexed, and
//! only then is it unlinked. A crash in between leaves two copies; recovery
//! applies segments in order, so the later copy wins.
//!
//! # Recovery
//! At start-up every segment is parsed. A record whose header or CRC is
//! wrong is never delivered, not even in part: the segment is copied to
//! `corrupt/` and reported, parsing resumes at the next valid record, and a
//! torn tail (a write cut by a crash, never acknowledged) is truncated. The
//! zeros after the last record are no damage: they are cut off quietly.
mod compaction;
mod format;
mod incoming;
mod worker;
mod writer;

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::info;

pub use self::format::{CorruptReport, MsgId, Recovered, RetryState, now_ms};
pub use self::incoming::Incoming;
pub use self::writer::SpoolError;

/// The record decoder and its encoders, for the fuzz target `spool_record`
/// (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::format::{
        ALL, HEADER, Parsed, done_record, message_record, parse_record, record, retry_record,
    };
}
use self::{
    format::{Event, message_record, message_record_head, recover_segment, segment_path, sync_dir},
    writer::{Entry, Index, Op, SegmentState, Shared, Writer},
};

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    next_id: Arc<AtomicU64>,
}

/// Segment count and bytes on disk, for tests and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub segments: usize,
    pub bytes: u64,
    pub messages: usize,
}

/// Largest body [`Spool::read_body`] copies on the caller's thread.
const INLINE_READ_MAX: usize = 256 * 1024;

/// Fills `buf` from `offset` of `file` only as far as the page cache
/// serves it (`preadv2` with `RWF_NOWAIT`, Linux 4.14): `false` as soon as
/// a part would wait for the disk, or the kernel cannot say.
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let Ok(at) = libc::off_t::try_from(offset + done as u64) else {
            return false;
        };
        // SAFETY: one iovec over `rest`, writable for its length during the call.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &raw const iov, 1, at, libc::RWF_NOWAIT) };
        // -1: EAGAIN (not cached), EOPNOTSUPP, EINTR…; 0: end of file.
        let Ok(n @ 1..) = usize::try_from(n) else {
            return false;
        };
        done += n;
    }
    true
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovers every message
    /// in it, and starts the writer thread, which compacts mostly finished
    /// segments every `compact_every`.
    pub fn open(
        dir: &Path,
        compact_every: Duration,
    ) -> anyhow::Result<(Self, Vec<Recovered>, Vec<CorruptReport>)> {
        use anyhow::Context;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create spool dir {}", dir.display()))?;
        // Bodies being received; anything here is from a crash and was never acknowledged.
        let incoming = dir.join("incoming");
        let _ = std::fs::remove_dir_all(&incoming);
        std::fs::create_dir_all(&incoming)
            .with_context(|| format!("create {}", incoming.display()))?;
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)
            .with_context(|| format!("read spool dir {}", dir.display()))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect();
        numbers.sort_unstable();

        // Segments in order: a message copied forward by compaction is
        // found again later and its later copy wins; done and retry records
        // count wherever they are.
        let mut live: HashMap<MsgId, Recovered> = HashMap::new();
        let mut finished = std::collections::HashSet::new();
        let mut reports = Vec::new();
        let mut max_id = 0;
        for &n in &numbers {
            let path = segment_path(dir, n);
            let (events, report) = recover_segment(dir, &path, n)
                .with_context(|| format!("recover {}", path.display()))?;
            reports.extend(report);
            for event in events {
                match event {
                    Event::Message(m) => {
                        max_id = max_id.max(m.id);
                        if finished.contains(&m.id) {
                            continue;
                        }
                        match live.get_mut(&m.id) {
                            Some(old) => old.location = m.location,
                            None => {
                                live.insert(m.id, m);
                            }
                        }
                    }
                    Event::Done { id, rcpts } => {
                        if rcpts == [format::ALL] {
                            finished.insert(id);
                            live.remove(&id);
                        } else if let Some(m) = live.get_mut(&id) {
                            m.done.extend(rcpts);
                        }
                    }
                    Event::Retry { id, retry } => {
                        if let Some(m) = live.get_mut(&id)
                            && m.retry.is_none_or(|r| r.attempts <= retry.attempts)
                        {
                            m.retry = Some(retry);
                        }
                    }
                }
            }
        }
        live.retain(|_, m| (0..m.rcpts.len() as u32).any(|i| !m.done.contains(&i)));

        let mut index = Index::default();
        for m in live.values() {
            let mut done: Vec<u32> = m.done.iter().copied().collect();
            done.sort_unstable();
            index.messages.insert(
                m.id,
                Entry {
                    location: m.location,
                    done,
                    retry: m.retry,
                },
            );
        }
        for &n in &numbers {
            let path = segment_path(dir, n);
            let (count, bytes) = index
                .messages
                .values()
                .filter(|e| e.location.segment == n)
                .fold((0, 0), |(c, b), e| (c + 1, b + e.location.record_len));
            if count == 0 {
                std::fs::remove_file(&path)
                    .with_context(|| format!("remove {}", path.display()))?;
                continue;
            }
            let reader = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            index.segments.insert(
                n,
                SegmentState {
                    size: reader.metadata().map_or(0, |m| m.len()),
                    reader: Arc::new(reader),
                    live: count,
                    live_bytes: bytes,
                },
            );
        }
        sync_dir(dir).context("fsync spool dir")?;
        let mut recovered: Vec<Recovered> = live.into_values().collect();
        recovered.sort_unstable_by_key(|m| m.id);

        let current = numbers.last().map_or(1, |n| n + 1);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            index: Mutex::new(index),
            current: AtomicU64::new(current),
            lazy: Mutex::default(),
            receiving: Arc::default(),
        });
        let writer = Writer::create(shared.clone(), current, compact_every)
            .context("create spool segment")?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || worker::run(writer, &rx))?;
        let first_id = max_id.max(now_ms() * 1000) + 1;
        info!(dir = %dir.display(), messages = recovered.len(), corrupt = reports.len(), "spool opened");
        Ok((
            Self {
                shared,
                tx,
                next_id: Arc::new(AtomicU64::new(first_id)),
            },
            recovered,
            reports,
        ))
    }

    /// A fresh message id (unique across restarts while the clock moves forward).
    pub fn allocate_id(&self) -> MsgId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes a message durably; returns its reception time (Unix ms) once
    /// it is on stable storage.
    pub async fn store(
        &self,
        id: MsgId,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> Result<u64, SpoolError> {
        let received_ms = now_ms();
        let (bytes, body_at) = message_record(id, received_ms, sender, rcpts, body);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Append {
                id,
                bytes,
                rest: None,
                body_at,
                body_len: body.len() as u64,
                reply,
            })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)??;
        Ok(received_ms)
    }

    /// A body to receive into (memory up to a bound, then a file).
    pub fn incoming(&self) -> Incoming {
        Incoming::new(
            self.shared
                .dir
                .join("incoming")
                .join(format!("{:016x}", self.allocate_id())),
            incoming::Receiving::new(&self.shared.receiving),
        )
    }

    /// Like [`Self::store`] for a body of `head` (our headers) followed by
    /// what was received into `body`, which never has to be in memory whole.
    pub async fn store_incoming(
        &self,
        id: MsgId,
        sender: &str,
        rcpts: &[String],
        head: &[u8],
        body: Incoming,
    ) -> Result<u64, SpoolError> {
        let received_ms = now_ms();
        let (rest, crc, rest_len) = body.into_parts();
        let (bytes, body_at) =
            message_record_head(id, received_ms, sender, rcpts, head, rest_len, &crc);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Append {
                id,
                bytes,
                rest: Some(rest),
                body_at,
                body_len: head.len() as u64 + rest_len,
                reply,
            })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)??;
        Ok(received_ms)
    }

    /// Records that recipients (by index) are finished; `all` when the whole
    /// message is, which also releases its place in the spool. Written with
    /// the next batch, within 50 ms; lost in a crash, the
    /// recipients get the message once more (never fewer times).
    pub fn mark_done(&self, id: MsgId, rcpts: &[u32], all: bool) {
        self.shared.push_lazy(Op::Done {
            id,
            rcpts: rcpts.to_vec(),
            all,
        });
    }

    /// Records a deferral: `attempts` made so far, the next one due at
    /// `next_ms` (Unix ms). Not synced on its own: lost in a power cut, it
    /// only makes the message's next attempt come sooner.
    pub fn record_retry(&self, id: MsgId, attempts: u32, next_ms: u64) {
        self.shared.push_lazy(Op::Retry {
            id,
            retry: RetryState { attempts, next_ms },
        });
    }

    /// Returns once every done and retry record made before it is written
    /// (at shutdown: a restart must not deliver a finished message again).
    pub async fn flush(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Op::Flush(done)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Compacts now (tests, operators) and returns once done.
    pub async fn compact(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Op::Compact(done)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Reads a message body back (for delivery).
    pub async fn read_body(&self, id: MsgId) -> io::Result<Vec<u8>> {
        let (file, offset, len) = {
            let index = self.shared.index();
            let e = index.messages.get(&id);
            let file = e.and_then(|e| index.segments.get(&e.location.segment));
            match (e, file) {
                (Some(e), Some(s)) => (
                    s.reader.clone(),
                    e.location.record_at + e.location.body_at,
                    e.location.body_len,
                ),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("message {id:016x} is not in the spool"),
                    ));
                }
            }
        };
        let mut buf = vec![0; usize::try_from(len).map_err(io::Error::other)?];
        // A message just spooled is in the page cache: copying it here costs
        // less than the two thread switches of a blocking read, which stays
        // for what would wait on the disk and for large bodies.
        if buf.len() <= INLINE_READ_MAX && read_cached(&file, &mut buf, offset) {
            return Ok(buf);
        }
        tokio::task::spawn_blocking(move || {
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Segments, bytes and live messages in the spool now.
    pub fn usage(&self) -> Usage {
        let index = self.shared.index();
        Usage {
            segments: index.segments.len(),
            bytes: index.segments.values().map(|s| s.size).sum(),
            messages: index.messages.len(),
        }
    }
}

#[cfg(test)]
mod tests;
