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
//! its directory before the first record goes into it. Done records are not
//! synced on their own: losing one after a crash means a duplicate delivery,
//! never a lost message (at-least-once).
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
//! torn tail (a write cut by a crash, never acknowledged) is truncated.
mod format;
mod incoming;
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
        });
        let writer = Writer::create(shared.clone(), current, compact_every)
            .context("create spool segment")?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(&rx))?;
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
    /// message is, which also releases its place in the spool.
    pub fn mark_done(&self, id: MsgId, rcpts: &[u32], all: bool) {
        let _ = self.tx.send(Op::Done {
            id,
            rcpts: rcpts.to_vec(),
            all,
        });
    }

    /// Records a deferral: `attempts` made so far, the next one due at
    /// `next_ms` (Unix ms). Not synced on its own: lost in a power cut, it
    /// only makes the message's next attempt come sooner.
    pub fn record_retry(&self, id: MsgId, attempts: u32, next_ms: u64) {
        let _ = self.tx.send(Op::Retry {
            id,
            retry: RetryState { attempts, next_ms },
        });
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
mod tests {
    use std::{collections::HashSet, path::PathBuf};

    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smtp-lb-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const HOUR: Duration = Duration::from_hours(1);

    async fn store(spool: &Spool, rcpts: &[String], body: &[u8]) -> MsgId {
        let id = spool.allocate_id();
        spool.store(id, "s@z.example", rcpts, body).await.unwrap();
        id
    }

    /// Waits until the writer has applied everything sent before.
    async fn settle(spool: &Spool) {
        store(spool, &["x@y.example".to_owned()], b"barrier\r\n").await;
    }

    #[tokio::test]
    async fn stored_messages_are_recovered_until_done() {
        let dir = tmpdir("recover");
        let (spool, rec, _) = Spool::open(&dir, HOUR).unwrap();
        assert!(rec.is_empty());
        let rcpts = vec!["a@x.example".to_owned(), "b@y.example".to_owned()];
        let id1 = store(&spool, &rcpts, b"body one\r\n").await;
        let id2 = spool.allocate_id();
        spool.store(id2, "", &rcpts, b"body two\r\n").await.unwrap();
        assert_eq!(spool.read_body(id2).await.unwrap(), b"body two\r\n");
        spool.mark_done(id1, &[0, 1], true);
        spool.mark_done(id2, &[0], false);
        settle(&spool).await;
        drop(spool);
        let (_spool, rec, corrupt) = Spool::open(&dir, HOUR).unwrap();
        assert!(corrupt.is_empty());
        let ids: Vec<_> = rec.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 2, "{rec:?}");
        assert!(!ids.contains(&id1));
        let two = rec.iter().find(|r| r.id == id2).unwrap();
        assert_eq!(two.done, HashSet::from([0]));
        assert_eq!(two.sender, "");
        assert_eq!(two.size, 10);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_read_from_the_page_cache_succeeds_when_cached_and_never_returns_wrong_bytes() {
        let dir = tmpdir("nowait");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mut buf = vec![0; 1000];
        // Just written: cached, read at once.
        assert!(read_cached(&file, &mut buf, 5000));
        assert_eq!(buf, data[5000..6000]);
        // Past the end: short, refused (the caller reads it the slow way and fails).
        assert!(!read_cached(&file, &mut buf, 64 * 1024 - 10));
        // Written back and dropped from the cache. A NOWAIT read never waits
        // for the disk, but it may start readahead, and a fast disk can finish
        // that before the read looks again: so it is refused, or it returns
        // the right bytes.
        file.sync_all().unwrap();
        // SAFETY: advice on our own open file.
        let dropped =
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(dropped, 0);
        buf.fill(0);
        if read_cached(&file, &mut buf, 40_000) {
            assert_eq!(buf, data[40_000..41_000]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_streamed_body_is_stored_whole_and_read_back() {
        let dir = tmpdir("incoming");
        let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
        let mut body = spool.incoming();
        let mut expect = b"X-Head: 1\r\n".to_vec();
        for i in 0..3000u32 {
            let line = format!("line {i} {}\r\n", "y".repeat(200));
            body.extend(line.as_bytes());
            expect.extend_from_slice(line.as_bytes());
            body.spill_if_full().await.unwrap();
        }
        assert!(body.len() > incoming::SPILL as u64 * 2);
        let id = spool.allocate_id();
        let r = vec!["a@x.example".to_owned()];
        spool
            .store_incoming(id, "s@z.example", &r, b"X-Head: 1\r\n", body)
            .await
            .unwrap();
        assert_eq!(spool.read_body(id).await.unwrap(), expect);
        assert_eq!(
            std::fs::read_dir(dir.join("incoming")).unwrap().count(),
            0,
            "nothing left behind"
        );
        drop(spool);
        let (spool, rec, corrupt) = Spool::open(&dir, HOUR).unwrap();
        assert!(corrupt.is_empty(), "the CRC covers the streamed body");
        assert_eq!(rec.len(), 1);
        assert_eq!(spool.read_body(id).await.unwrap(), expect);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn retry_state_survives_a_restart() {
        let dir = tmpdir("retry");
        let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
        let r = vec!["a@x.example".to_owned()];
        let id = store(&spool, &r, b"deferred\r\n").await;
        spool.record_retry(id, 1, 1_000);
        spool.record_retry(id, 2, 2_000);
        settle(&spool).await;
        drop(spool);
        let (_spool, rec, _) = Spool::open(&dir, HOUR).unwrap();
        let m = rec.iter().find(|m| m.id == id).unwrap();
        assert_eq!(
            m.retry,
            Some(RetryState {
                attempts: 2,
                next_ms: 2_000
            })
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                (p.extension()? == "seg").then_some(p)
            })
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn compaction_moves_the_live_messages_forward_and_removes_the_segment() {
        let dir = tmpdir("compact");
        let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
        let r = vec!["a@x.example".to_owned(), "b@x.example".to_owned()];
        let deferred = store(&spool, &r, b"the deferred one\r\n").await;
        spool.mark_done(deferred, &[1], false);
        spool.record_retry(deferred, 3, 42);
        // 2000 messages of 1 KiB, 50 at a time (group commit).
        let mut done = Vec::new();
        for _ in 0..40 {
            let batch: Vec<_> = (0..50)
                .map(|_| {
                    let (spool, r) = (spool.clone(), r.clone());
                    tokio::spawn(async move { store(&spool, &r, &[b'x'; 1024]).await })
                })
                .collect();
            for t in batch {
                done.push(t.await.unwrap());
            }
        }
        let before = spool.usage();
        assert!(before.bytes > 2 * 1024 * 1024, "{before:?}");
        let old = seg_files(&dir);
        for id in done {
            spool.mark_done(id, &[0, 1], true);
        }
        settle(&spool).await;
        let old_bytes = std::fs::read(&old[0]).unwrap();
        spool.compact().await;
        // The closed segment was copied forward and removed; what is left
        // is the deferred message and the barrier.
        let after = spool.usage();
        assert!(!old[0].exists());
        assert!(after.bytes < 4096, "{after:?}");
        assert_eq!(after.messages, 2, "{after:?}");
        assert_eq!(
            spool.read_body(deferred).await.unwrap(),
            b"the deferred one\r\n"
        );
        drop(spool);
        // A crash after the copy but before the old segment's removal
        // leaves both copies: the message comes back once, from the later.
        std::fs::write(&old[0], &old_bytes).unwrap();
        let (spool, rec, corrupt) = Spool::open(&dir, HOUR).unwrap();
        assert!(corrupt.is_empty());
        assert_eq!(rec.len(), 2, "{} recovered", rec.len());
        assert_eq!(rec[0].id, deferred);
        assert_eq!(rec[0].done, HashSet::from([1]));
        assert_eq!(
            rec[0].retry,
            Some(RetryState {
                attempts: 3,
                next_ms: 42
            })
        );
        assert!(!old[0].exists(), "the stale copy's segment is removed");
        assert_eq!(
            spool.read_body(deferred).await.unwrap(),
            b"the deferred one\r\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_large_mostly_finished_segments_are_compacted() {
        assert!(writer::worth_compacting(4 << 20, 1 << 20));
        assert!(!writer::worth_compacting(4 << 20, (1 << 20) + 1));
        assert!(!writer::worth_compacting((1 << 20) - 1, 0));
    }

    #[tokio::test]
    async fn corrupt_record_is_skipped_reported_and_others_survive() {
        let dir = tmpdir("corrupt");
        let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
        let r = vec!["a@x.example".to_owned()];
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(store(&spool, &r, format!("message {i}\r\n").as_bytes()).await);
        }
        let loc = spool.shared.index().messages[&ids[1]].location;
        drop(spool);
        let seg = segment_path(&dir, loc.segment);
        let mut data = std::fs::read(&seg).unwrap();
        data[usize::try_from(loc.record_at + loc.body_at).unwrap()] ^= 0xff; // flip a body byte of message 1
        data.extend_from_within(..20); // and a torn tail
        std::fs::write(&seg, &data).unwrap();
        let (_spool, rec, corrupt) = Spool::open(&dir, HOUR).unwrap();
        assert_eq!(rec.len(), 2);
        assert_eq!(corrupt.len(), 1);
        assert!(corrupt[0].truncated);
        assert!(corrupt[0].moved_to.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
