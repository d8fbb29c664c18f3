//! The writer thread: the only writer of segment files. It commits queued
//! appends in groups (one `fdatasync` per batch) before acknowledging them,
//! keeps the index of live messages and removes finished segments. Its
//! loop, which also runs compaction, is `worker`'s. Done and retry records
//! wait (at most [`LAZY_DELAY`]) to go with the next batch: waking the
//! thread and writing for each of them cost about as much as the rest of a
//! delivery.
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::{error, warn};

use super::{
    format::{Location, MsgId, RetryState, done_record, retry_record, segment_path, sync_dir},
    incoming::Spilled,
};

/// A segment is closed for new messages once it is this large.
pub(super) const SEGMENT_MAX: u64 = 64 * 1024 * 1024;
/// Upper bound on records written per group commit.
pub(super) const BATCH_MAX: usize = 4096;
/// Longest a done or retry record waits for a batch to join. Lost in a
/// crash, they only make a message be delivered or tried once more.
pub(super) const LAZY_DELAY: Duration = Duration::from_millis(50);
/// Longest a batch with appends waits for the appends of bodies still
/// being received, so they share its `fdatasync` (`PostgreSQL`'s
/// `commit_delay` with `commit_siblings = 1`): on the benchmark's virtual
/// disk a flush cost about 150 µs of CPU, half a message's whole relay path.
pub(super) const COMMIT_DELAY: Duration = Duration::from_micros(300);
/// How far past a synced batch the current segment is kept written with
/// zeros. A batch then overwrites blocks the file already has, so its
/// `fdatasync` flushes data only: appending changed the file's size (and on
/// ext4 its extents) every time, and syncing that metadata meant a journal
/// commit per batch, shared with every other writer on the filesystem
/// (`PostgreSQL` pre-zeroes its WAL segments for the same reason). One
/// commit per this many bytes remains; recovery, closing a segment and a
/// compaction with no batch since the one before cut the zeros off.
pub(super) const ZERO_AHEAD: u64 = 512 * 1024;
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
    #[error("spool writer is gone")]
    Closed,
}

pub(super) enum Op {
    Append {
        id: MsgId,
        /// The record, or its start when `rest` holds the body's remainder.
        bytes: Vec<u8>,
        rest: Option<Spilled>,
        body_at: u64,
        body_len: u64,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Done {
        id: MsgId,
        rcpts: Vec<u32>,
        all: bool,
    },
    Retry {
        id: MsgId,
        retry: RetryState,
    },
    /// Compact now rather than at the next interval.
    Compact(oneshot::Sender<()>),
    /// Answered once every record queued before it is written.
    Flush(oneshot::Sender<()>),
}

pub(super) struct SegmentState {
    pub(super) reader: Arc<File>,
    /// Live messages in it.
    pub(super) live: usize,
    /// Bytes of their records.
    pub(super) live_bytes: u64,
    /// Bytes written to it.
    pub(super) size: u64,
}

/// A live message: where its record is, and what compaction must carry
/// along with it (recipients done, retry state).
pub(super) struct Entry {
    pub(super) location: Location,
    pub(super) done: Vec<u32>,
    pub(super) retry: Option<RetryState>,
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) segments: HashMap<u64, SegmentState>,
    pub(super) messages: HashMap<MsgId, Entry>,
}

pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) index: Mutex<Index>,
    pub(super) current: AtomicU64,
    /// Done and retry records not yet handed to the writer, in order.
    pub(super) lazy: Mutex<Vec<Op>>,
    /// Bodies being received (see [`COMMIT_DELAY`]).
    pub(super) receiving: Arc<AtomicUsize>,
}

impl Shared {
    pub(super) fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().expect("spool lock")
    }

    /// Queues a done or retry record for the writer's next batch, without waking it.
    pub(super) fn push_lazy(&self, op: Op) {
        self.lazy.lock().expect("spool lock").push(op);
    }

    pub(super) fn take_lazy(&self) -> Vec<Op> {
        std::mem::take(&mut *self.lazy.lock().expect("spool lock"))
    }
}

/// Tells each caller of [`super::Spool::flush`] that its records are written.
fn answer(flushed: Vec<oneshot::Sender<()>>) {
    for done in flushed {
        let _ = done.send(());
    }
}

/// The writer thread's state: the current segment and append handles to older ones.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) current: u64,
    pub(super) file: File,
    /// Bytes of records in the current segment; the file's cursor stands here.
    pub(super) len: u64,
    /// The file's length: past `len` it holds zeros ([`ZERO_AHEAD`]).
    pub(super) file_len: u64,
    /// A synced batch went in since the last compaction.
    pub(super) appended: bool,
    pub(super) old: HashMap<u64, File>,
    pub(super) broken: bool,
    pub(super) compact_every: Duration,
    /// Callers of [`super::Spool::compact`] waiting for the next compaction.
    pub(super) asked: Vec<oneshot::Sender<()>>,
}

