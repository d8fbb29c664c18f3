//! The durable spool: an append-only log of segments with group commit.
//!
//! # Format
//! The spool directory holds segment files `NNNNNNNNNNNNNNNN.seg` (16 hex
//! digits, increasing) and `corrupt/` for anything that failed to parse at
//! start-up. A segment is a sequence of records:
//!
//! ```text
//! magic  u32 LE  0x3152_4C53 ("SLR1")
//! kind   u8      1 = message, 2 = recipients done
//! len    u32 LE  payload length
//! crc    u32 LE  CRC-32 of kind, len and payload
//! payload
//! ```
//!
//! A message payload is `id u64, received_ms u64, sender (u16 len + bytes),
//! rcpt count u32, each rcpt (u16 len + bytes), body_len u64, body`. A done
//! payload is `id u64, count u32, rcpt indexes u32…` (count `u32::MAX` = all).
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
//! A done record goes to the segment that holds its message, so each segment
//! is self-contained; a segment none of whose messages is live is deleted.
//!
//! # Recovery
//! At start-up every segment is parsed. A record whose header or CRC is
//! wrong is never delivered, not even in part: the segment is copied to
//! `corrupt/` and reported, parsing resumes at the next valid record, and a
//! torn tail (a write cut by a crash, never acknowledged) is truncated.
mod format;
mod writer;

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use tokio::sync::oneshot;
use tracing::{info, warn};

