//! The writer thread: the only writer of segment files, committing queued
//! appends in groups (one `fdatasync` per batch) before acknowledging them.
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, Write},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use tokio::sync::oneshot;
use tracing::error;

use super::format::{segment_path, sync_dir};

/// A segment is closed for new messages once it is this large.
pub(super) const SEGMENT_MAX: u64 = 64 * 1024 * 1024;
/// Upper bound on records written per group commit.
pub(super) const BATCH_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
    #[error("spool writer is gone")]
    Closed,
}

pub(super) enum Op {
    Append {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(u64, u64), SpoolError>>,
    },
    Done {
        segment: u64,
        bytes: Vec<u8>,
    },
}

pub(super) struct SegmentState {
    pub(super) reader: Arc<File>,
    pub(super) live: usize,
}

pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) segments: Mutex<HashMap<u64, SegmentState>>,
    pub(super) current: AtomicU64,
}

/// The writer thread's state: the current segment and append handles to older ones.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) current: u64,
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) old: HashMap<u64, File>,
    pub(super) broken: bool,
}

impl Writer {
    pub(super) fn create(shared: Arc<Shared>, n: u64) -> io::Result<Self> {
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

    pub(super) fn rotate(&mut self) -> io::Result<()> {
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

    pub(super) fn run(mut self, rx: &mpsc::Receiver<Op>) {
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

    pub(super) fn commit(&mut self, batch: Vec<Op>) {
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