impl Writer {
    pub(super) fn create(shared: Arc<Shared>, n: u64, compact_every: Duration) -> io::Result<Self> {
        let path = segment_path(&shared.dir, n);
        // Written at the cursor, not `O_APPEND`: the file runs ahead in zeros.
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        file.sync_all()?;
        sync_dir(&shared.dir)?;
        let reader = Arc::new(File::open(&path)?);
        shared.index().segments.insert(
            n,
            SegmentState {
                reader,
                live: 0,
                live_bytes: 0,
                size: 0,
            },
        );
        shared.current.store(n, Ordering::Release);
        Ok(Self {
            shared,
            current: n,
            file,
            len: 0,
            file_len: 0,
            appended: false,
            old: HashMap::new(),
            broken: false,
            compact_every,
            asked: Vec::new(),
        })
    }

    pub(super) fn rotate(&mut self) -> io::Result<()> {
        let next = Self::create(self.shared.clone(), self.current + 1, self.compact_every)?;
        let prev = self.current;
        let mut old = std::mem::replace(self, next);
        // Done records are appended to a closed segment: its zeros go first.
        if let Err(e) = old.cut_zeros() {
            warn!(segment = format_args!("{prev:016x}"), error = %e, "cannot cut the zeros off a closed spool segment");
        }
        self.old = old.old;
        self.asked = old.asked;
        self.old.insert(prev, old.file);
        // The previous segment may already be finished.
        self.remove_if_finished(prev);
        Ok(())
    }

    pub(super) fn commit(&mut self, batch: Vec<Op>) {
        if self.broken || self.len >= SEGMENT_MAX {
            match self.rotate() {
                Ok(()) => self.broken = false,
                Err(e) => error!(error = %e, "cannot start a new spool segment"),
            }
        }
        let mut buf = Vec::new();
        let mut waiters = Vec::new();
        let mut flushed = Vec::new();
        // Bytes of this batch already written straight to the file (streamed bodies).
        let mut direct = 0u64;
        let mut failed: Option<io::Error> = None;
        for op in batch {
            match op {
                Op::Append {
                    id,
                    bytes,
                    rest,
                    body_at,
                    body_len,
                    reply,
                } => {
                    let record_at = self.len + direct + buf.len() as u64;
                    buf.extend_from_slice(&bytes);
                    if let Some(rest) = rest
                        && failed.is_none()
                    {
                        match self.write_spilled(&mut buf, rest) {
                            Ok(n) => direct += n,
                            Err(e) => failed = Some(e),
                        }
                    }
                    let location = Location {
                        segment: self.current,
                        record_at,
                        record_len: self.len + direct + buf.len() as u64 - record_at,
                        body_at,
                        body_len,
                    };
                    waiters.push((reply, id, location));
                }
                Op::Done { id, rcpts, all } => {
                    let Some(segment) = self.note_done(id, &rcpts, all) else {
                        continue;
                    };
                    let bytes = done_record(id, &rcpts, all);
                    if segment == self.current {
                        buf.extend_from_slice(&bytes);
                    } else {
                        self.append_old(segment, &bytes);
                        if all {
                            self.remove_if_finished(segment);
                        }
                    }
                }
                Op::Compact(done) => self.asked.push(done),
                Op::Flush(done) => flushed.push(done),
                Op::Retry { id, retry } => {
                    let segment = {
                        let mut index = self.shared.index();
                        let Some(e) = index.messages.get_mut(&id) else {
                            continue;
                        };
                        e.retry = Some(retry);
                        e.location.segment
                    };
                    let bytes = retry_record(id, retry);
                    if segment == self.current {
                        buf.extend_from_slice(&bytes);
                    } else {
                        self.append_old(segment, &bytes);
                    }
                }
            }
        }
        if buf.is_empty() && direct == 0 && failed.is_none() {
            answer(flushed);
            return;
        }
        let result = if self.broken {
            Err(io::Error::other(
                "spool segment unusable after an earlier error",
            ))
        } else if let Some(e) = failed {
            Err(e)
        } else {
            if !waiters.is_empty() {
                self.appended = true;
                let from = self.len + direct;
                self.zero_ahead(from, from + buf.len() as u64);
            }
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
                self.len += direct + buf.len() as u64;
                self.file_len = self.file_len.max(self.len);
                let mut index = self.shared.index();
                let Index { segments, messages } = &mut *index;
                if let Some(s) = segments.get_mut(&self.current) {
                    s.size = self.len;
                    s.live += waiters.len();
                    s.live_bytes += waiters.iter().map(|w| w.2.record_len).sum::<u64>();
                }
                for (reply, id, location) in waiters {
                    messages.insert(
                        id,
                        Entry {
                            location,
                            done: Vec::new(),
                            retry: None,
                        },
                    );
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                error!(error = %e, "spool write failed; answering 451 for {} messages", waiters.len());
                // Cut any partial write off so later records stay parseable; after a
                // failed fsync the file's state is unknown, so start a new segment.
                if self.truncate(self.len).is_err() || e.kind() != io::ErrorKind::StorageFull {
                    self.broken = true;
                }
                let kind = e.kind();
                let msg = e.to_string();
                for (reply, _, _) in waiters {
                    let _ = reply.send(Err(SpoolError::Io(io::Error::new(kind, msg.clone()))));
                }
            }
        }
        answer(flushed);
    }