pub use self::format::{CorruptReport, Location, MsgId, Recovered};
pub use self::writer::SpoolError;
use self::{
    format::{
        ALL, KIND_DONE, message_record, now_ms, record, recover_segment, segment_path, sync_dir,
    },
    writer::{Op, SegmentState, Shared, Writer},
};

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    next_id: Arc<AtomicU64>,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovers every message
    /// in it, and starts the writer thread.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Vec<Recovered>, Vec<CorruptReport>)> {
        use anyhow::Context;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create spool dir {}", dir.display()))?;
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)
            .with_context(|| format!("read spool dir {}", dir.display()))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect();
        numbers.sort_unstable();

        let mut recovered = Vec::new();
        let mut reports = Vec::new();
        let mut segments = HashMap::new();
        let mut max_id = 0;
        for &n in &numbers {
            let path = segment_path(dir, n);
            let (msgs, report) = recover_segment(dir, &path)
                .with_context(|| format!("recover {}", path.display()))?;
            reports.extend(report);
            max_id = msgs.iter().map(|m| m.id).fold(max_id, u64::max);
            if msgs.is_empty() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("remove {}", path.display()))?;
                continue;
            }
            let reader = Arc::new(File::open(&path)?);
            segments.insert(
                n,
                SegmentState {
                    reader,
                    live: msgs.len(),
                },
            );
            recovered.extend(msgs);
        }
        sync_dir(dir).context("fsync spool dir")?;

        let current = numbers.last().map_or(1, |n| n + 1);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            segments: Mutex::new(segments),
            current: AtomicU64::new(current),
        });
        let writer = Writer::create(shared.clone(), current).context("create spool segment")?;
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

    /// Writes a message durably; returns once it is on stable storage.
    pub async fn store(
        &self,
        id: MsgId,
        sender: &str,
        rcpts: &[String],
        body: &[u8],
    ) -> Result<(MsgId, u64, Location), SpoolError> {
        let received_ms = now_ms();
        let (bytes, body_at) = message_record(id, received_ms, sender, rcpts, body);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Append { bytes, reply })
            .map_err(|_| SpoolError::Closed)?;
        let (segment, offset) = rx.await.map_err(|_| SpoolError::Closed)??;
        Ok((
            id,
            received_ms,
            Location {
                segment,
                body_offset: offset + body_at,
                body_len: body.len() as u64,
            },
        ))
    }

    /// Records that recipients (by index) are finished; `all` when the whole
    /// message is, which also releases its segment.
    pub fn mark_done(&self, id: MsgId, location: &Location, rcpts: &[u32], all: bool) {
        let mut p = Vec::with_capacity(12 + 4 * rcpts.len());
        p.extend_from_slice(&id.to_le_bytes());
        if all {
            p.extend_from_slice(&ALL.to_le_bytes());
        } else {
            p.extend_from_slice(&(rcpts.len() as u32).to_le_bytes());
            for r in rcpts {
                p.extend_from_slice(&r.to_le_bytes());
            }
        }
        let _ = self.tx.send(Op::Done {
            segment: location.segment,
            bytes: record(KIND_DONE, &p),
        });
        if all {
            self.release(location.segment);
        }
    }

    fn release(&self, segment: u64) {
        let mut segs = self.shared.segments.lock().expect("spool lock");
        let Some(s) = segs.get_mut(&segment) else {
            return;
        };
        s.live = s.live.saturating_sub(1);
        if s.live == 0 && segment != self.shared.current.load(Ordering::Acquire) {
            segs.remove(&segment);
            let path = segment_path(&self.shared.dir, segment);
            // Only the writer thread appends; a done record racing with this
            // unlink lands in an unlinked file, which is harmless.
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "could not remove finished spool segment");
            }
        }
    }

    /// Reads a message body back (for delivery).
    pub async fn read_body(&self, loc: Location) -> io::Result<Vec<u8>> {
        let file = {
            let segs = self.shared.segments.lock().expect("spool lock");
            segs.get(&loc.segment).map(|s| s.reader.clone())
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("spool segment {:016x} is gone", loc.segment),
            )
        })?;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; usize::try_from(loc.body_len).map_err(io::Error::other)?];
            file.read_exact_at(&mut buf, loc.body_offset)?;
            Ok(buf)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Number of live messages per segment (for tests and metrics).
    pub fn live_segments(&self) -> usize {
        self.shared.segments.lock().expect("spool lock").len()
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

    #[tokio::test]
    async fn stored_messages_are_recovered_until_done() {
        let dir = tmpdir("recover");
        let (spool, rec, _) = Spool::open(&dir).unwrap();
        assert!(rec.is_empty());
        let rcpts = vec!["a@x.example".to_owned(), "b@y.example".to_owned()];
        let (id1, _, loc1) = spool
            .store(spool.allocate_id(), "s@z.example", &rcpts, b"body one\r\n")
            .await
            .unwrap();
        let (id2, _, loc2) = spool
            .store(spool.allocate_id(), "", &rcpts, b"body two\r\n")
            .await
            .unwrap();
        assert_eq!(spool.read_body(loc2).await.unwrap(), b"body two\r\n");
        spool.mark_done(id1, &loc1, &[0, 1], true);
        spool.mark_done(id2, &loc2, &[0], false);
        // A store after the done records forces them through the writer.
        spool
            .store(spool.allocate_id(), "s@z.example", &rcpts, b"three\r\n")
            .await
            .unwrap();
        drop(spool);
        let (_spool, rec, corrupt) = Spool::open(&dir).unwrap();
        assert!(corrupt.is_empty());
        let ids: Vec<_> = rec.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 2, "{rec:?}");
        assert!(!ids.contains(&id1));
        let two = rec.iter().find(|r| r.id == id2).unwrap();
        assert_eq!(two.done, HashSet::from([0]));
        assert_eq!(two.sender, "");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn corrupt_record_is_skipped_reported_and_others_survive() {
        let dir = tmpdir("corrupt");
        let (spool, _, _) = Spool::open(&dir).unwrap();
        let r = vec!["a@x.example".to_owned()];
        let mut locs = Vec::new();
        for i in 0..3 {
            locs.push(
                spool
                    .store(
                        spool.allocate_id(),
                        "s@z.example",
                        &r,
                        format!("message {i}\r\n").as_bytes(),
                    )
                    .await
                    .unwrap()
                    .2,
            );
        }
        drop(spool);
        let seg = segment_path(&dir, locs[1].segment);
        let mut data = std::fs::read(&seg).unwrap();
        data[usize::try_from(locs[1].body_offset).unwrap()] ^= 0xff; // flip a body byte of message 1
        data.extend_from_within(..20); // and a torn tail
        std::fs::write(&seg, &data).unwrap();
        let (_spool, rec, corrupt) = Spool::open(&dir).unwrap();
        assert_eq!(rec.len(), 2);
        assert_eq!(corrupt.len(), 1);
        assert!(corrupt[0].truncated);
        assert!(corrupt[0].moved_to.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
