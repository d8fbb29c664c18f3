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
use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

const MAGIC: u32 = 0x3152_4C53;
const HEADER: usize = 13;
const KIND_MESSAGE: u8 = 1;
const KIND_DONE: u8 = 2;
/// A segment is closed for new messages once it is this large.
const SEGMENT_MAX: u64 = 64 * 1024 * 1024;
/// Upper bound on records written per group commit.
const BATCH_MAX: usize = 4096;
const ALL: u32 = u32::MAX;

pub type MsgId = u64;

/// Where a spooled message lives.
#[derive(Clone, Copy, Debug)]
pub struct Location {
    pub segment: u64,
    pub body_offset: u64,
    pub body_len: u64,
}

/// A message as found in the spool at start-up.
#[derive(Debug)]
pub struct Recovered {
    pub id: MsgId,
    pub received_ms: u64,
    pub sender: String,
    pub rcpts: Vec<String>,
    /// Indexes of recipients already delivered or bounced.
    pub done: HashSet<u32>,
    pub location: Location,
}

/// Damage found at start-up.
#[derive(Debug)]
pub struct CorruptReport {
    pub segment: PathBuf,
    pub moved_to: PathBuf,
    pub bad_bytes: u64,
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
    #[error("spool writer is gone")]
    Closed,
}

enum Op {
    Append {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(u64, u64), SpoolError>>,
    },
    Done {
        segment: u64,
        bytes: Vec<u8>,
    },
}

struct SegmentState {
    reader: Arc<File>,
    live: usize,
}

struct Shared {
    dir: PathBuf,
    segments: Mutex<HashMap<u64, SegmentState>>,
    current: AtomicU64,
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
    next_id: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.seg"))
}

fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(kind);
    let len = u32::try_from(payload.len()).expect("record under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.extend_from_slice(&(b.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out.extend_from_slice(&b[..b.len().min(usize::from(u16::MAX))]);
}

/// Encodes a message record; returns it and the body's offset inside it.
fn message_record(
    id: MsgId,
    received_ms: u64,
    sender: &str,
    rcpts: &[String],
    body: &[u8],
) -> (Vec<u8>, u64) {
    let mut p = Vec::with_capacity(64 + body.len());
    p.extend_from_slice(&id.to_le_bytes());
    p.extend_from_slice(&received_ms.to_le_bytes());
    put_str(&mut p, sender);
    p.extend_from_slice(
        &u32::try_from(rcpts.len())
            .expect("rcpt count")
            .to_le_bytes(),
    );
    for r in rcpts {
        put_str(&mut p, r);
    }
    p.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let body_at = (HEADER + p.len()) as u64;
    p.extend_from_slice(body);
    (record(KIND_MESSAGE, &p), body_at)
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u16()?;
        String::from_utf8(self.take(usize::from(n))?.to_vec()).ok()
    }
}

/// A record that passed its header and CRC checks.
enum Parsed {
    Message {
        id: MsgId,
        received_ms: u64,
        sender: String,
        rcpts: Vec<String>,
        body_offset: u64,
        body_len: u64,
    },
    Done {
        id: MsgId,
        rcpts: Vec<u32>,
    },
}

