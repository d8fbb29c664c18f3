use std::{collections::HashSet, path::PathBuf, sync::atomic::Ordering};

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
    let dropped = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
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
    assert!(compaction::worth_compacting(4 << 20, 1 << 20));
    assert!(!compaction::worth_compacting(4 << 20, (1 << 20) + 1));
    assert!(!compaction::worth_compacting((1 << 20) - 1, 0));
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

#[tokio::test]
async fn the_header_section_is_offered_only_while_the_body_is_all_in_memory() {
    let dir = tmpdir("section");
    let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
    let mut body = spool.incoming();
    body.extend(b"Subject: a\r\nReceived: x\r\n\r\nbody\r\n");
    assert_eq!(
        body.header_section(),
        Some(&b"Subject: a\r\nReceived: x\r\n\r\n"[..])
    );
    let mut headers_only = spool.incoming();
    headers_only.extend(b"Subject: a\r\n");
    assert_eq!(headers_only.header_section(), Some(&b"Subject: a\r\n"[..]));
    body.extend(&vec![b'y'; incoming::SPILL]);
    body.spill_if_full().await.unwrap();
    assert_eq!(body.header_section(), None, "spilled: read from the spool");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The writer's commit delay waits only while a body is being received.
#[tokio::test]
async fn a_body_counts_as_being_received_until_it_is_stored_or_dropped() {
    let dir = tmpdir("receiving");
    let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
    let receiving = || spool.shared.receiving.load(Ordering::Relaxed);
    let mut stored = spool.incoming();
    let dropped = spool.incoming();
    assert_eq!(receiving(), 2);
    drop(dropped);
    assert_eq!(receiving(), 1);
    stored.extend(b"Subject: s\r\n\r\nbody\r\n");
    let id = spool.allocate_id();
    let rcpts = ["r@x.example".to_owned()];
    spool
        .store_incoming(id, "s@x.example", &rcpts, b"", stored)
        .await
        .unwrap();
    assert_eq!(receiving(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_segment_runs_ahead_in_zeros_that_recovery_cuts_off_quietly() {
    let dir = tmpdir("zeros");
    let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
    let r = vec!["a@x.example".to_owned()];
    let ids = [
        store(&spool, &r, b"one\r\n").await,
        store(&spool, &r, b"two\r\n").await,
    ];
    spool.flush().await;
    let seg = seg_files(&dir).pop().unwrap();
    let records = spool.usage().bytes;
    let on_disk = std::fs::metadata(&seg).unwrap().len();
    assert!(
        on_disk > records + writer::ZERO_AHEAD / 2,
        "{on_disk} bytes for {records}"
    );
    drop(spool);
    let (spool, rec, corrupt) = Spool::open(&dir, HOUR).unwrap();
    assert!(corrupt.is_empty(), "{corrupt:?}");
    assert_eq!(rec.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), records);
    // A done record now goes after the records, not after the zeros.
    spool.mark_done(ids[0], &[0], true);
    spool.flush().await;
    drop(spool);
    let (_spool, rec, corrupt) = Spool::open(&dir, HOUR).unwrap();
    assert!(corrupt.is_empty(), "{corrupt:?}");
    assert_eq!(rec.iter().map(|m| m.id).collect::<Vec<_>>(), [ids[1]]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_torn_record_before_the_zeros_is_reported_and_the_zeros_are_not() {
    let dir = tmpdir("torn-zeros");
    let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
    let id = store(&spool, &["a@x.example".to_owned()], b"kept\r\n").await;
    spool.flush().await;
    let records = spool.usage().bytes;
    drop(spool);
    let seg = seg_files(&dir).pop().unwrap();
    let mut data = std::fs::read(&seg).unwrap();
    let torn = 20;
    let copy = data[..torn].to_vec(); // a record's start, as a crash cuts it
    data[usize::try_from(records).unwrap()..][..torn].copy_from_slice(&copy);
    std::fs::write(&seg, &data).unwrap();
    let (_spool, rec, corrupt) = Spool::open(&dir, HOUR).unwrap();
    assert_eq!(rec.iter().map(|m| m.id).collect::<Vec<_>>(), [id]);
    assert_eq!(corrupt.len(), 1);
    assert_eq!(corrupt[0].bad_bytes, torn as u64);
    assert!(corrupt[0].truncated);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), records);
    let _ = std::fs::remove_dir_all(&dir);
}

fn bytes_on_disk(dir: &Path) -> u64 {
    seg_files(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

async fn store_done(spool: &Spool, n: usize) {
    let r = vec!["a@x.example".to_owned()];
    for _ in 0..n {
        let id = store(spool, &r, &[b'x'; 1000]).await;
        spool.mark_done(id, &[0], true);
    }
    spool.flush().await;
}

#[tokio::test]
async fn zeros_ahead_are_cut_off_once_a_compaction_interval_passes_without_a_message() {
    let dir = tmpdir("idle-zeros");
    let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
    store_done(&spool, 600).await;
    let records = spool.usage().bytes;
    assert!(bytes_on_disk(&dir) > records + writer::ZERO_AHEAD / 2);
    spool.compact().await;
    assert!(
        bytes_on_disk(&dir) > records,
        "messages came since the last compaction"
    );
    spool.compact().await;
    assert_eq!(bytes_on_disk(&dir), records);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_finished_current_segment_is_removed_by_compaction() {
    let dir = tmpdir("finished-current");
    let (spool, _, _) = Spool::open(&dir, HOUR).unwrap();
    store_done(&spool, 1100).await;
    assert!(spool.usage().bytes > 1024 * 1024);
    spool.compact().await;
    assert_eq!(bytes_on_disk(&dir), 0, "only a new, empty segment is left");
    let _ = std::fs::remove_dir_all(&dir);
}
