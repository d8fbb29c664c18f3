//! Compaction, run by the writer thread: a mostly finished segment has its
//! live messages copied forward (with their done and retry state), synced
//! and re-indexed, and only then is it removed.
use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
};

use tracing::{error, info, warn};

use super::{
    format::{Location, MsgId, RetryState, done_record, retry_record, segment_path, sync_dir},
    writer::{Index, Writer},
};

/// Segments smaller than this are not worth compacting: they cost less
/// disk than the copy would cost writes.
pub(super) const COMPACT_MIN_SIZE: u64 = 1024 * 1024;

/// Whether a segment of `size` bytes, `live` of them in live messages, is
/// mostly finished: at least 1 MiB and three quarters dead. Copying the
/// live quarter forward then frees at least three times what it writes.
pub(super) fn worth_compacting(size: u64, live: u64) -> bool {
    size >= COMPACT_MIN_SIZE && live.saturating_mul(4) <= size
}

impl Writer {
    /// Compaction: the current segment, once mostly finished, is closed;
    /// every mostly finished older segment has its live messages copied
    /// forward and is removed.
    pub(super) fn compact(&mut self) {
        // Zeros are for the next batches; with none since the last
        // compaction, the disk gets them back.
        if !std::mem::take(&mut self.appended)
            && let Err(e) = self.cut_zeros()
        {
            warn!(error = %e, "cannot cut the zeros off the spool segment");
        }
        loop {
            let (current_worth, victims) = {
                let index = self.shared.index();
                // An all-finished current segment is closed (and so removed) too.
                let current_worth = index
                    .segments
                    .get(&self.current)
                    .is_some_and(|s| worth_compacting(self.len, s.live_bytes));
                let mut victims: Vec<u64> = index
                    .segments
                    .iter()
                    .filter(|(n, s)| **n != self.current && worth_compacting(s.size, s.live_bytes))
                    .map(|(n, _)| *n)
                    .collect();
                victims.sort_unstable();
                (current_worth, victims)
            };
            if current_worth {
                // Closed, it is compacted on the next turn like any other.
                if let Err(e) = self.rotate() {
                    error!(error = %e, "cannot start a new spool segment for compaction");
                    return;
                }
                continue;
            }
            for n in victims {
                if let Err(e) = self.move_forward(n) {
                    // The old segment stays whole; nothing was lost, only space.
                    error!(segment = format_args!("{n:016x}"), error = %e, "spool compaction failed");
                    self.broken = true;
                    return;
                }
            }
            return;
        }
    }

    /// Copies the live messages of segment `n` (with their done and retry
    /// records) to the current segment, makes the copy durable, points the
    /// index at it, and only then removes `n`. A crash in between leaves
    /// both copies; recovery keeps the later one.
    fn move_forward(&mut self, n: u64) -> io::Result<()> {
        let moving: Vec<(MsgId, Location, Vec<u32>, Option<RetryState>)> = {
            let index = self.shared.index();
            let mut m: Vec<_> = index
                .messages
                .iter()
                .filter(|(_, e)| e.location.segment == n)
                .map(|(id, e)| (*id, e.location, e.done.clone(), e.retry))
                .collect();
            m.sort_unstable_by_key(|(_, l, _, _)| l.record_at);
            m
        };
        let source = File::open(segment_path(&self.shared.dir, n))?;
        let start = self.len;
        let mut moved = Vec::with_capacity(moving.len());
        let mut copied = 0;
        let result = (|| {
            for (id, location, done, retry) in &moving {
                (&source).seek(SeekFrom::Start(location.record_at))?;
                // Kernel to kernel (copy_file_range) where it can, a small
                // buffer otherwise: a large body never sits in memory whole.
                let n = io::copy(&mut (&source).take(location.record_len), &mut self.file)?;
                if n != location.record_len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "spool record shorter than indexed",
                    ));
                }
                let record_at = self.len + copied;
                copied += n;
                let mut extra = Vec::new();
                if !done.is_empty() {
                    extra.extend_from_slice(&done_record(*id, done, false));
                }
                if let Some(r) = retry {
                    extra.extend_from_slice(&retry_record(*id, *r));
                }
                self.file.write_all(&extra)?;
                copied += extra.len() as u64;
                moved.push((
                    *id,
                    Location {
                        segment: self.current,
                        record_at,
                        ..*location
                    },
                ));
            }
            self.file.sync_data()
        })();
        if let Err(e) = result {
            let _ = self.truncate(start);
            return Err(e);
        }
        self.len += copied;
        self.file_len = self.file_len.max(self.len);
        {
            let mut index = self.shared.index();
            let Index { segments, messages } = &mut *index;
            for (id, location) in &moved {
                // A message finished while it was being copied stays finished.
                if let Some(e) = messages.get_mut(id) {
                    e.location = *location;
                    if let Some(s) = segments.get_mut(&self.current) {
                        s.live += 1;
                        s.live_bytes += location.record_len;
                    }
                }
            }
            if let Some(s) = segments.get_mut(&self.current) {
                s.size = self.len;
            }
            if let Some(s) = segments.get_mut(&n) {
                s.live = 0;
                s.live_bytes = 0;
            }
        }
        self.remove_if_finished(n);
        sync_dir(&self.shared.dir)?;
        info!(
            segment = format_args!("{n:016x}"),
            messages = moved.len(),
            bytes = copied,
            "spool segment compacted"
        );
        Ok(())
    }
}
