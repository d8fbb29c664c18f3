//! The writer thread's loop: it takes what is queued and commits it as one
//! batch, and runs compaction on its schedule or when asked. Above both
//! [`super::writer`] (the segment files) and [`super::compaction`].
use std::{
    sync::{atomic::Ordering, mpsc},
    time::Instant,
};

use super::writer::{BATCH_MAX, COMMIT_DELAY, LAZY_DELAY, Op, Writer};

/// Runs the writer thread until every sender is gone.
pub(super) fn run(mut writer: Writer, rx: &mpsc::Receiver<Op>) {
    let mut last_compaction = Instant::now();
    loop {
        let wait = writer
            .compact_every
            .saturating_sub(last_compaction.elapsed());
        // The records that waited come first: each is about a message
        // committed before it, and the batch's appends may be barriers.
        let batch = match rx.recv_timeout(wait.min(LAZY_DELAY)) {
            Ok(first) => {
                let mut batch = writer.shared.take_lazy();
                batch.push(first);
                drain(rx, &mut batch);
                if writer.shared.receiving.load(Ordering::Relaxed) > 0
                    && batch.len() < BATCH_MAX
                    && batch.iter().any(|op| matches!(op, Op::Append { .. }))
                {
                    // One sleep, then take what came: waiting on the
                    // channel instead woke this thread (and made its
                    // sender pay a futex call) for every append.
                    std::thread::sleep(COMMIT_DELAY);
                    drain(rx, &mut batch);
                }
                batch
            }
            Err(mpsc::RecvTimeoutError::Timeout) => writer.shared.take_lazy(),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                writer.commit(writer.shared.take_lazy());
                return;
            }
        };
        if !batch.is_empty() {
            writer.commit(batch);
        }
        if !writer.asked.is_empty() {
            writer.compact();
            last_compaction = Instant::now();
            for done in writer.asked.drain(..) {
                let _ = done.send(());
            }
        }
        if last_compaction.elapsed() >= writer.compact_every {
            writer.compact();
            last_compaction = Instant::now();
        }
    }
}

/// Moves what is queued on `rx` into `batch`, up to [`BATCH_MAX`] ops.
fn drain(rx: &mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
    while batch.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}