/// Parses the record at `pos`; `None` if it is torn, corrupt or unknown.
fn parse_record(data: &[u8], pos: usize) -> Option<(Parsed, usize)> {
    let h = data.get(pos..pos + HEADER)?;
    if u32::from_le_bytes(h[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let kind = h[4];
    let len = u32::from_le_bytes(h[5..9].try_into().ok()?);
    let crc = u32::from_le_bytes(h[9..13].try_into().ok()?);
    let payload = data.get(pos + HEADER..pos + HEADER + len as usize)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[kind]);
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    if hasher.finalize() != crc {
        return None;
    }
    let mut c = Cursor(payload);
    let parsed = match kind {
        KIND_MESSAGE => {
            let id = c.u64()?;
            let received_ms = c.u64()?;
            let sender = c.string()?;
            let n = c.u32()?;
            let rcpts = (0..n).map(|_| c.string()).collect::<Option<Vec<_>>>()?;
            let body_len = c.u64()?;
            let body_offset = (pos + HEADER + payload.len() - c.0.len()) as u64;
            if c.0.len() as u64 != body_len {
                return None;
            }
            Parsed::Message {
                id,
                received_ms,
                sender,
                rcpts,
                body_offset,
                body_len,
            }
        }
        KIND_DONE => {
            let id = c.u64()?;
            let n = c.u32()?;
            let rcpts = if n == ALL {
                vec![ALL]
            } else {
                (0..n).map(|_| c.u32()).collect::<Option<Vec<_>>>()?
            };
            Parsed::Done { id, rcpts }
        }
        _ => return None,
    };
    Some((parsed, pos + HEADER + len as usize))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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

fn recover_segment(dir: &Path, path: &Path) -> io::Result<(Vec<Recovered>, Option<CorruptReport>)> {
    let data = std::fs::read(path)?;
    let segment = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .unwrap_or_default();
    let mut msgs: Vec<Recovered> = Vec::new();
    let mut index: HashMap<MsgId, usize> = HashMap::new();
    let mut done_all = HashSet::new();
    let mut bad_bytes = 0u64;
    let mut good_end = 0;
    let mut pos = 0;
    while pos < data.len() {
        if let Some((rec, next)) = parse_record(&data, pos) {
            match rec {
                Parsed::Message {
                    id,
                    received_ms,
                    sender,
                    rcpts,
                    body_offset,
                    body_len,
                } => {
                    index.insert(id, msgs.len());
                    msgs.push(Recovered {
                        id,
                        received_ms,
                        sender,
                        rcpts,
                        done: HashSet::new(),
                        location: Location {
                            segment,
                            body_offset,
                            body_len,
                        },
                    });
                }
                Parsed::Done { id, rcpts } => {
                    if rcpts == [ALL] {
                        done_all.insert(id);
                    } else if let Some(&i) = index.get(&id) {
                        msgs[i].done.extend(rcpts);
                    }
                }
            }
            pos = next;
            good_end = pos;
            continue;
        }
        // Resynchronise: the next offset where a whole valid record starts.
        let start = pos;
        pos += 1;
        while pos < data.len() && parse_record(&data, pos).is_none() {
            pos += 1;
        }
        bad_bytes += (pos - start) as u64;
    }
    let mut report = None;
    if bad_bytes > 0 {
        let corrupt = dir.join("corrupt");
        std::fs::create_dir_all(&corrupt)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let moved_to = corrupt.join(format!("{name}.{}", now_ms()));
        std::fs::write(&moved_to, &data)?;
        File::open(&moved_to)?.sync_all()?;
        sync_dir(&corrupt)?;
        let truncated = good_end < data.len();
        if truncated {
            OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(good_end as u64)?;
        }
        error!(
            segment = %path.display(), moved_to = %moved_to.display(), bad_bytes, truncated,
            "corrupt spool data: copy moved aside, unreadable records skipped (never delivered)"
        );
        report = Some(CorruptReport {
            segment: path.to_owned(),
            moved_to,
            bad_bytes,
            truncated,
        });
    }
    msgs.retain(|m| {
        !done_all.contains(&m.id) && (0..m.rcpts.len() as u32).any(|i| !m.done.contains(&i))
    });
    Ok((msgs, report))
}

/// The writer thread's state: the current segment and append handles to older ones.
struct Writer {
    shared: Arc<Shared>,
    current: u64,
    file: File,
    len: u64,
    old: HashMap<u64, File>,
    broken: bool,
}

impl Writer {
    fn create(shared: Arc<Shared>, n: u64) -> io::Result<Self> {
        let path = segment_path(&shared.dir, n);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        file.sync_all()?;
        sync_dir(&shared.dir)?;
        let reader = Arc::new(File::open(&path)?);
        shared
            .segments
            .lock()
            .expect("spool lock")
            .insert(n, SegmentState { reader, live: 0 });
        shared.current.store(n, Ordering::Release);
        Ok(Self {
            shared,
            current: n,
            file,
            len: 0,
            old: HashMap::new(),
            broken: false,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let next = Self::create(self.shared.clone(), self.current + 1)?;
        let prev = self.current;
        let old = std::mem::replace(self, next);
        self.old = old.old;
        // The previous segment may already be finished.
        let mut segs = self.shared.segments.lock().expect("spool lock");
        if segs.get(&prev).is_some_and(|s| s.live == 0) {
            segs.remove(&prev);
            let _ = std::fs::remove_file(segment_path(&self.shared.dir, prev));
        } else {
            self.old.insert(prev, old.file);
        }
        Ok(())
    }

    fn run(mut self, rx: &mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Op>) {
        if self.broken || self.len >= SEGMENT_MAX {
            match self.rotate() {
                Ok(()) => self.broken = false,
                Err(e) => error!(error = %e, "cannot start a new spool segment"),
            }
        }
        let mut buf = Vec::new();
        let mut waiters = Vec::new();
        for op in batch {
            match op {
                Op::Append { bytes, reply } => {
                    waiters.push((reply, self.len + buf.len() as u64));
                    buf.extend_from_slice(&bytes);
                }
                Op::Done { segment, bytes } if segment == self.current => {
                    buf.extend_from_slice(&bytes);
                }
                Op::Done { segment, bytes } => self.append_old(segment, &bytes),
            }
        }
        if buf.is_empty() {
            return;
        }
        let result = if self.broken {
            Err(io::Error::other(
                "spool segment unusable after an earlier error",
            ))
        } else {
            self.file.write_all(&buf).and_then(|()| {
                if waiters.is_empty() {
                    Ok(())
                } else {
                    self.file.sync_data()
                }
            })
        };
        match result {
            Ok(()) => {
                self.len += buf.len() as u64;
                if !waiters.is_empty() {
                    let mut segs = self.shared.segments.lock().expect("spool lock");
                    if let Some(s) = segs.get_mut(&self.current) {
                        s.live += waiters.len();
                    }
                }
                for (reply, off) in waiters {
                    let _ = reply.send(Ok((self.current, off)));
                }
            }
            Err(e) => {
                error!(error = %e, "spool write failed; answering 451 for {} messages", waiters.len());
                // Cut any partial write off so later records stay parseable; after a
                // failed fsync the file's state is unknown, so start a new segment.
                if self.file.set_len(self.len).is_err() || e.kind() != io::ErrorKind::StorageFull {
                    self.broken = true;
                }
                let kind = e.kind();
                let msg = e.to_string();
                for (reply, _) in waiters {
                    let _ = reply.send(Err(SpoolError::Io(io::Error::new(kind, msg.clone()))));
                }
            }
        }
    }

    fn append_old(&mut self, segment: u64, bytes: &[u8]) {
        if !self.old.contains_key(&segment) {
            match OpenOptions::new()
                .append(true)
                .open(segment_path(&self.shared.dir, segment))
            {
                Ok(f) => {
                    self.old.insert(segment, f);
                }
                Err(_) => return, // finished and removed already
            }
        }
        if let Some(f) = self.old.get_mut(&segment)
            && f.write_all(bytes).is_err()
        {
            self.old.remove(&segment);
        }
        // Forget handles of removed segments now and then.
        if self.old.len() > 64 {
            let segs = self.shared.segments.lock().expect("spool lock");
            self.old.retain(|n, _| segs.contains_key(n));
        }
    }
}

#[cfg(test)]
mod tests {
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