    /// Before a batch goes from `from` (the cursor) to `end`: makes the
    /// current segment's file hold zeros up to [`ZERO_AHEAD`] past `end`,
    /// unless it already reaches past `end`. Only an optimisation: if the
    /// zeros cannot be written, the batch is appended as without them.
    fn zero_ahead(&mut self, from: u64, end: u64) {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        if end <= self.file_len {
            return;
        }
        // Streamed bodies of this batch may already have grown the file to `from`.
        let start = self.file_len.max(from);
        let target = end + ZERO_AHEAD;
        let mut at = start;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64);
            if let Err(e) = self.file.write_all_at(&ZEROS[..n as usize], at) {
                warn!(error = %e, "cannot zero the spool segment ahead; appending instead");
                let _ = self.file.set_len(start);
                self.file_len = start;
                return;
            }
            at += n;
        }
        self.file_len = target;
    }

    /// Cuts the current segment's file to `len` bytes, cursor there.
    pub(super) fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file_len = len;
        self.file.set_len(len)?;
        self.file.seek(SeekFrom::Start(len)).map(drop)
    }

    /// Drops the zeros past the current segment's records.
    pub(super) fn cut_zeros(&mut self) -> io::Result<()> {
        if self.file_len > self.len {
            self.truncate(self.len)?;
        }
        Ok(())
    }

    /// Writes `buf` (the record's start), then the streamed body's file
    /// part, leaving its in-memory tail in `buf`; returns the bytes written.
    fn write_spilled(&mut self, buf: &mut Vec<u8>, rest: Spilled) -> io::Result<u64> {
        let mut n = 0;
        if let Some((file, len)) = rest.file {
            self.file.write_all(buf)?;
            n += buf.len() as u64;
            buf.clear();
            let mut src = &*file;
            src.seek(SeekFrom::Start(0))?;
            let copied = io::copy(&mut src.take(len), &mut self.file)?;
            if copied != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "streamed message body shorter than received",
                ));
            }
            n += copied;
        }
        buf.extend_from_slice(&rest.tail);
        Ok(n)
    }

    /// Applies a done record to the index; returns the message's segment
    /// (`None` if it is not live, e.g. a second done for it).
    fn note_done(&self, id: MsgId, rcpts: &[u32], all: bool) -> Option<u64> {
        let mut index = self.shared.index();
        let Index { segments, messages } = &mut *index;
        let e = messages.get_mut(&id)?;
        let location = e.location;
        if all {
            messages.remove(&id);
            if let Some(s) = segments.get_mut(&location.segment) {
                s.live = s.live.saturating_sub(1);
                s.live_bytes = s.live_bytes.saturating_sub(location.record_len);
            }
        } else {
            e.done.extend_from_slice(rcpts);
        }
        Some(location.segment)
    }

    /// Deletes segment `n` if it is not the current one and no message in it is live.
    pub(super) fn remove_if_finished(&mut self, n: u64) {
        if n == self.current {
            return;
        }
        {
            let mut index = self.shared.index();
            if index.segments.get(&n).is_none_or(|s| s.live > 0) {
                return;
            }
            index.segments.remove(&n);
        }
        self.old.remove(&n);
        let path = segment_path(&self.shared.dir, n);
        // A reader that still holds the file keeps reading it after the unlink.
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %e, "could not remove finished spool segment");
        }
    }

    pub(super) fn append_old(&mut self, segment: u64, bytes: &[u8]) {
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
        if let Some(f) = self.old.get_mut(&segment) {
            if f.write_all(bytes).is_err() {
                self.old.remove(&segment);
            } else if let Some(s) = self.shared.index().segments.get_mut(&segment) {
                s.size += bytes.len() as u64;
            }
        }
    }
}
